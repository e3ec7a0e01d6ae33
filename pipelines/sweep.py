"""``funad sweep``: contamination curves over a grid of methods, ratios, seeds and settings.

One process, one read of the features: every complete image of the cache is
loaded once into an in-memory float32 tensor (N, P, D) (on the GPU when the
device is CUDA and it fits, see :mod:`funad.pipelines.features`) and every
cell of the grid slices its training and test images out of it. Memory:
``N_all * P * D * 4`` bytes for the pool plus ``N_train * P * D * 4`` for
the cell's training copy, e.g. MVTec AD bottle (292 images, P = 784,
D = 768): 703 MB + 554 MB; the test masks are kept too (H * W bytes each).

A cell is (method, overlap, ratio, seed, hyperparameter values). For each
cell the sweep

1. draws the contamination split (``funad.contamination`` with the cell's
   seed, exactly as ``funad fit --contamination RATIO --seed SEED`` would);
2. fits the method on the split's training images (final epoch; model
   selection never looks at test labels);
3. scores the split's test images, builds anomaly maps with the cache's grid
   and mask size, and computes image AUROC/AP/F1-max, pixel AUROC/AP and
   AUPRO@0.3;
4. appends one row to ``results.csv`` (metrics, config, seed, times, peak
   memory) and flushes it, so an interrupted sweep resumes where it stopped:
   cells whose key is already in ``results.csv`` are skipped.

At ratio 0 the overlap and no-overlap settings are the same experiment; the
overlap cell copies the no-overlap cell's metrics (``reused_from`` says so).

Outputs in SWEEP_DIR: ``results.csv``, ``results.md`` (the paper's layout:
rows are methods x overlap setting, columns are ratios, cells are
"image / pixel AUROC" in %, mean ± std over seeds) and
``auroc_vs_contamination.png``. ``sweep.json`` records the grid and the cache.

Peak memory: ``peak_rss_mb`` is the process's resident-set high-water mark
(``getrusage``) when the cell ended, so it never decreases along the sweep;
``peak_cuda_mb`` is ``torch.cuda.max_memory_allocated`` during the cell.
"""

from __future__ import annotations

import csv
import itertools
import json
import logging
import math
import resource
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Optional, Sequence

import numpy as np
import torch

from funad import __version__, anomaly_map, cache
from funad.config import DEFAULT_PRESET, PRESETS, FunADConfig, preset

from . import modeldir
from .errors import PipelineError
from .evaluate import compute_metrics
from .features import choose_residency, feature_bytes, load_features
from .device import resolve_device
from .fit import check_complete, check_trainable, split_cache
from .progress import NullProgress, Progress

logger = logging.getLogger(__name__)

DEFAULT_RATIOS = (0.0, 0.01, 0.03, 0.05, 0.1, 0.2)
OVERLAPS = {"both": (False, True), "overlap": (True,), "no-overlap": (False,)}
METRICS = ("image_auroc", "pixel_auroc", "aupro", "image_ap", "pixel_ap", "image_f1_max")
RESULTS_CSV, RESULTS_MD, PLOT_PNG, SWEEP_JSON = "results.csv", "results.md", "auroc_vs_contamination.png", "sweep.json"
_CONFIG_FIELDS = tuple(f for f in FunADConfig().to_dict())
COLUMNS = (
    ("key", "method", "preset", "params", "overlap", "ratio", "seed")
    + METRICS
    + ("n_train", "n_test", "n_moved", "moved_ids", "fit_s", "score_s", "peak_rss_mb", "peak_cuda_mb", "device",
       "selection", "reused_from", "cache_fingerprint", "funad_version")
    + tuple(f"cfg_{f}" for f in _CONFIG_FIELDS)
    + ("cfg_coreset_ratio",)
)
_SCORE_CHUNK = 32  # test images scored at once


# ------------------------------------------------------------------ the grid


@dataclass(frozen=True)
class MethodSpec:
    """One entry of ``--methods``: ``funad`` (default preset), ``funad:<preset>`` or ``knn``."""

    label: str
    method: str
    preset: Optional[str]


