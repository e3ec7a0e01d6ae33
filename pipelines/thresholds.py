"""Unlabelled decision thresholds: chosen at the end of ``funad fit``, reported by eval and sweep, used by predict.

At the end of a fit the training images (unlabelled, possibly contaminated)
are scored, and an image threshold and a pixel threshold are chosen from
those scores with a rule of :mod:`funad.threshold` (no label is read): by
default ``"auto"``, which is ``mad`` for the default preset's clean-image kNN
and ``quantile`` for every other model (:func:`auto_rule`). The
record goes into config.json under ``"threshold"``::

    rule, params        the rule's name and its parameters (expected_contamination, mad_k, scale)
    image               the image threshold: an image is anomalous when its score >= image
    pixel               the pixel threshold: a map pixel is anomalous when its value >= pixel
    candidates          {"image": {rule: threshold}, "pixel": {...}}: what every rule would have chosen
    training_scores     {"image": summary, "pixel_max": summary, "image_scores": [...]} of the training images scored
    training_images     how many training images there were (at most THRESHOLD_IMAGES of them are scored, below)
    how                 how the training images were scored (below)

How the training images are scored, per method:

- ``funad`` with ``scorer=localnet`` (presets ``fast`` and ``paper``): the
  Local-Net's scores of the training images (no bank is used at inference,
  so no image is compared with itself). Its scores are squashed into (0, 1),
  so the rule works on their logit (on the scores themselves with
  ``score_space=logit``).
- ``funad`` with ``scorer=clean_knn`` (the default preset): the kept clean
  images' patches are in the bank, so each of them is scored against the
  bank without its own patches (``FunAD.score_held_out``); the other
  training images against the whole bank. The rule works on the distances.
- ``knn`` / ``softpatch``: a training image's own patches are in the memory
  bank, so its plain score is about 0. Each training image is scored against
  the bank *without its own patches* (leave-one-image-out,
  ``KNNScorer.score_held_out``).

Training sets larger than ``THRESHOLD_IMAGES`` (256) are represented by a
seeded random sample of that many images: with the default scorer every
training image is compared with a bank that grows with the training set, and
scoring 1,000 of them took 339 s of a 500 s fit. The record's
``training_images`` says how many there were; its ``training_scores`` hold
those scored. MVTec AD bottle (230) and KolektorSDD (256) are scored whole.

The pixel threshold follows from the image threshold: take the maxima of the
anomaly maps (built as ``funad eval`` builds them) of the training images that
the image threshold calls normal; the threshold is their 0.9-quantile
(``--pixel-quantile``; 1 = their maximum, so that a map pixel above it is
higher than anything on a part judged normal). The maximum left most defect
pixels below it: pixel F1 at 0.58 of pixel F1-max on bottle and 0.32 on
KolektorSDD (full frame), against 0.92 and 0.97 for the 0.9-quantile (3 seeds
each, benchmarks/results/pixel-thresholds.md). (Applying the image rule
to the maps' maxima instead was tried on bottle: Otsu put it so high that
31 of 42 anomalous test images showed no region, against 39 of 42 with the
maximum, and no normal test image showed one with either.) When the image
threshold calls no training image normal, the rule is applied to the maps'
maxima.
"""

from __future__ import annotations

import logging
from typing import Optional

import numpy as np
import torch

from funad import anomaly_map
from funad.metrics import all_pixels
from funad import threshold as rules

from . import settings
from .errors import ModelDirError
from .progress import NullProgress, Progress
from .scoring import MAP_SIGMA, SCORE_CHUNK

logger = logging.getLogger(__name__)

THRESHOLD_KEY = "threshold"
RULES = rules.RULES
# "auto", the default: the rule that held up best for the model's kind of score on the dev data (the lowest
# image F1 at its threshold, as a share of F1-max, over bottle at 0-20% contamination and KolektorSDD in both
# geometries, 3 seeds each): mad for the default preset's clean-image kNN (lowest 0.87, where the quantile
# rule fell to 0.72 at 20% contamination, and otsu to 0.84); quantile for everything else (the Local-Net's
# scores: mad fell to 0.04; the baselines as before). BENCHMARKS.md, "Deciding without labels".
AUTO_RULE, DEFAULT_RULE = settings.AUTO_RULE, settings.DEFAULT_RULE
DEFAULT_EXPECTED_CONTAMINATION = rules.DEFAULT_EXPECTED_CONTAMINATION
DEFAULT_PIXEL_QUANTILE = rules.DEFAULT_PIXEL_QUANTILE
# At most this many training images are scored for the thresholds (a seeded random sample of larger training sets):
# with the default scorer, scoring 1,000 images took 339 s of a 500 s fit (benchmarks/results/scale-fit.md).
THRESHOLD_IMAGES = 256
F1_MAX_LABEL = "F1-max (threshold chosen with test labels)"
HOW = {
    "funad": "Local-Net scores of the training images; rules on the logit of the scores",
    "funad_logit": "Local-Net logits of the training images",
    "clean_knn": "the kept clean images scored against the bank without their own patches (leave-one-image-out), "
                 "the other training images against the whole bank",
    "baseline": "each training image scored against the bank without its own patches (leave-one-image-out)",
}


