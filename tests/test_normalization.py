"""Normalization: fit, apply, invert, round trips."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cellp2p.errors import CellP2PError
from cellp2p.normalization import NORM_METHODS, Normalization


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
