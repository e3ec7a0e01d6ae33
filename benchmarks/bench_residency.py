"""Feature residency of `funad fit`: in memory against streamed from the store.

Builds a synthetic store the size of MVTec AD bottle with 10% contamination
and the stand-in backbone (230 training images, 28x28 grid, C = 384, so
D = 768, float16 as `funad extract` writes), then measures with the store
of ``funad.pipelines.features``:

- loading every training image once into memory (what ``--resident memory``
  pays at the start of a fit);
- one full pass over the training set in chunks of 32 images (what every
  bank rebuild of the IRMB reads), from memory and from the store;
- one random batch of 32 images;
- one epoch of the default preset through ``FunAD.fit`` with each source.

    python benchmarks/bench_residency.py                      # bottle-sized, ~1 minute on 2 cores
    python benchmarks/bench_residency.py --images 64 --epochs 1  # adds a fit epoch per source
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from funad import cache
from funad.config import DEFAULT_PRESET, preset
from funad.data import TensorSource
from funad.model import FunAD
from funad.pipelines.features import StoreSource, available_ram, feature_bytes, load_features


def make_store(path: Path, n: int, grid: int, token_dim: int) -> None:
    rng = np.random.default_rng(0)
    samples = [{"path": f"train/{i:04d}.png", "split": "train", "label": 0, "defect_type": "good"} for i in range(n)]
    p = grid * grid
    store = cache.create(path, samples=samples, grid=grid, token_dim=token_dim, mask_size=8, preview_size=None,
                         dtype="float16", attributes={"backbone": "synthetic"})
    for start in range(0, n, 32):
        idx = np.arange(start, min(n, start + 32))
        store.write_batch(idx, patch_tokens=rng.standard_normal((len(idx), p, token_dim), dtype=np.float32),
                          class_tokens=rng.standard_normal((len(idx), token_dim), dtype=np.float32),
                          masks=np.zeros((len(idx), 8, 8), np.uint8))
    store.close()


def median_time(fn, repeats: int) -> float:
    fn()  # warm-up: allocator, page cache, thread pools
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def full_pass(source, n: int) -> None:
    for start in range(0, n, 32):
        source.get(np.arange(start, min(n, start + 32)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=230)
    parser.add_argument("--grid", type=int, default=28)
    parser.add_argument("--token-dim", type=int, default=384)
    parser.add_argument("--epochs", type=int, default=0,
                        help="also time this many epochs of the default preset per source (0: skip)")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="bench_residency_"))
    try:
        path = tmp / "feats.zarr"
        start = time.perf_counter()
        make_store(path, args.images, args.grid, args.token_dim)
        build_s = time.perf_counter() - start
        with cache.open(path) as store:
            n, p, d = store.n_images, store.n_patches, store.feature_dim
            ids = store.indices()
            need = feature_bytes(n, p, d)
            print("# Feature residency (`funad fit --resident`)\n")
            print(f"- machine: {platform.machine()}, {os.cpu_count()} logical CPUs, torch {torch.__version__}, "
                  f"{available_ram() / 1e9:.1f} GB RAM available; shared machine, absolute times are noisy")
            print(f"- synthetic store: {n} images, P = {p}, D = {d}, float16 on disk "
                  f"({sum(f.stat().st_size for f in path.rglob('*') if f.is_file()) / 1e6:.0f} MB, built in "
                  f"{build_s:.1f} s); in memory as float32: N*P*D*4 = {need / 1e6:.0f} MB")
            print(f"- medians of {args.repeats} runs after a warm-up"
                  + (f"; epoch: preset '{DEFAULT_PRESET}', {args.epochs} epoch(s)" if args.epochs else "") + "\n")

            load_s = median_time(lambda: load_features(store, ids), args.repeats)
            memory = TensorSource(load_features(store, ids))
            stream = StoreSource(store, ids)
            batch = np.random.default_rng(1).choice(n, 32, replace=False)
            rows = [
                ("load all into memory (once per fit)", load_s, None),
                ("full pass, 32-image chunks (each bank rebuild)",
                 median_time(lambda: full_pass(memory, n), args.repeats),
                 median_time(lambda: full_pass(stream, n), args.repeats)),
                ("one random batch of 32", median_time(lambda: memory.get(batch), args.repeats),
                 median_time(lambda: stream.get(batch), args.repeats)),
                # TensorSource.get gathers with index_select; plain advanced indexing for comparison.
                ("one random batch of 32, gathered with x[idx] instead of index_select",
                 median_time(lambda: memory.features[torch.as_tensor(batch)], args.repeats), None),
            ]
            if args.epochs:
                cfg = preset(DEFAULT_PRESET, epochs=args.epochs, batch_size=min(32, n))
                epoch = []
                for source in (memory, stream):
                    start = time.perf_counter()
                    FunAD(cfg).fit(source, device="cpu")
                    epoch.append((time.perf_counter() - start) / args.epochs)
                rows.append((f"one epoch of FunAD.fit ({DEFAULT_PRESET})", epoch[0], epoch[1]))

        print("| operation | memory (s) | stream (s) | stream / memory |")
        print("|---|---|---|---|")
        for name, mem, st in rows:
            ratio = f"{st / mem:.1f}x" if st is not None and mem > 0 else ""
            print(f"| {name} | {mem:.3f} | {'' if st is None else f'{st:.3f}'} | {ratio} |")
        print(f"\n`auto` keeps features in memory when N*P*D*4 bytes fit in 50% of the available RAM "
              f"(here up to {available_ram() * 0.5 / 1e9:.1f} GB, i.e. about "
              f"{int(available_ram() * 0.5 // (p * d * 4))} images at P = {p}, D = {d}).")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
