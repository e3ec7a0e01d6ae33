"""Per-image checksums of the stored arrays, cheap enough to check on every read.

Each image has a record ``(status, checksum of its patch tokens, class token,
mask, preview)``, written in a chunk of its own after the image's data (see
:mod:`funad.cache.store`). A read recomputes the checksums of the rows it got
and compares them with the record, so a chunk file that is missing (zarr then
returns the fill value, zeros) or damaged is reported instead of being used.

The checksum is a position-weighted 64-bit sum, not a CRC: zlib.crc32 runs at
about 2.5 GB/s here, as fast as reading the data itself from the page cache,
while this runs at memory speed. Every 64 KiB block is summed as 64-bit words
(wrapping), and the block sums are combined with distinct odd weights, so any
change of one word, a zeroed or truncated chunk, and blocks in the wrong order
are all detected. It is an integrity check against accidents, not against
someone forging data. benchmarks/bench_store.py measures its cost on reads.

The block sums are taken by torch (as int64, whose wrapping sums are the same
bits as uint64 ones), which vectorises them and uses every core: 41 GB/s here
against numpy's 15 GB/s, while a read from the page cache runs at about
3 GB/s. numpy takes over for read-only arrays and rows of a length that is not
a whole number of words, which torch will not wrap, and
in a process forked from the one that imported this module: a fork copies
none of the threads of torch's (OpenMP) pool, and the child's first parallel
sum would wait for them forever.
"""

from __future__ import annotations

import os

import numpy as np
import torch

BLOCK_BYTES = 1 << 16  # 64 KiB: fewer, longer sums than 4 KiB blocks, about a quarter faster
_WORDS = BLOCK_BYTES // 8
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_PID = os.getpid()  # torch's thread pool is only safe in this process, not in forks of it


def _weights(n_blocks: int) -> np.ndarray:
    """Distinct odd 64-bit weights, one per block (wrapping arithmetic)."""
    return (np.arange(n_blocks, dtype=np.uint64) * _GOLDEN) | np.uint64(1)


def _block_sums(words: np.ndarray) -> np.ndarray:
    """``(n, blocks, _WORDS) uint64`` -> ``(n, blocks) uint64``: each block's wrapping sum."""
    if words.flags.writeable and os.getpid() == _PID and all(st % 8 == 0 for st in words.strides):
        return torch.from_numpy(words.view(np.int64)).sum(dim=2).numpy().view(np.uint64)
    return words.sum(axis=2, dtype=np.uint64)


def row_checksums(rows: np.ndarray) -> np.ndarray:
    """``(n, ...)`` array -> ``(n,) uint64``: the checksum of each row's bytes (C order)."""
    rows = np.ascontiguousarray(rows)
    n = rows.shape[0]
    raw = rows.reshape(n, -1).view(np.uint8)
    size = raw.shape[1]
    full = size // BLOCK_BYTES * BLOCK_BYTES
    parts = []
    if full:
        parts.append(_block_sums(raw[:, :full].view(np.uint64).reshape(n, -1, _WORDS)))
    if size > full:  # the last, shorter block, zero-padded to whole words
        tail = np.zeros((n, -(-(size - full) // 8) * 8), np.uint8)
        tail[:, : size - full] = raw[:, full:]
        parts.append(tail.view(np.uint64).sum(axis=1, dtype=np.uint64)[:, None])
    blocks = np.concatenate(parts, axis=1) if len(parts) > 1 else parts[0]
    sums = (blocks * _weights(blocks.shape[1])).sum(axis=1, dtype=np.uint64)
    return sums ^ np.uint64(size)
