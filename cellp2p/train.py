"""One training loop for both modes: the U-Net baseline and the pix2pix cGAN.

Each mode supplies a step function returning a dict of floats; the loop owns data, logging,
validation, checkpoints and resume. Randomness is derived from ``(seed, step)``, so a resumed
run draws exactly the batches and dropout masks the uninterrupted run would have.

Under torchrun (``WORLD_SIZE`` > 1) the same loop runs in every process with the trained
networks wrapped in DistributedDataParallel: step s's global batch of ``W × --batch-size``
crops is still a pure function of (seed, s) and rank r trains on its r-th slice of it, dropout
masks are seeded per (seed, step, rank), and rank 0 alone validates and writes the run folder
while the others wait (see :mod:`cellp2p.distributed`).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import signal
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

import cellp2p
from cellp2p import distributed, io, validate
from cellp2p.checkpoint import (
    build_from_entry,
    copy_checkpoint,
    load_checkpoint,
    model_entry,
    save_checkpoint,
)
from cellp2p.errors import CellP2PError
from cellp2p.losses import (
    GAN_MODES,
    discriminator_loss,
    generator_adv_loss,
    gradient_penalty,
    supervised_loss,
)
from cellp2p.models import build_model
from cellp2p.predict import forward_full
from cellp2p.runtime import autocast, resolve_precision, seed_everything
from cellp2p.transforms import Normalization, parse_slices

MODES = ("unet", "pix2pix")
TASKS = ("segment", "translate")
DIRECTIONS = ("AtoB", "BtoA")
LABEL_MODES = ("auto", "binary", "nonzero", "multiclass")
MAX_CLASSES = 16


@dataclass
class TrainConfig:
    """Every option of a training run; saved in config.json and in every checkpoint."""

    mode: str = "unet"
    task: str = "segment"
    direction: str = "AtoB"
    preset: str = "small"
    volume: str | None = None
    labels: str | None = None
    manifest: str | None = None
    data_dir: str | None = None
    train_slices: str | None = None
    val_slices: str | None = None
    labels_mode: str = "auto"
    max_steps: int | None = None
    epochs: int | None = None
    batch_size: int = 4
    crop: int = 256
    lr: float | None = None
    lr_decay_start: float = 0.5
    loss: str | None = None
    lambda_l1: float = 100.0
    lambda_gan: float = 1.0
    gan_mode: str = "vanilla"
    unconditional: bool = False
    receptive_field: int = 70
    upsample: str | None = None  # decoder: transpose | resize; None = the preset's
    eval_every: int = 100
    best_metric: str | None = None
    augment: bool = True
    elastic: bool = False
    jitter: bool = False
    norm_method: str = "percentile"
    seed: int = 0
    device: str = "auto"
    precision: str = "auto"
    deterministic: bool = False
    num_workers: int = 0
    quiet: bool = False
    sync_bn: bool = False
    model_overrides: dict = field(default_factory=dict)

    @classmethod
    def from_dict(cls, d: dict[str, Any], source: str = "config") -> TrainConfig:
        """Build from JSON, refusing unknown keys and wrong types."""
        known = {f.name: f for f in fields(cls)}
        unknown = sorted(set(d) - set(known))
        if unknown:
            raise CellP2PError(
                f"{source}: unknown option(s) {', '.join(unknown)}; check the spelling"
            )
        out = cls()
        for key, value in d.items():
            kinds = str(known[key].type).replace(" ", "").split("|")
            if value is None and "None" in kinds:
                pass
            elif not any(_is_type(value, k) for k in kinds):
                raise CellP2PError(
                    f"{source}: option {key} should be {known[key].type}, got {value!r}"
                )
            setattr(out, key, value)
        return out


def _is_type(value: Any, kind: str) -> bool:
    if kind == "bool" or isinstance(value, bool):
        return kind == "bool" and isinstance(value, bool)
    types = {"int": int, "float": (int, float), "str": str, "dict": dict, "None": type(None)}
    return isinstance(value, types.get(kind, object))


# -- data ------------------------------------------------------------------------------------


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

    @property
    def in_channels(self) -> int:
        return self.train_x.shape[1]

    @property
    def out_channels(self) -> int:
        if self.target_kind == "multiclass":
            return len(self.classes)
        return self.train_y.shape[1]


def _resolve_sources(cfg: TrainConfig) -> tuple[Path, Path, list[int] | None, list[int] | None]:
    """Volume/labels paths and the manifest's split (None when the user gives files)."""
    if cfg.manifest:
        if cfg.volume or cfg.labels:
            raise CellP2PError("give either --manifest or --volume/--labels, not both")
        from cellp2p.data import load_manifest, resolve_files

        manifest = load_manifest(cfg.manifest)
        files = resolve_files(
            manifest, Path(cfg.data_dir) if cfg.data_dir else None, roles=("volume", "labels")
        )
        split = manifest.split or {}
        train = _as_ids(split.get("train"))
        val = _as_ids(split.get("val"))
        return files["volume"], files["labels"], train, val
    if not cfg.volume or not cfg.labels:
        raise CellP2PError(
            "no training data: give --volume V.tif --labels L.tif, or --manifest NAME "
            "(e.g. isbi2012), or try 'cellp2p synth --out DIR' for a synthetic pair"
        )
    return Path(cfg.volume), Path(cfg.labels), None, None


