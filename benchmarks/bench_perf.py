"""Performance of cellp2p against plain PyTorch references, on the same machine, in the same run.

Every configuration runs in its own subprocess. Inside it, the project and the reference (and
any variant) are interleaved round by round, the order reversed every other round (A B B A …),
and medians are reported with the 1-minute load average (``os.getloadavg()``) seen meanwhile:
on a shared machine the *ratios* are the figures to trust, not the absolute times.

    python benchmarks/bench_perf.py train   --json train.json    # pix2pix step, paper + small
    python benchmarks/bench_perf.py process --json process.json  # whole `cellp2p train` runs
    python benchmarks/bench_perf.py infer   --json infer.json    # 30 x 512² stack, per preset
    python benchmarks/bench_perf.py hw      --json hw.json       # matmul GFLOP/s, FLOP counts
    python benchmarks/bench_perf.py scale   --json scale.json    # `cellp2p predict` time + RSS
    python benchmarks/bench_perf.py levers  --json levers.json   # one toggle at a time
    python benchmarks/bench_perf.py levers --compile             # + torch.compile (~5 min more)
    python benchmarks/bench_perf.py all --json-dir DIR           # all of the above but compile

Options common to the subcommands: ``--only NAME,NAME`` (configuration names as printed),
``--json FILE``. ``train``: ``--warmup`` / ``--steps`` (rounds; default 3 + 8).

The reference training step is the textbook pix2pix step, written the straightforward way:
``fake = G(x)``; D on ``cat(x, fake.detach())`` and ``cat(x, y)``, BCE-with-logits,
``0.5 * loss_D`` backward, step; G: BCE + 100 · L1, backward, step — same networks
(``build_model``), same ``Adam(2e-4, betas=(0.5, 0.999))``, no tricks. The reference inference
loop: ``model.eval()``, ``torch.inference_mode()``, whole slices one by one, normalise, forward,
``tifffile.imwrite``. Nothing under ``cellp2p/`` is modified: variants of the project are made
by swapping objects of a constructed ``Pix2PixMode`` (e.g. its optimizers) or, for whole
processes, by a monkeypatch applied before ``cellp2p.cli.main`` runs.
"""

from __future__ import annotations

import argparse
import contextlib
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
HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

# -- configurations ----------------------------------------------------------------------------

TRAIN = [
    dict(name="step-paper", kind="train", preset="paper"),
    dict(name="step-small", kind="train", preset="small"),
]
# Whole processes: E steps, evaluation, E more steps, evaluation. Steady images/s = 1 / the
# median step-end-to-step-end interval (data + loop + step; warm-up and evaluation intervals
# left out); the reference script times the same intervals.
PROCESS = [
    dict(name="process-paper", preset="paper", every=4, rounds=2,
         variants=["cellp2p", "cellp2p+forloop-adam", "cellp2p+passive-omp", "reference",
                   "reference+passive-omp"]),
    # The acceptance figure: longer runs (20 steady intervals each), 3 rounds, A B B A B A.
    dict(name="process-paper-long", preset="paper", every=12, rounds=3,
         variants=["cellp2p", "reference"]),
    dict(name="process-small", preset="small", every=5, rounds=2,
         variants=["cellp2p", "cellp2p+passive-omp", "cellp2p+workers1", "reference",
                   "reference+passive-omp"]),
]  # fmt: skip
INFER = [
    dict(name="infer-gen-paper", kind="infer", net="generator", preset="paper", rounds=1,
         variants=["project", "reference"]),
    dict(name="infer-gen-small", kind="infer", net="generator", preset="small", rounds=2,
         variants=["project", "reference", "reference+channels-last", "reference+no_grad"]),
    dict(name="infer-unet-small", kind="infer", net="unet", preset="small", rounds=2,
         variants=["project", "reference"]),
    # The same as infer-gen-small, in a process started with OMP_WAIT_POLICY=PASSIVE.
    dict(name="infer-gen-small-passive-omp", kind="infer", net="generator", preset="small",
         rounds=2, variants=["project", "reference"], env={"OMP_WAIT_POLICY": "PASSIVE"}),
]  # fmt: skip
SCALE = [
    dict(name=f"scale-{n}x{s}", kind="scale", net="generator", preset="small", slices=n, size=s)
    for n, s in ((16, 512), (64, 512), (256, 512), (4, 1024), (4, 2048))
]
LEVERS = [
    dict(name="adam-paper", kind="adam", preset="paper", rounds=6),
    dict(name="adam-small", kind="adam", preset="small", rounds=10),
    dict(name="channels-last-paper", kind="cl", preset="paper", warmup=1, steps=4),
    dict(name="channels-last-small", kind="cl", preset="small", warmup=3, steps=10),
    dict(
        name="combined-paper",
        kind="train",
        preset="paper",
        warmup=2,
        steps=6,
        variants=[
            "project",
            "reference",
            "project+forloop-adam",
            "project+channels-last",
            "project+forloop-adam+channels-last",
        ],
    ),
    dict(name="data", kind="data"),
    dict(name="loop-workers-small", kind="loop", preset="small", warmup=3, steps=10),
    dict(name="misc", kind="misc"),
    dict(name="threads-small", kind="threads", preset="small", warmup=2, steps=8),
    dict(name="threads-small-passive", kind="threads", preset="small", warmup=2, steps=8,
         env={"OMP_WAIT_POLICY": "PASSIVE"}),
]  # fmt: skip
COMPILE = [dict(name="compile-small", kind="compile", preset="small", rounds=8)]
HW = [dict(name="hw", kind="hw")]

SIZE = 256  # training crop (pix2pix paper: 256², batch 1)
INFER_SLICES, INFER_SIZE = 30, 512


# -- helpers -----------------------------------------------------------------------------------


def load1() -> float:
    return round(os.getloadavg()[0], 2)


def median(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def mm_gflops(n: int = 2048, reps: int = 3) -> float:
    """Best-of-``reps`` fp32 ``torch.mm`` GFLOP/s for n x n (one untimed warm-up first)."""
    import torch

    a, b = torch.randn(n, n), torch.randn(n, n)
    torch.mm(a, b)
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best / 1e9


class Timer:
    """Wall and process-CPU seconds of a block."""

    def __enter__(self) -> Timer:
        self.w0, self.c0 = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc: object) -> None:
        self.wall = time.perf_counter() - self.w0
        self.cpu = time.process_time() - self.c0


