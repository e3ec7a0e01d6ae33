"""``funad eval`` at the original images' pixel size: maps back through the store's geometry, masks from the dataset.

The store holds masks and maps in its frame (:mod:`funad.pipelines.geometry`): squashed
and cropped (``paper``) or scaled and padded (``full``). Here each test image's map goes
back to the original image's pixels (:meth:`Geometry.to_original`), its mask is read
again from the dataset at full resolution, and the pixel metrics compare the two.

Pixels the geometry never showed the backbone (the ``paper`` crop's border, about 23% of
a square image) are NaN in the written maps. For the metrics they rank below every scored
pixel (they take the next float below the lowest score of the run): a defect there counts
as missed, which is what happens on a line.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
from PIL import Image

from funad import metrics

from .datasets import KINDS, read_dataset
from .errors import DatasetError, PipelineError
from .geometry import Geometry, original_size

logger = logging.getLogger(__name__)


@dataclass
class OriginalMaps:
    """Per test image: the original file, its map (h, w) float32 (NaN = not scored) and its 0/1 mask."""

    paths: list[Path]
    maps: list[np.ndarray]
    masks: list[np.ndarray]
    metrics: dict = field(default_factory=dict)

    @property
    def unscored_share(self) -> float:
        total = sum(m.size for m in self.maps)
        return float(sum(int(np.isnan(m).sum()) for m in self.maps) / total) if total else 0.0

    def filled(self) -> list[np.ndarray]:
        """The maps with unscored pixels just below the lowest scored one (for the metrics)."""
        lows = [np.nanmin(m) for m in self.maps if not np.isnan(m).all()]
        low = np.nextafter(np.float32(min(lows) if lows else 0.0), np.float32(-np.inf))
        return [np.where(np.isnan(m), low, m) for m in self.maps]

    def record(self, at_input: dict) -> dict:
        """What metrics.json says about the map size: pixel metrics here are at the original size."""
        return {
            "map_size": "original",
            "unscored_pixel_share": self.unscored_share,
            "unscored_pixels": "pixels the geometry never showed the backbone (the paper crop's border) rank "
                               "below every scored pixel in the pixel metrics",
            "pixel_metrics_at_input_size": {k: at_input.get(k) for k in ("pixel_auroc", "pixel_ap", "aupro")},
        }


MAP_SIZES = ("auto", "original", "input")  # funad eval / sweep --map-size


def measure(store, ids: np.ndarray, maps: np.ndarray, map_size: str = "auto") -> Optional[OriginalMaps]:
    """Maps ``(n, H, W)`` in the store's frame and the pixel metrics at the original images' size.

    ``map_size``: "original", "input" (returns None: the caller keeps its input-size metrics) or
    "auto" (original when the store came from a dataset funad reads, so the originals can be found).
    """
    if map_size not in MAP_SIZES:
        raise PipelineError(f"--map-size must be one of {list(MAP_SIZES)}, got {map_size!r}")
    if map_size == "input" or (map_size == "auto" and store.attrs.get("dataset_kind") not in KINDS):
        return None
    original = at_original_size(store, ids, maps, Geometry.from_attrs(dict(store.attrs)))
    filled = original.filled()
    original.metrics = {**metrics.pixel_metrics(original.masks, filled),
                        "aupro": metrics.aupro(original.masks, filled, fpr_limit=0.3)}
    return original


def dataset_files(store) -> tuple[Path, dict]:
    """The dataset root a store was extracted from and its samples by path; DatasetError when it is gone."""
    root = store.attrs.get("dataset_root")
    if not root or not Path(root).is_dir():
        raise DatasetError(
            f"{store.path} was extracted from {root or 'an unrecorded folder'}, which is not here: maps at the "
            f"original size need the original images and masks. Put the dataset back there, or pass "
            f"--map-size input to evaluate at the cache's input size")
    samples = read_dataset(Path(root), store.attrs.get("dataset_kind", "auto"))
    return Path(root), {s.path: s for s in samples}


def at_original_size(store, ids: np.ndarray, maps: np.ndarray, geometry: Geometry) -> OriginalMaps:
    """Maps ``(n, H, W)`` in the store's frame -> per-image maps and masks at the original images' size."""
    root, by_path = dataset_files(store)
    out = OriginalMaps([], [], [])
    for amap, i in zip(maps, ids):
        rel = store.samples[int(i)]["path"]
        sample = by_path.get(rel)
        if sample is None:
            raise DatasetError(f"{root / rel} (image {int(i)} of {store.path}) is no longer in the dataset; "
                               f"restore it or pass --map-size input")
        hw = original_size(root / rel)
        out.paths.append(root / rel)
        out.maps.append(geometry.to_original(amap, hw))
        out.masks.append(_mask(root, sample, hw))
    return out


def _mask(root: Path, sample, hw: tuple[int, int]) -> np.ndarray:
    if sample.mask_path is None:
        return np.zeros(hw, np.uint8)
    with Image.open(root / sample.mask_path) as m:
        mask = (np.asarray(m.convert("L")) > sample.mask_threshold).astype(np.uint8)
    if mask.shape != hw:
        raise DatasetError(f"mask {root / sample.mask_path} is {mask.shape[1]}x{mask.shape[0]} but its image is "
                           f"{hw[1]}x{hw[0]}; masks must have their image's size")
    return mask


MAP_FORMATS = ("npy", "tiff")  # float32 map files: numpy's .npy, or a 32-bit float TIFF (image viewers, ImageJ)


def write_map(path: Path, amap: np.ndarray) -> Path:
    """Write one float32 (h, w) map to ``path``; its suffix (.npy or .tiff) chooses the format.

    The TIFF is Pillow's single-channel 32-bit float image (mode "F"), which
    Pillow, tifffile and ImageJ read back bit for bit, NaN included.
    """
    amap = np.asarray(amap, dtype=np.float32)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".tiff":
        Image.fromarray(np.ascontiguousarray(amap)).save(path, format="TIFF")
    else:
        np.save(path, amap)
    return path


def save_maps(folder: Path, names: Sequence[str], maps: Sequence[np.ndarray], fmt: str = "npy") -> list[Path]:
    """One ``NAME.<fmt>`` float32 (h, w) map file per map (:func:`write_map`), NaN where not scored."""
    if fmt not in MAP_FORMATS:
        raise ValueError(f"map format must be one of {list(MAP_FORMATS)}, got {fmt!r}")
    return [write_map(folder / f"{n}.{fmt}", m) for n, m in zip(names, maps)]


class LazyImages(Sequence):
    """The original images as (h, w, 3) uint8, decoded only when a picture needs one."""

    def __init__(self, paths: Sequence[Path]) -> None:
        self.paths = list(paths)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i):
        with Image.open(self.paths[i]) as im:
            return np.asarray(im.convert("RGB"))


def write_pictures(report_dir: Path, original: OriginalMaps, *, names: Sequence[str], scores: np.ndarray,
                   labels: np.ndarray, top_k: int, threshold: Optional[float], title: str,
                   threshold_name: str = "threshold") -> list[Path]:
    """The report's PNGs drawn on the original images with their original-size maps (unscored pixels clear)."""
    from . import visualize

    lo = min(float(np.nanmin(m)) for m in original.maps if not np.isnan(m).all())
    hi = max(float(np.nanmax(m)) for m in original.maps if not np.isnan(m).all())
    written = visualize.write_report_pictures(
        LazyImages(original.paths), original.masks, original.maps, scores, labels, list(names), report_dir,
        threshold=threshold, k=top_k, vmin=lo, vmax=hi, title=title, threshold_name=threshold_name)
    return [p for paths in written.values() for p in paths]
