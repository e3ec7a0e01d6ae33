"""Creating and opening feature stores: :func:`create` and :func:`open`, with zarr's modes."""

from __future__ import annotations

import datetime
import importlib.metadata
import logging
import os
import shutil
from pathlib import Path
from typing import Mapping, Optional, Sequence, Union

import numpy as np

from . import _hdf5, _zarr
from . import layout as L
from .errors import CacheExistsError, CacheMismatchError, CacheNotFoundError, CorruptCacheError
from .lock import WriterLock
from .store import BACKENDS, FeatureStore

log = logging.getLogger(__name__)

PathLike = Union[str, os.PathLike]
_HDF5_SUFFIXES = (".h5", ".hdf5")


def infer_format(path: PathLike, format: Optional[str] = None) -> str:
    """``format`` if given, else "hdf5" for a ``.h5``/``.hdf5`` suffix, else "zarr"."""
    if format is not None:
        if format not in BACKENDS:
            raise CacheMismatchError(f"unknown cache format {format!r}; use 'zarr' or 'hdf5'")
        return format
    return "hdf5" if Path(path).suffix.lower() in _HDF5_SUFFIXES else "zarr"


def create(
    path: PathLike,
    *,
    samples: Sequence[Mapping],
    grid: L.Pair,
    token_dim: int,
    mask_size: L.Pair,
    preview_size: Optional[L.Pair],
    dtype: str = "float16",
    attributes: Optional[Mapping] = None,
    format: Optional[str] = None,
    overwrite: bool = False,
    chunk_images: Optional[int] = None,
) -> "FeatureStore":
    """Create an empty store (every image pending) and return it open for writing.

    Args:
        path: the store; a directory for zarr, a file for HDF5.
        samples: one dict per image, ``{"path", "split", "label", "defect_type"}``; the order
            defines the image index.
        grid: patch grid ``(h, w)`` (or one int for a square grid); P = h * w.
        token_dim: C, the width of one token; features read back have D = 2C.
        mask_size: ``(H, W)`` of the stored masks (the backbone's input size).
        preview_size: side (or ``(h, w)``) of the stored previews; None stores none.
        dtype: "float16" (default) or "float32" for the tokens.
        attributes: store-level metadata (backbone, weights, layer, ...), JSON-serialisable.
        format: "zarr" or "hdf5"; default from the suffix (``.h5``/``.hdf5`` -> HDF5).
        overwrite: replace an existing store at ``path``; otherwise that raises CacheExistsError.
        chunk_images: images per chunk (None: 16; at most the number of images). A zarr store writes one file per
            array and chunk; writers write whole chunks where they can, and processes writing one store
            share it out by chunk. 1 is the layout of cache format 2.

    The store is built under a temporary name and renamed into place, so an
    interrupted creation never leaves a half-made store at ``path``.
    """
    path = Path(path)
    fmt = infer_format(path, format)
    table = L.check_samples(samples)
    if not table:
        raise CacheMismatchError(f"{path}: cannot create a store with no samples")
    if dtype not in L.DTYPES:
        raise CacheMismatchError(f"dtype {dtype!r} is not supported; use one of {L.DTYPES}")
    if int(token_dim) <= 0:
        raise CacheMismatchError(f"token_dim must be positive, got {token_dim}")
    chunk_images = L.CHUNK_IMAGES if chunk_images is None else chunk_images
    if isinstance(chunk_images, bool) or not isinstance(chunk_images, (int, np.integer)) or chunk_images < 1:
        raise CacheMismatchError(f"chunk_images must be a positive int, got {chunk_images!r}")
    grid_hw = L.pair(grid, "grid")
    mask_hw = L.pair(mask_size, "mask_size")
    preview_hw = None if preview_size is None else L.pair(preview_size, "preview_size")
    n, p, c = len(table), grid_hw[0] * grid_hw[1], int(token_dim)
    derived = L.derived_attrs(n_images=n, grid=grid_hw, token_dim=c, mask_size=mask_hw,
                              preview_size=preview_hw, dtype=dtype, chunk_images=chunk_images)
    attrs = L.merge_attributes(derived, attributes or {})
    attrs.setdefault("funad_version", _funad_version())
    attrs["created_at"] = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")

    if (path.exists() or path.is_symlink()) and not overwrite:
        raise CacheExistsError(f"{path} already exists; open it with mode 'a' to resume, "
                               "or pass overwrite=True (--overwrite) to replace it")
    path.parent.mkdir(parents=True, exist_ok=True)  # the lock file lives beside the store
    lock = WriterLock(path)  # before touching an existing store: its writer may still be running
    try:
        if path.exists() or path.is_symlink():
            _check_removable(path)
        tmp = path.with_name(f".{path.name}.partial-{os.getpid()}")
        _remove(tmp, force=True)
        try:
            _build(BACKENDS[fmt], tmp, n, p, c, dtype, mask_hw, preview_hw, table, attrs)
            if path.exists() or path.is_symlink():
                _remove(path, force=False)
            os.replace(tmp, path)
        finally:
            _remove(tmp, force=True)
    except BaseException:
        lock.release()
        raise
    log.debug("created %s store %s: %d images, grid %s, C=%d, %s", fmt, path, n, grid_hw, c, dtype)
    return FeatureStore(path, fmt, writable=True, lock=lock)


