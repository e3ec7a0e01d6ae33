"""The sample table a fit used, recorded in its model directory, and its images found again after the cache grew.

``funad extract`` appends new images to a store (and may prune images whose
file is gone), so a store's image ids and fingerprint change over its life. A
model must keep meaning the same images:

* ``funad fit`` records in config.json ``sample_table``: every image the split
  uses (train, test and moved anomalies) as ``[id, path, split, label,
  defect_type, features]`` (``features``: the store's checksums of its patch and
  class tokens), the sha256 ``digest`` of those rows and the cache's size;
* ``funad eval`` finds the model's test images again **by path**. When the cache
  grew they keep their meaning; every recorded row must still be in the cache
  with the same split, label, defect type and features, or the evaluation is
  refused naming the image. Images added after the fit are never mixed in: they
  are counted and reported (a warning and metrics.json's ``sample_table``), and
  a re-fit takes them in.

Models fitted before this record existed are found again by the paths their
contamination record holds (without the features check).
"""

from __future__ import annotations

import hashlib
import json
import logging

import numpy as np

from .errors import ModelDirError
from .modeldir import ModelInfo, check_cache_compatible

logger = logging.getLogger(__name__)


def _features(sums) -> str:
    return "" if sums is None else f"{int(sums[0]):016x}{int(sums[1]):016x}"


def rows(store, ids) -> list[list]:
    """``[id, path, split, label, defect_type, features]`` for images ``ids`` of ``store``."""
    ids = np.asarray(sorted(int(i) for i in ids), dtype=np.int64)
    samples = store.samples
    sums = store.checksums(ids) if ids.size else None
    return [[int(i), samples[i]["path"], samples[i]["split"], int(samples[i]["label"]), samples[i]["defect_type"],
             _features(None if sums is None else sums[k])] for k, i in enumerate(ids.tolist())]


def digest(table_rows: list[list]) -> str:
    """sha256 of the rows without their ids (ids change when a cache is pruned; the rest must not)."""
    blob = json.dumps([r[1:] for r in sorted(table_rows, key=lambda r: r[1])], separators=(",", ":"))
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


def record(store, split: dict) -> dict:
    """config.json["sample_table"]: the images a fit's ``split`` uses, as they are in ``store``."""
    used = set(split["train_ids"]) | set(split["test_ids"]) | set(split["moved_ids"])
    table = rows(store, used)
    return {"n_images_in_cache": int(store.n_images), "n_rows": len(table), "digest": digest(table),
            "columns": ["id", "path", "split", "label", "defect_type", "features"], "rows": table}


def model_test_ids(info: ModelInfo, store) -> tuple[np.ndarray, dict]:
    """The model's test ids in ``store`` and a note for metrics.json on how they were found.

    Raises ModelDirError when ``store`` has other backbone settings, lacks a test image of the model's
    split, or holds an image of the split with another split, label, defect type or features. Training
    images of the split that were pruned since are counted (the model already holds what it learnt).
    """
    expected = info.cache.get("fingerprint")
    recorded = info.raw.get("sample_table")
    note = {"cache_images_at_fit": recorded.get("n_images_in_cache") if recorded else info.cache.get("n_images"),
            "cache_images_now": int(store.n_images), "found_by": "id", "split_training_images_gone": 0,
            "added_test_images_not_evaluated": 0,
            "digest": recorded.get("digest") if recorded else None}
    if expected is None:
        raise ModelDirError(f"{info.path / 'config.json'} records no cache fingerprint; re-fit the model")
    if store.fingerprint() == expected:
        return info.test_ids, note
    check_cache_compatible(info, dict(store.attrs), what=f"cache {store.path}")  # names differing settings
    where = {p: i for i, p in enumerate(store.paths.tolist())}
    contamination = info.contamination
    old_ids = [int(i) for key in ("train_ids", "test_ids", "moved_ids") for i in contamination.get(key, [])]
    old_paths = [p for key in ("train_paths", "test_paths", "moved_paths") for p in contamination.get(key, [])]
    if len(old_ids) != len(old_paths):
        raise ModelDirError(f"{info.path / 'config.json'} does not record the paths of its split, so its images "
                            f"cannot be found in cache {store.path}, which changed since the fit; re-fit the model")
    lost_test = sorted({p for p in contamination.get("test_paths", []) if p not in where})
    if lost_test:
        raise ModelDirError(
            f"cache {store.path} no longer holds {len(lost_test)} test images of model {info.path}'s split (e.g. "
            f"{lost_test[0]}): they were pruned (funad extract --prune-missing) or this is another cache. Re-fit the "
            f"model on this cache, or evaluate on a cache that still holds them (the model was fitted on "
            f"{info.cache.get('path')})")
    gone = sorted({p for p in old_paths if p not in where})  # training images only (test ones checked above)
    if gone:
        logger.warning("%s: %d training images of model %s are no longer in cache %s (pruned), e.g. %s; its test "
                       "images are all there and are evaluated", info.path, len(gone), info.path, store.path, gone[0])
    new_of = {i: where[p] for i, p in zip(old_ids, old_paths) if p in where}
    if recorded:
        _check_rows(info, store, recorded["rows"], new_of)
    ids = np.asarray([new_of[int(i)] for i in contamination["test_ids"]], dtype=np.int64)
    at_fit = note["cache_images_at_fit"]
    used = set(new_of.values())
    unused_test = [i for i in store.indices(split="test").tolist() if i not in used]
    note.update(found_by="path", split_training_images_gone=len(gone), added_test_images_not_evaluated=len(unused_test))
    if unused_test:
        logger.warning("%s: cache %s changed since model %s was fitted (%s -> %d images); its %d test images are "
                       "evaluated, %d test images it did not see are not (re-fit to include them)", info.path,
                       store.path, info.path, at_fit, store.n_images, ids.size, len(unused_test))
    return ids, note


def _check_rows(info: ModelInfo, store, recorded_rows: list[list], new_of: dict) -> None:
    """Each recorded row must match the image it maps to: path, split, label, defect type and features."""
    now = {r[0]: r for r in rows(store, new_of.values())}
    for row in recorded_rows:
        old_id = int(row[0])
        if old_id not in new_of:
            continue  # not part of the split (cannot happen for a record written by fit)
        cur = now[new_of[old_id]]
        if list(row[1:5]) != list(cur[1:5]) or (row[5] and cur[5] and row[5] != cur[5]):
            what = "features" if list(row[1:5]) == list(cur[1:5]) else "split, label or defect type"
            raise ModelDirError(
                f"image {row[1]} of model {info.path}'s split has other {what} in cache {store.path} than at the "
                f"fit (fit: {row[2:]}, cache now: {cur[2:]}); the cache was re-extracted or changed, or is another "
                f"one. Evaluate on the cache the model was fitted on ({info.cache.get('path')}), or re-fit the model")
