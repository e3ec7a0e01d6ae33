"""Balanced BCE and mutual-smoothness losses (spec, step 7)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def balanced_bce(p: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """mean over {y=1} of BCE(p, 1) + mean over {y=0} of BCE(p, 0).

    A term whose set is empty is dropped (e.g. no pseudo-anomalies).

    Args:
        p: (n,) predictions in (0, 1).
        y: (n,) 0/1 pseudo-labels.
    """
    p, y = p.float(), y.float()
    per_patch = F.binary_cross_entropy(p, y, reduction="none")
    pos = y.sum()
    neg = y.numel() - pos
    loss_pos = torch.where(pos > 0, (per_patch * y).sum() / pos.clamp(min=1), 0.0)
    loss_neg = torch.where(neg > 0, (per_patch * (1 - y)).sum() / neg.clamp(min=1), 0.0)
    return loss_pos + loss_neg


def mutual_smoothness(p: torch.Tensor, pairs: torch.Tensor) -> torch.Tensor:
    """½·mean|p_u − m| + ½·mean|p_v − m| over the pairs, m = (p_u + p_v) / 2.

    Args:
        p: (n,) predictions.
        pairs: int64 (n_pairs, 2) indices into p. No pairs gives 0.
    """
    p = p.float()
    if pairs.shape[0] == 0:
        return p.sum() * 0.0
    pu, pv = p[pairs[:, 0]], p[pairs[:, 1]]
    m = (pu + pv) / 2
    return 0.5 * (pu - m).abs().mean() + 0.5 * (pv - m).abs().mean()
