"""VisA reader: one category folder, split, labels and masks from ``<visa>/split_csv/1cls.csv``."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Optional

from .dataset_files import Sample, check_mask_pairs, rel
from .errors import DatasetError


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
            mask_rel = rel(visa_root / r["mask"], root)
        samples.append(
            Sample(rel(image, root), r["split"], int(r["label"] == "anomaly"),
                   "good" if r["label"] == "normal" else "anomaly", mask_rel)
        )
    check_mask_pairs(root, samples)
    return samples
