"""Metrics against hand-worked cases, scikit-learn, and a brute-force AUPRO."""

from __future__ import annotations

import logging
import math

import numpy as np
import pytest
from scipy import ndimage
from sklearn.metrics import average_precision_score, precision_recall_curve, roc_auc_score

from funad.errors import DataError
from funad.metrics import _descending_order, aupro, image_metrics, pixel_metrics, pro_curve


# --------------------------------------------------------------------------- image level


def test_image_metrics_by_hand():
    # Descending: 0.9(1) 0.8(0) 0.7(1) 0.1(0). Pairs (pos, neg) ranked right: (0.9>0.8), (0.9>0.1),
    # (0.7>0.1), wrong: (0.7<0.8) -> AUROC 3/4. AP = 1/2 * 1 + 1/2 * 2/3 = 5/6.
    # F1 at t=0.9: P=1, R=1/2 -> 2/3; t=0.7: P=2/3, R=1 -> 4/5; t=0.1: P=1/2 -> 2/3.
    m = image_metrics([1, 0, 1, 0], [0.9, 0.8, 0.7, 0.1])
    assert m["image_auroc"] == pytest.approx(0.75)
    assert m["image_ap"] == pytest.approx(5 / 6)
    assert m["image_f1_max"] == pytest.approx(0.8)
    assert m["image_f1_threshold"] == pytest.approx(0.7)


def test_image_metrics_ties_count_half():
    # One positive tied with one negative, everything else separated: AUROC = (1 + 0.5) / 2.
    m = image_metrics([1, 0, 0], [0.5, 0.5, 0.1])
    assert m["image_auroc"] == pytest.approx(0.75)


@pytest.mark.parametrize("seed", range(5))
def test_image_metrics_match_sklearn(seed):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, 200)
    labels[:2] = [0, 1]
    # Rounded scores create many ties, the case where curve construction matters.
    scores = np.round(rng.normal(size=200) + labels * 0.8, 1)
    m = image_metrics(labels, scores)
    assert m["image_auroc"] == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)
    assert m["image_ap"] == pytest.approx(average_precision_score(labels, scores), abs=1e-12)
    precision, recall, thresholds = precision_recall_curve(labels, scores)
    with np.errstate(invalid="ignore"):
        f1 = np.nan_to_num(2 * precision * recall / (precision + recall))
    assert m["image_f1_max"] == pytest.approx(f1.max(), abs=1e-12)
    # The threshold reproduces the F1-max when used as "anomalous if score >= t".
    pred = scores >= m["image_f1_threshold"]
    tp = np.sum(pred & (labels == 1))
    assert 2 * tp / (pred.sum() + labels.sum()) == pytest.approx(m["image_f1_max"])
    assert m["image_f1_threshold"] in set(thresholds.tolist())


def test_image_metrics_all_scores_equal():
    m = image_metrics([0, 1, 0, 1, 1], np.full(5, 3.0))
    assert m["image_auroc"] == pytest.approx(0.5)
    assert m["image_ap"] == pytest.approx(0.6)  # the positive rate
    assert m["image_f1_max"] == pytest.approx(2 * 0.6 / 1.6)
    assert m["image_f1_threshold"] == 3.0


def test_image_metrics_no_anomalies_is_nan_with_warning(caplog):
    with caplog.at_level(logging.WARNING, logger="funad.metrics"):
        m = image_metrics([0, 0, 0], [0.1, 0.2, 0.3])
    assert all(math.isnan(v) for v in m.values())
    assert "no anomalous samples" in caplog.text


def test_image_metrics_only_anomalies():
    m = image_metrics([1, 1], [0.1, 0.2])
    assert math.isnan(m["image_auroc"])
    assert m["image_ap"] == 1.0
    assert m["image_f1_max"] == pytest.approx(1.0)
    assert m["image_f1_threshold"] == pytest.approx(0.1)


def test_image_metrics_bad_input():
    with pytest.raises(DataError, match="-1"):
        image_metrics([0, 1, -1], [0.1, 0.2, 0.3])
    with pytest.raises(DataError, match="3 image labels but 2"):
        image_metrics([0, 1, 1], [0.1, 0.2])
    with pytest.raises(DataError, match="non-finite"):
        image_metrics([0, 1], [0.1, np.nan])


# --------------------------------------------------------------------------- pixel level


def test_pixel_metrics_match_sklearn():
    rng = np.random.default_rng(0)
    masks = np.zeros((4, 16, 12), dtype=np.uint8)
    masks[1, 3:7, 2:6] = 255  # 0/255 masks as stored on disk
    masks[3, 10:15, 8:11] = 1
    maps = (rng.random(masks.shape) + 0.7 * (masks > 0)).astype(np.float32)
    maps[0] = np.round(maps[0], 1)  # ties
    m = pixel_metrics(masks, maps)
    y, s = (masks > 0).ravel(), maps.ravel()
    assert m["pixel_auroc"] == pytest.approx(roc_auc_score(y, s), abs=1e-9)
    assert m["pixel_ap"] == pytest.approx(average_precision_score(y, s), abs=1e-9)
    # F1-max: the best F1 of "anomalous if map >= t" over every t, reached at the threshold it names
    from sklearn.metrics import f1_score

    best = max(f1_score(y, s >= t) for t in np.unique(s))
    assert m["pixel_f1_max"] == pytest.approx(best, abs=1e-9)
    assert f1_score(y, s >= m["pixel_f1_threshold"]) == pytest.approx(best, abs=1e-9)


