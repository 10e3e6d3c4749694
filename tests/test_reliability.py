"""Reliability: bad inputs through every command, untrusted files, faults mid-write, load.

Each user-fixable failure must be one ``Error: <file>: <what>; <fix>`` line, exit 1, and leave
nothing at the output path (no partial file, no ``.part`` temporary). Read-only folders are
simulated by patching ``os.access`` (the tests run as root, where chmod does not stop writes) or
by an output path under a regular file; a full disk by a writer raising ``ENOSPC`` part-way.

Covered elsewhere (not repeated here): info/train on empty, truncated, text, zero-slice and
TZCYX files, NaN volumes and mismatched pairs for train (test_cli.py); mismatched stacks for
evaluate (test_evaluate.py); wrong channels, NaN, missing/truncated/foreign checkpoints and
SIGKILL mid-prediction for predict (test_predict.py); SIGKILL then resume, SIGINT's final
checkpoint and the lock file held by flock (test_train.py); manifest schema errors
(test_data.py).
"""

from __future__ import annotations

import errno
import io as _io
import json
import os
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
import warnings
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import tifffile
import torch
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cellp2p.checkpoint import FORMAT, load_checkpoint, save_checkpoint, write_checkpoints
from cellp2p.cli import main
from cellp2p.errors import CellP2PError
from cellp2p.io import StackReader, write_stack

REPO = Path(__file__).resolve().parents[1]
TRAIN_FAST = ["--max-steps", "1", "--crop", "32", "--batch-size", "1", "--quiet"]


# -- helpers -----------------------------------------------------------------------------------


# Every checkpoint here comes from a run that cellp2p.train.train made (tests/conftest.py): a
# binary U-Net trained on the synthetic EM pair (seg_run) and one trained on a 3-channel version
# of it (rgb_run). Damaged and hostile checkpoints start from seg_run's and are edited.


@pytest.fixture(scope="module")
def model(seg_run) -> Path:
    return seg_run.best


@pytest.fixture(scope="module")
def rgb_model(rgb_run) -> Path:
    return rgb_run.best


@pytest.fixture
def payload(seg_run) -> dict:
    """The payload train wrote to seg_run's last.pt (a fresh copy to edit)."""
    ckpt = torch.load(seg_run.last, weights_only=True)
    assert ckpt.pop("format") == FORMAT
    ckpt.pop("version")
    return ckpt


def _run(*args: object):
    return CliRunner().invoke(main, [str(a) for a in args])


def _no_output(folder: Path, *finals: Path) -> None:
    """Nothing at the final paths and no temporary files left anywhere under ``folder``."""
    for final in finals:
        assert not final.exists(), f"{final} was written"
    parts = [p for p in folder.rglob("*") if ".part" in p.name]
    assert not parts, parts


def _late_error(result, *names: object) -> str:
    """A failure after work began: progress lines may precede it; one ``Error:`` line ends it."""
    out = result.output
    assert isinstance(result.exception, SystemExit), f"unhandled {result.exception!r}\n{out}"
    assert result.exit_code == 1 and "Traceback" not in out, out
    errors = [x for x in out.splitlines() if x.startswith("Error: ")]
    assert len(errors) == 1 and out.strip().splitlines()[-1] == errors[0], out
    for name in names:
        assert str(name) in errors[0], f"{name} not named in: {errors[0]}"
    return errors[0]


def _enospc(*_args: object, **_kw: object) -> None:
    raise OSError(errno.ENOSPC, "No space left on device")


def _full_after(n: int):
    """A ``TiffWriter.write`` that writes ``n`` pages, then fails as a full disk would."""
    real, calls = tifffile.TiffWriter.write, [0]

    def write(self, *args, **kwargs):
        calls[0] += 1
        if calls[0] > n:
            _enospc()
        return real(self, *args, **kwargs)

    return write


# -- bad input files through every command -------------------------------------------------------


def _six_axes(d: Path) -> Path:
    tifffile.imwrite(d / "six.tif", np.zeros((2, 2, 2, 2, 8, 8), np.uint8))
    return d / "six.tif"


def _seven_axes(d: Path) -> Path:
    tifffile.imwrite(d / "seven.tif", np.zeros((2, 1, 2, 1, 2, 8, 8), np.uint8))
    return d / "seven.tif"


def _complex(d: Path) -> Path:
    tifffile.imwrite(d / "complex.tif", np.zeros((2, 8, 8), np.complex64))
    return d / "complex.tif"


def _random_png(d: Path) -> Path:
    (d / "noise.png").write_bytes(b"\x89PNG\r\n\x1a\n" + np.random.default_rng(0).bytes(200))
    return d / "noise.png"


def _text_jpg(d: Path) -> Path:
    (d / "notes.jpg").write_text("not a photo\n")
    return d / "notes.jpg"


def _empty(d: Path) -> Path:
    (d / "empty.tif").write_bytes(b"")
    return d / "empty.tif"


def _truncated(d: Path) -> Path:
    tifffile.imwrite(d / "full.tif", np.zeros((5, 24, 32), np.uint8))
    raw = (d / "full.tif").read_bytes()
    (d / "cut.tif").write_bytes(raw[: len(raw) - 100])
    (d / "full.tif").unlink()
    return d / "cut.tif"


def _zero_slices(d: Path) -> Path:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tifffile.imwrite(d / "zero.tif", np.zeros((0, 24, 32), np.uint8))
    return d / "zero.tif"


# info on empty/truncated/text/zero-slice files is in test_cli.py; these are the new kinds.
NEW_BAD_FILES = {
    "six-axes": _six_axes,
    "seven-axes": _seven_axes,
    "complex": _complex,
    "random-png": _random_png,
    "text-jpg": _text_jpg,
}
ALL_BAD_FILES = {**NEW_BAD_FILES, "empty": _empty, "truncated": _truncated, "zero": _zero_slices}


@pytest.mark.parametrize("make", NEW_BAD_FILES.values(), ids=NEW_BAD_FILES.keys())
def test_info_refuses_more_bad_files(tmp_path, check_cli_error, make):
    bad = make(tmp_path)
    check_cli_error(_run("info", bad), bad)


