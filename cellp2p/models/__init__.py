"""Networks: U-Net baseline, pix2pix generator and PatchGAN discriminator, built from shared blocks.

>>> from cellp2p.models import build_model, count_parameters
>>> unet = build_model("unet", "small")                      # same padding, any input size
>>> g = build_model("generator", "paper", 3, 3)              # 54.41 M parameters
>>> d = build_model("discriminator", "paper", in_channels=6)  # 70×70 PatchGAN, 2.769 M
"""

from __future__ import annotations

from typing import Any

from torch import nn

from cellp2p.errors import CellP2PError
from cellp2p.models.blocks import (
    ContractingBlock,
    ExpandingBlock,
    FeatureMapBlock,
    init_weights,
)
from cellp2p.models.config import (
    CONFIGS,
    PRESETS,
    DiscriminatorConfig,
    GeneratorConfig,
    UNetConfig,
    make_config,
)
from cellp2p.models.pix2pix import Discriminator, Generator, receptive_field
from cellp2p.models.unet import UNet

__all__ = [
    "KINDS",
    "PRESETS",
    "ContractingBlock",
    "Discriminator",
    "DiscriminatorConfig",
    "ExpandingBlock",
    "FeatureMapBlock",
    "Generator",
    "GeneratorConfig",
    "UNet",
    "UNetConfig",
    "build_model",
    "count_parameters",
    "init_weights",
    "model_from_config",
    "receptive_field",
]

KINDS: tuple[str, ...] = tuple(CONFIGS)
_MODELS: dict[str, type[nn.Module]] = {
    "unet": UNet,
    "generator": Generator,
    "discriminator": Discriminator,
}


def _check_kind(kind: str) -> None:
    """Raise CellP2PError for an unknown model kind."""
    if kind not in _MODELS:
        raise CellP2PError(f"unknown model kind {kind!r}; valid choices: {', '.join(KINDS)}")


def model_from_config(kind: str, config: dict[str, Any]) -> nn.Module:
    """Rebuild a network from ``dataclasses.asdict(model.config)``."""
    _check_kind(kind)
    return _MODELS[kind](make_config(kind, dict(config)))


def build_model(
    kind: str,
    preset: str = "small",
    in_channels: int = 1,
    out_channels: int = 1,
    **overrides: Any,
) -> nn.Module:
    """Build a ``unet`` | ``generator`` | ``discriminator`` from a preset plus overrides.

    For ``discriminator``, ``in_channels`` is what it sees (input + output channels when
    conditional) and ``out_channels`` is ignored (the output is a 1-channel logit map).
    """
    _check_kind(kind)
    if preset not in PRESETS[kind]:
        raise CellP2PError(
            f"unknown {kind} preset {preset!r}; valid choices: {', '.join(PRESETS[kind])}"
        )
    values: dict[str, Any] = {**PRESETS[kind][preset], "in_channels": in_channels}
    if kind != "discriminator":
        values["out_channels"] = out_channels
    values.update(overrides)
    return model_from_config(kind, values)


def count_parameters(model: nn.Module) -> int:
    """Total number of parameters (trainable or not)."""
    return sum(p.numel() for p in model.parameters())