def _as_ids(value: Any) -> list[int] | None:
    if value is None:
        return None
    if isinstance(value, str):
        return parse_slices(value, 10**9)
    return [int(v) for v in value]


def _target_kind(labels: np.ndarray, path: Path, cfg: TrainConfig) -> tuple[str, list[int]]:
    """binary / multiclass / image, and the class values."""
    if cfg.task == "translate":
        return "image", []
    validate.check_grayscale(labels, path)
    if cfg.labels_mode == "nonzero":
        return "binary", [0, 1]
    values = np.unique(labels)
    if cfg.labels_mode == "binary" or len(values) <= 2:
        validate.binary_labels(labels, path, "binary")
        return "binary", [int(v) for v in values]
    if cfg.labels_mode == "multiclass" or len(values) <= MAX_CLASSES:
        if len(values) > 256:
            raise CellP2PError(f"{path}: {len(values)} label values is too many classes")
        return "multiclass", [int(v) for v in values]
    raise CellP2PError(
        f"{path}: labels have {len(values)} values (looks like instance labels); pass "
        "--labels-mode nonzero to segment foreground = label > 0, or --task translate"
    )


def load_data(cfg: TrainConfig, norms: dict[str, Any] | None = None) -> PairedData:
    """Read, validate, split and normalise the training pair."""
    vpath, lpath, split_train, split_val = _resolve_sources(cfg)
    volume = io.read_stack(vpath)
    labels = io.read_stack(lpath)
    validate.check_pair(volume.data.shape, labels.data.shape, vpath, lpath)
    validate.check_finite(volume.data, vpath)
    validate.check_finite(labels.data, lpath)
    n = volume.data.shape[0]
    train_ids = parse_slices(cfg.train_slices, n) if cfg.train_slices else split_train
    val_ids = parse_slices(cfg.val_slices, n) if cfg.val_slices else split_val
    if train_ids is None:
        # Without a split, hold out the last fifth (at least one slice) when there are several.
        n_val = max(1, n // 5) if n > 1 else 0
        train_ids = list(range(n - n_val))
        val_ids = val_ids if val_ids is not None else list(range(n - n_val, n)) or train_ids
    if val_ids is None:
        rest = [i for i in range(n) if i not in set(train_ids)]
        val_ids = rest or train_ids[-1:]
    for ids, what in ((train_ids, "train"), (val_ids, "val")):
        bad = [i for i in ids if not 0 <= i < n]
        if bad:
            raise CellP2PError(f"{vpath}: {what} slice {bad[0]} is out of range (0-{n - 1})")

    kind, classes = _target_kind(labels.data, lpath, cfg)
    if kind == "binary":
        mode = "nonzero" if cfg.labels_mode == "nonzero" else "binary"
        target = validate.binary_labels(labels.data, lpath, mode).astype(np.float32)[:, None]
    elif kind == "multiclass":
        lut = {v: i for i, v in enumerate(classes)}
        target = np.vectorize(lut.__getitem__, otypes=[np.float32])(labels.data)[:, None]
    else:
        target = labels.data if labels.data.ndim == 4 else labels.data[:, None]
    source = volume.data if volume.data.ndim == 4 else volume.data[:, None]

    if cfg.direction == "BtoA":
        if cfg.task != "translate":
            raise CellP2PError(
                "--direction BtoA makes images from labels: use it with --task translate"
            )
        source, target = target, source
    fit_ids = train_ids
    if norms:
        in_norm = Normalization.from_dict(norms["input"])
        t_norm = Normalization.from_dict(norms["target"]) if norms.get("target") else None
    else:
        in_norm = Normalization.fit(source[fit_ids], cfg.norm_method)
        t_norm = Normalization.fit(target[fit_ids], cfg.norm_method) if kind == "image" else None
    x = in_norm.apply(source)
    y = np.clip(t_norm.apply(target), 0.0, 1.0) if t_norm else target.astype(np.float32)
    H, W = x.shape[-2:]
    if cfg.crop > min(H, W):
        raise CellP2PError(
            f"--crop {cfg.crop} is larger than the slices of {vpath} ({H}x{W}); "
            f"use --crop {min(H, W)} or smaller"
        )
    return PairedData(
        train_x=x[train_ids],
        train_y=y[train_ids],
        val_x=x[val_ids],
        val_y=y[val_ids],
        val_ids=list(val_ids),
        input_norm=in_norm,
        target_norm=t_norm,
        target_kind=kind,
        classes=classes,
        spacing=volume.spacing,
        sources={"volume": str(vpath), "labels": str(lpath)},
    )


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


# -- the two modes -----------------------------------------------------------------------------


def to_model_range(x: torch.Tensor) -> torch.Tensor:
    """[0, 1] → [-1, 1], the range the tanh generator works in (used for every input)."""
    return x * 2 - 1


def center_to(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Centre-crop ``t`` to the spatial size of ``like`` (valid-convolution outputs are smaller)."""
    dh, dw = t.shape[-2] - like.shape[-2], t.shape[-1] - like.shape[-1]
    if dh == 0 and dw == 0:
        return t
    return t[..., dh // 2 : dh // 2 + like.shape[-2], dw // 2 : dw // 2 + like.shape[-1]]


class Mode:
    """A training mode: its networks, optimizers and one step.

    ``nets`` are the plain networks (checkpointed, validated); ``train_nets`` are what the step
    calls: the same objects in one process, DistributedDataParallel wrappers under torchrun.
    """

    nets: dict[str, nn.Module]
    train_nets: dict[str, nn.Module]
    optims: dict[str, torch.optim.Optimizer]

    def step(self, x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def predict(self, x: torch.Tensor) -> torch.Tensor:
        """Network output mapped to [0, 1] (probabilities or a normalised image)."""
        raise NotImplementedError

    @property
    def main(self) -> nn.Module:
        return next(iter(self.nets.values()))


def make_adam(net: nn.Module, device: torch.device, **kwargs: Any) -> torch.optim.Adam:
    """Adam with the fused kernel on CPU and CUDA: one kernel over all parameters instead of a
    Python loop (4.3x faster for the paper G + D on the CPU, see benchmarks/RESULTS.md)."""
    fused = device.type in ("cpu", "cuda")
    return torch.optim.Adam(net.parameters(), fused=fused, **kwargs)


def model_overrides(cfg: TrainConfig) -> dict[str, Any]:
    """The preset's changes for the U-Net / generator: ``--upsample``, then ``model_overrides``."""
    overrides: dict[str, Any] = {} if cfg.upsample is None else {"up": cfg.upsample}
    return {**overrides, **cfg.model_overrides}


class UNetMode(Mode):
    """The baseline: a U-Net trained with a supervised loss."""

    def __init__(self, cfg: TrainConfig, data: PairedData, device: torch.device, precision: str):
        self.kind = data.target_kind
        overrides = model_overrides(cfg)
        net = build_model("unet", cfg.preset, data.in_channels, data.out_channels, **overrides)
        self.nets = {"unet": net.to(device)}
        self.train_nets = self.nets
        loss_name = cfg.loss or ("bcedice" if self.kind != "image" else "l1")
        self.loss = supervised_loss(
            loss_name, len(data.classes) if self.kind == "multiclass" else 2
        )
        lr = cfg.lr if cfg.lr is not None else 1e-3
        self.optims = {"unet": make_adam(net, device, lr=lr)}
        self.device, self.precision = device, precision

    def step(self, x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
        net, opt = self.train_nets["unet"], self.optims["unet"]
        opt.zero_grad(set_to_none=True)
        with autocast(self.device, self.precision):
            out = net(to_model_range(x))
            loss = self.loss(out.float(), center_to(y, out))
        loss.backward()
        opt.step()
        return {"loss": loss.detach()}

    def predict(self, x: torch.Tensor) -> torch.Tensor:
        out = self.nets["unet"](to_model_range(x)).float()
        if self.kind == "binary":
            return torch.sigmoid(out)
        if self.kind == "multiclass":
            return torch.softmax(out, dim=1)
        return out


class Pix2PixMode(Mode):
    """pix2pix: U-Net generator + PatchGAN, adversarial + λ·L1 (Isola et al. 2017)."""

    def __init__(self, cfg: TrainConfig, data: PairedData, device: torch.device, precision: str):
        if cfg.gan_mode not in GAN_MODES:
            raise CellP2PError(
                f"--gan-mode {cfg.gan_mode!r} unknown; use one of {', '.join(GAN_MODES)}"
            )
        if data.target_kind == "multiclass":
            raise CellP2PError(
                "pix2pix learns the label map as an image: use --labels-mode binary/nonzero, "
                "or --task translate for multi-valued label maps"
            )
        overrides = model_overrides(cfg)
        g = build_model("generator", cfg.preset, data.in_channels, data.out_channels, **overrides)
        d_in = data.out_channels + (0 if cfg.unconditional else data.in_channels)
        d = build_model(
            "discriminator",
            cfg.preset,
            d_in,
            1,
            receptive_field=cfg.receptive_field,
            conditional=not cfg.unconditional,
        )
        self.nets = {"generator": g.to(device), "discriminator": d.to(device)}
        self.train_nets = self.nets
        lr = cfg.lr if cfg.lr is not None else 2e-4
        betas = (0.5, 0.999)
        self.use_gan = cfg.lambda_gan > 0
        self.optims = {"generator": make_adam(g, device, lr=lr, betas=betas)}
        if self.use_gan:  # the L1-only ablation never steps D
            self.optims["discriminator"] = make_adam(d, device, lr=lr, betas=betas)
        self.cfg, self.device, self.precision = cfg, device, precision
        # A sigmoid generator (the course preset) works in [0, 1]; tanh in [-1, 1].
        self.unit_range = g.config.final_activation == "sigmoid"

    def _d_input(self, x: torch.Tensor, img: torch.Tensor) -> torch.Tensor:
        return img if self.cfg.unconditional else torch.cat([center_to(x, img), img], dim=1)

    def step(self, x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
        # Under DDP g and d are wrappers whose backward averages the gradients over ranks. G's
        # step calls the plain D (``d_plain``): D is frozen there, so no gradient of D's is due
        # and D's wrapper must not wait for one.
        g, d = self.train_nets["generator"], self.train_nets["discriminator"]
        d_plain = self.nets["discriminator"]
        og, od = self.optims["generator"], self.optims.get("discriminator")
        cfg = self.cfg
        x = to_model_range(x)
        y = y if self.unit_range else to_model_range(y)
        logs: dict[str, torch.Tensor] = {}
        with autocast(self.device, self.precision):
            fake = g(x)
        y = center_to(y, fake)
        if self.use_gan:
            # D first, on the detached fake; its objective halved as in the paper.
            d_plain.requires_grad_(True)
            od.zero_grad(set_to_none=True)
            with autocast(self.device, self.precision):
                real_pair, fake_pair = self._d_input(x, y), self._d_input(x, fake.detach())
                loss_d = 0.5 * discriminator_loss(
                    cfg.gan_mode, d(real_pair).float(), d(fake_pair).float()
                )
            if cfg.gan_mode == "wgangp":
                loss_d = loss_d + 10.0 * gradient_penalty(d, real_pair.float(), fake_pair.float())
            loss_d.backward()
            od.step()
            logs["loss_d"] = loss_d.detach()
            d_plain.requires_grad_(False)  # G's step must not move D
        og.zero_grad(set_to_none=True)
        with autocast(self.device, self.precision):
            total = torch.zeros((), device=x.device)
            if self.use_gan:
                adv = generator_adv_loss(cfg.gan_mode, d_plain(self._d_input(x, fake)).float())
                total = total + cfg.lambda_gan * adv
                logs["loss_g_gan"] = adv.detach()
            if cfg.lambda_l1 > 0:
                l1 = torch.nn.functional.l1_loss(fake.float(), y)
                total = total + cfg.lambda_l1 * l1
                logs["loss_g_l1"] = l1.detach()
        total.backward()
        og.step()
        logs["loss_g"] = total.detach()
        return logs

    def predict(self, x: torch.Tensor) -> torch.Tensor:
        out = self.nets["generator"](to_model_range(x)).float()
        return out if self.unit_range else (out + 1) / 2


def make_mode(cfg: TrainConfig, data: PairedData, device: torch.device, precision: str) -> Mode:
    if cfg.mode == "unet":
        return UNetMode(cfg, data, device, precision)
    if cfg.mode == "pix2pix":
        return Pix2PixMode(cfg, data, device, precision)
    raise CellP2PError(f"--mode {cfg.mode!r} unknown; use one of {', '.join(MODES)}")


# -- validation, records -----------------------------------------------------------------------


def default_best_metric(cfg: TrainConfig, target_kind: str) -> str:
    return "psnr" if target_kind == "image" else "pixel_error"


def validate_run(mode: Mode, data: PairedData, device: torch.device) -> tuple[dict, np.ndarray]:
    """Metrics on whole held-out slices (not crops), and the predictions in [0, 1]."""
    from cellp2p import metrics

    preds = []
    net = mode.main
    was_training = net.training
    for m in mode.nets.values():
        m.eval()
    with torch.inference_mode():
        for x in data.val_x:
            xt = torch.from_numpy(x[None]).to(device)
            preds.append(forward_full(mode.predict, net, xt)[0].cpu().numpy())
    if was_training:
        for m in mode.nets.values():
            m.train()
    pred = np.stack(preds)
    out: dict[str, float] = {}
    if data.target_kind == "binary":
        p, t = pred[:, 0] >= 0.5, data.val_y[:, 0] >= 0.5
        out["pixel_error"] = float(
            np.mean([metrics.pixel_error(a, b) for a, b in zip(p, t, strict=True)])
        )
        per = [
            metrics.dice_iou(a.astype(np.int64), b.astype(np.int64), 2)
            for a, b in zip(p, t, strict=True)
        ]
    elif data.target_kind == "multiclass":
        p, t = pred.argmax(1), data.val_y[:, 0].astype(np.int64)
        out["pixel_error"] = float(np.mean(p != t))
        per = [metrics.dice_iou(a, b, len(data.classes)) for a, b in zip(p, t, strict=True)]
    else:
        p = np.clip(pred, 0, 1)
        per = [
            {
                "l1": metrics.mae(a[c], b[c]),
                "psnr": metrics.psnr(a[c], b[c], data_range=1.0),
                "ssim": metrics.ssim(a[c], b[c], data_range=1.0),
            }
            for a, b in zip(p, data.val_y, strict=True)
            for c in range(a.shape[0])
        ]
    for key in per[0]:
        out[key] = float(np.mean([row[key] for row in per]))
    return out, pred


def _to_uint8(img: np.ndarray) -> np.ndarray:
    img = img[0] if img.ndim == 3 and img.shape[0] not in (3,) else img
    if img.ndim == 3:
        img = np.moveaxis(img, 0, -1)
    lo, hi = np.percentile(img, [0.5, 99.5]) if img.size else (0, 1)
    hi = hi if hi > lo else lo + 1
    return (np.clip((img - lo) / (hi - lo), 0, 1) * 255).astype(np.uint8)


def save_panel(path: Path, images: list[np.ndarray]) -> None:
    """input | target | prediction … side by side as one PNG."""
    from PIL import Image

    tiles = [_to_uint8(im) for im in images]
    tiles = [np.repeat(t[..., None], 3, -1) if t.ndim == 2 else t for t in tiles]
    h = max(t.shape[0] for t in tiles)
    gap = np.full((h, 4, 3), 255, np.uint8)
    row = []
    for t in tiles:
        pad = np.zeros((h, t.shape[1], 3), np.uint8)
        pad[: t.shape[0]] = t
        row += [pad, gap]
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.concatenate(row[:-1], axis=1)).save(path)


def plot_curves(path: Path, records: list[dict], title: str = "") -> None:
    """Loss terms and validation metrics against step, one PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not records:
        return
    steps = [r["step"] for r in records]
    loss_keys = [k for k in records[-1] if k.startswith("loss")]
    val_keys = [k for k in records[-1] if k.startswith("val_")]
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.5))
    for k in loss_keys:
        axes[0].plot(steps, [r.get(k, np.nan) for r in records], label=k)
    axes[0].set_xlabel("step")
    axes[0].set_title("training losses")
    axes[0].legend(fontsize=8)
    for k in val_keys:
        axes[1].plot(steps, [r.get(k, np.nan) for r in records], label=k)
    axes[1].set_xlabel("step")
    axes[1].set_title("validation")
    axes[1].legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.part.png")
    fig.savefig(tmp, dpi=80)
    plt.close(fig)
    os.replace(tmp, path)


def versions(device: torch.device) -> dict[str, str]:
    import monai

    return {
        "cellp2p": cellp2p.__version__,
        "torch": str(torch.__version__),
        "monai": str(monai.__version__),
        "numpy": str(np.__version__),
        "python": sys.version.split()[0],
        "device": str(device),
    }


# -- the loop ----------------------------------------------------------------------------------


def lr_factor(step: int, total: int, decay_start: float) -> float:
    """Constant, then linear decay to 0 over the last ``1 - decay_start`` of the steps."""
    start = int(total * decay_start)
    if step < start or total <= start:
        return 1.0
    return max(0.0, 1.0 - (step - start) / (total - start))


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


def check_config(cfg: TrainConfig) -> None:
    """Option values and combinations, before anything is read or written."""
    if cfg.mode not in MODES:
        raise CellP2PError(f"--mode {cfg.mode!r} unknown; use one of {', '.join(MODES)}")
    if cfg.task not in TASKS:
        raise CellP2PError(f"--task {cfg.task!r} unknown; use one of {', '.join(TASKS)}")
    if cfg.direction not in DIRECTIONS:
        raise CellP2PError(f"--direction {cfg.direction!r} unknown; use AtoB or BtoA")
    if cfg.labels_mode not in LABEL_MODES:
        raise CellP2PError(f"--labels-mode {cfg.labels_mode!r} unknown; use one of {LABEL_MODES}")
    for name in ("batch_size", "crop", "eval_every"):
        if getattr(cfg, name) <= 0:
            raise CellP2PError(
                f"--{name.replace('_', '-')} must be positive, got {getattr(cfg, name)}"
            )
    if cfg.max_steps is not None and cfg.max_steps <= 0:
        raise CellP2PError(f"--max-steps must be positive, got {cfg.max_steps}")
    if cfg.epochs is not None and cfg.epochs <= 0:
        raise CellP2PError(f"--epochs must be positive, got {cfg.epochs}")
    if cfg.lr is not None and not (math.isfinite(cfg.lr) and cfg.lr > 0):
        raise CellP2PError(f"--lr must be a positive number, got {cfg.lr}")
    if not all(math.isfinite(v) and v >= 0 for v in (cfg.lambda_l1, cfg.lambda_gan)):
        raise CellP2PError(
            f"--lambda-l1 and --lambda-gan must be finite and >= 0, got "
            f"{cfg.lambda_l1} and {cfg.lambda_gan}"
        )
    if not 0 <= cfg.seed < 2**32:
        raise CellP2PError(f"--seed must be in 0..{2**32 - 1}, got {cfg.seed}")
    if cfg.num_workers < 0:
        raise CellP2PError(
            f"--num-workers must be 0 (load in the main process) or more, got {cfg.num_workers}"
        )
    if cfg.mode == "pix2pix" and cfg.lambda_l1 == 0 and cfg.lambda_gan == 0:
        raise CellP2PError("--lambda-l1 0 with --lambda-gan 0 leaves nothing to train; set one > 0")
    if cfg.receptive_field not in (1, 16, 70, 286):
        raise CellP2PError(f"--receptive-field {cfg.receptive_field}: use 1, 16, 70 or 286")
    if cfg.upsample not in (None, "transpose", "resize"):
        raise CellP2PError(f"--upsample {cfg.upsample!r}: use transpose or resize")
    if not 0 <= cfg.lr_decay_start <= 1:
        raise CellP2PError("--lr-decay-start is a fraction of the run in [0, 1]")
    if cfg.direction == "BtoA" and cfg.task != "translate":
        raise CellP2PError(
            "--direction BtoA makes images from labels: use it with --task translate"
        )


class RunLock:
    """An exclusive lock file in the run folder: two runs on one --out would corrupt each other."""

    def __init__(self, out: Path):
        self.path = out / ".lock"

    def __enter__(self) -> RunLock:
        import fcntl

        self._fh = open(self.path, "a+")
        try:
            fcntl.flock(self._fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            self._fh.close()
            raise CellP2PError(
                f"{self.path.parent}: another training run is using this folder; "
                "wait for it to finish or choose another --out"
            ) from None
        return self

    def __exit__(self, *exc: object) -> None:
        self._fh.close()


def train(
    cfg: TrainConfig,
    out: str | Path,
    *,
    resume: bool = False,
    resume_overrides: dict[str, Any] | None = None,
    stop_after: int | None = None,
    progress: Callable[..., Any] | None = None,
) -> dict[str, Any]:
    """Train a run into ``out``; returns the final metrics record.

    ``resume`` continues the run in ``out`` with its saved config, changed only by
    ``resume_overrides`` (e.g. a larger ``max_steps``). ``stop_after`` ends the run early at
    that step (as an interruption would), keeping the schedule of the full run.
    """
    out = Path(out)
    ckpt_dir = out / "checkpoints"
    ckpt = None
    if resume:
        if not (ckpt_dir / "last.pt").is_file():
            raise CellP2PError(
                f"{out}: --resume needs {ckpt_dir / 'last.pt'}, which does not exist; "
                "start without --resume or point --out at an earlier run"
            )
        ckpt = load_checkpoint(ckpt_dir / "last.pt")
        saved = TrainConfig.from_dict(ckpt["train_config"], str(ckpt_dir / "last.pt"))
        cfg = TrainConfig.from_dict({**asdict(saved), **(resume_overrides or {})}, "--resume")
    check_config(cfg)
    io.check_folder_writable(out)
    if not resume and ckpt_dir.joinpath("last.pt").exists():
        raise CellP2PError(
            f"{out}: already holds a run; pass --resume to continue it or choose another --out"
        )
    world = distributed.setup(cfg.device)  # under torchrun: joins the group (kept until exit)
    return _train(cfg, out, ckpt, world, stop_after, progress)


def _train(
    cfg: TrainConfig,
    out: Path,
    ckpt: dict[str, Any] | None,
    world: distributed.World,
    stop_after: int | None,
    progress: Callable[..., Any] | None,
) -> dict[str, Any]:
    with contextlib.ExitStack() as stack:
        try:  # a failure in one process must stop them all, not leave them waiting for it
            device = world.device
            precision = resolve_precision(cfg.precision, device)
            if cfg.sync_bn and world.size > 1 and device.type != "cuda":
                raise CellP2PError(
                    "--sync-bn: torch's SyncBatchNorm runs on CUDA GPUs only; on the CPU leave "
                    "it off (each process then normalises with the statistics of its own crops)"
                )
            seed_everything(cfg.seed, cfg.deterministic)
            data = load_data(cfg, ckpt["normalization"] if ckpt else None)
            mode = make_mode(cfg, data, device, precision)
            steps = total_steps(cfg, data, world.size)
            best_metric = cfg.best_metric or default_best_metric(cfg, data.target_kind)
            lower_better = best_metric in ("pixel_error", "l1")
            start, best, records = 0, None, []
            if ckpt:
                for name, net in mode.nets.items():
                    entry = ckpt["models"][name]
                    net.load_state_dict(build_from_entry(entry, ckpt["path"]).state_dict())
                for name, opt in mode.optims.items():
                    opt.load_state_dict(ckpt["optimizers"][name])
                start, best = int(ckpt["step"]), ckpt.get("best")
                random.setstate(_tuple_state(ckpt["rng"]["python"]))
            scheds = {
                k: torch.optim.lr_scheduler.LambdaLR(
                    o, lambda s: lr_factor(s, steps, cfg.lr_decay_start), last_epoch=start - 1
                )
                for k, o in mode.optims.items()
            }
            if ckpt:
                for k, s in scheds.items():
                    s.load_state_dict(ckpt["schedulers"][k])
            for net in mode.nets.values():
                net.train()
            if world.is_main:  # rank 0 alone writes the run folder
                out.mkdir(parents=True, exist_ok=True)
                stack.enter_context(RunLock(out))
                if ckpt:
                    records = _read_records(out / "metrics.jsonl", start)
                    _note_world_change(ckpt, world.size, cfg)
                meta = {**asdict(cfg), "total_steps": steps, "best_metric": best_metric}
                meta.update(versions=versions(device), precision=precision)
                meta.update(world_size=world.size, global_batch_size=cfg.batch_size * world.size)
                meta.update(
                    data={**data.sources, "target_kind": data.target_kind, "classes": data.classes}
                )
                _write_json(out / "config.json", meta)
        except Exception:
            world.agree(False, "set-up")
            raise
        world.agree(True, "set-up")
        if world.size > 1:
            _wrap_for_ddp(mode, world, cfg)
        return _loop(
            cfg,
            out,
            mode,
            data,
            scheds,
            steps,
            start,
            best,
            best_metric,
            lower_better,
            records,
            device,
            stop_after,
            progress,
            world,
        )


def _wrap_for_ddp(mode: Mode, world: distributed.World, cfg: TrainConfig) -> None:
    """DistributedDataParallel around each trained network (with SyncBatchNorm if asked).

    ``mode.nets`` stay the plain networks (same parameters), so checkpoints hold the unwrapped
    state dicts that a single process loads unchanged.
    """
    wrapped = {}
    for name, net in mode.nets.items():
        if name not in mode.optims:  # e.g. D in the L1-only ablation: never stepped
            wrapped[name] = net
            continue
        if cfg.sync_bn:  # same parameter and buffer objects: optimizers are unaffected
            net = torch.nn.SyncBatchNorm.convert_sync_batchnorm(net)
            mode.nets[name] = net
        wrapped[name] = world.wrap(net)
    mode.train_nets = wrapped


def _note_world_change(ckpt: dict[str, Any], size: int, cfg: TrainConfig) -> None:
    before = int(ckpt.get("world_size") or 1)
    if before != size:
        print(
            f"note: resuming a run trained by {before} process(es) with {size}: the global "
            f"batch changes from {before * cfg.batch_size} to {size * cfg.batch_size} crops, "
            "so this is not an exact continuation",
            file=sys.stderr,
        )


def _tuple_state(state: Any) -> Any:
    return tuple(_tuple_state(s) for s in state) if isinstance(state, list) else state


def _read_records(path: Path, upto: int) -> list[dict]:
    """Keep the records up to the checkpoint (later ones belong to steps being redone)."""
    if not path.exists():
        return []
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    records = [r for r in records if r["step"] <= upto]
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return records


def _write_json(path: Path, obj: Any) -> None:
    tmp = path.with_name(f".{path.name}.part")
    tmp.write_text(json.dumps(obj, indent=2, default=str) + "\n")
    os.replace(tmp, path)


def _loop(
    cfg,
    out,
    mode,
    data,
    scheds,
    steps,
    start,
    best,
    best_metric,
    lower_better,
    records,
    device,
    stop_after,
    progress,
    world=None,
) -> dict[str, Any]:
    from tqdm import tqdm

    world = world or distributed.World(device=device)
    loader = torch.utils.data.DataLoader(
        StepBatches(data, cfg, world.rank, world.size),
        batch_size=None,
        sampler=range(start + 1, steps + 1),
        num_workers=cfg.num_workers,
        pin_memory=device.type == "cuda",
        persistent_workers=False,
    )
    end = min(steps, stop_after) if stop_after else steps
    bar = tqdm(
        total=end,
        initial=start,
        disable=cfg.quiet or not world.is_main,
        dynamic_ncols=True,
        desc=cfg.mode,
        file=sys.stderr,
    )
    sums: dict[str, torch.Tensor] = {}
    n_since, t_since = 0, time.perf_counter()
    interrupted = False
    previous = signal.getsignal(signal.SIGINT)

    def on_sigint(signum: int, frame: Any) -> None:  # finish the step, then checkpoint
        nonlocal interrupted
        interrupted = True

    if threading_is_main():
        signal.signal(signal.SIGINT, on_sigint)
    record: dict[str, Any] = records[-1] if records else {}
    step = start
    try:
        for step, (x, y) in zip(range(start + 1, end + 1), loader, strict=False):
            # Dropout masks and D's interpolates depend on (seed, step, rank): resume is exact.
            torch.manual_seed(distributed.step_seed(cfg.seed, step, world.rank))
            x = x.to(device, non_blocking=True)
            y = y.to(device, non_blocking=True)
            logs = mode.step(x, y)
            for k, v in logs.items():
                sums[k] = sums.get(k, 0) + v
            n_since += 1
            for s in scheds.values():
                s.step()
            bar.update(1)
            if world.size > 1:  # an interrupt seen by one process stops all at the same step
                interrupted = world.any(interrupted)
            if step % cfg.eval_every == 0 or step == end or interrupted:
                elapsed = time.perf_counter() - t_since
                losses = world.mean({k: float(v) / n_since for k, v in sums.items()})
                if world.is_main:  # the others wait at world.agree below
                    try:
                        record, best = _evaluate(
                            cfg,
                            out,
                            mode,
                            data,
                            scheds,
                            step,
                            steps,
                            losses,
                            n_since * cfg.batch_size * world.size / max(elapsed, 1e-9),
                            best,
                            best_metric,
                            lower_better,
                            records,
                            device,
                            world.size,
                        )
                    except Exception:
                        world.agree(False, f"validation and checkpointing at step {step}")
                        raise
                    bar.set_postfix({k: f"{v:.3g}" for k, v in losses.items()})
                    if cfg.quiet:
                        print(_log_line(record), file=sys.stderr, flush=True)
                    if progress:
                        progress(record)
                world.agree(True, f"validation and checkpointing at step {step}")
                sums, n_since, t_since = {}, 0, time.perf_counter()
            if interrupted:
                if world.is_main:
                    print(
                        f"interrupted at step {step}: checkpoint written to "
                        f"{out}/checkpoints/last.pt",
                        file=sys.stderr,
                    )
                break
    finally:
        bar.close()
        if threading_is_main():
            signal.signal(signal.SIGINT, previous)
    if interrupted:
        raise KeyboardInterrupt
    return world.broadcast(record)  # every process returns rank 0's final record


def threading_is_main() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


def _log_line(record: dict) -> str:
    parts = [f"step {record['step']}"]
    # "time" is the wall-clock stamp kept in metrics.jsonl; as a log field it only says 1.8e+09.
    parts += [f"{k} {v:.4g}" for k, v in record.items() if isinstance(v, float) and k != "time"]
    return " | ".join(parts)


def _evaluate(
    cfg,
    out,
    mode,
    data,
    scheds,
    step,
    steps,
    losses,
    ips,
    best,
    best_metric,
    lower_better,
    records,
    device,
    world_size=1,
) -> tuple[dict, dict | None]:
    """Validate, write the record, the sample panel, the curve and the checkpoints (rank 0)."""
    val, pred = validate_run(mode, data, device)
    per_epoch = steps_per_epoch(cfg, data, world_size)
    record = {
        "step": step,
        "epoch": step / per_epoch,
        **losses,
        **{f"val_{k}": v for k, v in val.items()},
        "images_per_s": ips,
        "lr": scheds[next(iter(scheds))].get_last_lr()[0],
        "time": time.time(),
    }
    value = val.get(best_metric)
    if value is None:
        raise CellP2PError(
            f"--best-metric {best_metric}: not computed; choose one of {sorted(val)}"
        )
    improved = best is None or (value < best["value"] if lower_better else value > best["value"])
    if improved:
        best = {"metric": best_metric, "value": float(value), "step": step}
    payload = {
        "mode": cfg.mode,
        "task": cfg.task,
        "train_config": asdict(cfg),
        "models": {name: model_entry(net) for name, net in mode.nets.items()},
        "optimizers": {k: o.state_dict() for k, o in mode.optims.items()},
        "schedulers": {k: s.state_dict() for k, s in scheds.items()},
        "scaler": None,
        "normalization": {
            "input": data.input_norm.to_dict(),
            "target": data.target_norm.to_dict() if data.target_norm else None,
        },
        "data": {
            "in_channels": data.in_channels,
            "out_channels": data.out_channels,
            "target_kind": data.target_kind,
            "classes": data.classes,
            "spacing": list(data.spacing) if data.spacing else None,
            "crop": cfg.crop,
        },
        "step": step,
        "total_steps": steps,
        "world_size": world_size,
        "best": best,
        "rng": {
            "python": _listify(random.getstate()),
            "numpy": _listify(np.random.get_state()),
            "torch": torch.get_rng_state(),
        },
        "versions": versions(device),
        "record": record,
    }
    last = save_checkpoint(out / "checkpoints" / "last.pt", payload)
    if improved:
        copy_checkpoint(last, out / "checkpoints" / "best.pt", payload)
    with open(out / "metrics.jsonl", "a") as fh:
        fh.write(json.dumps(record) + "\n")
    records.append(record)
    x0 = data.val_x[0]
    target = data.val_y[0]
    shown = pred[0][1:2] if data.target_kind == "binary" and pred.shape[1] > 1 else pred[0]
    if data.target_kind == "multiclass":
        shown = pred[0].argmax(0)[None].astype(np.float32)
    save_panel(out / "samples" / f"step_{step:07d}.png", [x0, center_to_np(target, shown), shown])
    plot_curves(out / "loss_curve.png", records, f"{cfg.mode} ({cfg.task}, {cfg.preset})")
    return record, best


def center_to_np(a: np.ndarray, like: np.ndarray) -> np.ndarray:
    dh, dw = a.shape[-2] - like.shape[-2], a.shape[-1] - like.shape[-1]
    return a[..., dh // 2 : dh // 2 + like.shape[-2], dw // 2 : dw // 2 + like.shape[-1]]


def _listify(state: Any) -> Any:
    if isinstance(state, tuple | list):
        return [_listify(s) for s in state]
    if isinstance(state, np.ndarray):
        return state.tolist()
    return state
