#!/usr/bin/env bash
# Trains and exports the firmware's model, data/model.glmae, with glmae-train: the `tiny` UNETR
# preset (32^3 window, width 24, depth 12, feature size 4) fine-tuned from scratch on synthetic
# phantoms with three classes (background, liver, kidney), exported with int8 weight matrices.
# About 8 minutes of CPU on 2 cores. Afterwards regenerate the input and expected labels:
#   GLMAE_BLESS=1 cargo test -p glmae-tests --test firmware_fixtures
# Usage: firmware-example/make-model.sh [WORK_DIR]   (needs python3 with nibabel and numpy)
#
# Two departures from the quickstart, both forced by the Cortex-M4's 4 MiB of RAM:
# - Three classes, so the arena (scratch + logits for a 32^3 window) stays near 2.6 MiB; 14 BTCV
#   classes would need 3.9 MiB of it. Liver and kidneys are the organs this small a model learns.
# - Third-scale phantoms: `glmae-train finetune` always resamples to BTCV's 1.5 x 1.5 x 2 mm, where
#   a 32^3 window sees only 48 x 48 x 64 mm and the tiny model learned nothing (all background
#   after 300 steps). So the phantoms are generated at 4.5 x 4.5 x 6 mm and their headers declare
#   1.5 x 1.5 x 2 mm: the same anatomy at a third of its size, a window sees a third of the
#   abdomen, and preprocessing leaves the grid as it is. The model therefore expects third-scale
#   anatomy; it is a demonstration model for the firmware, not one for real CT.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
work="${1:-/tmp/glmae-firmware-model}"
train="$root/target/release/glmae-train"
[ -x "$train" ] || (cd "$root" && cargo build --release -p glmae-train)
rm -rf "$work"
mkdir -p "$work"

# 1. Phantoms: 6 volumes (5 training, 1 validation), seeds 0-5, 72 x 58 x 40 voxels of 4.5 x 4.5 x 6 mm.
"$train" make-phantoms --out "$work/data" --count 6 --seed 0 --shape 72,58,40 --spacing 4.5,4.5,6

# 2. Declare 1.5 x 1.5 x 2 mm voxels, and map the labels to three classes: BTCV liver (6) -> 1,
#    kidneys (2, 3) -> 2, everything else -> 0. glmae-train takes the classes from dataset.json's
#    "labels". tests/tests/firmware_fixtures.rs does the same to its phantom.
python3 - "$work/data" <<'PY'
import json, pathlib, sys
import nibabel as nib, numpy as np
root = pathlib.Path(sys.argv[1])
lut = np.zeros(256, np.uint8)
lut[6], lut[2], lut[3] = 1, 2, 2
affine = np.diag([1.5, 1.5, 2.0, 1.0])
for sub, dtype, lookup in [("imagesTr", np.int16, None), ("labelsTr", np.uint8, lut)]:
    for f in sorted((root / sub).glob("*.nii.gz")):
        data = np.asarray(nib.load(f).dataobj).astype(dtype)
        if lookup is not None:
            data = lookup[data]
        out = nib.Nifti1Image(data, affine)
        out.set_data_dtype(dtype)
        out.set_qform(affine, 1)
        out.set_sform(affine, 1)
        out.header.set_xyzt_units("mm", "sec")
        nib.save(out, f)
ds = json.loads((root / "dataset.json").read_text())
ds["labels"] = {"0": "background", "1": "liver", "2": "kidney"}
(root / "dataset.json").write_text(json.dumps(ds, indent=2))
PY

# 3. Fine-tune the `tiny` preset from scratch (its window is 32^3).
"$train" finetune --data "$work/data/dataset.json" --out "$work/run" --model tiny \
  --steps 500 --val-every 250 --lr 3e-3 --crops 4 --seed 0

# 4. Export the best validation checkpoint with int8 weight matrices.
"$train" export "$work/run" --out "$root/firmware-example/data/model.glmae" --int8
