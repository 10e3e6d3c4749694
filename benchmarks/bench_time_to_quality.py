"""Time to quality (issue 19): seconds from process start until the ISBI 2012 validation pixel
error first reaches a threshold, cellp2p against plain scripts, every contestant its own process.

    python benchmarks/bench_time_to_quality.py --threads 1 --json ttq.json   # both cases
    python benchmarks/bench_time_to_quality.py --case unet --every 100        # U-Net only
    python benchmarks/bench_time_to_quality.py --quick                        # smoke, < 1 min

Data: ISBI train-volume / train-labels (``../shared/data/isbi2012/``), train slices 0–24,
validation 25–29. ``unet``: U-Net ``small``, batch 4 × 256² crops (the issue's 1200-step
budget), pixel error ≤ 0.08; against a plain MONAI script (``BasicUNet``, MONAI's default
features unless ``--monai-features``, Adam 1e-3 as cellp2p's U-Net default, BCE-with-logits, a
plain PyTorch loop). ``pix2pix``: ``paper``, batch 1 × 256², pixel error ≤ 0.10; against the
textbook step of ``bench_perf.Reference`` (same ``build_model`` networks, Adam 2e-4, β 0.5).

Every contestant validates on the whole validation slices every ``--every`` K steps (and at its
last step) with one definition: the mean over the slices of ``cellp2p.metrics.pixel_error`` of
``p > 0.5`` against ``label > 0``, which is what cellp2p's validation logs as
``val_pixel_error`` (``scoring._segment_slice``). The clock runs from just before the process is
spawned (imports and data loading count) to the moment the reaching evaluation's error is known:
cellp2p's metrics.jsonl ``time``, stamped right after ``validate_run``; the plain scripts stamp
the same moment. A contestant stops there, at ``--max-steps`` or at the first evaluation past
``--max-seconds``; "not reached" rows say which.

Options: ``--case unet|pix2pix|all``, ``--every K`` (default 100), ``--max-steps`` (default:
the case's, unet 1200, pix2pix 3000; also cellp2p's schedule length), ``--max-seconds`` (per
process, checked at evaluations; default 3600), ``--threads N`` (OMP/MKL threads of every child),
``--rounds R`` (each contestant R times, the order reversed every other round),
``--seed S`` (every contestant's seed, default 0), ``--threshold T`` (the case's otherwise; 0
runs every contestant to ``--max-steps``: equal-work curves), ``--cellp2p-arg=ARG`` (repeatable:
one more ``cellp2p train`` argument, e.g. ``--cellp2p-arg=--lr-decay-start --cellp2p-arg=1.0``),
``--monai-features``, ``--json FILE``, ``--quick`` (6 synthetic EM slices of 128²
(``cellp2p.synth.make_em``), 64² crops, 2 steps, K = 1, threshold 0.3, ``small`` presets).
Without the ISBI stacks the script says so and exits 0 (``--quick`` needs none).

The plain scripts read the stacks with tifffile, scale by 1/255, draw random crops with random
flips and keep a constant learning rate. cellp2p trains as ``cellp2p train`` does: MONAI crops,
flips, 90° turns and intensity jitter, percentile normalisation, and its LR schedule over
``--max-steps`` (linear decay over the second half). Its evaluation also computes V_rand /
V_info over a threshold sweep, watershed AP and the dense Rand error each time, tunes the
watershed (``tune_run``) at improving evaluations, and writes checkpoints and figures: all of it
is part of its time, and reported ("eval s", with the parts in the JSON). The CLI
(``cellp2p.cli.main``) runs unchanged under a patch that only times ``validate_run``,
``tune_run`` and ``evaluate`` (one JSON line per call) and ends the process once an evaluation
has reached the threshold or passed ``--max-seconds``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from bench_perf import ROOT, Reference, load1, run_child  # noqa: E402

ISBI = ROOT.parent / "shared" / "data" / "isbi2012"
CASES: dict[str, dict[str, Any]] = {
    "unet": dict(mode="unet", preset="small", batch=4, crop=256, threshold=0.08, max_steps=1200,
                 plain="MONAI BasicUNet"),
    "pix2pix": dict(mode="pix2pix", preset="paper", batch=1, crop=256, threshold=0.10,
                    max_steps=3000, plain="plain pix2pix"),
}  # fmt: skip
SPLIT = {"train": "0-24", "val": "25-29"}
# --quick: synthetic EM slices, tiny crops, few steps, a threshold an early network can meet,
# the small presets.
QUICK = dict(slices=6, size=128, crop=64, threshold=0.3, max_steps=2, every=1,
             train="0-3", val="4-5")  # fmt: skip
MONAI_FEATURES = (32, 32, 64, 128, 256, 32)  # BasicUNet's default
Spawned = tuple[dict[str, Any], list[dict[str, Any]]]  # a child's run_child result, evaluations

# `cellp2p train` as the CLI runs it; validate_run / tune_run / evaluate timed (one JSON line a
# call in $BENCH_TTQ_LOG); after an evaluation at or below $BENCH_TTQ_STOP, or past the unix
# time $BENCH_TTQ_END, the process ends (its record, checkpoint and figures are written by then).
CLI_PATCH = """
import json, os, sys, time
import cellp2p.train as T
_log = open(os.environ["BENCH_TTQ_LOG"], "a", buffering=1)
_stop, _end = float(os.environ["BENCH_TTQ_STOP"]), float(os.environ["BENCH_TTQ_END"])
def _timed(name, fn):
    def call(*args, **kw):
        t0 = time.perf_counter()
        out = fn(*args, **kw)
        _log.write(json.dumps({"call": name, "s": time.perf_counter() - t0}) + "\\n")
        if name == "evaluate" and (out["val_pixel_error"] <= _stop or time.time() >= _end):
            _log.close()
            os._exit(0)
        return out
    return call
