"""Applying a trained network to slices and stacks of any size."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn


def forward_full(
    predict: Callable[[torch.Tensor], torch.Tensor], net: nn.Module, x: torch.Tensor
) -> torch.Tensor:
    """Output for the whole (N, C, H, W) input at the input's size.

    Same-padding networks take any size. A valid-convolution U-Net sees a mirror-padded input
    large enough that its (smaller) output covers every input pixel, then is cropped back.
    """
    output_size = getattr(net, "output_size", None)
    H, W = x.shape[-2:]
    if output_size is None or output_size(max(H, W) + 1000) >= max(H, W) + 1000:
        return predict(x)
    sizes = []
    for n in (H, W):
        s = net.valid_input_size(n)
        while output_size(s) < n:
            s = net.valid_input_size(s + net.divisor)
        sizes.append(s)
    (sh, sw) = sizes
    top, left = (sh - H) // 2, (sw - W) // 2
    pads = (left, sw - W - left, top, sh - H - top)
    # Reflection needs the pad smaller than the slice; tiny slices fall back to edge values.
    mode = "reflect" if max(pads) < min(H, W) else "replicate"
    padded = F.pad(x, pads, mode=mode)
    out = predict(padded)
    mh, mw = (sh - out.shape[-2]) // 2, (sw - out.shape[-1]) // 2
    r0, c0 = top - mh, left - mw
    return out[..., r0 : r0 + H, c0 : c0 + W]
