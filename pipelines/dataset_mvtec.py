"""MVTec AD reader: ``train/good``, ``test/<type>`` and ``ground_truth/<type>/<name>_mask.png``."""

from __future__ import annotations

from pathlib import Path

from .dataset_files import Sample, check_mask_pairs, images_in, is_image, rel
from .errors import DatasetError


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
    samples = [Sample(rel(p, root), "train", 0, "good", None) for p in images_in(root / "train" / "good")]
    used_masks: set[Path] = set()
    for type_dir in sorted(d for d in (root / "test").iterdir() if d.is_dir()):
        for img in images_in(type_dir):
            if type_dir.name == "good":
                samples.append(Sample(rel(img, root), "test", 0, "good", None))
                continue
            mask = root / "ground_truth" / type_dir.name / f"{img.stem}_mask.png"
            if not mask.is_file():
                raise DatasetError(
                    f"defective image {img} has no mask {mask}; MVTec AD needs a mask for every image in test/<type> "
                    f"(add the mask, or move the image to test/good if it is normal)"
                )
            used_masks.add(mask)
            samples.append(Sample(rel(img, root), "test", 1, type_dir.name, rel(mask, root)))
    gt = root / "ground_truth"
    if gt.is_dir():
        for mask in sorted(gt.rglob("*")):
            if is_image(mask) and mask not in used_masks:
                raise DatasetError(
                    f"mask {mask} has no image (expected test/{mask.parent.name}/{mask.stem.removesuffix('_mask')}.*); "
                    f"remove the mask or add its image"
                )
    check_mask_pairs(root, samples)
    return samples
