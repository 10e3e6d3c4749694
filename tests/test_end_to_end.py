"""Every mode × preset through the command line: train, predict the validation slice, evaluate.

For each of U-Net and pix2pix in the small, course and paper presets: a synthetic EM stack of two
slices of the smallest size the preset takes (slice 0 to train on, slice 1 to validate on),
``cellp2p train`` for a step or a few, ``cellp2p predict --slices 1`` and ``cellp2p evaluate
--slices 1``. The pixel error ``evaluate`` finds in what ``predict`` wrote must be the
``val_pixel_error`` training logged in metrics.jsonl (and so must every other metric both
report): one output mapping and one scoring function on both paths. A second mapping is how a
``--preset course`` pix2pix run once predicted 0.75 everywhere while its validation was right.

Where the prediction has pixels on both sides of the 0.5 threshold the comparison is sensitive
to any change of the mapping; after one or two steps the valid-convolution U-Nets (course and
paper: no normalisation, pix2pix initialisation) still say "cell interior" everywhere, so for
them it checks less. The paper and course checkpoints are big (up to 1.4 GB with Adam's
state): each run folder is removed when its test ends.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch
from click.testing import CliRunner

from cellp2p.cli import main
from cellp2p.io import write_stack
from cellp2p.models import build_model
from cellp2p.models.config import PRESETS
from cellp2p.synth import make_em

# mode, preset, training options beyond the common ones, whether the prediction straddles 0.5.
CASES = {
    # Forty steps: the small U-Net learns some membranes (pixels on both sides of 0.5).
    "unet-small": (
        "unet",
        "small",
        ["--max-steps", "40", "--crop", "32", "--batch-size", "4", "--lr", "0.003"],
        True,
    ),
    "unet-course": ("unet", "course", ["--max-steps", "2"], False),
    "unet-paper": ("unet", "paper", ["--max-steps", "2"], False),
    "pix2pix-small": ("pix2pix", "small", ["--max-steps", "2"], True),
    "pix2pix-course": ("pix2pix", "course", ["--max-steps", "2"], True),
    "pix2pix-paper": ("pix2pix", "paper", ["--max-steps", "1"], True),
}
VAL = 1  # the validation slice of the two


def smallest_size(mode: str, preset: str) -> int:
    """The smallest slice size the preset's network takes (at least 64).

    A pix2pix generator halves the image at each of its ``depth`` levels (8 in the course and
    paper presets: 256 px); a valid-convolution U-Net needs the input size
    ``valid_input_size`` finds (paper 188 px, course 140 px).
    """
    if mode == "pix2pix":
        return max(64, 2 ** PRESETS["generator"][preset]["depth"])
    with torch.device("meta"):  # the shape arithmetic only: nothing allocated
        net = build_model("unet", preset)
    return max(64, net.valid_input_size(1))


# Exact agreement is asked of fp32; bf16 (auto on CPUs with AMX) is compared in test_predict.
_FP32_CPU = ("--device", "cpu", "--precision", "fp32")


def _cli(*args: object) -> str:
    result = CliRunner().invoke(main, [str(a) for a in args])
    assert result.exit_code == 0, f"{args[0]} failed:\n{result.output}\n{result.exception!r}"
    return result.output


@pytest.fixture
def work(tmp_path: Path):
    yield tmp_path
    shutil.rmtree(tmp_path / "run", ignore_errors=True)  # hundreds of MB for the big presets


@pytest.mark.parametrize(("mode", "preset", "options", "straddles"), CASES.values(), ids=CASES)
def test_train_predict_evaluate_agree(work, request, mode, preset, options, straddles):
    if preset == "small":  # tiny networks: one thread is as fast, and not slowed by a busy CPU
        request.getfixturevalue("single_thread")
    size = smallest_size(mode, preset)
    volume, labels = make_em(2, (size, size), seed=0)
    vpath = write_stack(work / "volume.tif", volume)
    lpath = write_stack(work / "labels.tif", labels)
    run, pred_path, scores_path = work / "run", work / "pred.tif", work / "scores.json"
    defaults = {"--crop": str(size), "--batch-size": "1"}
    defaults.update(dict(zip(options[::2], options[1::2], strict=True)))
    steps = defaults["--max-steps"]
    _cli(
        "train",
        *("--mode", mode, "--preset", preset, "--volume", vpath, "--labels", lpath),
        *("--out", run, "--train-slices", 0, "--val-slices", VAL, "--eval-every", steps),
        *(x for kv in defaults.items() for x in kv),
        *_FP32_CPU,
        "--quiet",
    )
    _cli("predict", vpath, "-m", run, "--slices", VAL, "-o", pred_path, *_FP32_CPU)
    _cli("evaluate", pred_path, "--labels", lpath, "--slices", VAL, "--json", scores_path)

    logged = json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])
    scores = json.loads(scores_path.read_text())
    assert logged["step"] == int(steps)
    assert [row["slice"] for row in scores["per_slice"]] == [VAL]
    assert abs(scores["mean"]["pixel_error"] - logged["val_pixel_error"]) <= 1e-6
    shared = {k for k in scores["mean"] if f"val_{k}" in logged}
    assert {"pixel_error", "dice_1", "v_rand", "v_info"} <= shared
    # Not compared: the threshold a V score was found at. A saturated probability map (all 1.0
    # after two steps of the course U-Net) is read by evaluate's --kind auto as a mask, whose
    # one segmentation is reported at 0.5; training swept the thresholds of its probabilities
    # and reports the first of the equal best (0.0). The scores themselves are the same.
    for key in shared - {"v_rand_threshold", "v_info_threshold"}:
        assert scores["mean"][key] == pytest.approx(logged[f"val_{key}"], abs=1e-6), key

    pred = tifffile.imread(pred_path)
    assert pred.shape == (size, size) and pred.dtype == np.float32
    assert pred.min() >= 0 and pred.max() <= 1
    if straddles:
        assert pred.min() < 0.5 < pred.max(), (pred.min(), pred.max())
    if (mode, preset) == ("pix2pix", "course"):
        # The sigmoid generator's [0, 1] output is the probability; mapping it as a tanh
        # output, (out + 1) / 2, put every pixel in [0.5, 1].
        assert (pred < 0.5).mean() > 0.05, (pred.min(), pred.max())
