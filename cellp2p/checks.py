"""Checks on the stacks a user gives, each failing with one line that names the file and the fix."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from cellp2p.errors import CellP2PError

LABEL_MODES = ("binary", "nonzero")


def check_finite(data: np.ndarray, path: str | Path) -> None:
    """Refuse NaN or inf in a float stack (they poison normalisation and losses)."""
    if not np.issubdtype(data.dtype, np.floating):
        return
    bad = ~np.isfinite(data)
    if bad.any():
        z = int(np.argwhere(bad.reshape(len(data), -1).any(axis=1))[0, 0])
        raise CellP2PError(
            f"{path}: contains {int(bad.sum())} NaN/inf values (first in slice {z}); "
            "replace them first (e.g. Fiji: Process > Math > Remove NaNs)"
        )


def check_pair(
    volume_shape: Sequence[int],
    labels_shape: Sequence[int],
    volume_path: str | Path,
    labels_path: str | Path,
) -> None:
    """Volume and labels must have the same slice count and slice size."""
    if volume_shape[0] != labels_shape[0]:
        raise CellP2PError(
            f"{labels_path}: has {labels_shape[0]} slices but {volume_path} has "
            f"{volume_shape[0]}; give stacks with one label slice per image slice"
        )
    if tuple(volume_shape[-2:]) != tuple(labels_shape[-2:]):
        raise CellP2PError(
            f"{labels_path}: slices are {tuple(labels_shape[-2:])} but {volume_path} slices are "
            f"{tuple(volume_shape[-2:])} (Y, X); give labels of the same size as the images"
        )


def check_grayscale(data: np.ndarray, path: str | Path, role: str = "labels") -> None:
    """Labels must be one channel."""
    if data.ndim != 3:
        raise CellP2PError(
            f"{path}: {role} have {data.shape[1]} channels; give a single-channel (grayscale) stack"
        )


def binary_labels(labels: np.ndarray, path: str | Path, mode: str = "binary") -> np.ndarray:
    """Foreground mask (uint8 0/1) from a label stack.

    ``binary``: exactly two values (or one), the larger is foreground (ISBI: 255 = cell interior).
    ``nonzero``: foreground = label > 0, for instance labels.
    """
    check_grayscale(labels, path)
    if mode == "nonzero":
        return (labels > 0).astype(np.uint8)
    if mode != "binary":
        raise CellP2PError(f"labels mode {mode!r} unknown; use one of {', '.join(LABEL_MODES)}")
    values = np.unique(labels[:: max(1, len(labels) // 8)])
    if len(values) <= 2:
        values = np.unique(labels)
    if len(values) > 2:
        shown = ", ".join(str(v) for v in values[:6]) + (", ..." if len(values) > 6 else "")
        raise CellP2PError(
            f"{path}: labels are not binary ({len(values)} values: {shown}); pass "
            "--labels-mode nonzero to use label > 0 as foreground (instance labels), "
            "or --task translate to learn the label image itself"
        )
    return (
        (labels == values.max()).astype(np.uint8)
        if len(values) == 2
        else np.zeros_like(labels, dtype=np.uint8) + (values[0] > 0)
    )


def check_finite_slice(image: np.ndarray, source: str = "input", index: int | None = None) -> None:
    """Refuse NaN/inf in a float slice (they would poison the whole tile)."""
    if not np.issubdtype(image.dtype, np.floating):
        return
    bad = ~np.isfinite(image)
    if bad.any():
        where = f" in slice {index}" if index is not None else ""
        raise CellP2PError(
            f"{source}: contains {int(bad.sum())} NaN/inf values{where}; replace them first "
            "(e.g. Fiji: Process > Math > Remove NaNs)"
        )
