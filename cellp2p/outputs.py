"""The one mapping from network outputs to what cellp2p shows, scores and writes.

A network works in one of three output spaces:

* ``logits`` — U-Nets (segmentation: sigmoid / softmax of the logits; translation: the image in
  [0, 1], the range targets were clipped to at training);
* ``symmetric`` — tanh (and linear) pix2pix generators, whose targets are mapped to [-1, 1];
* ``unit`` — sigmoid generators (the ``course`` preset), whose targets stay in [0, 1].

:func:`to_unit` turns any of them into [0, 1] (probabilities or a normalised image); training
validation, ``predict``, ``compare`` and export all call it. :func:`to_output` turns one slice of
[0, 1] values into a written output kind (probabilities, mask, instance labels, image).
Foreground is ``p > threshold`` everywhere.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from cellp2p.errors import CellP2PError

OUTPUTS = ("auto", "prob", "mask", "labels", "image")
TARGET_KINDS = ("binary", "multiclass", "image")
THRESHOLD = 0.5


def to_model_range(x: torch.Tensor) -> torch.Tensor:
    """[0, 1] → [-1, 1], the range every network input is given in."""
    return x * 2 - 1


def output_space(net: nn.Module) -> str:
    """``logits`` (U-Net), ``unit`` (sigmoid generator) or ``symmetric`` (tanh/linear generator).

    A network may declare its space itself (``net.output_space``), as exported models do.
    """
    declared = getattr(net, "output_space", None)
    if isinstance(declared, str):
        return declared
    if getattr(net, "kind", None) != "generator":
        return "logits"
    return "unit" if net.config.final_activation == "sigmoid" else "symmetric"


def target_in_space(y: torch.Tensor, space: str) -> torch.Tensor:
    """A [0, 1] training target in the network's output space (what its loss compares with)."""
    return to_model_range(y) if space == "symmetric" else y


def to_unit(out: torch.Tensor, space: str, target_kind: str) -> torch.Tensor:
    """Raw network output → float32 in [0, 1]: probabilities, or a normalised image."""
    out = out.float()
    if space == "symmetric":
        return ((out + 1) / 2).clamp_(0, 1)
    if space == "unit":
        return out.clamp(0, 1)
    if target_kind == "binary":
        return torch.sigmoid(out)
    if target_kind == "multiclass":
        return torch.softmax(out, dim=1)
    return out.clamp(0, 1)


def foreground(prob: np.ndarray, target_kind: str, threshold: float = THRESHOLD) -> np.ndarray:
    """Foreground mask (Y, X) of one slice (C, Y, X) in [0, 1].

    Binary: ``p > threshold`` on the (last) foreground channel; multiclass: the argmax is not
    class 0 (the smallest label value).
    """
    if target_kind == "multiclass":
        return prob.argmax(0) != 0
    return prob[-1] > threshold


def foreground_prob(prob: np.ndarray, target_kind: str) -> np.ndarray:
    """Foreground probability (Y, X) of one slice (C, Y, X): what segmentation scores use."""
    if target_kind == "multiclass":
        return 1.0 - prob[0]  # any class but the first
    return prob[-1]


def mask_dtype(classes: Sequence[int]) -> np.dtype:
    """The smallest dtype holding every class value (int32 for negative values)."""
    if min(classes, default=0) < 0:
        return np.dtype(np.int32)
    top = max(classes, default=255)
    return np.dtype(np.uint8 if top <= 255 else np.uint16 if top <= 65535 else np.uint32)


def resolve_output(output: str, target_kind: str, has_target_norm: bool) -> str:
    """``auto`` → prob (segmentation) or image (translation); refuse kinds that do not fit."""
    if output not in OUTPUTS:
        raise CellP2PError(f"--output {output!r} unknown; use one of {', '.join(OUTPUTS[1:])}")
    if output == "auto":
        return "image" if target_kind == "image" else "prob"
    if output == "image" and not has_target_norm:
        raise CellP2PError(
            "--output image is for translation models; this model segments: use prob, "
            "mask or labels"
        )
    if output in ("mask", "labels") and target_kind == "image":
        raise CellP2PError(
            f"--output {output} needs a segmentation model; this one translates "
            "(--task translate): use image or prob"
        )
    return output


