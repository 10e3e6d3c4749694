"""Display scaling and figure writing (cellp2p.figures)."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from cellp2p.figures import display_scale, plot_curves, plot_loss_curves, save_panel


def test_display_scale_stretches_percentiles_to_unit_range():
    img = np.arange(1001, dtype=np.uint16).reshape(7, 143)  # 0 … 1000
    out = display_scale(img)
    assert out.dtype == np.float32 and out.min() == 0.0 and out.max() == 1.0
    # 0.5 / 99.5 percentiles of 0 … 1000 are 5 and 995: 500 maps to (500 - 5) / 990.
    assert out.flat[500] == pytest.approx((500 - 5) / 990, rel=1e-6)
    assert np.all(display_scale(np.full((4, 4), 7.0)) == 0.0)  # constant: no division by zero


def test_display_scale_channels():
    rgb = np.random.default_rng(0).random((3, 8, 9))
    assert display_scale(rgb).shape == (8, 9, 3)  # channel-first RGB → channel-last
    two = np.stack([np.arange(72.0).reshape(8, 9), np.zeros((8, 9))])
    np.testing.assert_array_equal(display_scale(two), display_scale(two[0]))  # first channel


def test_figures_are_written_whole(tmp_path):
    images = [np.zeros((6, 5)), np.ones((1, 6, 7)), np.random.default_rng(0).random((6, 3))]
    save_panel(tmp_path / "s" / "panel.png", images)
    with Image.open(tmp_path / "s" / "panel.png") as im:
        assert im.size == (5 + 4 + 7 + 4 + 3, 6)  # tiles with 4-px gaps
    records = [{"step": 1, "loss": 1.0, "val_dice_1": 0.5}, {"step": 2, "loss": 0.5}]
    plot_curves(tmp_path / "curve.png", records, "run")
    plot_curves(tmp_path / "none.png", [], "run")  # nothing to draw: no file
    out = plot_loss_curves(tmp_path / "cmp.png", ["a", "b"], [records, []])
    assert out == tmp_path / "cmp.png"
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["cmp.png", "curve.png", "s"]  # no temporary files left behind
