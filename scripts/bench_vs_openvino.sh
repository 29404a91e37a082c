#!/usr/bin/env bash
# glmae-infer against OpenVINO (its default precision and f32), onnxruntime and PyTorch on one
# 96^3 window of the ViT-T UNETR (feature size 16, 14 classes), at 1 and 2 threads, ROUNDS
# interleaved rounds (default 4; PyTorch in round 1 only): glmae-infer f32, its bf16 mode, an
# int8 file with --int8-kernels, then scripts/bench_infer_reference.py. BASE=path/to/an/older/
# forward-bench binary adds its f32 window to every round (before/after comparisons). Take the
# median of the rounds for each row (docs/performance.md, "Against OpenVINO"). About 8 minutes
# on the 2-core development machine; needs `pip install torch monai einops onnx onnxruntime openvino`.
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-target/infer}"
cargo bench -p glmae-infer --bench forward --no-run 2>&1 | tail -1
B=$(ls -t "$CARGO_TARGET_DIR"/release/deps/forward-* | grep -v '\.d$' | head -1)
lscpu | grep -E "Model name|Flags" | cut -c1-200 || true
date; uptime
for r in $(seq 1 "${ROUNDS:-4}"); do
  echo "=== round $r $(date +%T)"
  for t in 1 2; do
    if [ -n "${BASE:-}" ]; then "$BASE" --child window f32 "$t" | sed 's/^/BASE /'; fi
    "$B" --child window f32 "$t"
    "$B" --child window-bf16 f32 "$t"
    "$B" --child window-int8k int8 "$t"
  done
  skip=ort-dynamic,ort-static
  [ "$r" = 1 ] || skip=$skip,torch
  python3 scripts/bench_infer_reference.py --reps 5 --threads 1,2 --skip "$skip" 2>&1 | grep RESULT
done
date