@pytest.mark.parametrize("make", ALL_BAD_FILES.values(), ids=ALL_BAD_FILES.keys())
def test_predict_evaluate_compare_refuse_bad_files(tmp_path, check_cli_error, em_pair, model, make):
    bad = make(tmp_path)
    out = tmp_path / "out"
    check_cli_error(_run("predict", bad, "-m", model, "-o", out / "p.tif", "--quiet"), bad)
    check_cli_error(_run("evaluate", bad, "--labels", em_pair.labels_path), bad)
    check_cli_error(
        _run("evaluate", em_pair.volume_path, "--labels", bad, "--json", out / "m.json"), bad
    )
    args = ["compare", model, "--volume", bad, "--labels", em_pair.labels_path, "--out", out]
    check_cli_error(_run(*args), bad)
    _no_output(tmp_path, out / "p.tif", out / "m.json", out / "report.md")


def test_train_refuses_more_bad_files(tmp_path, check_cli_error, em_pair):
    for name, make in NEW_BAD_FILES.items():
        bad = make(tmp_path)
        for vol, lab in ((bad, em_pair.labels_path), (em_pair.volume_path, bad)):
            out = tmp_path / f"run-{name}"
            args = ["train", "--volume", vol, "--labels", lab, "--out", out, *TRAIN_FAST]
            check_cli_error(_run(*args), bad)
            assert not (out / "checkpoints").exists()


def test_nan_and_inf_in_evaluate_and_compare(tmp_path, check_cli_error, em_pair, model):
    pred = em_pair.volume.astype(np.float32)
    pred[1, 3, 3] = np.inf
    ppath = write_stack(tmp_path / "pred.tif", pred)
    line = check_cli_error(
        _run("evaluate", ppath, "--labels", em_pair.volume_path, "--task", "translate"), ppath
    )
    assert "NaN/inf" in line
    vol = em_pair.volume.astype(np.float32)
    vol[3, 0, 0] = np.nan  # slice 3: the held-out slice compare scores by default
    vpath = write_stack(tmp_path / "vol.tif", vol)
    out = tmp_path / "cmp"
    args = ["compare", model, "--volume", vpath, "--labels", em_pair.labels_path, "--out", out]
    assert "NaN/inf" in check_cli_error(_run(*args), vpath)
    assert not (out / "report.md").exists()


def test_labels_of_another_size_or_slice_count_in_compare(
    tmp_path, check_cli_error, em_pair, model
):
    short = write_stack(tmp_path / "short.tif", em_pair.labels[:3])
    narrow = write_stack(tmp_path / "narrow.tif", em_pair.labels[:, :, :40])
    out = tmp_path / "cmp"
    for labels in (short, narrow):
        args = ["compare", model, "--volume", em_pair.volume_path, "--labels", labels]
        check_cli_error(_run(*args, "--out", out), labels)
        assert not (out / "report.md").exists()


def test_rgb_where_grayscale_is_expected_and_the_reverse(
    tmp_path, check_cli_error, em_pair, model, rgb_model
):
    rgb = np.stack([em_pair.volume] * 3, axis=-1)
    rgb[..., 1] //= 2  # not grey saved as RGB: three real channels
    rgb_path = tmp_path / "rgb.tif"
    tifffile.imwrite(rgb_path, rgb, photometric="rgb")
    out = tmp_path / "out"
    # RGB into a grayscale model, and grayscale into an RGB model.
    line = check_cli_error(_run("predict", rgb_path, "-m", model, "-o", out / "a.tif"), rgb_path)
    assert "3 channel(s)" in line and "trained on 1" in line
    gray = em_pair.volume_path
    line = check_cli_error(_run("predict", gray, "-m", rgb_model, "-o", out / "b.tif"), gray)
    assert "1 channel(s)" in line and "trained on 3" in line
    # RGB labels for segmentation, RGB predictions to score, RGB volume for a grayscale run.
    args = ["train", "--volume", gray, "--labels", rgb_path, "--out", out / "run", *TRAIN_FAST]
    check_cli_error(_run(*args), rgb_path)
    check_cli_error(_run("evaluate", rgb_path, "--labels", em_pair.labels_path), rgb_path)
    check_cli_error(_run("evaluate", gray, "--labels", rgb_path), rgb_path)
    args = ["compare", model, "--volume", rgb_path, "--labels", em_pair.labels_path]
    check_cli_error(_run(*args, "--out", out / "cmp"), rgb_path)
    _no_output(tmp_path, out / "a.tif", out / "b.tif", out / "run" / "checkpoints")
    assert not (out / "cmp" / "report.md").exists()


# -- invalid option values and combinations ----------------------------------------------------


@pytest.mark.parametrize(
    ("extra", "needle"),
    [
        (["--tile", "0"], "--tile"),
        (["--tile", "-8"], "--tile"),
        (["--overlap", "nan"], "--overlap"),
        (["--overlap", "-0.1"], "--overlap"),
        (["--threshold", "nan"], "--threshold"),
        (["--threshold", "1.5"], "--threshold"),
        (["--batch-size", "0"], "--batch-size"),
        (["--slices", "3-1"], "3-1"),
        (["--slices", "9"], "'9'"),
        (["--slices", "a-b"], "a-b"),
        (["--device", "tpu"], "--device"),
        (["--output", "labels", "--threshold", "-1"], "--threshold"),
    ],
)
def test_predict_invalid_options(tmp_path, check_cli_error, em_pair, model, extra, needle):
    out = tmp_path / "p.tif"
    check_cli_error(_run("predict", em_pair.volume_path, "-m", model, "-o", out, *extra), needle)
    _no_output(tmp_path, out)


