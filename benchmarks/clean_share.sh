#!/usr/bin/env bash
# How the default's clean_share (the share of training images, lowest Local-Net scores first, whose features
# form the clean-image kNN bank) moves quality: 0.25, 0.5 (the default) and 0.75, 3 seeds. clean_share acts
# after training, so the sweep trains one Local-Net per seed and setting and scores it three ways (trained_by
# in results.csv); the 0.5 rows are the default's cells of benchmarks/scorer.sh, run again.
#   - bottle (the FUN-AD* cache, synthetic images off), 10% contamination, both overlap settings;
#   - KolektorSDD, natural contamination, in the paper's geometry and in full frame (KSDD_FULL).
# Every sweep resumes; the order below is the order of interest, so a partial run answers the first questions.
#
#   bash benchmarks/clean_share.sh                 # writes benchmarks/results/clean-share-{ksdd,bottle,ksdd-full}.md
#   TABLES_ONLY=1 bash benchmarks/clean_share.sh   # only the tables, from the sweeps as far as they have run
source "$(dirname "$0")/env.sh"
KSDD_FULL=${KSDD_FULL:-$OUT/ksdd_full.zarr}
SHARES=${SHARES:-0.25,0.5,0.75}
TABLES_ONLY=${TABLES_ONLY:-}

table() {  # result name, title, sweep folder
  [ -f "$3/results.csv" ] || return 0
  {
    echo "Command: \`SEEDS=$SEEDS SHARES=$SHARES bash benchmarks/clean_share.sh\` ($(uname -m), $(nproc) CPUs, $(date -u +%F)); $2."
    [ -n "$TABLES_ONLY" ] && echo "This table was written with TABLES_ONLY=1, from the sweeps as far as they had run: an empty cell was not run."
    echo
    "$BIN/python" benchmarks/combine_sweeps.py "$OUT/clean_share_$1" "$3"
  } > "benchmarks/results/clean-share-$1.md"
}

grid() {  # cache, folder, ratios, overlap
  "$BIN/funad" sweep "$1" -o "$2" --contamination "$3" --overlap "$4" --methods funad --set synthetic=off \
      --set clean_share="$SHARES" --seeds "$SEEDS"
}
if [ -z "$TABLES_ONLY" ]; then
  extract_syn ksdd
  grid "$OUT/ksdd_syn.zarr" "$OUT/clean_share_ksdd_sweep" 0 no-overlap
  extract_syn bottle
  grid "$OUT/bottle_syn.zarr" "$OUT/clean_share_bottle_sweep" 0.1 overlap
  "$BIN/funad" extract "$SHARED/data/ksdd" -o "$KSDD_FULL" --dataset ksdd "${BB[@]}" --geometry full
  grid "$KSDD_FULL" "$OUT/clean_share_ksdd_full_sweep" 0 no-overlap
  grid "$OUT/bottle_syn.zarr" "$OUT/clean_share_bottle_sweep" 0.1 no-overlap
fi

table ksdd "KolektorSDD in the paper's geometry, natural contamination" "$OUT/clean_share_ksdd_sweep"
table bottle "MVTec AD bottle, the FUN-AD* cache with its synthetic images off, 10% contamination" \
    "$OUT/clean_share_bottle_sweep"
table ksdd-full "KolektorSDD in full frame (--geometry full), natural contamination" "$OUT/clean_share_ksdd_full_sweep"
