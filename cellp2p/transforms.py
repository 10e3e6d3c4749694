"""Intensity normalisation and spatial crops/tiles on (…, Y, X) arrays."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import asdict, dataclass

import numpy as np

from cellp2p.errors import CellP2PError

NORM_METHODS = ("percentile", "minmax", "dtype", "none")


@dataclass
class Normalization:
    """Maps intensities to roughly [0, 1]: ``(x - vmin) / (vmax - vmin)``.

    Fitted once on the training stack and stored in every checkpoint, so prediction applies
    exactly the same mapping; ``invert`` maps network outputs back to the original range.
    """

    method: str = "percentile"
    low: float = 1.0
    high: float = 99.8
    vmin: float = 0.0
    vmax: float = 1.0
    dtype: str = "float32"

    @classmethod
    def fit(
        cls, data: np.ndarray, method: str = "percentile", low: float = 1.0, high: float = 99.8
    ) -> Normalization:
        """Fit on a stack; percentiles are taken on at most ~4 M sampled pixels."""
        if method not in NORM_METHODS:
            raise CellP2PError(f"normalisation {method!r} unknown; use one of {NORM_METHODS}")
        if not 0 <= low < high <= 100:
            raise CellP2PError(
                f"normalisation percentiles {low}, {high}: need 0 <= low < high <= 100"
            )
        dtype = str(data.dtype)
        if method == "none":
            return cls(method, low, high, 0.0, 1.0, dtype)
        if method == "dtype":
            if np.issubdtype(data.dtype, np.integer):
                info = np.iinfo(data.dtype)
                return cls(method, low, high, float(info.min), float(info.max), dtype)
            method = "minmax"  # floats have no natural range
        flat = data.reshape(-1)
        step = max(1, flat.size // 4_000_000)
        sample = flat[::step].astype(np.float64)
        if method == "minmax":
            vmin, vmax = float(sample.min()), float(sample.max())
        else:
            vmin, vmax = (float(v) for v in np.percentile(sample, [low, high]))
        if vmax <= vmin:  # constant image: avoid a division by zero, keep the offset
            vmax = vmin + 1.0
        return cls(method, low, high, vmin, vmax, dtype)

    def apply(self, x: np.ndarray) -> np.ndarray:
        """Normalised float32 copy."""
        scale = 1.0 / (self.vmax - self.vmin)
        return ((x.astype(np.float32) - np.float32(self.vmin)) * np.float32(scale)).astype(
            np.float32, copy=False
        )

    def invert(self, y: np.ndarray, clip_to_dtype: bool = True) -> np.ndarray:
        """Back to the original intensity range and dtype (rounded and clipped for integers)."""
        x = y.astype(np.float64) * (self.vmax - self.vmin) + self.vmin
        dtype = np.dtype(self.dtype)
        if np.issubdtype(dtype, np.integer) and clip_to_dtype:
            info = np.iinfo(dtype)
            return np.clip(np.rint(x), info.min, info.max).astype(dtype)
        return x.astype(dtype if np.issubdtype(dtype, np.floating) else np.float32)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> Normalization:
        return cls(**d)


def center_crop(x: np.ndarray, size: int | tuple[int, int]) -> np.ndarray:
    """Central (H, W) window of the last two axes (e.g. 512 → 373 for a valid U-Net's target)."""
    h, w = (size, size) if isinstance(size, int) else size
    H, W = x.shape[-2:]
    if h > H or w > W:
        raise CellP2PError(f"crop {h}x{w} is larger than the slice {H}x{W}; choose a smaller crop")
    top, left = (H - h) // 2, (W - w) // 2
    return x[..., top : top + h, left : left + w]


def random_paired_crop(
    a: np.ndarray, b: np.ndarray, size: int, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """The same random (size, size) window from two arrays of equal (Y, X)."""
    H, W = a.shape[-2:]
    if tuple(b.shape[-2:]) != (H, W):
        raise ValueError(f"paired crop of arrays of different size {a.shape} and {b.shape}")
    if size > H or size > W:
        raise CellP2PError(f"crop {size} is larger than the slice {H}x{W}; choose a smaller --crop")
    top = int(rng.integers(0, H - size + 1))
    left = int(rng.integers(0, W - size + 1))
    win = (..., slice(top, top + size), slice(left, left + size))
    return a[win], b[win]


def tile_starts(length: int, tile: int, overlap: float) -> list[int]:
    """Start offsets of tiles of ``tile`` covering ``length`` with at least ``overlap`` fraction."""
    if tile <= 0 or not 0 <= overlap < 1:
        raise CellP2PError(f"tile {tile} / overlap {overlap}: need tile > 0 and 0 <= overlap < 1")
    if length <= tile:
        return [0]
    stride = max(1, int(tile * (1 - overlap)))
    n = int(np.ceil((length - tile) / stride)) + 1
    # Spread the tiles evenly so the last one ends exactly at the border.
    return [round(i * (length - tile) / (n - 1)) for i in range(n)]


def tiles(shape: tuple[int, int], tile: int, overlap: float) -> Iterator[tuple[slice, slice]]:
    """(Y, X) windows of a slice covered by overlapping tiles (clipped to smaller slices)."""
    for y in tile_starts(shape[0], tile, overlap):
        for x in tile_starts(shape[1], tile, overlap):
            yield slice(y, min(y + tile, shape[0])), slice(x, min(x + tile, shape[1]))


def parse_slices(spec: str | None, n: int) -> list[int] | None:
    """``"0-24"``, ``"1,3,5-7"`` → slice indices, checked against ``n`` slices."""
    if spec is None or str(spec).strip() == "":
        return None
    out: list[int] = []
    try:
        for part in str(spec).split(","):
            part = part.strip()
            if "-" in part:
                lo, hi = (int(v) for v in part.split("-", 1))
                if hi < lo:
                    raise ValueError(part)  # a reversed range would select nothing, silently
                out.extend(range(lo, hi + 1))
            else:
                out.append(int(part))
    except ValueError:
        raise CellP2PError(
            f"slice selection {spec!r}: use ranges and lists like 0-24 or 1,3,5-7"
        ) from None
    bad = [i for i in out if not 0 <= i < n]
    if bad or not out:
        raise CellP2PError(
            f"slice selection {spec!r}: the stack has {n} slices (0-{n - 1}); fix the selection"
        )
    return out
