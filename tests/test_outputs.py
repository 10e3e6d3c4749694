"""The one output mapping (cellp2p.outputs) against hand-computed values."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from cellp2p.errors import CellP2PError
from cellp2p.models import build_model
from cellp2p.normalization import Normalization
from cellp2p.outputs import (
    foreground,
    foreground_prob,
    output_plane,
    output_space,
    resolve_output,
    target_in_space,
    to_output,
    to_unit,
)


def _sig(v: float) -> float:
    return 1 / (1 + math.exp(-v))


RAW = torch.tensor([[[[-3.0, -1.0, 0.0, 0.5, 1.0, 2.0]]]])  # (N, C, Y, X) = (1, 1, 1, 6)


@pytest.mark.parametrize(
    ("space", "kind", "expected"),
    [
        # tanh/linear generators: (G + 1) / 2, clipped
        ("symmetric", "binary", [0.0, 0.0, 0.5, 0.75, 1.0, 1.0]),
        ("symmetric", "image", [0.0, 0.0, 0.5, 0.75, 1.0, 1.0]),
        # sigmoid generators (course preset): already [0, 1], only clipped -- not (G + 1) / 2
        ("unit", "binary", [0.0, 0.0, 0.0, 0.5, 1.0, 1.0]),
        ("unit", "image", [0.0, 0.0, 0.0, 0.5, 1.0, 1.0]),
        # U-Nets: sigmoid of the logits (segmentation), the clipped image (translation)
        ("logits", "binary", [_sig(v) for v in (-3.0, -1.0, 0.0, 0.5, 1.0, 2.0)]),
        ("logits", "image", [0.0, 0.0, 0.0, 0.5, 1.0, 1.0]),
    ],
)
def test_to_unit_per_space(space, kind, expected):
    got = to_unit(RAW, space, kind)
    assert got.dtype == torch.float32
    np.testing.assert_allclose(got[0, 0, 0].numpy(), expected, atol=1e-6)


def test_to_unit_softmax_for_multiclass_logits():
    # Two pixels: logits (0, 0) -> (1/2, 1/2); (log 3, 0) -> (3/4, 1/4).
    logits = torch.tensor([[0.0, math.log(3.0)], [0.0, 0.0]]).reshape(1, 2, 1, 2)  # (N, C, Y, X)
    got = to_unit(logits, "logits", "multiclass")[0, :, 0].numpy()  # (C, X)
    np.testing.assert_allclose(got, [[0.5, 0.75], [0.5, 0.25]], atol=1e-6)


def test_a_sigmoid_generator_is_in_the_unit_space():
    sigmoid = build_model("generator", "small", base=4, depth=2, final_activation="sigmoid")
    tanh = build_model("generator", "small", base=4, depth=2)
    unet = build_model("unet", "small", base=4, depth=2)
    assert (output_space(sigmoid), output_space(tanh), output_space(unet)) == (
        "unit",
        "symmetric",
        "logits",
    )
    sigmoid.eval()
    with torch.no_grad():
        raw = sigmoid(torch.zeros(1, 1, 16, 16) - 1)
    # What the network says is what is shown: no (G + 1) / 2 squeezing into [0.5, 1].
    assert torch.equal(to_unit(raw, output_space(sigmoid), "binary"), raw.clamp(0, 1))
    # Its training target stays in [0, 1]; a tanh generator's is mapped to [-1, 1].
    y = torch.tensor([0.0, 0.25, 1.0])
    assert torch.equal(target_in_space(y, "unit"), y)
    assert torch.equal(target_in_space(y, "symmetric"), torch.tensor([-1.0, -0.5, 1.0]))


def test_a_declared_output_space_wins():
    net = torch.nn.Identity()
    net.output_space = "unit"
    assert output_space(net) == "unit"


def test_foreground_is_strictly_above_the_threshold():
    prob = np.array([[[0.2, 0.5, 0.50001, 0.9]]], np.float32)  # (C, Y, X) = (1, 1, 4)
    assert foreground(prob, "binary").tolist() == [[False, False, True, True]]
    assert foreground(prob, "binary", threshold=0.2).tolist() == [[False, True, True, True]]
    two = np.stack([1 - prob[0], prob[0]])  # softmax-like: interior is the last channel
    assert foreground(two, "binary").tolist() == [[False, False, True, True]]
    np.testing.assert_allclose(foreground_prob(two, "binary"), prob[0])


def test_multiclass_foreground_is_any_class_but_the_first():
    prob = np.array([[[0.6, 0.2, 0.3]], [[0.3, 0.7, 0.3]], [[0.1, 0.1, 0.4]]], np.float32)
    assert foreground(prob, "multiclass").tolist() == [[False, True, True]]
    np.testing.assert_allclose(foreground_prob(prob, "multiclass"), [[0.4, 0.8, 0.7]], atol=1e-6)


def test_to_output_kinds():
    prob = np.array([[[0.1, 0.9, 0.5], [0.8, 0.2, 0.7]]], np.float32)  # (1, 2, 3)
    p = to_output(prob, "prob", target_kind="binary")
    assert p.shape == (2, 3) and p.dtype == np.float32 and p[0, 1] == pytest.approx(0.9)
    mask = to_output(prob, "mask", target_kind="binary")
    assert mask.dtype == np.uint8 and mask.tolist() == [[0, 255, 0], [255, 0, 255]]
    # Instance labels: 4-connected components of p > 0.5, numbered row by row.
    lab = to_output(prob, "labels", target_kind="binary")
    assert lab.dtype == np.uint16 and lab.tolist() == [[0, 1, 0], [2, 0, 3]]
    # Multiclass masks hold the class values of the argmax.
    three = np.array([[[0.7, 0.1]], [[0.2, 0.1]], [[0.1, 0.8]]], np.float32)
    classes = to_output(three, "mask", target_kind="multiclass", classes=[0, 128, 255])
    assert classes.dtype == np.uint8 and classes.tolist() == [[0, 255]]
    # Images go back to the target's dtype and range.
    norm = Normalization(vmin=10.0, vmax=210.0, dtype="uint8")
    unit = np.array([[[0.0, 0.5, 1.0]]], np.float32)
    img = to_output(unit, "image", target_kind="image", target_norm=norm)
    assert img.dtype == np.uint8 and img.tolist() == [[10, 110, 210]]


def test_output_plane_matches_to_output():
    assert output_plane("prob", (4, 5), 1, "binary", [0, 1], None) == ((4, 5), np.float32)
    assert output_plane("prob", (4, 5), 3, "multiclass", [0, 1, 2], None)[0] == (3, 4, 5)
    assert output_plane("mask", (4, 5), 1, "binary", [0, 1], None) == ((4, 5), np.uint8)
    assert output_plane("mask", (4, 5), 3, "multiclass", [0, 1, 300], None)[1] == np.uint16
    assert output_plane("labels", (4, 5), 1, "binary", [0, 1], None) == ((4, 5), np.uint16)
    assert output_plane("image", (4, 5), 1, "image", [], "uint16") == ((4, 5), np.uint16)


def test_resolve_output():
    assert resolve_output("auto", "binary", False) == "prob"
    assert resolve_output("auto", "image", True) == "image"
    with pytest.raises(CellP2PError, match="unknown"):
        resolve_output("png", "binary", False)
    with pytest.raises(CellP2PError, match="segments"):
        resolve_output("image", "binary", False)
    with pytest.raises(CellP2PError, match="translates"):
        resolve_output("mask", "image", True)


def test_a_given_threshold_replaces_the_tuned_one_even_at_one_half():
    from cellp2p.outputs import instance_labels

    prob = np.zeros((1, 16, 32), np.float32)
    prob[0, 4:12, 2:12] = 0.55  # one object at 0.55, the other at 0.9
    prob[0, 4:12, 18:30] = 0.9
    tuned = {"method": "watershed", "threshold": 0.6, "h": 0.0, "min_distance": 0, "min_size": 0}
    assert instance_labels(prob, "binary", tuned).max() == 1  # the tuned 0.6 sees one
    assert instance_labels(prob, "binary", tuned, threshold=0.5).max() == 2  # --threshold 0.5
    mask = to_output(prob, "mask", target_kind="binary", postprocessing=tuned)
    assert mask.max() == 255 and (mask > 0).sum() == 8 * 10 + 8 * 12  # masks: 0.5 by default
