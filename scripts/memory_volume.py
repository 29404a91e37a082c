#!/usr/bin/env python3
"""A large CT-like int16 NIfTI for peak-memory measurements (docs/performance.md).

An elliptic body of soft tissue (40 HU, +-20 noise) with one brighter organ (120 HU) in its middle
half along z, air (-1000 HU) around it; LPS axes (so reading reorients), spacing given in mm.
`--constant`: the body alone, the same in every slice (fast to write, compresses well).

    python3 scripts/memory_volume.py 512 512 600 0.78 0.78 1.25 ct600.nii.gz
    python3 scripts/memory_volume.py 1024 1024 1024 0.5 0.5 0.5 big1024.nii.gz --constant
"""
import argparse

import nibabel as nib
import numpy as np

ap = argparse.ArgumentParser()
ap.add_argument("shape", type=int, nargs=3)
ap.add_argument("spacing", type=float, nargs=3)
ap.add_argument("out")
ap.add_argument("--constant", action="store_true", help="the body alone in every slice")
a = ap.parse_args()
nx, ny, nz = a.shape
rng = np.random.default_rng(0)
x = np.linspace(-1, 1, nx)[:, None]
y = np.linspace(-1, 1, ny)[None, :]
body = (x / 0.8) ** 2 + (y / 0.6) ** 2 < 1
organ = ((x - 0.3) / 0.25) ** 2 + (y / 0.2) ** 2 < 1
vol = np.empty((nx, ny, nz), np.int16)
for k in range(nz):
    s = np.where(body, 40, -1000).astype(np.int16)
    if a.constant:
        vol[:, :, k] = s
        continue
    if nz // 4 < k < 3 * nz // 4:
        s[organ] = 120
    s += rng.integers(-20, 20, (nx, ny), dtype=np.int16)
    vol[:, :, k] = s
affine = np.diag([-a.spacing[0], -a.spacing[1], a.spacing[2], 1.0])
nib.save(nib.Nifti1Image(vol, affine), a.out)