@pytest.mark.parametrize(
    ("extra", "needle"),
    [
        (["--task", "translate", "--data-range", "nan"], "--data-range"),
        (["--task", "translate", "--data-range", "0"], "--data-range"),
        (["--task", "translate", "--data-range", "-5"], "--data-range"),
        (["--json", "{tmp}/metrics.txt"], "--json"),
        (["--json", "{tmp}"], "ending in .json"),
        (["--slices", "0-99"], "0-99"),
        (["--kind", "prob"], "prob"),  # 8-bit images are not probabilities
    ],
)
def test_evaluate_invalid_options(tmp_path, check_cli_error, em_pair, extra, needle):
    extra = [e.replace("{tmp}", str(tmp_path)) for e in extra]
    args = ["evaluate", em_pair.volume_path, "--labels", em_pair.labels_path, *extra]
    line = check_cli_error(_run(*args))
    assert needle.replace("{tmp}", str(tmp_path)) in line
    assert not list(tmp_path.glob("*.json")) and not list(tmp_path.glob("*.txt"))


def test_compare_invalid_options(tmp_path, check_cli_error, em_pair, model):
    base = ["compare", model, "--volume", em_pair.volume_path, "--labels", em_pair.labels_path]
    out = tmp_path / "cmp"
    check_cli_error(_run(*base, "--out", out, "--names", "a,b"), "--names")
    check_cli_error(_run(*base, "--out", out, "--slices", "7"), "'7'")
    check_cli_error(_run(*base, "--out", out, "--manifest", "isbi2012"), "--manifest")
    bogus = tmp_path / "bogus.pt"
    bogus.write_bytes(b"not a checkpoint")
    check_cli_error(_run(*base, "--out", out, "--segmenter", bogus), bogus)
    assert not out.exists() or not any(out.iterdir())


# Out-of-range numbers TrainConfig.validate refuses before anything is read or written.
TRAIN_BAD_NUMBERS = {
    "negative-seed": ["--seed", "-1"],
    "huge-seed": ["--seed", str(2**70)],
    "negative-workers": ["--num-workers", "-1"],
    "nan-lambda": ["--mode", "pix2pix", "--lambda-l1", "nan"],
    "infinite-lr": ["--lr", "inf"],
}


@pytest.mark.parametrize("extra", TRAIN_BAD_NUMBERS.values(), ids=TRAIN_BAD_NUMBERS.keys())
def test_train_invalid_options(tmp_path, check_cli_error, em_pair, extra):
    out = tmp_path / "run"
    args = ["train", "--volume", em_pair.volume_path, "--labels", em_pair.labels_path]
    check_cli_error(_run(*args, "--out", out, *TRAIN_FAST, *extra), extra[-2])
    assert not (out / "checkpoints").exists()


# -- output folders: missing, read-only, under a file ------------------------------------------


def test_missing_output_folders_are_created(tmp_path, em_pair, model):
    out = tmp_path / "new" / "deeper" / "p.tif"
    res = _run("predict", em_pair.volume_path, "-m", model, "-o", out, "--quiet")
    assert res.exit_code == 0, res.output
    assert StackReader(out).shape == (4, 64, 64)
    res = _run("evaluate", out, "--labels", em_pair.labels_path, "--json", tmp_path / "j/m.json")
    assert res.exit_code == 0, res.output
    assert json.loads((tmp_path / "j" / "m.json").read_text())["labels"]


def _commands_writing_into(out: Path, pair, model: Path) -> dict[str, list]:
    vol, lab = pair.volume_path, pair.labels_path
    return {
        "predict": ["predict", vol, "-m", model, "-o", out / "p.tif", "--quiet"],
        "synth": ["synth", "--out", out, "--slices", "2", "--size", "32"],
        "evaluate": ["evaluate", vol, "--labels", lab, "--json", out / "m.json"],
        "compare": ["compare", model, "--volume", vol, "--labels", lab, "--out", out],
        "train": ["train", "--volume", vol, "--labels", lab, "--out", out / "run", *TRAIN_FAST],
    }


def _url_manifest(tmp_path: Path) -> Path:
    """A valid manifest with a download url that is never contacted (the check comes first)."""
    entry = {
        "role": "volume",
        "name": "v.tif",
        "shape": [2, 8, 8],
        "dtype": "uint8",
        "pixel_sha256": "0" * 64,
        "url": "http://127.0.0.1:9/v.tif",
    }
    path = tmp_path / "m.json"
    path.write_text(json.dumps({"name": "tiny", "files": [entry]}))
    return path


@pytest.mark.parametrize("command", ["predict", "synth", "evaluate", "compare", "train", "fetch"])
def test_output_under_a_regular_file(tmp_path, check_cli_error, em_pair, model, command):
    blocker = tmp_path / "somefile.txt"
    blocker.write_text("a file, not a folder")
    out = blocker / "out"
    args = _commands_writing_into(out, em_pair, model).get(command)
    if command == "fetch":
        args = ["fetch", _url_manifest(tmp_path), "--dest", out]
    check_cli_error(_run(*args), blocker)
    assert blocker.read_text() == "a file, not a folder"
    _no_output(tmp_path)


@pytest.mark.parametrize("command", ["predict", "synth", "evaluate", "compare", "fetch"])
def test_read_only_output_folder(tmp_path, check_cli_error, em_pair, model, command, monkeypatch):
    out = tmp_path / "readonly"
    out.mkdir()
    args = _commands_writing_into(out, em_pair, model).get(command)
    if command == "fetch":
        args = ["fetch", _url_manifest(tmp_path), "--dest", out]
    real_access = os.access

    def access(path, mode, *a, **kw):
        inside = Path(path).resolve().is_relative_to(out.resolve())
        return False if inside and mode & os.W_OK else real_access(path, mode, *a, **kw)

    monkeypatch.setattr(os, "access", access)
    line = check_cli_error(_run(*args))
    assert "not writable" in line and str(out) in line
    assert not [p for p in out.rglob("*") if p.is_file()]


