"""The network as it leaves cellp2p: normalised input in [0, 1], the mapped output in [0, 1].

:class:`ExportedNet` wraps a trained U-Net or generator with what cellp2p does around it at
prediction time: the [0, 1] → [-1, 1] input mapping, the padding of a same-padding network to a
multiple of ``2**depth`` (centred, reflect or zeros as the network itself pads, replicate for
inputs too small to reflect), the crop back and the output mapping (sigmoid / softmax / clip, or
``(tanh + 1) / 2``). It is written for TorchScript (``torch.jit.script`` around the traced
network) and depends on torch alone: its source goes verbatim into bioimage.io packages.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class ExportedNet(nn.Module):
    """Normalised (N, C, H, W) in [0, 1] → the network's output mapped to [0, 1]."""

    def __init__(
        self, core: nn.Module, multiple: int, reflect: bool, space: str, target_kind: str
    ) -> None:
        """``multiple``: 2**depth for same padding, 1 for valid convolutions (no padding)."""
        super().__init__()
        self.core = core
        self.multiple = int(multiple)
        self.reflect = bool(reflect)
        self.space = str(space)
        self.target_kind = str(target_kind)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Map, pad, run the network, crop back and map its output to [0, 1]."""
        x = x * 2 - 1
        h, w = x.shape[-2], x.shape[-1]
        m = self.multiple
        ph, pw = (m - h % m) % m, (m - w % m) % m
        top, left = ph // 2, pw // 2
        if ph > 0 or pw > 0:
            pads = [left, pw - left, top, ph - top]
            if not self.reflect:
                x = F.pad(x, pads)
            elif max(left, pw - left) < w and max(top, ph - top) < h:
                x = F.pad(x, pads, mode="reflect")
            else:
                x = F.pad(x, pads, mode="replicate")
        out = self.core(x).float()
        if ph > 0 or pw > 0:
            out = out[:, :, top : top + h, left : left + w]
        return self.to_unit(out)

    def to_unit(self, out: torch.Tensor) -> torch.Tensor:
        """Raw network output → [0, 1] (as :func:`cellp2p.outputs.to_unit`)."""
        if self.space == "symmetric":
            return ((out + 1) / 2).clamp(0, 1)
        if self.space == "unit" or self.target_kind == "image":
            return out.clamp(0, 1)
        if self.target_kind == "binary":
            return torch.sigmoid(out)
        return torch.softmax(out, dim=1)
