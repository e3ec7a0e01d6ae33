"""``funad eval``: metrics, per-image scores and pictures from the cache alone.

Evaluation reads a model directory (written by ``funad fit``) and the feature
cache it was fitted on. It scores the test images that the model's
contamination split defines (moved anomalies are already removed from the test
ids in the no-overlap setting and kept in the overlap setting), turns patch
scores into anomaly maps with the cache's grid and mask size, and writes
``metrics.json``, ``scores.csv`` and PNG pictures. No image file is opened:
the pictures use the previews stored in the cache.

Nothing is ever written into a model directory.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Optional, Sequence, Union

import numpy as np
import torch

from funad import cache

from . import thresholds
from .device import resolve_device
from .errors import ModelDirError, PipelineError
from .eval_report import (ORACLE_WARNING, TABLE_CAPTION, TABLE_COLUMNS, EvalResult, mean_row, metrics_record,
                          std_row, write_pictures, write_scores_csv, write_summary)
from .modeldir import ModelInfo, load_model_dir
from . import original_size
from .eval_report import _json_float
from .progress import NullProgress, Progress
from .sample_table import model_test_ids
from .scoring import MAP_SIGMA, NO_PIXEL_METRICS, measure, measure_images, score_cached

__all__ = ["evaluate", "evaluate_many", "EvalResult", "mean_row", "std_row", "write_summary", "TABLE_COLUMNS", "TABLE_CAPTION",
           "ORACLE_WARNING", "MAP_SIGMA", "place_model", "check_report_dir"]

logger = logging.getLogger(__name__)


# --------------------------------------------------------------------------- model-dir record


def resolve_cache_path(info: ModelInfo, override: Optional[Path]) -> Path:
    """The cache to evaluate on: ``override`` (``--cache``) or the path the model records.

    A relative recorded path is tried as written (relative to the working
    directory), then relative to the model directory.
    """
    if override is not None:
        return Path(override)
    recorded = info.cache.get("path")
    if not recorded:
        raise ModelDirError(f"{info.path / 'config.json'} records no cache path; pass the cache with --cache")
    recorded = Path(str(recorded))
    if recorded.is_absolute() or recorded.exists():
        return recorded
    beside = info.path / recorded
    return beside if beside.exists() else recorded


# --------------------------------------------------------------------------- scoring


def check_report_dir(report_dir: Path, model_dir: Path) -> None:
    """Refuse an output folder that is, or lies inside, the model directory (which is never written)."""
    rd, md = report_dir.resolve(), model_dir.resolve()
    if rd == md or md in rd.parents:
        raise PipelineError(
            f"output directory {report_dir} lies inside model directory {model_dir}; funad never writes into a "
            f"model directory after `funad fit`, choose another -o"
        )


def _labelled_test_ids(info: ModelInfo, store, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The split's test ids (in ``store``) and their 0/1 labels; raises when the split has none or some are
    unlabelled."""
    if len(ids) == 0:
        raise ModelDirError(
            f"model {info.path} has no test images to evaluate: the split in its config.json holds training "
            f"images only (an unlabelled folder is all training data). Score new images with "
            f"`funad predict {info.path} IMAGES... -o OUT` instead"
        )
    labels = np.asarray(store.labels)[ids].astype(np.int64)
    unknown = ids[labels < 0]
    if len(unknown):
        raise PipelineError(
            f"{len(unknown)} test image(s) of {store.path} have no label (e.g. "
            f"{store.samples[int(unknown[0])]['path']}); eval needs a labelled test set "
            f"(use `funad predict` to score unlabelled images)"
        )
    return ids, labels


