"""OME-Zarr (NGFF 0.4 / 0.5): metadata, pyramids, and :class:`StoreWriter`, the resumable writer.

Arrays go through zarr-python 3; the NGFF attributes are written here directly (ome-zarr-py's
writer would add ~1 s of imports (dask) per process and an extra dependency tree, for a few
dictionaries), and tests check them with ome-zarr-py's reader and ome-zarr-models' validators.
:mod:`cellp2p.stores` is the module to import: it re-exports :class:`StoreWriter`.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from collections.abc import Iterator, Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np

from cellp2p.errors import CellP2PError
from cellp2p.fsutil import _alive, check_folder_writable, write_failed
from cellp2p.slices import format_ranges

INCOMPLETE = ".cellp2p-incomplete.json"
DONE_DIR = ".cellp2p-done"
ZARR_META = ("zarr.json", ".zgroup", ".zarray")
INSTALL = "pip install 'cellp2p[zarr]'"

# NGFF space units (the UDUNITS-2 names the spec lists) in micrometres, and other spellings.
UNITS_UM = {"angstrom": 1e-4, "picometer": 1e-6, "nanometer": 1e-3, "micrometer": 1.0}
UNITS_UM |= {"millimeter": 1e3, "centimeter": 1e4, "meter": 1e6}
_ALIASES = {"um": "micrometer", "µm": "micrometer", "micron": "micrometer", "nm": "nanometer"}
_ALIASES |= {"mm": "millimeter", "cm": "centimeter", "m": "meter", "å": "angstrom"}


def ngff_unit(unit: str | None) -> str | None:
    """The NGFF name of a length unit (``um`` -> ``micrometer``), or None when unknown."""
    if not unit:
        return None
    key = unit.strip().lower().replace("\u00b5", "µ")
    key = _ALIASES.get(key, key)
    return key if key in UNITS_UM else None


def axes_meta(axes: str, unit: str | None) -> list[dict[str, str]]:
    """NGFF ``axes`` objects for ``zyx`` / ``czyx`` with the space unit where known."""
    kinds = {"t": "time", "c": "channel", "z": "space", "y": "space", "x": "space"}
    out = []
    for a in axes:
        item = {"name": a, "type": kinds[a]}
        if kinds[a] == "space" and ngff_unit(unit):
            item["unit"] = str(ngff_unit(unit))
        out.append(item)
    return out


def datasets_meta(
    nlevels: int, axes: str, spacing: Sequence[float] | None, nearest: bool
) -> list[dict[str, Any]]:
    """NGFF ``datasets`` for levels ``0..n-1``, each halved in y and x.

    A mean of 2×2 pixels sits at their centre, half an original pixel to the lower right of
    the first one; nearest sampling keeps the first pixel's position (no translation).
    """
    z, y, x = spacing if spacing is not None else (1.0, 1.0, 1.0)
    base = {"c": 1.0, "z": float(z), "y": float(y), "x": float(x)}
    out = []
    for k in range(nlevels):
        f = 2.0**k
        scale = [base[a] * (f if a in "yx" else 1.0) for a in axes]
        transforms: list[dict[str, Any]] = [{"type": "scale", "scale": scale}]
        if k and not nearest:
            shift = [(base[a] * (f - 1) / 2 if a in "yx" else 0.0) for a in axes]
            transforms.append({"type": "translation", "translation": shift})
        out.append({"path": str(k), "coordinateTransformations": transforms})
    return out


def level_shapes(yx: Sequence[int], levels: int | None, top: int = 256) -> list[tuple[int, int]]:
    """(Y, X) of each pyramid level: halved (rounding up) until it fits ``top`` or ``levels``."""
    shapes = [(int(yx[0]), int(yx[1]))]
    while (levels is None and max(shapes[-1]) > top) or (
        levels is not None and len(shapes) < levels
    ):
        h, w = shapes[-1]
        if h == 1 and w == 1:
            break
        shapes.append(((h + 1) // 2, (w + 1) // 2))
    return shapes


def halve(block: np.ndarray, nearest: bool) -> np.ndarray:
    """Halve the last two axes: every other pixel (labels) or the mean of 2×2 (images)."""
    if nearest:
        return np.ascontiguousarray(block[..., ::2, ::2])
    h, w = block.shape[-2:]
    if h % 2 or w % 2:  # repeat the last row / column so that every output pixel has four
        pad = [(0, 0)] * (block.ndim - 2) + [(0, h % 2), (0, w % 2)]
        block = np.pad(block, pad, mode="edge")
    dt = block.dtype
    wide = {"u": {1: np.uint16, 2: np.uint32}, "i": {1: np.int16, 2: np.int32}}
    acc = wide.get(dt.kind, {}).get(dt.itemsize, np.int64 if dt.kind in "iu" else np.float64)
    acc = np.float32 if dt == np.float32 else acc
    total = block[..., 0::2, 0::2].astype(acc)
    total += block[..., 1::2, 0::2]
    total += block[..., 0::2, 1::2]
    total += block[..., 1::2, 1::2]
    if dt.kind in "iu":  # round half up, in integers: floor((sum + 2) / 4)
        total += 2
        return (total // 4).astype(dt)
    return (total / 4).astype(dt)


# -- store state: the incomplete marker and the finished chunks --------------------------------


def need_module(module: str, what: str) -> ModuleType:
    """Import an optional dependency, or one CellP2PError naming the install command."""
    try:
        return __import__(module)
    except ImportError:
        raise CellP2PError(
            f"{what} needs the Python package {module}: {INSTALL} (or pip install {module})"
        ) from None


def reason(err: Exception) -> str:
    """The first line of an exception's message, or its type's name."""
    text = str(err).splitlines()[0] if str(err) else ""
    return text or type(err).__name__


def has_zarr_meta(folder: Path) -> bool:
    """True when ``folder`` is a zarr group or array (v2 or v3)."""
    return any((folder / n).is_file() for n in ZARR_META)


def marker_of(path: Path) -> Path | None:
    """The incomplete-write marker of the store holding ``path``, if there is one."""
    for q in (path, *path.parents):
        if (q / INCOMPLETE).is_file():
            return q / INCOMPLETE
        if q != path and not has_zarr_meta(q):
            return None
    return None


def done_chunks(root: Path) -> set[int]:
    """Indices of the chunks of slices already written (all levels) into an incomplete store."""
    with contextlib.suppress(OSError):
        return {int(p.name) for p in (root / DONE_DIR).iterdir() if p.name.isdigit()}
    return set()


def read_marker(root: Path) -> dict[str, Any]:
    """The layout an incomplete store was started with (its ``.cellp2p-incomplete.json``)."""
    try:
        spec = json.loads((root / INCOMPLETE).read_text())
        spec["shape"] = [int(n) for n in spec["shape"]]
        spec["chunk_slices"] = int(spec["chunk_slices"])
        return spec
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise CellP2PError(
            f"{root}: its {INCOMPLETE} is damaged ({reason(err)}); write the store again with "
            "--force"
        ) from None


def incomplete_progress(root: Path) -> str:
    """``"3 of 8 slices written"`` for an incomplete store."""
    spec = read_marker(root)
    n, cs = spec["shape"][0], spec["chunk_slices"]
    done = sum(min(cs, n - c * cs) for c in done_chunks(root) if c * cs < n)
    return f"{done} of {n} slices written"


def _state(path: Path) -> str:
    """absent, incomplete, finished (any zarr store) or other (not ours to replace)."""
    if not path.exists():
        return "absent"
    if not path.is_dir():
        return "other"
    if (path / INCOMPLETE).is_file():
        return "incomplete"
    if has_zarr_meta(path):
        return "finished"
    return "absent" if not any(path.iterdir()) else "other"


def check_store_output(path: str | Path, force: bool = False, resume: bool = False) -> str:
    """The state of an output store (absent, incomplete, finished), or the writer's refusal."""
    path = Path(path)
    if force and resume:
        raise CellP2PError(f"{path}: --force and --resume exclude each other; pass one")
    state = _state(path)
    if state == "other":
        raise CellP2PError(
            f"{path}: exists and is not a zarr store; not replacing it: choose another name "
            "(a store's name ends in .zarr)"
        )
    if state == "finished" and not (force or resume):
        raise CellP2PError(
            f"{path}: already exists; pass --force to overwrite it or choose another name"
        )
    if state == "incomplete" and not (force or resume):
        raise CellP2PError(
            f"{path}: an interrupted write ({incomplete_progress(path)}); pass --resume to "
            "finish it or --force to start again"
        )
    return state


