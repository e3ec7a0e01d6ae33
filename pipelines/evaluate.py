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

import csv
import json
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch

from funad import __version__, anomaly_map, cache, metrics

from .errors import ModelDirError, PipelineError
from .device import resolve_device
from .modeldir import ModelInfo, check_cache_compatible, load_model_dir
from .progress import NullProgress, Progress

logger = logging.getLogger(__name__)

# Gaussian smoothing of the upsampled patch scores, in input pixels (FUNAD_SPEC "Inference").
MAP_SIGMA = 4.0

# The metrics shown in tables, in the order of the paper's tables, with their headers.
TABLE_COLUMNS: tuple[tuple[str, str], ...] = (
    ("image_auroc", "I-AUROC"),
    ("pixel_auroc", "P-AUROC"),
    ("aupro", "AUPRO"),
    ("image_ap", "I-AP"),
    ("pixel_ap", "P-AP"),
    ("image_f1_max", "I-F1max"),
)
TABLE_CAPTION = (
    "percent; I = image, P = pixel level; AUPRO up to FPR 0.3; I-F1max uses a threshold chosen on the test labels"
)

ORACLE_WARNING = (
    "ORACLE MODEL SELECTION: this model's epoch was chosen by its score on the TEST labels "
    "(the reference code's protocol). These numbers are optimistic and are not comparable "
    "with a final-epoch result; use them only to reproduce the paper's protocol."
)
F1_THRESHOLD_NOTE = (
    "image_f1_threshold maximises F1 on the TEST labels; it is a reporting threshold, "
    "not a deployment threshold"
)


@dataclass
class EvalResult:
    """What one evaluated model directory produced."""

    name: str  # the model directory's name, used as the table row label
    model_dir: Path
    report_dir: Path
    metrics: dict  # the content of metrics.json
    files: list[Path] = field(default_factory=list)  # every file written

    @property
    def oracle(self) -> bool:
        return self.metrics.get("selection") == "oracle"


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


def check_fingerprint(store, info: ModelInfo) -> None:
    """Raise ModelDirError unless ``store`` holds the features the model was fitted on.

    The fingerprint covers the backbone settings and the sample table, so the
    split's image ids mean the same images in both.
    """
    expected = info.cache.get("fingerprint")
    have = store.fingerprint()
    if expected is None:
        raise ModelDirError(f"{info.path / 'config.json'} records no cache fingerprint; re-fit the model")
    if have != expected:
        # Name the differing backbone settings first when there are any.
        check_cache_compatible(info, dict(store.attrs), what=f"cache {store.path}")
        raise ModelDirError(
            f"cache {store.path} (fingerprint {have[:12]}) is not the cache that model {info.path} was fitted on "
            f"({info.cache.get('path')}, fingerprint {str(expected)[:12]}): its sample table or backbone settings "
            f"differ, so the split's image ids would point at other images. Pass the model's own cache with "
            f"--cache, or re-fit the model on this one."
        )


# --------------------------------------------------------------------------- scoring


def score_cached(model, store, indices: np.ndarray, *, device: torch.device, batch_size: int,
                 progress: Progress) -> np.ndarray:
    """Patch scores of cached images, batched.

    Args:
        indices: (n,) image indices into the store.
    Returns:
        (n, P) float32 patch scores, higher = more anomalous.
    """
    out = np.empty((len(indices), store.n_patches), dtype=np.float32)
    task = progress.task("scoring", total=len(indices), unit="img")
    pos = 0
    for idx, feats in store.iter_features(indices, chunk=batch_size):
        x = torch.from_numpy(np.asarray(feats, dtype=np.float32)).to(device)
        out[pos:pos + len(idx)] = model.score_patches(x)
        pos += len(idx)
        task.advance(len(idx))
    return out


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
    }


# --------------------------------------------------------------------------- outputs


def write_scores_csv(path: Path, indices: np.ndarray, samples: list, scores: np.ndarray,
                     predictions: np.ndarray) -> None:
    """One row per test image: index, path, split, label, defect_type, score, prediction."""
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["index", "path", "split", "label", "defect_type", "score", "prediction_at_f1_max_threshold"])
        for i, s, p in zip(indices, scores, predictions):
            smp = samples[int(i)]
            w.writerow([int(i), smp["path"], smp["split"], int(smp["label"]), smp["defect_type"], f"{float(s):.6g}", int(p)])


def _json_float(x: float) -> Optional[float]:
    x = float(x)
    return None if math.isnan(x) else x


def check_report_dir(report_dir: Path, model_dir: Path) -> None:
    """Refuse an output folder that is, or lies inside, the model directory (which is never written)."""
    rd, md = report_dir.resolve(), model_dir.resolve()
    if rd == md or md in rd.parents:
        raise PipelineError(
            f"output directory {report_dir} lies inside model directory {model_dir}; funad never writes into a "
            f"model directory after `funad fit`, choose another -o"
        )


