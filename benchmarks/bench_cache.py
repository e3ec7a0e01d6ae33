"""Feature-store codecs: write and read MB/s and on-disk size, per backend and codec.

Writes N images one per call, into one-image chunks (a study of the codecs,
in cache format 2's layout; cache format 3 keeps 16 images per chunk and
``bench_store.py`` measures it) of an ``(N, P, C)`` float16 array through the
store's own backends, reads
them back in runs of 16 images, and checks the round trip. Then times the
public API (``write_batch`` / ``read_features``) with the default settings.

    python benchmarks/bench_cache.py                      # synthetic ViT-B/8-like tokens
    python benchmarks/bench_cache.py --cache feats.zarr   # the patch tokens of a real store

Synthetic tokens imitate post-LayerNorm ViT tokens: per-channel offsets and
scales (a few channels with large magnitude), spatially smooth structure plus
noise. Reads follow the writes, so the files are in the page cache: read
figures are decode + copy speed, not cold-disk speed. The CPU is shared, so
absolute numbers are noisy; the ratios within one run are what matter.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

import h5py
import numpy as np
import zarr

from funad import cache
from funad.cache import _hdf5, _zarr

CANDIDATES = [("zarr", name) for name in _zarr.CODECS] + [("hdf5", name) for name in _hdf5.CODECS]


def synthetic_tokens(n: int, grid: int, dim: int, seed: int = 0) -> np.ndarray:
    """``(n, grid*grid, dim) float16`` tokens with ViT-like channel statistics and spatial smoothness."""
    rng = np.random.default_rng(seed)
    offset = rng.normal(0.0, 3.0, dim)
    scale = rng.lognormal(np.log(1.5), 0.3, dim)
    scale[rng.choice(dim, max(1, dim // 200), replace=False)] *= 10.0  # "massive activation" channels
    basis = rng.normal(size=(8, dim))
    out = np.empty((n, grid * grid, dim), np.float16)
    yy, xx = np.mgrid[0:grid, 0:grid] / grid
    for i in range(n):
        freqs = rng.uniform(0.5, 3.0, (8, 2))
        phase = rng.uniform(0, 2 * np.pi, 8)
        fields = np.sin(2 * np.pi * (freqs[:, :1, None] * yy + freqs[:, 1:, None] * xx) + phase[:, None, None])
        smooth = fields.reshape(8, -1).T @ basis / np.sqrt(8)
        noise = rng.normal(size=(grid * grid, dim))
        out[i] = (offset + scale * (0.6 * smooth + 0.8 * noise)).astype(np.float16)
    return out


def real_tokens(path: str, n: int) -> np.ndarray:
    with cache.open(path) as store:
        idx = store.indices()[:n]
        if idx.size == 0:
            sys.exit(f"{path} has no complete images")
        return store.read_patch_tokens(idx).astype(np.float16)


def bench_codecs(tokens: np.ndarray, workdir: Path, repeats: int) -> list[dict]:
    """Write then read every image with each candidate; candidates take turns within each of the
    ``repeats`` rounds (so background load hits them alike) and the median round is reported."""
    n, p, c = tokens.shape
    arrays = []
    for fmt, codec in CANDIDATES:
        path = workdir / (f"b_{codec}.zarr" if fmt == "zarr" else f"b_{codec}.h5")
        backend = (_zarr if fmt == "zarr" else _hdf5).Backend(path, writable=True, create=True)
        backend.create_array("x", (n, p, c), "float16", (1, p, c), codec)
        arr = backend.array("x")
        arr[0:1] = tokens[0:1]  # warm-up: first-call costs (thread pools, caches) are not the codec's
        _ = arr[0:1]
        arrays.append((fmt, codec, backend, arr))
    times = {(fmt, codec): ([], []) for fmt, codec in CANDIDATES}
    back = np.empty_like(tokens)
    for _ in range(repeats):
        for fmt, codec, backend, arr in arrays:
            t0 = time.perf_counter()
            for i in range(n):
                arr[i : i + 1] = tokens[i : i + 1]
            backend.flush()
            t1 = time.perf_counter()
            for s in range(0, n, 16):
                back[s : s + 16] = arr[s : s + 16]
            t2 = time.perf_counter()
            if not np.array_equal(back, tokens):
                raise AssertionError(f"{fmt}/{codec}: round trip changed the data")
            times[fmt, codec][0].append(t1 - t0)
            times[fmt, codec][1].append(t2 - t1)
    rows = []
    mb = tokens.nbytes / 1e6
    for fmt, codec, backend, arr in arrays:
        w, r = times[fmt, codec]
        rows.append({"format": fmt, "codec": codec, "write": mb / float(np.median(w)),
                     "read": mb / float(np.median(r)), "ratio": backend.size_on_disk() / tokens.nbytes})
        backend.close()
    return rows


def bench_store_api(fmt: str, tokens: np.ndarray, workdir: Path, repeats: int) -> dict:
    """Public API with the defaults: ``write_batch`` of 8 images into a fresh store, then
    ``iter_features`` in chunks of 16 (which assembles 2C); median of ``repeats``."""
    n, p, c = tokens.shape
    g = int(round(p ** 0.5))
    samples = [{"path": f"img{i}", "split": "train", "label": 0, "defect_type": "good"} for i in range(n)]
    cls = tokens[:, 0, :].copy()
    path = workdir / ("api.zarr" if fmt == "zarr" else "api.h5")
    writes, reads = [], []
    for _ in range(repeats):
        store = cache.create(path, samples=samples, grid=(g, p // g), token_dim=c, mask_size=(8 * g, 8 * g),
                             preview_size=None, overwrite=True)
        t0 = time.perf_counter()
        for s in range(0, n, 8):
            idx = np.arange(s, min(n, s + 8))
            store.write_batch(idx, patch_tokens=tokens[idx], class_tokens=cls[idx])
        writes.append(time.perf_counter() - t0)
        store.close()
        with cache.open(path) as store:
            store.read_features([0])  # warm-up
            t0 = time.perf_counter()
            for _idx, _feats in store.iter_features(chunk=16):
                pass
            reads.append(time.perf_counter() - t0)
    stored_mb = (tokens.nbytes + cls.nbytes) / 1e6
    t_write, t_read = float(np.median(writes)), float(np.median(reads))
    return {"format": fmt, "write": stored_mb / t_write, "read_stored": stored_mb / t_read,
            "read_assembled": 2 * tokens.nbytes / 1e6 / t_read}


def machine() -> str:
    return (f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
            f"Python {platform.python_version()}, numpy {np.__version__}, zarr {zarr.__version__}, "
            f"h5py {h5py.__version__} (HDF5 {h5py.version.hdf5_version})")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cache", help="take patch tokens from this store instead of synthetic ones")
    ap.add_argument("--images", type=int, default=48, help="images to write and read (default 48)")
    ap.add_argument("--grid", type=int, default=28, help="synthetic patch grid side (default 28 -> P=784)")
    ap.add_argument("--token-dim", type=int, default=768, help="synthetic C (default 768, ViT-B)")
    ap.add_argument("--repeats", type=int, default=3, help="timed passes per codec; the median is reported")
    ap.add_argument("--workdir", help="where to write the test stores (default: a temporary directory)")
    args = ap.parse_args()

    tokens = (real_tokens(args.cache, args.images) if args.cache
              else synthetic_tokens(args.images, args.grid, args.token_dim))
    source = f"real store `{args.cache}`" if args.cache else "synthetic ViT-like tokens"
    work = Path(tempfile.mkdtemp(prefix="bench_cache_", dir=args.workdir))
    try:
        rows = bench_codecs(tokens, work, args.repeats)
        api = [bench_store_api(fmt, tokens, work, args.repeats) for fmt in ("zarr", "hdf5")]
    finally:
        shutil.rmtree(work, ignore_errors=True)

    n, p, c = tokens.shape
    print(f"## Feature store codecs\n\nMachine: {machine()}\n")
    print(f"Data: {source}, {n} images x (P={p}, C={c}) float16 = {tokens.nbytes / 1e6:.1f} MB, "
          f"one chunk per image, written one image per call, read 16 images per call; median of {args.repeats} "
          "rounds in which the codecs take turns (page cache warm).\n")
    print("| format | codec | write MB/s | read MB/s | on-disk / raw | write vs none | read vs none |")
    print("|---|---|---:|---:|---:|---:|---:|")
    base = {r["format"]: r for r in rows if r["codec"] == "none"}
    for r in rows:
        b = base[r["format"]]
        default = " (default)" if r["codec"] == (_zarr if r["format"] == "zarr" else _hdf5).FEATURE_CODEC else ""
        print(f"| {r['format']} | {r['codec']}{default} | {r['write']:.0f} | {r['read']:.0f} | {r['ratio']:.3f} "
              f"| {r['write'] / b['write']:.2f} | {r['read'] / b['read']:.2f} |")
    print("\nPublic API with the default codecs (`write_batch` of 8 images; `iter_features` of 16, which also "
          "assembles `[class ; patch]` to 2C):\n")
    print("| format | write MB/s (stored) | read MB/s (stored) | read MB/s (assembled features) |")
    print("|---|---:|---:|---:|")
    for a in api:
        print(f"| {a['format']} | {a['write']:.0f} | {a['read_stored']:.0f} | {a['read_assembled']:.0f} |")


if __name__ == "__main__":
    main()
