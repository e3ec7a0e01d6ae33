"""``funad extract --synthetic RATIO --seed S``: FUN-AD* synthetic anomalies stored beside the real images.

The plan is fixed by the dataset, the ratio and the seed: ``round(RATIO *
n_train)`` synthetic images (at least one), each made from a *base* training
image and a *texture* taken from another training image
(:func:`funad.synthetic.make_synthetic`), with the randomness of image ``j``
seeded by ``(seed, j)``. The images are never written to disk: the extraction
loader makes each one from its two sources when it is due, so an interrupted
run resumes like one over real images, and the settings check refuses a
different ratio or seed (the plan is a store attribute, ``synthetic``).

In the store they come after the real images, in the split ``synthetic``
(label 1, defect type ``synthetic``, path ``synthetic/00000.png``), with their
Perlin masks in ``masks``; the attribute ``synthetic`` names each one's base
and texture image (store index and path). They never join a test set.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from funad.synthetic import make_synthetic

from .datasets import Sample
from .errors import PipelineError
from .extract_io import ImageDataset

logger = logging.getLogger(__name__)

SPLIT = "synthetic"
RECIPE = "perlin-texture-v1"  # bump when funad.synthetic changes what one seed produces


def check_ratio(ratio: float) -> float:
    """``ratio`` as a float, or PipelineError unless it lies in (0, 1]."""
    r = float(ratio)
    if not (0.0 < r <= 1.0):
        raise PipelineError(f"--synthetic is the number of synthetic images as a share of the training images, "
                            f"in (0, 1] (the paper uses 0.05); got {ratio}")
    return r


@dataclass(frozen=True)
class SyntheticPlan:
    """Which images to make: synthetic image ``j`` is store index ``first + j``."""

    ratio: float
    seed: int
    first: int  # store index of the first synthetic image (= number of real images)
    base_ids: tuple[int, ...]  # store index of each one's base image
    texture_ids: tuple[int, ...]  # and of its texture source (never the base)
    base_paths: tuple[str, ...]
    texture_paths: tuple[str, ...]

    @property
    def n(self) -> int:
        return len(self.base_ids)

    def path(self, j: int) -> str:
        return f"{SPLIT}/{j:05d}.png"

    def samples(self) -> list[Sample]:
        return [Sample(self.path(j), SPLIT, 1, SPLIT, None) for j in range(self.n)]

    def rng(self, j: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, j])

    def attrs(self) -> dict:
        """The store attribute ``synthetic`` (JSON): the settings and each image's sources."""
        return {"recipe": RECIPE, "ratio": self.ratio, "seed": self.seed, "n": self.n, "first_index": self.first,
                "base_ids": list(self.base_ids), "texture_ids": list(self.texture_ids),
                "base_paths": list(self.base_paths), "texture_paths": list(self.texture_paths)}


def plan(samples: list[Sample], ratio: float, seed: int, *, root: Path) -> SyntheticPlan:
    """The synthetic images of dataset ``samples`` (read from ``root``) at ``ratio`` of its training images."""
    ratio = check_ratio(ratio)
    train = np.array([i for i, s in enumerate(samples) if s.split == "train"], dtype=np.int64)
    if train.size < 2:
        raise PipelineError(f"--synthetic needs at least two training images in {root} to take a base and a "
                            f"texture from, and it has {train.size}; extract without --synthetic")
    n = max(1, int(round(ratio * train.size)))
    rng = np.random.default_rng([seed, 0x5EED])
    base = rng.choice(train, size=n, replace=n > train.size)
    texture = np.array([rng.choice(train[train != b]) for b in base], dtype=np.int64)
    return SyntheticPlan(ratio=ratio, seed=int(seed), first=len(samples),
                         base_ids=tuple(int(b) for b in base), texture_ids=tuple(int(t) for t in texture),
                         base_paths=tuple(samples[b].path for b in base),
                         texture_paths=tuple(samples[t].path for t in texture))


class ImagesWithSynthetic(ImageDataset):
    """:class:`ImageDataset` whose ``synthetic`` samples are made from their two sources on the fly."""

    def __init__(self, root: Path, samples: list[Sample], indices: np.ndarray, image_size: int, preview_size: int,
                 synthetic: SyntheticPlan) -> None:
        super().__init__(root, samples, indices, image_size, preview_size)
        self.synthetic = synthetic

    def _load(self, s: Sample) -> tuple[np.ndarray, np.ndarray]:
        if s.split != SPLIT:
            return super()._load(s)
        j = int(Path(s.path).stem)  # synthetic/00007.png is synthetic image 7
        base, _ = super()._load(self.samples[self.synthetic.base_ids[j]])
        texture, _ = super()._load(self.samples[self.synthetic.texture_ids[j]])
        return make_synthetic(base, texture, self.synthetic.rng(j))


def write_preview(store, path: Path, columns: int = 8, side: int = 128) -> Path:
    """A PNG grid of the store's synthetic images, each above its mask (outline drawn on the image too)."""
    ids = store.indices(SPLIT)
    if ids.size == 0:
        raise PipelineError(f"{store.path} holds no complete synthetic images to preview")
    previews, masks = store.read_previews(ids), store.read_masks(ids)
    columns = min(columns, ids.size)
    rows = -(-ids.size // columns)
    grid = Image.new("RGB", (columns * side, rows * 2 * side), "white")
    for k in range(ids.size):
        im = Image.fromarray(previews[k]).resize((side, side), Image.BILINEAR)
        m = Image.fromarray(masks[k] * 255).resize((side, side), Image.NEAREST)
        edge = np.asarray(m, dtype=bool)
        inner = edge.copy()
        inner[1:-1, 1:-1] = edge[1:-1, 1:-1] & edge[:-2, 1:-1] & edge[2:, 1:-1] & edge[1:-1, :-2] & edge[1:-1, 2:]
        rgb = np.asarray(im).copy()
        rgb[edge & ~inner] = (255, 0, 0)
        x, y = (k % columns) * side, (k // columns) * 2 * side
        grid.paste(Image.fromarray(rgb), (x, y))
        grid.paste(m.convert("RGB"), (x, y + side))
        ImageDraw.Draw(grid).text((x + 3, y + 2), str(int(ids[k])), fill=(255, 255, 0))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    grid.save(path)
    return path


def preview_path(output: Path) -> Path:
    """Where extraction writes the preview grid: beside the store, ``NAME.synthetic.png``."""
    output = Path(output)
    return output.with_name(output.name + ".synthetic.png")
