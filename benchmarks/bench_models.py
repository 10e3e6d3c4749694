"""Parameters, forward GFLOPs and a CPU training-step time for every model kind × preset.

Usage: ``python benchmarks/bench_models.py [--json FILE] [--steps N] [--threads N]``

FLOPs are counted with ``torch.utils.flop_counter.FlopCounterMode`` on the ``meta`` device (shapes
only, no arithmetic), for one image of 1 channel (U-Net 1 → 1, generator 1 → 1, discriminator
2 in). The timed step is forward + BCE-with-logits + backward + Adam of the ``small`` U-Net on a
batch of 4 × 1 × 256 × 256 on the CPU.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import time
from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode

from cellp2p.models import PRESETS, build_model, count_parameters

SIZES = (256, 512)


def cpu_name() -> str:
    """CPU model name from lscpu (falls back to platform.processor())."""
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return platform.processor() or "unknown"
    for line in out.splitlines():
        if line.startswith("Model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def channels(kind: str) -> tuple[int, int]:
    """(in, out) channels used for the benchmark of ``kind``."""
    return (2, 1) if kind == "discriminator" else (1, 1)


def forward_gflops(kind: str, preset: str, size: int) -> tuple[float, tuple[int, ...]]:
    """Forward GFLOPs of one size×size image and the output shape (meta device, no compute)."""
    cin, cout = channels(kind)
    with torch.device("meta"):
        model = build_model(kind, preset, cin, cout).eval()
        x = torch.empty(1, cin, size, size)
        with FlopCounterMode(display=False) as counter, torch.no_grad():
            y = model(x)
    return counter.get_total_flops() / 1e9, tuple(y.shape)


def train_step_seconds(steps: int, **overrides: Any) -> dict[str, float]:
    """Median/min seconds of one small-U-Net Adam step on 4 × 1 × 256², CPU."""
    torch.manual_seed(0)
    model = build_model("unet", "small", **overrides).train()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    loss_fn = torch.nn.BCEWithLogitsLoss()
    x = torch.randn(4, 1, 256, 256)
    y = (torch.rand(4, 1, 256, 256) > 0.5).float()
    times, cpu_times = [], []
    for i in range(steps + 2):
        t0, c0 = time.perf_counter(), time.process_time()
        opt.zero_grad(set_to_none=True)
        loss_fn(model(x), y).backward()
        opt.step()
        if i >= 2:  # two warm-up steps
            times.append(time.perf_counter() - t0)
            cpu_times.append(time.process_time() - c0)
    return {
        "params": count_parameters(model),
        "median_s": statistics.median(times),
        "min_s": min(times),
        "cpu_s_median": statistics.median(cpu_times),
        "steps": steps,
        "loadavg_after": os.getloadavg()[0],
    }


def main() -> None:
    """Run the benchmark, print a Markdown table, optionally write JSON."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    ap.add_argument("--steps", type=int, default=10, help="timed training steps (default 10)")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch default)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    rows = []
    for kind, presets in PRESETS.items():
        for preset in presets:
            cin, cout = channels(kind)
            row: dict[str, Any] = {"kind": kind, "preset": preset, "in": cin, "out": cout}
            with torch.device("meta"):
                row["params"] = count_parameters(build_model(kind, preset, cin, cout))
            for size in SIZES:
                gflops, shape = forward_gflops(kind, preset, size)
                row[f"gflops_{size}"] = gflops
                row[f"out_{size}"] = list(shape[1:])
            rows.append(row)

    machine = {
        "cpu": cpu_name(),
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
    }
    step = train_step_seconds(args.steps)
    step16 = train_step_seconds(args.steps, base=16)

    print(f"CPU: {machine['cpu']}, torch {machine['torch']}, {machine['torch_threads']} threads")
    print()
    print("| kind | preset | in→out | params | GFLOPs 256² | out 256² | GFLOPs 512² | out 512² |")
    print("|---|---|---|---:|---:|---|---:|---|")
    for r in rows:
        o256 = "×".join(map(str, r["out_256"]))
        o512 = "×".join(map(str, r["out_512"]))
        print(
            f"| {r['kind']} | {r['preset']} | {r['in']}→{r['out']} | {r['params']:,} | "
            f"{r['gflops_256']:.2f} | {o256} | {r['gflops_512']:.2f} | {o512} |"
        )
    print()
    for name, s in (("small U-Net (base 8)", step), ("small U-Net, base=16", step16)):
        print(
            f"{name}, {s['params']:,} params: train step 4×1×256² (fwd+bwd+Adam) "
            f"wall median {s['median_s']:.3f} s, min {s['min_s']:.3f} s; process CPU "
            f"{s['cpu_s_median']:.3f} s/step; {s['steps']} steps; "
            f"1-min load average {s['loadavg_after']:.1f}"
        )
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(
                {
                    "machine": machine,
                    "models": rows,
                    "train_step": step,
                    "train_step_base16": step16,
                },
                fh,
                indent=2,
            )


if __name__ == "__main__":
    main()
