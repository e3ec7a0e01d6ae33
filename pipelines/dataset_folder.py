"""Plain-folder reader: every image under the root, training data with an unknown label."""

from __future__ import annotations

from pathlib import Path

from .dataset_files import Sample, is_image, rel


def read_folder(root: Path) -> list[Sample]:
    """Every image under ``root`` (recursively, sorted by path): training data with unknown label (-1)."""
    root = Path(root)
    images = sorted(p for p in root.rglob("*") if is_image(p) and not any(part.startswith(".") for part in p.relative_to(root).parts))
    return [Sample(rel(p, root), "train", -1, "", None) for p in images]
