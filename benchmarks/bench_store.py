"""Feature store throughput against the disk's: is the store ever what limits an extraction?

In one run, on the disk that holds ``--dir``:

1. raw sequential bandwidth: one plain file of the same size as the store's
   tokens, written in image-sized blocks (then synced to disk) and read back cold;
2. the store (zarr and HDF5) for ``P x C`` float16 patch tokens (default
   784 x 768, ViT-B/8 at 224 px, and 784 x 384, ViT-S/14 at 392 px): write with
   1, 2 and 4 writers (zarr: processes writing disjoint images, as torchrun
   ranks do; HDF5: threads in one process, as it takes one writer process),
   including the final flush to disk (and the CPU time writing costs per image), then read the
   tokens back cold;
3. the cost of the per-read checksum check: the same reads with and without
   it, cold (what reading a store larger than RAM costs) and from the page
   cache (the worst case for the check's share).

"Cold" reads drop the files from the page cache first (posix_fadvise
DONTNEED), so they come from the disk. Prints a markdown report with the
machine, every figure, ratios to raw, and the images/s an extraction could
reach before the store is the limit (best write rate for the largest tokens).

    python benchmarks/bench_store.py --dir /path/on/the/disk            # full run, ~2.4 GB per size
    python benchmarks/bench_store.py --images 16 --sizes 16x32 --side 8 --writers 1 2   # smoke test
"""

from __future__ import annotations

import argparse
import ctypes
import multiprocessing as mp
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import h5py
import numpy as np
import zarr

import torch

from funad import cache
from funad.cache import writeback

from bench_fit import matmul_flops  # benchmarks/ is on sys.path when run as a script

early = writeback._sync_file_range  # None where the OS has no sync_file_range

BATCH = 16  # images per write_batch, as extract's writer gets them on a GPU (64) or CPU (8)


def machine(where: Path) -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    try:
        fs = subprocess.run(["df", "-T", str(where)], capture_output=True, text=True).stdout.splitlines()[-1].split()
        disk = f"{fs[0]} ({fs[1]})"
    except (OSError, IndexError):
        disk = "?"
    return (f"{cpu}, {os.cpu_count()} logical cores, {mem:.0f} GiB RAM; {where} on {disk}; Python "
            f"{platform.python_version()}, numpy {np.__version__}, zarr {zarr.__version__}, h5py {h5py.__version__}")


