"""Training: both modes through the CLI, run records, exact resume, kills and bad options."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from cellp2p.checkpoint import load_checkpoint
from cellp2p.cli import main
from cellp2p.config import TrainConfig
from cellp2p.io import write_stack
from cellp2p.synth import make_em
from cellp2p.train import lr_factor, train


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    d = tmp_path_factory.mktemp("pair")
    vol, lab = make_em(5, (48, 56), seed=1)
    return write_stack(d / "volume.tif", vol), write_stack(d / "labels.tif", lab)


def _args(pair: tuple[Path, Path], out: Path, *extra: str) -> list[str]:
    vol, lab = pair
    return [
        "train",
        "--volume",
        str(vol),
        "--labels",
        str(lab),
        "--out",
        str(out),
        "--crop",
        "32",
        "--batch-size",
        "2",
        "--quiet",
        *extra,
    ]


def _run(args: list[str]):
    return CliRunner().invoke(main, args, catch_exceptions=False)


@pytest.mark.parametrize(
    "extra",
    [
        ["--mode", "unet"],
        ["--mode", "pix2pix"],
        ["--mode", "unet", "--task", "translate", "--direction", "BtoA", "--loss", "l2"],
        ["--mode", "pix2pix", "--task", "translate", "--gan-mode", "lsgan", "--unconditional"],
    ],
    ids=["unet-seg", "pix2pix-seg", "unet-BtoA", "pix2pix-translate-lsgan"],
)
def test_cli_trains_and_writes_every_artefact(pair, tmp_path, extra):
    out = tmp_path / "run"
    res = _run(_args(pair, out, "--max-steps", "4", "--eval-every", "2", *extra))
    assert res.exit_code == 0, res.output
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["versions"]["torch"] == torch.__version__ and "monai" in cfg["versions"]
    assert cfg["mode"] == extra[1] and cfg["total_steps"] == 4
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [2, 4]  # exactly one record per evaluation
    for r in records:
        assert {"step", "epoch", "images_per_s", "lr"} <= set(r)
        assert any(k.startswith("loss") for k in r) and any(k.startswith("val_") for k in r)
    assert (out / "checkpoints" / "last.pt").is_file() and (
        out / "checkpoints" / "best.pt"
    ).is_file()
    assert sorted(p.name for p in (out / "samples").iterdir()) == [
        "step_0000002.png",
        "step_0000004.png",
    ]
    assert (out / "loss_curve.png").stat().st_size > 1000
    assert load_checkpoint(out)["train_config"]["mode"] == extra[1]  # best.pt
    assert set(load_checkpoint(out / "checkpoints" / "last.pt")["rng"]) == {
        "python",
        "numpy",
        "torch",
    }


def _weights(run: Path) -> dict[str, torch.Tensor]:
    ckpt = load_checkpoint(run / "checkpoints" / "last.pt")
    return {f"{n}.{k}": v for n, e in ckpt["models"].items() for k, v in e["state"].items()}


@pytest.mark.parametrize("mode", ["unet", "pix2pix"])
def test_resume_equals_uninterrupted(pair, tmp_path, mode):
    vol, lab = pair
    base = dict(
        mode=mode,
        volume=str(vol),
        labels=str(lab),
        crop=32,
        batch_size=2,
        max_steps=12,
        eval_every=3,
        quiet=True,
        seed=3,
    )
    train(TrainConfig(**base), tmp_path / "full")
    train(TrainConfig(**base), tmp_path / "split", stop_after=6)
    assert load_checkpoint(tmp_path / "split" / "checkpoints" / "last.pt")["step"] == 6
    train(TrainConfig(**base), tmp_path / "split", resume=True)
    a, b = _weights(tmp_path / "full"), _weights(tmp_path / "split")
    assert a.keys() == b.keys()
    diff = max(float((a[k].double() - b[k].double()).abs().max()) for k in a)
    assert diff <= 1e-6
    steps = [
        json.loads(x)["step"] for x in (tmp_path / "split/metrics.jsonl").read_text().splitlines()
    ]
    assert steps == [3, 6, 9, 12]


def test_resume_can_extend_a_finished_run(pair, tmp_path):
    out = tmp_path / "run"
    assert _run(_args(pair, out, "--max-steps", "2", "--eval-every", "2")).exit_code == 0
    res = _run(["train", "--out", str(out), "--resume", "--max-steps", "4", "--quiet"])
    assert res.exit_code == 0, res.output
    assert load_checkpoint(out / "checkpoints" / "last.pt")["step"] == 4
    assert json.loads((out / "config.json").read_text())["max_steps"] == 4


def test_config_file_and_flags(pair, tmp_path):
    vol, lab = pair
    conf = tmp_path / "c.json"
    conf.write_text(
        json.dumps(
            {
                "volume": str(vol),
                "labels": str(lab),
                "crop": 32,
                "batch_size": 1,
                "max_steps": 3,
                "eval_every": 3,
                "seed": 9,
            }
        )
    )
    out = tmp_path / "run"
    res = _run(
        [
            "train",
            "--config",
            str(conf),
            "--out",
            str(out),
            "--max-steps",
            "2",
            "--eval-every",
            "2",
            "--quiet",
        ]
    )
    assert res.exit_code == 0, res.output
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["seed"] == 9 and cfg["max_steps"] == 2  # file < flags
    conf.write_text(json.dumps({"crop": "big"}))
    res = _run(["train", "--config", str(conf), "--out", str(tmp_path / "x")])
    assert res.exit_code != 0 and "crop" in res.output


def test_lr_schedule_constant_then_linear():
    assert lr_factor(0, 100, 0.5) == 1.0 and lr_factor(49, 100, 0.5) == 1.0
    assert lr_factor(75, 100, 0.5) == pytest.approx(0.5) and lr_factor(100, 100, 0.5) == 0.0


def _one_error_line(output: str) -> str:
    lines = [line for line in output.splitlines() if line.strip()]
    assert "Traceback" not in output
    errors = [line for line in lines if line.startswith("Error:")]
    assert len(errors) == 1, output
    return errors[0]


def test_bad_inputs_are_one_line_errors_and_write_no_checkpoint(pair, tmp_path):
    vol, lab = pair
    short = write_stack(tmp_path / "short.tif", np.zeros((3, 48, 56), np.uint8))
    wide = write_stack(tmp_path / "wide.tif", np.zeros((5, 48, 60), np.uint8))
    cases = {
        "no data": ["train", "--out", "{out}", "--quiet"],
        "missing": _args((tmp_path / "nope.tif", lab), Path("{out}")),
        "slices": _args((vol, short), Path("{out}")),
        "size": _args((vol, wide), Path("{out}")),
        "crop": [*_args(pair, Path("{out}")), "--crop", "64"],
        "zero batch": [*_args(pair, Path("{out}")), "--batch-size", "0"],
        "neg steps": [*_args(pair, Path("{out}")), "--max-steps", "-3"],
        "no ckpt": ["train", "--out", "{out}", "--resume"],
        "slices range": [*_args(pair, Path("{out}")), "--train-slices", "0-40"],
        "BtoA seg": [*_args(pair, Path("{out}")), "--direction", "BtoA"],
    }
    needles = {  # what each message must name (every case has one: none can pass vacuously)
        "no data": "--volume",
        "missing": "nope.tif",
        "slices": "short.tif",
        "size": "wide.tif",
        "crop": "--crop",
        "zero batch": "--batch-size",
        "neg steps": "--max-steps",
        "no ckpt": "--resume",
        "slices range": "0-40",
        "BtoA seg": "--direction BtoA",
    }
    assert needles.keys() == cases.keys()
    for name, args in cases.items():
        out = tmp_path / name.replace(" ", "_")
        res = CliRunner().invoke(main, [a.replace("{out}", str(out)) for a in args])
        assert res.exit_code != 0, name
        line = _one_error_line(res.output)
        assert needles[name] in line, (name, line)
        assert not (out / "checkpoints").exists(), name


def test_existing_run_is_not_overwritten(pair, tmp_path):
    out = tmp_path / "run"
    assert _run(_args(pair, out, "--max-steps", "2", "--eval-every", "2")).exit_code == 0
    before = (out / "checkpoints" / "last.pt").read_bytes()
    res = CliRunner().invoke(main, _args(pair, out, "--max-steps", "2"))
    assert res.exit_code != 0 and "--resume" in _one_error_line(res.output)
    assert (out / "checkpoints" / "last.pt").read_bytes() == before


def _spawn(pair: tuple[Path, Path], out: Path, *extra: str) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "cellp2p", *_args(pair, out, *extra)]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_for_step(out: Path, step: int, proc: subprocess.Popen, timeout: float = 120) -> None:
    t0 = time.time()
    while time.time() - t0 < timeout:
        f = out / "metrics.jsonl"
        if f.exists() and any(json.loads(x)["step"] >= step for x in f.read_text().splitlines()):
            return
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.1)
    raise AssertionError("training did not reach the step in time")


def test_sigkill_then_resume_loses_only_the_steps_since_the_checkpoint(pair, tmp_path):
    out = tmp_path / "run"
    proc = _spawn(pair, out, "--max-steps", "400", "--eval-every", "2")
    _wait_for_step(out, 4, proc)
    proc.kill()
    proc.wait()
    step = load_checkpoint(out / "checkpoints" / "last.pt")["step"]
    assert step >= 4 and step % 2 == 0
    res = _run(["train", "--out", str(out), "--resume", "--max-steps", str(step + 2), "--quiet"])
    assert res.exit_code == 0, res.output
    steps = [json.loads(x)["step"] for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == sorted(set(steps)) and steps[-1] == step + 2


def test_sigint_writes_a_final_checkpoint(pair, tmp_path):
    out = tmp_path / "run"
    proc = _spawn(pair, out, "--max-steps", "400", "--eval-every", "100")
    t0 = time.time()
    while not (out / "config.json").exists() and time.time() - t0 < 120:
        time.sleep(0.1)
    time.sleep(1.5)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "Traceback" not in err
    ckpt = load_checkpoint(out / "checkpoints" / "last.pt")
    assert 0 < ckpt["step"] < 400


def test_two_runs_on_one_folder_are_refused(pair, tmp_path):
    import fcntl

    out = tmp_path / "run"
    out.mkdir()
    with open(out / ".lock", "a+") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        res = CliRunner().invoke(main, _args(pair, out, "--max-steps", "1"))
    assert res.exit_code != 0 and "another training run" in _one_error_line(res.output)
    assert os.listdir(out) == [".lock"]


@pytest.mark.parametrize("mode,net", [("unet", "unet"), ("pix2pix", "generator")])
def test_upsample_resize_is_recorded_and_predicts(pair, tmp_path, mode, net):
    """--upsample resize swaps the decoder's transposed convs (checkerboard) for resize + conv,
    and the checkpoint alone rebuilds that network for prediction."""
    from cellp2p.checkpoint import build_from_entry
    from cellp2p.predict import predict_stack

    out = tmp_path / "run"
    args = ["--max-steps", "2", "--eval-every", "2", "--mode", mode, "--upsample", "resize"]
    res = _run(_args(pair, out, *args))
    assert res.exit_code == 0, res.output
    ckpt = load_checkpoint(out / "checkpoints" / "last.pt")
    assert ckpt["train_config"]["upsample"] == "resize"
    assert ckpt["models"][net]["config"]["up"] == "resize"
    rebuilt = build_from_entry(ckpt["models"][net])
    assert not any(isinstance(m, torch.nn.ConvTranspose2d) for m in rebuilt.modules())
    # Each resize is followed by an odd, symmetrically padded conv (an even one shifts by 0.5 px).
    ups = [m for m in rebuilt.modules() if isinstance(m, torch.nn.Sequential) and m]
    ups = [m for m in ups if isinstance(m[0], torch.nn.Upsample)]
    assert ups and all(
        isinstance(m[1], torch.nn.Conv2d) and m[1].kernel_size[0] % 2 == 1 for m in ups
    )
    pred = predict_stack([pair[0]], out, out=tmp_path / "pred.tif", quiet=True, device="cpu")
    assert (tmp_path / "pred.tif").is_file(), pred
    res = CliRunner().invoke(main, _args(pair, tmp_path / "bad", "--upsample", "bilinear"))
    assert res.exit_code == 2 and "bilinear" in res.output


def _records(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize(
    "damage",
    [
        pytest.param(lambda last: last[: len(last) // 2], id="cut-last-line"),
        pytest.param(lambda last: f'{last}\n[1, 2]\n"text"\n{{"no": "step"}}', id="not-objects"),
    ],
)
def test_resume_after_a_damaged_metrics_log_continues_cleanly(pair, tmp_path, damage):
    """A kill during the append leaves a cut last line; a resume must not stop on it."""
    out = tmp_path / "run"
    assert _run(_args(pair, out, "--max-steps", "2", "--eval-every", "2")).exit_code == 0
    log = out / "metrics.jsonl"
    first = log.read_text().splitlines()[0]
    later = json.dumps({**json.loads(first), "step": 4})  # a record of a step being redone
    log.write_text(f"{first}\n" + damage(later))  # no newline at the end
    res = _run(["train", "--out", str(out), "--resume", "--max-steps", "4", "--quiet"])
    assert res.exit_code == 0, res.output
    assert "Traceback" not in res.output
    records = _records(out)  # every line a whole record again
    assert [r["step"] for r in records] == [2, 4]
    assert records[0] == json.loads(first)
    assert load_checkpoint(out / "checkpoints" / "last.pt")["step"] == 4


def test_resume_restores_the_python_numpy_and_torch_generators(pair, tmp_path, monkeypatch):
    """Right after a resume the global generators are where the uninterrupted run had them.

    Every batch fetch draws ``np.random.rand()``, ``random.random()`` and ``torch.rand(1)``
    (before the step seeds torch for its dropout masks): the resumed run must draw, step for
    step, the numbers the uninterrupted run drew.
    """
    import random

    from cellp2p.dataset import StepBatches

    draws: dict[str, dict[int, tuple[float, float, float]]] = {}
    fetch = StepBatches.__getitem__

    def drawing(self: StepBatches, step: int):
        draws[current][step] = (np.random.rand(), random.random(), float(torch.rand(1)))
        return fetch(self, step)

    monkeypatch.setattr(StepBatches, "__getitem__", drawing)
    vol, lab = pair
    base = dict(volume=str(vol), labels=str(lab), crop=32, batch_size=1, max_steps=6)
    cfg = TrainConfig(**base, eval_every=3, quiet=True, seed=5, model_overrides={"depth": 2})
    for current, kwargs in (("full", {}), ("first", {"stop_after": 3}), ("resumed", {})):
        draws[current] = {}
        run = tmp_path / ("full" if current == "full" else "split")
        train(cfg, run, resume=current == "resumed", **kwargs)
    assert sorted(draws["first"]) == [1, 2, 3] and sorted(draws["resumed"]) == [4, 5, 6]
    assert draws["first"] == {s: draws["full"][s] for s in (1, 2, 3)}
    for step in (4, 5, 6):
        numpy_, python_, torch_ = zip(draws["resumed"][step], draws["full"][step], strict=True)
        assert numpy_[0] == numpy_[1], f"numpy differs at step {step}"
        assert python_[0] == python_[1], f"python random differs at step {step}"
        assert torch_[0] == torch_[1], f"torch differs at step {step}"


def test_object_scores_only_where_they_are_used(pair, tmp_path):
    """The ISBI sweep and the watersheds run at improving and final evaluations (best.pt and
    the last record carry them); other evaluations log the cheap scores only."""
    from cellp2p.scoring import is_improvement

    cfg = TrainConfig(volume=str(pair[0]), labels=str(pair[1]), max_steps=8, eval_every=1)
    cfg.crop, cfg.batch_size, cfg.device, cfg.quiet, cfg.lr = 32, 2, "cpu", True, 0.05
    train(cfg, tmp_path / "run")
    records = [json.loads(s) for s in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    best = None
    for i, r in enumerate(records):
        improved = is_improvement("pixel_error", r["val_pixel_error"], best)
        best = r["val_pixel_error"] if improved else best
        assert ("val_v_rand" in r) == (improved or i == len(records) - 1), (i, r)
        assert "val_pixel_error" in r and "val_dice_1" in r
    assert any("val_v_rand" not in r for r in records)  # the lr makes some evaluation worse
    assert "val_v_rand" in load_checkpoint(tmp_path / "run")["record"]  # best.pt's
