"""Never lose a user's file, never show a traceback (issue 14): one test per defect.

Data loss: demo --force, train into a user folder, --resume with contradicting options,
compare --out, evaluate --json and predict into its input folder.
Messages: full disks (mocked, and real ones on a small tmpfs where the machine lets a
test mount one), hostile pickles, NaN in info, huge batches and networks, overlapping slices.
"""

from __future__ import annotations

import errno
import hashlib
import json
import shutil
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch
from click.testing import CliRunner, Result

from cellp2p.checkpoint import load_checkpoint
from cellp2p.cli import main
from cellp2p.config import TrainConfig
from cellp2p.errors import CellP2PError
from cellp2p.fsutil import MARKER, folder_kind, write_failed
from cellp2p.io import write_stack
from cellp2p.synth import make_em

FAST = ["--crop", "32", "--batch-size", "2", "--quiet", "--device", "cpu"]
TINY_NET = {"depth": 2, "base": 4}


# -- helpers -----------------------------------------------------------------------------------


def cli(*args: object) -> Result:
    """The command line in this process, stderr kept apart."""
    return CliRunner().invoke(main, [str(a) for a in args])


def snapshot(folder: Path) -> dict[str, str]:
    """Every file and folder under ``folder``: relative path -> SHA-256 (folders: "dir")."""
    out = {}
    for p in sorted(folder.rglob("*")):
        rel = str(p.relative_to(folder))
        out[rel] = "dir" if p.is_dir() else hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def parts(folder: Path) -> list[Path]:
    """Temporary files left anywhere under ``folder``."""
    return [p for p in folder.rglob("*") if ".part" in p.name]


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A 6-slice 64x64 synthetic EM pair (what ``cellp2p synth --slices 6 --size 64`` makes)."""
    d = tmp_path_factory.mktemp("data")
    vol, lab = make_em(6, (64, 64), seed=0)
    return write_stack(d / "volume.tif", vol), write_stack(d / "labels.tif", lab)


def _train_args(data: tuple[Path, Path], out: Path, *extra: object) -> list[object]:
    return ["train", "--volume", data[0], "--labels", data[1], "--out", out, *FAST, *extra]


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory, data: tuple[Path, Path]) -> Path:
    """A 4-step binary U-Net run (evaluated at steps 2 and 4), trained once for the module."""
    from cellp2p.train import train

    out = tmp_path_factory.mktemp("runs") / "run"
    cfg = TrainConfig(
        volume=str(data[0]),
        labels=str(data[1]),
        crop=32,
        batch_size=2,
        max_steps=4,
        eval_every=2,
        quiet=True,
        device="cpu",
        model_overrides=TINY_NET,
    )
    train(cfg, out)
    return out


@pytest.fixture
def run(trained: Path, tmp_path: Path) -> Path:
    """A copy of the module's run to change."""
    return Path(shutil.copytree(trained, tmp_path / "run"))


def _user_folder(path: Path) -> Path:
    """A folder of the user's, with files named like a run's outputs among others."""
    (path / "samples").mkdir(parents=True)
    (path / "samples" / "step_0000002.png").write_bytes(b"my png")
    (path / "config.json").write_text('{"mine": true}\n')
    (path / "metrics.jsonl").write_text('{"step": 1, "mine": true}\n')
    (path / "loss_curve.png").write_bytes(b"my curve")
    (path / "notes.txt").write_text("keep me\n")
    return path


# -- 1. demo -----------------------------------------------------------------------------------


def test_demo_checks_steps_before_touching_anything(tmp_path, check_cli_error):
    folder = _user_folder(tmp_path / "mine")
    before = snapshot(folder)
    line = check_cli_error(cli("demo", "--out", folder, "--force", "--steps", "0"))
    assert "--steps" in line and "--max-steps" not in line
    assert snapshot(folder) == before