def evaluate(model_dir: Path, report_dir: Path, *, cache_path: Optional[Path] = None, top_k: int = 5,
             device: str = "auto", pictures: bool = True, batch_size: int = 32, map_size: str = "auto",
             save_maps: Union[bool, str] = False, progress: Progress = NullProgress()) -> EvalResult:
    """Evaluate one model directory on its split's test images; write the report.

    Args:
        model_dir: a directory written by ``funad fit``.
        report_dir: where metrics.json, scores.csv and the PNGs go (created).
        cache_path: the feature cache; default: the one the model records.
        top_k: pictures of the K most and K least anomalous test images.
        device: "auto", "cpu" or "cuda" (where patches are scored and maps built).
        map_size: "original" (maps, masks, pixel metrics and pictures at the original images' size, read from
            the dataset the cache records), "input" (the cache's frame, from the cache alone) or "auto"
            (original when the cache was extracted from a dataset funad reads, else input).
        save_maps: write every test map as ``maps/NAME.npy`` (True or "npy") or ``maps/NAME.tiff``
            ("tiff"): float32, NaN where never scored.
    Returns:
        An :class:`EvalResult` whose ``metrics`` is what metrics.json holds.
    """
    model_dir, report_dir = Path(model_dir), Path(report_dir)
    if top_k < 0:
        raise PipelineError(f"--top-k must be >= 0, got {top_k}")
    if batch_size < 1:
        raise PipelineError(f"--batch-size must be >= 1, got {batch_size}")
    check_report_dir(report_dir, model_dir)
    dev = resolve_device(device)
    model, info = load_model_dir(model_dir)
    place_model(model, dev)

    with cache.open(resolve_cache_path(info, cache_path), mode="r") as store:
        found, table_note = model_test_ids(info, store)  # by path when the cache grew since the fit
        ids, labels = _labelled_test_ids(info, store, found)

        tokens = info.raw.get("tokens", "patch")
        masks = store.read_masks(ids) if tokens == "patch" else None
        start = time.perf_counter()
        patch_scores, image_scores = score_cached(model, store, ids, device=dev, batch_size=batch_size,
                                                  progress=progress, with_images=True, tokens=tokens)
        if tokens == "class":
            result = measure_images(image_scores, labels)
            logger.warning("%s: image metrics only: %s", model_dir, NO_PIXEL_METRICS)
        else:
            result = measure(patch_scores, labels, masks, store.grid, sigma=MAP_SIGMA, device=dev,
                             image_scores=image_scores)
        seconds = time.perf_counter() - start
        image_scores, maps, values = result.image_scores, result.maps, result.metrics
        threshold = values["image_f1_threshold"]
        predictions = (image_scores >= threshold).astype(np.int64)  # all 0 when the threshold is nan
        record = metrics_record(info, store, ids, labels, values, predictions, seconds, dev)
        record["sample_table"] = table_note  # the model's own split, found again if the cache grew
        original = original_size.measure(store, ids, maps, map_size) if masks is not None else None
        record["map_size"] = "input"
        if original is not None:  # the pixel metrics at the original size replace those at the input size
            record.update(original.record({k: _json_float(v) for k, v in values.items()}))
            values.update(original.metrics)
            record.update({k: _json_float(v) for k, v in original.metrics.items()})
        if tokens == "class":
            record["pixel_metrics_absent"] = NO_PIXEL_METRICS
        own = thresholds.recorded(info)
        decided = thresholds.at_thresholds(own, labels, image_scores,
                                           *((original.masks, original.maps) if original is not None else
                                             (masks, maps) if masks is not None else (None, None)))
        at, pixel_at = decided["model_threshold"] or {}, decided.get("pixel_threshold") or {}
        record.update({"precision_at_threshold": at.get("precision"), "recall_at_threshold": at.get("recall"),
                       "f1_at_threshold": at.get("f1"), "model_threshold": decided,
                       "pixel_precision_at_threshold": pixel_at.get("precision"),
                       "pixel_recall_at_threshold": pixel_at.get("recall"),
                       "pixel_f1_at_threshold": pixel_at.get("f1"),
                       "f1_max_note": thresholds.F1_MAX_LABEL})
        if own is None:
            logger.warning("%s records no unlabelled threshold (fitted by an older funad): P/R/F1 at the model's "
                           "threshold are not reported; re-fit to get them", model_dir)

        report_dir.mkdir(parents=True, exist_ok=True)
        files = [report_dir / "scores.csv"]
        write_scores_csv(files[0], ids, store.samples, image_scores, predictions,
                         None if own is None else float(own["image"]))
        if pictures and tokens == "class":
            logger.warning("%s: no pictures: they show anomaly maps, which a class-token model does not make", model_dir)
        names = [visualize_name(store.samples[int(i)]["path"]) for i in ids]
        if save_maps and maps is not None:
            files += original_size.save_maps(report_dir / "maps", names, maps if original is None else original.maps,
                                             fmt=save_maps if isinstance(save_maps, str) else "npy")
        # Pictures call fp/fn at the model's own threshold (chosen without labels), as a user would
        # deploy it; a model fitted before thresholds existed falls back to F1-max, named as such.
        if own is not None:
            picture_threshold, threshold_name = float(own["image"]), "the model's unlabelled threshold"
        else:
            picture_threshold, threshold_name = float(threshold), "F1-max threshold (chosen with TEST labels)"
        if pictures and tokens == "class":
            pass  # no anomaly maps to draw (warned above)
        elif pictures and original is not None:
            title = f"{model_dir.resolve().name} ({info.method}{', ORACLE selection' if info.is_oracle else ''})"
            files += original_size.write_pictures(report_dir, original, names=names, scores=image_scores,
                                                  labels=labels, top_k=top_k, title=title,
                                                  threshold=None if np.isnan(picture_threshold) else picture_threshold,
                                                  threshold_name=threshold_name)
        elif pictures:
            title = f"{model_dir.resolve().name} ({info.method}{', ORACLE selection' if info.is_oracle else ''})"
            files += write_pictures(report_dir, store=store, ids=ids, masks=masks, maps=maps, scores=image_scores,
                                    labels=labels, top_k=top_k, threshold=picture_threshold, title=title,
                                    threshold_name=threshold_name)

    files.append(report_dir / "metrics.json")
    files[-1].write_text(json.dumps(record, indent=2) + "\n")
    if info.is_oracle:
        logger.warning("%s: %s", model_dir, ORACLE_WARNING)
    logger.debug("%s: %d test images evaluated at %.1f images/s; report in %s", model_dir, len(ids),
                record["throughput"]["images_per_s"] or 0.0, report_dir)
    return EvalResult(name=model_dir.resolve().name, model_dir=model_dir, report_dir=report_dir, metrics=record,
                      files=files)


