"""Normalisation, crops, tiles and slice selections (cellp2p.transforms)."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cellp2p.errors import CellP2PError
from cellp2p.transforms import (
    NORM_METHODS,
    Normalization,
    center_crop,
    parse_slices,
    random_paired_crop,
    tile_starts,
    tiles,
)


def _image(dtype, shape=(3, 40, 50), seed=0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    dtype = np.dtype(dtype)
    if dtype.kind == "f":
        return (rng.standard_normal(shape) * 50 + 10).astype(dtype)
    info = np.iinfo(dtype)
    return rng.integers(info.min, info.max, shape, endpoint=True, dtype=dtype)


# -- normalisation -----------------------------------------------------------------------------


@pytest.mark.parametrize("method", NORM_METHODS)
@pytest.mark.parametrize("dtype", [np.uint8, np.uint16, np.float32])
def test_normalization_round_trip(method, dtype):
    x = _image(dtype)
    norm = Normalization.fit(x, method)
    y = norm.apply(x)
    assert y.dtype == np.float32
    assert y.shape == x.shape
    back = norm.invert(y)
    assert back.dtype == x.dtype  # 16-bit stays 16-bit
    if np.issubdtype(x.dtype, np.integer):
        np.testing.assert_array_equal(back, x)
    else:
        np.testing.assert_allclose(back, x, rtol=1e-5, atol=1e-3)


def test_normalization_ranges():
    x = np.arange(1001, dtype=np.uint16).reshape(1, 7, 143)
    p = Normalization.fit(x, "percentile", 1.0, 99.0)
    assert (p.vmin, p.vmax) == pytest.approx((10.0, 990.0))
    m = Normalization.fit(x, "minmax")
    assert (m.vmin, m.vmax) == (0.0, 1000.0)
    y = m.apply(x)
    assert y.min() == 0.0
    assert y.max() == 1.0
    d = Normalization.fit(x, "dtype")
    assert (d.vmin, d.vmax) == (0.0, 65535.0)
    n = Normalization.fit(x, "none")
    np.testing.assert_array_equal(n.apply(x), x.astype(np.float32))


def test_dtype_method_for_floats_is_minmax():
    x = np.array([[[-2.0, 6.0]]], np.float32)
    norm = Normalization.fit(x, "dtype")
    assert (norm.method, norm.vmin, norm.vmax) == ("minmax", -2.0, 6.0)


def test_percentile_clips_outliers_into_range():
    x = np.full((1, 100, 100), 100, np.uint8)
    x[0, 0, 0] = 255  # one hot pixel must not set the range
    x[0, 50:] = 50
    norm = Normalization.fit(x, "percentile", 1.0, 99.0)
    assert norm.vmax == pytest.approx(100.0)
    assert norm.apply(x).max() > 1.0  # outliers map above 1, and invert brings them back
    np.testing.assert_array_equal(norm.invert(norm.apply(x)), x)


@pytest.mark.parametrize("method", NORM_METHODS)
@pytest.mark.parametrize("dtype", [np.uint8, np.uint16, np.float32])
def test_constant_image_no_division_by_zero(method, dtype):
    x = np.full((2, 8, 8), 7, dtype)
    with np.errstate(all="raise"):
        norm = Normalization.fit(x, method)
        y = norm.apply(x)
        back = norm.invert(y)
    assert norm.vmax > norm.vmin
    assert np.isfinite(y).all()
    np.testing.assert_array_equal(back, x)


def test_invert_clips_to_integer_range():
    norm = Normalization.fit(np.array([[[0, 255]]], np.uint8), "minmax")
    out = norm.invert(np.array([-0.5, 0.5, 1.5], np.float32))
    assert out.dtype == np.uint8
    assert out.tolist() == [0, 128, 255]
    raw = norm.invert(np.array([1.5], np.float32), clip_to_dtype=False)
    assert raw.dtype == np.float32
    assert raw.tolist() == [382.5]


def test_normalization_dict_round_trip():
    norm = Normalization.fit(_image(np.uint16), "percentile", 2.0, 98.0)
    again = Normalization.from_dict(norm.to_dict())
    assert again == norm
    assert again.dtype == "uint16"


@pytest.mark.parametrize(
    ("method", "low", "high"),
    [("zscore", 1.0, 99.0), ("percentile", 50.0, 50.0), ("percentile", -1.0, 99.0)],
)
def test_normalization_bad_options(method, low, high):
    with pytest.raises(CellP2PError):
        Normalization.fit(_image(np.uint8), method, low, high)


@settings(max_examples=50, deadline=None)
@given(
    lo=st.integers(0, 60000),
    span=st.integers(0, 5000),
    method=st.sampled_from(["percentile", "minmax", "dtype"]),
)
def test_uint16_round_trip_exact(lo, span, method):
    x = np.linspace(lo, min(lo + span, 65535), 300).astype(np.uint16).reshape(1, 15, 20)
    norm = Normalization.fit(x, method)
    np.testing.assert_array_equal(norm.invert(norm.apply(x)), x)


# -- crops -------------------------------------------------------------------------------------


def test_center_crop_512_to_373():
    x = np.arange(512 * 512).reshape(1, 512, 512)
    out = center_crop(x, 373)
    assert out.shape == (1, 373, 373)
    # (512 - 373) // 2 = 69 on each side of the top-left corner; 70 on the other.
    assert out[0, 0, 0] == x[0, 69, 69]
    assert out[0, -1, -1] == x[0, 69 + 372, 69 + 372]
    assert 512 - 69 - 373 == 70


def test_center_crop_rectangular_and_too_large():
    x = np.zeros((2, 3, 10, 20))
    assert center_crop(x, (4, 6)).shape == (2, 3, 4, 6)
    assert center_crop(x, (10, 20)).shape == x.shape
    with pytest.raises(CellP2PError, match="larger"):
        center_crop(x, 11)


def test_random_paired_crop_same_window():
    a = np.arange(30 * 40).reshape(30, 40)
    b = np.stack([a, -a])  # (C, Y, X) with the same (Y, X)
    rng = np.random.default_rng(0)
    corners = set()
    for _ in range(50):
        ca, cb = random_paired_crop(a, b, 8, rng)
        assert ca.shape == (8, 8)
        assert cb.shape == (2, 8, 8)
        np.testing.assert_array_equal(cb[0], ca)
        np.testing.assert_array_equal(cb[1], -ca)
        top, left = divmod(int(ca[0, 0]), 40)
        np.testing.assert_array_equal(ca, a[top : top + 8, left : left + 8])
        corners.add((top, left))
    assert len(corners) > 10  # it is random


def test_random_paired_crop_is_seeded_and_checked():
    a = np.arange(100).reshape(10, 10)
    first = random_paired_crop(a, a, 4, np.random.default_rng(3))[0]
    again = random_paired_crop(a, a, 4, np.random.default_rng(3))[0]
    np.testing.assert_array_equal(first, again)
    assert random_paired_crop(a, a, 10, np.random.default_rng(0))[0].shape == (10, 10)
    with pytest.raises(CellP2PError, match="crop 11"):
        random_paired_crop(a, a, 11, np.random.default_rng(0))
    with pytest.raises(ValueError, match="different size"):
        random_paired_crop(a, a[:9], 4, np.random.default_rng(0))


# -- tiles -------------------------------------------------------------------------------------


@settings(max_examples=300, deadline=None)
@given(
    length=st.integers(1, 3000),
    tile=st.integers(1, 600),
    overlap=st.floats(0.0, 0.9),
)
def test_tile_starts_cover_with_overlap(length, tile, overlap):
    starts = tile_starts(length, tile, overlap)
    assert starts[0] == 0
    assert starts == sorted(set(starts))
    if length <= tile:
        assert starts == [0]
        return
    assert starts[-1] + tile == length  # ends exactly at the border
    stride = max(1, int(tile * (1 - overlap)))
    for s0, s1 in itertools.pairwise(starts):
        assert s1 - s0 <= stride  # consecutive tiles overlap by at least the request
        # At least the requested overlap (tiles must still advance by one pixel).
        assert tile - (s1 - s0) >= min(tile * overlap, tile - 1) - 1e-9
    covered = np.zeros(length, bool)
    for s in starts:
        covered[s : s + tile] = True
    assert covered.all()


def test_tile_starts_examples():
    assert tile_starts(512, 256, 0.0) == [0, 256]
    assert tile_starts(512, 256, 0.5) == [0, 128, 256]
    assert tile_starts(100, 256, 0.25) == [0]
    assert tile_starts(300, 256, 0.0) == [0, 44]


@pytest.mark.parametrize(("tile", "overlap"), [(0, 0.1), (64, 1.0), (64, -0.1)])
def test_tile_starts_bad(tile, overlap):
    with pytest.raises(CellP2PError):
        tile_starts(100, tile, overlap)


def test_tiles_cover_the_slice():
    shape = (70, 45)
    count = np.zeros(shape, int)
    windows = list(tiles(shape, 32, 0.25))
    for ys, xs in windows:
        count[ys, xs] += 1
        assert ys.stop - ys.start == 32
        assert xs.stop - xs.start == 32
    assert count.min() >= 1
    assert len(windows) == len(tile_starts(70, 32, 0.25)) * len(tile_starts(45, 32, 0.25))
    # Slices smaller than the tile give one clipped window.
    assert list(tiles((20, 10), 32, 0.1)) == [(slice(0, 20), slice(0, 10))]


# -- slice selections --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ("0-24", list(range(25))),
        ("1,3,5-7", [1, 3, 5, 6, 7]),
        (" 2 , 4 - 5 ", [2, 4, 5]),
        ("29", [29]),
        ("0-29", list(range(30))),
        (None, None),
        ("", None),
        ("  ", None),
    ],
)
def test_parse_slices(spec, expected):
    assert parse_slices(spec, 30) == expected


@pytest.mark.parametrize("spec", ["a", "1-b", "1;2", "-1", "3-", "1.5", "5-3", ",", "1,,2"])
def test_parse_slices_bad_syntax(spec):
    with pytest.raises(CellP2PError, match="0-24 or 1,3,5-7"):
        parse_slices(spec, 30)


@pytest.mark.parametrize("spec", ["30", "0-30", "25-40", "1,99"])
def test_parse_slices_out_of_range(spec):
    with pytest.raises(CellP2PError, match=r"the stack has 30 slices \(0-29\)"):
        parse_slices(spec, 30)