def test_demo_force_on_the_current_folder_deletes_nothing(tmp_path, check_cli_error, monkeypatch):
    folder = tmp_path / "cwd"
    folder.mkdir()
    (folder / "thesis.txt").write_text("years of work\n")
    (folder / "data").mkdir()  # a name the demo writes: refused even with --force
    before = snapshot(folder)
    monkeypatch.chdir(folder)
    check_cli_error(cli("demo", "--out", ".", "--force", "--steps", "1"), "data")
    assert snapshot(folder) == before
    check_cli_error(cli("demo", "--out", ".", "--steps", "1"), "--force")
    check_cli_error(cli("demo", "--out", ".", "--force", "--manifest", "nope"), "nope")
    assert snapshot(folder) == before


@pytest.mark.slow
def test_demo_writes_beside_user_files_and_replaces_only_its_own(tmp_path, monkeypatch):
    from cellp2p import demo

    monkeypatch.setattr(demo, "SYNTH_SLICES", 4)
    monkeypatch.setattr(demo, "SYNTH_SIZE", 64)
    monkeypatch.setattr(demo, "CROP", 64)
    folder = tmp_path / "cwd"
    folder.mkdir()
    (folder / "thesis.txt").write_text("years of work\n")
    monkeypatch.chdir(folder)
    first = cli("demo", "--out", ".", "--force", "--steps", "1")
    assert first.exit_code == 0, first.output
    assert (folder / "thesis.txt").read_text() == "years of work\n"
    assert folder_kind(folder) == "demo" and (folder / "report" / "report.md").is_file()
    (folder / "unet" / "my_notes.txt").write_text("mine\n")  # a user file inside its run
    again = cli("demo", "--out", ".", "--force", "--steps", "1")
    assert again.exit_code == 0, again.output
    assert (folder / "thesis.txt").read_text() == "years of work\n"
    assert (folder / "unet" / "my_notes.txt").read_text() == "mine\n"
    assert load_checkpoint(folder / "unet" / "checkpoints" / "last.pt")["step"] == 1


def test_rerunning_a_run_removes_only_its_own_files(run):
    from cellp2p.rundir import remove_run_outputs

    (run / "notes.txt").write_text("mine\n")
    (run / "checkpoints" / "mine.pt").write_bytes(b"x")
    remove_run_outputs(run)
    left = sorted(str(p.relative_to(run)) for p in run.rglob("*"))
    assert left == [".cellp2p.json", ".lock", "checkpoints", "checkpoints/mine.pt", "notes.txt"]
    user = _user_folder(run.parent / "user")
    before = snapshot(user)
    remove_run_outputs(user)  # not a run: untouched
    assert snapshot(user) == before


# -- 2. train into a folder that is not a run --------------------------------------------------


def test_train_refuses_a_user_folder_even_with_force(tmp_path, data, check_cli_error):
    folder = _user_folder(tmp_path / "mine")
    before = snapshot(folder)
    line = check_cli_error(cli(*_train_args(data, folder, "--max-steps", "2")), folder)
    assert "--force" in line
    assert snapshot(folder) == before
    forced = cli(*_train_args(data, folder, "--max-steps", "2", "--force"))
    check_cli_error(forced, "config.json")
    assert snapshot(folder) == before


def test_train_force_writes_the_run_beside_user_files(tmp_path, data):
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "notes.txt").write_text("keep me\n")
    res = cli(
        *_train_args(data, folder, "--max-steps", "1", "--force", "--config", _tiny(tmp_path))
    )
    assert res.exit_code == 0, res.output
    assert (folder / "notes.txt").read_text() == "keep me\n"
    assert folder_kind(folder) == "run" and (folder / "checkpoints" / "last.pt").is_file()


def _tiny(tmp_path: Path) -> Path:
    conf = tmp_path / f"tiny-{uuid.uuid4().hex[:6]}.json"
    conf.write_text(json.dumps({"model_overrides": TINY_NET}))
    return conf


def test_train_refuses_other_cellp2p_folders(tmp_path, data, check_cli_error):
    report = tmp_path / "report"
    report.mkdir()
    (report / MARKER).write_text('{"kind": "report"}\n')
    line = check_cli_error(cli(*_train_args(data, report, "--force")), report)
    assert "holds a cellp2p report" in line


