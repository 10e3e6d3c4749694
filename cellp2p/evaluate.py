"""``cellp2p evaluate``: score a prediction stack against its labels (or target images) on disk."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from cellp2p import io
from cellp2p.checks import check_finite
from cellp2p.errors import CellP2PError
from cellp2p.fsutil import check_output, write_json
from cellp2p.scoring import evaluate_arrays, format_table
from cellp2p.slices import parse_slices


def _single_channel(data: np.ndarray, path: Path) -> np.ndarray:
    """(Z, Y, X) from a stack; a (Z, 1, Y, X) stack (one output channel) is squeezed."""
    if data.ndim == 4 and data.shape[1] == 1:
        return data[:, 0]
    if data.ndim != 3:
        raise CellP2PError(
            f"{path}: has {data.shape[1]} channels; evaluate scores one channel: save "
            "the prediction as a mask/labels (cellp2p predict --output mask) or split the channels"
        )
    return data


def load_pair(
    pred_path: str | Path, labels_path: str | Path, slices: str | Sequence[int] | None = None
) -> tuple[np.ndarray, np.ndarray, list[int]]:
    """Read prediction and labels as (Z, Y, X) arrays of equal shape, plus the labels' slice ids.

    ``slices`` (``"25-29"`` or a list) selects slices of the labels; the prediction may hold
    either the whole stack (the same slices are taken from it) or exactly the selected slices
    (as ``cellp2p predict --slices`` writes them).
    """
    pred_path, labels_path = Path(pred_path), Path(labels_path)
    with io.open_stack(pred_path) as p_reader, io.open_stack(labels_path) as l_reader:
        n_pred, n_lab = len(p_reader), len(l_reader)
        ids = parse_slices(slices, n_lab)
        if ids is None:
            ids = list(range(n_lab))
            if n_pred != n_lab:
                raise CellP2PError(
                    f"{pred_path}: has {n_pred} slices but {labels_path} has {n_lab}; "
                    "give stacks with one prediction per label slice, or pass --slices to "
                    "say which label slices the prediction covers"
                )
            pred_ids = ids
        elif n_pred == n_lab:
            pred_ids = ids
        elif n_pred == len(ids):
            pred_ids = list(range(n_pred))  # the prediction holds just the selected slices
        else:
            raise CellP2PError(
                f"{pred_path}: has {n_pred} slices, but --slices selects {len(ids)} of the "
                f"{n_lab} in {labels_path}; give a prediction of the whole stack or of exactly "
                "the selected slices"
            )
        if tuple(p_reader.shape[-2:]) != tuple(l_reader.shape[-2:]):
            raise CellP2PError(
                f"{pred_path}: slices are {tuple(p_reader.shape[-2:])} but {labels_path} slices "
                f"are {tuple(l_reader.shape[-2:])} (Y, X); predict on images of the labels' size"
            )
        pred = _single_channel(p_reader.read(pred_ids), pred_path)
        target = _single_channel(l_reader.read(ids), labels_path)
    return pred, target, ids


def _check_json_path(path: str | Path, force: bool, inputs: Sequence[str | Path | None]) -> None:
    """Where --json goes must be writable before anything is computed; an existing file is
    replaced only with ``force``, and never one of the inputs. Nothing is created yet."""
    path = Path(path)
    if path.suffix.lower() != ".json":
        raise CellP2PError(f"--json {path}: give a file name ending in .json")
    for src in filter(None, inputs):
        if path.resolve() == Path(src).resolve():
            raise CellP2PError(f"--json {path}: is an input of this command; choose another name")
    check_output(path, force, create=False)


def _check_label_ids(target: np.ndarray, path: str | Path) -> None:
    """Segmentation labels are 0 (background) and positive ids."""
    if np.issubdtype(target.dtype, np.signedinteger) and target.size and target.min() < 0:
        raise CellP2PError(
            f"{path}: holds negative label ids (min {int(target.min())}); segmentation labels "
            "are 0 (background) and positive ids: relabel them (e.g. Fiji: Process > Math > Abs)"
        )


def evaluate(
    pred_path: str | Path,
    labels_path: str | Path | None,
    *,
    ab: str | Path | None = None,
    direction: str = "AtoB",
    slices: str | Sequence[int] | None = None,
    task: str = "segment",
    json_path: str | Path | None = None,
    kind: str = "auto",
    data_range: float | None = None,
    force: bool = False,
    echo: Callable[[str], Any] | None = print,
) -> dict:
    """Score a prediction stack against labels (segment) or target images (translate).

    Segmentation: pixel error, Dice/IoU per class, ISBI 2012 V_rand/V_info (best over thresholds
    for a probability map) with split/merge parts, AP at IoU 0.5/0.75. Translation: MAE, PSNR,
    SSIM. Prints the per-slice table (via ``echo``), writes ``json_path`` when given (strict JSON:
    an infinite PSNR, i.e. identical slices, is written as null) and returns the result of
    :func:`cellp2p.scoring.evaluate_arrays` with the file names added.
    ``ab`` (instead of labels): PRED is a folder of generated PNGs, scored against the target
    halves of these AB images (:func:`cellp2p.ab.evaluate_ab`).
    """
    if ab is not None or labels_path is None:
        return _evaluate_ab(pred_path, labels_path, ab, direction, json_path, force, echo)
    if task not in ("segment", "translate"):
        raise CellP2PError(f"--task {task!r} unknown; use segment or translate")
    if data_range is not None and not (math.isfinite(data_range) and data_range > 0):
        raise CellP2PError(
            f"--data-range {data_range}: give the positive intensity range of the target "
            "(e.g. 255 for 8-bit images), or leave it out"
        )
    if json_path is not None:
        _check_json_path(json_path, force, (pred_path, labels_path))
    pred, target, ids = load_pair(pred_path, labels_path, slices)
    check_finite(pred, pred_path)
    check_finite(target, labels_path)
    if task == "segment":
        _check_label_ids(target, labels_path)
        _check_label_ids(pred, pred_path)
    result = evaluate_arrays(pred, target, task, kind=kind, data_range=data_range, slice_ids=ids)
    result = {"prediction": str(pred_path), "labels": str(labels_path), **result}
    if json_path is not None:  # first: a failed write must not follow a printed table
        write_json(json_path, result)
    if echo is not None:
        echo(format_table(result))
    return result


def _evaluate_ab(
    pred_path: str | Path,
    labels_path: str | Path | None,
    ab: str | Path | None,
    direction: str,
    json_path: str | Path | None,
    force: bool,
    echo: Callable[[str], Any] | None,
) -> dict:
    """``evaluate OUT/ --ab DIR``: generated images against the other half of each AB image."""
    from cellp2p.ab import evaluate_ab

    if ab is None:
        raise CellP2PError(
            "give the ground truth: --labels STACK, or --ab DIR for images generated from AB images"
        )
    if labels_path is not None:
        raise CellP2PError("give either --labels or --ab, not both")
    if json_path is not None:
        _check_json_path(json_path, force, (pred_path, ab))
    return evaluate_ab(pred_path, ab, direction=direction, json_path=json_path, echo=echo)
