"""One FUN-AD training iteration, phase by phase, against matmul throughput.

Runs the same component calls as ``FunAD.fit`` on a synthetic bottle-sized
problem (default N=230 images, P=784 patches, D=768), times each phase of one
iteration of the faithful mode (``--preset paper``: bank rebuilt every step),
counts its floating-point operations, and compares the achieved FLOP/s with a
float32 matmul measured in the same run. Then times one iteration of the
"fast" preset (bank rebuild amortised over ``bank_every`` steps).

    python benchmarks/bench_fit.py                    # bottle size, D=768
    python benchmarks/bench_fit.py --d 1536           # the paper's D
    python benchmarks/bench_fit.py --n 64 --p 196     # shrink for a quick look
"""

from __future__ import annotations

import argparse
import os
import platform
import time

import numpy as np
import torch

from funad import preset
from funad.config import FunADConfig
from funad.data import TensorSource
from funad.localnet import LocalNet
from funad.memory_bank import (bank_candidates, draw_pool, gather_adapted, sample_bank_images, sample_bank_patches,
                               score_images)
from funad.nn import NNIndex, resolve_backend
from funad.ops import autocast
from funad.pairs import batch_mutual_pairs
from funad.perturb import draw_noise
from funad.pseudo_labels import ambiguous, normalise_distances, pseudo_labels
from funad.train_step import Targets, bank_distance, optimise


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def matmul_flops(device: torch.device, dim: int, repeats: int = 3, dtype: torch.dtype = torch.float32) -> float:
    """Best matmul FLOP/s for (8192, dim) x (dim, 8192) in ``dtype`` (float32 unless told)."""
    a = torch.randn(8192, dim, device=device).to(dtype)
    b = torch.randn(dim, 8192, device=device).to(dtype)
    a @ b
    best = float("inf")
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        a @ b
        sync(device)
        best = min(best, time.perf_counter() - start)
    return 2 * 8192 * 8192 * dim / best


def localnet_rate(device: torch.device, dim: int, bf16: bool, rows: int = 16384, repeats: int = 3) -> float:
    """Best Local-Net forward FLOP/s on ``rows`` features, fp32 or under bfloat16 autocast."""
    net = LocalNet(dim, generator=torch.Generator().manual_seed(0)).to(device)
    x = torch.randn(rows, dim, device=device)
    best = float("inf")
    with torch.no_grad():
        for _ in range(repeats + 1):
            sync(device)
            start = time.perf_counter()
            with autocast(device, bf16):
                net(x)
            sync(device)
            best = min(best, time.perf_counter() - start)
    return net_flops(rows, dim) / best


def net_flops(rows: int, dim: int) -> float:
    """Forward FLOPs of Local-Net on ``rows`` features."""
    return 2.0 * rows * (dim * dim + dim * 1024 + 1024 * 128 + 128)


