"""The feature store: one dataset's backbone features, masks and sample table.

A store holds, for N images with a ``grid[0] x grid[1] = P`` patch grid and
token width C:

* ``patch_tokens (N, P, C)`` and ``class_tokens (N, C)`` (float16 by default);
  :meth:`FeatureStore.read_features` assembles the paper's features
  ``[class token ; patch token] -> (n, P, 2C)`` on read, so the class token is
  stored once instead of P times;
* ``masks (N, H, W) uint8`` in {0, 1} at input resolution, ``previews
  (N, h, w, 3) uint8`` (the pre-processed input, for pictures; absent for
  imported features);
* ``records (N, 5) uint64``: per image its status (0 pending, 1 complete,
  2 skipped) and the checksums of its rows (:mod:`funad.cache.integrity`),
  plus a one-chunk snapshot of them that opening reads;
* the sample table (path, split, label, defect type per image) and the
  store-level attributes (backbone, weights, pre-processing, grid...).

Arrays are chunked ``chunk_images`` images per chunk (16 from cache format 3
on, one before), so a zarr store writes one file per array and chunk, not per
image. An image's record is written after
its data (:mod:`funad.cache.writing`), so a process killed mid-write leaves
that image pending, never complete with partial data; reads refuse any image
that is not complete or does not match its checksums
(:mod:`funad.cache.reading`). One run writes a store at a time
(:mod:`funad.cache.lock`); within it, processes may write different chunks.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
from pathlib import Path
from types import MappingProxyType
from typing import Mapping, Optional

import numpy as np

from . import _hdf5, _zarr
from . import layout as L
from .errors import CacheMismatchError, CorruptCacheError
from .lock import WriterLock
from .reading import StoreReading
from .writing import StoreWriting

log = logging.getLogger(__name__)

BACKENDS = {"zarr": _zarr, "hdf5": _hdf5}  # format name -> backend module (each has a ``Backend`` class)


class FeatureStore(StoreReading, StoreWriting):
    """An open feature store; get one from :func:`create` or :func:`open`. Use as a context manager."""

    def __init__(self, path: Path, format: str, writable: bool, lock: Optional[WriterLock] = None) -> None:
        """``lock``: the writer lock this object holds (and releases on close); a writable store
        without one is a helper of a run whose lock another process holds (a torch.distributed rank)."""
        self.path = Path(path)
        self.format = format
        self.writable = writable
        self._lock = lock
        self._snapshot_stale = False
        self._closed = False
        try:
            self._b = BACKENDS[format].Backend(self.path, writable=writable)
        except BaseException:
            self._release_lock()
            raise
        try:
            self._load_and_check()
        except BaseException:
            self._b.close()
            self._release_lock()
            raise

    # -- integrity ------------------------------------------------------------
    def _corrupt(self, what: str) -> CorruptCacheError:
        return CorruptCacheError(f"{self.path}: {what}; the store is damaged or was not written by funad. "
                                 "Re-create it with `funad extract --overwrite`")

    def _load_and_check(self) -> None:
        attrs = self._b.get_attrs()
        version = attrs.get("cache_version")
        if version is None:
            raise self._corrupt("metadata has no cache_version")
        if version > L.CACHE_VERSION:
            raise CorruptCacheError(f"{self.path}: cache format version {version} is newer than this funad "
                                    f"understands ({L.CACHE_VERSION}); upgrade funad")
        try:
            n = int(attrs["n_images"])
            grid = L.pair(attrs["grid"], "grid")
            p, c = int(attrs["n_patches"]), int(attrs["token_dim"])
            mask_hw = L.pair(attrs["mask_size"], "mask_size")
            prev = attrs["preview_size"]
            preview_hw = None if prev is None else L.pair(prev, "preview_size")
            dtype = attrs["dtype"]
            feature_dim = int(attrs["feature_dim"])
        except (KeyError, TypeError, ValueError, CacheMismatchError) as exc:
            raise self._corrupt(f"metadata is missing or has a bad value ({exc})") from None
        if p != grid[0] * grid[1]:
            raise self._corrupt(f"n_patches={p} but grid={list(grid)} has {grid[0] * grid[1]} patches")
        if feature_dim != 2 * c:
            raise self._corrupt(f"feature_dim={feature_dim} is not 2 x token_dim={c}")
        if dtype not in L.DTYPES:
            raise self._corrupt(f"dtype {dtype!r} is not one of {L.DTYPES}")
        try:
            samples = L.check_samples(self._b.read_blob(L.SAMPLE_TABLE))
        except CacheMismatchError as exc:
            raise self._corrupt(f"bad sample table ({exc})") from None
        if len(samples) != n:
            raise self._corrupt(f"the sample table has {len(samples)} images but n_images={n}")
        self._version = int(version)
        if self._version < 2 and self.writable:
            raise CorruptCacheError(f"{self.path} was written by an older funad (cache format {version}), which "
                                    "cannot be resumed or verified; re-create it with `funad extract --overwrite`")
        expected = {
            L.PATCH_TOKENS: ((n, p, c), dtype),
            L.CLASS_TOKENS: ((n, c), dtype),
            L.MASKS: ((n, *mask_hw), "uint8"),
            L.SKIP_REASONS: ((n, L.SKIP_REASON_BYTES), "uint8"),
        }
        if self._version < 2:
            expected[L.STATUS] = ((n,), "int8")
        else:
            n_cols = len(L.RECORD_COLUMNS)
            expected.update({L.RECORDS: ((n, n_cols), "uint64"), L.RECORDS_SNAPSHOT: ((n, n_cols), "uint64"),
                             L.SNAPSHOT_VALID: ((1,), "uint8")})
        if preview_hw is not None:
            expected[L.PREVIEWS] = ((n, *preview_hw, 3), "uint8")
        self._has_digests = self._b.has_array(L.SOURCE_DIGESTS)  # absent in stores from before growing
        if self._has_digests:
            expected[L.SOURCE_DIGESTS] = ((n, L.DIGEST_BYTES), "uint8")
        for name, (shape, dt) in expected.items():
            arr = self._b.array(name)
            if tuple(arr.shape) != shape:
                raise self._corrupt(f"{name} has shape {tuple(arr.shape)}, metadata says {shape}")
            if np.dtype(arr.dtype) != np.dtype(dt):
                raise self._corrupt(f"{name} has dtype {np.dtype(arr.dtype)}, metadata says {dt}")
        self._attrs = attrs
        self._samples = samples
        self._n, self._grid, self._p, self._c = n, grid, p, c
        self._mask_hw, self._preview_hw, self._dtype = mask_hw, preview_hw, dtype
        if self._version < 2:
            self._records = None
            status = np.asarray(self._b.array(L.STATUS)[:])
        else:
            valid = int(self._b.array(L.SNAPSHOT_VALID)[0])
            # kept in step with this object's writes
            self._records = (np.asarray(self._b.array(L.RECORDS_SNAPSHOT)[:], dtype=np.uint64) if valid == 1
                             else self._read_records_per_image())
            status = self._records[:, 0]
        bad = ~np.isin(status, list(L.STATUS_NAMES))
        if bad.any():
            raise self._corrupt(f"status has invalid values {sorted(set(status[bad].tolist()))[:5]}")
        if self._version < 2:
            self._status_v1 = status.astype(np.int8)

    def _read_records_per_image(self) -> np.ndarray:
        out = np.empty((self._n, len(L.RECORD_COLUMNS)), np.uint64)
        self._b.read_rows(L.RECORDS, 0, self._n, out)
        return out

    @property
    def _status(self) -> np.ndarray:
        return self._status_v1 if self._records is None else self._records[:, 0].astype(np.int8)

    # -- properties -------------------------------------------------------------
    @property
    def attrs(self) -> Mapping:
        """Store-level metadata (a read-only copy)."""
        return MappingProxyType(copy.deepcopy(self._attrs))

    @property
    def n_images(self) -> int:
        return self._n

    @property
    def grid(self) -> tuple[int, int]:
        return self._grid

    @property
    def n_patches(self) -> int:
        """P, patches per image."""
        return self._p

    @property
    def token_dim(self) -> int:
        """C, width of one class or patch token."""
        return self._c

    @property
    def feature_dim(self) -> int:
        """D = 2C, width of an assembled feature ``[class token ; patch token]``."""
        return 2 * self._c

    @property
    def mask_size(self) -> tuple[int, int]:
        return self._mask_hw

    @property
    def preview_size(self) -> Optional[tuple[int, int]]:
        """``(h, w)`` of the previews, or None when the store has none (imported features)."""
        return self._preview_hw

    @property
    def dtype(self) -> str:
        return self._dtype

    @property
    def samples(self) -> list[dict]:
        return copy.deepcopy(self._samples)

    @property
    def paths(self) -> np.ndarray:
        return np.array([s["path"] for s in self._samples], dtype=str)

    @property
    def labels(self) -> np.ndarray:
        """``(N,) int8``: 0 normal, 1 anomalous, -1 unknown."""
        return np.array([s["label"] for s in self._samples], dtype=np.int8)

    @property
    def splits(self) -> np.ndarray:
        return np.array([s["split"] for s in self._samples], dtype=str)

    @property
    def defect_types(self) -> np.ndarray:
        return np.array([s["defect_type"] for s in self._samples], dtype=str)

    @property
    def status(self) -> np.ndarray:
        """``(N,) int8``: 0 pending, 1 complete, 2 skipped (as of opening, plus this object's writes)."""
        return self._status.copy()

    @property
    def complete(self) -> np.ndarray:
        return self._status == L.COMPLETE

    @property
    def has_class_tokens(self) -> bool:
        """Whether the store holds the class tokens (what ``funad fit --tokens class`` trains on)."""
        return self._b.has_array(L.CLASS_TOKENS)

    def indices(self, split: Optional[str] = None, complete_only: bool = True) -> np.ndarray:
        """Image indices (ascending) of ``split`` (or all), complete ones only by default."""
        keep = np.ones(self._n, dtype=bool)
        if split is not None:
            if split not in L.SPLITS:
                raise CacheMismatchError(f"split must be one of {L.SPLITS}, got {split!r}")
            keep &= self.splits == split
        if complete_only:
            keep &= self.complete
        return np.flatnonzero(keep)

    @property
    def chunk_images(self) -> int:
        """Images per chunk: a writer writes whole chunks where it can, and processes writing one store
        (torch.distributed ranks) must share it out by chunk (1 in stores from before cache format 3)."""
        return int(self._attrs.get("chunk_images", 1))

    def chunks(self, indices) -> np.ndarray:
        """The chunk of each image in ``indices``."""
        return self._check_indices(indices) // self.chunk_images

    @property
    def version(self) -> int:
        """The cache format: 3 (several images per chunk), 2 (one image per chunk), or 1 (older: read-only)."""
        return self._version

    @property
    def missing_from_source(self) -> np.ndarray:
        """Indices of the images whose file was no longer in the dataset folder at the last ``funad extract``
        (kept until it runs with ``--prune-missing``; :mod:`funad.cache.grow`)."""
        return np.asarray(self._attrs.get(L.MISSING_FROM_SOURCE, []), dtype=np.int64)

    def skip_reason(self, i: int) -> Optional[str]:
        """Why image ``i`` was skipped, or None if it was not."""
        i = int(self._check_indices([i])[0])
        if self._status[i] != L.SKIPPED:
            return None
        raw = np.asarray(self._b.array(L.SKIP_REASONS)[i], dtype=np.uint8).tobytes()
        return raw.rstrip(b"\0").decode("utf-8", errors="replace")

    # -- indices ----------------------------------------------------------------
    def _check_indices(self, indices) -> np.ndarray:
        idx = np.asarray(indices)
        if idx.dtype == bool:
            if idx.shape != (self._n,):
                raise CacheMismatchError(f"a boolean index must have shape ({self._n},), got {idx.shape}")
            return np.flatnonzero(idx)
        idx = np.atleast_1d(idx)
        if idx.ndim != 1 or (idx.size and not np.issubdtype(idx.dtype, np.integer)):
            raise CacheMismatchError(f"indices must be a 1-D sequence of ints, got dtype {idx.dtype}, "
                                     f"shape {idx.shape}")
        idx = idx.astype(np.int64)
        out = (idx < 0) | (idx >= self._n)
        if out.any():
            raise CacheMismatchError(f"image index {int(idx[out][0])} is out of range: {self.path} has "
                                     f"{self._n} images (0..{self._n - 1})")
        return idx

    # -- comparing and describing ---------------------------------------------
    def check_compatible(self, attributes: Mapping) -> list[tuple[str, object, object]]:
        """``(key, stored, requested)`` for each key of ``attributes`` whose stored value differs.

        ``extract`` uses it before resuming: an empty list means the settings match.
        """
        return L.differences(self._attrs, attributes)

    def fingerprint(self) -> str:
        """sha256 (hex) of the attributes that define the features plus the sample table."""
        attrs = {k: v for k, v in self._attrs.items() if k not in L.VOLATILE_KEYS}
        blob = json.dumps({"attrs": attrs, "samples": self._samples}, sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(blob.encode("utf-8")).hexdigest()

    def summary(self) -> dict:
        """A JSON-serialisable description (what ``funad cache info --json`` prints)."""
        groups: dict[tuple, dict] = {}
        for s, st in zip(self._samples, self._status.tolist()):
            key = (s["split"], s["label"], s["defect_type"])
            g = groups.setdefault(key, {"split": key[0], "label": key[1], "defect_type": key[2],
                                        "images": 0, "complete": 0, "pending": 0, "skipped": 0})
            g["images"] += 1
            g[L.STATUS_NAMES[st]] += 1
        counts = [groups[k] for k in sorted(groups, key=lambda k: (L.SPLITS.index(k[0]), k[1], k[2]))]
        n_complete = int(self.complete.sum())
        skipped = [{"index": int(i), "path": self._samples[i]["path"], "reason": self.skip_reason(int(i))}
                   for i in np.flatnonzero(self._status == L.SKIPPED)]
        return {
            "path": str(self.path),
            "format": self.format,
            "size_on_disk_bytes": self._b.size_on_disk(),
            "n_images": self._n,
            "n_complete": n_complete,
            "n_pending": int((self._status == L.PENDING).sum()),
            "n_skipped": len(skipped),
            "completeness": n_complete / self._n,
            "fingerprint": self.fingerprint(),
            "counts": counts,
            "skipped": skipped,
            "missing_from_source": [self._samples[int(i)]["path"] for i in self.missing_from_source],
            "attrs": copy.deepcopy(self._attrs),
        }

    # -- lifetime ---------------------------------------------------------------
    def close(self) -> None:
        """Close; the writer that holds the lock first refreshes the records snapshot readers open with."""
        if self._closed:
            return
        self._closed = True
        try:
            if self._lock is not None and self._records is not None and (
                    self._snapshot_stale or int(self._b.array(L.SNAPSHOT_VALID)[0]) != 1):
                self.refresh_snapshot()
        finally:
            self._b.close()
            self._release_lock()

    def _release_lock(self) -> None:
        if self._lock is not None:
            self._lock.release()
            self._lock = None

    @property
    def holds_lock(self) -> bool:
        """Whether this object holds the store's writer lock."""
        return self._lock is not None

    def __enter__(self) -> "FeatureStore":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return (f"FeatureStore({str(self.path)!r}, format={self.format!r}, n_images={self._n}, "
                f"grid={self._grid}, token_dim={self._c}, dtype={self._dtype!r}, "
                f"complete={int(self.complete.sum())}/{self._n})")
