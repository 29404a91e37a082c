#!/usr/bin/env bash
# Every row of docs/performance.md's glmae-infer section, interleaved: ROUNDS rounds (default 3)
# of all window variants at 1 and 2 threads plus onnxruntime and OpenVINO (PyTorch in round 1),
# then the per-layer table, the products-alone table, the agreement table and the whole-volume
# rows. Takes about 15 minutes on the 2-core development machine; needs
# `pip install torch monai einops onnx onnxruntime openvino`.
# Take the median of the rounds for each row.
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-target/infer}"
cargo bench -p glmae-infer --bench forward --no-run 2>&1 | tail -1
B=$(ls -t "$CARGO_TARGET_DIR"/release/deps/forward-* | grep -v '\.d$' | head -1)
lscpu | grep -E "Model name|MHz" || true
date; uptime
for r in $(seq 1 "${ROUNDS:-3}"); do
  echo "=== round $r $(date +%T)"
  for t in 1 2; do
    for cfg in "DEFAULT=1 window f32" "CONV_F2=1 window f32" "CONV_DIRECT=1 window f32" \
      "DEFAULT=1 window-bf16 f32" "DEFAULT=1 window int8" "DEFAULT=1 window-int8k int8" \
      "CONV_F2=1 window-int8k int8" "CONV_DIRECT=1 window-int8k int8"; do
      set -- $cfg
      env "$1" "$B" --child "$2" "$3" "$t" | sed "s/^/$1 /"
    done
  done
  skip=ort-dynamic
  [ "$r" = 1 ] || skip=ort-dynamic,torch
  python3 scripts/bench_infer_reference.py --reps 5 --threads 1,2 --skip "$skip" 2>&1 | grep RESULT
done
echo "=== layers $(date +%T)"
for l in "32 16 96" "16 16 96" "64 32 48" "32 32 48" "128 64 24" "64 64 24" "256 128 12" "128 128 12"; do
  for e in CONV_DIRECT=1 DEFAULT=1 CONV_F4=1 CONV_BF16=1 "CONV_INT8=1 CONV_DIRECT=1" CONV_INT8=1; do
    # shellcheck disable=SC2086
    env $e "$B" --child conv $l 1
  done
done
for l in "32 16 48" "64 32 24" "32 32 24"; do
  # shellcheck disable=SC2086
  "$B" --child up $l 1
done
echo "=== products $(date +%T)"
"$B" --child peak
for l in "16 16 12" "32 16 12" "64 32 12"; do
  for isa in avx2 best; do
    # shellcheck disable=SC2086
    ISA=$isa "$B" --child products $l
  done
done
echo "=== agreement $(date +%T)"
for e in DEFAULT=1 CONV_F2=1 CONV_DIRECT=1; do
  for p in f32 int8; do env "$e" "$B" --child agreement "$p" | sed "s/^/$e /"; done
done
echo "=== volume $(date +%T)"
"$B" --child volume f32 2
"$B" --child volume f32 1
"$B" --child volume int8 2
"$B" --child volume-int8k int8 2
echo "=== reference $(date +%T)"
"$B" --child reference f32
date