def interleave(
    fns: dict[str, Callable[[], Any]],
    warmup: int,
    rounds: int,
    on_round: Callable[[int], None] | None = None,
    first: Callable[[str, Callable[[], Any]], Any] | None = None,
) -> dict[str, dict[str, Any]]:
    """Run each function once per round, order reversed every other round (A B, B A, …).

    The first ``warmup`` rounds are not timed (``first`` wraps each function's very first call,
    e.g. to count FLOPs). Returns per-variant wall/CPU seconds and the load averages seen.
    """
    out = {k: {"wall": [], "cpu": [], "load": []} for k in fns}
    names = list(fns)
    for r in range(warmup + rounds):
        for name in names if r % 2 == 0 else names[::-1]:
            fn = fns[name]
            if r == 0 and first is not None:
                first(name, fn)
                continue
            with Timer() as t:
                fn()
            if r >= warmup:
                out[name]["wall"].append(t.wall)
                out[name]["cpu"].append(t.cpu)
                out[name]["load"].append(load1())
        if on_round:
            on_round(r)
    return out


def summary(times: dict[str, Any]) -> dict[str, Any]:
    wall = times["wall"]
    return {
        "median_s": median(wall),
        "min_s": min(wall) if wall else float("nan"),
        "cpu_median_s": median(times["cpu"]),
        "cpu_per_wall": sum(times["cpu"]) / max(sum(wall), 1e-9),
        "n": len(wall),
        "load": [min(times["load"], default=0), max(times["load"], default=0)],
        "wall_s": [round(w, 4) for w in wall],
    }


# -- networks, data, steps ---------------------------------------------------------------------

ADAM = dict(lr=2e-4, betas=(0.5, 0.999))


def synthetic_pairs(n: int = 4, size: int = SIZE) -> Any:
    """A tiny in-memory PairedData (translate task), as ``load_data`` returns it."""
    import numpy as np

    from cellp2p.dataset import PairedData
    from cellp2p.normalization import Normalization

    rng = np.random.default_rng(0)
    x = rng.random((n, 1, size, size), dtype=np.float32)
    y = rng.random((n, 1, size, size), dtype=np.float32)
    norm = Normalization("minmax", vmin=0.0, vmax=255.0, dtype="uint8")
    return PairedData(x, y, x[:1], y[:1], [0], norm, norm, "image", [], None, {})


def train_config(preset: str, **kw: Any) -> Any:
    from cellp2p.config import TrainConfig

    base = dict(mode="pix2pix", task="translate", preset=preset, batch_size=1, crop=SIZE)
    return TrainConfig(**{**base, "device": "cpu", "precision": "fp32", **kw})


def project_mode(preset: str) -> Any:
    """cellp2p's own Pix2PixMode, as ``train()`` builds it (CPU, fp32)."""
    import torch

    from cellp2p.modes import Pix2PixMode

    torch.manual_seed(0)
    mode = Pix2PixMode(train_config(preset), synthetic_pairs(), torch.device("cpu"), "fp32")
    for net in mode.nets.values():
        net.train()
    return mode


class Reference:
    """The textbook pix2pix step, plain PyTorch, same networks and optimizer."""

    def __init__(self, preset: str, *, channels_last: bool = False, seed: int = 0, **adam: Any):
        import torch

        from cellp2p.models import build_model

        torch.manual_seed(seed)
        self.G = build_model("generator", preset, 1, 1)
        self.D = build_model("discriminator", preset, 2, 1)
        self.channels_last = channels_last
        if channels_last:
            self.G = self.G.to(memory_format=torch.channels_last)
            self.D = self.D.to(memory_format=torch.channels_last)
        self.G.train()
        self.D.train()
        self.opt_g = torch.optim.Adam(self.G.parameters(), **ADAM, **adam)
        self.opt_d = torch.optim.Adam(self.D.parameters(), **ADAM, **adam)

    def step(self, x01: Any, y01: Any) -> None:
        import torch
        import torch.nn.functional as F

        x, y = x01 * 2 - 1, y01 * 2 - 1
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
            y = y.contiguous(memory_format=torch.channels_last)
        G, D = self.G, self.D
        fake = G(x)
        self.opt_d.zero_grad()
        pred_fake = D(torch.cat([x, fake.detach()], 1))
        pred_real = D(torch.cat([x, y], 1))
        loss_d = 0.5 * (
            F.binary_cross_entropy_with_logits(pred_fake, torch.zeros_like(pred_fake))
            + F.binary_cross_entropy_with_logits(pred_real, torch.ones_like(pred_real))
        )
        loss_d.backward()
        self.opt_d.step()
        self.opt_g.zero_grad()
        pred_fake = D(torch.cat([x, fake], 1))
        loss_g = F.binary_cross_entropy_with_logits(
            pred_fake, torch.ones_like(pred_fake)
        ) + 100 * F.l1_loss(fake, y)
        loss_g.backward()
        self.opt_g.step()


def forloop_optims(mode: Any) -> dict[str, Any]:
    """Adam as torch builds it by default on the CPU (a Python for-loop over the parameters),
    over the same parameters as ``mode.optims`` (own state): the project before it went fused."""
    import torch

    return {
        k: torch.optim.Adam(o.param_groups[0]["params"], **ADAM, foreach=False, fused=False)
        for k, o in mode.optims.items()
    }


def with_optims(mode: Any, optims: dict[str, Any], x: Any, y: Any) -> Callable[[], Any]:
    """``mode.step`` with ``mode.optims`` swapped for ``optims`` during the call."""

    def run() -> Any:
        plain = mode.optims
        mode.optims = optims
        try:
            return mode.step(x, y)
        finally:
            mode.optims = plain

    return run


def batch01(size: int = SIZE) -> tuple[Any, Any]:
    import torch

    g = torch.Generator().manual_seed(1)
    return torch.rand(1, 1, size, size, generator=g), torch.rand(1, 1, size, size, generator=g)


def count_flops(fn: Callable[[], Any]) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn()
    return float(counter.get_total_flops())


# -- workers: training step --------------------------------------------------------------------


