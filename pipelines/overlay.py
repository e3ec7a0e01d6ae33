"""``funad predict``'s per-image picture: numpy and PIL only, on one fixed colour scale tied to the threshold.

The picture has two panels, the image and the image with its anomaly map
overlaid, a colour bar and a one-line header (path, score, decision). The
map is drawn on the model's *normalised* pixel scale
(:func:`funad.pipelines.thresholds.normalised`): 0.5 is the model's pixel
threshold, 0 and 1 the ends of the training maps' range (clipped), so a
colour means the same score in every picture of every run of the model. The
colour bar's middle tick marks the threshold, and a white line outlines the
map's regions above it.

Colours come from a 256-entry lookup table (matplotlib's ``jet``, sampled
once), so a picture costs an array lookup, a blend and a PNG encode
(``compress_level`` 1: fast, larger files); no matplotlib figure is made.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

CMAP = "jet"
ALPHA = 0.45  # map opacity over the image
BAR_WIDTH = 14
HEADER = 18
PNG_COMPRESS_LEVEL = 1
_GAP = 4


@lru_cache(maxsize=1)
def lut() -> np.ndarray:
    """(256, 3) uint8: the colour of normalised score v at index round(255 * v)."""
    from matplotlib import colormaps

    return (colormaps[CMAP](np.linspace(0.0, 1.0, 256))[:, :3] * 255 + 0.5).astype(np.uint8)


def colourise(norm: np.ndarray) -> np.ndarray:
    """(H, W) normalised scores in [0, 1] -> (H, W, 3) uint8 colours."""
    idx = np.clip(np.rint(np.nan_to_num(np.asarray(norm, dtype=np.float32)) * 255.0), 0, 255).astype(np.uint8)
    return lut()[idx]


def threshold_edge(norm: np.ndarray) -> np.ndarray:
    """(H, W) bool: pixels at or above 0.5 with a 4-neighbour below it (the outline of the flagged regions)."""
    above = np.asarray(norm) >= 0.5
    edge = np.zeros_like(above)
    edge[1:, :] |= above[1:, :] & ~above[:-1, :]
    edge[:-1, :] |= above[:-1, :] & ~above[1:, :]
    edge[:, 1:] |= above[:, 1:] & ~above[:, :-1]
    edge[:, :-1] |= above[:, :-1] & ~above[:, 1:]
    return edge


def overlay(rgb: np.ndarray, norm: np.ndarray, alpha: float = ALPHA) -> np.ndarray:
    """The image with the coloured map blended over it and the threshold outline in white, (H, W, 3) uint8."""
    out = (rgb.astype(np.float32) * (1.0 - alpha) + colourise(norm).astype(np.float32) * alpha).astype(np.uint8)
    out[threshold_edge(norm)] = 255
    unscored = np.isnan(norm)  # pixels the store's geometry never showed the backbone: the plain image
    out[unscored] = rgb[unscored]
    return out


def colour_bar(height: int) -> np.ndarray:
    """(height, BAR_WIDTH, 3) uint8: 1 at the top, 0 at the bottom, a black tick at 0.5 (the threshold)."""
    values = np.linspace(1.0, 0.0, height, dtype=np.float32)[:, None].repeat(BAR_WIDTH, axis=1)
    bar = colourise(values)
    mid = height // 2
    bar[max(0, mid - 1):mid + 1, :] = 0
    return bar


def _rgb(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    image = np.asarray(image)
    if image.ndim == 2:
        image = np.repeat(image[:, :, None], 3, axis=2)
    image = image[:, :, :3].astype(np.uint8, copy=False)
    if image.shape[:2] != tuple(size):
        image = np.asarray(Image.fromarray(image).resize((size[1], size[0]), Image.BILINEAR))
    return image


def two_panel(image: np.ndarray, norm: np.ndarray, header: str, anomalous: bool | None = None) -> Image.Image:
    """image | overlay | colour bar, under a header line; red header when anomalous, green when normal."""
    norm = np.asarray(norm, dtype=np.float32)
    h, w = norm.shape
    rgb = _rgb(image, (h, w))
    width = 2 * w + 3 * _GAP + BAR_WIDTH + 34
    canvas = np.full((h + HEADER + _GAP, width, 3), 255, dtype=np.uint8)
    top = HEADER
    canvas[top:top + h, 0:w] = rgb
    canvas[top:top + h, w + _GAP:2 * w + _GAP] = overlay(rgb, norm)
    x_bar = 2 * w + 2 * _GAP
    canvas[top:top + h, x_bar:x_bar + BAR_WIDTH] = colour_bar(h)
    picture = Image.fromarray(canvas)
    draw = ImageDraw.Draw(picture)
    colour = (0, 0, 0) if anomalous is None else ((200, 0, 0) if anomalous else (0, 130, 0))
    draw.text((2, 3), header, fill=colour)
    for text, y in (("1", top), ("thr", top + h // 2 - 5), ("0", top + h - 10)):
        draw.text((x_bar + BAR_WIDTH + 3, y), text, fill=(0, 0, 0))
    return picture


def save_png(picture: Image.Image, path: Path) -> Path:
    """Write ``picture`` as a PNG (parent folders created)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    picture.save(path, format="PNG", compress_level=PNG_COMPRESS_LEVEL)
    return path
