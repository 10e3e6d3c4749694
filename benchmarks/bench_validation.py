"""What one training evaluation costs on ISBI 2012 (issue 19): the validation pass with and
without the object scores, and the watershed tuning (once, when the run ends).

    python benchmarks/bench_validation.py [--preset small] [--threads 1] [--reps 3] [--json F]

A fresh network of ``--preset`` (U-Net) on ISBI 2012 slices 25-29 (5 x 512², train 0-24), as
``cellp2p train`` validates: ``validate_run(full=False)`` (pixel error and Dice only: every
evaluation that does not improve), ``validate_run(full=True)`` (plus the ISBI V sweep, the
watershed AP and the dense Rand error: improving and final evaluations) and ``tune_run``
(the watershed tuning stored in the checkpoints, done when the run ends: once for last.pt and,
if an earlier evaluation was the best, once for best.pt). Medians of ``--reps``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

ISBI = Path(__file__).resolve().parents[2] / "shared" / "data" / "isbi2012"


def main() -> None:
    """Time each part ``--reps`` times and print one table."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="small")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    if not ISBI.is_dir():
        print(f"skipped: ISBI 2012 data not found in {ISBI}")
        return
    import torch

    from cellp2p.config import TrainConfig
    from cellp2p.dataset import load_data
    from cellp2p.instances import tune_run
    from cellp2p.modes import make_mode
    from cellp2p.train import validate_run

    torch.set_num_threads(args.threads)
    cfg = TrainConfig(
        preset=args.preset, manifest="isbi2012", train_slices="0-24", val_slices="25-29"
    )
    cfg.device = "cpu"
    data = load_data(cfg)
    cpu = torch.device("cpu")
    mode = make_mode(cfg, data, cpu, "fp32")
    times: dict[str, list[float]] = {"cheap": [], "full": [], "tune": []}
    for _ in range(args.reps):
        t0 = time.perf_counter()
        validate_run(mode, data, cpu, full=False)
        t1 = time.perf_counter()
        _, pred = validate_run(mode, data, cpu, full=True)
        t2 = time.perf_counter()
        tune_run(pred, data)
        t3 = time.perf_counter()
        for key, dt in zip(times, (t1 - t0, t2 - t1, t3 - t2), strict=True):
            times[key].append(dt)
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"\n## one evaluation, U-Net {args.preset}, ISBI 5 x 512², {args.threads} thread(s)\n")
    print("| evaluation | seconds (median) |\n|---|---:|")
    print(f"| not improving: pixel error, Dice | {med['cheap']:.2f} |")
    print(f"| improving or final: + V sweep, AP, dense Rand error | {med['full']:.2f} |")
    print(f"| + watershed tuning (when the run ends, per checkpoint) | {med['tune']:.2f} |")
    if args.json:
        args.json.write_text(json.dumps({"seconds": times, "median": med}, indent=2) + "\n")


if __name__ == "__main__":
    main()
