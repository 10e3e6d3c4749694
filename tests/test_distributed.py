"""Multi-process training and prediction: 2 gloo processes on the CPU, launched by torchrun.

One torchrun launch runs this file as its worker (see ``_worker``, at the bottom): a U-Net run,
the same run stopped and resumed, a pix2pix run through the CLI, a --sync-bn attempt and a
sharded prediction, all in 2 processes. The tests then check what it left behind against
single-process runs made here.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path
from subprocess import PIPE
from typing import NamedTuple

import numpy as np
import pytest
import torch

from cellp2p import distributed
from cellp2p.checkpoint import load_checkpoint
from cellp2p.config import TrainConfig
from cellp2p.dataset import StepBatches, load_data
from cellp2p.io import read_stack, write_stack
from cellp2p.synth import make_em
from cellp2p.train import train

WORLD = 2
STACKS = ("a", "b", "c")


class Result(NamedTuple):
    out: str
    err: str


def _unet_config(vol: Path, lab: Path, batch_size: int) -> TrainConfig:
    # No BatchNorm, so W ranks × b crops take exactly the gradient step of 1 rank × W·b crops.
    return TrainConfig(
        mode="unet",
        volume=str(vol),
        labels=str(lab),
        crop=32,
        batch_size=batch_size,
        max_steps=4,
        eval_every=2,
        seed=3,
        device="cpu",
        precision="fp32",  # bf16 rounds a batch of 2 × b otherwise than two of b
        quiet=True,
        model_overrides={"norm": "none"},
    )


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    d = tmp_path_factory.mktemp("pair")
    vol, lab = make_em(5, (48, 56), seed=1)
    return write_stack(d / "volume.tif", vol), write_stack(d / "labels.tif", lab)


@pytest.fixture(scope="module")
def ddp(pair, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Result]:
    """The work folder of one 2-process torchrun launch of ``_worker``, and its output.

    While it runs, this process trains the single-process reference (1 rank × 2 crops) into
    ``work/single``.
    """
    work = tmp_path_factory.mktemp("ddp")
    vol, lab = pair
    for i, name in enumerate(STACKS):
        write_stack(work / "stacks" / f"{name}.tif", make_em(2, (40, 40), seed=10 + i)[0])
    _nan_store(work / "nan.zarr")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    cmd += ["--nproc_per_node", str(WORLD), __file__, str(work), str(vol), str(lab)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    with subprocess.Popen(cmd, stdout=PIPE, stderr=PIPE, text=True, env=env) as proc:
        try:
            train(_unet_config(vol, lab, batch_size=WORLD), work / "single")
            out, err = proc.communicate(timeout=300)
        finally:
            proc.kill()
    assert proc.returncode == 0, out[-3000:] + err[-6000:]
    return work, Result(out, err)


def _weights(run: Path) -> dict[str, torch.Tensor]:
    ckpt = load_checkpoint(run / "checkpoints" / "last.pt")
    return {f"{n}.{k}": v for n, e in ckpt["models"].items() for k, v in e["state"].items()}


def _max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k].double() - b[k].double()).abs().max()) for k in a)


def _steps(run: Path) -> list[int]:
    return [json.loads(x)["step"] for x in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("name", ["unet", "pix2pix"])
def test_both_modes_write_one_run_folder(ddp, name):
    work, _ = ddp
    run = work / name
    assert _steps(run) == [2, 4]  # one record per evaluation, not one per process
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["best.pt", "last.pt"]
    assert sorted(p.name for p in (run / "samples").iterdir()) == [
        "step_0000002.png",
        "step_0000004.png",
    ]
    assert not [p for p in run.rglob("*") if p.name.endswith(".part")]
    cfg = json.loads((run / "config.json").read_text())
    assert cfg["world_size"] == WORLD and cfg["global_batch_size"] == WORLD * cfg["batch_size"]
    ckpt = load_checkpoint(run / "checkpoints" / "last.pt")
    assert ckpt["world_size"] == WORLD and ckpt["step"] == 4
    for entry in ckpt["models"].values():  # the unwrapped networks, not DDP's "module.*"
        assert not any(k.startswith("module.") for k in entry["state"])


def test_every_process_returns_rank_0s_final_record(ddp):
    work, _ = ddp
    got = [json.loads((work / f"record_{r}.json").read_text()) for r in range(WORLD)]
    assert got[0] == got[1] and got[0]["step"] == 4
    assert got[0] == json.loads((work / "unet/metrics.jsonl").read_text().splitlines()[-1])


def test_only_rank_0_logs(ddp):
    _, proc = ddp
    log = proc.out + proc.err
    # --quiet log lines: unet, split (resumed) and pix2pix each reach step 4 once.
    assert sum(line.startswith("step 4 |") for line in log.splitlines()) == 3, log[-3000:]


def test_two_ranks_equal_one_rank_with_twice_the_batch(ddp):
    work, _ = ddp
    diff = _max_diff(_weights(work / "unet"), _weights(work / "single"))
    assert diff <= 1e-5, diff
    one = [json.loads(x) for x in (work / "single/metrics.jsonl").read_text().splitlines()]
    two = [json.loads(x) for x in (work / "unet/metrics.jsonl").read_text().splitlines()]
    for a, b in zip(one, two, strict=True):  # losses are averaged over the processes
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-4)
        assert a["epoch"] == pytest.approx(b["epoch"])


def test_resume_under_ddp_equals_uninterrupted(ddp):
    work, _ = ddp
    assert _steps(work / "split") == [2, 4]
    assert _max_diff(_weights(work / "unet"), _weights(work / "split")) <= 1e-6


def test_sync_bn_on_the_cpu_is_refused_in_every_process(ddp):
    work, _ = ddp
    for r in range(WORLD):
        message = (work / f"sync_bn_{r}.txt").read_text()
        assert "--sync-bn" in message and "CUDA" in message
    assert not (work / "sync_bn" / "checkpoints").exists()


def test_predict_shards_stacks_across_ranks(ddp):
    work, _ = ddp
    got = [json.loads((work / f"predict_{r}.json").read_text()) for r in range(WORLD)]
    names = [[Path(p).name for p in paths] for paths in got]
    assert names == [["a_pred.tif", "c_pred.tif"], ["b_pred.tif"]]  # rank r: r, r+W, ...
    for name in STACKS:
        assert read_stack(work / "pred" / f"{name}_pred.tif").data.shape == (2, 40, 40)


def _nan_store(path: Path) -> None:
    """A float32 volume of 6 slices whose slice 4 (in rank 1's share) holds a NaN."""
    from cellp2p.stores import StoreWriter

    data = make_em(6, (40, 40), seed=4)[0].astype(np.float32)
    data[4, 3, 5] = np.nan
    with StoreWriter(path, shape=data.shape, dtype=data.dtype) as w:
        for z, plane in enumerate(data):
            w.write_slice(z, plane)


def test_a_nan_in_one_share_stops_every_process_before_writing(ddp):
    work, _ = ddp
    lines = [(work / f"nan_{r}.txt").read_text() for r in range(WORLD)]
    assert lines[0] == lines[1]  # every process stops with the same one line
    assert "nan.zarr" in lines[0] and "NaN/inf" in lines[0] and "slice 4" in lines[0]
    scanned = [json.loads((work / f"scanned_{r}.json").read_text()) for r in range(WORLD)]
    assert scanned == [[0, 1, 2], [3, 4]]  # each its own share (rank 1 stops at the NaN)
    assert not (work / "nan_pred.zarr").exists()


def test_ddp_checkpoint_predicts_in_a_single_process(ddp, tmp_path):
    from cellp2p.predict import predict_stack

    work, _ = ddp
    (out,) = predict_stack([work / "stacks" / "a.tif"], work / "pix2pix", out=tmp_path, quiet=True)
    assert read_stack(out).data.shape == (2, 40, 40)


def test_step_batches_are_slices_of_the_global_batch(pair):
    cfg = TrainConfig(volume=str(pair[0]), labels=str(pair[1]), crop=32, batch_size=2, seed=5)
    data = load_data(cfg)
    whole = StepBatches(data, TrainConfig(**{**asdict(cfg), "batch_size": 4}))[7]
    parts = [StepBatches(data, cfg, r, 2)[7] for r in range(2)]
    for i in range(2):  # x, y
        assert torch.equal(torch.cat([p[i] for p in parts]), whole[i])
    # One process draws the slices and seeds it drew before sharding existed, then the corners.
    one = StepBatches(data, cfg)
    rng = np.random.default_rng([cfg.seed, 7])
    ids = rng.integers(0, len(data.train_x), size=cfg.batch_size)
    seeds = [int(rng.integers(2**31)) for _ in ids]
    assert [(i, s) for i, s, _, _ in one.draw(7)] == list(zip(ids, seeds, strict=True))
    for k, (i, seed, y0, x0) in enumerate(one.draw(7)):
        one.augment.set_random_state(seed=seed)
        win = (i, slice(None), slice(y0, y0 + 32), slice(x0, x0 + 32))
        item = one.augment({"image": data.train_x[win], "target": data.train_y[win]})
        assert np.array_equal(np.asarray(item["image"]), one[7][0][k].numpy())


def test_a_single_process_never_touches_torch_distributed(ddp, monkeypatch):
    work, _ = ddp  # the fixture trained work/single in this process, without torchrun
    assert not torch.distributed.is_initialized()
    assert json.loads((work / "single" / "config.json").read_text())["world_size"] == 1
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    world = distributed.setup("cpu")
    assert (world.size, world.rank, world.control) == (1, 0, None)
    assert world.shard([1, 2, 3]) == [1, 2, 3] and world.any(True) and world.broadcast(5) == 5
    assert distributed.step_seed(3, 17) == 3 * 1_000_003 + 17  # the single-process seed
    assert distributed.step_seed(3, 17, 1) != distributed.step_seed(3, 18, 0)


# -- the worker: run by torchrun in each of the 2 processes ------------------------------------


def _worker(work: Path, vol: Path, lab: Path) -> None:
    from cellp2p.cli import main
    from cellp2p.errors import CellP2PError
    from cellp2p.predict import predict_stack

    r = distributed.env_rank()
    cfg = _unet_config(vol, lab, batch_size=1)

    record = train(cfg, work / "unet")
    (work / f"record_{r}.json").write_text(json.dumps(record))
    train(cfg, work / "split", stop_after=2)
    train(cfg, work / "split", resume=True)
    try:
        train(TrainConfig(**{**asdict(cfg), "sync_bn": True}), work / "sync_bn")
    except CellP2PError as err:
        (work / f"sync_bn_{r}.txt").write_text(str(err))
    args = ["train", "--mode", "pix2pix", "--volume", str(vol), "--labels", str(lab)]
    args += ["--out", str(work / "pix2pix"), "--crop", "32", "--batch-size", "1"]
    args += ["--max-steps", "4", "--eval-every", "2", "--device", "cpu", "--quiet"]
    main(args, standalone_mode=False)
    stacks = [work / "stacks" / f"{name}.tif" for name in STACKS]
    paths = predict_stack(stacks, work / "unet", out=work / "pred", device="cpu", quiet=True)
    (work / f"predict_{r}.json").write_text(json.dumps([str(p) for p in paths]))
    _predict_nan(work, r)


def _predict_nan(work: Path, r: int) -> None:
    """One float volume with a NaN, split over the processes: each scans its share."""
    from cellp2p import predict
    from cellp2p.errors import CellP2PError

    scanned: list[int] = []
    check = predict.check_finite_slice

    def recording(image: np.ndarray, source: str, index: int) -> None:
        scanned.append(index)
        check(image, source, index)

    predict.check_finite_slice = recording
    try:
        predict.predict_stack([work / "nan.zarr"], work / "unet", device="cpu", quiet=True)
    except CellP2PError as err:
        (work / f"nan_{r}.txt").write_text(str(err))
    finally:
        predict.check_finite_slice = check
    (work / f"scanned_{r}.json").write_text(json.dumps(scanned))


if __name__ == "__main__":
    _worker(*map(Path, sys.argv[1:4]))
