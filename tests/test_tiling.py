"""Tiled passes as pure functions of a forward callable (cellp2p.tiling)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from cellp2p.tiling import (
    dihedral_mean,
    overlap_tile,
    overlap_tile_plan,
    sliding_window,
    tiled_inference,
)

MARGIN = 3


class Cropping(nn.Module):
    """A stand-in valid-convolution network: doubles its input and loses MARGIN px a side."""

    divisor = 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 2 * x[..., MARGIN:-MARGIN, MARGIN:-MARGIN]

    def output_size(self, n: int) -> int:
        return n - 2 * MARGIN

    def valid_input_size(self, n: int) -> int:
        return n


def _image(n: int = 2, h: int = 37, w: int = 53) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return torch.rand((n, 1, h, w), generator=g)


def test_overlap_tile_of_a_pointwise_valid_network_is_exact():
    net, x = Cropping(), _image()
    plan_y, plan_x = overlap_tile_plan(net, 37, 16), overlap_tile_plan(net, 53, 16)
    assert plan_y[:2] == (16 + 2 * MARGIN, 16)  # (input window, output window)
    calls: list[int] = []

    def forward(t: torch.Tensor) -> torch.Tensor:
        calls.append(len(t))
        return net(t)

    out = overlap_tile(forward, x, plan_y, plan_x, batch=5)
    torch.testing.assert_close(out, 2 * x, rtol=0, atol=0)
    assert max(calls) <= 5 and sum(calls) == 2 * 3 * 4  # 2 slices x ceil(37/16) x ceil(53/16)
    # The dispatcher takes the same path for a tile smaller than the slice, and the
    # whole-slice forward (mirror-padded, cropped back) otherwise.
    torch.testing.assert_close(tiled_inference(net, net, x, 16), 2 * x, rtol=0, atol=0)
    torch.testing.assert_close(tiled_inference(net, net, x, None), 2 * x, rtol=0, atol=0)


@pytest.mark.parametrize("overlap", [0.0, 0.25, 0.5])
def test_sliding_window_of_a_pointwise_network_is_the_network(overlap):
    x = _image()
    out = sliding_window(lambda t: 3 * t, x, tile=16, overlap=overlap, batch=4, divisor=4)
    assert out.shape == x.shape
    torch.testing.assert_close(out, 3 * x, rtol=1e-5, atol=1e-6)  # blending identical values


def test_dihedral_mean_undoes_each_transform():
    x = _image(1, 5, 7)  # neither square nor symmetric
    torch.testing.assert_close(dihedral_mean(lambda t: t * 2, x), 2 * x)
    # A transform-dependent function (a roll) is averaged over the 8 symmetries, so it changes.
    rolled = dihedral_mean(lambda t: torch.roll(t, 1, -1), x)
    assert rolled.shape == x.shape and not torch.allclose(rolled, torch.roll(x, 1, -1))