def _remove_stale(path: Path) -> None:
    """Remove ``.NAME.PID.part`` / ``.old`` folders that dead writers left beside ``path``."""
    for suffix in ("part", "old"):
        for p in path.parent.glob(f".{path.name}.*.{suffix}"):
            pid = p.name[len(path.name) + 2 : -len(suffix) - 1]
            if pid.isdigit() and int(pid) != os.getpid() and not _alive(int(pid)):
                shutil.rmtree(p, ignore_errors=True)


def _make_spec(path: Path, shape: Sequence[int], dtype: Any, **kw: Any) -> dict[str, Any]:
    """The validated layout of a new store, as its incomplete marker records it."""
    shape = [int(n) for n in shape]
    if len(shape) not in (3, 4) or min(shape) < 1:
        raise CellP2PError(
            f"{path}: cannot write shape {tuple(shape)}; need (Z, Y, X) or (Z, C, Y, X)"
        )
    dt = np.dtype(dtype)  # as io.StackWriter: bool -> uint8, float64 -> float32
    dt = np.dtype(np.uint8 if dt.kind == "b" else np.float32 if dt == np.float64 else dt)
    kind = kw["kind"]
    if kind not in ("image", "labels"):
        raise ValueError(f"kind must be 'image' or 'labels', not {kind!r}")
    if kind == "labels" and (dt.kind not in "iu" or len(shape) == 4):
        raise CellP2PError(
            f"{path}: a label image holds integers in one channel, not {dt.name} of shape "
            f"{tuple(shape)}; write it as an image"
        )
    if kw["ngff"] not in ("0.4", "0.5") or kw["chunk_slices"] < 1 or kw["tile"] < 1:
        raise ValueError("ngff must be '0.4' or '0.5'; chunk_slices and tile at least 1")
    spacing = kw["spacing"]
    return {
        "cellp2p": "OME-Zarr store being written; finish it with --resume or redo it with --force",
        "shape": shape,
        "dtype": dt.name,
        "axes": "zyx" if len(shape) == 3 else "czyx",
        "levels": [list(s) for s in level_shapes(shape[-2:], kw["levels"])],
        "spacing": None if spacing is None else [float(v) for v in spacing],
        **{k: kw[k] for k in ("kind", "chunk_slices", "tile", "ngff", "unit")},
        "name": kw["name"] or (path.stem if kind == "labels" else "image"),
    }


