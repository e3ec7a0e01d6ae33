"""The authors' FUN-AD training loop against funad's faithful one, on the same features and machine (issue 8).

Runs the training loop of the authors' ``self_train_ad.py`` (https://github.com/HY-Vision-Lab/FUNAD, from a
clone you give with ``--authors-repo``) with their README's bottle command, for a few iterations, on synthetic
N(0,1) features of the paper's shape (P = 784 patches, D = 1536: their script hard-codes both). funad's
faithful iteration (``--preset paper``: bank rebuilt at every step, all patches, fp32) runs on the same
features first, in fp32 and with ``--set bf16=true``, and the float32 matmul peak is measured before each
half and after the last.

    git clone https://github.com/HY-Vision-Lab/FUNAD ~/FUNAD
    python benchmarks/bench_authors.py --authors-repo ~/FUNAD              # N = 230, bottle at 10%

Their code runs unmodified. The harness changes only what surrounds it:

- their GPU index (``faiss.GpuIndexFlatL2``) becomes faiss's CPU flat index (``faiss.IndexFlatL2``): the same
  exact L2 search, on the CPU (the harness refuses to run with a GPU visible);
- their ``faiss.omp_set_num_threads(4)`` is capped at this machine's logical CPUs;
- modules that the timed path never calls are stubs that raise if anything in them is called: wandb, cv2,
  imgaug, skimage, pandas and their own dataset, dataload, inference and model_utils;
- training stops after ``--iterations`` optimiser steps, before their first evaluation.

Their per-iteration time is the time between two optimiser steps, after the first (which includes starting
their 16 data-loader workers). The phases come from wrapping their ``compute_distance`` and
``find_matching`` and the bank index's ``search``; "everything else" is the bank rebuild's forward pass, the
two training forwards, the backward pass and the step.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import sys
import tempfile
import time
import types
from pathlib import Path
from statistics import median

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_fit import matmul_flops, net_flops, one_iteration, preset_config, table  # noqa: E402

from funad.data import TensorSource  # noqa: E402
from funad.localnet import LocalNet  # noqa: E402

P, D, BATCH = 784, 1536, 32
# README command for bottle at 10% (their --epoch 1500; the loop is stopped long before).
AUTHORS_ARGS = ["-b", "32", "--k_number", "2", "--epoch", "1500", "--balancing", "--gaussian", "--kl",
                "--weight", "2.5", "--oto_loss", "mae", "--dataset", "mvtec", "-d", "bottle", "--noise", "10%"]
STUBBED = ("wandb", "cv2", "imgaug", "imgaug.augmenters", "skimage", "pandas",
           "dataset", "dataload", "inference", "model_utils")


class _Done(BaseException):
    """Ends their loop; a BaseException, so their ``except Exception: pdb.set_trace()`` lets it through."""


class _Unused:
    """A stubbed name: any call says which one was needed after all."""

    def __init__(self, name: str) -> None:
        self._name = name

    def __getattr__(self, attr: str):
        if attr.startswith("__"):
            raise AttributeError(attr)
        return _Unused(f"{self._name}.{attr}")

    def __call__(self, *args, **kwargs):
        raise RuntimeError(f"bench_authors: {self._name} is a stub, but the timed path called it")


class _StubModule(types.ModuleType):
    def __getattr__(self, attr: str):
        if attr.startswith("__"):
            raise AttributeError(attr)
        return _Unused(f"{self.__name__}.{attr}")


class Recorder:
    """Timestamps of their optimiser steps and of the phases the harness can see from outside."""

    def __init__(self, steps: int) -> None:
        self.steps, self.marks, self.events, self.bank_rows = steps, [], [], []
        self.in_self_search = False

    def phase(self, name: str, fn):
        def timed(*args, **kwargs):
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.events.append((name, start, time.perf_counter()))
        return timed

    def per_iteration(self) -> list[dict]:
        """{phase: seconds} for each complete iteration after the first."""
        rows = []
        for begin, end in zip(self.marks, self.marks[1:]):
            row = {"total": end - begin}
            for name, s, e in self.events:
                if begin <= s and e <= end:
                    row[name] = row.get(name, 0.0) + (e - s)
            rows.append(row)
        return rows


def install_shims(rec: Recorder) -> None:
    import faiss

    for name in STUBBED:
        sys.modules[name] = _StubModule(name)
    sys.modules["imgaug"].augmenters = sys.modules["imgaug.augmenters"]

    # main() refuses to run with a GPU visible, so the GPU index always becomes the CPU one here.
    class FlatL2OnCpu:
        """faiss.GpuIndexFlatL2's interface on faiss.IndexFlatL2: exact L2, on the CPU."""

        def __init__(self, resources, dim, config) -> None:
            self.index = faiss.IndexFlatL2(dim)

        def add(self, x) -> None:
            self.index.add(x)
            if not rec.in_self_search:
                rec.bank_rows.append(self.index.ntotal)

        def search(self, x, k):
            if rec.in_self_search:
                return self.index.search(x, k)
            return rec.phase("bank search (faiss)", self.index.search)(x, k)

    faiss.GpuIndexFlatL2 = FlatL2OnCpu
    set_threads = faiss.omp_set_num_threads
    faiss.omp_set_num_threads = lambda n: set_threads(min(n, os.cpu_count() or n))


