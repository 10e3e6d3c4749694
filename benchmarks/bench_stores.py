"""TIFF against OME-Zarr on this machine: write/read throughput, and peak RSS against slices.

Throughput: a ``Z x N²`` uint8 EM-like volume written slice by slice (``io.StackWriter``, an
uncompressed ImageJ TIFF; ``stores.StoreWriter``, OME-Zarr 0.5 with its pyramid, and with level
0 only) and read back slice by slice and as random 256² training crops; medians of ``--repeats``
rounds, the formats interleaved and their order reversed every other round. MB/s are of
uncompressed pixels; reads come from the page cache (files were just written), as a second
epoch of training would. Peak RSS: every measurement is its own child process that writes or
reads one volume slice by slice and reports ``getrusage(RUSAGE_SELF).ru_maxrss``; the same for
16 and 256 slices of 2048² shows whether memory grows with the volume. ``procs``: one volume
written by 1 process, then by 2 (each its chunk-aligned half, as under torchrun). ``predict``:
``cellp2p predict`` of one OME-Zarr volume into a store by 1 process and by torchrun's 2.
``predict_rss``: peak RSS of that prediction (one process) for 16 and 128 slices.
``train_rss``: peak RSS of ``cellp2p train`` (4 steps, small U-Net, 128² crops, 2 validation
slices) from an OME-Zarr volume and labels of 16 and 256 slices of 2048².

    .venv/bin/python benchmarks/bench_stores.py                 # ~2-3 min on 2 cores
    .venv/bin/python benchmarks/bench_stores.py --quick         # ~30 s, smaller volumes
    .venv/bin/python benchmarks/bench_stores.py --json out.json --only rss
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SIZES = {
    "default": dict(
        tp=(64, 1024),
        rss=[(16, 2048), (256, 2048)],
        procs=(128, 1024),
        repeats=3,
        predict=(32, 1024),
        predict_rss=[(16, 1024), (128, 1024)],
        train_rss=[(16, 2048), (256, 2048)],
    ),
    "quick": dict(
        tp=(16, 512),
        rss=[(8, 1024), (64, 1024)],
        procs=(16, 512),
        repeats=2,
        predict=(8, 512),
        predict_rss=[(16, 512), (128, 512)],
        train_rss=[(16, 512), (128, 512)],
    ),
}


def base_planes(size: int, labels: bool = False) -> np.ndarray:
    """Two EM-like slices (cellp2p.synth) of ``size``², or their labels, tiled up from 1024²
    to stay fast."""
    from cellp2p.synth import make_em

    tile = min(size, 1024)
    em = make_em(2, (tile, tile), seed=0)[int(labels)]
    reps = -(-size // tile)
    return np.stack([np.tile(p, (reps, reps))[:size, :size] for p in em])


def plane(base: np.ndarray, z: int) -> np.ndarray:
    """Slice ``z``: one of the base slices, shifted so that no two slices are equal."""
    return np.roll(base[z % len(base)], 17 * z, axis=1)


def base_file(tmp: Path, size: int, labels: bool = False) -> Path:
    """The base slices of ``size``² (or their labels), made once and saved for the child
    processes to load."""
    path = tmp / f"base{size}{'_labels' if labels else ''}.npy"
    if not path.exists():
        np.save(path, base_planes(size, labels))
    return path


def remove(path: Path) -> None:
    """Delete a file or a store folder."""
    if path.is_dir():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


def du(path: Path) -> int:
    """Bytes on disk under ``path`` (a file or a store folder)."""
    if path.is_file():
        return path.stat().st_size
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


# -- the operations timed ---------------------------------------------------------------------


def write_tiff(path: Path, base: np.ndarray, nz: int) -> None:
    from cellp2p.io import StackWriter

    n = base.shape[-1]
    with StackWriter(path, shape=(nz, n, n), dtype=np.uint8, spacing=(0.05, 0.004, 0.004)) as w:
        for z in range(nz):
            w.write(plane(base, z))


def write_zarr(path: Path, base: np.ndarray, nz: int, levels: int | None = None) -> None:
    from cellp2p.stores import StoreWriter

    n = base.shape[-1]
    with StoreWriter(
        path, shape=(nz, n, n), dtype=np.uint8, spacing=(0.05, 0.004, 0.004), levels=levels
    ) as w:
        for z in range(nz):
            w.write(plane(base, z))


def read_slices(path: Path) -> None:
    """Every slice into memory (a copy: a memory-mapped TIFF slice is otherwise never read)."""
    with open_any(path) as r:
        for z in range(len(r)):
            np.array(r[z], copy=True)


def read_crops(path: Path, ncrops: int = 200, size: int = 256) -> None:
    """Random ``size``² single-slice crops, as training draws them."""
    rng = np.random.default_rng(0)
    with open_any(path) as r:
        nz, h, w = r.shape
        for _ in range(ncrops):
            z, y, x = rng.integers(nz), rng.integers(h - size), rng.integers(w - size)
            if hasattr(r, "crop"):
                r.crop(slice(z, z + 1), slice(y, y + size), slice(x, x + size))
            else:
                np.ascontiguousarray(r[int(z)][y : y + size, x : x + size])


def open_any(path: Path) -> Any:
    """StoreReader for ``.zarr``, StackReader otherwise."""
    from cellp2p.io import StackReader
    from cellp2p.stores import StoreReader

    return StoreReader(path) if path.suffix == ".zarr" else StackReader(path)


def timed(fn: Callable[[], None]) -> tuple[float, float]:
    """(wall seconds, CPU seconds of this process) of one call."""
    c0, t0 = time.process_time(), time.perf_counter()
    fn()
    return time.perf_counter() - t0, time.process_time() - c0


# -- throughput --------------------------------------------------------------------------------


def bench_throughput(tmp: Path, nz: int, size: int, repeats: int) -> list[dict[str, Any]]:
    """Write / read / crop MB/s for TIFF, OME-Zarr and OME-Zarr without pyramid."""
    base = np.load(base_file(tmp, size))
    mb = nz * size * size / 1e6
    formats = {
        "tiff": (tmp / "v.tif", lambda p: write_tiff(p, base, nz)),
        "ome-zarr": (tmp / "v.zarr", lambda p: write_zarr(p, base, nz)),
        "ome-zarr level 0 only": (tmp / "v0.zarr", lambda p: write_zarr(p, base, nz, levels=1)),
    }
    times: dict[tuple[str, str], list[tuple[float, float]]] = {}
    for rnd in range(repeats):
        order = list(formats) if rnd % 2 == 0 else list(formats)[::-1]
        for name in order:
            path, write = formats[name]
            remove(path)
            times.setdefault((name, "write"), []).append(timed(lambda: write(path)))  # noqa: B023
            times.setdefault((name, "read"), []).append(timed(lambda: read_slices(path)))  # noqa: B023
            times.setdefault((name, "crops"), []).append(timed(lambda: read_crops(path)))  # noqa: B023
    rows = []
    for name, (path, _) in formats.items():
        row: dict[str, Any] = {"format": name, "volume": f"{nz} x {size}²", "MB": round(mb, 1)}
        for op in ("write", "read", "crops"):
            wall = statistics.median(t for t, _ in times[(name, op)])
            cpu = statistics.median(c for _, c in times[(name, op)])
            row[f"{op}_s"], row[f"{op}_cpu_s"] = round(wall, 3), round(cpu, 3)
            if op == "crops":
                row["crops_per_s"] = round(200 / wall, 1)
            else:
                row[f"{op}_MB_s"] = round(mb / wall, 1)
        row["disk_MB"] = round(du(path) / 1e6, 1)
        rows.append(row)
    return rows


# -- peak RSS, one child process per measurement ----------------------------------------------


def status_kib(field: str) -> int | None:
    """A ``/proc/self/status`` figure (VmRSS, VmHWM) in KiB, or None off Linux."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def child(args: dict[str, Any]) -> dict[str, Any]:
    """Run one measurement in this (fresh) process and report its peak RSS.

    ``ru_maxrss`` (getrusage) is the peak over the process's whole life, imports included; the
    peak of the operation alone is VmHWM after resetting it (``/proc/self/clear_refs``) once
    the imports and the base slices are in.
    """
    import zarr  # noqa: F401  (what either format imports, in the baseline too)

    import cellp2p.io
    import cellp2p.stores  # noqa: F401

    path, nz = Path(args["path"]), args["slices"]
    base = np.load(args["base"])
    with contextlib.suppress(OSError):
        Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
    before = status_kib("VmRSS") or resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.perf_counter()
    if args["op"] == "write":
        (write_tiff if args["format"] == "tiff" else write_zarr)(path, base, nz)
    else:
        read_slices(path)
    seconds = time.perf_counter() - t0
    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    peak = status_kib("VmHWM") or maxrss
    return {"peak_MiB": round(peak / 1024, 1), "baseline_MiB": round(before / 1024, 1),
            "growth_MiB": round((peak - before) / 1024, 1),
            "ru_maxrss_MiB": round(maxrss / 1024, 1), "seconds": round(seconds, 2)}  # fmt: skip


