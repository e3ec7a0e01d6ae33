"""``funad predict``: score raw images with a fitted model (the deployment path).

The backbone is rebuilt from the settings the model records (the attributes of
the cache it was fitted on: backbone name, weights and their sha256, block,
input size, resize/crop, mean/std) and checked against them; images go through
the same pre-processing as ``funad extract`` (``funad.pipelines.backbone``).
Images are decoded in DataLoader workers, run through the backbone in batches
(on the GPU when present) and scored; each gets an anomaly map built exactly
as ``funad eval`` builds it.

A missing or unreadable image is recorded as an error in the outputs and the
others are still scored, unless ``strict`` is set, which stops at the first.
Without a threshold no image is called anomalous: scores are only ranked.
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
from PIL import Image

from funad import __version__, anomaly_map

from .errors import DatasetError, PipelineError
from .backbone import PRECISIONS
from .dataset_files import IMAGE_SUFFIXES
from .device import resolve_device
from .evaluate import check_report_dir, place_model
from .scoring import MAP_SIGMA, model_scores
from .model_backbone import backbone_for_model, features
from .modeldir import ModelInfo, load_model_dir
from .progress import NullProgress, Progress

logger = logging.getLogger(__name__)

NO_THRESHOLD_NOTE = "no --threshold given: scores are reported without an anomalous/normal decision"

@dataclass
class PredictResult:
    """What a predict run produced; ``records`` has one dict per input (scores.json's "images")."""

    out_dir: Path
    records: list[dict]
    threshold: Optional[float]
    throughput: dict
    files: list[Path] = field(default_factory=list)

    @property
    def n_errors(self) -> int:
        return sum(1 for r in self.records if r.get("error"))


# --------------------------------------------------------------------------- inputs


def collect_images(inputs: Sequence[Path]) -> tuple[list[Path], list[tuple[Path, str]]]:
    """Expand files and folders into image files.

    Folders contribute their image files (by suffix, case-insensitive, not
    recursive), sorted by name. Returns ``(images, problems)``: a problem is
    ``(path, reason)`` for a missing path or a folder without images.
    """
    images: list[Path] = []
    problems: list[tuple[Path, str]] = []
    for raw in inputs:
        p = Path(raw)
        if p.is_dir():
            found = sorted(f for f in p.iterdir() if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES)
            if not found:
                problems.append((p, f"folder contains no image files ({', '.join(IMAGE_SUFFIXES)})"))
            images.extend(found)
        elif p.is_file():
            images.append(p)
        else:
            problems.append((p, "no such file or folder"))
    return images, problems


class ImageFiles(torch.utils.data.Dataset):
    """Decodes images and applies the backbone's resize and centre crop (``ImageTransform.crop``).

    Items: ``(index, crop (3, S, S) uint8, error str or "")``; an unreadable
    image gives a zero crop and its error text. Normalisation happens on the
    device (``Backbone.normalize``), as in ``funad extract``.
    """

    def __init__(self, paths: Sequence[Path], transform) -> None:
        self.paths = list(paths)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):
        try:
            with Image.open(self.paths[i]) as im:
                crop = self.transform.crop(im)
            return i, torch.from_numpy(crop.transpose(2, 0, 1).copy()), ""
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
            size = self.transform.image_size
            return i, torch.zeros(3, size, size, dtype=torch.uint8), f"cannot read image: {type(exc).__name__}: {exc}"


# --------------------------------------------------------------------------- the run


