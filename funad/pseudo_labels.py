"""Distance-based patch pseudo-labels with self-exclusion (spec, steps 2-4).

Self-exclusion comes in two forms (``FunADConfig.self_exclusion``):

- by distance, the reference code's rule: squared distances below ``self_eps``
  count as the patch finding itself. It is exact when the bank and the batch
  were adapted by the same Local-Net, as in the faithful loop that rebuilds
  the bank at every iteration.
- by identity: the bank entry holding the same (image, patch) as the query is
  skipped whatever its distance. Needed when the bank is rebuilt less often:
  the batch is then adapted by a newer net than the bank, and each bank image
  finds its own stale copy at a small but non-zero distance.
"""

from __future__ import annotations

import torch

from .ops import minmax


def nn_distance(sqdist: torch.Tensor, self_eps: float) -> torch.Tensor:
    """Distance of each query to its nearest bank feature that is not itself (rule: by distance).

    Args:
        sqdist: (n_queries, k) ascending squared distances to the k nearest
            bank features, k >= 1.
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


def nn_distance_by_identity(sqdist: torch.Tensor, is_self: torch.Tensor) -> torch.Tensor:
    """Distance of each query to its nearest bank feature other than its own entry (rule: by identity).

    Args:
        sqdist: (n_queries, k) ascending squared distances to the k nearest bank features.
        is_self: (n_queries, k) bool, True where that neighbour is the query's
            own (image, patch) in the bank.

    Returns:
        (n_queries,) the nearest distance among the neighbours that are not
        the query itself; 0 when there is none (a bank of one feature that is
        the query), as the distance rule gives.
    """
    d = torch.where(is_self, torch.full_like(sqdist, float("inf")), sqdist).amin(dim=1)
    return torch.where(torch.isinf(d), torch.zeros_like(d), d)


def normalise_distances(d: torch.Tensor) -> torch.Tensor:
    """d̂: min-max normalise distances over all the batch's patches; 0 when all are equal."""
    return minmax(d)


def pseudo_labels(d_hat: torch.Tensor, tau_n: float) -> torch.Tensor:
    """y = 1 (pseudo-anomalous) where d̂ > τ_n, as float32 of d_hat's shape."""
    return (d_hat > tau_n).float()


def ambiguous(d_hat: torch.Tensor, tau_n: float, tau_c: float) -> torch.Tensor:
    """Boolean mask of ambiguous patches, τ_n < d̂ < τ_c."""
    return (d_hat > tau_n) & (d_hat < tau_c)