for _name in ("validate_run", "tune_run", "evaluate"):
    setattr(T, _name, _timed(_name, getattr(T, _name)))
from cellp2p.cli import main
sys.argv[0] = "cellp2p"
main()
"""


# -- the plain scripts (run in a child: ``--plain SPEC``) ---------------------------------------


def random_crops(rng: Any, vol: Any, lab: Any, ids: list[int], batch: int, size: int) -> Any:
    """``batch`` random ``size``² crops of slices ``ids``, each flipped at random along each axis,
    as (B, 1, size, size) float tensors (input, target)."""
    import numpy as np
    import torch

    h, w = vol.shape[1:]
    picks = rng.choice(ids, batch)
    rows, cols = rng.integers(0, h - size + 1, batch), rng.integers(0, w - size + 1, batch)
    flips = rng.random((batch, 2)) < 0.5
    pairs = []
    for i, r, c, f in zip(picks, rows, cols, flips, strict=True):
        axes = tuple(ax for ax, on in zip((0, 1), f, strict=True) if on)
        pairs.append([np.flip(s[i, r : r + size, c : c + size], axes) for s in (vol, lab)])
    return tuple(torch.from_numpy(np.stack(p)[:, None].copy()) for p in zip(*pairs, strict=True))


class PlainUNet:
    """MONAI BasicUNet, Adam, BCE-with-logits on [0, 1] inputs: the plain loop's step."""

    def __init__(self, spec: dict[str, Any]):
        import torch
        from monai.networks.nets import BasicUNet

        torch.manual_seed(spec["seed"])
        self.net = BasicUNet(
            spatial_dims=2, in_channels=1, out_channels=1, features=tuple(spec["features"])
        )
        self.nets = [self.net]
        self.opt = torch.optim.Adam(self.net.parameters(), lr=1e-3)

    def step(self, x: Any, y: Any) -> None:
        import torch.nn.functional as F

        self.opt.zero_grad()
        F.binary_cross_entropy_with_logits(self.net(x), y).backward()
        self.opt.step()

    def predict(self, x: Any) -> Any:
        """Foreground probability of a [0, 1] input."""
        return self.net(x).sigmoid()