def one_iteration(cfg: FunADConfig, net: LocalNet, opt, source: TensorSource, device: torch.device,
                  rebuild: bool, state: dict) -> dict:
    """Time and count one step of FunAD.fit's loop; returns {phase: (seconds, flops)}."""
    n, p, dim, batch = source.n_images, source.n_patches, source.dim, cfg.batch_size
    host_gen, noise_gen = state["host_gen"], state["noise_gen"]
    out = {}
    batch_idx = np.arange(batch)

    sync(device)
    t0 = time.perf_counter()
    if rebuild:
        pool = draw_pool(n, cfg.bank_pool, host_gen)
        scored = score_images(net, source, device, keep_adapted=True, bf16=cfg.bf16, images=pool)
        images = sample_bank_images(bank_candidates(scored.image_scores, cfg.tau_b), cfg.r, host_gen)
        bank, _ = sample_bank_patches(gather_adapted(net, source, images, scored, device, cfg.bf16),
                                      cfg.bank_patches, host_gen)
        state["index"] = NNIndex(state["backend"], device).fit(bank.float())
        state["scored"] = scored
    sync(device)
    t1 = time.perf_counter()
    out["bank rebuild"] = (t1 - t0, net_flops(min(n, cfg.bank_pool or n) * p, dim) if rebuild else 0.0)

    f = source.get(batch_idx).to(device)
    positions = None
    if cfg.batch_patches is not None and cfg.batch_patches < p:
        positions = torch.randperm(p, generator=host_gen)[:cfg.batch_patches].sort().values.to(device)
        f = f[:, positions]
    q = f.shape[0] * f.shape[1]
    with torch.no_grad():
        if rebuild and state["scored"].images.numel() == n:
            a = state["scored"].adapted[torch.as_tensor(batch_idx, device=device)]
            a = a if positions is None else a[:, positions]
            adapt_flops = 0.0
        else:
            with autocast(device, cfg.bf16):
                a = net.adapt(f)
            adapt_flops = 2.0 * q * dim * dim
        # The timing covers the search; identity exclusion only relabels its k columns.
        d = bank_distance(a.flatten(0, 1), state["index"], cfg.replace(self_exclusion="distance"))
        d_hat = normalise_distances(d)
        y, amb = pseudo_labels(d_hat, cfg.tau_n), ambiguous(d_hat, cfg.tau_n, cfg.tau_c)
        sync(device)
        t2 = time.perf_counter()
        out["NN search"] = (t2 - t1, adapt_flops + 2.0 * q * state["index"].n_bank_ * dim)
        pairs = batch_mutual_pairs(a)
    sync(device)
    t3 = time.perf_counter()
    out["mutual pairs"] = (t3 - t2, 2.0 * q * q * dim)

    optimise(net, opt, f, Targets(d, d_hat, y, amb, pairs), cfg, draw_noise(f, noise_gen))
    sync(device)
    out["forward/backward/step"] = (time.perf_counter() - t3, 3 * net_flops(q, dim))
    state["bank_rows"] = state["index"].n_bank_
    state["pairs"] = int(pairs.shape[0])
    return out


def preset_config(name: str, **overrides) -> FunADConfig:
    """``paper``, ``fast``, or either with ``+bf16`` (bfloat16 autocast switched on)."""
    base, _, extra = name.partition("+")
    if extra not in ("", "bf16"):
        raise SystemExit(f"unknown preset variant {name!r}: use NAME or NAME+bf16")
    return preset(base, **({"bf16": True} if extra else {}), **overrides)


