"""GPU readiness: the figures to take on one NVIDIA GPU, printed as one table.

    python benchmarks/bench_gpu.py --json gpu.json        # on the GPU (about 5 minutes)
    python benchmarks/bench_gpu.py --dry-run              # tiny sizes on the CPU, same code path

Rows: the training step of the paper pix2pix (batch 1 and 16) and of the small U-Net (batch
16), fp32 against bf16 autocast; prediction throughput (megapixels/s) of a 64 × 1024² stack
through ``cellp2p predict``; a one-process ``torchrun`` training run (NCCL on CUDA, gloo in a
dry run) and the same with ``--sync-bn`` (CUDA only). Each timing is the median of several
steps after warm-up, synchronised with the device.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]


def _sync(device: Any) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize()


def _median_time(fn: Callable[[], Any], device: Any, warmup: int, steps: int) -> float:
    """Median seconds of ``fn`` after ``warmup`` calls, synchronised with the device."""
    for _ in range(warmup):
        fn()
    _sync(device)
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _mode(mode: str, preset: str, size: int, precision: str, device: Any) -> Any:
    """A cellp2p training mode on ``device`` for synthetic (1-channel) pairs of ``size``."""
    import numpy as np

    from cellp2p.config import TrainConfig
    from cellp2p.dataset import PairedData
    from cellp2p.modes import make_mode
    from cellp2p.normalization import Normalization

    z = np.zeros((1, 1, size, size), np.float32)
    data = PairedData(
        train_x=z,
        train_y=z,
        val_x=z,
        val_y=z,
        val_ids=[0],
        input_norm=Normalization(),
        target_norm=None,
        target_kind="binary",
        classes=[0, 1],
        spacing=None,
        sources={},
    )
    cfg = TrainConfig(mode=mode, preset=preset, crop=size, volume="v", labels="l")
    return make_mode(cfg, data, device, precision)


def train_rows(device: Any, dry: bool) -> list[dict[str, Any]]:
    """fp32 vs bf16 training steps: paper pix2pix at batch 1 and 16, small U-Net at batch 16."""
    import torch

    size = 64 if dry else 256
    cases = [("pix2pix", "paper", 1), ("pix2pix", "paper", 16), ("unet", "small", 16)]
    if dry:
        cases = [("pix2pix", "small", 1), ("pix2pix", "small", 2), ("unet", "small", 2)]
    rows = []
    for mode_name, preset, batch in cases:
        row: dict[str, Any] = {"row": f"train {mode_name} {preset} batch {batch} {size}²"}
        for precision in ("fp32", "bf16"):
            if precision == "bf16" and device.type != "cuda" and not dry:
                continue
            mode = _mode(mode_name, preset, size, precision, device)
            x = torch.rand(batch, 1, size, size, device=device)
            y = (torch.rand(batch, 1, size, size, device=device) > 0.5).float()
            sec = _median_time(
                lambda m=mode, x=x, y=y: m.step(x, y), device, 1 if dry else 3, 2 if dry else 10
            )
            row[f"{precision}_s"] = sec
            row[f"{precision}_img_s"] = batch / sec
        if "bf16_s" in row:
            row["bf16_speedup"] = row["fp32_s"] / row["bf16_s"]
        rows.append(row)
    return rows


def predict_row(device: Any, dry: bool, work: Path) -> dict[str, Any]:
    """``cellp2p predict`` throughput in megapixels/s for a 64 × 1024² stack (tiny when dry)."""
    import numpy as np

    from cellp2p.config import TrainConfig
    from cellp2p.io import write_stack
    from cellp2p.predict import predict_stack
    from cellp2p.synth import make_em
    from cellp2p.train import train

    vol, lab = make_em(4, (64, 64), seed=0)
    write_stack(work / "v.tif", vol)
    write_stack(work / "l.tif", lab)
    cfg = TrainConfig(
        volume=str(work / "v.tif"),
        labels=str(work / "l.tif"),
        max_steps=1,
        batch_size=1,
        crop=64,
        eval_every=1,
        quiet=True,
        device=str(device.type),
    )
    train(cfg, work / "run")
    n, size = (4, 128) if dry else (64, 1024)
    stack = np.random.default_rng(0).integers(0, 255, (n, size, size), dtype=np.uint8)
    write_stack(work / "big.tif", stack)
    t0 = time.perf_counter()
    predict_stack(
        [work / "big.tif"],
        work / "run",
        out=work / "pred.tif",
        quiet=True,
        device=str(device.type),
        batch_size=4,
    )
    sec = time.perf_counter() - t0
    return {
        "row": f"predict {n} x {size}² (small U-Net)",
        "s": sec,
        "mpix_s": n * size * size / 1e6 / sec,
    }


def torchrun_rows(device: Any, dry: bool, work: Path) -> list[dict[str, Any]]:
    """One-process torchrun training (NCCL on CUDA), then with --sync-bn (CUDA only)."""
    rows = []
    variants = [("torchrun 1 process", [])]
    if device.type == "cuda":
        variants.append(("torchrun 1 process --sync-bn", ["--sync-bn"]))
    for name, extra in variants:
        out = work / f"run_{len(rows)}"
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node=1",
            "-m",
            "cellp2p",
            "train",
            "--volume",
            str(work / "v.tif"),
            "--labels",
            str(work / "l.tif"),
            "--out",
            str(out),
            "--max-steps",
            "2" if dry else "50",
            "--eval-every",
            "2" if dry else "50",
            "--crop",
            "64",
            "--batch-size",
            "2",
            "--quiet",
            "--device",
            "cpu" if dry else "cuda",
            *extra,
        ]
        t0 = time.perf_counter()
        proc = subprocess.run(
            cmd,
            capture_output=True,
            text=True,
            cwd=ROOT,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
        )
        row = {"row": name, "s": time.perf_counter() - t0, "rc": proc.returncode}
        if proc.returncode != 0:
            row["error"] = (proc.stderr.strip().splitlines() or ["?"])[-1][:200]
        rows.append(row)
    return rows


def table(rows: list[dict[str, Any]]) -> str:
    """One plain-text table of every row's figures."""
    lines = []
    for r in rows:
        figures = "  ".join(
            f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
            for k, v in r.items()
            if k != "row"
        )
        lines.append(f"{r['row']:<44} {figures}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dry-run", action="store_true", help="tiny sizes on the CPU")
    parser.add_argument("--json", type=Path, help="also write the rows as JSON")
    args = parser.parse_args()
    import torch

    from cellp2p.runtime import select_device

    device = torch.device("cpu") if args.dry_run else select_device("auto")
    if device.type != "cuda" and not args.dry_run:
        sys.exit("bench_gpu: no CUDA GPU visible; use --dry-run to exercise the code on the CPU")
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        rows = train_rows(device, args.dry_run)
        rows.append(predict_row(device, args.dry_run, work))
        rows += torchrun_rows(device, args.dry_run, work)
    name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu (dry run)"
    print(f"device: {name}, torch {torch.__version__}")
    print(table(rows))
    if args.json:
        args.json.write_text(json.dumps({"device": name, "rows": rows}, indent=2) + "\n")
    if any(r.get("rc", 0) != 0 for r in rows):
        sys.exit(1)


if __name__ == "__main__":
    main()
