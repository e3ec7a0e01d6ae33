"""What it costs to add images to an existing store (``funad extract`` on a folder with new files).

Growing rebuilds the store beside the old one and swaps them (funad.cache.grow):
zarr hard-links every kept image's chunk files, HDF5 copies every kept row into
a new file. This measures, for a store of ``--images`` complete images of
``P x C`` float16 tokens (default 784 x 384, ViT-S/14 at 392 px) with masks and
previews:

1. ``cache.grow`` appending ``--add`` images, zarr and HDF5 (wall time, and per
   kept image);
2. writing the appended images afterwards (the extraction's share the store pays);
3. for scale, the time a plain copy of the store takes (``shutil.copytree`` /
   ``copyfile``), the floor for any rewrite of the data;
4. ``funad cache verify`` of the grown store (every image's checksums), what a
   resumed ``funad extract`` runs before extracting.

Targets (the owner runs this on an idle machine):

* zarr: growing costs at most 2 ms per kept image (links and metadata, no data
  copied), so growing a 100k-image store takes minutes at most, and is well
  under 5% of a plain copy of the store;
* HDF5: growing costs at most 1.5x a plain copy of the file (it is one).

    python benchmarks/bench_grow.py --dir /path/on/the/disk              # 2,000 images, ~1.3 GB per store
    python benchmarks/bench_grow.py --images 64 --size 16x32 --side 16   # smoke test
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

from funad import cache


def make_store(path: Path, n: int, p: int, c: int, side: int, rng) -> None:
    grid = (int(np.sqrt(p)), p // int(np.sqrt(p)))
    samples = [{"path": f"train/good/{i:06d}.png", "split": "train", "label": 0, "defect_type": "good"}
               for i in range(n)]
    with cache.create(path, samples=samples, grid=grid, token_dim=c, mask_size=(side, side),
                      preview_size=side, attributes={"backbone": "bench"}) as store:
        for s in range(0, n, 64):
            idx = np.arange(s, min(n, s + 64))
            store.write_batch(idx, patch_tokens=rng.normal(size=(idx.size, grid[0] * grid[1], c)).astype(np.float16),
                              class_tokens=rng.normal(size=(idx.size, c)).astype(np.float16),
                              masks=(rng.random((idx.size, side, side)) > 0.99).astype(np.uint8),
                              previews=rng.integers(0, 256, (idx.size, side, side, 3), dtype=np.uint8))


def copy_seconds(path: Path) -> float:
    dst = path.with_name(path.name + ".copy")
    start = time.perf_counter()
    if path.is_dir():
        shutil.copytree(path, dst)
    else:
        shutil.copyfile(path, dst)
    seconds = time.perf_counter() - start
    shutil.rmtree(dst) if dst.is_dir() else dst.unlink()
    return seconds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dir", type=Path, default=None, help="where the stores go (default: a temporary folder)")
    ap.add_argument("--images", type=int, default=2000)
    ap.add_argument("--add", type=int, default=50)
    ap.add_argument("--size", default="784x384", help="P x C")
    ap.add_argument("--side", type=int, default=392, help="mask and preview side")
    args = ap.parse_args()
    p, c = (int(v) for v in args.size.split("x"))
    rng = np.random.default_rng(0)
    root = Path(tempfile.mkdtemp(prefix="bench_grow_", dir=args.dir))
    print(f"# Growing a store: {args.images} images of {p} x {c} float16, +{args.add}\n")
    print("| format | grow (s) | ms per kept image | plain copy (s) | grow / copy | write new (s) | verify (s) |")
    print("|---|---|---|---|---|---|---|")
    try:
        for name in ("grow.zarr", "grow.h5"):
            path = root / name
            make_store(path, args.images, p, c, args.side, rng)
            copy_s = copy_seconds(path)
            new = [{"path": f"train/good/new{i:06d}.png", "split": "train", "label": 0, "defect_type": "good"}
                   for i in range(args.add)]
            start = time.perf_counter()
            store = cache.grow(cache.open(path, "a"), add=new)
            grow_s = time.perf_counter() - start
            idx = np.arange(args.images, args.images + args.add)
            start = time.perf_counter()
            store.write_batch(idx, patch_tokens=rng.normal(size=(args.add, store.n_patches, c)).astype(np.float16),
                              class_tokens=rng.normal(size=(args.add, c)).astype(np.float16),
                              previews=rng.integers(0, 256, (args.add, args.side, args.side, 3), dtype=np.uint8))
            store.close()
            write_s = time.perf_counter() - start
            start = time.perf_counter()
            with cache.open(path) as grown:
                assert grown.verify() == [] and grown.complete.all()
            verify_s = time.perf_counter() - start
            print(f"| {cache.infer_format(path)} | {grow_s:.2f} | {1000 * grow_s / args.images:.2f} | {copy_s:.2f} "
                  f"| {grow_s / copy_s:.2f} | {write_s:.2f} | {verify_s:.2f} |")
    finally:
        shutil.rmtree(root)


if __name__ == "__main__":
    main()
