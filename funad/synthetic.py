"""Synthetic anomalies for FUN-AD* (FUNAD_SPEC.md, "Synthetic anomalies"; paper Sec. 5.3).

A Perlin-noise mask with a random threshold cuts a region out of one training
image and fills it with a texture taken from *another* unlabelled training
image, augmented (colour jitter, rotation, a crop), blended with a random
opacity: the DRAEM recipe, with the texture source being the noisy training
data itself instead of a clean texture set, since no clean data may be assumed.

Everything is numpy/torch on arrays: images are uint8 (H, W, 3) as the
backbone's input frame, masks uint8 (H, W) in {0, 1}. Randomness comes from the
``numpy.random.Generator`` the caller passes, so one seed gives one image.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class SyntheticParams:
    """The recipe's ranges (the DRAEM values where DRAEM has one)."""

    octaves: int = 3  # fractal Perlin noise: octaves summed with halving amplitude
    min_scale_log2: int = 0  # base lattice cells per side: 2**U{min..max}, drawn per axis
    max_scale_log2: int = 3
    threshold: tuple[float, float] = (0.5, 1.6)  # mask = noise > t (noise in standard units), t ~ U(range)
    min_area: float = 0.01  # a mask must cover at least this share of the image ...
    max_area: float = 0.30  # ... and at most this share; otherwise it is drawn again
    max_tries: int = 50  # after this many draws the threshold is set to give min..max area directly
    beta: tuple[float, float] = (0.0, 0.8)  # opacity of the original under the texture: out = b*img + (1-b)*tex
    brightness: float = 0.3  # colour jitter: factors in 1 +- this
    contrast: float = 0.3
    saturation: float = 0.5
    tint: float = 0.15  # per-channel gain 1 +- this (a mild hue shift)
    crop_scale: tuple[float, float] = (0.25, 0.75)  # side of the texture crop, as a share of the image side


def _fade(t: np.ndarray) -> np.ndarray:
    return t * t * t * (t * (t * 6 - 15) + 10)