def worker_train(cfg: dict[str, Any]) -> dict[str, Any]:
    """project step vs reference step vs the project with for-loop Adam, interleaved."""
    import torch

    preset = cfg["preset"]
    variants = cfg.get("variants", ["project", "reference", "project+forloop-adam"])
    x, y = batch01()
    mode = project_mode(preset)
    ref = Reference(preset)
    fns = {"project": lambda: mode.step(x, y), "reference": lambda: ref.step(x, y)}
    if "project+forloop-adam" in variants:
        fns["project+forloop-adam"] = with_optims(mode, forloop_optims(mode), x, y)
    if any("channels-last" in v for v in variants):
        # The same Pix2PixMode with its nets and inputs in channels-last (what a one-line
        # change in Pix2PixMode.__init__ / the loop would do); optimizers built after it.
        mode_cl = project_mode(preset)
        for net in mode_cl.nets.values():
            net.to(memory_format=torch.channels_last)
        xc, yc = (t.contiguous(memory_format=torch.channels_last) for t in (x, y))
        fns["project+channels-last"] = lambda: mode_cl.step(xc, yc)
        fns["project+forloop-adam+channels-last"] = with_optims(
            mode_cl, forloop_optims(mode_cl), xc, yc
        )
    fns = {v: fns[v] for v in variants}
    flops: dict[str, float] = {}
    peaks: list[float] = []

    def first(name: str, fn: Callable[[], Any]) -> None:
        flops[name] = count_flops(fn)  # the first (untimed) call, counted

    times = interleave(
        fns, cfg["warmup"], cfg["steps"], on_round=lambda r: peaks.append(mm_gflops()), first=first
    )
    peak = max(peaks)
    rows = []
    ref_median = median(times["reference"]["wall"])
    for name, t in times.items():
        s = summary(t)
        gflop = flops[name] / 1e9
        rows.append(
            {
                "variant": name,
                **s,
                "images_per_s": 1 / s["median_s"],
                "speed_vs_reference": ref_median / s["median_s"],
                "gflop_per_step": gflop,
                "gflops_achieved": gflop / s["median_s"],
                "fraction_of_mm_peak": gflop / s["median_s"] / peak,
            }
        )
    return {"rows": rows, "mm_peak_gflops": peak, "mm_gflops_rounds": peaks}


# -- workers: whole training processes ---------------------------------------------------------


def make_pair_stacks(folder: Path, slices: int = 5, size: int = SIZE) -> tuple[Path, Path]:
    import numpy as np
    import tifffile

    rng = np.random.default_rng(0)
    vol, lab = folder / "volume.tif", folder / "target.tif"
    tifffile.imwrite(vol, rng.integers(0, 256, (slices, size, size), dtype=np.uint8))
    tifffile.imwrite(lab, rng.integers(0, 256, (slices, size, size), dtype=np.uint8))
    return vol, lab


# Runs `cellp2p train` (cellp2p.cli.main) unchanged except for a timestamp taken after each
# Pix2PixMode.step (written at exit to $BENCH_STAMPS), and, with BENCH_FORLOOP=1, Adam made the
# for-loop kind (the project before it went fused).
CLI_PATCH = """
import atexit, json, os, sys, time
import torch
import cellp2p.modes as T
if os.environ.get("BENCH_FORLOOP") == "1":
    class _LoopAdam(torch.optim.Adam):
        def __init__(self, params, *args, **kw):
            kw.update(fused=False, foreach=False)
            super().__init__(params, *args, **kw)
    torch.optim.Adam = _LoopAdam
_stamps = []
_step = T.Pix2PixMode.step
def _timed(self, x, y):
    out = _step(self, x, y)
    _stamps.append(time.perf_counter())
    return out
T.Pix2PixMode.step = _timed
atexit.register(lambda: open(os.environ["BENCH_STAMPS"], "w").write(json.dumps(_stamps)))
from cellp2p.cli import main
sys.argv[0] = "cellp2p"
main()
"""


def step_intervals(stamps: list[float], every: int) -> list[float]:
    """Seconds from one step's end to the next one's (data + loop + step), leaving out the
    first (warm-up) interval and those that hold an evaluation (after steps every, 2·every…)."""
    return [
        stamps[i] - stamps[i - 1]
        for i in range(2, len(stamps))  # interval i: step i → step i+1 (1-based steps)
        if i % every != 0
    ]


def run_child(
    cmd: list[str], cwd: Path = ROOT, env: dict[str, str] | None = None
) -> dict[str, Any]:
    """Run ``cmd``; wall seconds, exit status, and that child's own rusage (os.wait4)."""
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, cwd=cwd, stdout=out, stderr=err, env=env)
        _, status, ru = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        wall = time.perf_counter() - t0
        out.seek(0)
        err.seek(0)
        return {
            "rc": proc.returncode,
            "wall_s": wall,
            "cpu_s": ru.ru_utime + ru.ru_stime,
            "peak_rss_mib": ru.ru_maxrss / 1024,
            "stdout": out.read(),
            "stderr": err.read()[-3000:],
        }


def process_command(variant: str, preset: str, every: int, vol: Path, lab: Path, out: Path):
    py = sys.executable
    args = ["train", "--mode", "pix2pix", "--task", "translate", "--preset", preset]
    args += ["--volume", str(vol), "--labels", str(lab), "--batch-size", "1", "--crop", str(SIZE)]
    args += ["--max-steps", str(2 * every), "--eval-every", str(every), "--device", "cpu"]
    args += ["--out", str(out), "--quiet"]
    if variant.startswith("cellp2p") and "workers1" not in variant:
        return [py, "-c", CLI_PATCH, *args]
    if variant == "cellp2p+workers1":
        return [py, "-c", CLI_PATCH, *args, "--num-workers", "1"]
    if variant.startswith("reference"):
        spec = dict(preset=preset, every=every, volume=str(vol), target=str(lab))
        return [py, __file__, "--reference-train", json.dumps(spec)]
    raise ValueError(variant)