def _build(mod, tmp: Path, n: int, p: int, c: int, dtype: str, mask_hw: tuple, preview_hw: Optional[tuple],
           table: list, attrs: dict) -> None:
    """Lay out an empty store at ``tmp`` with ``mod`` (a backend module)."""
    backend = mod.Backend(tmp, writable=True, create=True)
    try:
        fc, sc = mod.FEATURE_CODEC, mod.SIDE_CODEC
        g = int(attrs.get("chunk_images", 1))  # images per chunk: a writer writes whole chunks, ranks never share one
        backend.create_array(L.PATCH_TOKENS, (n, p, c), dtype, (g, p, c), fc)
        backend.create_array(L.CLASS_TOKENS, (n, c), dtype, (g, c), fc)
        backend.create_array(L.MASKS, (n, *mask_hw), "uint8", (g, *mask_hw), sc)
        if preview_hw is not None:
            backend.create_array(L.PREVIEWS, (n, *preview_hw, 3), "uint8", (g, *preview_hw, 3), mod.PREVIEW_CODEC)
        backend.create_array(L.SKIP_REASONS, (n, L.SKIP_REASON_BYTES), "uint8", (g, L.SKIP_REASON_BYTES), sc)
        backend.create_array(L.SOURCE_DIGESTS, (n, L.DIGEST_BYTES), "uint8", (g, L.DIGEST_BYTES), "none")
        cols = len(L.RECORD_COLUMNS)
        backend.create_array(L.RECORDS, (n, cols), "uint64", (g, cols), "none")  # written with the images' data
        backend.create_array(L.RECORDS_SNAPSHOT, (n, cols), "uint64", (n, cols), "none")
        backend.create_array(L.SNAPSHOT_VALID, (1,), "uint8", (1,), "none")
        # explicit zeros (every image pending): HDF5 arrays are allocated unfilled
        backend.array(L.RECORDS)[:] = np.zeros((n, cols), np.uint64)
        backend.array(L.RECORDS_SNAPSHOT)[:] = np.zeros((n, cols), np.uint64)
        backend.array(L.SNAPSHOT_VALID)[:] = np.ones(1, np.uint8)
        backend.array(L.SKIP_REASONS)[:] = np.zeros((n, L.SKIP_REASON_BYTES), np.uint8)
        backend.array(L.SOURCE_DIGESTS)[:] = np.zeros((n, L.DIGEST_BYTES), np.uint8)
        backend.write_blob(L.SAMPLE_TABLE, table)
        backend.set_attrs(attrs)
        backend.flush()
    finally:
        backend.close()


