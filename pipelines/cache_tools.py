"""What ``funad cache`` does, for the CLI: summarise a feature store and verify its checksums."""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Optional

from funad import cache


def summarise(path: Path) -> dict:
    """The store's summary (image counts per split, label and defect type, metadata, size, completeness)."""
    with cache.open(path, mode="r") as store:
        return store.summary()


def count_complete(path: Path) -> int:
    """Number of complete images in the store at ``path`` (what :func:`verify` checks)."""
    with cache.open(path, mode="r") as store:
        return int(store.complete.sum())


def verify(path: Path, on_progress: Optional[Callable[[int], None]] = None) -> tuple[int, list[dict]]:
    """Check every complete image against its checksums.

    Returns ``(n_checked, damaged)``; each damaged entry names the image
    (``index``, ``path``) and its ``problems``.
    """
    with cache.open(path, mode="r") as store:
        n_complete = int(store.complete.sum())
        return n_complete, store.verify(on_progress=on_progress)