# -- 5. --resume with options that contradict the run -------------------------------------------


RESUME_CONFLICTS = {
    "task": ["--task", "translate"],
    "mode": ["--mode", "pix2pix"],
    "preset": ["--preset", "paper"],
    "direction": ["--direction", "BtoA", "--task", "translate"],
    "labels-mode": ["--labels-mode", "nonzero"],
    "upsample": ["--upsample", "resize"],
    "norm": ["--norm-method", "minmax"],
}


@pytest.mark.parametrize("extra", RESUME_CONFLICTS.values(), ids=RESUME_CONFLICTS.keys())
def test_resume_refuses_options_that_contradict_the_run(run, check_cli_error, extra):
    before = snapshot(run)
    res = cli("train", "--out", run, "--resume", "--max-steps", "6", *extra)
    line = check_cli_error(res, "last.pt", extra[0])
    assert "the run has" in line
    assert snapshot(run) == before


def test_resume_refuses_other_data_files_but_not_the_same_ones(run, data, check_cli_error):
    before = snapshot(run)
    other = ["--volume", data[1], "--labels", data[1]]
    check_cli_error(cli("train", "--out", run, "--resume", *other), "--volume", "last.pt")
    conf = run.parent / "c.json"
    conf.write_text(json.dumps({"task": "translate"}))
    check_cli_error(cli("train", "--out", run, "--resume", "--config", conf), "--task")
    assert snapshot(run) == before
    same = ["--volume", data[0].resolve(), "--labels", data[1]]  # another spelling, same file
    res = cli("train", "--out", run, "--resume", "--max-steps", "5", "--eval-every", "5", *same)
    assert res.exit_code == 0, res.output
    assert load_checkpoint(run / "checkpoints" / "last.pt")["step"] == 5


def _edit_checkpoint(path: Path, edit) -> None:
    ckpt = torch.load(path, weights_only=True)
    edit(ckpt)
    torch.save(ckpt, path)


def test_resume_with_an_unknown_recorded_preset_names_the_file(run, check_cli_error):
    last = run / "checkpoints" / "last.pt"
    _edit_checkpoint(last, lambda c: c["train_config"].update(preset="huge"))
    line = check_cli_error(cli("train", "--out", run, "--resume", "--max-steps", "6"), last)
    assert "huge" in line


def test_resume_with_networks_that_do_not_fit_names_the_file(run, check_cli_error):
    last = run / "checkpoints" / "last.pt"
    _edit_checkpoint(last, lambda c: c["models"].update(other=c["models"].pop("unet")))
    before = snapshot(run)
    line = check_cli_error(cli("train", "--out", run, "--resume", "--max-steps", "6"), last)
    assert "unet" in line
    assert snapshot(run) == before


def test_resume_on_data_that_changed_on_disk(tmp_path, data, check_cli_error):
    from cellp2p.train import train

    d = Path(shutil.copytree(data[0].parent, tmp_path / "data"))
    cfg = TrainConfig(
        volume=str(d / "volume.tif"),
        labels=str(d / "labels.tif"),
        crop=32,
        batch_size=1,
        max_steps=1,
        eval_every=1,
        quiet=True,
        device="cpu",
        model_overrides=TINY_NET,
    )
    train(cfg, tmp_path / "run")
    vol = tifffile.imread(d / "volume.tif")
    write_stack(d / "volume.tif", np.stack([vol, vol, vol], axis=1), force=True)  # now RGB
    before = snapshot(tmp_path / "run")
    res = cli("train", "--out", tmp_path / "run", "--resume", "--max-steps", "2")
    check_cli_error(res, "volume.tif", "in channels")
    assert snapshot(tmp_path / "run") == before


# -- full disks ----------------------------------------------------------------------------------


