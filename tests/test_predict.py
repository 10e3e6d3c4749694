"""Prediction: shapes and metadata, tiling against whole slices, seams, TTA, errors, kills."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch
from click.testing import CliRunner
from PIL import Image
from torch import nn

from cellp2p.cli import main
from cellp2p.io import StackReader, write_stack
from cellp2p.normalization import Normalization
from cellp2p.predict import default_output, predict_stack
from cellp2p.predictor import Predictor, load_predictor
from cellp2p.tiling import forward_full

SPACING = (0.05, 0.004, 0.004)

# Every checkpoint here comes from a run that cellp2p.train.train made (tests/conftest.py):
# seg_run (binary, same-padding small U-Net of depth 2, receptive field ~47 px), multiclass_run
# (classes 0/128/255), translate_run (pix2pix, 8-bit to 16-bit) and valid_run (valid-convolution
# U-Nets, paper and course layouts).


def _smooth(shape: tuple[int, ...], seed: int = 0) -> np.ndarray:
    """uint8 image with structure at several scales."""
    from scipy.ndimage import gaussian_filter

    img = gaussian_filter(np.random.default_rng(seed).random(shape), 2)
    return ((img - img.min()) / (img.max() - img.min()) * 255).astype(np.uint8)


def _run(*args: object):
    return CliRunner().invoke(main, ["predict", *map(str, args), "--quiet"])


# -- shapes, dtypes, metadata ------------------------------------------------------------------


def test_stack_non_square_odd_size_keeps_shape_and_spacing(seg_run, tmp_path):
    stack = write_stack(tmp_path / "vol.tif", _smooth((3, 45, 70)), spacing=SPACING)
    result = _run(stack, "--model", seg_run.out)
    assert result.exit_code == 0, result.output
    out = tmp_path / "vol_pred.tif"
    assert f"wrote {out}" in result.output
    with StackReader(out) as r:
        assert r.shape == (3, 45, 70) and r.dtype == np.float32
        assert r.spacing == pytest.approx(SPACING)
        prob = r.read()
    assert prob.min() >= 0 and prob.max() <= 1 and prob.std() > 0.01


def test_single_2d_images_and_folders(seg_run, tmp_path):
    img = _smooth((37, 53))
    tifffile.imwrite(tmp_path / "one.tif", img)
    Image.fromarray(img).save(tmp_path / "two.png")
    folder = tmp_path / "frames"
    folder.mkdir()
    for i in range(3):
        Image.fromarray(_smooth((40, 33), seed=i)).save(folder / f"f{i}.png")
    inputs = [tmp_path / "one.tif", tmp_path / "two.png", folder]
    paths = predict_stack(inputs, seg_run.out, output="mask", quiet=True, device="cpu")
    assert [p.name for p in paths] == ["one_pred.tif", "two_pred.tif", "frames_pred.tif"]
    assert all(p.parent == tmp_path for p in paths)
    for path, shape in zip(paths, [(1, 37, 53), (1, 37, 53), (3, 40, 33)], strict=True):
        with StackReader(path) as r:
            assert r.shape == shape and r.dtype == np.uint8
            assert set(np.unique(r.read())) <= {0, 255}
    # The same image as TIFF and PNG gives the same prediction.
    assert np.array_equal(tifffile.imread(paths[0]), tifffile.imread(paths[1]))


def test_output_kinds(seg_run, multiclass_run, translate_run, tmp_path):
    stack = write_stack(tmp_path / "v.tif", _smooth((2, 40, 50)), spacing=SPACING)
    seg = load_predictor(seg_run.out, "cpu")
    prob = seg.predict_slice(_smooth((40, 50)))
    assert prob.shape == (1, 40, 50) and prob.dtype == np.float32
    labels = predict_stack(
        [stack], seg_run.out, out=tmp_path / "l.tif", output="labels", threshold=0.4, quiet=True
    )[0]
    probs = StackReader(stack).read()
    with StackReader(labels) as r:
        lab = r.read()
        assert r.dtype == np.uint16 and lab.max() >= 1 and r.spacing == pytest.approx(SPACING)
    expect = seg.to_output(seg.predict_slice(probs[0]), "labels", 0.4)
    assert np.array_equal(lab[0], expect)

    multi = predict_stack([stack], multiclass_run.out, out=tmp_path / "m.tif", quiet=True)[0]
    with StackReader(multi) as r:
        assert r.shape == (2, 3, 40, 50) and r.dtype == np.float32
        assert np.allclose(r.read().sum(1), 1, atol=1e-5)  # softmax over the classes
    mask = predict_stack(
        [stack], multiclass_run.out, out=tmp_path / "mm.tif", output="mask", quiet=True
    )[0]
    assert set(np.unique(tifffile.imread(mask))) <= {0, 128, 255}
    assert len(np.unique(tifffile.imread(mask))) > 1  # the run learnt more than one class

    # Translation: the target's dtype and range (16-bit stays 16-bit).
    image = predict_stack([stack], translate_run.out, out=tmp_path / "t.tif", quiet=True)[0]
    norm = load_predictor(translate_run.out, "cpu").target_norm
    assert norm.vmin > 0 and norm.vmax > 255  # the 16-bit target's range, not the input's
    with StackReader(image) as r:
        img = r.read()
        assert r.dtype == np.uint16 and r.shape == (2, 40, 50)
        assert img.min() >= np.floor(norm.vmin) and img.max() <= np.ceil(norm.vmax)
        assert img.std() > 0


def test_predictor_attributes(multiclass_run, translate_run):
    p = load_predictor(multiclass_run.out, "cpu")
    assert (p.mode, p.task, p.target_kind) == ("unet", "segment", "multiclass")
    assert p.classes == [0, 128, 255]
    assert (p.in_channels, p.out_channels) == (1, 3)
    # The normalisation training fitted on its training slices (all but the last of 4).
    cfg = multiclass_run.config
    fitted = Normalization.fit(multiclass_run.data.volume[:3], cfg.norm_method)
    assert p.input_norm == fitted and p.input_norm.dtype == "uint8" and p.target_norm is None
    assert p.record == multiclass_run.record  # the last record of metrics.jsonl
    assert p.record["step"] == cfg.max_steps and p.train_config["crop"] == cfg.crop == 32
    assert p.train_config == asdict(cfg)
    assert p.checkpoint_path == multiclass_run.best and p.device == torch.device("cpu")
    assert not any(m.training for m in p.net.modules())
    t = load_predictor(translate_run.out, "cpu")
    assert (t.mode, t.task, t.target_kind) == ("pix2pix", "translate", "image")
    assert t.target_norm.dtype == "uint16"
    cfg = translate_run.config
    assert t.target_norm == Normalization.fit(translate_run.data.labels[:3], cfg.norm_method)


def test_a_real_training_run_predicts(seg_run, em_pair, tmp_path):
    out = predict_stack(
        [em_pair.volume_path], seg_run.out, out=tmp_path / "p.tif", output="mask", quiet=True
    )[0]
    with StackReader(out) as r:
        assert r.shape == em_pair.volume.shape and r.spacing == pytest.approx(em_pair.spacing)
        mask = r.read()
    # It learnt the membranes: the mask mostly agrees with the labels (~84% are interior).
    assert np.mean((mask > 0) == (em_pair.labels > 0)) > 0.9


@pytest.mark.parametrize("name", ["seg_run", "multiclass_run", "translate_run"])
def test_predictions_score_as_training_logged(name, request):
    """What the predictor makes of the validation slices is what training validated.

    The raw validation slices go through load_predictor (normalisation, network, the one output
    mapping) and are scored by the scoring function training uses: every val_ metric of the
    last record comes back. A second mapping from network outputs to [0, 1] (the course pix2pix
    bug: 0.75 everywhere) or a normalisation not restored would show here.
    """
    _check_scores_as_logged(request.getfixturevalue(name))


def test_valid_convolution_predictions_score_as_training_logged(valid_run):
    _check_scores_as_logged(valid_run)


def _check_scores_as_logged(run) -> None:
    from cellp2p.dataset import load_data
    from cellp2p.scoring import score_outputs

    data = load_data(run.config)
    raw = [run.data.volume[i] for i in data.val_ids]
    pred = load_predictor(run.out, "cpu", precision="fp32").predict_slices(raw)
    scores = score_outputs(pred, data.val_y, data.target_kind, data.classes)
    logged = {k.removeprefix("val_"): v for k, v in run.record.items() if k.startswith("val_")}
    assert set(scores) == set(logged)
    for key, value in scores.items():
        assert value == pytest.approx(logged[key], abs=1e-6), key


@pytest.mark.parametrize("amx", [True, False])
def test_auto_precision_is_bf16_where_the_device_computes_it(monkeypatch, amx):
    from cellp2p.runtime import resolve_precision

    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)
    assert resolve_precision("auto", torch.device("cpu")) == ("bf16" if amx else "fp32")
    assert resolve_precision("auto", torch.device("cuda")) == "bf16"
    assert resolve_precision("fp32", torch.device("cuda")) == "fp32"
    assert resolve_precision("bf16", torch.device("cpu")) == "bf16"


def test_bf16_predictions_score_as_fp32_ones(seg_run, tmp_path):
    """bf16 (what --precision auto picks on CPUs with AMX) moves probabilities by rounding
    only: the same masks but for a few pixels at the threshold, the same scores within 1e-2;
    predict's --precision reaches the network."""
    from cellp2p.dataset import load_data
    from cellp2p.scoring import score_outputs

    data = load_data(seg_run.config)
    raw = [seg_run.data.volume[i] for i in data.val_ids]
    fp32, bf16 = (
        load_predictor(seg_run.out, "cpu", precision=prec).predict_slices(raw)
        for prec in ("fp32", "bf16")
    )
    assert np.abs(fp32 - bf16).max() < 0.05
    assert ((fp32 > 0.5) != (bf16 > 0.5)).mean() < 0.01
    a, b = (score_outputs(p, data.val_y, data.target_kind, data.classes) for p in (fp32, bf16))
    assert a["pixel_error"] == pytest.approx(b["pixel_error"], abs=1e-2)
    stack = write_stack(tmp_path / "val.tif", np.stack(raw))
    for prec in ("fp32", "bf16"):
        out = tmp_path / f"{prec}.tif"
        args = ["predict", str(stack), "-m", str(seg_run.out), "-o", str(out), "--quiet"]
        result = CliRunner().invoke(main, [*args, "--device", "cpu", "--precision", prec])
        assert result.exit_code == 0, result.output
    for prec, want in (("fp32", fp32), ("bf16", bf16)):  # one slice: a 2D TIFF
        got = tifffile.imread(tmp_path / f"{prec}.tif").reshape(want.shape)
        np.testing.assert_allclose(got, want, atol=1e-6)


