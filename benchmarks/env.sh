# Sourced by the benchmark scripts: strict mode, the repository root, where things are (each overridable from
# the environment) and the offline stand-in backbone every quality figure uses (vit_small_patch14_dinov2 from
# ../shared/weights, block 7; IMAGE_SIZE 392 gives a 28 x 28 grid, 196 a 14 x 14 one).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
BIN=${BIN:-.venv/bin}
SHARED=${SHARED:-../shared}
OUT=${OUT:-bench_out}
SEEDS=${SEEDS:-0,1,2}
W=$SHARED/weights/vit_small_patch14_dinov2.imgfocus.safetensors
BB=(--backbone vit_small_patch14_dinov2 --weights "$W" --layer 7 --image-size "${IMAGE_SIZE:-392}" --precision fp32
    --geometry "${GEOMETRY:-paper}")
mkdir -p "$OUT" benchmarks/results

# extract_syn bottle|ksdd: the FUN-AD* cache $OUT/<name>_syn.zarr (5% synthetic images, seed 0), which
# synthetic.sh and comparison.sh make (synthetic_labels.sh reads it); a no-op once it is complete.
extract_syn() {
  case $1 in
    bottle) set -- bottle "$SHARED/data/mvtec_ad/bottle" mvtec ;;
    ksdd) set -- ksdd "$SHARED/data/ksdd" ksdd ;;
    *) echo "extract_syn: unknown dataset '$1' (bottle or ksdd)" >&2; return 1 ;;
  esac
  "$BIN/funad" extract "$2" -o "$OUT/$1_syn.zarr" --dataset "$3" "${BB[@]}" --synthetic 0.05 --seed 0
}
