#!/usr/bin/env python3
"""DICOM series for glmae-data's reader tests, and their conversion by the tools people trust.

    python3 scripts/dicom_series.py make OUT_DIR
        Writes one folder per case under OUT_DIR (pydicom): CT series in axial, sagittal and
        oblique orientations, implicit and explicit VR, big endian, rescale slope/intercept with
        12 stored bits, shuffled and nested file names; a study folder with three series and a
        file that is not DICOM; and series that must be refused (gantry tilt, a duplicated, a
        missing or an uneven slice, mixed sizes, compressed pixel data). OUT_DIR/cases.json
        lists them with what the reader must say.

    python3 scripts/dicom_series.py make-large OUT_DIR SLICES
        One axial CT series of SLICES 512 x 512 slices (0.7 x 0.7 x 1.5 mm, int16 with intercept
        -1024), for timing and memory measurements (docs/performance.md).

    python3 scripts/dicom_series.py compare CASE_DIR OURS.nii
        Converts CASE_DIR with dcm2niix, reads that and OURS.nii with nibabel, brings both to the
        closest canonical orientation and compares shape, affine (1e-3 mm) and voxels (1e-3).
        Prints one JSON line; exits 1 on a mismatch.

Needs numpy, pydicom (3.x) and nibabel; `compare` needs dcm2niix (Debian package `dcm2niix`).
"""

import json
import os
import random
import shutil
import subprocess
import sys
import tempfile

import numpy as np


