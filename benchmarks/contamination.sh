#!/usr/bin/env bash
# The default preset across contamination: MVTec AD bottle (the FUN-AD* cache with its synthetic images off, as in
# benchmarks/comparison.sh and benchmarks/scorer.sh), both overlap settings, 3 seeds. RATIOS defaults to the two
# ratios scorer.sh did not run for the default (5% and 20%); comparison.sh has PatchCore (knn), SoftPatch and the
# Local-Net's own scores at every ratio, scorer.sh the default at 0, 1 and 10%. The sweep resumes.
#
#   bash benchmarks/contamination.sh                    # writes benchmarks/results/contamination-bottle.md
#   RATIOS=0,0.01,0.05,0.1,0.2 bash benchmarks/contamination.sh
#   TABLES_ONLY=1 bash benchmarks/contamination.sh      # only the table, from the sweep as far as it has run
source "$(dirname "$0")/env.sh"
RATIOS=${RATIOS:-0.05,0.2}
TABLES_ONLY=${TABLES_ONLY:-}

if [ -z "$TABLES_ONLY" ]; then
  extract_syn bottle
  "$BIN/funad" sweep "$OUT/bottle_syn.zarr" -o "$OUT/contamination_bottle_sweep" --contamination "$RATIOS" \
      --overlap both --methods funad --set synthetic=off --seeds "$SEEDS"
fi
[ -f "$OUT/contamination_bottle_sweep/results.csv" ] || exit 0
{
  echo "Command: \`SEEDS=$SEEDS RATIOS=$RATIOS bash benchmarks/contamination.sh\` ($(uname -m), $(nproc) CPUs, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs), $(date -u +%F)); MVTec AD bottle, the FUN-AD* cache with its synthetic images off, the default preset."
  [ -n "$TABLES_ONLY" ] && echo "This table was written with TABLES_ONLY=1, from the sweep as far as it had run: an empty cell was not run."
  echo
  "$BIN/python" benchmarks/combine_sweeps.py "$OUT/contamination_bottle" "$OUT/contamination_bottle_sweep" --ratios "$RATIOS"
} > benchmarks/results/contamination-bottle.md
