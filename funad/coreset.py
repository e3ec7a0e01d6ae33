"""PatchCore's approximate greedy coreset: a sparse random projection, then exact, lazily batched k-center greedy.

PatchCore (Roth et al., CVPR 2022, Sec. 3.2) thins its memory bank with the
greedy k-center coreset, computed on features reduced by a random
projection (Johnson-Lindenstrauss) to make it affordable. This module does
the same and nothing else:

1. **Projection.** Features (M, D) are multiplied by a seeded *very sparse*
   random matrix (D, 128) (Li, Hastie and Church, KDD 2006): entries are
   +-sqrt(s / k) with probability 1 / (2s) each and 0 otherwise, s = sqrt(D),
   k = the target dimension. Pairwise distances are preserved in expectation.
   The projection is skipped when D is already <= the target dimension.
2. **Start.** As PatchCore's ``ApproximateGreedyCoresetSampler``: the first
   point is the one with the largest mean distance to ``n_start`` (10) random
   points. Those random points only choose the start; they are not kept.
3. **k-center greedy.** Repeatedly add the point farthest from the selected
   set, in the projected space. This is the exact greedy update: the same
   points in the same order as recomputing every point's distance to the
   newest centre at each step (up to float32 rounding when two distances
   agree to ~1e-6), which ``tests/test_coreset.py`` checks against a slow
   reference. It is made fast on a CPU by being lazy and batched: every
   point keeps an upper bound of its distance to the selected set (exact
   when last refreshed). A round takes the ``_BATCH`` points with the
   largest bounds and refreshes them against the centres they have not
   seen, in matrix products over chunks of ``_CHUNK`` centres; a candidate
   leaves the refresh as soon as its bound falls to the largest bound
   outside the batch, since it cannot be chosen this round. The round then
   selects among the remaining candidates for as long as the best is
   farther than that bound. Points well covered early are never looked at
   again.

Cost: the plain update reads all M x 128 projected values once per selected
point, a memory-bound pass repeated n_select times (184 s for a 10% coreset
of the 164k-patch bottle bank on this project's idle 2-core EPYC, 41 s on its
Xeon, whose L3 holds the whole projected bank; ``coreset.md``). The lazy update computes about a third of those distances (early
leaving halved the refresh's share), in large matrix products.
``benchmarks/bench_coreset.py`` times both on a real cache.
"""

from __future__ import annotations

import math
from typing import Optional

import torch

from .errors import ConfigError, DataError

# Target dimension of the random projection (PatchCore's default).
PROJECTION_DIM = 128
# Random points whose mean distance picks the first centre (PatchCore's default).
N_START = 10
# Rows projected at once (bounds the temporary (rows, D) float32 copy).
_PROJECT_ROWS = 65536
# Candidates refreshed and searched per round of the lazy k-center update (of 1024-16384 tried on a
# slice of the bottle bank, 4096-8192 were fastest; benchmarks/bench_coreset.py times the default).
_BATCH = 4096
# Centres compared per matrix product when refreshing candidates (256-1024 were equally fast on the
# bottle bank; smaller chunks let more candidates leave early, larger ones make better products).
_CHUNK = 512
# A round's batch is drawn from the points ranked in the top _POOL_ROUNDS x _BATCH by a pass over every
# point, kept until fewer than a batch of them remain above the pass's floor (bounds only fall).
_POOL_ROUNDS = 8


def coreset_size(n_points: int, ratio: float) -> int:
    """Points kept by a coreset of ``ratio`` of ``n_points``: ``round(ratio * n_points)``.

    Raises:
        ConfigError: ``ratio`` is not in (0, 1].
        DataError: the coreset would be empty (too few points for this ratio).
    """
    if not (isinstance(ratio, (int, float)) and 0.0 < ratio <= 1.0):
        raise ConfigError(f"coreset_ratio must lie in (0, 1], got {ratio!r}")
    n_keep = int(round(ratio * n_points))
    if n_keep < 1:
        raise DataError(
            f"a coreset of {ratio:g} of {n_points} training patches keeps no patch; use a coreset ratio of at "
            f"least {1.0 / max(n_points, 1):.3g} (or 1 for the full bank), or train on more images"
        )
    return n_keep


