"""``cellp2p info``: describe a stack (shape, dtype, range, labels, pixel size) or a manifest."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

from cellp2p.errors import CellP2PError
from cellp2p.manifests import Manifest, _search_dirs, load_manifest
from cellp2p.slices import format_ranges

_SAMPLE_SLICES = 16


_FULL_UNIQUE_LIMIT = 64 * 2**20  # elements; above this, unique values come from sampled slices


def _fmt_shape(shape: Iterable[int]) -> str:
    return " x ".join(str(n) for n in shape)


def _summarise_stack(path: Path, level: int = 0) -> list[str]:
    from cellp2p.io import open_stack

    with open_stack(path, level=level) as reader:
        shape, dtype = tuple(reader.shape), np.dtype(reader.dtype)
        axes = "ZYX" if len(shape) == 3 else "ZCYX"
        nz = len(reader)
        total = int(np.prod(shape))
        if total <= _FULL_UNIQUE_LIMIT:
            sample = list(range(nz))
        else:
            sample = sorted(set(np.linspace(0, nz - 1, _SAMPLE_SLICES).round().astype(int)))
        lo, hi, uniq, nan, inf = _scan(reader, sample, dtype)
        spacing, unit = reader.spacing, reader.unit
    sampled = "" if len(sample) == nz else f" (from {len(sample)} of {nz} slices)"
    lines = [
        f"{path}",
        f"  shape      {_fmt_shape(shape)} ({axes})",
        f"  dtype      {dtype.name}",
        f"  range      {_range(lo, hi, nan + inf)}{sampled}",
    ]
    if nan or inf:
        lines.append(f"  not finite {nan} NaN, {inf} inf values{sampled}: training refuses them")
    if uniq.size > 4096:
        lines.append(f"  unique     more than 4096 values{sampled}")
    elif uniq.size <= 16:
        values = ", ".join(str(v) for v in uniq.tolist())
        lines.append(f"  unique     {uniq.size} values: {values}{sampled}")
    else:
        lines.append(f"  unique     {uniq.size} values{sampled}")
    if spacing is not None:
        z, y, x = spacing
        lines.append(f"  pixel size z {z:g}, y {y:g}, x {x:g} {unit}")
    else:
        lines.append("  pixel size not recorded in the file")
    return lines


def _scan(reader: Any, sample: list[int], dtype: np.dtype) -> tuple[Any, Any, np.ndarray, int, int]:
    """Minimum and maximum of the finite values, unique values, NaN and inf counts of slices."""
    lo, hi, uniq = None, None, np.array([], dtype=dtype)
    nan = inf = 0
    for i in sample:
        plane = reader[i]
        if np.issubdtype(plane.dtype, np.inexact):
            finite, n_nan = np.isfinite(plane), int(np.isnan(plane).sum())
            nan, inf = nan + n_nan, inf + int(plane.size - finite.sum()) - n_nan
            plane = plane[finite]
            if plane.size == 0:
                continue
        pmin, pmax = plane.min(), plane.max()
        lo = pmin if lo is None else min(lo, pmin)
        hi = pmax if hi is None else max(hi, pmax)
        # Union of per-slice uniques stays small for label images; cap it for raw data.
        if uniq.size <= 4096:
            uniq = np.union1d(uniq, np.unique(plane))
    return lo, hi, uniq, nan, inf


def _range(lo: object, hi: object, non_finite: int) -> str:
    """The value range, of the finite values where some are NaN or inf."""
    if lo is None:
        return "no finite values"
    return f"{lo} .. {hi}" + (" (finite values)" if non_finite else "")


def _is_multipage_tiff(path: Path) -> bool:
    import tifffile

    try:
        with tifffile.TiffFile(path) as tif:
            return len(tif.pages) > 1
    except Exception:
        return False


def _summarise_path(path: Path) -> str:
    from cellp2p.io import IMAGE_SUFFIXES, TIFF_SUFFIXES

    if path.is_dir():
        images = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        stacks = [p for p in images if p.suffix.lower() in TIFF_SUFFIXES and _is_multipage_tiff(p)]
        if stacks:
            # A data folder (e.g. volume.tif + labels.tif): one summary per stack file.
            lines = [f"{path}: {len(stacks)} stack file(s)"]
            for p in stacks:
                lines.extend("  " + line for line in _summarise_stack(p))
            return "\n".join(lines)
        if not images:
            raise CellP2PError(f"{path}: folder holds no images; point to a TIFF or PNG")
    return "\n".join(_summarise_stack(path))


def _summarise_manifest(manifest: Manifest) -> str:
    lines = [
        f"{manifest.name}: {manifest.description}".rstrip(": "),
        f"  manifest   {manifest.path}",
    ]
    if manifest.pixel_size is not None:
        ps = manifest.pixel_size
        lines.append(f"  pixel size z {ps.z:g}, y {ps.y:g}, x {ps.x:g} {ps.unit}")
    if manifest.labels is not None:
        lab = manifest.labels
        lines.append(
            f"  labels     foreground {lab.foreground}, background {lab.background}: {lab.meaning}"
        )
    for key, ids in manifest.split.items():
        lines.append(f"  split      {key}: {format_ranges(ids)}")
    dirs = _search_dirs(manifest, None)
    for f in manifest.files:
        hit = next((d / f.name for d in dirs if (d / f.name).is_file()), None)
        status = f"found {hit}" if hit else "missing"
        lines.append(f"  {f.role:<12}{f.name}  {_fmt_shape(f.shape)} {f.dtype}  {status}")
    if not all(any((d / f.name).is_file() for d in dirs) for f in manifest.files):
        lines.append(
            f"  looked in  {', '.join(str(d) for d in dirs)}; get the data with "
            f"`cellp2p fetch {manifest.name} --dest DIR`"
        )
    return "\n".join(lines)


def info(path_or_manifest: str | Path, level: int = 0) -> str:
    """Human summary of an image file/folder (shape, dtype, range, labels) or a manifest;
    ``level``: the OME-Zarr pyramid level a store is described at."""
    from cellp2p.io import IMAGE_SUFFIXES

    text = str(path_or_manifest)
    path = Path(text)
    from cellp2p.stores import describe_store, is_store

    if level and not is_store(text):
        raise CellP2PError(
            f"{text}: --level {level}, but only an OME-Zarr store has pyramid levels; drop --level"
        )
    if is_store(text):  # first: "file.h5:/raw" is no path that exists
        lines = describe_store(text, level).splitlines()
        try:  # value range and uniques, sampled as for a TIFF
            keep = ("range", "unique", "not finite")
            lines += [ln for ln in _summarise_stack(path, level) if ln.lstrip().startswith(keep)]
        except CellP2PError:
            pass  # an incomplete store: describe_store already says so
        return "\n".join(lines)
    if path.exists() and not (path.is_file() and path.suffix.lower() == ".json"):
        return _summarise_path(path)
    if path.suffix.lower() in IMAGE_SUFFIXES:
        raise CellP2PError(f"{path}: no such file or folder; check the path")
    return _summarise_manifest(load_manifest(text))