class PlainPix2Pix:
    """bench_perf's textbook pix2pix step; G's output (tanh) mapped to [0, 1]."""

    def __init__(self, spec: dict[str, Any]):
        self.ref = Reference(spec["preset"], seed=spec["seed"])
        self.nets = [self.ref.G, self.ref.D]
        self.step = self.ref.step

    def predict(self, x: Any) -> Any:
        """Foreground probability of a [0, 1] input."""
        return (self.ref.G(x * 2 - 1) + 1) / 2


def plain_pixel_error(model: Any, vol: Any, lab: Any, ids: list[int]) -> float:
    """Mean pixel error of ``p > 0.5`` on the whole slices ``ids`` (eval mode, no grad)."""
    import numpy as np
    import torch

    from cellp2p.metrics import pixel_error

    for net in model.nets:
        net.eval()
    with torch.inference_mode():
        errors = [
            pixel_error(
                model.predict(torch.from_numpy(vol[i])[None, None])[0, 0].numpy() > 0.5, lab[i]
            )
            for i in ids
        ]
    for net in model.nets:
        net.train()
    return float(np.mean(errors))


def plain_train(spec: dict[str, Any]) -> None:
    """A plain training script: one JSON line on stdout per evaluation, stopping at the first
    one that reaches the threshold or passes the time limit, or at the last step."""
    import numpy as np
    import tifffile
    import torch

    if spec["threads"]:
        torch.set_num_threads(spec["threads"])
    vol = tifffile.imread(spec["volume"]).astype(np.float32) / 255
    lab = (tifffile.imread(spec["labels"]) > 0).astype(np.float32)
    model = (PlainUNet if spec["case"] == "unet" else PlainPix2Pix)(spec)
    rng = np.random.default_rng(spec["seed"])
    for step in range(1, spec["max_steps"] + 1):
        model.step(*random_crops(rng, vol, lab, spec["train"], spec["batch"], spec["crop"]))
        if step % spec["every"] and step != spec["max_steps"]:
            continue
        t0 = time.perf_counter()
        err = plain_pixel_error(model, vol, lab, spec["val"])
        eval_s = time.perf_counter() - t0
        rec = {"step": step, "val_pixel_error": err, "time": time.time(), "eval_s": eval_s}
        print(json.dumps(rec), flush=True)
        if err <= spec["threshold"] or time.time() >= spec["end"]:
            break


# -- contestants ---------------------------------------------------------------------------------


def slice_ids(spec: str) -> list[int]:
    """``a-b`` → [a, …, b]."""
    lo, hi = (int(v) for v in spec.split("-"))
    return list(range(lo, hi + 1))


def cellp2p_command(case: dict[str, Any], data: dict[str, Any], out: Path) -> list[str]:
    """``cellp2p train`` of the case (under :data:`CLI_PATCH`)."""
    args = ["train", "--mode", case["mode"], "--task", "segment", "--preset", case["preset"]]
    args += ["--volume", data["volume"], "--labels", data["labels"]]
    args += ["--train-slices", data["train"], "--val-slices", data["val"]]
    args += ["--batch-size", str(case["batch"]), "--crop", str(case["crop"])]
    args += ["--max-steps", str(case["max_steps"]), "--eval-every", str(case["every"])]
    args += ["--seed", str(case["seed"]), *case["cellp2p_args"]]
    return [sys.executable, "-c", CLI_PATCH, *args, "--device", "cpu", "--out", str(out), "--quiet"]


