#!/usr/bin/env bash
# Short GL-MAE pretraining runs that differ in one setting, and a table of how each ended:
# the reconstruction losses and the collapse watch (docs/experiments.md, "Learning rate" and
# "Consistency collapse"). Usage:
#   scripts/pretrain_sweep.sh OUT NAME:"FLAGS" [NAME:"FLAGS" ...]
#   scripts/pretrain_sweep.sh /tmp/sweep base:"" old:"--lr 1.5625e-3" bn:"--lr 1.5625e-3 --head-batch-norm"
# Every run: the experiment's narrow model (width 96, 3 heads, views 64/32, decoder 96 x 2),
# 20 phantoms of 96 x 80 x 64 at 3 mm (16 training), batch 2, STEPS steps (default 300) with
# 30 warm-up steps. Needs a release build (cargo build --release -p glmae-train) and python3.
set -euo pipefail
out=${1:?output folder}; shift
bin=${GLMAE_TRAIN:-target/release/glmae-train}
steps=${STEPS:-300}
mkdir -p "$out"
if [ ! -f "$out/phantoms/dataset.json" ]; then
  "$bin" make-phantoms --out "$out/phantoms" --count 20 --shape 96,80,64 --spacing 3,3,3.75
fi
names=()
for arm in "$@"; do
  name=${arm%%:*}; flags=${arm#*:}
  names+=("$name")
  [ -f "$out/$name/checkpoint.bin" ] && continue
  rm -rf "${out:?}/$name"
  # shellcheck disable=SC2086
  /usr/bin/time -f "%e s wall, %M KB peak" "$bin" pretrain --data "$out/phantoms/dataset.json" \
    --hidden 96 --heads 3 --views 64,32 --steps "$steps" --warmup-steps 30 \
    --checkpoint-every "$steps" --cache "$out/cache" --out "$out/$name" $flags > "$out/$name.log" 2>&1
  tail -1 "$out/$name.log"
done
python3 - "$out" "${names[@]}" <<'PY'
import csv, sys
out, names = sys.argv[1], sys.argv[2:]
print("| run | rec. global | rec. local | consistency | H_cond | H_marg | MI | max MI after step 30 | steps with H_marg < 0.5 |")
print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
for n in names:
    rows = list(csv.DictReader(open(f"{out}/{n}/metrics.csv")))
    last = rows[-20:]
    m = lambda k: sum(float(r[k]) for r in last) / len(last)
    late = rows[30:]
    print(f"| {n} | {m('rec_global'):.4f} | {m('rec_local'):.4f} | {m('consistency'):.3f} | {m('h_cond'):.3f} "
          f"| {m('h_marg'):.3f} | {m('mi'):.3f} | {max(float(r['mi']) for r in late):.2f} "
          f"| {sum(float(r['h_marg']) < 0.5 for r in late)} |")
PY
