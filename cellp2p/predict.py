"""``cellp2p predict``: trained networks applied to whole stacks, streamed slice by slice.

Per slice: raw pixels → the run's input :class:`Normalization` → network → [0, 1]
(:func:`cellp2p.outputs.to_unit`) → the requested output (probabilities, mask, instance labels,
or the image back in the target's dtype and range). The predictor (:mod:`cellp2p.predictor`)
tiles slices as :mod:`cellp2p.tiling` plans; this module checks every input and output first,
plans one job per stack, then streams each (StackReader → StackWriter's temporary file,
renamed when complete), so memory does not grow with the number of slices.
"""

from __future__ import annotations

import contextlib
import ctypes
import mmap
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from cellp2p.checks import check_finite_slice
from cellp2p.errors import CellP2PError
from cellp2p.predictor import Predictor, load_predictor
from cellp2p.slices import parse_slices
from cellp2p.tiling import check_tiling


class _NeedsWiderLabels(Exception):
    """A slice holds more than 65535 objects: the stack is rewritten as uint32."""


@dataclass
class Job:
    """One input stack, what is known of it before predicting, and where it goes."""

    src: Path
    shape: tuple[int, ...]
    spacing: tuple[float, float, float] | None
    unit: str
    dtype: np.dtype
    ids: list[int]
    dst: Path = field(default=Path())


@dataclass(frozen=True)
class RunOptions:
    """How every job is predicted and written."""

    kind: str
    threshold: float
    tile: int | None
    overlap: float
    batch_size: int
    force: bool
    quiet: bool


def predict_stack(
    inputs: Sequence[str | Path],
    model: str | Path,
    *,
    out: str | Path | None = None,
    output: str = "auto",
    threshold: float = 0.5,
    tile: int | None = None,
    overlap: float = 0.25,
    tta: bool = False,
    batch_size: int = 4,
    device: str = "auto",
    force: bool = False,
    quiet: bool = False,
    test_time_dropout: bool = False,
    slices: str | Sequence[int] | None = None,
) -> list[Path]:
    """Predict each stack (TIFF, 2D image or folder of images) into a TIFF; returns the paths.

    Everything is checked before any computing: inputs readable with the model's channel
    count and free of NaN/inf, the checkpoint, the options, and that no output exists (unless
    ``force``). Outputs are written slice by slice to a temporary file renamed when complete.
    ``slices`` (``"25-29"`` or indices) predicts only those slices of every input.
    Under torchrun each process checks everything, then predicts its share of the stacks.
    """
    from cellp2p import distributed

    check_options(inputs, threshold, tile, overlap, batch_size)
    jobs = plan_jobs(inputs, slices)
    world = distributed.setup(device)  # under torchrun: joins the group, on cuda:LOCAL_RANK
    device = str(world.device) if world.size > 1 else device
    predictor = load_predictor(model, device, tta=tta, test_time_dropout=test_time_dropout)
    kind = predictor.resolve_output(output)
    check_jobs(jobs, predictor, out, force)
    if test_time_dropout and predictor.n_dropout == 0 and not quiet:
        print(
            "note: --test-time-dropout: this network has no dropout layers; output is "
            "deterministic",
            file=sys.stderr,
        )
    # Rank r takes stacks r, r+W, ... (and returns those); only rank 0 shows progress.
    jobs = world.shard(jobs)
    quiet = quiet or not world.is_main
    run_jobs(jobs, predictor, RunOptions(kind, threshold, tile, overlap, batch_size, force, quiet))
    return [job.dst for job in jobs]


# -- checks and planning -----------------------------------------------------------------------


def check_options(
    inputs: Sequence[str | Path], threshold: float, tile: int | None, overlap: float, batch: int
) -> None:
    """The option values, before anything is read."""
    if not inputs:
        raise CellP2PError("no input: give one or more stacks, images or folders")
    check_tiling(tile, overlap, batch)
    if not 0 <= threshold <= 1:
        raise CellP2PError(f"--threshold {threshold}: give a probability in [0, 1]")


def plan_jobs(inputs: Sequence[str | Path], slices: str | Sequence[int] | None) -> list[Job]:
    """One job per input: its shape, spacing, dtype and the slices to predict."""
    from cellp2p.io import StackReader

    jobs = []
    for src in map(Path, inputs):
        with StackReader(src) as reader:
            n = len(reader)
            ids = parse_slices(slices, n) or list(range(n))
            shape, dtype = tuple(reader.shape), np.dtype(reader.dtype)
            jobs.append(Job(src, shape, reader.spacing, reader.unit, dtype, ids))
    return jobs


def check_jobs(
    jobs: Sequence[Job], predictor: Predictor, out: str | Path | None, force: bool
) -> None:
    """Channels, free output names (set as each job's ``dst``) and finite float inputs."""
    from cellp2p.fsutil import check_output
    from cellp2p.io import StackReader

    for job in jobs:
        nchan = 1 if len(job.shape) == 3 else job.shape[1]
        if nchan != predictor.in_channels:
            raise CellP2PError(
                f"{job.src}: {nchan} channel(s) but the model was trained on "
                f"{predictor.in_channels}; give a stack with {predictor.in_channels} channel(s)"
            )
    for job, dst in zip(jobs, output_paths([j.src for j in jobs], out), strict=True):
        job.dst = check_output(dst, force)
    # Float stacks are scanned for NaN/inf first, so a bad slice in the last input does not
    # leave the earlier ones written.
    for job in jobs:
        if np.issubdtype(job.dtype, np.floating):
            with StackReader(job.src) as reader:
                for i in job.ids:
                    check_finite_slice(reader[i], str(job.src), i)
                    _drop_mapped_pages(reader)


# -- running -----------------------------------------------------------------------------------


