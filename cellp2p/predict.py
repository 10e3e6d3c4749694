"""``cellp2p predict``: trained networks applied to whole stacks, streamed slice by slice.

Per slice: raw pixels → the run's input :class:`Normalization` → network → [0, 1]
(:func:`cellp2p.outputs.to_unit`) → the requested output (probabilities, mask, instance labels,
or the image back in the target's dtype and range). The predictor (:mod:`cellp2p.predictor`)
tiles slices as :mod:`cellp2p.tiling` plans; this module checks every input and output first,
plans one job per stack, then streams each (StackReader → StackWriter's temporary file,
renamed when complete), so memory does not grow with the number of slices.

A ``.zarr`` output is an OME-Zarr store (:class:`cellp2p.stores.StoreWriter`) written chunk by
chunk as computed: an interrupted one stays incomplete and ``--resume`` computes only what is
missing. Under torchrun, one volume with a ``.zarr`` output is split between the processes in
whole chunks (:func:`predict_split`); many inputs are shared out one stack per process.
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
    skip: bool = False  # a finished store under --resume: nothing left to compute
    label_dtype: type = np.uint16  # uint32 when resuming a store already widened


@dataclass(frozen=True)
class RunOptions:
    """How every job is predicted and written."""

    kind: str
    threshold: float | None  # None: 0.5 for masks, the tuned one for labels
    tile: int | None
    overlap: float
    batch_size: int
    force: bool
    quiet: bool
    resume: bool = False
    level: int = 0


def predict_stack(
    inputs: Sequence[str | Path],
    model: str | Path,
    *,
    out: str | Path | None = None,
    output: str = "auto",
    threshold: float | None = None,
    tile: int | None = None,
    overlap: float = 0.25,
    tta: bool | None = None,
    batch_size: int = 4,
    device: str = "auto",
    precision: str = "auto",
    force: bool = False,
    quiet: bool = False,
    test_time_dropout: bool = False,
    slices: str | Sequence[int] | None = None,
    resume: bool = False,
    level: int = 0,
) -> list[Path]:
    """Predict each stack (TIFF, image, folder or store) into a TIFF or a store; the paths.

    Everything is checked before any computing: inputs readable with the model's channel
    count and free of NaN/inf, the checkpoint, the options, and that no output exists (unless
    ``force``). Outputs are written slice by slice to a temporary file renamed when complete.
    ``slices`` (``"25-29"`` or indices) predicts only those slices of every input.
    Under torchrun each process checks everything, then predicts its share of the stacks
    (or, for one volume into a ``.zarr`` store, its share of the volume's chunks).
    ``resume`` finishes interrupted ``.zarr`` outputs; ``level`` is the OME-Zarr input level.
    """
    from cellp2p import distributed

    check_options(inputs, threshold, tile, overlap, batch_size)
    if force and resume:
        raise CellP2PError("--force and --resume exclude each other; pass one")
    jobs = plan_jobs(inputs, slices, level)
    world = distributed.setup(device)  # under torchrun: joins the group, on cuda:LOCAL_RANK
    device = str(world.device) if world.size > 1 else device
    predictor = load_predictor(
        model, device, tta=tta, test_time_dropout=test_time_dropout, precision=precision
    )
    kind = predictor.resolve_output(output)
    check_jobs(jobs, predictor, out, force, resume=resume, level=level, kind=kind, world=world)
    for job in (j for j in jobs if j.skip and world.is_main):  # said even with --quiet
        print(f"{job.dst}: already finished; nothing to resume (--force writes it again)",
              file=sys.stderr)  # fmt: skip
    if test_time_dropout and predictor.n_dropout == 0 and not quiet:
        print(
            "note: --test-time-dropout: this network has no dropout layers; output is "
            "deterministic",
            file=sys.stderr,
        )
    quiet = quiet or not world.is_main
    options = RunOptions(
        kind, threshold, tile, overlap, batch_size, force, quiet, resume=resume, level=level
    )
    if is_split(jobs, world):
        world.barrier()  # every process has checked the output before rank 0 creates it
        predict_split(jobs[0], predictor, options, world)
        return [jobs[0].dst] if world.is_main and not jobs[0].skip else []
    # Rank r takes stacks r, r+W, ... (and returns those); only rank 0 shows progress.
    jobs = world.shard(jobs)
    run_jobs(jobs, predictor, options)
    return [job.dst for job in jobs if not job.skip]


# -- checks and planning -----------------------------------------------------------------------


def check_options(
    inputs: Sequence[str | Path],
    threshold: float | None,
    tile: int | None,
    overlap: float,
    batch: int,
) -> None:
    """The option values, before anything is read."""
    if not inputs:
        raise CellP2PError("no input: give one or more stacks, images or folders")
    check_tiling(tile, overlap, batch)
    if threshold is not None and not 0 <= threshold <= 1:
        raise CellP2PError(f"--threshold {threshold}: give a probability in [0, 1]")


def plan_jobs(
    inputs: Sequence[str | Path], slices: str | Sequence[int] | None, level: int = 0
) -> list[Job]:
    """One job per input: its shape, spacing, dtype and the slices to predict."""
    from cellp2p.io import open_stack
    from cellp2p.stores import is_store

    if level and not any(is_store(p) for p in inputs):
        raise CellP2PError(f"--level {level}: only an OME-Zarr input has pyramid levels")
    jobs = []
    for src in map(Path, inputs):
        with open_stack(src, level=level if is_store(src) else 0) as reader:
            n = len(reader)
            ids = parse_slices(slices, n) or list(range(n))
            shape, dtype = tuple(reader.shape), np.dtype(reader.dtype)
            jobs.append(Job(src, shape, reader.spacing, reader.unit, dtype, ids))
    return jobs


def check_jobs(
    jobs: Sequence[Job],
    predictor: Predictor,
    out: str | Path | None,
    force: bool,
    *,
    resume: bool = False,
    level: int = 0,
    kind: str = "auto",
    world: Any = None,
) -> None:
    """Channels, free output names (set as each job's ``dst``) and finite float inputs."""
    from cellp2p.fsutil import check_output

    for job in jobs:
        nchan = 1 if len(job.shape) == 3 else job.shape[1]
        if nchan != predictor.in_channels:
            raise CellP2PError(
                f"{job.src}: {nchan} channel(s) but the model was trained on "
                f"{predictor.in_channels}; give a stack with {predictor.in_channels} channel(s)"
            )
    kind = predictor.resolve_output(kind)
    dsts = output_paths([j.src for j in jobs], out)
    if resume and not any(is_zarr(d) for d in dsts):
        raise CellP2PError("--resume finishes an interrupted .zarr output; give -o NAME.zarr")
    for job, dst in zip(jobs, dsts, strict=True):
        if is_zarr(dst):
            job.dst = check_store_job(job, dst, predictor, kind, force, resume)
        else:
            job.dst = check_output(dst, force, create=False)
    check_finite_inputs(jobs, level, world)


def is_split(jobs: Sequence[Job], world: Any) -> bool:
    """Whether one volume is predicted by several processes into one store (its chunks split)."""
    return world is not None and world.size > 1 and len(jobs) == 1 and is_zarr(jobs[0].dst)


def check_finite_inputs(jobs: Sequence[Job], level: int = 0, world: Any = None) -> None:
    """Scan float stacks for NaN/inf first, so a bad slice in the last input does not leave the
    earlier ones written.

    One volume split over processes (:func:`is_split`): each scans its share of the slices, and
    a NaN found by any stops every process with that one error, before anything is written.
    """
    from cellp2p.io import open_stack
    from cellp2p.stores import is_store, slice_range

    split, error = is_split(jobs, world), None
    try:
        for job in (j for j in jobs if np.issubdtype(j.dtype, np.floating)):
            ids = job.ids
            if split:
                ids = [ids[k] for k in slice_range(len(ids), 1, world.rank, world.size)]
            with open_stack(job.src, level=level if is_store(job.src) else 0) as reader:
                for i in ids:
                    check_finite_slice(reader[i], str(job.src), i)
                    _drop_mapped_pages(reader)
    except CellP2PError as err:
        if not split:
            raise
        error = str(err)
    if split and (error := world.first_error(error)):
        raise CellP2PError(error)


# -- running -----------------------------------------------------------------------------------


def run_jobs(jobs: Sequence[Job], predictor: Predictor, options: RunOptions) -> None:
    """Predict every job, with one progress bar over all slices."""
    from tqdm import tqdm

    _flat_heap()
    jobs = [job for job in jobs if not job.skip]
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
                predict_job(job, predictor, options, overall, label_dtype=job.label_dtype)
            except _NeedsWiderLabels:
                overall.n = done  # rare: more than 65535 objects in a slice; redo as uint32
                predict_job(job, predictor, options, overall, label_dtype=np.uint32, redo=True)
    finally:
        overall.close()


def predict_job(
    job: Job,
    predictor: Predictor,
    options: RunOptions,
    overall: Any,
    label_dtype: type = np.uint16,
    redo: bool = False,
) -> None:
    """One stack into one TIFF or store, ``batch_size`` slices per forward when it fits."""
    from tqdm import tqdm

    from cellp2p.io import StackWriter, open_stack

    layout = job_layout(job, predictor, options.kind, label_dtype)
    writer: Any
    if is_zarr(job.dst):  # redo: replace the incomplete uint16 store just started
        kw = {"force": True, "resume": False} if redo else {}
        writer = store_writer(job, options, layout, **kw)
        todo = writer.missing()
    else:
        writer = StackWriter(job.dst, unit=job.unit, force=options.force, **layout)
        todo = list(range(len(job.ids)))
    if len(todo) < len(job.ids):  # resumed: the slices already written are not redone
        overall.total -= len(job.ids) - len(todo)
        overall.refresh()
    bar = tqdm(
        total=len(todo),
        desc=job.src.name,
        unit="slice",
        leave=False,
        disable=options.quiet,
        file=sys.stderr,
        position=1,
    )
    try:
        with open_stack(job.src, level=_level(job, options)) as reader, writer:
            _write_slices(reader, writer, job, todo, predictor, options, (bar, overall))
    finally:
        bar.close()


def _write_slices(
    reader: Any,
    writer: Any,
    job: Job,
    todo: Sequence[int],
    predictor: Predictor,
    options: RunOptions,
    bars: Sequence[Any],
) -> None:
    """Predict output slices ``todo`` (input slices ``job.ids[z]``) into ``writer``."""
    group = options.batch_size if predictor.single_window(job.shape, options.tile) else 1
    store, dtype = is_zarr(job.dst), np.dtype(writer.dtype)
    for start in range(0, len(todo), group):
        zs = todo[start : start + group]
        results = _predict_group(reader, job, [job.ids[z] for z in zs], predictor, options)
        for z, result in zip(zs, results, strict=True):
            if options.kind == "labels" and result.dtype.itemsize > dtype.itemsize:
                raise _NeedsWiderLabels
            if store:
                writer.write_slice(z, result)
            else:
                writer.write(result)
        for bar in bars:
            bar.update(len(zs))


# -- OME-Zarr outputs: resumable, and one volume over many processes ---------------------------


def is_zarr(path: str | Path) -> bool:
    """Whether an output path is written as an OME-Zarr store (its name ends in ``.zarr``)."""
    return Path(path).suffix.lower() == ".zarr"


def _level(job: Job, options: RunOptions) -> int:
    """The pyramid level read from this job's input (0 for anything but a store)."""
    from cellp2p.stores import is_store

    return options.level if is_store(job.src) else 0


def job_layout(job: Job, predictor: Predictor, kind: str, label_dtype: Any) -> dict[str, Any]:
    """Shape, dtype and spacing of a job's output."""
    plane, dtype = predictor.output_plane(kind, job.shape[-2:])
    if kind == "labels":
        dtype = np.dtype(label_dtype)
    return {"shape": (len(job.ids), *plane), "dtype": dtype, "spacing": job.spacing}


def store_writer(job: Job, options: RunOptions, layout: dict[str, Any], **kw: Any) -> Any:
    """The job's StoreWriter: masks and labels as an NGFF label image, the rest as an image."""
    from cellp2p.stores import StoreWriter

    labels = options.kind in ("mask", "labels") and len(layout["shape"]) == 3
    kw = {"force": options.force, "resume": options.resume, **kw}
    return StoreWriter(job.dst, unit=job.unit, kind="labels" if labels else "image", **layout, **kw)


def check_store_job(
    job: Job, dst: Path, predictor: Predictor, kind: str, force: bool, resume: bool
) -> Path:
    """A ``.zarr`` output checked as the writer will check it, before anything is computed."""
    from cellp2p.ngff import read_marker
    from cellp2p.stores import check_store_output

    state = check_store_output(dst, force=force, resume=resume)
    job.skip = state == "finished" and resume and not force
    if state == "incomplete" and resume and not force:
        spec = read_marker(dst)
        if kind == "labels" and spec.get("dtype") == "uint32":
            job.label_dtype = np.uint32  # a resumed store that was already widened
        layout = job_layout(job, predictor, kind, job.label_dtype)
        dtype = np.dtype(layout["dtype"])
        dtype = np.dtype(np.uint8 if dtype.kind == "b" else dtype)
        want = (list(layout["shape"]), dtype.name)
        if (spec.get("shape"), spec.get("dtype")) != want:
            raise CellP2PError(
                f"{dst}: was started as {tuple(spec.get('shape', ()))} {spec.get('dtype')}, "
                f"but this prediction gives {tuple(want[0])} {want[1]}; pass --force to start "
                "it again (or check --slices, --output and the model)"
            )
    return dst


def predict_split(job: Job, predictor: Predictor, options: RunOptions, world: Any) -> None:
    """One volume over the processes: disjoint chunk-aligned shares of one store.

    Rank 0 creates (or replaces, or reopens) the store; the chunks still missing are shared
    out in runs (:func:`cellp2p.stores.slice_range`), so a resumed store is balanced too; once
    all agree, rank 0 finalises it.
    """
    if job.skip:
        return
    label_dtype, redo = job.label_dtype, False
    layout = job_layout(job, predictor, options.kind, label_dtype)
    while _split_pass(job, predictor, options, world, layout, redo):
        redo = True  # a slice had more than 65535 objects: every rank redoes it as uint32
        layout = job_layout(job, predictor, options.kind, np.uint32)
    err = None
    if world.is_main:
        try:
            store_writer(job, options, layout, force=False, resume=True).finalize()
        except Exception as e:  # re-raised after the others hear of it
            err = e
    _agree(world, err, "finishing the store")


def _split_pass(
    job: Job,
    predictor: Predictor,
    options: RunOptions,
    world: Any,
    layout: dict[str, Any],
    redo: bool,
) -> bool:
    """One pass of :func:`predict_split`; True when the labels need uint32 (in any rank)."""
    from tqdm import tqdm

    from cellp2p.io import open_stack
    from cellp2p.stores import slice_range

    err: BaseException | None = None
    if world.is_main:
        try:
            resume = options.resume and not redo
            kw = {"force": options.force or redo, "resume": resume, "finalize_on_close": False}
            store_writer(job, options, layout, **kw).close()
        except Exception as e:  # re-raised after the others hear of it
            err = e
    _agree(world, err, "creating the store")
    writer = store_writer(job, options, layout, force=False, resume=True, finalize_on_close=False)
    # The chunks still missing, shared out in runs (a new store: slice_range of the volume).
    missing, cs = writer.missing(), writer.chunk_slices
    chunks = sorted({z // cs for z in missing})
    mine = {chunks[i] for i in slice_range(len(chunks), 1, world.rank, world.size)}
    todo = [z for z in missing if z // cs in mine]
    world.barrier()  # every rank has listed the missing chunks before any is written
    bar = tqdm(total=len(todo), desc="predict", unit="slice", disable=options.quiet)
    wider = False
    try:
        _flat_heap()
        with open_stack(job.src, level=_level(job, options)) as reader, writer:
            _write_slices(reader, writer, job, todo, predictor, options, (bar,))
    except _NeedsWiderLabels:
        wider = True
    except Exception as e:  # re-raised after the others hear of it
        err = e
    finally:
        bar.close()
    _agree(world, err, "prediction")
    return world.any(wider)


def _agree(world: Any, err: BaseException | None, what: str) -> None:
    """Every rank waits here; a failing rank re-raises its error, the others raise too."""
    world.agree(err is None, what)
    if err is not None:
        raise err


def _predict_group(
    reader: Any, job: Job, ids: Sequence[int], predictor: Predictor, options: RunOptions
) -> Iterator[np.ndarray]:
    """The outputs of slices ``ids`` of a stack, predicted in one batch, one at a time."""
    planes = [reader[i] for i in ids]
    _drop_mapped_pages(reader)
    source = f"{job.src} slice {ids[0]}"
    probs = predictor.predict_slices(
        planes, options.tile, options.overlap, options.batch_size, source, options.kind
    )
    for prob in probs:
        yield predictor.to_output(prob, options.kind, options.threshold)


# -- output names and memory -------------------------------------------------------------------


def default_output(path: str | Path) -> Path:
    """``NAME_pred.tif`` next to a file, ``FOLDER_pred.tif`` beside a folder.

    A store gives a store: ``volume.zarr`` → ``volume_pred.zarr``, ``data.h5:/raw`` →
    ``data_raw_pred.zarr`` (beside the file).
    """
    from cellp2p.stores import is_store, split_h5

    h5 = split_h5(path)
    if h5 is not None:
        file, key = h5
        name = "_".join([file.stem, *(k for k in (key or "").split("/") if k)])
        return file.with_name(f"{name}_pred.zarr")
    path = Path(path)
    if is_store(path):
        parts = [i for i, part in enumerate(path.parts) if part.lower().endswith(".zarr")]
        root = Path(*path.parts[: parts[0] + 1]) if parts else path
        return root.with_name(f"{root.name[:-5] if parts else root.name}_pred.zarr")
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
        as_file = as_file or is_zarr(out)  # a store is one output, even where it exists
        if as_file and len(inputs) > 1:
            raise CellP2PError(
                f"-o {out}: {len(inputs)} inputs need an output folder, not a file name"
            )
        if not as_file and out.suffix and not out.is_dir():
            raise CellP2PError(f"-o {out}: give a .tif file name, a .zarr store or a folder")
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
        for folder in (p for p in inputs if p.is_dir()):
            if key.is_relative_to(folder.resolve()):
                raise CellP2PError(
                    f"{dst}: is inside the input folder {folder}; choose an output outside it"
                )
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
