"""Zarr v3 directory backend of the feature store.

Every chunk write goes to a temporary file that is renamed into place (as
zarr's ``LocalStore`` does), so a chunk on disk is either the old one or the
new one, never half of each. Together with the store writing an image's
record after its data, this makes the directory crash-safe.

Arrays chunked by whole rows (features, records, masks, previews: ``chunk_images``
images per chunk, 16 by default, one in stores of cache format 2) are read and
written as files by :meth:`ZarrBackend.read_rows` and
:meth:`ZarrBackend.write_rows`: such a chunk file is exactly its rows'
little-endian bytes (zarr's ``bytes`` codec; the last chunk padded with zeros
as zarr pads edge chunks), or those bytes as one zstd frame (``bytes`` +
``zstd``, the masks). Several images per file is what lets a writer keep up
with the disk: creating a file costs about half a millisecond here, as much as
writing an image's tokens (benchmarks/results/store.md). Going around zarr's per-chunk
codec pipeline and event loop made reads several times faster, and writes of
the zstd-compressed masks and previews about 2x cheaper in CPU per image
(benchmarks/bench_store.py). Everything else goes through zarr.
"""

from __future__ import annotations

import json
import os
import sys
import uuid
from pathlib import Path

import numpy as np
import zarr
from zarr.codecs import BloscCodec, BytesCodec, ZstdCodec
from numcodecs.zstd import Zstd
from zarr.core.chunk_key_encodings import DefaultChunkKeyEncoding

from .errors import CorruptCacheError
from .writeback import start_writeback

FORMAT = "zarr"

# Codecs by name. The feature arrays use FEATURE_CODEC; benchmarks/bench_cache.py
# measured float16 ViT tokens to compress only to 0.92-0.93 of their size with any
# of them, while costing write and read speed (see benchmarks/results/cache.md),
# so features are stored uncompressed. Masks and previews compress well and
# cost little to compress, so they use zstd level 1.
CODECS = {
    "none": None,
    "zstd1": ZstdCodec(level=1),
    "zstd3": ZstdCodec(level=3),
    "blosc-lz4": BloscCodec(cname="lz4", clevel=5, shuffle="shuffle"),
    "blosc-zstd1": BloscCodec(cname="zstd", clevel=1, shuffle="shuffle"),
}
FEATURE_CODEC = "none"
SIDE_CODEC = "zstd1"
# Previews are photos: zstd saved little on them and cost about half a millisecond of CPU per image, a third of
# what the disk takes to write an image's tokens (benchmarks/bench_store.py), so they are stored as they are.
PREVIEW_CODEC = "none"


def is_store(path: Path) -> bool:
    """Whether ``path`` looks like a zarr v3 directory (has ``zarr.json``)."""
    return path.is_dir() and (path / "zarr.json").is_file()