def _compressor(zarr_format: int) -> Any:
    """Blosc-zstd level 1 with byte shuffle, for zarr v2 or v3."""
    # On 2 cores: about twice zstd-3's write speed; masks still shrink ~10x (lz4: ~4x).
    if zarr_format == 2:
        from numcodecs import Blosc

        return Blosc(cname="zstd", clevel=1, shuffle=Blosc.SHUFFLE)
    from zarr.codecs import BloscCodec

    return BloscCodec(cname="zstd", clevel=1, shuffle="shuffle")


def _set_ome(group: Any, attrs: dict[str, Any], ngff: str) -> None:
    """Add OME attributes to a group: under ``ome`` with the version (0.5) or at the top (0.4)."""
    if ngff == "0.4":
        if "multiscales" in attrs:
            attrs["multiscales"][0]["version"] = ngff
        group.attrs.update(attrs)
    else:
        group.attrs["ome"] = {**group.attrs.get("ome", {}), "version": ngff, **attrs}


class StoreWriter:
    """Write an OME-Zarr volume slice by slice, resumably, from one process or several.

    Every chunk of ``chunk_slices`` slices is written, with its pyramid levels (2× in y and x:
    mean for images, nearest for labels), as soon as its slices are all in, then recorded in
    ``.cellp2p-done/``. Until :meth:`finalize` writes the multiscales metadata the store is
    marked incomplete: readers and plain reruns refuse it; ``resume=True`` carries on with the
    chunks still :meth:`missing`; ``force=True`` replaces it. Processes writing disjoint
    chunk-aligned slice ranges (:func:`cellp2p.stores.slice_range`) share one store: all but
    the creator open it with ``resume=True``, and one calls :meth:`finalize` at the end.
    """

    def __init__(
        self,
        path: str | Path,
        *,
        shape: Sequence[int],
        dtype: Any,
        spacing: Sequence[float] | None = None,
        unit: str = "um",
        force: bool = False,
        resume: bool = False,
        kind: str = "image",
        chunk_slices: int = 1,
        name: str | None = None,
        levels: int | None = None,
        tile: int = 512,
        ngff: str = "0.5",
        finalize_on_close: bool = True,
    ):
        self.path = Path(path)
        state = check_store_output(self.path, force=force, resume=resume)
        spec = _make_spec(
            self.path, shape, dtype, spacing=spacing, unit=unit, kind=kind, name=name,
            chunk_slices=chunk_slices, levels=levels, tile=tile, ngff=ngff,
        )  # fmt: skip
        self.finalize_on_close, self.finished = finalize_on_close, False
        self._buffers: dict[int, dict[int, np.ndarray]] = {}
        self._arrays: list[Any] | None = None
        self._cursor: Iterator[int] | None = None
        if state == "absent" or force:
            self._create(spec, replace=state != "absent")
        elif state == "incomplete":
            spec = self._attach(spec)
        else:
            self._attach_finished(spec)
        self._set(spec)

    def _set(self, spec: dict[str, Any]) -> None:
        self.spec = spec
        self.shape = tuple(spec["shape"])
        self.dtype = np.dtype(spec["dtype"])
        self.kind, self.name = spec["kind"], spec["name"]
        self.chunk_slices = spec["chunk_slices"]
        self._sub = f"labels/{self.name}" if self.kind == "labels" else ""
        self._nchunks = -(-self.shape[0] // self.chunk_slices)

    # -- creating / reopening ----------------------------------------------------------------
    def _create(self, spec: dict[str, Any], replace: bool) -> None:
        """Build the store beside ``path`` and rename it into place (the old one aside first)."""
        check_folder_writable(self.path.parent)
        parent, pid = self.path.parent, os.getpid()
        tmp = parent / f".{self.path.name}.{pid}.part"
        try:
            parent.mkdir(parents=True, exist_ok=True)
            _remove_stale(self.path)
            shutil.rmtree(tmp, ignore_errors=True)
            self._skeleton(tmp, spec)
            if replace:  # the old store goes aside first: never a half-deleted one at `path`
                old = parent / f".{self.path.name}.{pid}.old"
                os.rename(self.path, old)
                os.rename(tmp, self.path)
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.rename(tmp, self.path)
        except OSError as err:
            shutil.rmtree(tmp, ignore_errors=True)
            if not replace and _state(self.path) != "absent":
                raise CellP2PError(
                    f"{self.path}: appeared while this command was creating it (another "
                    "process?); nothing was replaced: choose another name or pass --force"
                ) from None
            raise write_failed(self.path, err) from None

    @staticmethod
    def _skeleton(root: Path, spec: dict[str, Any]) -> None:
        """Group, empty arrays for every level and the incomplete marker, under ``root``."""
        zarr = need_module("zarr", "writing OME-Zarr")
        fmt = 2 if spec["ngff"] == "0.4" else 3
        group = zarr.open_group(str(root), mode="w-", zarr_format=fmt)
        if spec["kind"] == "labels":
            group = group.create_group("labels").create_group(spec["name"])
        nz, cs, tile = spec["shape"][0], spec["chunk_slices"], spec["tile"]
        for k, (h, w) in enumerate(spec["levels"]):
            shape, chunks = [nz, h, w], [cs, min(tile, h), min(tile, w)]
            if spec["axes"] == "czyx":
                shape, chunks = [spec["shape"][1], *shape], [1, *chunks]
            extra: dict[str, Any] = {"dimension_names": tuple(spec["axes"])}
            if fmt == 2:
                extra = {"chunk_key_encoding": {"name": "v2", "separator": "/"}}
            group.create_array(
                name=str(k), shape=shape, chunks=chunks, dtype=spec["dtype"], fill_value=0,
                compressors=_compressor(fmt), **extra,
            )  # fmt: skip
        (root / DONE_DIR).mkdir()
        (root / INCOMPLETE).write_text(json.dumps(spec, indent=1) + "\n")

    def _attach(self, spec: dict[str, Any]) -> dict[str, Any]:
        """Reopen an incomplete store started with the same shape, dtype and kind."""
        old = read_marker(self.path)
        for key in ("shape", "dtype", "kind"):
            if old.get(key) != spec[key]:
                raise CellP2PError(
                    f"{self.path}: was started with {key} {old.get(key)}, not {spec[key]}; "
                    "pass --force to start it again"
                )
        return old  # the layout it was started with (chunks, levels, name) wins

    def _attach_finished(self, spec: dict[str, Any]) -> None:
        from cellp2p.stores import StoreReader

        with StoreReader(self.path) as r:
            if list(r.shape) != spec["shape"] or r.dtype != np.dtype(spec["dtype"]):
                raise CellP2PError(
                    f"{self.path}: is finished with shape {r.shape} {r.dtype.name}, not "
                    f"{tuple(spec['shape'])} {spec['dtype']}; pass --force to write it again"
                )
        self.finished = True

    def _open_arrays(self) -> list[Any]:
        if self._arrays is None:
            zarr = need_module("zarr", "writing OME-Zarr")
            base = self.path / self._sub if self._sub else self.path
            n = len(self.spec["levels"])
            self._arrays = [zarr.open_array(str(base / str(k)), mode="r+") for k in range(n)]
        return self._arrays

    # -- writing -------------------------------------------------------------------------------
    def missing(self) -> list[int]:
        """Slices not yet written (by this process or any other), in order."""
        if self.finished:
            return []
        done, cs, n = done_chunks(self.path), self.chunk_slices, self.shape[0]
        chunks = (c for c in range(self._nchunks) if c not in done)
        return [z for c in chunks for z in range(c * cs, min(n, (c + 1) * cs))]

    def write_slice(self, z: int, plane: np.ndarray) -> None:
        """Write slice ``z`` ((Y, X) or (C, Y, X)); its chunk goes to disk once complete."""
        if self.finished:
            raise CellP2PError(f"{self.path}: is finished; there is nothing left to write")
        n = self.shape[0]
        if not 0 <= z < n:
            raise ValueError(f"slice {z} out of range for {n} slices")
        plane = np.array(plane, dtype=self.dtype)  # a copy: the caller may reuse its buffer
        if plane.shape != self.shape[1:]:
            raise ValueError(f"slice shape {plane.shape} != {self.shape[1:]}")
        c = z // self.chunk_slices
        buf = self._buffers.setdefault(c, {})
        buf[z] = plane
        if len(buf) == min(self.chunk_slices, n - c * self.chunk_slices):
            self._flush(c)

    def write(self, plane: np.ndarray) -> None:
        """Write the next slice still missing (every slice in order, for a new store)."""
        if self._cursor is None:
            self._cursor = iter(self.missing())
        z = next(self._cursor, None)
        if z is None:
            raise ValueError(f"more slices than the {self.shape[0]} the store holds")
        self.write_slice(z, plane)

    def _flush(self, c: int) -> None:
        """Write chunk ``c`` at every level, then record it done."""
        buf = self._buffers.pop(c)
        block = np.stack([buf[z] for z in sorted(buf)])
        zs = slice(c * self.chunk_slices, c * self.chunk_slices + len(buf))
        czyx = self.spec["axes"] == "czyx"
        try:
            for k, arr in enumerate(self._open_arrays()):
                if k:
                    block = halve(block, nearest=self.kind == "labels")
                if czyx:
                    arr[:, zs] = block.swapaxes(0, 1)
                else:
                    arr[zs] = block
            (self.path / DONE_DIR / str(c)).touch()
        except OSError as err:
            raise write_failed(self.path, err) from None

    def finalize(self) -> None:
        """Write the NGFF metadata and drop the incomplete marker: the store is finished."""
        if self.finished:
            return
        if self._buffers:
            waiting = sorted(z for b in self._buffers.values() for z in b)
            raise ValueError(
                f"slices {format_ranges(waiting)} wait for the rest of their chunk; give each "
                "process a chunk-aligned range (cellp2p.stores.slice_range)"
            )
        missing = self.missing()
        if missing:
            raise CellP2PError(
                f"{self.path}: {len(missing)} of {self.shape[0]} slices are not written yet "
                f"({format_ranges(missing)}); the store stays incomplete: write them (--resume)"
            )
        try:
            self._write_metadata()
            (self.path / INCOMPLETE).unlink()
        except OSError as err:
            raise write_failed(self.path, err) from None
        shutil.rmtree(self.path / DONE_DIR, ignore_errors=True)
        self.finished = True

    def _write_metadata(self) -> None:
        """The multiscales (and label) attributes, NGFF 0.4 or 0.5, written by zarr directly."""
        zarr = need_module("zarr", "writing OME-Zarr")
        s, nearest = self.spec, self.kind == "labels"
        ms: dict[str, Any] = {
            "name": s["name"],
            "axes": axes_meta(s["axes"], s["unit"] if s["spacing"] else None),
            "datasets": datasets_meta(len(s["levels"]), s["axes"], s["spacing"], nearest),
            "type": "nearest" if nearest else "mean",
            "metadata": {"method": "cellp2p.ngff.halve", "description": "2x2 in y and x"},
        }
        image: dict[str, Any] = {"multiscales": [ms]}
        if nearest:
            image["image-label"] = {"version": s["ngff"]} if s["ngff"] == "0.4" else {}
        base = self.path / self._sub if self._sub else self.path
        _set_ome(zarr.open_group(str(base), mode="r+"), image, s["ngff"])
        if nearest:
            labels = zarr.open_group(str(self.path / "labels"), mode="r+")
            _set_ome(labels, {"labels": [s["name"]]}, s["ngff"])

    def close(self, ok: bool = True) -> None:
        """Finish the store (``finalize_on_close``); after a failure leave it resumable."""
        if not ok:
            self._buffers.clear()
        elif self.finalize_on_close:
            self.finalize()
        elif self._buffers:
            self.finalize()  # raises: slices wait for a chunk another process does not own

    def __enter__(self) -> StoreWriter:
        return self

    def __exit__(self, exc_type: object, *exc: object) -> None:
        self.close(ok=exc_type is None)
