"""Chunked volumes: OME-Zarr (NGFF 0.4/0.5), plain zarr arrays and HDF5 datasets.

:class:`StoreReader` has :class:`cellp2p.io.StackReader`'s interface and reads lazily, chunk by
chunk. :class:`StoreWriter` writes OME-Zarr slice by slice, pyramid levels included, into a
store marked incomplete (``.cellp2p-incomplete.json`` plus one ``.cellp2p-done/<chunk>`` file
per finished chunk) until :meth:`StoreWriter.finalize` writes the multiscales metadata.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from cellp2p.errors import CellP2PError
from cellp2p.ngff import (
    UNITS_UM,
    StoreWriter,
    check_store_output,
    has_zarr_meta,
    incomplete_progress,
    marker_of,
    need_module,
    ngff_unit,
    read_marker,
    reason,
)

_H5 = re.compile(r"^(?P<file>.+?\.(?:h5|hdf5|hdf|he5))(?::(?P<key>.*))?$", re.IGNORECASE)
_DEFAULT_AXES = {2: "yx", 3: "zyx", 4: "zcyx"}  # arrays without axis names: cellp2p's order

AXES_ORDERS = ("yx", "cyx", "zyx", "czyx", "tzyx", "tczyx", "tyx", "tcyx")


@dataclass
class Multiscale:
    """One parsed ``multiscales`` entry: axes, level paths and the scale of each level."""

    version: str
    axes: str  # e.g. "czyx"
    units: list[str | None]
    paths: list[str]
    scales: list[list[float]]
    name: str | None = None
    translations: list[list[float]] = field(default_factory=list)


def ome_attrs(attrs: Mapping[str, Any]) -> tuple[dict[str, Any], str | None]:
    """The OME attributes of a group (NGFF 0.5 nests them under ``ome``) and their version."""
    if isinstance(attrs.get("ome"), Mapping):
        ome = dict(attrs["ome"])
        return ome, str(ome["version"]) if "version" in ome else None
    ome = dict(attrs)
    ms = ome.get("multiscales")
    if isinstance(ms, list) and ms and isinstance(ms[0], Mapping) and "version" in ms[0]:
        return ome, str(ms[0]["version"])
    return ome, None


def _scale_of(transforms: Any, ndim: int, where: str) -> tuple[list[float], list[float]]:
    """(scale, translation) of a list of NGFF coordinate transformations."""
    scale, shift = [1.0] * ndim, [0.0] * ndim
    for t in transforms or []:
        if not isinstance(t, Mapping):
            raise ValueError(f"{where}: a coordinate transformation is not an object")
        values = t.get(t.get("type"))
        if t.get("type") not in ("scale", "translation") or values is None:
            continue  # identity, or a transformation given by a path: keep the pixel grid
        if len(values) != ndim:
            raise ValueError(f"{where}: {t['type']} has {len(values)} values for {ndim} axes")
        if t["type"] == "scale":
            scale = [a * float(b) for a, b in zip(scale, values, strict=True)]
        else:
            shift = [a + float(b) for a, b in zip(shift, values, strict=True)]
    return scale, shift


def parse_multiscales(ome: Mapping[str, Any], version: str | None) -> Multiscale:
    """Parse the first ``multiscales`` entry; ValueError (with the reason) when malformed."""
    ms = ome.get("multiscales")
    if not isinstance(ms, list) or not ms or not isinstance(ms[0], Mapping):
        raise ValueError("'multiscales' is not a list of objects")
    entry = ms[0]
    axes = entry.get("axes")
    if not isinstance(axes, list) or not axes:
        raise ValueError("no 'axes' (NGFF 0.1-0.3 stores are not read; re-save as 0.4 or 0.5)")
    names = [a.get("name") if isinstance(a, Mapping) else a for a in axes]
    if not all(isinstance(n, str) and len(n) == 1 for n in names):
        raise ValueError(f"axes {names}: expected one-letter names t, c, z, y, x")
    units = [a.get("unit") if isinstance(a, Mapping) else None for a in axes]
    datasets = entry.get("datasets")
    if not isinstance(datasets, list) or not datasets:
        raise ValueError("no 'datasets' (no resolution levels)")
    gscale, gshift = _scale_of(entry.get("coordinateTransformations"), len(names), "multiscales")
    paths, scales, shifts = [], [], []
    for i, ds in enumerate(datasets):
        if not isinstance(ds, Mapping) or not isinstance(ds.get("path"), str):
            raise ValueError(f"dataset {i} has no 'path'")
        s, t = _scale_of(ds.get("coordinateTransformations"), len(names), f"dataset {i}")
        paths.append(ds["path"])
        scales.append([a * b for a, b in zip(s, gscale, strict=True)])
        shifts.append([a * g + b for a, g, b in zip(t, gscale, gshift, strict=True)])
    name = entry.get("name") if isinstance(entry.get("name"), str) else None
    ver = version or str(entry.get("version", "0.4"))
    return Multiscale(ver, "".join(names).lower(), units, paths, scales, name, shifts)


def check_axes(axes: str, shape: Sequence[int], where: str) -> str:
    """Validate an axis string against a shape; return it without a singleton t."""
    if axes not in AXES_ORDERS:
        raise CellP2PError(
            f"{where}: unsupported axes {axes!r}; cellp2p reads yx, zyx, czyx or tczyx "
            "(NGFF order): re-save it with one of those"
        )
    if len(axes) != len(shape):
        raise CellP2PError(f"{where}: axes {axes!r} but the array has {len(shape)} dimensions")
    if axes.startswith("t"):
        if shape[0] != 1:
            raise CellP2PError(
                f"{where}: {shape[0]} time points; cellp2p reads one (Z, Y, X) volume: "
                "write one store per time point"
            )
        axes = axes[1:]
    return axes


def spacing_of(
    axes: str, scale: Sequence[float], units: Sequence[str | None]
) -> tuple[tuple[float, float, float] | None, str]:
    """``(z, y, x)`` pixel size in µm (and ``um``) from an NGFF scale, or None when uncalibrated.

    A store without units and with every scale 1 is uncalibrated; a store with scales but no
    unit is taken to be in micrometres; an unknown unit is kept as it is, unconverted.
    """
    start = len(scale) - len(axes)
    by_axis = dict(zip(axes, zip(scale[start:], units[start:], strict=True), strict=True))
    spatial = [by_axis.get(a, (1.0, None)) for a in "zyx"]
    given = [u for _, u in spatial if u]
    if not given and all(s == 1.0 for s, _ in spatial):
        return None, "um"
    known = [ngff_unit(u) for u in given]
    if given and not all(known):
        return (spatial[0][0], spatial[1][0], spatial[2][0]), str(given[0])
    out = []
    for s, u in spatial:
        name = ngff_unit(u) or (known[0] if known else "micrometer")
        out.append(float(s) * UNITS_UM[name])
    return (out[0], out[1], out[2]), "um"


def split_h5(path: str | Path) -> tuple[Path, str | None] | None:
    """``(file, dataset)`` for ``file.h5:/dataset`` (dataset None for a bare ``file.h5``)."""
    m = _H5.match(str(path))
    return (Path(m["file"]), m["key"] or None) if m else None


def is_store(path: str | Path) -> bool:
    """True for a ``.zarr`` path (or one inside it), a zarr folder, or ``file.h5[:/dataset]``."""
    if split_h5(path):
        return True
    p = Path(path)
    if any(part.lower().endswith(".zarr") for part in p.parts):
        return True
    return p.is_dir() and has_zarr_meta(p)


def _level_in_parent(zarr: Any, path: Path) -> int | None:
    """The level index of array ``path`` in its parent's OME-Zarr multiscales, if it is one."""
    with contextlib.suppress(Exception):
        ome, version = ome_attrs(zarr.open_group(str(path.parent), mode="r").attrs.asdict())
        return parse_multiscales(ome, version).paths.index(path.name)
    return None