def phantom(nk, rows, cols):
    """HU values that differ along every axis, so a flipped or swapped axis cannot match."""
    k, j, i = np.meshgrid(np.arange(nk), np.arange(rows), np.arange(cols), indexing="ij")
    body = ((i - cols / 2) / (cols / 2.2)) ** 2 + ((j - rows / 2) / (rows / 2.5)) ** 2 < 1
    hu = np.where(body, 20 + 7 * i + 3 * j + 11 * k, -1000)
    hu[(abs(i - cols // 3) < 2) & (abs(j - rows // 3) < 3)] = 400  # a bone-like rod
    return hu.astype(np.int32)


def write_series(out, hu, *, iop, ipp0, spacing, step, ts, slope=1.0, intercept=-1024.0,
                 signed=False, bits_stored=16, modality="CT", description="axial",
                 series_number=1, study_uid=None, tilt=0.0, nested=True, positions=None,
                 sizes=None, compressed=False, seed=0, shuffle_instance_numbers=False, extra=None):
    """Writes `hu` (slices, rows, columns) as one series; returns its SeriesInstanceUID.

    `shuffle_instance_numbers` numbers the files in their (shuffled) writing order instead of by
    position; `extra` sets further attributes (keyword: value) on every file, last."""
    import pydicom
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import CTImageStorage, generate_uid

    rng = random.Random(seed)
    os.makedirs(out, exist_ok=True)
    series_uid = generate_uid()
    study_uid = study_uid or generate_uid()
    frame_uid = generate_uid()
    row_dir = np.array(iop[:3], float)
    col_dir = np.array(iop[3:], float)
    normal = np.cross(row_dir, col_dir)
    nk = hu.shape[0]
    order = list(range(nk))
    rng.shuffle(order)
    for n, k in enumerate(order):
        slice_hu = hu[k]
        if sizes and k in sizes:
            slice_hu = slice_hu[: sizes[k][0], : sizes[k][1]]
        raw = np.round((slice_hu - intercept) / slope).astype(np.int64)
        if signed:
            dtype = np.int16
        else:
            dtype = np.uint16
        assert raw.min() >= np.iinfo(dtype).min and raw.max() < 2 ** bits_stored, (raw.min(), raw.max())
        pixels = raw.astype(dtype)
        ds = Dataset()
        ds.file_meta = FileMetaDataset()
        sop_uid = generate_uid()
        ds.file_meta.MediaStorageSOPClassUID = CTImageStorage
        ds.file_meta.MediaStorageSOPInstanceUID = sop_uid
        ds.file_meta.TransferSyntaxUID = ts
        ds.SOPClassUID = CTImageStorage
        ds.SOPInstanceUID = sop_uid
        ds.StudyInstanceUID = study_uid
        ds.SeriesInstanceUID = series_uid
        ds.FrameOfReferenceUID = frame_uid
        ds.PatientName = "Phantom^Glmae"
        ds.PatientID = "GLMAE-0001"
        ds.Modality = modality
        ds.SeriesDescription = description
        ds.SeriesNumber = series_number
        ds.InstanceNumber = (n if shuffle_instance_numbers else k) + 1
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        if positions is not None:
            pos = np.array(positions[k], float)
        else:
            pos = np.array(ipp0, float) + k * step * normal + k * tilt * col_dir
        ds.ImagePositionPatient = [f"{v:.6f}" for v in pos]
        ds.ImageOrientationPatient = [f"{v:.8f}" for v in iop]
        ds.PixelSpacing = [f"{spacing[0]:.6f}", f"{spacing[1]:.6f}"]
        ds.SliceThickness = f"{abs(step):.4f}"
        ds.Rows, ds.Columns = pixels.shape
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.BitsAllocated = 16
        ds.BitsStored = bits_stored
        ds.HighBit = bits_stored - 1
        ds.PixelRepresentation = 1 if signed else 0
        ds.RescaleSlope = f"{slope:g}"
        ds.RescaleIntercept = f"{intercept:g}"
        for keyword, value in (extra or {}).items():
            setattr(ds, keyword, value)
        big = ts == pydicom.uid.ExplicitVRBigEndian
        if compressed:
            from pydicom.encaps import encapsulate
            ds.PixelData = encapsulate([b"\xff\xd8\xff\xdbnot really a jpeg\xff\xd9"])
            ds["PixelData"].VR = "OB"
        else:
            ds.PixelData = pixels.astype(pixels.dtype.newbyteorder(">" if big else "<")).tobytes()
            ds["PixelData"].VR = "OW"
        sub = os.path.join(out, f"d{n % 3}") if nested else out
        os.makedirs(sub, exist_ok=True)
        path = os.path.join(sub, f"{rng.getrandbits(40):010x}")
        ds.save_as(path, enforce_file_format=True)
        if not compressed:
            back = pydicom.dcmread(path).pixel_array
            assert np.array_equal(back, pixels), f"pydicom reads back other pixels from {path}"
    return series_uid


def make(out):
    from pydicom.uid import ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian
    if os.path.isdir(out):
        shutil.rmtree(out)
    os.makedirs(out)
    nk, rows, cols = 12, 20, 24
    hu = phantom(nk, rows, cols)
    axial = dict(iop=[1, 0, 0, 0, 1, 0], ipp0=[-80.0, -60.0, -200.0], spacing=(0.8, 0.7), step=2.5)
    a = np.deg2rad(20)
    oblique_iop = [1, 0, 0, 0, float(np.cos(a)), float(np.sin(a))]
    cases = {}

    def good(name, **kw):
        uid = write_series(os.path.join(out, name), hu, **{**axial, **kw})
        cases[name] = {"ok": True, "series": uid, "shape": [cols, rows, nk]}

    good("axial_explicit", ts=ExplicitVRLittleEndian, seed=1)
    good("axial_implicit", ts=ImplicitVRLittleEndian, signed=True, intercept=0.0, seed=2)
    good("big_endian", ts=ExplicitVRBigEndian, signed=True, intercept=0.0, seed=3)
    good("sagittal", ts=ExplicitVRLittleEndian, iop=[0, 1, 0, 0, 0, -1], ipp0=[-30.0, -90.0, 40.0],
         step=-2.0, seed=4)
    good("oblique", ts=ExplicitVRLittleEndian, iop=oblique_iop, seed=5)
    good("slope_12bit", ts=ExplicitVRLittleEndian, slope=0.5, intercept=-1000.0, bits_stored=12,
         seed=6)

    # A study: the largest CT series is chosen by default, any other by --series.
    study = os.path.join(out, "study")
    study_uid = "1.2.826.0.1.3680043.8.498.1"
    big = write_series(study, hu, **axial, ts=ExplicitVRLittleEndian, study_uid=study_uid,
                       description="abdomen", series_number=2, seed=7)
    small = write_series(study, hu[:4], **axial, ts=ExplicitVRLittleEndian, study_uid=study_uid,
                         description="small", series_number=3, seed=8)
    write_series(study, phantom(16, 20, 24), **axial, ts=ExplicitVRLittleEndian,
                 study_uid=study_uid, modality="MR", description="mr", series_number=4, seed=9)
    with open(os.path.join(study, "notes.txt"), "w") as f:
        f.write("not a DICOM file\n")
    cases["study"] = {"ok": True, "series": big, "other": small, "shape": [cols, rows, nk],
                      "series_count": 3}

    def bad(name, error, **kw):
        write_series(os.path.join(out, name), kw.pop("volume", hu), **{**axial, **kw})
        cases[name] = {"ok": False, "error": error}

    bad("tilt", "gantry tilt", ts=ExplicitVRLittleEndian, tilt=0.5, seed=10)
    dup = [list(np.array(axial["ipp0"]) + [0, 0, 2.5 * k]) for k in range(nk)]
    dup[7] = dup[6]
    bad("duplicate", "duplicated slice position", ts=ExplicitVRLittleEndian, positions=dup, seed=11)
    gap = [list(np.array(axial["ipp0"]) + [0, 0, 2.5 * (k + (k >= 5))]) for k in range(nk)]
    bad("missing", "missing slices", ts=ExplicitVRLittleEndian, positions=gap, seed=12)
    uneven = [list(np.array(axial["ipp0"]) + [0, 0, 2.5 * k + (0.6 if k >= 5 else 0)]) for k in range(nk)]
    bad("uneven", "uneven slice spacing", ts=ExplicitVRLittleEndian, positions=uneven, seed=13)
    bad("mixed_size", "mixed image sizes", ts=ExplicitVRLittleEndian, sizes={3: (16, 24)}, seed=14)
    bad("compressed", "compressed pixel data", ts="1.2.840.10008.1.2.4.50", compressed=True, seed=15)
    with open(os.path.join(out, "cases.json"), "w") as f:
        json.dump(cases, f, indent=1)
    print(json.dumps({"cases": len(cases)}))


def compare(case_dir, ours_path):
    import nibabel as nib
    tmp = tempfile.mkdtemp(prefix="glmae-dcm2niix-")
    try:
        run = subprocess.run(["dcm2niix", "-z", "n", "-b", "n", "-f", "ref", "-o", tmp, case_dir],
                             capture_output=True, text=True)
        outs = sorted(f for f in os.listdir(tmp) if f.endswith(".nii"))
        if run.returncode != 0 or len(outs) != 1:
            print(json.dumps({"ok": False, "why": "dcm2niix", "files": outs,
                              "log": run.stdout[-800:] + run.stderr[-800:]}))
            return 1
        ref = nib.as_closest_canonical(nib.load(os.path.join(tmp, outs[0])))
        ours = nib.as_closest_canonical(nib.load(ours_path))
        r = {"ok": True, "ref_shape": list(ref.shape), "our_shape": list(ours.shape)}
        if ref.shape != ours.shape:
            r["ok"] = False
            r["why"] = "shape"
        else:
            r["affine_diff"] = float(np.abs(ref.affine - ours.affine).max())
            r["voxel_diff"] = float(np.abs(ref.get_fdata() - ours.get_fdata()).max())
            if r["affine_diff"] > 1e-3 or r["voxel_diff"] > 1e-3:
                r["ok"] = False
                r["why"] = "values"
                r["ref_affine"] = ref.affine.round(4).tolist()
                r["our_affine"] = ours.affine.round(4).tolist()
        print(json.dumps(r))
        return 0 if r["ok"] else 1
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "make":
        make(sys.argv[2])
    elif len(sys.argv) == 4 and sys.argv[1] == "make-large":
        from pydicom.uid import ExplicitVRLittleEndian
        n = int(sys.argv[3])
        write_series(sys.argv[2], phantom(n, 512, 512), iop=[1, 0, 0, 0, 1, 0],
                     ipp0=[-179.0, -179.0, -300.0], spacing=(0.7, 0.7), step=1.5,
                     ts=ExplicitVRLittleEndian, nested=False)
    elif len(sys.argv) == 4 and sys.argv[1] == "compare":
        sys.exit(compare(sys.argv[2], sys.argv[3]))
    else:
        sys.exit(__doc__)
