#!/usr/bin/env bash
# The GPU checks a development machine cannot run, as one script for a machine with an NVIDIA GPU:
#   1. the whole quickstart pipeline (pretrain, fine-tune, evaluate, export, segment) at tiny
#      scale on CUDA, so every training and evaluation kernel runs once;
#   2. ViT-T GL-MAE pretraining timed in f32 and bf16 (the paper's view sizes), with two or more
#      GPUs the data-parallel run, the same pretraining on the machine's CPU cores (flex), and the
#      same step in PyTorch on the GPU (stage group `timing`);
#      (TORCH=0 skips the PyTorch rows);
#   3. more loader threads, bigger batches and ViT-B (`scaling`);
#   4. the quickstart at small scale on CUDA, to compare its Dice with the CPU run in README.md
#      (`small`). After each quickstart the fine-tuned model is evaluated on the GPU and on the CPU.
# Each stage has its own time limit and a failing stage does not stop the next. Runs go to
# $WORK (default gpu-check/); $OUT (default: the same) gets summary.txt (medians, Dice, exit
# codes) and runs.tar.gz (each stage's log, each run's config.json and metrics.csv, Dice tables).
#
# Usage: scripts/gpu-check.sh [path/to/glmae-train built with --features cuda]
set -uo pipefail
bin="${1:-target/release/glmae-train}"
out="${WORK:-gpu-check}"
results="${OUT:-$out}"
steps="${STEPS:-12}"
gpu="${DEVICE:-cuda}" # DEVICE=cpu runs the script's mechanics on a machine without one
mkdir -p "$out" "$results"
summary="$results/summary.txt"
: > "$summary"
note() { echo "$*" | tee -a "$summary"; }

# cudarc opens CUDA's libraries by name at run time (libnvrtc in case a kernel needs it); CUDA
# images keep the toolkit's outside the default search path. Never the stubs folder: its fake
# libcuda.so would shadow the driver's.
for d in /usr/local/cuda/lib64 /usr/local/cuda/targets/x86_64-linux/lib \
  $(find /usr/local /usr/lib /opt -name 'libnvrtc.so*' -printf '%h\n' 2>/dev/null | grep -v /stubs | sort -u); do
  export LD_LIBRARY_PATH="${LD_LIBRARY_PATH:+$LD_LIBRARY_PATH:}$d"
done
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader > "$out/gpus.csv" \
  || echo "no nvidia-smi" > "$out/gpus.csv"
gpus=$(wc -l < "$out/gpus.csv")
note "gpus: $(head -1 "$out/gpus.csv") (x$gpus); cpu: $(nproc) cores"

# stage NAME LIMIT_S COMMAND...: runs COMMAND under a time limit, logging to $out/NAME.log.
stage() {
  local name="$1" limit="$2"; shift 2
  local t0=$SECONDS
  timeout "$limit" "$@" > "$out/$name.log" 2>&1
  local rc=$?
  note "$name: exit $rc after $((SECONDS - t0)) s"
  [ $rc -eq 0 ] || tail -5 "$out/$name.log" | sed 's/^/    /' | tee -a "$summary"
  return $rc
}
# Median views/s over the steps after the first two (kernel compilation and autotuning).
views_per_s() {
  python3 - "$out/$1/metrics.csv" "$1" >> "$summary" <<'PY'
import csv, statistics, sys
rows = list(csv.DictReader(open(sys.argv[1])))
vps = [float(r["views_per_s"]) for r in rows[2:]] or [float(r["views_per_s"]) for r in rows]
print(f"{sys.argv[2]}: median {statistics.median(vps):.2f} views/s over {len(vps)} steps "
      f"(first step {float(rows[0]['views_per_s']):.2f}), last loss {rows[-1]['loss']}")
PY
  tail -1 "$summary"
}
loader=8     # threads cutting views for each pretraining run
model=vit-t
pretrain() {
  local name="$1" limit="$2"; shift 2
  rm -rf "${out:?}/$name"
  stage "$name" "$limit" "$bin" pretrain --data "$data" --model "$model" --warmup-steps 2 \
    --loader-threads "$loader" --out "$out/$name" "$@"
  [ -s "$out/$name/metrics.csv" ] && views_per_s "$name"
}

