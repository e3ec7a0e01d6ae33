"""Cost of making one FUN-AD* synthetic image (funad.synthetic.make_synthetic), next to the backbone's forward pass.

Run on an idle machine: ``python benchmarks/bench_synthetic.py --size 392 --n 20``. Target: generation
below 10% of one image's fp32 forward pass at the same size, both timed in the same run (with the float32
matmul peak, to show whether the machine was idle).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

SHARED = Path(__file__).resolve().parents[2] / "shared"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size", type=int, default=392)
    ap.add_argument("--n", type=int, default=20)
    ap.add_argument("--weights", type=Path, default=SHARED / "weights/vit_small_patch14_dinov2.imgfocus.safetensors")
    a = ap.parse_args()
    import torch

    from bench_fit import matmul_flops  # benchmarks/ is on sys.path when run as a script
    from funad.pipelines.backbone import BackboneSpec, load_backbone
    from funad.synthetic import make_synthetic

    torch.set_grad_enabled(False)
    peak = matmul_flops(torch.device("cpu"), 768)
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
    # The forward pass it is compared with: the stand-in backbone, fp32, batches of 8, in the same run.
    bb = load_backbone(BackboneSpec("vit_small_patch14_dinov2", weights=str(a.weights), layer=7, image_size=a.size),
                       "cpu", precision="fp32")
    batch = torch.from_numpy(np.stack([base] * 8).transpose(0, 3, 1, 2).copy())
    bb(bb.normalize(batch))  # warm-up
    forward = []
    for _ in range(3):
        start = time.perf_counter()
        bb(bb.normalize(batch))
        forward.append((time.perf_counter() - start) / 8 * 1e3)
    f = float(np.median(forward))
    print(f"float32 matmul peak, same run: {peak / 1e9:.0f} GFLOP/s")
    print(f"make_synthetic at {a.size}x{a.size}: median {np.median(t):.1f} ms, p90 {np.percentile(t, 90):.1f} ms "
          f"over {a.n} images")
    print(f"backbone forward (stand-in ViT-S/14, fp32, batch 8) at {a.size}x{a.size}: {f:.1f} ms per image")
    print(f"synthetic / forward: {np.median(t) / f:.2f} (target < 0.10); with 5% synthetic images extraction "
          f"does {0.05 * np.median(t) / f:.1%} more work")


if __name__ == "__main__":
    main()
