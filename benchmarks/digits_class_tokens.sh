#!/bin/bash
# The image-level variant on scikit-learn's digits (benchmarks/digits_class_tokens.py): FUN-AD and kNN on the
# class tokens of the offline stand-in ViT, digit 0 normal, 10% contamination, 3 seeds.
# Usage: bash benchmarks/digits_class_tokens.sh OUT [WEIGHTS]
set -euo pipefail
OUT=${1:?usage: digits_class_tokens.sh OUT [WEIGHTS]}
WEIGHTS=${2:-../shared/weights/vit_small_patch14_dinov2.imgfocus.safetensors}
FUNAD=${FUNAD:-.venv/bin/funad}
PY=${PY:-.venv/bin/python}
[ -d "$OUT/data" ] || $PY benchmarks/digits_class_tokens.py make "$OUT/data"
$FUNAD extract "$OUT/data" -o "$OUT/digits.zarr" --dataset mvtec --backbone vit_small_patch14_dinov2 \
    --weights "$WEIGHTS" --image-size 112 --precision fp32
reports=()
for seed in 0 1 2; do
    for method in funad knn; do
        extra=(); [ $method = knn ] && extra=(--coreset-ratio 1)
        [ -f "$OUT/$method-s$seed/config.json" ] || \
            $FUNAD fit "$OUT/digits.zarr" -o "$OUT/$method-s$seed" --method $method --tokens class \
                --contamination 0.1 --seed $seed --overwrite "${extra[@]}"
        $FUNAD eval "$OUT/$method-s$seed" -o "$OUT/eval-$method-s$seed" --no-pictures
        reports+=("$OUT/eval-$method-s$seed")
    done
done
$PY benchmarks/digits_class_tokens.py table "${reports[@]}" | tee "$OUT/table.md"
