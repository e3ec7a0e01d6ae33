#!/usr/bin/env bash
# Issue 8's reduced-grid ablation: the faithful loop (--preset paper: bank rebuilt every iteration, all patches,
# fp32, lr 2e-5) against each speed option of the default preset switched on alone, and against the default
# preset, at P = 196 (the stand-in backbone at 196 px: a 14 x 14 grid), equal epochs, 3 seeds, bottle at 10%
# without overlap and KolektorSDD (natural contamination).
#
# The default preset's patch counts are set for P = 784. At P = 196 the "scaled" variants keep the same shares:
# batch_patches 16 of 196 (64 of 784) and bank_patches 1024 (4096 for a bank 4x larger). "fast" is the preset
# unchanged, as a user would run it on a 196-patch cache; "default" is the default preset (cleaned: fast's
# training capped at 210 iterations, then the clean-image kNN scorer).
#
#   bash benchmarks/ablation.sh                                   # bottle, then KolektorSDD; resumes
#   DATASETS=bottle VARIANTS="paper fast every14" bash benchmarks/ablation.sh
#   EPOCHS=20 VARIANTS="paper default" bash benchmarks/ablation.sh   # a second budget, in its own tables
#
# The tables are results/ablation-{bottle,ksdd}196.md at 60 epochs and ablation-{bottle,ksdd}196-e<EPOCHS>.md at
# any other budget, so rows of two budgets never share a table (ablation.py resumes by variant and seed only).
IMAGE_SIZE=196
source "$(dirname "$0")/env.sh"
EPOCHS=${EPOCHS:-60}
DATASETS=${DATASETS:-bottle ksdd}
VARIANTS=${VARIANTS:-paper fast default every14 fast_scaled pool64 bankpatches1024 batchpatches16 lr1e-4}
declare -A SPEC=(
  [paper]="paper=paper"
  [fast]="fast=fast"
  [default]="default=cleaned"
  [fast_scaled]="fast_scaled=fast:batch_patches=16,bank_patches=1024"
  [every14]="every14=paper:bank_every=14"
  [pool64]="pool64=paper:bank_pool=64"
  [bankpatches1024]="bankpatches1024=paper:bank_patches=1024"
  [batchpatches16]="batchpatches16=paper:batch_patches=16"
  [lr1e-4]="lr1e-4=paper:lr=1e-4"
)
suffix=""
[ "$EPOCHS" = 60 ] || suffix="-e$EPOCHS"
args=()
for v in $VARIANTS; do args+=(--variant "${SPEC[$v]}"); done
for name in $DATASETS; do
  case $name in
    bottle) data=$SHARED/data/mvtec_ad/bottle; kind=mvtec; ratio=0.1 ;;
    ksdd) data=$SHARED/data/ksdd; kind=ksdd; ratio=0 ;;
    *) echo "ablation.sh: unknown dataset '$name' in DATASETS; use bottle and/or ksdd" >&2; exit 2 ;;
  esac
  "$BIN/funad" extract "$data" -o "$OUT/${name}196.zarr" --dataset "$kind" "${BB[@]}"
  "$BIN/python" benchmarks/ablation.py "$OUT/${name}196.zarr" --ratio "$ratio" --seeds "$SEEDS" --epochs "$EPOCHS" \
      "${args[@]}" --out "benchmarks/results/ablation-${name}196$suffix"
done