def parse_methods(text: str) -> list[MethodSpec]:
    """``"funad,knn,funad:paper"`` -> method specs; unknown names or presets raise PipelineError."""
    out: list[MethodSpec] = []
    for item in (t.strip() for t in text.split(",")):
        if not item:
            continue
        name, _, preset = item.partition(":")
        if name == "knn" and not preset:
            spec = MethodSpec("knn", "knn", None)
        elif name == "funad":
            preset = preset or DEFAULT_PRESET
            if preset not in PRESETS:
                raise PipelineError(f"--methods: unknown preset {preset!r} in {item!r}; choose from {sorted(PRESETS)}")
            spec = MethodSpec(f"funad:{preset}", "funad", preset)
        else:
            raise PipelineError(f"--methods: unknown method {item!r}; use funad, funad:<preset> "
                                f"(presets {sorted(PRESETS)}) or knn")
        if spec not in out:
            out.append(spec)
    if not out:
        raise PipelineError("--methods is empty; give e.g. funad,knn")
    return out


def parse_floats(text: str, what: str) -> list[float]:
    """``"0,0.01,0.1"`` -> [0.0, 0.01, 0.1]; raises PipelineError naming ``what`` on a bad value."""
    try:
        values = [float(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise PipelineError(f"{what} expects comma-separated numbers, got {text!r}") from None
    if not values:
        raise PipelineError(f"{what} is empty")
    return sorted(set(values))


def parse_ints(text: str, what: str) -> list[int]:
    try:
        values = [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise PipelineError(f"{what} expects comma-separated integers, got {text!r}") from None
    if not values:
        raise PipelineError(f"{what} is empty")
    return list(dict.fromkeys(values))


def parse_grid_sets(items: Sequence[str]) -> dict[str, list]:
    """``["lambda_=0,2.5", "r=0.5"]`` -> ``{"lambda_": [0.0, 2.5], "r": [0.5]}`` typed like FunADConfig."""
    grid: dict[str, list] = {}
    for item in items:
        name, sep, text = item.partition("=")
        name = name.strip()
        if not sep or not name or not text.strip():
            raise PipelineError(f"--set expects NAME=V1,V2,..., got {item!r}")
        if name in ("seed",):
            raise PipelineError("--set seed=... is not a grid axis; use --seeds")
        values = [FunADConfig.parse_value(name, t.strip()) for t in text.split(",") if t.strip()]
        grid[name] = list(dict.fromkeys(values))
    return grid


@dataclass(frozen=True)
class Cell:
    """One experiment of the grid."""

    spec: MethodSpec
    overlap: bool
    ratio: float
    seed: int
    params: tuple[tuple[str, Any], ...]  # the --set values of this cell (funad only)

    @property
    def params_text(self) -> str:
        return " ".join(f"{k}={v}" for k, v in self.params)

    @property
    def key(self) -> str:
        """Identifies the cell in results.csv (resume skips rows with this key)."""
        parts = [self.spec.label, "overlap" if self.overlap else "no-overlap", f"ratio={self.ratio:g}",
                 f"seed={self.seed}"]
        return "|".join(parts + [f"{k}={v}" for k, v in self.params])

    def twin_key(self) -> Optional[str]:
        """At ratio 0 the overlap cell equals the no-overlap one: the key of that twin."""
        if self.ratio == 0 and self.overlap:
            return Cell(self.spec, False, self.ratio, self.seed, self.params).key
        return None


def build_grid(methods: Sequence[MethodSpec], ratios: Sequence[float], overlaps: Sequence[bool],
               seeds: Sequence[int], sets: dict[str, list]) -> list[Cell]:
    """Every cell, no-overlap before overlap so that ratio-0 twins can be reused."""
    names = sorted(sets)
    combos = [tuple(zip(names, values)) for values in itertools.product(*(sets[n] for n in names))] or [()]
    cells = []
    for spec in methods:
        for overlap in sorted(overlaps):
            for ratio in ratios:
                for seed in seeds:
                    for params in (combos if spec.method == "funad" else [()]):
                        cells.append(Cell(spec, overlap, float(ratio), int(seed), params))
    return cells


def cell_config(cell: Cell, epochs: Optional[int]) -> dict:
    """The estimator config dict of ``cell`` (what config.json["config"] would hold)."""
    if cell.spec.method == "knn":
        return {"coreset_ratio": None, "seed": cell.seed, "backend": "auto"}
    changes = dict(cell.params)
    if epochs is not None:
        changes["epochs"] = int(epochs)
    changes["seed"] = cell.seed
    return preset(cell.spec.preset, **changes).to_dict()


# ------------------------------------------------------------------- results


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
            raise PipelineError(f"{path} has other columns than this funad writes; move it away or use another -o")
    with open(path, "a", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        if new:
            writer.writeheader()
        writer.writerow({k: _fmt(row.get(k)) for k in COLUMNS})
        f.flush()


def _peak_rss_mb() -> float:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 1e6 if sys.platform == "darwin" else peak / 1e3  # bytes on macOS, KiB on Linux


# --------------------------------------------------------------------- a cell


class _Features:
    """Every complete image's features, loaded once: rows of ``pool`` follow ``ids``."""

    def __init__(self, store, device: torch.device, progress: Progress) -> None:
        self.ids = store.indices(complete_only=True)
        n_bytes = feature_bytes(len(self.ids), store.n_patches, store.feature_dim)
        _, where = choose_residency("memory", n_bytes, device)
        self.pool = load_features(store, self.ids, device=where, progress=progress,
                                  description="loading features (once for the sweep)")
        self.row = {int(i): r for r, i in enumerate(self.ids)}
        test = store.indices(split="test", complete_only=True)
        self.masks = {int(i): m for i, m in zip(test, store.read_masks(test))} if len(test) else {}

    def rows(self, ids: Iterable[int]) -> torch.Tensor:
        return torch.as_tensor([self.row[int(i)] for i in ids], dtype=torch.long, device=self.pool.device)


def run_cell(cell: Cell, store, feats: _Features, *, epochs: Optional[int], device: torch.device,
             task) -> dict:
    """Fit and evaluate one cell; returns its results.csv row."""
    from funad.data import TensorSource

    split = split_cache(store, cell.ratio, cell.overlap, cell.seed)
    train_ids = np.asarray(split["train_ids"], dtype=np.int64)
    test_ids = np.asarray(split["test_ids"], dtype=np.int64)
    config = cell_config(cell, epochs)
    check_trainable(store, train_ids, config.get("batch_size"))
    if len(test_ids) == 0:
        raise PipelineError(f"cell {cell.key}: the split has no test images to evaluate")
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    start = time.perf_counter()
    model = modeldir.build_model(cell.spec.method, config, device=device)
    source = TensorSource(feats.pool.index_select(0, feats.rows(train_ids)))
    if cell.spec.method == "funad":
        def on_epoch(record: dict) -> None:
            loss = record.get("loss")
            task.update(**{"epoch": record.get("epoch", ""), **({"loss": float(loss)} if loss is not None else {})})

        model.fit(source, device=device, callback=on_epoch)
    else:
        model.fit(source)
    del source
    fit_s = time.perf_counter() - start

    start = time.perf_counter()
    rows = feats.rows(test_ids)
    scores = np.concatenate([
        np.asarray(model.score_patches(feats.pool.index_select(0, rows[i:i + _SCORE_CHUNK]).to(device)))
        for i in range(0, len(rows), _SCORE_CHUNK)
    ])
    maps = anomaly_map.patch_scores_to_maps(scores, store.grid, store.mask_size)
    score_s = time.perf_counter() - start
    labels = np.asarray(store.labels)[test_ids].astype(np.int64)
    masks = np.stack([feats.masks[int(i)] for i in test_ids])
    values = compute_metrics(labels, scores.max(axis=1), masks, maps)

    row: dict = {
        "key": cell.key, "method": cell.spec.method, "preset": cell.spec.preset or "", "params": cell.params_text,
        "overlap": int(cell.overlap), "ratio": cell.ratio, "seed": cell.seed,
        **{m: float(values[m]) for m in METRICS},
        "n_train": len(train_ids), "n_test": len(test_ids), "n_moved": split["n_moved"],
        "moved_ids": split["moved_ids"], "fit_s": fit_s, "score_s": score_s, "peak_rss_mb": _peak_rss_mb(),
        "peak_cuda_mb": torch.cuda.max_memory_allocated(device) / 1e6 if device.type == "cuda" else None,
        "device": str(device), "selection": "final", "reused_from": "",
        "cache_fingerprint": store.fingerprint(), "funad_version": __version__,
    }
    for name, value in config.items():
        if f"cfg_{name}" in COLUMNS:
            row[f"cfg_{name}"] = value
    return row


# --------------------------------------------------------------------- sweep


def sweep(cache_path, sweep_dir, *, ratios: Sequence[float] = DEFAULT_RATIOS, overlap: str = "both",
          methods: Sequence[MethodSpec] = (), seeds: Sequence[int] = (0,), sets: Optional[dict] = None,
          epochs: Optional[int] = None, device: str = "auto", progress: Progress = NullProgress()) -> list[dict]:
    """Run (or resume) the grid and write results.csv, results.md and the plot.

    Args:
        ratios: anomaly-to-normal contamination ratios.
        overlap: "both", "overlap" or "no-overlap".
        methods: from :func:`parse_methods`; default: FUN-AD's default preset and kNN.
        seeds: each seeds the contamination draw and the fit.
        sets: grid over FunADConfig fields, ``{name: [values]}`` (funad methods only).
        epochs: override the presets' epochs.
    Returns:
        Every row of results.csv after the run (earlier rows included).
    """
    if overlap not in OVERLAPS:
        raise PipelineError(f"--overlap must be one of {list(OVERLAPS)}, got {overlap!r}")
    bad = [r for r in ratios if not 0.0 <= r <= 1.0]
    if bad:
        raise PipelineError(f"--contamination ratios must lie in [0, 1], got {bad}")
    if epochs is not None and "epochs" in (sets or {}):
        raise PipelineError("give the epochs either as --epochs or as --set epochs=..., not both")
    methods = list(methods) or parse_methods("funad,knn")
    dev = resolve_device(device)
    sweep_dir = Path(sweep_dir)
    sweep_dir.mkdir(parents=True, exist_ok=True)
    csv_path = sweep_dir / RESULTS_CSV
    cells = build_grid(methods, sorted(ratios), OVERLAPS[overlap], seeds, dict(sets or {}))

    with cache.open(cache_path, mode="r") as store:
        check_complete(store)
        usable = store.indices(complete_only=True)
        unknown = int((np.asarray(store.labels)[usable] < 0).sum())
        if unknown:
            raise PipelineError(f"cache {store.path} has {unknown} images without a label; a sweep evaluates every "
                                "cell on labelled test images, extract a labelled dataset")
        fingerprint = store.fingerprint()
        rows = read_results(csv_path)
        others = sorted({r["cache_fingerprint"] for r in rows} - {fingerprint})
        if others:
            raise PipelineError(f"{csv_path} holds results of another cache (fingerprint {others[0][:12]}); "
                                f"use another -o for cache {store.path}")
        done = {r["key"]: r for r in rows}
        todo = [c for c in cells if c.key not in done]
        logger.info("sweep: %d cells, %d already in %s, %d to run", len(cells), len(cells) - len(todo),
                    csv_path, len(todo))
        modeldir.write_json(sweep_dir / SWEEP_JSON, {
            "cache": str(Path(cache_path).resolve()), "cache_fingerprint": fingerprint, "attrs": dict(store.attrs),
            "ratios": sorted(ratios), "overlap": overlap, "methods": [m.label for m in methods],
            "seeds": list(seeds), "sets": sets or {}, "epochs": epochs, "selection": "final",
            "funad_version": __version__,
        })
        if todo:
            # RMSprop's first construction imports torch._dynamo (seconds on a CPU); pay it
            # before the first cell so that fit_s compares across cells.
            import torch._dynamo  # noqa: F401

            feats = _Features(store, dev, progress)
            task = progress.task("sweep", total=len(cells), unit="cell")
            task.advance(len(cells) - len(todo))
            for cell in todo:
                task.update(description=f"sweep {cell.key}")
                twin = done.get(cell.twin_key() or "")
                if twin is not None:
                    row = {**twin, "key": cell.key, "overlap": 1, "reused_from": twin["key"]}
                else:
                    row = run_cell(cell, store, feats, epochs=epochs, device=dev, task=task)
                append_row(csv_path, row)
                done[cell.key] = row
                task.advance(1)
    rows = read_results(csv_path)
    write_markdown(sweep_dir / RESULTS_MD, rows, store_attrs=_attrs_of(sweep_dir))
    write_plot(sweep_dir / PLOT_PNG, rows)
    return rows


def _attrs_of(sweep_dir: Path) -> dict:
    try:
        return json.loads((sweep_dir / SWEEP_JSON).read_text()).get("attrs", {})
    except (OSError, json.JSONDecodeError):
        return {}


# ------------------------------------------------------------ table and plot


def _group(rows: Sequence[dict]) -> dict:
    """{(row label, overlap): {ratio: {metric: [values over seeds]}}}."""
    out: dict = {}
    for r in rows:
        label = (f"funad:{r['preset']}" if r["method"] == "funad" else r["method"])
        if r.get("params"):
            label += f" ({r['params']})"
        cell = out.setdefault((label, int(r["overlap"])), {}).setdefault(float(r["ratio"]), {})
        for m in METRICS:
            cell.setdefault(m, []).append(float(r[m]) if r[m] not in ("", None) else float("nan"))
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
    lines += [f"Each cell: mean ± sample std over seeds; {len(rows)} runs in results.csv. "
              "At 0% the overlap and no-overlap settings are the same run.", ""]
    text = "\n".join(lines)
    modeldir.atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


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
                            marker="o", capsize=3, label=label)
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
