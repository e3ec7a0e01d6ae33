"""What a feature store holds: array names, metadata keys and their checks.

Pure functions on plain values, shared by both backends and by
:class:`funad.cache.store.FeatureStore`.
"""

from __future__ import annotations

import math
from typing import Any, Iterator, Sequence, Union

import numpy as np

from .errors import CacheMismatchError

CACHE_VERSION = 3  # 3: several images per chunk; 2: per-image records (status + checksums), one image per chunk;
# 1: one status array, read-only now
CHUNK_IMAGES = 16  # images per chunk (and per chunk file of a zarr store) in a new store; 1 before version 3

# status values, written last for each image
PENDING, COMPLETE, SKIPPED = 0, 1, 2
STATUS_NAMES = {PENDING: "pending", COMPLETE: "complete", SKIPPED: "skipped"}

SPLITS = ("train", "test", "synthetic")  # synthetic: FUN-AD* anomalies made at extraction, never tested
LABELS = (0, 1, -1)  # normal, anomalous, unknown
DTYPES = ("float16", "float32")
SKIP_REASON_BYTES = 256  # a skip reason is stored truncated to this many UTF-8 bytes

# array names
PATCH_TOKENS = "patch_tokens"  # (N, P, C) float16/32
CLASS_TOKENS = "class_tokens"  # (N, C)
MASKS = "masks"  # (N, H, W) uint8 in {0, 1}
PREVIEWS = "previews"  # (N, h, w, 3) uint8; absent for imported features
STATUS = "status"  # (N,) int8, cache format 1 only (one chunk for all images)
RECORDS = "records"  # (N, len(RECORD_COLUMNS)) uint64, chunked as the images: status + checksums
RECORDS_SNAPSHOT = "records_snapshot"  # the same in one chunk, refreshed when a writer closes
SNAPSHOT_VALID = "records_snapshot_valid"  # (1,) uint8: 1 when the snapshot equals the records
SKIP_REASONS = "skip_reasons"  # (N, SKIP_REASON_BYTES) uint8, UTF-8, zero padded
SAMPLE_TABLE = "sample_table"  # JSON blob: list of sample dicts
SOURCE_DIGESTS = "source_digests"  # (N, DIGEST_BYTES) uint8: sha256 of each image's file (zeros = unknown);
# written with the image's data (not covered by its record's checksums: it only serves to recognise a renamed
# file); absent in stores written before funad could grow a store
DIGEST_BYTES = 32

# Columns of an image's record: its status, then the checksum of its row of each array (0 = none).
RECORD_COLUMNS = ("status", PATCH_TOKENS, CLASS_TOKENS, MASKS, PREVIEWS)

# Keys the store derives itself; a writer may repeat them in `attributes` only with equal values.
DERIVED_KEYS = ("grid", "n_patches", "token_dim", "feature_dim", "dtype", "mask_size", "preview_size",
                "n_images", "cache_version", "chunk_images")
# Attribute: sorted indices of the images whose file was no longer in the dataset folder at the last
# `funad extract` (their rows are kept until `--prune-missing`; see funad.cache.grow).
MISSING_FROM_SOURCE = "missing_from_source"
# Keys that do not change what the features are; left out of the fingerprint.
# chunk_images is how the rows are laid out on disk, not what they hold.
VOLATILE_KEYS = ("funad_version", "dataset_root", "created_at", "table_changed_at", MISSING_FROM_SOURCE,
                 "chunk_images")

Pair = Union[int, Sequence[int]]


def pair(value: Pair, name: str) -> tuple[int, int]:
    """``7 -> (7, 7)``; ``(4, 6) -> (4, 6)``; anything else (or non-positive) raises."""
    if isinstance(value, (int, np.integer)):
        value = (int(value), int(value))
    try:
        h, w = (int(v) for v in value)
    except (TypeError, ValueError):
        raise CacheMismatchError(f"{name} must be an int or a pair of ints, got {value!r}") from None
    if h <= 0 or w <= 0:
        raise CacheMismatchError(f"{name} must be positive, got {value!r}")
    return h, w