def rule_for(method: str, name: str = DEFAULT_RULE,
             expected_contamination: float = DEFAULT_EXPECTED_CONTAMINATION,
             mad_k: float = rules.DEFAULT_MAD_K,
             pixel_quantile: Optional[float] = DEFAULT_PIXEL_QUANTILE,
             config: Optional[dict] = None) -> rules.ThresholdRule:
    """The rule on the score scale of ``method`` and its ``config``: logit for the Local-Net's (0, 1) scores,
    identity for distances and logits. ``name="auto"`` is :func:`auto_rule`'s choice."""
    if name == AUTO_RULE:
        name = auto_rule(method, config)
    return rules.ThresholdRule(name, expected_contamination, mad_k, "logit" if _bounded(method, config) else
                               "identity", pixel_quantile)


def auto_rule(method: str, config: Optional[dict] = None) -> str:
    """What ``--threshold-rule auto`` picks: mad for FUN-AD with the clean-image kNN scorer (the default
    preset), quantile otherwise (see :data:`DEFAULT_RULE`)."""
    if method == "funad":
        from funad.config import FunADConfig

        if FunADConfig.from_dict(config or {}).scorer == "clean_knn":
            return "mad"
    return "quantile"


def _bounded(method: str, config: Optional[dict]) -> bool:
    """Whether ``method`` with ``config`` scores in (0, 1) (FUN-AD's Local-Net, sigmoid scores)."""
    if method != "funad":
        return False
    from funad.config import FunADConfig

    return FunADConfig.from_dict(config or {}).bounded_scores


def scored_images(n: int, limit: Optional[int]) -> np.ndarray:
    """Which of ``n`` training images the thresholds are chosen from: all of them, or ``limit`` drawn at
    random (seeded, sorted) when there are more (module docstring)."""
    if limit is None or n <= limit:
        return np.arange(n)
    return np.sort(np.random.default_rng(0).choice(n, size=limit, replace=False))


def training_scores(model, source, progress: Progress = NullProgress(),
                    limit: Optional[int] = None) -> tuple[np.ndarray, np.ndarray]:
    """``(patch scores (m, P), image scores (m,))`` of the training images in ``source`` that
    :func:`scored_images` picks, none scored against its own patches (every method's ``score_held_out``;
    module docstring)."""
    from .features import ProgressSource

    ids = scored_images(int(source.n_images), limit)
    task = progress.task("scoring training images", total=len(ids), unit="img")
    return model.score_held_out(ProgressSource(source, task), ids)


def map_maxima(patch_scores: np.ndarray, grid, mask_size, device: Optional[torch.device] = None) -> np.ndarray:
    """The maximum of each image's anomaly map (built as eval builds it), (n,) float32."""
    out = []
    for s in range(0, len(patch_scores), SCORE_CHUNK):
        maps = anomaly_map.patch_scores_to_maps(patch_scores[s:s + SCORE_CHUNK], tuple(grid), tuple(mask_size),
                                                sigma=MAP_SIGMA, device=device)
        out.append(np.asarray(maps).reshape(len(maps), -1).max(axis=1))
    return np.concatenate(out).astype(np.float32) if out else np.empty(0, dtype=np.float32)


