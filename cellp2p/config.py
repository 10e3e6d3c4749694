"""Every option of a training run: one table (default, choices, help) and its validation.

The CLI options of ``cellp2p train`` and ``cellp2p ablate`` are generated from this table, so a
default, a choice list or a help string exists once.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from typing import Any

from cellp2p.errors import CellP2PError

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


def default_best_metric(cfg: TrainConfig, target_kind: str) -> str:
    return "psnr" if target_kind == "image" else "pixel_error"
