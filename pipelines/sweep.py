"""``funad sweep``: contamination curves over a grid of methods, ratios, seeds and settings.

One process, one read of the features: every complete image of the cache is
loaded once into an in-memory float32 tensor (N, P, D) (on the GPU when the
device is CUDA and it fits, see :mod:`funad.pipelines.features`) and every
cell of the grid slices its training and test images out of it. Memory:
``N_all * P * D * 4`` bytes for the pool plus ``N_train * P * D * 4`` for
the cell's training copy, e.g. MVTec AD bottle (292 images, P = 784,
D = 768): 703 MB + 554 MB; the test masks are kept too (H * W bytes each).

A cell is (method, overlap, ratio, seed, hyperparameter values, epochs). For
each cell the sweep

1. draws the contamination split (``funad.contamination`` with the cell's
   seed, exactly as ``funad fit --contamination RATIO --seed SEED`` would);
2. fits the method on the split's training images (final epoch; model
   selection never looks at test labels). A FUN-AD cell that differs from
   an earlier one only in inference settings (``scorer``, ``clean_share``,
   ``clean_coreset``, ``clean_max_patches``, ``score_space``) takes that
   cell's trained Local-Net instead of training the same one again
   (:class:`TrainedNets`; ``trained_by`` in results.csv);
3. scores the split's test images and measures them exactly as ``funad eval``
   does (:func:`funad.pipelines.scoring.measure`: anomaly maps with the
   cache's grid, mask size and map sigma; image AUROC/AP/F1-max, pixel
   AUROC/AP and AUPRO@0.3);
4. chooses the unlabelled thresholds from the training images' scores, as
   ``funad fit`` does (:mod:`funad.pipelines.thresholds`; included in
   ``fit_s``), and reports precision/recall/F1 of the test images at the
   default rule's threshold and the F1 of every candidate rule, next to
   F1-max (whose threshold is chosen with the test labels);
5. appends one row to ``results.csv`` (metrics, config, seed, times, peak
   memory) and flushes it, so an interrupted sweep resumes where it stopped:
   cells whose key is already in ``results.csv`` are skipped.

At ratio 0 the overlap and no-overlap settings are the same experiment; the
overlap cell copies the no-overlap cell's metrics (``reused_from`` says so).

Outputs in SWEEP_DIR (written by :mod:`funad.pipelines.sweep_report`):
``results.csv``, ``results.md`` (the paper's layout: rows are methods x
overlap setting, columns are ratios, cells are "image / pixel AUROC" in %,
mean ± std over seeds) and ``auroc_vs_contamination.png``. ``sweep.json``
records the grid and the cache. The grid and the cell keys:
:mod:`funad.pipelines.sweep_grid`.

Peak memory: ``peak_rss_mb`` is the process's resident-set high-water mark
(``getrusage``) when the cell ended, so it never decreases along the sweep;
``peak_cuda_mb`` is ``torch.cuda.max_memory_allocated`` during the cell.
"""

from __future__ import annotations

import json
import logging
import resource
import sys
import time
from collections import OrderedDict
from pathlib import Path
from typing import Iterable, Optional, Sequence

import numpy as np
import torch

from funad import __version__, cache

from . import modeldir, original_size, thresholds
from .device import resolve_device
from .errors import PipelineError
from .features import FirstImages, choose_residency, feature_bytes, load_features
from .fit_data import check_complete, check_trainable, clean_bank_record, split_cache, synthetic_ids, synthetic_labels
from .progress import NullProgress, Progress
from .scoring import MAP_SIGMA, measure, score_tensor
from .sweep_grid import OVERLAPS, Cell, MethodSpec, build_grid, parse_floats, parse_grid_sets, parse_ints, parse_methods
from .sweep_report import (COLUMNS, METRICS, THRESHOLD_METRICS, PLOT_PNG, RESULTS_CSV, RESULTS_MD, SWEEP_JSON, append_row, read_results,
                           write_cell_scores, write_markdown, write_plot)

__all__ = ["sweep", "run_cell", "parse_methods", "parse_floats", "parse_ints", "parse_grid_sets", "build_grid",
           "Cell", "MethodSpec", "METRICS", "THRESHOLD_METRICS", "COLUMNS", "RESULTS_CSV", "RESULTS_MD", "PLOT_PNG", "DEFAULT_RATIOS"]

logger = logging.getLogger(__name__)

DEFAULT_RATIOS = (0.0, 0.01, 0.03, 0.05, 0.1, 0.2)


def _peak_rss_mb() -> float:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 1e6 if sys.platform == "darwin" else peak / 1e3  # bytes on macOS, KiB on Linux


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


