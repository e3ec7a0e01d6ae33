"""Reading a feature store: rows of complete images only, each checked against its checksums.

A read refuses an image that is not complete (IncompleteCacheError) and one
whose rows cannot be read or do not match the checksums in its record
(CorruptCacheError naming the image and the chunk file). :meth:`verify`
checks a whole store the same way and lists every damaged image.
"""

from __future__ import annotations

from typing import Callable, Iterator, Optional

import numpy as np

from . import layout as L
from .errors import CacheError, CacheMismatchError, CorruptCacheError, IncompleteCacheError
from .integrity import row_checksums

_RESUME_HINT = "re-run `funad extract` with the same output to resume"


class StoreReading:
    """The reading half of :class:`funad.cache.FeatureStore` (a mixin; it uses the store's fields)."""

    # -- reading ----------------------------------------------------------------
    def _require_complete(self, idx: np.ndarray) -> None:
        bad = idx[self._status[idx] != L.COMPLETE]
        if not bad.size:
            return
        first = int(bad[0])
        state = L.STATUS_NAMES[int(self._status[first])]
        n_bad = np.unique(bad).size
        msg = (f"{self.path}: {n_bad} of the requested images are not complete, e.g. image {first} "
               f"{self._samples[first]['path']!r} ({state}). ")
        if state == "pending":
            msg += f"Its features were never fully written: {_RESUME_HINT}."
        else:
            msg += (f"It was skipped ({self.skip_reason(first)}); leave skipped images out "
                    "(store.indices() lists the complete ones).")
        raise IncompleteCacheError(msg)

    def _read(self, name: str, idx: np.ndarray) -> np.ndarray:
        """Rows ``idx`` of array ``name``, in the order given, checked against their checksums."""
        self._require_complete(idx)
        uniq, inverse = np.unique(idx, return_inverse=True)
        buf, problems = self._load_rows(name, uniq)
        if problems:
            first = min(problems)
            raise CorruptCacheError(
                f"{self.path}: image {first} {self._samples[first]['path']!r} is damaged: {problems[first]}"
                + (f" ({len(problems)} damaged images in this read)" if len(problems) > 1 else "")
                + f". Run `funad cache verify {self.path}` to list every damaged image; `funad extract` "
                "on the same output extracts them again")
        if uniq.size == idx.size and np.array_equal(uniq, idx):
            return buf
        return buf[inverse.reshape(-1)]

    def _load_rows(self, name: str, uniq: np.ndarray) -> tuple[np.ndarray, dict[int, str]]:
        """Rows ``uniq`` (sorted, unique) of ``name``, and ``{image: problem}`` for those that cannot be
        read or do not match their checksum (whole runs of consecutive images are read at once)."""
        arr = self._b.array(name)
        buf = np.empty((uniq.size, *arr.shape[1:]), dtype=arr.dtype)
        problems: dict[int, str] = {}
        for start, stop, pos in L.runs(uniq):
            try:
                self._b.read_rows(name, start, stop, buf[pos])
            except Exception:  # a damaged chunk: find which, one image at a time
                for k, i in zip(range(pos.start, pos.stop), range(start, stop)):
                    try:
                        self._b.read_rows(name, i, i + 1, buf[k : k + 1])
                    except Exception as exc:
                        problems[i] = (f"its {name} chunk {self._b.chunk_location(name, i)} cannot be read "
                                       f"({type(exc).__name__}: {str(exc)[:200]})")
        if self._records is not None:
            stored = self._records[uniq, L.RECORD_COLUMNS.index(name)]
            for k in np.flatnonzero(row_checksums(buf) != stored):
                i = int(uniq[k])
                where = self._b.chunk_location(name, i)
                what = "is missing" if not self._b.chunk_exists(name, i) else "does not match its checksum"
                problems.setdefault(i, f"its {name} chunk {where} {what}")
        return buf, problems

    def verify(self, indices=None, chunk: int = 64,
               on_progress: Optional[Callable[[int], None]] = None) -> list[dict]:
        """Read every complete image (or the complete ones among ``indices``) and check its checksums.

        Returns one dict per damaged image, ``{"index", "path", "problems": [str, ...]}`` (empty when
        the store is sound); ``on_progress(n)`` is called after each chunk of n images.
        """
        if self._records is None:
            raise CacheError(f"{self.path} was written by an older funad (cache format {self._version}) without "
                             "checksums, so it cannot be verified; re-create it with `funad extract --overwrite`")
        names = [L.PATCH_TOKENS, L.CLASS_TOKENS, L.MASKS] + ([L.PREVIEWS] if self._preview_hw else [])
        found: dict[int, list[str]] = {}
        idx = self.indices()
        if indices is not None:
            idx = np.intersect1d(idx, self._check_indices(indices))
        for s in range(0, idx.size, chunk):
            part = idx[s : s + chunk]
            for name in names:
                for i, problem in self._load_rows(name, part)[1].items():
                    found.setdefault(i, []).append(problem)
            if on_progress is not None:
                on_progress(part.size)
        return [{"index": i, "path": self._samples[i]["path"], "problems": found[i]} for i in sorted(found)]

    def source_digests(self, indices) -> list:
        """The sha256 (hex) of each image's file as it was extracted, or None where unknown (imported
        features, a store from before funad recorded them, an image never written)."""
        idx = self._check_indices(indices)
        if not self._has_digests:
            return [None] * idx.size
        out = np.zeros((idx.size, L.DIGEST_BYTES), np.uint8)
        for k, i in enumerate(idx.tolist()):
            self._b.read_rows(L.SOURCE_DIGESTS, i, i + 1, out[k : k + 1])
        known = (out != 0).any(axis=1) & (self._status[idx] != L.PENDING)
        return [row.tobytes().hex() if ok else None for row, ok in zip(out, known)]

    def checksums(self, indices) -> Optional[np.ndarray]:
        """``(n, 4) uint64``: the recorded checksums of each image's patch tokens, class token, mask and
        preview (what a model directory records to name the exact features it used); None for a store
        without them (cache format 1)."""
        idx = self._check_indices(indices)
        return None if self._records is None else self._records[idx, 1:].copy()

    def read_patch_tokens(self, indices) -> np.ndarray:
        """``(n, P, C)`` in the store's dtype."""
        return self._read(L.PATCH_TOKENS, self._check_indices(indices))

    def read_class_tokens(self, indices) -> np.ndarray:
        """``(n, C)`` in the store's dtype."""
        return self._read(L.CLASS_TOKENS, self._check_indices(indices))

    def read_features(self, indices, dtype: Optional[str] = None) -> np.ndarray:
        """``(n, P, 2C)``: ``[class token repeated ; patch token]``, class token first.

        ``dtype`` defaults to the store's ("float16"); pass "float32" to widen on read.
        """
        idx = self._check_indices(indices)
        dt = np.dtype(dtype or self._dtype)
        patches = self._read(L.PATCH_TOKENS, idx)
        cls = self._read(L.CLASS_TOKENS, idx)
        c = self._c
        out = np.empty((idx.size, self._p, 2 * c), dtype=dt)
        out[:, :, :c] = cls[:, None, :]
        out[:, :, c:] = patches
        return out

    def iter_features(self, indices=None, chunk: int = 64,
                      dtype: Optional[str] = None) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Yield ``(idx_chunk (m,), features (m, P, 2C))`` over ``indices`` (default: all complete)."""
        idx = self.indices() if indices is None else self._check_indices(indices)
        if chunk < 1:
            raise CacheMismatchError(f"chunk must be at least 1, got {chunk}")
        self._require_complete(idx)
        for s in range(0, idx.size, chunk):
            part = idx[s : s + chunk]
            yield part, self.read_features(part, dtype=dtype)

    def read_masks(self, indices) -> np.ndarray:
        """``(n, H, W) uint8`` in {0, 1}."""
        return self._read(L.MASKS, self._check_indices(indices))

    def read_previews(self, indices) -> np.ndarray:
        """``(n, h, w, 3) uint8``; raises CacheError for a store without previews."""
        if self._preview_hw is None:
            raise CacheError(f"{self.path} has no previews (imported features carry no images)")
        return self._read(L.PREVIEWS, self._check_indices(indices))
