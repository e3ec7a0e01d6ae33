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

import csv
import logging
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Optional

import numpy as np
from PIL import Image, UnidentifiedImageError

from .errors import DatasetError

logger = logging.getLogger(__name__)

KINDS = ("mvtec", "visa", "ksdd", "mtd", "folder")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")

# KolektorSDD: fraction of item folders (kosNN) whose images form the training pool.
KSDD_TRAIN_FRACTION = 0.65
# MTD: fraction of MT_Free images that form the training pool.
MTD_TRAIN_FRACTION = 0.8
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
    readers = {"mvtec": read_mvtec, "visa": read_visa, "ksdd": read_ksdd, "mtd": read_mtd, "folder": read_folder}
    if kind not in readers:
        raise DatasetError(f"unknown dataset kind {kind!r}; use one of auto, {', '.join(KINDS)}")
    samples = readers[kind](root)
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


# --------------------------------------------------------------------------- helpers


def _is_image(path: Path) -> bool:
    return path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES and not path.name.startswith(".")


def _images_in(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if _is_image(p))


def _rel(path: Path, root: Path) -> str:
    return path.relative_to(root).as_posix()


def _image_size(path: Path) -> Optional[tuple[int, int]]:
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
        mask_size = _image_size(mask_file)
        if mask_size is None:
            raise DatasetError(f"mask {mask_file} cannot be read as an image; replace it with a valid PNG")
        image_size = _image_size(root / s.path)
        if image_size is not None and image_size != mask_size:
            raise DatasetError(
                f"mask {mask_file} is {mask_size[0]}x{mask_size[1]} but its image {root / s.path} is "
                f"{image_size[0]}x{image_size[1]}; masks must have their image's size (resize the mask with "
                f"nearest-neighbour resampling)"
            )


def _mask_is_empty(path: Path, threshold: int) -> bool:
    try:
        with Image.open(path) as im:
            arr = np.asarray(im.convert("L"))
    except (OSError, UnidentifiedImageError) as exc:
        raise DatasetError(f"mask {path} cannot be read ({exc}); replace it with a valid PNG") from exc
    return not bool((arr > threshold).any())


def _seeded_order(names: list[str], seed: int) -> list[str]:
    """``names`` sorted, then shuffled with ``numpy.random.default_rng(seed)``."""
    names = sorted(names)
    perm = np.random.default_rng(seed).permutation(len(names))
    return [names[i] for i in perm]


# --------------------------------------------------------------------------- MVTec AD


def read_mvtec(root: Path) -> list[Sample]:
    """MVTec AD category: ``train/good`` (normal), ``test/<type>`` with masks in ``ground_truth``.

    ``test/good`` images are normal and have no mask; every other test image is
    anomalous and needs ``ground_truth/<type>/<name>_mask.png``.
    """
    root = Path(root)
    for sub in ("train/good", "test"):
        if not (root / sub).is_dir():
            raise DatasetError(f"{root / sub} is missing; an MVTec AD category folder has train/good and test/<type>")
    for d in (root / "train").iterdir():
        if d.is_dir() and d.name != "good":
            raise DatasetError(
                f"unexpected folder {d}: MVTec AD training images live in train/good only; move or remove it"
            )
    samples = [Sample(_rel(p, root), "train", 0, "good", None) for p in _images_in(root / "train" / "good")]
    used_masks: set[Path] = set()
    for type_dir in sorted(d for d in (root / "test").iterdir() if d.is_dir()):
        for img in _images_in(type_dir):
            if type_dir.name == "good":
                samples.append(Sample(_rel(img, root), "test", 0, "good", None))
                continue
            mask = root / "ground_truth" / type_dir.name / f"{img.stem}_mask.png"
            if not mask.is_file():
                raise DatasetError(
                    f"defective image {img} has no mask {mask}; MVTec AD needs a mask for every image in test/<type> "
                    f"(add the mask, or move the image to test/good if it is normal)"
                )
            used_masks.add(mask)
            samples.append(Sample(_rel(img, root), "test", 1, type_dir.name, _rel(mask, root)))
    gt = root / "ground_truth"
    if gt.is_dir():
        for mask in sorted(gt.rglob("*")):
            if _is_image(mask) and mask not in used_masks:
                raise DatasetError(
                    f"mask {mask} has no image (expected test/{mask.parent.name}/{mask.stem.removesuffix('_mask')}.*); "
                    f"remove the mask or add its image"
                )
    check_mask_pairs(root, samples)
    return samples


# --------------------------------------------------------------------------- VisA


def _visa_csv(root: Path) -> tuple[Path, Optional[str]]:
    """(csv path, category) for a VisA category folder, or (csv, None) for the VisA root."""
    if (root / "split_csv" / "1cls.csv").is_file():
        return root / "split_csv" / "1cls.csv", None
    if (root.parent / "split_csv" / "1cls.csv").is_file():
        return root.parent / "split_csv" / "1cls.csv", root.name
    raise DatasetError(f"no split_csv/1cls.csv in {root} or its parent; VisA is read through its official split file")


