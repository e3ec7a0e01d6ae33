#!/usr/bin/env bash
# FUN-AD against FUN-AD* (5% synthetic anomalies made at extraction, paper Sec. 5.3 / supp. Table 1) on
# MVTec AD bottle at 0%, 1% and 10% contamination and on KolektorSDD (its natural contamination), 3 seeds,
# with the offline stand-in backbone (vit_small_patch14_dinov2, block 7, 392 px). The two arms run on one
# cache (--set synthetic=off,pseudo), so they see the same real features and the same splits.
#
# Order: bottle without overlap, KolektorSDD, bottle's overlap rows, then KolektorSDD with anomalies moved in
# at 1% and 10% (each sweep resumes where it stopped,
# and each step rewrites the results files, so a run cut short still reports what it measured).
#
#   bash benchmarks/synthetic.sh                       # writes benchmarks/results/synthetic-{bottle,ksdd}.md
#   ARMS=off,pseudo,mask bash benchmarks/synthetic.sh  # also the masks-as-labels variant (supp. Table 5)
#   OVERLAP=no-overlap bash benchmarks/synthetic.sh    # skip the overlap rows
source "$(dirname "$0")/env.sh"
ARMS=${ARMS:-off,pseudo}
OVERLAP=${OVERLAP:-both}

report() {
  for name in bottle ksdd; do
    [ -f "$OUT/sweep_${name}_syn/results.md" ] || continue
    {
      echo "Command: \`SEEDS=$SEEDS ARMS=$ARMS OVERLAP=$OVERLAP bash benchmarks/synthetic.sh\` ($(uname -m), $(nproc) CPUs, $(date -u +%F))"
      echo
      cat "$OUT/sweep_${name}_syn/results.md"
    } > "benchmarks/results/synthetic-$name.md"
  done
}
bottle_sweep() {
  "$BIN/funad" sweep "$OUT/bottle_syn.zarr" -o "$OUT/sweep_bottle_syn" --contamination 0,0.01,0.1 \
      --overlap "$1" --methods funad:fast --seeds "$SEEDS" --set "synthetic=$ARMS"
}
extract_syn bottle
bottle_sweep no-overlap
report
extract_syn ksdd
"$BIN/funad" sweep "$OUT/ksdd_syn.zarr" -o "$OUT/sweep_ksdd_syn" --contamination 0 --overlap no-overlap \
    --methods funad:fast --seeds "$SEEDS" --set "synthetic=$ARMS"
report
if [ "$OVERLAP" != no-overlap ]; then
  bottle_sweep "$OVERLAP"
  report
fi
# KolektorSDD with test anomalies moved into training on top of its natural contamination (issue 11's grid;
# its 18 defective test images run out before 10% of 256, so that row moves all of them)
"$BIN/funad" sweep "$OUT/ksdd_syn.zarr" -o "$OUT/sweep_ksdd_syn" --contamination 0,0.01,0.1 --overlap "$OVERLAP" \
    --methods funad:fast --seeds "$SEEDS" --set "synthetic=$ARMS"
report