def worker_process(cfg: dict[str, Any]) -> dict[str, Any]:
    """One whole training process (its own child), then its steady-state images/s."""
    with tempfile.TemporaryDirectory(prefix="bench_perf_") as tmp:
        tmp = Path(tmp)
        vol, lab = make_pair_stacks(tmp)
        out = tmp / "run"
        cmd = process_command(cfg["variant"], cfg["preset"], cfg["every"], vol, lab, out)
        env = {**os.environ, "BENCH_STAMPS": str(tmp / "stamps.json")}
        env["BENCH_FORLOOP"] = "1" if "forloop" in cfg["variant"] else "0"
        for key in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT"):  # the variant decides, not the shell
            env.pop(key, None)
        if "passive-omp" in cfg["variant"]:  # read by libgomp when torch loads
            env["OMP_WAIT_POLICY"] = "PASSIVE"
        load0 = load1()
        res = run_child(cmd, env=env)
        if res["rc"]:
            raise RuntimeError(f"{cfg['variant']} failed:\n{res['stderr']}")
        row = {k: v for k, v in res.items() if k not in ("stdout", "stderr")}
        row["load"] = [load0, load1()]
        if cfg["variant"].startswith("reference"):
            rep = json.loads(res["stdout"].strip().splitlines()[-1])
            stamps = rep.pop("stamps")
            row.update(rep)
        else:
            stamps = json.loads((tmp / "stamps.json").read_text())
            recs = [json.loads(s) for s in (out / "metrics.jsonl").read_text().splitlines()]
            row["first_images_per_s"] = recs[0]["images_per_s"]
            row["images_per_s"] = recs[-1]["images_per_s"]
            # Between the two records: the first evaluation's checkpoints, panel and curve.
            steps_s = cfg["every"] / recs[-1]["images_per_s"]
            row["checkpoint_panel_curve_s"] = recs[-1]["time"] - recs[0]["time"] - steps_s
            row["metrics_images_per_s"] = row.pop("images_per_s")
        intervals = step_intervals(stamps, cfg["every"])
        row["intervals_s"] = [round(t, 4) for t in intervals]
        row["interval_median_s"] = median(intervals)
        row["images_per_s"] = 1 / row["interval_median_s"]
        return row


def reference_pairs(vol: Any, tgt: Any, n_train: int, steps: int) -> Any:
    """The plain script's data: ``steps`` random SIZE² crops of the first ``n_train`` slices,
    flipped at random, as (1, 1, SIZE, SIZE) tensors (input, target)."""
    import numpy as np
    import torch

    rng = np.random.default_rng(0)
    for _ in range(steps):
        i = rng.integers(n_train)
        r, c = (rng.integers(s - SIZE + 1) for s in vol.shape[1:])
        a, b = vol[i, r : r + SIZE, c : c + SIZE], tgt[i, r : r + SIZE, c : c + SIZE]
        if rng.random() < 0.5:
            a, b = a[::-1], b[::-1]
        if rng.random() < 0.5:
            a, b = a[:, ::-1], b[:, ::-1]
        yield torch.from_numpy(a.copy())[None, None], torch.from_numpy(b.copy())[None, None]


