"""Stack I/O (cellp2p.io) and the input checks (cellp2p.validate), on the library directly.

The same failures through the command line are in test_cli.py.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import tifffile
from PIL import Image

import cellp2p.io as cio
from cellp2p.checks import binary_labels, check_finite, check_grayscale, check_pair
from cellp2p.errors import CellP2PError
from cellp2p.io import StackWriter, open_stack, read_ab, read_stack, write_stack

SPACING = (2.0, 0.5, 0.25)  # z, y, x in um; all different so a swap shows


def _data(shape: tuple[int, ...], dtype, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    dtype = np.dtype(dtype)
    if dtype.kind == "f":
        return (rng.standard_normal(shape) * 100).astype(dtype)
    hi = min(np.iinfo(dtype).max, 2**31 - 1)
    return rng.integers(0, hi, shape, endpoint=True).astype(dtype)


def _no_part_files(folder: Path) -> list[str]:
    return [p.name for p in folder.iterdir() if p.name.endswith(".part")]


def _one_line_naming(err: pytest.ExceptionInfo, path: Path) -> str:
    msg = str(err.value)
    assert "\n" not in msg
    assert str(path) in msg
    return msg


# -- round trips -------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16, np.float32, np.uint32])
@pytest.mark.parametrize("shape", [(1, 12, 20), (5, 12, 20), (3, 2, 12, 20), (1, 3, 12, 20)])
def test_write_read_round_trip(tmp_path, dtype, shape):
    data = _data(shape, dtype)
    path = write_stack(tmp_path / "s.tif", data, spacing=SPACING)
    stack = read_stack(path)
    assert stack.data.dtype == np.dtype(dtype)
    assert stack.data.shape == shape
    np.testing.assert_array_equal(stack.data, data)
    assert stack.spacing == pytest.approx(SPACING)
    assert stack.unit == "um"
    assert stack.axes == ("ZYX" if len(shape) == 3 else "ZCYX")
    assert stack.path == path
    with tifffile.TiffFile(path) as tif:
        # uint32 is not an ImageJ type: it goes through tifffile's own (shaped) metadata.
        assert tif.is_imagej == (np.dtype(dtype) != np.uint32)


def test_2d_array_is_one_slice(tmp_path):
    data = _data((12, 20), np.uint16)
    stack = read_stack(write_stack(tmp_path / "one.tif", data))
    assert stack.data.shape == (1, 12, 20)
    np.testing.assert_array_equal(stack.data[0], data)
    assert stack.spacing is None


@pytest.mark.parametrize(("dtype", "stored"), [(np.float64, np.float32), (np.bool_, np.uint8)])
def test_write_converts_types_imagej_lacks(tmp_path, dtype, stored):
    data = _data((2, 8, 8), np.uint8) > 100 if dtype == np.bool_ else _data((2, 8, 8), dtype)
    stack = read_stack(write_stack(tmp_path / "c.tif", data))
    assert stack.data.dtype == stored
    np.testing.assert_allclose(stack.data, data.astype(stored))


@pytest.mark.parametrize(
    ("unit", "expected"),
    [("um", (50.0, 4.0, 4.0)), ("nm", (0.05, 0.004, 0.004)), ("mm", (5e4, 4e3, 4e3))],
)
@pytest.mark.parametrize("dtype", [np.uint8, np.uint32])
def test_spacing_units_read_back_in_micrometres(tmp_path, unit, expected, dtype):
    path = write_stack(
        tmp_path / "u.tif", np.zeros((2, 8, 8), dtype), spacing=(50, 4, 4), unit=unit
    )
    stack = read_stack(path)
    assert stack.spacing == pytest.approx(expected)
    assert stack.unit == "um"


@pytest.mark.parametrize(
    ("shape", "axes"), [((4, 12, 20), "ZYX"), ((4, 3, 12, 20), "ZCYX"), ((1, 12, 20), "YX")]
)
def test_imagej_metadata_fiji_reads(tmp_path, shape, axes):
    """What Fiji/napari see: hyperstack axes, z spacing and unit, XResolution = 1 / pixel size."""
    path = write_stack(tmp_path / "ij.tif", _data(shape, np.uint16), spacing=SPACING)
    with tifffile.TiffFile(path) as tif:
        assert tif.is_imagej
        assert tif.series[0].axes == axes
        assert tif.series[0].shape == (shape if shape[0] > 1 else shape[1:])
        meta = tif.imagej_metadata
        assert meta["spacing"] == pytest.approx(SPACING[0])
        assert meta["unit"] == "um"
        assert meta.get("slices", 1) == shape[0]
        assert meta.get("channels", 1) == (shape[1] if len(shape) == 4 else 1)
        tags = tif.pages.first.tags
        xnum, xden = tags["XResolution"].value
        ynum, yden = tags["YResolution"].value
        assert xden / xnum == pytest.approx(SPACING[2])
        assert yden / ynum == pytest.approx(SPACING[1])


def test_no_spacing_reads_back_uncalibrated(tmp_path):
    path = write_stack(tmp_path / "plain.tif", _data((3, 8, 8), np.uint8))
    assert read_stack(path).spacing is None


def test_write_stack_refuses_other_dims(tmp_path):
    with pytest.raises(CellP2PError, match="shape"):
        write_stack(tmp_path / "x.tif", np.zeros((1, 1, 1, 4, 4), np.uint8))
    assert not (tmp_path / "x.tif").exists()


# -- foreign files -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs",
    [
        {"compression": "zlib"},
        {"compression": "lzw"},
        {"compression": "zstd", "tile": (16, 16)},
        {"compression": "zlib", "imagej": True, "metadata": {"axes": "ZYX"}},
        {"metadata": None},
    ],
    ids=["zlib", "lzw", "zstd-tiled", "imagej-zlib", "no-metadata"],
)
def test_reads_compressed_tiff(tmp_path, kwargs):
    data = _data((5, 24, 32), np.uint16)
    path = tmp_path / "c.tif"
    tifffile.imwrite(path, data, **kwargs)
    stack = read_stack(path)
    np.testing.assert_array_equal(stack.data, data)
    with open_stack(path) as reader:
        np.testing.assert_array_equal(np.stack(list(reader)), data)


def test_reads_imagej_hyperstack(tmp_path):
    data = _data((4, 2, 24, 32), np.uint16)
    path = tmp_path / "hyper.tif"
    meta = {"axes": "ZCYX", "spacing": 3.0, "unit": "um"}
    tifffile.imwrite(path, data, imagej=True, metadata=meta, resolution=(1 / 0.5, 1 / 0.25))
    stack = read_stack(path)
    assert stack.data.shape == (4, 2, 24, 32)
    np.testing.assert_array_equal(stack.data, data)
    assert stack.spacing == pytest.approx((3.0, 0.25, 0.5))


def test_imagej_without_unit_is_uncalibrated(tmp_path):
    # tifffile always writes XResolution 1/1; without a unit ImageJ shows pixels, not um.
    path = tmp_path / "nounit.tif"
    tifffile.imwrite(path, _data((3, 8, 8), np.uint8), imagej=True)
    assert read_stack(path).spacing is None


@pytest.mark.parametrize(
    ("unit", "factor"), [(None, 1.0), ("µm", 1.0), ("nm", 1e-3)], ids=["default", "um", "nm"]
)
def test_reads_ome_tiff_physical_size(tmp_path, unit, factor):
    data = _data((3, 2, 16, 24), np.uint16)
    meta = {"axes": "ZCYX", "PhysicalSizeX": 0.2, "PhysicalSizeY": 0.3, "PhysicalSizeZ": 1.5}
    if unit:
        meta.update({f"PhysicalSize{a}Unit": unit for a in "XYZ"})
    path = tmp_path / "s.ome.tif"
    tifffile.imwrite(path, data, ome=True, metadata=meta)
    stack = read_stack(path)
    np.testing.assert_array_equal(stack.data, data)
    assert stack.spacing == pytest.approx((1.5 * factor, 0.3 * factor, 0.2 * factor))
    assert stack.unit == "um"


@pytest.mark.parametrize("slices", [1, 3])
def test_reads_rgb_tiff_as_channels(tmp_path, slices):
    rgb = _data((slices, 16, 24, 3), np.uint8)
    path = tmp_path / "rgb.tif"
    tifffile.imwrite(path, rgb if slices > 1 else rgb[0], photometric="rgb")
    stack = read_stack(path)
    assert stack.data.shape == (slices, 3, 16, 24)
    np.testing.assert_array_equal(stack.data, np.moveaxis(rgb, -1, 1))


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16])
def test_reads_grey_png(tmp_path, dtype):
    img = _data((16, 24), dtype)
    Image.fromarray(img).save(tmp_path / "g.png")
    stack = read_stack(tmp_path / "g.png")
    assert stack.data.dtype == dtype
    assert stack.data.shape == (1, 16, 24)
    np.testing.assert_array_equal(stack.data[0], img)


def test_reads_rgb_png_as_channels(tmp_path):
    rgb = _data((16, 24, 3), np.uint8)
    rgba = np.dstack([rgb, np.full((16, 24), 255, np.uint8)])
    Image.fromarray(rgba).save(tmp_path / "c.png")  # alpha is dropped
    stack = read_stack(tmp_path / "c.png")
    assert stack.data.shape == (1, 3, 16, 24)
    np.testing.assert_array_equal(stack.data[0], np.moveaxis(rgb, -1, 0))
    with open_stack(tmp_path / "c.png") as reader:
        assert reader.shape == (1, 3, 16, 24)
        np.testing.assert_array_equal(reader[0], stack.data[0])


def test_grey_saved_as_rgb_is_one_channel(tmp_path):
    grey = _data((16, 24), np.uint8)
    Image.fromarray(np.dstack([grey] * 3)).save(tmp_path / "g.png")
    stack = read_stack(tmp_path / "g.png")
    assert stack.data.shape == (1, 16, 24)
    np.testing.assert_array_equal(stack.data[0], grey)


def test_folder_of_pngs_in_natural_order(tmp_path):
    folder = tmp_path / "slices"
    folder.mkdir()
    for i in (10, 2, 1, 3, 21):
        Image.fromarray(np.full((8, 12), i, np.uint8)).save(folder / f"img{i}.png")
    (folder / "notes.txt").write_text("not an image")
    stack = read_stack(folder)
    assert stack.data.shape == (5, 8, 12)
    assert stack.data[:, 0, 0].tolist() == [1, 2, 3, 10, 21]
    with open_stack(folder) as reader:
        assert [int(s[0, 0]) for s in reader] == [1, 2, 3, 10, 21]


def test_folder_with_a_different_size_names_the_image(tmp_path):
    folder = tmp_path / "slices"
    folder.mkdir()
    Image.fromarray(np.zeros((8, 12), np.uint8)).save(folder / "img1.png")
    Image.fromarray(np.zeros((9, 12), np.uint8)).save(folder / "img2.png")
    with pytest.raises(CellP2PError) as err:
        read_stack(folder)
    _one_line_naming(err, folder / "img2.png")


def test_empty_folder(tmp_path):
    with pytest.raises(CellP2PError) as err:
        read_stack(tmp_path)
    _one_line_naming(err, tmp_path)


# -- slice-by-slice ----------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [np.uint8, np.uint32])
@pytest.mark.parametrize("shape", [(6, 16, 24), (4, 3, 16, 24), (1, 16, 24)])
def test_slice_by_slice_equals_whole(tmp_path, dtype, shape):
    data = _data(shape, dtype)
    path = write_stack(tmp_path / "s.tif", data)
    whole = read_stack(path).data
    with open_stack(path) as reader:
        assert len(reader) == shape[0]
        assert reader.shape == shape
        assert reader.ndim == len(shape)
        assert reader.dtype == np.dtype(dtype)
        for i in range(shape[0]):
            np.testing.assert_array_equal(reader[i], whole[i])
        np.testing.assert_array_equal(reader[-1], whole[-1])
        with pytest.raises(IndexError):
            reader[shape[0]]
        np.testing.assert_array_equal(reader.read([shape[0] - 1, 0]), whole[[-1, 0]])
        with pytest.raises(CellP2PError, match="slice"):
            reader.read([shape[0]])


def test_read_stack_selected_slices(tmp_path):
    data = _data((6, 8, 8), np.uint16)
    path = write_stack(tmp_path / "s.tif", data)
    np.testing.assert_array_equal(read_stack(path, slices=[1, 4]).data, data[[1, 4]])


def test_stack_writer_slice_by_slice_equals_write_stack(tmp_path):
    data = _data((5, 2, 16, 24), np.float32)
    with StackWriter(
        tmp_path / "sw.tif", shape=data.shape, dtype=data.dtype, spacing=SPACING
    ) as writer:
        for plane in data:
            writer.write(plane)
    write_stack(tmp_path / "ws.tif", data, spacing=SPACING)
    assert (tmp_path / "sw.tif").read_bytes() == (tmp_path / "ws.tif").read_bytes()
    np.testing.assert_array_equal(read_stack(tmp_path / "sw.tif").data, data)


def test_stack_writer_exception_leaves_nothing(tmp_path):
    data = _data((5, 16, 24), np.uint8)
    path = tmp_path / "out.tif"
    with (
        pytest.raises(RuntimeError, match="boom"),
        StackWriter(path, shape=data.shape, dtype=data.dtype) as writer,
    ):
        writer.write(data[0])
        writer.write(data[1])
        assert _no_part_files(tmp_path)  # the slices go to a temporary file
        raise RuntimeError("boom")
    assert not path.exists()
    assert _no_part_files(tmp_path) == []


def test_stack_writer_too_few_slices_leaves_nothing(tmp_path):
    data = _data((5, 16, 24), np.uint8)
    path = tmp_path / "out.tif"
    with StackWriter(path, shape=data.shape, dtype=data.dtype) as writer:
        writer.write(data[0])
    assert not path.exists()
    assert _no_part_files(tmp_path) == []


def test_stack_writer_wrong_slice_keeps_old_file(tmp_path):
    path = write_stack(tmp_path / "out.tif", np.ones((2, 8, 8), np.uint8))
    before = path.read_bytes()
    with (
        pytest.raises(ValueError, match="slice shape"),
        StackWriter(path, shape=(2, 8, 8), dtype=np.uint8, force=True) as writer,
    ):
        writer.write(np.zeros((8, 8)))
        writer.write(np.zeros((8, 9)))
    assert path.read_bytes() == before
    assert _no_part_files(tmp_path) == []


def test_existing_output_needs_force(tmp_path):
    path = write_stack(tmp_path / "out.tif", np.ones((2, 8, 8), np.uint8))
    before = path.read_bytes()
    with pytest.raises(CellP2PError, match="--force") as err:
        write_stack(path, np.zeros((3, 8, 8), np.uint8))
    _one_line_naming(err, path)
    assert path.read_bytes() == before
    write_stack(path, np.zeros((3, 8, 8), np.uint8), force=True)
    assert read_stack(path).data.shape == (3, 8, 8)
    assert _no_part_files(tmp_path) == []


def test_output_is_a_folder(tmp_path):
    with pytest.raises(CellP2PError, match="folder"):
        write_stack(tmp_path, np.zeros((1, 8, 8), np.uint8), force=True)


def test_write_makes_missing_folders(tmp_path):
    path = write_stack(tmp_path / "a" / "b" / "s.tif", np.zeros((1, 8, 8), np.uint8))
    assert path.is_file()


@pytest.mark.parametrize(
    ("dtype", "shape"),
    [(np.uint8, (5, 16, 24)), (np.float32, (3, 2, 16, 24)), (np.uint16, (1, 8, 8))],
)
def test_bigtiff_above_threshold(tmp_path, monkeypatch, dtype, shape):
    monkeypatch.setattr(cio, "BIGTIFF_BYTES", 100)
    data = _data(shape, dtype)
    path = write_stack(tmp_path / "big.tif", data, spacing=SPACING)
    with tifffile.TiffFile(path) as tif:
        assert tif.is_bigtiff
    stack = read_stack(path)
    np.testing.assert_array_equal(stack.data, data)
    assert stack.spacing == pytest.approx(SPACING)
    with open_stack(path) as reader:
        np.testing.assert_array_equal(reader[shape[0] - 1], data[-1])


def test_small_files_are_classic_tiff(tmp_path):
    path = write_stack(tmp_path / "small.tif", np.zeros((2, 8, 8), np.uint8))
    with tifffile.TiffFile(path) as tif:
        assert not tif.is_bigtiff


# -- AB images ---------------------------------------------------------------------------------


def test_read_ab_splits_side_by_side_stack(tmp_path):
    a = _data((3, 16, 20), np.uint8, seed=1)
    b = _data((3, 16, 20), np.uint8, seed=2)
    path = write_stack(tmp_path / "ab.tif", np.concatenate([a, b], axis=-1), spacing=SPACING)
    sa, sb = read_ab(path)
    np.testing.assert_array_equal(sa.data, a)
    np.testing.assert_array_equal(sb.data, b)
    assert sa.spacing == sb.spacing == pytest.approx(SPACING)
    assert sa.data.flags.c_contiguous and sb.data.flags.c_contiguous


def test_read_ab_rgb_png(tmp_path):
    a = _data((16, 20, 3), np.uint8, seed=1)
    b = _data((16, 20, 3), np.uint8, seed=2)
    Image.fromarray(np.concatenate([a, b], axis=1)).save(tmp_path / "ab.png")
    sa, sb = read_ab(tmp_path / "ab.png")
    assert sa.data.shape == sb.data.shape == (1, 3, 16, 20)
    np.testing.assert_array_equal(sa.data[0], np.moveaxis(a, -1, 0))
    np.testing.assert_array_equal(sb.data[0], np.moveaxis(b, -1, 0))


def test_read_ab_odd_width(tmp_path):
    path = write_stack(tmp_path / "odd.tif", np.zeros((1, 8, 9), np.uint8))
    with pytest.raises(CellP2PError, match="even width") as err:
        read_ab(path)
    _one_line_naming(err, path)


# -- unreadable input --------------------------------------------------------------------------


def _truncated(tmp_path: Path, fraction: float = 0.5, **kwargs) -> Path:
    full = tmp_path / "full.tif"
    tifffile.imwrite(full, _data((5, 24, 32), np.uint8), **kwargs)
    cut = tmp_path / "cut.tif"
    raw = full.read_bytes()
    cut.write_bytes(raw[: int(len(raw) * fraction)])
    return cut


def _missing(d: Path) -> Path:
    return d / "missing.tif"


def _empty(d: Path) -> Path:
    (d / "empty.tif").write_bytes(b"")
    return d / "empty.tif"


def _text(d: Path, name: str = "notes.tif") -> Path:
    (d / name).write_text("not an image\n" * 20)
    return d / name


def _zero_slices(d: Path) -> Path:
    path = d / "zero.tif"
    with pytest.warns(UserWarning, match="zero-size"):
        tifffile.imwrite(path, np.zeros((0, 24, 32), np.uint8))
    return path


def _tzcyx(d: Path) -> Path:
    path = d / "tzcyx.tif"
    data = np.zeros((2, 3, 2, 8, 8), np.uint8)
    tifffile.imwrite(path, data, imagej=True, metadata={"axes": "TZCYX"})
    return path


BAD_INPUTS = {
    "missing": _missing,
    "empty": _empty,
    "truncated": _truncated,
    "truncated-zlib": lambda d: _truncated(d, compression="zlib"),
    "truncated-tiled": lambda d: _truncated(d, 0.7, compression="lzw", tile=(16, 16)),
    "truncated-tail": lambda d: _truncated(d, 0.95, metadata=None),
    "truncated-bigtiff": lambda d: _truncated(d, bigtiff=True),
    "text": _text,
    "text-png": lambda d: _text(d, "notes.png"),
    "zero-slices": _zero_slices,
    "tzcyx": _tzcyx,
}


@pytest.mark.parametrize("make", BAD_INPUTS.values(), ids=BAD_INPUTS.keys())
def test_unreadable_input_one_line_error(tmp_path, make):
    path = make(tmp_path)
    with pytest.raises(CellP2PError) as err:
        read_stack(path)
    _one_line_naming(err, path)
    with pytest.raises(CellP2PError):
        open_stack(path)


def test_error_messages_say_what_is_wrong(tmp_path):
    cases = {
        _missing(tmp_path): "no such file",
        _empty(tmp_path): "empty",
        _truncated(tmp_path): "truncated",
        _text(tmp_path): "cannot read it as an image",
        _zero_slices(tmp_path): "no slices",
        _tzcyx(tmp_path): "T=2, Z=3",
    }
    for path, words in cases.items():
        with pytest.raises(CellP2PError, match=words):
            read_stack(path)


def test_singleton_extra_axes_are_fine(tmp_path):
    data = _data((1, 3, 2, 8, 8), np.uint8)
    path = tmp_path / "t1.tif"
    tifffile.imwrite(path, data, imagej=True, metadata={"axes": "TZCYX"})
    np.testing.assert_array_equal(read_stack(path).data, data[0])


def test_time_series_reads_as_the_stack_axis(tmp_path):
    data = _data((4, 8, 8), np.uint8)
    tifffile.imwrite(tmp_path / "t.tif", data, imagej=True, metadata={"axes": "TYX"})
    np.testing.assert_array_equal(read_stack(tmp_path / "t.tif").data, data)


# -- validation --------------------------------------------------------------------------------


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_check_finite(bad):
    data = np.zeros((3, 4, 4), np.float32)
    check_finite(data, "v.tif")
    data[2, 1, 1] = bad
    with pytest.raises(
        CellP2PError, match=r"v\.tif: contains 1 NaN/inf values \(first in slice 2\)"
    ):
        check_finite(data, "v.tif")
    check_finite(np.zeros((3, 4, 4), np.uint8), "v.tif")  # integers cannot hold NaN


def test_nan_volume_read_from_disk(tmp_path):
    data = _data((3, 8, 8), np.float32)
    data[1, 2, 3] = np.nan
    path = write_stack(tmp_path / "nan.tif", data)
    stack = read_stack(path)
    with pytest.raises(CellP2PError) as err:
        check_finite(stack.data, path)
    assert "slice 1" in _one_line_naming(err, path)


def test_check_pair():
    check_pair((4, 64, 64), (4, 64, 64), "v.tif", "l.tif")
    check_pair((4, 3, 64, 64), (4, 64, 64), "v.tif", "l.tif")  # channels may differ
    with pytest.raises(CellP2PError, match=r"l\.tif: has 5 slices but v\.tif has 4"):
        check_pair((4, 64, 64), (5, 64, 64), "v.tif", "l.tif")
    with pytest.raises(CellP2PError, match=r"l\.tif: slices are \(60, 64\) but v\.tif"):
        check_pair((4, 64, 64), (4, 60, 64), "v.tif", "l.tif")


def test_check_grayscale():
    check_grayscale(np.zeros((2, 8, 8)), "l.tif")
    with pytest.raises(CellP2PError, match=r"l\.tif: labels have 3 channels"):
        check_grayscale(np.zeros((2, 3, 8, 8)), "l.tif")


def test_binary_labels_isbi_convention(em_arrays):
    _, labels = em_arrays
    mask = binary_labels(labels, "l.tif")
    assert mask.dtype == np.uint8
    np.testing.assert_array_equal(mask, labels == 255)  # 255 = cell interior = foreground


def test_binary_labels_refuses_three_values():
    labels = np.zeros((2, 8, 8), np.uint8)
    labels[0, :2] = 128
    labels[1, :2] = 255
    with pytest.raises(CellP2PError) as err:
        binary_labels(labels, "l.tif", "binary")
    msg = _one_line_naming(err, Path("l.tif"))
    assert "3 values: 0, 128, 255" in msg
    assert "--labels-mode nonzero" in msg
    np.testing.assert_array_equal(binary_labels(labels, "l.tif", "nonzero"), labels > 0)


def test_binary_labels_lists_few_of_many_values():
    labels = np.arange(2 * 8 * 8, dtype=np.uint16).reshape(2, 8, 8)
    with pytest.raises(CellP2PError, match=r"128 values: 0, 1, 2, 3, 4, 5, \.\.\."):
        binary_labels(labels, "l.tif")


def test_binary_labels_constant_and_unknown_mode():
    assert binary_labels(np.zeros((1, 4, 4), np.uint8), "l.tif").max() == 0
    assert binary_labels(np.full((1, 4, 4), 255, np.uint8), "l.tif").min() == 1
    with pytest.raises(CellP2PError, match="unknown"):
        binary_labels(np.zeros((1, 4, 4), np.uint8), "l.tif", "fuzzy")


def test_stacks_on_disk_feed_the_checks(em_pair, tmp_path):
    volume, labels = read_stack(em_pair.volume_path), read_stack(em_pair.labels_path)
    check_pair(volume.data.shape, labels.data.shape, em_pair.volume_path, em_pair.labels_path)
    check_finite(volume.data, em_pair.volume_path)
    assert volume.spacing == pytest.approx(em_pair.spacing)
    short = write_stack(tmp_path / "short.tif", em_pair.labels[:3])
    with pytest.raises(CellP2PError) as err:
        check_pair(volume.data.shape, read_stack(short).data.shape, em_pair.volume_path, short)
    _one_line_naming(err, short)
    assert os.fspath(em_pair.volume_path) in str(err.value)


def test_isbi_train_volume(isbi_dir):
    with open_stack(isbi_dir / "train-volume.tif") as reader:
        assert reader.shape == (30, 512, 512)
        assert reader.dtype == np.uint8
        assert reader[29].shape == (512, 512)
