"""One FUN-AD training iteration once the memory bank exists (spec, steps 2-8).

:func:`make_targets` turns the batch's adapted features and the bank into
distances, pseudo-labels, the ambiguous mask and the mutual pairs (no
gradient); :func:`optimise` perturbs, computes both losses and takes one
optimiser step. ``FunAD.fit`` calls the two in turn; the golden test in
``tests/test_train_step.py`` checks them against plain numpy written from the
spec.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from . import losses
from .config import FunADConfig
from .localnet import LocalNet
from .nn import NNIndex
from .ops import autocast
from .pairs import batch_mutual_pairs
from .perturb import perturb
from .pseudo_labels import ambiguous, nn_distance, nn_distance_by_identity, normalise_distances, pseudo_labels


@dataclass
class Targets:
    """What the bank says about one batch, all over the flattened (n_images * n_patches) patches.

    Attributes:
        d: (n,) squared distance to the nearest bank feature that is not the patch itself.
        d_hat: (n,) min-max normalised d.
        y: (n,) float 0/1 pseudo-labels, d̂ > τ_n.
        amb: (n,) bool, τ_n < d̂ < τ_c: the patches to perturb.
        pairs: int64 (n_pairs, 2) mutual nearest pairs among the batch's adapted features.
        no_ms_grad: (n,) bool or None: patches whose predictions L_ms treats as constants
            (FUN-AD*'s synthetic images, :func:`use_synthetic`).
    """

    d: torch.Tensor
    d_hat: torch.Tensor
    y: torch.Tensor
    amb: torch.Tensor
    pairs: torch.Tensor
    no_ms_grad: Optional[torch.Tensor] = None


@dataclass
class Losses:
    """The step's losses (0-d tensors, detached from the graph)."""

    loss: torch.Tensor
    loss_bce: torch.Tensor
    loss_ms: torch.Tensor


@torch.no_grad()
def bank_distance(queries: torch.Tensor, index: NNIndex, config: FunADConfig,
                  query_ids: Optional[torch.Tensor] = None, bank_ids: Optional[torch.Tensor] = None) -> torch.Tensor:
    """d: each query's squared distance to its nearest bank feature other than itself.

    Args:
        queries: (n, dim) adapted batch features.
        index: the bank, fitted.
        config: gives k, self_eps and the self-exclusion rule.
        query_ids, bank_ids: int64 (n,) and (n_bank,) identities (image * P +
            patch) of the queries and the bank rows; required by the identity rule.

    With a bank smaller than k (e.g. one image-level feature), all of it is searched.
    """
    k = min(config.k, index.n_bank_)
    sqdist, idx = index.search(queries.float(), k)
    if config.exclude_self_by == "distance":
        return nn_distance(sqdist, config.self_eps)
    if query_ids is None or bank_ids is None:
        raise ValueError("self-exclusion by identity needs query_ids and bank_ids")
    return nn_distance_by_identity(sqdist, bank_ids.to(idx.device)[idx] == query_ids.to(idx.device)[:, None])


@torch.no_grad()
def make_targets(adapted: torch.Tensor, index: NNIndex, config: FunADConfig,
                 query_ids: Optional[torch.Tensor] = None, bank_ids: Optional[torch.Tensor] = None) -> Targets:
    """Steps 2-4 and 6: distances, d̂, y, the ambiguous mask and the mutual pairs.

    Args:
        adapted: (n_images, n_patches, dim) adapted features of the unperturbed batch.
        index, config, query_ids, bank_ids: as in :func:`bank_distance`
            (``query_ids`` flattened like ``adapted``).
    """
    d = bank_distance(adapted.flatten(0, 1), index, config, query_ids, bank_ids)
    d_hat = normalise_distances(d)
    return Targets(d=d, d_hat=d_hat, y=pseudo_labels(d_hat, config.tau_n),
                   amb=ambiguous(d_hat, config.tau_n, config.tau_c), pairs=batch_mutual_pairs(adapted))


@torch.no_grad()
def use_synthetic(targets: Targets, synthetic: torch.Tensor, mode: str,
                  mask_labels: Optional[torch.Tensor] = None) -> Targets:
    """FUN-AD*: how the batch's synthetic anomaly patches train (``FunADConfig.synthetic``).

    Args:
        targets: from :func:`make_targets` on the batch.
        synthetic: (n,) bool, the patches of synthetic images (flattened like ``targets.y``).
        mode: "pseudo" keeps their pseudo-labels (the paper); "mask" replaces them with
            ``mask_labels`` ((n,) 0/1, the Perlin masks on the patch grid) and does not perturb them.
    In both modes the mutual-smoothness loss does not back-propagate through them.
    """
    targets.no_ms_grad = synthetic
    if mode == "mask":
        if mask_labels is None:
            raise ValueError("synthetic='mask' needs the synthetic images' patch labels")
        targets.y = torch.where(synthetic, mask_labels.to(targets.y.dtype), targets.y)
        targets.amb = targets.amb & ~synthetic
    return targets


def optimise(net: LocalNet, opt: torch.optim.Optimizer, f: torch.Tensor, targets: Targets, config: FunADConfig,
             noise: torch.Tensor) -> Losses:
    """Steps 5, 7 and 8: perturb the ambiguous patches, compute L = L_bce + λ·L_ms, take one step.

    Args:
        net, opt: the Local-Net and its optimiser (RMSprop in the spec).
        f: (n_images, n_patches, dim) batch features.
        targets: from :func:`make_targets` on the same batch.
        config: λ, bf16 and ``ms_on_clean``.
        noise: standard normal, shaped like ``f`` (``perturb.draw_noise``).

    By default both losses use the perturbed predictions, as the reference
    code does (one forward pass); ``ms_on_clean`` is the paper's reading,
    L_ms on a second, clean forward pass.
    """
    device = f.device
    f_tilde = perturb(f, targets.amb.view(f.shape[:2]), noise)
    with autocast(device, config.bf16):
        p_tilde = net(f_tilde).flatten().float()
    loss_bce = losses.balanced_bce(p_tilde, targets.y)
    if config.ms_on_clean:
        with autocast(device, config.bf16):
            p_clean = net(f).flatten().float()
        loss_ms = losses.mutual_smoothness(_ms_input(p_clean, targets), targets.pairs)
    else:
        loss_ms = losses.mutual_smoothness(_ms_input(p_tilde, targets), targets.pairs)
    loss = loss_bce + config.lambda_ * loss_ms
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return Losses(loss.detach(), loss_bce.detach(), loss_ms.detach())


def _ms_input(pred: torch.Tensor, targets: Targets) -> torch.Tensor:
    """Predictions for L_ms: those of ``targets.no_ms_grad`` patches detached (constants)."""
    if targets.no_ms_grad is None:
        return pred
    return torch.where(targets.no_ms_grad, pred.detach(), pred)
