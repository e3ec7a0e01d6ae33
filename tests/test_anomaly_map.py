"""Anomaly maps: grid layout, bilinear upsampling and scipy's Gaussian."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy import ndimage

from funad.anomaly_map import _gaussian_blur_torch, gaussian_blur, gaussian_kernel1d, patch_scores_to_maps
from funad.errors import DataError


def test_kernel_matches_scipy_radius_and_weights():
    k = gaussian_kernel1d(4.0)
    assert k.numel() == 2 * 16 + 1  # radius int(4 * 4 + 0.5)
    impulse = np.zeros(41)
    impulse[20] = 1.0
    np.testing.assert_allclose(ndimage.gaussian_filter1d(impulse, 4.0)[4:37], k.numpy(), atol=1e-15)


@pytest.mark.parametrize("shape, sigma", [((3, 40, 50), 4.0), ((2, 7, 5), 4.0), ((1, 30, 30), 1.5)])
def test_torch_blur_matches_scipy_including_borders(shape, sigma):
    # (2, 7, 5) with radius 16 needs several mirror reflections at the borders.
    x = np.random.default_rng(0).random(shape).astype(np.float32)
    ref = np.stack([ndimage.gaussian_filter(a.astype(np.float64), sigma) for a in x])
    np.testing.assert_allclose(_gaussian_blur_torch(torch.from_numpy(x), sigma).numpy(), ref, atol=1e-6)
    np.testing.assert_allclose(gaussian_blur(torch.from_numpy(x), sigma).numpy(), ref, atol=1e-6)


def test_patch_scores_to_maps_geometry():
    # A non-square grid and output: one hot patch at row 1, column 3 of a 3x5 grid.
    scores = np.zeros((2, 15), dtype=np.float32)
    scores[0, 1 * 5 + 3] = 1.0
    scores[1] = 0.25
    maps = patch_scores_to_maps(scores, grid=(3, 5), out_size=(30, 50), sigma=0.0)
    assert maps.shape == (2, 30, 50) and maps.dtype == np.float32
    # Row-major: the peak sits in the block of rows 10-19 and columns 30-39.
    r, c = np.unravel_index(np.argmax(maps[0]), maps[0].shape)
    assert 10 <= r < 20 and 30 <= c < 40
    np.testing.assert_allclose(maps[1], 0.25, rtol=1e-6)  # a constant stays constant
    np.testing.assert_allclose(patch_scores_to_maps(scores, (3, 5), (30, 50))[1], 0.25, rtol=1e-6)


def test_patch_scores_to_maps_is_bilinear_then_gaussian():
    rng = np.random.default_rng(1)
    scores = rng.random((3, 4 * 6)).astype(np.float32)
    up = F.interpolate(torch.from_numpy(scores).view(3, 1, 4, 6), size=(24, 36), mode="bilinear",
                       align_corners=False)[:, 0].numpy()
    ref = np.stack([ndimage.gaussian_filter(u, 4.0) for u in up])
    np.testing.assert_allclose(patch_scores_to_maps(scores, (4, 6), (24, 36)), ref, atol=1e-6)
    # Torch input gives the same maps.
    np.testing.assert_allclose(patch_scores_to_maps(torch.from_numpy(scores), (4, 6), (24, 36)), ref, atol=1e-6)


def test_wrong_grid_names_shapes():
    with pytest.raises(DataError, match=r"\(2, 10\).*3x4.*12"):
        patch_scores_to_maps(np.zeros((2, 10)), (3, 4), (8, 8))
    with pytest.raises(DataError, match="sigma"):
        gaussian_blur(torch.zeros(1, 4, 4), -1.0)
