"""Segmentation and translation metrics: pure functions on numpy arrays.

Segmentation follows the ISBI 2012 EM challenge (Arganda-Carreras et al. 2015, Front. Neuroanat.
9:142, and Fiji's ``trainableSegmentation.metrics`` classes that scored it): labels > 0 are cell
interiors, 0 is membrane/boundary. Translation metrics (PSNR, SSIM) use MONAI.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from cellp2p.errors import CellP2PError

IOU_THRESHOLDS: tuple[float, ...] = tuple(round(0.5 + 0.05 * k, 2) for k in range(10))

# The challenge script sweeps 0.0, 0.1, ..., 1.0 with `prob > t`; its last step (0.9999999999999999
# by float accumulation) only keeps pixels at exactly 1.0, so we stop at 0.9.
DEFAULT_THRESHOLDS: tuple[float, ...] = tuple(round(0.1 * k, 1) for k in range(10))

SSIM_WIN = 11  # Wang et al. 2004 / skimage gaussian_weights: sigma 1.5, truncate 3.5 -> 11 taps
SSIM_SIGMA = 1.5

_ISBI_KEYS = (
    "v_rand",
    "v_rand_split",
    "v_rand_merge",
    "v_rand_threshold",
    "v_info",
    "v_info_split",
    "v_info_merge",
    "v_info_threshold",
)


# ---------------------------------------------------------------------------------------------
# pixel and class overlap
# ---------------------------------------------------------------------------------------------


def check_same_shape(a: np.ndarray, b: np.ndarray, what: str) -> None:
    """Raise a user-facing error when two arrays differ in shape."""
    if a.shape != b.shape:
        raise CellP2PError(f"{what}: prediction shape {a.shape} != target shape {b.shape}")


def pixel_error(pred: np.ndarray, target: np.ndarray) -> float:
    """Fraction of pixels where foreground (value > 0) differs between pred and target."""
    pred, target = np.asarray(pred), np.asarray(target)
    check_same_shape(pred, target, "pixel_error")
    if pred.size == 0:
        raise CellP2PError("pixel_error: empty arrays")
    return float(np.count_nonzero((pred > 0) != (target > 0)) / pred.size)


def dice_iou(pred: np.ndarray, target: np.ndarray, num_classes: int = 2) -> dict[str, float]:
    """Per-class Dice and IoU of integer class maps of any shape; a class absent in both is 1.0."""
    pred, target = np.asarray(pred), np.asarray(target)
    check_same_shape(pred, target, "dice_iou")
    out: dict[str, float] = {}
    for c in range(num_classes):
        p, t = pred == c, target == c
        inter = int(np.count_nonzero(p & t))
        total = int(np.count_nonzero(p)) + int(np.count_nonzero(t))
        # Nothing of class c anywhere: no disagreement, so a perfect score rather than 0/0.
        out[f"dice_{c}"] = 1.0 if total == 0 else 2.0 * inter / total
        out[f"iou_{c}"] = 1.0 if total == 0 else inter / (total - inter)
    return out


# ---------------------------------------------------------------------------------------------
# ISBI 2012 foreground-restricted Rand and information scores
# ---------------------------------------------------------------------------------------------


def check_labels(a: np.ndarray, name: str) -> np.ndarray:
    """Return an int64 label image, rejecting non-integer or negative values."""
    a = np.asarray(a)
    if a.dtype == bool:
        return a.astype(np.int64)
    if not np.issubdtype(a.dtype, np.integer) and not (
        np.all(np.isfinite(a)) and np.all(a == np.round(a))
    ):
        raise CellP2PError(f"{name}: label image must hold integer segment ids, got {a.dtype}")
    a = a.astype(np.int64)
    if a.size and a.min() < 0:
        raise CellP2PError(f"{name}: segment ids must be >= 0 (0 = boundary/background)")
    return a


def _counts(values: np.ndarray) -> np.ndarray:
    """Multiplicities of the distinct values of a non-negative int64 array, in any order."""
    if values.size == 0:
        return np.zeros(0, dtype=np.int64)
    if int(values.max()) <= max(8 * values.size, 1 << 20):
        c = np.bincount(values)  # O(n + max) and no sort: the common case of compact ids
        return c[c > 0]
    return np.unique(values, return_counts=True)[1]


def _xlogx_sum(counts: np.ndarray) -> float:
    """Sum of c*log(c) over positive counts (0 log 0 = 0)."""
    c = counts[counts > 0].astype(np.float64)
    return float(np.sum(c * np.log(c)))


def rand_info_scores(proposal: np.ndarray, gt: np.ndarray) -> dict[str, float]:
    """ISBI 2012 foreground-restricted V_rand / V_info (and split/merge parts) of two label images.

    Notation (challenge paper): S = proposal, T = ground truth, p_ij = joint probability that a
    pixel is in proposal segment i and gt segment j, s_i = sum_j p_ij (proposal sizes),
    t_j = sum_i p_ij (gt sizes). Conventions, as Fiji's RandError / VariationOfInformation
    ``foregroundRestricted*`` code that scored the challenge:

    * only pixels with gt > 0 count (the gt's membrane is pruned out; N = their number);
    * proposal pixels labelled 0 inside the gt foreground are each their own singleton segment
      (they add 1/N^2 to both sum p_ij^2 and sum s_i^2, and (1/N) log N to H(S) and H(S,T)),
      so an unassigned pixel is never "correctly grouped" with anything;
    * V_rand = 2 sum p_ij^2 / (sum s_i^2 + sum t_j^2); V_rand_split = sum p_ij^2 / sum t_j^2
      (gt marginal: drops when the proposal splits gt cells); V_rand_merge = sum p_ij^2 /
      sum s_i^2 (proposal marginal: drops when the proposal merges cells). V_rand is the
      harmonic mean of split and merge. Fiji calls merge "precision" and split "recall".
    * V_info = 2 I(S;T) / (H(S) + H(T)); V_info_split = I(S;T) / H(S) (oversegmentation raises
      H(S)); V_info_merge = I(S;T) / H(T) (undersegmentation loses information about T).
      0/0 is taken as 1 (H(S) = 0 means one proposal segment: nothing was split), which makes
      V_info the harmonic mean of split and merge in every case. Fiji's own degenerate-case
      branch differs (it sets the gt-side ratio to 1 and the other to 0 when H(S) = 0).
    * Everything is "higher is better" in [0, 1]; an image without gt foreground scores 1.0.

    Relation to ``skimage.metrics.adapted_rand_error(gt, proposal)`` (ignore_labels=(0,)):
    with P = sum n_ij^2, S2 = sum s_i^2, T2 = sum t_j^2 in pixel counts, skimage counts ordered
    pairs of *distinct* pixels, i.e. it subtracts N from each sum: its ``precision`` =
    (P - N)/(T2 - N) is the analogue of our *split* score and its ``recall`` = (P - N)/(S2 - N)
    of our *merge* score (the names are swapped relative to the challenge's split/merge and to
    Fiji's precision/recall), and its error = 1 - 2(P - N)/(S2 + T2 - 2N) ~ 1 - V_rand.
    skimage also keeps proposal label 0 as one ordinary segment (no singletons) and does no
    boundary thinning; the equalities hold exactly once proposal zeros inside the gt
    foreground are given unique ids (tests/test_metrics.py checks this), and the -N terms
    vanish relative to the sums for segments much larger than one pixel.
    """
    s_lab = check_labels(proposal, "rand_info_scores proposal")
    t_lab = check_labels(gt, "rand_info_scores gt")
    check_same_shape(s_lab, t_lab, "rand_info_scores")
    fg = t_lab > 0
    n = int(np.count_nonzero(fg))
    if n == 0:
        # Nothing to segment: foreground restriction leaves no pixel on which to disagree.
        return dict.fromkeys(
            ("v_rand", "v_rand_split", "v_rand_merge", "v_info", "v_info_split", "v_info_merge"),
            1.0,
        )
    s, t = s_lab[fg], t_lab[fg]
    assigned = s > 0
    n_single = n - int(np.count_nonzero(assigned))
    # Only the count vectors matter: gt sizes t_j, assigned proposal sizes s_i, and the
    # non-zero contingency entries n_ij (a pair id per pixel; no dense table).
    s_a = s[assigned]
    t_j = _counts(t)
    s_i = _counts(s_a)
    n_ij = _counts(t[assigned] * (int(s_a.max(initial=0)) + 1) + s_a)

    # Rand: work in counts (p = count / N); the 1/N^2 factors cancel in every ratio.
    sum_p2 = float(np.sum(n_ij.astype(np.float64) ** 2)) + n_single
    sum_s2 = float(np.sum(s_i.astype(np.float64) ** 2)) + n_single
    sum_t2 = float(np.sum(t_j.astype(np.float64) ** 2))
    rand_split = sum_p2 / sum_t2
    rand_merge = sum_p2 / sum_s2
    v_rand = 2.0 * sum_p2 / (sum_s2 + sum_t2)

    # Entropies from counts: H = log N - sum c log c / N; singletons contribute 1 log 1 = 0.
    log_n = math.log(n)
    h_t = max(log_n - _xlogx_sum(t_j) / n, 0.0)
    h_s = max(log_n - _xlogx_sum(s_i) / n, 0.0)
    h_st = log_n - _xlogx_sum(n_ij) / n
    mi = min(max(h_s + h_t - h_st, 0.0), h_s, h_t)  # clip float noise into the valid range
    eps = 1e-12
    info_split = 1.0 if h_s <= eps else mi / h_s
    info_merge = 1.0 if h_t <= eps else mi / h_t
    v_info = 1.0 if h_s + h_t <= eps else 2.0 * mi / (h_s + h_t)
    return {
        "v_rand": float(v_rand),
        "v_rand_split": float(rand_split),
        "v_rand_merge": float(rand_merge),
        "v_info": float(v_info),
        "v_info_split": float(info_split),
        "v_info_merge": float(info_merge),
    }


def segments_from_binary(mask: np.ndarray) -> np.ndarray:
    """Label the cell interiors (mask > 0) as 4-connected components, as the challenge does."""
    from skimage.measure import label  # lazy: predict imports the metrics, not skimage

    return label(np.asarray(mask) > 0, connectivity=1).astype(np.int32)


def thin_boundaries(labels: np.ndarray) -> np.ndarray:
    """Grow segments into boundary (0) pixels until boundaries are one pixel thin.

    Fiji thins the proposal with a classic 4-connected watershed of the binarised proposal
    (segments are the minima, boundary the plateau). We do the same with skimage: a watershed
    seeded by the segments on a flat image (connectivity 1, ``watershed_line=True``). Segments
    flood the boundary at equal speed, a 1-pixel line (label 0) stays where two different
    segments meet, and boundary with only one segment next to it (spurs, frame edges, or a
    gap inside one segment) is absorbed. Segment ids are kept; an image without segments is
    returned unchanged (all boundary, so every pixel scores as a singleton).
    """
    lab = check_labels(labels, "thin_boundaries")
    if lab.ndim != 2:
        raise CellP2PError(f"thin_boundaries: expected a 2D label image, got shape {lab.shape}")
    if not np.any(lab):
        return lab.astype(np.int32)
    # A flat image: skimage floods equal values first-in-first-out, i.e. by 4-connected distance
    # from the segments, which is how a classic watershed floods the binary plateau.
    flat = np.zeros(lab.shape, dtype=np.uint8)
    from skimage.segmentation import watershed

    return watershed(flat, markers=lab, connectivity=1, watershed_line=True).astype(np.int32)


def detect_kind(pred: np.ndarray) -> str:
    """Guess what a segmentation prediction holds: 'prob', 'mask' or 'labels'.

    bool, two values or fewer (integers, or floats outside [0, 1] such as 0/255), or floats that
    are all 0/1 -> mask; other floats in [0, 1] -> prob; other integer-valued data -> labels.
    """
    if pred.dtype == bool:
        return "mask"
    values = np.unique(pred)
    if np.issubdtype(pred.dtype, np.floating):
        if not np.all(np.isfinite(values)):
            raise CellP2PError("segmentation prediction contains NaN or inf")
        if values[0] >= 0.0 and values[-1] <= 1.0:
            # A two-valued float map in [0, 1] may be a flat probability map; only 0/1 is a mask.
            return "mask" if np.all((values == 0) | (values == 1)) else "prob"
        if values.size > 2 and not np.all(values == np.round(values)):
            raise CellP2PError(
                "segmentation prediction is neither a probability map in [0, 1] nor integer "
                "labels; rescale it to [0, 1] or round it to label ids"
            )
    return "mask" if values.size <= 2 else "labels"


def _gt_segments(gt: np.ndarray) -> np.ndarray:
    """Ground-truth segments: label images (> 2 values) as given, binary masks as components."""
    gt = np.asarray(gt)
    if gt.dtype != bool and np.unique(gt).size > 2:
        return check_labels(gt, "ground truth")
    return segments_from_binary(gt)


def best_isbi_scores(candidates: Sequence[tuple[float, np.ndarray]], gt_seg: np.ndarray) -> dict:
    """Max V_rand and max V_info (with parts and threshold) over (threshold, proposal) pairs."""
    best: dict[str, Any] = {}
    for thr, seg in candidates:
        sc = rand_info_scores(seg, gt_seg)
        # Strict '>' keeps the first (lowest) threshold on ties, as Fiji's sweep does.
        if "v_rand" not in best or sc["v_rand"] > best["v_rand"]:
            best.update(
                v_rand=sc["v_rand"],
                v_rand_split=sc["v_rand_split"],
                v_rand_merge=sc["v_rand_merge"],
                v_rand_threshold=float(thr),
            )
        if "v_info" not in best or sc["v_info"] > best["v_info"]:
            best.update(
                v_info=sc["v_info"],
                v_info_split=sc["v_info_split"],
                v_info_merge=sc["v_info_merge"],
                v_info_threshold=float(thr),
            )
    return {k: best[k] for k in _ISBI_KEYS}


def isbi_scores(
    prob: np.ndarray, gt_binary: np.ndarray, thresholds: Sequence[float] | None = None
) -> dict:
    """ISBI 2012 scores of one slice: best V_rand and best V_info over thresholds, pixel error.

    ``prob`` is the cell-interior probability in [0, 1], or a binary mask (bool, 0/1 floats, or
    at most two values such as 0/255; > 0 is interior) scored once, at threshold 0.5. For each
    threshold t (default 0.0, 0.1, ..., 0.9) the proposal is ``prob > t`` -> 4-connected
    components -> :func:`thin_boundaries`; the gt segments are the 4-connected components of
    ``gt_binary > 0`` (a gt with more than two values is taken as a label image as is).
    V_rand and V_info are maximised independently, as the challenge does, so their thresholds
    may differ. ``pixel_error`` is at ``prob > 0.5``.
    """
    p = np.asarray(prob)
    kind = detect_kind(p)
    if kind == "labels":
        raise CellP2PError(
            "isbi_scores: expected a probability map in [0, 1] or a binary mask, got "
            f"{np.unique(p).size} values in [{p.min():g}, {p.max():g}] (scale 8-bit maps by 1/255)"
        )
    gt = np.asarray(gt_binary)
    check_same_shape(p, gt, "isbi_scores")
    if p.ndim != 2:
        raise CellP2PError(f"isbi_scores: expected 2D slices, got shape {p.shape}")
    if kind == "mask":
        p = (p > 0).astype(np.float32)
        ts: Sequence[float] = (0.5,)
    else:
        ts = DEFAULT_THRESHOLDS if thresholds is None else tuple(thresholds)
        if not ts:
            raise CellP2PError("isbi_scores: thresholds is empty")
    gt_seg = _gt_segments(gt)
    cands = [(t, thin_boundaries(segments_from_binary(p > t))) for t in ts]
    out = best_isbi_scores(cands, gt_seg)
    out["pixel_error"] = pixel_error(p > 0.5, gt > 0)
    return out


# ---------------------------------------------------------------------------------------------
# instance matching
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Matching:
    """A one-to-one matching of predicted and gt instances at one IoU threshold."""

    tp: int
    fp: int
    fn: int
    pairs: tuple[tuple[int, int, float], ...]  # (pred id, gt id, IoU) of the matches

    @property
    def ap(self) -> float:
        """TP / (TP + FP + FN) (DSB 2018's per-threshold "precision"); 1.0 if both are empty."""
        total = self.tp + self.fp + self.fn
        return 1.0 if total == 0 else self.tp / total


def _as_instances(a: np.ndarray, name: str) -> np.ndarray:
    """An int64 label image (bool as 0/1), refusing non-integer or negative ids."""
    a = np.asarray(a)
    whole = a.dtype == bool or np.issubdtype(a.dtype, np.integer)
    if not whole and not (np.all(np.isfinite(a)) and np.all(a == np.round(a))):
        raise CellP2PError(f"{name}: instance labels must be whole ids, got {a.dtype}")
    a = a.astype(np.int64)
    if a.size and a.min() < 0:
        raise CellP2PError(f"{name}: instance ids must be >= 0 (0 = background)")
    return a


def _compact(values: np.ndarray, counts: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """np.unique's (values, inverse) or (values, counts) of non-negative int64s; by bincount
    when the values are small (no sort: 5x faster for label images), else by np.unique."""
    top = int(values.max(initial=0))
    if top > 4 * values.size + (1 << 16):
        return np.unique(values, return_counts=counts, return_inverse=not counts)
    tally = np.bincount(values, minlength=top + 1)
    present = np.flatnonzero(tally)
    if counts:
        return present, tally[present]
    lut = np.zeros(top + 1, dtype=np.int64)
    lut[present] = np.arange(present.size)
    return present, lut[values]


def iou_table(pred: np.ndarray, gt: np.ndarray) -> tuple[np.ndarray, ...]:
    """(pred ids, gt ids, IoU) of every overlapping pair, and the counts (n_pred, n_gt)."""
    p, t = _as_instances(pred, "prediction"), _as_instances(gt, "ground truth")
    if p.shape != t.shape:
        raise CellP2PError(f"instance scores: prediction shape {p.shape} != target {t.shape}")
    p_ids, p_inv = _compact(p.ravel())
    g_ids, g_inv = _compact(t.ravel())
    pairs, inter = _compact(p_inv * g_ids.size + g_inv, counts=True)
    pi, gi = pairs // g_ids.size, pairs % g_ids.size
    keep = (p_ids[pi] != 0) & (g_ids[gi] != 0)
    pi, gi, inter = pi[keep], gi[keep], inter[keep]
    p_area, g_area = np.bincount(p_inv), np.bincount(g_inv)
    iou = inter / (p_area[pi] + g_area[gi] - inter)
    counts = np.array([np.count_nonzero(p_ids), np.count_nonzero(g_ids)])
    return p_ids[pi], g_ids[gi], iou, counts


def _match(table: tuple[np.ndarray, ...], thr: float) -> Matching:
    """Hungarian matching of the pairs with IoU >= thr: most matches, then most summed IoU."""
    p_id, g_id, iou, (n_pred, n_gt) = table
    ok = iou >= thr
    if not ok.any():
        return Matching(0, int(n_pred), int(n_gt), ())
    rows, r = np.unique(p_id[ok], return_inverse=True)
    cols, c = np.unique(g_id[ok], return_inverse=True)
    sub = np.zeros((rows.size, cols.size))
    sub[r, c] = iou[ok]
    # One match outweighs any IoU sum (< 1/2): cellpose's cost, as cellp2p.metrics uses.
    cost = -(sub >= thr).astype(np.float64) - sub / (2.0 * max(min(n_pred, n_gt), 1))
    from scipy.optimize import linear_sum_assignment

    ri, ci = linear_sum_assignment(cost)
    hit = sub[ri, ci] >= thr
    pairs = tuple(
        (int(rows[a]), int(cols[b]), float(sub[a, b]))
        for a, b in zip(ri[hit], ci[hit], strict=True)
    )
    tp = len(pairs)
    return Matching(tp, int(n_pred) - tp, int(n_gt) - tp, pairs)


def match_instances(pred: np.ndarray, gt: np.ndarray, iou_threshold: float = 0.5) -> Matching:
    """One-to-one matching (Hungarian on IoU) of predicted and gt instances (ids > 0).

    A pair may match when IoU >= ``iou_threshold`` (cellpose/stardist; DSB 2018 wrote "> t",
    which differs only on exact ties); the assignment maximises the number of matches, then
    their summed IoU. Above 0.5 a match is unique anyway. TP = matches, FP = unmatched
    predictions, FN = unmatched gt objects.
    """
    if not 0.0 < iou_threshold <= 1.0:
        raise CellP2PError(
            f"instance matching: IoU threshold must be in (0, 1], got {iou_threshold}"
        )
    return _match(iou_table(pred, gt), iou_threshold)


def average_precision(pred: np.ndarray, gt: np.ndarray, iou_threshold: float = 0.5) -> float:
    """TP / (TP + FP + FN) at one IoU threshold (1.0 when both images have no objects)."""
    return match_instances(pred, gt, iou_threshold).ap


def mean_average_precision(
    pred: np.ndarray, gt: np.ndarray, thresholds: Sequence[float] = IOU_THRESHOLDS
) -> float:
    """DSB 2018 score of one image: the mean of :func:`average_precision` over IoU 0.5:0.05:0.95."""
    table = iou_table(pred, gt)
    return float(np.mean([_match(table, float(t)).ap for t in thresholds]))


# ---------------------------------------------------------------------------------------------
# translation
# ---------------------------------------------------------------------------------------------


def _check_2d_pair(pred: np.ndarray, target: np.ndarray, what: str) -> tuple[np.ndarray, ...]:
    """Return float64 copies of two same-shape 2D slices."""
    p = np.asarray(pred, dtype=np.float64)
    t = np.asarray(target, dtype=np.float64)
    check_same_shape(p, t, what)
    if p.ndim != 2:
        raise CellP2PError(f"{what}: expected 2D slices, got shape {p.shape}")
    return p, t


def mae(pred: np.ndarray, target: np.ndarray) -> float:
    """Mean absolute error (in the images' own units)."""
    p = np.asarray(pred, dtype=np.float64)
    t = np.asarray(target, dtype=np.float64)
    check_same_shape(p, t, "mae")
    return float(np.mean(np.abs(p - t)))


def psnr(pred: np.ndarray, target: np.ndarray, data_range: float) -> float:
    """Peak signal-to-noise ratio in dB (MONAI PSNRMetric); identical images give inf."""
    p, t = _check_2d_pair(pred, target, "psnr")
    if data_range <= 0:
        raise CellP2PError(f"psnr: data_range must be > 0, got {data_range}")
    if np.array_equal(p, t):
        return float("inf")  # MSE 0: report inf explicitly rather than rely on log10(0)
    import torch  # lazy: torch + MONAI take seconds to import; segmentation metrics need neither
    from monai.metrics import PSNRMetric

    val = PSNRMetric(max_val=float(data_range))(
        torch.from_numpy(p)[None, None], torch.from_numpy(t)[None, None]
    )
    return float(val.reshape(-1)[0])


def ssim(pred: np.ndarray, target: np.ndarray, data_range: float) -> float:
    """Mean SSIM of a 2D slice: MONAI, gaussian window 11 taps sigma 1.5, k1 0.01, k2 0.03.

    Equals ``skimage.metrics.structural_similarity(pred, target, data_range=..., gaussian_weights=
    True, sigma=1.5, use_sample_covariance=False)`` to ~1e-7: both average over the "valid"
    region only (skimage crops 5 pixels per side after filtering) and use the population
    covariance. skimage's default ``use_sample_covariance=True`` differs slightly (N/(N-1)
    factor, ~1e-5 here). MONAI computes in float32, so inputs are divided by data_range first
    (SSIM is invariant to that joint scaling) to avoid cancellation on 16-bit ranges.
    """
    p, t = _check_2d_pair(pred, target, "ssim")
    if data_range <= 0:
        raise CellP2PError(f"ssim: data_range must be > 0, got {data_range}")
    if min(p.shape) < SSIM_WIN:
        raise CellP2PError(f"ssim: slices must be at least {SSIM_WIN}x{SSIM_WIN}, got {p.shape}")
    import torch  # lazy, see psnr
    from monai.metrics.regression import compute_ssim_and_cs

    ssim_map, _ = compute_ssim_and_cs(
        torch.from_numpy(p / data_range)[None, None],
        torch.from_numpy(t / data_range)[None, None],
        spatial_dims=2,
        kernel_size=[SSIM_WIN, SSIM_WIN],
        kernel_sigma=[SSIM_SIGMA, SSIM_SIGMA],
        data_range=1.0,
    )
    return float(ssim_map.double().mean())
