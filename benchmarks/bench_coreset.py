"""PatchCore's coreset on a real cache: the plain greedy update vs funad.coreset, scoring time, AUROC.

On the training split of a cache (default: the bottle cache of BENCHMARKS.md)
it measures, and prints as markdown:

1. **Coreset time at ``--ratio``** (10%): the plain greedy k-center update
   funad used before (one matrix-vector product over the whole projected
   bank per selected point; ``plain_greedy`` below) against
   :func:`funad.coreset.approximate_greedy_coreset`, on the same projection
   and start point, and whether both select the same points in the same
   order. ``--plain-steps N`` times only the first N plain steps and
   extrapolates linearly (every plain step costs the same full pass);
   the table says so.
2. **Scoring time** of the test split, full bank vs the coreset bank
   (``KNNScorer.score``: nearest-neighbour search plus PatchCore's image
   reweighting).
3. **Image / pixel AUROC**, full bank vs coreset, at 0% and at ``--ratio``
   contamination without overlap (split seed 0), computed with
   ``funad.pipelines.scoring.measure`` like ``funad eval``.

    python benchmarks/bench_coreset.py                         # bottle, ~20-30 min idle (plain greedy ~15 min)
    python benchmarks/bench_coreset.py --plain-steps 500       # extrapolate the plain greedy from 500 steps
    python benchmarks/bench_coreset.py --quick                 # 12 train / 8 test images: smoke test only
    python benchmarks/bench_coreset.py --plain-steps 1000 --no-quality   # the coreset times alone, ~1 min

Timings are only meaningful on an otherwise idle machine.
"""

from __future__ import annotations

import argparse
import os
import platform
import time
from pathlib import Path

import numpy as np
import torch

from funad import cache
from funad.coreset import approximate_greedy_coreset, coreset_size, project
from funad.knn import KNNScorer
from funad.pipelines.fit_data import split_cache
from funad.pipelines.scoring import measure

from bench_fit import matmul_flops  # benchmarks/ is on sys.path when run as a script

DEFAULT_CACHE = "bench_out/bottle.zarr"  # what `bash benchmarks/quality.sh` extracts


def plain_greedy(x: torch.Tensor, n_select: int, first: int, steps: int | None = None) -> torch.Tensor:
    """The previous update: every step, one pass over all points (||x||^2 - 2 x.c + ||c||^2)."""
    sqnorm = (x * x).sum(dim=1)
    selected = torch.empty(n_select, dtype=torch.int64)
    min_sq = torch.full((x.shape[0],), float("inf"))
    current = first
    for i in range(n_select if steps is None else min(steps, n_select)):
        selected[i] = current
        torch.minimum(min_sq, torch.addmv(sqnorm + sqnorm[current], x, x[current], alpha=-2.0), out=min_sq)
        current = int(torch.argmax(min_sq))
    return selected


def timed(fn):
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def load(store, ids: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.asarray(store.read_features(ids), dtype=np.float32))


def coreset_times(bank: torch.Tensor, ratio: float, plain_steps: int | None, repeats: int = 3) -> list[str]:
    n = coreset_size(bank.shape[0], ratio)
    peak = matmul_flops(torch.device("cpu"), 768)
    x, t_proj = timed(lambda: project(bank, seed=0))
    runs = [timed(lambda: approximate_greedy_coreset(bank, n, seed=0, projected=x)) for _ in range(repeats)]
    new, t_new = runs[0][0], float(np.median([t for _, t in runs]))
    steps = n if plain_steps is None else min(plain_steps, n)
    old, t_old = timed(lambda: plain_greedy(x, n, int(new[0]), steps))
    t_old_all = t_old * n / steps
    how = "measured" if steps == n else f"extrapolated from {steps} steps"
    return [
        f"\n## Coreset of {ratio:g} of {bank.shape[0]} training patches ({n} points, D={bank.shape[1]} -> 128)\n",
        f"float32 matmul peak (8192x768 @ 768x8192), same run: {peak / 1e9:.1f} GFLOP/s\n",
        "| what | seconds |", "|---|---|",
        f"| sparse random projection | {t_proj:.1f} |",
        f"| plain greedy update (previous funad), {how} | {t_old_all:.1f} |",
        f"| funad.coreset (lazy batched k-center), median of {repeats} | {t_new:.2f} |",
        f"\nSpeed-up {t_old_all / t_new:.1f}x (projection excluded from both; funad.coreset's runs: "
        f"{', '.join(f'{t:.2f}' for _, t in runs)} s). {agreement(x, old[:steps], new)}",
    ]


