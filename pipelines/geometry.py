"""Where the backbone looks: the image geometry of a store, and the way back to the original pixels.

Two geometries, recorded in the store's attributes (``geometry`` and the keys of
:meth:`Geometry.attrs`) and checked when an extraction resumes:

``paper``
    The paper's protocol: a square resize to R = round(S * 256 / 224) that squashes
    the aspect ratio, then a centre crop to S. The border outside the crop (about 23%
    of a square image) is never scored. The frame is S x S, one backbone input.

``full``
    The whole image in its own shape. The store has one fixed frame (H, W), set at
    extraction from the dataset's most common image size: that size scaled so its short
    side is S, each side rounded up to a multiple of the patch size. Every image is
    scaled to fit the frame with its aspect ratio kept (nothing cropped), placed at the
    top left, and the rest of the frame is filled by repeating the edge pixels; masks
    are padded with 0. The valid region of an image follows from its original size
    (:meth:`Geometry.placement`), so nothing per image needs storing. The patch grid is
    (H / p, W / p); a frame larger than S x S is covered by overlapping S x S tiles
    (:mod:`funad.pipelines.tiles`), so the backbone always sees its own input size.

Anomaly maps are built at the frame's size (the stored masks' size) and go back to
the original image's pixels with :meth:`Geometry.to_original`: pixels the geometry
never showed the backbone (the paper crop's border, never anything in ``full``) are
NaN there.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np
from PIL import Image

from .backbone import ImageTransform, MaskTransform
from .errors import DatasetError, PipelineError
from .preprocess import resize_for

GEOMETRIES = ("paper", "full")
# What `funad extract` uses for a new store: every pixel scored. BENCHMARKS.md compares the two on bottle and
# KolektorSDD (geometry.md, geometry-bottle.md).
DEFAULT_GEOMETRY = "full"
# Images whose header is read to choose a full frame (evenly spaced over the dataset).
FRAME_SAMPLE = 256


@dataclass(frozen=True)
class Placement:
    """How one original image of size (h, w) sits in the frame.

    Frame pixel coordinates of original pixel centres: ``y_f = (y + 0.5) * scale_y - 0.5 - top``
    (and the same for x). The original image is scored where ``0 <= y_f + 0.5 <= valid_h``
    (and x): the crop (paper) or the scaled image without its padding (full).
    """

    scale_y: float
    scale_x: float
    top: float
    left: float
    valid_h: int
    valid_w: int


@dataclass(frozen=True)
class Geometry:
    """One store's geometry. ``image_size`` S is the backbone's input side (paper: the crop;
    full: the frame's short side and the tile side), ``frame`` the (H, W) every image is
    brought to, ``tile_overlap`` the least overlap of neighbouring tiles in pixels (full)."""

    mode: str
    image_size: int
    patch_size: int
    frame: tuple[int, int]
    tile_overlap: int = 0

    def __post_init__(self) -> None:
        if self.mode not in GEOMETRIES:
            raise PipelineError(f"geometry {self.mode!r} is not one of {', '.join(GEOMETRIES)}")
        h, w = self.frame
        p = self.patch_size
        if h % p or w % p or min(h, w) < self.image_size:
            raise PipelineError(f"frame {h}x{w} must be multiples of the patch size {p} and at least the input "
                                f"size {self.image_size} on each side")

    # ------------------------------------------------------------------ construction

    @classmethod
    def paper(cls, image_size: int, patch_size: int) -> "Geometry":
        return cls("paper", image_size, patch_size, (image_size, image_size))

    @classmethod
    def full(cls, image_size: int, patch_size: int, typical_hw: tuple[int, int]) -> "Geometry":
        """The full frame for images of ``typical_hw`` (h, w): short side S, sides rounded up to patches."""
        h, w = typical_hw
        s = image_size / min(h, w)
        frame = tuple(int(math.ceil(round(v * s) / patch_size)) * patch_size for v in (h, w))
        return cls("full", image_size, patch_size, frame, default_overlap(image_size, patch_size))

    @classmethod
    def from_attrs(cls, attrs: dict) -> "Geometry":
        """The geometry a store (or a model's record of it) was extracted with; stores written before
        geometries existed are ``paper``."""
        size, patch = int(attrs["image_size"]), int(attrs.get("patch_size") or 0)
        mode = attrs.get("geometry", "paper")
        if not patch:  # old or imported stores: the grid tells the patch size
            patch = size // int(attrs["grid"][0])
        if mode == "paper":
            return cls.paper(size, patch)
        return cls(mode, size, patch, tuple(int(v) for v in attrs["frame"]), int(attrs.get("tile_overlap", 0)))

    # ------------------------------------------------------------------ what the store records

    @property
    def grid(self) -> tuple[int, int]:
        return self.frame[0] // self.patch_size, self.frame[1] // self.patch_size

    @property
    def n_patches(self) -> int:
        return self.grid[0] * self.grid[1]

    @property
    def resize(self) -> Optional[int]:
        return resize_for(self.image_size) if self.mode == "paper" else None

    @property
    def preview_size(self) -> tuple[int, int]:
        """(h, w) of the stored previews: the frame scaled so its short side is min(S, 224)."""
        side = min(self.image_size, 224)
        h, w = self.frame
        return (side, side) if h == w else tuple(max(1, round(v * side / min(h, w))) for v in (h, w))

    def attrs(self) -> dict:
        """Store attributes that define this geometry (checked when an extraction resumes)."""
        out = {"geometry": self.mode, "grid": list(self.grid), "n_patches": self.n_patches}
        if self.mode == "paper":
            return {**out, "resize": self.resize, "crop": self.image_size}
        return {**out, "resize": None, "crop": None, "frame": list(self.frame), "tile_overlap": self.tile_overlap,
                "placement": "top-left, aspect kept, edge padding"}

    # ------------------------------------------------------------------ images in

    def placement(self, original_hw: tuple[int, int]) -> Placement:
        """Where an original image of (h, w) pixels lies in the frame."""
        h, w = (int(v) for v in original_hw)
        if self.mode == "paper":
            r, s = self.resize, self.image_size
            off = ImageTransform(s, (0, 0, 0), (1, 1, 1)).crop_box()[0]  # the crop extraction uses
            return Placement(r / h, r / w, off, off, s, s)
        fh, fw = self.frame
        scale = min(fh / h, fw / w)
        vh, vw = min(fh, max(1, round(h * scale))), min(fw, max(1, round(w * scale)))
        return Placement(vh / h, vw / w, 0, 0, vh, vw)

    def check_size(self, original_hw: tuple[int, int], name: str) -> None:
        """Raise DatasetError naming ``name`` when the image would cover less than one patch of the frame."""
        if self.mode == "paper":
            return
        pl = self.placement(original_hw)
        if min(pl.valid_h, pl.valid_w) < self.patch_size:
            raise DatasetError(
                f"image {name} is {original_hw[1]}x{original_hw[0]} (w x h): scaled into the {self.frame[1]}x"
                f"{self.frame[0]} frame it covers {pl.valid_w}x{pl.valid_h} pixels, less than one {self.patch_size}-"
                f"pixel patch; remove it, or extract its kind of image into a store of its own")

    def crop(self, img: Image.Image, name: str = "image") -> np.ndarray:
        """``(H, W, 3) uint8``: the RGB image brought into the frame (the backbone's input before normalising)."""
        if self.mode == "paper":
            return ImageTransform(self.image_size, (0, 0, 0), (1, 1, 1)).crop(img)
        img = img.convert("RGB")
        hw = (img.size[1], img.size[0])
        self.check_size(hw, name)
        pl = self.placement(hw)
        scaled = np.asarray(img.resize((pl.valid_w, pl.valid_h), Image.BILINEAR))
        return np.pad(scaled, ((0, self.frame[0] - pl.valid_h), (0, self.frame[1] - pl.valid_w), (0, 0)), mode="edge")

    def crop_mask(self, mask: Image.Image, threshold: int = 0) -> np.ndarray:
        """``(H, W) uint8`` in {0, 1}: the mask brought into the frame (nearest resampling, 0 padding)."""
        if self.mode == "paper":
            return MaskTransform(self.image_size, threshold)(mask)
        mask = mask.convert("L")
        pl = self.placement((mask.size[1], mask.size[0]))
        m = (np.asarray(mask.resize((pl.valid_w, pl.valid_h), Image.NEAREST)) > threshold).astype(np.uint8)
        return np.pad(m, ((0, self.frame[0] - pl.valid_h), (0, self.frame[1] - pl.valid_w)))

    def preview(self, framed: np.ndarray) -> np.ndarray:
        """``(H, W, 3)`` framed image -> ``(h, w, 3) uint8`` preview (bilinear)."""
        h, w = self.preview_size
        if framed.shape[:2] == (h, w):
            return framed
        return np.asarray(Image.fromarray(framed).resize((w, h), Image.BILINEAR))

    # ------------------------------------------------------------------ maps out

    def to_original(self, amap: np.ndarray, original_hw: tuple[int, int]) -> np.ndarray:
        """A frame-sized map ``(H, W)`` -> ``(h, w) float32`` on the original image's pixels.

        Bilinear, pixel centres aligned (as PIL and ``align_corners=False``); NaN where the
        geometry never showed the pixel to the backbone (the paper crop's border).
        """
        amap = np.asarray(amap, dtype=np.float32)
        if amap.shape != tuple(self.frame):
            raise PipelineError(f"anomaly map of shape {amap.shape} is not the frame {tuple(self.frame)}; build maps "
                                f"at the store's mask size")
        pl = self.placement(original_hw)
        ys, y_ok = _axis(original_hw[0], pl.scale_y, pl.top, pl.valid_h)
        xs, x_ok = _axis(original_hw[1], pl.scale_x, pl.left, pl.valid_w)
        y0, x0 = np.floor(ys).astype(np.int64), np.floor(xs).astype(np.int64)
        fy, fx = (ys - y0)[:, None], (xs - x0)[None, :]
        y1, x1 = np.minimum(y0 + 1, pl.valid_h - 1), np.minimum(x0 + 1, pl.valid_w - 1)
        top = amap[y0][:, x0] * (1 - fx) + amap[y0][:, x1] * fx
        bottom = amap[y1][:, x0] * (1 - fx) + amap[y1][:, x1] * fx
        out = (top * (1 - fy) + bottom * fy).astype(np.float32)
        out[~y_ok, :] = np.nan
        out[:, ~x_ok] = np.nan
        return out


def _axis(n: int, scale: float, offset: float, valid: int) -> tuple[np.ndarray, np.ndarray]:
    """Frame coordinates of ``n`` original pixel centres along one axis, clamped into the valid region,
    and whether each one lies inside it."""
    f = (np.arange(n, dtype=np.float64) + 0.5) * scale - 0.5 - offset
    inside = (f >= -0.5) & (f <= valid - 0.5)
    return np.clip(f, 0.0, valid - 1.0), inside


def default_overlap(image_size: int, patch_size: int) -> int:
    """The least overlap of neighbouring tiles: S / 8 rounded up to whole patches (at least one)."""
    return max(1, math.ceil(image_size / 8 / patch_size)) * patch_size


def typical_size(paths: Sequence, name_of=str) -> tuple[int, int]:
    """The most common (h, w) among up to :data:`FRAME_SAMPLE` image headers spread evenly over ``paths``.

    An unreadable header is passed over: the extraction meets that image again and stops on it, naming it (or
    skips it with ``--skip-bad``). Only when no header can be read is the first failure raised here.
    """
    if not paths:
        raise DatasetError("no images to choose a full frame from")
    step = max(1, len(paths) // FRAME_SAMPLE)
    sizes: Counter = Counter()
    first_failure = None
    for p in list(paths)[::step][:FRAME_SAMPLE]:
        try:
            with Image.open(p) as im:
                sizes[(im.size[1], im.size[0])] += 1
        except (OSError, ValueError) as exc:
            first_failure = first_failure or DatasetError(
                f"cannot read image {name_of(p)} ({type(exc).__name__}: {exc}), nor any other sampled to choose "
                "the full frame; fix or remove them")
    if not sizes:
        raise first_failure
    return sizes.most_common(1)[0][0]


def original_size(path) -> tuple[int, int]:
    """(h, w) of an image file, from its header."""
    with Image.open(path) as im:
        return im.size[1], im.size[0]


def known_geometry(mode: str) -> dict:
    """The geometry attributes known before the backbone loads (what ``extract`` checks first)."""
    if mode not in GEOMETRIES:
        raise PipelineError(f"--geometry {mode!r} is not one of {', '.join(GEOMETRIES)}")
    return {"geometry": mode} if mode == "paper" else {"geometry": mode, "resize": None, "crop": None}


def store_geometry(mode: str, bb, image_paths: Sequence, recorded: Optional[dict] = None) -> Geometry:
    """The geometry of a store extracted with ``bb``: ``recorded`` (an existing store's attributes) when it has
    this mode, so a resumed or grown store keeps its frame; else a new one (a full frame from the images)."""
    if mode not in GEOMETRIES:
        raise PipelineError(f"--geometry {mode!r} is not one of {', '.join(GEOMETRIES)}")
    if recorded is not None and recorded.get("geometry", "paper") == mode and "image_size" in recorded:
        return Geometry.from_attrs({"patch_size": bb.patch_size, **recorded})
    if mode == "paper":
        return Geometry.paper(bb.image_size, bb.patch_size)
    return Geometry.full(bb.image_size, bb.patch_size, typical_size(image_paths))


def as_stored(requested: dict, stored: dict) -> dict:
    """``requested`` store attributes as a store written before geometries existed would hold them: such a
    store is ``paper`` but records no geometry keys, so they are left out of the comparison."""
    if "geometry" in stored or requested.get("geometry", "paper") != "paper":
        return requested
    return {k: v for k, v in requested.items() if k not in ("geometry", "frame", "tile_overlap")}
