"""Instance segmentation: label kinds, separation targets, seeded watershed, tuning, AP scores."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import ndimage as ndi

from cellp2p import instances as inst
from cellp2p.errors import CellP2PError
from cellp2p.synth import make_nuclei


def _disc(shape: tuple[int, int], cy: float, cx: float, r: float) -> np.ndarray:
    yy, xx = np.mgrid[0 : shape[0], 0 : shape[1]]
    return (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r


def _touching_discs() -> np.ndarray:
    """Two discs of radius 10 whose centres are 16 px apart: they share a border."""
    lab = np.zeros((40, 60), dtype=np.uint16)
    lab[_disc(lab.shape, 20, 20, 10)] = 1
    lab[_disc(lab.shape, 20, 36, 10) & (lab == 0)] = 2
    return lab


def _membrane_grid(n: int = 3, cell: int = 20, width: int = 2) -> np.ndarray:
    """P(cell interior) of an n x n grid of compartments: 0 on membrane lines, 1 inside."""
    size = n * cell + (n - 1) * width
    p = np.ones((size, size), dtype=np.float32)
    for k in range(1, n):
        start = k * cell + (k - 1) * width
        p[start : start + width, :] = 0.0
        p[:, start : start + width] = 0.0
    return p


def _compartments(p: np.ndarray) -> np.ndarray:
    return ndi.label(p > 0.5, structure=ndi.generate_binary_structure(2, 1))[0]


def _one_cell_per_compartment(labels: np.ndarray, comps: np.ndarray) -> bool:
    """Each compartment lies in one label and no two compartments share one."""
    owners = []
    for c in range(1, int(comps.max()) + 1):
        ids = np.unique(labels[comps == c])
        if ids.size != 1 or ids[0] == 0:
            return False
        owners.append(int(ids[0]))
    return len(set(owners)) == len(owners)


# -- label kinds --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "labels",
    [
        np.zeros((4, 4), dtype=np.uint8),
        np.array([[0, 255], [255, 0]], dtype=np.uint8),
        np.array([[0, 1], [1, 1]], dtype=np.int32),
        np.array([[True, False]]),
        np.array([[-1, 0]], dtype=np.int16),  # two values: the binary path's conventions
    ],
)
def test_label_kind_binary(labels: np.ndarray) -> None:
    assert inst.label_kind(labels) == "binary"


def test_label_kind_instances() -> None:
    assert inst.label_kind(np.array([[0, 1], [2, 3]], dtype=np.uint16)) == "instances"
    assert inst.label_kind(np.array([[0.0, 1.0], [2.0, 7.0]], dtype=np.float32)) == "instances"
    assert inst.label_kind(np.arange(300).reshape(15, 20), dtype=np.uint16) == "instances"


@pytest.mark.parametrize(
    ("labels", "kwargs", "match"),
    [
        (np.array([[0, -3], [1, 2]], dtype=np.int32), {}, "negative label id -3"),
        (np.array([[0, 1.5], [1, 2]], dtype=np.float32), {}, "non-integer label value 1.5"),
        (np.array([[0, np.nan], [1, 2]]), {}, "NaN"),
        (np.arange(300).reshape(15, 20), {"dtype": np.uint8}, "299 instances do not fit uint8"),
        (np.array([[1j, 2], [3, 4]]), {}, "not a label image"),
    ],
)
def test_label_kind_refuses_bad_instance_labels(labels, kwargs, match) -> None:
    with pytest.raises(CellP2PError, match=match):
        inst.label_kind(labels, name="lab.tif", **kwargs)


def test_relabel_and_label_dtype() -> None:
    out = inst.relabel(np.array([[0, 7, 7], [3, 0, 100]], dtype=np.int64))
    assert out.dtype == np.uint16
    assert out.tolist() == [[0, 2, 2], [1, 0, 3]]
    assert inst.relabel(np.array([[5, 9]])).tolist() == [[1, 2]]  # no background
    assert inst.label_dtype(65535) == np.uint16 and inst.label_dtype(65536) == np.uint32
    big = inst.relabel(np.arange(70000).reshape(280, 250))
    assert big.dtype == np.uint32 and big.max() == 69999


def test_objects_from_binary_four_connected_per_slice() -> None:
    mask = np.array([[255, 0, 0], [0, 255, 255], [0, 0, 0]], dtype=np.uint8)
    lab = inst.objects_from_binary(mask)
    assert lab.dtype == np.uint16 and lab.max() == 2  # the diagonal neighbour is another cell
    stack = inst.objects_from_binary(np.stack([mask, mask > 0, np.zeros_like(mask)]))
    assert stack.shape == (3, 3, 3) and [int(s.max()) for s in stack] == [2, 2, 0]


# -- targets ------------------------------------------------------------------------------------


def test_boundary_targets_three_classes() -> None:
    lab = np.zeros((7, 10), dtype=np.uint16)
    lab[1:6, 1:5] = 1
    lab[1:6, 5:9] = 2  # touches object 1 along column 4 | 5
    t = inst.boundary_targets(lab)
    assert t.dtype == np.uint8 and set(np.unique(t).tolist()) == {0, 1, 2}
    assert (t[lab == 0] == 0).all()
    # One pixel inside each object: the frame of each rectangle, both sides of the contact.
    expect = np.zeros_like(t)
    expect[1:6, 1:9] = 2
    expect[2:5, 2:4] = 1
    expect[2:5, 6:8] = 1
    assert np.array_equal(t, expect)
    # The image frame is not a boundary; a stack goes slice by slice.
    full = inst.boundary_targets(np.ones((2, 4, 4), dtype=np.uint8) * 3)
    assert (full == 1).all()


def test_separated_foreground_parts_touching_objects() -> None:
    lab = _touching_discs()
    sep = inst.separated_foreground(lab)
    assert sep.dtype == bool and (sep <= (lab > 0)).all()
    parts = ndi.label(sep, structure=ndi.generate_binary_structure(2, 1))[1]
    assert parts == 2 and ndi.label(lab > 0)[1] == 1
    # Only the contact goes: an isolated object keeps every pixel.
    one = (lab == 1).astype(np.uint8)
    assert np.array_equal(inst.separated_foreground(one), one > 0)


def _three_squares() -> np.ndarray:
    lab = np.zeros((40, 64), dtype=np.uint16)
    lab[5:15, 5:15] = 1  # A
    lab[5:15, 19:29] = 2  # B: a 4 px gap (columns 15-18) from A
    lab[28:36, 50:58] = 3  # C: far from both
    return lab


def test_border_weight_map_three_object_toy_by_hand() -> None:
    lab = _three_squares()
    w = inst.border_weight_map(lab, w0=10.0, sigma=5.0)
    assert w.dtype == np.float32 and w.shape == lab.shape
    n, n_fg = lab.size, 264
    w_fg, w_bg = n / (2 * n_fg), n / (2 * (n - n_fg))  # 4.8485, 0.5575
    assert w[lab > 0] == pytest.approx(w_fg)
    # Gap pixel (9, 16): 2 px to A (column 14), 3 px to B (column 19): d1 + d2 = 5.
    gap = w_bg + 10.0 * math.exp(-(5**2) / (2 * 5.0**2))
    assert w[9, 16] == pytest.approx(gap, rel=1e-5) and w[9, 16] == pytest.approx(6.6228, abs=1e-4)
    assert w[5:15, 15:19] == pytest.approx(gap, rel=1e-5)  # every gap pixel: d1 + d2 = 5
    # Far corners, and beside C (its second-nearest object is 36 px away): only w_c.
    for y, x in [(39, 0), (39, 63), (31, 60), (0, 40)]:
        assert w[y, x] == pytest.approx(w_bg, abs=1e-3)
    unbalanced = inst.border_weight_map(lab, class_balance=False)
    assert unbalanced[39, 0] == pytest.approx(1.0, abs=1e-3)
    assert unbalanced[lab > 0] == pytest.approx(1.0)


def test_border_weight_map_matches_brute_force() -> None:
    rng = np.random.default_rng(0)
    lab = np.zeros((64, 64), dtype=np.uint16)
    for i in range(1, 9):
        y, x = rng.integers(4, 56, 2)
        lab[_disc(lab.shape, y, x, rng.uniform(2, 6)) & (lab == 0)] = i
    lab = lab * inst.separated_foreground(lab)
    dists = np.sort([ndi.distance_transform_edt(lab != i) for i in np.unique(lab[lab > 0])], 0)
    brute = 10.0 * np.exp(-((dists[0] + dists[1]) ** 2) / 50.0) * (lab == 0)
    w = inst.border_weight_map(lab, class_balance=False) - 1.0
    assert np.abs(w - brute).max() < 1e-3  # only terms under the 1e-3 tolerance are dropped
    assert inst.border_reach(10.0, 5.0) == 22


def test_border_weight_map_touching_objects_and_stacks() -> None:
    lab = np.zeros((12, 20), dtype=np.uint16)
    lab[2:10, 2:10] = 1
    lab[2:10, 10:18] = 2  # touching: columns 9 and 10 become the gap
    w = inst.border_weight_map(np.stack([lab, np.zeros_like(lab)]), class_balance=False)
    assert w.shape == (2, 12, 20)
    # Column 9: 1 px to object 1 (column 8), 2 px to object 2 (column 11): d1 + d2 = 3.
    assert w[0, 5, 9] == pytest.approx(1.0 + 10.0 * math.exp(-9 / 50), rel=1e-5)
    assert (w[1] == 1.0).all()  # no objects: no border term
    with pytest.raises(CellP2PError, match="sigma"):
        inst.border_weight_map(lab, sigma=0)


# -- watershed ----------------------------------------------------------------------------------


def test_two_touching_discs_become_two_objects() -> None:
    gt = _touching_discs()
    p = (gt > 0).astype(np.float32)
    assert inst.objects_from_binary(p).max() == 1  # connected components merge them
    lab = inst.watershed_instances(p)
    assert lab.dtype == np.uint16 and lab.max() == 2
    assert inst.average_precision(lab, gt, 0.9) == 1.0
    # With a boundary class (three-class models) the seeds are the interiors.
    b = (inst.boundary_targets(gt) == 2).astype(np.float32)
    lab3 = inst.watershed_instances(p, b)
    assert lab3.max() == 2 and inst.average_precision(lab3, gt, 0.9) == 1.0


def test_membrane_grid_dense_one_cell_per_compartment() -> None:
    p = _membrane_grid()
    comps = _compartments(p)
    lab = inst.watershed_instances(p, dense=True)
    assert lab.max() == 9 and (lab > 0).all()  # the cells fill the membranes
    assert _one_cell_per_compartment(lab, comps)
    not_dense = inst.watershed_instances(p)
    assert not_dense.max() == 9 and (not_dense[p == 0] == 0).all()


def test_membrane_gaps_split_by_threshold_and_by_distance() -> None:
    p = _membrane_grid()
    comps = _compartments(p)
    faint = p.copy()
    faint[8:12, 20:22] = 0.6  # a faint stretch of membrane between two compartments
    assert inst.objects_from_binary(faint > 0.5).max() == 8  # today: the two merge
    lab = inst.watershed_instances(faint, dense=True, threshold=0.8)  # the membrane holds
    assert lab.max() == 9 and _one_cell_per_compartment(lab, comps)
    hole = p.copy()
    hole[8:12, 20:22] = 1.0  # a real hole: only the distance transform can part them
    assert inst.watershed_instances(hole, dense=True, h=0).max() == 8
    split = inst.watershed_instances(hole, dense=True, h=2.0, min_distance=4)
    assert split.max() == 9 and _one_cell_per_compartment(split, comps)


def test_tune_run_keeps_test_time_augmented_maps_only_where_they_score_better() -> None:
    """A hole in one membrane merges two cells (training's dense grid has h = 0 only); the
    test-time augmented map without it is kept and recorded, a worse or an equal one is not."""
    from types import SimpleNamespace

    clean = _membrane_grid()
    hole = clean.copy()
    hole[8:12, 20:22] = 1.0
    data = SimpleNamespace(
        val_instances=(clean > 0.5)[None], instances=False, target_kind="binary", dense=True
    )
    better = inst.tune_run(hole[None, None], data, clean[None, None])
    assert better["tta"] is True and better["method"] == "watershed"
    assert better["score"] == pytest.approx(0.0) and better["components_score"] > 0.01
    assert inst.tune_run(hole[None, None], data, hole[None, None])["tta"] is False  # a tie
    assert inst.tune_run(hole[None, None], data)["tta"] is False  # none given
    worse = inst.tune_run(clean[None, None], data, hole[None, None])
    assert worse["tta"] is False and worse["score"] == pytest.approx(0.0)
    assert inst.check_postprocessing(better) == better
    with pytest.raises(CellP2PError, match="tta"):
        inst.check_postprocessing({**better, "tta": "yes"})


@pytest.mark.parametrize("dense", [False, True])
def test_empty_prediction_gives_empty_labels(dense: bool) -> None:
    for p in (np.zeros((32, 48), dtype=np.float32), np.full((32, 48), 0.3, dtype=np.float32)):
        lab = inst.watershed_instances(p, dense=dense)
        assert lab.shape == (32, 48) and lab.dtype == np.uint16 and not lab.any()


def test_min_size_drops_lone_fragments_and_merges_touching_ones() -> None:
    p = np.zeros((40, 40), dtype=np.float32)
    p[5:25, 5:25] = 1.0  # a big square
    p[25:28, 12:15] = 1.0  # a 9 px bump attached to it
    p[33:36, 33:36] = 1.0  # a lone 9 px speck
    keep = inst.watershed_instances(p, h=0.0, min_size=0)
    assert keep.max() == 2
    lab = inst.watershed_instances(p, h=0.0, min_size=16)
    assert lab.max() == 1 and (lab[25:28, 12:15] == 1).all() and not lab[33:36, 33:36].any()


def test_labels_beyond_uint16_are_uint32() -> None:
    p = np.zeros((600, 600), dtype=np.float32)
    p[::2, ::2] = 1.0  # 90,000 one-pixel objects
    lab = inst.watershed_instances(p, h=0.0, min_size=0)
    assert lab.dtype == np.uint32 and lab.max() == 90000


def test_watershed_refuses_bad_maps() -> None:
    with pytest.raises(CellP2PError, match=r"\[0, 1\]"):
        inst.watershed_instances(np.full((8, 8), 2.0))
    with pytest.raises(CellP2PError, match="2D"):
        inst.watershed_instances(np.zeros((2, 8, 8)))
    with pytest.raises(CellP2PError, match="threshold"):
        inst.watershed_instances(np.zeros((8, 8)), threshold=1.0)


def test_watershed_separates_synthetic_nuclei_from_perfect_foreground() -> None:
    _, labels = make_nuclei(4, (192, 192), seed=1)
    cc, ws = [], []
    for gt in labels:
        p = (gt > 0).astype(np.float32)
        cc.append(inst.average_precision(inst.objects_from_binary(p), gt))
        ws.append(inst.average_precision(inst.watershed_instances(p, min_size=0), gt))
    # Shape alone separates a good part of the clusters (the separated target does the rest):
    assert np.mean(cc) < 0.3 and np.mean(ws) > 0.6  # measured: 0.19 and 0.65


# -- tuning -------------------------------------------------------------------------------------


def test_tune_finds_the_threshold_the_defaults_miss() -> None:
    gt = _touching_discs()
    p = np.where(gt > 0, 0.45, 0.05).astype(np.float32)  # under the default 0.5
    assert not inst.watershed_instances(p).any()
    best = inst.tune_postprocessing(np.stack([p, p]), np.stack([gt, gt]))
    assert best["threshold"] in (0.3, 0.4) and best["objective"] == "mean_ap"
    assert best["score"] > 0.9 and best["default_score"] == 0.0 and best["dense"] is False
    params = {k: best[k] for k in ("threshold", "min_distance", "h", "min_size")}
    assert inst.watershed_instances(p, **params).max() == 2


def test_tune_dense_minimises_rand_error() -> None:
    p = _membrane_grid() * 0.7  # interiors at 0.7: a seed threshold of 0.8 sees none
    gt = (p > 0).astype(np.uint8) * 255  # ISBI-style binary labels
    best = inst.tune_postprocessing(p, gt, {"threshold": (0.8, 0.6), "h": (0.0,)}, dense=True)
    assert best["threshold"] == 0.6 and best["objective"] == "rand_error"
    assert best["score"] == pytest.approx(0.0, abs=1e-12)
    assert inst.default_params(True)["threshold"] < 0.7  # the untuned default sees them too
    with pytest.raises(CellP2PError, match="unknown grid keys"):
        inst.tune_postprocessing(p, gt, {"sigma": (1,)})


# -- scores -------------------------------------------------------------------------------------


def _hand_counted() -> tuple[np.ndarray, np.ndarray]:
    """gt: A, B, D; pred: A exactly (IoU 1), B widened (IoU 100/150), C (a false positive)."""
    gt = np.zeros((30, 40), dtype=np.uint16)
    pred = np.zeros_like(gt)
    gt[0:10, 0:10] = 1
    pred[0:10, 0:10] = 7
    gt[0:10, 20:30] = 2
    pred[0:10, 20:35] = 3
    pred[20:25, 0:5] = 9
    gt[20:30, 20:30] = 4  # never predicted
    return pred, gt


def test_match_and_ap_on_hand_counted_matches() -> None:
    pred, gt = _hand_counted()
    m = inst.match_instances(pred, gt, 0.5)
    assert (m.tp, m.fp, m.fn) == (2, 1, 1)
    assert sorted(m.pairs) == [(3, 2, pytest.approx(2 / 3)), (7, 1, 1.0)]
    assert inst.average_precision(pred, gt, 0.5) == pytest.approx(2 / 4)
    assert inst.average_precision(pred, gt, 0.75) == pytest.approx(1 / 5)
    # B matches at IoU 0.5, 0.55, 0.6, 0.65 (2/4 each), not at 0.7 ... 0.95 (1/5 each).
    assert inst.mean_average_precision(pred, gt) == pytest.approx((4 * 0.5 + 6 * 0.2) / 10)


def test_matching_is_one_to_one() -> None:
    gt = np.zeros((10, 20), dtype=np.uint16)
    gt[:, :10], gt[:, 10:] = 1, 2
    pred = (gt > 0).astype(np.uint16)  # one object covering both: IoU exactly 0.5 with each
    m = inst.match_instances(pred, gt, 0.5)
    assert (m.tp, m.fp, m.fn) == (1, 0, 1)
    assert inst.average_precision(pred, gt, 0.5) == 0.5


def test_ap_empty_cases_and_errors() -> None:
    empty = np.zeros((8, 8), dtype=np.uint16)
    one = empty.copy()
    one[2:4, 2:4] = 1
    assert inst.average_precision(empty, empty) == 1.0
    assert inst.mean_average_precision(empty, empty) == 1.0
    assert inst.average_precision(one, empty) == 0.0 and inst.average_precision(empty, one) == 0.0
    with pytest.raises(CellP2PError, match="shape"):
        inst.average_precision(one, one[:4])
    with pytest.raises(CellP2PError, match=">= 0"):
        inst.average_precision(one.astype(np.int32) - 1, one)
    with pytest.raises(CellP2PError, match="IoU threshold"):
        inst.match_instances(one, one, 0.0)


def test_ap_agrees_with_metrics_average_precision() -> None:
    from cellp2p.metrics import average_precision as metrics_ap

    rng = np.random.default_rng(1)
    for _ in range(6):
        gt = ndi.label(ndi.gaussian_filter(rng.standard_normal((48, 48)), 2) > 0.1)[0]
        noisy = ndi.gaussian_filter(rng.standard_normal((48, 48)), 2) * 0.3
        pred = ndi.label(ndi.gaussian_filter(rng.standard_normal((48, 48)), 2) + noisy > 0.1)[0]
        pred = np.where(rng.uniform(size=gt.shape) < 0.5, gt * 3, pred)  # part overlap
        for thr in (0.1, 0.3, 0.5, 0.75):
            assert inst.average_precision(pred, gt, thr) == pytest.approx(metrics_ap(pred, gt, thr))


def test_tune_three_class_maps_and_bad_shapes() -> None:
    gt = _touching_discs()
    maps = np.stack([(gt > 0), inst.boundary_targets(gt) == 2]).astype(np.float32)[None]
    best = inst.tune_postprocessing(maps, gt[None], {"threshold": (0.5,), "min_size": (0,)})
    assert best["score"] == 1.0  # both discs found, exactly
    with pytest.raises(CellP2PError, match="does not fit"):
        inst.tune_postprocessing(maps, gt[None, :20])
    with pytest.raises(CellP2PError, match=r"\(N, 2, Y, X\)"):
        inst.tune_postprocessing(np.zeros((1, 3, 8, 8)), np.zeros((1, 8, 8)))


def test_looks_dense() -> None:
    assert inst.looks_dense((_membrane_grid() > 0).astype(np.uint8) * 255)  # ISBI-style
    assert not inst.looks_dense(_touching_discs())  # instance labels
    assert not inst.looks_dense((_touching_discs() > 0).astype(np.uint8))  # sparse binary