# -- tiling ------------------------------------------------------------------------------------


def test_tiled_equals_whole_slice_same_padding(seg_run):
    """Same-padding net: tiles agree with the whole slice up to a small blending error.

    A tile's pixels near its own border see zero padding instead of the neighbouring image, so
    within a receptive-field radius (~24 px here) of a tile border they differ from the whole
    slice. Gaussian weights (sigma = tile/8) favour the tile whose centre is nearer, where the
    value is exact; with 50% overlap every pixel has such a tile, leaving a residual of
    ~1e-2 at most at the seams and ~1e-3 on average. Near the slice border the tiled path sees
    mirrored context where the whole-slice forward zero-pads, so the outer 24 px are left out.
    """
    p = load_predictor(seg_run.out, "cpu")
    img = _smooth((150, 230))
    whole = p.predict_slice(img)
    assert whole.std() > 0.05  # the network is not trivially constant
    assert np.array_equal(p.predict_slice(img, tile=256), whole)  # one window = whole slice
    tiled = p.predict_slice(img, tile=96, overlap=0.5)
    diff = np.abs(tiled - whole)[:, 24:-24, 24:-24]
    assert diff.max() < 0.03 and diff.mean() < 3e-3


def test_tiled_equals_whole_slice_valid_convolution(valid_run):
    """Valid-convolution U-Net: overlap-tile on the whole slice's pooling grid is exact.

    For the paper layout (transposed up-convolutions) tiles and whole slices agree to float
    precision. The course layout's bilinear resize with align_corners=True cannot be tiled
    exactly, so it always runs on whole slices, and ``--tile`` gives the same result too.
    """
    p = load_predictor(valid_run.out, "cpu")
    img = _smooth((70, 101))
    whole = p.predict_slice(img)
    assert whole.std() > 0.01
    x = torch.from_numpy(p.prepare([img]))
    with torch.inference_mode():
        reference = forward_full(p.forward, p.net, x)[0].numpy()  # training validation's path
    np.testing.assert_allclose(whole, reference, atol=1e-6)
    assert p.tiles_exactly == (valid_run.config.preset == "paper")
    for tile in (32, 48):
        np.testing.assert_allclose(p.predict_slice(img, tile=tile, batch_size=3), whole, atol=1e-5)


