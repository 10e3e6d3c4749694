"""Metrics against hand-computed answers (cellp2p.metrics)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from skimage.metrics import adapted_rand_error, structural_similarity, variation_of_information

from cellp2p.errors import CellP2PError
from cellp2p.metrics import (
    average_precision,
    dice_iou,
    isbi_scores,
    mae,
    pixel_error,
    psnr,
    rand_info_scores,
    segments_from_binary,
    ssim,
    thin_boundaries,
)
from cellp2p.scoring import evaluate_arrays, format_table

# 4x4 layouts used by the Rand/info cases (N = 16 gt-foreground pixels each).
HALVES = np.array([[1, 1, 2, 2]] * 4)  # two cells of 8 pixels
QUADS = np.array([[1, 1, 2, 2], [1, 1, 2, 2], [3, 3, 4, 4], [3, 3, 4, 4]])  # four cells of 4
ONE = np.ones((4, 4), dtype=int)


def check(scores: dict[str, float], **expected: float) -> None:
    """Assert the named scores equal the hand-computed values."""
    for key, value in expected.items():
        assert scores[key] == pytest.approx(value, abs=1e-12), key


# --- pixel / class overlap --------------------------------------------------------------------


def test_pixel_error_counts_foreground_disagreement():
    pred = np.array([[0, 255], [255, 0]], dtype=np.uint8)
    target = np.array([[0, 255], [0, 0]], dtype=np.uint8)
    assert pixel_error(pred, target) == 0.25  # one of four pixels differs
    assert pixel_error(pred > 0, target.astype(bool)) == 0.25
    assert pixel_error(target, target) == 0.0


def test_dice_iou_per_class():
    pred = np.array([[0, 1], [1, 1]])
    target = np.array([[0, 1], [0, 1]])
    # class 1: |p| = 3, |t| = 2, overlap 2 -> dice 4/5, iou 2/3
    # class 0: |p| = 1, |t| = 2, overlap 1 -> dice 2/3, iou 1/2; class 2 absent -> 1
    check(
        dice_iou(pred, target, num_classes=3),
        dice_1=0.8,
        iou_1=2 / 3,
        dice_0=2 / 3,
        iou_0=0.5,
        dice_2=1.0,
        iou_2=1.0,
    )
    batch = dice_iou(np.stack([pred, pred]), np.stack([target, target]))
    assert batch["dice_1"] == pytest.approx(0.8)


# --- Rand / information scores ----------------------------------------------------------------


def test_rand_info_perfect_is_one_despite_relabelling():
    proposal = QUADS * 10 + 3  # same partition, other ids
    scores = rand_info_scores(proposal, QUADS)
    assert all(v == pytest.approx(1.0) for v in scores.values())


def test_merge_of_two_equal_cells():
    # gt: two cells of m = 8 px; proposal: one segment over both.
    # sum p^2 = 2 m^2, sum t^2 = 2 m^2, sum s^2 = (2m)^2 = 4 m^2
    # V_rand = 2*2m^2 / (4m^2 + 2m^2) = 2/3; split = 2m^2/2m^2 = 1; merge = 2m^2/4m^2 = 1/2.
    # H(S) = 0 so I = 0: V_info = 0, merge = I/H(T) = 0, split = 0/0 := 1 (nothing split).
    check(
        rand_info_scores(ONE, HALVES),
        v_rand=2 / 3,
        v_rand_split=1.0,
        v_rand_merge=0.5,
        v_info=0.0,
        v_info_split=1.0,
        v_info_merge=0.0,
    )


def test_split_of_one_cell_is_the_mirror_case():
    # gt: one cell of 2m = 16 px; proposal: its two halves.
    # sum p^2 = 2 m^2, sum t^2 = 4 m^2, sum s^2 = 2 m^2 -> V_rand 2/3, split 1/2, merge 1.
    # H(T) = 0 so I = 0: V_info = 0, split = I/H(S) = 0, merge = 0/0 := 1.
    check(
        rand_info_scores(HALVES, ONE),
        v_rand=2 / 3,
        v_rand_split=0.5,
        v_rand_merge=1.0,
        v_info=0.0,
        v_info_split=0.0,
        v_info_merge=1.0,
    )


def test_merge_of_two_of_four_cells_info_value():
    # gt: four cells of 4 px; proposal merges the top two -> sizes 8, 4, 4.
    # sum p^2 = 4*16 = 64 = sum t^2; sum s^2 = 64 + 16 + 16 = 96
    # -> split 1, merge 64/96 = 2/3, V_rand = 128/160 = 4/5.
    # H(T) = 2 bits, H(S) = 1.5 bits, I = H(S) (S is a coarsening of T)
    # -> info split 1, merge 1.5/2 = 3/4, V_info = 2*1.5/3.5 = 6/7.
    proposal = np.where(QUADS == 2, 1, QUADS)
    check(
        rand_info_scores(proposal, QUADS),
        v_rand=0.8,
        v_rand_split=1.0,
        v_rand_merge=2 / 3,
        v_info=6 / 7,
        v_info_split=1.0,
        v_info_merge=0.75,
    )


def test_everything_merged_into_one_segment():
    # gt: four cells of 4 px; proposal: one segment.
    # sum p^2 = 4*4^2 = 64 = sum t^2, sum s^2 = 16^2 = 256 -> V_rand = 128/320 = 2/5, merge 1/4.
    check(
        rand_info_scores(ONE, QUADS),
        v_rand=0.4,
        v_rand_split=1.0,
        v_rand_merge=0.25,
        v_info=0.0,
        v_info_split=1.0,
        v_info_merge=0.0,
    )


@pytest.mark.parametrize(
    "proposal",
    [np.zeros((4, 4), dtype=int), np.arange(1, 17).reshape(4, 4)],
    ids=["unassigned-zeros", "explicit-singletons"],
)
def test_everything_split_into_singletons(proposal):
    # gt: two cells of 8 px (N = 16); proposal: 16 singletons (proposal 0 inside the gt
    # foreground counts as singletons, so both inputs must score the same).
    # sum p^2 = 16, sum s^2 = 16, sum t^2 = 2*64 = 128
    # -> split 16/128 = 1/8, merge 1, V_rand = 32/144 = 2/9.
    # H(S) = log 16, H(T) = log 2, I = H(T) -> split 1/4, merge 1, V_info = 2/(4+1) = 2/5.
    check(
        rand_info_scores(proposal, HALVES),
        v_rand=2 / 9,
        v_rand_split=1 / 8,
        v_rand_merge=1.0,
        v_info=0.4,
        v_info_split=0.25,
        v_info_merge=1.0,
    )


def test_gt_boundary_is_ignored_and_empty_gt_scores_one():
    gt = np.array([[1, 1, 0, 2, 2]] * 3)
    proposal = np.array([[5, 5, 5, 6, 6]] * 3)  # disagrees only on the gt membrane column
    assert rand_info_scores(proposal, gt)["v_rand"] == pytest.approx(1.0)
    assert set(rand_info_scores(proposal, np.zeros_like(gt)).values()) == {1.0}


def test_relation_to_skimage_adapted_rand_error():
    rng = np.random.default_rng(7)
    gt = rng.integers(0, 6, size=(40, 50))  # 0 = gt boundary, pruned out by both
    proposal = rng.integers(0, 8, size=(40, 50))  # 0 = unassigned -> singletons for us
    ours = rand_info_scores(proposal, gt)

    fg = gt > 0
    n = int(fg.sum())
    sum_t2 = float(np.sum(np.bincount(gt[fg]).astype(float) ** 2))
    sum_p2 = ours["v_rand_split"] * sum_t2  # split = P / T2
    sum_s2 = sum_p2 / ours["v_rand_merge"]  # merge = P / S2
    # skimage keeps proposal 0 as one segment: give those pixels unique ids to compare.
    singles = proposal.copy()
    zeros = proposal == 0
    singles[zeros] = proposal.max() + 1 + np.arange(int(zeros.sum()))
    error, precision, recall = adapted_rand_error(gt, singles)
    # skimage counts distinct pixel pairs (each sum minus N); its precision is our split side.
    assert precision == pytest.approx((sum_p2 - n) / (sum_t2 - n), rel=1e-12)
    assert recall == pytest.approx((sum_p2 - n) / (sum_s2 - n), rel=1e-12)
    assert error == pytest.approx(1 - 2 * (sum_p2 - n) / (sum_s2 + sum_t2 - 2 * n), rel=1e-12)

    # With large segments the -N terms vanish: 1 - error ~ V_rand, precision ~ split.
    big_gt = np.kron(HALVES, np.ones((32, 32), dtype=int))
    big_prop = np.kron(QUADS, np.ones((32, 32), dtype=int))
    ours = rand_info_scores(big_prop, big_gt)
    error, precision, recall = adapted_rand_error(big_gt, big_prop)
    assert 1 - error == pytest.approx(ours["v_rand"], abs=1e-3)
    assert precision == pytest.approx(ours["v_rand_split"], abs=1e-3)
    assert recall == pytest.approx(ours["v_rand_merge"], abs=1e-3)


def test_info_scores_match_skimage_conditional_entropies():
    rng = np.random.default_rng(3)
    gt = rng.integers(0, 5, size=(30, 30))
    proposal = rng.integers(1, 7, size=(30, 30))  # no unassigned pixels: no singletons
    ours = rand_info_scores(proposal, gt)
    p_t = np.bincount(gt[gt > 0])[1:] / np.count_nonzero(gt)
    h_t = -np.sum(p_t * np.log2(p_t))  # bits, as skimage
    mi = ours["v_info_merge"] * h_t  # merge = I / H(T)
    h_s = mi / ours["v_info_split"]  # split = I / H(S)
    # skimage returns [H(S|T), H(T|S)] = [H(S) - I, H(T) - I] on the gt foreground.
    h_s_given_t, h_t_given_s = variation_of_information(gt, proposal, ignore_labels=(0,))
    assert h_s_given_t == pytest.approx(h_s - mi, rel=1e-9)
    assert h_t_given_s == pytest.approx(h_t - mi, rel=1e-9)
    assert ours["v_info"] == pytest.approx(2 * mi / (h_s + h_t), rel=1e-12)


# --- thinning, ISBI sweep ---------------------------------------------------------------------


def test_thin_boundaries_three_pixel_boundary_becomes_one():
    labels = np.zeros((5, 9), dtype=int)
    labels[:, :3] = 1
    labels[:, 6:] = 2  # columns 3-5: a 3-pixel-wide boundary
    thin = thin_boundaries(labels)
    expected = np.zeros((5, 9), dtype=int)
    expected[:, :4] = 1
    expected[:, 5:] = 2
    np.testing.assert_array_equal(thin, expected)
    assert np.all((thin == 0).sum(axis=1) == 1)
    assert segments_from_binary(thin).max() == 2  # still two 4-connected segments


def test_segments_from_binary_uses_4_connectivity():
    mask = np.array([[255, 0], [0, 255]], dtype=np.uint8)  # diagonal neighbours only
    assert segments_from_binary(mask).max() == 2


def _two_cells_with_membrane(membrane_prob: float) -> tuple[np.ndarray, np.ndarray]:
    """16x17 gt: two 16x8 cells either side of a membrane column at x = 8; prob 0.9 in cells."""
    gt = np.full((16, 17), 255, dtype=np.uint8)
    gt[:, 8] = 0
    prob = np.where(gt > 0, 0.9, membrane_prob)
    return prob, gt


def test_isbi_scores_picks_best_threshold():
    # Membrane at 0.35: thresholds 0.0-0.3 keep it as interior (one merged segment over two
    # equal cells -> V_rand 2/3); 0.4-0.8 give the exact gt; 0.9 leaves no interior.
    prob, gt = _two_cells_with_membrane(0.35)
    scores = isbi_scores(prob, gt)
    check(scores, v_rand=1.0, v_info=1.0, v_rand_split=1.0, v_rand_merge=1.0, pixel_error=0.0)
    assert scores["v_rand_threshold"] == pytest.approx(0.4)
    assert scores["v_info_threshold"] == pytest.approx(0.4)
    merged = isbi_scores(prob, gt, thresholds=[0.1, 0.2])
    check(merged, v_rand=2 / 3, v_rand_split=1.0, v_rand_merge=0.5, v_info=0.0)
    assert merged["v_rand_threshold"] == pytest.approx(0.1)  # ties keep the first threshold
    binary = isbi_scores(gt, gt)  # a mask is scored once, at 0.5
    assert binary["v_rand"] == 1.0 and binary["v_rand_threshold"] == 0.5
    with pytest.raises(CellP2PError):
        isbi_scores((prob * 255).astype(np.uint8) + np.eye(16, 17, dtype=np.uint8), gt)


# --- instances --------------------------------------------------------------------------------


def test_average_precision_at_050_and_075():
    gt = np.zeros((20, 20), dtype=int)
    gt[0:4, 0:5] = 1  # predicted exactly (IoU 1)
    gt[8:12, 0:5] = 2  # predicted shifted one column: overlap 16, union 24, IoU 2/3
    gt[14:18, 10:15] = 3  # missed
    pred = np.zeros_like(gt)
    pred[0:4, 0:5] = 7
    pred[8:12, 1:6] = 3
    pred[0:3, 15:18] = 9  # false positive
    # IoU >= 0.5: TP 2, FP 1, FN 1 -> 2/4. IoU >= 0.75: TP 1, FP 2, FN 2 -> 1/5.
    assert average_precision(pred, gt, 0.5) == pytest.approx(0.5)
    assert average_precision(pred, gt, 0.75) == pytest.approx(0.2)
    assert average_precision(gt, gt, 0.75) == 1.0
    assert average_precision(np.zeros_like(gt), np.zeros_like(gt)) == 1.0
    assert average_precision(np.zeros_like(gt), gt) == 0.0


# --- translation ------------------------------------------------------------------------------


def test_mae_psnr_known_answers():
    target = np.zeros((16, 16))
    pred = np.full((16, 16), 0.1)
    assert mae(pred, target) == pytest.approx(0.1)
    assert psnr(pred, target, data_range=1.0) == pytest.approx(20.0)  # 10 log10(1 / 0.01)
    target8 = np.zeros((16, 16), dtype=np.uint8)
    pred8 = np.full((16, 16), 5, dtype=np.uint8)  # MSE 25 -> 10 log10(255^2 / 25) = 20 log10 51
    assert psnr(pred8, target8, data_range=255) == pytest.approx(20 * math.log10(51))
    assert psnr(target, target, 1.0) == float("inf")


def test_ssim_identity_and_agreement_with_skimage():
    rng = np.random.default_rng(0)
    a = rng.random((32, 40))
    b = np.clip(a + 0.2 * rng.standard_normal(a.shape), 0, 1)
    assert ssim(a, a, data_range=1.0) == pytest.approx(1.0)
    ref = structural_similarity(
        b, a, data_range=1.0, gaussian_weights=True, sigma=1.5, use_sample_covariance=False
    )
    assert ssim(b, a, data_range=1.0) == pytest.approx(ref, abs=1e-5)
    # 16-bit range: joint rescaling inside ssim keeps float32 MONAI accurate.
    a16, b16 = (a * 60000).astype(np.uint16), (b * 60000).astype(np.uint16)
    ref16 = structural_similarity(
        b16, a16, data_range=65535, gaussian_weights=True, sigma=1.5, use_sample_covariance=False
    )
    assert ssim(b16, a16, data_range=65535) == pytest.approx(ref16, abs=1e-5)
    with pytest.raises(CellP2PError):
        ssim(a[:8, :8], a[:8, :8], 1.0)


# --- stacks -----------------------------------------------------------------------------------


def test_evaluate_arrays_segment_stack():
    prob, gt = _two_cells_with_membrane(0.35)
    probs = np.stack([prob, prob, np.where(gt > 0, 0.9, 0.1)])
    gts = np.stack([gt, gt, gt])
    result = evaluate_arrays(probs, gts, "segment", slice_ids=[5, 6, 7])
    assert result["task"] == "segment"
    assert [r["slice"] for r in result["per_slice"]] == [5, 6, 7]
    for row in result["per_slice"]:
        check(row, v_rand=1.0, v_info=1.0, pixel_error=0.0, dice_1=1.0, ap_50=1.0, ap_75=1.0)
    # Stack level: one threshold for all slices (the first with the best mean V_rand), though
    # slice 2 alone would score 1.0 from 0.1 on; the per-slice best is the labelled extra.
    assert [r["v_rand_threshold"] for r in result["per_slice"]] == pytest.approx([0.4] * 3)
    assert result["mean"]["v_rand_threshold"] == pytest.approx(0.4)
    assert result["mean"]["v_rand_best"] == 1.0 and result["mean"]["ap_mean"] >= 0.8
    json.dumps(result, allow_nan=False)  # plain Python numbers only

    # Instance labels for both: kind auto-detects labels; merging the two cells of slice 0.
    gt_lab = np.stack([segments_from_binary(g) for g in gts])
    pred_lab = gt_lab.copy()
    pred_lab[0][pred_lab[0] == 2] = 1
    res = evaluate_arrays(pred_lab, gt_lab)
    first = res["per_slice"][0]
    # Thinning absorbs the membrane between two pixels of one label: one segment, V_rand 2/3.
    check(first, v_rand=2 / 3, v_rand_merge=0.5, v_rand_threshold=0.5)
    # The merged instance (256 px) has IoU 128/256 = 0.5 with each gt cell: IoU >= 0.5 matches
    # one of them (TP 1, FN 1 -> 1/2); nothing matches at 0.75.
    assert (first["ap_50"], first["ap_75"]) == (0.5, 0.0)
    assert res["mean"]["ap_50"] == pytest.approx(5 / 6)
    assert res["mean"]["ap_75"] == pytest.approx(2 / 3)
    with pytest.raises(CellP2PError):
        evaluate_arrays(probs, gts[:2])


def test_evaluate_arrays_translate_stack_and_table():
    rng = np.random.default_rng(1)
    target = rng.integers(0, 256, size=(3, 16, 16)).astype(np.uint8)
    pred = target.copy()
    pred[1] = np.clip(pred[1].astype(int) + 5, 0, 255).astype(np.uint8)
    pred[2] = 255 - target[2]
    result = evaluate_arrays(pred, target, "translate")
    rows = result["per_slice"]
    assert [r["slice"] for r in rows] == [0, 1, 2]
    assert rows[0]["psnr"] == float("inf") and rows[0]["ssim"] == pytest.approx(1.0)
    assert rows[0]["mae"] == 0.0
    assert rows[1]["psnr"] > 30 and rows[2]["ssim"] < 0.5  # data_range defaults to 255
    assert result["mean"]["mae"] == pytest.approx(np.mean([r["mae"] for r in rows]))
    assert result["mean"]["psnr"] == float("inf")
    json.loads(json.dumps(result))

    table = format_table(result)
    lines = table.splitlines()
    assert lines[0].split() == ["slice", "mae", "psnr", "ssim"]
    assert len(lines) == 2 + 3 + 1
    assert lines[-1].split()[0] == "mean" and "inf" in lines[-1]


def test_isbi_stack_level_threshold_is_not_the_per_slice_best():
    prob, gt = _two_cells_with_membrane(0.35)  # parted from threshold 0.4 on
    low = np.where(gt > 0, 0.2, 0.05)  # parted only below 0.2
    result = evaluate_arrays(np.stack([prob, prob, low]), np.stack([gt, gt, gt]), "segment")
    mean = result["mean"]
    assert mean["v_rand_best"] == 1.0  # each slice at its own best threshold
    assert mean["v_rand"] < 1.0  # one threshold for the stack cannot part every slice
    assert len({r["v_rand_threshold"] for r in result["per_slice"]}) == 1
