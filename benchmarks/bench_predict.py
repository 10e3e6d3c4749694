"""Prediction throughput (megapixels/s) and peak memory of ``cellp2p predict`` on this machine.

Each configuration runs in its own subprocess. Throughput: ``predict_stack`` timed in the
worker after a warm-up slice (untrained networks saved as checkpoints: speed does not depend on
the weights). Peak memory: the worker runs ``python -m cellp2p predict`` as its only child and
reads ``getrusage(RUSAGE_CHILDREN).ru_maxrss``, the peak RSS of exactly that command.

    .venv/bin/python benchmarks/bench_predict.py         # ~2.5 min on 2 idle cores
    .venv/bin/python benchmarks/bench_predict.py --full  # + small-preset memory, ~6 min more
    .venv/bin/python benchmarks/bench_predict.py --only small,mem-tiny-16 --json out.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]

# Slice counts are kept small for the slow configurations so the default run stays near 4 min;
# megapixels/s does not depend on the count (a warm-up slice runs first).
CONFIGS: list[dict[str, Any]] = [
    dict(name="small", preset="small", slices=8, size=512, tta=False),
    dict(name="small+tta", preset="small", slices=2, size=512, tta=True),
    dict(name="paper", preset="paper", slices=2, size=512, tta=False),
    dict(name="paper+tta", preset="paper", slices=1, size=512, tta=True),
    dict(name="gen-small", kind="generator", preset="small", slices=8, size=512, tta=False),
    dict(name="gen-paper", kind="generator", preset="paper", slices=2, size=512, tta=False),
    # Peak RSS against the number of slices. "tiny" is the small preset cut to depth 1, base 2:
    # the same reading, normalising, writing and bookkeeping, at ~1/100 of the compute, so the
    # pipeline's own memory is measured against a small baseline (the stricter test).
    dict(name="mem-tiny-16", preset="tiny", slices=16, size=1024, memory=True),
    dict(name="mem-tiny-128", preset="tiny", slices=128, size=1024, memory=True),
]
FULL_CONFIGS: list[dict[str, Any]] = [
    dict(name="mem-small-16", preset="small", slices=16, size=1024, memory=True),
    dict(name="mem-small-128", preset="small", slices=128, size=1024, memory=True),
]


def make_checkpoint(path: Path, preset: str, kind: str = "unet") -> Path:
    """An untrained U-Net or generator of ``preset`` saved as a prediction-ready checkpoint."""
    from cellp2p.checkpoint import model_entry, save_checkpoint
    from cellp2p.models import build_model
    from cellp2p.normalization import Normalization

    if preset == "tiny":
        net = build_model(kind, "small", 1, 1, depth=1, base=2)
    else:
        net = build_model(kind, preset, 1, 1)
    norm = Normalization("minmax", vmin=0.0, vmax=255.0, dtype="uint8")
    payload = {
        "mode": "unet" if kind == "unet" else "pix2pix",
        "task": "segment",
        "train_config": {"preset": preset, "crop": 256},
        "models": {kind: model_entry(net)},
        "normalization": {"input": norm.to_dict(), "target": None},
        "data": {
            "in_channels": 1,
            "out_channels": 1,
            "target_kind": "binary",
            "classes": [0, 255],
            "spacing": None,
        },
        "record": {},
    }
    return save_checkpoint(path, payload)


def make_stack(path: Path, slices: int, size: int) -> Path:
    """A uint8 stack of smooth noise, written slice by slice."""
    import numpy as np

    from cellp2p.io import StackWriter

    rng = np.random.default_rng(0)
    with StackWriter(
        path, shape=(slices, size, size), dtype=np.uint8, spacing=(0.05, 0.004, 0.004)
    ) as w:
        for _ in range(slices):
            w.write(rng.integers(0, 256, (size, size), dtype=np.uint8))
    return path


def worker(cfg: dict[str, Any], tmp: Path) -> dict[str, Any]:
    """Run one configuration (in a fresh process) and return its figures."""
    ckpt = make_checkpoint(tmp / "model.pt", cfg["preset"], cfg.get("kind", "unet"))
    stack = make_stack(tmp / "in.tif", cfg["slices"], cfg["size"])
    out = tmp / "out.tif"
    mpix = cfg["slices"] * cfg["size"] ** 2 / 1e6
    if cfg.get("memory"):
        cmd = [sys.executable, "-m", "cellp2p", "predict", str(stack), "--model", str(ckpt)]
        cmd += ["-o", str(out), "--quiet", "--device", "cpu"]
        t0 = time.perf_counter()
        subprocess.run(cmd, check=True, cwd=ROOT)
        seconds = time.perf_counter() - t0
        peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024  # KiB -> MiB
        return {**cfg, "seconds": seconds, "peak_rss_mib": peak, "mpix": mpix}
    import numpy as np

    from cellp2p.predict import predict_stack
    from cellp2p.predictor import load_predictor

    pred = load_predictor(ckpt, "cpu", tta=cfg["tta"])
    pred.predict_slice(np.zeros((64, 64), np.uint8))  # warm-up: allocator, kernels
    t0 = time.perf_counter()
    predict_stack([stack], ckpt, out=out, tta=cfg["tta"], device="cpu", quiet=True)
    seconds = time.perf_counter() - t0
    return {**cfg, "seconds": seconds, "mpix_per_s": mpix / seconds, "mpix": mpix}


def machine() -> str:
    """CPU model name and core count."""
    name = platform.processor() or "unknown CPU"
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        name = next(ln.split(":", 1)[1].strip() for ln in out.splitlines() if "Model name" in ln)
    except (OSError, subprocess.CalledProcessError, StopIteration):
        pass
    return f"{name}, {os.cpu_count()} cores"


def table(rows: list[dict[str, Any]]) -> str:
    """Markdown table of the results."""
    lines = [
        "| config | network | slices × size | TTA | seconds | MP/s | peak RSS (MiB) |",
        "|---|---|---|---|---:|---:|---:|",
    ]
    for r in rows:
        mps = f"{r['mpix_per_s']:.3f}" if "mpix_per_s" in r else ""
        rss = f"{r['peak_rss_mib']:.0f}" if "peak_rss_mib" in r else ""
        lines.append(
            f"| {r['name']} | {r.get('kind', 'unet')} {r['preset']} | "
            f"{r['slices']} × {r['size']}² | "
            f"{'yes' if r.get('tta') else 'no'} | {r['seconds']:.1f} | {mps} | {rss} |"
        )
    return "\n".join(lines)


def main() -> None:
    """Run every configuration in its own subprocess and print the table."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", type=Path, help="Also write the results to this JSON file.")
    ap.add_argument("--full", action="store_true", help="Add the small-preset memory runs.")
    ap.add_argument("--only", help="Comma-separated configuration names.")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        with tempfile.TemporaryDirectory(prefix="bench_predict_") as tmp:
            print(json.dumps(worker(json.loads(args.worker), Path(tmp))))
        return
    configs = CONFIGS + (FULL_CONFIGS if args.full else [])
    if args.only:
        names = set(args.only.split(","))
        configs = [c for c in CONFIGS + FULL_CONFIGS if c["name"] in names]
    rows = []
    for cfg in configs:
        proc = subprocess.run(
            [sys.executable, __file__, "--worker", json.dumps(cfg)],
            capture_output=True,
            text=True,
            cwd=ROOT,
        )
        if proc.returncode:
            sys.exit(f"{cfg['name']} failed:\n{proc.stderr}")
        rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
        print(f"done {cfg['name']}: {rows[-1]['seconds']:.1f} s", file=sys.stderr, flush=True)
    result = {"machine": machine(), "torch_threads": _threads(), "rows": rows}
    print(f"machine: {result['machine']}, torch threads {result['torch_threads']}\n")
    print(table(rows))
    for preset in sorted({r["preset"] for r in rows if r.get("memory")}):
        sizes = {
            r["slices"]: r["peak_rss_mib"]
            for r in rows
            if r.get("memory") and r["preset"] == preset
        }
        if 16 in sizes and 128 in sizes:
            growth = sizes[128] / sizes[16] - 1
            result[f"rss_growth_{preset}"] = growth
            print(f"\npeak RSS 128 vs 16 slices ({preset}): {growth:+.1%} (limit +10%)")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")


def _threads() -> int:
    import torch

    return torch.get_num_threads()


if __name__ == "__main__":
    main()
