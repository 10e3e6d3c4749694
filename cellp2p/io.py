"""Reading and writing image stacks: multi-page TIFF, 2D images, folders, paired AB images.

Axis convention, everywhere in cellp2p: a stack is ``(Z, Y, X)`` for one channel and
``(Z, C, Y, X)`` for several (RGB included). A single 2D image is a stack of one slice.
Pixel size is ``spacing = (z, y, x)`` in ``unit`` (micrometres by default).
"""

from __future__ import annotations

import contextlib
import logging
import re
import warnings
import xml.etree.ElementTree as ET
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import tifffile

from cellp2p.errors import CellP2PError
from cellp2p.fsutil import check_output, claim, temp_name, write_failed

TIFF_SUFFIXES = (".tif", ".tiff")
IMAGE_SUFFIXES = (*TIFF_SUFFIXES, ".png", ".jpg", ".jpeg", ".bmp")
IMAGEJ_DTYPES = (np.uint8, np.uint16, np.float32)
BIGTIFF_BYTES = 2**32 - 2**25  # leave room for the IFDs below the 4 GiB limit
_UNITS_TO_UM = {"um": 1.0, "µm": 1.0, "\\u00B5m": 1.0, "micron": 1.0, "nm": 1e-3, "mm": 1e3}


@dataclass
class Stack:
    """An image stack in memory with its pixel size."""

    data: np.ndarray
    spacing: tuple[float, float, float] | None = None
    unit: str = "um"
    path: Path | None = None

    @property
    def axes(self) -> str:
        """``ZYX`` or ``ZCYX``."""
        return "ZYX" if self.data.ndim == 3 else "ZCYX"


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Silence reader warnings (PIL: "Corrupt EXIF data", ...): a damaged file is refused with
    one error line, and a readable one needs no warning printed beside the result."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def _natural_key(name: str) -> list:
    return [int(t) if t.isdigit() else t.lower() for t in re.split(r"(\d+)", name)]


def _missing(path: Path) -> CellP2PError:
    return CellP2PError(f"{path}: no such file or folder; check the path")


def _corrupt(path: Path, err: Exception) -> CellP2PError:
    reason = str(err).splitlines()[0] if str(err) else type(err).__name__
    return CellP2PError(
        f"{path}: cannot read it as an image ({reason}); "
        "check that it is a complete TIFF/PNG file (re-export it, e.g. with Fiji)"
    )


def _to_um(value: float, unit: str) -> tuple[float, str]:
    factor = _UNITS_TO_UM.get(unit.strip().lower().replace("\u00b5", "µ"))
    return (value * factor, "um") if factor is not None else (value, unit)


