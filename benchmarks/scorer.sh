#!/usr/bin/env bash
# The Local-Net's own scores against scorer=clean_knn (a kNN over the training images the final Local-Net scores
# lowest), on the same fits: scoring is done after training, so the two arms of one seed share their Local-Net.
# With PatchCore (knn) and SoftPatch on the same splits. 3 seeds; every sweep resumes.
#   - bottle (the comparison's FUN-AD* cache, synthetic images off): 0, 1 and 10%, both overlap settings;
#   - KolektorSDD, natural contamination, in the paper's geometry (the same cache) and in full frame
#     (KSDD_FULL, extracted with --geometry full), there also with the clean-image bank capped.
# The Local-Net and baseline rows of bottle and paper-geometry KolektorSDD are the cells of
# benchmarks/comparison.sh (the sweeps below find them in its folders and skip them).
#
#   bash benchmarks/scorer.sh     # writes benchmarks/results/scorer-{bottle,ksdd,ksdd-full}.md
#   TABLES_ONLY=1 bash benchmarks/scorer.sh   # only the tables, from the sweeps as far as they have run
source "$(dirname "$0")/env.sh"
KSDD_FULL=${KSDD_FULL:-$OUT/ksdd_full.zarr}

TABLES_ONLY=${TABLES_ONLY:-}
table() {  # result name, title, then combine_sweeps arguments
  local name=$1 title=$2
  shift 2
  {
    echo "Command: \`SEEDS=$SEEDS bash benchmarks/scorer.sh\` ($(uname -m), $(nproc) CPUs, $(date -u +%F)); $title."
    [ -n "$TABLES_ONLY" ] && echo "This table was written with TABLES_ONLY=1, from the sweeps as far as they had run: an empty cell was not run."
    echo
    "$BIN/python" benchmarks/combine_sweeps.py "$@"
  } > "benchmarks/results/scorer-$name.md"
}

sweep_pair() {  # name, ratios, overlap
  local name=$1 cache="$OUT/${1}_syn.zarr"
  extract_syn "$name"
  # The Local-Net's cells exactly as comparison.sh names them (its scorer is the preset's), then clean_knn's.
  "$BIN/funad" sweep "$cache" -o "$OUT/sweep_${name}_syn" --contamination "$2" --overlap "$3" --methods funad:fast \
      --set synthetic=off --seeds "$SEEDS"
  "$BIN/funad" sweep "$cache" -o "$OUT/sweep_${name}_syn" --contamination "$2" --overlap "$3" --methods funad:fast \
      --set synthetic=off --set scorer=clean_knn --seeds "$SEEDS"
  "$BIN/funad" sweep "$cache" -o "$OUT/cmp_${name}_base" --contamination "$2" --overlap "$3" \
      --methods knn,softpatch --seeds "$SEEDS"
}
if [ -z "$TABLES_ONLY" ]; then
  sweep_pair bottle 0,0.01,0.1 both
  sweep_pair ksdd 0 no-overlap
  "$BIN/funad" extract "$SHARED/data/ksdd" -o "$KSDD_FULL" --dataset ksdd "${BB[@]}" --geometry full
  "$BIN/funad" sweep "$KSDD_FULL" -o "$OUT/sweep_ksdd_full_scorer" --contamination 0 --overlap no-overlap \
      --methods funad:fast --set scorer=localnet,clean_knn --seeds "$SEEDS"
  # The clean-image bank capped at 16,384 patches (about 25k without the cap here; bottle's and the paper
  # geometry's banks are below it, so it changes nothing there).
  "$BIN/funad" sweep "$KSDD_FULL" -o "$OUT/sweep_ksdd_full_scorer" --contamination 0 --overlap no-overlap \
      --methods funad:fast --set scorer=clean_knn --set clean_max_patches=16384 --seeds "$SEEDS"
  "$BIN/funad" sweep "$KSDD_FULL" -o "$OUT/sweep_ksdd_full_base" --contamination 0 --overlap no-overlap \
      --methods knn,softpatch --seeds "$SEEDS"
fi

table bottle "MVTec AD bottle, the FUN-AD* cache with its synthetic images off" \
    "$OUT/scorer_bottle" "$OUT/sweep_bottle_syn" "$OUT/cmp_bottle_base" --ratios 0,0.01,0.1 \
    --match synthetic=off --match "knn|" --match "softpatch|"
table ksdd "KolektorSDD in the paper's geometry, natural contamination" \
    "$OUT/scorer_ksdd" "$OUT/sweep_ksdd_syn" "$OUT/cmp_ksdd_base" --ratios 0 \
    --match synthetic=off --match "knn|" --match "softpatch|"
full=("$OUT/sweep_ksdd_full_scorer")
[ -f "$OUT/sweep_ksdd_full_base/results.csv" ] && full+=("$OUT/sweep_ksdd_full_base")
table ksdd-full "KolektorSDD in full frame (--geometry full), natural contamination" "$OUT/scorer_ksdd_full" "${full[@]}"
