"""Overlapping tiles over a frame larger than the backbone's input, stitched into one patch grid.

A ``full`` geometry (:mod:`funad.pipelines.geometry`) can have a frame larger than the
backbone's S x S input (a KolektorSDD strip is 392 x 994 at S = 392). The frame is covered
by S x S tiles whose corners lie on the patch lattice, so a patch of one tile is exactly a
patch of its neighbour where they overlap. Along each axis the tiles are spread evenly
from the first to the last possible position, as few as keep every overlap at least the
geometry's ``tile_overlap`` (give or take one patch of rounding), and the last tile ends at
the frame's edge: no border row or column is ever dropped.

The store keeps one row per image, not per tile. Each patch's token is the mean of its
tokens in the tiles that cover it, and the image's class token is the mean of its tiles'
class tokens, so FUN-AD's feature stays [class token ; patch token] with one class token
per image, and its memory bank, pseudo-labels, contamination split and metrics keep working
per image. (With a row per tile, a defect in an overlap would be its own nearest neighbour
in the neighbouring tile of the same image during training, and every consumer of the store
would have to map tiles back to images.)
"""

from __future__ import annotations

import math

import torch

from .geometry import Geometry


def tile_starts(length: int, tile: int, patch: int, min_overlap: int) -> list[int]:
    """Start offsets (multiples of ``patch``) of tiles of side ``tile`` covering ``[0, length)``.

    ``length`` and ``tile`` are multiples of ``patch`` and ``length >= tile``.
    """
    if length % patch or tile % patch or length < tile:
        raise ValueError(f"cannot tile {length} pixels with tiles of {tile} on a {patch}-pixel lattice")
    if length == tile:
        return [0]
    step = max(patch, tile - min_overlap)
    n = 1 + math.ceil((length - tile) / step)
    span = (length - tile) // patch  # in patches
    return [round(k * span / (n - 1)) * patch for k in range(n)]


def tile_boxes(geometry: Geometry) -> list[tuple[int, int]]:
    """(top, left) in frame pixels of every tile of ``geometry``, row by row."""
    h, w = geometry.frame
    s, p, o = geometry.image_size, geometry.patch_size, geometry.tile_overlap
    return [(t, l) for t in tile_starts(h, s, p, o) for l in tile_starts(w, s, p, o)]


def embed(bb, images: torch.Tensor, geometry: Geometry) -> tuple[torch.Tensor, torch.Tensor]:
    """Framed uint8 images ``(n, 3, H, W)`` -> ``(class tokens (n, C), patch tokens (n, P, C))``, float32.

    One backbone call per batch: every tile of every image. P = the geometry's grid, row-major;
    a frame of S x S is one tile, exactly the plain backbone call.
    """
    x = bb.normalize(images)
    boxes = tile_boxes(geometry)
    s, p = geometry.image_size, geometry.patch_size
    if len(boxes) == 1:
        return bb(x)
    n = x.shape[0]
    tiles = torch.stack([x[:, :, t:t + s, l:l + s] for t, l in boxes], dim=1).flatten(0, 1)  # (n*T, 3, S, S)
    cls, patches = bb(tiles)
    cls = cls.view(n, len(boxes), -1)
    gh, gw = geometry.grid
    g = s // p
    c = patches.shape[-1]
    patches = patches.view(n, len(boxes), g, g, c)
    total = patches.new_zeros(n, gh, gw, c)
    count = patches.new_zeros(1, gh, gw, 1)
    for k, (t, l) in enumerate(boxes):
        total[:, t // p:t // p + g, l // p:l // p + g] += patches[:, k]
        count[:, t // p:t // p + g, l // p:l // p + g] += 1
    return cls.mean(dim=1), (total / count).view(n, gh * gw, c)