def perlin(y: np.ndarray, x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Gradient (Perlin) noise at lattice coordinates ``y, x`` (any shape, any real values), roughly in [-1, 1]."""
    y0, x0 = np.floor(y).astype(np.int64), np.floor(x).astype(np.int64)
    oy, ox = y0.min(), x0.min()
    h, w = int(y0.max() - oy) + 2, int(x0.max() - ox) + 2
    angles = rng.uniform(0, 2 * np.pi, size=(h, w))
    grad_y, grad_x = np.cos(angles).ravel(), np.sin(angles).ravel()  # unit gradients, flattened
    at = (y0 - oy) * w + (x0 - ox)  # flat index of each sample's top-left lattice corner
    fy, fx = y - y0, x - x0

    def corner(dy: int, dx: int) -> np.ndarray:
        k = at + (dy * w + dx)  # one flat gather per component: ~3x faster than 2-D fancy indexing
        return grad_y.take(k) * (fy - dy) + grad_x.take(k) * (fx - dx)

    uy, ux = _fade(fy), _fade(fx)
    top = corner(0, 0) * (1 - ux) + corner(0, 1) * ux
    bottom = corner(1, 0) * (1 - ux) + corner(1, 1) * ux
    return (top * (1 - uy) + bottom * uy) * math.sqrt(2)


def perlin_noise(size, rng: np.random.Generator, params: SyntheticParams = SyntheticParams()) -> np.ndarray:
    """Fractal Perlin noise of shape ``size`` (an int S or (H, W)), rotated by a random angle, standardised."""
    h, w = (size, size) if np.isscalar(size) else size
    scale_y, scale_x = 2.0 ** rng.integers(params.min_scale_log2, params.max_scale_log2 + 1, size=2)
    theta = rng.uniform(-np.pi, np.pi)
    side = max(h, w)  # one lattice scale for both axes of a non-square frame
    yy, xx = np.meshgrid((np.arange(h) + 0.5 - h / 2) / side, (np.arange(w) + 0.5 - w / 2) / side, indexing="ij")
    ry = np.cos(theta) * yy - np.sin(theta) * xx  # rotate the sampling grid, so the blobs are rotated
    rx = np.sin(theta) * yy + np.cos(theta) * xx
    noise = np.zeros((h, w))
    for octave in range(params.octaves):
        f = 2.0 ** octave
        noise += perlin(ry * scale_y * f, rx * scale_x * f, rng) / f
    return (noise - noise.mean()) / max(noise.std(), 1e-12)


def perlin_mask(size, rng: np.random.Generator, params: SyntheticParams = SyntheticParams()) -> np.ndarray:
    """uint8 0/1 of shape ``size`` (S or (H, W)): thresholded Perlin noise covering ``min_area``..``max_area``."""
    noise = None
    for _ in range(params.max_tries):
        noise = perlin_noise(size, rng, params)
        mask = noise > rng.uniform(*params.threshold)
        if params.min_area <= mask.mean() <= params.max_area:
            return mask.astype(np.uint8)
    # the last noise, with the threshold that gives an area drawn inside the allowed range
    area = rng.uniform(params.min_area, params.max_area)
    return (noise > np.quantile(noise, 1.0 - area)).astype(np.uint8)


def augment_texture(texture: np.ndarray, rng: np.random.Generator, params: SyntheticParams = SyntheticParams(),
                    out_size: tuple[int, int] | None = None) -> np.ndarray:
    """float32 (H, W, 3) in [0, 1]: ``texture`` (uint8 (h, w, 3)) colour-jittered, then a rotated
    crop of it resized to ``out_size`` (H, W) (default: its own size)."""
    t = torch.from_numpy(texture.astype(np.float32) / 255.0).permute(2, 0, 1)  # (3, S, S)
    t = t * float(rng.uniform(1 - params.brightness, 1 + params.brightness))
    grey = t.mean()
    t = (t - grey) * float(rng.uniform(1 - params.contrast, 1 + params.contrast)) + grey
    lum = (0.299 * t[0] + 0.587 * t[1] + 0.114 * t[2])[None]
    t = (t - lum) * float(rng.uniform(1 - params.saturation, 1 + params.saturation)) + lum
    t = t * torch.from_numpy(rng.uniform(1 - params.tint, 1 + params.tint, size=3).astype(np.float32))[:, None, None]
    t = t.clamp(0, 1)

    # rotation and crop in one affine map of the output grid onto the texture ([-1, 1] coordinates)
    s = float(rng.uniform(*params.crop_scale))
    a = float(rng.uniform(-np.pi, np.pi))
    reach = s * (abs(math.cos(a)) + abs(math.sin(a)))  # half-extent of the rotated crop
    shift = max(0.0, 1.0 - reach)
    ty, tx = rng.uniform(-shift, shift, size=2)
    theta = torch.tensor([[s * math.cos(a), -s * math.sin(a), tx],
                          [s * math.sin(a), s * math.cos(a), ty]], dtype=torch.float32)[None]
    grid = F.affine_grid(theta, (1, 3, *(out_size or t.shape[1:])), align_corners=False)
    out = F.grid_sample(t[None], grid, mode="bilinear", padding_mode="reflection", align_corners=False)[0]
    return out.permute(1, 2, 0).numpy()


def make_synthetic(base: np.ndarray, texture: np.ndarray, rng: np.random.Generator,
                   params: SyntheticParams = SyntheticParams()) -> tuple[np.ndarray, np.ndarray]:
    """One synthetic anomaly: ``base`` with a Perlin region filled by the augmented ``texture``.

    Args:
        base: uint8 (H, W, 3), a training image as the backbone sees it.
        texture: uint8 (h, w, 3), another training image (any size; it is cropped and resized to (H, W)).
        rng: the randomness of this image.

    Returns:
        ``(image uint8 (H, W, 3), mask uint8 (H, W) in {0, 1})``.
    """
    if base.ndim != 3 or base.shape[2] != 3 or texture.ndim != 3 or texture.shape[2] != 3:
        raise ValueError(f"base and texture must be (H, W, 3) uint8 images, got {base.shape} and {texture.shape}")
    size = base.shape[:2]
    mask = perlin_mask(size, rng, params)
    tex = augment_texture(texture, rng, params, out_size=size)
    beta = float(rng.uniform(*params.beta))
    img = base.astype(np.float32) / 255.0
    m = mask[..., None].astype(np.float32)
    out = img * (1 - m) + m * (beta * img + (1 - beta) * tex)
    return np.clip(np.rint(out * 255.0), 0, 255).astype(np.uint8), mask
