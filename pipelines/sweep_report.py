"""The outputs of ``funad sweep``: results.csv (one row per cell), results.md (the paper's table) and the plot."""

from __future__ import annotations

import csv
import hashlib
import json
import math
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np

from funad.config import effective_settings

from . import modeldir
from .errors import PipelineError
from .settings import FIELDS

METRICS = ("image_auroc", "pixel_auroc", "aupro", "image_ap", "pixel_ap", "image_f1_max")
# Pixel metrics at the original images' size (sweep --map-size; empty at the input size), where the paper
# geometry's unscored border counts as missed (pipelines/original_size.py)
ORIGINAL_METRICS = ("pixel_auroc_original", "aupro_original", "unscored_pixel_share")
# pixel F1 at the model's own pixel threshold (chosen without labels) and pixel F1-max (masks), at the
# original size when the cell has it
PIXEL_DECISION_METRICS = ("pixel_f1_at_thr", "pixel_f1_max")
# The unlabelled thresholds (pipelines/thresholds.py): P/R/F1 at the model's own threshold (default rule)
# and the F1 every candidate rule would have given, next to F1-max (chosen with test labels).
THRESHOLD_RULES = ("mad", "quantile", "otsu")  # results.csv column order: keep it
THRESHOLD_METRICS = (("precision_at_thr", "recall_at_thr", "f1_at_thr")
                     + tuple(f"f1_thr_{r}" for r in THRESHOLD_RULES))
RESULTS_CSV, RESULTS_MD, PLOT_PNG, SWEEP_JSON = "results.csv", "results.md", "auroc_vs_contamination.png", "sweep.json"
CELLS_DIR = "cells"  # cells/<key>.json: a cell's training and test image scores, to compare threshold rules later
COLUMNS = (
    ("key", "method", "preset", "params", "overlap", "ratio", "seed")
    + METRICS
    + ("thr_rule",) + THRESHOLD_METRICS
    + ("n_train", "n_synthetic", "n_test", "n_moved", "moved_ids", "fit_s", "score_s", "peak_rss_mb", "peak_cuda_mb", "device",
       "selection", "reused_from", "cache_fingerprint", "funad_version")
    + ORIGINAL_METRICS + ("map_size",) + PIXEL_DECISION_METRICS
    + tuple(f"cfg_{f}" for f in FIELDS)
    + ("cfg_coreset_ratio",)
    + ("clean_images", "clean_normal_share")  # scorer=clean_knn: images kept, and the share the labels call normal
    + ("trained_by",)  # the cell whose trained Local-Net this cell took (fit_s then leaves the training out)
)


# ------------------------------------------------------------------- results.csv


