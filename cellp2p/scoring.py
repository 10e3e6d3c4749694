"""One scoring function for training validation, ``evaluate`` and ``compare``, and one table of
metric directions."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from cellp2p.errors import CellP2PError
from cellp2p.instances import (
    WATERSHED_KEYS,
    default_params,
    grow_labels,
    looks_dense,
    mean_average_precision,
    watershed_instances,
)
from cellp2p.metrics import (
    DEFAULT_THRESHOLDS,
    average_precision,
    check_labels,
    check_same_shape,
    detect_kind,
    dice_iou,
    mae,
    pixel_error,
    psnr,
    rand_info_scores,
    segments_from_binary,
    ssim,
    thin_boundaries,
)
from cellp2p.outputs import THRESHOLD, foreground_prob

# Metrics where a smaller value is better; every other scored metric: larger is better.
LOWER_IS_BETTER = frozenset({"pixel_error", "mae", "seg_pixel_error", "rand_error_dense"})
# Reported beside the scores but not a quality (the threshold a best score was found at).
NOT_RANKED = frozenset({"v_rand_threshold", "v_info_threshold"})
# The costly segmentation scores (a 10-threshold ISBI sweep, watersheds): 70 % of a validation
# of 5 ISBI slices. Training computes them where they are used (score_outputs ``full``).
OBJECT_SCORES = ("v_rand", "v_info", "ap_50", "ap_75", "ap_mean", "rand_error_dense")


def is_object_score(metric: str) -> bool:
    """Whether ``metric`` (``val_`` prefix or not) is one of :data:`OBJECT_SCORES` or part."""
    name = metric.removeprefix("val_")
    return any(name == m or name.startswith(f"{m}_") for m in OBJECT_SCORES)


def lower_is_better(metric: str) -> bool:
    """Whether a smaller value of ``metric`` (with or without a ``val_`` prefix) is better."""
    return metric.removeprefix("val_") in LOWER_IS_BETTER


def is_improvement(metric: str, new: float, old: float | None) -> bool:
    """Whether ``new`` beats ``old`` (None: nothing to beat) on ``metric``."""
    if old is None:
        return True
    return new < old if lower_is_better(metric) else new > old


def _segment_slice(
    p: np.ndarray,
    t: np.ndarray,
    kind: str,
    target_is_labels: bool,
    post: dict | None = None,
    objects: bool = True,
) -> dict:
    """All segmentation metrics of one slice (see evaluate_arrays), without the
    :data:`OBJECT_SCORES` unless ``objects``; ``_sweep``: the V scores of each threshold (the
    stack-level choice is made over the slices, :func:`_stack_isbi`)."""
    fg = p > THRESHOLD if kind == "prob" else p > 0
    t_fg = t > 0
    row: dict[str, Any] = {"pixel_error": pixel_error(fg, t_fg)}
    row.update(dice_iou(fg.astype(np.uint8), t_fg.astype(np.uint8), num_classes=2))
    if not objects:
        return row
    gt_seg = check_labels(t, "target") if target_is_labels else segments_from_binary(t_fg)
    if kind == "prob":
        cands = [(th, thin_boundaries(segments_from_binary(p > th))) for th in DEFAULT_THRESHOLDS]
    elif kind == "mask":
        cands = [(0.5, thin_boundaries(segments_from_binary(fg)))]
    else:
        cands = [(0.5, thin_boundaries(check_labels(p, "prediction")))]
    row["_sweep"] = [(float(th), rand_info_scores(seg, gt_seg)) for th, seg in cands]
    dense = not target_is_labels and looks_dense(t_fg)
    pred_inst = _instances(p, kind, fg, post, dense)
    row["ap_50"] = average_precision(pred_inst, gt_seg, 0.5)
    row["ap_75"] = average_precision(pred_inst, gt_seg, 0.75)
    row["ap_mean"] = mean_average_precision(pred_inst, gt_seg)  # DSB 2018, IoU 0.5:0.05:0.95
    if dense:  # membranes: the cells grown over them, as connectomics scores a partition
        row["rand_error_dense"] = 1.0 - rand_info_scores(grow_labels(pred_inst), gt_seg)["v_rand"]
    return row


def _instances(
    p: np.ndarray, kind: str, fg: np.ndarray, post: dict | None, dense: bool
) -> np.ndarray:
    """The instances AP scores: labels as given, a mask's components, or the seeded watershed
    of a probability map (``post``'s parameters, else the defaults; dense for membranes)."""
    if kind == "labels":
        return check_labels(p, "prediction")
    if kind == "mask" or (post or {}).get("method") == "components":
        return segments_from_binary(fg)
    par = {k: v for k, v in (post or default_params(dense)).items() if k in WATERSHED_KEYS}
    return watershed_instances(p, dense=bool((post or {}).get("dense", dense)), **par)


_V_PARTS = {
    "v_rand": ("v_rand_split", "v_rand_merge"),
    "v_info": ("v_info_split", "v_info_merge"),
}


def _stack_isbi(rows: list[dict]) -> None:
    """ISBI scores at stack level, in place: one threshold for the whole stack (the best mean
    V over the slices, first on ties) for V_rand and V_info each, as the challenge's script;
    the best threshold of each slice alone stays as ``v_rand_best`` / ``v_info_best`` (an
    optimistic extra)."""
    sweeps = [r.pop("_sweep") for r in rows if "_sweep" in r]
    if not sweeps:
        return
    for v, (split, merge) in _V_PARTS.items():
        means = [np.mean([sw[i][1][v] for sw in sweeps]) for i in range(len(sweeps[0]))]
        i = int(np.argmax(means))  # the first of equal bests
        for r, sw in zip(rows, sweeps, strict=True):
            thr, sc = sw[i]
            r.update({v: sc[v], split: sc[split], merge: sc[merge], f"{v}_threshold": thr})
            r[f"{v}_best"] = max(x[1][v] for x in sw)


def _default_data_range(target: np.ndarray) -> float:
    """Integer targets: full dtype range; float targets: max - min of the whole stack."""
    if target.dtype == bool:
        return 1.0
    if np.issubdtype(target.dtype, np.integer):
        info = np.iinfo(target.dtype)
        return float(info.max) - float(info.min)
    rng = float(np.max(target)) - float(np.min(target))
    if not rng > 0 or not math.isfinite(rng):
        raise CellP2PError("evaluate: target is constant or non-finite; pass data_range explicitly")
    return rng


def evaluate_arrays(
    pred: np.ndarray,
    target: np.ndarray,
    task: str = "segment",
    *,
    kind: str = "auto",
    data_range: float | None = None,
    slice_ids: Sequence[int] | None = None,
    num_classes: int = 2,
    postprocessing: dict | None = None,
    objects: bool = True,
) -> dict:
    """Per-slice and mean metrics of a (Z, Y, X) prediction stack against its target stack.

    ``segment``: ``pred`` is a cell-interior probability map, a binary mask or instance labels
    (``kind`` = "prob" | "mask" | "labels"; "auto": bool, 0/1 floats or at most two values ->
    mask, other floats in [0, 1] -> prob, otherwise labels; scale 8-bit probability maps to
    [0, 1] first); ``target`` is binary (> 0 = interior) or instance labels (more than two
    values). Per slice: pixel_error and dice/iou of classes 0 (boundary) and
    1 (interior) at prob > 0.5 (> 0 for masks/labels); the ISBI scores at stack level
    (:func:`_stack_isbi`: one threshold of the 0.0-0.9 sweep for the whole stack, as the
    challenge's script; ``v_rand_best`` / ``v_info_best``: each slice at its own best, an
    optimistic extra; masks are one proposal at 0.5; label predictions are thinned and used
    as segments); ap_50 / ap_75 / ap_mean (DSB 2018, IoU 0.5:0.05:0.95, one-to-one) of the
    instances: labels as given, a mask's components, a probability map's seeded watershed
    (``postprocessing``, else the defaults; dense for membrane targets, which also get
    ``rand_error_dense``: 1 − V_rand of the cells grown over the membranes).
    ``objects`` False: without those :data:`OBJECT_SCORES` (training's frequent evaluations).
    ``kind`` "classes": ``pred`` and ``target`` are class indices (0 … ``num_classes`` - 1):
    pixel_error and dice/iou per class.
    ``translate``: mae, psnr, ssim with ``data_range`` (default: the target dtype's range for
    integers, else target max - min over the stack).
    Returns {"task", "per_slice": [{"slice": id, metric: value}], "mean": {metric: value}} of
    plain Python numbers; psnr may be inf (identical slices), and so may its mean.
    """
    if task not in ("segment", "translate"):
        raise CellP2PError(f"evaluate: task must be 'segment' or 'translate', got {task!r}")
    pred, target, ids = _stacks(pred, target, slice_ids)
    if task == "translate":
        rng = _default_data_range(target) if data_range is None else float(data_range)
        scores = [_translate_slice(p, t, rng) for p, t in zip(pred, target, strict=True)]
    elif kind == "classes":
        scores = [_classes_slice(p, t, num_classes) for p, t in zip(pred, target, strict=True)]
    else:
        kind = _segment_kind(pred, kind)
        target_is_labels = target.dtype != bool and np.unique(target).size > 2
        scores = [
            _segment_slice(p, t, kind, target_is_labels, postprocessing, objects)
            for p, t in zip(pred, target, strict=True)
        ]
        _stack_isbi(scores)
    rows = [{"slice": sid, **row} for sid, row in zip(ids, scores, strict=True)]
    keys = [k for k in rows[0] if k != "slice"] if rows else []
    mean = {k: float(np.mean([r[k] for r in rows])) for k in keys}
    return {"task": task, "per_slice": rows, "mean": mean}


def _stacks(
    pred: np.ndarray, target: np.ndarray, slice_ids: Sequence[int] | None
) -> tuple[np.ndarray, np.ndarray, list[int]]:
    """Prediction and target as (Z, Y, X) stacks of one shape, and one slice id per slice."""
    pred, target = np.asarray(pred), np.asarray(target)
    if pred.ndim == 2:
        pred, target = pred[None], target[None]  # a single slice is a stack of one
    check_same_shape(pred, target, "evaluate")
    if pred.ndim != 3:  # pragma: no cover - callers pass single-channel stacks
        raise CellP2PError(f"evaluate: expected (Z, Y, X) stacks, got shape {pred.shape}")
    ids = list(range(pred.shape[0])) if slice_ids is None else [int(i) for i in slice_ids]
    if len(ids) != pred.shape[0]:
        raise CellP2PError(f"evaluate: {len(ids)} slice ids for a stack of {pred.shape[0]} slices")
    return pred, target, ids


def _segment_kind(pred: np.ndarray, kind: str) -> str:
    """The prediction kind (``auto`` detected), checked against the values."""
    if kind == "auto":
        kind = detect_kind(pred)
    if kind not in ("prob", "mask", "labels"):
        raise CellP2PError(f"evaluate: kind must be auto, prob, mask or labels, got {kind!r}")
    if kind == "prob" and (pred.min() < 0 or pred.max() > 1):
        raise CellP2PError("evaluate: kind='prob' needs values in [0, 1]")
    return kind


def _classes_slice(p: np.ndarray, t: np.ndarray, num_classes: int) -> dict:
    """Pixel error and per-class dice/iou of one slice of class indices."""
    return {"pixel_error": pixel_error(p, t), **dice_iou(p, t, num_classes)}


def _translate_slice(p: np.ndarray, t: np.ndarray, data_range: float) -> dict:
    """MAE, PSNR and SSIM of one image slice."""
    return {"mae": mae(p, t), "psnr": psnr(p, t, data_range), "ssim": ssim(p, t, data_range)}


def score_probabilities(
    prob: np.ndarray,
    target: np.ndarray,
    slice_ids: Sequence[int] | None = None,
    objects: bool = True,
) -> dict:
    """:func:`evaluate_arrays` of foreground probabilities (Z, Y, X), clipped to [0, 1].

    The clip only removes float error (a softmax or a blend may overshoot 1 by an ulp).
    """
    prob = np.clip(np.asarray(prob), 0.0, 1.0)
    return evaluate_arrays(
        prob, target, "segment", kind="prob", slice_ids=slice_ids, objects=objects
    )


def score_prediction(
    pred: np.ndarray, target: np.ndarray, task: str, slice_ids: Sequence[int] | None = None
) -> dict:
    """A run's outputs against the truth: foreground probabilities (segment) or images."""
    if task == "segment":
        return score_probabilities(pred, target, slice_ids)
    return evaluate_arrays(pred, target, "translate", slice_ids=slice_ids)


def score_outputs(
    pred: np.ndarray,
    target: np.ndarray,
    target_kind: str,
    classes: Sequence[int] = (),
    objects: np.ndarray | None = None,
    full: bool = True,
) -> dict[str, float]:
    """Mean scores of network outputs against training targets, as training validation logs them.

    ``pred``: (N, C, Y, X) in [0, 1] (:func:`cellp2p.outputs.to_unit`); ``target``: (N, 1, Y, X)
    0/1 (binary), class indices (multiclass) or (N, C, Y, X) images in [0, 1]. The same
    :func:`evaluate_arrays` that ``evaluate`` and ``compare`` use, so a prediction written by
    ``predict`` and scored by ``evaluate`` gives the numbers training logged. ``objects``: the
    instance labels (N, Y, X) of a run trained from instances: ap_50 / ap_75 / ap_mean of the
    default watershed (three classes: with P(boundary)) against them are added. ``full``
    False: without the :data:`OBJECT_SCORES`.
    """
    if target_kind == "binary":
        prob = np.stack([foreground_prob(p, target_kind) for p in pred])
        result = score_probabilities(prob, target[:, 0], objects=full)
    elif target_kind == "multiclass":
        result = evaluate_arrays(
            pred.argmax(1),
            target[:, 0].astype(np.int64),
            "segment",
            kind="classes",
            num_classes=max(len(classes), pred.shape[1]),
        )
    else:  # every channel of every slice scored as one image in [0, 1]
        flat = np.clip(pred, 0, 1).reshape(-1, *pred.shape[-2:])
        result = evaluate_arrays(
            flat, target.reshape(-1, *target.shape[-2:]), "translate", data_range=1.0
        )
    mean = result["mean"]
    if objects is not None and full:
        mean.update(instance_scores(pred, objects, boundary=target_kind == "multiclass"))
    return mean


def instance_scores(
    pred: np.ndarray, objects: np.ndarray, boundary: bool, post: dict | None = None
) -> dict[str, float]:
    """Mean ap_50, ap_75 and ap_mean of the watershed instances of network outputs (N, C, Y, X)
    against instance labels (N, Y, X); ``post``: the parameters (None: the defaults)."""
    from cellp2p.outputs import instance_labels

    post = post or {"method": "watershed", "boundary": boundary, **default_params(False)}
    kind = "multiclass" if boundary else "binary"
    rows = []
    for p, gt in zip(pred, objects, strict=True):
        inst = instance_labels(p, kind, post)
        rows.append(
            (
                average_precision(inst, gt, 0.5),
                average_precision(inst, gt, 0.75),
                mean_average_precision(inst, gt),
            )
        )
    a50, a75, am = np.mean(rows, axis=0) if rows else (0.0, 0.0, 0.0)
    return {"ap_50": float(a50), "ap_75": float(a75), "ap_mean": float(am)}


def _fmt(v: Any) -> str:
    """Format one table cell."""
    if isinstance(v, float):
        return "inf" if math.isinf(v) else f"{v:.4f}"
    return str(v)


def format_table(result: dict) -> str:
    """Plain-text table of an evaluate_arrays result: one row per slice and a final mean row."""
    rows = result.get("per_slice", [])
    keys: list[str] = []
    for r in rows:
        keys.extend(k for k in r if k != "slice" and k not in keys)
    keys.extend(k for k in result.get("mean", {}) if k not in keys)
    header = ["slice", *keys]
    body = [[_fmt(r.get("slice", "")), *(_fmt(r.get(k, "")) for k in keys)] for r in rows]
    body.append(["mean", *(_fmt(result.get("mean", {}).get(k, "")) for k in keys)])
    widths = [max(len(h), *(len(line[i]) for line in body)) for i, h in enumerate(header)]
    lines = ["  ".join(h.rjust(w) for h, w in zip(header, widths, strict=True))]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(c.rjust(w) for c, w in zip(line, widths, strict=True)) for line in body]
    return "\n".join(lines)
