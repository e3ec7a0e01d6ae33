"""The approximate greedy coreset: exact k-center order, coverage, projection, sizes and errors."""

from __future__ import annotations

import pytest
import torch

from funad.coreset import (approximate_greedy_coreset, coreset_size, k_center_greedy, project,
                           sparse_random_projection)
from funad.errors import ConfigError, DataError


def _slow_k_center(x: torch.Tensor, first: int, n: int) -> list[int]:
    """Reference: recompute every point's distance to all chosen centres at each step (lowest index on ties)."""
    chosen = [first]
    while len(chosen) < n:
        d = torch.cdist(x.double(), x[chosen].double()).min(dim=1).values
        chosen.append(int(d.argmax()))
    return chosen


def _covering_radius(x: torch.Tensor, chosen: torch.Tensor) -> float:
    return float(torch.cdist(x, x[chosen]).min(dim=1).values.max())


@pytest.mark.parametrize("chunk", [1, 4, 512])
@pytest.mark.parametrize("batch", [1, 3, 16, 1024])
def test_k_center_matches_the_slow_reference(batch, chunk):
    # chunk 1 and 4: candidates leave the refresh after a few centres, with only part of their bound refreshed.
    g = torch.Generator().manual_seed(batch)
    x = torch.randn(150, 6, generator=g) * torch.rand(150, 1, generator=g) * 3
    got = k_center_greedy(x, 40, first=7, batch=batch, chunk=chunk).tolist()
    assert got == _slow_k_center(x, 7, 40)


def test_k_center_breaks_exact_ties_like_the_reference():
    # Integer points with duplicates: squared distances are exact in float32, so ties are real ties.
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 4, (60, 3), generator=g).float()
    for batch in (2, 5, 64):
        for chunk in (1, 3, 512):
            assert k_center_greedy(x, 30, first=0, batch=batch, chunk=chunk).tolist() == _slow_k_center(x, 0, 30)


def test_coreset_covers_a_planted_set_far_better_than_random():
    # One big blob and 19 small far-away clusters: k-center must visit every cluster, random mostly the blob.
    g = torch.Generator().manual_seed(1)
    centres = torch.randn(20, 32, generator=g) * 20
    sizes = [1000] + [5] * 19
    x = torch.cat([c + 0.1 * torch.randn(n, 32, generator=g) for c, n in zip(centres, sizes)])
    core = approximate_greedy_coreset(x, 20, seed=0, projection_dim=None)
    random = torch.randperm(x.shape[0], generator=g)[:20]
    assert _covering_radius(x, core) < 0.2 * _covering_radius(x, random)
    assert len(set(core.tolist())) == 20


def test_projection_keeps_distances_and_is_seeded():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(50, 768, generator=g)
    y = project(x, 128, seed=5)
    assert y.shape == (50, 128) and torch.equal(y, project(x, 128, seed=5))
    assert not torch.equal(y, project(x, 128, seed=6))
    ratio = torch.pdist(y) / torch.pdist(x)
    assert 0.6 < float(ratio.min()) and float(ratio.max()) < 1.4
    p = sparse_random_projection(768, 128, seed=0)
    assert 0.02 < float((p != 0).float().mean()) < 0.06  # density 1/sqrt(768) = 0.036
    assert project(x[:, :64], 128).shape == (50, 64)  # no projection when D <= target


def test_approximate_coreset_is_deterministic_and_starts_far_out():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(500, 16, generator=g)
    x[123] += 50.0
    a = approximate_greedy_coreset(x, 25, seed=4, projection_dim=None)
    assert torch.equal(a, approximate_greedy_coreset(x, 25, seed=4, projection_dim=None))
    assert int(a[0]) == 123  # the largest mean distance to the random start points


def test_sizes_and_errors():
    assert coreset_size(1000, 0.1) == 100 and coreset_size(7, 1.0) == 7
    for bad in (0.0, -0.1, 1.5, float("nan"), None):
        with pytest.raises(ConfigError, match=r"coreset_ratio must lie in \(0, 1\]"):
            coreset_size(100, bad)
    with pytest.raises(DataError, match="keeps no patch.*at least 0.2"):
        coreset_size(5, 0.05)
    with pytest.raises(DataError, match="cannot select"):
        k_center_greedy(torch.randn(4, 2), 5, first=0)
