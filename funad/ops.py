"""General tensor helpers shared by the algorithm's modules (no FUN-AD logic here)."""

from __future__ import annotations

import contextlib

import torch


def minmax(x: torch.Tensor) -> torch.Tensor:
    """(x - min) / (max - min) over all of ``x``; all zeros when every value is equal."""
    lo, hi = x.min(), x.max()
    span = hi - lo
    return torch.where(span > 0, (x - lo) / torch.where(span > 0, span, 1.0), torch.zeros_like(x))


def cpu_field(name: str, cpuinfo: str = "/proc/cpuinfo") -> str:
    """The value of the first ``name`` line of Linux's /proc/cpuinfo ("vendor_id", "flags", ...); "" when the
    file or the field is missing (other systems)."""
    try:
        with open(cpuinfo, errors="replace") as f:
            for line in f:
                key, sep, value = line.partition(":")
                if sep and key.strip() == name:
                    return value.strip()
    except OSError:
        pass
    return ""


def autocast(device: torch.device, enabled: bool):
    """bfloat16 autocast on ``device`` when ``enabled``, else a no-op context."""
    if not enabled:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)


def images_per_chunk(n_patches: int, rows: int = 32768) -> int:
    """Images per chunk so that one chunk holds about ``rows`` patches (bounds scoring memory)."""
    return max(1, rows // max(1, n_patches))


# Rows of one matmul block when a network runs over many patches without gradient. On the CPU a 4096-row block
# keeps its (4096, 1024) float32 activation (16 MiB) in cache; in 32768-row chunks a faithful bank rebuild took
# 3.8-4.0 s against 3.4-3.5 s in these blocks (benchmarks/results/fit.md, sixth session). Accelerators want
# larger launches.
_BLOCK_ROWS = {"cpu": 4096, "other": 65536}


def row_blocks(n_rows: int, device: torch.device) -> list[slice]:
    """Slices of at most a cache-sized block of rows (see ``_BLOCK_ROWS``) covering ``range(n_rows)``."""
    step = _BLOCK_ROWS["cpu" if device.type == "cpu" else "other"]
    return [slice(start, min(n_rows, start + step)) for start in range(0, n_rows, step)]