def run_authors(repo: Path, features: np.ndarray, iterations: int, workdir: Path) -> tuple[Recorder, dict]:
    """Their main() on ``features`` until ``iterations`` + 1 optimiser steps; returns the recorder."""
    feature_dir = workdir / "features"
    feature_dir.mkdir()
    np.save(feature_dir / "bottle.npy", features)
    # Two test images: their script loads a test set before training; it is never reached.
    np.save(feature_dir / "bottle_test.npy", features[:2])
    np.save(feature_dir / "bottle_mask.npy", np.zeros((2, 224, 224), np.float32))
    np.save(feature_dir / "bottle_gt.npy", np.zeros(2, np.float32))

    rec = Recorder(iterations + 1)
    install_shims(rec)
    sys.path.insert(0, str(repo))
    import self_train_ad as authors  # their module: imports run here, with the shims in place

    def in_self_search(fn):
        def wrapped(*args, **kwargs):
            rec.in_self_search = True
            try:
                return fn(*args, **kwargs)
            finally:
                rec.in_self_search = False
        return wrapped

    authors.compute_distance = rec.phase("batch self-search (faiss)", in_self_search(authors.compute_distance))
    authors.find_matching = rec.phase("pair matching (Python)", authors.find_matching)

    step = torch.optim.RMSprop.step

    def counted_step(self, *args, **kwargs):
        out = step(self, *args, **kwargs)
        rec.marks.append(time.perf_counter())
        if len(rec.marks) >= rec.steps:
            raise _Done
        return out

    torch.optim.RMSprop.step = counted_step
    sys.argv = ["self_train_ad.py", *AUTHORS_ARGS, "--feature_path", str(feature_dir),
                "--save_path", str(workdir / "save")]
    settings = {"detect_anomaly": None}
    try:
        with contextlib.redirect_stdout(sys.stderr):
            authors.main()
    except _Done:
        settings["detect_anomaly"] = torch.is_anomaly_enabled()
    finally:
        torch.optim.RMSprop.step = step
    if len(rec.marks) < rec.steps:
        raise SystemExit(f"bench_authors: their loop ended after {len(rec.marks)} steps, before {rec.steps}")
    return rec, settings