def test_constant_image_is_seam_free(seg_run):
    """No step between tiles: the output of a constant image repeats with the pooling period.

    A U-Net's transposed convolutions make even a constant image's output periodic with period
    2**depth, so "variation along a row" is measured between pixels one period apart. Naive
    tiling (no overlap, no blending) shows its seams under the same measure.
    """
    from monai.inferers import sliding_window_inference

    p = load_predictor(seg_run.out, "cpu")
    const = np.full((200, 300), 120, np.uint8)
    period = p.divisor

    def variation(out: np.ndarray) -> float:
        inner = out[0, 40:-40, 40:-40]
        return float(np.abs(inner[:, period:] - inner[:, :-period]).max())

    assert variation(p.predict_slice(const)) < 1e-5
    blended = variation(p.predict_slice(const, tile=96, overlap=0.5))
    assert blended < 0.01
    x = torch.from_numpy(p.prepare([const]))
    with torch.inference_mode():
        naive = sliding_window_inference(x, (96, 96), 4, p.forward, overlap=0.0)
    # The trained network's seams are milder than a random one's (~0.05 here, not > 0.1), but
    # they are there, and an order of magnitude above what blending leaves.
    assert variation(naive.numpy()[0]) > max(0.02, 10 * blended)


def test_tile_larger_than_slice_and_big_slices_default_to_tiles(seg_run):
    p = load_predictor(seg_run.out, "cpu")
    assert p.default_tile((1024, 1024)) is None
    assert p.default_tile((1025, 300)) == 512
    img = _smooth((20, 300))  # thinner than the tile along Y: one window spans Y
    np.testing.assert_allclose(p.predict_slice(img, tile=64, overlap=0.5).shape, (1, 20, 300))