def _zip_writer_failure(obj, path, *args, **kwargs):
    """How torch's zip writer meets a full disk: a RuntimeError that does not say "write"."""
    Path(path).write_bytes(b"PK\x03\x04")
    raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 2085120 vs 20")


def test_checkpoint_on_a_full_disk_is_one_line_and_keeps_the_last_one(
    run, check_cli_error, monkeypatch
):
    before = snapshot(run / "checkpoints")
    monkeypatch.setattr(torch, "save", _zip_writer_failure)
    res = cli("train", "--out", run, "--resume", "--max-steps", "6", "--eval-every", "2")
    line = res.output.strip().splitlines()[-1]  # --quiet's log line of step 6 comes first
    assert isinstance(res.exception, SystemExit) and res.exit_code == 1, res.output
    assert line.startswith("Error: ") and "last.pt" in line and "Traceback" not in res.output
    assert "disk" in line and "full" in line and "previous last.pt is intact" in line
    assert snapshot(run / "checkpoints") == before and not parts(run)


def test_short_writes_and_nameless_errors_say_disk_full(tmp_path):
    short = OSError("65536 requested and 65444 written")
    assert "disk full" in str(write_failed(tmp_path / "v.tif", short))
    assert "v.tif" in str(write_failed(tmp_path / "v.tif", short))
    from cellp2p.errors import os_error_line

    line = os_error_line(OSError(errno.ENOSPC, "No space left on device"))
    assert "disk full" in line and not line.startswith("output")


def test_outputs_can_be_checked_without_making_folders(tmp_path):
    from cellp2p.fsutil import check_output

    assert check_output(tmp_path / "a" / "b.tif", create=False) == tmp_path / "a" / "b.tif"
    assert not (tmp_path / "a").exists()
    (tmp_path / "c.tif").write_bytes(b"mine")
    with pytest.raises(CellP2PError, match="--force"):
        check_output(tmp_path / "c.tif", create=False)


def test_a_failed_append_leaves_only_whole_records(run, monkeypatch):
    from cellp2p import rundir

    log = run / "metrics.jsonl"
    before = log.read_bytes()

    class Full:
        """A file whose appends stop part-way on a full disk."""

        def __init__(self, path, mode="r", *args):
            self.fh, self.mode = open(path, mode, *args), mode  # noqa: SIM115

        def __getattr__(self, name):
            return getattr(self.fh, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.fh.close()

        def write(self, text):
            if "a" not in self.mode:
                return self.fh.write(text)
            self.fh.write(text[:7])
            self.fh.flush()
            raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(rundir, "open", Full, raising=False)
    with pytest.raises(CellP2PError, match=r"metrics\.jsonl.*disk full"):
        rundir.append_record(run, {"step": 6})
    assert log.read_bytes() == before


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[callable]:
    """``small_disk(size)``: a tmpfs of that size under tmp_path (skips where none mounts)."""
    mounted: list[Path] = []

    def mount(size: str) -> Path:
        point = tmp_path / f"disk{len(mounted)}"
        point.mkdir()
        proc = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(point)],
            capture_output=True,
            text=True,
        )
        if proc.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here: {proc.stderr.strip() or proc.returncode}")
        mounted.append(point)
        return point

    if shutil.which("mount") is None:
        pytest.skip("no mount command")
    yield mount
    for point in mounted:
        subprocess.run(["umount", "-l", str(point)], capture_output=True)


def test_training_into_a_2mb_disk(small_disk, data, check_cli_error):
    disk = small_disk("2m")
    out = disk / "run"
    res = cli(*_train_args(data, out, "--max-steps", "2"))  # the small preset: 6 MB checkpoints
    line = res.output.strip().splitlines()[-1]
    assert isinstance(res.exception, SystemExit) and res.exit_code == 1, res.output
    assert line.startswith("Error: ") and "Traceback" not in res.output
    assert "last.pt" in line and "disk full" in line
    assert not parts(disk)
    json.loads((out / "config.json").read_text())  # whatever is there is whole


