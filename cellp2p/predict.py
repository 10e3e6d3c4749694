"""Applying a trained network to slices and stacks of any size.

Per slice: raw pixels → the run's input :class:`Normalization` → ``x*2-1`` → network → [0, 1]
(U-Net: sigmoid / softmax / clipped image; generator: ``(tanh+1)/2``) → the requested output
(probabilities, mask, instance labels, or the image back in the target's dtype and range).

Tiling (``tile``; default: the whole slice up to 1024 px a side, else 512 or the training crop):

* same-padding networks (``small`` U-Net, every pix2pix generator): MONAI's
  ``sliding_window_inference`` with Gaussian blending. The slice is first reflect-padded into a
  canvas on which every tile starts at a multiple of the network's ``divisor`` (2**depth), with
  the phase of the whole-slice forward: all tiles then share the whole slice's pooling/stride grid
  and differ from it only through the zero padding near their own borders, which the Gaussian
  weights (≈3e-4 at a tile edge) suppress. Slices smaller than the tile along an axis take one
  window spanning that axis; the network pads it (reflect) to its divisor and crops back.
* valid-convolution U-Nets (``paper``, ``course``): the U-Net paper's overlap-tile strategy. Each
  output tile is computed from an input window holding its real context (mirror padding only at
  the slice border), tiles are aligned to the pooling grid of the whole-slice
  :func:`forward_full`, so tiled and whole-slice results agree to float precision and no
  blending is needed.

Stacks are streamed slice by slice (StackReader → StackWriter's temporary file, renamed when
complete), so memory does not grow with the number of slices.
"""

from __future__ import annotations

import contextlib
import ctypes
import mmap
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from cellp2p.checks import check_finite_slice
from cellp2p.errors import CellP2PError
from cellp2p.predictor import Predictor, load_predictor
from cellp2p.tiling import check_tiling

# -- geometry ----------------------------------------------------------------------------------


# -- the predictor -----------------------------------------------------------------------------


# -- stacks ------------------------------------------------------------------------------------


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


class _NeedsWiderLabels(Exception):
    """A slice holds more than 65535 objects: the stack is rewritten as uint32."""


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
    """
    from tqdm import tqdm

    from cellp2p.fsutil import check_output
    from cellp2p.io import StackReader
    from cellp2p.slices import parse_slices

    if not inputs:
        raise CellP2PError("no input: give one or more stacks, images or folders")
    check_tiling(tile, overlap, batch_size)
    if not 0 <= threshold <= 1:
        raise CellP2PError(f"--threshold {threshold}: give a probability in [0, 1]")
    jobs = []
    for src in map(Path, inputs):
        with StackReader(src) as reader:
            n = len(reader)
            if slices is None:
                ids = list(range(n))
            elif isinstance(slices, str):
                ids = parse_slices(slices, n) or list(range(n))
            else:
                ids = parse_slices(",".join(str(int(i)) for i in slices), n) or list(range(n))
            jobs.append(
                _Job(src, tuple(reader.shape), reader.spacing, reader.unit, reader.dtype, ids)
            )
    from cellp2p import distributed

    world = distributed.setup(device)  # under torchrun: joins the group, on cuda:LOCAL_RANK
    device = str(world.device) if world.size > 1 else device
    predictor = load_predictor(model, device, tta=tta, test_time_dropout=test_time_dropout)
    kind = predictor.resolve_output(output)
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
    if test_time_dropout and predictor.n_dropout == 0 and not quiet:
        print(
            "note: --test-time-dropout: this network has no dropout layers; output is "
            "deterministic",
            file=sys.stderr,
        )
    # Under torchrun each process has checked every input and output; now rank r takes
    # stacks r, r+W, ... (and returns those), and only rank 0 shows progress.
    jobs = world.shard(jobs)
    quiet = quiet or not world.is_main

    _flat_heap()
    total = sum(len(job.ids) for job in jobs)
    overall = tqdm(
        total=total, desc="predict", unit="slice", disable=quiet, file=sys.stderr, position=0
    )
    options = dict(
        kind=kind,
        threshold=threshold,
        tile=tile,
        overlap=overlap,
        batch_size=batch_size,
        force=force,
        quiet=quiet,
        overall=overall,
    )
    try:
        for job in jobs:
            done = overall.n
            try:
                _predict_one(job, predictor, **options)
            except _NeedsWiderLabels:
                overall.n = done  # rare: more than 65535 objects in a slice; redo as uint32
                _predict_one(job, predictor, label_dtype=np.uint32, **options)
    finally:
        overall.close()
    return [job.dst for job in jobs]


class _Job:
    """One input stack, what is known of it before predicting, and where it goes."""

    def __init__(
        self,
        src: Path,
        shape: tuple[int, ...],
        spacing: tuple[float, float, float] | None,
        unit: str,
        dtype: np.dtype,
        ids: list[int],
    ):
        self.src, self.shape, self.spacing, self.unit = src, shape, spacing, unit
        self.dtype, self.ids = np.dtype(dtype), ids
        self.dst = src


def _predict_one(
    job: _Job,
    predictor: Predictor,
    *,
    kind: str,
    threshold: float,
    tile: int | None,
    overlap: float,
    batch_size: int,
    force: bool,
    quiet: bool,
    overall: Any,
    label_dtype: type = np.uint16,
) -> None:
    """One stack into one TIFF, ``batch_size`` slices per forward when a slice is one window."""
    from tqdm import tqdm

    from cellp2p.io import StackReader, StackWriter

    plane, dtype = predictor.output_plane(kind, job.shape[-2:])
    if kind == "labels":
        dtype = np.dtype(label_dtype)
    group = batch_size if predictor.single_window(job.shape, tile) else 1
    bar = tqdm(
        total=len(job.ids),
        desc=job.src.name,
        unit="slice",
        leave=False,
        disable=quiet,
        file=sys.stderr,
        position=1,
    )
    try:
        with (
            StackReader(job.src) as reader,
            StackWriter(
                job.dst,
                shape=(len(job.ids), *plane),
                dtype=dtype,
                spacing=job.spacing,
                unit=job.unit,
                force=force,
            ) as writer,
        ):
            for start in range(0, len(job.ids), group):
                ids = job.ids[start : start + group]
                planes = [reader[i] for i in ids]
                _drop_mapped_pages(reader)
                source = f"{job.src} slice {ids[0]}"
                probs = predictor.predict_slices(planes, tile, overlap, batch_size, source)
                for prob in probs:
                    result = predictor.to_output(prob, kind, threshold)
                    if kind == "labels" and result.dtype.itemsize > dtype.itemsize:
                        raise _NeedsWiderLabels
                    writer.write(result)
                bar.update(len(ids))
                overall.update(len(ids))
    finally:
        bar.close()