def run_preset(name: str, args, source: TensorSource, device: torch.device) -> tuple[dict, dict]:
    """Mean phase times over the iterations of one bank cycle of preset ``name``."""
    cfg = preset_config(name, batch_size=min(32, args.n))
    net = LocalNet(source.dim, generator=torch.Generator().manual_seed(0)).to(device)
    opt = torch.optim.RMSprop(net.parameters(), lr=cfg.lr, momentum=cfg.momentum)
    state = {"backend": args.backend, "host_gen": torch.Generator().manual_seed(1),
             "noise_gen": torch.Generator(device=device).manual_seed(2)}
    one_iteration(cfg, net, opt, source, device, True, state)  # warm-up
    # The bank is rebuilt at the first step of each epoch and then every
    # bank_every steps: one rebuild per `cycle` steps. Time one step with a
    # rebuild and one without, and weight them 1 : (cycle - 1).
    cycle = min(cfg.bank_every, args.n // cfg.batch_size)
    with_rebuild = one_iteration(cfg, net, opt, source, device, True, state)
    without = one_iteration(cfg, net, opt, source, device, False, state) if cycle > 1 else with_rebuild
    totals = {}
    for phase in with_rebuild:
        (s1, f1), (s2, f2) = with_rebuild[phase], without[phase]
        totals[phase] = ((s1 + (cycle - 1) * s2) / cycle, (f1 + (cycle - 1) * f2) / cycle)
    return totals, {"bank_rows": state["bank_rows"], "pairs": state["pairs"], "cycle": cycle}


def table(title: str, phases: dict, peak: float) -> float:
    total_s = sum(s for s, _ in phases.values())
    total_f = sum(f for _, f in phases.values())
    print(f"\n### {title}\n")
    print("| phase | time (s) | share | GFLOP | GFLOP/s | % of matmul |")
    print("|---|---|---|---|---|---|")
    for phase, (s, f) in phases.items():
        print(f"| {phase} | {s:.3f} | {s / total_s:.0%} | {f / 1e9:.1f} | {f / s / 1e9:.1f} | {f / s / peak:.0%} |")
    print(f"| **iteration** | **{total_s:.3f}** | 100% | {total_f / 1e9:.1f} | {total_f / total_s / 1e9:.1f} "
          f"| **{total_f / total_s / peak:.0%}** |")
    return total_s


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=230, help="training images (bottle: 209 + 10%% contamination)")
    parser.add_argument("--p", type=int, default=784, help="patches per image")
    parser.add_argument("--d", type=int, default=768, help="feature dimension")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--backend", default="auto", choices=["auto", "torch", "faiss"],
                        help="nearest-neighbour back-end of the bank search (funad.nn)")
    parser.add_argument("--presets", default="paper,fast",
                        help="which presets to time (comma-separated; NAME+bf16 switches bf16 autocast on)")
    args = parser.parse_args()
    device = torch.device(args.device)
    gen = torch.Generator().manual_seed(0)
    source = TensorSource(torch.randn(args.n, args.p, args.d, generator=gen).to(device))

    print("# FUN-AD training iteration, phase by phase\n")
    print(f"- machine: {platform.machine()}, {os.cpu_count()} logical CPUs, torch threads "
          f"{torch.get_num_threads()}, torch {torch.__version__}, device {device}"
          + (f" ({torch.cuda.get_device_name()})" if device.type == "cuda" else ""))
    print(f"- problem: N={args.n} images, P={args.p} patches, D={args.d}, batch 32, synthetic N(0,1) features; "
          f"NN back-end '{resolve_backend(args.backend, device)}'")
    peak = matmul_flops(device, args.d)
    print(f"- float32 matmul (8192x{args.d} @ {args.d}x8192), same run: **{peak / 1e9:.1f} GFLOP/s**; bfloat16 "
          f"{matmul_flops(device, args.d, dtype=torch.bfloat16) / 1e9:.1f} GFLOP/s")
    cap = torch.backends.cpu.get_cpu_capability() if device.type == "cpu" else "n/a"
    fp32, bf16 = localnet_rate(device, args.d, False), localnet_rate(device, args.d, True)
    print(f"- Local-Net forward, 16384 patches, same run: fp32 {fp32 / 1e9:.1f} GFLOP/s, bf16 autocast "
          f"{bf16 / 1e9:.1f} GFLOP/s (bf16 / fp32 = {bf16 / fp32:.2f}; torch CPU capability {cap})")
    print("- FLOPs: Local-Net forward 2(D^2 + 1024D + 1024*128 + 128) per patch, backward = 2x forward; "
          "search 2*Q*M*D; pairs 2*Q^2*D (Q = batch patches, M = bank rows)")

    times = {}
    for name in args.presets.split(","):
        phases, info = run_preset(name, args, source, device)
        cfg = preset_config(name)
        iters = cfg.epochs_for(args.n) * (args.n // 32)
        title = (f"`--preset {name}`: mean iteration, one bank rebuild per {info['cycle']} steps (a step with and one "
                 f"without a rebuild, weighted 1 : {info['cycle'] - 1}); bank {info['bank_rows']} rows, "
                 f"{info['pairs']} mutual pairs")
        times[name] = table(title, phases, peak)
        print(f"\n- a whole `{name}` fit of N={args.n} images is {iters} iterations: about "
              f"{iters * times[name]:.0f} s at this rate (an estimate from the mean iteration)")
    first = next(iter(times))
    for name, secs in list(times.items())[1:]:
        print(f"- {name} / {first} iteration time: {secs / times[first]:.3f} (speed-up {times[first] / secs:.1f}x)")

if __name__ == "__main__":
    main()
