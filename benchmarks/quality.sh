#!/usr/bin/env bash
# Quality grid on the real data in ../shared/data with the offline stand-in
# backbone (vit_small_patch14_dinov2, block 7, 392 px). Writes
# benchmarks/results/quality-*.md, which benchmarks/assemble.py puts into
# BENCHMARKS.md. Every figure is a mean ± std over SEEDS (at least 3).
#
#   bash benchmarks/quality.sh                                  # the default grid below
#   SETS="bank_rule=minmax,rank" bash benchmarks/quality.sh     # compare settings of FUN-AD
#   RATIOS=0,0.01,0.05,0.1,0.2 bash benchmarks/quality.sh       # the paper's contamination curve
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${BIN:-.venv/bin}
SHARED=${SHARED:-../shared}
OUT=${OUT:-bench_out}
RATIOS=${RATIOS:-0,0.1}
SEEDS=${SEEDS:-0,1,2}
METHODS=${METHODS:-funad:fast,knn,softpatch}
SETS=${SETS:-}
BOTTLE=${BOTTLE:-$OUT/bottle.zarr}
KSDD=${KSDD:-$OUT/ksdd.zarr}
W=$SHARED/weights/vit_small_patch14_dinov2.imgfocus.safetensors
BB=(--backbone vit_small_patch14_dinov2 --weights "$W" --layer 7 --image-size 392)
SET_ARGS=()
[ -n "$SETS" ] && for s in $SETS; do SET_ARGS+=(--set "$s"); done

mkdir -p "$OUT" benchmarks/results
"$BIN/funad" extract "$SHARED/data/mvtec_ad/bottle" -o "$BOTTLE" --dataset mvtec "${BB[@]}"
"$BIN/funad" sweep "$BOTTLE" -o "$OUT/sweep_bottle" --contamination "$RATIOS" --overlap both \
    --methods "$METHODS" --seeds "$SEEDS" "${SET_ARGS[@]}"
# KolektorSDD's training items already hold defective images (about 13%,
# split by item folder), so its natural contamination is the setting: ratio 0.
"$BIN/funad" extract "$SHARED/data/ksdd" -o "$KSDD" --dataset ksdd "${BB[@]}"
"$BIN/funad" sweep "$KSDD" -o "$OUT/sweep_ksdd" --contamination 0 --overlap no-overlap \
    --methods "$METHODS" --seeds "$SEEDS" "${SET_ARGS[@]}"

for name in bottle ksdd; do
  {
    echo "Command: \`RATIOS=$RATIOS SEEDS=$SEEDS METHODS=$METHODS SETS=\"$SETS\" bash benchmarks/quality.sh\` ($(uname -m), $(nproc) CPUs, $(date -u +%F))"
    echo
    cat "$OUT/sweep_$name/results.md"
  } > "benchmarks/results/quality-$name.md"
done
