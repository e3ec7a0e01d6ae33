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
BB=(--backbone vit_small_patch14_dinov2 --weights "$W" --layer 7 --image-size "${IMAGE_SIZE:-392}" --precision fp32)
mkdir -p "$OUT" benchmarks/results