class ZarrBackend:
    """Arrays, attributes and JSON blobs in a zarr v3 group on the local disk."""

    format = FORMAT

    def __init__(self, path: Path, writable: bool, create: bool = False) -> None:
        self.path = Path(path)
        self.writable = writable
        try:
            if create:
                self._root = zarr.open_group(str(self.path), mode="w-", zarr_format=3)
            else:
                self._root = zarr.open_group(str(self.path), mode="r+" if writable else "r", zarr_format=3)
        except (zarr.errors.BaseZarrError, FileNotFoundError, ValueError, KeyError) as exc:
            raise CorruptCacheError(f"{self.path}: not a readable zarr v3 group ({exc}); "
                                    "re-create it with `funad extract --overwrite`") from exc
        self._arrays: dict = {}
        self._codec: dict = {}  # name -> how its rows map to chunk files (see _row_codec)

    # -- arrays --------------------------------------------------------------
    def create_array(self, name: str, shape: tuple, dtype: str, chunks: tuple, codec: str) -> None:
        compressor = CODECS[codec]
        self._root.create_array(
            name,
            shape=shape,
            dtype=dtype,
            chunks=chunks,
            compressors=None if compressor is None else [compressor],
            fill_value=0,
            config={"write_empty_chunks": False},
            # "c.7.0.0" rather than "c/7/0/0": one folder per array, not one per image (a new folder
            # per image and array cost more than writing the image's features)
            chunk_key_encoding={"name": "default", "separator": "."},
        )

    def array(self, name: str):
        """The array ``name`` (supports ``a[slice]`` reads and writes, ``.shape``, ``.dtype``)."""
        if name not in self._arrays:
            try:
                node = self._root[name]
            except KeyError:
                raise CorruptCacheError(f"{self.path}: array {name!r} is missing; the store is incomplete "
                                        "(was its creation interrupted?). Re-create it with --overwrite") from None
            if not isinstance(node, zarr.Array):
                raise CorruptCacheError(f"{self.path}: {name!r} is a group, expected an array")
            self._arrays[name] = node
        return self._arrays[name]

    def has_array(self, name: str) -> bool:
        return (self.path / name / "zarr.json").is_file()

    def _row_codec(self, name: str):
        """How a chunk of ``name`` maps to its rows' bytes, or None when only zarr knows.

        ``"plain"``: the chunk file is exactly its rows' bytes in native order
        (``chunk_images`` rows, the last chunk padded with zeros as zarr pads edge
        chunks); a :class:`numcodecs.zstd.Zstd`: the file is those bytes as one
        zstd frame (zarr's ``bytes`` + ``zstd`` codecs). Both need chunks of whole
        rows, the default chunk key and a fill value of 0.
        """
        if name not in self._codec:
            arr = self.array(name)
            meta = arr.metadata
            codecs = tuple(getattr(meta, "codecs", ()))
            native = (bool(codecs) and isinstance(codecs[0], BytesCodec)
                      and (codecs[0].endian is None or codecs[0].endian.value == sys.byteorder
                           or arr.dtype.itemsize == 1))
            layout_ok = (isinstance(meta.chunk_key_encoding, DefaultChunkKeyEncoding)
                         and tuple(arr.chunks[1:]) == tuple(arr.shape[1:])
                         and float(np.asarray(meta.fill_value)) == 0.0)
            codec = None
            if native and layout_ok:
                if len(codecs) == 1:
                    codec = "plain"
                elif len(codecs) == 2 and isinstance(codecs[1], ZstdCodec):
                    codec = Zstd(level=codecs[1].level, checksum=codecs[1].checksum)
            self._codec[name] = codec
        return self._codec[name]

    def chunk_rows(self, name: str) -> int:
        """Rows (images) per chunk of ``name``."""
        return int(self.array(name).chunks[0])

    def _read_chunk(self, name: str, chunk: int, codec, out: np.ndarray, first: int = 0) -> None:
        """Rows ``first:first + len(out)`` of chunk ``chunk`` into ``out`` (C-contiguous); a missing file reads
        as zeros, a file of the wrong size or a bad zstd frame raises ValueError."""
        g = self.chunk_rows(name)
        row_bytes = out[0].nbytes if len(out) else 0
        flat = out.reshape(-1).view(np.uint8)
        try:
            with open(self._chunk_path(name, chunk), "rb", buffering=0) as fh:
                if codec == "plain":
                    size = os.fstat(fh.fileno()).st_size
                    if size != g * row_bytes:
                        raise ValueError(f"chunk file has {size} bytes, expected {g * row_bytes}")
                    if first:
                        fh.seek(first * row_bytes)
                    got = fh.readinto(flat)
                    if got != flat.size:
                        raise ValueError(f"chunk file ended after {got} of {flat.size} bytes")
                    return
                try:
                    raw = codec.decode(fh.read())
                except RuntimeError as exc:
                    raise ValueError(f"chunk file is not a valid zstd frame ({exc})") from None
        except FileNotFoundError:
            out[...] = 0
            return
        if len(raw) != g * row_bytes:
            raise ValueError(f"chunk file holds {len(raw)} bytes, expected {g * row_bytes}")
        flat[:] = np.frombuffer(raw, np.uint8, count=flat.size, offset=first * row_bytes)

    def read_rows(self, name: str, start: int, stop: int, out: np.ndarray) -> None:
        """Rows ``start:stop`` of ``name`` into ``out``, one read per chunk file; a missing chunk reads as
        zeros (the fill value), a chunk file of the wrong size raises."""
        codec = self._row_codec(name)
        if codec is None:
            out[...] = self.array(name)[start:stop]
            return
        if not out.flags.c_contiguous:  # rows are read into out's memory in place
            raise ValueError("read_rows needs a C-contiguous output array")
        g = self.chunk_rows(name)
        n_chunks = -(-int(self.array(name).shape[0]) // g)
        # a read of more than a chunk is a scan: fetch one chunk ahead (also past its end, for the next read);
        # shorter reads (random images, a streamed fit's batches) fetch nothing they did not ask for
        bulk = g > 1 and stop - start > g
        i = start
        while i < stop:
            chunk, first = divmod(i, g)
            end = min(stop, (chunk + 1) * g)
            if bulk and chunk + 1 < n_chunks:  # the disk fetches the next chunk while this one is copied
                self._prefetch(name, chunk + 1)
            self._read_chunk(name, chunk, codec, out[i - start:end - start], first)
            i = end

    def _prefetch(self, name: str, chunk: int) -> None:
        """Ask the kernel to start reading chunk ``chunk``'s file into the page cache; returns at once."""
        if not hasattr(os, "posix_fadvise"):
            return
        try:
            fd = os.open(self._chunk_path(name, chunk), os.O_RDONLY)
        except OSError:
            return
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_WILLNEED)
        except OSError:
            pass
        finally:
            os.close(fd)

    def write_rows(self, name: str, start: int, rows: np.ndarray) -> None:
        """Write ``rows`` as rows ``start:start + len(rows)`` of ``name``, one chunk file at a time.

        A chunk file is written whole, under a temporary name renamed into place.
        Where ``rows`` cover only part of a chunk, its other rows are read from
        the file first (the one process that owns a chunk writes it, so nothing
        changes them meanwhile). A compressed chunk of zeros (empty masks) is not
        written and any old file is removed, as zarr does with
        ``write_empty_chunks=False``: it reads back as the fill value.
        """
        codec = self._row_codec(name)
        if codec is None:
            self.array(name)[start : start + len(rows)] = rows
            return
        arr = self.array(name)
        rows = np.ascontiguousarray(rows, dtype=arr.dtype)
        g, n = self.chunk_rows(name), int(arr.shape[0])
        stop = start + len(rows)
        i = start
        while i < stop:
            chunk, first = divmod(i, g)
            end = min(stop, (chunk + 1) * g)
            lo, hi = chunk * g, min(n, (chunk + 1) * g)  # the chunk's rows that exist
            if g == 1 or (i == lo and end == hi == lo + g):  # the whole chunk: write the rows as they are
                data = rows[i - start:end - start]
            else:  # part of it, or the padded last chunk
                data = np.zeros((g, *arr.shape[1:]), arr.dtype)
                if not (i == lo and end == hi):
                    self._read_chunk(name, chunk, codec, data[:hi - lo])
                data[first:first + end - i] = rows[i - start:end - start]
            self._write_chunk(name, chunk, codec, data.reshape(-1).view(np.uint8))
            i = end

    def _write_chunk(self, name: str, chunk: int, codec, raw: np.ndarray) -> None:
        path = self._chunk_path(name, chunk)
        if codec != "plain":
            if not raw.any():
                path.unlink(missing_ok=True)
                return
            raw = codec.encode(raw)
        tmp = path.with_name(f"{path.name}.{uuid.uuid4().hex}.partial")
        try:
            fh = open(tmp, "wb", buffering=0)
        except FileNotFoundError:  # first chunk under this index: make its folder
            path.parent.mkdir(parents=True, exist_ok=True)
            fh = open(tmp, "wb", buffering=0)
        with fh:
            fh.write(raw)
            start_writeback(fh.fileno())  # the disk works while the next chunk is made
        os.replace(tmp, path)

    def _chunk_path(self, name: str, chunk: int) -> Path:
        arr = self.array(name)
        return self.path.joinpath(name, *arr.metadata.encode_chunk_key((chunk, *[0] * (len(arr.shape) - 1))).split("/"))

    def chunk_location(self, name: str, i: int) -> Path:
        """The file that holds image ``i`` of ``name`` (with the other images of its chunk)."""
        return self._chunk_path(name, i // self.chunk_rows(name))

    def chunk_exists(self, name: str, i: int) -> bool:
        return self.chunk_location(name, i).is_file()

    # -- attributes and blobs -------------------------------------------------
    def get_attrs(self) -> dict:
        return dict(self._root.attrs.asdict())

    def set_attrs(self, attrs: dict) -> None:
        self._root.attrs.update(attrs)

    def write_blob(self, name: str, obj) -> None:
        """Store a JSON-serialisable object as a uint8 array (one chunk), replacing any previous one."""
        data = np.frombuffer(json.dumps(obj).encode("utf-8"), dtype=np.uint8)
        arr = self._root.create_array(name, shape=data.shape, dtype="uint8", chunks=(max(1, data.size),),
                                      compressors=[CODECS["zstd1"]], fill_value=0, overwrite=True)
        if data.size:
            arr[:] = data
        self._arrays.pop(name, None)

    def read_blob(self, name: str):
        raw = np.asarray(self.array(name)[:], dtype=np.uint8).tobytes()
        try:
            return json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise CorruptCacheError(f"{self.path}: {name!r} is not valid JSON ({exc})") from exc

    # -- housekeeping --------------------------------------------------------
    def flush(self) -> None:
        """Nothing to do: every zarr write is on disk when it returns."""

    def size_on_disk(self) -> int:
        total = 0
        for dirpath, _, files in os.walk(self.path):
            for f in files:
                try:
                    total += os.path.getsize(os.path.join(dirpath, f))
                except OSError:  # a temporary file renamed away while we walk
                    pass
        return total

    def close(self) -> None:
        self._arrays.clear()


Backend = ZarrBackend
