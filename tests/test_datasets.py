"""Dataset readers on tiny synthetic layouts built in tmp_path, including their error cases."""

from __future__ import annotations

import csv
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from funad.pipelines.datasets import (
    KSDD_TRAIN_FRACTION,
    Sample,
    detect_kind,
    ksdd_split,
    mtd_split,
    read_dataset,
)
from funad.pipelines.errors import DatasetError


def write_image(path: Path, size=(20, 16), value: int = 128, mode: str = "RGB") -> Path:
    """A flat image of ``size`` (width, height); suffix decides the format."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, value if mode == "L" else (value, value // 2, 255 - value)).save(path)
    return path


def write_mask(path: Path, size=(20, 16), box=(2, 2, 6, 6), value: int = 255) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    m = np.zeros((size[1], size[0]), np.uint8)
    if box is not None:
        x0, y0, x1, y1 = box
        m[y0:y1, x0:x1] = value
    Image.fromarray(m).save(path)
    return path


# --------------------------------------------------------------------------- MVTec AD


def make_mvtec(root: Path) -> Path:
    for i in range(3):
        write_image(root / "train/good" / f"{i:03d}.png")
    for i in range(2):
        write_image(root / "test/good" / f"{i:03d}.png")
    for t in ("crack", "hole"):
        for i in range(2):
            write_image(root / "test" / t / f"{i:03d}.png")
            write_mask(root / "ground_truth" / t / f"{i:03d}_mask.png")
    return root


def test_mvtec_reads_splits_labels_and_masks(tmp_path):
    root = make_mvtec(tmp_path / "cat")
    samples = read_dataset(root)  # auto-detected
    assert detect_kind(root) == "mvtec"
    assert len(samples) == 3 + 2 + 4
    assert Counter((s.split, s.label) for s in samples) == {("train", 0): 3, ("test", 0): 2, ("test", 1): 4}
    crack = next(s for s in samples if s.path == "test/crack/001.png")
    assert crack == Sample("test/crack/001.png", "test", 1, "crack", "ground_truth/crack/001_mask.png")
    assert all(s.mask_path is None for s in samples if s.label == 0)
    assert samples[0].path == "train/good/000.png"  # sorted, train first


def test_mvtec_missing_mask_names_the_file(tmp_path):
    root = make_mvtec(tmp_path / "cat")
    (root / "ground_truth/hole/001_mask.png").unlink()
    with pytest.raises(DatasetError, match=r"test/hole/001\.png has no mask .*001_mask\.png"):
        read_dataset(root, "mvtec")


def test_mvtec_mask_of_other_size_is_refused(tmp_path):
    root = make_mvtec(tmp_path / "cat")
    write_mask(root / "ground_truth/crack/000_mask.png", size=(10, 8))
    with pytest.raises(DatasetError, match=r"000_mask\.png is 10x8 but its image .*000\.png is 20x16"):
        read_dataset(root, "mvtec")


def test_mvtec_orphan_mask_is_refused(tmp_path):
    root = make_mvtec(tmp_path / "cat")
    write_mask(root / "ground_truth/crack/007_mask.png")
    with pytest.raises(DatasetError, match=r"007_mask\.png has no image"):
        read_dataset(root, "mvtec")


def test_mvtec_root_with_several_categories_asks_for_one(tmp_path):
    make_mvtec(tmp_path / "mvtec" / "bottle")
    make_mvtec(tmp_path / "mvtec" / "cable")
    with pytest.raises(DatasetError, match=r"several MVTec AD categories .*bottle"):
        read_dataset(tmp_path / "mvtec")


def test_empty_dataset_is_refused(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("no images here")
    with pytest.raises(DatasetError, match=r"no images found in .*empty"):
        read_dataset(tmp_path / "empty")
    with pytest.raises(DatasetError, match="does not exist"):
        read_dataset(tmp_path / "missing")


def test_unknown_kind_is_refused(tmp_path):
    with pytest.raises(DatasetError, match="unknown dataset kind 'coco'"):
        read_dataset(make_mvtec(tmp_path / "cat"), "coco")


# --------------------------------------------------------------------------- VisA


def make_visa(root: Path) -> Path:
    rows = []
    for obj in ("candle", "pcb1"):
        for i in range(3):
            rel = f"{obj}/Data/Images/Normal/{i:04d}.JPG"
            write_image(root / rel)
            rows.append([obj, "train" if i < 2 else "test", "normal", rel, ""])
        rel, mrel = f"{obj}/Data/Images/Anomaly/000.JPG", f"{obj}/Data/Masks/Anomaly/000.png"
        write_image(root / rel)
        write_mask(root / mrel, value=1)  # VisA masks hold small class ids, not 255
        rows.append([obj, "test", "anomaly", rel, mrel])
    (root / "split_csv").mkdir(parents=True)
    with open(root / "split_csv" / "1cls.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["object", "split", "label", "image", "mask"])
        w.writerows(rows)
    return root


def test_visa_category_follows_the_split_file(tmp_path):
    root = make_visa(tmp_path / "VisA")
    samples = read_dataset(root / "candle")
    assert detect_kind(root / "candle") == "visa"
    assert [(s.split, s.label) for s in samples] == [("train", 0), ("train", 0), ("test", 0), ("test", 1)]
    assert samples[0].path == "Data/Images/Normal/0000.JPG"  # relative to the category folder
    assert samples[3].mask_path == "Data/Masks/Anomaly/000.png"


def test_visa_root_asks_for_a_category(tmp_path):
    root = make_visa(tmp_path / "VisA")
    with pytest.raises(DatasetError, match=r"VisA root with 2 categories.*candle"):
        read_dataset(root)


def test_visa_missing_image_names_csv_line(tmp_path):
    root = make_visa(tmp_path / "VisA")
    (root / "pcb1/Data/Images/Normal/0001.JPG").unlink()
    with pytest.raises(DatasetError, match=r"1cls\.csv line 7: image .*0001\.JPG does not exist"):
        read_dataset(root / "pcb1", "visa")


# --------------------------------------------------------------------------- KolektorSDD


def make_ksdd(root: Path, n_items: int = 6, defective=((0, 1), (3, 0), (5, 2))) -> Path:
    for item in range(n_items):
        for part in range(3):
            write_image(root / f"kos{item + 1:02d}" / f"Part{part}.jpg", size=(12, 30), mode="L")
            box = (2, 10, 6, 14) if (item, part) in defective else None
            write_mask(root / f"kos{item + 1:02d}" / f"Part{part}_label.png", size=(12, 30), box=box)
    return root


def test_ksdd_labels_from_masks_and_split_by_item(tmp_path):
    root = make_ksdd(tmp_path / "ksdd")
    samples = read_dataset(root)
    assert detect_kind(root) == "ksdd"
    assert len(samples) == 18
    assert {s.path for s in samples if s.label == 1} == {"kos01/Part1.jpg", "kos04/Part0.jpg", "kos06/Part2.jpg"}
    assert all(s.mask_path == s.path.replace(".jpg", "_label.png") for s in samples)
    split_of_item: dict[str, set] = {}
    for s in samples:
        split_of_item.setdefault(s.path.split("/")[0], set()).add(s.split)
    assert all(len(v) == 1 for v in split_of_item.values()), "an item is in both splits"
    train_items = {item for item, v in split_of_item.items() if v == {"train"}}
    assert len(train_items) == round(KSDD_TRAIN_FRACTION * 6) == 4
    assert train_items == ksdd_split(sorted(split_of_item))
    assert read_dataset(root) == samples  # deterministic


def test_ksdd_split_rule_is_seeded_and_order_free():
    items = [f"kos{i:02d}" for i in range(1, 51)]
    train = ksdd_split(items)
    assert len(train) == round(0.65 * 50)
    assert ksdd_split(list(reversed(items))) == train  # depends on the names, not their order
    assert ksdd_split(items, seed=1) != train
    assert len(ksdd_split(["kos01", "kos02"])) == 1  # always leaves a test item
    with pytest.raises(DatasetError, match="at least 2 item folders"):
        ksdd_split(["kos01"])


def test_ksdd_missing_label_file(tmp_path):
    root = make_ksdd(tmp_path / "ksdd")
    (root / "kos02" / "Part1_label.png").unlink()
    with pytest.raises(DatasetError, match=r"kos02/Part1\.jpg has no mask .*Part1_label\.png"):
        read_dataset(root, "ksdd")


# --------------------------------------------------------------------------- MTD


def make_mtd(root: Path, n_free: int = 10) -> Path:
    for i in range(n_free):
        write_image(root / "MT_Free/Imgs" / f"exp{i}.jpg")
        write_mask(root / "MT_Free/Imgs" / f"exp{i}.png", box=None)
    for t in ("MT_Crack", "MT_Blowhole"):
        for i in range(2):
            write_image(root / t / "Imgs" / f"exp{i}.jpg")
            write_mask(root / t / "Imgs" / f"exp{i}.png")
    return root


def test_mtd_split_and_threshold(tmp_path):
    root = make_mtd(tmp_path / "mtd")
    samples = read_dataset(root)
    assert detect_kind(root) == "mtd"
    train = [s for s in samples if s.split == "train"]
    assert len(train) == 8 and all(s.label == 0 and s.defect_type == "good" for s in train)
    assert {s.path.split("/")[2] for s in train} == mtd_split([f"exp{i}.jpg" for i in range(10)])
    test = [s for s in samples if s.split == "test"]
    assert Counter(s.defect_type for s in test) == {"good": 2, "crack": 2, "blowhole": 2}
    assert all(s.mask_threshold == 127 for s in samples)
    assert all(s.mask_path for s in samples if s.label == 1)


def test_mtd_defect_without_mask(tmp_path):
    root = make_mtd(tmp_path / "mtd")
    (root / "MT_Crack/Imgs/exp1.png").unlink()
    with pytest.raises(DatasetError, match=r"MT_Crack/Imgs/exp1\.jpg has no mask"):
        read_dataset(root, "mtd")


# --------------------------------------------------------------------------- plain folder


def test_plain_folder_is_unlabelled_training_data(tmp_path):
    root = tmp_path / "mine"
    write_image(root / "b.png")
    write_image(root / "a.JPG")
    write_image(root / "sub" / "c.bmp")
    write_image(root / ".hidden" / "d.png")
    (root / "readme.txt").write_text("x")
    samples = read_dataset(root)
    assert detect_kind(root) == "folder"
    assert [s.path for s in samples] == ["a.JPG", "b.png", "sub/c.bmp"]
    assert all(s.split == "train" and s.label == -1 and s.mask_path is None for s in samples)
