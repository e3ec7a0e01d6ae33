"""Changing a store's sample table: appending images, marking images missing from the source, pruning them.

A store's arrays have one row per image, so a new table means new array
shapes. The store is never reshaped in place (a crash half-way would leave
arrays that disagree with the table); :func:`grow` builds the new store beside
the old one, under a temporary name, and then swaps the two:

* the rows of the images kept are carried over unchanged with their records
  (status and checksums), so they stay complete and verifiable; appended
  images start pending and are written like any other;
* zarr: the kept images' chunk files are hard-linked into the new store where
  a chunk keeps the same images (no data is copied; a filesystem without hard
  links gets copies; chunks after a dropped image are rewritten), and the two
  folders are exchanged atomically (``renameat2(RENAME_EXCHANGE)`` on Linux;
  elsewhere two renames, with a window of microseconds in which the store's
  path is empty);
* HDF5: the kept rows are copied into the new file, which then replaces the
  old one atomically. This costs one read and one write of the whole store:
  a store that grows often is better kept as zarr.

A process killed before the swap leaves the old store as it was (and a
``.NAME.partial-PID`` folder or file, removed by the next writer); after the
swap the new store is complete apart from its pending new images. The writer
lock (beside the store, not inside it) is held throughout.
"""

from __future__ import annotations

import ctypes
import datetime
import logging
import os
import shutil
from pathlib import Path
from typing import Mapping, Optional, Sequence

import numpy as np

from . import layout as L
from .errors import CacheError, CacheMismatchError

log = logging.getLogger(__name__)

_ROWS_PER_COPY = 64  # rows per block when rows are copied (HDF5, or zarr arrays encoded another way)
_link = os.link  # (tests replace it to check the copying fallback)


def grow(store, *, add: Sequence[Mapping] = (), missing: Optional[Sequence[int]] = None,
         drop: Sequence[int] = ()):
    """Return ``store`` with a new sample table: images ``drop`` removed, ``add`` appended.

    Args:
        store: a FeatureStore open for writing that holds its writer lock; it is closed (its
            lock passes to the returned store).
        add: sample dicts (``path, split, label, defect_type``) appended, pending, in this order.
        missing: indices (in ``store``) of the images whose file has left the dataset folder;
            recorded as the attribute ``missing_from_source`` (renumbered); None keeps the
            current marks of the images kept.
        drop: indices (in ``store``) of images to remove with their features.

    Returns the new store, open for writing. Kept images keep their order and come first.
    """
    from .api import _build  # api imports the store, which must not import this module's callers
    from .store import BACKENDS, FeatureStore

    if not store.writable or not store.holds_lock:
        raise CacheError(f"{store.path}: only the writer holding the store's lock can change its sample table")
    if store._records is None:
        raise CacheError(f"{store.path} was written by an older funad (cache format 1); it cannot grow. "
                         "Re-create it with `funad extract --overwrite`")
    n_old = store.n_images
    drop_idx = np.unique(store._check_indices(list(drop))) if len(drop) else np.zeros(0, np.int64)
    keep = np.setdiff1d(np.arange(n_old), drop_idx)
    old_samples = store.samples
    table = L.check_samples([old_samples[i] for i in keep] + [dict(s) for s in add])  # repeated paths raise
    if not table:
        raise CacheMismatchError(f"{store.path}: the new sample table would be empty; delete the store instead")
    new_of_old = np.full(n_old, -1, np.int64)
    new_of_old[keep] = np.arange(keep.size)
    marks = store.missing_from_source if missing is None else np.unique(store._check_indices(list(missing)))
    marks = new_of_old[marks]
    marks = sorted(int(i) for i in marks[marks >= 0])

    attrs = {k: v for k, v in store._attrs.items() if k not in L.DERIVED_KEYS}
    attrs[L.MISSING_FROM_SOURCE] = marks
    attrs["table_changed_at"] = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    derived = L.derived_attrs(n_images=len(table), grid=store.grid, token_dim=store.token_dim,
                              mask_size=store.mask_size, preview_size=store.preview_size, dtype=store.dtype,
                              chunk_images=store.chunk_images if store.version >= 3 else L.CHUNK_IMAGES)
    attrs = L.merge_attributes(derived, attrs)

    path, mod = Path(store.path), BACKENDS[store.format]
    _remove_leftovers(path)
    tmp = path.with_name(f".{path.name}.partial-{os.getpid()}")
    records = store._read_records_per_image()  # the truth on disk, whatever the snapshot says
    try:
        _build(mod, tmp, len(table), store.n_patches, store.token_dim, store.dtype, store.mask_size,
               store.preview_size, table, attrs)
        new = mod.Backend(tmp, writable=True)
        try:
            names = [L.PATCH_TOKENS, L.CLASS_TOKENS, L.MASKS, L.SKIP_REASONS, L.RECORDS]
            names += [L.PREVIEWS] if store.preview_size is not None else []
            names += [L.SOURCE_DIGESTS] if store._has_digests else []
            for name in names:
                _carry_rows(store._b, new, name, keep)
            snapshot = np.zeros((len(table), len(L.RECORD_COLUMNS)), np.uint64)
            snapshot[: keep.size] = records[keep]
            new.array(L.RECORDS_SNAPSHOT)[:] = snapshot
            new.flush()
        finally:
            new.close()
        lock, store._lock = store._lock, None  # the lock passes to the new store; closing must not free it
        store._closed = True
        store._b.close()
        try:
            _swap(tmp, path)
        except BaseException:
            lock.release()
            raise
    finally:
        _remove(tmp)
    log.info("%s: sample table changed: %d images kept, %d dropped, %d appended (pending)", path, keep.size,
             drop_idx.size, len(add))
    return FeatureStore(path, store.format, writable=True, lock=lock)


