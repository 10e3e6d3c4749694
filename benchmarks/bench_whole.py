"""Whole processes, start to exit: ``cellp2p train`` / ``cellp2p predict`` against plain scripts.

What a user waits for, including Python and torch start-up, imports, data loading, validation
and checkpoints (issue 19), not the steady step rate (``bench_perf.py process``):

    python benchmarks/bench_whole.py [--preset paper] [--rounds 2] [--json FILE]

``train``: ``cellp2p train --mode pix2pix --task translate --preset P --batch-size 1 --crop 256
--max-steps 30 --eval-every 30`` on a synthetic 5 × 256² pair, against a plain script doing the
same work: tifffile in, numpy crops and flips, the textbook step (``bench_perf.Reference``, same
networks and Adam), one validation pass over the held-out slice, then ``torch.save`` of the
generator and of the discriminator (what the pix2pix reference code saves).
``predict``: ``cellp2p predict`` of a 30 × 512² uint8 stack with the trained generator,
``--output prob``, against the plain loop of ``bench_perf.reference_predict`` (torch.load of the
generator file, whole slices, tifffile out), each its own process. cellp2p runs twice: as it
runs by default (``--precision auto``, bf16 on CPUs with AMX) and with ``--precision fp32`` (the
plain scripts' arithmetic). Rounds alternate A B C, C B A; the figures are medians of the wall
times, with the 1-minute load averages seen.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from bench_perf import (  # noqa: E402
    INFER_SIZE,
    INFER_SLICES,
    SIZE,
    Reference,
    load1,
    machine,
    make_pair_stacks,
    median,
    reference_pairs,
    reference_predict,
    run_child,
)
from bench_predict import make_stack  # noqa: E402 - benchmarks/ on the path first

STEPS = 30
# cellp2p as it runs by default (--precision auto: bf16 on CPUs with AMX) and in fp32, the
# plain scripts' arithmetic.
PRECISION: dict[str, list[str]] = {"cellp2p": [], "cellp2p-fp32": ["--precision", "fp32"]}
VARIANTS = (*PRECISION, "reference")


def train_command(variant: str, preset: str, vol: Path, lab: Path, out: Path) -> list[str]:
    """The command line of one training process."""
    py = sys.executable
    if variant == "reference":
        spec = dict(preset=preset, volume=str(vol), target=str(lab), out=str(out))
        return [py, __file__, "--reference-train", json.dumps(spec)]
    args = ["train", "--mode", "pix2pix", "--task", "translate", "--preset", preset]
    args += ["--volume", str(vol), "--labels", str(lab), "--batch-size", "1", "--crop", str(SIZE)]
    args += ["--max-steps", str(STEPS), "--eval-every", str(STEPS), "--device", "cpu"]
    return [py, "-m", "cellp2p", *args, *PRECISION[variant], "--out", str(out), "--quiet"]


def reference_train(spec: dict[str, Any]) -> None:
    """The plain script: STEPS textbook steps, one validation pass, G and D saved."""
    import numpy as np
    import tifffile
    import torch

    vol = tifffile.imread(spec["volume"]).astype(np.float32) / 255
    tgt = tifffile.imread(spec["target"]).astype(np.float32) / 255
    n_train = len(vol) - max(1, len(vol) // 5)
    ref = Reference(spec["preset"])
    for x, y in reference_pairs(vol, tgt, n_train, STEPS):
        ref.step(x, y)
    ref.G.eval()
    with torch.inference_mode():
        x = torch.from_numpy(vol[n_train:])[:, None] * 2 - 1
        l1 = float((ref.G(x) - (torch.from_numpy(tgt[n_train:])[:, None] * 2 - 1)).abs().mean())
    out = Path(spec["out"])
    out.mkdir(parents=True, exist_ok=True)
    for name, net in (("generator", ref.G), ("discriminator", ref.D)):
        entry = {"kind": net.kind, "config": asdict(net.config), "state": net.state_dict()}
        torch.save({"models": {name: entry}}, out / f"net_{name}.pt")
    print(json.dumps({"val_l1": l1}))


def predict_command(variant: str, stack: Path, model: Path, out: Path) -> list[str]:
    """The command line of one prediction process."""
    py = sys.executable
    if variant == "reference":
        spec = dict(stack=str(stack), model=str(model), out=str(out))
        return [py, __file__, "--reference-predict", json.dumps(spec)]
    args = ["predict", str(stack), "--model", str(model), "-o", str(out), "--output", "prob"]
    return [py, "-m", "cellp2p", *args, "--device", "cpu", *PRECISION[variant]]


def timed(cmd: list[str]) -> dict[str, Any]:
    """One process: wall seconds, peak RSS, the load averages before and after."""
    load0 = load1()
    res = run_child(cmd)
    if res["rc"]:
        raise RuntimeError(f"{' '.join(cmd[:4])} failed:\n{res['stderr']}")
    return {
        "wall_s": res["wall_s"],
        "peak_rss_mib": res["peak_rss_mib"],
        "load": [load0, load1()],
    }


def alternate(commands: dict[str, Any], rounds: int) -> dict[str, list[dict[str, Any]]]:
    """Each variant's command (a function of the round) once per round, A B then B A."""
    runs: dict[str, list[dict[str, Any]]] = {v: [] for v in commands}
    names = list(commands)
    for r in range(rounds):
        for v in names if r % 2 == 0 else names[::-1]:
            runs[v].append(timed(commands[v](r)))
    return runs


