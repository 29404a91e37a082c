#!/usr/bin/env python3
"""Reference values from nibabel for every NIfTI file it can find, as JSON on stdout.

Searched: nibabel's own test data (odd headers: scaled int16, big-endian, 4-D, .hdr/.img pairs,
NIfTI-2), Debian's mricron-data templates and insighttoolkit5-examples volumes when installed, and
any paths given as arguments. For each file: shape (channels last), the affine nibabel reports,
statistics over the float32-rounded data and values at fixed pseudo-random voxels, indexed in
glmae's channel-first, last-axis-fastest order. glmae-data/tests/nibabel.rs runs this and
compares. With `--make-odd DIR`, it first writes small files with header quirks (big-endian,
scaled, NaN slope, qfac 0, qform only, no xform, vox_offset 1024, .hdr/.img pair, NIfTI-2, 4-D,
every integer type) into DIR and includes them. Requires: pip install nibabel numpy
"""

import glob
import json
import os
import sys

import nibabel as nib
import numpy as np


def candidates(extra):
    roots = [os.path.join(os.path.dirname(nib.__file__), "tests", "data"),
             "/usr/share/mricron/templates",
             "/usr/share/doc/insighttoolkit5-examples/examples/Data"]
    files = []
    for root in roots:
        for pattern in ("*.nii", "*.nii.gz", "*.hdr", "*.hdr.gz"):
            files += glob.glob(os.path.join(root, pattern))
    return sorted(set(files)) + list(extra)


def reference(path):
    img = nib.load(path)
    if not isinstance(img, (nib.Nifti1Image, nib.Nifti2Image, nib.Nifti1Pair, nib.Nifti2Pair)):
        return None  # Analyze, CIFTI and the like are not NIfTI volumes
    if len(img.shape) > 4 and any(d != 1 for d in img.shape[4:]):
        return None
    data = np.asarray(img.get_fdata(dtype=np.float64))
    shape = list(data.shape) + [1] * (4 - data.ndim)
    data = data.reshape(shape[:4])
    ours = np.moveaxis(data, 3, 0).astype(np.float32)  # (c, i, j, k), C order = glmae's layout
    flat = ours.ravel().astype(np.float64)
    rng = np.random.default_rng(0)
    idx = np.unique(np.concatenate([[0, flat.size - 1], rng.integers(0, flat.size, 2000)]))
    return {
        "shape": shape[:3], "channels": shape[3],
        "affine": np.asarray(img.affine, dtype=np.float64).tolist(),
        "axcodes": "".join(nib.aff2axcodes(img.affine)),
        # NaN voxels (some float images have them) are counted, and left out of the sums.
        "nan_count": int(np.isnan(flat).sum()),
        "sum": float(np.nansum(flat)), "sumsq": float(np.nansum(flat * flat)),
        "samples": [[int(i), None if np.isnan(flat[i]) else float(flat[i])] for i in idx],
        "datatype": int(img.header["datatype"]),
    }


def make_odd_files(folder):
    """Small files with the header quirks real data has, written by nibabel itself."""
    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(1)
    vol = rng.integers(-1000, 2000, (9, 7, 5)).astype(np.int16)
    oblique = np.array([[0.9, 0.1, 0.0, -20.0], [-0.1, 0.9, 0.2, 10.0], [0.0, -0.2, 2.4, 5.0], [0, 0, 0, 1.0]])
    files = []

    def save(img, name):
        path = os.path.join(folder, name)
        nib.save(img, path)
        files.append(path)
        return path

    # Float data stored as int16: nibabel picks a slope and intercept.
    img = nib.Nifti1Image(vol.astype(np.float32) * 0.37 + 12.5, oblique, nib.Nifti1Header(endianness=">"))
    img.set_data_dtype(np.int16)
    save(img, "big_endian_scaled_int16.nii.gz")
    img = nib.Nifti1Image(vol, oblique)
    img.header.set_qform(oblique, code=1)
    img.header.set_sform(None, code=0)
    save(img, "qform_only.nii")
    img = nib.Nifti1Image(vol, np.diag([-1.5, 1.5, 3.0, 1.0]))
    img.header.set_qform(np.diag([-1.5, 1.5, 3.0, 1.0]), code=2)
    img.header.set_sform(None, code=0)
    path = save(img, "qfac_zero.nii")
    raw = bytearray(open(path, "rb").read())
    raw[76:80] = np.float32(0.0).tobytes()  # pixdim[0] = 0: nibabel reads qfac as 1
    open(path, "wb").write(bytes(raw))
    path = save(nib.Nifti1Image(vol, oblique), "no_xform.nii")
    raw = bytearray(open(path, "rb").read())
    raw[252:256] = np.array([0, 0], dtype="<i2").tobytes()  # qform_code = sform_code = 0
    open(path, "wb").write(bytes(raw))
    img = nib.Nifti1Image(vol.astype(np.float32) * 0.25, oblique)
    img.header.set_data_offset(1024)  # padding, not extensions, between header and data
    save(img, "vox_offset_1024.nii")
    img = nib.Nifti1Image(vol, oblique)
    path = save(img, "nan_slope.nii")
    raw = bytearray(open(path, "rb").read())
    raw[112:116] = np.float32(np.nan).tobytes()
    raw[116:120] = np.float32(7.0).tobytes()
    open(path, "wb").write(bytes(raw))
    save(nib.Nifti1Pair(vol.astype(np.uint16), oblique), "pair_uint16.hdr")
    save(nib.Nifti2Image(vol.astype(np.float64) / 3, oblique), "nifti2_float64.nii.gz")
    save(nib.Nifti2Image(vol, oblique, nib.Nifti2Header(endianness=">")), "nifti2_big_endian.nii")
    four_d = rng.normal(size=(6, 5, 4, 3)).astype(np.float32)
    save(nib.Nifti1Image(four_d, oblique), "four_d.nii.gz")
    for dt in (np.int8, np.uint8, np.int32, np.uint32, np.int64, np.float64):
        save(nib.Nifti1Image((vol % 100).astype(dt), oblique, dtype=dt), f"dtype_{np.dtype(dt).name}.nii")
    return files


def main():
    args = sys.argv[1:]
    extra = []
    if args[:1] == ["--make-odd"]:
        extra = make_odd_files(args[1])
        args = args[2:]
    out = {}
    for path in candidates(args + extra):
        try:
            ref = reference(path)
        except Exception as e:  # nibabel cannot read it either: nothing to compare
            print(f"skip {path}: nibabel: {e}", file=sys.stderr)
            continue
        if ref is not None:
            out[path] = ref
    json.dump(out, sys.stdout)


if __name__ == "__main__":
    main()