# -- TTA and dropout ---------------------------------------------------------------------------


def _conv(kernel: list[list[float]]) -> nn.Conv2d:
    conv = nn.Conv2d(1, 1, 3, padding=1, bias=False)
    with torch.no_grad():
        conv.weight.copy_(torch.tensor(kernel)[None, None])
    return conv.eval()


def test_tta_of_a_symmetric_model_equals_no_tta(seg_run, monkeypatch):
    p = load_predictor(seg_run.out, "cpu")
    img = _smooth((40, 56))  # neither square nor symmetric: a wrong undo would show
    blur = _conv([[1, 2, 1], [2, 4, 2], [1, 2, 1]])  # invariant under flips and rotations
    monkeypatch.setattr(p, "net", blur)
    plain = p.predict_slice(img)
    p.tta = True
    np.testing.assert_allclose(p.predict_slice(img), plain, atol=1e-6)
    # Tiled, with a pointwise (1x1) model so that tiling itself is exact: a rotation or flip
    # not undone, or undone with an offset, would still show on this asymmetric image.
    pointwise = nn.Conv2d(1, 1, 1).eval()
    monkeypatch.setattr(p, "net", pointwise)
    p.tta = False
    plain = p.predict_slice(img)
    p.tta = True
    np.testing.assert_allclose(p.predict_slice(img, tile=32, overlap=0.25), plain, atol=1e-6)
    # An asymmetric model is changed by TTA (so the transforms are really applied).
    monkeypatch.setattr(p, "net", _conv([[0, 0, 0], [0, 0, 4], [0, 0, 0]]))
    p.tta = False
    shifted = p.predict_slice(img)
    p.tta = True
    assert np.abs(p.predict_slice(img) - shifted).max() > 1e-2


def test_labels_follow_the_tuned_test_time_augmentation(seg_run, tmp_path, monkeypatch):
    """A checkpoint whose tuning chose TTA predicts labels from the TTA map and everything else
    without it; --no-tta and --tta override the choice."""
    import shutil

    import cellp2p.predictor as P
    from cellp2p.checkpoint import load_checkpoint, update_checkpoint

    run = tmp_path / "run"
    shutil.copytree(seg_run.out, run)
    best = run / "checkpoints" / "best.pt"
    pp = load_checkpoint(best)["postprocessing"]
    update_checkpoint(best, postprocessing={**pp, "method": "watershed", "tta": True})
    p = load_predictor(run, "cpu", precision="fp32")
    assert p.uses_tta("labels") and not p.uses_tta("prob") and not p.uses_tta()
    assert not load_predictor(run, "cpu", tta=False).uses_tta("labels")
    assert load_predictor(run, "cpu", tta=True).uses_tta("prob")
    img = _smooth((2, 40, 56))
    plain = p.predict_slices(list(img))
    p.tta = True
    augmented = p.predict_slices(list(img))
    assert np.abs(augmented - plain).max() > 1e-4  # the two maps differ
    stack = write_stack(tmp_path / "vol.tif", img)
    calls = []
    real = P.dihedral_mean
    monkeypatch.setattr(P, "dihedral_mean", lambda fn, x: calls.append(1) or real(fn, x))
    cases = {
        ("labels",): (augmented, 1),
        ("labels", "--no-tta"): (plain, 0),
        ("prob",): (plain, 0),
        ("prob", "--tta"): (augmented, 1),
    }
    for i, (args, (prob, n)) in enumerate(cases.items()):
        calls.clear()
        out = tmp_path / f"out{i}.tif"
        res = _run(stack, "--model", run, "--output", *args, "-o", out, "--precision", "fp32")
        assert res.exit_code == 0, res.output
        assert len(calls) == n, args
        want = np.stack([p.to_output(q, args[0]) for q in prob])
        np.testing.assert_allclose(tifffile.imread(out), want, atol=1e-6, err_msg=str(args))