def run_jobs(jobs: Sequence[Job], predictor: Predictor, options: RunOptions) -> None:
    """Predict every job, with one progress bar over all slices."""
    from tqdm import tqdm

    _flat_heap()
    total = sum(len(job.ids) for job in jobs)
    overall = tqdm(
        total=total,
        desc="predict",
        unit="slice",
        disable=options.quiet,
        file=sys.stderr,
        position=0,
    )
    try:
        for job in jobs:
            done = overall.n
            try:
                predict_job(job, predictor, options, overall)
            except _NeedsWiderLabels:
                overall.n = done  # rare: more than 65535 objects in a slice; redo as uint32
                predict_job(job, predictor, options, overall, label_dtype=np.uint32)
    finally:
        overall.close()


def predict_job(
    job: Job,
    predictor: Predictor,
    options: RunOptions,
    overall: Any,
    label_dtype: type = np.uint16,
) -> None:
    """One stack into one TIFF, ``batch_size`` slices per forward when a slice is one window."""
    from tqdm import tqdm

    from cellp2p.io import StackReader, StackWriter

    kind = options.kind
    plane, dtype = predictor.output_plane(kind, job.shape[-2:])
    if kind == "labels":
        dtype = np.dtype(label_dtype)
    group = options.batch_size if predictor.single_window(job.shape, options.tile) else 1
    bar = tqdm(
        total=len(job.ids),
        desc=job.src.name,
        unit="slice",
        leave=False,
        disable=options.quiet,
        file=sys.stderr,
        position=1,
    )
    layout = {"shape": (len(job.ids), *plane), "dtype": dtype, "spacing": job.spacing}
    try:
        with (
            StackReader(job.src) as reader,
            StackWriter(job.dst, unit=job.unit, force=options.force, **layout) as writer,
        ):
            for start in range(0, len(job.ids), group):
                ids = job.ids[start : start + group]
                for result in _predict_group(reader, job, ids, predictor, options):
                    if kind == "labels" and result.dtype.itemsize > dtype.itemsize:
                        raise _NeedsWiderLabels
                    writer.write(result)
                bar.update(len(ids))
                overall.update(len(ids))
    finally:
        bar.close()


def _predict_group(
    reader: Any, job: Job, ids: Sequence[int], predictor: Predictor, options: RunOptions
) -> Iterator[np.ndarray]:
    """The outputs of slices ``ids`` of a stack, predicted in one batch, one at a time."""
    planes = [reader[i] for i in ids]
    _drop_mapped_pages(reader)
    source = f"{job.src} slice {ids[0]}"
    probs = predictor.predict_slices(
        planes, options.tile, options.overlap, options.batch_size, source
    )
    for prob in probs:
        yield predictor.to_output(prob, options.kind, options.threshold)


# -- output names and memory -------------------------------------------------------------------


def default_output(path: str | Path) -> Path:
    """``NAME_pred.tif`` next to a file, ``FOLDER_pred.tif`` beside a folder."""
    path = Path(path)
    if path.is_dir():
        return path.with_name(f"{path.name}_pred.tif")
    name = path.name
    for suffix in (".ome.tiff", ".ome.tif", *(s for s in (path.suffix,) if s)):
        if name.lower().endswith(suffix):
            name = name[: -len(suffix)]
            break
    return path.with_name(f"{name}_pred.tif")


def output_paths(inputs: Sequence[Path], out: str | Path | None) -> list[Path]:
    """Where each input's prediction goes: ``-o`` is a file for one input, else a folder."""
    if out is None:
        paths = [default_output(p) for p in inputs]
    else:
        out = Path(out)
        as_file = out.suffix.lower() in (".tif", ".tiff") and not out.is_dir()
        if as_file and len(inputs) > 1:
            raise CellP2PError(
                f"-o {out}: {len(inputs)} inputs need an output folder, not a file name"
            )
        if not as_file and out.suffix and not out.is_dir():
            raise CellP2PError(f"-o {out}: give a .tif file name or a folder")
        paths = [out] if as_file else [out / default_output(p).name for p in inputs]
    seen: dict[Path, Path] = {}
    sources = {p.resolve() for p in inputs}
    for src, dst in zip(inputs, paths, strict=True):
        key = dst.resolve()
        if key in seen:
            raise CellP2PError(
                f"{src} and {seen[key]} would both be written to {dst}; predict them in "
                "separate calls or rename one"
            )
        if key in sources:
            raise CellP2PError(f"{dst}: is an input; choose another output name")
        seen[key] = src
    return paths


def _drop_mapped_pages(reader: Any) -> None:
    """Release the pages of a memory-mapped stack already read.

    An uncompressed TIFF is memory-mapped by StackReader; touched pages stay in the process's
    resident set, which would then grow with the number of slices (they remain in the page
    cache; re-reading them is cheap).
    """
    raw = getattr(getattr(reader, "_mm", None), "_mmap", None)
    if raw is not None and hasattr(mmap, "MADV_DONTNEED"):
        with contextlib.suppress(OSError, ValueError, AttributeError):
            raw.madvise(mmap.MADV_DONTNEED)


def _flat_heap() -> None:
    """Fix glibc's mmap threshold, so slice-sized tensors go back to the OS when freed.

    glibc raises the threshold after each large free; slice-sized tensors then come from the
    heap, whose fragmentation made the peak RSS creep up with the number of slices (+11% from
    16 to 128 slices of 1024x1024); with a fixed threshold the peak is flat (and lower).
    Process-wide and permanent, harmless elsewhere: other platforms are left alone.
    """
    if not sys.platform.startswith("linux"):
        return
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):  # not glibc (e.g. musl)
        return
    mallopt(-3, 1 << 20)  # M_MMAP_THRESHOLD = 1 MiB
