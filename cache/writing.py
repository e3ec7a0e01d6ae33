"""Writing a feature store: images, skips and per-image records, in crash-safe order.

An image is written as: its record set to pending (only when it had one),
its rows of every array, a flush, then its record ``(complete, checksums)``.
Records are chunked as the images are, and every chunk file is replaced whole
(the rows of other images in it are carried over), so a process killed at any
point leaves each image pending or complete with the data its checksums vouch
for. Processes writing one store (torch.distributed ranks) take whole chunks
(:meth:`funad.pipelines.distributed.Group.share`), so they never write the same
chunk; the one-chunk snapshot readers open with is refreshed when the writer
that holds the store's lock closes it.
"""

from __future__ import annotations

import logging
from typing import Optional

import numpy as np

from . import layout as L
from .errors import CacheError, CacheMismatchError
from .integrity import row_checksums

log = logging.getLogger(__name__)


def _all_finite(values: np.ndarray) -> bool:
    """``np.isfinite(values).all()``, without float16 arithmetic (slow in numpy): a float16 is inf or NaN
    exactly when its five exponent bits are all set, so the masked bits' maximum is compared with the mask."""
    if values.dtype == np.float16:
        bits = np.bitwise_and(np.ascontiguousarray(values).view(np.uint16), 0x7C00)
        return bits.size == 0 or int(bits.max()) != 0x7C00
    return bool(np.isfinite(values).all())