def sparse_random_projection(dim: int, out_dim: int = PROJECTION_DIM, seed: int = 0) -> torch.Tensor:
    """A seeded very sparse random projection matrix (dim, out_dim), float32 on the CPU.

    Entries are +-sqrt(s / out_dim) with probability 1/(2s) each, else 0, with
    s = sqrt(dim), so E[||x P||^2] = ||x||^2.
    """
    if dim < 1 or out_dim < 1:
        raise ConfigError(f"projection sizes must be positive, got dim={dim}, out_dim={out_dim}")
    gen = torch.Generator().manual_seed(int(seed))
    s = math.sqrt(dim)
    u = torch.rand(dim, out_dim, generator=gen)
    sign = torch.where(u < 0.5, -1.0, 1.0)
    nonzero = torch.rand(dim, out_dim, generator=gen) < 1.0 / s
    return (sign * nonzero) * math.sqrt(s / out_dim)


def project(features: torch.Tensor, out_dim: Optional[int] = PROJECTION_DIM, seed: int = 0) -> torch.Tensor:
    """``features`` (M, D) through :func:`sparse_random_projection` -> (M, out_dim) float32, on their device.

    Returns the features unchanged (as float32) when ``out_dim`` is None or >= D.
    """
    if features.ndim != 2:
        raise DataError(f"features must have shape (n, dim), got {tuple(features.shape)}")
    d = int(features.shape[1])
    if out_dim is None or out_dim >= d:
        return features.float()
    proj = sparse_random_projection(d, out_dim, seed).to(features.device)
    out = torch.empty(features.shape[0], out_dim, dtype=torch.float32, device=features.device)
    for start in range(0, features.shape[0], _PROJECT_ROWS):
        out[start:start + _PROJECT_ROWS] = features[start:start + _PROJECT_ROWS].float() @ proj
    return out


def _sqdist_to(x: torch.Tensor, sqnorm: torch.Tensor, c: torch.Tensor, c_sqnorm: torch.Tensor) -> torch.Tensor:
    """Squared distances of the rows of ``x`` to the vector ``c`` (clamped at 0)."""
    return torch.addmv(sqnorm + c_sqnorm, x, c, alpha=-2.0).clamp_(min=0.0)


class _Points:
    """Points in the two augmented forms that turn squared distances into one matrix product.

    ``left[i] = [x_i, 1]`` and ``right[j] = [-2 x_j, ||x_j||^2]``, so
    ``left[i] . right[j] + ||x_i||^2 = ||x_i - x_j||^2``.
    """

    def __init__(self, x: torch.Tensor) -> None:
        x = x.float()
        self.sqnorm = (x * x).sum(dim=1)
        ones = torch.ones(x.shape[0], 1, dtype=x.dtype, device=x.device)
        self.left = torch.cat([x, ones], dim=1)
        self.right = torch.cat([-2.0 * x, self.sqnorm.unsqueeze(1)], dim=1)

    def sqdist(self, rows: Optional[torch.Tensor], centre: int) -> torch.Tensor:
        """Squared distances of ``rows`` (None: every point) to point ``centre``, clamped at 0."""
        left = self.left if rows is None else self.left.index_select(0, rows)
        sqnorm = self.sqnorm if rows is None else self.sqnorm.index_select(0, rows)
        return torch.addmv(sqnorm, left, self.right[centre]).clamp_(min=0.0)

    def nearest_sqdist(self, rows: torch.Tensor, centres_right: torch.Tensor) -> torch.Tensor:
        """Squared distance of each of ``rows`` (indices) to the nearest centre (rows of ``right`` form)."""
        partial = self.left.index_select(0, rows) @ centres_right.t()
        return (partial.amin(dim=1) + self.sqnorm.index_select(0, rows)).clamp_(min=0.0)


