"""Intensity normalisation, fitted on the training stack and stored in every checkpoint."""

from __future__ import annotations

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
