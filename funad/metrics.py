"""Evaluation metrics: image AUROC/AP/F1-max, pixel AUROC/AP and AUPRO.

Plain functions on arrays that return floats or dicts of floats. Higher scores
mean more anomalous. Every curve is built the way scikit-learn builds it (one
descending sort, one point per distinct score, the last of a run of ties), so
the results equal ``roc_auc_score``, ``average_precision_score`` and
``precision_recall_curve`` without holding their float64 copies of millions of
pixels: the pixel metrics sort the scores once, in their own dtype (float32
maps stay float32), and accumulate counts.

AUPRO follows the official MVTec AD evaluation code (``compute_pro`` and
``trapezoid`` in ``mvtec_ad_evaluation``), step by step; see :func:`aupro`.

Undefined metrics (no anomalous or no normal sample, no ground-truth region)
return ``nan`` and log a warning instead of raising, so that an evaluation of
a test set without anomalies still reports its counts.
"""

from __future__ import annotations

import logging
from typing import Optional

import numpy as np
from scipy import ndimage

from .errors import DataError

logger = logging.getLogger(__name__)

_NAN = float("nan")


# --------------------------------------------------------------------------- helpers


def _as_binary_labels(labels: np.ndarray, what: str) -> np.ndarray:
    labels = np.asarray(labels)
    if labels.dtype == bool:
        return labels
    values = np.unique(labels)
    if not np.isin(values, (0, 1)).all():
        raise DataError(f"{what} must be 0 (normal) or 1 (anomalous), found values {values[:10].tolist()}; "
                        "drop unlabelled (-1) samples before computing metrics")
    return labels == 1


def _as_scores(scores: np.ndarray, what: str) -> np.ndarray:
    scores = np.asarray(scores)
    if not np.issubdtype(scores.dtype, np.number):
        raise DataError(f"{what} must be numeric, got dtype {scores.dtype}")
    if not np.isfinite(scores).all():
        bad = int((~np.isfinite(scores)).sum())
        raise DataError(f"{what} contain {bad} non-finite value(s) (nan or inf); check the model's output")
    return scores


def _descending_order(scores: np.ndarray) -> np.ndarray:
    """A permutation that sorts ``scores`` (1-D, finite) in descending order; ties in any order.

    float32 scores (anomaly maps) of fewer than 2**32 values take a faster
    path than ``np.argsort``: each score becomes an order-preserving 32-bit
    integer key, packed above its 32-bit index into one int64, and the packed
    values are sorted by value (numpy's vectorised sort) instead of by index.
    The sorted scores are the same as through ``np.argsort``; only the order
    of the indices within a run of tied scores may differ, which no curve
    here depends on (each keeps the last point of every run of ties).
    """
    if scores.dtype != np.float32 or scores.size >= 2**32:
        return np.argsort(scores)[::-1]
    bits = scores.view(np.int32)
    key = (bits ^ ((bits >> 31) & 0x7FFFFFFF)).astype(np.int64)  # order-preserving for finite floats
    key <<= 32
    key |= np.arange(scores.size, dtype=np.int64)
    key.sort()
    key &= 0xFFFFFFFF
    return key[::-1]