def reference_train(spec: dict[str, Any]) -> None:
    """A plain pix2pix training script: tifffile, numpy crops/flips, the textbook step."""
    import numpy as np
    import tifffile

    vol = tifffile.imread(spec["volume"]).astype(np.float32) / 255
    tgt = tifffile.imread(spec["target"]).astype(np.float32) / 255
    n_train = len(vol) - max(1, len(vol) // 5)
    ref = Reference(spec["preset"])
    stamps = []
    t_loop = time.perf_counter()
    for x, y in reference_pairs(vol, tgt, n_train, 2 * spec["every"]):
        ref.step(x, y)
        stamps.append(time.perf_counter())
    e = spec["every"]
    first = stamps[e - 1] - t_loop
    print(
        json.dumps(
            {
                "first_images_per_s": e / first,
                "metrics_images_per_s": e / (stamps[-1] - stamps[e - 1]),
                "stamps": stamps,
            }
        )
    )


# -- workers: inference ------------------------------------------------------------------------


def reference_predict(
    stack: Path, ckpt: Path, out: Path, *, channels_last: bool = False, no_grad: bool = False
) -> None:
    """Plain loop: torch.load, build, eval, whole slices one at a time, tifffile in and out."""
    import numpy as np
    import tifffile
    import torch

    from cellp2p.models import model_from_config

    entry = next(iter(torch.load(ckpt, map_location="cpu", weights_only=True)["models"].values()))
    net = model_from_config(entry["kind"], entry["config"])
    net.load_state_dict(entry["state"])
    net.eval()
    if channels_last:
        net = net.to(memory_format=torch.channels_last)
    images = tifffile.imread(stack)
    if images.ndim == 2:  # a one-slice stack reads as a plain image
        images = images[None]
    result = np.empty(images.shape, np.float32)
    ctx = torch.no_grad() if no_grad else torch.inference_mode()
    with ctx:
        for i, img in enumerate(images):
            x = torch.from_numpy(img.astype(np.float32) / 255.0)[None, None] * 2 - 1
            if channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            logits = net(x)
            if entry["kind"] == "generator":
                prob = ((logits + 1) / 2).clamp(0, 1)
            else:
                prob = torch.sigmoid(logits)
            result[i] = prob[0, 0].numpy()
    tifffile.imwrite(out, result)


def slice_gflops(net_kind: str, preset: str, size: int) -> float:
    """Forward FLOPs of one slice, on the meta device (the valid-conv U-Net: padded input)."""
    import torch

    from cellp2p.models import build_model
    from cellp2p.tiling import forward_full

    with torch.device("meta"):
        net = build_model(net_kind, preset, 1, 1).eval()
        x = torch.empty(1, 1, size, size)
        return count_flops(lambda: forward_full(net, net, x)) / 1e9


def worker_infer(cfg: dict[str, Any]) -> dict[str, Any]:
    """predict_stack (project) vs the plain loop, A B B A, after a warm-up of each."""
    import numpy as np
    import tifffile
    from bench_predict import make_checkpoint, make_stack

    from cellp2p.predict import predict_stack

    with tempfile.TemporaryDirectory(prefix="bench_perf_") as tmp:
        tmp = Path(tmp)
        ckpt = make_checkpoint(tmp / "model.pt", cfg["preset"], cfg["net"])
        stack = make_stack(tmp / "in.tif", INFER_SLICES, INFER_SIZE)
        warm = make_stack(tmp / "warm.tif", 1, INFER_SIZE)
        outs = {v: tmp / f"out-{i}.tif" for i, v in enumerate(cfg["variants"])}

        def run(variant: str, src: Path = stack) -> None:
            if variant == "project":
                predict_stack([src], ckpt, out=outs[variant], device="cpu", quiet=True, force=True)
            else:
                reference_predict(
                    src,
                    ckpt,
                    outs[variant],
                    channels_last="channels-last" in variant,
                    no_grad="no_grad" in variant,
                )

        fns = {v: (lambda v=v: run(v)) for v in cfg["variants"]}
        times = interleave(fns, 1, cfg["rounds"], first=lambda v, fn: run(v, warm))
        peak = mm_gflops(reps=5)
        diff = float(
            np.abs(tifffile.imread(outs["project"]) - tifffile.imread(outs["reference"])).max()
        )
    gflop = slice_gflops(cfg["net"], cfg["preset"], INFER_SIZE) * INFER_SLICES
    mpix = INFER_SLICES * INFER_SIZE**2 / 1e6
    ref_median = median(times["reference"]["wall"])
    rows = []
    for name, t in times.items():
        s = summary(t)
        rows.append(
            {
                "variant": name,
                **s,
                "mpix_per_s": mpix / s["median_s"],
                "speed_vs_reference": ref_median / s["median_s"],
                "gflops_achieved": gflop / s["median_s"],
                "fraction_of_mm_peak": gflop / s["median_s"] / peak,
            }
        )
    return {"rows": rows, "mpix": mpix, "gflop_stack": gflop, "mm_peak_gflops": peak,
            "max_abs_diff_project_vs_reference": diff}  # fmt: skip


# -- workers: hardware, scale ------------------------------------------------------------------


def ref_step_flops_meta(preset: str) -> dict[str, float]:
    """FLOPs (2 per MAC) of one reference and one project step, counted on the meta device."""
    import torch

    from cellp2p.modes import Pix2PixMode

    class NoStep:  # Adam on meta tensors cannot read its step count; its FLOPs are not counted
        def zero_grad(self, set_to_none: bool = True) -> None:
            pass

        def step(self) -> None:
            pass

    out = {}
    with torch.device("meta"):
        x, y = torch.rand(1, 1, SIZE, SIZE), torch.rand(1, 1, SIZE, SIZE)
        ref = Reference(preset)
        ref.opt_g = ref.opt_d = NoStep()
        out["reference"] = count_flops(lambda: ref.step(x, y))
        meta = torch.device("meta")
        mode = Pix2PixMode(train_config(preset), synthetic_pairs(1, 8), meta, "fp32")
        mode.optims = {k: NoStep() for k in mode.optims}
        out["project"] = count_flops(lambda: mode.step(x, y))
        out["G forward"] = count_flops(lambda: ref.G(x * 2 - 1))
        out["D forward"] = count_flops(lambda: ref.D(torch.cat([x, y], 1)))
    return out


def worker_hw(cfg: dict[str, Any]) -> dict[str, Any]:
    import torch

    sizes = {n: max(mm_gflops(n, reps=3) for _ in range(3)) for n in (1024, 2048, 4096)}
    steps = {p: {k: v / 1e9 for k, v in ref_step_flops_meta(p).items()} for p in ("paper", "small")}
    slices = {
        f"{k} {p}": slice_gflops(k, p, INFER_SIZE)
        for k, p in (("generator", "paper"), ("generator", "small"), ("unet", "small"))
    }
    return {
        "threads": torch.get_num_threads(),
        "mm_gflops": sizes,
        "step_gflop": steps,
        "slice_gflop_512": slices,
        "load": load1(),
    }


def worker_scale(cfg: dict[str, Any]) -> dict[str, Any]:
    """`python -m cellp2p predict` as this worker's only child: wall and peak RSS."""
    import resource

    from bench_predict import make_checkpoint, make_stack

    with tempfile.TemporaryDirectory(prefix="bench_perf_") as tmp:
        tmp = Path(tmp)
        ckpt = make_checkpoint(tmp / "model.pt", cfg["preset"], cfg["net"])
        stack = make_stack(tmp / "in.tif", cfg["slices"], cfg["size"])
        cmd = [sys.executable, "-m", "cellp2p", "predict", str(stack), "--model", str(ckpt)]
        cmd += ["-o", str(tmp / "out.tif"), "--quiet", "--device", "cpu"]
        load0 = load1()
        t0 = time.perf_counter()
        subprocess.run(cmd, check=True, cwd=ROOT)
        wall = time.perf_counter() - t0
        ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    mpix = cfg["slices"] * cfg["size"] ** 2 / 1e6
    return {
        "seconds": wall,
        "mpix": mpix,
        "mpix_per_s": mpix / wall,
        "cpu_s": ru.ru_utime + ru.ru_stime,
        "peak_rss_mib": ru.ru_maxrss / 1024,
        "load": [load0, load1()],
    }


# -- workers: levers ---------------------------------------------------------------------------


def worker_adam(cfg: dict[str, Any]) -> dict[str, Any]:
    """Adam.step alone over G+D of the preset: for-loop (CPU default) vs foreach vs fused."""
    import torch

    from cellp2p.models import build_model

    params = list(build_model("generator", cfg["preset"], 1, 1).parameters())
    params += list(build_model("discriminator", cfg["preset"], 2, 1).parameters())
    for p in params:
        p.grad = torch.randn_like(p)
    opts = {
        "for-loop (default on CPU)": torch.optim.Adam(params, **ADAM),
        "foreach=True": torch.optim.Adam(params, **ADAM, foreach=True),
        "fused=True": torch.optim.Adam(params, **ADAM, fused=True),
    }
    times = interleave({k: o.step for k, o in opts.items()}, 1, cfg["rounds"])
    base = median(times["for-loop (default on CPU)"]["wall"])
    rows = [
        {"variant": k, **summary(t), "speedup": base / median(t["wall"])} for k, t in times.items()
    ]
    return {"rows": rows, "params": sum(p.numel() for p in params)}


def worker_cl(cfg: dict[str, Any]) -> dict[str, Any]:
    """Channels-last for the training step: reference vs reference with channels-last."""
    x, y = batch01()
    plain, cl = Reference(cfg["preset"]), Reference(cfg["preset"], channels_last=True)
    times = interleave(
        {"reference": lambda: plain.step(x, y), "reference+channels-last": lambda: cl.step(x, y)},
        cfg["warmup"],
        cfg["steps"],
    )
    base = median(times["reference"]["wall"])
    rows = [
        {"variant": k, **summary(t), "speedup": base / median(t["wall"])} for k, t in times.items()
    ]
    return {"rows": rows}


def worker_data(cfg: dict[str, Any]) -> dict[str, Any]:
    """Cost of one StepBatches item (MONAI augmentation) vs a plain numpy crop + flips."""
    import numpy as np
    import torch

    from cellp2p.dataset import StepBatches

    rows = []
    for size, batch in ((256, 1), (512, 1), (512, 4)):
        data = synthetic_pairs(4, size)
        sb = StepBatches(data, train_config("small", batch_size=batch))
        rng = np.random.default_rng(0)

        def plain(data=data, batch=batch, rng=rng) -> Any:
            xs = []
            for _ in range(batch):
                i = rng.integers(len(data.train_x))
                r, c = (rng.integers(s - SIZE + 1) for s in data.train_x.shape[-2:])
                a = data.train_x[i, :, r : r + SIZE, c : c + SIZE]
                b = data.train_y[i, :, r : r + SIZE, c : c + SIZE]
                if rng.random() < 0.5:
                    a, b = a[..., ::-1], b[..., ::-1]
                xs.append((torch.from_numpy(a.copy()), torch.from_numpy(b.copy())))
            return torch.stack([a for a, _ in xs]), torch.stack([b for _, b in xs])

        counter = iter(range(1, 10**9))
        fns = {"StepBatches[step] (MONAI)": lambda sb=sb, c=counter: sb[next(c)]}
        times = interleave({**fns, "plain numpy": plain}, 3, 30)
        for k, t in times.items():
            rows.append({"variant": k, "slice": size, "batch": batch, **summary(t)})
    return {"rows": rows}


def worker_loop(cfg: dict[str, Any]) -> dict[str, Any]:
    """The loop's per-step work through its own seams, with 0 vs 1 DataLoader workers.

    Two loaders (``train.make_loader``) over the same run are drawn from alternately; each timed
    step is ``next(loader)`` + ``train.train_step`` (seed, ``mode.step``, the schedulers).
    """
    import tempfile

    from cellp2p.train import TrainState, make_loader, train_step

    mode = project_mode(cfg["preset"])
    tc = train_config(cfg["preset"])
    data = synthetic_pairs(4, SIZE)
    state = TrainState(tc, Path(tempfile.mkdtemp()), mode, data, total=10**6)
    iters = {f"num_workers={w}": iter(make_loader(state, 10**6, num_workers=w)) for w in (0, 1)}

    def one(it: Any) -> None:
        x, y = next(it)
        train_step(state, x, y)

    fns = {k: (lambda it=it: one(it)) for k, it in iters.items()}
    times = interleave(fns, cfg["warmup"], cfg["steps"])
    base = median(times["num_workers=0"]["wall"])
    rows = [
        {"variant": k, **summary(t), "speedup": base / median(t["wall"])} for k, t in times.items()
    ]
    return {"rows": rows}


def worker_threads(cfg: dict[str, Any]) -> dict[str, Any]:
    """The step with 2 vs 1 torch threads, alone and beside one busy process (a competitor
    that is resumed/stopped with SIGCONT/SIGSTOP outside the timed call)."""
    import signal

    import torch

    x, y = batch01()
    ref = Reference(cfg["preset"])
    busy = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    os.kill(busy.pid, signal.SIGSTOP)
    states = {
        f"{n} thread{'s' * (n > 1)}{', 1 busy process beside' * b}": (n, b)
        for b in (False, True)
        for n in (2, 1)
    }
    out = {k: {"wall": [], "cpu": [], "load": []} for k in states}
    try:
        for r in range(cfg["warmup"] + cfg["steps"]):
            for name in states if r % 2 == 0 else list(states)[::-1]:
                threads, competitor = states[name]
                torch.set_num_threads(threads)
                os.kill(busy.pid, signal.SIGCONT if competitor else signal.SIGSTOP)
                time.sleep(0.05)
                with Timer() as t:
                    ref.step(x, y)
                os.kill(busy.pid, signal.SIGSTOP)
                if r >= cfg["warmup"]:
                    out[name]["wall"].append(t.wall)
                    out[name]["cpu"].append(t.cpu)
                    out[name]["load"].append(load1())
    finally:
        busy.kill()
        busy.wait()
    base = median(out["2 threads"]["wall"])
    rows = [
        {"variant": k, **summary(t), "speedup": base / median(t["wall"])} for k, t in out.items()
    ]
    return {"rows": rows}


def worker_misc(cfg: dict[str, Any]) -> dict[str, Any]:
    """Per-step costs of the loop's small things, and host syncs inside Pix2PixMode.step."""
    import torch

    out: dict[str, Any] = {}
    n = 2000
    t0 = time.perf_counter()
    for i in range(n):
        torch.manual_seed(i)
    out["manual_seed_us"] = (time.perf_counter() - t0) / n * 1e6

    from cellp2p.models import build_model

    g = build_model("generator", "paper", 1, 1)
    d = build_model("discriminator", "paper", 2, 1)
    for set_to_none in (True, False, True, False):
        for p in g.parameters():
            p.grad = torch.ones_like(p)
        t0 = time.perf_counter()
        for p in g.parameters():
            if set_to_none:
                p.grad = None
            else:
                p.grad.zero_()
        out[f"zero_grad_set_to_none_{set_to_none}_ms"] = (time.perf_counter() - t0) * 1e3

    t0 = time.perf_counter()
    for _ in range(200):
        d.requires_grad_(False)
        d.requires_grad_(True)
    out["requires_grad_toggle_pair_ms"] = (time.perf_counter() - t0) / 200 * 1e3

    # Host syncs: count Tensor -> Python conversions during project steps (small preset).
    mode = project_mode("small")
    x, y = batch01()
    counts: dict[str, int] = {}
    originals = {}
    for name in ("item", "tolist", "numpy", "__float__", "__int__", "__bool__"):
        originals[name] = getattr(torch.Tensor, name)

        def wrapped(self: Any, *a: Any, _n: str = name, **k: Any) -> Any:
            caller = sys._getframe(1).f_code.co_filename  # whose conversion: optimizer or ours
            where = "torch.optim" if f"{os.sep}optim{os.sep}" in caller else Path(caller).name
            key = f"{_n} from {where}"
            counts[key] = counts.get(key, 0) + 1
            return originals[_n](self, *a, **k)

        setattr(torch.Tensor, name, wrapped)
    try:
        for _ in range(3):
            logs = mode.step(x, y)
    finally:
        for name, fn in originals.items():
            setattr(torch.Tensor, name, fn)
    out["syncs_in_3_project_steps"] = counts
    out["step_returns"] = {k: type(v).__name__ for k, v in logs.items()}
    return out


def worker_compile(cfg: dict[str, Any]) -> dict[str, Any]:
    """torch.compile of G and D in the reference step: compile time, then eager vs compiled.

    Inductor's caches go to a fresh folder, so the first step pays the whole (cold) compile,
    as the first run of a new network/preset would.
    """
    cache = tempfile.mkdtemp(prefix="bench_perf_inductor_")
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = cache  # before torch reads its inductor config
    import shutil

    import torch

    x, y = batch01()
    eager = Reference(cfg["preset"])
    comp = Reference(cfg["preset"])
    comp.G, comp.D = torch.compile(comp.G), torch.compile(comp.D)
    t0 = time.perf_counter()
    comp.step(x, y)
    first = time.perf_counter() - t0
    t0 = time.perf_counter()
    comp.step(x, y)
    second = time.perf_counter() - t0
    times = interleave(
        {"reference": lambda: eager.step(x, y), "reference+compile": lambda: comp.step(x, y)},
        1,
        cfg["rounds"],
    )
    base = median(times["reference"]["wall"])
    rows = [
        {"variant": k, **summary(t), "speedup": base / median(t["wall"])} for k, t in times.items()
    ]
    saved = base - median(times["reference+compile"]["wall"])
    shutil.rmtree(cache, ignore_errors=True)
    return {
        "rows": rows,
        "first_compiled_step_s": first,
        "second_compiled_step_s": second,
        "break_even_steps": (first - base) / saved if saved > 0 else None,
    }


WORKERS = {
    "train": worker_train,
    "infer": worker_infer,
    "hw": worker_hw,
    "scale": worker_scale,
    "adam": worker_adam,
    "cl": worker_cl,
    "data": worker_data,
    "misc": worker_misc,
    "loop": worker_loop,
    "threads": worker_threads,
    "compile": worker_compile,
}


# -- driver ------------------------------------------------------------------------------------


def spawn(cfg: dict[str, Any]) -> dict[str, Any]:
    """Run one configuration in a fresh interpreter; its JSON result with the loads around it."""
    load0 = load1()
    t0 = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, __file__, "--worker", json.dumps(cfg)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={**os.environ, **cfg.get("env", {})},
    )
    if proc.returncode:
        sys.exit(f"{cfg['name']} failed:\n{proc.stderr[-4000:]}")
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    res.update(config=cfg, seconds=time.perf_counter() - t0, load_around=[load0, load1()])
    print(
        f"done {cfg['name']} {cfg.get('variant', '')}: {res['seconds']:.0f} s, "
        f"load {load0} -> {load1()}",
        file=sys.stderr,
        flush=True,
    )
    return res


