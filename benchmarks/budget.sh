#!/usr/bin/env bash
# What a shorter training budget costs: the default preset with max_iterations 105 and 210 (15 and 30 epochs
# of bottle) against 420, 3 seeds, in the default geometry (full frame):
#   - bottle (the FUN-AD* cache in full frame, synthetic images off), 10% contamination, both overlap settings;
#   - KolektorSDD in full frame, natural contamination.
# The rows without max_iterations are the default's cells of benchmarks/geometry.sh and benchmarks/ksdd_full.sh,
# read from their folders (run those first for them): they ran the preset's own budget, 420 until the fifteenth
# session, when these tables made 210 the default. With PAPER=1, the default budget (PAPER_BUDGETS, 210) also
# runs in the paper's geometry, on the FUN-AD* caches of benchmarks/scorer.sh with their synthetic images off:
# bottle at 0 and 10% (both overlap settings) and KolektorSDD, beside scorer.sh's 420-iteration clean_knn cells
# where its folders exist. Wall times are in fit-wall-*.md (fit_wall.sh's budget arms), not here: these fits
# share the cores. Every sweep resumes.
#
#   bash benchmarks/budget.sh                 # writes benchmarks/results/budget-{bottle,ksdd}.md
#   PAPER=1 bash benchmarks/budget.sh         # also budget-{bottle,ksdd}-paper.md
#   TABLES_ONLY=1 bash benchmarks/budget.sh   # only the tables, from the sweeps as far as they have run
source "$(dirname "$0")/env.sh"
KSDD_FULL=${KSDD_FULL:-$OUT/ksdd_full.zarr}
BUDGETS=${BUDGETS:-105,210}
PAPER=${PAPER:-}
PAPER_BUDGETS=${PAPER_BUDGETS:-210}
TABLES_ONLY=${TABLES_ONLY:-}

if [ -z "$TABLES_ONLY" ] && [ -n "$PAPER" ]; then
  extract_syn bottle
  "$BIN/funad" sweep "$OUT/bottle_syn.zarr" -o "$OUT/budget_bottle_paper_sweep" --contamination 0,0.1 \
      --overlap both --methods funad --set synthetic=off --set max_iterations="$PAPER_BUDGETS" --seeds "$SEEDS"
  extract_syn ksdd
  "$BIN/funad" sweep "$OUT/ksdd_syn.zarr" -o "$OUT/budget_ksdd_paper_sweep" --contamination 0 \
      --overlap no-overlap --methods funad --set synthetic=off --set max_iterations="$PAPER_BUDGETS" --seeds "$SEEDS"
fi
if [ -z "$TABLES_ONLY" ] && [ -z "$PAPER" ]; then
  "$BIN/funad" extract "$SHARED/data/mvtec_ad/bottle" -o "$OUT/bottle_syn_full.zarr" --dataset mvtec "${BB[@]}" \
      --synthetic 0.05 --seed 0 --geometry full
  "$BIN/funad" sweep "$OUT/bottle_syn_full.zarr" -o "$OUT/budget_bottle_full_sweep" --contamination 0.1 \
      --overlap both --methods funad --set synthetic=off --set clean_share=0.5 --set max_iterations="$BUDGETS" \
      --seeds "$SEEDS"
  "$BIN/funad" extract "$SHARED/data/ksdd" -o "$KSDD_FULL" --dataset ksdd "${BB[@]}" --geometry full
  "$BIN/funad" sweep "$KSDD_FULL" -o "$OUT/budget_ksdd_full_sweep" --contamination 0 --overlap no-overlap \
      --methods funad --set max_iterations="$BUDGETS" --seeds "$SEEDS"
fi

table() {  # result name, title, folders..., then -- and combine_sweeps options
  local name=$1 title=$2; shift 2
  local dirs=()
  while [ $# -gt 0 ] && [ "$1" != "--" ]; do [ -f "$1/results.csv" ] && dirs+=("$1"); shift; done
  [ $# -gt 0 ] && shift
  [ ${#dirs[@]} -gt 0 ] || return 0
  {
    echo "Command: \`SEEDS=$SEEDS BUDGETS=$BUDGETS${PAPER:+ PAPER=$PAPER PAPER_BUDGETS=$PAPER_BUDGETS} bash benchmarks/budget.sh\` ($(uname -m), $(nproc) CPUs, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs), $(date -u +%F)); $title."
    [ -n "$TABLES_ONLY" ] && echo "This table was written with TABLES_ONLY=1, from the sweeps as far as they had run: an empty cell was not run."
    echo
    "$BIN/python" benchmarks/combine_sweeps.py "$OUT/budget_$name" "${dirs[@]}" "$@"
  } > "benchmarks/results/budget-$name.md"
}
OWN="the rows without max_iterations ran the preset's own budget: 420 until the fifteenth session, 210 since"
if [ -n "$PAPER" ]; then
  table bottle-paper "MVTec AD bottle in the paper's geometry, the FUN-AD* cache with its synthetic images off; \
funad:fast (scorer=clean_knn) is scorer.sh's cell, the old default's 420 iterations" \
      "$OUT/sweep_bottle_syn" "$OUT/budget_bottle_paper_sweep" -- --ratios 0,0.1 --match scorer=clean_knn \
      --match max_iterations=
  table ksdd-paper "KolektorSDD in the paper's geometry, natural contamination, the FUN-AD* cache with its synthetic \
images off; funad:fast (scorer=clean_knn) is scorer.sh's cell, the old default's 420 iterations" \
      "$OUT/sweep_ksdd_syn" "$OUT/budget_ksdd_paper_sweep" -- --ratios 0 --match scorer=clean_knn \
      --match max_iterations=
else
  table bottle "MVTec AD bottle in full frame, synthetic images off, 10% contamination; $OWN" \
      "$OUT/geometry_bottle_full_sweep" "$OUT/budget_bottle_full_sweep"
  table ksdd "KolektorSDD in full frame, natural contamination; $OWN" \
      "$OUT/ksdd_full_default_sweep" "$OUT/budget_ksdd_full_sweep"
fi
