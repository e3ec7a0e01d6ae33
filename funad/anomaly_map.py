"""Pixel anomaly maps from patch scores (FUNAD_SPEC.md, "Inference").

Patch scores are laid out row-major on the backbone's patch grid, upsampled
bilinearly to the input size, then smoothed with a Gaussian of sigma = 4
pixels. The grid and the output size come from the cache's metadata
(``store.grid`` and ``store.mask_size``), never from constants.

The Gaussian is a separable convolution in torch that reproduces
``scipy.ndimage.gaussian_filter(x, sigma)`` with its defaults (``truncate=4``,
``mode="reflect"``, i.e. the edge pixel is repeated in the mirror). On the
CPU it calls scipy itself (faster there than torch's convolutions); on an
accelerator it is a separable convolution in torch, so the maps are built
where the scores live. Tests hold the torch path to scipy's output.
"""

from __future__ import annotations

from typing import Optional, Union

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage

from .errors import DataError

# Images processed at once, to bound memory (a chunk of 64 at 392x392 float32 is 39 MB).
_CHUNK = 64


def gaussian_kernel1d(sigma: float, truncate: float = 4.0) -> torch.Tensor:
    """scipy's 1-D Gaussian weights: radius ``int(truncate * sigma + 0.5)``, summing to 1.

    Returns:
        float64 (2 * radius + 1,).
    """
    radius = int(truncate * float(sigma) + 0.5)
    x = torch.arange(-radius, radius + 1, dtype=torch.float64)
    w = torch.exp(-0.5 * (x / sigma) ** 2)
    return w / w.sum()


def _symmetric_index(length: int, radius: int, device: torch.device) -> torch.Tensor:
    """Indices padding ``length`` samples by ``radius`` on each side, scipy "reflect" style.

    (d c b a | a b c d | d c b a), repeated as often as needed when radius > length.
    """
    i = torch.arange(-radius, length + radius, device=device) % (2 * length)
    return torch.where(i < length, i, 2 * length - 1 - i)


def gaussian_blur(maps: torch.Tensor, sigma: float, truncate: float = 4.0) -> torch.Tensor:
    """Gaussian smoothing of every image, equal to ``scipy.ndimage.gaussian_filter`` per image.

    CPU tensors go through scipy; others through a separable torch convolution
    (see :func:`_gaussian_blur_torch`, which tests compare with scipy).

    Args:
        maps: (n, H, W) float tensor.
        sigma: standard deviation in pixels; 0 returns the input unchanged.

    Returns:
        (n, H, W) float32 on ``maps``' device.
    """
    if sigma < 0:
        raise DataError(f"sigma must be >= 0, got {sigma}")
    maps = maps.float()
    if sigma == 0:
        return maps
    if maps.device.type == "cpu":
        # scipy's C filter is ~4x faster than torch's convolutions on the CPU.
        out = np.stack([ndimage.gaussian_filter(m, sigma, truncate=truncate) for m in maps.numpy()])
        return torch.from_numpy(out.reshape(maps.shape))
    return _gaussian_blur_torch(maps, sigma, truncate)


def _gaussian_blur_torch(maps: torch.Tensor, sigma: float, truncate: float = 4.0) -> torch.Tensor:
    """Separable torch version of scipy's filter: (n, H, W) float32 -> (n, H, W), same device."""
    kernel = gaussian_kernel1d(sigma, truncate).to(device=maps.device, dtype=torch.float32)
    radius = (kernel.numel() - 1) // 2
    _, height, width = maps.shape
    x = maps[:, None][:, :, :, _symmetric_index(width, radius, maps.device)]
    x = F.conv2d(x, kernel.view(1, 1, 1, -1))  # along W
    x = x[:, :, _symmetric_index(height, radius, maps.device), :]
    x = F.conv2d(x, kernel.view(1, 1, -1, 1))  # along H
    return x[:, 0]


def patch_scores_to_maps(scores: Union[np.ndarray, torch.Tensor], grid: tuple[int, int],
                         out_size: tuple[int, int], sigma: float = 4.0,
                         device: Optional[Union[str, torch.device]] = None) -> np.ndarray:
    """Turn patch scores into pixel anomaly maps.

    Args:
        scores: (n_images, n_patches) with n_patches = grid_h * grid_w, patches
            in row-major order (as the backbone emits its tokens).
        grid: (grid_h, grid_w), the patch grid from the cache metadata.
        out_size: (H, W) of the maps, the input resolution of the stored masks.
        sigma: Gaussian smoothing in output pixels after upsampling (spec: 4).
        device: where to compute; default: the scores' device (CPU for numpy).

    Returns:
        float32 (n_images, H, W) numpy array.
    """
    grid_h, grid_w = (int(v) for v in grid)
    height, width = (int(v) for v in out_size)
    if min(grid_h, grid_w, height, width) < 1:
        raise DataError(f"grid {tuple(grid)} and out_size {tuple(out_size)} must be positive")
    x = scores if isinstance(scores, torch.Tensor) else torch.from_numpy(np.asarray(scores))
    if x.ndim != 2 or x.shape[1] != grid_h * grid_w:
        raise DataError(f"patch scores have shape {tuple(x.shape)} but the grid {grid_h}x{grid_w} needs "
                        f"(n_images, {grid_h * grid_w}); pass the grid from the same cache")
    if device is not None:
        x = x.to(device)
    x = x.detach().float()
    out = np.empty((x.shape[0], height, width), dtype=np.float32)
    for start in range(0, x.shape[0], _CHUNK):
        chunk = x[start:start + _CHUNK].reshape(-1, 1, grid_h, grid_w)
        up = F.interpolate(chunk, size=(height, width), mode="bilinear", align_corners=False)
        out[start:start + chunk.shape[0]] = gaussian_blur(up[:, 0], sigma).cpu().numpy()
    return out


__all__ = ["gaussian_kernel1d", "gaussian_blur", "patch_scores_to_maps"]