def pick(configs: list[dict[str, Any]], only: str | None) -> list[dict[str, Any]]:
    if not only:
        return configs
    names = set(only.split(","))
    return [c for c in configs if c["name"] in names]


def fmt(v: float, nd: int = 3) -> str:
    return f"{v:.{nd}f}"


def loads(r: dict[str, Any]) -> str:
    lo, hi = r["load"]
    return f"{lo:.1f}–{hi:.1f}"


def cmd_train(args: argparse.Namespace) -> dict[str, Any]:
    results = []
    for cfg in pick(TRAIN, args.only):
        results.append(spawn({**cfg, "warmup": args.warmup, "steps": args.steps}))
    lines = [
        "| preset | variant | step median (s) | min (s) | images/s | vs reference | "
        "GFLOP/step | GFLOP/s | of mm peak | CPU/wall | load |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for res in results:
        for r in res["rows"]:
            lines.append(
                f"| {res['config']['preset']} | {r['variant']} | {fmt(r['median_s'])} | "
                f"{fmt(r['min_s'])} | {fmt(r['images_per_s'], 2)} | "
                f"{fmt(r['speed_vs_reference'], 2)}× | {fmt(r['gflop_per_step'], 1)} | "
                f"{fmt(r['gflops_achieved'], 1)} | {r['fraction_of_mm_peak']:.0%} | "
                f"{fmt(r['cpu_per_wall'], 2)} | {loads(r)} |"
            )
    peaks = ", ".join(f"{r['config']['preset']} {r['mm_peak_gflops']:.0f}" for r in results)
    lines.append(f"\nmm peak (2048² fp32, best over the run's rounds) GFLOP/s: {peaks}")
    return {"results": results, "table": "\n".join(lines)}


def cmd_process(args: argparse.Namespace) -> dict[str, Any]:
    results = []
    for cfg in pick(PROCESS, args.only):
        rows: dict[str, list[dict[str, Any]]] = {v: [] for v in cfg["variants"]}
        for r in range(cfg["rounds"]):
            order = cfg["variants"] if r % 2 == 0 else cfg["variants"][::-1]
            for v in order:
                res = spawn({**cfg, "kind": "process", "variant": v})
                rows[v].append(res)
        results.append({"config": cfg, "runs": rows})
    lines = [
        "| preset | variant | steady images/s (runs) | median | ratio | metrics.jsonl 2nd "
        "interval images/s | wall (s) | peak RSS (MiB) | load |",
        "|---|---|---|---:|---:|---:|---:|---:|---|",
    ]
    for res in results:
        base = "reference" if "reference" in res["runs"] else res["config"]["variants"][0]
        ref = median([x["images_per_s"] for x in res["runs"][base]])
        for v, runs in res["runs"].items():
            ips = [x["images_per_s"] for x in runs]
            m = median(ips)
            lo = min(x["load"][0] for x in runs)
            hi = max(x["load"][1] for x in runs)
            lines.append(
                f"| {res['config']['preset']} | {v} | {', '.join(fmt(i) for i in ips)} | "
                f"{fmt(m)} | {fmt(m / ref, 2)}× {base} | "
                f"{', '.join(fmt(x['metrics_images_per_s']) for x in runs)} | "
                f"{fmt(median([x['wall_s'] for x in runs]), 1)} | "
                f"{max(x['peak_rss_mib'] for x in runs):.0f} | {lo:.1f}–{hi:.1f} |"
            )
    return {"results": results, "table": "\n".join(lines)}


def cmd_infer(args: argparse.Namespace) -> dict[str, Any]:
    results = [spawn(cfg) for cfg in pick(INFER, args.only)]
    lines = [
        f"| network | variant | seconds ({INFER_SLICES}×{INFER_SIZE}²) | MP/s | vs reference | "
        "GFLOP/s | of mm peak | CPU/wall | load |",
        "|---|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for res in results:
        c = res["config"]
        env = " (" + " ".join(f"{k}={v}" for k, v in c["env"].items()) + ")" if "env" in c else ""
        for r in res["rows"]:
            lines.append(
                f"| {c['net']} {c['preset']}{env} | {r['variant']} | {fmt(r['median_s'], 2)} | "
                f"{fmt(r['mpix_per_s'], 2)} | {fmt(r['speed_vs_reference'], 2)}× | "
                f"{fmt(r['gflops_achieved'], 1)} | {r['fraction_of_mm_peak']:.0%} | "
                f"{fmt(r['cpu_per_wall'], 2)} | {loads(r)} |"
            )
    diffs = ", ".join(
        f"{r['config']['net']} {r['config']['preset']} "
        f"{r['max_abs_diff_project_vs_reference']:.1e} (mm peak {r['mm_peak_gflops']:.0f})"
        for r in results
    )
    lines.append(f"\nmax |project − reference| of the outputs: {diffs}")
    return {"results": results, "table": "\n".join(lines)}


def cmd_hw(args: argparse.Namespace) -> dict[str, Any]:
    res = spawn(HW[0])
    lines = ["| measure | value |", "|---|---:|"]
    for n, g in res["mm_gflops"].items():
        lines.append(f"| fp32 torch.mm {n}², best of 9, GFLOP/s | {g:.1f} |")
    for preset, d in res["step_gflop"].items():
        for k, v in d.items():
            lines.append(f"| pix2pix {preset}: GFLOP {k} (256², batch 1) | {v:.2f} |")
    for k, v in res["slice_gflop_512"].items():
        lines.append(f"| {k}: GFLOP per 512² slice | {v:.2f} |")
    lines.append(f"| torch threads | {res['threads']} |")
    return {"results": [res], "table": "\n".join(lines)}


def cmd_scale(args: argparse.Namespace) -> dict[str, Any]:
    results = [spawn(cfg) for cfg in pick(SCALE, args.only)]
    lines = [
        "| slices × size | MP | seconds | MP/s | CPU s | peak RSS (MiB) | load |",
        "|---|---:|---:|---:|---:|---:|---|",
    ]
    for r in results:
        c = r["config"]
        lines.append(
            f"| {c['slices']} × {c['size']}² | {r['mpix']:.1f} | {r['seconds']:.1f} | "
            f"{r['mpix_per_s']:.2f} | {r['cpu_s']:.1f} | {r['peak_rss_mib']:.0f} | {loads(r)} |"
        )
    return {"results": results, "table": "\n".join(lines)}


def cmd_levers(args: argparse.Namespace) -> dict[str, Any]:
    configs = LEVERS + (COMPILE if args.compile else [])
    if args.only:
        configs = pick(LEVERS + COMPILE, args.only)
    results = [spawn(cfg) for cfg in configs]
    lines = []
    for res in results:
        c = res["config"]
        if "rows" in res:
            lines.append(f"\n{c['name']}:\n")
            lines.append("| variant | median (s) | min (s) | speedup | CPU/wall | load |")
            lines.append("|---|---:|---:|---:|---:|---|")
            for r in res["rows"]:
                what = r["variant"] + (f", {r['slice']}² b{r['batch']}" if "slice" in r else "")
                ratio = r.get("speedup", r.get("speed_vs_reference"))
                speed = f"{ratio:.2f}×" if ratio is not None else ""
                lines.append(
                    f"| {what} | {r['median_s']:.4f} | {r['min_s']:.4f} | {speed} | "
                    f"{r['cpu_per_wall']:.2f} | {loads(r)} |"
                )
            extra = {k: v for k, v in res.items() if k not in ("rows", "config", "load_around")}
            lines.append(f"\n{json.dumps(extra)}")
        else:
            extra = {k: v for k, v in res.items() if k not in ("config",)}
            lines.append(f"\n{c['name']}: {json.dumps(extra)}")
    return {"results": results, "table": "\n".join(lines)}


COMMANDS = {
    "train": cmd_train,
    "process": cmd_process,
    "infer": cmd_infer,
    "hw": cmd_hw,
    "scale": cmd_scale,
    "levers": cmd_levers,
}


def machine() -> dict[str, Any]:
    import torch
    from bench_predict import machine as cpu

    return {"cpu": cpu(), "torch": torch.__version__, "threads": torch.get_num_threads()}


def main() -> None:
    if len(sys.argv) == 3 and sys.argv[1] == "--worker":
        cfg = json.loads(sys.argv[2])
        fn = worker_process if cfg.get("kind") == "process" else WORKERS[cfg["kind"]]
        print(json.dumps(fn(cfg)))
        return
    if len(sys.argv) == 3 and sys.argv[1] == "--reference-train":
        reference_train(json.loads(sys.argv[2]))
        return
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("command", choices=[*COMMANDS, "all"])
    ap.add_argument("--json", type=Path, help="Write the results to this JSON file.")
    ap.add_argument("--json-dir", type=Path, help="all: one COMMAND.json per subcommand here.")
    ap.add_argument("--only", help="Comma-separated configuration names.")
    ap.add_argument("--warmup", type=int, default=3, help="train: untimed rounds.")
    ap.add_argument("--steps", type=int, default=8, help="train: timed rounds.")
    ap.add_argument("--compile", action="store_true", help="levers: add torch.compile.")
    args = ap.parse_args()
    commands = list(COMMANDS) if args.command == "all" else [args.command]
    for name in commands:
        t0 = time.perf_counter()
        res = COMMANDS[name](args)
        res.update(machine=machine(), seconds=time.perf_counter() - t0, load_end=load1())
        print(f"\n## {name} ({res['seconds']:.0f} s, {res['machine']['cpu']})\n")
        print(res["table"])
        target = args.json if args.command != "all" else None
        if args.command == "all" and args.json_dir:
            args.json_dir.mkdir(parents=True, exist_ok=True)
            target = args.json_dir / f"{name}.json"
        if target:
            target.write_text(json.dumps(res, indent=2, default=str) + "\n")


if __name__ == "__main__":
    with contextlib.suppress(BrokenPipeError):
        main()