def run_child(**args: Any) -> dict[str, Any]:
    """Run :func:`child` in a fresh interpreter and return what it reports."""
    cmd = [sys.executable, __file__, "--child", json.dumps(args)]
    out = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if out.returncode:
        raise SystemExit(f"child {args} failed:\n{out.stderr}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def bench_rss(tmp: Path, configs: list[tuple[int, int]]) -> list[dict[str, Any]]:
    """Peak RSS of writing then reading TIFF and OME-Zarr, for each (slices, size)."""
    rows = []
    for fmt, suffix in (("tiff", ".tif"), ("ome-zarr", ".zarr")):
        for nz, size in configs:
            path, base = tmp / f"rss{nz}{suffix}", str(base_file(tmp, size))
            for op in ("write", "read"):
                res = run_child(path=str(path), base=base, slices=nz, op=op, format=fmt)
                rows.append({"format": fmt, "op": op, "slices": nz, "size": size, **res})
            remove(path)
    return rows


# -- one volume, 1 or 2 processes ---------------------------------------------------------------


_RANK = """
import json, sys, time, numpy as np
sys.path.insert(0, sys.argv[1])
from bench_stores import plane
from cellp2p.stores import StoreWriter, slice_range
path, base, (nz, size, rank, world) = sys.argv[2], np.load(sys.argv[3]), map(int, sys.argv[4:])
t0 = time.perf_counter()
w = StoreWriter(path, shape=(nz, size, size), dtype=np.uint8, resume=True, finalize_on_close=False)
for z in slice_range(nz, w.chunk_slices, rank, world):
    w.write_slice(z, plane(base, z))
w.close()
print(json.dumps({"write_s": time.perf_counter() - t0}))
"""


def bench_procs(tmp: Path, nz: int, size: int) -> list[dict[str, Any]]:
    """Wall time of writing one store from 1 process and from 2 (disjoint chunk ranges)."""
    from cellp2p.stores import StoreWriter

    rows, base = [], str(base_file(tmp, size))
    for world in (1, 2):
        path = tmp / f"procs{world}.zarr"
        t0 = time.perf_counter()
        main = StoreWriter(path, shape=(nz, size, size), dtype=np.uint8, finalize_on_close=False)
        args = [str(Path(__file__).parent), str(path), base, str(nz), str(size)]
        cmd = [sys.executable, "-c", _RANK, *args]
        procs = [
            subprocess.Popen([*cmd, str(r), str(world)], stdout=subprocess.PIPE, text=True)
            for r in range(world)
        ]
        outs = [p.communicate()[0] for p in procs]
        if any(p.returncode for p in procs):
            raise SystemExit(f"a writer of {path} failed")
        main.finalize()
        wall = time.perf_counter() - t0
        slowest = max(json.loads(o.strip().splitlines()[-1])["write_s"] for o in outs)
        rows.append({"processes": world, "volume": f"{nz} x {size}²", "seconds": round(wall, 2),
                     "MB_s": round(nz * size * size / 1e6 / wall, 1),
                     "slowest_rank_write_s": round(slowest, 2)})  # fmt: skip
        shutil.rmtree(path)
    return rows


# -- prediction through a store: 1 process against 2 ----------------------------------------


def tiny_run(tmp: Path) -> Path:
    """A small U-Net (depth 2, base 8) trained for a few steps on synthetic EM: a checkpoint."""
    from cellp2p.config import TrainConfig
    from cellp2p.io import write_stack
    from cellp2p.synth import make_em

    vol, lab = make_em(4, (64, 64), seed=0)
    v, lb = write_stack(tmp / "tv.tif", vol), write_stack(tmp / "tl.tif", lab)
    cfg = TrainConfig(volume=str(v), labels=str(lb), crop=32, batch_size=2, max_steps=2,
                      eval_every=2, device="cpu", quiet=True,
                      model_overrides={"depth": 2, "base": 8})  # fmt: skip
    from cellp2p.train import train

    train(cfg, tmp / "run")
    return tmp / "run"


def bench_predict(tmp: Path, nz: int, size: int) -> list[dict[str, Any]]:
    """Wall time of ``cellp2p predict`` of one OME-Zarr volume into a store: 1 vs 2 processes.

    1 process with 2 threads and with 1; 2 processes (torchrun, gloo) with 1 thread each, each
    predicting its chunk-aligned half of the volume. Times include starting Python and torch.
    """
    run = tiny_run(tmp)
    src = tmp / "in.zarr"
    write_zarr(src, np.load(base_file(tmp, size)), nz)
    pred = [sys.executable, "-m", "cellp2p", "predict", str(src), "--model", str(run)]
    pred += ["--device", "cpu", "--quiet", "--force"]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    rows = []
    for procs, threads in ((1, 2), (1, 1), (2, 1)):
        out = tmp / f"pred{procs}x{threads}.zarr"
        cmd = pred if procs == 1 else [*torchrun, f"--nproc_per_node={procs}", *pred[1:]]
        env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONWARNINGS": "ignore"}
        env["PYTHONPATH"] = str(ROOT)
        t0 = time.perf_counter()
        subprocess.run([*cmd, "-o", str(out)], check=True, env=env, capture_output=True)
        wall = time.perf_counter() - t0
        rows.append({"processes": procs, "threads_each": threads, "volume": f"{nz} x {size}²",
                     "seconds": round(wall, 2), "slices_per_s": round(nz / wall, 2)})  # fmt: skip
    from cellp2p.io import read_stack

    ref = read_stack(tmp / "pred1x1.zarr").data
    for row in rows:
        got = read_stack(tmp / f"pred{row['processes']}x{row['threads_each']}.zarr").data
        row["max_abs_diff_vs_1x1"] = float(np.abs(got - ref).max())
    return rows


def bench_predict_rss(tmp: Path, configs: list[tuple[int, int]]) -> list[dict[str, Any]]:
    """Peak RSS of ``cellp2p predict`` store -> store (1 process, 1 thread) against slices."""
    run = tiny_run(tmp) if not (tmp / "run").is_dir() else tmp / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    env["PYTHONPATH"] = str(ROOT)
    rows = []
    for nz, size in configs:
        src, out = tmp / f"rss{nz}_{size}.zarr", tmp / f"rss{nz}_{size}_pred.zarr"
        write_zarr(src, np.load(base_file(tmp, size)), nz)
        cmd = [sys.executable, "-m", "cellp2p", "predict", str(src), "--model", str(run)]
        cmd += ["-o", str(out), "--device", "cpu", "--quiet", "--force"]
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL)
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        if proc.returncode:
            raise SystemExit(f"predict of {src} failed ({proc.returncode})")
        rows.append({"slices": nz, "size": size, "peak_MiB": round(usage.ru_maxrss / 1024, 1),
                     "seconds": round(time.perf_counter() - t0, 2)})  # fmt: skip
        remove(src)
        remove(out)
    first = rows[0]["peak_MiB"]
    for row in rows:
        row["vs_first"] = f"{100 * (row['peak_MiB'] / first - 1):+.1f} %"
    return rows