def test_resume_on_a_disk_too_small_for_the_next_checkpoint(small_disk, trained):
    size = sum(p.stat().st_size for p in trained.rglob("*") if p.is_file())
    last = (trained / "checkpoints" / "last.pt").stat().st_size
    disk = small_disk(f"{(size + last // 2) // 4096 * 4096 + 64 * 1024}")
    run = Path(shutil.copytree(trained, disk / "run"))
    before = (run / "checkpoints" / "last.pt").read_bytes()
    res = cli("train", "--out", run, "--resume", "--max-steps", "6", "--eval-every", "2")
    line = res.output.strip().splitlines()[-1]
    assert res.exit_code == 1 and line.startswith("Error: ") and "Traceback" not in res.output
    assert "disk full" in line and ("intact" in line or "nothing was saved" in line)
    assert (run / "checkpoints" / "last.pt").read_bytes() == before
    assert not parts(disk)


def test_synth_into_a_full_disk(small_disk, check_cli_error):
    disk = small_disk("64k")
    line = check_cli_error(cli("synth", "--out", disk / "d", "--slices", "4", "--size", "128"))
    assert "volume.tif" in line and "disk full" in line
    assert not parts(disk) and not (disk / "d" / "volume.tif").exists()


# -- messages ------------------------------------------------------------------------------------


class _Eval:
    def __reduce__(self):
        return (eval, ("print('pwned')",))


def test_a_pickle_calling_eval_is_refused_as_code(tmp_path, data, check_cli_error, capfd):
    evil = tmp_path / "evil.pt"
    torch.save({"format": "cellp2p-checkpoint", "version": 1, "x": _Eval()}, evil)
    with pytest.raises(CellP2PError, match="carries code") as err:
        load_checkpoint(evil)
    assert "damaged" not in str(err.value) and "builtins.eval" in str(err.value)
    line = check_cli_error(cli("predict", data[0], "-m", evil, "-o", tmp_path / "p.tif"), evil)
    assert "carries code" in line
    assert "pwned" not in capfd.readouterr().out


def test_info_counts_nan_instead_of_a_range_to_inf(tmp_path):
    vol = np.arange(2 * 8 * 8, dtype=np.float32).reshape(2, 8, 8) + 4
    vol[0, 0, 1] = vol[1, 3, 3] = np.nan
    vol[1, 2, 2] = np.inf
    res = cli("info", write_stack(tmp_path / "nan.tif", vol))
    assert res.exit_code == 0, res.output
    assert "4.0 .. 131.0" in res.output and "2 NaN, 1 inf" in res.output
    assert "inf\n" not in res.output.split("range", 1)[1].splitlines()[0] + "\n"


REFUSED_UP_FRONT = {
    "huge batch": (["--batch-size", "100000000"], {}, "--batch-size"),
    "huge base": ([], {"model_overrides": {"base": 100000}}, "parameters"),
    "huge depth": ([], {"model_overrides": {"depth": 100000}}, "depth"),
    "overlap": (["--train-slices", "0-3", "--val-slices", "3-5"], {}, "--val-slices"),
    "huge slices": (["--train-slices", "0-99999999999"], {}, "0-99999999999"),
}


@pytest.mark.parametrize(
    ("extra", "conf", "needle"), REFUSED_UP_FRONT.values(), ids=REFUSED_UP_FRONT.keys()
)
def test_train_refuses_up_front_and_leaves_no_folder(
    tmp_path, data, check_cli_error, extra, conf, needle
):
    out = tmp_path / "new" / "run"
    config = tmp_path / "c.json"
    config.write_text(json.dumps(conf))
    res = cli(*_train_args(data, out, "--max-steps", "2", "--config", config, *extra))
    check_cli_error(res, needle)
    assert not (tmp_path / "new").exists()


def test_overlap_that_the_user_did_not_choose_is_a_note(tmp_path, data, capsys):
    from cellp2p.dataset import check_overlap

    cfg = TrainConfig(volume="v.tif", labels="l.tif", train_slices="0-5")
    check_overlap(cfg, list(range(6)), [5], Path("v.tif"))
    assert "note: v.tif: validating on slices 5" in capsys.readouterr().err