class StoreWriting:
    """The writing half of :class:`funad.cache.FeatureStore` (a mixin; it uses the store's fields)."""

    # -- records ------------------------------------------------------------------
    def _require_writable(self) -> None:
        if not self.writable:
            raise CacheError(f"{self.path} is open read-only; open it with mode 'a' to write")

    def _begin_writes(self) -> None:
        """Before the first write: the snapshot stops being the truth until the lock holder refreshes it."""
        if not self._snapshot_stale:
            self._b.array(L.SNAPSHOT_VALID)[0:1] = np.zeros(1, np.uint8)
            self._b.flush()
            self._snapshot_stale = True

    def _write_records(self, idx: np.ndarray, rows: np.ndarray) -> None:
        """Write ``rows (n, len(RECORD_COLUMNS))`` as the records of images ``idx`` (data flushed first)."""
        self._b.flush()
        order = np.argsort(idx, kind="stable")
        for start, _, pos in L.runs(idx[order]):
            self._b.write_rows(L.RECORDS, start, rows[order[pos]])
        self._b.flush()
        self._records[idx] = rows

    def _pending_rows(self, n: int) -> np.ndarray:
        return np.zeros((n, len(L.RECORD_COLUMNS)), np.uint64)

    def mark_pending(self, indices) -> None:
        """Mark images pending (e.g. found damaged by :meth:`verify`) so ``funad extract`` writes them again."""
        self._require_writable()
        idx = np.unique(self._check_indices(indices))
        self._begin_writes()
        self._write_records(idx, self._pending_rows(idx.size))

    def refresh_snapshot(self) -> None:
        """Re-read every image's record from disk and store them as the snapshot readers open with."""
        self._require_writable()
        records = self._read_records_per_image()
        self._b.array(L.RECORDS_SNAPSHOT)[:] = records
        self._b.flush()
        self._b.array(L.SNAPSHOT_VALID)[0:1] = np.ones(1, np.uint8)
        self._b.flush()
        self._records = records
        self._snapshot_stale = False

    # -- checking what is written -----------------------------------------------
    def _as_array(self, value, shape: tuple, dtype: str, name: str) -> np.ndarray:
        arr = np.asarray(value)
        if arr.shape != shape:
            raise CacheMismatchError(f"{name} has shape {arr.shape}; {self.path} expects {shape}")
        if dtype in L.DTYPES:
            if not np.issubdtype(arr.dtype, np.floating):
                raise CacheMismatchError(f"{name} has dtype {arr.dtype}; expected floating point tokens")
            with np.errstate(over="ignore", invalid="ignore"):  # overflow is reported below, with advice
                out = arr.astype(dtype, copy=False)
            if not _all_finite(out):
                biggest = float(np.nanmax(np.abs(arr[np.isfinite(arr)]))) if np.isfinite(arr).any() else float("nan")
                raise CacheMismatchError(
                    f"{name} has non-finite values as {dtype} (NaN/inf in the input, or values beyond "
                    f"{np.finfo(dtype).max:.6g}; largest finite |value| {biggest:.6g}). "
                    "Check the backbone output, or create the store with dtype='float32' (--dtype float32)")
            return out
        return arr  # uint8 handled by the callers

    def _as_masks(self, masks, n: int) -> np.ndarray:
        if masks is None:
            return np.zeros((n, *self._mask_hw), np.uint8)
        m = np.asarray(masks)
        if m.shape != (n, *self._mask_hw):
            raise CacheMismatchError(f"masks have shape {m.shape}; {self.path} expects {(n, *self._mask_hw)} "
                                     "(masks are stored at the backbone's input resolution)")
        return (m > 0).astype(np.uint8)

    def _as_previews(self, previews, n: int) -> Optional[np.ndarray]:
        if self._preview_hw is None:
            if previews is not None:
                raise CacheMismatchError(f"{self.path} was created without previews (preview_size=None)")
            return None
        shape = (n, *self._preview_hw, 3)
        if previews is None:
            return np.zeros(shape, np.uint8)
        v = np.asarray(previews)
        if v.shape != shape or v.dtype != np.uint8:
            raise CacheMismatchError(f"previews have shape {v.shape} and dtype {v.dtype}; "
                                     f"{self.path} expects {shape} uint8")
        return v

    # -- writing ------------------------------------------------------------------
    def write(self, i: int, *, patch_tokens, class_token, mask=None, preview=None) -> None:
        """Write image ``i``: ``patch_tokens (P, C)``, ``class_token (C,)``, ``mask (H, W)`` (any value
        above 0 is anomalous; None = all normal), ``preview (h, w, 3) uint8``; then mark it complete."""
        for name, value, shape in (("patch_tokens", patch_tokens, (self._p, self._c)),
                                   ("class_token", class_token, (self._c,))):
            if np.shape(value) != shape:
                raise CacheMismatchError(f"{name} for image {i} has shape {np.shape(value)}; "
                                         f"{self.path} expects {shape}")
        self.write_batch(
            [i],
            patch_tokens=np.asarray(patch_tokens)[None],
            class_tokens=np.asarray(class_token)[None],
            masks=None if mask is None else np.asarray(mask)[None],
            previews=None if preview is None else np.asarray(preview)[None],
        )

    def write_batch(self, indices, *, patch_tokens, class_tokens, masks=None, previews=None,
                    digests=None) -> None:
        """Write n images at once: ``patch_tokens (n, P, C)``, ``class_tokens (n, C)``,
        ``masks (n, H, W)`` or None, ``previews (n, h, w, 3) uint8`` or None, ``digests (n, 32) uint8``
        (sha256 of each image's file, to recognise it renamed) or None; then mark them complete.

        Images that were complete are first marked pending, so a crash while
        overwriting them never leaves old status over new, partial data.
        """
        self._require_writable()
        idx = self._check_indices(indices)
        if np.unique(idx).size != idx.size:
            raise CacheMismatchError(f"write_batch got a repeated image index in {idx.tolist()}")
        n, p, c = idx.size, self._p, self._c
        data = {L.PATCH_TOKENS: self._as_array(patch_tokens, (n, p, c), self._dtype, "patch_tokens"),
                L.CLASS_TOKENS: self._as_array(class_tokens, (n, c), self._dtype, "class_tokens"),
                L.MASKS: self._as_masks(masks, n)}
        pv = self._as_previews(previews, n)
        if pv is not None:
            data[L.PREVIEWS] = pv
        self._begin_writes()
        redo = idx[self._status[idx] != L.PENDING]
        if redo.size:
            log.debug("%s: overwriting %d images that were complete or skipped", self.path, redo.size)
            self._write_records(redo, self._pending_rows(redo.size))
        order = np.argsort(idx, kind="stable")
        # indices in order (as extract writes them): each run's rows are a view, not a copy (~0.1 ms per image)
        pick = (lambda pos: pos) if np.array_equal(order, np.arange(n)) else (lambda pos: order[pos])
        rows = self._pending_rows(n)
        rows[:, 0] = L.COMPLETE
        for name, values in data.items():
            for start, _, pos in L.runs(idx[order]):
                self._b.write_rows(name, start, values[pick(pos)])
            rows[:, L.RECORD_COLUMNS.index(name)] = row_checksums(values)
        if self._has_digests:
            dg = np.zeros((n, L.DIGEST_BYTES), np.uint8) if digests is None else np.asarray(digests, np.uint8)
            if dg.shape != (n, L.DIGEST_BYTES):
                raise CacheMismatchError(f"digests have shape {dg.shape}; expected {(n, L.DIGEST_BYTES)}")
            for start, _, pos in L.runs(idx[order]):
                self._b.write_rows(L.SOURCE_DIGESTS, start, dg[pick(pos)])
        self._write_records(idx, rows)

    def mark_skipped(self, i: int, reason: str) -> None:
        """Record image ``i`` as skipped (e.g. an unreadable file) with a short ``reason``."""
        self._require_writable()
        idx = self._check_indices([i])
        self._begin_writes()
        if self._status[idx[0]] == L.COMPLETE:
            self._write_records(idx, self._pending_rows(1))
        raw = str(reason).encode("utf-8")[: L.SKIP_REASON_BYTES]
        row = np.zeros((1, L.SKIP_REASON_BYTES), np.uint8)
        row[0, : len(raw)] = np.frombuffer(raw, np.uint8)
        self._b.array(L.SKIP_REASONS)[idx[0] : idx[0] + 1] = row
        rows = self._pending_rows(1)
        rows[0, 0] = L.SKIPPED
        self._write_records(idx, rows)
