"""OME-Zarr / zarr / HDF5 stores: reading what other tools write, writing, resuming, sharing."""

from __future__ import annotations

import json
import os
import pickle
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

zarr = pytest.importorskip("zarr")

from cellp2p.errors import CellP2PError  # noqa: E402
from cellp2p.io import write_stack  # noqa: E402
from cellp2p.ngff import DONE_DIR, INCOMPLETE, halve, level_shapes  # noqa: E402
from cellp2p.stores import (  # noqa: E402
    StoreReader,
    StoreWriter,
    check_store_output,
    describe_store,
    is_store,
    slice_range,
)

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning:ome_zarr")
SPACING = (0.05, 0.004, 0.004)  # um


@pytest.fixture(scope="module")
def volume() -> np.ndarray:
    """7 x 37 x 42 uint8: odd sizes, so that the pyramid's edges are exercised."""
    return np.random.default_rng(0).integers(0, 256, (7, 37, 42), dtype=np.uint8)


def _ome_zarr_py(path: Path, data: np.ndarray, version: str, axes: str, **kw) -> Path:
    """A store written by ome-zarr-py itself, as another tool would write it."""
    ome_format = pytest.importorskip("ome_zarr.format")
    ome_writer = pytest.importorskip("ome_zarr.writer")
    fmt = ome_format.FormatV04() if version == "0.4" else ome_format.FormatV05()
    group = zarr.open_group(str(path), mode="w", zarr_format=fmt.zarr_format)
    ome_writer.write_image(data, group, axes=axes, fmt=fmt, **kw)
    return path


def _write(path: Path, data: np.ndarray, **kw) -> Path:
    with StoreWriter(path, shape=data.shape, dtype=data.dtype, **kw) as w:
        for plane in data:
            w.write(plane)
    return path


def _levels(path: Path) -> list[np.ndarray]:
    with StoreReader(path) as r:
        n = len(r.levels)
    out = []
    for k in range(n):
        with StoreReader(path, level=k) as r:
            out.append(r.read())
    return out


def _attrs(path: Path) -> dict:
    return dict(zarr.open_group(str(path), mode="r").attrs.asdict())


# -- recognising and reading -------------------------------------------------------------------


def test_is_store(tmp_path: Path) -> None:
    plain = tmp_path / "plain"
    zarr.create_array(str(plain), shape=(2, 4, 4), dtype="uint8")
    assert is_store(tmp_path / "a.zarr") and is_store(tmp_path / "a.zarr" / "labels" / "m")
    assert is_store("f.h5:/raw") and is_store("f.HDF5:/a/b") and is_store("f.h5")
    assert is_store(plain)
    assert not is_store(tmp_path / "a.tif") and not is_store(tmp_path)


@pytest.mark.parametrize("version", ["0.4", "0.5"])
def test_read_ome_zarr_written_by_ome_zarr_py(tmp_path: Path, volume: np.ndarray, version: str):
    path = _ome_zarr_py(
        tmp_path / "img.zarr", volume, version, "zyx", scale_factors=(2,),
        scale={"z": 50.0, "y": 4.0, "x": 4.0},
        axes_units={"z": "nanometer", "y": "nanometer", "x": "nanometer"},
    )  # fmt: skip
    mask = (volume > 128).astype(np.uint8)
    write_labels = pytest.importorskip("ome_zarr.writer").write_labels
    write_labels(mask, zarr.open_group(str(path)), name="cells", axes="zyx")
    with StoreReader(path) as r:
        assert r.shape == volume.shape and r.dtype == np.uint8 and len(r) == 7
        assert r.spacing == pytest.approx(SPACING) and r.unit == "um"
        assert r.format.startswith(f"OME-Zarr {version} image")
        assert r.labels == ["cells"] and len(r.levels) == 2
        np.testing.assert_array_equal(r[3], volume[3])
        np.testing.assert_array_equal(r.read([1, 2, 3]), volume[1:4])
        np.testing.assert_array_equal(r.read([5, 0]), volume[[5, 0]])
        np.testing.assert_array_equal(
            r.crop(slice(2, 4), slice(5, 9), slice(0, 3)), volume[2:4, 5:9, :3]
        )
    with StoreReader(path, level=1) as r:
        np.testing.assert_array_equal(pickle.loads(pickle.dumps(r))[0], r[0])
        assert r.shape[:2] == (7, 18)  # ome-zarr-py rounds sizes down, and scales by 37 / 18
        assert r.spacing == pytest.approx((0.05, 0.008, 0.008), rel=0.05)
    with StoreReader(path / "labels" / "cells") as r:
        assert "label image" in r.format
        np.testing.assert_array_equal(r.read(), mask)
    attrs = _attrs(path)
    first = attrs.get("ome", attrs)["multiscales"][0]["datasets"][0]["path"]
    with StoreReader(path / first) as r:  # one level named directly
        assert r.spacing == pytest.approx(SPACING) and r.shape == volume.shape


