#!/usr/bin/env bash
# The GPU checks no development machine could run so far, as one script for a machine with NVIDIA
# GPUs: CUDA pretraining runs and is timed in f32 and bf16 (ViT-T, the paper's view sizes), and
# with two or more GPUs the data-parallel run is timed too. Results go to $OUT (default
# gpu-check/): each run folder's metrics.csv has views/s per step; summary.txt has the medians.
#
# Usage: scripts/gpu-check.sh [path/to/glmae-train built with --features cuda]
set -euo pipefail
bin="${1:-target/release/glmae-train}"
out="${OUT:-gpu-check}"
steps="${STEPS:-12}"
mkdir -p "$out"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/gpus.csv"
gpus=$(($(wc -l < "$out/gpus.csv") - 1))

"$bin" make-phantoms --out "$out/phantoms" --count 4
data="$out/phantoms/dataset.json"
run() {
  local name="$1"; shift
  rm -rf "${out:?}/$name"
  "$bin" pretrain --data "$data" --model vit-t --steps "$steps" --warmup-steps 2 --out "$out/$name" "$@"
  # Median views/s over the steps after the first two (kernel compilation and autotuning).
  python3 - "$out/$name/metrics.csv" "$name" >> "$out/summary.txt" <<'PY'
import csv, statistics, sys
rows = list(csv.DictReader(open(sys.argv[1])))
vps = [float(r["views_per_s"]) for r in rows[2:]]
print(f"{sys.argv[2]}: median {statistics.median(vps):.2f} views/s over {len(vps)} steps, last loss {rows[-1]['loss']}")
PY
}
: > "$out/summary.txt"
run cuda-f32 --device cuda:0 --batch-size 2
run cuda-bf16 --device cuda:0 --batch-size 2 --precision bf16
if [ "$gpus" -ge 2 ]; then
  run cuda-ddp --device cuda:all --batch-size $((2 * gpus))
fi
cat "$out/summary.txt"
