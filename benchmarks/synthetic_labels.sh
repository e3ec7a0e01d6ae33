#!/usr/bin/env bash
# Why FUN-AD* costs image AUROC on KolektorSDD: fit both arms (no synthetic images, and 5% pseudo-labelled
# ones) for seeds 0-2 with the default preset and --eval-every at the last epoch, then split the pseudo-labels'
# precision and recall between real and synthetic images (benchmarks/synthetic_labels.py).
#
#   CACHE=bench_out/ksdd_syn.zarr bash benchmarks/synthetic_labels.sh   # the cache benchmarks/synthetic.sh extracts
#   CACHE=bench_out/bottle_syn.zarr FIT_ARGS="--contamination 0.1" EVERY=60 NAME=bottle bash benchmarks/synthetic_labels.sh
source "$(dirname "$0")/env.sh"
CACHE=${CACHE:-$OUT/ksdd_syn.zarr}
NAME=${NAME:-ksdd}
EVERY=${EVERY:-53}  # the default preset's last epoch on KolektorSDD (420 iterations of 8 steps)
read -r -a EXTRA <<< "${FIT_ARGS:-}"
dirs=()
for seed in ${SEEDS//,/ }; do
  for arm in off pseudo; do
    d="$OUT/synthetic_labels_$NAME/${arm}_s$seed"
    flag=--synthetic; [ "$arm" = off ] && flag=--no-synthetic
    [ -f "$d/model.safetensors" ] || \
      "$BIN/funad" fit "$CACHE" -o "$d" --preset fast --seed "$seed" "$flag" --eval-every "$EVERY" --overwrite "${EXTRA[@]}"
    dirs+=("$d")
  done
done
{
  echo "Command: \`OUT=$OUT CACHE=$CACHE NAME=$NAME EVERY=$EVERY FIT_ARGS=\"${FIT_ARGS:-}\" bash benchmarks/synthetic_labels.sh\` ($(uname -m), $(nproc) CPUs, $(date -u +%F))"
  echo
  "$BIN/python" benchmarks/synthetic_labels.py "${dirs[@]}"
} > "benchmarks/results/synthetic-labels-$NAME.md"
cat "benchmarks/results/synthetic-labels-$NAME.md"
