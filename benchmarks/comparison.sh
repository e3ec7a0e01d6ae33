#!/usr/bin/env bash
# The paper's comparison on one cache per dataset (issue 12): FUN-AD, PatchCore (kNN) and SoftPatch at
# 0/1/5/10/20% contamination (KolektorSDD: up to 10%, its 18 defective test images allow no more), both
# overlap settings, 3 seeds, with each method's fit and scoring time. It uses the caches benchmarks/synthetic.sh
# extracts: FUN-AD runs with the synthetic images off (`--set synthetic=off`), into that script's sweep folder,
# so the cells it already ran are reused (and its FUN-AD* rows appear in the table too); kNN and SoftPatch never
# train on synthetic images. About 4 hours of a 2-core CPU; every sweep resumes where it stopped.
#
#   bash benchmarks/comparison.sh     # writes benchmarks/results/comparison-{bottle,ksdd}.{md,png}
source "$(dirname "$0")/env.sh"

compare() {  # name (bottle or ksdd), ratios
  local name=$1 cache="$OUT/${1}_syn.zarr" table="benchmarks/results/comparison-$1.md" reading
  extract_syn "$name"
  "$BIN/funad" sweep "$cache" -o "$OUT/sweep_${name}_syn" --contamination "$2" --overlap both --methods funad:fast \
      --set synthetic=off --seeds "$SEEDS"
  "$BIN/funad" sweep "$cache" -o "$OUT/cmp_${name}_base" --contamination "$2" --overlap both \
      --methods knn,softpatch --seeds "$SEEDS"
  # A hand-written "## Reading" section at the end of the table survives a re-run.
  reading=$(sed -n '/^## Reading/,$p' "$table" 2>/dev/null || true)
  {
    echo "Command: \`SEEDS=$SEEDS bash benchmarks/comparison.sh\` ($(uname -m), $(nproc) CPUs, $(date -u +%F))"
    echo
    "$BIN/python" benchmarks/combine_sweeps.py "$OUT/cmp_$name" "$OUT/sweep_${name}_syn" "$OUT/cmp_${name}_base"
  } > "$table"
  cp "$OUT/cmp_$name/auroc_vs_contamination.png" "benchmarks/results/comparison-$name.png"
  echo "![AUROC against contamination, $name](benchmarks/results/comparison-$name.png)" >> "$table"
  if [ -n "$reading" ]; then printf '\n%s\n' "$reading" >> "$table"; fi
}
compare bottle 0,0.01,0.05,0.1,0.2
compare ksdd 0,0.01,0.05,0.1
