"""Compare the torch and faiss nearest-neighbour back-ends of funad.nn.

Measures exact k=2 search of a query set (one batch of patches, or a
subsample of it) against banks of realistic size, on the CPU (and on CUDA when
present), and prints a markdown table with the per-device winner. The "auto"
back-end of ``funad.nn`` follows these measurements.

    python benchmarks/bench_nn.py                      # default sizes
    python benchmarks/bench_nn.py --queries 2048 --banks 10000 40000 --dims 768
"""

from __future__ import annotations

import argparse
import os
import platform
import time

import torch

from funad.nn import NNIndex, faiss_available


def best_time(fn, repeats: int) -> float:
    fn()  # warm-up (allocations, faiss/torch thread pools)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--queries", type=int, default=4096, help="query vectors (a full batch is 32*P)")
    parser.add_argument("--banks", type=int, nargs="+", default=[10000, 40000, 70000])
    parser.add_argument("--dims", type=int, nargs="+", default=[768, 1536])
    parser.add_argument("--k", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()

    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    backends = ["torch"] + (["faiss"] if faiss_available() else [])
    print("# Nearest-neighbour back-ends (funad.nn)\n")
    print(f"- machine: {platform.machine()}, {os.cpu_count()} logical CPUs, torch threads "
          f"{torch.get_num_threads()}, torch {torch.__version__}"
          + (f", GPU {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ", no GPU"))
    if faiss_available():
        import faiss
        print(f"- faiss {faiss.__version__}, GPUs visible to faiss: {faiss.get_num_gpus()}")
    print(f"- exact k={args.k} search, {args.queries} queries, float32; best of {args.repeats} runs\n")
    print("| device | bank M | D | " + " | ".join(f"{b} (s)" for b in backends)
          + " | faiss / torch |")
    print("|---|---|---|" + "---|" * len(backends) + "---|")
    gen = torch.Generator().manual_seed(0)
    wins = {d: {b: 0 for b in backends} for d in devices}
    for device in devices:
        for dim in args.dims:
            queries = torch.randn(args.queries, dim, generator=gen).to(device)
            for m in args.banks:
                bank = torch.randn(m, dim, generator=gen).to(device)
                row = {}
                for backend in backends:
                    index = NNIndex(backend).fit(bank)
                    row[backend] = best_time(lambda: index.search(queries, args.k), args.repeats)
                winner = min(row, key=row.get)
                wins[device][winner] += 1
                ratio = f"{row['faiss'] / row['torch']:.2f}" if "faiss" in row else "-"
                print(f"| {device} | {m} | {dim} | " + " | ".join(f"{row[b]:.3f}" for b in backends)
                      + f" | {ratio} |")
                del bank
    print()
    for device, counts in wins.items():
        print(f"- {device}: faster back-end in {counts} (cases won)")


if __name__ == "__main__":
    main()
