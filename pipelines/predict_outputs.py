"""What ``funad predict`` writes: decisions, the per-image map files (in a writer thread), scores.json/.csv.

Per-image outputs (``--heatmaps``): ``png`` writes heatmaps/<name>.png (the
image and its overlay on the model's fixed colour scale,
:mod:`funad.pipelines.overlay`), ``npy`` writes maps/<name>.npy (the float32
map in the model's score units), ``tiff`` maps/<name>.tiff (the same as a 32-bit float
TIFF), ``none`` neither. One background thread
writes them while the next batch is scored.
"""

from __future__ import annotations

import csv
import json
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Optional

import numpy as np
from PIL import Image

from funad import __version__, anomaly_map

from . import overlay, thresholds
from .modeldir import ModelInfo
from .original_size import MAP_FORMATS, write_map
from .predict_files import InputImage
from .geometry import Geometry, original_size
from .scoring import MAP_SIGMA

NO_THRESHOLD_NOTE = ("the model records no threshold (fitted by an older funad) and no --threshold was given: "
                     "scores are reported without an anomalous/normal decision")
_PENDING = 4  # batches of pictures queued for the writer thread at most
MAX_PICTURE_SIDE = 1280  # PNG heatmaps of larger originals are shrunk to this long side


def image_map(patch_scores: np.ndarray, info: ModelInfo, original: Optional[Path] = None) -> np.ndarray:
    """The anomaly map float32 of one image from its patch scores (P,), built as ``funad eval`` builds it.

    The one place where predict decides a map's geometry: the model's patch
    grid, upsampled to the cache's mask size (the store's frame), Gaussian
    ``MAP_SIGMA``; then, given the ``original`` image file, back on its pixels
    (h, w) through the store's geometry (NaN where the geometry never scored a
    pixel: the paper crop's border; :mod:`funad.pipelines.geometry`).
    """
    amap = anomaly_map.patch_scores_to_maps(np.asarray(patch_scores, dtype=np.float32)[None], info.grid,
                                            info.mask_size, sigma=MAP_SIGMA)[0]
    if original is None:
        return amap
    return Geometry.from_attrs(dict(info.cache.get("attrs", {}))).to_original(amap, original_size(original))


def original_picture(path: Path, amap: np.ndarray, max_side: int = MAX_PICTURE_SIDE) -> tuple[np.ndarray, np.ndarray]:
    """The original image (h, w, 3) uint8 and its map for a picture, both shrunk when the long side exceeds
    ``max_side`` (the .npy maps keep the original size)."""
    with Image.open(path) as im:
        rgb = im.convert("RGB")
        h, w = amap.shape
        if max(h, w) > max_side:
            f = max_side / max(h, w)
            h, w = max(1, round(h * f)), max(1, round(w * f))
            amap = np.asarray(Image.fromarray(amap).resize((w, h), Image.BILINEAR))
        return np.asarray(rgb.resize((w, h), Image.BILINEAR) if rgb.size != (w, h) else rgb), amap


class Outputs:
    """Decisions and the per-image files of a run; the files are written by one background thread."""

    def __init__(self, out_dir: Path, heatmaps: str, info: ModelInfo, decision: dict) -> None:
        self.out_dir, self.heatmaps, self.info, self.decision = out_dir, heatmaps, info, decision
        self.files: list[Path] = []
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="funad-heatmaps")
        self._pending: list[Future] = []

    def __enter__(self) -> "Outputs":
        return self

    def __exit__(self, *exc) -> None:
        try:
            if exc[0] is None:
                for f in self._pending:
                    f.result()
        finally:
            self._pool.shutdown(wait=True, cancel_futures=exc[0] is not None)

    def decide(self, batch: list[dict], image_scores: np.ndarray) -> None:
        t, record = self.decision["threshold"], self.decision["record"]
        for r, score in zip(batch, image_scores):
            r["score"] = float(score)  # the model's image score (the max patch score for most)
            if t is not None:
                r["is_anomalous"] = bool(score >= t)
                if record:
                    r["normalised_score"] = float(thresholds.normalised(record, float(score), t))

    def submit(self, images: list[InputImage], batch: list[dict], crops: np.ndarray, patch_scores: np.ndarray) -> None:
        if self.heatmaps == "none":
            return
        while len(self._pending) >= _PENDING:
            self._pending.pop(0).result()
        self._pending.append(self._pool.submit(self._write, images, batch, crops, patch_scores))

    def _write(self, images: list[InputImage], batch: list[dict], crops: np.ndarray, patch_scores: np.ndarray) -> None:
        record = self.decision["record"]
        for im, r, crop, p in zip(images, batch, crops, patch_scores):
            amap = image_map(p, self.info, im.path)  # on the original image's pixels
            if self.heatmaps in MAP_FORMATS:
                path = write_map(self.out_dir / "maps" / f"{im.rel}.{self.heatmaps}", amap)
                r["map"] = path.relative_to(self.out_dir).as_posix()
            else:
                norm = thresholds.normalised(record, amap, key="pixel")
                header = f"{im.rel}  score {r['score']:.4g} (normalised {r['normalised_score']:.2f})  " + (
                    f"{'ANOMALOUS' if r['is_anomalous'] else 'normal'} at threshold {self.decision['threshold']:.4g}")
                picture, norm = original_picture(im.path, norm)
                path = overlay.save_png(overlay.two_panel(picture, norm, header, r["is_anomalous"]),
                                        self.out_dir / "heatmaps" / f"{im.rel}.png")
                r["heatmap"] = path.relative_to(self.out_dir).as_posix()
            self.files.append(path)


def write_outputs(result, info: ModelInfo) -> list[Path]:
    """scores.json (everything) and scores.csv (one row per input)."""
    out = result.out_dir
    decision, record = result.decision, result.decision.get("record")
    t = result.threshold
    doc = {
        "model_dir": str(info.path),
        "method": info.method,
        "selection": info.selection,
        "threshold": t,
        "threshold_source": decision.get("source"),
        "decision": NO_THRESHOLD_NOTE if t is None else f"is_anomalous = score >= {t:.6g}",
        "normalised_score": None if not record else (
            "clip((g(score) - g(threshold)) / (g(max) - g(min)) + 0.5, 0, 1): 0.5 = the threshold; min/max = the "
            f"model's training scores [{record['training_scores']['image']['min']:.6g}, "
            f"{record['training_scores']['image']['max']:.6g}], g = {record['params']['scale']}"),
        "pixel_threshold": None if not record else record["pixel"],
        "heatmap_scale": None if not record else (
            "colours show the map normalised like the score around the model's PIXEL threshold: the middle of "
            "the colour bar (0.5) is the pixel threshold, identical in every run of this model"),
        "n_images": sum(1 for r in result.records if r["score"] is not None),
        "n_errors": result.n_errors,
        "throughput": result.throughput,
        "funad_version": __version__,
        "images": result.records,
    }
    (out / "scores.json").write_text(json.dumps(doc, indent=2) + "\n")
    columns = ["path", "output", "score", "normalised_score", "is_anomalous", "heatmap", "map", "error"]
    with open(out / "scores.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(columns)
        for r in result.records:
            w.writerow([
                r["path"], r.get("output") or "", "" if r["score"] is None else f"{r['score']:.6g}",
                "" if r.get("normalised_score") is None else f"{r['normalised_score']:.4f}",
                "" if r.get("is_anomalous") is None else int(r["is_anomalous"]),
                r.get("heatmap", ""), r.get("map", ""), r["error"] or "",
            ])
    return [out / "scores.json", out / "scores.csv"]