def visualize_name(path: str) -> str:
    from .visualize import sample_name

    return sample_name(path)


def place_model(model, device: torch.device):
    """Put a loaded estimator's tensors on ``device`` (kNN: its bank and index; FUN-AD: its Local-Net).

    ``load_model_dir`` loads onto the CPU; both estimators take their device
    from ``load_state_dict``, so the state is re-loaded onto ``device``.
    """
    from funad.knn import KNNScorer
    from funad.model import FunAD

    if device.type == "cpu":
        return model
    if isinstance(model, KNNScorer):
        model.device = device
        model.load_state_dict(model.state_dict())
    elif isinstance(model, FunAD):
        model.load_state_dict(model.state_dict(), device=device)
    return model


def evaluate_many(model_dirs: Sequence[Path], report_dir: Path, *, cache_path: Optional[Path] = None,
                  top_k: int = 5, device: str = "auto", pictures: bool = True, batch_size: int = 32,
                  map_size: str = "auto", save_maps: Union[bool, str] = False,
                  progress: Progress = NullProgress()) -> list[EvalResult]:
    """Evaluate several model directories (e.g. one per category).

    With one directory the report goes straight into ``report_dir``; with
    several, into ``report_dir/<model dir name>/``. Names must be distinct.
    """
    model_dirs = [Path(m) for m in model_dirs]
    if not model_dirs:
        raise PipelineError("no model directory given")
    if len(model_dirs) == 1:
        targets = [Path(report_dir)]
    else:
        names = [m.resolve().name for m in model_dirs]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise PipelineError(
                f"model directories share the name(s) {dupes}; their reports would overwrite each other in "
                f"{report_dir}. Rename them or evaluate them separately."
            )
        targets = [Path(report_dir) / n for n in names]
    return [
        evaluate(m, t, cache_path=cache_path, top_k=top_k, device=device, pictures=pictures,
                 batch_size=batch_size, map_size=map_size, save_maps=save_maps, progress=progress)
        for m, t in zip(model_dirs, targets)
    ]
