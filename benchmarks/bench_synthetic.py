"""Cost of making one FUN-AD* synthetic image (funad.synthetic.make_synthetic), next to the backbone's forward pass.

Run on an idle machine: ``python benchmarks/bench_synthetic.py --size 392 --n 20``. Target: generation
below 10% of one image's fp32 forward pass at the same size (extract runs ~3 images/s at 392 px on
this CPU, so below ~30 ms per image); with 5% synthetic images the extraction then slows by < 1%.
"""

from __future__ import annotations

import argparse
import time

import numpy as np


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size", type=int, default=392)
    ap.add_argument("--n", type=int, default=20)
    a = ap.parse_args()
    from funad.synthetic import make_synthetic

    rng = np.random.default_rng(0)
    base = rng.integers(0, 256, (a.size, a.size, 3), dtype=np.uint8)
    texture = rng.integers(0, 256, (a.size, a.size, 3), dtype=np.uint8)
    make_synthetic(base, texture, np.random.default_rng(0))  # warm-up (torch kernels)
    times = []
    for j in range(a.n):
        start = time.perf_counter()
        make_synthetic(base, texture, np.random.default_rng([0, j]))
        times.append(time.perf_counter() - start)
    t = np.array(times) * 1e3
    print(f"make_synthetic at {a.size}x{a.size}: median {np.median(t):.1f} ms, p90 {np.percentile(t, 90):.1f} ms "
          f"over {a.n} images (target < 30 ms at 392 px)")


if __name__ == "__main__":
    main()
