"""Dataset readers: turn a folder of images (and masks) into one sample table.

Every reader returns a list of :class:`Sample`, one per image, in a fixed order
(the order becomes the image index in the feature store). Paths are POSIX-style
and relative to the dataset root. Readers check that images and masks pair up
and that a mask has the size of its image; every :class:`DatasetError` names the
file at fault and says what to do.

Supported layouts (``kind``):

``mvtec``   MVTec AD category folder: ``train/good/*``, ``test/<type>/*`` and
            ``ground_truth/<type>/<name>_mask.png`` for every defective test image.
``visa``    A VisA category folder (``<root>/candle``) whose parent holds
            ``split_csv/1cls.csv``; split, label and mask come from that file.
``ksdd``    KolektorSDD: ``kosNN/PartK.jpg`` with ``kosNN/PartK_label.png`` beside
            it. An empty (all-zero) mask means normal. Split by item folder, see
            :func:`ksdd_split`.
``mtd``     Magnetic Tile Defects: ``MT_<Type>/Imgs/<name>.jpg`` with the mask
            ``<name>.png`` beside it (anomalous above 127). ``MT_Free`` is normal.
            Split: see :func:`mtd_split`.
``folder``  Any folder of unlabelled images (searched recursively): all training
            data, label -1. This is the real-world case.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

from .dataset_files import IMAGE_SUFFIXES, SPLIT_SEED, Sample, check_mask_pairs
from .dataset_folder import read_folder
from .dataset_ksdd import KSDD_TRAIN_FRACTION, ksdd_split, read_ksdd
from .dataset_mtd import MTD_TRAIN_FRACTION, mtd_split, read_mtd
from .dataset_mvtec import read_mvtec
from .dataset_visa import read_visa
from .errors import DatasetError

__all__ = ["KINDS", "IMAGE_SUFFIXES", "Sample", "read_dataset", "detect_kind", "check_mask_pairs", "read_mvtec",
           "read_visa", "read_ksdd", "read_mtd", "read_folder", "ksdd_split", "mtd_split", "KSDD_TRAIN_FRACTION",
           "MTD_TRAIN_FRACTION", "SPLIT_SEED"]

logger = logging.getLogger(__name__)

KINDS = ("mvtec", "visa", "ksdd", "mtd", "folder")
READERS = {"mvtec": read_mvtec, "visa": read_visa, "ksdd": read_ksdd, "mtd": read_mtd, "folder": read_folder}


def read_dataset(root: str | Path, kind: str = "auto") -> list[Sample]:
    """Read the dataset at ``root`` into a sample table.

    ``kind`` is one of ``auto, mvtec, visa, ksdd, mtd, folder``; ``auto`` picks the
    layout with :func:`detect_kind`. Raises :class:`DatasetError` when the folder
    does not match the layout, when images and masks do not pair up, or when no
    image is found.
    """
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(f"dataset folder {root} does not exist or is not a folder; pass the folder that holds the images")
    if kind == "auto":
        kind = detect_kind(root)
        logger.info("dataset %s: detected layout %r", root, kind)
    if kind not in READERS:
        raise DatasetError(f"unknown dataset kind {kind!r}; use one of auto, {', '.join(KINDS)}")
    samples = READERS[kind](root)
    if not samples:
        raise DatasetError(f"no images found in {root} (layout {kind}); image files must end in {', '.join(IMAGE_SUFFIXES)}")
    return samples


def detect_kind(root: Path) -> str:
    """Guess the layout of ``root`` from its folders (see the module docstring)."""
    if (root / "train").is_dir() and (root / "test").is_dir():
        return "mvtec"
    if (root / "split_csv" / "1cls.csv").is_file():
        return "visa"
    if (root.parent / "split_csv" / "1cls.csv").is_file() and (root / "Data").is_dir():
        return "visa"
    subdirs = [d for d in root.iterdir() if d.is_dir()]
    if any(d.name.startswith("MT_") and (d / "Imgs").is_dir() for d in subdirs):
        return "mtd"
    if any(re.fullmatch(r"kos\d+", d.name) for d in subdirs):
        return "ksdd"
    category_dirs = [d.name for d in subdirs if (d / "train").is_dir() and (d / "test").is_dir()]
    if category_dirs:
        raise DatasetError(
            f"{root} holds several MVTec AD categories ({', '.join(sorted(category_dirs)[:5])}...); "
            f"one feature store holds one category: pass a category folder such as {root / sorted(category_dirs)[0]}"
        )
    return "folder"
