"""The one scoring path: patch scores -> image scores and anomaly maps -> the report's metrics.

``funad eval``, every ``funad sweep`` cell and ``funad fit --select oracle``
call :func:`measure`, so all three build maps with the same Gaussian
(:data:`MAP_SIGMA`) on the cache's grid and mask size, and compute the same
metrics with :mod:`funad.metrics`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch

from funad import anomaly_map, metrics

from .progress import NullProgress, Progress

# Gaussian smoothing of the upsampled patch scores, in input pixels (FUNAD_SPEC "Inference").
MAP_SIGMA = 4.0
# Images scored at once when features come from memory.
SCORE_CHUNK = 32


@dataclass
class Measured:
    """Scores, maps and metrics of one set of labelled test images."""

    patch_scores: np.ndarray  # (n, P) float32, higher = more anomalous
    image_scores: np.ndarray  # (n,) the max patch score of each image
    maps: np.ndarray  # (n, H, W) float32 pixel anomaly maps
    metrics: dict  # image/pixel AUROC and AP, AUPRO@0.3, image F1-max and its threshold


def compute_metrics(labels: np.ndarray, image_scores: np.ndarray, masks: np.ndarray, maps: np.ndarray) -> dict:
    """The report's metrics, computed by ``funad.metrics``.

    Args:
        labels: (n,) 0/1 image labels. image_scores: (n,).
        masks: (n, H, W) 0/1 ground truth. maps: (n, H, W) pixel scores.
    """
    image = metrics.image_metrics(labels, image_scores)
    pixel = metrics.pixel_metrics(masks, maps)
    return {
        "image_auroc": image["image_auroc"],
        "pixel_auroc": pixel["pixel_auroc"],
        "aupro": metrics.aupro(masks, maps, fpr_limit=0.3),
        "image_ap": image["image_ap"],
        "pixel_ap": pixel["pixel_ap"],
        "image_f1_max": image["image_f1_max"],
        "image_f1_threshold": image["image_f1_threshold"],
        "pixel_f1_max": pixel["pixel_f1_max"],
        "pixel_f1_threshold": pixel["pixel_f1_threshold"],
    }


def measure(patch_scores: np.ndarray, labels: np.ndarray, masks: np.ndarray, grid: tuple[int, int], *,
            sigma: float = MAP_SIGMA, device: Optional[torch.device] = None,
            image_scores: Optional[np.ndarray] = None) -> Measured:
    """Image scores, anomaly maps (upsampled to the masks' size, Gaussian ``sigma``) and metrics.

    Args:
        patch_scores: (n, P) with P = grid_h * grid_w, row-major.
        labels: (n,) 0/1. masks: (n, H, W) 0/1; (H, W) is the maps' size.
        grid: the cache's patch grid (h, w).
        device: where the maps are built (default: the CPU).
        image_scores: (n,) the model's own image scores when they are not
            the max patch score (e.g. a re-weighted kNN); default: the max.
    """
    patch_scores = np.asarray(patch_scores, dtype=np.float32)
    maps = anomaly_map.patch_scores_to_maps(patch_scores, grid, masks.shape[1:], sigma=sigma, device=device)
    image_scores = patch_scores.max(axis=1) if image_scores is None else np.asarray(image_scores, dtype=np.float32)
    return Measured(patch_scores, image_scores, maps, compute_metrics(labels, image_scores, masks, maps))


# Why a class-token model has no pixel metrics (metrics.json["pixel_metrics_absent"], the eval CLI).
NO_PIXEL_METRICS = ("the model was fitted on class tokens alone (funad fit --tokens class): it gives one score per "
                    "image and no patch scores, so there is no anomaly map to compare with the masks")


def measure_images(image_scores: np.ndarray, labels: np.ndarray) -> Measured:
    """:func:`measure` for a class-token model: image metrics, pixel metrics NaN (:data:`NO_PIXEL_METRICS`)."""
    image_scores = np.asarray(image_scores, dtype=np.float32)
    image = metrics.image_metrics(labels, image_scores)
    nan = float("nan")
    values = {"image_auroc": image["image_auroc"], "pixel_auroc": nan, "aupro": nan, "image_ap": image["image_ap"],
              "pixel_ap": nan, "image_f1_max": image["image_f1_max"],
              "image_f1_threshold": image["image_f1_threshold"], "pixel_f1_max": nan, "pixel_f1_threshold": nan}
    return Measured(image_scores[:, None], image_scores, np.empty((len(image_scores), 0, 0), np.float32), values)


def model_scores(model, x: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """``(patch scores (n, P), image scores (n,))`` of one batch, float32.

    Models with their own image score (``model.score(x) -> (patches,
    images)``, e.g. PatchCore's re-weighted kNN) give it; for the others it
    is the max patch score.
    """
    if hasattr(model, "score"):
        patches, images = model.score(x)
    else:
        patches = model.score_patches(x)
        images = np.asarray(patches).max(axis=1)
    return np.asarray(patches, dtype=np.float32), np.asarray(images, dtype=np.float32)


def score_tensor(model, features: torch.Tensor, *, device: torch.device, chunk: int = SCORE_CHUNK,
                 with_images: bool = False):
    """Patch scores of in-memory features (n, P, D), ``chunk`` images at a time -> (n, P) float32.

    With ``with_images``: ``(patch scores, image scores (n,))`` (:func:`model_scores`).
    """
    parts = [model_scores(model, features[i:i + chunk].to(device)) for i in range(0, features.shape[0], chunk)]
    patches = (np.concatenate([p for p, _ in parts]) if parts
               else np.empty((0, features.shape[1]), dtype=np.float32))
    if not with_images:
        return patches
    return patches, (np.concatenate([i for _, i in parts]) if parts else np.empty(0, dtype=np.float32))


def score_cached(model, store, indices: np.ndarray, *, device: torch.device, batch_size: int = SCORE_CHUNK,
                 progress: Progress = NullProgress(), with_images: bool = False, tokens: str = "patch"):
    """Patch scores of cached images read from ``store`` in batches.

    Args:
        indices: (n,) image indices into the store.
        tokens: "patch", or "class" for a model fitted on the class tokens alone (P = 1).
    Returns:
        (n, P) float32 patch scores, higher = more anomalous; with
        ``with_images``, ``(patch scores, image scores (n,))`` (:func:`model_scores`).
    """
    from .features import read_tokens, token_shape

    out = np.empty((len(indices), token_shape(store, tokens)[0]), dtype=np.float32)
    images = np.empty(len(indices), dtype=np.float32)
    task = progress.task("scoring", total=len(indices), unit="img")
    pos = 0
    indices = np.asarray(indices, dtype=np.int64)
    chunks = (store.iter_features(indices, chunk=batch_size) if tokens == "patch" else
              ((indices[i:i + batch_size], read_tokens(store, indices[i:i + batch_size], tokens))
               for i in range(0, len(indices), batch_size)))
    for idx, feats in chunks:
        x = torch.from_numpy(np.asarray(feats, dtype=np.float32)).to(device)
        out[pos:pos + len(idx)], images[pos:pos + len(idx)] = model_scores(model, x)
        pos += len(idx)
        task.advance(len(idx))
    return (out, images) if with_images else out