@pytest.mark.parametrize("version", ["0.4", "0.5"])
def test_read_channels_time_and_2d(tmp_path: Path, version: str) -> None:
    rng = np.random.default_rng(1)
    tczyx = rng.integers(0, 2**16, (1, 2, 3, 16, 20), dtype=np.uint16)
    path = _ome_zarr_py(tmp_path / "t.zarr", tczyx, version, "tczyx", scale_factors=())
    with StoreReader(path) as r:
        assert r.shape == (3, 2, 16, 20) and r.axes == "ZCYX" and r.spacing is None
        np.testing.assert_array_equal(r[1], tczyx[0, :, 1])
        np.testing.assert_array_equal(r.read(), tczyx[0].swapaxes(0, 1))
    yx = rng.random((16, 20)).astype(np.float32)
    path = _ome_zarr_py(tmp_path / "yx.zarr", yx, version, "yx", scale_factors=())
    with StoreReader(path) as r:
        assert r.shape == (1, 16, 20) and len(r) == 1
        np.testing.assert_array_equal(r[0], yx)
        np.testing.assert_array_equal(r.read(), yx[None])


@pytest.mark.parametrize("zarr_format", [2, 3])
def test_read_plain_zarr(tmp_path: Path, volume: np.ndarray, zarr_format: int) -> None:
    arr = zarr.create_array(
        str(tmp_path / "raw"), shape=volume.shape, chunks=(1, 16, 16), dtype="uint8",
        zarr_format=zarr_format,
    )  # fmt: skip
    arr[:] = volume
    arr.attrs["element_size_um"] = list(SPACING)
    with StoreReader(tmp_path / "raw") as r:
        assert r.format == f"zarr v{zarr_format} array" and r.chunks == (1, 16, 16)
        assert r.spacing == pytest.approx(SPACING)
        np.testing.assert_array_equal(r.read(), volume)
    zcyx = np.arange(2 * 3 * 4 * 5, dtype=np.float32).reshape(2, 3, 4, 5)
    zarr.create_array(str(tmp_path / "z4"), data=zcyx, zarr_format=zarr_format)
    with StoreReader(tmp_path / "z4") as r:  # no axis names: cellp2p's (Z, C, Y, X)
        assert r.shape == zcyx.shape
        np.testing.assert_array_equal(r[1], zcyx[1])


def test_read_plain_zarr_with_dimension_names(tmp_path: Path) -> None:
    czyx = np.arange(2 * 3 * 4 * 5, dtype=np.int16).reshape(2, 3, 4, 5)
    zarr.create_array(str(tmp_path / "c"), data=czyx, dimension_names=("c", "z", "y", "x"))
    with StoreReader(tmp_path / "c") as r:
        assert r.shape == (3, 2, 4, 5)
        np.testing.assert_array_equal(r[2], czyx[:, 2])


