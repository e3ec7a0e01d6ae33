"""Balanced BCE and mutual-smoothness losses (spec, step 7)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def balanced_bce(pred: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """mean over {y=1} of BCE(pred, 1) + mean over {y=0} of BCE(pred, 0).

    A term whose set is empty is dropped (e.g. no pseudo-anomalies).

    Args:
        pred: (n,) predictions in (0, 1).
        y: (n,) 0/1 pseudo-labels.
    """
    pred, y = pred.float(), y.float()
    per_patch = F.binary_cross_entropy(pred, y, reduction="none")
    pos = y.sum()
    neg = y.numel() - pos
    loss_pos = torch.where(pos > 0, (per_patch * y).sum() / pos.clamp(min=1), 0.0)
    loss_neg = torch.where(neg > 0, (per_patch * (1 - y)).sum() / neg.clamp(min=1), 0.0)
    return loss_pos + loss_neg


def mutual_smoothness(pred: torch.Tensor, pairs: torch.Tensor) -> torch.Tensor:
    """½·mean|p_u − m| + ½·mean|p_v − m| over the pairs, m = (p_u + p_v) / 2.

    Args:
        pred: (n,) predictions.
        pairs: int64 (n_pairs, 2) indices into pred. No pairs gives 0.
    """
    pred = pred.float()
    if pairs.shape[0] == 0:
        return pred.sum() * 0.0
    pu, pv = pred[pairs[:, 0]], pred[pairs[:, 1]]
    m = (pu + pv) / 2
    return 0.5 * (pu - m).abs().mean() + 0.5 * (pv - m).abs().mean()
