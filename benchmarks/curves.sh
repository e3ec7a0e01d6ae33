#!/bin/bash
# Three-seed learning curves of the default preset on bottle (10%, no overlap) and KolektorSDD, 60 epochs
# (the default budget, so each model directory is a default fit: --eval-every changes no weight). Each point
# also holds the same weights' metrics with logit scores. EMA=0.98 adds the weight average (then the model
# is the average and the last weights' metrics go beside it). SCORER=clean_knn scores each point with a
# clean-image bank built from that epoch's weights (the Local-Net's own scores go beside it).
# Test metrics are a diagnostic; nothing is selected with them inside a fit.
#   BOTTLE=bottle.zarr KSDD=ksdd.zarr OUT=runs/curves bash benchmarks/curves.sh
#   python benchmarks/learning_curve.py runs/curves/bottle_s0 runs/curves/bottle_s1 runs/curves/bottle_s2
set -eu
BIN=${BIN:-.venv/bin}
OUT=${OUT:-runs/curves}
mkdir -p "$OUT"
for job in ${JOBS:-bottle:0 bottle:1 bottle:2 ksdd:0 ksdd:1 ksdd:2}; do
  data=${job%:*}; s=${job#*:}
  out=$OUT/${data}_s$s
  [ -f "$out/model.safetensors" ] && continue
  if [ "$data" = bottle ]; then cache=${BOTTLE:?set BOTTLE}; extra="--contamination 0.1 --no-overlap"
  else cache=${KSDD:?set KSDD}; extra=""; fi
  $BIN/funad fit "$cache" -o "$out" $extra --preset "${PRESET:-fast}" --seed "$s" --eval-every "${EVERY:-5}" ${EMA:+--set ema=$EMA} ${SCORER:+--set scorer=$SCORER} --epochs "${EPOCHS:-60}" \
      $([ -f "$out/config.json" ] && echo --resume) > "$out.log" 2>&1
done