def test_fetch_with_a_failing_download_leaves_no_folder(tmp_path, check_cli_error, monkeypatch):
    import pooch

    def offline(*args, **kwargs):
        raise ConnectionError("no network in tests")

    monkeypatch.setattr(pooch, "retrieve", offline)
    manifest = tmp_path / "m.json"
    entry = {"role": "volume", "name": "v.tif", "shape": [2, 8, 8], "dtype": "uint8"}
    entry |= {"pixel_sha256": "0" * 64, "url": "https://example.invalid/v.tif"}
    manifest.write_text(json.dumps({"name": "bogus", "files": [entry]}))
    check_cli_error(cli("fetch", manifest, "--dest", tmp_path / "dest"), "example.invalid")
    assert not (tmp_path / "dest").exists()


# -- compare, evaluate, predict: their outputs and folders ------------------------------


def test_compare_refuses_a_user_folder(trained, data, tmp_path, check_cli_error):
    folder = tmp_path / "mine"
    (folder / "panels").mkdir(parents=True)
    (folder / "panels" / "figure1.png").write_bytes(b"my figure")
    (folder / "report.md").write_text("# my report\n")
    before = snapshot(folder)
    res = cli("compare", trained, "--out", folder, "--device", "cpu")
    check_cli_error(res, folder, "--force")
    assert snapshot(folder) == before


def test_evaluate_json_refuses_an_existing_file(run, data, tmp_path, check_cli_error):
    pred = write_stack(tmp_path / "pred.tif", tifffile.imread(data[1]))
    before = snapshot(run)
    res = cli("evaluate", pred, "--labels", data[1], "--json", run / "config.json")
    check_cli_error(res, "config.json", "--force")
    assert snapshot(run) == before


def test_predict_refuses_an_output_inside_its_input_folder(
    trained, data, tmp_path, check_cli_error
):
    folder = tmp_path / "imgs"
    folder.mkdir()
    vol = tifffile.imread(data[0])
    for i in range(2):
        tifffile.imwrite(folder / f"img{i + 1}.tif", vol[i])
    before = snapshot(folder)
    res = cli("predict", folder, "-m", trained, "-o", folder / "img1.tif", "--force", "--quiet")
    check_cli_error(res, "img1.tif")
    assert snapshot(folder) == before


def _nan_stack(folder: Path) -> Path:
    vol = np.ones((2, 64, 64), np.float32)
    vol[1, 3, 3] = np.nan
    return write_stack(folder / "nan.tif", vol)


REFUSALS_AFTER_MKDIR = {
    "predict": lambda t, run, d: ["predict", _nan_stack(t), "-m", run, "-o", t / "new" / "p.tif"],
    "evaluate": lambda t, run, d: [
        "evaluate",
        _nan_stack(t),
        "--labels",
        d[1],
        "--json",
        t / "new" / "m.json",
    ],
    "compare": lambda t, run, d: ["compare", t, "--out", t / "new", "--device", "cpu"],
}


@pytest.mark.parametrize("make", REFUSALS_AFTER_MKDIR.values(), ids=REFUSALS_AFTER_MKDIR.keys())
def test_refusals_leave_no_folder(trained, data, tmp_path, check_cli_error, make):
    check_cli_error(cli(*make(tmp_path, trained, data)))
    assert not (tmp_path / "new").exists()


def test_evaluate_negative_label_ids_names_the_file(tmp_path, check_cli_error):
    labels = np.zeros((2, 16, 16), np.int16)
    labels[:, :4] = -3
    labels[:, 8:] = 2
    pred = np.zeros((2, 16, 16), np.uint8)
    pred[:, 8:] = 255
    lpath = write_stack(tmp_path / "neg.tif", labels)
    ppath = write_stack(tmp_path / "pred.tif", pred)
    check_cli_error(cli("evaluate", ppath, "--labels", lpath), lpath)
