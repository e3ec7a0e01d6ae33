"""Mutual-nearest-pair mining among a batch's adapted features (spec, step 6)."""

from __future__ import annotations

import torch

from .nn import mutual_nearest_pairs


def batch_mutual_pairs(adapted: torch.Tensor) -> torch.Tensor:
    """Mutual nearest pairs among all patches of a batch.

    Args:
        adapted: (n_images, n_patches, dim) adapted features of the unperturbed batch.

    Returns:
        int64 (n_pairs, 2), indices into the flattened (n_images * n_patches)
        patches, each unordered pair once with u < v.
    """
    return mutual_nearest_pairs(adapted.detach().flatten(0, 1).float())