def open(  # noqa: A001 - mirrors zarr.open
    path: PathLike,
    mode: str = "r",
    *,
    samples: Optional[Sequence[Mapping]] = None,
    grid: Optional[L.Pair] = None,
    token_dim: Optional[int] = None,
    mask_size: Optional[L.Pair] = None,
    preview_size: Optional[L.Pair] = None,
    dtype: str = "float16",
    attributes: Optional[Mapping] = None,
    format: Optional[str] = None,
    lock: bool = True,
) -> "FeatureStore":
    """Open a store, with zarr's modes.

    * ``"r"``: read only; the store must exist (else CacheNotFoundError, also a FileNotFoundError).
    * ``"a"``: read and write an existing store; if it is missing and the creation arguments
      (``samples``, ``grid``, ...; see :func:`create`) are given, create it.
    * ``"w"``: create, replacing any existing store (needs the creation arguments).
    * ``"w-"``: create, failing with CacheExistsError if it exists (needs the creation arguments).

    A store open for writing holds its writer lock (:mod:`funad.cache.lock`) until closed; a
    second writer gets CacheLockedError naming the holder. ``lock=False`` opens an existing store
    for writing without it: only for processes that join a run whose lock another process holds
    (the ranks of a torch.distributed extraction), each writing images no other writes.
    """
    if mode not in ("r", "a", "w", "w-"):
        raise ValueError(f"mode must be 'r', 'a', 'w' or 'w-', got {mode!r}")
    path = Path(path)
    create_args = dict(samples=samples, grid=grid, token_dim=token_dim, mask_size=mask_size,
                       preview_size=preview_size, dtype=dtype, attributes=attributes, format=format)
    have_create_args = samples is not None and grid is not None and token_dim is not None and mask_size is not None
    if mode in ("w", "w-") or (mode == "a" and not path.exists() and have_create_args):
        if not have_create_args:
            raise ValueError(f"mode {mode!r} creates a store: pass samples, grid, token_dim, mask_size "
                             "and preview_size (see funad.cache.create)")
        return create(path, overwrite=(mode == "w"), **create_args)
    if not path.exists():
        raise CacheNotFoundError(f"{path}: no feature cache here; create one with `funad extract DATA -o {path}` "
                                 "or `funad import`")
    fmt = _detect_format(path)
    if format is not None and format != fmt:
        raise CacheMismatchError(f"{path} is a {fmt} store, not {format}")
    if mode == "r":
        return FeatureStore(path, fmt, writable=False)
    writer_lock = WriterLock(path) if lock else None
    return FeatureStore(path, fmt, writable=True, lock=writer_lock)  # releases the lock if opening fails


def _detect_format(path: Path) -> str:
    if _zarr.is_store(path):
        return "zarr"
    if _hdf5.is_store(path):
        return "hdf5"
    what = "a directory without zarr.json" if path.is_dir() else "a file that is not HDF5"
    raise CorruptCacheError(f"{path} is {what}, so it is not a funad feature cache; "
                            "check the path or re-create it with `funad extract`")


def _removable(path: Path) -> bool:
    """A store (or an empty file or folder) that overwriting may delete."""
    if path.is_symlink() or path.is_file():
        return _hdf5.is_store(path) or path.stat().st_size == 0
    return path.is_dir() and (_zarr.is_store(path) or not any(path.iterdir()))


def _check_removable(path: Path) -> None:
    if not _removable(path):
        raise CacheExistsError(f"{path} exists and is not a funad feature cache; refusing to delete it. "
                               "Choose another output path")


def _remove(path: Path, force: bool) -> None:
    """Delete a store (or, with ``force``, whatever is at our own temporary path)."""
    if not (path.exists() or path.is_symlink()):
        return
    if not force:
        _check_removable(path)
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink()


def _funad_version() -> str:
    try:
        return importlib.metadata.version("funad")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"
