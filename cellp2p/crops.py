"""Training crops, in memory or read from a store: the label scan, the pair recipe, the sources.

:func:`scan_labels` and :func:`finite_slices` read a stack one slice at a time (memory flat).
:class:`Recipe` turns raw image and label blocks into the network's normalised (input, target),
the same for a whole stack and for one crop. :class:`ArrayCrops` cuts crops out of training
arrays in memory; :class:`StoreCrops` reads each crop (with the margin its target needs) from a
chunked store and makes its target, weights and normalisation there, so training from a store
never holds the volume. :class:`cellp2p.dataset.StepBatches` draws from either.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from scipy import ndimage as ndi

from cellp2p.errors import CellP2PError
from cellp2p.instances import (
    border_reach,
    instance_target,
    objects_from_binary,
    separated_foreground,
    weight_channel,
)
from cellp2p.normalization import Normalization

NORM_BUDGET = 64 * 2**20  # bytes of training slices a lazy run fits its normalisation on
_IDS_TOL = 0.05  # looks_like_ids: at most this fraction of (slice, value) pairs in pieces
_EIGHT = np.ones((3, 3), dtype=bool)


def finite_slices(reader: Any, path: str | Path) -> Iterator[np.ndarray]:
    """The slices of a stack (an array or a reader), one at a time; once all are read, a
    CellP2PError if any held NaN or inf (worded as :func:`cellp2p.checks.check_finite`)."""
    bad, first = 0, -1
    for i in range(len(reader)):
        plane = np.asarray(reader[i])
        if np.issubdtype(plane.dtype, np.floating):
            n = int(plane.size - np.count_nonzero(np.isfinite(plane)))
            first = i if n and first < 0 else first
            bad += n
        yield plane
    if bad:
        raise CellP2PError(
            f"{path}: contains {bad} NaN/inf values (first in slice {first}); "
            "replace them first (e.g. Fiji: Process > Math > Remove NaNs)"
        )


def check_finite(reader: Any, path: str | Path) -> None:
    """Refuse NaN/inf in a float stack, read one slice at a time (integer stacks are not read)."""
    if np.issubdtype(np.dtype(reader.dtype), np.floating):
        for _ in finite_slices(reader, path):
            pass


@dataclass
class LabelScan:
    """What the label kind rule needs of a label stack, gathered slice by slice."""

    values: np.ndarray  # every value, sorted
    shape: tuple[int, ...]
    pairs: int = 0  # (slice, non-zero value) pairs, while there are few values ...
    pieces: int = 0  # ... and those of them in more than one 8-connected region
    positive: int = 0  # pixels > 0

    def looks_like_ids(self, max_classes: int) -> bool:
        """Instance ids rather than classes (``--labels-mode auto``): more than ``max_classes``
        values are ids; otherwise ids when, in each slice, (nearly) every non-zero value is one
        8-connected region (at most ``_IDS_TOL`` of the (slice, value) pairs in pieces). A class
        map repeats its values over many separate regions (0/128/255 border/interior maps do),
        so it stays classes."""
        if self.values.size <= 2:
            return False
        if self.values.size > max_classes:
            return True
        return self.pairs > 0 and self.pieces <= _IDS_TOL * self.pairs

    def looks_dense(self) -> bool:
        """:func:`cellp2p.instances.looks_dense`: binary labels, >= 50 % foreground."""
        return self.values.size <= 2 and self.positive >= 0.5 * np.prod(self.shape)


def scan_labels(reader: Any, path: str | Path, max_classes: int) -> LabelScan:
    """Values, region counts and foreground of a label stack, one slice at a time (NaN/inf
    refused)."""
    scan = LabelScan(np.array([], dtype=np.dtype(reader.dtype)), tuple(reader.shape))
    for plane in finite_slices(reader, path):
        here = _unique(plane)
        scan.values = np.union1d(scan.values, here)
        scan.positive += int(np.count_nonzero(plane > 0))
        if scan.values.size <= max_classes and plane.ndim == 2:
            for v in here[here != 0]:
                scan.pairs += 1
                scan.pieces += ndi.label(plane == v, structure=_EIGHT)[1] > 1
    return scan


def _unique(plane: np.ndarray) -> np.ndarray:
    """``np.unique`` of a slice; by counting for 8/16-bit unsigned labels (several times faster)."""
    if plane.dtype.kind in "ub" and plane.dtype.itemsize <= 2:
        return np.flatnonzero(np.bincount(plane.ravel())).astype(plane.dtype)
    return np.unique(plane)


@dataclass
class Recipe:
    """How raw blocks become the network's (input, target): the label kind and the norms."""

    kind: str  # binary | multiclass | image (the target's kind, instances included)
    classes: list[int]
    values: np.ndarray  # the label values, as scanned
    instances: bool
    cfg: Any  # TrainConfig
    labels_path: Path
    in_norm: Normalization | None = None
    t_norm: Normalization | None = None

    def target(self, labels: np.ndarray) -> np.ndarray:
        """The training target (N, C, Y, X) of a label block (N, Y, X) or (N, C, Y, X)."""
        cfg = self.cfg
        if self.instances:  # boundary classes (U-Net) or the separated foreground (pix2pix)
            scheme = cfg.instance_scheme()
            return instance_target(labels, cfg.mode, str(self.labels_path), scheme)[2]
        if self.kind == "binary":  # the larger of two values is foreground (ISBI: 255)
            if cfg.labels_mode == "nonzero":
                fg = labels > 0
            elif self.values.size == 2:
                fg = labels == self.values.max()
            else:
                fg = np.full(labels.shape, self.values[0] > 0)
            return fg.astype(np.float32)[:, None]
        if self.kind == "multiclass":
            lut = {v: i for i, v in enumerate(self.classes)}
            return np.vectorize(lut.__getitem__, otypes=[np.float32])(labels)[:, None]
        return labels if labels.ndim == 4 else labels[:, None]

    def orient(self, image: np.ndarray, target: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(source, target) as the network sees them (``--direction BtoA`` swaps them)."""
        source = image if image.ndim == 4 else image[:, None]
        return (target, source) if self.cfg.direction == "BtoA" else (source, target)

    def fit(self, image: np.ndarray, labels: np.ndarray | None) -> None:
        """Fit the input (and, for image targets, the target) normalisation on raw blocks
        (``labels`` are needed for image targets only)."""
        target = self.target(labels) if labels is not None and self.kind == "image" else None
        source, target = self.orient(image, target)
        self.in_norm = Normalization.fit(source, self.cfg.norm_method)
        fit_target = self.kind == "image"
        self.t_norm = Normalization.fit(target, self.cfg.norm_method) if fit_target else None

    def normalise(self, image: np.ndarray, target: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The normalised float32 (x, y) of a raw image block and its target."""
        assert self.in_norm is not None, "fit or set the normalisation first"
        source, target = self.orient(image, target)
        x = self.in_norm.apply(source)
        y = np.clip(self.t_norm.apply(target), 0.0, 1.0) if self.t_norm else target
        return x, y.astype(np.float32, copy=False)

    def weighted(self) -> bool:
        """Whether a border weight channel is trained with (the rule of ``weight_channel``)."""
        probe = np.zeros((1, 1, 1), dtype=np.uint8)
        return self.kind != "image" and weight_channel(probe, self.instances, self.cfg) is not None

    def objects(self, labels: np.ndarray) -> np.ndarray:
        """The objects the border weights part: the ids, or the binary mask's components."""
        return labels if self.instances else objects_from_binary(labels)


class ArrayCrops:
    """Crops of normalised training arrays in memory, (N, C, Y, X) input and target."""

    def __init__(self, x: np.ndarray, y: np.ndarray):
        self.x, self.y = x, y
        self.size = tuple(x.shape[-2:])
        self.channels = (x.shape[1], y.shape[1])

    def __len__(self) -> int:
        return len(self.x)

    def pair(self, i: int, y0: int, x0: int, crop: int) -> tuple[np.ndarray, np.ndarray]:
        """Crop ``crop``² at (y0, x0) of training slice ``i``: (C, crop, crop) each."""
        win = (i, slice(None), slice(y0, y0 + crop), slice(x0, x0 + crop))
        return self.x[win], self.y[win]


@dataclass
class StoreCrops:
    """Crops read from a volume and a labels store, made into (x, y) one by one.

    Only the crop's chunks are read: the image crop, and the label block around it with the
    ``margin`` its target needs (1 px for the separated foreground or the boundary classes;
    the border weights' reach, :func:`cellp2p.instances.border_reach`, so the weights at the
    crop's edge see the objects next to it). The border weights' class balance w_c uses the
    whole slice's foreground fraction, counted once (``fg``), as in memory. The weights can
    differ from the in-memory ones by the terms under 1e-3 that the reach drops, and, for
    binary labels, where one object leaves the label block and comes back into it (its two
    pieces are then two components).
    """

    volume: str
    labels: str
    level: int
    ids: list[int]  # the training slices
    recipe: Recipe
    size: tuple[int, int]
    channels: tuple[int, int]
    fg: dict[int, int] = field(default_factory=dict)  # foreground pixels of each slice
    _open: Any = field(default=None, repr=False, compare=False)

    def __len__(self) -> int:
        return len(self.ids)

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_open": None}  # a DataLoader worker opens its own readers

    @property
    def margin(self) -> int:
        """Pixels of labels read around each crop."""
        cfg = self.recipe.cfg
        if self.recipe.weighted():
            return border_reach(cfg.border_w0, cfg.border_sigma) + 1
        return 1 if self.recipe.instances else 0

    def readers(self) -> tuple[Any, Any]:
        """The volume's and the labels' StoreReader, opened once per process."""
        from cellp2p.stores import StoreReader

        if self._open is None or self._open[0] != os.getpid():
            pair = StoreReader(self.volume, self.level), StoreReader(self.labels, self.level)
            self._open = (os.getpid(), *pair)
        return self._open[1], self._open[2]

    def pair(self, i: int, y0: int, x0: int, crop: int) -> tuple[np.ndarray, np.ndarray]:
        """Crop ``crop``² at (y0, x0) of training slice ``i``, made as in memory: (C, Y, X)."""
        vol, lab = self.readers()
        z, m, (H, W) = self.ids[i], self.margin, self.size
        ys = slice(max(y0 - m, 0), min(y0 + crop + m, H))
        xs = slice(max(x0 - m, 0), min(x0 + crop + m, W))
        block = lab.crop(slice(z, z + 1), ys, xs)
        inner = (slice(None), slice(None), slice(y0 - ys.start, y0 - ys.start + crop))
        inner = (*inner, slice(x0 - xs.start, x0 - xs.start + crop))
        target = self.recipe.target(block)[inner]
        image = vol.crop(slice(z, z + 1), slice(y0, y0 + crop), slice(x0, x0 + crop))
        x, y = self.recipe.normalise(image, target)
        if self.recipe.weighted():
            y = np.concatenate([y, self.weights(block, z)[inner]], axis=1)
        return x[0], y[0]

    def weights(self, block: np.ndarray, z: int) -> np.ndarray:
        """The border weights of a label block (1, 1, Y, X): the border term from the block,
        w_c from slice ``z``'s foreground fraction."""
        cfg = self.recipe.cfg
        plain = dataclasses.replace(cfg, border_class_balance=False)
        w = weight_channel(block, self.recipe.instances, plain)
        assert w is not None
        if not cfg.border_class_balance:
            return w
        n, fg = int(np.prod(self.size)), self.fg[z]
        if 0 < fg < n:  # w_c = N / (2 N_c), the mean-1 class balance of the whole slice
            fore = separated_foreground(self.recipe.objects(block))[:, None]
            w += np.where(fore, n / (2.0 * fg), n / (2.0 * (n - fg))).astype(np.float32) - 1
        return w


def count_foreground(reader: Any, ids: Sequence[int], recipe: Recipe) -> dict[int, int]:
    """The border weights' foreground pixels of each slice ``ids``, one slice at a time."""
    return {z: int(separated_foreground(recipe.objects(reader[z])).sum()) for z in ids}


def norm_sample(ids: Sequence[int], slice_bytes: int, budget: int | None = None) -> list[int]:
    """The training slices a normalisation is fitted on: all of them when they fit ``budget``
    bytes (:data:`NORM_BUDGET`), else as many evenly spaced ones as fit (at least one)."""
    keep = max(1, (NORM_BUDGET if budget is None else budget) // max(1, slice_bytes))
    if len(ids) <= keep:
        return list(ids)
    picks = np.unique(np.linspace(0, len(ids) - 1, keep).round().astype(int))
    return [ids[j] for j in picks]