def cellp2p_evals(out: Path, log: Path, t0: float) -> list[dict[str, Any]]:
    """metrics.jsonl's evaluations, with the patch's timings of each (grouped per evaluate)."""
    recs = [json.loads(s) for s in (out / "metrics.jsonl").read_text().splitlines()]
    parts: list[dict[str, float]] = [{}]
    for line in log.read_text().splitlines():
        call = json.loads(line)
        parts[-1][call["call"]] = call["s"]
        if call["call"] == "evaluate":
            parts.append({})
    return [
        {
            "step": r["step"],
            "val_pixel_error": r["val_pixel_error"],
            "seconds": r["time"] - t0,
            "validate_s": p["validate_run"],  # what had run when the error was known
            "tune_s": p.get("tune_run", 0.0),  # then: the watershed tuning (if improved) …
            "write_s": p["evaluate"] - p["validate_run"] - p.get("tune_run", 0.0),  # … files
        }
        for r, p in zip(recs, parts, strict=False)
    ]


def plain_evals(stdout: str, t0: float) -> list[dict[str, Any]]:
    """The plain script's evaluation lines, timed from ``t0``."""
    recs = [json.loads(s) for s in stdout.splitlines() if s.startswith("{")]
    return [
        {
            "step": r["step"],
            "val_pixel_error": r["val_pixel_error"],
            "seconds": r["time"] - t0,
            "validate_s": r["eval_s"],
        }
        for r in recs
    ]


def child_env(threads: int | None) -> dict[str, str]:
    """The children's environment: ``threads`` OpenMP/MKL threads if given."""
    env = dict(os.environ)
    if threads:
        env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    return env


def spawn_cellp2p(
    case: dict[str, Any],
    data: dict[str, Any],
    env: dict[str, str],
    tmp: Path,
    t0: float,
    end: float,
) -> Spawned:
    """``cellp2p train`` in a child: its rusage and its evaluations."""
    out, log = tmp / f"run-{case['name']}-{t0:.0f}", tmp / f"ttq-{case['name']}-{t0:.0f}.log"
    env = {**env, "BENCH_TTQ_LOG": str(log), "BENCH_TTQ_STOP": str(case["threshold"])}
    res = run_child(cellp2p_command(case, data, out), env={**env, "BENCH_TTQ_END": str(end)})
    return res, [] if res["rc"] else cellp2p_evals(out, log, t0)


def spawn_plain(
    case: dict[str, Any],
    data: dict[str, Any],
    env: dict[str, str],
    args: Any,
    t0: float,
    end: float,
) -> Spawned:
    """The plain script of the case in a child: its rusage and its evaluations."""
    spec = {**case, **data, "train": slice_ids(data["train"]), "val": slice_ids(data["val"])}
    spec.update(case=case["name"], end=end, threads=args.threads, features=args.features)
    res = run_child([sys.executable, __file__, "--plain", json.dumps(spec)], env=env)
    return res, plain_evals(res["stdout"], t0)


def run_contestant(
    who: str, case: dict[str, Any], data: dict[str, Any], args: argparse.Namespace, tmp: Path
) -> dict[str, Any]:
    """One whole process of ``who`` (``cellp2p`` or ``plain``): its evaluations and outcome,
    timed from just before the spawn."""
    env = child_env(args.threads)
    load0, t0 = load1(), time.time()
    end = t0 + args.max_seconds
    if who == "cellp2p":
        res, evals = spawn_cellp2p(case, data, env, tmp, t0, end)
    else:
        res, evals = spawn_plain(case, data, env, args, t0, end)
    if res["rc"]:
        raise RuntimeError(f"{who} {case['name']} failed:\n{res['stderr']}")
    row = {k: res[k] for k in ("wall_s", "cpu_s", "peak_rss_mib")}
    name = f"cellp2p {case['mode']} {case['preset']}" if who == "cellp2p" else case["plain"]
    row.update(contestant=name, case=case["name"], evals=evals, load=[load0, load1()])
    return {**row, **outcome(evals, case, args)}


EVAL_PARTS = ("validate_s", "tune_s", "write_s")


