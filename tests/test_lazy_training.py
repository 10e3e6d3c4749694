"""Training from stores draws its crops from the store: never the whole volume, the same crops.

Tiny OME-Zarr stores written with cellp2p's own writer, and their TIFF copies: the lazily drawn
crops equal the in-memory ones for every (seed, step), resume equals an uninterrupted run, and
no read is larger than the validation slices, the normalisation sample or one crop.
"""

from __future__ import annotations

import pickle
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from cellp2p import crops
from cellp2p.checkpoint import load_checkpoint
from cellp2p.cli import main
from cellp2p.config import TrainConfig
from cellp2p.crops import StoreCrops, norm_sample
from cellp2p.dataset import StepBatches, load_data
from cellp2p.io import write_stack
from cellp2p.stores import StoreReader, StoreWriter
from cellp2p.synth import make_em, make_nuclei
from cellp2p.train import train

SIZE = (48, 56)


def _store(path: Path, data: np.ndarray, **kw) -> Path:
    with StoreWriter(path, shape=data.shape, dtype=data.dtype, **kw) as w:
        for z, plane in enumerate(data):
            w.write_slice(z, plane)
    return path


def _pairs(root: Path, volume: np.ndarray, labels: np.ndarray) -> dict[str, tuple[str, str]]:
    """The same pair as two stores and as two TIFFs."""
    zarr = (_store(root / "v.zarr", volume), _store(root / "l.zarr", labels, kind="labels"))
    tif = (write_stack(root / "v.tif", volume), write_stack(root / "l.tif", labels))
    return {"zarr": tuple(map(str, zarr)), "tif": tuple(map(str, tif))}


@pytest.fixture(scope="module")
def em(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[str, str]]:
    return _pairs(tmp_path_factory.mktemp("em"), *make_em(6, SIZE, seed=3))


@pytest.fixture(scope="module")
def nuclei(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[str, str]]:
    return _pairs(tmp_path_factory.mktemp("nuclei"), *make_nuclei(4, (64, 64), seed=2))


def _cfg(pair: tuple[str, str], **kw) -> TrainConfig:
    opts = dict(crop=32, batch_size=3, seed=4, device="cpu", quiet=True)
    return TrainConfig(volume=pair[0], labels=pair[1], **{**opts, **kw})


def _batches(cfg: TrainConfig, steps=range(1, 5)) -> list[tuple[torch.Tensor, torch.Tensor]]:
    sb = StepBatches(load_data(cfg), cfg)
    return [sb[s] for s in steps]


@pytest.mark.parametrize("extra", [{}, {"jitter": True, "mode": "pix2pix"}, {"augment": "none"}])
def test_store_crops_equal_in_memory_crops(em, extra):
    lazy, memory = (load_data(_cfg(em[k], **extra)) for k in ("zarr", "tif"))
    assert isinstance(lazy.crops, StoreCrops) and lazy.train_x is None
    assert lazy.input_norm == memory.input_norm  # a small store: fitted on all its slices
    np.testing.assert_array_equal(lazy.val_x, memory.val_x)
    assert (lazy.in_channels, lazy.out_channels) == (memory.in_channels, memory.out_channels)
    assert lazy.dense == memory.dense and lazy.classes == memory.classes
    for a, b in zip(
        _batches(_cfg(em["zarr"], **extra)), _batches(_cfg(em["tif"], **extra)), strict=True
    ):
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


@pytest.mark.parametrize("target", ["separated", "boundary"])
def test_instance_crops_with_border_weights_equal_in_memory(nuclei, target):
    cfg = {"instance_target": target}
    lazy = load_data(_cfg(nuclei["zarr"], **cfg))
    assert lazy.instances and lazy.weighted and lazy.crops.margin > 1
    for a, b in zip(
        _batches(_cfg(nuclei["zarr"], **cfg)), _batches(_cfg(nuclei["tif"], **cfg)), strict=True
    ):
        assert torch.equal(a[0], b[0]) and torch.equal(a[1][:, :-1], b[1][:, :-1])
        # the border term of objects beyond the reach (< 1e-3 each) is all that may differ
        torch.testing.assert_close(a[1][:, -1], b[1][:, -1], atol=2e-3, rtol=0)
        assert float(b[1][:, -1].max()) > 2.0  # the crops do hold borders between nuclei