class TrainedNets:
    """The Local-Nets the sweep trained, by :attr:`Cell.training_key`: a cell that differs from an earlier one
    only in inference settings (``scorer``, ``clean_share``...) takes its net instead of training again.

    Holds at most ``size`` nets (the most recently used), as CPU state dicts without any bank: a few MB each.
    A resumed sweep starts empty and trains again where it must, with the same result.
    """

    def __init__(self, size: int = 16) -> None:
        self.size, self.nets = size, OrderedDict()

    def find(self, cell: Cell) -> Optional[tuple[str, dict]]:
        """(key of the cell that trained it, its state) for ``cell``'s training, or None."""
        found = self.nets.get(cell.training_key) if cell.training_key else None
        if found is not None:
            self.nets.move_to_end(cell.training_key)
        return found

    def keep(self, cell: Cell, model) -> None:
        if cell.training_key:
            self.nets[cell.training_key] = (cell.key, model.state_dict(with_bank=False))
            while len(self.nets) > self.size:
                self.nets.popitem(last=False)


def run_cell(cell: Cell, store, feats: _Features, *, device: torch.device, task,
             sweep_dir: Optional[Path] = None, map_size: str = "input",
             trained: Optional[TrainedNets] = None) -> dict:
    """Fit and evaluate one cell; returns its results.csv row (and writes cells/<key>.json into ``sweep_dir``).

    With ``trained``, a FUN-AD cell whose training an earlier cell did takes that cell's Local-Net
    (``FunAD.adopt_training``, the same model as training again; ``trained_by`` names the cell and ``fit_s``
    leaves the training out), and a cell that trains leaves its net there.
    """
    from funad.data import TensorSource

    split = split_cache(store, cell.ratio, cell.overlap, cell.seed)
    train_ids = np.asarray(split["train_ids"], dtype=np.int64)
    test_ids = np.asarray(split["test_ids"], dtype=np.int64)
    config = cell.config
    # FUN-AD* synthetic anomalies (funad extract --synthetic) join the training images as the config says
    syn_ids = synthetic_ids(store, config.get("synthetic", "off"))
    check_trainable(store, train_ids, config.get("batch_size"))
    if len(test_ids) == 0:
        raise PipelineError(f"cell {cell.key}: the split has no test images to evaluate")
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    start, trained_by = time.perf_counter(), ""
    model = modeldir.build_model(cell.spec.method, config, device=device)
    source = TensorSource(feats.pool.index_select(0, feats.rows(np.concatenate([train_ids, syn_ids]))))
    if cell.spec.method == "funad":
        def on_epoch(record: dict) -> None:
            loss = record.get("loss")
            task.update(**{"epoch": record.get("epoch", ""), **({"loss": float(loss)} if loss is not None else {})})

        synthetic = np.arange(source.n_images) >= len(train_ids)
        earlier = trained.find(cell) if trained is not None else None
        if earlier is not None:
            trained_by = earlier[0]
            model.adopt_training(earlier[1], source, device=device, synthetic=synthetic if synthetic.any() else None)
        else:
            labels = None
            if len(syn_ids) and config.get("synthetic") == "mask":
                labels = np.zeros((source.n_images, source.n_patches), dtype=np.uint8)
                labels[synthetic] = synthetic_labels(store, syn_ids)
            model.fit(source, device=device, callback=on_epoch, synthetic=synthetic, synthetic_labels=labels)
            if trained is not None:
                trained.keep(cell, model)
    else:
        model.fit(source)
    # The unlabelled thresholds, exactly as `funad fit` chooses them (default rule and parameters).
    record = thresholds.fit_thresholds(model, cell.spec.method, FirstImages(source, len(train_ids)), store.grid,
                                       store.mask_size,
                                       thresholds.rule_for(cell.spec.method, config=config), device)
    del source
    fit_s = time.perf_counter() - start
    kept = clean_bank_record(model, store, split) or {}

    start = time.perf_counter()
    scores, image_scores = score_tensor(model, feats.pool.index_select(0, feats.rows(test_ids)), device=device,
                                        with_images=True)
    labels = np.asarray(store.labels)[test_ids].astype(np.int64)
    masks = np.stack([feats.masks[int(i)] for i in test_ids])
    measured = measure(scores, labels, masks, store.grid, sigma=MAP_SIGMA, device=device, image_scores=image_scores)
    values = measured.metrics
    original = original_size.measure(store, test_ids, measured.maps, map_size) if labels.any() else None
    score_s = time.perf_counter() - start
    pixels = ((original.masks, original.maps) if original is not None else (masks, measured.maps)) if labels.any() \
        else (None, None)
    decided = thresholds.at_thresholds(record, labels, image_scores, *pixels)
    if sweep_dir is not None:
        write_cell_scores(sweep_dir, cell.key, {"threshold": record, "test_ids": test_ids, "test_labels": labels,
                                                "test_image_scores": image_scores, "at_thresholds": decided})

    row: dict = {
        "key": cell.key, "method": cell.spec.method, "preset": cell.spec.preset or "", "params": cell.params_text,
        "overlap": int(cell.overlap), "ratio": cell.ratio, "seed": cell.seed,
        **{m: float(values[m]) for m in METRICS},
        "thr_rule": record["rule"], "precision_at_thr": decided["model_threshold"]["precision"],
        "recall_at_thr": decided["model_threshold"]["recall"], "f1_at_thr": decided["model_threshold"]["f1"],
        **{f"f1_thr_{name}": r["f1"] for name, r in decided["candidates"].items()},
        "pixel_f1_max": (original.metrics if original is not None else values).get("pixel_f1_max"),
        "pixel_f1_at_thr": (decided.get("pixel_threshold") or {}).get("f1"),
        "n_train": len(train_ids), "n_synthetic": len(syn_ids), "n_test": len(test_ids), "n_moved": split["n_moved"],
        "moved_ids": split["moved_ids"], "fit_s": fit_s, "score_s": score_s, "peak_rss_mb": _peak_rss_mb(),
        "peak_cuda_mb": torch.cuda.max_memory_allocated(device) / 1e6 if device.type == "cuda" else None,
        "device": str(device), "selection": "final", "reused_from": "", "trained_by": trained_by,
        "clean_images": kept.get("images"), "clean_normal_share": kept.get("normal_share"),
        "cache_fingerprint": store.fingerprint(), "funad_version": __version__,
        "map_size": "input" if original is None else "original",
        **({} if original is None else {"pixel_auroc_original": original.metrics["pixel_auroc"],
                                        "aupro_original": original.metrics["aupro"],
                                        "unscored_pixel_share": original.unscored_share}),
    }
    for name, value in config.items():
        if f"cfg_{name}" in COLUMNS:
            row[f"cfg_{name}"] = value
    return row


