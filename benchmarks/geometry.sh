#!/usr/bin/env bash
# Which geometry the default preset should see on bottle: the paper's (squash to a square, centre crop: about a
# quarter of each image is never scored) against the full frame (--geometry full: for bottle's square images the
# whole image, resized, with the same 28 x 28 grid). 10% contamination, both overlap settings, 3 seeds, pixel
# metrics at the original images' size (pixels a geometry never scores count as missed) and in the cache's frame.
# Both caches hold the same 5% FUN-AD* synthetic images (seed 0), switched off here, so the paper-geometry cells
# are benchmarks/clean_share.sh's default cells (the same folder and keys: found there and skipped).
# KolektorSDD's two geometries are in geometry.md (benchmarks/scorer.sh runs its full frame).
#
# With BASELINES=1 it runs PatchCore (knn) and SoftPatch on the full-frame cache (the same splits and seeds) into
# geometry-bottle-baselines.md, beside the default's full-frame cells where a plain run made them (the README's
# bottle full-frame rows).
#
#   bash benchmarks/geometry.sh                 # writes benchmarks/results/geometry-bottle.md
#   BASELINES=1 bash benchmarks/geometry.sh     # writes benchmarks/results/geometry-bottle-baselines.md
#   TABLES_ONLY=1 bash benchmarks/geometry.sh   # only the table, from the sweeps as far as they have run
source "$(dirname "$0")/env.sh"
TABLES_ONLY=${TABLES_ONLY:-}
BASELINES=${BASELINES:-}

extract_full() {  # the FUN-AD* cache in full frame (the same 5% synthetic images as the paper-geometry one)
  "$BIN/funad" extract "$SHARED/data/mvtec_ad/bottle" -o "$OUT/bottle_syn_full.zarr" --dataset mvtec "${BB[@]}" \
      --synthetic 0.05 --seed 0 --geometry full
}
grid() {  # cache, folder
  "$BIN/funad" sweep "$1" -o "$2" --contamination 0.1 --overlap both --methods funad --set synthetic=off \
      --set clean_share=0.5 --seeds "$SEEDS"
}
if [ -n "$BASELINES" ]; then
  if [ -z "$TABLES_ONLY" ]; then
    extract_full
    "$BIN/funad" sweep "$OUT/bottle_syn_full.zarr" -o "$OUT/geometry_bottle_full_base" --contamination 0.1 \
        --overlap both --methods knn,softpatch --seeds "$SEEDS"
  fi
  dirs=()
  for d in geometry_bottle_full_sweep geometry_bottle_full_base; do [ -f "$OUT/$d/results.csv" ] && dirs+=("$OUT/$d"); done
  [ ${#dirs[@]} -gt 0 ] || exit 0
  {
    echo "Command: \`SEEDS=$SEEDS BASELINES=1 bash benchmarks/geometry.sh\` ($(uname -m), $(nproc) CPUs, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs), $(date -u +%F)); MVTec AD bottle in full frame (\`--geometry full\`), 10% contamination: PatchCore (knn) and SoftPatch, and the default preset (synthetic images off) where \`bash benchmarks/geometry.sh\` has run it, on the same cache, splits and seeds."
    [ -n "$TABLES_ONLY" ] && echo "This table was written with TABLES_ONLY=1, from the sweeps as far as they had run: an empty cell was not run."
    echo
    "$BIN/python" benchmarks/combine_sweeps.py "$OUT/geometry_bottle_full_cmp" "${dirs[@]}"
  } > benchmarks/results/geometry-bottle-baselines.md
  exit 0
fi
if [ -z "$TABLES_ONLY" ]; then
  extract_full
  grid "$OUT/bottle_syn_full.zarr" "$OUT/geometry_bottle_full_sweep"
  extract_syn bottle
  grid "$OUT/bottle_syn.zarr" "$OUT/clean_share_bottle_sweep"
fi
for d in geometry_bottle_full_sweep clean_share_bottle_sweep; do [ -f "$OUT/$d/results.csv" ] || exit 0; done
{
  echo "Command: \`SEEDS=$SEEDS bash benchmarks/geometry.sh\` ($(uname -m), $(nproc) CPUs, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs), $(date -u +%F)); MVTec AD bottle, the default preset, synthetic images off, 10% contamination. First table: the full frame (\`--geometry full\`); second: the paper geometry."
  [ -n "$TABLES_ONLY" ] && echo "This table was written with TABLES_ONLY=1, from the sweeps as far as they had run: an empty cell was not run."
  echo
  echo "## Full frame"
  echo
  "$BIN/python" benchmarks/combine_sweeps.py "$OUT/geometry_bottle_full" "$OUT/geometry_bottle_full_sweep" | sed 's/^#/##/'
  echo
  echo "## Paper geometry"
  echo
  "$BIN/python" benchmarks/combine_sweeps.py "$OUT/geometry_bottle_paper" "$OUT/clean_share_bottle_sweep" --ratios 0.1 \
      --match clean_share=0.5 | sed 's/^#/##/'
} > benchmarks/results/geometry-bottle.md
