#!/usr/bin/env bash
# Trains and exports the firmware's model, data/model.glmae, with glmae-train: the `tiny` UNETR
# preset (32^3 window, width 24, depth 12, feature size 4) fine-tuned from scratch on synthetic
# phantoms with BTCV's 14 classes, exported with int8 weight matrices and activation scales
# calibrated on the phantoms (training and validation; for glmae-core's integer pass).
# Afterwards regenerate the input and expected labels:
#   GLMAE_BLESS=1 cargo test -p glmae-tests --test firmware_fixtures
# Usage: firmware-example/make-model.sh [WORK_DIR]   (needs python3 with nibabel and numpy)
#
# One departure from the quickstart, forced by the Cortex-M4's 4 MiB of RAM (a 32^3 window):
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

# 2. Declare 1.5 x 1.5 x 2 mm voxels (tests/tests/firmware_fixtures.rs does the same to its
#    phantom); the labels keep BTCV's 14 classes.
python3 - "$work/data" <<'PY'
import pathlib, sys
import nibabel as nib, numpy as np
root = pathlib.Path(sys.argv[1])
affine = np.diag([1.5, 1.5, 2.0, 1.0])
for sub, dtype in [("imagesTr", np.int16), ("labelsTr", np.uint8)]:
    for f in sorted((root / sub).glob("*.nii.gz")):
        data = np.asarray(nib.load(f).dataobj).astype(dtype)
        out = nib.Nifti1Image(data, affine)
        out.set_data_dtype(dtype)
        out.set_qform(affine, 1)
        out.set_sform(affine, 1)
        out.header.set_xyzt_units("mm", "sec")
        nib.save(out, f)
PY

# 3. Fine-tune the `tiny` preset from scratch (its window is 32^3).
"$train" finetune --data "$work/data/dataset.json" --out "$work/run" --model tiny \
  --steps 3000 --val-every 500 --lr 3e-3 --crops 4 --seed 0

# 4. Export the best validation checkpoint with int8 weight matrices, and the integer pass's
#    activation scales calibrated on 32 windows of the six phantoms (max-abs ranges).
"$train" export "$work/run" --out "$root/firmware-example/data/model.glmae" --int8 \
  --calibrate "$work/data/dataset.json" --calibrate-windows 32
