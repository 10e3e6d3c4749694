"""Model configuration dataclasses and the ``paper`` / ``course`` / ``small`` presets.

Every field is a JSON primitive (str/int/float/bool), so ``dataclasses.asdict(model.config)``
round-trips through JSON and :func:`cellp2p.models.model_from_config` rebuilds the network.

Presets
-------
UNet
  * ``paper``  — Ronneberger et al. 2015: valid 3×3 convs, depth 4, base 64, no norm, ReLU,
    max-pool, 2×2 transposed up-conv; 572 → 388.
  * ``course`` — the cell-segmentation exercise's U-Net (GANs specialisation, course 3):
    1×1 input projection to 64 channels, four blocks of two valid 3×3 convs (LeakyReLU 0.2) +
    2×2 max-pool (channels 64→128→256→512→1024; skips are the block inputs), decoder blocks of
    bilinear 2× upsample + 2×2 valid conv halving the channels, cropped-skip concat, two valid
    3×3 convs (ReLU); no norm; 512 → 373.
  * ``small``  — same padding (any input size), depth 4, base 8, BatchNorm, ReLU, max-pool,
    2×2 transposed up-conv; 0.49 M parameters, ~0.4-0.5 s per 4×256² Adam training step on a
    2-core CPU (``base=16`` is 1.9 M parameters and ~2× slower, ~0.9-1.3 s).
Generator (pix2pix U-Net)
  * ``paper``  — Isola et al. 2017 / reference ``unet_256``: depth 8, base 64, BatchNorm,
    dropout 0.5 in the 3 innermost decoder blocks, tanh; 54.41 M parameters for 3 → 3.
  * ``course`` — the paper structure at the exercise's ``hidden_channels=32``: depth 8,
    base 32, sigmoid output (the exercise's images are in [0, 1]).
  * ``small``  — depth 6, base 16, otherwise as ``paper`` (fast on CPU).
Discriminator (PatchGAN)
  * ``paper``  — 70×70 PatchGAN, base 64, BatchNorm; 2.769 M parameters for 6 input channels.
  * ``course`` — the exercise's lectures use the same 70×70 PatchGAN: identical to ``paper``.
  * ``small``  — 70×70, base 16.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, fields
from typing import Any

from cellp2p.errors import CellP2PError
from cellp2p.models.blocks import (
    ACTIVATIONS,
    DECODER_UPS,
    NORMS,
    PADDINGS,
    RESIZE_MODES,
    check_choice,
)

PAD_MODES = ("reflect", "zeros")
LAYOUTS = ("classic", "course")
FINAL_ACTIVATIONS = ("tanh", "sigmoid", "none")
RECEPTIVE_FIELDS = (1, 16, 34, 70, 142, 286)


def _positive(name: str, value: int) -> None:
    """Raise CellP2PError unless ``value`` is a positive int."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise CellP2PError(f"{name} must be a positive integer, got {value!r}")


def _probability(name: str, value: float) -> None:
    """Raise CellP2PError unless 0 <= value < 1."""
    if not isinstance(value, (int, float)) or not 0.0 <= value < 1.0:
        raise CellP2PError(f"{name} must be in [0, 1), got {value!r}")


@dataclass
class UNetConfig:
    """Configuration of :class:`cellp2p.models.UNet` (raw logits out)."""

    in_channels: int = 1
    out_channels: int = 1
    depth: int = 4
    base: int = 64
    padding: str = "same"
    layout: str = "classic"
    n_convs: int = 2
    kernel_size: int = 3
    norm: str = "batch"
    activation: str = "relu"
    decoder_activation: str = "relu"
    down: str = "maxpool"
    up: str = "transpose"
    up_kernel: int = 2
    resize_mode: str = "bilinear"
    dropout: float = 0.0
    pad_mode: str = "reflect"

    def __post_init__(self) -> None:
        """Validate every field."""
        for name in ("in_channels", "out_channels", "depth", "base", "n_convs", "kernel_size"):
            _positive(name, getattr(self, name))
        _positive("up_kernel", self.up_kernel)
        check_choice("padding", self.padding, PADDINGS)
        check_choice("layout", self.layout, LAYOUTS)
        check_choice("norm", self.norm, NORMS)
        check_choice("activation", self.activation, ACTIVATIONS)
        check_choice("decoder_activation", self.decoder_activation, ACTIVATIONS)
        check_choice("down", self.down, ("maxpool", "conv"))
        check_choice("up", self.up, DECODER_UPS)
        check_choice("resize_mode", self.resize_mode, RESIZE_MODES)
        check_choice("pad_mode", self.pad_mode, PAD_MODES)
        _probability("dropout", self.dropout)


