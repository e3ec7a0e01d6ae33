#!/usr/bin/env bash
# Quality grid on the real data in ../shared/data with the offline stand-in
# backbone (vit_small_patch14_dinov2, block 7, 392 px). Writes
# benchmarks/results/quality-*.md, which benchmarks/assemble.py puts into
# BENCHMARKS.md.
#
# The defaults are what fits in well under an hour on a 2-core CPU. The grid
# issue 5 asks for is:
#   RATIOS=0,0.01,0.03,0.05,0.1,0.2 SEEDS=0,1,2 METHODS=funad,funad:paper,knn bash benchmarks/quality.sh
# (funad:paper is 1500 epochs and needs a GPU; see BENCHMARKS.md).
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${BIN:-.venv/bin}
SHARED=${SHARED:-../shared}
OUT=${OUT:-bench_out}
RATIOS=${RATIOS:-0.1}
SEEDS=${SEEDS:-0}
METHODS=${METHODS:-funad,knn}
W=$SHARED/weights/vit_small_patch14_dinov2.imgfocus.safetensors
BB=(--backbone vit_small_patch14_dinov2 --weights "$W" --layer 7 --image-size 392)

mkdir -p "$OUT" benchmarks/results
"$BIN/funad" extract "$SHARED/data/mvtec_ad/bottle" -o "$OUT/bottle.zarr" --dataset mvtec "${BB[@]}"
"$BIN/funad" sweep "$OUT/bottle.zarr" -o "$OUT/sweep_bottle" --contamination "$RATIOS" --overlap both \
    --methods "$METHODS" --seeds "$SEEDS"
# KolektorSDD's training items already hold defective images (about 13%,
# split by item folder), so its natural contamination is the setting: ratio 0.
"$BIN/funad" extract "$SHARED/data/ksdd" -o "$OUT/ksdd.zarr" --dataset ksdd "${BB[@]}"
"$BIN/funad" sweep "$OUT/ksdd.zarr" -o "$OUT/sweep_ksdd" --contamination 0 --overlap no-overlap \
    --methods "$METHODS" --seeds "$SEEDS"

for name in bottle ksdd; do
  {
    echo "Command: \`RATIOS=$RATIOS SEEDS=$SEEDS METHODS=$METHODS bash benchmarks/quality.sh\` ($(uname -m), $(nproc) CPUs, $(date -u +%F))"
    echo
    cat "$OUT/sweep_$name/results.md"
  } > "benchmarks/results/quality-$name.md"
done
