"""Training data: sources, split, label kind, normalisation, paired augmentation, step batches."""

from __future__ import annotations

import contextlib
import math
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cellp2p import checks, distributed, io
from cellp2p.config import MAX_CLASSES, TrainConfig
from cellp2p.crops import (
    ArrayCrops,
    LabelScan,
    Recipe,
    StoreCrops,
    check_finite,
    count_foreground,
    norm_sample,
    scan_labels,
)
from cellp2p.errors import CellP2PError
from cellp2p.instances import instance_target, validation_objects, weight_channel
from cellp2p.normalization import Normalization
from cellp2p.slices import format_ranges
from cellp2p.sources import resolve_sources, split_slices
from cellp2p.stores import is_store


@dataclass
class PairedData:
    """Normalised training and validation pairs, (N, C, Y, X) float32.

    ``crops`` is where the training crops come from: the arrays ``train_x``/``train_y`` in
    memory (:class:`cellp2p.crops.ArrayCrops`, made from them when not given), or a volume and
    a labels store read crop by crop (:class:`cellp2p.crops.StoreCrops`; ``train_x`` and
    ``train_y`` are then None). Validation slices are always in memory.
    """

    train_x: np.ndarray | None
    train_y: np.ndarray | None
    val_x: np.ndarray
    val_y: np.ndarray
    val_ids: list[int]
    input_norm: Normalization
    target_norm: Normalization | None
    target_kind: str  # binary | multiclass | image
    classes: list[int]
    spacing: tuple[float, float, float] | None
    sources: dict[str, str]
    val_instances: np.ndarray | None = None  # the validation objects (instance scores, tuning)
    dense: bool = False  # membrane data: cells fill the slice (dense watershed)
    instances: bool = False  # trained from instance labels
    weighted: bool = False  # the training target's last channel: the border weight map
    crops: Any = None  # ArrayCrops | StoreCrops

    def __post_init__(self) -> None:
        if self.crops is None:
            assert self.train_x is not None and self.train_y is not None
            self.crops = ArrayCrops(self.train_x, self.train_y)

    @property
    def in_channels(self) -> int:
        """Channels of the network input."""
        return self.crops.channels[0]

    @property
    def out_channels(self) -> int:
        """Channels of the network output: one per class for multiclass targets."""
        if self.target_kind == "multiclass":
            return len(self.classes)
        return self.crops.channels[1] - int(self.weighted)  # the weights are no output


def _target_kind(
    scan: LabelScan | None, path: Path, cfg: TrainConfig
) -> tuple[str, list[int], bool]:
    """binary / multiclass / image, the class values, and whether the labels are instances."""
    if cfg.task == "translate" or scan is None:
        return "image", [], False
    checks.check_grayscale(np.broadcast_to(np.uint8(0), scan.shape), path)
    if cfg.labels_mode == "nonzero":
        return "binary", [0, 1], False
    values = scan.values
    if cfg.labels_mode == "binary" or len(values) <= 2:
        checks.binary_labels(values.reshape(1, 1, -1), path, "binary")
        return "binary", [int(v) for v in values], False
    if cfg.labels_mode in ("auto", "instances") and (
        cfg.labels_mode == "instances" or scan.looks_like_ids(MAX_CLASSES)
    ):  # issue 15: ids, trained as separated objects (the values checked as ids here)
        ids = values.reshape(1, 1, -1)
        kind, classes, _ = instance_target(ids, cfg.mode, str(path), cfg.instance_scheme())
        return kind, classes, True
    if cfg.labels_mode == "multiclass" or len(values) <= MAX_CLASSES:
        if len(values) > 256:
            raise CellP2PError(f"{path}: {len(values)} label values is too many classes")
        return "multiclass", [int(v) for v in values], False
    raise CellP2PError(
        f"{path}: labels have {len(values)} values (looks like instance labels); pass "
        "--labels-mode nonzero to segment foreground = label > 0, or --task translate"
    )


def check_level(cfg: TrainConfig, paths: list[Path]) -> None:
    """``--level`` picks an OME-Zarr pyramid level: refused for inputs that are no store."""
    if not cfg.level:
        return
    if cfg.ab:
        raise CellP2PError(f"{cfg.ab}: --level {cfg.level} reads a store's pyramid level, but "
                           "--ab images have none; drop --level")  # fmt: skip
    for path in paths:
        if not is_store(path):
            raise CellP2PError(
                f"{path}: --level {cfg.level}, but only an OME-Zarr store has pyramid levels; "
                "drop --level or give the volume and labels as stores"
            )


