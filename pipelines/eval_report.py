"""What ``funad eval`` writes and shows: metrics.json, scores.csv, pictures, the table's columns and summary.json."""

from __future__ import annotations

import csv
import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch

from funad import __version__

from .modeldir import ModelInfo
from .scoring import MAP_SIGMA

logger = logging.getLogger(__name__)

# The metrics shown in tables, in the order of the paper's tables, with their headers.
TABLE_COLUMNS: tuple[tuple[str, str], ...] = (
    ("image_auroc", "I-AUROC"),
    ("pixel_auroc", "P-AUROC"),
    ("aupro", "AUPRO"),
    ("image_ap", "I-AP"),
    ("pixel_ap", "P-AP"),
    ("image_f1_max", "I-F1max"),
    ("precision_at_threshold", "P@thr"),
    ("recall_at_threshold", "R@thr"),
    ("f1_at_threshold", "F1@thr"),
    ("pixel_f1_max", "P-F1max"),
    ("pixel_f1_at_threshold", "P-F1@thr"),
)
TABLE_CAPTION = (
    "percent; I = image, P = pixel level; AUPRO up to FPR 0.3; I-F1max and P-F1max use thresholds chosen with "
    "the TEST labels; P/R/F1@thr and P-F1@thr use the model's own image and pixel thresholds, chosen without "
    "labels at the end of the fit"
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



def write_scores_csv(path: Path, indices: np.ndarray, samples: list, scores: np.ndarray,
                     predictions: np.ndarray, model_threshold: Optional[float] = None) -> None:
    """One row per test image: index, path, split, label, defect_type, score, predictions.

    ``prediction_at_model_threshold`` (the model's unlabelled threshold) is
    empty for a model fitted before thresholds were recorded.
    """
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["index", "path", "split", "label", "defect_type", "score", "prediction_at_model_threshold",
                    "prediction_at_f1_max_threshold"])
        for i, s, p in zip(indices, scores, predictions):
            smp = samples[int(i)]
            own = "" if model_threshold is None else int(float(s) >= model_threshold)
            w.writerow([int(i), smp["path"], smp["split"], int(smp["label"]), smp["defect_type"], f"{float(s):.6g}",
                        own, int(p)])


def _json_float(x: float) -> Optional[float]:
    x = float(x)
    return None if math.isnan(x) else x


def metrics_record(info: ModelInfo, store, ids: np.ndarray, labels: np.ndarray, values: dict, predictions: np.ndarray,
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
            "what": "cache read + patch scoring + anomaly maps + metrics (pictures excluded)",
        },
        "funad_version": __version__,
    }


def write_pictures(report_dir: Path, *, store, ids: np.ndarray, masks: np.ndarray, maps: np.ndarray,
                    scores: np.ndarray, labels: np.ndarray, top_k: int, threshold: float, title: str,
                    threshold_name: str = "threshold") -> list[Path]:
    """The report's PNGs from the store's previews (no image file is opened)."""
    from . import visualize  # matplotlib is only imported when pictures are asked for

    if store.preview_size is None:
        logger.warning("cache %s stores no previews (imported features); no pictures written", store.path)
        return []
    written = visualize.write_report_pictures(
        store.read_previews(ids), masks, maps, scores, labels,
        [visualize.sample_name(store.samples[int(i)]["path"]) for i in ids], report_dir,
        threshold=None if math.isnan(threshold) else threshold, k=top_k, title=title,
        threshold_name=threshold_name,
    )
    return [p for paths in written.values() for p in paths]


def _table_values(results: Sequence[EvalResult]) -> dict[str, list]:
    """Every table metric's defined values over results (undefined ones are skipped)."""
    return {key: [v for v in (r.metrics.get(key) for r in results) if v is not None] for key, _ in TABLE_COLUMNS}


def mean_row(results: Sequence[EvalResult]) -> dict:
    """The mean over results of every table metric (NaN-aware: undefined values are skipped)."""
    return {key: float(np.mean(v)) if v else None for key, v in _table_values(results).items()}


def std_row(results: Sequence[EvalResult]) -> dict:
    """The sample standard deviation (ddof=1) over results of every table metric; None with fewer than 2 values.
    With one model directory per seed, mean ± std is the figure to quote, not one seed's."""
    return {key: float(np.std(v, ddof=1)) if len(v) > 1 else None for key, v in _table_values(results).items()}


def write_summary(path: Path, results: Sequence[EvalResult]) -> None:
    """summary.json: per-model table metrics and their mean (written for several model dirs)."""
    summary = {
        "rows": [{"name": r.name, "selection": r.metrics.get("selection"),
                  **{k: r.metrics.get(k) for k, _ in TABLE_COLUMNS}} for r in results],
        "mean": mean_row(results),
        "std": std_row(results),
        "std_note": "sample standard deviation (ddof=1) over the model directories",
    }
    if any(r.oracle for r in results):
        summary["warning"] = ORACLE_WARNING
    path.write_text(json.dumps(summary, indent=2) + "\n")