def test_read_hdf5(tmp_path: Path, volume: np.ndarray) -> None:
    h5py = pytest.importorskip("h5py")
    path = tmp_path / "vol.h5"
    with h5py.File(path, "w") as f:
        ds = f.create_dataset("volumes/raw", data=volume, chunks=(1, 16, 16))
        ds.attrs["element_size_um"] = SPACING
    with StoreReader(f"{path}:/volumes/raw") as r:
        assert r.format == "HDF5 dataset /volumes/raw" and r.chunks == (1, 16, 16)
        assert r.spacing == pytest.approx(SPACING)
        np.testing.assert_array_equal(r[6], volume[6])
        np.testing.assert_array_equal(
            r.crop(slice(0, 2), slice(3, 8), slice(1, 4)), volume[:2, 3:8, 1:4]
        )
    with StoreReader(path) as r:  # one dataset: the file alone is enough
        assert r.shape == volume.shape
        again = pickle.loads(pickle.dumps(r))  # DataLoader workers started by spawn
        np.testing.assert_array_equal(again[np.int64(2)], volume[2])
        again.close()
    assert "HDF5 dataset /volumes/raw" in describe_store(f"{path}:/volumes/raw")


def test_zarr_not_installed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = _write(tmp_path / "z.zarr", np.zeros((1, 4, 4), np.uint8))
    monkeypatch.setitem(sys.modules, "zarr", None)
    with pytest.raises(CellP2PError, match=r"needs the Python package zarr: pip install"):
        StoreReader(path)
    with pytest.raises(CellP2PError, match=r"needs the Python package zarr"):
        StoreWriter(tmp_path / "new.zarr", shape=(1, 4, 4), dtype=np.uint8)


def test_hdf5_without_h5py(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "v.h5").write_bytes(b"x")
    monkeypatch.setitem(sys.modules, "h5py", None)
    with pytest.raises(CellP2PError, match=r"needs the Python package h5py: pip install"):
        StoreReader(f"{tmp_path / 'v.h5'}:/raw")


# -- writing -----------------------------------------------------------------------------------


def _mean_ref(a: np.ndarray) -> np.ndarray:
    """2x2 mean with the last row/column repeated, computed the plain way."""
    h, w = a.shape[-2:]
    p = np.pad(a.astype(np.float64), [(0, 0), (0, h % 2), (0, w % 2)], mode="edge")
    m = (p[:, ::2, ::2] + p[:, 1::2, ::2] + p[:, ::2, 1::2] + p[:, 1::2, 1::2]) / 4
    return np.floor(m + 0.5).astype(a.dtype)


@pytest.mark.parametrize("version", ["0.4", "0.5"])
def test_write_image_read_back(tmp_path: Path, volume: np.ndarray, version: str) -> None:
    path = _write(
        tmp_path / "out.zarr", volume, spacing=SPACING, levels=3, chunk_slices=2, ngff=version
    )
    assert not (path / INCOMPLETE).exists() and not (path / DONE_DIR).exists()
    levels = _levels(path)
    assert [lv.shape for lv in levels] == [(7, 37, 42), (7, 19, 21), (7, 10, 11)]
    assert all(lv.dtype == np.uint8 for lv in levels)
    np.testing.assert_array_equal(levels[0], volume)
    np.testing.assert_array_equal(levels[1], _mean_ref(volume))
    np.testing.assert_array_equal(levels[2], _mean_ref(levels[1]))
    with StoreReader(path, level=2) as r:
        assert r.spacing == pytest.approx((0.05, 0.016, 0.016)) and r.chunks == (2, 10, 11)
    attrs = _attrs(path)
    ome = attrs["ome"] if version == "0.5" else attrs
    ms = ome["multiscales"][0]
    assert (ome if version == "0.5" else ms)["version"] == version
    assert [a["name"] for a in ms["axes"]] == ["z", "y", "x"]
    assert {a["unit"] for a in ms["axes"]} == {"micrometer"}
    assert ms["datasets"][1]["coordinateTransformations"] == [
        {"type": "scale", "scale": [0.05, 0.008, 0.008]},
        {"type": "translation", "translation": [0.0, 0.002, 0.002]},
    ]
    _check_with_other_tools(path, version, volume)


