"""Objects, not pixels: instance labels in, targets that teach separation, seeded watershed out.

Pure numpy functions on 2D slices (stacks slice by slice where noted): labels in
(:func:`label_kind`, :func:`relabel`, :func:`objects_from_binary`), targets
(:func:`boundary_targets`, :func:`separated_foreground`, :func:`border_weight_map`), instances
out (:func:`watershed_instances`, :func:`tune_postprocessing`) and scores
(:func:`match_instances`, :func:`average_precision`, :func:`mean_average_precision`).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from cellp2p.errors import CellP2PError
from cellp2p.metrics import (  # noqa: F401 - re-exported: the instance scores live in metrics
    IOU_THRESHOLDS,
    Matching,
    average_precision,
    iou_table,
    match_instances,
    mean_average_precision,
)

# Post-processing defaults and tuning grids, nuclei and dense membranes (sweeps: the notes).
NUCLEI_DEFAULTS: dict[str, Any] = {"threshold": 0.5, "min_distance": 4, "h": 0.5, "min_size": 16}
# Seeds at p > 0.5 untuned: a higher seed threshold suits saturated maps but finds no seed at all
# in a network that is not yet confident (tuning picks it where it helps).
DENSE_DEFAULTS: dict[str, Any] = {"threshold": 0.5, "min_distance": 0, "h": 0.0, "min_size": 25}
NUCLEI_GRID: dict[str, tuple] = {
    "threshold": (0.5, 0.3, 0.4, 0.6, 0.7, 0.8),
    "min_distance": (4, 2),
    "h": (0.5, 0.0, 0.25, 1.0, 2.0),
    "min_size": (16, 0, 8, 32),
}
DENSE_GRID: dict[str, tuple] = {
    "threshold": (0.8, 0.5, 0.6, 0.7, 0.9, 0.95),
    "min_distance": (0,),
    "h": (0.0, 4.0, 8.0),
    "min_size": (25, 0, 100),
}
_FOUR = np.array([[0, 1, 0], [1, 1, 1], [0, 1, 0]], dtype=bool)  # 4-connectivity


# -- labels in ----------------------------------------------------------------------------------


def label_dtype(count: int) -> np.dtype:
    """uint16 for up to 65,535 objects, uint32 beyond (as ``--output labels`` writes them)."""
    if count > np.iinfo(np.uint32).max:
        raise CellP2PError(f"{count} objects do not fit uint32 label images; split the image")
    return np.dtype(np.uint16 if count <= np.iinfo(np.uint16).max else np.uint32)


def label_kind(labels: np.ndarray, *, dtype: Any = np.uint32, name: str = "labels") -> str:
    """``"binary"`` (bool or at most two values) or ``"instances"`` (more), checked.

    Instance ids must be whole and >= 0 (0 = background), and no more than ``dtype`` can
    number; each problem is one :class:`CellP2PError`. Binary images are not checked here.
    """
    a = np.asarray(labels)
    if a.dtype == bool:
        return "binary"
    if not (np.issubdtype(a.dtype, np.integer) or np.issubdtype(a.dtype, np.floating)):
        raise CellP2PError(f"{name}: dtype {a.dtype} is not a label image; save it as uint16")
    if np.issubdtype(a.dtype, np.floating) and not np.all(np.isfinite(a)):
        raise CellP2PError(f"{name}: NaN or inf in the labels; label images hold whole ids")
    values = np.unique(a)
    if values.size <= 2:
        return "binary"
    frac = values[values != np.round(values)]
    if frac.size:
        raise CellP2PError(
            f"{name}: non-integer label value {frac[0]:g} ({a.dtype}); save instance ids "
            "as an integer image (uint16), or round them"
        )
    if values[0] < 0:
        raise CellP2PError(
            f"{name}: negative label id {values[0]:g}; instance ids are >= 0 (0 = background): "
            "relabel them (e.g. skimage.segmentation.relabel_sequential)"
        )
    count = int(values.size - (values[0] == 0))
    top = int(np.iinfo(dtype).max)
    if count > top:
        raise CellP2PError(
            f"{name}: {count} instances do not fit {np.dtype(dtype).name} (at most {top}); "
            "use uint32 labels or split the image into smaller tiles"
        )
    return "instances"


def relabel(labels: np.ndarray) -> np.ndarray:
    """Ids renumbered 1..N in order of value (0 stays background), uint16 or uint32."""
    a = np.asarray(labels)
    ids, inverse = np.unique(a, return_inverse=True)
    if ids.size and ids[0] != 0:
        inverse = inverse + 1  # no background: every id moves up one
    count = int(ids.size - (ids.size > 0 and ids[0] == 0))
    return inverse.reshape(a.shape).astype(label_dtype(count))


def objects_from_binary(mask: np.ndarray) -> np.ndarray:
    """Objects of a binary mask (> 0 = cell interior): 4-connected components, per 2D slice."""
    from scipy import ndimage as ndi  # lazy, as skimage: predict --output prob needs neither

    lab = _per_slice(lambda s: ndi.label(s > 0, structure=_FOUR)[0], mask, np.uint32)
    return lab.astype(label_dtype(int(lab.max(initial=0))))


def looks_dense(labels: np.ndarray) -> bool:
    """Membrane data (cells fill the slice, ISBI-style): binary labels, >= 50% foreground."""
    a = np.asarray(labels)
    return label_kind(a) == "binary" and a.size > 0 and float(np.mean(a > 0)) >= 0.5


def looks_like_ids(labels: np.ndarray, max_classes: int = 16) -> bool:
    """Whether a label image of more than two values holds instance ids rather than classes:
    :meth:`cellp2p.crops.LabelScan.looks_like_ids` (the one rule) on an array in memory."""
    from cellp2p.crops import scan_labels

    a = np.asarray(labels)
    a = a.reshape(-1, *a.shape[-2:])
    return scan_labels(a, "labels", max_classes).looks_like_ids(max_classes)


def instance_target(
    labels: np.ndarray, mode: str = "unet", name: str = "labels", scheme: str = "separated"
) -> tuple[str, list[int], np.ndarray]:
    """(target kind, classes, training target (N, 1, Y, X) float32) of instance labels.

    ``scheme`` (``--instance-target``; :meth:`cellp2p.config.TrainConfig.instance_scheme`):
    "boundary" (U-Net only, its default: measured best with the border weights,
    benchmarks/RESULTS.md): three classes (0 background, 1 interior, 2 boundary:
    :func:`boundary_targets`); "separated" (pix2pix's): the binary :func:`separated_foreground`.
    Bad ids raise.
    """
    from cellp2p.config import INSTANCE_TARGETS

    label_kind(labels, name=name)
    if scheme == "boundary" and mode == "pix2pix":
        raise CellP2PError(
            "--instance-target boundary makes classes, which pix2pix does not learn: use "
            "--instance-target separated"
        )
    if scheme not in INSTANCE_TARGETS:
        raise CellP2PError(f"instance target {scheme!r} unknown; use {', '.join(INSTANCE_TARGETS)}")
    if scheme == "separated":
        return "binary", [0, 1], separated_foreground(labels).astype(np.float32)[:, None]
    return "multiclass", [0, 1, 2], boundary_targets(labels).astype(np.float32)[:, None]


def weight_channel(labels: np.ndarray, instances: bool, cfg: Any) -> np.ndarray | None:
    """The border weight map (N, 1, Y, X) to train with, or None.

    U-Net only: on when ``cfg.border_weights``; unset (None): on for instance labels
    (measured best), off for binary ones; ``cfg.border_w0``, ``cfg.border_sigma`` and
    ``cfg.border_class_balance`` (the class-balancing term w_c) as in the U-Net paper by
    default. Objects: the instance ids, or the 4-connected components of binary labels (the
    membranes between cells weigh most).
    """
    flag = cfg.border_weights
    if not (instances if flag is None else flag) or cfg.mode != "unet":
        return None
    objects = labels if instances else objects_from_binary(labels)
    return border_weight_map(
        objects, cfg.border_w0, cfg.border_sigma, class_balance=cfg.border_class_balance
    )[:, None]


def validation_objects(labels: np.ndarray, instances: bool) -> np.ndarray:
    """The objects validation scores against: the instance ids, or the binary mask's
    4-connected components."""
    return np.asarray(labels) if instances else objects_from_binary(labels)


# -- training targets ---------------------------------------------------------------------------


def _per_slice(fn: Callable[[np.ndarray], np.ndarray], a: np.ndarray, dtype: Any) -> np.ndarray:
    """``fn`` applied to each 2D slice of ``a`` (2D or more), stacked back."""
    a = np.asarray(a)
    if a.ndim < 2:
        raise CellP2PError(f"expected a 2D slice or a stack of slices, got shape {a.shape}")
    flat = a.reshape(-1, *a.shape[-2:])
    return np.stack([fn(s).astype(dtype) for s in flat]).reshape(a.shape)


def _edge(lab: np.ndarray, with_background: bool) -> np.ndarray:
    """Object pixels with a 4-neighbour of another id (another object, or also background)."""
    pad = np.pad(lab, 1, mode="edge")  # the frame is no edge
    out = np.zeros(lab.shape, dtype=bool)
    for nb in (pad[:-2, 1:-1], pad[2:, 1:-1], pad[1:-1, :-2], pad[1:-1, 2:]):
        out |= (nb != lab) & ((nb > 0) | with_background)
    return out & (lab > 0)


def boundary_targets(instances: np.ndarray) -> np.ndarray:
    """Three classes, uint8: 0 background, 1 interior, 2 boundary (per 2D slice).

    The boundary is one pixel wide inside each object: the object pixels with a 4-neighbour
    that is background or another object, so two touching objects are parted by 2 px of
    boundary and an object meets background through 1 px. The image frame is not a boundary.
    Objects under 3 px across are all boundary (no interior).
    """

    def one(lab: np.ndarray) -> np.ndarray:
        """The classes of one slice."""
        return np.where(_edge(lab, True), 2, (lab > 0).astype(np.uint8))

    return _per_slice(one, instances, np.uint8)


def separated_foreground(instances: np.ndarray) -> np.ndarray:
    """Foreground minus the pixels that touch another object (per 2D slice), bool.

    Touching objects then have a 2 px gap between them: the binary target that, with
    :func:`border_weight_map`, teaches a network to part them.
    """
    return _per_slice(lambda lab: (lab > 0) & ~_edge(lab, False), instances, bool)


def border_reach(w0: float, sigma: float, tol: float = 1e-3) -> int:
    """Distance R beyond which w0·exp(−(d1 + d2)² / 2σ²) < tol, since d1 + d2 > R there."""
    if w0 <= tol:
        return 0
    return int(np.ceil(sigma * np.sqrt(2.0 * np.log(w0 / tol))))


def _two_nearest(lab: np.ndarray, reach: int) -> tuple[np.ndarray, np.ndarray]:
    """Distances to the nearest and second-nearest object, exact up to ``reach`` (else inf).

    One EDT per object on its bounding box grown by ``reach`` (exact there; beyond, farther
    than ``reach``): cost sum over objects of (height + 2R)(width + 2R), not objects x pixels.
    """
    from scipy import ndimage as ndi

    d1 = np.full(lab.shape, np.inf, dtype=np.float32)
    d2 = np.full(lab.shape, np.inf, dtype=np.float32)
    for i, box in enumerate(ndi.find_objects(lab), start=1):
        if box is None:
            continue
        win = tuple(
            slice(max(s.start - reach, 0), min(s.stop + reach, n))
            for s, n in zip(box, lab.shape, strict=True)
        )
        d = ndi.distance_transform_edt(lab[win] != i).astype(np.float32)
        a, b = d1[win], d2[win]
        b[...] = np.minimum(b, np.maximum(a, d))
        a[...] = np.minimum(a, d)
    return d1, d2


def class_weights(foreground: np.ndarray) -> np.ndarray:
    """w_c: N / (K · N_c) for the K classes present (mean 1 over the slice), float32."""
    fg = np.asarray(foreground, dtype=bool)
    n_fg = int(np.count_nonzero(fg))
    n_bg = fg.size - n_fg
    if n_fg == 0 or n_bg == 0:
        return np.ones(fg.shape, dtype=np.float32)
    return np.where(fg, fg.size / (2.0 * n_fg), fg.size / (2.0 * n_bg)).astype(np.float32)


def border_weight_map(
    instances: np.ndarray,
    w0: float = 10.0,
    sigma: float = 5.0,
    class_balance: bool = True,
) -> np.ndarray:
    """The U-Net paper's w(x) = w_c(x) + w0·exp(−(d1(x) + d2(x))² / 2σ²), float32, per slice.

    On :func:`separated_foreground` (the binary target to train with it); d1/d2: distances to
    the nearest and second-nearest object; the border term on background pixels only, as in
    the paper (eq. 2); w_c: :func:`class_weights` (1 with ``class_balance=False``). Terms under
    1e-3 are dropped (:func:`border_reach`, 22 px for the defaults), bounding the cost.
    """
    if sigma <= 0 or w0 < 0:
        raise CellP2PError(f"border weights: need sigma > 0 and w0 >= 0, got {sigma}, {w0}")
    reach = border_reach(w0, sigma)

    def one(lab: np.ndarray) -> np.ndarray:
        """The weights of one slice."""
        objects = relabel(np.where(separated_foreground(lab), lab, 0))
        fg = objects > 0
        w = class_weights(fg) if class_balance else np.ones(lab.shape, dtype=np.float32)
        if reach == 0 or objects.max() < 2:
            return w
        d1, d2 = _two_nearest(objects, reach)
        near = ~fg & np.isfinite(d2)
        w[near] += w0 * np.exp(-((d1[near] + d2[near]) ** 2) / (2.0 * sigma**2))
        return w

    return _per_slice(one, np.asarray(instances), np.float32)


# -- instances out ------------------------------------------------------------------------------


def _check_prob(
    p: np.ndarray | None, name: str, shape: tuple[int, ...] | None = None
) -> np.ndarray | None:
    """A finite 2D float32 map in [0, 1] (float error clipped), or None."""
    if p is None:
        return None
    a = np.asarray(p, dtype=np.float32)
    if a.ndim != 2 or (shape is not None and a.shape != shape):
        raise CellP2PError(f"watershed: {name} must be one 2D slice like prob_fg, got {a.shape}")
    if not np.all(np.isfinite(a)) or a.min() < -1e-3 or a.max() > 1 + 1e-3:
        raise CellP2PError(f"watershed: {name} must be probabilities in [0, 1] (8-bit: / 255)")
    return np.clip(a, 0.0, 1.0)


def _memo(cache: dict | None, key: tuple, make: Callable[[], Any]) -> Any:
    """``make()``, remembered in ``cache`` under ``key`` (no cache: computed each time)."""
    if cache is not None and key not in cache:
        cache[key] = make()
    return make() if cache is None else cache[key]


def _distance_seeds(
    region: np.ndarray, dist: np.ndarray, min_distance: int, h: float, cache: dict | None = None
) -> np.ndarray:
    """Seed labels in ``region``: distance maxima that rise ``h`` above their saddle.

    ``h`` > 0: the h-maxima of the distance transform (a plateau stays one seed), of which
    two closer than ``min_distance`` px keep only the one with the highest peak (skimage's
    peak_local_max; 0: no such filter). A component of the region left without a seed
    (lower than h) is a seed itself, and with ``h`` = 0 every component is one seed.
    """
    from scipy import ndimage as ndi
    from skimage.feature import peak_local_max
    from skimage.morphology import h_maxima

    comps, n = ndi.label(region, structure=_FOUR)
    if h <= 0:
        return comps
    eight = np.ones((3, 3))
    tops, count = _memo(cache, ("tops", h), lambda: ndi.label(h_maxima(dist, h), eight))
    if min_distance > 0 and count:
        # Over the whole slice (3x faster than per component): a component whose only peak
        # was suppressed by a neighbour's is seeded below as an orphan.
        peaks = peak_local_max(
            dist, min_distance=int(min_distance), threshold_abs=0.5, exclude_border=False
        )
        keep = np.zeros(count + 1, dtype=bool)
        keep[tops[tuple(peaks.T)]] = True
        keep[0] = False
        tops, count = ndi.label(keep[tops], structure=eight)
    seeded = np.zeros(n + 1, dtype=bool)
    seeded[comps[tops > 0]] = True
    orphans = ~seeded[comps] & region
    return np.where(orphans, comps + count, tops)


def _flood(
    prob_fg: np.ndarray,
    prob_boundary: np.ndarray | None,
    params: tuple[float, int, float],
    dense: bool,
    cache: dict | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """The watershed before small objects go: labels, the elevation and the mask it used.

    ``params``: (threshold, min_distance, h); ``cache``: one dict per slice, reused across
    calls that share the threshold (the tuning grid).
    """
    from scipy import ndimage as ndi
    from skimage.segmentation import watershed

    threshold, min_distance, h = params

    def base() -> tuple[np.ndarray, ...]:
        """What depends on the threshold only: masks, distance, elevation, a sub-cache."""
        fg = prob_fg > threshold
        # Seeds grow from the interior: object minus boundary, or the whole object.
        region = fg if prob_boundary is None else (prob_fg - prob_boundary) > threshold
        dist = ndi.distance_transform_edt(region).astype(np.float32)
        if prob_boundary is not None:
            elevation = prob_boundary
        else:  # the membrane probability, then the -distance: gaps are cut at their waist
            elevation = (1.0 - prob_fg) - dist / (1.0 + float(dist.max()))
        return fg, region, dist, elevation, {}

    fg, region, dist, elevation, sub = _memo(cache, ("base", threshold), base)
    seeds = _distance_seeds(region, dist, min_distance, h, sub if cache is not None else None)
    mask = None if dense else fg
    if not seeds.any():
        return np.zeros(fg.shape, dtype=np.int32), elevation, mask
    return watershed(elevation, seeds, mask=mask, connectivity=1), elevation, mask


def _absorb_small(
    labels: np.ndarray, elevation: np.ndarray, mask: np.ndarray | None, min_size: int
) -> np.ndarray:
    """Objects under ``min_size`` px merged into a neighbour (flooded over), or dropped if alone."""
    from skimage.segmentation import watershed

    sizes = np.bincount(labels.ravel())
    small = sizes < min_size
    small[0] = False
    if min_size <= 0 or not small.any():
        return labels
    keep = np.where(small[labels], 0, labels)
    if not keep.any():
        return keep
    region = (labels > 0) if mask is None else mask
    return watershed(elevation, keep, mask=region & ((keep > 0) | small[labels]), connectivity=1)


def default_params(dense: bool = False) -> dict[str, Any]:
    """The post-processing parameters used when none were tuned (nuclei or dense membranes)."""
    return dict(DENSE_DEFAULTS if dense else NUCLEI_DEFAULTS)


def watershed_instances(
    prob_fg: np.ndarray,
    prob_boundary: np.ndarray | None = None,
    *,
    threshold: float | None = None,
    min_distance: int | None = None,
    h: float | None = None,
    min_size: int | None = None,
    dense: bool = False,
) -> np.ndarray:
    """Instance labels (uint16; uint32 beyond 65,535) of one slice by seeded watershed.

    ``prob_fg``: P(object), or P(cell interior) for membranes; ``prob_boundary``: P(boundary)
    of three-class models. Seeds: the interior (``prob_fg [- prob_boundary] > threshold``),
    one per distance maximum rising ``h`` above its saddle, ``min_distance`` px apart
    (:func:`_distance_seeds`; ``h`` = 0: one per component). They flood ``prob_boundary`` or
    1 − prob_fg − (normalised distance), which cuts a membrane gap at its waist, inside
    ``prob_fg > threshold`` or, ``dense=True``, over the whole slice (cells fill the
    membranes). Objects under ``min_size`` px merge into the neighbour that floods them, or
    go when alone. None: :func:`default_params`. Nothing above threshold: all zeros.
    """
    given = {"threshold": threshold, "min_distance": min_distance, "h": h, "min_size": min_size}
    par = {**default_params(dense), **{k: v for k, v in given.items() if v is not None}}
    p = _check_prob(prob_fg, "prob_fg")
    b = _check_prob(prob_boundary, "prob_boundary", p.shape)
    if not 0.0 <= par["threshold"] < 1.0 or par["h"] < 0 or par["min_distance"] < 0:
        raise CellP2PError(
            f"watershed: need 0 <= threshold < 1, h >= 0 and min_distance >= 0, got {par}"
        )
    key = (float(par["threshold"]), int(par["min_distance"]), float(par["h"]))
    labels, elevation, mask = _flood(p, b, key, dense)
    return relabel(_absorb_small(labels, elevation, mask, int(par["min_size"])))


WATERSHED_KEYS = ("threshold", "min_distance", "h", "min_size")


def tuning_maps(prob: np.ndarray, boundary: bool) -> np.ndarray:
    """Network outputs (N, C, Y, X) in [0, 1] → :func:`tune_postprocessing`'s maps:
    (N, 2, Y, X) P(object), P(boundary) of three-class boundary models, else (N, Y, X)."""
    p = np.asarray(prob, dtype=np.float32)
    if boundary and p.shape[1] == 3:
        return np.stack([1.0 - p[:, 0], p[:, 2]], 1)
    return 1.0 - p[:, 0] if p.shape[1] > 2 else p[:, -1]


def postprocessing_record(
    params: Mapping[str, Any] | None, *, dense: bool, boundary: bool, tta: bool = False
) -> dict[str, Any]:
    """What a checkpoint stores as ``"postprocessing"``: plain primitives, checked.

    ``params``: :func:`tune_postprocessing`'s result (None: :func:`default_params`); ``tta``:
    the parameters were tuned on test-time augmented maps, which ``--output labels`` then uses.
    """
    par = {**default_params(dense), **dict(params or {})}
    out: dict[str, Any] = {"method": "watershed", "dense": bool(dense), "boundary": bool(boundary)}
    out.update(
        {k: float(par[k]) if k in ("threshold", "h") else int(par[k]) for k in WATERSHED_KEYS}
    )
    for k in ("objective", "score", "default_score"):
        if par.get(k) is not None:
            out[k] = par[k] if k == "objective" else float(par[k])
    out["tuned"] = params is not None
    out["tta"] = bool(tta)
    return out


# What training tunes over (dense: h 0 only; h > 0 over-splits EM cells, see the notes).
TRAIN_GRIDS: dict[bool, dict[str, tuple] | None] = {False: None, True: {"h": (0.0,)}}


def tune_run(
    pred: np.ndarray, data: Any, pred_tta: np.ndarray | None = None
) -> dict[str, Any] | None:
    """The ``"postprocessing"`` record of a run: the watershed tuned on the validation outputs.

    ``pred``: validation outputs (N, C, Y, X) in [0, 1]; ``pred_tta``: the same, test-time
    augmented (:func:`cellp2p.tiling.dihedral_mean`), tuned as well and kept (``"tta"``) only
    where it scores better; ``data``: the run's :class:`cellp2p.dataset.PairedData`. None
    (connected components) for translation and class maps, which have no objects to tune on.
    """
    if not tunes(data):
        return None
    objects = data.val_instances
    boundary = bool(data.instances) and data.target_kind == "multiclass"
    dense = bool(getattr(data, "dense", False))
    sign = 1.0 if dense else -1.0  # minimise the Rand error, maximise mean AP
    tuned, tta = None, False
    for augmented, maps in ((False, pred), (True, pred_tta)):
        if maps is None:
            continue
        t = tune_postprocessing(
            tuning_maps(maps, boundary), objects, TRAIN_GRIDS[dense], dense=dense
        )
        if tuned is None or sign * t["score"] < sign * tuned["score"]:
            tuned, tta = t, augmented
    record = postprocessing_record(tuned, dense=dense, boundary=boundary, tta=tta)
    cc = _components_score(pred, objects, data.target_kind, dense)
    record["components_score"] = cc
    if not sign * tuned["score"] < sign * cc:  # the watershed must earn its place
        record.update(method="components", tta=False)
    return record


def tunes(data: Any) -> bool:
    """Whether a run's data has objects to tune ``--output labels`` on (:func:`tune_run`)."""
    objects = getattr(data, "val_instances", None)
    instances = bool(getattr(data, "instances", False))
    return objects is not None and (data.target_kind == "binary" or instances)


def _components_score(pred: np.ndarray, objects: np.ndarray, kind: str, dense: bool) -> float:
    """The tuning objective of connected components at 0.5 (before issue 15): mean AP, or the
    Rand error of the components grown over the membranes (dense)."""
    from cellp2p.metrics import rand_info_scores
    from cellp2p.outputs import instance_labels

    scores = []
    for p, gt in zip(pred, objects, strict=True):
        gt = gt if label_kind(gt) == "instances" else objects_from_binary(gt)
        cc = instance_labels(p, kind, None)
        if dense:
            scores.append(1.0 - rand_info_scores(grow_labels(cc), gt)["v_rand"])
        else:
            scores.append(mean_average_precision(cc, gt))
    return float(np.mean(scores)) if scores else 0.0


def grow_labels(labels: np.ndarray) -> np.ndarray:
    """Labels grown over their unlabelled pixels (a dense partition); all 0 stays 0."""
    if not labels.any() or labels.all():
        return labels
    from skimage.segmentation import watershed

    return watershed(np.zeros(labels.shape, np.float32), labels.astype(np.int32), connectivity=1)


def check_postprocessing(record: Any, name: str = "checkpoint") -> dict[str, Any] | None:
    """A checkpoint's ``"postprocessing"`` entry, checked (None: connected components)."""
    if record is None:
        return None
    if not isinstance(record, dict) or record.get("method") not in ("watershed", "components"):
        raise CellP2PError(f"{name}: post-processing record {record!r} is damaged")
    if not isinstance(record.get("tta", False), bool):
        raise CellP2PError(f"{name}: post-processing tta = {record['tta']!r} is not true/false")
    for k in WATERSHED_KEYS:
        v = record.get(k)
        if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float)) or v < 0):
            raise CellP2PError(f"{name}: post-processing {k} = {v!r} is not a number >= 0")
    return dict(record)


