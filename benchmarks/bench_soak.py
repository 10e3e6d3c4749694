"""Soak test: memory over a long training run and a long prediction must stay flat.

Each part runs in a fresh child process (its own resident set), which samples its RSS
(``VmRSS`` from ``/proc/self/status``) every 50 ms and at each milestone:

* train: the ``small`` U-Net on a synthetic 8 x 64 x 64 EM stack, crop 32, batch 2, for
  ``--steps`` steps (validation, checkpoint, sample panel and loss curve every
  ``--eval-every``); milestones at start (data and network built), after warm-up (the first
  evaluation) and at the end;
* predict: ``cellp2p predict`` (the library call) on a synthetic stack of ``--slices`` 64 x 64
  slices with the trained network; milestones at start (model loaded), after warm-up (the
  first 10% of the slices) and at the end.

Growth after warm-up is what a leak would show: end minus warm-up, and the highest sample
after warm-up minus warm-up. Prints a table; ``--json FILE`` writes the figures.

    python benchmarks/bench_soak.py                      # 3000 steps, 3000 slices
    python benchmarks/bench_soak.py --steps 150 --slices 300 --eval-every 50
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
import threading
import time
from pathlib import Path
from typing import Any

MIB = 1024.0
sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench_predict, beside this file


def _status(key: str) -> float:
    """A /proc/self/status memory field in MiB (VmRSS: now, VmHWM: peak)."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) / MIB
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / MIB  # peak, not current


def rss() -> float:
    return _status("VmRSS")


