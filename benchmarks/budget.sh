#!/usr/bin/env bash
# What a shorter training budget costs: the default preset with max_iterations 105 and 210 (15 and 30 epochs
# of bottle) against its 420, 3 seeds, in the default geometry (full frame):
#   - bottle (the FUN-AD* cache in full frame, synthetic images off), 10% contamination, both overlap settings;
#   - KolektorSDD in full frame, natural contamination.
# The 420 rows are the default's cells of benchmarks/geometry.sh and benchmarks/ksdd_full.sh, read from their
# folders (run those first for them). Wall times are in fit-wall-*.md (fit_wall.sh's budget arms), not here:
# these fits share the cores. Every sweep resumes.
#
#   bash benchmarks/budget.sh                 # writes benchmarks/results/budget-{bottle,ksdd}.md
#   TABLES_ONLY=1 bash benchmarks/budget.sh   # only the tables, from the sweeps as far as they have run
source "$(dirname "$0")/env.sh"
KSDD_FULL=${KSDD_FULL:-$OUT/ksdd_full.zarr}
BUDGETS=${BUDGETS:-105,210}
TABLES_ONLY=${TABLES_ONLY:-}

if [ -z "$TABLES_ONLY" ]; then
  "$BIN/funad" extract "$SHARED/data/mvtec_ad/bottle" -o "$OUT/bottle_syn_full.zarr" --dataset mvtec "${BB[@]}" \
      --synthetic 0.05 --seed 0 --geometry full
  "$BIN/funad" sweep "$OUT/bottle_syn_full.zarr" -o "$OUT/budget_bottle_full_sweep" --contamination 0.1 \
      --overlap both --methods funad --set synthetic=off --set clean_share=0.5 --set max_iterations="$BUDGETS" \
      --seeds "$SEEDS"
  "$BIN/funad" extract "$SHARED/data/ksdd" -o "$KSDD_FULL" --dataset ksdd "${BB[@]}" --geometry full
  "$BIN/funad" sweep "$KSDD_FULL" -o "$OUT/budget_ksdd_full_sweep" --contamination 0 --overlap no-overlap \
      --methods funad --set max_iterations="$BUDGETS" --seeds "$SEEDS"
fi

table() {  # result name, title, folders...
  local name=$1 title=$2; shift 2
  local dirs=()
  for d in "$@"; do [ -f "$d/results.csv" ] && dirs+=("$d"); done
  [ ${#dirs[@]} -gt 0 ] || return 0
  {
    echo "Command: \`SEEDS=$SEEDS BUDGETS=$BUDGETS bash benchmarks/budget.sh\` ($(uname -m), $(nproc) CPUs, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs), $(date -u +%F)); $title."
    [ -n "$TABLES_ONLY" ] && echo "This table was written with TABLES_ONLY=1, from the sweeps as far as they had run: an empty cell was not run."
    echo
    "$BIN/python" benchmarks/combine_sweeps.py "$OUT/budget_$name" "${dirs[@]}"
  } > "benchmarks/results/budget-$name.md"
}
table bottle "MVTec AD bottle in full frame, synthetic images off, 10% contamination; max_iterations 420 is the default" \
    "$OUT/geometry_bottle_full_sweep" "$OUT/budget_bottle_full_sweep"
table ksdd "KolektorSDD in full frame, natural contamination; max_iterations 420 is the default" \
    "$OUT/ksdd_full_default_sweep" "$OUT/budget_ksdd_full_sweep"