def agreement(x: torch.Tensor, old: torch.Tensor, new: torch.Tensor) -> str:
    """Where the two selections part, and whether that step was a float32 near-tie (then both are right)."""
    diff = torch.nonzero(old != new[:len(old)]).ravel()
    if diff.numel() == 0:
        return f"Same points in the same order for all {len(old)} steps compared."
    i = int(diff[0])
    d = torch.cdist(x[torch.stack([old[i], new[i]])].double(), x[old[:i]].double()).min(dim=1).values
    gap = float((d[0] - d[1]).abs() / d.max())
    return (f"Same points for the first {i} of {len(old)} steps; at step {i} the two picks' distances to the "
            f"selected set differ by {gap:.1e} (relative, float64): "
            f"{'a float32 near-tie, both picks are correct' if gap < 1e-5 else 'NOT a tie: a bug'}.")


def quality(store, ratio: float, quick: bool) -> list[str]:
    lines = ["\n## Full bank vs coreset (split seed 0, no overlap)\n",
             "| contamination | bank | patches | fit s | score s | image AUROC | pixel AUROC |",
             "|---|---|---|---|---|---|---|"]
    for contamination in (0.0, ratio):
        split = split_cache(store, contamination, False, 0)
        train_ids, test_ids = np.asarray(split["train_ids"]), np.asarray(split["test_ids"])
        if quick:
            train_ids, test_ids = train_ids[:12], np.concatenate([test_ids[:4], test_ids[-4:]])
        train, test = load(store, train_ids), load(store, test_ids)
        labels = np.asarray(store.labels)[test_ids].astype(np.int64)
        masks = store.read_masks(test_ids)
        for name, r in (("full", 1.0), (f"coreset {ratio:g}", ratio)):
            knn, t_fit = timed(lambda: KNNScorer(coreset_ratio=r).fit(train))
            (patches, images), t_score = timed(lambda: knn.score(test))
            m = measure(patches, labels, masks, store.grid, image_scores=images).metrics
            lines.append(f"| {100 * contamination:g}% | {name} | {knn.bank_.shape[0]} | {t_fit:.1f} | {t_score:.1f} | "
                         f"{100 * m['image_auroc']:.2f} | {100 * m['pixel_auroc']:.2f} |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache", default=DEFAULT_CACHE,
                        help="a feature cache (default: the bottle cache `bash benchmarks/quality.sh` extracts)")
    parser.add_argument("--ratio", type=float, default=0.1)
    parser.add_argument("--plain-steps", type=int, default=None,
                        help="time only this many plain greedy steps and extrapolate")
    parser.add_argument("--quick", action="store_true", help="12 train / 8 test images: a smoke test")
    parser.add_argument("--repeats", type=int, default=3, help="time funad.coreset this many times (median)")
    parser.add_argument("--no-quality", action="store_true",
                        help="time the coreset only (skip the full-bank scoring, ~15 min idle on bottle)")
    args = parser.parse_args()
    print(f"# bench_coreset: {Path(args.cache).name}\n")
    print(f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, load average {os.getloadavg()[0]:.1f} at the start")
    if not Path(args.cache).exists():
        parser.error(f"no cache at {args.cache}: extract one (`bash benchmarks/quality.sh` writes "
                     f"{DEFAULT_CACHE}) or pass --cache")
    with cache.open(args.cache, mode="r") as store:
        train_ids = store.indices(split="train")
        if args.quick:
            train_ids = train_ids[:12]
        bank = load(store, train_ids).reshape(-1, store.feature_dim)
        lines = coreset_times(bank, args.ratio, args.plain_steps, args.repeats)
        del bank
        if not args.no_quality:
            lines += quality(store, args.ratio, args.quick)
    print("\n".join(lines))
    print(f"\nload average {os.getloadavg()[0]:.1f} at the end")


if __name__ == "__main__":
    main()