def load_data(cfg: TrainConfig, norms: dict[str, Any] | None = None) -> PairedData:
    """Read, validate, split and normalise the training pair (``norms``: a checkpoint's).

    A volume and labels that are both stores (OME-Zarr, zarr, HDF5) are read lazily: checked
    and scanned slice by slice, the normalisation fitted on at most
    :data:`cellp2p.crops.NORM_BUDGET` bytes of training slices, and every crop read when drawn;
    anything else is read into memory.
    """
    check_level(cfg, [])
    if cfg.ab:  # a folder of pix2pix AB images (issue 18)
        from cellp2p.ab import load_ab_data

        return load_ab_data(cfg, norms)
    src = resolve_sources(cfg.volume, cfg.labels, cfg.manifest, cfg.data_dir)
    check_level(cfg, [src.volume, src.labels])
    if cfg.direction == "BtoA" and cfg.task != "translate":
        raise CellP2PError(
            "--direction BtoA makes images from labels: use it with --task translate"
        )
    if is_store(src.volume) and is_store(src.labels):
        with (
            io.open_stack(src.volume, cfg.level) as vol,
            io.open_stack(src.labels, cfg.level) as lab,
        ):
            return _load_lazy(cfg, src, vol, lab, norms)
    volume, labels = io.read_stack(src.volume), io.read_stack(src.labels)
    plan = _plan(cfg, src, volume.data, labels.data)
    recipe, train_ids = plan.recipe, plan.train_ids
    _set_norms(recipe, norms, lambda: (volume.data[train_ids], labels.data[train_ids]))
    x, y = recipe.normalise(volume.data, recipe.target(labels.data))
    weights = weight_channel(labels.data, recipe.instances, cfg) if recipe.weighted() else None
    if weights is not None:
        y = np.concatenate([y, weights], 1)
    val = plan.val_ids
    crops = ArrayCrops(x[train_ids], y[train_ids])
    return _paired(plan, crops, volume.data[val], labels.data[val], volume.spacing)


@dataclass
class _Plan:
    """A checked training pair: the split, the recipe and the label scan."""

    src: Any  # Sources
    recipe: Recipe
    scan: LabelScan | None
    train_ids: list[int]
    val_ids: list[int]


def _plan(cfg: TrainConfig, src: Any, volume: Any, labels: Any) -> _Plan:
    """Check the pair slice by slice (shapes, NaN/inf, label values), split it, find the kind.

    ``volume`` and ``labels`` are arrays or readers: one slice at a time is looked at.
    """
    vpath, lpath = src.volume, src.labels
    checks.check_pair(volume.shape, labels.shape, vpath, lpath)
    check_finite(volume, vpath)
    scan = None
    if cfg.task == "translate":  # an image, not labels: only checked for NaN/inf
        check_finite(labels, lpath)
    else:
        scan = scan_labels(labels, lpath, MAX_CLASSES)
    n = volume.shape[0]
    train_ids, val_ids = split_slices(n, cfg.train_slices, cfg.val_slices, src.split, vpath)
    check_overlap(cfg, train_ids, val_ids, vpath)
    kind, classes, instances = _target_kind(scan, lpath, cfg)
    values = scan.values if scan is not None else np.array([])
    H, W = volume.shape[-2:]
    if cfg.crop > min(H, W):
        raise CellP2PError(
            f"--crop {cfg.crop} is larger than the slices of {vpath} ({H}x{W}); "
            f"use --crop {min(H, W)} or smaller"
        )
    recipe = Recipe(kind, classes, values, instances, cfg, lpath)
    return _Plan(src, recipe, scan, train_ids, val_ids)


def _set_norms(recipe: Recipe, norms: dict[str, Any] | None, sample: Callable[[], tuple]) -> None:
    """A checkpoint's normalisation, or one fitted on ``sample()`` (raw training slices)."""
    if norms:
        recipe.in_norm = Normalization.from_dict(norms["input"])
        recipe.t_norm = Normalization.from_dict(norms["target"]) if norms.get("target") else None
    else:  # fitted on the training slices only
        image, labels = sample()
        recipe.fit(image, labels)


def _paired(
    plan: _Plan, crops: Any, val_image: np.ndarray, val_labels: np.ndarray, spacing: Any
) -> PairedData:
    """The PairedData of a plan: the training crops, and the validation slices made here."""
    recipe = plan.recipe
    val_x, val_y = recipe.normalise(val_image, recipe.target(val_labels))
    image = recipe.kind == "image"
    assert recipe.in_norm is not None
    arrays = isinstance(crops, ArrayCrops)
    return PairedData(
        train_x=crops.x if arrays else None,
        train_y=crops.y if arrays else None,
        val_x=val_x,
        val_y=val_y,
        val_ids=list(plan.val_ids),
        input_norm=recipe.in_norm,
        target_norm=recipe.t_norm,
        target_kind=recipe.kind,
        classes=recipe.classes,
        spacing=spacing,
        sources={"volume": str(plan.src.volume), "labels": str(plan.src.labels)},
        val_instances=None if image else validation_objects(val_labels, recipe.instances),
        dense=recipe.kind == "binary" and not recipe.instances and plan.scan.looks_dense(),
        instances=recipe.instances,
        weighted=recipe.weighted(),
        crops=crops,
    )


