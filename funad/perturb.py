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


def perturb(f: torch.Tensor, mask: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """f̃ = f + ε on masked patches, ε ~ N(0, diag(σ²)); other patches unchanged.

    Args:
        f: (n_images, n_patches, dim) batch features.
        mask: (n_images, n_patches) bool, the ambiguous patches.
        generator: a generator on f's device; noise is drawn for every patch
            (a fixed amount per step, so no host sync) and applied where masked.

    Returns:
        A new tensor shaped like ``f``; ``f`` is not modified.
    """
    sigma = feature_sigma(f)
    noise = torch.randn(f.shape, generator=generator, device=f.device, dtype=f.dtype)
    return torch.addcmul(f, noise * sigma, mask.unsqueeze(-1).to(f.dtype))