def test_descending_order_of_float32_matches_argsort():
    rng = np.random.default_rng(1)
    x = np.concatenate([rng.normal(0, 1e3, 500), rng.normal(0, 1e-30, 50), np.round(rng.random(300), 1),
                        [0.0, -0.0, np.finfo(np.float32).max, -np.finfo(np.float32).max, 1e-45, -1e-45]])
    x = rng.permutation(x).astype(np.float32)
    order = _descending_order(x)
    assert sorted(order.tolist()) == list(range(x.size))  # a permutation
    assert np.array_equal(x[order], np.sort(x)[::-1])  # the same values in the same order as argsort's
    assert np.array_equal(_descending_order(x.astype(np.float64)), np.argsort(x.astype(np.float64))[::-1])


def test_pixel_metrics_perfect_and_equal_maps():
    masks = np.zeros((2, 4, 4), dtype=np.uint8)
    masks[0, 1:3, 1:3] = 1
    assert pixel_metrics(masks, masks.astype(np.float32)) == {"pixel_auroc": 1.0, "pixel_ap": 1.0,
                                                              "pixel_f1_max": 1.0, "pixel_f1_threshold": 1.0}
    flat = pixel_metrics(masks, np.zeros(masks.shape, np.float32))
    assert flat["pixel_auroc"] == pytest.approx(0.5)
    assert flat["pixel_ap"] == pytest.approx(4 / 32)


def test_pixel_metrics_no_anomalous_pixel_is_nan(caplog):
    with caplog.at_level(logging.WARNING, logger="funad.metrics"):
        m = pixel_metrics(np.zeros((2, 3, 3), np.uint8), np.random.default_rng(0).random((2, 3, 3)))
    assert math.isnan(m["pixel_auroc"]) and math.isnan(m["pixel_ap"])
    assert "undefined" in caplog.text


def test_pixel_metrics_shape_mismatch_names_both():
    with pytest.raises(DataError, match=r"\(2, 4, 4\).*\(2, 8, 8\)"):
        pixel_metrics(np.zeros((2, 4, 4)), np.zeros((2, 8, 8)))


# --------------------------------------------------------------------------- AUPRO


def _brute_force_aupro(masks, maps, limit):
    """Threshold by threshold with explicit region loops, then np.interp at the limit."""
    gt = masks > 0
    labelled = [ndimage.label(g, structure=np.ones((3, 3)))[0] for g in gt]
    regions = [(i, lab == k) for i, lab in enumerate(labelled) for k in range(1, lab.max() + 1)]
    neg = ~gt
    xs, ys = [0.0], [0.0]
    for t in np.unique(maps)[::-1]:
        pred = maps >= t
        xs.append((pred & neg).sum() / neg.sum())
        ys.append(np.mean([(pred[i] & r).sum() / r.sum() for i, r in regions]))
    xs.append(1.0)
    ys.append(1.0)
    xs, ys = np.array(xs), np.array(ys)
    # pros at equal fpr: the last one (largest) governs the right end of a vertical step.
    y_at = ys[np.searchsorted(xs, limit, side="right") - 1]
    if limit not in xs:
        i = np.searchsorted(xs, limit, side="right")
        y_at = ys[i - 1] + (ys[i] - ys[i - 1]) * (limit - xs[i - 1]) / (xs[i] - xs[i - 1])
    keep = xs <= limit
    x = np.append(xs[keep], limit)
    y = np.append(ys[keep], y_at)
    return np.sum((x[1:] - x[:-1]) * (y[1:] + y[:-1]) / 2) / limit


def test_aupro_by_hand_single_region():
    # One 1x4 image, one region {2, 3}. Descending: 0.9 (region) 0.4 (neg) 0.3 (region) 0.1 (neg).
    # Curve (0,0) (0,.5) (.5,.5) (.5,1) (1,1): up to 0.3 the PRO is 0.5 -> area 0.15 / 0.3 = 0.5.
    # Up to 1: 0.5 * 0.5 + 0.5 * 1 = 0.75.
    masks = np.array([[[0, 0, 1, 1]]], dtype=np.uint8)
    maps = np.array([[[0.1, 0.4, 0.3, 0.9]]])
    assert aupro(masks, maps) == pytest.approx(0.5)
    assert aupro(masks, maps, fpr_limit=1.0) == pytest.approx(0.75)


