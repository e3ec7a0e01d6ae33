"""HDF5 single-file backend of the feature store.

HDF5 is not crash-safe by itself: a process killed while the library's
metadata cache holds unwritten changes can leave a file that no longer opens.
The backend avoids metadata changes after creation instead:

* every array is chunked, uncompressed and allocated in full when it is
  created (``H5D_ALLOC_TIME_EARLY``), so writing an image only overwrites raw
  bytes at fixed offsets and never touches the chunk index;
* the store flushes after an image's data and again after its status, so the
  status never reaches the disk before the data it vouches for.

The price is that the file has its full size from the start and features are
not compressed; the benchmark (benchmarks/results/cache.md) found compression
saves under 10% on float16 ViT tokens anyway. JSON (attributes, the sample
table) lives in uint8 datasets, not HDF5 attributes, which are limited to 64 KB.
"""

from __future__ import annotations

import json
from pathlib import Path

import h5py
import numpy as np

from .errors import CacheError, CorruptCacheError
from .writeback import start_writeback

FORMAT = "hdf5"
ATTRS_BLOB = "attributes_json"

# Only "none" keeps the crash-safety guarantee above; the others exist for the benchmark.
CODECS = {"none": {}, "lzf": {"compression": "lzf"}, "gzip1": {"compression": "gzip", "compression_opts": 1}}
FEATURE_CODEC = "none"
SIDE_CODEC = "none"
PREVIEW_CODEC = "none"


def is_store(path: Path) -> bool:
    """Whether ``path`` is an HDF5 file."""
    return path.is_file() and h5py.is_hdf5(str(path))


def _open_file(path: Path, mode: str) -> h5py.File:
    """Readers skip HDF5's file lock, so `funad cache info` works while `funad extract` writes. That
    is safe because a store's HDF5 metadata does not change after creation (see above). Within one
    process HDF5 insists on the same locking flag for a file that is already open, hence the retry."""
    if mode != "r":
        return h5py.File(path, mode)
    try:
        return h5py.File(path, "r", locking=False)
    except OSError as exc:
        if "locking flag" not in str(exc):
            raise
        return h5py.File(path, "r")


class HDF5Backend:
    """Arrays, attributes and JSON blobs in one HDF5 file."""

    format = FORMAT

    def __init__(self, path: Path, writable: bool, create: bool = False) -> None:
        self.path = Path(path)
        self.writable = writable
        mode = "w-" if create else ("r+" if writable else "r")
        try:
            self._f = _open_file(self.path, mode)
        except OSError as exc:
            if "lock" in str(exc):
                raise CacheError(f"{self.path} is open for writing in another process (HDF5 locks the file); "
                                 "wait for it to finish") from exc
            raise CorruptCacheError(f"{self.path}: cannot open as HDF5 ({exc}); "
                                    "re-create it with `funad extract --overwrite`") from exc

    # -- arrays --------------------------------------------------------------
    def create_array(self, name: str, shape: tuple, dtype: str, chunks: tuple, codec: str) -> None:
        filters = CODECS[codec]
        dcpl = h5py.h5p.create(h5py.h5p.DATASET_CREATE)
        if not filters:
            dcpl.set_alloc_time(h5py.h5d.ALLOC_TIME_EARLY)
            dcpl.set_fill_time(h5py.h5d.FILL_TIME_NEVER)  # allocate only; unwritten images are never read
        self._f.create_dataset(name, shape=shape, dtype=dtype, chunks=chunks, fillvalue=0, dcpl=dcpl, **filters)

    def array(self, name: str):
        try:
            node = self._f[name]
        except KeyError:
            raise CorruptCacheError(f"{self.path}: dataset {name!r} is missing; the store is incomplete "
                                    "(was its creation interrupted?). Re-create it with --overwrite") from None
        if not isinstance(node, h5py.Dataset):
            raise CorruptCacheError(f"{self.path}: {name!r} is a group, expected a dataset")
        return node

    def has_array(self, name: str) -> bool:
        return name in self._f

    def read_rows(self, name: str, start: int, stop: int, out: np.ndarray) -> None:
        """Rows ``start:stop`` of ``name`` into ``out`` (no intermediate copy)."""
        self.array(name).read_direct(out, source_sel=np.s_[start:stop])

    def write_rows(self, name: str, start: int, rows: np.ndarray) -> None:
        self.array(name)[start : start + len(rows)] = rows

    def chunk_location(self, name: str, i: int) -> str:
        """Where image ``i`` of ``name`` lives: a row of a dataset inside the one file."""
        return f"(row {i} of dataset {name!r} in {self.path})"

    def chunk_exists(self, name: str, i: int) -> bool:
        """Always: chunks are allocated when the file is created and cannot go missing on their own."""
        return True

    # -- attributes and blobs -------------------------------------------------
    def get_attrs(self) -> dict:
        if ATTRS_BLOB not in self._f:
            return {}
        return self.read_blob(ATTRS_BLOB)

    def set_attrs(self, attrs: dict) -> None:
        merged = self.get_attrs()
        merged.update(attrs)
        self.write_blob(ATTRS_BLOB, merged)

    def write_blob(self, name: str, obj) -> None:
        data = np.frombuffer(json.dumps(obj).encode("utf-8"), dtype=np.uint8)
        if name in self._f:
            del self._f[name]
        self._f.create_dataset(name, data=data, dtype="uint8")
        self._f.flush()

    def read_blob(self, name: str):
        raw = np.asarray(self.array(name)[()], dtype=np.uint8).tobytes()
        try:
            return json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise CorruptCacheError(f"{self.path}: {name!r} is not valid JSON ({exc})") from exc

    # -- housekeeping --------------------------------------------------------
    def flush(self) -> None:
        self._f.flush()
        if self.writable:
            try:
                fd = self._f.id.get_vfd_handle()
            except (AttributeError, ValueError, RuntimeError):
                return
            start_writeback(fd)  # the disk works while the next images are made

    def size_on_disk(self) -> int:
        return self.path.stat().st_size

    def close(self) -> None:
        if self._f.id.valid:
            self._f.close()


Backend = HDF5Backend