def outcome(evals: list[dict[str, Any]], case: dict[str, Any], args: Any) -> dict[str, Any]:
    """The first evaluation at or below the threshold: its time and step, and the evaluation
    seconds spent until its error was known (every part of the earlier evaluations, its own
    validation); not reached: the last evaluation, all its evaluations, and why it stopped."""
    thr = case["threshold"]
    hit = next((i for i, e in enumerate(evals) if e["val_pixel_error"] <= thr), None)
    upto = evals if hit is None else evals[: hit + 1]
    full = upto if hit is None else upto[:-1]
    parts = {k: sum(e.get(k, 0.0) for e in full) for k in EVAL_PARTS}
    if hit is not None:
        parts["validate_s"] += upto[-1]["validate_s"]
    last = upto[-1] if upto else {"step": 0, "val_pixel_error": float("nan"), "seconds": 0.0}
    reached = hit is not None
    row = dict(threshold=thr, reached=reached, seconds=last["seconds"] if reached else None,
               steps=last["step"], eval_s=sum(parts.values()), eval_parts=parts,
               final_pixel_error=last["val_pixel_error"])  # fmt: skip
    if not reached and last["step"] >= case["max_steps"]:
        row["stopped"] = f"not reached within {case['max_steps']} steps ({last['seconds']:.0f} s)"
    elif not reached:
        row["stopped"] = f"not reached within {args.max_seconds:.0f} s (step {last['step']})"
    return row


# -- driver --------------------------------------------------------------------------------------


def isbi_data() -> dict[str, Any] | None:
    """The ISBI training stacks and the split, or None when they are not there."""
    vol, lab = ISBI / "train-volume.tif", ISBI / "train-labels.tif"
    if not (vol.is_file() and lab.is_file()):
        return None
    return {"volume": str(vol), "labels": str(lab), **SPLIT, "source": "isbi2012"}


def quick_data(tmp: Path) -> dict[str, Any]:
    """A small synthetic EM pair (``cellp2p.synth.make_em``) written to ``tmp``."""
    import tifffile

    from cellp2p.synth import make_em

    vol, lab = make_em(QUICK["slices"], (QUICK["size"], QUICK["size"]))
    tifffile.imwrite(tmp / "volume.tif", vol)
    tifffile.imwrite(tmp / "labels.tif", lab)
    return {
        "volume": str(tmp / "volume.tif"),
        "labels": str(tmp / "labels.tif"),
        "train": QUICK["train"],
        "val": QUICK["val"],
        "source": "synthetic em",
    }


def cases(args: argparse.Namespace) -> list[dict[str, Any]]:
    """The chosen cases with the command line's (or --quick's) budget and K."""
    names = list(CASES) if args.case == "all" else [args.case]
    out = []
    for name in names:
        case = {**CASES[name], "name": name, "every": args.every, "seed": args.seed}
        case["cellp2p_args"] = args.cellp2p_args
        if args.quick:
            case.update({k: QUICK[k] for k in ("crop", "threshold", "max_steps", "every")})
            case["preset"] = "small"  # pix2pix too: paper's 686 MB checkpoints take seconds
        if args.max_steps:
            case["max_steps"] = args.max_steps
        if args.threshold is not None:
            case["threshold"] = args.threshold
        out.append(case)
    return out


def fmt_row(r: dict[str, Any]) -> str:
    secs = f"**{r['seconds']:.1f}**" if r["reached"] else r["stopped"]
    lo, hi = r["load"]
    return (
        f"| {r['contestant']} | ≤ {r['threshold']:g} | {secs} | {r['steps']} | "
        f"{r['eval_s']:.1f} | {r['final_pixel_error']:.4f} | {r['wall_s']:.1f} | "
        f"{r['cpu_s']:.1f} | {lo:.1f}–{hi:.1f} |"
    )


def table(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| contestant | threshold | seconds to threshold | steps | eval s | final pixel error | "
        "process wall s | CPU s | load |",
        "|---|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    notes = [
        f"\n{r['contestant']}: eval s = validation {p['validate_s']:.1f} + watershed tuning "
        f"{p['tune_s']:.1f} + checkpoints, figures and record {p['write_s']:.1f}"
        for r in rows
        if (p := r["eval_parts"])["tune_s"] or p["write_s"]
    ]
    return "\n".join(lines + [fmt_row(r) for r in rows] + notes)


