"""The iteratively re-constructed memory bank, IRMB (spec, step 1).

Every rebuild scores all training images with the current Local-Net, keeps the
images whose min-max normalised score is below τ_b as candidates, samples a
fraction r of them and puts the *adapted* features of their patches in the bank.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch

from .data import FeatureSource
from .localnet import LocalNet


@dataclass
class ScoredImages:
    """Result of scoring every image of a source.

    Attributes:
        image_scores: (n_images,) S_i = max_j φ(f_ij), float32 on the net's device.
        adapted: (n_images, n_patches, dim) adapted features A(f_ij) when they
            were kept (so the bank and the batch reuse them), else None.
    """

    image_scores: torch.Tensor
    adapted: Optional[torch.Tensor]


def images_per_chunk(n_patches: int, rows: int = 32768) -> int:
    """Images per scoring chunk so that one chunk is about ``rows`` patches."""
    return max(1, rows // max(1, n_patches))


@torch.no_grad()
def score_images(net: LocalNet, source: FeatureSource, device: torch.device, *,
                 keep_adapted: bool, bf16: bool = False) -> ScoredImages:
    """Score all images of ``source`` (chunks of images, no gradient).

    Args:
        net: the current Local-Net, on ``device``.
        source: the training features.
        keep_adapted: keep every adapted feature (n_images * n_patches * dim
            values on ``device``) for reuse.
        bf16: run the net under bfloat16 autocast.
    """
    n, p = source.n_images, source.n_patches
    scores = torch.empty(n, dtype=torch.float32, device=device)
    adapted = None
    step = images_per_chunk(p)
    for start in range(0, n, step):
        idx = np.arange(start, min(n, start + step))
        f = source.get(idx).to(device)
        with autocast(device, bf16):
            a = net.adapt(f)
            s = net.discriminate(a)
        if keep_adapted:
            if adapted is None:
                adapted = torch.empty((n, p, a.shape[-1]), dtype=a.dtype, device=device)
            adapted[start:start + len(idx)] = a
        scores[start:start + len(idx)] = s.float().amax(dim=1)
    return ScoredImages(scores, adapted)


def minmax(x: torch.Tensor) -> torch.Tensor:
    """(x - min) / (max - min); all zeros when every value is equal."""
    lo, hi = x.min(), x.max()
    span = hi - lo
    return torch.where(span > 0, (x - lo) / torch.where(span > 0, span, 1.0), torch.zeros_like(x))


def bank_candidates(image_scores: torch.Tensor, tau_b: float) -> torch.Tensor:
    """Indices of images with normalised score Ŝ_i < τ_b, int64 (n_candidates,).

    When all scores are equal Ŝ is 0 everywhere and every image is a candidate
    (for τ_b > 0). With τ_b = 0 nothing is strictly below it; the images with
    Ŝ = 0 are then used so the bank is never empty.
    """
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


def sample_bank_patches(bank: torch.Tensor, n_max: Optional[int], generator: torch.Generator) -> torch.Tensor:
    """Keep at most ``n_max`` rows of ``bank`` (n_bank, dim), drawn without replacement."""
    if n_max is None or bank.shape[0] <= n_max:
        return bank
    pick = torch.randperm(bank.shape[0], generator=generator)[:n_max]
    return bank[pick.sort().values.to(bank.device)]


@torch.no_grad()
def gather_adapted(net: LocalNet, source: FeatureSource, images: torch.Tensor, scored: ScoredImages,
                   device: torch.device, bf16: bool = False) -> torch.Tensor:
    """Adapted features of ``images`` flattened to (len(images) * n_patches, dim).

    Reuses ``scored.adapted`` when it was kept, else recomputes them in chunks.
    """
    if scored.adapted is not None:
        return scored.adapted[images].flatten(0, 1)
    idx = images.cpu().numpy()
    step = images_per_chunk(source.n_patches)
    parts = []
    for start in range(0, len(idx), step):
        f = source.get(idx[start:start + step]).to(device)
        with autocast(device, bf16):
            parts.append(net.adapt(f).flatten(0, 1))
    return torch.cat(parts)


def autocast(device: torch.device, enabled: bool):
    """bfloat16 autocast on ``device`` when ``enabled``, else a no-op context."""
    if not enabled:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