class Sampler:
    """RSS every ``period`` seconds in a thread, plus named milestones."""

    def __init__(self, period: float = 0.05):
        self.period, self.samples, self.marks = period, [], {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self.t0 = time.perf_counter()

    def _run(self) -> None:
        while not self._stop.is_set():
            self.samples.append((time.perf_counter() - self.t0, rss()))
            self._stop.wait(self.period)

    def __enter__(self) -> Sampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def mark(self, name: str) -> None:
        self.marks[name] = (time.perf_counter() - self.t0, rss())

    def summary(self) -> dict[str, Any]:
        (t_s, start), (t_w, warm), (t_e, end) = (self.marks[k] for k in ("start", "warmup", "end"))
        after = [r for t, r in self.samples if t >= t_w] + [warm, end]
        return {
            "start_mib": round(start, 1),
            "warmup_mib": round(warm, 1),
            "end_mib": round(end, 1),
            "peak_mib": round(max(_status("VmHWM"), *after), 1),
            "max_after_warmup_mib": round(max(after), 1),
            "growth_after_warmup_mib": round(end - warm, 1),
            "max_growth_after_warmup_mib": round(max(after) - warm, 1),
            "seconds": round(t_e - t_s, 1),
            "samples": len(self.samples),
        }


# -- the two children --------------------------------------------------------------------------


def child_train(work: Path, steps: int, eval_every: int, tiny: bool = False) -> dict[str, Any]:
    from cellp2p.io import write_stack
    from cellp2p.synth import make_em
    from cellp2p.train import TrainConfig, train

    vol, lab = make_em(8, (64, 64), seed=0)
    vpath = write_stack(work / "volume.tif", vol, force=True)
    lpath = write_stack(work / "labels.tif", lab, force=True)
    cfg = TrainConfig(
        volume=str(vpath),
        labels=str(lpath),
        preset="small",
        crop=32,
        batch_size=2,
        max_steps=steps,
        eval_every=eval_every,
        quiet=True,
        device="cpu",
        # --tiny: 8 base channels, depth 2 (the quick check in tests/test_reliability.py).
        model_overrides={"base": 8, "depth": 2} if tiny else {},
    )
    from cellp2p import modes as T

    per_eval: list[tuple[int, float]] = []
    # RSS right after an evaluation (step kE+1) and right before the next (step (k+1)E-1):
    # growth inside those intervals is the training steps' own; the rest comes at evaluations.
    at_step: dict[int, float] = {}
    real_step, count = T.UNetMode.step, [0]

    def step(self, x, y):
        logs = real_step(self, x, y)
        count[0] += 1
        if count[0] % eval_every in (1, eval_every - 1) or eval_every <= 2:
            at_step[count[0]] = rss()
        return logs

    T.UNetMode.step = step
    with Sampler() as sampler:
        sampler.mark("start")

        def progress(record: dict) -> None:
            per_eval.append((int(record["step"]), round(rss(), 1)))
            if "warmup" not in sampler.marks:
                sampler.mark("warmup")

        train(cfg, work / "run", progress=progress)
        sampler.mark("end")
    out = sampler.summary()
    in_steps = [
        at_step[k * eval_every - 1] - at_step[(k - 1) * eval_every + 1]
        for k in range(2, steps // eval_every + 1)
        if k * eval_every - 1 in at_step and (k - 1) * eval_every + 1 in at_step
    ]
    out["growth_in_steps_mib"] = round(sum(in_steps), 1)
    out["growth_at_evaluations_mib"] = round(out["growth_after_warmup_mib"] - sum(in_steps), 1)
    out.update(steps=steps, eval_every=eval_every, rss_at_evaluations=per_eval)
    out["network"] = "small U-Net" + (" (base 8, depth 2)" if tiny else "")
    out["steps_per_s"] = round(steps / max(out["seconds"], 1e-9), 1)
    return out


def child_predict(work: Path, slices: int, model: Path | None) -> dict[str, Any]:
    import numpy as np

    from cellp2p import predict as P
    from cellp2p import predictor as PR
    from cellp2p.io import StackWriter

    stack = work / "long.tif"
    rng = np.random.default_rng(0)
    with StackWriter(stack, shape=(slices, 64, 64), dtype=np.uint8, force=True) as writer:
        for _ in range(slices):  # streamed: the input is never in memory as a whole
            writer.write(rng.integers(0, 256, (64, 64), dtype=np.uint8))
    if model is None or not model.is_file():
        from bench_predict import make_checkpoint  # an untrained small U-Net

        model = make_checkpoint(work / "model.pt", "small")
    PR.load_predictor(model, "cpu")  # imports and first load outside the measurement
    done = [0]
    warm_at = max(8, slices // 10)
    real = PR.Predictor.predict_slices
    with Sampler() as sampler:

        def counted(self, images, *args, **kwargs):
            result = real(self, images, *args, **kwargs)
            done[0] += len(images)
            if done[0] >= warm_at and "warmup" not in sampler.marks:
                sampler.mark("warmup")
            return result

        PR.Predictor.predict_slices = counted
        sampler.mark("start")
        P.predict_stack(
            [stack], model, out=work / "long_pred.tif", force=True, quiet=True, device="cpu"
        )
        sampler.mark("end")
    out = sampler.summary()
    out.update(slices=slices, slice_size="64x64", warmup_slices=warm_at)
    out["slices_per_s"] = round(slices / max(out["seconds"], 1e-9), 1)
    return out


# -- the parent --------------------------------------------------------------------------------


def machine(args: argparse.Namespace) -> dict[str, Any]:
    model = platform.processor() or platform.machine()
    try:
        text = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        model = next(
            (x.split(":", 1)[1].strip() for x in text.splitlines() if x.startswith("Model name")),
            model,
        )
    except (OSError, subprocess.SubprocessError):
        pass
    from importlib.metadata import version

    return {
        "cpu": model,
        "cores": os.cpu_count(),
        "torch_threads": args.threads or "default",
        "loadavg_start": [round(x, 2) for x in os.getloadavg()],
        "python": platform.python_version(),
        "torch": version("torch"),
    }


def _child(part: str, args: argparse.Namespace, work: Path, extra: list[str]) -> dict[str, Any]:
    result = work / f"{part}.json"
    cmd = [sys.executable, __file__, "--child", part, "--work", str(work), "--out", str(result)]
    cmd += ["--steps", str(args.steps), "--eval-every", str(args.eval_every)]
    cmd += ["--slices", str(args.slices), *extra]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    if args.tiny:
        cmd += ["--tiny"]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.stderr.write(proc.stderr[-4000:])
        raise SystemExit(f"{part} child failed with exit code {proc.returncode}")
    return json.loads(result.read_text())


def table(results: dict[str, Any]) -> str:
    head = ["part", "length", "start", "warm-up", "end", "peak", "growth", "max growth", "time"]
    head += ["growth in steps / at evaluations"]
    rows = []
    for part, unit in (("train", "steps"), ("predict", "slices")):
        r = results[part]
        rows.append(
            [
                part,
                f"{r[unit]} {unit}",
                *(
                    f"{r[k]:.1f}"
                    for k in (
                        "start_mib",
                        "warmup_mib",
                        "end_mib",
                        "peak_mib",
                        "growth_after_warmup_mib",
                        "max_growth_after_warmup_mib",
                    )
                ),
                f"{r['seconds']:.0f} s",
                (
                    f"{r['growth_in_steps_mib']:.1f} / {r['growth_at_evaluations_mib']:.1f}"
                    if part == "train"
                    else "-"
                ),
            ]
        )
    widths = [max(len(str(x)) for x in col) for col in zip(head, *rows, strict=True)]
    fmt = "  ".join(f"{{:>{w}}}" for w in widths)
    lines = [fmt.format(*head), fmt.format(*("-" * w for w in widths))]
    lines += [fmt.format(*row) for row in rows]
    return "\n".join(lines) + "\n(memory in MiB of resident set; growth = after warm-up)"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=3000)
    ap.add_argument("--eval-every", type=int, default=500)
    ap.add_argument("--slices", type=int, default=3000)
    ap.add_argument("--tiny", action="store_true", help="8 base channels, depth 2 (quick).")
    ap.add_argument("--threads", type=int, help="torch intra-op threads [torch's default].")
    ap.add_argument("--work", type=Path, help="Scratch folder [a temporary one].")
    ap.add_argument("--json", type=Path, help="Write the figures here.")
    ap.add_argument("--child", choices=["train", "predict"], help=argparse.SUPPRESS)
    ap.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--model", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()

    if args.child:
        if args.threads:
            import torch

            torch.set_num_threads(args.threads)
        args.work.mkdir(parents=True, exist_ok=True)
        if args.child == "train":
            res = child_train(args.work, args.steps, args.eval_every, args.tiny)
        else:
            res = child_predict(args.work, args.slices, args.model)
        args.out.write_text(json.dumps(res))
        return

    with tempfile.TemporaryDirectory() as tmp:
        work = args.work or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        results: dict[str, Any] = {"machine": machine(args)}
        results["train"] = _child("train", args, work / "train", [])
        model = work / "train" / "run" / "checkpoints" / "last.pt"
        results["predict"] = _child("predict", args, work / "predict", ["--model", str(model)])
        results["machine"]["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
    print(table(results))
    print(
        f"machine: {results['machine']['cpu']}, {results['machine']['cores']} cores, "
        f"load {results['machine']['loadavg_start']} -> {results['machine']['loadavg_end']}"
    )
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2) + "\n")
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
