"""Tiling: plans aligned to the network's pooling grid, mirror padding, and the tiled passes
(whole slice, sliding window, overlap-tile, test-time augmentation) as pure functions of a
forward callable, in the style of MONAI's ``sliding_window_inference``.

Default (chosen by the predictor): the whole slice up to 1024 px a side, else 512 px tiles or
the training crop.

* Same-padding networks (``small`` U-Net, every pix2pix generator): MONAI's
  ``sliding_window_inference`` with Gaussian blending. The slice is first reflect-padded into a
  canvas on which every tile starts at a multiple of the network's divisor (2**depth), with
  the phase of the whole-slice forward: all tiles then share the whole slice's pooling/stride
  grid and differ from it only through the zero padding near their own borders, which the
  Gaussian weights (≈3e-4 at a tile edge) suppress. Slices smaller than the tile along an axis
  take one window spanning that axis; the network pads it (reflect) to its divisor.
* Valid-convolution U-Nets (``paper``, ``course``): the U-Net paper's overlap-tile strategy.
  Each output tile is computed from an input window holding its real context (mirror padding
  only at the slice border), and tiles are aligned to the pooling grid of the whole-slice
  :func:`forward_full`, so for translation-equivariant networks tiled and whole-slice results
  agree to float precision and no blending is needed.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from cellp2p.errors import CellP2PError

WHOLE_SLICE_MAX = 1024  # slices up to this size (both sides) go through the network in one piece
DEFAULT_TILE = 512  # the tile of larger slices (or the training crop, if larger)
MIN_TILE = 16

# The 8 symmetries of the square: (quarter turns, horizontal flip first).
DIHEDRAL = tuple((k, flip) for flip in (False, True) for k in range(4))


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


def is_valid_convolution(net: nn.Module) -> bool:
    """True for networks whose output is smaller than their input (valid-convolution U-Nets)."""
    output_size = getattr(net, "output_size", None)
    if output_size is None:
        return False
    try:
        return output_size(2048) < 2048
    except CellP2PError:
        return True


def tiles_exactly(net: nn.Module) -> bool:
    """Whether tiles of ``net`` can reproduce its whole-slice output.

    Bilinear upsampling with ``align_corners=True`` (the ``course`` U-Net) samples at
    positions that depend on the size of the feature map, so a tile's output differs from the
    same pixels of the whole slice (by up to 0.03 for a trained network): such networks are
    run on whole slices only.
    """
    return not any(
        isinstance(m, nn.Upsample) and m.mode != "nearest" and m.align_corners
        for m in net.modules()
    )


def grid_period(net: nn.Module) -> int:
    """2**depth (the same-padding U-Net reports ``divisor`` 1: it pads itself, but pools)."""
    depth = getattr(getattr(net, "config", None), "depth", None)
    if isinstance(depth, int) and depth > 0:
        return 2**depth
    return max(1, int(getattr(net, "divisor", 1)))


def reflect_pad(x: torch.Tensor, pads: tuple[int, int, int, int]) -> torch.Tensor:
    """Mirror-pad (left, right, top, bottom), reflecting repeatedly when a pad exceeds the size."""
    while any(pads):
        h, w = x.shape[-2:]
        step = (min(pads[0], w - 1), min(pads[1], w - 1), min(pads[2], h - 1), min(pads[3], h - 1))
        if not any(step):  # a 1-pixel axis cannot be reflected: repeat the edge
            return F.pad(x, pads, mode="replicate")
        x = F.pad(x, step, mode="reflect")
        pads = tuple(p - s for p, s in zip(pads, step, strict=True))  # type: ignore[assignment]
    return x


def sliding_plan(n: int, tile: int, overlap: float, divisor: int) -> tuple[int, int, int, int]:
    """(window, interval, pad before, pad after) along one axis for same-padding networks."""
    if n <= tile:
        return n, n, 0, 0
    interval = max(1, int(tile * (1 - overlap)))
    before = 0
    if divisor > 1 and interval >= divisor:
        interval = interval // divisor * divisor
        # The network pads an input centred up to a multiple of its divisor: choose the canvas
        # offset so that every tile's grid coincides with the grid of the whole-slice forward.
        whole = ((-n) % divisor) // 2
        inner = ((-tile) % divisor) // 2
        before = (whole - inner) % divisor
    steps = math.ceil(max(0, before + n - tile) / interval)
    after = tile + steps * interval - before - n
    return tile, interval, before, after


def monai_overlap(window: int, interval: int) -> float:
    """The overlap for which MONAI's ``int(window * (1 - overlap))`` is exactly ``interval``."""
    if interval >= window:
        return 0.0
    return 1.0 - (interval + 0.5) / window


def valid_input(net: Any, n: int) -> int:
    """Smallest valid input size (as :func:`forward_full` picks it) whose output covers ``n``."""
    s = net.valid_input_size(n)
    while net.output_size(s) < n:
        s = net.valid_input_size(s + net.divisor)
    return s


def overlap_tile_plan(net: Any, n: int, tile: int) -> tuple[int, int, int, int, int, int]:
    """(input window, output window, stride, pad before, pad after, output offset) along one axis.

    The pad before is congruent (mod the divisor) to the one :func:`forward_full` uses for the
    whole slice, so the pooling grid of every tile is the whole-slice grid.
    """
    s_in = valid_input(net, min(n, tile))
    s_out = net.output_size(s_in)
    margin = (s_in - s_out) // 2  # output pixel j sees input pixel j + margin at the centre
    d = max(1, int(net.divisor))
    whole_before = (valid_input(net, n) - n) // 2
    before = margin + (whole_before - margin) % d
    offset = before - margin  # where the slice's first pixel lands in the output canvas
    stride = s_out // d * d if s_out >= d else s_out
    count = 1 if offset + n <= s_out else math.ceil((offset + n - s_out) / stride) + 1
    after = (count - 1) * stride + s_in - before - n
    return s_in, s_out, stride, before, after, offset


