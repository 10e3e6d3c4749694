"""U-Net baseline for segmentation: valid-convolution (classic shape arithmetic) or same-padding.

Two layouts share the same decoder:

* ``classic`` (Ronneberger): a full-resolution conv block, then ``depth`` blocks of
  max-pool → convs; skips are taken before each pooling, the last block is the bottleneck.
* ``course`` (the cell exercise): a 1×1 input projection to ``base`` channels, then ``depth``
  blocks of convs → max-pool, each doubling the channels; skips are the block *inputs* (the
  projection output and the pooled maps), the last pooled map feeds the decoder directly.

With ``padding="same"`` the network pads its input (reflect or zeros) to a multiple of
``2**depth`` and crops the logits back, so any input size works and output size == input size.
With ``padding="valid"`` the output is smaller than the input: see :meth:`UNet.output_size` and
:meth:`UNet.valid_input_size`.
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
from cellp2p.models.config import UNetConfig


def too_small(input_size: int, nearest: int) -> CellP2PError:
    """The error for an input a valid-convolution U-Net (or its export) cannot take."""
    return CellP2PError(
        f"input size {input_size} is too small for this U-Net; the nearest valid size is {nearest}"
    )


class UNet(nn.Module):
    """Configurable U-Net returning raw logits (no final activation)."""

    kind = "unet"

    def __init__(self, config: UNetConfig | None = None) -> None:
        """Build the network described by ``config`` (defaults: :class:`UNetConfig`)."""
        super().__init__()
        cfg = config if config is not None else UNetConfig()
        self.config = cfg
        widths = [cfg.base * 2**i for i in range(cfg.depth + 1)]
        common = dict(
            n_convs=cfg.n_convs,
            kernel_size=cfg.kernel_size,
            padding=cfg.padding,
            norm=cfg.norm,
            dropout=cfg.dropout,
        )
        self.input_projection: FeatureMapBlock | None = None
        stages: list[ContractingBlock] = []
        if cfg.layout == "course":
            self.input_projection = FeatureMapBlock(cfg.in_channels, cfg.base)
            for i in range(cfg.depth):
                stages.append(
                    ContractingBlock(
                        widths[i],
                        widths[i + 1],
                        activation=cfg.activation,
                        down=cfg.down,
                        down_first=False,
                        **common,
                    )
                )
        else:
            stages.append(
                ContractingBlock(
                    cfg.in_channels, widths[0], activation=cfg.activation, down="none", **common
                )
            )
            for i in range(1, cfg.depth + 1):
                stages.append(
                    ContractingBlock(
                        widths[i - 1],
                        widths[i],
                        activation=cfg.activation,
                        down=cfg.down,
                        down_first=True,
                        **common,
                    )
                )
        self.encoder = nn.ModuleList(stages)
        self.decoder = nn.ModuleList(
            ExpandingBlock(
                widths[i + 1],
                widths[i],
                widths[i],
                activation=cfg.decoder_activation,
                up=cfg.up,
                up_kernel=cfg.up_kernel,
                resize_mode=cfg.resize_mode,
                **common,
            )
            for i in reversed(range(cfg.depth))
        )
        self.head = FeatureMapBlock(widths[0], cfg.out_channels)
        init_weights(self)

    @property
    def divisor(self) -> int:
        """Spacing of valid input sizes: 1 for same padding (pads internally), else 2**depth."""
        return 1 if self.config.padding == "same" else 2**self.config.depth

    def _encode(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Run the encoder; return the deepest map and the skips (shallow first)."""
        skips: list[torch.Tensor] = []
        if self.input_projection is not None:
            x = self.input_projection(x)
        for stage in self.encoder:
            skips.append(x)
            x = stage(x)
        # classic: the first "skip" is the raw input (dropped); course: keep the projection.
        skips = skips[1:] if self.input_projection is None else skips
        return x, skips

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits of shape (N, out_channels, H', W'); H'=H, W'=W for same padding."""
        pads = None
        if self.config.padding == "same":
            x, pads = pad_to_multiple(x, 2**self.config.depth, self.config.pad_mode)
        x, skips = self._encode(x)
        for block, skip in zip(self.decoder, reversed(skips), strict=True):
            x = block(x, skip)
        x = self.head(x)
        return unpad(x, pads) if pads is not None else x

    def _trace(self, size: int) -> tuple[int, bool]:
        """Output size for one spatial dim, and whether no layer floored or over-cropped."""
        if self.config.padding == "same":
            return size, True
        exact = True
        if self.input_projection is not None:
            size, _ = self.input_projection.output_size(size)
        sizes: list[int] = []
        for stage in self.encoder:
            sizes.append(size)
            size, ok = stage.output_size(size)
            exact = exact and ok
            if size <= 0:
                return 0, False
        sizes = sizes[1:] if self.input_projection is None else sizes
        for block, skip in zip(self.decoder, reversed(sizes), strict=True):
            size, ok = block.output_size(size, skip)
            exact = exact and ok
            if size <= 0:
                return 0, False
        return self.head.output_size(size)[0], exact

    def output_size(self, input_size: int) -> int:
        """Output size of one spatial dim for ``input_size`` (identity for same padding)."""
        out, _ = self._trace(input_size)
        if out <= 0:
            raise too_small(input_size, self.valid_input_size(input_size))
        return out

    def valid_input_size(self, size: int) -> int:
        """Nearest input size with no flooring in the pools and no over-cropping (ties: larger)."""
        if self.config.padding == "same":
            return size
        for delta in range(0, 64 * self.divisor + 4096):
            for cand in (size + delta, size - delta):
                if cand > 0:
                    out, exact = self._trace(cand)
                    if out > 0 and exact:
                        return cand
        raise CellP2PError(f"no valid input size found near {size} for this U-Net")
