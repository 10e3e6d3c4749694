"""``cellp2p evaluate`` through the CLI on tiny stacks with hand-computed answers."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner, Result

from cellp2p.cli import main
from cellp2p.evaluate import evaluate
from cellp2p.io import write_stack


def _run(*args: object) -> Result:
    return CliRunner().invoke(main, ["evaluate", *map(str, args)])


def _two_cells(n: int = 2) -> np.ndarray:
    """(n, 8, 8) ISBI-style labels: membrane (0) in column 4, cells of 32 and 24 pixels (255)."""
    lab = np.full((n, 8, 8), 255, np.uint8)
    lab[:, :, 4] = 0
    return lab


def test_perfect_prediction_scores_perfectly(tmp_path: Path) -> None:
    lab = write_stack(tmp_path / "labels.tif", _two_cells())
    pred = write_stack(tmp_path / "pred.tif", (_two_cells() / 255).astype(np.float32))
    res = _run(pred, "--labels", lab, "--json", tmp_path / "m.json")
    assert res.exit_code == 0, res.output
    assert "mean" in res.output and "v_rand" in res.output
    out = json.loads((tmp_path / "m.json").read_text())
    assert out["task"] == "segment" and [r["slice"] for r in out["per_slice"]] == [0, 1]
    mean = out["mean"]
    assert mean["pixel_error"] == 0.0
    assert mean["dice_0"] == mean["dice_1"] == mean["iou_1"] == 1.0
    assert mean["v_rand"] == pytest.approx(1.0) and mean["v_info"] == pytest.approx(1.0)
    assert mean["ap_50"] == mean["ap_75"] == 1.0


def test_missing_membrane_merges_the_two_cells(tmp_path: Path) -> None:
    # The prediction has no membrane: 8 of 64 pixels wrong and both cells merged into one.
    lab = write_stack(tmp_path / "labels.tif", _two_cells())
    pred = write_stack(tmp_path / "pred.tif", np.full((2, 8, 8), 255, np.uint8))
    res = _run(pred, "--labels", lab, "--json", tmp_path / "m.json")
    assert res.exit_code == 0, res.output
    mean = json.loads((tmp_path / "m.json").read_text())["mean"]
    assert mean["pixel_error"] == pytest.approx(8 / 64)
    assert mean["dice_0"] == 0.0  # no membrane predicted at all
    assert mean["dice_1"] == pytest.approx(2 * 56 / (64 + 56))
    assert mean["iou_1"] == pytest.approx(56 / 64)
    # Foreground-restricted Rand: n_ij = (32, 24) in one proposal segment of 56 pixels.
    assert mean["v_rand_split"] == pytest.approx(1.0)
    assert mean["v_rand_merge"] == pytest.approx((32**2 + 24**2) / 56**2)
    assert mean["v_rand"] == pytest.approx(2 * (32**2 + 24**2) / (56**2 + 32**2 + 24**2))
    # The merged cell (64 px) has IoU 32/64 with the left cell: a match at 0.5 (TP 1, FN 1).
    assert mean["ap_50"] == pytest.approx(0.5) and mean["ap_75"] == 0.0


def test_translate_known_offset_and_identical_slices(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    target = rng.integers(20, 200, size=(2, 16, 16)).astype(np.uint8)
    t = write_stack(tmp_path / "target.tif", target)
    p = write_stack(tmp_path / "pred.tif", target + np.uint8(10))
    same = write_stack(tmp_path / "same.tif", target)
    res = _run(p, "--labels", t, "--task", "translate", "--json", tmp_path / "m.json")
    assert res.exit_code == 0, res.output
    mean = json.loads((tmp_path / "m.json").read_text())["mean"]
    assert mean["mae"] == pytest.approx(10.0)
    assert mean["psnr"] == pytest.approx(10 * math.log10(255**2 / 100), abs=1e-4)
    res = _run(same, "--labels", t, "--task", "translate", "--json", tmp_path / "s.json")
    assert res.exit_code == 0, res.output
    assert "inf" in res.output
    # Strict JSON has no infinity: identical slices (PSNR = inf) are written as null.
    mean = json.loads((tmp_path / "s.json").read_text())["mean"]
    assert mean["psnr"] is None and mean["mae"] == 0.0 and mean["ssim"] == pytest.approx(1.0)


def test_slices_of_a_whole_stack_or_of_a_prediction_of_just_those(tmp_path: Path) -> None:
    lab = _two_cells(4)
    lab_path = write_stack(tmp_path / "labels.tif", lab)
    wrong = lab.copy()
    wrong[:2] = 255  # slices 0 and 1 are wrong, 2 and 3 right
    whole = write_stack(tmp_path / "whole.tif", wrong)
    part = write_stack(tmp_path / "part.tif", lab[2:])
    for pred in (whole, part):
        out = evaluate(pred, lab_path, slices="2-3", echo=None)
        assert [r["slice"] for r in out["per_slice"]] == [2, 3]
        assert out["mean"]["pixel_error"] == 0.0


@pytest.mark.parametrize(
    "pred_shape",
    [(3, 8, 8), (2, 8, 9)],
    ids=["slice-count", "slice-size"],
)
def test_mismatched_stacks_fail_with_one_error_line(tmp_path: Path, pred_shape: tuple) -> None:
    lab = write_stack(tmp_path / "labels.tif", _two_cells())
    pred = write_stack(tmp_path / "pred.tif", np.zeros(pred_shape, np.uint8))
    json_path = tmp_path / "m.json"
    res = _run(pred, "--labels", lab, "--json", json_path)
    assert res.exit_code != 0
    lines = [line for line in res.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error:"), res.output
    assert "pred.tif" in lines[0] and "labels.tif" in lines[0]
    assert "Traceback" not in res.output
    assert not json_path.exists()