def _record(info: ModelInfo, store, ids: np.ndarray, labels: np.ndarray, values: dict, predictions: np.ndarray,
            seconds: float, device: torch.device) -> dict:
    """The content of metrics.json."""
    split = info.contamination
    return {
        "model_dir": str(info.path),
        "cache": str(store.path),
        "cache_fingerprint": store.fingerprint(),
        "method": info.method,
        "selection": info.selection,
        **({"warning": ORACLE_WARNING} if info.is_oracle else {}),
        **{k: _json_float(v) for k, v in values.items()},
        "f1_threshold_note": F1_THRESHOLD_NOTE,
        "counts": {
            "n_test": int(len(ids)),
            "n_anomalous": int((labels == 1).sum()),
            "n_normal": int((labels == 0).sum()),
            "n_moved": int(len(info.moved_ids)),
            "n_false_positives": int(((predictions == 1) & (labels == 0)).sum()),
            "n_false_negatives": int(((predictions == 0) & (labels == 1)).sum()),
        },
        "split": {
            "ratio": split["ratio"],
            "overlap": bool(split["overlap"]),
            "seed": split["seed"],
            "moved_ids": info.moved_ids.tolist(),
            "moved_paths": list(split.get("moved_paths", [])),
        },
        "map": {"grid": list(store.grid), "size": list(store.mask_size), "sigma": MAP_SIGMA,
                "upsampling": "bilinear"},
        "throughput": {
            "images_per_s": len(ids) / seconds if seconds > 0 else None,
            "seconds": seconds,
            "device": str(device),
            "what": "cache read + patch scoring + anomaly maps (pictures excluded)",
        },
        "funad_version": __version__,
    }


def _labelled_test_ids(info: ModelInfo, store) -> tuple[np.ndarray, np.ndarray]:
    """The split's test ids and their 0/1 labels; raises when the split has none or some are unlabelled."""
    ids = info.test_ids
    if len(ids) == 0:
        raise ModelDirError(f"the split recorded in {info.path / 'config.json'} has no test images; nothing to evaluate")
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
             device: str = "auto", pictures: bool = True, batch_size: int = 32,
             progress: Progress = NullProgress()) -> EvalResult:
    """Evaluate one model directory on its split's test images; write the report.

    Args:
        model_dir: a directory written by ``funad fit``.
        report_dir: where metrics.json, scores.csv and the PNGs go (created).
        cache_path: the feature cache; default: the one the model records.
        top_k: pictures of the K most and K least anomalous test images.
        device: "auto", "cpu" or "cuda" (where patches are scored and maps built).
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
        check_fingerprint(store, info)
        ids, labels = _labelled_test_ids(info, store)

        start = time.perf_counter()
        patch_scores = score_cached(model, store, ids, device=dev, batch_size=batch_size, progress=progress)
        maps = anomaly_map.patch_scores_to_maps(patch_scores, store.grid, store.mask_size, sigma=MAP_SIGMA,
                                                device=dev)
        seconds = time.perf_counter() - start
        image_scores = patch_scores.max(axis=1)  # (n,): the image score is the max patch score

        masks = store.read_masks(ids)
        values = compute_metrics(labels, image_scores, masks, maps)
        threshold = values["image_f1_threshold"]
        predictions = (image_scores >= threshold).astype(np.int64)  # all 0 when the threshold is nan
        record = _record(info, store, ids, labels, values, predictions, seconds, dev)

        report_dir.mkdir(parents=True, exist_ok=True)
        files = [report_dir / "scores.csv"]
        write_scores_csv(files[0], ids, store.samples, image_scores, predictions)
        if pictures:
            title = f"{model_dir.resolve().name} ({info.method}{', ORACLE selection' if info.is_oracle else ''})"
            files += _write_pictures(report_dir, store=store, ids=ids, masks=masks, maps=maps, scores=image_scores,
                                     labels=labels, top_k=top_k, threshold=threshold, title=title)

    files.append(report_dir / "metrics.json")
    files[-1].write_text(json.dumps(record, indent=2) + "\n")
    if info.is_oracle:
        logger.warning("%s: %s", model_dir, ORACLE_WARNING)
    logger.info("%s: %d test images evaluated at %.1f images/s; report in %s", model_dir, len(ids),
                record["throughput"]["images_per_s"] or 0.0, report_dir)
    return EvalResult(name=model_dir.resolve().name, model_dir=model_dir, report_dir=report_dir, metrics=record,
                      files=files)


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


def _write_pictures(report_dir: Path, *, store, ids: np.ndarray, masks: np.ndarray, maps: np.ndarray,
                    scores: np.ndarray, labels: np.ndarray, top_k: int, threshold: float, title: str) -> list[Path]:
    """The report's PNGs from the store's previews (no image file is opened)."""
    from . import visualize  # matplotlib is only imported when pictures are asked for

    if store.preview_size is None:
        logger.warning("cache %s stores no previews (imported features); no pictures written", store.path)
        return []
    written = visualize.write_report_pictures(
        store.read_previews(ids), masks, maps, scores, labels,
        [visualize.sample_name(store.samples[int(i)]["path"]) for i in ids], report_dir,
        threshold=None if math.isnan(threshold) else threshold, k=top_k, title=title,
    )
    return [p for paths in written.values() for p in paths]


def evaluate_many(model_dirs: Sequence[Path], report_dir: Path, *, cache_path: Optional[Path] = None,
                  top_k: int = 5, device: str = "auto", pictures: bool = True, batch_size: int = 32,
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
                 batch_size=batch_size, progress=progress)
        for m, t in zip(model_dirs, targets)
    ]


def mean_row(results: Sequence[EvalResult]) -> dict:
    """The mean over results of every table metric (NaN-aware: undefined values are skipped)."""
    row = {}
    for key, _ in TABLE_COLUMNS:
        vals = [r.metrics.get(key) for r in results]
        vals = [v for v in vals if v is not None]
        row[key] = float(np.mean(vals)) if vals else None
    return row


def write_summary(path: Path, results: Sequence[EvalResult]) -> None:
    """summary.json: per-model table metrics and their mean (written for several model dirs)."""
    summary = {
        "rows": [{"name": r.name, "selection": r.metrics.get("selection"),
                  **{k: r.metrics.get(k) for k, _ in TABLE_COLUMNS}} for r in results],
        "mean": mean_row(results),
    }
    if any(r.oracle for r in results):
        summary["warning"] = ORACLE_WARNING
    path.write_text(json.dumps(summary, indent=2) + "\n")
