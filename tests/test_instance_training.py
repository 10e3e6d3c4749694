"""Issue 15 end to end: train from instance labels → predict --output labels → evaluate AP."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch

from cellp2p.checkpoint import load_checkpoint
from cellp2p.cli import main
from cellp2p.config import TrainConfig
from cellp2p.dataset import load_data
from cellp2p.errors import CellP2PError
from cellp2p.instances import looks_like_ids
from cellp2p.io import write_stack
from cellp2p.outputs import instance_labels
from cellp2p.predictor import load_predictor
from cellp2p.synth import make_nuclei
from cellp2p.train import train


@pytest.fixture(scope="module")
def nuclei_pair(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """Three 64² slices of touching nuclei and their instance labels (ids over the stack)."""
    root = tmp_path_factory.mktemp("nuclei")
    volume, labels = make_nuclei(3, (64, 64), seed=2)
    vol, lab = root / "vol.tif", root / "lab.tif"
    write_stack(vol, volume)
    write_stack(lab, labels)
    return vol, lab


def _cfg(vol: Path, lab: Path, **kw: object) -> TrainConfig:
    """A tiny U-Net run on slices 0-1, validated on slice 2."""
    opts: dict = dict(
        volume=str(vol),
        labels=str(lab),
        train_slices="0-1",
        val_slices="2",
        max_steps=30,
        eval_every=15,
        crop=32,
        batch_size=4,
        lr=1e-2,
        device="cpu",
        quiet=True,
        model_overrides={"depth": 2, "base": 8},
    )
    opts.update(kw)
    return TrainConfig(**opts)


@pytest.fixture(scope="module")
def instance_run(tmp_path_factory, nuclei_pair) -> Path:
    """A run trained straight from the instance labels (no flag)."""
    out = tmp_path_factory.mktemp("runs") / "inst"
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        train(_cfg(*nuclei_pair), out)
    finally:
        torch.set_num_threads(before)
    return out


def test_instance_labels_become_boundary_classes_with_border_weights(nuclei_pair):
    data = load_data(_cfg(*nuclei_pair))  # the U-Net's default: three classes, weighted
    assert data.instances and data.target_kind == "multiclass" and data.classes == [0, 1, 2]
    assert set(np.unique(data.train_y[:, 0])) <= {0.0, 1.0, 2.0} and data.out_channels == 3
    assert data.weighted and data.train_y[:, 1].max() > 2.0  # w0 between touching nuclei
    assert data.val_y.shape[1] == 1  # validation: the target only
    assert data.val_instances is not None and data.val_instances.max() > 0
    assert not data.dense
    separated = _cfg(*nuclei_pair)
    separated.instance_target = "separated"
    separated.border_weights = False
    data = load_data(separated)
    assert data.target_kind == "binary" and data.out_channels == 1 and not data.weighted
    assert set(np.unique(data.train_y)) <= {0.0, 1.0}
    pix2pix = _cfg(*nuclei_pair)
    pix2pix.mode = "pix2pix"  # learns images: the separated foreground, no weights
    data = load_data(pix2pix)
    assert data.instances and data.target_kind == "binary" and not data.weighted


def test_class_maps_stay_classes():
    lab = np.zeros((1, 32, 32), np.uint8)
    lab[0, 2:8, 2:8] = lab[0, 20:28, 20:28] = 255  # two interiors of the same class
    lab[0, 10:14, 10:14] = 128
    assert not looks_like_ids(lab)
    ids = lab.copy()
    ids[0, 20:28, 20:28] = 7  # every value one region: ids
    assert looks_like_ids(ids)
    assert looks_like_ids(np.arange(40, dtype=np.uint16).reshape(1, 5, 8))  # > 16 values


def test_train_predict_evaluate_instances(instance_run, nuclei_pair, tmp_path):
    vol, lab = nuclei_pair
    ckpt = load_checkpoint(instance_run)
    post = ckpt["postprocessing"]
    assert post["method"] in ("watershed", "components") and not post["dense"]
    assert post["boundary"]  # three classes: P(boundary) floods
    assert {"threshold", "min_distance", "h", "min_size"} <= set(post)
    logged = json.loads((instance_run / "metrics.jsonl").read_text().splitlines()[-1])
    assert {"val_ap_50", "val_ap_75", "val_ap_mean"} <= set(logged)
    out = tmp_path / "labels.tif"
    from click.testing import CliRunner

    runner = CliRunner()
    res = runner.invoke(
        main,
        [
            *("predict", str(vol), "-m", str(instance_run), "--slices", "2", "-o", str(out)),
            *("--output", "labels", "--device", "cpu"),
        ],
    )
    assert res.exit_code == 0, res.output
    pred = tifffile.imread(out)
    assert pred.dtype == np.uint16 and pred.shape == (64, 64)
    scores = tmp_path / "scores.json"
    res = runner.invoke(
        main, ["evaluate", str(out), "--labels", str(lab), "--slices", "2", "--json", str(scores)]
    )
    assert res.exit_code == 0, res.output
    mean = json.loads(scores.read_text())["mean"]
    assert 0.0 <= mean["ap_mean"] <= mean["ap_50"] <= 1.0


def test_predictor_labels_use_the_stored_postprocessing(instance_run, nuclei_pair):
    p = load_predictor(instance_run, device="cpu")
    post = p.postprocessing
    # Tuned at the end of training; a few steps may leave plain components the better choice.
    assert post and post["tuned"] and post["method"] in ("watershed", "components")
    prob = p.predict_slice(tifffile.imread(nuclei_pair[0])[2])
    assert prob.shape == (3, 64, 64)  # the U-Net's default target: boundary classes
    labels = p.to_output(prob, "labels")
    assert labels.dtype == np.uint16
    assert np.array_equal(labels, instance_labels(prob, p.target_kind, post))


def test_two_touching_discs_from_boundary_probabilities():
    yy, xx = np.mgrid[:48, :64]
    a = (yy - 24) ** 2 + (xx - 20) ** 2 < 12**2
    b = (yy - 24) ** 2 + (xx - 43) ** 2 < 12**2
    gt = np.where(a, 1, np.where(b, 2, 0))
    from cellp2p.instances import boundary_targets

    cls = boundary_targets(gt)
    prob = np.stack([(cls == k).astype(np.float32) for k in range(3)])
    post = {"method": "watershed", "boundary": True, "threshold": 0.5, "h": 0.5}
    inst = instance_labels(prob, "multiclass", post)
    assert len(np.unique(inst)) - 1 == 2
    assert len(np.unique(instance_labels(prob, "multiclass", None))) - 1 == 1  # components
    background = np.zeros((3, 8, 8), np.float32)
    background[0] = 1.0
    empty = instance_labels(background, "multiclass")
    assert not empty.any() and empty.dtype == np.uint16


@pytest.mark.parametrize(
    "values, words",
    [
        (np.arange(-3, 21), "negative label id"),
        (np.arange(0, 20) * 1.5, "non-integer label value"),
    ],
)
def test_bad_instance_labels_name_the_file(tmp_path, nuclei_pair, values, words):
    vol, _ = nuclei_pair
    lab = np.zeros((3, 64, 64), dtype=values.dtype)
    for k, v in enumerate(values):  # one block per id (> 16 values: ids, not classes)
        lab[:, (k // 6) * 12 : (k // 6) * 12 + 8, (k % 6) * 10 : (k % 6) * 10 + 8] = v
    path = tmp_path / "bad.tif"
    tifffile.imwrite(path, lab, photometric="minisblack")
    with pytest.raises(CellP2PError) as err:
        load_data(_cfg(vol, path))
    assert words in str(err.value) and "bad.tif" in str(err.value)


def test_border_weights_ride_as_a_training_channel(nuclei_pair, tmp_path, capsys):
    cfg = _cfg(*nuclei_pair, max_steps=2, eval_every=2)
    cfg.border_weights = True
    cfg.instance_target = "boundary"
    data = load_data(cfg)
    assert data.weighted and data.train_y.shape[1] == 2 and data.val_y.shape[1] == 1
    assert data.out_channels == 3 and data.train_y[:, 1].max() > 2.0  # w0 near the borders
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        train(cfg, tmp_path / "w")
    finally:
        torch.set_num_threads(before)
    p = load_predictor(tmp_path / "w", device="cpu")
    p.postprocessing = {"method": "watershed", "boundary": True, "threshold": 0.99}
    background = np.zeros((3, 16, 16), np.float32)
    background[0] = 1.0
    assert p.out_channels == 3 and not p.to_output(background, "labels").any()
    assert "no objects found" in capsys.readouterr().err


def test_pix2pix_learns_the_separated_foreground(nuclei_pair, tmp_path):
    cfg = _cfg(*nuclei_pair, mode="pix2pix", max_steps=1, eval_every=1, model_overrides={})
    cfg.crop = 64
    data = load_data(cfg)
    assert data.instances and data.target_kind == "binary" and not data.weighted
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        record = train(cfg, tmp_path / "p2p")
    finally:
        torch.set_num_threads(before)
    assert "val_ap_mean" in record
    assert load_checkpoint(tmp_path / "p2p")["postprocessing"]["boundary"] is False


def test_instance_options_are_train_flags_and_refused_with_pix2pix(nuclei_pair):
    from click.testing import CliRunner

    from cellp2p.cli import main
    from cellp2p.config import TrainConfig

    vol, lab = nuclei_pair
    given = dict(instance_target="boundary", border_weights=True, border_w0=5.0)
    TrainConfig(volume=str(vol), labels=str(lab), **given).validate()
    text = CliRunner().invoke(main, ["train", "--help"]).output
    for f in ("--instance-target", "--border-weights / --no-border-weights", "--border-sigma"):
        assert f in text
    for extra, words in (
        (["--border-weights"], "--border-weights weighs the U-Net's loss"),
        (["--instance-target", "boundary"], "--instance-target boundary makes classes"),
    ):
        res = CliRunner().invoke(
            main,
            [
                "train",
                "--mode",
                "pix2pix",
                "--volume",
                str(vol),
                "--labels",
                str(lab),
                "--out",
                str(vol.parent / "never"),
                *extra,
            ],
        )
        assert res.exit_code != 0 and words in res.output, res.output
        assert not (vol.parent / "never").exists()


def test_the_watershed_is_tuned_once_at_the_end_for_each_checkpoint(
    nuclei_pair, tmp_path, monkeypatch
):
    """Tuning runs when the run ends, on the outputs of each checkpoint it goes into; a best.pt
    from before a --resume is run again for it, and tuned as the uninterrupted run tuned it."""
    import cellp2p.train as T

    tuned: list[np.ndarray] = []
    real = T.tune_run

    def spy(pred, data, pred_tta):
        assert pred_tta.shape == pred.shape  # the test-time augmented outputs are tuned too
        tuned.append(pred)
        return real(pred, data, pred_tta)

    monkeypatch.setattr(T, "tune_run", spy)
    # No norm layers and a vanishing rate: the network does not change, so no evaluation
    # improves on the first and best.pt stays at step 2 while last.pt moves on.
    overrides = {"depth": 2, "base": 8, "norm": "none"}
    cfg = dict(max_steps=6, eval_every=2, lr=1e-12, precision="fp32", model_overrides=overrides)
    train(_cfg(*nuclei_pair, **cfg), tmp_path / "a")
    best = load_checkpoint(tmp_path / "a" / "checkpoints" / "best.pt")
    last = load_checkpoint(tmp_path / "a" / "checkpoints" / "last.pt")
    assert (best["step"], last["step"]) == (2, 6)
    assert len(tuned) == 2  # at step 6: last.pt's outputs, then best.pt's (kept from step 2)
    assert best["postprocessing"]["method"] in ("watershed", "components")
    assert best["postprocessing"] == last["postprocessing"]  # the same network
    tuned.clear()
    train(_cfg(*nuclei_pair, **cfg), tmp_path / "b", stop_after=4)
    assert len(tuned) == 2  # the run ends at step 4 (as an interruption would)
    train(_cfg(*nuclei_pair, **cfg), tmp_path / "b", resume=True)
    resumed = load_checkpoint(tmp_path / "b" / "checkpoints" / "best.pt")
    assert resumed["step"] == 2 and resumed["postprocessing"] == best["postprocessing"]
    assert len(tuned) == 4