def _check_with_other_tools(path: Path, version: str, volume: np.ndarray) -> None:
    """ome-zarr-py reads the store back and ome-zarr-models validates its metadata."""
    parse_url = pytest.importorskip("ome_zarr.io").parse_url
    reader = pytest.importorskip("ome_zarr.reader").Reader
    node = next(iter(reader(parse_url(str(path)))()))
    np.testing.assert_array_equal(np.asarray(node.data[0]), volume)
    models = pytest.importorskip("ome_zarr_models")
    model = models.open_ome_zarr(zarr.open_group(str(path), mode="r"))
    assert type(model).__module__.startswith(f"ome_zarr_models.v0{version[-1]}")


@pytest.mark.parametrize("version", ["0.4", "0.5"])
def test_write_labels(tmp_path: Path, volume: np.ndarray, version: str) -> None:
    labels = (volume // 64).astype(np.uint16)
    path = _write(
        tmp_path / "pred.zarr", labels, kind="labels", levels=2, spacing=SPACING, ngff=version
    )
    label = path / "labels" / "pred"
    meta = _attrs(label)
    meta = meta.get("ome", meta)
    assert "image-label" in meta
    assert (meta["image-label"] if version == "0.4" else meta)["version"] == version
    labels_attrs = _attrs(path / "labels")
    assert labels_attrs.get("ome", labels_attrs)["labels"] == ["pred"]
    assert "multiscales" not in json.dumps(_attrs(path))  # the root holds no image
    levels = _levels(path)  # the root opens its only label image
    np.testing.assert_array_equal(levels[0], labels)
    np.testing.assert_array_equal(levels[1], labels[:, ::2, ::2])  # nearest: no new values
    assert levels[1].dtype == np.uint16
    with StoreReader(path) as r:
        assert "label image" in r.format and r.spacing == pytest.approx(SPACING)
    models = pytest.importorskip("ome_zarr_models")
    assert "ImageLabel" in type(models.open_ome_zarr(zarr.open_group(str(label)))).__name__
    if version == "0.5":
        assert (
            type(models.open_ome_zarr(zarr.open_group(str(path / "labels")))).__name__ == "Labels"
        )


def test_write_channels_float_and_bool(tmp_path: Path) -> None:
    data = np.random.default_rng(2).random((3, 2, 20, 24))  # float64 -> float32, like TIFF
    path = _write(tmp_path / "c.zarr", data, levels=2)
    with StoreReader(path) as r:
        assert r.shape == (3, 2, 20, 24) and r.dtype == np.float32 and r.axes == "ZCYX"
        np.testing.assert_allclose(r.read(), data.astype(np.float32))
        assert r.chunks == (1, 1, 20, 24)  # one channel and one slice per chunk
    assert zarr.open_array(str(path / "0")).metadata.dimension_names == ("c", "z", "y", "x")
    mask = np.zeros((2, 8, 8), bool)
    mask[:, 2:5, 3:6] = True
    with StoreReader(_write(tmp_path / "m.zarr", mask, kind="labels")) as r:
        assert r.dtype == np.uint8 and r.read().sum() == mask.sum()


def test_slice_range_covers_chunk_aligned() -> None:
    for n, cs, world in [(7, 2, 2), (10, 3, 4), (1, 1, 2), (64, 8, 3)]:
        parts = [slice_range(n, cs, r, world) for r in range(world)]
        assert [z for p in parts for z in p] == list(range(n))
        assert all(p.start % cs == 0 for p in parts if len(p))


def test_halve_and_level_shapes() -> None:
    a = np.array([[[0, 10, 255], [4, 6, 255]]], np.uint8)
    np.testing.assert_array_equal(halve(a, nearest=False), [[[5, 255]]])
    np.testing.assert_array_equal(halve(a, nearest=True), [[[0, 255]]])
    assert level_shapes((2048, 1500), None) == [(2048, 1500), (1024, 750), (512, 375), (256, 188)]
    assert level_shapes((64, 64), 3) == [(64, 64), (32, 32), (16, 16)]


# -- refusing, replacing, resuming -------------------------------------------------------------


def test_existing_store_refused_then_forced(tmp_path: Path, volume: np.ndarray) -> None:
    assert check_store_output(tmp_path / "o.zarr") == "absent"
    path = _write(tmp_path / "o.zarr", volume)
    with pytest.raises(CellP2PError, match=r"o.zarr: already exists; pass --force"):
        check_store_output(path)  # what predict checks before computing anything
    assert check_store_output(path, resume=True) == "finished"
    with pytest.raises(CellP2PError, match=r"o.zarr: already exists; pass --force"):
        StoreWriter(path, shape=volume.shape, dtype=volume.dtype)
    _write(path, volume[:3] // 2, force=True)
    with StoreReader(path) as r:
        np.testing.assert_array_equal(r.read(), volume[:3] // 2)
    assert not list(tmp_path.glob(".o.zarr.*"))  # nothing left beside it
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "notes.txt").write_text("keep")
    with pytest.raises(CellP2PError, match="not a zarr store; not replacing it"):
        StoreWriter(folder, shape=(1, 4, 4), dtype=np.uint8, force=True)
    assert (folder / "notes.txt").exists()


def test_force_replaces_an_interrupted_store(tmp_path: Path, volume: np.ndarray) -> None:
    path = tmp_path / "i.zarr"
    w = StoreWriter(path, shape=volume.shape, dtype=volume.dtype, finalize_on_close=False)
    w.write(volume[0])
    with StoreWriter(path, shape=(2, 5, 5), dtype=np.uint16, force=True) as fresh:
        assert fresh.missing() == [0, 1]
        fresh.write(np.ones((5, 5)))
        fresh.write(np.ones((5, 5)))
    with StoreReader(path) as r:
        assert r.shape == (2, 5, 5) and r.dtype == np.uint16 and r.read().sum() == 50


_CHILD = """
import sys, time
import numpy as np
from cellp2p.stores import StoreWriter, slice_range
path, npy, mode = sys.argv[1], sys.argv[2], sys.argv[3]
data = np.load(npy)
if mode == "kill":  # write three slices, then hang until killed
    w = StoreWriter(path, shape=data.shape, dtype=data.dtype, spacing=(0.05, 0.004, 0.004),
                    levels=2)
    for z in range(3):
        w.write_slice(z, data[z])
    time.sleep(120)
else:  # one rank of a job sharing one store: its own chunk-aligned slices only
    rank, world = int(sys.argv[4]), int(sys.argv[5])
    w = StoreWriter(path, shape=data.shape, dtype=data.dtype, resume=True, chunk_slices=2,
                    finalize_on_close=False)
    with w:
        for z in slice_range(data.shape[0], w.chunk_slices, rank, world):
            w.write_slice(z, data[z])
"""


def _child(*args: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-c", _CHILD, *args]
    return subprocess.Popen(cmd, env=env, stderr=subprocess.PIPE, text=True)


def test_interrupted_write_refused_then_resumed(tmp_path: Path, volume: np.ndarray) -> None:
    np.save(tmp_path / "v.npy", volume)
    path = tmp_path / "k.zarr"
    proc = _child(str(path), str(tmp_path / "v.npy"), "kill")
    deadline = time.monotonic() + 120
    while len(list((path / DONE_DIR).glob("*"))) < 3:
        assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
        assert time.monotonic() < deadline, "the child wrote no slices in time"
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    chunk = path / "0" / "c" / "3" / "0" / "0"  # slice 3, as if killed while writing it
    chunk.parent.mkdir(parents=True, exist_ok=True)
    chunk.write_bytes(b"\x00half a chunk")
    with pytest.raises(CellP2PError, match=r"interrupted write \(3 of 7 slices written\); not"):
        StoreReader(path)
    with pytest.raises(CellP2PError, match=r"interrupted write .*pass --resume .* --force"):
        StoreWriter(path, shape=volume.shape, dtype=volume.dtype)
    assert "INCOMPLETE: 3 of 7 slices written" in describe_store(path)
    assert "multiscales" not in json.dumps(_attrs(path))  # never looks finished
    with pytest.raises(CellP2PError, match="was started with shape"):
        StoreWriter(path, shape=(8, 37, 42), dtype=np.uint8, resume=True)
    with StoreWriter(path, shape=volume.shape, dtype=volume.dtype, resume=True) as w:
        assert w.missing() == [3, 4, 5, 6]
        for z in w.missing():
            w.write_slice(z, volume[z])
    ref = _write(tmp_path / "ref.zarr", volume, spacing=SPACING, levels=2)
    for got, want in zip(_levels(path), _levels(ref), strict=True):
        np.testing.assert_array_equal(got, want)
    assert _attrs(path) == _attrs(ref)
    with StoreWriter(path, shape=volume.shape, dtype=volume.dtype, resume=True) as w:
        assert w.finished and w.missing() == []  # resuming a finished store does nothing


def test_two_processes_one_store(tmp_path: Path, volume: np.ndarray) -> None:
    np.save(tmp_path / "v.npy", volume)
    path = tmp_path / "shared.zarr"
    main = StoreWriter(
        path, shape=volume.shape, dtype=volume.dtype, chunk_slices=2, spacing=SPACING, levels=2,
        finalize_on_close=False,
    )  # fmt: skip
    procs = [_child(str(path), str(tmp_path / "v.npy"), "rank", str(r), "2") for r in (0, 1)]
    for p in procs:
        _, err = p.communicate(timeout=120)
        assert p.returncode == 0, err
    assert main.missing() == []
    main.finalize()
    ref = _write(tmp_path / "one.zarr", volume, chunk_slices=2, spacing=SPACING, levels=2)
    for got, want in zip(_levels(path), _levels(ref), strict=True):
        np.testing.assert_array_equal(got, want)
    assert (
        _attrs(path)["ome"]["multiscales"][0]["datasets"]
        == (_attrs(ref)["ome"]["multiscales"][0]["datasets"])
    )


def test_finalize_with_slices_missing(tmp_path: Path, volume: np.ndarray) -> None:
    path = tmp_path / "p.zarr"
    w = StoreWriter(path, shape=volume.shape, dtype=volume.dtype)
    with pytest.raises(CellP2PError, match=r"2 of 7 slices are not written yet \(5-6\)"), w:
        for z in range(5):
            w.write(volume[z])
    w = StoreWriter(path, shape=volume.shape, dtype=volume.dtype, chunk_slices=3, resume=True)
    assert w.missing() == [5, 6] and w.chunk_slices == 1  # the layout it was started with
    with pytest.raises(RuntimeError), w:
        raise RuntimeError("a failure mid-way leaves the store resumable")
    assert (path / INCOMPLETE).exists()


# -- bad input: one clear error each -----------------------------------------------------------


def _hand_made(path: Path, axes: str, shape: tuple[int, ...]) -> Path:
    """An NGFF 0.5 image of one level with the given axes, written by hand."""
    group = zarr.open_group(str(path), mode="w")
    group.create_array("0", shape=shape, dtype="uint8")
    ms = {"axes": [{"name": a} for a in axes], "datasets": [{"path": "0"}]}
    group.attrs["ome"] = {"version": "0.5", "multiscales": [ms]}
    return path


def _bad_stores(tmp: Path) -> dict[str, tuple[Path | str, str]]:
    ok = _write(tmp / "ok.zarr", np.zeros((2, 8, 8), np.uint8), levels=2)
    folder = tmp / "folder"
    folder.mkdir()
    tif = write_stack(tmp / "a.tif", np.zeros((2, 8, 8), np.uint8))
    broken = tmp / "broken.zarr"
    broken.mkdir()
    (broken / "zarr.json").write_text("{not json")
    nodata = tmp / "nodata.zarr"
    zarr.open_group(str(nodata), mode="w").attrs["ome"] = {"version": "0.5", "multiscales": [{}]}
    tgroup = _hand_made(tmp / "t3.zarr", "tzyx", (3, 4, 8, 8))
    xyz = _hand_made(tmp / "xyz.zarr", "xyz", (8, 8, 2))
    lost = _write(tmp / "lost.zarr", np.zeros((2, 8, 8), np.uint8), levels=2)
    os.rename(lost / "1", lost / "gone")
    grp = zarr.open_group(str(tmp / "grp.zarr"), mode="w")
    grp.create_array("raw", shape=(2, 4, 4), dtype="uint8")
    damaged = _write(tmp / "damaged.zarr", np.full((2, 8, 8), 7, np.uint8))
    (damaged / "0" / "c" / "1" / "0" / "0").write_bytes(b"garbage")
    cases = {
        "missing": (tmp / "nope.zarr", "no such store; check the path"),
        "folder": (folder, "not a zarr store"),
        "tiff": (tif, "not a zarr store"),
        "metadata": (broken, "cannot read the store's metadata"),
        "multiscales": (nodata, "bad OME-Zarr metadata"),
        "time": (tgroup, "3 time points"),
        "axes": (xyz, "unsupported axes 'xyz'; cellp2p reads yx, zyx, czyx or tczyx"),
        "level": (lost, "level '1' listed in the metadata is missing"),
        "group": (tmp / "grp.zarr", r"without OME-Zarr multiscales \(holds: raw\); name one"),
        "h5 missing": (f"{tmp / 'nope.h5'}:/raw", "no such file"),
    }
    return {**cases, "_ok": (ok, ""), "_damaged": (damaged, "")}


def test_bad_inputs_one_clear_error_each(tmp_path: Path) -> None:
    cases = _bad_stores(tmp_path)
    for label, (path, message) in cases.items():
        if label.startswith("_"):
            continue
        with pytest.raises(CellP2PError, match=message) as info:
            StoreReader(path)
        assert str(path).split(":/")[0] in str(info.value), label
    with pytest.raises(CellP2PError, match=r"no level 5; the store has 2 levels \(0-1\)"):
        StoreReader(cases["_ok"][0], level=5)
    with StoreReader(cases["_damaged"][0]) as r:
        np.testing.assert_array_equal(r[0], 7)
        with pytest.raises(CellP2PError, match=r"cannot read slice 1 .*damaged"):
            r[1]


def test_bad_hdf5_and_writer_arguments(tmp_path: Path) -> None:
    h5py = pytest.importorskip("h5py")
    path = tmp_path / "two.h5"
    with h5py.File(path, "w") as f:
        f["raw"] = np.zeros((2, 4, 4), np.uint8)
        f["labels"] = np.zeros((2, 4, 4), np.uint8)
    with pytest.raises(CellP2PError, match=r"2 datasets \(datasets: /labels, /raw\); name one"):
        StoreReader(path)
    with pytest.raises(CellP2PError, match="no dataset /pred"):
        StoreReader(f"{path}:/pred")
    (tmp_path / "junk.h5").write_bytes(b"not hdf5")
    with pytest.raises(CellP2PError, match="cannot open it as HDF5"):
        StoreReader(tmp_path / "junk.h5")
    with pytest.raises(CellP2PError, match="a label image holds integers"):
        StoreWriter(tmp_path / "f.zarr", shape=(2, 4, 4), dtype=np.float32, kind="labels")
    with pytest.raises(CellP2PError, match="exclude each other"):
        StoreWriter(tmp_path / "f.zarr", shape=(2, 4, 4), dtype=np.uint8, force=True, resume=True)


def test_describe_store(tmp_path: Path, volume: np.ndarray) -> None:
    path = _write(tmp_path / "d.zarr", volume, spacing=SPACING, levels=2, chunk_slices=2)
    text = describe_store(path)
    for part in (
        "OME-Zarr 0.5 image (zarr v3)",
        "7 x 37 x 42 (ZYX",
        "uint8",
        "chunks     2 x 37 x 42",
        "levels     2: 7 x 37 x 42, 7 x 19 x 21",
        "pixel size 0.05 x 0.004 x 0.004 um",
    ):
        assert part in text
