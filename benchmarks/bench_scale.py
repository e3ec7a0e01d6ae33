"""Does a default fit scale with the training set? Fit time at N = bottle size and N = 1000 images.

The 1,000-image set is built from real cached features: the training images
of the given caches (same backbone, so the same P and D), resampled with
replacement and each copy jittered with Gaussian noise of 5% of the feature's
standard deviation, so that no two images are identical. Both fits run the
default preset (or ``--preset``) in one process, with a float32 matmul peak
measured in the same run; report the ratio, not the absolute seconds.

Besides ``FunAD.fit`` (whose last part, with ``scorer=clean_knn``, builds the
clean-image bank: "clean bank s") the table times what ``funad fit`` does next
with the features in memory: score every training image for the unlabelled
thresholds (``pipelines.thresholds.training_scores``, at most ``THRESHOLD_IMAGES`` of them, as
``funad fit`` does).

    python benchmarks/bench_scale.py bench_out/bottle.zarr bench_out/ksdd.zarr --n 230 1000
"""

from __future__ import annotations

import argparse
import os
import platform
import time

import numpy as np
import torch

from funad import FunAD, cache
from funad.config import DEFAULT_PRESET, FunADConfig, preset
from funad.data import TensorSource
from funad.pipelines.features import load_features
from funad.pipelines.thresholds import THRESHOLD_IMAGES, training_scores

from bench_fit import matmul_flops  # benchmarks/ is on sys.path when run as a script


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def pool_of(paths: list[str]) -> torch.Tensor:
    parts = []
    for path in paths:
        with cache.open(path, mode="r") as store:
            parts.append(load_features(store, store.indices(split="train"), device=torch.device("cpu")))
    shapes = {tuple(p.shape[1:]) for p in parts}
    if len(shapes) != 1:
        raise SystemExit(f"the caches hold features of different shapes {sorted(shapes)}; use caches of one backbone")
    return torch.cat(parts)


def resample(pool: torch.Tensor, n: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    pick = torch.randint(pool.shape[0], (n,), generator=g)
    std = pool.float().std(dim=(0, 1))
    return pool[pick] + 0.05 * std * torch.randn(n, *pool.shape[1:], generator=g)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("caches", nargs="+")
    ap.add_argument("--n", type=int, nargs="+", default=[230, 1000])
    ap.add_argument("--preset", default=DEFAULT_PRESET)
    ap.add_argument("--set", dest="sets", action="append", default=[], metavar="NAME=VALUE",
                    help="a setting on top of the preset (as funad fit --set); repeatable")
    args = ap.parse_args()
    overrides = {}
    for item in args.sets:
        name, _, text = item.partition("=")
        overrides[name] = FunADConfig.parse_value(name, text)
    pool = pool_of(args.caches)
    print("# Fit time against training-set size\n")
    print(f"Command: `python benchmarks/bench_scale.py {' '.join(args.caches)} --n {' '.join(map(str, args.n))}"
          f"{'' if args.preset == DEFAULT_PRESET else ' --preset ' + args.preset}"
          f"{''.join(' --set ' + item for item in args.sets)}` (run alone on the machine)\n")
    print(f"- machine: {platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, CPU capability {torch.backends.cpu.get_cpu_capability()}")
    print(f"- features: {pool.shape[0]} real training images from {', '.join(args.caches)}, "
          f"P = {pool.shape[1]}, D = {pool.shape[2]}; preset `{args.preset}`"
          + "".join(f", {k}={v}" for k, v in overrides.items()))
    print(f"- float32 matmul peak, same run: **{matmul_flops(torch.device('cpu'), pool.shape[2]) / 1e9:.0f} GFLOP/s**\n")
    print("| training images | epochs run | iterations | fit s | bank s | search s | step s | s per iteration "
          "| clean bank s | threshold scores s | fit + threshold scores s |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    fits = {}
    for n in args.n:
        feats = resample(pool, n)
        cfg = preset(args.preset, **overrides)
        records: list[dict] = []
        ended: list[float] = []  # when the last epoch ended: what follows in fit is the clean-image bank

        def logged(record: dict) -> None:
            records.append(record)
            ended[:] = [time.perf_counter()]

        model = FunAD(cfg)
        seconds = _timed(lambda: model.fit(feats, callback=logged))
        clean = time.perf_counter() - ended[0] if cfg.scorer == "clean_knn" else 0.0
        scoring = _timed(lambda: training_scores(model, TensorSource(feats), limit=THRESHOLD_IMAGES))
        iters = len(records) * (n // cfg.batch_size)
        phase = {k: sum(r[f"time_{k}"] for r in records) for k in ("bank", "search", "step")}
        print(f"| {n} | {len(records)} | {iters} | {seconds:.0f} | {phase['bank']:.0f} | {phase['search']:.0f} "
              f"| {phase['step']:.0f} | {(seconds - clean) / iters:.3f} | {clean:.0f} | {scoring:.0f} "
              f"| {seconds + scoring:.0f} |", flush=True)
        fits[n] = seconds + scoring
    if len(fits) > 1:
        small, large = min(fits), max(fits)
        print(f"\n- {large} images against {small}: {large / small:.1f}x the images, "
              f"{fits[large] / fits[small]:.2f}x the time of fit + threshold scores (same run)")
    print("- fit s is `FunAD.fit` alone (its clean bank s included; s per iteration leaves it out); the features "
          "are already in memory, and `funad fit` adds start-up, loading and the threshold rule's own work")


if __name__ == "__main__":
    main()