def choose(patch_scores: np.ndarray, image_scores: np.ndarray, grid, mask_size, rule: rules.ThresholdRule,
           method: str, device: Optional[torch.device] = None, how: Optional[str] = None) -> dict:
    """The ``"threshold"`` record of config.json from the training images' scores (module docstring)."""
    maxima = map_maxima(patch_scores, grid, mask_size, device)
    images = rules.all_thresholds(image_scores, rule)
    pixels = {}
    for name, t in images.items():
        normal = maxima[np.asarray(image_scores) < t]
        pixels[name] = rules.pixel_threshold(normal, rule.pixel_quantile) if normal.size else \
            rules.choose_threshold(maxima, rules.ThresholdRule(name, rule.expected_contamination, rule.mad_k,
                                                               rule.scale))
    record = {
        "rule": rule.name,
        "params": rule.params(),
        "image": images[rule.name],
        "pixel": pixels[rule.name],
        "pixel_rule": ("the highest anomaly-map value on the training images the image threshold calls normal"
                       if rule.pixel_quantile is None or rule.pixel_quantile >= 1.0 else
                       f"the {rule.pixel_quantile:g}-quantile of the anomaly-map maxima of the training images the "
                       "image threshold calls normal"),
        "candidates": {"image": images, "pixel": pixels},
        "training_scores": {"image": rules.score_summary(image_scores), "pixel_max": rules.score_summary(maxima),
                            "image_scores": [float(s) for s in image_scores]},
        "how": HOW[how or ("funad" if method == "funad" else "baseline")],
        "labels_used": False,
    }
    logger.info("unlabelled thresholds (%s): image %.6g, pixel %.6g from %d training images", rule.name,
                record["image"], record["pixel"], len(image_scores))
    return record


def _how(model, method: str) -> str:
    """The key of :data:`HOW` that says how ``model``'s training images were scored."""
    if method != "funad":
        return "baseline"
    if model.config.scorer == "clean_knn":
        return "clean_knn"
    return "funad" if model.config.bounded_scores else "funad_logit"


def fit_thresholds(model, method: str, source, grid, mask_size, rule: rules.ThresholdRule, device: torch.device,
                   progress: Progress = NullProgress()) -> dict:
    """Score the fitted model's training images (``source``) and choose its thresholds."""
    patches, images = training_scores(model, source, progress, THRESHOLD_IMAGES)
    record = choose(patches, images, grid, mask_size, rule, method, device, how=_how(model, method))
    record["training_images"] = int(source.n_images)  # of which len(image_scores) were scored
    return record


# ------------------------------------------------------------------ readers


def recorded(info) -> Optional[dict]:
    """The model directory's threshold record, or None for a model fitted before thresholds existed."""
    return info.raw.get(THRESHOLD_KEY)


def require(info) -> dict:
    """The threshold record, or ModelDirError saying how to get one."""
    record = recorded(info)
    if not record:
        raise ModelDirError(f"{info.path / 'config.json'} records no unlabelled threshold (fitted by an older "
                            f"funad); re-fit the model, or pass --threshold")
    return record


def score_range(record: dict, key: str = "image") -> tuple[float, float]:
    """(min, max) of the training scores the threshold was chosen from."""
    summary = record["training_scores"]["image" if key == "image" else "pixel_max"]
    return float(summary["min"]), float(summary["max"])


def normalised(record: dict, scores, threshold: Optional[float] = None, key: str = "image") -> np.ndarray:
    """Scores in [0, 1] with the threshold (the record's, or ``threshold``) at 0.5 (funad.threshold.normalise)."""
    lo, hi = score_range(record, key)
    t = record[key] if threshold is None else threshold
    return rules.normalise(scores, t, lo, hi, record["params"]["scale"])


def at_thresholds(record: Optional[dict], labels: np.ndarray, image_scores: np.ndarray,
                  masks=None, maps=None) -> dict:
    """What eval and sweep report: P/R/F1 at the model's threshold and at every candidate rule's.

    With ``masks`` and ``maps`` (arrays (n, H, W) or lists of 2-D arrays, NaN = never scored, which is
    never flagged) also ``pixel_threshold``: pixel P/R/F1 of "map value >= the model's pixel threshold"
    against the masks.
    """
    if not record:
        return {"model_threshold": None, "candidates": {}}
    pixel = {}
    if masks is not None and maps is not None and record.get("pixel") is not None:
        pixel = {"pixel_threshold": rules.at_threshold(all_pixels(masks) > 0, all_pixels(maps), record["pixel"])}
    return {
        **pixel,
        "model_threshold": {"rule": record["rule"], **rules.at_threshold(labels, image_scores, record["image"])},
        "candidates": {name: rules.at_threshold(labels, image_scores, t)
                       for name, t in record["candidates"]["image"].items()},
        "note": "thresholds chosen from the unlabelled training scores; no test label was used to choose them",
    }