def _load_lazy(
    cfg: TrainConfig, src: Any, vol: Any, lab: Any, norms: dict[str, Any] | None
) -> PairedData:
    """The training pair of two stores, crops read when drawn (:class:`StoreCrops`)."""
    plan = _plan(cfg, src, vol, lab)
    recipe, train_ids = plan.recipe, plan.train_ids
    slice_bytes = int(np.prod(vol.shape[1:])) * np.dtype(vol.dtype).itemsize
    picks = norm_sample(train_ids, slice_bytes)
    image = recipe.kind == "image"
    _set_norms(recipe, norms, lambda: (vol.read(picks), lab.read(picks) if image else None))
    fg = {}
    if recipe.weighted() and cfg.border_class_balance:
        fg = count_foreground(lab, train_ids, recipe)
    pixel = (slice(train_ids[0], train_ids[0] + 1), slice(0, 1), slice(0, 1))
    x, y = recipe.normalise(vol.crop(*pixel), recipe.target(lab.crop(*pixel)))  # the channels
    channels = (x.shape[1], y.shape[1] + int(recipe.weighted()))
    size = (int(vol.shape[-2]), int(vol.shape[-1]))
    crops = StoreCrops(
        str(src.volume), str(src.labels), cfg.level, train_ids, recipe, size, channels, fg
    )
    val = plan.val_ids
    return _paired(plan, crops, vol.read(val), lab.read(val), vol.spacing)


def check_overlap(cfg: TrainConfig, train_ids: list[int], val_ids: list[int], vpath: Path) -> None:
    """Validation slices that are also training slices: an error when the user chose both
    ranges (best.pt would be picked on training data), else a note (a stack too short to hold
    any slice out validates on a training slice)."""
    shared = sorted(set(train_ids) & set(val_ids))
    if not shared:
        return
    if cfg.train_slices and cfg.val_slices:
        raise CellP2PError(
            f"--train-slices {cfg.train_slices} and --val-slices {cfg.val_slices} share slices "
            f"{format_ranges(shared)}: validation (and best.pt) would be judged on training "
            "data; give ranges that do not overlap, or leave --val-slices out"
        )
    if distributed.is_main():
        print(
            f"note: {vpath}: validating on slices {format_ranges(shared)}, which are also "
            "training slices; the validation scores will flatter the model",
            file=sys.stderr,
        )


def check_resumed_data(ckpt: dict[str, Any], data: PairedData, cfg: TrainConfig) -> None:
    """The data a run resumes on must have the channels and classes its networks were built
    for (a stack replaced on disk since, under the same name, is refused here)."""
    saved = ckpt.get("data") or {}
    now = {
        "in_channels": data.in_channels,
        "out_channels": data.out_channels,
        "target_kind": data.target_kind,
        "classes": list(data.classes),
    }
    diffs = [k for k, v in now.items() if k in saved and saved[k] != v]
    if diffs:
        k = diffs[0]
        where = cfg.manifest or (cfg.labels if k != "in_channels" else cfg.volume)
        raise CellP2PError(
            f"{where}: now gives {k.replace('_', ' ')} {now[k]!r} but the run in "
            f"{ckpt.get('path', 'the checkpoint')} was trained with {saved[k]!r}; resume on "
            "the data it was trained on, or start a new run with another --out"
        )