class StoreReader:
    """Lazy slice access to a chunked volume, with :class:`cellp2p.io.StackReader`'s interface.

    ``reader[i]`` is slice ``i`` as ``(Y, X)`` or ``(C, Y, X)``; ``crop`` reads a sub-block.
    Only the chunks touched are read. ``level`` picks an OME-Zarr pyramid level.
    """

    def __init__(self, path: str | Path, level: int = 0):
        self._args = (str(path), int(level))
        self.path = Path(path)
        self.level = int(level)
        self.spacing: tuple[float, float, float] | None = None
        self.unit = "um"
        self.format = ""
        self.levels: list[tuple[int, ...]] = []
        self.labels: list[str] = []
        self._h5: Any = None
        try:
            h5 = split_h5(path)
            self._open_h5(*h5) if h5 else self._open_zarr(self.path)
        except CellP2PError:
            self.close()
            raise
        except Exception as err:  # zarr/h5py raise many types for damaged metadata
            self.close()
            raise CellP2PError(
                f"{self.path}: cannot read the store's metadata ({reason(err)}); it is damaged "
                "or not a zarr/HDF5 store: copy or write it again"
            ) from None

    # -- opening -------------------------------------------------------------------------------
    def _open_zarr(self, path: Path) -> None:
        """Open a zarr array or group at ``path`` (refusing missing, foreign or incomplete)."""
        if not path.exists():
            raise CellP2PError(f"{path}: no such store; check the path")
        if not path.is_dir() or not has_zarr_meta(path):
            raise CellP2PError(
                f"{path}: not a zarr store (no zarr.json, .zgroup or .zarray); give an OME-Zarr "
                "folder, a zarr array or file.h5:/dataset"
            )
        marker = marker_of(path)
        if marker is not None:
            done = incomplete_progress(marker.parent)
            raise CellP2PError(
                f"{path}: an interrupted write ({done}); not finished, so not read: finish it "
                "with --resume or write it again with --force"
            )
        zarr = need_module("zarr", "reading zarr stores")
        node = zarr.open(store=str(path), mode="r")
        if not isinstance(node, zarr.Array):
            self._open_group(node, path)
            return
        level = _level_in_parent(zarr, path) if self.level == 0 else None
        if level is not None:  # a level of an OME-Zarr image: its axes and scale are above
            self.level = level
            self._open_zarr(path.parent)
        else:
            self._open_array(node, f"zarr v{node.metadata.zarr_format} array")

    def _open_group(self, group: Any, path: Path) -> None:
        """An OME-Zarr image, or the only label image of a group; else say what it holds."""
        ome, version = ome_attrs(group.attrs.asdict())
        if "multiscales" in ome:
            try:
                ms = parse_multiscales(ome, version)
            except ValueError as err:
                raise CellP2PError(
                    f"{path}: bad OME-Zarr metadata ({err}); re-write the store's metadata"
                ) from None
            self._open_multiscale(group, ms, path, "image-label" in ome)
            return
        labels = self._label_names(group, ome)
        if len(labels) == 1:
            sub = "labels/" if "labels" in group else ""
            self._open_zarr(path / f"{sub}{labels[0]}")
            return
        inside = sorted(group.keys())
        where = "labels/" if labels and "labels" in group else ""
        names = labels or inside
        hint = f"name one, e.g. {path / (where + names[0])}" if names else "the group is empty"
        raise CellP2PError(
            f"{path}: a zarr group without OME-Zarr multiscales (holds: "
            f"{', '.join(names) or 'nothing'}); {hint}"
        )

    @staticmethod
    def _label_names(group: Any, ome: dict[str, Any]) -> list[str]:
        if isinstance(ome.get("labels"), list):
            return [str(n) for n in ome["labels"]]
        if "labels" in group:
            sub, _ = ome_attrs(group["labels"].attrs.asdict())
            return [str(n) for n in sub.get("labels", [])]
        return []

    def _open_multiscale(self, group: Any, ms: Multiscale, path: Path, label: bool) -> None:
        """Level ``self.level`` of a multiscales image, with its axes and pixel size."""
        if not 0 <= self.level < len(ms.paths):
            raise CellP2PError(
                f"{path}: no level {self.level}; the store has {len(ms.paths)} levels "
                f"(0-{len(ms.paths) - 1}): pass one of those"
            )
        try:
            arrays = [group[p] for p in ms.paths]
        except KeyError as err:
            raise CellP2PError(
                f"{path}: level {err} listed in the metadata is missing; copy the store again"
            ) from None
        axes = check_axes(ms.axes, arrays[self.level].shape, str(path))
        self.spacing, self.unit = spacing_of(axes, ms.scales[self.level], ms.units)
        kind = "label image" if label else "image"
        self.format = f"OME-Zarr {ms.version} {kind} (zarr v{group.metadata.zarr_format})"
        self._setup(arrays[self.level], ms.axes, path)
        self.levels = [self._cellp2p_shape(a.shape, ms.axes) for a in arrays]
        self.labels = self._label_names(group, {})

    def _open_array(self, arr: Any, fmt: str) -> None:
        """A plain zarr array or HDF5 dataset: axes from its names, else cellp2p's order."""
        if self.level != 0:
            raise CellP2PError(
                f"{self.path}: a plain array has one level; drop the level {self.level}"
            )
        meta = getattr(arr, "metadata", None)  # zarr v3 names its dimensions; v2 via xarray's
        names = getattr(meta, "dimension_names", None) or arr.attrs.get("_ARRAY_DIMENSIONS")
        names = [str(n) for n in names] if names is not None else []
        axes = "".join(names).lower() if names and all(names) else _DEFAULT_AXES.get(arr.ndim, "")
        if axes != "zcyx":
            check_axes(axes, arr.shape, str(self.path))
        with contextlib.suppress(TypeError, ValueError):  # ilastik / plantseg: (z, y, x) in um
            size = np.asarray(arr.attrs.get("element_size_um", []), dtype=float).ravel()
            if size.size == 3:
                self.spacing = (float(size[0]), float(size[1]), float(size[2]))
        self.format = fmt
        self._setup(arr, axes, self.path)
        self.levels = [self.shape]

    def _open_h5(self, file: Path, key: str | None) -> None:
        """Dataset ``key`` of an HDF5 file (the only one when ``key`` is None)."""
        if not file.is_file():
            raise CellP2PError(f"{file}: no such file; check the path")
        h5py = need_module("h5py", "reading HDF5 files")
        try:
            self._h5 = h5py.File(file, "r")
        except OSError as err:
            raise CellP2PError(
                f"{file}: cannot open it as HDF5 ({reason(err)}); is it a complete .h5 file?"
            ) from None
        found: list[str] = []
        self._h5.visititems(lambda n, o: found.append("/" + n) if hasattr(o, "shape") else None)
        if key is None and len(found) == 1:
            key = found[0]
        if key is None or key not in self._h5 or not hasattr(self._h5[key], "shape"):
            what = f"no dataset {key}" if key else f"{len(found)} datasets"
            listed = ", ".join(found[:8]) or "none"
            eg = f"; name one as {file}:{found[0]}" if found else ""
            raise CellP2PError(f"{file}: {what} (datasets: {listed}){eg}")
        ds = self._h5[key]
        self.path = Path(f"{file}:{key}")
        self._open_array(ds, f"HDF5 dataset {key}")

    def _setup(self, arr: Any, axes: str, path: Path) -> None:
        """Keep the array and derive dtype, shape and chunks in cellp2p's axis order."""
        self._arr, self._axes = arr, axes
        self.dtype = np.dtype(arr.dtype)
        if self.dtype.kind not in "biuf":
            raise CellP2PError(
                f"{path}: pixels of type {self.dtype.name} are not an image cellp2p reads; "
                "store 8/16-bit integers or float32"
            )
        self.shape: tuple[int, ...] = self._cellp2p_shape(arr.shape, axes)
        if 0 in self.shape:
            raise CellP2PError(f"{path}: the array is empty (shape {tuple(arr.shape)})")
        chunks = arr.chunks or arr.shape
        self.chunks = self._cellp2p_shape(chunks, axes, keep_c=len(self.shape) == 4)
        self.axes = "ZYX" if len(self.shape) == 3 else "ZCYX"

    @staticmethod
    def _cellp2p_shape(shape: Sequence[int], axes: str, keep_c: bool = False) -> tuple[int, ...]:
        size = dict(zip(axes, (int(n) for n in shape), strict=True))
        nchan = size.get("c", 1)
        out = [size.get("z", 1)] + ([nchan] if nchan > 1 or (keep_c and "c" in size) else [])
        return (*out, size["y"], size["x"])

    # -- access --------------------------------------------------------------------------------
    def __len__(self) -> int:
        return self.shape[0]

    @property
    def ndim(self) -> int:
        return len(self.shape)

    def _take(self, z: int | slice, y: slice, x: slice) -> np.ndarray:
        """Read ``[z, y, x]`` from the array and reorder it to (Z,) (C,) Y, X."""
        pick = {"t": 0, "c": slice(None), "z": z, "y": y, "x": x}
        out = np.asarray(self._arr[tuple(pick[a] for a in self._axes)])
        kept = [a for a in self._axes if a != "t" and not (a == "z" and isinstance(z, int))]
        if "z" not in self._axes and isinstance(z, slice):
            out, kept = out[None], ["z", *kept]
        order = [kept.index(a) for a in "zcyx" if a in kept]
        out = out.transpose(order)
        if "c" in kept and out.shape[order.index(kept.index("c"))] == 1:
            out = out.squeeze(order.index(kept.index("c")))
        return np.ascontiguousarray(out)

    def _guarded(self, what: str, z: int | slice, y: slice, x: slice) -> np.ndarray:
        try:
            return self._take(z, y, x)
        except CellP2PError:
            raise
        except Exception as err:
            raise CellP2PError(
                f"{self.path}: cannot read {what} ({reason(err)}); the store is damaged "
                "(an interrupted copy?): copy or write it again"
            ) from None

    def __getitem__(self, index: int) -> np.ndarray:
        """Slice ``index`` as (Y, X) or (C, Y, X)."""
        n, index = len(self), int(index)
        if not -n <= index < n:
            raise IndexError(f"slice {index} out of range for {n} slices")
        index %= n
        z: int | slice = index if "z" in self._axes else slice(0, 1)
        out = self._guarded(f"slice {index}", z, slice(None), slice(None))
        return out[0] if isinstance(z, slice) else out

    def crop(self, z: slice, y: slice, x: slice) -> np.ndarray:
        """The block ``[z, y, x]`` as (Z, Y, X) or (Z, C, Y, X), reading only its chunks."""
        zs = z if "z" in self._axes else slice(0, 1)
        return self._guarded(f"block z={z.start}:{z.stop}", zs, y, x)

    def __iter__(self) -> Iterator[np.ndarray]:
        for i in range(len(self)):
            yield self[i]

    def read(self, slices: Sequence[int] | None = None) -> np.ndarray:
        """All slices (or the listed ones) as one array."""
        n = len(self)
        ids = list(range(n) if slices is None else slices)
        for i in ids:
            if not 0 <= i < n:
                raise CellP2PError(
                    f"{self.path}: slice {i} requested but the stack has {n} slices "
                    f"(0-{n - 1}); fix the slice selection"
                )
        if ids and ids == list(range(ids[0], ids[-1] + 1)):
            return self.crop(slice(ids[0], ids[-1] + 1), slice(None), slice(None))
        return np.stack([self[i] for i in ids])

    def close(self) -> None:
        """Close an open HDF5 file (zarr stores hold nothing open)."""
        if self._h5 is not None:
            with contextlib.suppress(Exception):
                self._h5.close()
            self._h5 = None

    def __reduce__(self) -> tuple[type[StoreReader], tuple[str, int]]:
        """Pickled as its path and level, and opened again (DataLoader workers, spawn)."""
        return (StoreReader, self._args)

    def __enter__(self) -> StoreReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def describe_store(path: str | Path, level: int = 0) -> str:
    """Lines for ``cellp2p info``: format, shape, axes, dtype, chunks, levels, pixel size (of
    pyramid level ``level``)."""
    p = Path(path)
    marker = None if split_h5(path) else marker_of(p)
    if marker is not None:
        spec = read_marker(marker.parent)
        return "\n".join(
            [
                f"{path}",
                f"  format     OME-Zarr {spec.get('ngff')} {spec.get('kind')} being written",
                f"  state      INCOMPLETE: {incomplete_progress(marker.parent)}; finish it "
                "with --resume or start again with --force",
                f"  shape      {' x '.join(map(str, spec['shape']))}",
                f"  dtype      {spec.get('dtype')}",
            ]
        )
    with StoreReader(path, level=level) as r:
        lines = [
            f"{r.path}",
            f"  format     {r.format}",
            f"  shape      {' x '.join(map(str, r.shape))} ({r.axes}; axes on disk {r._axes})",
            f"  dtype      {r.dtype.name}",
            f"  chunks     {' x '.join(map(str, r.chunks))}",
            f"  levels     {len(r.levels)}: "
            + ", ".join(" x ".join(map(str, s)) for s in r.levels)
            + (f" (reading level {r.level})" if r.level else ""),
        ]
        if r.spacing is not None:
            z, y, x = r.spacing
            lines.append(f"  pixel size {z:g} x {y:g} x {x:g} {r.unit} (z, y, x)")
        else:
            lines.append("  pixel size not recorded")
        if r.labels:
            lines.append(f"  labels     {', '.join(r.labels)}")
    return "\n".join(lines)


def slice_range(nslices: int, chunk_slices: int, rank: int, world: int) -> range:
    """The chunk-aligned share of ``nslices`` slices that process ``rank`` of ``world`` writes."""
    nchunks = -(-nslices // chunk_slices)
    lo, hi = rank * nchunks // world, (rank + 1) * nchunks // world
    return range(min(lo * chunk_slices, nslices), min(hi * chunk_slices, nslices))


__all__ = [
    "StoreReader",
    "StoreWriter",
    "check_store_output",
    "describe_store",
    "is_store",
    "slice_range",
    "split_h5",
]