@dataclass
class GeneratorConfig:
    """Configuration of :class:`cellp2p.models.Generator` (pix2pix U-Net)."""

    in_channels: int = 3
    out_channels: int = 3
    depth: int = 8
    base: int = 64
    max_mult: int = 8
    kernel_size: int = 4
    norm: str = "batch"
    activation: str = "leaky_relu"
    decoder_activation: str = "relu"
    up: str = "transpose"
    resize_mode: str = "nearest"
    dropout: float = 0.5
    n_dropout: int = 3
    final_activation: str = "tanh"
    pad_mode: str = "reflect"

    def __post_init__(self) -> None:
        """Validate every field."""
        for name in ("in_channels", "out_channels", "base", "max_mult", "kernel_size"):
            _positive(name, getattr(self, name))
        _positive("depth", self.depth)
        if self.depth < 2:
            raise CellP2PError(f"generator depth must be >= 2, got {self.depth}")
        if isinstance(self.n_dropout, bool) or not isinstance(self.n_dropout, int):
            raise CellP2PError(f"n_dropout must be an integer, got {self.n_dropout!r}")
        check_choice("norm", self.norm, NORMS)
        check_choice("activation", self.activation, ACTIVATIONS)
        check_choice("decoder_activation", self.decoder_activation, ACTIVATIONS)
        check_choice("up", self.up, DECODER_UPS)
        check_choice("resize_mode", self.resize_mode, RESIZE_MODES)
        check_choice("final_activation", self.final_activation, FINAL_ACTIVATIONS)
        check_choice("pad_mode", self.pad_mode, PAD_MODES)
        _probability("dropout", self.dropout)


@dataclass
class DiscriminatorConfig:
    """Configuration of :class:`cellp2p.models.Discriminator` (PatchGAN, logit map out)."""

    in_channels: int = 6
    base: int = 64
    receptive_field: int = 70
    max_mult: int = 8
    norm: str = "batch"
    activation: str = "leaky_relu"
    conditional: bool = True

    def __post_init__(self) -> None:
        """Validate every field."""
        for name in ("in_channels", "base", "max_mult"):
            _positive(name, getattr(self, name))
        if self.receptive_field not in RECEPTIVE_FIELDS:
            valid = ", ".join(map(str, RECEPTIVE_FIELDS))
            raise CellP2PError(
                f"unknown receptive_field {self.receptive_field!r}; valid choices: {valid}"
            )
        check_choice("norm", self.norm, NORMS)
        check_choice("activation", self.activation, ACTIVATIONS)
        if not isinstance(self.conditional, bool):
            raise CellP2PError(f"conditional must be true or false, got {self.conditional!r}")


CONFIGS: dict[str, type] = {
    "unet": UNetConfig,
    "generator": GeneratorConfig,
    "discriminator": DiscriminatorConfig,
}

PRESETS: dict[str, dict[str, dict[str, Any]]] = {
    "unet": {
        "paper": dict(
            depth=4,
            base=64,
            padding="valid",
            layout="classic",
            norm="none",
            activation="relu",
            decoder_activation="relu",
            up="transpose",
            up_kernel=2,
        ),
        "course": dict(
            depth=4,
            base=64,
            padding="valid",
            layout="course",
            norm="none",
            activation="leaky_relu",
            decoder_activation="relu",
            up="resize",
            up_kernel=2,
            resize_mode="bilinear",
        ),
        "small": dict(
            depth=4,
            base=8,
            padding="same",
            layout="classic",
            norm="batch",
            activation="relu",
            decoder_activation="relu",
            up="transpose",
            up_kernel=2,
        ),
    },
    "generator": {
        "paper": dict(depth=8, base=64, final_activation="tanh"),
        "course": dict(depth=8, base=32, final_activation="sigmoid"),
        "small": dict(depth=6, base=16, final_activation="tanh"),
    },
    "discriminator": {
        "paper": dict(base=64, receptive_field=70),
        "course": dict(base=64, receptive_field=70),
        "small": dict(base=16, receptive_field=70),
    },
}


def field_names(kind: str) -> list[str]:
    """Names of the config fields of ``kind``."""
    return [f.name for f in fields(CONFIGS[kind])]


def make_config(kind: str, values: dict[str, Any]) -> Any:
    """Build the config dataclass of ``kind`` from a dict, rejecting unknown keys."""
    check_choice("model kind", kind, tuple(CONFIGS))
    valid = field_names(kind)
    unknown = sorted(set(values) - set(valid))
    if unknown:
        raise CellP2PError(
            f"unknown {kind} option(s) {', '.join(unknown)}; valid options: {', '.join(valid)}"
        )
    return CONFIGS[kind](**values)


def config_dict(config: Any) -> dict[str, Any]:
    """``dataclasses.asdict`` of a model config."""
    return dataclasses.asdict(config)
