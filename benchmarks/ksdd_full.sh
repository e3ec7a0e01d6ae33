#!/usr/bin/env bash
# KolektorSDD in the default geometry (the full frame, --geometry full), natural contamination, 3 seeds: the
# default preset against SoftPatch and PatchCore (knn) on the same cache and splits, with the image F1 of each
# threshold rule (quantile, the default; mad; otsu) at the model's own unlabelled threshold. comparison.sh and
# scorer.sh ran the baselines in the paper's geometry only. The baselines' folder is scorer.sh's, so cells
# either script ran are reused; every sweep resumes.
#
#   bash benchmarks/ksdd_full.sh                  # writes benchmarks/results/ksdd-full.md
#   TABLES_ONLY=1 bash benchmarks/ksdd_full.sh    # only the table, from the sweeps as far as they have run
source "$(dirname "$0")/env.sh"
KSDD_FULL=${KSDD_FULL:-$OUT/ksdd_full.zarr}
TABLES_ONLY=${TABLES_ONLY:-}

if [ -z "$TABLES_ONLY" ]; then
  "$BIN/funad" extract "$SHARED/data/ksdd" -o "$KSDD_FULL" --dataset ksdd "${BB[@]}" --geometry full
  "$BIN/funad" sweep "$KSDD_FULL" -o "$OUT/ksdd_full_default_sweep" --contamination 0 --overlap no-overlap \
      --methods funad --seeds "$SEEDS"
  "$BIN/funad" sweep "$KSDD_FULL" -o "$OUT/sweep_ksdd_full_base" --contamination 0 --overlap no-overlap \
      --methods softpatch,knn --seeds "$SEEDS"
fi
sweeps=()
for d in "$OUT/ksdd_full_default_sweep" "$OUT/sweep_ksdd_full_base"; do
  [ -f "$d/results.csv" ] && sweeps+=("$d")
done
[ ${#sweeps[@]} -gt 0 ] || exit 0
{
  echo "Command: \`SEEDS=$SEEDS bash benchmarks/ksdd_full.sh\` ($(uname -m), $(nproc) CPUs, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs), $(date -u +%F)); KolektorSDD in full frame (--geometry full), natural contamination, the default preset against the baselines."
  [ -n "$TABLES_ONLY" ] && echo "This table was written with TABLES_ONLY=1, from the sweeps as far as they had run: an empty cell was not run."
  echo
  "$BIN/python" benchmarks/combine_sweeps.py "$OUT/ksdd_full" "${sweeps[@]}"
} > benchmarks/results/ksdd-full.md
