"""``funad import``: convert the FUN-AD authors' published DINO features into a feature store.

The download holds, per category ``cat``:

* ``{cat}.npy``       training features ``(N, P, D) float32``, the authors' clean train split;
* ``{cat}_test.npy``  test features, same layout;
* ``{cat}_gt.npy``    ``(N_test,)`` image labels in {0, 1};
* ``{cat}_mask.npy``  ``(N_test, H, W)`` ground-truth masks in {0, 1}.

Each feature row is ``[class token ; patch token]``: the first C = D/2 columns
hold the same class token on every patch. The importer checks that, stores
the class token once, and reads the arrays memory-mapped in chunks, so files
larger than RAM convert.

The files do not record how they were made. Following the paper, the store
records DINO ViT-B/8 (``vit_base_patch8_224.dino``), its last block, a resize
to ``round(S * 256 / 224)`` and a centre crop to S, with S the mask side, and
ImageNet mean and std. These are assumptions, marked by ``source="import"``.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np

from funad import __version__
from funad import cache

from .errors import DatasetError
from .preprocess import IMAGENET_MEAN, IMAGENET_STD, resize_for
from .progress import NullProgress, Progress

logger = logging.getLogger(__name__)

ASSUMED_BACKBONE = "vit_base_patch8_224.dino"
ASSUMED_LAST_BLOCK = 11  # ViT-B has 12 blocks, counted from 0
# Class-token repetition check: |x - class token of patch 0| <= ATOL + RTOL * |class token|.
RTOL, ATOL = 1e-5, 1e-6


@dataclass(frozen=True)
class ImportResult:
    path: Path
    n_train: int
    n_test: int
    grid: tuple[int, int]
    token_dim: int


def _load(path: Path) -> np.ndarray:
    if not path.is_file():
        raise DatasetError(f"{path} is missing; `funad import` needs {{cat}}.npy, {{cat}}_test.npy, "
                           "{cat}_gt.npy and {cat}_mask.npy in FEATURE_DIR (check --category)")
    try:
        return np.load(path, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError) as exc:
        raise DatasetError(f"{path}: cannot read as a .npy array ({exc})") from exc


def _feature_shape(arr: np.ndarray, path: Path) -> tuple[int, int, int]:
    if arr.ndim != 3:
        raise DatasetError(f"{path}: expected features of shape (images, patches, dim), got {arr.shape}")
    n, p, d = arr.shape
    if n == 0:
        raise DatasetError(f"{path} holds no images")
    if d % 2:
        raise DatasetError(f"{path}: feature dim {d} is odd, so it cannot be [class token ; patch token]")
    side = math.isqrt(p)
    if side * side != p:
        raise DatasetError(f"{path}: {p} patches per image is not a square grid; cannot infer the patch grid")
    if not np.issubdtype(arr.dtype, np.floating):
        raise DatasetError(f"{path}: features have dtype {arr.dtype}, expected floating point")
    return n, p, d


def _split_class_token(chunk: np.ndarray, path: Path, offset: int) -> tuple[np.ndarray, np.ndarray]:
    """``chunk (n, P, D)`` -> ``(class tokens (n, C), patch tokens (n, P, C))``, checking the repetition."""
    c = chunk.shape[2] // 2
    cls = chunk[:, 0, :c]
    dev = np.abs(chunk[:, :, :c] - cls[:, None, :])
    bound = ATOL + RTOL * np.abs(cls)[:, None, :]
    bad = dev > bound
    if bad.any():
        i, j, k = (int(v[0]) for v in np.nonzero(bad))
        raise DatasetError(
            f"{path}: image {offset + i}, patch {j}, column {k}: the first {c} columns are not the same class "
            f"token on every patch (differs from patch 0 by {float(dev[i, j, k]):.4g}; largest difference in this "
            f"chunk {float(dev.max()):.4g}). `funad import` expects the authors' [class token ; patch token] "
            "features; use `funad extract` on the images instead")
    return cls, chunk[:, :, c:]


def import_features(
    feature_dir: Path,
    category: str,
    output: Path,
    *,
    format: Optional[str] = None,
    dtype: str = "float16",
    overwrite: bool = False,
    chunk: int = 16,
    progress: Progress = NullProgress(),
) -> ImportResult:
    """Convert ``feature_dir/{category}*.npy`` into a store at ``output``; returns what was written."""
    feature_dir = Path(feature_dir)
    names = {"train": f"{category}.npy", "test": f"{category}_test.npy", "gt": f"{category}_gt.npy",
             "mask": f"{category}_mask.npy"}
    files = {k: feature_dir / v for k, v in names.items()}
    arrays = {k: _load(p) for k, p in files.items()}
    train, test, gt, mask = arrays["train"], arrays["test"], arrays["gt"], arrays["mask"]

    n_train, p, d = _feature_shape(train, files["train"])
    n_test, p_test, d_test = _feature_shape(test, files["test"])
    if (p_test, d_test) != (p, d):
        raise DatasetError(f"{files['test']}: features are (P={p_test}, D={d_test}) but {files['train']} has "
                           f"(P={p}, D={d}); both must come from the same backbone")
    if gt.shape != (n_test,):
        raise DatasetError(f"{files['gt']}: expected ({n_test},) labels, one per test image, got {gt.shape}")
    labels = np.asarray(gt)
    if not np.isin(labels, (0, 1)).all():
        raise DatasetError(f"{files['gt']}: labels must be 0 or 1, found {sorted(set(labels.tolist()))[:6]}")
    if mask.ndim != 3 or mask.shape[0] != n_test:
        raise DatasetError(f"{files['mask']}: expected ({n_test}, H, W) masks, got {mask.shape}")
    side = math.isqrt(p)
    grid = (side, side)
    c = d // 2
    h, w = int(mask.shape[1]), int(mask.shape[2])
    image_size = h if h == w else [h, w]
    width = max(3, len(str(max(n_train, n_test) - 1)))

    samples = [{"path": f"train/{i:0{width}d}", "split": "train", "label": 0, "defect_type": "good"}
               for i in range(n_train)]
    samples += [{"path": f"test/{i:0{width}d}", "split": "test", "label": int(lab),
                 "defect_type": "defect" if lab else "good"} for i, lab in enumerate(labels.tolist())]
    attributes = {
        "source": "import",
        "source_files": [str(files[k].resolve()) for k in ("train", "test", "gt", "mask")],
        "backbone": ASSUMED_BACKBONE,
        "weights": None,
        "weights_sha256": None,
        "layer": ASSUMED_LAST_BLOCK,
        "image_size": image_size,
        "resize": resize_for(h) if h == w else [resize_for(h), resize_for(w)],
        "crop": image_size,
        "mean": list(IMAGENET_MEAN),
        "std": list(IMAGENET_STD),
        "funad_version": __version__,
        "dataset_kind": "import",
        "dataset_root": str(feature_dir.resolve()),
        "category": category,
        "assumptions": "the feature files do not record their backbone or pre-processing; backbone, layer, "
                       "resize, crop, mean and std are those of the FUN-AD paper (DINO ViT-B/8, last block)",
    }
    logger.info("importing %s: %d train + %d test images, grid %s, D=%d -> %s", category, n_train, n_test,
                grid, d, output)
    store = cache.create(output, samples=samples, grid=grid, token_dim=c, mask_size=(h, w), preview_size=None,
                         dtype=dtype, attributes=attributes, format=format, overwrite=overwrite)
    task = progress.task(f"import {category}", total=n_train + n_test, unit="img")
    try:
        for name, feats, base in (("train", train, 0), ("test", test, n_train)):
            for s in range(0, feats.shape[0], chunk):
                block = np.asarray(feats[s : s + chunk], dtype=np.float32)
                cls, patches = _split_class_token(block, files[name], s)
                masks = None
                if name == "test":
                    masks = np.asarray(mask[s : s + chunk])
                    if not np.isin(masks, (0, 1)).all():
                        raise DatasetError(f"{files['mask']}: masks must hold 0 and 1 only "
                                           f"(images {s}..{s + len(masks) - 1} do not)")
                store.write_batch(np.arange(base + s, base + s + block.shape[0]), patch_tokens=patches,
                                  class_tokens=cls, masks=masks)
                task.advance(block.shape[0])
    finally:
        store.close()
    return ImportResult(Path(output), n_train, n_test, grid, c)