def _tune_inputs(prob_maps: Any, gt_instances: Any) -> list[tuple[np.ndarray, ...]]:
    """(prob_fg, prob_boundary or None, gt objects) per validation slice, checked."""
    p = np.asarray(prob_maps, dtype=np.float32)
    p = p[None] if p.ndim == 2 else p
    if not (p.ndim == 3 or (p.ndim == 4 and p.shape[1] == 2)):
        raise CellP2PError(f"tune: prob_maps must be (N, Y, X) or (N, 2, Y, X), got {p.shape}")
    gt = np.asarray(gt_instances)
    gt = gt[None] if gt.ndim == 2 else gt
    if gt.shape != (p.shape[0], *p.shape[-2:]):
        raise CellP2PError(f"tune: gt shape {gt.shape} does not fit prob_maps {p.shape}")
    out = []
    for s, g in zip(p, gt, strict=True):
        fg, b = (s, None) if p.ndim == 3 else (s[0], s[1])
        objects = g if label_kind(g, name="ground truth") == "instances" else None
        out.append(
            (
                _check_prob(fg, "prob_maps"),
                _check_prob(b, "prob_maps", fg.shape),
                objects_from_binary(g) if objects is None else objects,
            )
        )
    return out


def _grid(grid: Mapping[str, Sequence] | None, dense: bool) -> dict[str, tuple]:
    """The kind's default grid with the given entries replaced, checked."""
    base = DENSE_GRID if dense else NUCLEI_GRID
    bad = set(grid or {}) - set(base)
    if bad:
        raise CellP2PError(f"tune: unknown grid keys {sorted(bad)}; use {', '.join(base)}")
    g = {k: tuple((grid or {}).get(k, v)) for k, v in base.items()}
    if not all(g.values()):
        raise CellP2PError("tune: every grid entry needs at least one value")
    return g