def read_visa(root: Path) -> list[Sample]:
    """A VisA category folder (``<visa>/<category>``), split and labels from ``<visa>/split_csv/1cls.csv``.

    The csv has columns ``object, split, label, image, mask``; ``label`` is
    ``normal`` or ``anomaly`` and paths are relative to the VisA root. Passing the
    VisA root itself is refused (one store holds one category).
    """
    root = Path(root)
    csv_path, category = _visa_csv(root)
    with open(csv_path, newline="") as fh:
        rows = list(csv.DictReader(fh))
    need = {"object", "split", "label", "image", "mask"}
    if not rows or not need <= set(rows[0]):
        raise DatasetError(f"{csv_path} must have the columns {', '.join(sorted(need))}; it looks damaged")
    objects = sorted({r["object"] for r in rows})
    if category is None:
        raise DatasetError(
            f"{root} is the VisA root with {len(objects)} categories; one feature store holds one category: "
            f"pass a category folder such as {root / objects[0]}"
        )
    if category not in objects:
        raise DatasetError(f"{csv_path} has no rows for category {category!r}; it lists {', '.join(objects)}")
    visa_root = csv_path.parent.parent
    samples = []
    for line, r in enumerate(rows, start=2):
        if r["object"] != category:
            continue
        where = f"{csv_path} line {line}"
        if r["split"] not in ("train", "test"):
            raise DatasetError(f"{where}: split {r['split']!r} must be train or test")
        if r["label"] not in ("normal", "anomaly"):
            raise DatasetError(f"{where}: label {r['label']!r} must be normal or anomaly")
        image = visa_root / r["image"]
        if not image.is_file():
            raise DatasetError(f"{where}: image {image} does not exist; restore it or fix the csv")
        mask_rel = None
        if r["label"] == "anomaly":
            if not r["mask"]:
                raise DatasetError(f"{where}: anomalous image {image} has no mask in the csv; add its mask")
            mask_rel = _rel(visa_root / r["mask"], root)
        samples.append(
            Sample(_rel(image, root), r["split"], int(r["label"] == "anomaly"),
                   "good" if r["label"] == "normal" else "anomaly", mask_rel)
        )
    check_mask_pairs(root, samples)
    return samples


# --------------------------------------------------------------------------- KolektorSDD


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
    return set(_seeded_order(items, seed)[:n_train])


def read_ksdd(root: Path) -> list[Sample]:
    """KolektorSDD: ``kosNN/PartK.jpg`` with mask ``kosNN/PartK_label.png``; split by item (see :func:`ksdd_split`)."""
    root = Path(root)
    items = sorted(d.name for d in root.iterdir() if d.is_dir() and re.fullmatch(r"kos\d+", d.name))
    train_items = ksdd_split(items)
    samples = []
    for item in items:
        for img in _images_in(root / item):
            if img.stem.endswith("_label"):
                continue
            mask = next((m for m in (img.with_name(f"{img.stem}_label{s}") for s in (".png", ".bmp")) if m.is_file()), None)
            if mask is None:
                raise DatasetError(
                    f"image {img} has no mask {img.with_name(img.stem + '_label.png')}; KolektorSDD needs a mask beside "
                    f"every image (an all-zero mask marks a normal image)"
                )
            label = 0 if _mask_is_empty(mask, 0) else 1
            samples.append(
                Sample(_rel(img, root), "train" if item in train_items else "test", label,
                       "good" if label == 0 else "defect", _rel(mask, root))
            )
    check_mask_pairs(root, samples)
    return samples


# --------------------------------------------------------------------------- MTD


def mtd_split(free_names: list[str], train_fraction: float = MTD_TRAIN_FRACTION, seed: int = SPLIT_SEED) -> set[str]:
    """The MTD training images: ``floor(train_fraction * n)`` of the ``MT_Free`` names after a seeded shuffle.

    Rule: sort the ``MT_Free`` image names, shuffle them with
    ``numpy.random.default_rng(seed)``, take the first ``floor(train_fraction * n)``
    as training images. The other ``MT_Free`` images and every defective image
    are test images.
    """
    n_train = math.floor(train_fraction * len(free_names))
    return set(_seeded_order(free_names, seed)[:n_train])


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
        per_type[d.name] = [p for p in _images_in(imgs) if p.suffix.lower() != ".png"]
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
                Sample(_rel(img, root), split, 0 if normal else 1, defect,
                       None if mask is None else _rel(mask, root), mask_threshold=127)
            )
    check_mask_pairs(root, samples)
    return samples


# --------------------------------------------------------------------------- plain folder


def read_folder(root: Path) -> list[Sample]:
    """Every image under ``root`` (recursively, sorted by path): training data with unknown label (-1)."""
    root = Path(root)
    images = sorted(p for p in root.rglob("*") if _is_image(p) and not any(part.startswith(".") for part in p.relative_to(root).parts))
    return [Sample(_rel(p, root), "train", -1, "", None) for p in images]