def output_plane(
    output: str,
    yx: Sequence[int],
    out_channels: int,
    target_kind: str,
    classes: Sequence[int],
    target_dtype: str | None,
) -> tuple[tuple[int, ...], np.dtype]:
    """Shape and dtype of one output slice of size ``yx`` (what :func:`to_output` returns)."""
    yx = tuple(int(n) for n in yx[-2:])
    if output in ("prob", "image"):
        shape = yx if out_channels == 1 else (out_channels, *yx)
        if output == "prob" or target_dtype is None:
            return shape, np.dtype(np.float32)
        dtype = np.dtype(target_dtype)
        return shape, dtype if dtype.kind in "uif" else np.dtype(np.float32)
    if output == "mask":
        binary = target_kind != "multiclass"
        return yx, np.dtype(np.uint8) if binary else mask_dtype(classes)
    return yx, np.dtype(np.uint16)


def to_output(
    prob: np.ndarray,
    output: str,
    *,
    target_kind: str,
    classes: Sequence[int] = (),
    target_norm: Any = None,
    threshold: float | None = None,
    postprocessing: dict[str, Any] | None = None,
) -> np.ndarray:
    """One slice of [0, 1] values (C, Y, X) → the output kind.

    ``prob``: float32 as is (the channel axis dropped when there is one); ``mask``: uint8 0/255
    (``p > threshold``, 0.5 when None), or the class values of the argmax for multiclass;
    ``labels``: instances, uint16 (uint32 beyond 65535 objects), numbered per slice
    (:func:`instance_labels`); ``image``: the target's dtype and range.
    """
    prob = np.asarray(prob, dtype=np.float32)
    if prob.ndim == 2:
        prob = prob[None]
    if output == "prob":
        return prob[0] if prob.shape[0] == 1 else prob
    if output == "image":
        return target_norm.invert(prob[0] if prob.shape[0] == 1 else prob)
    if output == "mask":
        if target_kind == "multiclass":
            return np.asarray(classes, dtype=mask_dtype(classes))[prob.argmax(0)]
        t = THRESHOLD if threshold is None else threshold
        return foreground(prob, target_kind, t).astype(np.uint8) * np.uint8(255)
    return instance_labels(prob, target_kind, postprocessing, threshold)


def components(mask: np.ndarray) -> np.ndarray:
    """4-connected components of a mask, uint16 (uint32 beyond 65535 objects)."""
    from skimage.measure import label

    # 4-connectivity: cells separated by a one-pixel diagonal membrane stay apart.
    labels, count = label(mask, connectivity=1, return_num=True)
    return labels.astype(np.uint16 if count <= 65535 else np.uint32)


def instance_labels(
    prob: np.ndarray,
    target_kind: str,
    postprocessing: dict[str, Any] | None = None,
    threshold: float | None = None,
) -> np.ndarray:
    """Instance labels of one slice (C, Y, X) in [0, 1].

    ``postprocessing`` (a checkpoint's, :func:`cellp2p.instances.postprocessing_record`): a
    seeded watershed (:func:`cellp2p.instances.watershed_instances`) on P(object), with
    P(boundary) for three-class boundary models; absent or ``method`` "components": the
    4-connected components of the foreground at ``threshold`` (0.5 when None). A given
    ``threshold`` replaces the tuned one.
    """
    from cellp2p.instances import WATERSHED_KEYS, watershed_instances

    prob = np.asarray(prob, dtype=np.float32)
    prob = prob[None] if prob.ndim == 2 else prob
    par = dict(postprocessing or {})
    if par.get("method", "components") != "watershed":
        return components(
            foreground(prob, target_kind, THRESHOLD if threshold is None else threshold)
        )
    kw = {k: par[k] for k in WATERSHED_KEYS if par.get(k) is not None}
    if threshold is not None:
        kw["threshold"] = float(threshold)
    dense = bool(par.get("dense", False))
    if par.get("boundary") and target_kind == "multiclass" and prob.shape[0] == 3:
        return watershed_instances(1.0 - prob[0], prob[2], dense=dense, **kw)
    return watershed_instances(foreground_prob(prob, target_kind), dense=dense, **kw)