def _refresh(points: _Points, rows: torch.Tensor, bound: torch.Tensor, seen: torch.Tensor,
             centres_right: torch.Tensor, t: int, outside: float,
             chunk: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Tighten the bounds of ``rows`` against the first ``t`` centres, stopping early for rows that drop out.

    ``bound[i]`` accounts for the first ``seen[i]`` centres. The centres not
    yet seen are compared in chunks of ``chunk``, oldest first, in one matrix
    product per chunk over the rows still in play. A row whose bound falls to
    ``outside`` or below leaves: it cannot be selected this round, so its
    exact distance is not needed yet. It keeps the bound of the centres it
    has seen (still a contiguous prefix, so ``seen`` stays one number per row).

    Returns:
        (bound, seen, active): the new bounds and counts of ``rows``, and the
        positions (ascending) of the rows still in play, whose bounds are exact
        (``seen == t``).
    """
    bound, seen = bound.clone(), seen.clone()
    active = torch.arange(rows.numel(), device=rows.device)
    for c0 in range(int(seen.min()) if rows.numel() else t, t, chunk):
        c1 = min(c0 + chunk, t)
        need = active[seen.index_select(0, active) < c1]
        if need.numel():
            d = points.nearest_sqdist(rows.index_select(0, need), centres_right[c0:c1])
            bound.index_copy_(0, need, torch.minimum(bound.index_select(0, need), d))
            seen.index_fill_(0, need, c1)
        active = active[bound.index_select(0, active) > outside]
        if active.numel() == 0:
            break
    return bound, seen, active


def k_center_greedy(x: torch.Tensor, n_select: int, first: int, batch: int = _BATCH,
                    chunk: int = _CHUNK) -> torch.Tensor:
    """Exact greedy k-center selection starting at ``first``, with lazy batched updates.

    Every point keeps an upper bound of its squared distance to the nearest
    centre (exact when the point was last refreshed) and the number of
    centres that bound has seen. A round takes the ``batch`` points with the
    largest bounds and the largest bound outside them, ``outside``. It
    tightens the candidates' bounds against the centres they have not seen
    (:func:`_refresh`, in chunks of ``chunk`` centres); a candidate leaves as
    soon as its bound is ``outside`` or less, since it cannot be the farthest
    point. It then selects centres among the remaining, now exact, candidates
    one by one, for as long as the best of them is strictly farther than
    ``outside``: no other point can be farther, since bounds only
    overestimate. Points far from the frontier are not touched again.

    Args:
        x: (M, d) float32 points; the work happens on their device.
        n_select: points to select, 1 <= n_select <= M.
        first: index of the first centre.
        batch: candidates per round.
        chunk: centres compared per matrix product when refreshing candidates.

    Returns:
        int64 (n_select,) indices into ``x`` in selection order: each is the
        point farthest from the centres before it (the lowest index on ties).
    """
    m = int(x.shape[0])
    if not 1 <= n_select <= m:
        raise DataError(f"cannot select {n_select} coreset points from {m} features")
    points = _Points(x)
    selected = torch.empty(n_select, dtype=torch.int64, device=x.device)
    centres_right = torch.empty(n_select, points.right.shape[1], dtype=points.right.dtype, device=x.device)
    selected[0], centres_right[0] = int(first), points.right[int(first)]
    bound = points.sqdist(None, int(first))
    seen = torch.ones(m, dtype=torch.int64, device=x.device)
    t = 1
    floor = float("inf")  # every point whose bound is >= floor is in the running for the next rounds' batches
    while t < n_select:
        k = min(batch + 1, m)
        pool = torch.nonzero(bound >= floor).squeeze(1)
        if pool.numel() < k:
            # Bounds only fall, so the top ranks of the next several rounds lie among today's top
            # _POOL_ROUNDS x batch: one pass over every point serves those rounds, where a top-k of all M
            # bounds per round was a large share of the time.
            kk = min(_POOL_ROUNDS * batch + 1, m)
            floor = float(torch.topk(bound, kk, sorted=False).values.min()) if kk < m else float("-inf")
            pool = torch.nonzero(bound >= floor).squeeze(1)
        top, at = torch.topk(bound.index_select(0, pool), k)
        cand = pool.index_select(0, at)
        outside = float(top[batch]) if k > batch else -1.0  # the largest bound outside the batch
        cand = torch.sort(cand[:batch]).values  # ascending, so argmax breaks ties by the lowest index
        cand_seen = seen.index_select(0, cand)
        stale = bool((cand_seen < t).any())
        cand_bound, cand_seen, active = _refresh(points, cand, bound.index_select(0, cand), cand_seen,
                                                 centres_right, t, outside, chunk)
        bound.index_copy_(0, cand, cand_bound)
        seen.index_copy_(0, cand, cand_seen)
        live = cand.index_select(0, active)  # exact to t, ascending
        live_sq = cand_bound.index_select(0, active)
        live_left, live_norm = points.left.index_select(0, live), points.sqnorm.index_select(0, live)
        live_ids, chosen = live.tolist(), []
        start = t
        while t < n_select and live_ids:
            best, pos = torch.max(live_sq, 0)  # the first of equal maxima: the lowest index
            if not best.item() > outside:
                break
            c = live_ids[pos.item()]
            chosen.append(c)
            t += 1
            torch.minimum(live_sq, torch.addmv(live_norm, live_left, points.right[c]).clamp_(min=0.0), out=live_sq)
        if chosen:
            ids = torch.tensor(chosen, dtype=torch.int64, device=x.device)
            selected[start:t], centres_right[start:t] = ids, points.right.index_select(0, ids)
        bound.index_copy_(0, live, live_sq)
        seen.index_fill_(0, live, t)
        if t == start and not stale:
            # Exact ties across the batch boundary: settle them with one exact pass over every point.
            every = torch.arange(m, device=x.device)
            bound, seen, _ = _refresh(points, every, bound, seen, centres_right, t, -1.0, chunk)
            c = int(torch.argmax(bound))
            selected[t], centres_right[t] = c, points.right[c]
            t += 1
            bound = torch.minimum(bound, points.sqdist(None, c))
            seen.fill_(t)
    return selected


def approximate_greedy_coreset(features: torch.Tensor, n_select: int, *, seed: int = 0,
                               projection_dim: Optional[int] = PROJECTION_DIM, n_start: int = N_START,
                               projected: Optional[torch.Tensor] = None) -> torch.Tensor:
    """PatchCore's approximate greedy coreset of ``features`` (module docstring).

    Args:
        features: (M, D) float tensor; the work happens on its device.
        n_select: points to keep, 1 <= n_select <= M (see :func:`coreset_size`).
        seed: seeds the projection and the random start points.
        projection_dim: target dimension of the projection (None: none).
        n_start: random points whose mean distance chooses the first centre.
        projected: the (M, projection_dim) projection when the caller has it already.

    Returns:
        int64 (n_select,) indices into ``features``, in selection order.
    """
    m = int(features.shape[0])
    if not 1 <= n_select <= m:
        raise DataError(f"cannot select {n_select} coreset points from {m} features")
    x = project(features, projection_dim, seed) if projected is None else projected.float()
    gen = torch.Generator().manual_seed(int(seed) + 1)
    starts = torch.randperm(m, generator=gen)[:max(1, min(n_start, m))].to(x.device)
    sqnorm = (x * x).sum(dim=1)
    mean_dist = torch.zeros(m, dtype=x.dtype, device=x.device)
    for s in starts.tolist():
        mean_dist += _sqdist_to(x, sqnorm, x[s], sqnorm[s]).sqrt_()
    first = int(torch.argmax(mean_dist))
    return k_center_greedy(x, n_select, first)
