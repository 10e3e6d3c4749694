"""The checkpoint payload: what build_payload writes, restore puts back (every RNG state too);
best.pt, the inference checkpoint write_checkpoints makes of it."""

from __future__ import annotations

import dataclasses
import random
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from cellp2p.checkpoint import (
    RESUME_ONLY,
    build_payload,
    load_checkpoint,
    restore,
    rng_state,
    save_checkpoint,
    set_rng_state,
    write_checkpoints,
)
from cellp2p.cli import main
from cellp2p.config import TrainConfig
from cellp2p.dataset import load_data
from cellp2p.errors import CellP2PError
from cellp2p.io import write_stack
from cellp2p.modes import make_mode
from cellp2p.predictor import load_predictor
from cellp2p.synth import make_em
from cellp2p.train import TrainState, make_loader, train, train_step


def _draws() -> tuple[float, float, float]:
    return np.random.rand(), random.random(), float(torch.rand(1))


def _state(cfg: TrainConfig, out: Path) -> TrainState:
    """A fresh state as train builds it (CPU, fp32)."""
    data = load_data(cfg)
    mode = make_mode(cfg, data, torch.device("cpu"), "fp32")
    return TrainState(cfg, out, mode, data, total=cfg.max_steps)


@pytest.fixture
def cfg(tmp_path: Path) -> TrainConfig:
    volume, labels = make_em(4, (64, 64), seed=2)
    return TrainConfig(
        mode="pix2pix",
        volume=str(write_stack(tmp_path / "volume.tif", volume)),
        labels=str(write_stack(tmp_path / "labels.tif", labels)),
        crop=32,
        batch_size=1,
        max_steps=8,
        lr_decay_start=0.25,  # the rate changes every step: a schedule left behind shows
        device="cpu",
        quiet=True,
        model_overrides={"depth": 2, "base": 4},
    )


def test_rng_states_survive_a_checkpoint_file(tmp_path):
    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    np.random.randn()  # a cached Gaussian is part of numpy's state
    path = save_checkpoint(tmp_path / "rng.pt", {"rng": rng_state()})
    expected = _draws()
    random.seed(7)
    np.random.seed(8)
    torch.manual_seed(9)
    set_rng_state(load_checkpoint(path)["rng"])  # as weights_only=True reads it back
    assert _draws() == expected


def test_restore_puts_back_what_build_payload_saved(cfg, tmp_path):
    a = _state(cfg, tmp_path / "a")
    for x, y in make_loader(a, 3):
        train_step(a, x, y)
    a.best = {"metric": "pixel_error", "value": 0.25, "step": 3}
    path = save_checkpoint(tmp_path / "a.pt", build_payload(a, {"step": 3}))
    expected = _draws()

    torch.manual_seed(123)  # another network, other generator states
    b = _state(cfg, tmp_path / "b")
    restore(b, load_checkpoint(path))
    assert _draws() == expected  # restore leaves the generators as they were at the save
    assert b.step == 3 and b.best == a.best
    for name, net in a.mode.nets.items():
        for k, v in net.state_dict().items():
            assert torch.equal(v, b.mode.nets[name].state_dict()[k]), (name, k)
    for name, sched in a.scheds.items():
        assert sched.state_dict() == b.scheds[name].state_dict()
        assert b.mode.optims[name].param_groups[0]["lr"] == sched.get_last_lr()[0]
    # ... so both continue alike: same batches, same steps, same weights.
    for state in (a, b):
        for x, y in make_loader(state, 5):
            train_step(state, x, y)
    g_a, g_b = (s.mode.nets["generator"].state_dict() for s in (a, b))
    assert all(torch.equal(g_a[k], g_b[k]) for k in g_a)
    assert a.scheds["generator"].get_last_lr() == b.scheds["generator"].get_last_lr()


def test_the_payload_is_what_predict_reads(cfg, tmp_path):
    state = _state(cfg, tmp_path / "run")
    payload = build_payload(state, {"step": 0, "val_pixel_error": 0.5})
    assert {"mode", "task", "train_config", "models", "normalization", "data", "record"} <= set(
        payload
    )
    assert set(payload["rng"]) == {"python", "numpy", "torch"}
    path = save_checkpoint(tmp_path / "p.pt", payload)
    predictor = load_predictor(path, device="cpu")
    assert predictor.mode == "pix2pix" and predictor.record == {"step": 0, "val_pixel_error": 0.5}
    assert predictor.train_config["crop"] == 32


