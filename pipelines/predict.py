"""``funad predict``: score raw images with a fitted model (the deployment path).

The backbone is rebuilt from the settings the model records (the attributes of
the cache it was fitted on: backbone name, weights and their sha256, block,
input size, resize/crop, mean/std) and checked against them; images go through
the same pre-processing as ``funad extract`` (``funad.pipelines.backbone``).
Images are decoded in DataLoader workers, run through the backbone in batches
(on the GPU when present) and scored; each gets an anomaly map built exactly
as ``funad eval`` builds it (:func:`image_map`, the one place that makes it).

Inputs and the output folder (recursion, mirrored names, refusal of a
non-empty folder, ``--overwrite``): :mod:`funad.pipelines.predict_files`.

Decisions: the model's own image threshold, chosen without labels at the end
of ``funad fit`` (:mod:`funad.pipelines.thresholds`), unless ``threshold``
overrides it; a threshold outside the range of the model's training scores
is refused. Every image gets its raw score, a normalised score (0.5 = the
threshold, :func:`funad.threshold.normalise`) and the decision
``score >= threshold``. A model fitted before thresholds were recorded gives
no decision without ``threshold``.

Per-image outputs (``heatmaps``): ``"png"`` writes heatmaps/<name>.png (the
image and the overlay on the model's fixed colour scale,
:mod:`funad.pipelines.overlay`), ``"npy"`` writes maps/<name>.npy (the
float32 map in the model's score units), ``"tiff"`` the same as maps/<name>.tiff
(32-bit float), ``"none"`` neither. They are
rendered in a background thread while the next batch is scored.

A missing or unreadable image is recorded as an error in the outputs and the
others are still scored, unless ``strict`` is set, which stops at the first.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence, Union

import torch
from PIL import Image

from funad import threshold as rules

from . import thresholds
from .backbone import PRECISIONS
from .device import resolve_device
from .errors import DatasetError, ModelDirError, PipelineError
from .evaluate import check_report_dir, place_model
from .geometry import Geometry
from .model_backbone import backbone_for_model, features
from .modeldir import ModelInfo, load_model_dir
from .predict_files import InputImage, collect_images, prepare_output, write_manifest
from .predict_outputs import NO_THRESHOLD_NOTE, Outputs, image_map, write_outputs
from .progress import NullProgress, Progress
from .scoring import model_scores

logger = logging.getLogger(__name__)

HEATMAPS = ("none", "png", "npy", "tiff")

__all__ = ["predict", "collect_images", "image_map", "PredictResult", "HEATMAPS", "NO_THRESHOLD_NOTE"]


@dataclass
class PredictResult:
    """What a predict run produced; ``records`` has one dict per input (scores.json's "images")."""

    out_dir: Path
    records: list[dict]
    threshold: Optional[float]
    throughput: dict
    decision: dict = field(default_factory=dict)
    files: list[Path] = field(default_factory=list)

    @property
    def n_errors(self) -> int:
        return sum(1 for r in self.records if r.get("error"))


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
            return i, torch.zeros(3, *self.transform.frame, dtype=torch.uint8), (
                f"cannot read image: {type(exc).__name__}: {exc}")


# --------------------------------------------------------------------------- decisions and maps


def decision_for(info: ModelInfo, threshold: Optional[float]) -> dict:
    """The run's decision rule: the model's threshold, or ``threshold`` (checked against the training range)."""
    record = thresholds.recorded(info)
    if threshold is not None:
        if not math.isfinite(threshold):
            raise PipelineError(f"--threshold must be a finite number, got {threshold}")
        if record:
            lo, hi = thresholds.score_range(record, "image")
            if not rules.in_range(threshold, lo, hi):
                raise PipelineError(
                    f"--threshold {threshold:g} lies outside the range of model {info.path}'s training scores "
                    f"[{lo:.6g}, {hi:.6g}], so it would give images like the training ones all the same decision; "
                    f"choose a value in that range (the model's own threshold is {record['image']:.6g}, rule "
                    f"{record['rule']}), or leave --threshold out")
        return {"threshold": float(threshold), "source": "--threshold", "record": record}
    if record:
        return {"threshold": float(record["image"]), "record": record,
                "source": f"the model's own threshold ({record['rule']} rule on its unlabelled training scores)"}
    return {"threshold": None, "source": None, "record": None}


# --------------------------------------------------------------------------- the run


def predict(model_dir: Path, inputs: Sequence[Path], out_dir: Path, *, threshold: Optional[float] = None,
            batch_size: int = 16, device: str = "auto", precision: Optional[str] = None, strict: bool = False,
            weights: Optional[Path] = None, workers: Optional[int] = None, heatmaps: Union[str, bool] = "png",
            overwrite: bool = False, progress: Progress = NullProgress()) -> PredictResult:
    """Score raw images with a model directory; write scores.json, scores.csv and the per-image outputs.

    Args:
        inputs: image files and/or folders (searched recursively; names mirrored in the outputs).
        threshold: overrides the model's own threshold: an image is anomalous when its score >= threshold.
        precision: backbone autocast, "fp32", "bf16" or "fp16"; default: the cache's.
        workers: DataLoader decode workers (default: as ``funad extract``: 1 on CPU, more on a GPU).
        heatmaps: "png", "npy", "tiff" or "none" (module docstring); True/False mean "png"/"none".
        overwrite: replace what an earlier predict wrote into a non-empty ``out_dir`` (else refused).
    Returns:
        A :class:`PredictResult`; ``records[i]`` has path, output name, score, normalised_score and
        is_anomalous (None on error or without any threshold), heatmap/map and error.
    Raises:
        DatasetError when no image can be found, or with ``strict`` at the first
        missing/unreadable image or empty folder; PipelineError for a non-empty
        ``out_dir`` without ``overwrite`` or a threshold outside the training scores' range.
    """
    out_dir = Path(out_dir)
    heatmaps = {True: "png", False: "none"}.get(heatmaps, heatmaps) if isinstance(heatmaps, bool) else heatmaps
    if heatmaps not in HEATMAPS:
        raise PipelineError(f"--heatmaps must be one of {list(HEATMAPS)}, got {heatmaps!r}")
    if batch_size < 1:
        raise PipelineError(f"--batch-size must be >= 1, got {batch_size}")
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

    model, info = load_model_dir(model_dir)
    tokens = str(info.raw.get("tokens", "patch"))
    if tokens == "class" and heatmaps != "none":
        logger.warning("model %s was fitted on class tokens alone (funad fit --tokens class): it gives one score "
                       "per image and no anomaly map, so no --heatmaps %s files are written", info.path, heatmaps)
        heatmaps = "none"
    decision = decision_for(info, threshold)
    if heatmaps == "png" and decision["record"] is None:
        raise ModelDirError(f"{info.path / 'config.json'} records no threshold (fitted by an older funad), and PNG "
                            f"heatmaps are drawn on the model's fixed scale around it; re-fit the model, or pass "
                            f"--heatmaps npy, tiff or none")
    prepare_output(out_dir, overwrite)
    for path, reason in problems:
        logger.warning("%s: %s; recorded as an error", path, reason)
    dev = resolve_device(device)
    bb = backbone_for_model(info, dev, weights=weights, precision=precision)
    place_model(model, dev)
    from .extract import default_num_workers

    transform = Geometry.from_attrs({**info.cache.get("attrs", {}), "image_size": bb.image_size,
                                     "patch_size": bb.patch_size})  # the store's resize/crop or full frame
    n_workers = default_num_workers(dev) if workers is None else int(workers)
    loader_options = dict(batch_size=batch_size, shuffle=False, num_workers=n_workers, pin_memory=dev.type == "cuda")
    records: list[dict] = [{"path": str(im.path), "output": im.rel, "score": None, "normalised_score": None,
                            "is_anomalous": None, "error": None} for im in images]

    start = time.perf_counter()
    with Outputs(out_dir, heatmaps, info, decision) as outputs:
        _score_files(model, bb, images, records, transform, str(info.cache.get("dtype", "float32")), strict,
                     loader_options, outputs, progress, tokens)
    seconds = time.perf_counter() - start

    n_scored = sum(r["score"] is not None for r in records)
    throughput = {
        "images_per_s": n_scored / seconds if seconds > 0 else None,
        "seconds": seconds,
        "heatmaps": heatmaps,
        "device": str(dev),
        "precision": bb.precision,
        "batch_size": batch_size,
        "workers": n_workers,
        "what": "decode + resize/crop + backbone + scoring + the per-image outputs (--heatmaps), end to end "
                "from the files",
    }
    for path, reason in problems:
        records.append({"path": str(path), "output": None, "score": None, "normalised_score": None,
                        "is_anomalous": None, "error": reason})
    result = PredictResult(out_dir=out_dir, records=records, threshold=decision["threshold"], throughput=throughput,
                           decision=decision)
    result.files = write_outputs(result, info) + outputs.files
    write_manifest(out_dir, result.files)
    logger.debug("%d image(s) scored at %.1f images/s (%d error(s)); results in %s", n_scored,
                 throughput["images_per_s"] or 0.0, result.n_errors, out_dir)
    return result


def _score_files(model, bb, images: list[InputImage], records: list[dict], transform, store_dtype: str,
                 strict: bool, loader_options: dict, outputs: "Outputs", progress: Progress,
                 tokens: str = "patch") -> None:
    """Decode, pre-process, embed and score every image, batch by batch; hand each batch to ``outputs``.

    Fills ``records[i]`` for each readable image ``i`` and ``records[i]["error"]``
    for the others (or raises DatasetError at the first one when ``strict``).
    """
    task = progress.task("predicting", total=len(images), unit="img")
    paths = [im.path for im in images]
    for idx, crops, errors in torch.utils.data.DataLoader(ImageFiles(paths, transform), **loader_options):
        for i, err in ((int(i), e) for i, e in zip(idx, errors) if e):
            if strict:
                raise DatasetError(f"{paths[i]}: {err} (--strict stops at the first problem)")
            logger.warning("%s: %s; recorded as an error, the other images are still scored", paths[i], err)
            records[i]["error"] = err
        ok = torch.tensor([not e for e in errors])
        if ok.any():
            ids = idx[ok].numpy()
            patch_scores, image_scores = model_scores(model, features(bb, crops[ok], store_dtype, tokens))
            batch = [records[i] for i in ids]
            outputs.decide(batch, image_scores)
            outputs.submit([images[i] for i in ids], batch, crops[ok].permute(0, 2, 3, 1).numpy(), patch_scores)
        task.advance(len(idx))


