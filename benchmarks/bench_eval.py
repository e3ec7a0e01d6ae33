"""Cost of evaluation: pixel metrics, AUPRO, anomaly maps and the kNN baseline.

Synthetic data at MVTec-bottle scale (83 test images, 392x392 masks, a 28x28
grid): only the sizes matter for speed, so no real data is needed. Prints
markdown: machine, timings, peak memory, and ratios against scikit-learn and
scipy measured in the same run.

    python benchmarks/bench_eval.py            # bottle scale, about 1-2 min on 2 cores
    python benchmarks/bench_eval.py --quick    # smaller, for a smoke test
"""

from __future__ import annotations

import argparse
import os
import platform
import time
import tracemalloc

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage
from sklearn.metrics import average_precision_score, roc_auc_score

from bench_fit import matmul_flops  # this directory: the peak as bench_fit measures it
from funad.anomaly_map import _gaussian_blur_torch, patch_scores_to_maps
from funad.coreset import approximate_greedy_coreset
from funad.knn import KNNScorer
from funad.metrics import aupro, pixel_metrics


def timed(fn):
    """(result, seconds, peak traced MiB) of one call."""
    tracemalloc.start()
    start = time.perf_counter()
    out = fn()
    seconds = time.perf_counter() - start
    peak = tracemalloc.get_traced_memory()[1] / 2**20
    tracemalloc.stop()
    return out, seconds, peak


def synthetic_test_set(n: int, side: int, grid: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    masks = np.zeros((n, side, side), dtype=np.uint8)
    for i in range(n // 4, n):  # a quarter of good images, like bottle's 20 of 83
        r, c = rng.integers(0, side - side // 5, 2)
        masks[i, r:r + side // 6, c:c + side // 8] = 1
    patch = rng.random((n, grid * grid)).astype(np.float32)
    maps = patch_scores_to_maps(patch, (grid, grid), (side, side)) + 0.5 * masks
    return masks, maps.astype(np.float32), patch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a quarter of the images and 196 px masks")
    args = parser.parse_args()
    n, side, grid = (21, 196, 14) if args.quick else (83, 392, 28)

    print("# Evaluation cost (funad.metrics, funad.anomaly_map, funad.knn)\n")
    print(f"- machine: {platform.machine()}, {os.cpu_count()} logical CPUs, torch threads {torch.get_num_threads()}, "
          f"torch {torch.__version__}, numpy {np.__version__}; shared CPU, so absolute times are noisy")
    print(f"- test set: {n} images, masks {side}x{side} ({n * side * side / 1e6:.1f} M pixels), grid {grid}x{grid}; "
          "peak memory = tracemalloc peak of numpy/python allocations")
    print(f"- float32 matmul peak (8192x768 @ 768x8192), same run: "
          f"{matmul_flops(torch.device('cpu'), 768) / 1e9:.0f} GFLOP/s\n")

    masks, maps, patch = synthetic_test_set(n, side, grid)
    y, s = masks.ravel(), maps.ravel()

    print("## Pixel metrics\n")
    print("| what | seconds | peak MiB | value |")
    print("|---|---|---|---|")
    ours, t_ours, m_ours = timed(lambda: pixel_metrics(masks, maps))
    ref, t_ref, m_ref = timed(lambda: (roc_auc_score(y, s), average_precision_score(y, s)))
    pro, t_pro, m_pro = timed(lambda: aupro(masks, maps))
    print(f"| funad pixel_metrics (AUROC + AP, one sort) | {t_ours:.2f} | {m_ours:.0f} | "
          f"{ours['pixel_auroc']:.6f} / {ours['pixel_ap']:.6f} |")
    print(f"| sklearn roc_auc_score + average_precision_score | {t_ref:.2f} | {m_ref:.0f} | "
          f"{ref[0]:.6f} / {ref[1]:.6f} |")
    print(f"| funad aupro (FPR <= 0.3) | {t_pro:.2f} | {m_pro:.0f} | {pro:.6f} |")
    print(f"\nfunad vs sklearn: {t_ref / t_ours:.1f}x faster, {m_ref / m_ours:.1f}x less peak memory; "
          f"largest difference in value {max(abs(ours['pixel_auroc'] - ref[0]), abs(ours['pixel_ap'] - ref[1])):.1e}\n")

    print("## Anomaly maps (bilinear upsampling + Gaussian sigma 4)\n")
    x = torch.from_numpy(patch)
    _, t_map, _ = timed(lambda: patch_scores_to_maps(patch, (grid, grid), (side, side)))
    up = F.interpolate(x.view(n, 1, grid, grid), size=(side, side), mode="bilinear", align_corners=False)[:, 0]
    _, t_scipy, _ = timed(lambda: np.stack([ndimage.gaussian_filter(m, 4.0) for m in up.numpy()]))
    _, t_torch, _ = timed(lambda: _gaussian_blur_torch(up, 4.0))
    print("| what | seconds | images/s |")
    print("|---|---|---|")
    print(f"| patch_scores_to_maps, whole step (CPU path = scipy filter) | {t_map:.2f} | {n / t_map:.0f} |")
    print(f"| Gaussian only: scipy.ndimage.gaussian_filter | {t_scipy:.2f} | {n / t_scipy:.0f} |")
    print(f"| Gaussian only: torch separable conv on CPU (the GPU path) | {t_torch:.2f} | {n / t_torch:.0f} |")
    print(f"\nOn the CPU scipy is {t_torch / t_scipy:.1f}x faster than the torch convolution, so the CPU uses scipy.\n")

    print("## kNN baseline (PatchCore-style)\n")
    n_train, n_test, dim = (8, 4, 768) if args.quick else (40, 16, 768)
    p = grid * grid
    gen = torch.Generator().manual_seed(0)
    train = torch.randn(n_train, p, dim, generator=gen)
    test = torch.randn(n_test, p, dim, generator=gen)
    print(f"bank from {n_train} images x {p} patches = {n_train * p} features, D = {dim}; {n_test} query images.\n")
    print("| what | seconds | rate |")
    print("|---|---|---|")
    knn, t_fit, _ = timed(lambda: KNNScorer(coreset_ratio=1.0).fit(train))
    _, t_score, _ = timed(lambda: knn.score_patches(test))
    print(f"| fit, full bank | {t_fit:.2f} | |")
    print(f"| score, full bank | {t_score:.2f} | {n_test / t_score:.1f} images/s |")
    bank = train.reshape(-1, dim)
    n_keep = int(round(0.1 * bank.shape[0]))
    _, t_core, _ = timed(lambda: approximate_greedy_coreset(bank, n_keep, seed=0))
    print(f"| greedy coreset 10% ({n_keep} of {bank.shape[0]}) | {t_core:.2f} | "
          f"{n_keep / t_core:.0f} selections/s |")
    small = KNNScorer(coreset_ratio=0.1).fit(train)
    _, t_score10, _ = timed(lambda: small.score_patches(test))
    print(f"| score, 10% coreset bank | {t_score10:.2f} | {n_test / t_score10:.1f} images/s |")
    print(f"\nScoring speed-up from a 10% coreset: {t_score / t_score10:.1f}x. Coreset time on a real bank: "
          "benchmarks/bench_coreset.py.")


if __name__ == "__main__":
    main()
