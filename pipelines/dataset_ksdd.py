"""KolektorSDD reader: ``kosNN/PartK.jpg`` with ``kosNN/PartK_label.png``, split by item folder."""

from __future__ import annotations

import re
from pathlib import Path

from .dataset_files import SPLIT_SEED, Sample, check_mask_pairs, images_in, mask_is_empty, rel, seeded_order
from .errors import DatasetError


# KolektorSDD: fraction of item folders (kosNN) whose images form the training pool.
KSDD_TRAIN_FRACTION = 0.65


def ksdd_split(items: list[str], train_fraction: float = KSDD_TRAIN_FRACTION, seed: int = SPLIT_SEED) -> set[str]:
    """The KolektorSDD training items: a seeded shuffle of the sorted item folders.

    Rule: sort the item folder names (``kos01``...), shuffle them with
    ``numpy.random.default_rng(seed)`` and take the first
    ``round(train_fraction * n_items)`` (at least one, and at least one item left
    for test) as the training items. All images of a training item are training
    images, whatever their masks show: FUN-AD is fully unsupervised, so the
    training pool is contaminated by the defects those items happen to have, as
    real data would be. Their labels still come truthfully from the masks. All
    images of the other items are test images. No item is in both splits.
    """
    if len(items) < 2:
        raise DatasetError(f"KolektorSDD needs at least 2 item folders (kosNN) to split by item; found {len(items)}")
    n_train = min(max(1, round(train_fraction * len(items))), len(items) - 1)
    return set(seeded_order(items, seed)[:n_train])


def read_ksdd(root: Path) -> list[Sample]:
    """KolektorSDD: ``kosNN/PartK.jpg`` with mask ``kosNN/PartK_label.png``; split by item (see :func:`ksdd_split`)."""
    root = Path(root)
    items = sorted(d.name for d in root.iterdir() if d.is_dir() and re.fullmatch(r"kos\d+", d.name))
    train_items = ksdd_split(items)
    samples = []
    for item in items:
        for img in images_in(root / item):
            if img.stem.endswith("_label"):
                continue
            mask = next((m for m in (img.with_name(f"{img.stem}_label{s}") for s in (".png", ".bmp")) if m.is_file()), None)
            if mask is None:
                raise DatasetError(
                    f"image {img} has no mask {img.with_name(img.stem + '_label.png')}; KolektorSDD needs a mask beside "
                    f"every image (an all-zero mask marks a normal image)"
                )
            label = 0 if mask_is_empty(mask, 0) else 1
            samples.append(
                Sample(rel(img, root), "train" if item in train_items else "test", label,
                       "good" if label == 0 else "defect", rel(mask, root))
            )
    check_mask_pairs(root, samples)
    return samples
