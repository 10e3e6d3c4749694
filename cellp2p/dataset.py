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
from cellp2p.errors import CellP2PError
from cellp2p.instances import (
    instance_target,
    looks_dense,
    looks_like_ids,
    validation_objects,
    weight_channel,
)
from cellp2p.normalization import Normalization
from cellp2p.slices import format_ranges
from cellp2p.sources import resolve_sources, split_slices


@dataclass
class PairedData:
    """Normalised training and validation pairs in memory, (N, C, Y, X) float32."""

    train_x: np.ndarray
    train_y: np.ndarray
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
    weighted: bool = False  # train_y's last channel: the border weight map (issue 15)

    @property
    def in_channels(self) -> int:
        """Channels of the network input."""
        return self.train_x.shape[1]

    @property
    def out_channels(self) -> int:
        """Channels of the network output: one per class for multiclass targets."""
        if self.target_kind == "multiclass":
            return len(self.classes)
        return self.train_y.shape[1] - int(self.weighted)  # the weights are no output


def _target_kind(labels: np.ndarray, path: Path, cfg: TrainConfig) -> tuple[str, list[int]]:
    """binary / multiclass / image, and the class values."""
    if cfg.task == "translate":
        return "image", []
    checks.check_grayscale(labels, path)
    if cfg.labels_mode == "nonzero":
        return "binary", [0, 1]
    values = np.unique(labels)
    if cfg.labels_mode == "binary" or len(values) <= 2:
        checks.binary_labels(labels, path, "binary")
        return "binary", [int(v) for v in values]
    if cfg.labels_mode in ("auto", "instances") and (
        cfg.labels_mode == "instances" or looks_like_ids(labels, MAX_CLASSES)
    ):
        return "instances", [0, 1, 2]  # issue 15: ids, trained as separated objects
    if cfg.labels_mode == "multiclass" or len(values) <= MAX_CLASSES:
        if len(values) > 256:
            raise CellP2PError(f"{path}: {len(values)} label values is too many classes")
        return "multiclass", [int(v) for v in values]
    raise CellP2PError(
        f"{path}: labels have {len(values)} values (looks like instance labels); pass "
        "--labels-mode nonzero to segment foreground = label > 0, or --task translate"
    )


def load_data(cfg: TrainConfig, norms: dict[str, Any] | None = None) -> PairedData:
    """Read, validate, split and normalise the training pair (``norms``: a checkpoint's)."""
    if cfg.ab:  # a folder of pix2pix AB images (issue 18)
        from cellp2p.ab import load_ab_data

        return load_ab_data(cfg, norms)
    src = resolve_sources(cfg.volume, cfg.labels, cfg.manifest, cfg.data_dir)
    vpath, lpath = src.volume, src.labels
    volume = io.read_stack(vpath)
    labels = io.read_stack(lpath)
    checks.check_pair(volume.data.shape, labels.data.shape, vpath, lpath)
    checks.check_finite(volume.data, vpath)
    checks.check_finite(labels.data, lpath)
    n = volume.data.shape[0]
    train_ids, val_ids = split_slices(n, cfg.train_slices, cfg.val_slices, src.split, vpath)
    check_overlap(cfg, train_ids, val_ids, vpath)
    kind, classes = _target_kind(labels.data, lpath, cfg)
    instances = kind == "instances"
    if instances:  # boundary classes (U-Net) or the separated foreground (pix2pix)
        kind, classes, target = instance_target(
            labels.data, cfg.mode, str(lpath), cfg.instance_target
        )
    else:
        target = _target(labels.data, lpath, kind, classes, cfg)
    source = volume.data if volume.data.ndim == 4 else volume.data[:, None]
    if cfg.direction == "BtoA":
        if cfg.task != "translate":
            raise CellP2PError(
                "--direction BtoA makes images from labels: use it with --task translate"
            )
        source, target = target, source
    if norms:
        in_norm = Normalization.from_dict(norms["input"])
        t_norm = Normalization.from_dict(norms["target"]) if norms.get("target") else None
    else:  # fitted on the training slices only
        in_norm = Normalization.fit(source[train_ids], cfg.norm_method)
        fit_target = kind == "image"
        t_norm = Normalization.fit(target[train_ids], cfg.norm_method) if fit_target else None
    x = in_norm.apply(source)
    y = np.clip(t_norm.apply(target), 0.0, 1.0) if t_norm else target.astype(np.float32)
    weights = None if kind == "image" else weight_channel(labels.data, instances, cfg)
    H, W = x.shape[-2:]
    if cfg.crop > min(H, W):
        raise CellP2PError(
            f"--crop {cfg.crop} is larger than the slices of {vpath} ({H}x{W}); "
            f"use --crop {min(H, W)} or smaller"
        )
    return PairedData(
        train_x=x[train_ids],
        train_y=y[train_ids] if weights is None else np.concatenate([y, weights], 1)[train_ids],
        val_x=x[val_ids],
        val_y=y[val_ids],
        val_ids=list(val_ids),
        input_norm=in_norm,
        target_norm=t_norm,
        target_kind=kind,
        classes=classes,
        spacing=volume.spacing,
        sources={"volume": str(vpath), "labels": str(lpath)},
        val_instances=None
        if kind == "image"
        else validation_objects(labels.data[val_ids], instances),
        dense=kind == "binary" and not instances and looks_dense(labels.data),
        instances=instances,
        weighted=weights is not None,
    )


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