def check_tiling(tile: int | None, overlap: float, batch_size: int) -> None:
    """Option values for tiling."""
    if tile is not None and tile < MIN_TILE:
        raise CellP2PError(f"--tile {tile}: use at least {MIN_TILE} pixels (or leave it out)")
    if not 0 <= overlap < 1:
        raise CellP2PError(f"--overlap {overlap}: give a fraction in [0, 1), e.g. 0.25")
    if batch_size < 1:
        raise CellP2PError(f"--batch-size {batch_size}: must be at least 1")


# -- passes: pure functions of a forward callable (MONAI's sliding_window_inference style) ------

Forward = Callable[[torch.Tensor], torch.Tensor]
Plan = Callable[[int, int], tuple[int, int, int, int, int, int]]


def tiled_inference(
    forward: Forward,
    net: nn.Module,
    x: torch.Tensor,
    tile: int | None,
    overlap: float = 0.25,
    batch: int = 4,
    plan: Plan | None = None,
) -> torch.Tensor:
    """Outputs of ``forward`` for a batch (N, C, H, W), at its size, tiled as ``tile`` asks.

    ``tile`` None or at least the slice: whole-slice forwards of ``batch`` slices; otherwise
    the overlap-tile pass for valid-convolution networks, the sliding window for the others.
    ``plan`` (n, tile) → :func:`overlap_tile_plan` of ``net``, e.g. a cached one.
    """
    H, W = x.shape[-2:]
    if tile is None or max(H, W) <= tile:
        return torch.cat([forward_full(forward, net, c) for c in x.split(batch)], dim=0)
    if is_valid_convolution(net):
        plan = plan or (lambda n, t: overlap_tile_plan(net, n, t))
        return overlap_tile(forward, x, plan(H, tile), plan(W, tile), batch)
    return sliding_window(forward, x, tile, overlap, batch, grid_period(net))


def sliding_window(
    forward: Forward, x: torch.Tensor, tile: int, overlap: float, batch: int, divisor: int
) -> torch.Tensor:
    """Same-padding networks: MONAI's Gaussian-blended sliding window on the aligned canvas."""
    from monai.inferers import sliding_window_inference

    H, W = x.shape[-2:]
    (wy, iy, ty, by), (wx, ix, tx, bx) = (sliding_plan(n, tile, overlap, divisor) for n in (H, W))
    canvas = reflect_pad(x, (tx, bx, ty, by))
    out = sliding_window_inference(
        canvas,
        roi_size=(wy, wx),
        sw_batch_size=batch,
        predictor=forward,
        overlap=(monai_overlap(wy, iy), monai_overlap(wx, ix)),
        mode="gaussian",
    )
    return out[..., ty : ty + H, tx : tx + W]


def overlap_tile(
    forward: Forward,
    x: torch.Tensor,
    plan_y: tuple[int, ...],
    plan_x: tuple[int, ...],
    batch: int,
) -> torch.Tensor:
    """Valid-convolution networks: the U-Net paper's overlap-tile pass (no blending needed).

    ``plan_y`` / ``plan_x``: :func:`overlap_tile_plan` along each axis.
    """
    N, _, H, W = x.shape
    iy, oy, sy, by, ay, offy = plan_y
    ix, ox, sx, bx, ax, offx = plan_x
    canvas = reflect_pad(x, (bx, ax, by, ay))
    ys = range(0, canvas.shape[-2] - iy + 1, sy)
    xs = range(0, canvas.shape[-1] - ix + 1, sx)
    size = ((len(ys) - 1) * sy + oy, (len(xs) - 1) * sx + ox)
    windows = [(i, y, z) for i in range(N) for y in ys for z in xs]
    chunks = [windows[k : k + batch] for k in range(0, len(windows), batch)]
    out = torch.empty(0)
    for n, chunk in enumerate(chunks):
        pred = forward(torch.stack([canvas[i, :, y : y + iy, z : z + ix] for i, y, z in chunk]))
        if n == 0:  # channel count, dtype and device are the network's
            out = pred.new_empty((N, pred.shape[1], *size))
        for (i, y, z), p in zip(chunk, pred, strict=True):
            out[i, :, y : y + oy, z : z + ox] = p
    return out[..., offy : offy + H, offx : offx + W]


def dihedral_mean(fn: Forward, x: torch.Tensor) -> torch.Tensor:
    """Test-time augmentation: ``fn`` on the 8 flips/rotations of ``x``, each undone, averaged.

    Averaged as probabilities (what ``fn`` returns), not logits.
    """

    def undone(k: int, flip: bool) -> torch.Tensor:
        t = torch.flip(x, (-1,)) if flip else x
        y = torch.rot90(fn(torch.rot90(t, k, (-2, -1))), -k, (-2, -1))
        return torch.flip(y, (-1,)) if flip else y

    out = undone(*DIHEDRAL[0]).clone()
    for k, flip in DIHEDRAL[1:]:
        out += undone(k, flip)
    return out / len(DIHEDRAL)
