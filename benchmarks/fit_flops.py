"""Floating-point operations of one whole `funad fit`, phase by phase, counted while it runs.

Runs the fit that ``funad fit CACHE -o DIR --contamination R --no-overlap --seed S`` runs (the default preset
unless told), in this process, with PyTorch's FlopCounterMode counting every matrix product of the training
(forward and backward), the bank rebuilds, the searches, the clean-image bank and the threshold scoring.
faiss searches (funad's CPU back-end on non-Intel CPUs) run outside PyTorch; each is counted as the brute-force
product it computes, 2 * queries * bank * D. Element-wise work (activations, top-k, sorting) is not counted:
it is small next to the products.

A FLOP count does not depend on the machine or its load, so this can run beside other jobs. It turns the wall
time of a fit into a rate (FLOP/s) that can be set against a matmul peak, and gives a lower bound on the
fit's time on any other device: FLOPs / that device's peak. Such bounds are estimates, not measurements.

    python benchmarks/fit_flops.py CACHE [--contamination 0.1] [--seed 0] [--preset cleaned] [--epochs N]
"""

from __future__ import annotations

import argparse
import platform
import tempfile
import time
from collections import defaultdict
from contextlib import contextmanager

import torch
from torch.utils.flop_counter import FlopCounterMode

import funad.model as model_module
from funad.config import DEFAULT_PRESET
from funad.model import FunAD
from funad.nn import NNIndex
from funad.pipelines import fit as fit_pipeline
from funad.pipelines import thresholds

PHASES = {  # label: what the phase does
    "bank rebuild": "IRMB: the pool's Local-Net scores and adapted features, the bank",
    "search and pairs": "bank distances, pseudo-labels, mutual nearest-neighbour pairs",
    "training step": "Local-Net forward and backward on the perturbed batch, RMSprop",
    "clean-image bank": "the final Local-Net scores every training image; coreset of the kept half",
    "threshold scoring": "training images scored held out against the clean-image bank",
}


class Counter:
    """FLOPs and seconds per phase; a phase nested in another counts for the inner one."""

    def __init__(self, mode: FlopCounterMode) -> None:
        self.mode = mode
        self.flops: dict = defaultdict(float)
        self.seconds: dict = defaultdict(float)
        self.extra = 0.0  # faiss products, outside PyTorch
        self.stack: list = []

    def total(self) -> float:
        return float(self.mode.get_total_flops()) + self.extra

    @contextmanager
    def phase(self, name: str):
        outer = self.stack[-1] if self.stack else None
        start_f, start_t = self.total(), time.perf_counter()
        self.stack.append(name)
        try:
            yield
        finally:
            self.stack.pop()
            f, t = self.total() - start_f, time.perf_counter() - start_t
            self.flops[name] += f
            self.seconds[name] += t
            if outer is not None:  # the outer phase keeps only its own share
                self.flops[outer] -= f
                self.seconds[outer] -= t


def wrap(owner, attr: str, counter: Counter, name: str) -> None:
    inner = getattr(owner, attr)

    def wrapped(*args, **kwargs):
        with counter.phase(name):
            return inner(*args, **kwargs)

    setattr(owner, attr, wrapped)


def count_faiss(counter: Counter) -> None:
    search = NNIndex._search_faiss

    def counted(self, queries, k):
        counter.extra += 2.0 * queries.shape[0] * self.n_bank_ * self.dim_
        return search(self, queries, k)

    NNIndex._search_faiss = counted


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("cache")
    parser.add_argument("--contamination", type=float, default=0.1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--preset", default=DEFAULT_PRESET)
    parser.add_argument("--epochs", type=int, default=None, help="default: the preset's")
    args = parser.parse_args()

    mode = FlopCounterMode(display=False)
    counter = Counter(mode)
    wrap(FunAD, "_rebuild_bank", counter, "bank rebuild")
    wrap(model_module, "make_targets", counter, "search and pairs")
    wrap(model_module, "optimise", counter, "training step")
    wrap(FunAD, "_after_training", counter, "clean-image bank")
    wrap(thresholds, "training_scores", counter, "threshold scoring")
    count_faiss(counter)
    spec = fit_pipeline.FitSpec(preset=args.preset, epochs=args.epochs, seed=args.seed,
                                contamination=args.contamination, overlap=False)
    from bench_fit import matmul_flops  # benchmarks/ is on sys.path when this script runs

    peak = matmul_flops(torch.device("cpu"), 768)  # before the counting starts, so it is not counted
    with tempfile.TemporaryDirectory() as out, mode:
        start = time.perf_counter()
        with counter.phase("other"):
            result = fit_pipeline.fit(args.cache, out, spec, device="cpu")
        wall = time.perf_counter() - start
    total = sum(counter.flops.values())
    cfg = result.config["config"]
    print(f"# FLOPs of one `funad fit`, counted\n")
    print(f"Command: `python benchmarks/fit_flops.py {args.cache} --contamination {args.contamination} "
          f"--seed {args.seed} --preset {args.preset}" + (f" --epochs {args.epochs}" if args.epochs else "")
          + f"` ({platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__})\n")
    print(f"Fit: preset {args.preset}, {result.config['contamination']['n_train']} training images, "
          f"{cfg['epochs']} epochs at most ({cfg.get('max_iterations')} iterations), the features' D and P as "
          "cached.\n")
    print("| phase | what it does | GFLOP | share |")
    print("|---|---|---|---|")
    for name in list(PHASES) + ["other"]:
        what = PHASES.get(name, "loading, scheduling, writing, element-wise work")
        print(f"| {name} | {what} | {counter.flops[name] / 1e9:,.0f} | {counter.flops[name] / total:.1%} |")
    print(f"| **all** | | **{total / 1e9:,.0f}** | |\n")
    print(f"Wall time of this fit, counting included: {wall:.0f} s, {total / wall / 1e9:.0f} GFLOP/s on average, "
          f"against a float32 matmul peak of {peak / 1e9:.0f} GFLOP/s measured just before. Both are timings "
          "only when nothing else ran on the machine; the count holds either way.")


if __name__ == "__main__":
    main()