def check_samples(samples: Sequence[dict]) -> list[dict]:
    """Validate and normalise the sample table; returns plain dicts with the four keys."""
    out: list[dict] = []
    seen: set[str] = set()
    for i, s in enumerate(samples):
        try:
            rec = {"path": str(s["path"]), "split": str(s["split"]), "label": int(s["label"]),
                   "defect_type": str(s["defect_type"])}
        except (KeyError, TypeError, ValueError) as exc:
            raise CacheMismatchError(f"sample {i} ({s!r}) needs path, split, label and defect_type: {exc}") from None
        if not rec["path"]:
            raise CacheMismatchError(f"sample {i} has an empty path")
        if rec["path"] in seen:
            raise CacheMismatchError(f"sample {i}: path {rec['path']!r} appears twice in the sample table")
        if rec["split"] not in SPLITS:
            raise CacheMismatchError(f"sample {i} ({rec['path']}): split {rec['split']!r} is not one of {SPLITS}")
        if rec["label"] not in LABELS:
            raise CacheMismatchError(f"sample {i} ({rec['path']}): label {rec['label']} is not 0, 1 or -1 (unknown)")
        seen.add(rec["path"])
        out.append(rec)
    return out


def jsonable(value: Any) -> Any:
    """Tuples -> lists, numpy scalars/arrays -> Python, paths -> str; recursively."""
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, np.ndarray):
        return jsonable(value.tolist())
    if isinstance(value, np.generic):
        return value.item()
    if value is None or isinstance(value, (bool, int, float, str)):
        if isinstance(value, float) and not math.isfinite(value):
            raise CacheMismatchError(f"attribute value {value!r} is not finite; it cannot be stored as JSON")
        return value
    if hasattr(value, "__fspath__"):
        return str(value)
    raise CacheMismatchError(f"attribute value {value!r} of type {type(value).__name__} cannot be stored as JSON")


def derived_attrs(*, n_images: int, grid: tuple[int, int], token_dim: int, mask_size: tuple[int, int],
                  preview_size, dtype: str, chunk_images: int = CHUNK_IMAGES) -> dict:
    chunk_images = max(1, min(int(chunk_images), n_images))  # HDF5 wants chunks no larger than the array
    return {
        "grid": list(grid),
        "n_patches": grid[0] * grid[1],
        "token_dim": token_dim,
        "feature_dim": 2 * token_dim,
        "dtype": dtype,
        "mask_size": list(mask_size),
        "preview_size": None if preview_size is None else list(preview_size),
        "n_images": n_images,
        "cache_version": CACHE_VERSION,
        "chunk_images": chunk_images,
    }


def merge_attributes(derived: dict, attributes: dict) -> dict:
    """The writer's attributes plus the derived ones; a derived key given with another value raises."""
    user = jsonable(dict(attributes))
    for key in DERIVED_KEYS:
        if key in user and user[key] != derived[key]:
            raise CacheMismatchError(f"attribute {key}={user[key]!r} disagrees with the store's {key}={derived[key]!r} "
                                     "(derived from the create() arguments); drop it or fix the arguments")
    return {**user, **derived}


def differences(stored: dict, requested: dict) -> list[tuple[str, Any, Any]]:
    """``(key, stored, requested)`` for each requested key whose stored value differs (after JSON normalising)."""
    req = jsonable(dict(requested))
    return [(k, stored.get(k), v) for k, v in req.items() if stored.get(k) != v]


def runs(sorted_unique: np.ndarray) -> Iterator[tuple[int, int, slice]]:
    """Split sorted unique indices into runs of consecutive values: ``(start, stop, positions)``."""
    if sorted_unique.size == 0:
        return
    breaks = np.flatnonzero(np.diff(sorted_unique) != 1) + 1
    bounds = np.concatenate([[0], breaks, [sorted_unique.size]])
    for a, b in zip(bounds[:-1], bounds[1:]):
        yield int(sorted_unique[a]), int(sorted_unique[b - 1]) + 1, slice(int(a), int(b))