def make_augment(cfg: TrainConfig, target_kind: str) -> Callable[[dict], dict]:
    """Paired MONAI dictionary transforms, drawn once and applied to input and target alike,
    on a crop already cut (:class:`StepBatches` draws where): ``--jitter``, then the
    ``--augment`` recipe (full: flips of both axes, 90° turns, [elastic], intensity jitter;
    flips: left-right flips [and elastic]; none)."""
    from monai.transforms import (
        Compose,
        Rand2DElasticd,
        RandFlipd,
        RandRotate90d,
        RandScaleIntensityd,
        RandShiftIntensityd,
        RandSpatialCropd,
        Resized,
    )

    keys = ["image", "target"]
    nearest = "nearest" if target_kind != "image" else "bilinear"
    ts: list = []
    if cfg.jitter:  # the pix2pix paper's jitter: resize to 286/256 of the crop, random crop back
        big = round(cfg.crop * 286 / 256)
        ts.append(Resized(keys, spatial_size=(big, big), mode=("bilinear", nearest)))
        ts.append(RandSpatialCropd(keys, roi_size=(cfg.crop, cfg.crop), random_size=False))
    recipe = cfg.augmentation()
    if recipe == "full":
        ts += [
            RandFlipd(keys, prob=0.5, spatial_axis=0),
            RandFlipd(keys, prob=0.5, spatial_axis=1),
            RandRotate90d(keys, prob=0.5, max_k=3),
        ]
    elif recipe == "flips":  # the pix2pix reference's: left-right only
        ts.append(RandFlipd(keys, prob=0.5, spatial_axis=1))
    if cfg.elastic:  # as the U-Net paper did for ISBI 2012 (validate: not with --augment none)
        ts.append(
            Rand2DElasticd(
                keys,
                spacing=(max(8, cfg.crop // 8),) * 2,
                magnitude_range=(1.0, 3.0),
                prob=0.5,
                mode=("bilinear", nearest),
                padding_mode="reflection",
            )
        )
    if recipe == "full":
        ts += [
            RandScaleIntensityd("image", factors=0.1, prob=0.5),
            RandShiftIntensityd("image", offsets=0.1, prob=0.5),
        ]
    return Compose(ts)


class StepBatches(torch.utils.data.Dataset):
    """Item ``step`` is the batch for that step, a pure function of (seed, step).

    Each crop's training slice, augmentation seed and corner are drawn from the step's
    generator, for in-memory arrays and stores alike (``data.crops`` then only cuts or reads
    that crop). With ``world_size`` W, the step's global batch has W × batch_size crops and
    rank r gets crops r·b … (r+1)·b − 1 of it: W ranks × b crops see exactly the crops one
    process would see with W·b. The draws of the whole global batch are made on every rank
    (cheap); only the rank's own crops are read and augmented.
    """

    def __init__(self, data: PairedData, cfg: TrainConfig, rank: int = 0, world_size: int = 1):
        self.crops = data.crops
        self.cfg = cfg
        self.augment = make_augment(cfg, data.target_kind)
        self.total, self.lo, self.hi = distributed.shard_bounds(cfg.batch_size, rank, world_size)

    def __len__(self) -> int:
        return 2**62

    def draw(self, step: int) -> list[tuple[int, int, int, int]]:
        """(slice, augmentation seed, y0, x0) of each crop of the step's global batch."""
        rng = np.random.default_rng([self.cfg.seed, step])
        ids = rng.integers(0, len(self.crops), size=self.total)
        seeds = [int(rng.integers(2**31)) for _ in range(self.total)]
        H, W = self.crops.size
        corners = rng.integers(0, [H - self.cfg.crop + 1, W - self.cfg.crop + 1], (self.total, 2))
        return [
            (int(i), s, int(y), int(x)) for i, s, (y, x) in zip(ids, seeds, corners, strict=True)
        ]

    def __getitem__(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        xs, ys = [], []
        with _plain_tensors():
            for i, seed, y0, x0 in self.draw(step)[self.lo : self.hi]:
                image, target = self.crops.pair(i, y0, x0, self.cfg.crop)
                self.augment.set_random_state(seed=seed)
                item = self.augment({"image": image, "target": target})
                xs.append(torch.as_tensor(np.asarray(item["image"]), dtype=torch.float32))
                ys.append(torch.as_tensor(np.asarray(item["target"]), dtype=torch.float32))
        return torch.stack(xs), torch.stack(ys)


@contextlib.contextmanager
def _plain_tensors() -> Iterator[None]:
    """MONAI transforms without MetaTensor bookkeeping (the crops need no affine or history):
    the same values, a batch of 4 crops of 256² in 25 instead of 43 ms (benchmarks/RESULTS.md)."""
    from monai.data import get_track_meta, set_track_meta

    before = get_track_meta()
    set_track_meta(False)
    try:
        yield
    finally:
        set_track_meta(before)


def steps_per_epoch(cfg: TrainConfig, data: PairedData, world_size: int = 1) -> int:
    """Steps whose crops (``world_size × --batch-size`` a step) cover the training slices once."""
    H, W = data.crops.size
    crops = len(data.crops) * H * W / (cfg.crop * cfg.crop)
    return max(1, math.ceil(crops / cfg.batch_size / world_size))


def total_steps(cfg: TrainConfig, data: PairedData, world_size: int = 1) -> int:
    """--max-steps, or --epochs where an epoch is enough crops to cover the training slices once."""
    if cfg.max_steps is not None:
        return cfg.max_steps
    return (cfg.epochs or 1) * steps_per_epoch(cfg, data, world_size)
