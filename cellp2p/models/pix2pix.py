"""pix2pix generator (U-Net with 4×4 stride-2 convs) and PatchGAN discriminator.

Layer for layer this is the reference pytorch-CycleGAN-and-pix2pix ``unet_256`` /
``NLayerDiscriminator`` / ``PixelDiscriminator`` (same parameter counts), written with the
shared blocks of :mod:`cellp2p.models.blocks`:

* encoder level ``i``: ``ContractingBlock(n_convs=1, kernel_size=4, down="conv")`` =
  conv 4×4 s2 → BatchNorm → LeakyReLU(0.2); no norm on the first and the innermost level.
  The skip is the block output (after the LeakyReLU — what the reference's in-place
  LeakyReLU effectively concatenates).
* decoder level ``i``: ``ExpandingBlock(n_convs=0, pre_activation=True, up_norm=True)`` =
  ReLU → up-conv 4×4 s2 → BatchNorm → Dropout(0.5) (3 innermost levels) → concat skip.
* head: ``FeatureMapBlock`` = ReLU → up-conv 4×4 s2 to ``out_channels`` → tanh/sigmoid/none.

Conv biases follow the reference (``use_bias = norm != "batch"``), so ``paper`` is 54,414,080
parameters for 3 → 3 channels.
"""

from __future__ import annotations

import torch
from torch import nn

from cellp2p.errors import CellP2PError
from cellp2p.models.blocks import (
    ContractingBlock,
    ExpandingBlock,
    FeatureMapBlock,
    init_weights,
    pad_to_multiple,
    unpad,
)
from cellp2p.models.config import DiscriminatorConfig, GeneratorConfig

_N_LAYERS = {16: 1, 34: 2, 70: 3, 142: 4, 286: 5}


class Generator(nn.Module):
    """pix2pix U-Net generator; accepts any input size (pads to 2**depth, crops back)."""

    kind = "generator"

    def __init__(self, config: GeneratorConfig | None = None) -> None:
        """Build the network described by ``config`` (defaults: :class:`GeneratorConfig`)."""
        super().__init__()
        cfg = config if config is not None else GeneratorConfig()
        self.config = cfg
        widths = [cfg.base * min(2**i, cfg.max_mult) for i in range(cfg.depth)]
        use_bias = cfg.norm != "batch"
        k = cfg.kernel_size
        self.encoder = nn.ModuleList(
            ContractingBlock(
                cfg.in_channels if i == 0 else widths[i - 1],
                widths[i],
                n_convs=1,
                kernel_size=k,
                padding="same",
                norm="none" if i in (0, cfg.depth - 1) else cfg.norm,
                activation=cfg.activation,
                down="conv",
                bias=use_bias,
            )
            for i in range(cfg.depth)
        )
        decoder = []
        for i in reversed(range(cfg.depth - 1)):
            innermost = i == cfg.depth - 2
            decoder.append(
                ExpandingBlock(
                    widths[i + 1] if innermost else 2 * widths[i + 1],
                    widths[i],
                    widths[i],
                    n_convs=0,
                    padding="same",
                    norm=cfg.norm,
                    activation=cfg.decoder_activation,
                    up=cfg.up,
                    up_kernel=k,
                    resize_mode=cfg.resize_mode,
                    up_norm=True,
                    pre_activation=True,
                    dropout=cfg.dropout if cfg.depth - 2 - i < cfg.n_dropout else 0.0,
                    bias=use_bias,
                )
            )
        self.decoder = nn.ModuleList(decoder)
        self.head = FeatureMapBlock(
            2 * widths[0],
            cfg.out_channels,
            k,
            up=cfg.up,
            resize_mode=cfg.resize_mode,
            pre_activation=cfg.decoder_activation,
        )
        acts = {"tanh": nn.Tanh(), "sigmoid": nn.Sigmoid(), "none": nn.Identity()}
        self.final_activation = acts[cfg.final_activation]
        init_weights(self)

    @property
    def divisor(self) -> int:
        """Input multiple required from callers: 1 (pads to ``2**depth`` internally)."""
        return 1

    def output_size(self, input_size: int) -> int:
        """Output size of one spatial dim: the input size."""
        return input_size

    def valid_input_size(self, size: int) -> int:
        """Every size is valid: identity."""
        return size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Translate ``x`` (N, in, H, W) → (N, out, H, W)."""
        x, pads = pad_to_multiple(x, 2**self.config.depth, self.config.pad_mode)
        skips: list[torch.Tensor] = []
        for block in self.encoder:
            x = block(x)
            skips.append(x)
        skips.pop()  # the innermost output feeds the decoder directly
        for block, skip in zip(self.decoder, reversed(skips), strict=True):
            x = block(x, skip)
        return unpad(self.final_activation(self.head(x)), pads)


class Discriminator(nn.Module):
    """PatchGAN returning a logit map; conditional use takes cat([input, output], dim=1)."""

    kind = "discriminator"

    def __init__(self, config: DiscriminatorConfig | None = None) -> None:
        """Build the network described by ``config`` (defaults: 70×70, 6 input channels)."""
        super().__init__()
        cfg = config if config is not None else DiscriminatorConfig()
        self.config = cfg
        b, act = cfg.base, cfg.activation
        layers: list[nn.Module] = []
        if cfg.receptive_field == 1:  # PixelGAN: 1×1 convs only
            pixel = dict(n_convs=1, kernel_size=1, activation=act, down="none")
            layers.append(ContractingBlock(cfg.in_channels, b, norm="none", **pixel))
            layers.append(ContractingBlock(b, 2 * b, norm=cfg.norm, **pixel))
            layers.append(FeatureMapBlock(2 * b, 1, 1))
        else:
            n_layers = _N_LAYERS[cfg.receptive_field]
            ch = cfg.in_channels
            for n in range(n_layers + 1):
                out = b * min(2**n, cfg.max_mult)
                layers.append(
                    ContractingBlock(
                        ch,
                        out,
                        n_convs=1,
                        kernel_size=4,
                        padding=1,
                        norm="none" if n == 0 else cfg.norm,
                        activation=act,
                        down="conv" if n < n_layers else "none",
                    )
                )
                ch = out
            layers.append(FeatureMapBlock(ch, 1, 4, padding=1))
        self.model = nn.Sequential(*layers)
        init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logit map (N, 1, h, w) for ``x`` (N, in_channels, H, W)."""
        return self.model(x)


def receptive_field(discriminator: nn.Module) -> int:
    """Receptive field (pixels, one side) of a PatchGAN output unit, from its conv layers."""
    if not isinstance(discriminator, Discriminator):
        raise CellP2PError(
            f"receptive_field needs a Discriminator, got {type(discriminator).__name__}"
        )
    rf, jump = 1, 1
    for m in discriminator.modules():
        if isinstance(m, nn.Conv2d):
            k, s, d = m.kernel_size[0], m.stride[0], m.dilation[0]
            rf += d * (k - 1) * jump
            jump *= s
        elif isinstance(m, nn.MaxPool2d):
            rf += (m.kernel_size - 1) * jump  # type: ignore[operator]
            jump *= m.stride  # type: ignore[operator]
    return rf
