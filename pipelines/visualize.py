"""Pictures of where the model looks: per-image panels and one overview grid per run.

A panel has three parts: the input image, the image with the ground-truth
contour, and the anomaly map over the image with a colour bar. Every picture
of a run shares one colour scale (``vmin``/``vmax``), so the same colour means
the same score everywhere.

Matplotlib is used through its object API with the Agg canvas: nothing here
touches pyplot's global state, the display, or the default backend.

The stored previews may be smaller than the maps (which have the masks' size);
the image is resized to the map's size for display only.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence, Union

import numpy as np
from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.cm import ScalarMappable
from matplotlib.colors import Normalize
from matplotlib.figure import Figure
from PIL import Image

from funad.errors import DataError

logger = logging.getLogger(__name__)

CMAP = "jet"
ALPHA = 0.45  # heatmap opacity over the image
CONTOUR_COLOR = "lime"
CORRECT_COLOR = "tab:green"
WRONG_COLOR = "tab:red"
_DPI = 100


@dataclass(frozen=True)
class Shot:
    """One test image ready to draw.

    Attributes:
        name: readable id, e.g. "test-broken_large-003" (see :func:`sample_name`).
        image: (h, w, 3) or (h, w) uint8.
        mask: (H, W) ground truth (nonzero = defect) or None when unknown.
        amap: (H, W) anomaly map.
        score: the image score.
        label: 0 normal, 1 anomalous, -1 unknown.
    """

    name: str
    image: np.ndarray
    mask: Optional[np.ndarray]
    amap: np.ndarray
    score: float
    label: int = -1


def sample_name(path: str) -> str:
    """A file-name-safe id from a sample path: "test/broken_large/003.png" -> "test-broken_large-003"."""
    stem = re.sub(r"\.[A-Za-z0-9]+$", "", str(path).replace("\\", "/"))
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", stem.replace("/", "-")).strip("-") or "image"


def _rgb_at(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """(h, w[, 3]) uint8 -> (H, W, 3) uint8, resized bilinearly for display when needed."""
    image = np.asarray(image)
    if image.ndim == 2:
        image = np.repeat(image[:, :, None], 3, axis=2)
    if image.ndim != 3 or image.shape[2] not in (3, 4):
        raise DataError(f"image must have shape (h, w, 3) or (h, w), got {image.shape}")
    image = image[:, :, :3]
    if image.dtype != np.uint8:
        image = np.clip(image, 0, 255).astype(np.uint8)
    height, width = size
    if image.shape[:2] != (height, width):
        image = np.asarray(Image.fromarray(image).resize((width, height), Image.BILINEAR))
    return image


def _mask_at(mask: Optional[np.ndarray], size: tuple[int, int]) -> Optional[np.ndarray]:
    if mask is None:
        return None
    mask = np.asarray(mask) > 0
    if mask.shape != tuple(size):
        mask = np.asarray(Image.fromarray(mask.astype(np.uint8) * 255).resize(size[::-1], Image.NEAREST)) > 0
    return mask


def _draw_contour(ax, mask: Optional[np.ndarray], linewidth: float = 1.5) -> None:
    if mask is not None and mask.any():
        ax.contour(mask.astype(np.float32), levels=[0.5], colors=CONTOUR_COLOR, linewidths=linewidth)


def _draw_overlay(ax, image: np.ndarray, amap: np.ndarray, norm: Normalize) -> None:
    ax.imshow(image)
    ax.imshow(amap, cmap=CMAP, norm=norm, alpha=ALPHA, interpolation="bilinear")


def _new_figure(width_in: float, height_in: float, layout: Optional[str] = None) -> Figure:
    fig = Figure(figsize=(width_in, height_in), dpi=_DPI, layout=layout)
    FigureCanvasAgg(fig)
    return fig


def _save(fig: Figure, path: Union[str, Path]) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png", dpi=_DPI)
    return path


def panel(image: np.ndarray, mask: Optional[np.ndarray], amap: np.ndarray, title: str,
          path: Union[str, Path], vmin: float, vmax: float, score: Optional[float] = None) -> Path:
    """Write one three-part PNG: image | image + ground-truth contour | heatmap overlay.

    Args:
        image: (h, w, 3) or (h, w) uint8 input image (any size; resized to the map's for display).
        mask: (H, W) ground truth, nonzero = defect, or None (no contour, "mask unknown").
        amap: (H, W) anomaly map.
        title: figure title, e.g. the sample's name.
        path: PNG to write (parent folders are created).
        vmin, vmax: the colour scale, shared by every picture of a run.
        score: the image score, shown in the heatmap's title when given.

    Returns:
        The written path.
    """
    amap = np.asarray(amap, dtype=np.float32)
    if amap.ndim != 2:
        raise DataError(f"anomaly map must have shape (H, W), got {amap.shape}")
    size = amap.shape
    rgb = _rgb_at(image, size)
    gt = _mask_at(mask, size)
    norm = Normalize(vmin=vmin, vmax=vmax)

    fig = _new_figure(12.0, 4.4)
    axes = fig.subplots(1, 3)
    axes[0].imshow(rgb)
    axes[0].set_title("image")
    axes[1].imshow(rgb)
    _draw_contour(axes[1], gt)
    if gt is None:
        axes[1].set_title("ground truth unknown")
    else:
        axes[1].set_title(f"ground truth ({int(gt.sum())} px)" if gt.any() else "ground truth: no defect")
    _draw_overlay(axes[2], rgb, amap, norm)
    _draw_contour(axes[2], gt, linewidth=1.0)
    axes[2].set_title("anomaly map" + (f", score {score:.3f}" if score is not None else ""))
    for ax in axes:
        ax.set_axis_off()
    fig.colorbar(ScalarMappable(norm=norm, cmap=colormaps[CMAP]), ax=axes[2], fraction=0.046, pad=0.03,
                 label="pixel anomaly score")
    fig.suptitle(title)
    fig.subplots_adjust(left=0.01, right=0.95, bottom=0.02, top=0.86, wspace=0.05)
    return _save(fig, path)


def _verdict(shot: Shot, threshold: Optional[float]) -> tuple[str, str]:
    """Caption line and colour: green when the thresholded prediction matches the label."""
    if threshold is None or shot.label not in (0, 1):
        truth = {0: "normal", 1: "anomalous"}.get(shot.label, "unlabelled")
        return truth, "black"
    predicted = int(shot.score >= threshold)
    word = {0: "normal", 1: "anomalous"}
    if predicted == shot.label:
        return f"{word[shot.label]} (correct)", CORRECT_COLOR
    kind = "false positive" if predicted == 1 else "false negative"
    return kind, WRONG_COLOR


def overview_grid(items: Sequence[Shot], path: Union[str, Path], vmin: float, vmax: float,
                  threshold: Optional[float] = None, title: str = "", ncols: int = 6) -> Path:
    """One PNG with a heatmap overlay per item, its score and its label.

    Each cell's caption is green when the item's label agrees with the
    prediction ``score >= threshold``, red when not, black when either is
    unknown. Ground-truth contours are drawn in lime.

    Args:
        items: the images to show, in reading order (e.g. most anomalous first).
        path: PNG to write.
        vmin, vmax: the run's colour scale.
        threshold: image-score threshold of the prediction (e.g. the F1-max one).
        title: figure title.
        ncols: cells per row.

    Returns:
        The written path.
    """
    if not items:
        raise DataError("overview_grid needs at least one item")
    ncols = max(1, min(ncols, len(items)))
    nrows = -(-len(items) // ncols)
    norm = Normalize(vmin=vmin, vmax=vmax)
    fig = _new_figure(2.5 * ncols + 0.9, 2.8 * nrows + 0.8, layout="constrained")
    axes = np.atleast_1d(fig.subplots(nrows, ncols, squeeze=False)).ravel()
    for ax, shot in zip(axes, items):
        amap = np.asarray(shot.amap, dtype=np.float32)
        _draw_overlay(ax, _rgb_at(shot.image, amap.shape), amap, norm)
        _draw_contour(ax, _mask_at(shot.mask, amap.shape), linewidth=1.0)
        verdict, colour = _verdict(shot, threshold)
        ax.set_title(f"{shot.name}\n{shot.score:.3f} | {verdict}", fontsize=8.5, color=colour)
    for ax in axes:
        ax.set_axis_off()
    fig.colorbar(ScalarMappable(norm=norm, cmap=colormaps[CMAP]), ax=axes.tolist(), shrink=0.9, aspect=30,
                 label="pixel anomaly score")
    subtitle = f"threshold {threshold:.3f}; " if threshold is not None else ""
    fig.suptitle(f"{title}\n{subtitle}green = correct, red = wrong, lime = ground truth".strip())
    return _save(fig, path)


def write_report_pictures(images: Sequence[np.ndarray], masks: Optional[Sequence[Optional[np.ndarray]]],
                          maps: np.ndarray, scores: np.ndarray, labels: np.ndarray, names: Sequence[str],
                          out_dir: Union[str, Path], threshold: Optional[float], k: int = 5,
                          vmin: Optional[float] = None, vmax: Optional[float] = None,
                          title: str = "", threshold_name: str = "threshold") -> dict[str, list[Path]]:
    """Write the pictures of one evaluation run into ``out_dir``.

    Files (score with three decimals, then the sample's name):

    - ``most-01_0.873_test-broken_large-003.png``: the ``k`` highest scores;
    - ``least-01_0.012_test-good-007.png``: the ``k`` lowest scores;
    - ``fp_0.873_test-good-003.png`` / ``fn_0.012_test-broken_small-001.png``:
      every false positive and false negative at ``threshold`` (prediction
      ``score >= threshold``; images with label -1 are neither);
    - ``overview.png``: the ``k`` most then the ``k`` least anomalous in one grid.

    Args:
        images: n images, (h, w, 3) uint8 each (e.g. the cache's previews).
        masks: n masks (H, W) or None entries, or None for no ground truth.
        maps: (n, H, W) anomaly maps.
        scores: (n,) image scores.
        labels: (n,) 0 / 1 / -1.
        names: n readable ids (see :func:`sample_name`), used in file names.
        out_dir: folder to write (created).
        threshold: image threshold (e.g. the F1-max one); None skips fp/fn.
        threshold_name: how the fp/fn captions name it (e.g. where it came from).
        k: how many most and least anomalous images.
        vmin, vmax: colour scale; default: the minimum and maximum of ``maps``.
        title: prefix of the figure titles (e.g. the category and method).

    Returns:
        ``{"most": [...], "least": [...], "fp": [...], "fn": [...], "overview": [path]}``.
    """
    scores = np.asarray(scores, dtype=np.float64)
    labels = np.asarray(labels)
    n = scores.shape[0]
    if not (len(images) == len(names) == labels.shape[0] == len(maps) == n) or (masks is not None and len(masks) != n):
        raise DataError(f"images ({len(images)}), masks ({'-' if masks is None else len(masks)}), maps ({len(maps)}), "
                         f"scores ({n}), labels ({labels.shape[0]}) and names ({len(names)}) must pair up")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written: dict[str, list[Path]] = {"most": [], "least": [], "fp": [], "fn": [], "overview": []}
    if n == 0:
        logger.warning("no test images: no pictures written to %s", out_dir)
        return written
    if vmin is None:
        vmin = float(np.min(maps))
    if vmax is None:
        vmax = float(np.max(maps))
    if vmax <= vmin:
        vmax = vmin + 1e-6

    def shot(i: int) -> Shot:
        return Shot(name=names[i], image=images[i], mask=None if masks is None else masks[i],
                    amap=maps[i], score=float(scores[i]), label=int(labels[i]))

    def draw(kind: str, i: int, caption: str) -> None:
        s = shot(i)
        path = out_dir / f"{kind}_{s.score:.3f}_{s.name}.png"
        full_title = f"{title}  {s.name}  ({caption})".strip()
        written[kind.split("-")[0]].append(panel(s.image, s.mask, s.amap, full_title, path, vmin, vmax, s.score))

    order = np.argsort(-scores, kind="stable")
    k = max(0, min(k, n))
    for rank, i in enumerate(order[:k], start=1):
        draw(f"most-{rank:02d}", int(i), f"#{rank} most anomalous, {_verdict(shot(int(i)), threshold)[0]}")
    for rank, i in enumerate(order[::-1][:k], start=1):
        draw(f"least-{rank:02d}", int(i), f"#{rank} least anomalous, {_verdict(shot(int(i)), threshold)[0]}")
    if threshold is not None:
        predicted = scores >= threshold
        for i in np.flatnonzero(predicted & (labels == 0)):
            draw("fp", int(i), f"false positive at {threshold_name} {threshold:.4g}")
        for i in np.flatnonzero(~predicted & (labels == 1)):
            draw("fn", int(i), f"false negative at {threshold_name} {threshold:.4g}")
    # Most anomalous first, then the least anomalous ending with the lowest score;
    # an image is shown once when n < 2k.
    grid_idx = list(dict.fromkeys([int(i) for i in order[:k]] + [int(i) for i in order[::-1][:k][::-1]]))
    if grid_idx:
        grid_title = f"{title}  top {k} and bottom {k} by image score".strip()
        written["overview"].append(overview_grid([shot(i) for i in grid_idx], out_dir / "overview.png", vmin, vmax,
                                                 threshold, title=grid_title))
    logger.debug("wrote %d pictures to %s", sum(len(v) for v in written.values()), out_dir)
    return written