def test_training_never_reads_a_whole_volume(tmp_path, monkeypatch):
    volume, labels = make_nuclei(12, (64, 64), seed=5)
    zv, zl = _store(tmp_path / "v.zarr", volume), _store(tmp_path / "l.zarr", labels, kind="labels")
    plane = 64 * 64
    monkeypatch.setattr(crops, "NORM_BUDGET", 2 * plane * volume.dtype.itemsize)
    sizes: list[int] = []
    take = StoreReader._take

    def counted(self, z, y, x):
        out = take(self, z, y, x)
        sizes.append(out.size)
        return out

    monkeypatch.setattr(StoreReader, "_take", counted)
    cfg = _cfg((str(zv), str(zl)), val_slices="10-11", train_slices="0-9", crop=16)
    data = load_data(cfg)
    assert max(sizes) <= 2 * plane  # a slice, the 2 validation slices or the 2 sampled
    sizes.clear()
    batch = StepBatches(data, cfg)[1]
    assert batch[0].shape == (3, 1, 16, 16)
    reach = data.crops.margin
    assert len(sizes) == 6 and max(sizes) <= (16 + 2 * reach) ** 2
    sizes.clear()
    train(replace(cfg, max_steps=2, eval_every=2, model_overrides={"depth": 2, "base": 4}),
          tmp_path / "run")  # fmt: skip
    assert max(sizes) <= 2 * plane  # a whole run: the checks, the 2 validation slices, crops


def test_normalisation_sample_is_bounded_and_even():
    assert norm_sample(list(range(10)), 100, budget=10_000) == list(range(10))
    assert norm_sample(list(range(100)), 100, budget=500) == [0, 25, 50, 74, 99]
    assert norm_sample([3, 5], 10**9, budget=10) == [3]


def test_store_crops_pickle_for_dataloader_workers(em):
    cfg = _cfg(em["zarr"])
    sb = StepBatches(load_data(cfg), cfg)
    first = sb[2]
    again = pickle.loads(pickle.dumps(sb))[2]  # readers reopened in the new process
    assert torch.equal(first[0], again[0]) and torch.equal(first[1], again[1])


def test_resume_on_a_store_equals_uninterrupted(em, tmp_path):
    cfg = _cfg(em["zarr"], batch_size=2, max_steps=4, eval_every=2)
    cfg = replace(cfg, model_overrides={"depth": 2, "base": 4})
    train(cfg, tmp_path / "whole")
    train(cfg, tmp_path / "split", stop_after=2)
    train(cfg, tmp_path / "split", resume=True)
    a, b = (
        load_checkpoint(tmp_path / r / "checkpoints" / "last.pt")["models"]
        for r in ("whole", "split")
    )
    for name, entry in a.items():
        for key, value in entry["state"].items():
            assert torch.equal(value, b[name]["state"][key]), f"{name}.{key}"


def test_level_trains_on_a_pyramid_level(tmp_path, check_cli_error):
    volume, labels = make_em(4, (64, 64), seed=1)
    zv = _store(tmp_path / "v.zarr", volume, levels=2)
    zl = _store(tmp_path / "l.zarr", labels, kind="labels", levels=2)
    data = load_data(_cfg((str(zv), str(zl)), level=1, crop=16))
    assert data.crops.size == (32, 32) and data.val_x.shape[-2:] == (32, 32)
    tif = write_stack(tmp_path / "v.tif", volume)
    args = ["train", "--volume", str(tif), "--labels", str(zl), "--level", "1"]
    args += ["--out", str(tmp_path / "run"), "--device", "cpu"]
    check_cli_error(CliRunner().invoke(main, args), tif, "--level 1")
    assert not (tmp_path / "run").exists()
    result = CliRunner().invoke(main, ["info", str(zv), "--level", "1"])
    assert result.exit_code == 0 and "4 x 32 x 32" in result.output, result.output
    check_cli_error(CliRunner().invoke(main, ["info", str(tif), "--level", "1"]), tif)
    # compare scores a run on the level it trained on (its recorded config)
    from cellp2p.compare import read_held_out
    from cellp2p.sources import recorded_sources

    src = recorded_sources({"volume": str(zv), "labels": str(zl), "level": 1})
    vol, lab = read_held_out(src, [3])
    assert src.level == 1 and vol.shape == lab.shape == (1, 32, 32)


def test_nan_in_a_store_refused_in_one_line(tmp_path, check_cli_error):
    volume, labels = make_em(4, (48, 48), seed=2)
    bad = volume.astype(np.float32)
    bad[2, 5, 5] = np.nan
    zv, zl = _store(tmp_path / "v.zarr", bad), _store(tmp_path / "l.zarr", labels, kind="labels")
    args = ["train", "--volume", str(zv), "--labels", str(zl), "--crop", "32"]
    args += ["--out", str(tmp_path / "run"), "--device", "cpu"]
    line = check_cli_error(CliRunner().invoke(main, args), zv)
    assert "1 NaN/inf values (first in slice 2)" in line
    assert not (tmp_path / "run").exists()