def predict(model_dir: Path, inputs: Sequence[Path], out_dir: Path, *, threshold: Optional[float] = None,
            batch_size: int = 16, device: str = "auto", precision: Optional[str] = None, strict: bool = False,
            weights: Optional[Path] = None, workers: Optional[int] = None, heatmaps: bool = True,
            progress: Progress = NullProgress()) -> PredictResult:
    """Score raw images with a model directory; write scores.json, scores.csv and heatmap PNGs.

    Args:
        inputs: image files and/or folders (their image files, sorted by name).
        threshold: call an image anomalous when its score >= threshold; None: no decision.
        precision: backbone autocast, "fp32", "bf16" or "fp16"; default: the cache's.
        workers: DataLoader decode workers (default: as ``funad extract``: 1 on CPU, more on a GPU).
        heatmaps: write one PNG per image (the image with its anomaly map overlaid).
    Returns:
        A :class:`PredictResult`; ``records[i]`` has path, score (None on error),
        is_anomalous (only with a threshold), heatmap and error.
    Raises:
        DatasetError when no image can be found, or with ``strict`` at the first
        missing/unreadable image or empty folder.
    """
    out_dir = Path(out_dir)
    if batch_size < 1:
        raise PipelineError(f"--batch-size must be >= 1, got {batch_size}")
    if threshold is not None and not math.isfinite(threshold):
        raise PipelineError(f"--threshold must be a finite number, got {threshold}")
    if precision is not None and precision not in PRECISIONS:
        raise PipelineError(f"--precision must be one of {PRECISIONS}, got {precision!r}")
    check_report_dir(out_dir, Path(model_dir))
    images, problems = collect_images(inputs)
    if problems and strict:
        path, reason = problems[0]
        raise DatasetError(f"{path}: {reason} (--strict stops at the first problem)")
    if not images:
        listing = "; ".join(f"{p}: {r}" for p, r in problems) or "no inputs given"
        raise DatasetError(f"no image to score ({listing}); pass image files or folders that contain images")
    for path, reason in problems:
        logger.warning("%s: %s; recorded as an error", path, reason)

    model, info = load_model_dir(model_dir)
    dev = resolve_device(device)
    bb = backbone_for_model(info, dev, weights=weights, precision=precision)
    place_model(model, dev)
    from .backbone import image_transform
    from .extract import default_num_workers

    transform = image_transform(bb)
    store_dtype = str(info.cache.get("dtype", "float32"))
    n_workers = default_num_workers(dev) if workers is None else int(workers)
    loader_options = dict(batch_size=batch_size, shuffle=False, num_workers=n_workers, pin_memory=dev.type == "cuda")
    out_dir.mkdir(parents=True, exist_ok=True)
    records: list[dict] = [{"path": str(p), "score": None, "error": None} for p in images]
    patch_scores = np.full((len(images), info.n_patches), np.nan, dtype=np.float32)

    start = time.perf_counter()
    _score_files(model, bb, images, records, patch_scores, transform, store_dtype, strict, loader_options, progress)
    seconds = time.perf_counter() - start

    picture_seconds = 0.0
    if heatmaps:
        start = time.perf_counter()
        _write_heatmaps(out_dir / "heatmaps", images, records, patch_scores, info, transform, threshold,
                        loader_options, progress)
        picture_seconds = time.perf_counter() - start

    if threshold is not None:
        for r in records:
            r["is_anomalous"] = None if r["score"] is None else bool(r["score"] >= threshold)
    n_scored = sum(r["score"] is not None for r in records)
    throughput = {
        "images_per_s": n_scored / seconds if seconds > 0 else None,
        "seconds": seconds,
        "picture_seconds": picture_seconds,
        "images_per_s_with_pictures": n_scored / (seconds + picture_seconds) if heatmaps and seconds > 0 else None,
        "device": str(dev),
        "precision": bb.precision,
        "batch_size": batch_size,
        "workers": n_workers,
        "what": "images_per_s: decode + resize/crop + backbone + scoring, end to end from the files; "
                "heatmap PNGs are written afterwards (picture_seconds)",
    }
    for path, reason in problems:
        records.append({"path": str(path), "score": None, "error": reason})
    result = PredictResult(out_dir=out_dir, records=records, threshold=threshold, throughput=throughput)
    result.files = write_outputs(result, info)
    logger.debug("%d image(s) scored at %.1f images/s (%d error(s)); results in %s", n_scored,
                 throughput["images_per_s"] or 0.0, result.n_errors, out_dir)
    return result


