"""What every dataset reader shares: the :class:`Sample` record and the file helpers (images, masks, seeded order)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Optional

import numpy as np
from PIL import Image, UnidentifiedImageError

from .errors import DatasetError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")
# Seed of the shuffles that define the KolektorSDD and MTD splits (part of the
# documented split: changing it changes which images are test images).
SPLIT_SEED = 0


@dataclass(frozen=True)
class Sample:
    """One image of a dataset.

    ``path`` and ``mask_path`` are relative to the dataset root. ``label`` is 0
    (normal), 1 (anomalous) or -1 (unknown). ``mask_threshold``: a mask pixel
    counts as anomalous when its grey value is above it (0 for most datasets,
    127 for MTD whose masks are 0-255 with soft edges).
    """

    path: str
    split: str
    label: int
    defect_type: str
    mask_path: Optional[str]
    mask_threshold: int = 0

    def as_record(self) -> dict:
        """The dict the feature store keeps per image (``path, split, label, defect_type``)."""
        return {"path": self.path, "split": self.split, "label": self.label, "defect_type": self.defect_type}


def is_image(path: Path) -> bool:
    return path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES and not path.name.startswith(".")


def images_in(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if is_image(p))


def rel(path: Path, root: Path) -> str:
    return path.relative_to(root).as_posix()


def read_image_size(path: Path) -> Optional[tuple[int, int]]:
    """(width, height) read from the file header, or None when the file cannot be read."""
    try:
        with Image.open(path) as im:
            return im.size
    except (OSError, UnidentifiedImageError):
        return None


def check_mask_pairs(root: Path, samples: Iterable[Sample]) -> None:
    """Check that every mask exists and has the size of its image.

    An image that cannot be read is left to the extraction (which stops or, with
    ``--skip-bad``, skips it); an unreadable mask is an error here.
    """
    for s in samples:
        if s.mask_path is None:
            continue
        mask_file = root / s.mask_path
        if not mask_file.is_file():
            raise DatasetError(f"mask {mask_file} for image {root / s.path} does not exist; add it or remove the image")
        mask_size = read_image_size(mask_file)
        if mask_size is None:
            raise DatasetError(f"mask {mask_file} cannot be read as an image; replace it with a valid PNG")
        image_size = read_image_size(root / s.path)
        if image_size is not None and image_size != mask_size:
            raise DatasetError(
                f"mask {mask_file} is {mask_size[0]}x{mask_size[1]} but its image {root / s.path} is "
                f"{image_size[0]}x{image_size[1]}; masks must have their image's size (resize the mask with "
                f"nearest-neighbour resampling)"
            )


def mask_is_empty(path: Path, threshold: int) -> bool:
    try:
        with Image.open(path) as im:
            arr = np.asarray(im.convert("L"))
    except (OSError, UnidentifiedImageError) as exc:
        raise DatasetError(f"mask {path} cannot be read ({exc}); replace it with a valid PNG") from exc
    return not bool((arr > threshold).any())


def seeded_order(names: list[str], seed: int) -> list[str]:
    """``names`` sorted, then shuffled with ``numpy.random.default_rng(seed)``."""
    names = sorted(names)
    perm = np.random.default_rng(seed).permutation(len(names))
    return [names[i] for i in perm]