def train_command(vol: Path, lab: Path, out: Path, nz: int) -> list[str]:
    """``cellp2p train`` for a few steps (small U-Net, 128² crops), validated on 2 slices."""
    cmd = [sys.executable, "-m", "cellp2p", "train", "--volume", str(vol), "--labels", str(lab)]
    cmd += [
        "--out",
        str(out),
        "--train-slices",
        f"0-{nz - 3}",
        "--val-slices",
        f"{nz - 2}-{nz - 1}",
    ]
    cmd += ["--max-steps", "4", "--eval-every", "4", "--crop", "128", "--batch-size", "2"]
    return [*cmd, "--device", "cpu", "--quiet"]


def bench_train_rss(tmp: Path, configs: list[tuple[int, int]]) -> list[dict[str, Any]]:
    """Peak RSS of ``cellp2p train`` from an OME-Zarr volume and labels (crops read lazily),
    each run its own process (``wait4``'s ru_maxrss), for each (slices, size)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    env["PYTHONPATH"] = str(ROOT)
    rows = []
    for nz, size in configs:
        vol, lab = tmp / f"train{nz}_v.zarr", tmp / f"train{nz}_l.zarr"
        write_zarr(vol, np.load(base_file(tmp, size)), nz, levels=1)
        write_zarr(lab, np.load(base_file(tmp, size, labels=True)), nz, levels=1)
        t0 = time.perf_counter()
        proc = subprocess.Popen(train_command(vol, lab, tmp / f"train{nz}_run", nz), env=env,
                                stdout=subprocess.DEVNULL)  # fmt: skip
        _, status, usage = os.wait4(proc.pid, 0)
        if os.waitstatus_to_exitcode(status):
            raise SystemExit(f"train from {vol} failed")
        rows.append({"slices": nz, "size": size, "volume_MB": round(nz * size * size / 1e6),
                     "peak_MiB": round(usage.ru_maxrss / 1024, 1),
                     "seconds": round(time.perf_counter() - t0, 2)})  # fmt: skip
        for path in (vol, lab, tmp / f"train{nz}_run"):
            remove(path)
    first = rows[0]["peak_MiB"]
    for row in rows:
        row["vs_first"] = f"{100 * (row['peak_MiB'] / first - 1):+.1f} %"
    return rows


# -- report -----------------------------------------------------------------------------------


def table(rows: list[dict[str, Any]], cols: list[str]) -> str:
    """A plain fixed-width table of ``cols``."""
    cells = [[str(r.get(c, "")) for c in cols] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(cols)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(cols, widths, strict=True))]
    lines += ["  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)) for row in cells]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    """Run the chosen benchmarks, print their tables, and optionally save JSON."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="smaller volumes (~30 s)")
    ap.add_argument(
        "--only",
        default="throughput,rss,procs,predict,predict_rss,train_rss",
        help="comma-separated sections",
    )
    ap.add_argument("--json", type=Path, help="also write the results to this file")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        print(json.dumps(child(json.loads(args.child))))
        return
    sizes = SIZES["quick" if args.quick else "default"]
    only = set(args.only.split(","))
    result: dict[str, Any] = {
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, {platform.python_version()}",
        "load_avg_start": os.getloadavg()[0],
    }
    with tempfile.TemporaryDirectory(prefix="bench_stores_") as d:
        tmp = Path(d)
        if "throughput" in only:
            nz, size = sizes["tp"]
            result["throughput"] = rows = bench_throughput(tmp, nz, size, sizes["repeats"])
            print(table(rows, ["format", "volume", "write_MB_s", "write_cpu_s", "read_MB_s",
                               "read_cpu_s", "crops_per_s", "disk_MB"]), "\n")  # fmt: skip
        if "rss" in only:
            result["rss"] = rows = bench_rss(tmp, sizes["rss"])
            cols = ["format", "op", "slices", "size", "peak_MiB", "growth_MiB", "ru_maxrss_MiB"]
            cols.append("seconds")
            print(table(rows, cols), "\n")
        if "procs" in only:
            result["procs"] = rows = bench_procs(tmp, *sizes["procs"])
            print(table(rows, ["processes", "volume", "seconds", "MB_s", "slowest_rank_write_s"]))
            print()
        if "predict" in only:
            result["predict"] = rows = bench_predict(tmp, *sizes["predict"])
            cols = ["processes", "threads_each", "volume", "seconds", "slices_per_s"]
            print(table(rows, [*cols, "max_abs_diff_vs_1x1"]), "\n")
        if "predict_rss" in only:
            result["predict_rss"] = rows = bench_predict_rss(tmp, sizes["predict_rss"])
            print(table(rows, ["slices", "size", "peak_MiB", "vs_first", "seconds"]), "\n")
        if "train_rss" in only:
            result["train_rss"] = rows = bench_train_rss(tmp, sizes["train_rss"])
            cols = ["slices", "size", "volume_MB", "peak_MiB", "vs_first", "seconds"]
            print(table(rows, cols), "\n")
    result["load_avg_end"] = os.getloadavg()[0]
    print(f"load average (1 min): {result['load_avg_start']:.2f} -> {result['load_avg_end']:.2f}")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
