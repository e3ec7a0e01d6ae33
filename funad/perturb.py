"""Gaussian perturbation of ambiguous patches (spec, step 5)."""

from __future__ import annotations

import torch


def feature_sigma(f: torch.Tensor) -> torch.Tensor:
    """σ_d = max over patch positions j of the std across images of f[:, j, d].

    Args:
        f: (n_images, n_patches, dim) batch features, n_images >= 2.

    Returns:
        (dim,) float32. The std is the unbiased one (torch.std's default).
    """
    return f.float().std(dim=0).amax(dim=0)


def draw_noise(f: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Standard normal noise shaped like ``f``, drawn for every patch.

    A fixed amount per step (no host sync to count the masked patches); the
    training loop draws it so that a test can inject its own.
    """
    return torch.randn(f.shape, generator=generator, device=f.device, dtype=f.dtype)


def perturb(f: torch.Tensor, mask: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """f̃ = f + σ·z on masked patches, z = ``noise`` ~ N(0, I); other patches unchanged.

    Args:
        f: (n_images, n_patches, dim) batch features.
        mask: (n_images, n_patches) bool, the ambiguous patches.
        noise: standard normal noise shaped like ``f`` (:func:`draw_noise`).

    Returns:
        A new tensor shaped like ``f``; ``f`` is not modified.
    """
    sigma = feature_sigma(f).to(f.dtype)
    return torch.addcmul(f, noise * sigma, mask.unsqueeze(-1).to(f.dtype))