def _target(
    labels: np.ndarray, path: Path, kind: str, classes: list[int], cfg: TrainConfig
) -> np.ndarray:
    """The training target (N, C, Y, X): 0/1, class indices, or the image as it is."""
    if kind == "binary":
        mode = "nonzero" if cfg.labels_mode == "nonzero" else "binary"
        return checks.binary_labels(labels, path, mode).astype(np.float32)[:, None]
    if kind == "multiclass":
        lut = {v: i for i, v in enumerate(classes)}
        return np.vectorize(lut.__getitem__, otypes=[np.float32])(labels)[:, None]
    return labels if labels.ndim == 4 else labels[:, None]


def make_augment(cfg: TrainConfig, target_kind: str) -> Callable[[dict], dict]:
    """Paired MONAI dictionary transforms, drawn once and applied to input and target alike."""
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
        ts.append(RandSpatialCropd(keys, roi_size=(cfg.crop, cfg.crop), random_size=False))
        ts.append(Resized(keys, spatial_size=(big, big), mode=("bilinear", nearest)))
    ts.append(RandSpatialCropd(keys, roi_size=(cfg.crop, cfg.crop), random_size=False))
    if cfg.augment:
        ts += [
            RandFlipd(keys, prob=0.5, spatial_axis=0),
            RandFlipd(keys, prob=0.5, spatial_axis=1),
            RandRotate90d(keys, prob=0.5, max_k=3),
        ]
        if cfg.elastic:  # as the U-Net paper did for ISBI 2012
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
        ts += [
            RandScaleIntensityd("image", factors=0.1, prob=0.5),
            RandShiftIntensityd("image", offsets=0.1, prob=0.5),
        ]
    return Compose(ts)


class StepBatches(torch.utils.data.Dataset):
    """Item ``step`` is the batch for that step, a pure function of (seed, step).

    With ``world_size`` W, the step's global batch has W × batch_size crops and rank r gets
    crops r·b … (r+1)·b − 1 of it: W ranks × b crops see exactly the crops one process would
    see with W·b. The choice of slices and the augmentation seeds of the whole global batch are
    drawn on every rank (cheap); only the rank's own crops are augmented.
    """

    def __init__(self, data: PairedData, cfg: TrainConfig, rank: int = 0, world_size: int = 1):
        self.x, self.y = data.train_x, data.train_y
        self.cfg = cfg
        self.augment = make_augment(cfg, data.target_kind)
        self.total, self.lo, self.hi = distributed.shard_bounds(cfg.batch_size, rank, world_size)

    def __len__(self) -> int:
        return 2**62

    def __getitem__(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        rng = np.random.default_rng([self.cfg.seed, step])
        ids = rng.integers(0, len(self.x), size=self.total)
        seeds = [int(rng.integers(2**31)) for _ in range(self.total)]
        xs, ys = [], []
        with _plain_tensors():
            for i, seed in zip(ids[self.lo : self.hi], seeds[self.lo : self.hi], strict=True):
                self.augment.set_random_state(seed=seed)
                item = self.augment({"image": self.x[i], "target": self.y[i]})
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
    H, W = data.train_x.shape[-2:]
    crops = len(data.train_x) * H * W / (cfg.crop * cfg.crop)
    return max(1, math.ceil(crops / cfg.batch_size / world_size))


def total_steps(cfg: TrainConfig, data: PairedData, world_size: int = 1) -> int:
    """--max-steps, or --epochs where an epoch is enough crops to cover the training slices once."""
    if cfg.max_steps is not None:
        return cfg.max_steps
    return (cfg.epochs or 1) * steps_per_epoch(cfg, data, world_size)