def drop_from_page_cache(path: Path) -> None:
    """Ask the kernel to forget the cached pages of every file under ``path`` (no root needed)."""
    files = [path] if path.is_file() else [Path(d) / f for d, _, fs in os.walk(path) for f in fs]
    for f in files:
        fd = os.open(f, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def sync_to_disk(path: Path) -> None:
    """Flush the filesystem that holds ``path`` (syncfs; os.sync where that is missing): part of the
    write time, so written data is on the disk. One flush for the whole store, as the kernel's own
    write-back does it, rather than an fsync per chunk file, which would charge zarr a journal
    commit per file that no extraction pays."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        fd = os.open(path if path.is_dir() else path.parent, os.O_RDONLY)
        try:
            if libc.syncfs(fd) == 0:
                return
        finally:
            os.close(fd)
    except (OSError, AttributeError):
        pass
    os.sync()


def tokens(p: int, c: int) -> np.ndarray:
    return np.random.default_rng(0).normal(size=(BATCH, p, c)).astype(np.float16)


# --------------------------------------------------------------------------- raw files


def raw_bandwidth(where: Path, n: int, image_bytes: int) -> tuple[float, float]:
    """(write, read) bytes/s of one sequential file of n image-sized blocks."""
    block = np.random.default_rng(0).integers(0, 256, image_bytes, dtype=np.uint8).tobytes()
    path = where / "raw.bin"
    start = time.perf_counter()
    with open(path, "wb", buffering=0) as fh:
        for _ in range(n):
            fh.write(block)
    sync_to_disk(path)
    write = n * image_bytes / (time.perf_counter() - start)
    drop_from_page_cache(path)
    start = time.perf_counter()
    with open(path, "rb", buffering=0) as fh:
        while fh.readinto(bytearray(image_bytes)):
            pass
    read = n * image_bytes / (time.perf_counter() - start)
    path.unlink()
    return write, read


def file_create_cost(where: Path, n: int = 400) -> float:
    """Seconds to create one small file as the zarr store writes a chunk (a temporary name, 64 bytes, renamed
    into place), averaged over ``n`` files in one folder: the per-file floor of a one-chunk-per-image layout."""
    folder = where / "create-cost"
    folder.mkdir()
    data = b"x" * 64
    start = time.perf_counter()
    for i in range(n):
        tmp = folder / f"c.{i}.tmp"
        with open(tmp, "wb", buffering=0) as fh:
            fh.write(data)
        os.replace(tmp, folder / f"c.{i}")
    sync_to_disk(folder)
    secs = (time.perf_counter() - start) / n
    shutil.rmtree(folder)
    return secs


def chunk_files(path: Path) -> int:
    """Files under a zarr store that hold chunks (everything but the zarr.json metadata)."""
    return sum(1 for _, _, fs in os.walk(path) for f in fs if f != "zarr.json")


def read_pair(path: Path, k: int, cold: bool) -> tuple[float, float]:
    """(unchecked, checked) seconds of two reads of the store, the checked one first when ``k`` is even (so
    alternating ``k`` takes turns), each from the disk when ``cold`` or else from the page cache."""
    secs = {}
    for checked in ((True, False) if k % 2 == 0 else (False, True)):
        if cold:
            drop_from_page_cache(path)
        secs[checked] = store_read(path, checked=checked)
    return secs[False], secs[True]


def bytes_on_disk(path: Path) -> int:
    """Bytes the store's files hold (a zarr directory's files, or the one HDF5 file): tokens, class tokens,
    previews, records, metadata; empty masks are not stored by zarr."""
    if path.is_file():
        return path.stat().st_size
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs)


# --------------------------------------------------------------------------- the store


def _samples(n: int) -> list[dict]:
    return [{"path": f"{i:07d}.png", "split": "train", "label": 0, "defect_type": "good"} for i in range(n)]


def previews(side: int) -> np.ndarray:
    """``(BATCH, side, side, 3) uint8``: smooth pictures with some noise (compress like photos, roughly)."""
    yy, xx = np.mgrid[0:side, 0:side] / max(side, 1)
    base = np.stack([np.sin(6 * xx), np.cos(4 * yy), np.sin(3 * (xx + yy))], axis=-1) * 100 + 128
    noise = np.random.default_rng(1).normal(0, 8, (BATCH, side, side, 3))
    return np.clip(base + noise, 0, 255).astype(np.uint8)


_DATA: dict = {}  # the batch every writer writes, made before the clock starts (forked writers inherit it)


def _prepare(p: int, c: int, side: int) -> None:
    """Make the writers' data outside the timed section: drawing 16 x 784 x 768 normals takes ~0.4 s, which
    earlier versions of this benchmark charged to every store write (~0.4 ms per image of 1000)."""
    if _DATA.get("key") != (p, c, side):
        _DATA.update(key=(p, c, side), tokens=tokens(p, c), previews=previews(side) if side else None)


def _write_share(store, rank: int, world: int, p: int, c: int) -> None:
    """Write this writer's chunks of the store (chunks rank, rank + world, ..., as torchrun ranks share them)
    in batches (tokens; empty masks and previews if the store has them, as extract writes for normal images)."""
    side = 0 if store.preview_size is None else store.preview_size[0]
    _prepare(p, c, side)  # a no-op: store_write made them before timing
    data, pics = _DATA["tokens"], _DATA["previews"]
    mine = np.flatnonzero(np.arange(store.n_images) // store.chunk_images % world == rank)
    for s in range(0, mine.size, BATCH):
        idx = mine[s : s + BATCH]
        store.write_batch(idx, patch_tokens=data[: idx.size], class_tokens=data[: idx.size, 0],
                          previews=None if pics is None else pics[: idx.size])


def _writer_process(path: str, rank: int, world: int, p: int, c: int) -> None:
    """A zarr writer process: joins the run whose lock the parent holds, as a torchrun rank does."""
    with cache.open(path, "a", lock=False) as store:
        _write_share(store, rank, world, p, c)


def cpu_seconds() -> float:
    """CPU time of this process and its finished children (the writer processes)."""
    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def store_write(path: Path, fmt: str, n: int, p: int, c: int, writers: int, side: int,
                chunk_images: int = cache.layout.CHUNK_IMAGES) -> tuple[float, float]:
    """(wall, CPU) seconds to create a store, write n images with ``writers`` writers, close it and sync it.
    ``side`` > 0 adds ``side x side`` masks and previews, as extract stores them."""
    _prepare(p, c, side)
    cpu = cpu_seconds()
    start = time.perf_counter()
    store = cache.create(path, samples=_samples(n), grid=(p, 1), token_dim=c, mask_size=(max(side, 1),) * 2,
                         preview_size=side or None, format=fmt, chunk_images=chunk_images)
    if fmt == "zarr":
        ctx = mp.get_context("fork")
        procs = [ctx.Process(target=_writer_process, args=(str(path), r, writers, p, c)) for r in range(writers)]
        for proc in procs:
            proc.start()
        for proc in procs:
            proc.join()
            if proc.exitcode:
                raise SystemExit(f"a writer process failed (exit code {proc.exitcode})")
    else:
        threads = [threading.Thread(target=_write_share, args=(store, r, writers, p, c)) for r in range(writers)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    store.close()  # refreshes the records snapshot
    sync_to_disk(path)
    return time.perf_counter() - start, cpu_seconds() - cpu


def store_read(path: Path, checked: bool = True) -> float:
    """Seconds to read every image's features in chunks of 64 (``checked=False``: the same rows
    straight from the backend, without the checksum comparison)."""
    start = time.perf_counter()
    with cache.open(path) as store:
        for s in range(0, store.n_images, 64):
            idx = np.arange(s, min(s + 64, store.n_images))
            if checked:
                store.read_patch_tokens(idx)
                store.read_class_tokens(idx)
            else:  # the backend's row reads that read_* use, minus the status and checksum checks
                for name, shape in (("patch_tokens", (store.n_patches, store.token_dim)), ("class_tokens",
                                                                                         (store.token_dim,))):
                    store._b.read_rows(name, int(idx[0]), int(idx[-1]) + 1, np.empty((idx.size, *shape), store.dtype))
    return time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dir", type=Path, default=None, help="where to write (default: a temporary folder)")
    ap.add_argument("--images", type=int, default=2000, help="images per store (2000 x 784 x 768 x 2 B = 2.4 GB)")
    ap.add_argument("--sizes", nargs="+", default=["784x768", "784x384"], help="P x C of the patch tokens")
    ap.add_argument("--writers", nargs="+", type=int, default=[1, 2, 4])
    ap.add_argument("--formats", nargs="+", default=["zarr", "hdf5"], choices=["zarr", "hdf5"])
    ap.add_argument("--chunk-images", nargs="+", type=int, default=[cache.layout.CHUNK_IMAGES],
                    help="images per chunk of the stores (1 is the layout of cache format 2)")
    ap.add_argument("--writeback", nargs="+", default=["on"], choices=["on", "off"],
                    help="on: the store starts each chunk's write-back as soon as it is written "
                         "(funad.cache.writeback); off: the kernel writes when it likes (as before)")
    ap.add_argument("--repeats", type=int, default=3,
                    help="measure the raw disk and each store this many times and report the medians (the "
                         "disk's speed drifts between runs on a shared machine)")
    ap.add_argument("--side", type=int, default=224,
                    help="also write side x side masks (empty, as for normal images) and previews, as extract "
                         "does; 0: tokens only")
    args = ap.parse_args()
    base = Path(tempfile.mkdtemp(prefix="funad-bench-store-", dir=args.dir))
    n = args.images
    print(f"# Feature store throughput\n\n`{' '.join([Path(sys.argv[0]).name, *sys.argv[1:]])}`\n")
    print(f"Machine: {machine(base)}\n")
    print(f"float32 matmul peak (8192x768 @ 768x8192), same run, to show whether the machine was idle: "
          f"{matmul_flops(torch.device('cpu'), 768) / 1e9:.0f} GFLOP/s\n")
    extra = (f"; writes also store {args.side} x {args.side} masks (empty) and previews, as extract does, but "
             "MB/s counts token bytes only (\"all bytes\" counts every byte the store's files hold)" if args.side else "")
    print(f"{n} images per store, written in batches of {BATCH}, read in chunks of 64; MB = 10^6 bytes{extra}. "
          f"Every figure is the median of {args.repeats} runs, each after a sync of the disk.\n")
    best_rate = None
    try:
        for size in args.sizes:
            p, c = (int(v) for v in size.split("x"))
            image_bytes = (p + 1) * c * 2  # patch tokens plus the class token, float16
            raws = []
            for _ in range(args.repeats):
                sync_to_disk(base)  # nothing written before is charged to the measurement
                raws.append(raw_bandwidth(base, n, image_bytes))
            raw_w, raw_r = (float(np.median(v)) for v in zip(*raws))
            print(f"## {p} x {c} float16 tokens ({image_bytes / 1e6:.2f} MB per image)\n")
            spread = ", ".join(f"{w / 1e6:.0f}" for w, _ in raws)
            print(f"Raw sequential file: write {raw_w / 1e6:.0f} MB/s, read {raw_r / 1e6:.0f} MB/s (cold); medians "
                  f"of {args.repeats} (writes: {spread} MB/s).\n")
            print("| format | images per chunk | early write-back | writers | write MB/s | write img/s "
                  "| write CPU ms/img | write / raw | MB on disk per image | write / raw, all bytes "
                  "| cold read MB/s | read / raw |")
            print("|---|---|---|---|---|---|---|---|---|---|---|---|")
            cost = {}
            default = (args.chunk_images[-1], args.writeback[-1])
            for fmt, g, wb, w in [(f, g, wb, w) for f in args.formats for g in args.chunk_images
                                  for wb in args.writeback for w in args.writers]:
                writeback._sync_file_range = early if wb == "on" else None
                path = base / ("s.zarr" if fmt == "zarr" else "s.h5")
                runs = []
                for r in range(args.repeats):
                    if r:
                        shutil.rmtree(path) if path.is_dir() else path.unlink()
                    sync_to_disk(base)
                    secs, cpu = store_write(path, fmt, n, p, c, w, args.side, g)
                    plain_read, checked_read = read_pair(path, r, cold=True)
                    runs.append((secs, cpu, checked_read, plain_read, bytes_on_disk(path)))
                secs, cpu, rsecs, plain_secs, written = (float(np.median(v)) for v in zip(*runs))
                if fmt == "zarr" and (g, wb) == default:
                    files_per_image = chunk_files(path) / n
                wr, rd = n * image_bytes / secs, n * image_bytes / rsecs
                unit = ("process" if fmt == "zarr" else "thread") + ("" if w == 1 else "es" if fmt == "zarr" else "s")
                print(f"| {fmt} | {g} | {wb} | {w} {unit} | {wr / 1e6:.0f} | "
                      f"{n / secs:.0f} | {1e3 * cpu / n:.1f} | {wr / raw_w:.2f} | {written / n / 1e6:.2f} | "
                      f"{written / secs / raw_w:.2f} | {rd / 1e6:.0f} | {rd / raw_r:.2f} |")
                if size == args.sizes[0] and (g, wb) == default:
                    best_rate = max(best_rate or 0.0, n / secs)
                if w == args.writers[-1] and (g, wb) == default:  # the check's cost: cold and page-cache reads
                    store_read(path)  # warm the cache
                    warm = [read_pair(path, k, cold=False) for k in range(5)]
                    cost[fmt] = ((plain_secs, rsecs), tuple(float(np.median(v)) for v in zip(*warm)))
                shutil.rmtree(path) if path.is_dir() else path.unlink()
            print()
            if "zarr" in args.formats:
                create = file_create_cost(base)
                print(f"Creating one file (64 B under a temporary name, renamed into place, synced) costs "
                      f"{1e3 * create:.2f} ms on this filesystem. The zarr store writes {files_per_image:.1f} files "
                      f"per image (chunks of {args.chunk_images[-1]} images, one file per chunk and array), so file "
                      f"creation alone costs {1e3 * create * files_per_image:.1f} ms per image: at most "
                      f"{1 / (create * files_per_image):.0f} images/s per writer, against the "
                      f"{1e3 * image_bytes / raw_w:.2f} ms in which the raw file takes an image's bytes.\n")
            for fmt, pairs in cost.items():
                for where, (plain, checked) in zip(("cold reads (medians of the runs above)",
                                                    "reads from the page cache (medians of 5, alternated)"), pairs):
                    print(f"Checksum check, {fmt}, {where}: {n * image_bytes / plain / 1e6:.0f} MB/s without, "
                          f"{n * image_bytes / checked / 1e6:.0f} MB/s with: {100 * (checked / plain - 1):+.1f}% "
                          "read time.")
            print()
        if best_rate is not None:
            print(f"**An extraction of {args.sizes[0]} tokens can reach about {best_rate:.0f} images/s before "
                  f"the store (best writer count above) is the limit.**")
    finally:
        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main()
