"""What the full-frame geometry costs: backbone time per image, paper vs full (tiled), and maps at the original size.

For KolektorSDD strips (500 x ~1260) at S = 392 the paper geometry is one S x S
input per image; the full geometry is a 994 x 392 frame covered by 3 tiles. The
forward pass should cost about the number of tiles: the target is
``full / paper <= tiles + 0.5`` in seconds per image (pre-processing, tiling and
stitching add little). The second table times ``funad eval``'s extra work at
the original size (maps back through the geometry, masks read again, pixel
AUROC/AP and AUPRO over every original pixel) per test image.

Both geometries are timed alternately (``--repeats`` rounds) so that load from
other processes hits both alike. Run it on an idle machine:

    python benchmarks/bench_geometry.py > benchmarks/results/geometry.md
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from funad import metrics
from funad.pipelines.backbone import BackboneSpec, load_backbone
from funad.pipelines.datasets import read_dataset
from funad.pipelines.geometry import Geometry, original_size, typical_size
from funad.pipelines.original_size import _mask
from funad.pipelines.tiles import embed, tile_boxes

SHARED = Path(__file__).resolve().parents[2] / "shared"


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, default=SHARED / "data/ksdd")
    p.add_argument("--dataset", default="ksdd")
    p.add_argument("--images", type=int, default=16)
    p.add_argument("--backbone", default="vit_small_patch14_dinov2")
    p.add_argument("--weights", type=Path, default=SHARED / "weights/vit_small_patch14_dinov2.imgfocus.safetensors")
    p.add_argument("--layer", type=int, default=7)
    p.add_argument("--image-size", type=int, default=392)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--precision", default="fp32")
    p.add_argument("--repeats", type=int, default=3)
    return p.parse_args()


def seconds_per_image(bb, geometry: Geometry, paths: list[Path], batch: int) -> float:
    start = time.perf_counter()
    for i in range(0, len(paths), batch):
        framed = []
        for p in paths[i:i + batch]:
            with Image.open(p) as im:
                framed.append(torch.from_numpy(geometry.crop(im).transpose(2, 0, 1).copy()))
        embed(bb, torch.stack(framed), geometry)
    return (time.perf_counter() - start) / len(paths)


def main() -> None:
    args = parse_args()
    torch.set_grad_enabled(False)
    samples = read_dataset(args.data, args.dataset)
    chosen = [s for s in samples if s.label == 1][: args.images // 2] + [s for s in samples if s.label != 1]
    chosen = chosen[: args.images]
    paths = [args.data / s.path for s in chosen]
    from bench_fit import matmul_flops  # benchmarks/ is on sys.path when run as a script

    peak = matmul_flops(torch.device("cpu"), 768)
    bb = load_backbone(BackboneSpec(args.backbone, weights=str(args.weights), layer=args.layer,
                                    image_size=args.image_size), "cpu", precision=args.precision)
    paper = Geometry.paper(bb.image_size, bb.patch_size)
    full = Geometry.full(bb.image_size, bb.patch_size, typical_size([args.data / s.path for s in samples]))
    rounds = []
    for _ in range(args.repeats):
        rounds.append((seconds_per_image(bb, paper, paths, args.batch_size),
                       seconds_per_image(bb, full, paths, args.batch_size)))
    tiles = len(tile_boxes(full))
    print(f"# Geometry cost ({platform.node()}, {torch.get_num_threads()} threads, {args.backbone} block "
          f"{args.layer}, {args.precision}, batch {args.batch_size}, {len(paths)} images of {args.data})\n")
    print(f"paper: frame {paper.frame}, grid {paper.grid}; full: frame {full.frame}, grid {full.grid}, "
          f"{tiles} tiles\n")
    print(f"float32 matmul peak, same run: {peak / 1e9:.0f} GFLOP/s\n")
    print("| round | paper s/img | full s/img | full / paper | target <= tiles + 0.5 |")
    print("|---|---|---|---|---|")
    for k, (a, b) in enumerate(rounds, 1):
        print(f"| {k} | {a:.3f} | {b:.3f} | {b / a:.2f} | {tiles + 0.5:.1f} |")
    ratio = statistics.median(b / a for a, b in rounds)
    print(f"\nmedian full / paper: {ratio:.2f} ({'meets' if ratio <= tiles + 0.5 else 'misses'} the target)\n")

    # eval's extra work at the original size, per test image (random maps in the store's frame)
    rng = np.random.default_rng(0)
    rows = []
    for name, g in (("paper", paper), ("full", full)):
        start = time.perf_counter()
        maps, masks = [], []
        for s, p in zip(chosen, paths):
            hw = original_size(p)
            maps.append(g.to_original(rng.random(g.frame, dtype=np.float32), hw))
            masks.append(_mask(args.data, s, hw))
        back = time.perf_counter() - start
        filled = [np.nan_to_num(m, nan=-1.0) for m in maps]
        start = time.perf_counter()
        metrics.pixel_metrics(masks, filled)
        metrics.aupro(masks, filled)
        rows.append((name, back / len(paths), (time.perf_counter() - start) / len(paths)))
    print("| geometry | maps + masks back at original size, s/img | pixel metrics + AUPRO, s/img |")
    print("|---|---|---|")
    for name, a, b in rows:
        print(f"| {name} | {a:.4f} | {b:.4f} |")


if __name__ == "__main__":
    main()