def run_all(preset: str, rounds: int, tmp: Path) -> dict[str, Any]:
    """Train both ways ``rounds`` times, then predict with each one's last generator."""
    vol, lab = make_pair_stacks(tmp)
    train_runs = alternate(
        {
            v: (lambda r, v=v: train_command(v, preset, vol, lab, tmp / f"{v}-{r}"))
            for v in VARIANTS
        },
        rounds,
    )
    stack = make_stack(tmp / "stack.tif", INFER_SLICES, INFER_SIZE)
    models = {
        "cellp2p": tmp / f"cellp2p-{rounds - 1}",
        "cellp2p-fp32": tmp / f"cellp2p-{rounds - 1}",  # the same network, computed in fp32
        "reference": tmp / f"reference-{rounds - 1}" / "net_generator.pt",
    }
    sizes = {
        "cellp2p": {
            p.name: p.stat().st_size for p in (models["cellp2p"] / "checkpoints").glob("*")
        },
        "reference": {p.name: p.stat().st_size for p in models["reference"].parent.glob("*.pt")},
    }
    predict_runs = alternate(
        {
            v: (lambda r, v=v: predict_command(v, stack, models[v], tmp / f"pred-{v}-{r}.tif"))
            for v in VARIANTS
        },
        rounds,
    )
    return {"train": train_runs, "predict": predict_runs, "checkpoint_bytes": sizes}


def table(res: dict[str, Any]) -> str:
    """One row per command and variant: wall times, median, speed against the plain script."""
    lines = [
        "| command | variant | wall s (runs) | median s | speed vs plain script | peak RSS MiB "
        "| load |",
        "|---|---|---|---:|---:|---:|---|",
    ]
    for command in ("train", "predict"):
        runs = res[command]
        ref = median([x["wall_s"] for x in runs["reference"]])
        for v, xs in runs.items():
            walls = [x["wall_s"] for x in xs]
            lo, hi = min(x["load"][0] for x in xs), max(x["load"][1] for x in xs)
            lines.append(
                f"| {command} | {v} | {', '.join(f'{w:.1f}' for w in walls)} | "
                f"{median(walls):.1f} | {ref / median(walls):.2f}× | "
                f"{max(x['peak_rss_mib'] for x in xs):.0f} | {lo:.1f}–{hi:.1f} |"
            )
    return "\n".join(lines)


def main() -> None:
    """Run, print the table, optionally write JSON."""
    if len(sys.argv) == 3 and sys.argv[1] == "--reference-train":
        reference_train(json.loads(sys.argv[2]))
        return
    if len(sys.argv) == 3 and sys.argv[1] == "--reference-predict":
        spec = json.loads(sys.argv[2])
        reference_predict(Path(spec["stack"]), Path(spec["model"]), Path(spec["out"]))
        return
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", choices=("paper", "small"), default="paper")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench_whole_") as tmp:
        res = run_all(args.preset, args.rounds, Path(tmp))
    res.update(preset=args.preset, machine=machine(), seconds=time.perf_counter() - t0)
    print(f"\n## whole processes, {args.preset} ({res['seconds']:.0f} s, {res['machine']})\n")
    print(table(res))
    print(f"\ncheckpoint files (bytes): {json.dumps(res['checkpoint_bytes'])}")
    if args.json:
        args.json.write_text(json.dumps(res, indent=2, default=str) + "\n")


if __name__ == "__main__":
    main()