def _binary_curve(positive: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Cumulative true/false positives at every distinct score, descending.

    Args:
        positive: bool (n,).
        scores: (n,) finite.

    Returns:
        ``(tps, fps, thresholds)``, each (n_distinct,): predicting "anomalous"
        for ``score >= thresholds[i]`` gives ``tps[i]`` true and ``fps[i]``
        false positives (scikit-learn's ``_binary_clf_curve``).
    """
    order = _descending_order(scores)
    sorted_scores = scores[order]
    sorted_pos = positive[order]
    del order
    # The last index of each run of equal scores.
    last = np.flatnonzero(np.diff(sorted_scores)) if sorted_scores.size > 1 else np.empty(0, dtype=np.intp)
    last = np.append(last, sorted_scores.size - 1)
    tps = np.cumsum(sorted_pos, dtype=np.int64)[last]
    fps = (last + 1) - tps
    return tps, fps, sorted_scores[last]


def _undefined(metric: str, n_pos: int, n_neg: int) -> bool:
    """True (and a warning) when ``metric`` needs both classes and one is missing."""
    if n_pos > 0 and n_neg > 0:
        return False
    missing = "anomalous" if n_pos == 0 else "normal"
    logger.warning("%s is undefined: the evaluated set has no %s samples (%d anomalous, %d normal); "
                   "reporting nan", metric, missing, n_pos, n_neg)
    return True


def _auroc_ap(tps: np.ndarray, fps: np.ndarray) -> tuple[float, float]:
    """AUROC (trapezoid) and AP (step sum) from a curve of cumulative counts."""
    n_pos, n_neg = tps[-1], fps[-1]
    tpr = np.concatenate(([0.0], tps / n_pos))
    fpr = np.concatenate(([0.0], fps / n_neg))
    auroc = float(np.sum(np.diff(fpr) * (tpr[1:] + tpr[:-1])) / 2.0)
    precision = tps / (tps + fps)
    ap = float(np.sum(np.diff(tpr) * precision))
    return auroc, ap


# --------------------------------------------------------------------------- image level


def image_metrics(labels: np.ndarray, scores: np.ndarray) -> dict[str, float]:
    """Image-level AUROC, average precision and the best F1 over thresholds.

    Args:
        labels: (n_images,) 0 normal / 1 anomalous (bool accepted).
        scores: (n_images,) image anomaly scores, higher = more anomalous.

    Returns:
        ``{"image_auroc", "image_ap", "image_f1_max", "image_f1_threshold"}``.
        ``image_f1_threshold`` is the score t such that "anomalous if
        score >= t" reaches ``image_f1_max`` (the highest such t when several
        do). AUROC is ``nan`` when either class is missing; AP, F1-max and
        its threshold are ``nan`` when there is no anomalous image. A warning
        is logged in both cases.
    """
    positive = _as_binary_labels(labels, "image labels").ravel()
    scores = _as_scores(scores, "image scores").ravel().astype(np.float64)
    if positive.shape != scores.shape:
        raise DataError(f"got {positive.size} image labels but {scores.size} image scores; they must pair up")
    if positive.size == 0:
        raise DataError("no images to evaluate (0 labels and scores)")
    n_pos = int(positive.sum())
    n_neg = positive.size - n_pos
    tps, fps, thresholds = _binary_curve(positive, scores)

    out = {"image_auroc": _NAN, "image_ap": _NAN, "image_f1_max": _NAN, "image_f1_threshold": _NAN}
    if not _undefined("image AUROC", n_pos, n_neg):
        out["image_auroc"], out["image_ap"] = _auroc_ap(tps, fps)
    if n_pos > 0:
        if n_neg == 0:
            out["image_ap"] = 1.0
        # F1 = 2PR / (P + R) = 2 tp / (tp + fp + n_pos), defined at every point.
        f1 = 2.0 * tps / (tps + fps + n_pos)
        best = int(np.argmax(f1))  # first maximum in descending order = highest threshold
        out["image_f1_max"] = float(f1[best])
        out["image_f1_threshold"] = float(thresholds[best])
    return out


# --------------------------------------------------------------------------- pixel level


def _check_maps(masks, maps):
    """(n, H, W) arrays -> (positive bool (n, H, W), maps); lists of per-image 2-D arrays (images of different
    sizes) -> lists of the same."""
    if isinstance(masks, (list, tuple)) or isinstance(maps, (list, tuple)):
        if len(masks) != len(maps):
            raise DataError(f"{len(masks)} masks but {len(maps)} anomaly maps; give one map per mask")
        pairs = [_check_maps(np.asarray(m)[None], np.asarray(a)[None]) for m, a in zip(masks, maps)]
        return [g[0] for g, _ in pairs], [a[0] for _, a in pairs]
    masks = np.asarray(masks)
    maps = np.asarray(maps)
    if masks.ndim != 3 or maps.ndim != 3:
        raise DataError(f"masks and maps must have shape (n_images, H, W), got masks {masks.shape} "
                        f"and maps {maps.shape}")
    if masks.shape != maps.shape:
        raise DataError(f"masks have shape {masks.shape} but anomaly maps have shape {maps.shape}; "
                        "build the maps at the masks' size (anomaly_map.patch_scores_to_maps out_size)")
    _as_scores(maps, "anomaly maps")
    return masks > 0, maps


def all_pixels(x) -> np.ndarray:
    """All pixels of an (n, H, W) array or of a list of 2-D arrays, as one 1-D array."""
    return np.concatenate([a.ravel() for a in x]) if isinstance(x, list) else x.ravel()


def pixel_metrics(masks: np.ndarray, maps: np.ndarray) -> dict[str, float]:
    """Pixel-level AUROC and average precision over all pixels of all images.

    Args:
        masks: (n_images, H, W) ground truth, nonzero = anomalous (0/1 or 0/255);
            images without defects contribute all-zero masks. Images of different
            sizes: a list of (H_i, W_i) arrays (here and in :func:`aupro`).
        maps: (n_images, H, W) pixel anomaly scores, same shape (or a list).

    Returns:
        ``{"pixel_auroc", "pixel_ap", "pixel_f1_max", "pixel_f1_threshold"}``, all
        ``nan`` (with a warning) when no pixel is anomalous or none is normal.
        F1-max and its threshold are as in :func:`image_metrics`, over pixels:
        a figure chosen with the masks, to set beside the F1 of a threshold
        chosen without them.

    Memory: about 36 bytes per pixel at peak (440 MiB for 83 images of
    392x392 in ``benchmarks/bench_eval.py``; scikit-learn needs 700 MiB).
    """
    positive, maps = _check_maps(masks, maps)
    positive = all_pixels(positive)
    n_pos = int(positive.sum())
    if _undefined("pixel AUROC/AP", n_pos, positive.size - n_pos):
        return {"pixel_auroc": _NAN, "pixel_ap": _NAN, "pixel_f1_max": _NAN, "pixel_f1_threshold": _NAN}
    tps, fps, thresholds = _binary_curve(positive, all_pixels(maps))
    auroc, ap = _auroc_ap(tps, fps)
    f1 = 2.0 * tps / (tps + fps + n_pos)
    best = int(np.argmax(f1))
    return {"pixel_auroc": auroc, "pixel_ap": ap, "pixel_f1_max": float(f1[best]),
            "pixel_f1_threshold": float(thresholds[best])}


# --------------------------------------------------------------------------- AUPRO


def pro_curve(masks: np.ndarray, maps: np.ndarray) -> Optional[tuple[np.ndarray, np.ndarray]]:
    """The (FPR, PRO) curve of the official MVTec AD evaluation (``compute_pro``).

    Args:
        masks: (n_images, H, W) ground truth, nonzero = anomalous.
        maps: (n_images, H, W) pixel anomaly scores.

    Returns:
        ``(fprs, pros)`` float64 arrays starting at (0, 0) and ending at (1, 1),
        one point per distinct score; ``None`` (with a warning) when the masks
        have no region or no normal pixel.
    """
    gt, maps = _check_maps(masks, maps)
    structure = np.ones((3, 3), dtype=int)  # 8-connectivity
    pro_change = [np.zeros(g.shape, dtype=np.float64) for g in gt]
    n_regions = 0
    for i in range(len(gt)):
        labelled, n = ndimage.label(gt[i], structure=structure)
        if n == 0:
            continue
        sizes = np.bincount(labelled.ravel(), minlength=n + 1).astype(np.float64)
        weight = np.zeros(n + 1, dtype=np.float64)
        weight[1:] = 1.0 / sizes[1:]
        pro_change[i] = weight[labelled]  # 1 / region size on region pixels, 0 elsewhere
        n_regions += n
    gt = all_pixels(gt)
    n_negatives = int((~gt).sum())
    if n_regions == 0 or n_negatives == 0:
        what = "no ground-truth region" if n_regions == 0 else "no normal pixel"
        logger.warning("AUPRO is undefined: the masks have %s (%d images); reporting nan", what, len(pro_change))
        return None
    pro_change = all_pixels(pro_change)

    scores = all_pixels(maps)
    order = _descending_order(scores)
    scores = scores[order]
    fps = np.cumsum(~gt[order], dtype=np.int64)
    pros = np.cumsum(pro_change[order])
    del order, pro_change
    # Keep only the last point of every run of tied scores: it includes all of them.
    keep = np.append(np.diff(scores) != 0, True)
    fprs = np.minimum(fps[keep] / n_negatives, 1.0)
    pros = np.minimum(pros[keep] / n_regions, 1.0)
    return np.concatenate(([0.0], fprs, [1.0])), np.concatenate(([0.0], pros, [1.0]))


def _trapezoid_to(x: np.ndarray, y: np.ndarray, x_max: float) -> float:
    """Area under (x, y) for x <= x_max, interpolating y at x_max (official ``trapezoid``)."""
    correction = 0.0
    if not np.any(x == x_max):
        ins = int(np.searchsorted(x, x_max, side="right"))  # bisect.bisect_right
        y_interp = y[ins - 1] + (y[ins] - y[ins - 1]) * (x_max - x[ins - 1]) / (x[ins] - x[ins - 1])
        correction = 0.5 * (y_interp + y[ins - 1]) * (x_max - x[ins - 1])
    keep = x <= x_max
    x, y = x[keep], y[keep]
    return float(np.sum(0.5 * (y[1:] + y[:-1]) * (x[1:] - x[:-1])) + correction)


def aupro(masks: np.ndarray, maps: np.ndarray, fpr_limit: float = 0.3) -> float:
    """Normalised area under the per-region-overlap curve up to ``fpr_limit``.

    The official MVTec AD definition:

    1. Label the connected regions of every mask with 8-connectivity.
    2. The negatives are all pixels with ground truth 0 across the set, good
       images included.
    3. Sort all pixel scores in descending order. At each threshold the FPR
       is the cumulative count of negatives over their total, and the PRO is
       the mean over regions of each region's recall (accumulate 1/region_size
       per covered region pixel, divide by the number of regions).
    4. Keep the last point of tied scores, clip to 1, prepend (0, 0) (and
       append (1, 1), which the official code also does).
    5. Integrate with the trapezoid rule up to ``fpr_limit``, with a point
       interpolated at ``fpr_limit``, and divide by ``fpr_limit``.

    Args:
        masks: (n_images, H, W) ground truth, nonzero = anomalous.
        maps: (n_images, H, W) pixel anomaly scores.
        fpr_limit: upper integration limit in (0, 1].

    Memory: about 45 bytes per pixel at peak (550 MiB for 83 images of 392x392).

    Returns:
        AUPRO in [0, 1]; a constant map gives ``fpr_limit / 2``.
        ``nan`` with a logged warning when the masks contain no anomalous
        region (or no normal pixel), instead of raising.
    """
    if not 0.0 < fpr_limit <= 1.0:
        raise DataError(f"fpr_limit must lie in (0, 1], got {fpr_limit}")
    curve = pro_curve(masks, maps)
    if curve is None:
        return _NAN
    fprs, pros = curve
    return _trapezoid_to(fprs, pros, fpr_limit) / fpr_limit