def _score_files(model, bb, images: list[Path], records: list[dict], patch_scores: np.ndarray, transform,
                 store_dtype: str, strict: bool, loader_options: dict, progress: Progress) -> None:
    """Decode, pre-process, embed and score every image, batch by batch.

    Fills ``patch_scores[i]`` (P,) and ``records[i]["score"]`` for each
    readable image ``i``, and ``records[i]["error"]`` for the others (or
    raises DatasetError at the first one when ``strict``).
    """
    task = progress.task("predicting", total=len(images), unit="img")
    for idx, crops, errors in torch.utils.data.DataLoader(ImageFiles(images, transform), **loader_options):
        for i, err in ((int(i), e) for i, e in zip(idx, errors) if e):
            if strict:
                raise DatasetError(f"{images[i]}: {err} (--strict stops at the first problem)")
            logger.warning("%s: %s; recorded as an error, the other images are still scored", images[i], err)
            records[i]["error"] = err
        ok = torch.tensor([not e for e in errors])
        if ok.any():
            ids = idx[ok].numpy()
            patch_scores[ids], image_scores = model_scores(model, features(bb, crops[ok], store_dtype))
            for i, score in zip(ids, image_scores):
                records[i]["score"] = float(score)  # the model's image score (the max patch score for most)
        task.advance(len(idx))


def heatmap_name(index: int, path: Path) -> str:
    """A unique PNG name per input: its position, then its file stem."""
    return f"{index:05d}_{path.stem}.png"


def _write_heatmaps(heat_dir: Path, images: list[Path], records: list[dict], patch_scores: np.ndarray,
                    info: ModelInfo, transform, threshold: Optional[float], loader_options: dict,
                    progress: Progress) -> None:
    """One PNG per scored image: the cropped image and its anomaly map, on one colour scale for the run.

    The images are decoded again (bounded memory, and scoring stays free of
    picture work); maps are built from the stored patch scores exactly as
    ``funad eval`` builds them. The colour scale spans the run's patch scores,
    so the same colour means the same score in every picture.
    """
    from . import visualize

    scored = np.flatnonzero([r["score"] is not None for r in records])
    if len(scored) == 0:
        return
    vmin, vmax = float(np.nanmin(patch_scores)), float(np.nanmax(patch_scores))
    heat_dir.mkdir(parents=True, exist_ok=True)
    task = progress.task("heatmaps", total=len(scored), unit="img")
    subset = ImageFiles([images[i] for i in scored], transform)
    for local, crops, errors in torch.utils.data.DataLoader(subset, **loader_options):
        ids = scored[local.numpy()]
        maps = anomaly_map.patch_scores_to_maps(patch_scores[ids], info.grid, info.mask_size, sigma=MAP_SIGMA)
        for j, i in enumerate(ids):
            if errors[j]:  # readable a moment ago, not now (file replaced while running)
                logger.warning("%s: %s; no heatmap written", images[i], errors[j])
                continue
            score = records[i]["score"]
            title = f"{images[i].parent.name}/{images[i].name}  score {score:.4g}"
            if threshold is None:
                title += "  (no threshold: no decision)"
            else:
                title += f"  {'ANOMALOUS' if score >= threshold else 'normal'} at threshold {threshold:.4g}"
            png = heat_dir / heatmap_name(int(i), images[i])
            visualize.panel(crops[j].permute(1, 2, 0).numpy(), None, maps[j], title, png, vmin, vmax, score)
            records[i]["heatmap"] = str(png.relative_to(heat_dir.parent))
        task.advance(len(ids))


def write_outputs(result: PredictResult, info: ModelInfo) -> list[Path]:
    """scores.json (everything) and scores.csv (path, score[, is_anomalous], error)."""
    out = result.out_dir
    doc = {
        "model_dir": str(info.path),
        "method": info.method,
        "selection": info.selection,
        "threshold": result.threshold,
        "decision": NO_THRESHOLD_NOTE if result.threshold is None else f"is_anomalous = score >= {result.threshold}",
        "n_images": sum(1 for r in result.records if r["score"] is not None),
        "n_errors": result.n_errors,
        "throughput": result.throughput,
        "funad_version": __version__,
        "images": result.records,
    }
    (out / "scores.json").write_text(json.dumps(doc, indent=2) + "\n")
    columns = ["path", "score"] + (["is_anomalous"] if result.threshold is not None else []) + ["error"]
    with open(out / "scores.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(columns)
        for r in result.records:
            row = {"path": r["path"], "score": "" if r["score"] is None else f"{r['score']:.6g}",
                   "is_anomalous": "" if r.get("is_anomalous") is None else int(r["is_anomalous"]),
                   "error": r["error"] or ""}
            w.writerow([row[c] for c in columns])
    return [out / "scores.json", out / "scores.csv"]