# -- best.pt: the inference checkpoint -----------------------------------------------------------


def _generator(ckpt: dict) -> dict[str, torch.Tensor]:
    return ckpt["models"]["generator"]["state"]


def test_best_pt_is_an_inference_checkpoint(cfg, tmp_path):
    state = _state(cfg, tmp_path / "run")
    for x, y in make_loader(state, 1):  # one step: the Adam moments exist
        train_step(state, x, y)
    state.best = {"metric": "pixel_error", "value": 0.5, "step": 1}
    write_checkpoints(state, {"step": 1, "val_pixel_error": 0.5}, improved=True)
    folder = tmp_path / "run" / "checkpoints"
    last, best = (load_checkpoint(folder / name) for name in ("last.pt", "best.pt"))
    assert set(RESUME_ONLY) <= set(last) and not set(RESUME_ONLY) & set(best)
    assert set(last["models"]) == {"generator", "discriminator"}
    assert set(best["models"]) == {"generator"}  # no discriminator: predict never runs it
    g_last, g_best = _generator(last), _generator(best)
    assert g_last.keys() == g_best.keys() and all(torch.equal(g_last[k], g_best[k]) for k in g_last)
    shared = {k: v for k, v in last.items() if k not in (*RESUME_ONLY, "models", "path")}
    assert shared == {k: v for k, v in best.items() if k not in ("models", "path")}
    assert (folder / "best.pt").stat().st_size < (folder / "last.pt").stat().st_size
    predictor = load_predictor(tmp_path / "run", device="cpu")  # a run folder means its best.pt
    assert predictor.checkpoint_path == folder / "best.pt" and predictor.record["step"] == 1


@pytest.fixture
def run(cfg, tmp_path) -> Path:
    """A finished two-step pix2pix run (its best.pt an inference checkpoint)."""
    train(dataclasses.replace(cfg, max_steps=2, eval_every=2), tmp_path / "run")
    return tmp_path / "run"


def test_resume_refuses_an_inference_checkpoint(run, check_cli_error):
    folder = run / "checkpoints"
    shutil.copyfile(folder / "best.pt", folder / "last.pt")  # say, to go back to the best step
    result = CliRunner().invoke(main, ["train", "--out", str(run), "--resume", "--quiet"])
    line = check_cli_error(result, folder / "last.pt")
    assert "inference checkpoint (no optimizer state" in line and "resume from" in line


def test_restore_refuses_an_inference_checkpoint(cfg, run, tmp_path):
    with pytest.raises(CellP2PError, match=r"best\.pt: an inference checkpoint"):
        restore(_state(cfg, tmp_path / "b"), load_checkpoint(run / "checkpoints" / "best.pt"))


def test_an_old_full_best_pt_still_loads(run, tmp_path):
    folder = run / "checkpoints"
    shutil.copyfile(folder / "last.pt", folder / "best.pt")  # what runs wrote before issue 19
    predictor = load_predictor(run, device="cpu")
    assert predictor.checkpoint_path == folder / "best.pt" and predictor.mode == "pix2pix"
    weights = _generator(load_checkpoint(folder / "last.pt"))
    assert all(torch.equal(v, predictor.net.state_dict()[k]) for k, v in weights.items())
    result = CliRunner().invoke(
        main, ["export", str(run), "--format", "torchscript", "-o", str(tmp_path / "g.pt")]
    )
    assert result.exit_code == 0, result.output


def test_checkpoints_are_written_without_crc32_and_load_exactly(tmp_path):
    import zipfile

    weights = {"w": torch.randn(64, 64)}
    path = save_checkpoint(tmp_path / "w.pt", {"models": weights})
    assert {m.CRC for m in zipfile.ZipFile(path).infolist()} == {0}  # none computed
    assert torch.serialization.get_crc32_options()  # torch's default again after the write
    assert torch.equal(load_checkpoint(path)["models"]["w"], weights["w"])
    truncated = tmp_path / "cut.pt"
    truncated.write_bytes(path.read_bytes()[:-200])
    with pytest.raises(CellP2PError, match=r"cut\.pt"):
        load_checkpoint(truncated)