# Evaluates a fine-tuned run on the GPU and on the CPU: the Dice tables must agree (the same
# weights through burn's CUDA and flex kernels).
compare_eval() {
  local run="$1" data="$2" dev
  for dev in $(printf '%s\n' "$gpu" cpu | sort -u); do
    stage "$(basename "$(dirname "$run")")-eval-$dev" 120 "$bin" evaluate "$run" --data "$data" \
      --device "$dev" --out "$run/eval-$dev" \
      && { echo "dice.csv, evaluated on $dev:"; cat "$run/eval-$dev/dice.csv"; } | tee -a "$summary"
  done
}

# STAGES picks groups (comma-separated): tiny, timing, scaling, small (default: all).
want() { [[ ",${STAGES:-tiny,timing,scaling,small}," == *",$1,"* ]]; }

if want tiny; then
  stage quickstart-tiny 150 "$bin" quickstart --scale tiny --device "$gpu" --out "$out/qs-tiny" \
    && sed -n '/^done in/,$p' "$out/quickstart-tiny.log" | tee -a "$summary"
  compare_eval "$out/qs-tiny/finetune" "$out/qs-tiny/phantoms/dataset.json"
fi
if want timing; then
  data="$out/phantoms/dataset.json"
  [ -f "$data" ] || stage phantoms 60 "$bin" make-phantoms --out "$out/phantoms" --count 4 \
    --threads "$(nproc)"
  pretrain cuda-f32 "${F32_LIMIT:-150}" --device "$gpu" --batch-size 2 --steps "$steps"
  pretrain cuda-bf16 "${BF16_LIMIT:-120}" --device "$gpu" --batch-size 2 --steps "$steps" \
    --precision bf16
  if [ "$gpus" -ge 2 ]; then
    pretrain cuda-ddp 150 --device cuda:all --batch-size $((2 * gpus)) --steps "$steps"
  fi
  [ "${CPU_LIMIT:-90}" -gt 0 ] && pretrain cpu-flex "${CPU_LIMIT:-90}" --device cpu --batch-size 2 --steps 4
  # The same step in PyTorch on the same GPU (random views; README's comparison).
  here="$(dirname "$0")"
  if [ "${TORCH:-1}" = 1 ] && [ "$gpu" != cpu ] && python3 -c 'import torch; assert torch.cuda.is_available()' 2>/dev/null; then
    for mode in f32 bf16; do
      flag=(); [ "$mode" = bf16 ] && flag=(--bf16)
      stage "torch-$mode" 120 python3 "$here/bench_pretrain_torch.py" --device cuda --batch 2 \
        --steps 10 "${flag[@]}" && grep '^|' "$out/torch-$mode.log" | tee -a "$summary"
    done
  fi
fi
# Is the GPU run bound by the CPU threads cutting views, or by the step itself? More loader
# threads, then bigger batches.
if want scaling; then
  loader=$(nproc)
  data="$out/phantoms/dataset.json"
  [ -f "$data" ] || stage phantoms 60 "$bin" make-phantoms --out "$out/phantoms" --count 4 \
    --threads "$(nproc)"
  pretrain cuda-f32-allcores 90 --device "$gpu" --batch-size 2 --steps "$steps"
  pretrain cuda-f32-batch8 120 --device "$gpu" --batch-size 8 --steps "$steps"
  pretrain cuda-bf16-batch8 120 --device "$gpu" --batch-size 8 --steps "$steps" \
    --precision bf16
  model=vit-b
  pretrain cuda-vitb-f32 120 --device "$gpu" --batch-size 2 --steps "$steps"
  pretrain cuda-vitb-bf16 120 --device "$gpu" --batch-size 2 --steps "$steps" --precision bf16
  model=vit-t
fi
if want small; then
  stage quickstart-small "${SMALL_LIMIT:-300}" "$bin" quickstart --scale small --device "$gpu" \
    --out "$out/qs-small" && sed -n '/^done in/,$p' "$out/quickstart-small.log" | tee -a "$summary"
  compare_eval "$out/qs-small/finetune" "$out/qs-small/phantoms/dataset.json"
fi
find "$out" -maxdepth 4 -name dice.md -exec sh -c 'echo "$1"; cat "$1"' _ {} \; >> "$summary"
(cd "$out" && find . -maxdepth 4 \( -name '*.log' -o -name metrics.csv -o -name config.json \
  -o -name dice.md -o -name dice.csv -o -name validation.csv \) -print0 \
  | tar czf "$results/runs.tar.gz" --null -T -)
cat "$summary"