def test_train_into_a_folder_it_may_not_create(tmp_path, check_cli_error, em_pair, monkeypatch):
    """What a non-root user meets on a read-only folder: the OS refuses, one line says so."""
    out = tmp_path / "locked" / "run"
    real_mkdir = Path.mkdir

    def mkdir(self, *args, **kwargs):
        if Path(self).is_relative_to(tmp_path / "locked"):
            raise PermissionError(errno.EACCES, "Permission denied", str(self))
        return real_mkdir(self, *args, **kwargs)

    monkeypatch.setattr(Path, "mkdir", mkdir)
    args = ["train", "--volume", em_pair.volume_path, "--labels", em_pair.labels_path]
    line = check_cli_error(_run(*args, "--out", out, *TRAIN_FAST), out)
    assert "permission denied" in line
    assert not (tmp_path / "locked").exists()


def test_train_read_only_output_folder(tmp_path, check_cli_error, em_pair, monkeypatch):
    out = tmp_path / "readonly"
    out.mkdir()
    real_access = os.access

    def access(path, mode, *a, **kw):
        inside = Path(path).resolve().is_relative_to(out.resolve())
        return False if inside and mode & os.W_OK else real_access(path, mode, *a, **kw)

    monkeypatch.setattr(os, "access", access)
    args = ["train", "--volume", em_pair.volume_path, "--labels", em_pair.labels_path]
    line = check_cli_error(_run(*args, "--out", out / "run", *TRAIN_FAST))
    assert "not writable" in line


# -- a full disk while writing -----------------------------------------------------------------


def test_full_disk_while_predicting(tmp_path, check_cli_error, em_pair, model, monkeypatch):
    out = tmp_path / "p.tif"
    monkeypatch.setattr(tifffile.TiffWriter, "write", _full_after(2))
    line = _late_error(_run("predict", em_pair.volume_path, "-m", model, "-o", out), out)
    assert "No space left on device" in line and "free some space" in line
    _no_output(tmp_path, out)


def test_full_disk_while_synthesising(tmp_path, check_cli_error, monkeypatch):
    out = tmp_path / "syn"
    monkeypatch.setattr(tifffile.TiffWriter, "write", _full_after(1))
    line = check_cli_error(_run("synth", "--out", out, "--slices", "3", "--size", "32"))
    assert "No space left on device" in line and "volume.tif" in line
    _no_output(tmp_path, out / "volume.tif", out / "labels.tif")


def test_full_disk_keeps_the_old_file_when_overwriting(tmp_path, monkeypatch):
    old = write_stack(tmp_path / "s.tif", np.ones((2, 8, 8), np.uint8))
    before = old.read_bytes()
    monkeypatch.setattr(tifffile.TiffWriter, "write", _full_after(1))
    with pytest.raises(CellP2PError, match=r"s\.tif: could not be written"):
        write_stack(old, np.zeros((3, 8, 8), np.uint8), force=True)
    assert old.read_bytes() == before
    _no_output(tmp_path)


@pytest.mark.parametrize("where", ["close", "rename"])
def test_failure_while_finishing_a_stack_leaves_nothing(tmp_path, monkeypatch, where):
    if where == "close":  # the last pages are flushed when the writer closes
        monkeypatch.setattr(tifffile.TiffWriter, "close", _enospc)
    else:  # a new file is claimed by a hard link (a rename where links fail or to replace)
        monkeypatch.setattr(os, "link", _enospc)
        monkeypatch.setattr(os, "replace", _enospc)
    final = tmp_path / "s.tif"
    with pytest.raises(CellP2PError, match="could not be written"):
        write_stack(final, np.zeros((2, 8, 8), np.uint8))
    monkeypatch.undo()
    _no_output(tmp_path, final)


def _partial_save(obj, path, *args, **kwargs):
    """torch.save that gets half-way, then meets a full disk."""
    Path(path).write_bytes(b"PK\x03\x04" + b"\0" * 1000)
    raise OSError(errno.ENOSPC, "No space left on device")


def _stream_writer_failure(obj, path, *args, **kwargs):
    """How torch's zip writer reports a failed write: a RuntimeError, not an OSError."""
    Path(path).write_bytes(b"PK\x03\x04")
    raise RuntimeError("[enforce fail at inline_container.cc:664] . unexpected pos 64 vs 0")


@pytest.mark.parametrize("fake", [_partial_save, _stream_writer_failure])
def test_full_disk_while_saving_a_checkpoint(tmp_path, monkeypatch, fake):
    path = tmp_path / "ck" / "last.pt"
    monkeypatch.setattr(torch, "save", fake)
    if fake is _stream_writer_failure:  # torch's words for a full disk: still one line
        with pytest.raises(CellP2PError, match=r"last\.pt: could not be written.*disk may be full"):
            save_checkpoint(path, {"step": 1})
    else:
        with pytest.raises(CellP2PError, match=r"last\.pt: could not be written \(No space"):
            save_checkpoint(path, {"step": 1})
    _no_output(tmp_path, path)


def test_full_disk_during_training_is_one_line(tmp_path, em_pair, monkeypatch):
    monkeypatch.setattr(torch, "save", _partial_save)
    out = tmp_path / "run"
    args = ["train", "--volume", em_pair.volume_path, "--labels", em_pair.labels_path]
    # --quiet prints the step's log line before the checkpoint fails; the error is the last.
    line = _late_error(_run(*args, "--out", out, *TRAIN_FAST))
    assert "last.pt: could not be written" in line
    _no_output(tmp_path, out / "checkpoints" / "last.pt")


