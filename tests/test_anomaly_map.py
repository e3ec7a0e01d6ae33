"""Anomaly maps: grid layout, bilinear upsampling and scipy's Gaussian."""

from __future__ import annotations

import numpy as np
import pytest
import torch
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


def bilinear_by_hand(grid: np.ndarray, out_h: int, out_w: int) -> np.ndarray:
    """Half-pixel-centre bilinear upsampling written out in numpy (no torch), edges clamped.

    Output pixel i samples the input at ``(i + 0.5) * in / out - 0.5`` (clamped at 0) and mixes the two
    neighbouring rows/columns linearly; the last row/column repeats at the border.
    """
    def weights(n_in: int, n_out: int):
        src = np.maximum((np.arange(n_out) + 0.5) * n_in / n_out - 0.5, 0.0)
        lo = np.floor(src).astype(int)
        hi = np.minimum(lo + 1, n_in - 1)
        return lo, hi, src - lo

    r0, r1, wr = weights(grid.shape[0], out_h)
    c0, c1, wc = weights(grid.shape[1], out_w)
    rows = grid[r0] * (1 - wr)[:, None] + grid[r1] * wr[:, None]  # (out_h, in_w)
    return rows[:, c0] * (1 - wc)[None, :] + rows[:, c1] * wc[None, :]


def test_bilinear_by_hand_on_a_case_worked_on_paper():
    # 1x2 grid [0, 1] to width 4: sample points -0.25 (clamped to 0), 0.25, 0.75, 1.25 (clamped to the edge).
    np.testing.assert_allclose(bilinear_by_hand(np.array([[0.0, 1.0]]), 1, 4), [[0.0, 0.25, 0.75, 1.0]])


def test_patch_scores_to_maps_is_bilinear_then_gaussian():
    # Reference built without the code under test's tools: numpy bilinear by hand, then scipy's Gaussian.
    rng = np.random.default_rng(1)
    scores = rng.random((3, 4 * 6)).astype(np.float32)
    up = np.stack([bilinear_by_hand(s.reshape(4, 6).astype(np.float64), 24, 36) for s in scores])
    ref = np.stack([ndimage.gaussian_filter(u, 4.0) for u in up])
    np.testing.assert_allclose(patch_scores_to_maps(scores, (4, 6), (24, 36)), ref, atol=1e-5)
    # Torch input gives the same maps; the torch Gaussian (accelerator path) too.
    np.testing.assert_allclose(patch_scores_to_maps(torch.from_numpy(scores), (4, 6), (24, 36)), ref, atol=1e-5)
    np.testing.assert_allclose(_gaussian_blur_torch(torch.from_numpy(up.astype(np.float32)), 4.0).numpy(), ref,
                               atol=1e-5)
    # Non-integer scale factor and a non-square output.
    up = np.stack([bilinear_by_hand(s.reshape(4, 6).astype(np.float64), 30, 17) for s in scores])
    np.testing.assert_allclose(patch_scores_to_maps(scores, (4, 6), (30, 17), sigma=0.0), up, atol=1e-5)


def test_wrong_grid_names_shapes():
    with pytest.raises(DataError, match=r"\(2, 10\).*3x4.*12"):
        patch_scores_to_maps(np.zeros((2, 10)), (3, 4), (8, 8))
    with pytest.raises(DataError, match="sigma"):
        gaussian_blur(torch.zeros(1, 4, 4), -1.0)