def test_eval_semantics_and_test_time_dropout(translate_run):
    img = _smooth((32, 32))
    p = load_predictor(translate_run.out, "cpu")
    assert p.n_dropout == 2
    assert np.array_equal(p.predict_slice(img), p.predict_slice(img))  # eval: deterministic
    q = load_predictor(translate_run.out, "cpu", test_time_dropout=True)
    assert not np.array_equal(q.predict_slice(img), q.predict_slice(img))
    for m in q.net.modules():
        assert m.training == isinstance(m, nn.Dropout)  # batch norm stays in eval mode


# -- outputs -----------------------------------------------------------------------------------


def test_labels_are_4_connected_and_widen_to_uint32(seg_run, monkeypatch, tmp_path):
    p = load_predictor(seg_run.out, "cpu")
    prob = np.zeros((1, 6, 6), np.float32)
    prob[0, 1:3, 1:3] = prob[0, 3:5, 3:5] = 0.9  # two squares touching at a corner
    lab = p.to_output(prob, "labels")
    assert lab.dtype == np.uint16 and lab.max() == 2
    checker = (np.indices((512, 512)).sum(0) % 2).astype(np.float32)  # 131072 objects
    assert p.to_output(checker[None], "labels").dtype == np.uint32
    # A stack declared uint16 is rewritten as uint32 when a slice needs it.
    fake = torch.from_numpy(checker)
    monkeypatch.setattr(Predictor, "forward", lambda self, x: fake.expand(len(x), 1, 512, 512))
    stack = write_stack(tmp_path / "c.tif", np.zeros((2, 512, 512), np.uint8))
    out = predict_stack([stack], seg_run.out, output="labels", quiet=True)[0]
    labels = tifffile.imread(out)
    assert labels.dtype == np.uint32 and labels.max() == 131072


def test_slices_option_predicts_only_those(seg_run, tmp_path):
    stack = write_stack(tmp_path / "v.tif", _smooth((5, 24, 24)))
    result = _run(stack, "--model", seg_run.out, "--slices", "1-2", "-o", tmp_path / "o.tif")
    assert result.exit_code == 0, result.output
    pred = tifffile.imread(tmp_path / "o.tif")
    p = load_predictor(seg_run.out, "cpu")
    np.testing.assert_allclose(pred[1], p.predict_slice(tifffile.imread(stack)[2])[0], atol=1e-6)


def test_output_names(tmp_path):
    assert default_output(tmp_path / "a.tif") == tmp_path / "a_pred.tif"
    assert default_output(tmp_path / "a.ome.tiff") == tmp_path / "a_pred.tif"
    assert default_output(tmp_path / "b.png") == tmp_path / "b_pred.tif"
    (tmp_path / "dir").mkdir()
    assert default_output(tmp_path / "dir") == tmp_path / "dir_pred.tif"


def test_several_inputs_into_a_folder(seg_run, tmp_path):
    a = write_stack(tmp_path / "a.tif", _smooth((1, 20, 20)))
    b = write_stack(tmp_path / "b.tif", _smooth((2, 20, 20)))
    result = _run(a, b, "--model", seg_run.out, "-o", tmp_path / "out")
    assert result.exit_code == 0, result.output
    assert tifffile.imread(tmp_path / "out" / "b_pred.tif").shape == (2, 20, 20)


# -- errors ------------------------------------------------------------------------------------


@pytest.fixture
def stack(tmp_path: Path) -> Path:
    return write_stack(tmp_path / "in.tif", _smooth((2, 32, 32)), spacing=SPACING)


