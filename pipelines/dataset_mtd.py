"""Magnetic Tile Defects reader: ``MT_<Type>/Imgs/<name>.jpg`` with the mask ``<name>.png`` beside it."""

from __future__ import annotations

import math
from pathlib import Path

from .dataset_files import SPLIT_SEED, Sample, check_mask_pairs, images_in, rel, seeded_order
from .errors import DatasetError


# MTD: fraction of MT_Free images that form the training pool.
MTD_TRAIN_FRACTION = 0.8


def mtd_split(free_names: list[str], train_fraction: float = MTD_TRAIN_FRACTION, seed: int = SPLIT_SEED) -> set[str]:
    """The MTD training images: ``floor(train_fraction * n)`` of the ``MT_Free`` names after a seeded shuffle.

    Rule: sort the ``MT_Free`` image names, shuffle them with
    ``numpy.random.default_rng(seed)``, take the first ``floor(train_fraction * n)``
    as training images. The other ``MT_Free`` images and every defective image
    are test images.
    """
    n_train = math.floor(train_fraction * len(free_names))
    return set(seeded_order(free_names, seed)[:n_train])


def read_mtd(root: Path) -> list[Sample]:
    """Magnetic Tile Defects: ``MT_<Type>/Imgs/<name>.jpg`` + mask ``<name>.png``; split by :func:`mtd_split`.

    ``MT_Free`` images are normal (label 0); the other types are defects and need
    their mask. Mask pixels above 127 are anomalous.
    """
    root = Path(root)
    type_dirs = sorted(d for d in root.iterdir() if d.is_dir() and d.name.startswith("MT_"))
    if not any(d.name == "MT_Free" for d in type_dirs):
        raise DatasetError(f"{root / 'MT_Free'} is missing; MTD needs the defect-free images in MT_Free/Imgs")
    per_type: dict[str, list[Path]] = {}
    for d in type_dirs:
        imgs = d / "Imgs"
        if not imgs.is_dir():
            raise DatasetError(f"{imgs} is missing; MTD keeps each type's images in MT_<Type>/Imgs")
        per_type[d.name] = [p for p in images_in(imgs) if p.suffix.lower() != ".png"]
    train_free = mtd_split([p.name for p in per_type["MT_Free"]])
    samples = []
    for type_name, images in per_type.items():
        normal = type_name == "MT_Free"
        for img in images:
            mask = img.with_suffix(".png")
            if not mask.is_file():
                if not normal:
                    raise DatasetError(f"defective image {img} has no mask {mask}; add the mask beside the image")
                mask = None
            split = "train" if normal and img.name in train_free else "test"
            defect = "good" if normal else type_name.removeprefix("MT_").lower()
            samples.append(
                Sample(rel(img, root), split, 0 if normal else 1, defect,
                       None if mask is None else rel(mask, root), mask_threshold=127)
            )
    check_mask_pairs(root, samples)
    return samples