def _carry_rows(old, new, name: str, keep: np.ndarray) -> None:
    """Rows ``keep`` of ``old``'s array ``name`` become rows ``0..len(keep)-1`` of ``new``'s.

    zarr, same encoding: a chunk of the new store whose rows are exactly a whole chunk of the old one (the
    kept images before the first dropped one, in full chunks) is hard-linked; the other rows are copied.
    """
    g = int(new.array(name).chunks[0]) if new.format == "zarr" else 1
    copy = np.ones(keep.size, dtype=bool)
    if old.format == "zarr" and _same_encoding(old.array(name), new.array(name)) and keep.size:
        n_old = int(old.array(name).shape[0])
        new.chunk_location(name, 0).parent.mkdir(parents=True, exist_ok=True)  # one folder per array
        for c in range(keep.size // g):
            rows = keep[c * g : (c + 1) * g]
            first = int(rows[0])
            if first % g or not np.array_equal(rows, np.arange(first, first + g)) or first + g > n_old:
                continue
            copy[c * g : (c + 1) * g] = False
            src, dst = old.chunk_location(name, first), new.chunk_location(name, c * g)
            try:
                _link(src, dst)  # chunk files are replaced, never written in place, so sharing is safe
            except FileNotFoundError:
                continue  # no chunk: the fill value (zeros) in both
            except OSError:  # no hard links here (or across devices): copy
                if src.is_file():
                    shutil.copyfile(src, dst)
    arr = old.array(name)
    rest = np.flatnonzero(copy)
    for s in range(0, rest.size, _ROWS_PER_COPY):
        at = rest[s : s + _ROWS_PER_COPY]  # positions in the new store
        part = keep[at]
        buf = np.empty((part.size, *arr.shape[1:]), arr.dtype)
        for start, stop, pos in L.runs(part):
            old.read_rows(name, start, stop, buf[pos])
        for start, _, pos in L.runs(at):
            new.write_rows(name, start, buf[pos])


def _same_encoding(a, b) -> bool:
    """Whether two zarr arrays store a chunk in identical files (all metadata but the shape agree)."""
    da, db = a.metadata.to_dict(), b.metadata.to_dict()
    da.pop("shape"), db.pop("shape")
    return da == db


def _swap(tmp: Path, path: Path) -> None:
    """Put the new store ``tmp`` at ``path``; the old one ends up at ``tmp`` (removed by the caller)."""
    if not tmp.is_dir():
        os.replace(tmp, path)  # HDF5: one atomic rename
        return
    if _exchange(tmp, path):
        return
    aside = path.with_name(f".{path.name}.replaced-{os.getpid()}")
    os.rename(path, aside)
    os.rename(tmp, path)
    os.rename(aside, tmp)


def _exchange(a: Path, b: Path) -> bool:
    """Atomically exchange two paths with Linux's ``renameat2(RENAME_EXCHANGE)``; False where unsupported."""
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (AttributeError, OSError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    if fn(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    log.debug("renameat2 exchange of %s and %s failed (%s); renaming in two steps", a, b, os.strerror(err))
    return False


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


def _remove_leftovers(path: Path) -> None:
    """Half-built stores of runs that were killed (the lock holder is the only one who builds them)."""
    for pattern in (f".{path.name}.partial-*", f".{path.name}.replaced-*"):
        for leftover in path.parent.glob(pattern):
            log.info("removing %s, left by an interrupted run", leftover)
            _remove(leftover)