def run_ours(name: str, features: torch.Tensor, repeats: int) -> tuple[list[dict], dict]:
    """funad's faithful iteration (``paper`` or ``paper+bf16``) on the same features: phases of ``repeats`` iterations."""
    n = features.shape[0]
    device = torch.device("cpu")
    source = TensorSource(features)
    cfg = preset_config(name, batch_size=BATCH)
    net = LocalNet(D, generator=torch.Generator().manual_seed(0))
    opt = torch.optim.RMSprop(net.parameters(), lr=cfg.lr, momentum=cfg.momentum)
    state = {"backend": "auto", "host_gen": torch.Generator().manual_seed(1),
             "noise_gen": torch.Generator().manual_seed(2)}
    one_iteration(cfg, net, opt, source, device, True, state)  # warm-up
    runs = [one_iteration(cfg, net, opt, source, device, True, state) for _ in range(repeats)]
    return runs, {"bank_rows": state["bank_rows"], "pairs": state["pairs"], "n": n}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--authors-repo", type=Path, required=True,
                        help="a clone of https://github.com/HY-Vision-Lab/FUNAD (needs self_train_ad.py, model.py)")
    parser.add_argument("--n", type=int, default=230, help="training images (bottle at 10%%: 209 + 21)")
    parser.add_argument("--iterations", type=int, default=3,
                        help="timed iterations of each loop (after one warm-up); at most N // 32 - 1")
    args = parser.parse_args()
    repo = args.authors_repo.expanduser().resolve()
    missing = [f for f in ("self_train_ad.py", "model.py") if not (repo / f).is_file()]
    if missing:
        raise SystemExit(f"bench_authors: {repo} has no {', '.join(missing)}; pass --authors-repo a clone of "
                         "https://github.com/HY-Vision-Lab/FUNAD")
    if not 1 <= args.iterations <= args.n // BATCH - 1:
        raise SystemExit(f"bench_authors: --iterations must be 1..{args.n // BATCH - 1} for N={args.n} (their "
                         "loop evaluates at the end of the first epoch, which this harness does not run)")
    if torch.cuda.is_available():
        raise SystemExit("bench_authors: a GPU is visible, and their script would move to it while funad's loop "
                         "runs on the CPU. This harness compares CPUs only: run it with CUDA_VISIBLE_DEVICES=''")

    features = torch.randn(args.n, P, D, generator=torch.Generator().manual_seed(0))
    print("# The authors' training iteration against funad's faithful one\n")
    print(f"- machine: {platform.machine()}, {os.cpu_count()} logical CPUs, torch threads {torch.get_num_threads()}, "
          f"torch {torch.__version__}; faiss GPUs visible: {__import__('faiss').get_num_gpus()}")
    print(f"- problem: N={args.n} images, P={P}, D={D}, batch {BATCH}, synthetic N(0,1) features (seed 0), the "
          f"same array for both loops; {args.iterations} timed iterations each, after one warm-up")
    q = BATCH * P

    peak_ours = matmul_flops(torch.device("cpu"), D, repeats=5)
    print(f"\n- float32 matmul (8192x{D} @ {D}x8192) just before funad's loops: **{peak_ours / 1e9:.1f} GFLOP/s**; "
          "funad's pair FLOPs count the half of the symmetric Q x Q matrix that it computes")
    ours = {}  # name -> (iteration times, GFLOP per iteration)
    for name in ("paper", "paper+bf16"):
        runs, info = run_ours(name, features, args.iterations)
        mean_phases = {k: (float(np.mean([r[k][0] for r in runs])), float(np.mean([r[k][1] for r in runs])))
                       for k in runs[0]}
        # bench_fit counts the pairs' full Q x Q distance matrix; funad computes each symmetric block once.
        pairs_s, pairs_f = mean_phases["mutual pairs"]
        mean_phases["mutual pairs"] = (pairs_s, pairs_f / 2)
        table(f"funad `--preset {name}`: mean of {len(runs)} iterations; last bank {info['bank_rows']} rows, "
              f"{info['pairs']} mutual pairs", mean_phases, peak_ours)
        ours[name] = ([sum(s for s, _ in r.values()) for r in runs], sum(f for _, f in mean_phases.values()))

    peak_theirs = matmul_flops(torch.device("cpu"), D)
    with tempfile.TemporaryDirectory(prefix="bench_authors_") as tmp:
        rec, settings = run_authors(repo, features.numpy(), args.iterations, Path(tmp))
    rows = rec.per_iteration()
    theirs = [r["total"] for r in rows]
    bank = rec.bank_rows[-len(rows):] if rec.bank_rows else []
    m_bank = float(np.mean(bank)) if bank else float("nan")
    # Their iteration's work: the rebuild's forward over every image, a no-grad forward of the batch, the bank
    # search, the batch's full self-search (k = 2), and a forward of the batch and of its noisy copy with both
    # backward passes (backward = 2x forward).
    theirs_flops = (net_flops(args.n * P, D) + 7 * net_flops(q, D) + 2.0 * q * m_bank * D + 2.0 * q * q * D)
    peak_after = matmul_flops(torch.device("cpu"), D)
    peak = max(peak_ours, peak_theirs, peak_after)
    print(f"\n- float32 matmul just before their loop: **{peak_theirs / 1e9:.1f} GFLOP/s**, and after it "
          f"{peak_after / 1e9:.1f}; the \"% of peak\" columns below use the highest of the three, "
          f"{peak / 1e9:.1f}")
    print(f"\n### The authors' loop (their `self_train_ad.py`, README command): {len(rows)} iterations; bank "
          f"{', '.join(str(b) for b in bank)} rows; autograd anomaly detection on: {settings['detect_anomaly']}\n")
    names = ["bank search (faiss)", "batch self-search (faiss)", "pair matching (Python)"]
    print("| iteration | " + " | ".join(names) + " | everything else | total (s) |")
    print("|---|" + "---|" * (len(names) + 2))
    for i, r in enumerate(rows, 1):
        parts = [r.get(n, 0.0) for n in names]
        print(f"| {i} | " + " | ".join(f"{p:.2f}" for p in parts)
              + f" | {r['total'] - sum(parts):.2f} | {r['total']:.2f} |")
    print(f"\n| loop | median iteration (s) | GFLOP per iteration | GFLOP/s | % of the matmul peak |")
    print("|---|---|---|---|---|")
    loops = [(f"funad --preset {name}", times, flops) for name, (times, flops) in ours.items()]
    for name, times, flops in loops + [("authors' self_train_ad.py", theirs, theirs_flops)]:
        t = median(times)
        print(f"| {name} | {t:.2f} | {flops / 1e9:.0f} | {flops / t / 1e9:.1f} | {flops / t / peak:.0%} |")
    print(f"\n- GFLOP per iteration depends on the bank, which each loop draws from its own network's scores: "
          f"funad's search counts its banks, theirs the mean of {m_bank:.0f} rows")
    for name, (times, flops) in ours.items():
        print(f"- **authors' / funad `{name}` median iteration time: {median(theirs) / median(times):.2f}x**; "
              f"FLOPs alone: {theirs_flops / flops:.2f}x (the work each loop does per iteration; the rest of the "
              "ratio is how fast each does it)")


if __name__ == "__main__":
    main()
