"""The iteratively re-constructed memory bank, IRMB (spec, step 1).

Every rebuild scores all training images with the current Local-Net, keeps the
images whose min-max normalised score is below τ_b as candidates, samples a
fraction r of them and puts the *adapted* features of their patches in the bank.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch

from .data import FeatureSource
from .localnet import LocalNet
from .ops import autocast, images_per_chunk, minmax, row_blocks


@dataclass
class ScoredImages:
    """Result of scoring the training images (all of them, or a pool drawn from them).

    Attributes:
        images: (n_scored,) int64 source indices of the scored images, ascending.
        image_scores: (n_scored,) S_i = max_j φ(f_ij), float32 on the net's device.
        adapted: (n_scored, n_patches, dim) adapted features A(f_ij) when they
            were kept (so the bank and the batch reuse them), else None.
    """

    images: torch.Tensor
    image_scores: torch.Tensor
    adapted: Optional[torch.Tensor]



def draw_pool(n_images: int, pool: Optional[int], generator: torch.Generator) -> torch.Tensor:
    """The images a rebuild scores: all of them, or ``pool`` drawn uniformly without replacement (sorted).

    A speed option (``FunADConfig.bank_pool``): the rebuild's cost then no
    longer grows with the training set. The spec scores every image.
    """
    if pool is None or pool >= n_images:
        return torch.arange(n_images)
    return torch.randperm(n_images, generator=generator)[:pool].sort().values


@torch.no_grad()
def score_images(net: LocalNet, source: FeatureSource, device: torch.device, *,
                 keep_adapted: bool, bf16: bool = False, images: Optional[torch.Tensor] = None) -> ScoredImages:
    """Score the images of ``source`` (chunks of images, no gradient).

    Args:
        net: the current Local-Net, on ``device``.
        source: the training features.
        keep_adapted: keep every adapted feature (n_scored * n_patches * dim
            values on ``device``) for reuse.
        bf16: run the net under bfloat16 autocast.
        images: source indices to score, ascending (default: all).
    """
    images = torch.arange(source.n_images) if images is None else images.cpu()
    n, p = int(images.numel()), source.n_patches
    idx_all = images.numpy()
    scores = torch.empty(n, dtype=torch.float32, device=device)
    adapted = None
    step = images_per_chunk(p)
    for start in range(0, n, step):
        rows = slice(start, min(n, start + step))
        f = source.get(idx_all[rows]).to(device).flatten(0, 1)
        patch_scores = torch.empty(f.shape[0], dtype=torch.float32, device=device)
        for block in row_blocks(f.shape[0], device):  # the read chunk, in cache-sized matmul blocks
            with autocast(device, bf16):
                a = net.adapt(f[block])
                patch_scores[block] = net.discriminate(a).float()
            if keep_adapted:
                if adapted is None:
                    adapted = torch.empty((n * p, a.shape[-1]), dtype=a.dtype, device=device)
                adapted[block.start + rows.start * p:block.stop + rows.start * p] = a
        scores[rows] = patch_scores.view(-1, p).amax(dim=1)
    return ScoredImages(images, scores, None if adapted is None else adapted.view(n, p, -1))


def bank_candidates(image_scores: torch.Tensor, tau_b: float, rule: str = "minmax") -> torch.Tensor:
    """Indices of the memory-bank candidate images, int64 (n_candidates,), ascending.

    ``rule="minmax"`` (the spec): images with normalised score Ŝ_i < τ_b. When
    all scores are equal Ŝ is 0 everywhere and every image is a candidate
    (for τ_b > 0). With τ_b = 0 nothing is strictly below it; the images with
    Ŝ = 0 are then used so the bank is never empty.

    ``rule="rank"`` (a deviation, ``FunADConfig.bank_rule``): the ⌊τ_b·n⌋
    lowest-scoring images (at least one). Min-max normalisation lets a few
    very low scores decide: once the discriminator saturates, most normal
    images score near the top, few have Ŝ < τ_b and the bank collapses to a
    handful of images. The rank rule keeps a fixed share whatever the scores'
    spread.
    """
    if rule == "rank":
        n = max(1, int(np.floor(tau_b * image_scores.numel())))
        return torch.argsort(image_scores, stable=True)[:n].sort().values
    s_hat = minmax(image_scores)
    cand = torch.nonzero(s_hat < tau_b).flatten()
    if cand.numel() == 0:
        cand = torch.nonzero(s_hat == 0).flatten()
    return cand


def sample_bank_images(candidates: torch.Tensor, r: float, generator: torch.Generator) -> torch.Tensor:
    """⌊r·|C|⌋ candidates (at least 1) drawn uniformly without replacement, sorted.

    ``generator`` is a CPU generator; the result is on the candidates' device.
    """
    n = max(1, int(np.floor(r * candidates.numel())))
    pick = torch.randperm(candidates.numel(), generator=generator)[:n]
    return candidates[pick.to(candidates.device)].sort().values


def sample_bank_patches(bank: torch.Tensor, n_max: Optional[int],
                        generator: torch.Generator) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Keep at most ``n_max`` rows of ``bank`` (n_bank, dim), drawn without replacement.

    Returns ``(rows of the bank kept, their sorted row indices)``; the indices are
    None when every row is kept.
    """
    if n_max is None or bank.shape[0] <= n_max:
        return bank, None
    pick = torch.randperm(bank.shape[0], generator=generator)[:n_max].sort().values.to(bank.device)
    return bank[pick], pick


@torch.no_grad()
def gather_adapted(net: LocalNet, source: FeatureSource, rows: torch.Tensor, scored: ScoredImages,
                   device: torch.device, bf16: bool = False) -> torch.Tensor:
    """Adapted features of the scored images at ``rows`` (positions in ``scored``), (len(rows) * n_patches, dim).

    Reuses ``scored.adapted`` when it was kept, else recomputes them in chunks.
    """
    if scored.adapted is not None:
        return scored.adapted[rows.to(scored.adapted.device)].flatten(0, 1)
    idx = scored.images[rows.cpu()].numpy()
    step = images_per_chunk(source.n_patches)
    parts = []
    for start in range(0, len(idx), step):
        f = source.get(idx[start:start + step]).to(device)
        with autocast(device, bf16):
            parts.append(net.adapt(f).flatten(0, 1))
    return torch.cat(parts)