def tune_postprocessing(
    prob_maps: Any,
    gt_instances: Any,
    grid: Mapping[str, Sequence] | None = None,
    *,
    dense: bool = False,
) -> dict[str, Any]:
    """The :func:`watershed_instances` parameters that score best on validation slices.

    ``prob_maps``: (N, Y, X) P(object), or (N, 2, Y, X) with P(boundary) second;
    ``gt_instances``: (N, Y, X) instance labels or binary masks (4-connected components).
    Full grid search (:data:`NUCLEI_GRID` / :data:`DENSE_GRID`, entries replaced by
    ``grid``), a threshold's floods sharing one distance transform. Nuclei: maximise the
    mean :func:`mean_average_precision`; ``dense``: minimise the mean Rand error 1 − V_rand
    (:func:`cellp2p.metrics.rand_info_scores`). Ties keep the earlier point (defaults come
    first). Returns the parameters, ``dense``, ``objective``, ``score``, ``default_score``.
    """
    from cellp2p.metrics import rand_info_scores

    slices = _tune_inputs(prob_maps, gt_instances)
    g = _grid(grid, dense)

    def score(pred: np.ndarray, gt: np.ndarray) -> float:
        """The objective of one slice: Rand error (dense) or mean AP."""
        if dense:
            return 1.0 - rand_info_scores(pred, gt)["v_rand"]
        return mean_average_precision(pred, gt)

    totals: dict[tuple, float] = {}
    for t in g["threshold"]:
        caches: list[dict] = [{} for _ in slices]  # what one threshold's floods share
        for md, h in itertools.product(g["min_distance"], g["h"]):
            for (p, b, gt), cache in zip(slices, caches, strict=True):
                labels, elevation, mask = _flood(p, b, (float(t), int(md), float(h)), dense, cache)
                for ms in g["min_size"]:
                    final = _absorb_small(labels, elevation, mask, int(ms))
                    key = (t, md, h, ms)
                    totals[key] = totals.get(key, 0.0) + score(final, gt) / len(slices)
    sign = 1.0 if dense else -1.0  # minimise the Rand error, maximise mean AP
    best = min(itertools.product(*g.values()), key=lambda k: sign * totals[k])
    out = dict(zip(g, (float(best[0]), int(best[1]), float(best[2]), int(best[3])), strict=True))
    d = default_params(dense)
    d_key = (d["threshold"], d["min_distance"], d["h"], d["min_size"])
    return {
        **out,
        "dense": bool(dense),
        "objective": "rand_error" if dense else "mean_ap",
        "score": float(totals[best]),
        "default_score": float(totals[d_key]) if d_key in totals else None,
    }