def read_results(path: Path) -> list[dict]:
    """Rows of results.csv (empty when it does not exist)."""
    if not path.is_file():
        return []
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def _fmt(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return "nan" if math.isnan(value) else repr(value)
    if isinstance(value, (list, tuple)):
        return " ".join(str(v) for v in value)
    return str(value)


def append_row(path: Path, row: dict) -> None:
    """Append one row to results.csv (header first when the file is new), flushed to disk."""
    new = not path.is_file() or path.stat().st_size == 0
    if not new:
        with open(path, newline="", encoding="utf-8") as f:
            header = next(csv.reader(f), [])
        if tuple(header) != COLUMNS:
            if not set(header) <= set(COLUMNS):
                raise PipelineError(f"{path} has other columns than this funad writes; move it away or use another -o")
            _upgrade(path)
    with open(path, "a", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        if new:
            writer.writeheader()
        writer.writerow({k: _fmt(row.get(k)) for k in COLUMNS})
        f.flush()



def _upgrade(path: Path) -> None:
    """Rewrite a results.csv of an older funad (a subset of today's columns) with today's columns, atomically;
    the columns it lacked stay empty in its rows."""
    rows = read_results(path)

    def write(tmp: str) -> None:
        with open(tmp, "w", newline="", encoding="utf-8") as f:
            writer = csv.DictWriter(f, fieldnames=COLUMNS)
            writer.writeheader()
            for row in rows:
                writer.writerow({k: row.get(k, "") for k in COLUMNS})

    modeldir.atomic_write(path, write)


def write_cell_scores(sweep_dir: Path, key: str, record: dict) -> Path:
    """cells/<key>.json: the unlabelled threshold record (with the training scores) and the test scores/labels."""
    import re

    path = Path(sweep_dir) / CELLS_DIR / (re.sub(r"[^A-Za-z0-9_.=-]+", "_", key) + ".json")
    modeldir.write_json(path, record)
    return path


# ------------------------------------------------------------ table and plot


def _row_label(row: dict) -> str:
    """``funad:fast (lambda_=0 epochs=20)`` or ``knn``: the method and the settings chosen for the cell."""
    label = f"funad:{row['preset']}" if row["method"] == "funad" else row["method"]
    return label + (f" ({row['params']})" if row.get("params") else "")


def _config_digest(row: dict) -> str:
    """A digest of the row's full config without its seed, so that the seeds of one setting share a row."""
    config = {k: v for k, v in effective_settings(row, "cfg_").items()
              if k.startswith("cfg_") and k != "cfg_seed" and v not in ("", None)}
    return hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()[:12]


def _group(rows: Sequence[dict]) -> dict:
    """{(row label, overlap): {ratio: {metric: [values over seeds]}}}.

    Rows of different full configs never share a label: when one label holds
    several (e.g. results of an older preset), each gets its config digest.
    """
    digests: dict[str, set] = {}
    for r in rows:
        digests.setdefault(_row_label(r), set()).add(_config_digest(r))
    out: dict = {}
    for r in rows:
        label = _row_label(r)
        if len(digests[label]) > 1:
            label += f" [cfg {_config_digest(r)}]"
        cell = out.setdefault((label, int(r["overlap"])), {}).setdefault(float(r["ratio"]), {})
        for m in METRICS + THRESHOLD_METRICS + ORIGINAL_METRICS + PIXEL_DECISION_METRICS:
            cell.setdefault(m, []).append(float(r[m]) if r.get(m) not in ("", None) else float("nan"))
    return out


def _mean_std(values: Sequence[float]) -> tuple[float, float]:
    v = np.asarray([x for x in values if not math.isnan(x)], dtype=np.float64)
    if v.size == 0:
        return float("nan"), float("nan")
    return float(v.mean()), float(v.std(ddof=1)) if v.size > 1 else 0.0


def _pct(values: Sequence[float]) -> str:
    mean, std = _mean_std(values)
    if math.isnan(mean):
        return "n/a"
    return f"{100 * mean:.1f}" + (f" ± {100 * std:.1f}" if len(values) > 1 else "")


def write_markdown(path: Path, rows: Sequence[dict], store_attrs: Optional[dict] = None) -> None:
    """results.md: the paper's layout (rows: method x overlap; columns: ratios; image / pixel AUROC %)."""
    groups = _group(rows)
    ratios = sorted({float(r["ratio"]) for r in rows})
    seeds = sorted({int(r["seed"]) for r in rows})
    attrs = store_attrs or {}
    lines = [
        "# funad sweep",
        "",
        f"Backbone: {attrs.get('backbone', '?')} (layer {attrs.get('layer', '?')}, image size "
        f"{attrs.get('image_size', '?')}, grid {attrs.get('grid', '?')}, D = {attrs.get('feature_dim', '?')}). "
        f"Seeds: {', '.join(map(str, seeds))}. Model selection: final epoch (no test labels).",
        "",
    ]
    for title, metric_pair in (("Image / pixel AUROC (%)", ("image_auroc", "pixel_auroc")),
                               ("AUPRO@0.3 / image F1-max (%)", ("aupro", "image_f1_max"))):
        lines += [f"## {title}, mean ± std over seeds", "",
                  "| method | setting | " + " | ".join(f"{100 * r:g}%" for r in ratios) + " |",
                  "|---|---|" + "---|" * len(ratios)]
        for (label, overlap), by_ratio in sorted(groups.items()):
            cells = []
            for ratio in ratios:
                v = by_ratio.get(ratio)
                cells.append("" if v is None else f"{_pct(v[metric_pair[0]])} / {_pct(v[metric_pair[1]])}")
            lines.append(f"| {label} | {'overlap' if overlap else 'no overlap'} | " + " | ".join(cells) + " |")
        lines.append("")
    if any(r.get("pixel_auroc_original") not in ("", None) for r in rows):
        lines += [f"## Pixel AUROC / AUPRO@0.3 (%) at the original images' size, mean ± std over seeds", "",
                  "Maps go back through the cache's geometry to each original image and its full-size mask; pixels "
                  "the geometry never scored (the paper crop's border) count as missed.", "",
                  "| method | setting | " + " | ".join(f"{100 * r:g}%" for r in ratios) + " | unscored pixels |",
                  "|---|---|" + "---|" * (len(ratios) + 1)]
        for (label, overlap), by_ratio in sorted(groups.items()):
            cells = []
            for ratio in ratios:
                v = by_ratio.get(ratio)
                cells.append("" if v is None else f"{_pct(v['pixel_auroc_original'])} / {_pct(v['aupro_original'])}")
            share = _mean_std([x for v in by_ratio.values() for x in v["unscored_pixel_share"]])[0]
            lines.append(f"| {label} | {'overlap' if overlap else 'no overlap'} | " + " | ".join(cells)
                         + f" | {'n/a' if math.isnan(share) else f'{100 * share:.1f}%'} |")
        lines.append("")
    lines += _threshold_table(groups)
    lines += _time_table(rows)
    lines += [f"Each cell: mean ± sample std over seeds; {len(rows)} runs in results.csv. "
              "At 0% the overlap and no-overlap settings are the same run.", ""]
    text = "\n".join(lines)
    modeldir.atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def _threshold_table(groups: dict) -> list[str]:
    """Image F1 at each unlabelled rule's threshold against F1-max (chosen with test labels)."""
    lines = ["## Deciding without labels: image F1 (%) at each unlabelled threshold, mean ± std over seeds", "",
             "F1-max uses the threshold that maximises F1 on the TEST labels; the rules choose theirs from the "
             "unlabelled training scores. In brackets: mean F1 at the rule / mean F1-max.", "",
             "| method | setting | ratio | F1-max (test labels) | " + " | ".join(THRESHOLD_RULES)
             + " | pixel F1 at the model's pixel threshold / pixel F1-max |",
             "|---|---|---|---|" + "---|" * len(THRESHOLD_RULES) + "---|"]
    for (label, overlap), by_ratio in sorted(groups.items()):
        for ratio, v in sorted(by_ratio.items()):
            best = _mean_std(v["image_f1_max"])[0]
            if math.isnan(best):  # no anomalous test image (e.g. all moved into training): F1 is undefined
                lines.append(f"| {label} | {'overlap' if overlap else 'no overlap'} | {100 * ratio:g}% | n/a | "
                             + " | ".join("n/a" for _ in THRESHOLD_RULES) + " | n/a |")
                continue
            cells = []
            for rule in THRESHOLD_RULES:
                mean = _mean_std(v[f"f1_thr_{rule}"])[0]
                share = mean / best if best and not math.isnan(mean) else float("nan")
                cells.append(f"{_pct(v[f'f1_thr_{rule}'])} ({share:.2f})")
            pixel = f"{_pct(v['pixel_f1_at_thr'])} / {_pct(v['pixel_f1_max'])}"
            lines.append(f"| {label} | {'overlap' if overlap else 'no overlap'} | {100 * ratio:g}% | "
                         f"{_pct(v['image_f1_max'])} | " + " | ".join(cells) + f" | {pixel} |")
    return lines + [""]


def _time_table(rows: Sequence[dict]) -> list[str]:
    """Each method's fit and scoring wall time: median (min-max) over its cells that ran (not reused)."""
    by_label: dict[str, list[dict]] = {}
    for r in rows:
        if not r.get("reused_from") and not r.get("trained_by"):
            by_label.setdefault(_row_label(r), []).append(r)
    lines = ["## Fit and scoring time (s), median (min-max) over each method's cells", "",
             "Wall seconds on the machine that ran the sweep (`device` in results.csv). Fit: the whole training "
             "(FUN-AD) or the bank and its coreset (kNN, SoftPatch), then the unlabelled thresholds, which score "
             "every training image (for kNN and SoftPatch each against the bank without its own patches, an exact "
             "search that costs more than building the bank); scoring: the test set's maps and scores. "
             "Cells that shared the cores with other jobs are slower, so compare methods within one sweep. "
             "Cells that took another cell's trained Local-Net (`trained_by` in results.csv) are left out.", "",
             "| method | cells | fit | scoring |", "|---|---|---|---|"]

    def span(values: list[float]) -> str:
        v = [x for x in values if not math.isnan(x)]
        return "n/a" if not v else f"{np.median(v):.1f} ({min(v):.1f}-{max(v):.1f})"

    for label, rs in sorted(by_label.items()):
        times = {k: [float(r[k]) if r.get(k) not in ("", None) else float("nan") for r in rs]
                 for k in ("fit_s", "score_s")}
        lines.append(f"| {label} | {len(rs)} | {span(times['fit_s'])} | {span(times['score_s'])} |")
    return lines + [""]


def write_plot(path: Path, rows: Sequence[dict]) -> None:
    """AUROC against contamination ratio: rows image/pixel, columns no-overlap/overlap, one line per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = _group(rows)
    labels = sorted({label for label, _ in groups})
    fig, axes = plt.subplots(2, 2, figsize=(10, 7), sharex=True, squeeze=False)
    for col, overlap in enumerate((0, 1)):
        for row_i, (metric, name) in enumerate((("image_auroc", "image AUROC"), ("pixel_auroc", "pixel AUROC"))):
            ax = axes[row_i][col]
            for label in labels:
                by_ratio = groups.get((label, overlap))
                if not by_ratio:
                    continue
                xs = sorted(by_ratio)
                stats = [_mean_std(by_ratio[x][metric]) for x in xs]
                ax.errorbar([100 * x for x in xs], [100 * m for m, _ in stats], yerr=[100 * s for _, s in stats],
                            marker="o", capsize=3, label=label, color=f"C{labels.index(label) % 10}")
            ax.set_title(f"{name}, {'overlap' if overlap else 'no overlap'}")
            ax.set_xlabel("contamination (anomaly-to-normal, %)")
            ax.set_ylabel(f"{name} (%)")
            ax.grid(alpha=0.3)
    handles, names = axes[0][0].get_legend_handles_labels()
    if not handles:
        handles, names = axes[0][1].get_legend_handles_labels()
    if handles:
        fig.legend(handles, names, loc="lower center", ncol=min(4, len(names)))
    fig.suptitle("AUROC vs contamination (final epoch; mean ± std over seeds)")
    fig.tight_layout(rect=(0, 0.06, 1, 0.96))
    modeldir.atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
    plt.close(fig)