def sweep(cache_path, sweep_dir, *, ratios: Sequence[float] = DEFAULT_RATIOS, overlap: str = "both",
          methods: Sequence[MethodSpec] = (), seeds: Sequence[int] = (0,), sets: Optional[dict] = None,
          epochs: Optional[int] = None, device: str = "auto", map_size: str = "auto",
          progress: Progress = NullProgress()) -> list[dict]:
    """Run (or resume) the grid and write results.csv, results.md and the plot.

    Args:
        ratios: anomaly-to-normal contamination ratios.
        overlap: "both", "overlap" or "no-overlap".
        methods: from :func:`parse_methods`; default: FUN-AD's default preset and kNN.
        seeds: each seeds the contamination draw and the fit.
        sets: grid over FunADConfig fields, ``{name: [values]}`` (funad methods only).
        epochs: override the presets' epochs.
        map_size: "auto", "original" or "input", as ``funad eval --map-size``: with "original" (and
            "auto" on a cache of a dataset funad reads) each cell also has its pixel metrics at the
            original images' size (the input-size ones stay, for the paper's protocol).
    Returns:
        Every row of results.csv after the run (earlier rows included).
    """
    if overlap not in OVERLAPS:
        raise PipelineError(f"--overlap must be one of {list(OVERLAPS)}, got {overlap!r}")
    bad = [r for r in ratios if not 0.0 <= r <= 1.0]
    if bad:
        raise PipelineError(f"--contamination ratios must lie in [0, 1], got {bad}")
    if map_size not in original_size.MAP_SIZES:
        raise PipelineError(f"--map-size must be one of {list(original_size.MAP_SIZES)}, got {map_size!r}")
    if epochs is not None and "epochs" in (sets or {}):
        raise PipelineError("give the epochs either as --epochs or as --set epochs=..., not both")
    methods = list(methods) or parse_methods("funad,knn")
    dev = resolve_device(device)
    sweep_dir = Path(sweep_dir)
    sweep_dir.mkdir(parents=True, exist_ok=True)
    csv_path = sweep_dir / RESULTS_CSV
    cells = build_grid(methods, sorted(ratios), OVERLAPS[overlap], seeds, dict(sets or {}), epochs)

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
            "seeds": list(seeds), "sets": sets or {}, "epochs": epochs, "selection": "final", "map_size": map_size,
            "funad_version": __version__,
        })
        if todo:
            # RMSprop's first construction imports torch._dynamo (seconds on a CPU); pay it
            # before the first cell so that fit_s compares across cells.
            import torch._dynamo  # noqa: F401

            feats = _Features(store, dev, progress)
            task = progress.task("sweep", total=len(cells), unit="cell")
            trained = TrainedNets()
            task.advance(len(cells) - len(todo))
            for cell in todo:
                task.update(description=f"sweep {cell.key}")
                twin = done.get(cell.twin_key() or "")
                if twin is not None:
                    row = {**twin, "key": cell.key, "overlap": 1, "reused_from": twin["key"]}
                else:
                    row = run_cell(cell, store, feats, device=dev, task=task, sweep_dir=sweep_dir, map_size=map_size,
                                   trained=trained)
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
