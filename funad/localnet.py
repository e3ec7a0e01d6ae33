"""Local-Net φ: a per-patch adaptor followed by a discriminator (spec, "Local-Net")."""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import nn


class LocalNet(nn.Module):
    """φ(f) = discriminator(adaptor(f)), applied to each feature independently.

    - adaptor A: Linear(dim, dim), LeakyReLU(0.2); a = A(f) is the adapted feature
      that the memory bank and the mutual pairs use.
    - discriminator: Linear(dim, 1024), LeakyReLU(0.2), Linear(1024, 128),
      LeakyReLU(0.2), Linear(128, 1), Sigmoid; its output lies in (0, 1).

    Args:
        dim: feature dimension D.
        generator: seeds the initial weights (PyTorch's default Linear init,
            drawn from this generator instead of the global one).
    """

    def __init__(self, dim: int, generator: Optional[torch.Generator] = None) -> None:
        super().__init__()
        self.dim = dim
        self.adaptor = nn.Sequential(nn.Linear(dim, dim), nn.LeakyReLU(0.2))
        self.discriminator = nn.Sequential(
            nn.Linear(dim, 1024), nn.LeakyReLU(0.2),
            nn.Linear(1024, 128), nn.LeakyReLU(0.2),
            nn.Linear(128, 1), nn.Sigmoid(),
        )
        if generator is not None:
            self.reset_parameters(generator)

    @torch.no_grad()
    def reset_parameters(self, generator: torch.Generator) -> None:
        """Re-draw every Linear layer as nn.Linear does, from ``generator``."""
        for layer in self.modules():
            if isinstance(layer, nn.Linear):
                nn.init.kaiming_uniform_(layer.weight, a=math.sqrt(5), generator=generator)
                bound = 1.0 / math.sqrt(layer.in_features)
                nn.init.uniform_(layer.bias, -bound, bound, generator=generator)

    def adapt(self, f: torch.Tensor) -> torch.Tensor:
        """Adapted features (..., dim) of features (..., dim)."""
        return self.adaptor(f)

    def discriminate(self, a: torch.Tensor) -> torch.Tensor:
        """Scores (...) in (0, 1) of adapted features (..., dim)."""
        return self.discriminator(a).squeeze(-1)

    def logits(self, f: torch.Tensor) -> torch.Tensor:
        """The discriminator's pre-sigmoid output (...) of features (..., dim): same order as forward, unbounded."""
        return self.discriminator[:-1](self.adapt(f)).squeeze(-1)

    def forward(self, f: torch.Tensor) -> torch.Tensor:
        """Scores (...) in (0, 1) of features (..., dim); higher = more anomalous."""
        return self.discriminate(self.adapt(f))
