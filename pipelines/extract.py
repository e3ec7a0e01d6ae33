"""``funad extract``: run the backbone once over a dataset and fill a feature store.

Three stages overlap: a DataLoader decodes and pre-processes images (in worker
processes on a GPU; between forward passes on CPU, see
:func:`default_num_workers`), the main thread runs the backbone, and a writer
thread stores finished batches (bounded queue, so memory stays flat; see
:mod:`funad.pipelines.extract_io`). An image's status is written after its
data, so an interrupted run keeps every finished image and a re-run on the same
output resumes with the rest, after checking the finished images' checksums and
redoing damaged ones. Settings that change the features (backbone, weights,
block, input size, precision, dtype) must match the store's to resume, and are
checked before the backbone loads; ``overwrite=True`` starts over instead.

Launched by ``torchrun``, every process runs this same function
(:mod:`funad.pipelines.distributed`): rank 0 creates or checks the store and
holds its writer lock, each rank extracts every ``world``-th pending image.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Union

import numpy as np
import torch

import funad
from funad import cache

from .backbone import Backbone, BackboneSpec, known_metadata, load_backbone
from .datasets import Sample, detect_kind, read_dataset
from . import distributed
from .device import auto_precision, resolve_device
from .errors import DatasetError, PipelineError
from . import extract_table
from .extract_io import BatchWriter, ImageDataset, collate
from .geometry import DEFAULT_GEOMETRY, Geometry, as_stored, known_geometry, store_geometry
from .tiles import embed
from .progress import NullProgress, Progress
from . import synthetic as synth

logger = logging.getLogger(__name__)

# Store attributes that must match before a run may resume into an existing store.
# "weights" (the file path) is left out: the same file moved elsewhere has the same sha256.
RESUME_KEYS = ("backbone", "weights_sha256", "layer", "image_size", "resize", "crop", "resize_interpolation",
               "mean", "std", "grid", "token_dim", "precision", "dtype", "geometry", "frame", "tile_overlap")


@dataclass(frozen=True)
class ExtractResult:
    """What one run did: ``written`` new images, ``skipped`` bad ones, ``already`` complete before it."""

    path: Path
    n_images: int
    written: int
    skipped: int
    already: int
    seconds: float
    table: Optional[extract_table.TableReport] = None  # new, removed and renamed files (rank 0 only)

    @property
    def images_per_second(self) -> float:
        return (self.written + self.skipped) / self.seconds if self.seconds > 0 else float("nan")


def default_batch_size(device: torch.device) -> int:
    """Images per forward pass: 8 on CPU (memory stays small), 64 on a GPU (to keep it busy)."""
    return 8 if device.type == "cpu" else 64


def default_num_workers(device: torch.device) -> int:
    """DataLoader worker processes: 0 on CPU, up to 8 on a GPU.

    On CPU the forward pass already keeps every core busy (torch uses one thread
    per core), so a worker process cannot overlap anything: it preempts torch's
    threads, which then wait for each other, and costs more than the few ms per
    image it would save. Loading in the main process between forward passes
    measured ~1.0x forward-only throughput against ~0.9x with one worker
    (benchmarks/results/extract.md). On a GPU the main process is mostly idle, so
    workers decode and pre-process while the GPU runs.
    """
    if device.type == "cpu":
        return 0
    return max(1, min(8, (os.cpu_count() or 2) - 1))


# --------------------------------------------------------------------------- the stage


def extract(
    data: Union[str, Path],
    output: Union[str, Path],
    *,
    dataset: str = "auto",
    backbone: Union[BackboneSpec, Backbone] = BackboneSpec(),
    device: str = "auto",
    batch_size: Optional[int] = None,
    precision: str = "auto",
    format: Optional[str] = None,
    dtype: str = "float16",
    num_workers: Optional[int] = None,
    skip_bad: bool = False,
    overwrite: bool = False,
    prune_missing: bool = False,
    geometry: str = "auto",
    synthetic: Optional[float] = None,
    seed: int = 0,
    chunk_images: Optional[int] = None,
    progress: Progress = NullProgress(),
) -> ExtractResult:
    """Extract backbone features of every image of ``data`` into the store ``output``.

    Args:
        data: dataset folder; ``dataset`` names its layout (``auto`` detects it).
        output: the store (zarr directory, or HDF5 for a ``.h5`` suffix / ``format="hdf5"``).
        backbone: what to load (:class:`BackboneSpec`) or an already loaded :class:`Backbone`.
        device: ``auto``, ``cpu`` or ``cuda``; ``precision``: autocast ``fp32``, ``bf16`` or ``fp16``,
            or ``auto`` (:func:`funad.pipelines.device.auto_precision`: an existing store's own, else
            bf16 on a GPU or a CPU with native bf16, else fp32).
            Both apply when ``backbone`` is a spec; a loaded Backbone keeps its own.
        batch_size: images per forward pass (None: :func:`default_batch_size`).
        dtype: ``float16`` (default) or ``float32`` for the stored tokens.
        num_workers: DataLoader worker processes (None: :func:`default_num_workers`).
        skip_bad: record unreadable images as skipped instead of stopping.
        overwrite: replace an existing store instead of resuming into it.
        prune_missing: drop from the store the images whose file is no longer in ``data`` (by default
            they are kept, marked missing from the source; :mod:`funad.pipelines.extract_table`).
        geometry: ``paper`` (squash and centre-crop) or ``full`` (the whole image, aspect kept, tiled);
            see :mod:`funad.pipelines.geometry`. An existing store made with another one is refused.
            ``auto``: an existing store's own, else ``DEFAULT_GEOMETRY`` (``full``).
        synthetic, seed: add ``round(synthetic * n_train)`` FUN-AD* synthetic anomalies made with ``seed``
            (:mod:`funad.pipelines.synthetic`) after the real images, and write their preview grid beside the store.
        chunk_images: images per chunk of a new store (None: ``funad.cache.layout.CHUNK_IMAGES``); an
            existing store keeps its own.

    Returns an :class:`ExtractResult`. Raises :class:`DatasetError` for a bad
    dataset or an unreadable image (without ``skip_bad``), :class:`BackboneError`
    when the backbone cannot be loaded and ``CacheMismatchError`` when an existing
    store was made with other settings.
    """
    if batch_size is not None and batch_size < 1:
        raise PipelineError(f"--batch-size must be at least 1, got {batch_size}")
    if num_workers is not None and num_workers < 0:
        raise PipelineError(f"--num-workers must be 0 or more, got {num_workers}")
    if synthetic is not None:
        synth.check_ratio(synthetic)
    if chunk_images is not None and chunk_images < 1:
        raise PipelineError(f"--chunk-images must be at least 1, got {chunk_images}")
    group = distributed.join()
    try:
        result = _extract(group, Path(data), Path(output), dataset=dataset, backbone=backbone, device=device,
                          batch_size=batch_size, precision=precision, format=format, dtype=dtype,
                          num_workers=num_workers, skip_bad=skip_bad, overwrite=overwrite,
                          prune_missing=prune_missing, geometry=geometry, synthetic=synthetic, seed=seed,
                          chunk_images=chunk_images, progress=progress)
    finally:
        group.close()
    if synthetic is not None and group.leader:
        with cache.open(result.path, "r", format=format) as store:
            logger.info("synthetic images with their masks: %s", synth.write_preview(store, synth.preview_path(output)))
    return result


def _extract(group: distributed.Group, root: Path, output: Path, *, dataset: str,
             backbone: Union[BackboneSpec, Backbone], device: str, batch_size: Optional[int], precision: str,
             format: Optional[str], dtype: str, num_workers: Optional[int], skip_bad: bool, overwrite: bool,
             prune_missing: bool, geometry: str, synthetic: Optional[float], seed: int, chunk_images: Optional[int],
             progress: Progress) -> ExtractResult:
    """:func:`extract` in one of ``group.world`` processes: rank 0 creates or checks the store and
    redoes damaged images, every rank extracts its share of the pending images, rank 0 closes."""
    if group.world > 1 and cache.infer_format(output, format) == "hdf5":
        raise PipelineError(f"{output}: an HDF5 file takes one writer process, so it cannot be filled by "
                            f"{group.world} processes; write a zarr store (no .h5 suffix) with torchrun")
    kind = detect_kind(root) if dataset == "auto" and root.is_dir() else dataset
    samples = read_dataset(root, kind)
    plan = synth.plan(samples, synthetic, seed, root=root) if synthetic is not None else None
    if plan is not None:
        samples = samples + plan.samples()
    records = [s.as_record() for s in samples]
    synthetic_attr = {"synthetic": plan.attrs() if plan is not None else None}
    exists = not overwrite and (output.exists() or output.is_symlink())
    if geometry == "auto":
        # decided by rank 0 before it creates the store; a store from before geometries existed is "paper"
        geometry = group.from_leader(
            lambda: _recorded_attrs(output, format).get("geometry", "paper") if exists else DEFAULT_GEOMETRY)
        logger.info("--geometry auto: %s", geometry)
    if isinstance(backbone, Backbone):
        bb = backbone
    else:
        if precision == "auto":
            precision = auto_precision(distributed.rank_device(resolve_device(device), group),
                                       _recorded_precision(output, format) if exists else None)
            logger.info("--precision auto: %s", precision)
        if exists:
            # refuse a store made with other settings before spending time on loading the backbone
            group.leader_runs(lambda: _precheck(output, format, {**known_metadata(backbone, precision),
                                                                 **known_geometry(geometry), "dtype": dtype,
                                                                 **synthetic_attr}, records))
        bb = load_backbone(backbone, distributed.rank_device(resolve_device(device), group), precision=precision)
    recorded = _recorded_attrs(output, format) if exists else None
    geom = store_geometry(geometry, bb, [root / s.path for s in samples if s.split != "synthetic"], recorded)
    attributes = {**bb.metadata, **geom.attrs(), "dtype": dtype, "funad_version": funad.__version__,
                  "dataset_kind": kind, "dataset_root": str(root.resolve()), **(synthetic_attr if plan else {})}

    # rank 0 holds the writer lock for the whole run; the other ranks write without it
    # (rank 0 also brings the store's sample table in line with the folder: new, removed, renamed files)
    opened = group.leader_runs(lambda: _open_store(output, records, geom, bb, attributes, dtype=dtype,
                                                   format=format, chunk_images=chunk_images,
                                                   overwrite=overwrite, root=root, prune=prune_missing))
    store, table = opened or (cache.open(output, "a", format=format, lock=False), None)
    try:
        damaged = _find_damaged(store, group, progress)
        if damaged:  # marked by rank 0 before any rank writes again (a damaged image whose file is gone: skipped)
            group.leader_runs(lambda: (store.mark_pending(damaged), extract_table.skip_vanished_pending(store)))
        pending = np.union1d(np.flatnonzero(~store.complete), damaged).astype(np.int64)
        pending = np.setdiff1d(pending, store.missing_from_source)  # no file to extract them from
        samples = extract_table.aligned(store, samples)  # by store index (appended images come last)
        result = _run(store, root, samples, bb, geom, group.share(pending, store.chunk_images), plan, skip_bad=skip_bad,
                      batch_size=default_batch_size(bb.device) if batch_size is None else batch_size,
                      num_workers=default_num_workers(bb.device) if num_workers is None else num_workers,
                      progress=progress)
        written, skipped = group.sum([result.written, result.skipped])  # waits until every rank has written
    finally:
        store.close()  # rank 0's close refreshes the records snapshot
    total = ExtractResult(Path(store.path), store.n_images, written, skipped, store.n_images - pending.size,
                          result.seconds, table)
    if group.world > 1 and group.leader:
        logger.info("%s: %d ranks wrote %d images (%d skipped) in %.1f s, %.2f images/s", output, group.world,
                    written, skipped, total.seconds, total.images_per_second)
    return total


def _recorded_precision(output: Path, format: Optional[str]) -> Optional[str]:
    """The precision an existing store was extracted with (None when it records none)."""
    with cache.open(output, "r", format=format) as existing:
        return existing.attrs.get("precision")


def _recorded_attrs(output: Path, format: Optional[str]) -> dict:
    with cache.open(output, "r", format=format) as existing:
        return dict(existing.attrs)


def _precheck(output: Path, format: Optional[str], requested: dict, records: list[dict]) -> None:
    with cache.open(output, "r", format=format) as existing:
        _check_resumable(existing, requested, records)


def _open_store(output: Path, records: list[dict], geom: Geometry, bb: Backbone, attributes: dict, *, dtype: str,
                format: Optional[str], overwrite: bool, root: Path, prune: bool, chunk_images: Optional[int] = None):
    """``(store, TableReport or None)``: a new store, or the existing one with its table synced to ``records``."""
    if overwrite or not (output.exists() or output.is_symlink()):
        return cache.create(output, samples=records, grid=geom.grid, token_dim=bb.token_dim,
                            mask_size=geom.frame, preview_size=geom.preview_size,
                            dtype=dtype, attributes=attributes, format=format, overwrite=overwrite,
                            chunk_images=chunk_images), None
    store = cache.open(output, "a", format=format)
    try:
        _check_resumable(store, {k: attributes.get(k) for k in (*RESUME_KEYS, "synthetic")}, records)
        store, table = extract_table.sync(store, root, records, prune=prune)
    except BaseException:
        store.close()
        raise
    logger.info("resuming %s: %d of %d images already complete", output, int(store.complete.sum()), store.n_images)
    return store, table


def _find_damaged(store, group: distributed.Group, progress: Progress) -> list[int]:
    """Verify the images a resumed store holds (each rank its share); every rank gets all damaged ones."""
    done = np.flatnonzero(store.complete)[group.rank :: group.world]
    mine: list[int] = []
    if done.size:
        task = progress.task("verify", total=done.size, unit="img")
        mine = [d["index"] for d in store.verify(done, on_progress=task.advance)]
    damaged = group.union(mine)
    if damaged and group.leader:
        paths = store.paths
        logger.warning("%s: %d damaged images will be extracted again: %s", store.path, len(damaged),
                       ", ".join(paths[damaged[:10]]) + (" ..." if len(damaged) > 10 else ""))
    return damaged


def _check_resumable(store, requested: dict, records: list[dict]) -> None:
    """Raise CacheMismatchError unless ``store`` has the ``requested`` settings and its images keep their
    split, label and defect type in ``records`` (new and removed files are fine: :mod:`.extract_table`)."""
    extract_table.compare(store, records)  # first: a changed folder explains a changed synthetic plan
    diffs = store.check_compatible(as_stored(requested, dict(store.attrs)))
    if diffs:
        listed = "; ".join(f"{k}: store has {old!r}, this run asks for {new!r}" for k, old, new in diffs)
        raise cache.CacheMismatchError(
            f"{store.path} was extracted with other settings ({listed}). Re-run with the store's settings to "
            f"resume it, or pass --overwrite to start over")


def _run(store, root: Path, samples: list[Sample], bb: Backbone, geom: Geometry, pending: np.ndarray,
         plan: Optional[synth.SyntheticPlan], *, batch_size: int,
         num_workers: int, skip_bad: bool, progress: Progress) -> ExtractResult:
    """Extract images ``pending`` (this process's share) into ``store``."""
    already = store.n_images - pending.size
    if pending.size == 0:
        logger.info("%s: no pending images for this process (%d in the store)", store.path, store.n_images)
        return ExtractResult(Path(store.path), store.n_images, 0, 0, already, 0.0)
    task = progress.task("extract", total=pending.size, unit="img")
    images = (ImageDataset(root, samples, pending, bb.image_size, bb.preview_size) if plan is None else
              synth.ImagesWithSynthetic(root, samples, pending, bb.image_size, bb.preview_size, plan))
    images.geometry = geom
    loader = torch.utils.data.DataLoader(
        images, batch_size=batch_size, shuffle=False, num_workers=num_workers, collate_fn=collate,
        pin_memory=bb.device.type == "cuda")
    out_dtype = torch.float16 if store.dtype == "float16" else torch.float32
    start = time.perf_counter()
    writer = BatchWriter(store, task, pending)
    try:
        for batch in loader:
            for index, reason in batch["bad"]:
                if not skip_bad:
                    raise DatasetError(f"cannot read image {root / samples[index].path} ({reason}); fix or remove "
                                       f"the file, or pass --skip-bad to record it as skipped and go on")
                logger.warning("skipping %s: %s", root / samples[index].path, reason)
                writer.put("skip", (index, reason))
            if not len(batch["indices"]):
                continue
            cls, patches = embed(bb, batch["images"], geom)  # the frame's tiles, stitched
            writer.put("write", {
                "indices": batch["indices"],
                "patch_tokens": patches.to(out_dtype).cpu().numpy(),
                "class_tokens": cls.to(out_dtype).cpu().numpy(),
                "masks": batch["masks"],
                "previews": batch["previews"],
                "digests": batch["digests"],
            })
    except BaseException:
        try:
            writer.close()  # finished batches are stored even when the loop stops early
        except Exception:
            logger.exception("writing to %s failed while stopping", store.path)
        raise
    writer.close()
    seconds = time.perf_counter() - start
    result = ExtractResult(Path(store.path), store.n_images, writer.written, writer.skipped, already, seconds)
    logger.info("%s: wrote %d images (%d skipped, %d already complete) in %.1f s, %.2f images/s", store.path,
                result.written, result.skipped, already, seconds, result.images_per_second)
    return result
