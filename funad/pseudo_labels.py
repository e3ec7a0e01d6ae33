"""Distance-based patch pseudo-labels with self-exclusion (spec, steps 2-4)."""

from __future__ import annotations

import torch

from .memory_bank import minmax


def nn_distance(sqdist: torch.Tensor, self_eps: float) -> torch.Tensor:
    """Distance of each query to its nearest bank feature that is not itself.

    Args:
        sqdist: (n_queries, k) ascending squared distances to the k nearest
            bank features, k >= 2.
        self_eps: squared distances below this count as 0 (the query found itself).

    Returns:
        (n_queries,) the first of the k distances that is not 0 after the
        thresholding, or 0 when all are. With k = 2 this is: the nearest
        distance, or the second-nearest when the nearest is 0.
    """
    d = torch.where(sqdist < self_eps, torch.zeros_like(sqdist), sqdist)
    out = d[:, -1]
    for col in range(d.shape[1] - 2, -1, -1):
        out = torch.where(d[:, col] == 0, out, d[:, col])
    return out


def normalise(d: torch.Tensor) -> torch.Tensor:
    """Min-max normalise distances over all the batch's patches; 0 when all are equal."""
    return minmax(d)


def pseudo_labels(d_hat: torch.Tensor, tau_n: float) -> torch.Tensor:
    """y = 1 (pseudo-anomalous) where d̂ > τ_n, as float32 of d_hat's shape."""
    return (d_hat > tau_n).float()


def ambiguous(d_hat: torch.Tensor, tau_n: float, tau_c: float) -> torch.Tensor:
    """Boolean mask of ambiguous patches, τ_n < d̂ < τ_c."""
    return (d_hat > tau_n) & (d_hat < tau_c)