def median_seconds(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Per contestant: the median seconds of its runs, if every run reached the threshold."""
    out: dict[str, Any] = {}
    for name in dict.fromkeys(r["contestant"] for r in rows):
        runs = [r for r in rows if r["contestant"] == name]
        ok = all(r["reached"] for r in runs)
        out[name] = statistics.median(r["seconds"] for r in runs) if ok else None
    return out


def run_all(args: argparse.Namespace, data: dict[str, Any], tmp: Path) -> list[dict[str, Any]]:
    """Every case: its two contestants once per round, the order reversed every other round."""
    rows = []
    for case in cases(args):
        for r in range(args.rounds):
            for who in ("cellp2p", "plain")[:: 1 if r % 2 == 0 else -1]:
                row = run_contestant(who, case, data, args, tmp)
                row["round"] = r
                print(
                    f"done {row['contestant']} (round {r}): {row['wall_s']:.0f} s",
                    file=sys.stderr,
                    flush=True,
                )
                rows.append(row)
    return rows


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--case", choices=[*CASES, "all"], default="all")
    ap.add_argument("--every", type=int, default=100, help="Evaluate every K steps (all).")
    ap.add_argument("--max-steps", type=int, help="Step budget [unet 1200, pix2pix 3000].")
    ap.add_argument("--max-seconds", type=float, default=3600.0, help="Wall budget a process.")
    ap.add_argument("--threads", type=int, help="torch threads of every child [torch's].")
    ap.add_argument("--rounds", type=int, default=1, help="Runs of each contestant (A B, B A…).")
    ap.add_argument("--seed", type=int, default=0, help="Seed of every contestant [0].")
    ap.add_argument(
        "--threshold", type=float, help="Pixel error to reach [the case's; 0: run every step]."
    )
    ap.add_argument(
        "--cellp2p-arg",
        dest="cellp2p_args",
        action="append",
        default=[],
        help="One more `cellp2p train` argument (repeat: --cellp2p-arg=--lr-decay-start "
        "--cellp2p-arg=1.0).",
    )
    ap.add_argument(
        "--monai-features",
        dest="features",
        default=",".join(map(str, MONAI_FEATURES)),
        help="BasicUNet features, 6 comma-separated ints [MONAI's default].",
    )
    ap.add_argument("--json", type=Path, help="Write the results to this JSON file.")
    ap.add_argument("--quick", action="store_true", help="Synthetic smoke run (< 1 min).")
    args = ap.parse_args()
    args.features = [int(v) for v in args.features.split(",")]
    return args


def main() -> None:
    if len(sys.argv) == 3 and sys.argv[1] == "--plain":
        plain_train(json.loads(sys.argv[2]))
        return
    args = parse_args()
    with tempfile.TemporaryDirectory(prefix="bench_ttq_") as tmp:
        data = quick_data(Path(tmp)) if args.quick else isbi_data()
        if data is None:
            print(f"skipped: no ISBI 2012 data in {ISBI} (--quick runs on synthetic data)")
            return
        t0 = time.perf_counter()
        rows = run_all(args, data, Path(tmp))
    every = ", ".join(sorted({str(c["every"]) for c in cases(args)}))
    print(
        f"\n## time to quality ({data['source']}, every {every} steps, "
        f"{time.perf_counter() - t0:.0f} s)\n"
    )
    print(table(rows))
    if args.json:
        res = {
            "args": {k: str(v) for k, v in vars(args).items()},
            "data": data,
            "rows": rows,
            "median_seconds": median_seconds(rows),
        }
        args.json.write_text(json.dumps(res, indent=2, default=str) + "\n")


if __name__ == "__main__":
    with contextlib.suppress(BrokenPipeError):
        main()
