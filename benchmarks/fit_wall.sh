#!/usr/bin/env bash
# Wall time of a whole `funad fit` (bottle, 10% contamination, no overlap, seed 0), in fp32 and with
# bf16 autocast, one after the other, with the float32 and bfloat16 matmul peaks measured in the same run.
# Run it alone on the machine; it writes benchmarks/results/fit-wall.md (RESULT overrides the file).
# ARMS picks the fits, in order: fp32 (the default preset), bf16 (--set bf16=true), fast (--preset fast: the
# same training, the Local-Net's own scores), fast_bf16, and iters=N (the default with --set max_iterations=N,
# a shorter training budget: benchmarks/budget.sh measures its quality).
#
#   bash benchmarks/fit_wall.sh [CACHE]      # default CACHE: bench_out/bottle.zarr (benchmarks/quality.sh makes it)
#   ARMS="fast fp32" RESULT=benchmarks/results/fit-wall-scorer.md bash benchmarks/fit_wall.sh CACHE
#   ARMS="fp32 iters=210 iters=105" bash benchmarks/fit_wall.sh CACHE
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${BIN:-.venv/bin}
CACHE=${1:-bench_out/bottle.zarr}
ARMS=${ARMS:-fp32 bf16}
RESULT=${RESULT:-benchmarks/results/fit-wall.md}
OUT=$(mktemp -d)
trap 'rm -rf "$OUT"' EXIT
peaks() {
  (cd benchmarks && "../$BIN/python" -c "
import torch
from bench_fit import matmul_flops
from funad.ops import cpu_field
cpu = torch.device('cpu')
# Without AVX512-BF16 a bfloat16 matmul is emulated: its peak takes many minutes and is not a peak.
bf16 = 'avx512_bf16' in cpu_field('flags').split()
print(f'{matmul_flops(cpu, 768) / 1e9:.0f} / ' + (f'{matmul_flops(cpu, 768, dtype=torch.bfloat16) / 1e9:.0f}' if bf16 else 'n/a (no AVX512-BF16)'))")
}
{
  echo "# Whole default fits, wall time"
  echo
  echo "Command: \`ARMS=\"$ARMS\" bash benchmarks/fit_wall.sh $CACHE\` ($(uname -m), $(nproc) CPUs, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs), $(date -u +%F))"
  echo
  echo "| fit | wall s | matmul peak before, fp32 / bf16 GFLOP/s |"
  echo "|---|---|---|"
  for arm in $ARMS; do
    peak=$(peaks)
    case $arm in
      fp32) set_args=() ;;
      bf16) set_args=(--set bf16=true) ;;
      fast) set_args=(--preset fast) ;;
      fast_bf16) set_args=(--preset fast --set bf16=true) ;;
      iters=[0-9]*) set_args=(--set "max_iterations=${arm#iters=}") ;;
      *) echo "fit_wall.sh: unknown arm '$arm' (fp32, bf16, fast, fast_bf16, iters=N)" >&2; exit 2 ;;
    esac
    start=$(date +%s.%N)
    "$BIN/funad" fit "$CACHE" -o "$OUT/${arm/=/_}" --contamination 0.1 --no-overlap --seed 0 "${set_args[@]}" >/dev/null 2>&1
    end=$(date +%s.%N)
    echo "| $arm${set_args[*]:+ (${set_args[*]})} | $(python3 -c "print(f'{$end - $start:.0f}')") | $peak |"
  done
  echo
  echo "Wall time includes the CLI's start-up (imports), loading the features, the fit and the unlabelled thresholds."
} | tee "$RESULT"