def test_full_disk_while_writing_json_and_reports(
    tmp_path, check_cli_error, em_pair, model, monkeypatch
):
    real_write_text = Path.write_text

    def half_then_full(self, text, *a, **kw):
        real_write_text(self, text[: len(text) // 2], *a, **kw)
        _enospc()

    monkeypatch.setattr(Path, "write_text", half_then_full)
    jpath = tmp_path / "m.json"
    vol, lab = em_pair.volume_path, em_pair.labels_path
    check_cli_error(_run("evaluate", vol, "--labels", lab, "--json", jpath), jpath)
    out = tmp_path / "cmp"
    line = _late_error(_run("compare", model, "--volume", vol, "--labels", lab, "--out", out))
    assert str(out) in line and "could not be written" in line and "disk full" in line
    _no_output(tmp_path, jpath, out / "report.md", out / "report.html", out / "report.json")


# -- untrusted files: checkpoints --------------------------------------------------------------


class _Payload:
    """Pickles to a call that would leave a marker file: proof that code ran on loading."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _evil_checkpoints(d: Path, payload: dict) -> list[Path]:
    marker = d / "PWNED"
    zipped = d / "evil.pt"
    torch.save({"format": "cellp2p-checkpoint", "x": _Payload(marker)}, zipped)
    inside = d / "inside.pt"  # a valid checkpoint whose record hides the payload
    torch.save({**payload, "format": "cellp2p-checkpoint", "record": _Payload(marker)}, inside)
    plain = d / "plain.pt"  # a bare pickle (not torch's zip format)
    import pickle

    plain.write_bytes(pickle.dumps({"format": "cellp2p-checkpoint", "x": _Payload(marker)}))
    return [zipped, inside, plain]


def test_pickle_payloads_are_refused_before_anything_runs(
    tmp_path, check_cli_error, em_pair, payload
):
    marker = tmp_path / "PWNED"
    vol, lab = em_pair.volume_path, em_pair.labels_path
    for evil in _evil_checkpoints(tmp_path, payload):
        line = check_cli_error(_run("predict", vol, "-m", evil, "-o", tmp_path / "p.tif"), evil)
        assert "refused" in line or "not a checkpoint" in line
        args = ["compare", evil, "--volume", vol, "--labels", lab, "--out", tmp_path / "c"]
        check_cli_error(_run(*args), evil)
        run = tmp_path / f"run-{evil.stem}"
        (run / "checkpoints").mkdir(parents=True)
        (run / "checkpoints" / "last.pt").write_bytes(evil.read_bytes())
        check_cli_error(_run("train", "--out", run, "--resume", "--quiet"), "last.pt")
        with pytest.raises(CellP2PError, match=r"refused|not a checkpoint"):
            load_checkpoint(evil)
    assert not marker.exists(), "the payload ran"
    line = check_cli_error(_run("predict", vol, "-m", tmp_path / "evil.pt", "-o", "p.tif"))
    assert "refused to load" in line and "posix.system" in line
    _no_output(tmp_path, tmp_path / "p.tif", tmp_path / "c" / "report.md")


def _config(**kw):
    return lambda p: p["models"]["unet"]["config"].update(kw)


DAMAGED_CHECKPOINTS = {
    "huge-base": _config(base=10**9),
    "huge-depth": _config(depth=100_000),
    "huge-n-convs": _config(n_convs=100_000),
    "bad-config-type": _config(depth="deep"),
    "unknown-config-key": _config(wings=2),
    "weights-not-tensors": lambda p: p["models"]["unet"].update(state={"w": [1, 2]}),
    "entry-not-a-dict": lambda p: p["models"].update(unet=[1, 2, 3]),
    "wrong-network-kind": lambda p: p["models"]["unet"].update(kind="discriminator"),
    "models-not-a-dict": lambda p: p.update(models="unet"),
    "mode-not-a-string": lambda p: p.update(mode=["unet"]),
    "flat-normalisation": lambda p: p["normalization"]["input"].update(vmin=3.0, vmax=3.0),
    "nan-normalisation": lambda p: p["normalization"]["input"].update(vmax=float("nan")),
    "normalisation-dtype": lambda p: p["normalization"]["input"].update(dtype="complex64"),
    "normalisation-extra-key": lambda p: p["normalization"]["input"].update(gain=2),
    "normalisation-not-a-dict": lambda p: p["normalization"].update(input=[0, 255]),
    "classes-not-ints": lambda p: p["data"].update(classes=["a", "b"]),
    "unknown-target-kind": lambda p: p["data"].update(target_kind="poetry"),
    "record-not-a-dict": lambda p: p.update(record=[1, 2]),
    "version-from-the-future": lambda p: p.update(version=99),
    "version-not-an-int": lambda p: p.update(version="1"),
}


@pytest.mark.parametrize("change", DAMAGED_CHECKPOINTS.values(), ids=DAMAGED_CHECKPOINTS.keys())
def test_damaged_or_hostile_checkpoint_contents(
    tmp_path, check_cli_error, em_pair, payload, change
):
    path = tmp_path / "bad.pt"
    change(payload)
    extra = {k: payload.pop(k) for k in ("version",) if k in payload}
    torch.save({"format": "cellp2p-checkpoint", "version": 1, **payload, **extra}, path)
    t0 = time.monotonic()
    out = tmp_path / "p.tif"
    check_cli_error(_run("predict", em_pair.volume_path, "-m", path, "-o", out), path)
    assert time.monotonic() - t0 < 10  # refused from the record, not after building it
    _no_output(tmp_path, out)


def test_corrupted_checkpoint_bytes_are_one_line(tmp_path, check_cli_error, em_pair, model):
    raw = bytearray(model.read_bytes())
    rng = np.random.default_rng(1)
    out = tmp_path / "p.tif"
    for i in range(12):
        b = bytearray(raw)
        for pos in rng.integers(0, len(b), size=int(rng.integers(1, 30))):
            b[pos] = int(rng.integers(0, 256))
        path = tmp_path / f"flip{i}.pt"
        path.write_bytes(bytes(b))
        res = _run("predict", em_pair.volume_path, "-m", path, "-o", out, "--quiet")
        if res.exit_code == 0:  # a flip in padding or a weight: still a valid checkpoint
            out.unlink()
            continue
        check_cli_error(res, path)
    _no_output(tmp_path, out)


# -- untrusted files: manifests and configs ----------------------------------------------------


def _isbi_manifest() -> dict:
    return json.loads((REPO / "data_manifests" / "isbi2012.json").read_text())


MANIFEST_ATTACKS = {
    "traversal": lambda m: m["files"][0].update(name="../../etc/passwd"),
    "absolute": lambda m: m["files"][0].update(name="/etc/passwd"),
    "dot-dot-name": lambda m: m.update(name=".."),
    "name-with-slash": lambda m: m.update(name="a/../../b"),
    "unknown-key": lambda m: m.update(exec="rm -rf /"),
    "unknown-file-key": lambda m: m["files"][0].update(path="/etc"),
    "shape-type": lambda m: m["files"][0].update(shape="30x512x512"),
    "url-scheme": lambda m: m["files"][0].update(url="file:///etc/passwd"),
    "huge-split": lambda m: m["split"].update(train="0-99999999999"),
}


@pytest.mark.parametrize("attack", MANIFEST_ATTACKS.values(), ids=MANIFEST_ATTACKS.keys())
def test_hostile_manifests_are_refused_by_every_command(tmp_path, check_cli_error, attack):
    manifest = _isbi_manifest()
    attack(manifest)
    path = tmp_path / "evil.json"
    path.write_text(json.dumps(manifest))
    dest = tmp_path / "dest"
    t0 = time.monotonic()
    check_cli_error(_run("info", path), path)
    check_cli_error(_run("fetch", path, "--dest", dest), path)
    check_cli_error(_run("train", "--manifest", path, "--out", tmp_path / "run"), path)
    assert time.monotonic() - t0 < 20
    assert not dest.exists() and not (tmp_path / "run" / "checkpoints").exists()


@pytest.mark.parametrize(
    ("config", "needle"),
    [
        ({"crpo": 32}, "crpo"),
        ({"crop": "big"}, "crop"),
        ({"quiet": "yes"}, "quiet"),
        ({"batch_size": 1.5}, "batch_size"),
        ({"model_overrides": {"wings": 2}}, "wings"),
        ({"model_overrides": {"depth": "deep"}}, "depth"),
        ({"volume": "../../etc/passwd"}, "passwd"),
    ],
)
def test_config_files_are_validated_before_use(tmp_path, check_cli_error, em_pair, config, needle):
    path = tmp_path / "c.json"
    data = {"volume": str(em_pair.volume_path), "labels": str(em_pair.labels_path)}
    path.write_text(json.dumps({**data, "crop": 32, "max_steps": 1, **config}))
    out = tmp_path / "run"
    assert needle in check_cli_error(_run("train", "--config", path, "--out", out))
    assert not (out / "checkpoints").exists()


@pytest.mark.parametrize("config", [{"max_steps": "many"}, {"lr": "fast"}, {"epochs": [1]}])
def test_config_optional_values_are_typed(tmp_path, check_cli_error, em_pair, config):
    path = tmp_path / "c.json"
    data = {"volume": str(em_pair.volume_path), "labels": str(em_pair.labels_path)}
    path.write_text(json.dumps({**data, "crop": 32, "eval_every": 1, **config}))
    out = tmp_path / "run"
    assert next(iter(config)) in check_cli_error(_run("train", "--config", path, "--out", out))


def test_config_that_is_a_folder_or_binary(tmp_path, check_cli_error):
    binary = tmp_path / "c.json"
    binary.write_bytes(b"\xff\xfe\x00\x01")
    check_cli_error(_run("train", "--config", binary, "--out", tmp_path / "r"), binary)
    check_cli_error(_run("train", "--config", tmp_path, "--out", tmp_path / "r"), tmp_path)


@pytest.mark.parametrize("text", ["[1, 2]", '"crop"', "3"])
def test_config_that_is_not_an_object(tmp_path, check_cli_error, text):
    path = tmp_path / "c.json"
    path.write_text(text)
    check_cli_error(_run("train", "--config", path, "--out", tmp_path / "r"), path)


# -- faults: kills mid-write and two runs on one folder ---------------------------------------


# One intra-op thread per child: on a loaded machine OpenMP's spinning threads can slow a
# child tenfold, and these tests measure behaviour, not speed.
CHILD_ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def _python(code: str, *args: object) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(code), *map(str, args)],
        cwd=REPO,
        env=CHILD_ENV,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _wait_for(path: Path, proc: subprocess.Popen, timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if proc.poll() is not None:
            raise AssertionError(f"exited early: {proc.communicate()}")
        assert time.monotonic() < deadline, f"{path} did not appear"
        time.sleep(0.02)


def _kill(proc: subprocess.Popen) -> None:
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL


# The child writes a few pages, says so through a marker file, then stalls like a slow disk;
# the test kills it there.
_STALL_AFTER_PAGES = """
    import sys, time
    from pathlib import Path
    import tifffile
    real, marker, state = tifffile.TiffWriter.write, Path(sys.argv[1]), {"n": 0}
    def write(self, *a, **kw):
        state["n"] += 1
        if state["n"] == 3:
            marker.touch()
            time.sleep(600)
        return real(self, *a, **kw)
    tifffile.TiffWriter.write = write
"""


def test_sigkill_while_writing_a_stack_keeps_the_old_file(tmp_path):
    final = write_stack(tmp_path / "s.tif", np.full((4, 16, 16), 7, np.uint8))
    before = final.read_bytes()
    code = (
        _STALL_AFTER_PAGES
        + """
    import numpy as np
    from cellp2p.io import write_stack
    write_stack(sys.argv[2], np.zeros((10, 16, 16), np.uint8), force=True)
    """
    )
    proc = _python(code, tmp_path / "marker", final)
    _wait_for(tmp_path / "marker", proc)
    assert list(tmp_path.glob(".s.tif.*.part"))  # killed mid-write, not before or after
    _kill(proc)
    assert final.read_bytes() == before


def test_sigkill_during_synth_leaves_no_stack(tmp_path):
    out = tmp_path / "syn"
    code = (
        _STALL_AFTER_PAGES
        + """
    from cellp2p.cli import main
    main(["synth", "--out", sys.argv[2], "--slices", "6", "--size", "32"])
    """
    )
    proc = _python(code, tmp_path / "marker", out)
    _wait_for(tmp_path / "marker", proc)
    _kill(proc)
    assert not (out / "volume.tif").exists() and not (out / "labels.tif").exists()


def test_sigkill_while_saving_a_checkpoint_keeps_the_previous_one(tmp_path, payload):
    path = save_checkpoint(tmp_path / "last.pt", {**payload, "step": 5})
    code = """
    import sys, time
    from pathlib import Path
    import torch
    from cellp2p.checkpoint import save_checkpoint
    marker = Path(sys.argv[1])
    real = torch.save
    def slow_save(obj, f, *a, **kw):  # half the bytes reach the disk, then the kill comes
        real(obj, f, *a, **kw)
        raw = Path(f).read_bytes()
        Path(f).write_bytes(raw[: len(raw) // 2])
        marker.touch()
        time.sleep(600)
    torch.save = slow_save
    save_checkpoint(sys.argv[2], {"step": 6, "weights": torch.zeros(1000)})
    """
    proc = _python(code, tmp_path / "marker", path)
    _wait_for(tmp_path / "marker", proc)
    _kill(proc)
    assert load_checkpoint(path)["step"] == 5


def test_best_checkpoint_is_an_independent_file(tmp_path, monkeypatch, payload):
    # write_checkpoints as train calls it, on the payload of a real run (seg_run's last.pt).
    monkeypatch.setattr(
        "cellp2p.checkpoint.build_payload", lambda state, record: {**payload, **record}
    )
    state = SimpleNamespace(out=tmp_path)
    last = write_checkpoints(state, {"step": 5}, improved=True)
    best = tmp_path / "checkpoints" / "best.pt"
    last.write_bytes(b"damaged in place")  # an in-place edit of last.pt leaves best.pt alone
    assert load_checkpoint(best)["step"] == 5
    write_checkpoints(state, {"step": 6}, improved=False)  # not better: best.pt stays step 5
    assert load_checkpoint(last)["step"] == 6 and load_checkpoint(best)["step"] == 5
    assert sorted(p.name for p in best.parent.iterdir()) == ["best.pt", "last.pt"]


def test_second_run_on_the_same_out_fails_while_the_first_completes(tmp_path, em_pair):
    out, gate = tmp_path / "run", tmp_path / "gate"
    # The first run holds its lock at step 2 until the second one has been refused.
    code = """
    import sys, time
    from pathlib import Path
    from cellp2p.config import TrainConfig
    from cellp2p.train import train
    vol, lab, out, gate = sys.argv[1:5]
    def hold(record):
        if record["step"] == 2:
            Path(gate + ".held").touch()
            t0 = time.time()
            while not Path(gate).exists() and time.time() - t0 < 120:
                time.sleep(0.05)
    cfg = TrainConfig(volume=vol, labels=lab, crop=32, batch_size=2, max_steps=4,
                      eval_every=2, quiet=True)
    print(train(cfg, out, progress=hold)["step"])
    """
    first = _python(code, em_pair.volume_path, em_pair.labels_path, out, gate)
    try:
        _wait_for(Path(f"{gate}.held"), first)
        second = subprocess.run(
            [sys.executable, "-m", "cellp2p", "train", "--out", str(out), "--resume", "--quiet"],
            cwd=REPO,
            env=CHILD_ENV,
            capture_output=True,
            text=True,
            timeout=120,
        )
        gate.touch()
        stdout, stderr = first.communicate(timeout=120)
    finally:
        if first.poll() is None:
            first.kill()
    assert second.returncode == 1, second.stderr
    lines = second.stderr.strip().splitlines()
    assert len(lines) == 1 and "another training run is using this folder" in lines[0]
    assert first.returncode == 0, stderr
    assert stdout.strip() == "4"
    assert load_checkpoint(out / "checkpoints" / "last.pt")["step"] == 4
    steps = [json.loads(x)["step"] for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == [2, 4]


# -- load: memory stays flat over many steps and slices ---------------------------------------


def test_memory_is_flat_over_training_steps_and_predicted_slices(tmp_path):
    """A quick version of benchmarks/bench_soak.py (which runs 3000 steps and slices)."""
    proc = subprocess.run(
        [
            sys.executable,
            str(REPO / "benchmarks" / "bench_soak.py"),
            "--steps",
            "100",
            "--eval-every",
            "50",
            "--slices",
            "300",
            "--tiny",
            "--work",
            str(tmp_path),
            "--json",
            str(tmp_path / "soak.json"),
        ],
        cwd=REPO,
        env=CHILD_ENV,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((tmp_path / "soak.json").read_text())
    # After warm-up (the first evaluation, the first slices), growth would be a leak; the
    # bounds are generous against allocator noise on a loaded machine.
    assert result["train"]["growth_after_warmup_mib"] < 40, result["train"]
    assert result["predict"]["growth_after_warmup_mib"] < 20, result["predict"]


# -- property test: random malformed inputs and option values ---------------------------------

DTYPES = [
    np.uint8,
    np.int8,
    np.uint16,
    np.int16,
    np.uint32,
    np.int32,
    np.int64,
    np.float16,
    np.float32,
    np.float64,
    np.bool_,
    np.complex64,
]
SUFFIXES = [".tif", ".tiff", ".png", ".jpg"]


def _tiff_bytes(shape: tuple[int, ...], dtype, seed: int, special: bool, **kw) -> bytes | None:
    rng = np.random.default_rng(seed)
    data = (rng.random(shape) * 300 - 20).astype(dtype)
    if special and np.issubdtype(data.dtype, np.floating) and data.size:
        data.flat[rng.integers(0, data.size)] = rng.choice([np.nan, np.inf, -np.inf])
    buf = _io.BytesIO()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            tifffile.imwrite(buf, data, **kw)
    except Exception:  # tifffile cannot write every shape/dtype: such a file cannot exist
        return None
    return buf.getvalue()


_SMALL_VALID = _tiff_bytes((4, 16, 16), np.uint8, 0, False)


@st.composite
def malformed_files(draw) -> tuple[str, bytes]:
    """(suffix, bytes) of a file an image reader must refuse or read correctly."""
    kind = draw(st.sampled_from(["random", "truncated", "header", "array", "array"]))
    suffix = draw(st.sampled_from(SUFFIXES if kind == "random" else [".tif", ".tiff", ".png"]))
    if kind == "random":
        magic = draw(st.sampled_from([b"", b"II*\x00", b"MM\x00*", b"\x89PNG\r\n\x1a\n"]))
        return suffix, magic + draw(st.binary(max_size=600))
    if kind in ("truncated", "header"):
        shape = draw(st.sampled_from([(3, 16, 16), (2, 2, 8, 8), (2, 8, 8, 3), (1, 8, 8)]))
        raw = _tiff_bytes(shape, draw(st.sampled_from(DTYPES[:10])), 1, False)
        if raw is None:
            raw = _SMALL_VALID
        if kind == "truncated":
            return suffix, raw[: draw(st.integers(0, len(raw) - 1))]
        b = bytearray(raw)
        edits = draw(st.lists(st.tuples(st.integers(0, 200), st.integers(0, 255)), max_size=8))
        for pos, value in edits:
            b[min(pos, len(b) - 1)] = value
        return suffix, bytes(b)
    ndim = draw(st.integers(1, 7))
    shape = tuple(draw(st.lists(st.integers(0, 9), min_size=ndim, max_size=ndim)))
    if np.prod(shape) > 6000:
        shape = tuple(min(n, 3) for n in shape)
    raw = _tiff_bytes(
        shape,
        draw(st.sampled_from(DTYPES)),
        draw(st.integers(0, 2**16)),
        draw(st.booleans()),
        **draw(st.sampled_from([{}, {"imagej": True}, {"photometric": "rgb"}])),
    )
    return ".tif", raw if raw is not None else b"II*\x00" + bytes(8)


NUMBERS = st.one_of(
    st.integers(-3, 70).map(str),
    st.sampled_from(["nan", "inf", "-inf", "", "abc", "0.5", "1e3", "-0.0"]),
)
# Short slice texts: transforms.parse_slices expands a range before checking it (see report).
SLICES = st.text(alphabet="0123-,x ", max_size=4)


def _options(draw, choices: dict) -> list[str]:
    if not choices:
        return []
    names = draw(st.lists(st.sampled_from(sorted(choices)), max_size=3, unique=True))
    return [x for name in names for x in (name, draw(choices[name]))]


PREDICT_OPTIONS = {
    "--tile": NUMBERS,
    "--overlap": NUMBERS,
    "--threshold": NUMBERS,
    "--batch-size": NUMBERS,
    "--slices": SLICES,
    "--output": st.sampled_from(["auto", "prob", "mask", "labels", "image", "bogus"]),
}
EVALUATE_OPTIONS = {
    "--task": st.sampled_from(["segment", "translate", "bogus"]),
    "--kind": st.sampled_from(["auto", "prob", "mask", "labels"]),
    "--data-range": NUMBERS,
    "--slices": SLICES,
}
TRAIN_OPTIONS = {
    "--crop": NUMBERS,
    "--batch-size": NUMBERS,
    "--max-steps": st.sampled_from(["1", "0", "-1", "x"]),
    "--eval-every": NUMBERS,
    "--lr": NUMBERS,
    "--lr-decay-start": NUMBERS,
    "--mode": st.sampled_from(["unet", "pix2pix", "bogus"]),
    "--task": st.sampled_from(["segment", "translate"]),
    "--labels-mode": st.sampled_from(["auto", "binary", "nonzero", "multiclass"]),
    "--train-slices": SLICES,
}


@st.composite
def invocations(draw) -> tuple[str, tuple[str, bytes], list[str]]:
    command = draw(st.sampled_from(["info", "predict", "evaluate", "evaluate-self", "train"]))
    options = {
        "predict": PREDICT_OPTIONS,
        "evaluate": EVALUATE_OPTIONS,
        "evaluate-self": EVALUATE_OPTIONS,
        "train": TRAIN_OPTIONS,
    }.get(command, {})
    return command, draw(malformed_files()), _options(draw, options)


@settings(
    max_examples=int(os.environ.get("CELLP2P_PROPERTY_EXAMPLES", "250")),
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(case=invocations())
def test_no_traceback_escapes_on_malformed_input(case, property_stats, model, em_arrays):
    command, (suffix, raw), options = case
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        bad = d / f"input{suffix}"
        bad.write_bytes(raw)
        labels = write_stack(d / "labels.tif", em_arrays[1])
        out = d / "out"
        args: list[object] = {
            "info": ["info", bad],
            "predict": ["predict", bad, "-m", model, "-o", out / "p.tif", "--quiet"],
            "evaluate": ["evaluate", bad, "--labels", labels, "--json", out / "m.json"],
            "evaluate-self": ["evaluate", bad, "--labels", bad],
            "train": ["train", "--volume", bad, "--labels", labels, "--out", out / "run"],
        }[command]
        if command == "train":
            args += ["--quiet", "--max-steps", "1"]
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            res = CliRunner().invoke(main, [*map(str, args), *options])
        property_stats["tried"] += 1
        clean = res.exception is None or isinstance(res.exception, SystemExit)
        if not clean or "Traceback" in res.output:
            property_stats["tracebacks"] += 1
        if res.exit_code in (0, 1, 2):
            property_stats[f"exit_{res.exit_code}"] += 1
        context = f"{command} {options} on {suffix} {raw[:24]!r}:\n{res.output}"
        assert clean, f"{res.exception!r} escaped from {context}"
        assert "Traceback" not in res.output, context
        assert res.exit_code in (0, 1, 2), context
        # A warning would print to stderr beside the one error line (or the result).
        shown = [f"{w.category.__name__}: {w.message}" for w in caught]
        assert not shown, f"{shown} from {context}"
        if res.exit_code == 1:
            lines = res.output.strip().splitlines()
            assert len(lines) == 1 and lines[0].startswith("Error: "), context
            if command != "evaluate-self":
                assert not out.exists() or not [p for p in out.rglob("*") if p.is_file()], context