def _no_output(folder: Path) -> None:
    leftovers = [p.name for p in folder.rglob("*") if "pred" in p.name or p.suffix == ".part"]
    assert not leftovers, leftovers


def test_missing_and_corrupt_inputs(seg_run, stack, tmp_path, check_cli_error):
    check_cli_error(_run(tmp_path / "nope.tif", "--model", seg_run.out), "nope.tif")
    bad = tmp_path / "bad.tif"
    bad.write_bytes(b"II*\x00 this is not a tiff")
    check_cli_error(_run(bad, "--model", seg_run.out), bad)
    # One bad input among good ones: nothing is written for any of them.
    check_cli_error(_run(stack, bad, "--model", seg_run.out, "-o", tmp_path / "o"), bad)
    _no_output(tmp_path)


def test_missing_and_corrupt_checkpoints(seg_run, stack, tmp_path, check_cli_error):
    check_cli_error(_run(stack, "--model", tmp_path / "none.pt"), "none.pt")
    truncated = tmp_path / "trunc.pt"
    truncated.write_bytes(seg_run.best.read_bytes()[:300])
    check_cli_error(_run(stack, "--model", truncated), truncated)
    (tmp_path / "emptyrun").mkdir()
    check_cli_error(_run(stack, "--model", tmp_path / "emptyrun"), "emptyrun")
    not_ours = tmp_path / "other.pt"
    torch.save({"weights": torch.zeros(2)}, not_ours)
    check_cli_error(_run(stack, "--model", not_ours), not_ours)
    _no_output(tmp_path)


def test_wrong_channels_nan_and_wrong_output_kind(
    seg_run, translate_run, stack, tmp_path, check_cli_error
):
    two = write_stack(tmp_path / "two.tif", np.zeros((2, 2, 16, 16), np.uint8))
    assert "2 channel(s)" in check_cli_error(_run(two, "--model", seg_run.out), two)
    nan = np.random.default_rng(0).random((3, 16, 16)).astype(np.float32)
    nan[2, 5, 5] = np.nan
    nan_path = write_stack(tmp_path / "nan.tif", nan)
    assert "NaN" in check_cli_error(_run(stack, nan_path, "--model", seg_run.out), nan_path)
    check_cli_error(_run(stack, "--model", seg_run.out, "--output", "image"), "--output image")
    check_cli_error(_run(stack, "--model", translate_run.out, "--output", "labels"), "labels")
    check_cli_error(_run(stack, stack, "--model", seg_run.out, "-o", tmp_path / "x.tif"), "x.tif")
    check_cli_error(_run(stack, "--model", seg_run.out, "--overlap", "1"), "--overlap")
    _no_output(tmp_path)


def test_existing_output_is_never_overwritten(seg_run, stack, tmp_path, check_cli_error):
    other = write_stack(tmp_path / "other.tif", _smooth((1, 32, 32)))
    existing = tmp_path / "other_pred.tif"
    existing.write_bytes(b"precious")
    # All outputs are checked first: in_pred.tif is not written either.
    check_cli_error(_run(stack, other, "--model", seg_run.out), existing)
    assert existing.read_bytes() == b"precious" and not (tmp_path / "in_pred.tif").exists()
    # --force with a failing input (NaN) leaves the old output untouched.
    nan = np.full((1, 32, 32), np.nan, np.float32)
    write_stack(tmp_path / "other.tif", nan, force=True)
    check_cli_error(_run(other, "--model", seg_run.out, "--force"), "NaN")
    assert existing.read_bytes() == b"precious"
    write_stack(tmp_path / "other.tif", _smooth((1, 32, 32)), force=True)
    assert _run(other, "--model", seg_run.out, "--force").exit_code == 0
    assert tifffile.imread(existing).shape == (32, 32)


def test_sigkill_during_prediction_leaves_nothing_at_the_output(seg_run, tmp_path):
    stack = write_stack(tmp_path / "big.tif", _smooth((40, 192, 192)))
    out = tmp_path / "big_pred.tif"
    cmd = [sys.executable, "-m", "cellp2p", "predict", str(stack), "--model", str(seg_run.out)]
    cmd += ["--tta", "--batch-size", "1", "--quiet", "--device", "cpu"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 60
        while not list(tmp_path.glob(".big_pred.tif.*.part")):
            assert proc.poll() is None, proc.communicate()[1].decode()
            assert time.monotonic() < deadline, "no temporary file appeared"
            time.sleep(0.01)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == -signal.SIGKILL  # killed mid-prediction, not finished
    assert not out.exists()