def test_aupro_mean_over_regions_uses_8_connectivity():
    # The three pixels touch diagonally: one region of 3 with 8-connectivity (PRO 1/3 after the
    # first pixel), two regions {(0,0)} and {(1,1),(1,2)} with 4-connectivity (PRO 1/2).
    masks = np.array([[[1, 0, 0], [0, 1, 1], [0, 0, 0]]], dtype=np.uint8)
    maps = np.array([[[9, 1, 2], [3, 4, 5], [6, 7, 8]]], dtype=np.float64)
    fprs, pros = pro_curve(masks, maps)
    assert fprs[1] == 0.0 and pros[1] == pytest.approx(1 / 3)


def test_aupro_two_regions_in_two_images_by_hand():
    # Image 0 region A = 2 pixels, image 1 region B = 1 pixel, 3 negatives (one in a good image).
    # Descending: A (PRO 1/4), neg (FPR 1/3), B (PRO 3/4), A (PRO 1), neg, neg.
    # Up to 0.3: PRO 1/4 from 0 to 0.3 -> 0.25 (FPR 1/3 lies beyond the limit; interpolation
    # between (0, 1/4) and (1/3, 1/4) gives 1/4).
    masks = np.zeros((3, 1, 2), dtype=np.uint8)
    masks[0, 0, :] = 1
    masks[1, 0, 0] = 1
    maps = np.array([[[6.0, 3.0]], [[4.0, 2.0]], [[5.0, 1.0]]])
    assert aupro(masks, maps) == pytest.approx(0.25)
    # Up to 1: 1/3 * 1/4 + 0 (vertical) + ... points (1/3,1) (2/3,1) (1,1): 2/3 * 1 -> 1/12 + 2/3.
    assert aupro(masks, maps, fpr_limit=1.0) == pytest.approx(1 / 12 + 2 / 3)


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("dtype", [np.float64, np.float32])  # float32 maps take the packed-sort path
def test_aupro_matches_brute_force(seed, dtype):
    rng = np.random.default_rng(seed)
    masks = np.zeros((5, 12, 12), dtype=np.uint8)
    masks[0, 2:5, 2:6] = 1
    masks[0, 8:11, 8:10] = 1
    masks[2, 5:9, 1:3] = 1
    masks[3, 0:2, 10:12] = 1
    maps = np.round(rng.random(masks.shape) + 0.5 * masks, 2).astype(dtype)  # ties across images
    for limit in (0.05, 0.3, 1.0):
        assert aupro(masks, maps, limit) == pytest.approx(_brute_force_aupro(masks, maps, limit), abs=1e-9)


def test_aupro_all_scores_equal_is_half_the_limit():
    masks = np.zeros((2, 5, 5), dtype=np.uint8)
    masks[0, 1:3, 1:4] = 1
    assert aupro(masks, np.ones(masks.shape)) == pytest.approx(0.15)


def test_aupro_perfect_map_is_one():
    masks = np.zeros((3, 6, 6), dtype=np.uint8)
    masks[0, 1:3, 1:4] = 1
    masks[2, 4:6, 0:2] = 1
    assert aupro(masks, masks + 0.0) == pytest.approx(1.0)


def test_aupro_region_free_masks_is_nan_with_warning(caplog):
    with caplog.at_level(logging.WARNING, logger="funad.metrics"):
        value = aupro(np.zeros((3, 4, 4), np.uint8), np.random.default_rng(0).random((3, 4, 4)))
    assert math.isnan(value)
    assert "no ground-truth region" in caplog.text


def test_aupro_rejects_bad_limit():
    with pytest.raises(DataError, match="fpr_limit"):
        aupro(np.zeros((1, 2, 2)), np.zeros((1, 2, 2)), fpr_limit=0.0)


@pytest.mark.realdata
def test_real_bottle_masks(shared_dir):
    """Real MVTec masks (several regions per image, 0/255): AUPRO bounds and sklearn agreement."""
    from PIL import Image

    gt_dir = shared_dir / "data" / "mvtec_ad" / "bottle" / "ground_truth"
    files = sorted(gt_dir.glob("*/*_mask.png"))[::6]
    if not files:
        pytest.skip(f"no masks under {gt_dir}")
    masks = np.stack([np.asarray(Image.open(f).convert("L").resize((64, 64), Image.NEAREST)) for f in files])
    masks = np.concatenate([masks, np.zeros((3, 64, 64), np.uint8)])  # good images count as negatives
    rng = np.random.default_rng(0)
    maps = ndimage.gaussian_filter((masks > 0).astype(np.float32), (0, 2, 2)) + 0.3 * rng.random(masks.shape)
    assert aupro(masks, masks.astype(np.float32)) == pytest.approx(1.0)
    assert aupro(masks, np.zeros(masks.shape)) == pytest.approx(0.15)
    assert 0.5 < aupro(masks, maps) < 1.0
    m = pixel_metrics(masks, maps)
    assert m["pixel_auroc"] == pytest.approx(roc_auc_score((masks > 0).ravel(), maps.ravel()), abs=1e-9)