class StackReader:
    """Slice-by-slice access to a TIFF stack, a 2D image or a folder of 2D images.

    ``reader[i]`` returns slice ``i`` as ``(Y, X)`` or ``(C, Y, X)``; only that slice is read,
    so stacks larger than memory can be streamed.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.spacing: tuple[float, float, float] | None = None
        self.unit = "um"
        self._tif: tifffile.TiffFile | None = None
        self._files: list[Path] | None = None
        self._array: np.ndarray | None = None
        if not self.path.exists():
            raise _missing(self.path)
        try:
            with _quiet():
                self._open()
        except CellP2PError:
            self.close()
            raise
        except Exception as err:  # tifffile/PIL raise many types for broken files
            self.close()
            raise _corrupt(self.path, err) from None

    # -- opening -------------------------------------------------------------------------------
    def _open(self) -> None:
        if self.path.is_dir():
            self._open_dir()
        elif self.path.suffix.lower() in TIFF_SUFFIXES:
            self._open_tiff()
        else:
            arr = _read_2d(self.path)
            if arr.ndim == 3:  # RGB (Y, X, S) -> (C, Y, X), as for every other source
                arr = np.moveaxis(arr, -1, 0)
            self._array = arr[None]
            self._finish_shape(self._array.shape[1:])

    def _open_dir(self) -> None:
        files = [p for p in self.path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES]
        if not files:
            raise CellP2PError(
                f"{self.path}: folder holds no images ({', '.join(IMAGE_SUFFIXES)}); "
                "point to a folder of 2D images or to a TIFF stack"
            )
        self._files = sorted(files, key=lambda p: _natural_key(p.name))
        first = _read_2d(self._files[0])
        self._nslices = len(self._files)
        self._finish_shape(first.shape)
        self.dtype = first.dtype

    def _open_tiff(self) -> None:
        if self.path.stat().st_size == 0:
            raise CellP2PError(f"{self.path}: file is empty; re-export or re-download it")
        with _TiffLog() as log:
            tif = tifffile.TiffFile(self.path)
            self._tif = tif
            npages = len(tif.pages)  # walks the whole IFD chain: finds a cut-off file
            series = tif.series[0] if tif.series and npages else None
        if series is None:
            raise CellP2PError(f"{self.path}: TIFF holds no image; re-export it")
        axes, shape = series.axes, series.shape
        if 0 in shape:
            raise CellP2PError(f"{self.path}: stack has no slices ({axes} {shape}); re-export it")
        _check_complete(self.path, tif, series, log.problems)
        self.dtype = np.dtype(series.dtype)
        if self.dtype.kind not in "biuf":
            raise CellP2PError(
                f"{self.path}: pixels of type {self.dtype.name} are not an image cellp2p reads; "
                "save it as 8/16-bit integers or float32 (e.g. the magnitude of complex data)"
            )
        if len(shape) > 6:
            raise CellP2PError(
                f"{self.path}: {len(shape)} axes ({axes}); cellp2p reads up to Z, C, Y, X "
                "(plus singleton axes): split the file into one stack per time point/position"
            )
        # tifffile names the planes of a page YX, plus S for RGB samples.
        plane_axes = "YXS" if axes.endswith("YXS") else "YX"
        if not axes.endswith(plane_axes):
            raise CellP2PError(
                f"{self.path}: unsupported axis order {axes}; save it as ZYX or ZCYX"
            )
        page_axes, page_shape = axes[: -len(plane_axes)], shape[: -len(plane_axes)]
        big = [(a, n) for a, n in zip(page_axes, page_shape, strict=True) if n > 1 and a != "C"]
        if len(big) > 1:
            desc = ", ".join(f"{a}={n}" for a, n in big)
            raise CellP2PError(
                f"{self.path}: more than one stack axis ({desc}, axes {axes}); cellp2p reads one "
                "(Z, Y, X) or (Z, C, Y, X) stack: split it into one file per time point/position"
            )
        self._page_axes, self._page_shape = page_axes, page_shape
        self._zaxis = page_axes.index(big[0][0]) if big else None
        self._caxis = page_axes.index("C") if "C" in page_axes else None
        nchan = page_shape[self._caxis] if self._caxis is not None else 1
        if plane_axes == "YXS":
            if nchan > 1:
                raise CellP2PError(f"{self.path}: both C and RGB samples; save it as ZCYX")
            nchan = shape[-1]
        self._rgb = plane_axes == "YXS"
        self._nslices = big[0][1] if big else 1
        self._nchan = nchan
        self._series = series
        self._yx = shape[-3:-1] if self._rgb else shape[-2:]
        if self._nslices == 0 or 0 in shape:
            raise CellP2PError(f"{self.path}: stack has no slices; re-export it")
        # Uncompressed contiguous files are memory-mapped: slicing is then free.
        try:
            mm = tif.asarray(out="memmap") if series.dataoffset is not None else None
        except Exception:
            mm = None
        self._mm = mm
        self._finish_shape(tuple(self._yx), nchan=nchan)
        self._read_spacing(tif)

    def _finish_shape(self, yx: Sequence[int], nchan: int = 1) -> None:
        if self._array is not None:
            self._nslices = 1
            self.dtype = self._array.dtype
            if self._array.ndim == 4:
                nchan = self._array.shape[1]
                yx = self._array.shape[2:]
        if len(yx) == 3:  # RGB 2D image from a folder or PNG: (Y, X, S)
            nchan, yx = yx[2], yx[:2]
        self._nchan = nchan
        shape = (self._nslices, *yx) if nchan == 1 else (self._nslices, nchan, *yx)
        self.shape: tuple[int, ...] = tuple(int(n) for n in shape)

    def _read_spacing(self, tif: tifffile.TiffFile) -> None:
        page = tif.pages.first
        yx = None
        tags = page.tags
        if "XResolution" in tags and "YResolution" in tags:
            xr, yr = tags["XResolution"].value, tags["YResolution"].value
            if xr[0] and yr[0]:
                yx = (yr[1] / yr[0], xr[1] / xr[0])
        unit, zsize = "um", 1.0
        if tif.is_imagej and tif.imagej_metadata:
            meta = tif.imagej_metadata
            unit = str(meta.get("unit", ""))  # no unit: ImageJ calls it uncalibrated
            zsize = float(meta.get("spacing", 1.0))
            if yx is None or unit in ("", "pixel"):
                return
        elif tif.is_shaped and tif.shaped_metadata and "spacing" in tif.shaped_metadata[0]:
            meta = tif.shaped_metadata[0]
            zsize, y, x = (float(v) for v in meta["spacing"])
            yx, unit = (y, x), str(meta.get("unit", "um"))  # converted to um below, as for ImageJ
        elif tif.is_ome and tif.ome_metadata:
            self._read_ome_spacing(tif.ome_metadata)
            return
        elif yx is not None and "ResolutionUnit" in tags:
            res_unit = int(tags["ResolutionUnit"].value)
            if res_unit == 2:  # inch
                yx, unit = (yx[0] * 25400, yx[1] * 25400), "um"
            elif res_unit == 3:  # centimetre
                yx, unit = (yx[0] * 1e4, yx[1] * 1e4), "um"
            else:
                return
        else:
            return
        z, unit_z = _to_um(zsize, unit)
        y, _ = _to_um(yx[0], unit)
        x, _ = _to_um(yx[1], unit)
        self.spacing, self.unit = (z, y, x), unit_z

    def _read_ome_spacing(self, xml: str) -> None:
        try:
            root = ET.fromstring(xml)
        except ET.ParseError:
            return
        pixels = next((el for el in root.iter() if el.tag.endswith("Pixels")), None)
        if pixels is None or "PhysicalSizeX" not in pixels.attrib:
            return
        get = pixels.attrib.get
        x, _ = _to_um(float(get("PhysicalSizeX")), get("PhysicalSizeXUnit", "µm"))
        y, _ = _to_um(
            float(get("PhysicalSizeY", get("PhysicalSizeX"))), get("PhysicalSizeYUnit", "µm")
        )
        z, _ = _to_um(float(get("PhysicalSizeZ", 1.0)), get("PhysicalSizeZUnit", "µm"))
        self.spacing, self.unit = (z, y, x), "um"

    # -- access --------------------------------------------------------------------------------
    def __len__(self) -> int:
        return self._nslices

    @property
    def ndim(self) -> int:
        return len(self.shape)

    def __getitem__(self, index: int) -> np.ndarray:
        """Slice ``index`` as (Y, X) or (C, Y, X)."""
        if not -self._nslices <= index < self._nslices:
            raise IndexError(f"slice {index} out of range for {self._nslices} slices")
        index %= self._nslices
        try:
            with _quiet():
                out = self._read_slice(index)
        except CellP2PError:
            raise
        except Exception as err:
            raise _corrupt(self.path, err) from None
        rgb_last = out.ndim == 3 and out.shape[-1] == self._nchan and self._nchan in (3, 4)
        if rgb_last and out.shape[0] != self._nchan:
            out = np.moveaxis(out, -1, 0)
        return np.ascontiguousarray(out)

    def _read_slice(self, index: int) -> np.ndarray:
        if self._array is not None:
            return self._array[index]
        if self._files is not None:
            out = _read_2d(self._files[index])
            if out.shape[:2] != tuple(self.shape[-2:]):
                raise CellP2PError(
                    f"{self._files[index]}: size {out.shape[:2]} differs from "
                    f"{self._files[0].name} {tuple(self.shape[-2:])}; all images of a "
                    "folder must have the same size"
                )
            return out
        return self._read_tiff_slice(index)

    def _read_tiff_slice(self, index: int) -> np.ndarray:
        assert self._tif is not None
        nchan = 1 if self._rgb else self._nchan
        pages = []
        for c in range(nchan):
            idx = [0] * len(self._page_shape)
            if self._zaxis is not None:
                idx[self._zaxis] = index
            if self._caxis is not None:
                idx[self._caxis] = c
            flat = int(np.ravel_multi_index(idx, self._page_shape)) if idx else 0
            if self._mm is not None:
                plane = np.asarray(
                    self._mm.reshape(-1, *self._mm.shape[-(3 if self._rgb else 2) :])[flat]
                )
            else:
                plane = self._tif.asarray(key=flat, series=0)
            pages.append(plane)
        if self._rgb:
            return np.moveaxis(pages[0], -1, 0)
        return pages[0] if nchan == 1 else np.stack(pages)

    def __iter__(self) -> Iterator[np.ndarray]:
        for i in range(self._nslices):
            yield self[i]

    def read(self, slices: Sequence[int] | None = None) -> np.ndarray:
        """All slices (or the listed ones) as one array."""
        ids = range(self._nslices) if slices is None else slices
        for i in ids:
            if not 0 <= i < self._nslices:
                raise CellP2PError(
                    f"{self.path}: slice {i} requested but the stack has {self._nslices} "
                    f"slices (0-{self._nslices - 1}); fix the slice selection"
                )
        return np.stack([self[i] for i in ids])

    def close(self) -> None:
        if self._tif is not None:
            self._tif.close()
            self._tif = None
        self._mm = None

    def __enter__(self) -> StackReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class _TiffLog(logging.Handler):
    """Collects what tifffile logs while a file is opened (it logs, not raises, on damage)."""

    # tifffile reports a cut-off or damaged file with these messages and reads on regardless.
    DAMAGE = ("invalid page offset", "invalid offset to page", "corrupted", "failed to reshape")

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.problems: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        msg = record.getMessage()
        if any(d in msg for d in self.DAMAGE):
            self.problems.append(msg.split("> ", 1)[-1])

    def __enter__(self) -> _TiffLog:
        logging.getLogger("tifffile").addHandler(self)
        return self

    def __exit__(self, *exc: object) -> None:
        logging.getLogger("tifffile").removeHandler(self)


def _check_complete(
    path: Path, tif: tifffile.TiffFile, series: tifffile.TiffPageSeries, problems: list[str]
) -> None:
    """Refuse a truncated or damaged TIFF instead of silently reading part of it."""
    size = path.stat().st_size
    if not problems:
        if series.dataoffset is not None:
            end = series.dataoffset + series.nbytes
        else:
            end = 0
            for page in tif.pages:
                offsets = getattr(page, "dataoffsets", ())
                counts = getattr(page, "databytecounts", ())
                end = max([end, *(o + c for o, c in zip(offsets, counts, strict=False))])
        if end > size:
            problems = [f"image data end at byte {end} but the file has {size} bytes"]
    if problems:
        raise CellP2PError(
            f"{path}: TIFF is truncated or damaged ({problems[0]}); "
            "re-export or re-download it (an interrupted copy cuts files short)"
        )


def _read_2d(path: Path) -> np.ndarray:
    """One 2D image as (Y, X) or (Y, X, S)."""
    if path.suffix.lower() in TIFF_SUFFIXES:
        arr = tifffile.imread(path)
    else:
        from PIL import Image

        with Image.open(path) as im:
            if im.mode == "P":
                im = im.convert("RGB")
            arr = np.asarray(im)
    if arr.ndim == 3 and arr.shape[-1] == 4:
        arr = arr[..., :3]  # drop alpha
    grey = arr.ndim == 3 and arr.shape[-1] == 3 and np.array_equal(arr[..., 0], arr[..., 1])
    if grey and np.array_equal(arr[..., 0], arr[..., 2]):
        arr = arr[..., 0]  # grey saved as RGB
    if arr.ndim not in (2, 3):
        raise CellP2PError(f"{path}: expected a 2D image, found shape {arr.shape}")
    return arr


def open_stack(path: str | Path, level: int = 0) -> StackReader:
    """Open a stack or a chunked store for slice-by-slice reading (use as a context manager).

    OME-Zarr, zarr and HDF5 (``file.h5:/dataset``) go to :class:`cellp2p.stores.StoreReader`
    (same interface, read lazily chunk by chunk, ``level`` a pyramid level); anything else to
    :class:`StackReader`.
    """
    from cellp2p.stores import StoreReader, is_store  # is_store is path logic only

    if is_store(path):
        return StoreReader(path, level=level)  # type: ignore[return-value]
    return StackReader(path)


def read_stack(path: str | Path, slices: Sequence[int] | None = None, level: int = 0) -> Stack:
    """Read a whole stack (or the listed slices) into memory."""
    with open_stack(path, level=level) as reader:
        data = reader.read(slices)
        return Stack(data=data, spacing=reader.spacing, unit=reader.unit, path=Path(path))


def read_ab(path: str | Path) -> tuple[Stack, Stack]:
    """Split paired "AB" images (input left, target right, the pix2pix layout) into two stacks."""
    stack = read_stack(path)
    width = stack.data.shape[-1]
    if width % 2:
        raise CellP2PError(
            f"{path}: AB images need an even width (A and B side by side), found {width}"
        )
    half = width // 2
    a, b = stack.data[..., :half], stack.data[..., half:]
    return (
        Stack(np.ascontiguousarray(a), stack.spacing, stack.unit, stack.path),
        Stack(np.ascontiguousarray(b), stack.spacing, stack.unit, stack.path),
    )


# -- writing -----------------------------------------------------------------------------------


def _tiff_kwargs(
    shape: Sequence[int], dtype: np.dtype, spacing: tuple[float, float, float] | None, unit: str
) -> tuple[dict, dict]:
    """(TiffWriter kwargs, per-write kwargs) for an ImageJ-compatible file where possible."""
    nbytes = int(np.prod(shape)) * np.dtype(dtype).itemsize
    imagej = np.dtype(dtype) in [np.dtype(d) for d in IMAGEJ_DTYPES] and nbytes < BIGTIFF_BYTES
    writer = {"bigtiff": nbytes >= BIGTIFF_BYTES, "imagej": imagej}
    # Slices are appended one by one; tifffile derives the axes from the page shape.
    axes = "ZYX" if len(shape) == 3 else "ZCYX"
    # A one-slice series keeps the description of its first page, which has no Z.
    meta: dict = {} if imagej else {"axes": axes if shape[0] > 1 else axes[1:]}
    write: dict = {"photometric": "minisblack"}
    if spacing is not None:
        write["resolution"] = (1.0 / spacing[2], 1.0 / spacing[1])
        if imagej:
            meta.update(spacing=float(spacing[0]), unit=unit)
        else:
            write["resolutionunit"] = "NONE"
            meta.update(spacing=list(map(float, spacing)), unit=unit)
    write["metadata"] = meta
    return writer, write


def write_stack(
    path: str | Path,
    data: np.ndarray,
    *,
    spacing: tuple[float, float, float] | None = None,
    unit: str = "um",
    force: bool = False,
) -> Path:
    """Write (Z, Y, X) or (Z, C, Y, X) as an ImageJ TIFF, atomically (temp file + rename)."""
    data = np.asarray(data)
    if data.ndim == 2:
        data = data[None]
    if data.ndim not in (3, 4):
        raise CellP2PError(f"{path}: cannot write an array of shape {data.shape}; need (Z, Y, X)")
    with StackWriter(
        path, shape=data.shape, dtype=data.dtype, spacing=spacing, unit=unit, force=force
    ) as w:
        for plane in data:
            w.write(plane)
    return Path(path)


class StackWriter:
    """Write a stack slice by slice to a temporary file, renamed into place when complete.

    An exception (or a kill) before the last slice leaves nothing at the final path.
    """

    def __init__(
        self,
        path: str | Path,
        *,
        shape: Sequence[int],
        dtype: np.dtype | type,
        spacing: tuple[float, float, float] | None = None,
        unit: str = "um",
        force: bool = False,
    ):
        self.path = check_output(path, force)
        self._force = force
        dtype = np.dtype(dtype)
        if dtype == np.bool_:
            dtype = np.dtype(np.uint8)
        elif dtype == np.float64:
            dtype = np.dtype(np.float32)
        self.dtype, self.shape = dtype, tuple(int(n) for n in shape)
        self._writer_kw, self._write_kw = _tiff_kwargs(self.shape, dtype, spacing, unit)
        self._tmp = temp_name(self.path)
        self._tif: tifffile.TiffWriter | None = None
        self._count = 0

    def __enter__(self) -> StackWriter:
        try:
            self._tif = tifffile.TiffWriter(self._tmp, **self._writer_kw)
        except OSError as err:
            with contextlib.suppress(OSError):
                self._tmp.unlink(missing_ok=True)
            raise write_failed(self.path, err) from None
        return self

    def write(self, plane: np.ndarray) -> None:
        """Append one slice, (Y, X) or (C, Y, X)."""
        assert self._tif is not None, "use StackWriter as a context manager"
        plane = np.asarray(plane).astype(self.dtype, copy=False)
        if plane.shape != self.shape[1:]:
            raise ValueError(f"slice shape {plane.shape} != {self.shape[1:]}")
        if self._count >= self.shape[0]:
            raise ValueError(f"more than the {self.shape[0]} slices declared")
        if plane.ndim == 2 and self._writer_kw["imagej"]:
            # (1, Y, X) pages make tifffile count ImageJ pages as Z slices, not channels.
            plane = plane[None]
        try:
            self._tif.write(plane, contiguous=True, **self._write_kw)
        except OSError as err:  # disk full, quota, I/O error: the caller's exit removes the temp
            raise write_failed(self.path, err) from None
        self._count += 1

    def close(self, ok: bool = True) -> None:
        """Finish the file and rename it into place (``ok``), or remove the temporary file.

        Whatever fails on the way (flushing to a full disk, the rename), the temporary file is
        removed and nothing appears at the final path.
        """
        renamed = False
        try:
            if self._tif is not None:
                tif, self._tif = self._tif, None
                if ok:
                    tif.close()
                else:
                    with contextlib.suppress(Exception):  # already failing: keep that error
                        tif.close()
            if ok and self._count == self.shape[0]:
                claim(self._tmp, self.path, replace=self._force)
                renamed = True
        except OSError as err:
            raise write_failed(self.path, err) from None
        finally:
            if not renamed:
                with contextlib.suppress(OSError):
                    self._tmp.unlink(missing_ok=True)

    def __exit__(self, exc_type: object, *exc: object) -> None:
        self.close(ok=exc_type is None)
