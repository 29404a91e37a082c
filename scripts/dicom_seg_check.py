#!/usr/bin/env python3
"""DICOM SEG checks for `glmae-data/tests/dicom_seg.rs`, with pydicom and highdicom.

    dicom_seg_check.py make-series OUT_DIR
        Writes a small synthetic CT series (24 columns x 20 rows x 10 slices, oblique, int16
        with RescaleIntercept -1024, explicit VR little endian) under shuffled file names.

    dicom_seg_check.py check SEG_PATH SERIES_DIR EXPECTED_JSON
        Reads SEG_PATH with highdicom.seg.segread and checks it against the series and the
        expected label map that the Rust test wrote: EXPECTED_JSON names the class list, the
        source SOP instance UIDs in volume (slice) order and a raw uint8 file of labels in
        (slice, row, column) order. Prints one line per check; exits 1 on any mismatch.

pydicom-seg is not used: its 0.4.1 release imports `pydicom._storage_sopclass_uids`, which
pydicom 3 removed.
"""

import json
import os
import sys

import numpy as np
import pydicom
from pydicom.sr.codedict import codes
from pydicom.uid import ExplicitVRLittleEndian

CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
SEG_STORAGE = "1.2.840.10008.5.1.4.1.1.66.4"

ROWS, COLUMNS, SLICES = 20, 24, 10
PIXEL_SPACING = [0.8, 0.7]  # between rows, between columns: unequal so a swap shows
SLICE_STEP = 2.5


def rotation(degrees_z, degrees_x):
    """Rz @ Rx: an oblique plane, so that no axis of the volume lies along a patient axis."""
    z, x = np.radians(degrees_z), np.radians(degrees_x)
    rz = np.array([[np.cos(z), -np.sin(z), 0], [np.sin(z), np.cos(z), 0], [0, 0, 1]])
    rx = np.array([[1, 0, 0], [0, np.cos(x), -np.sin(x)], [0, np.sin(x), np.cos(x)]])
    return rz @ rx


def phantom_hu():
    """HU values in (slice, row, column) order: air, a soft-tissue ellipsoid off centre, a bright
    block on the middle slices only, so the label map the test derives is asymmetric in every axis."""
    k, j, i = np.meshgrid(np.arange(SLICES), np.arange(ROWS), np.arange(COLUMNS), indexing="ij")
    hu = np.full((SLICES, ROWS, COLUMNS), -1000.0)
    inside = ((i - 10) / 8.0) ** 2 + ((j - 8) / 5.0) ** 2 + ((k - 4) / 4.0) ** 2 <= 1.0
    hu[inside] = 50.0
    bright = (i >= 14) & (i < 20) & (j >= 12) & (j < 17) & (k >= 3) & (k < 7)
    hu[bright] = 400.0
    return hu


def make_series(out_dir):
    # The series writer of the DICOM reader's tests, with this test's oblique plane, phantom and
    # Latin-1 patient and study attributes (the SEG must carry them over decoded).
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from dicom_series import write_series

    r = rotation(25.0, 15.0)
    write_series(
        out_dir, phantom_hu(), iop=[*r[:, 0], *r[:, 1]], ipp0=[-40.0, -30.0, 100.0],
        spacing=PIXEL_SPACING, step=SLICE_STEP, ts=ExplicitVRLittleEndian, signed=True,
        intercept=-1024.0, description="synthetic CT", series_number=3, nested=False, seed=17,
        # instance numbers unrelated to file names and positions
        shuffle_instance_numbers=True,
        extra={
            "SpecificCharacterSet": "ISO_IR 100", "PatientName": "Müller^Jörg",
            "PatientID": "GLMAE-SEG-1", "PatientBirthDate": "19700101", "PatientSex": "O",
            "StudyDate": "20240102", "StudyTime": "101500", "StudyID": "S1",
            "AccessionNumber": "ACC17", "ReferringPhysicianName": "Ref^Doc",
            "StudyDescription": "synthetic abdomen", "Manufacturer": "glmae test",
            "PositionReferenceIndicator": "", "RescaleType": "HU",
        },
    )
    print(f"wrote {SLICES} slices to {out_dir}")


# SNOMED CT codes expected for class names, written here independently of the Rust table:
# (type code, laterality modifier code or None).
SCT = codes.SCT
EXPECTED_CODES = {
    "spleen": (SCT.Spleen, None),
    "right kidney": (SCT.Kidney, SCT.Right),
    "left kidney": (SCT.Kidney, SCT.Left),
    "gallbladder": (SCT.Gallbladder, None),
    "esophagus": (SCT.Esophagus, None),
    "liver": (SCT.Liver, None),
    "stomach": (SCT.Stomach, None),
    "aorta": (SCT.Aorta, None),
    "inferior vena cava": (SCT.InferiorVenaCava, None),
    "portal and splenic veins": (SCT.PortalVein, None),
    "pancreas": (SCT.Pancreas, None),
    "right adrenal gland": (SCT.AdrenalGland, SCT.Right),
    "left adrenal gland": (SCT.AdrenalGland, SCT.Left),
}


class Checker:
    def __init__(self):
        self.failures = 0

    def check(self, ok, what, detail=""):
        print(f"{'ok  ' if ok else 'FAIL'} {what}{': ' + detail if detail and not ok else ''}")
        if not ok:
            self.failures += 1
        return ok


def check(seg_path, series_dir, expected_json):
    import highdicom as hd

    with open(expected_json) as f:
        expected = json.load(f)
    classes = expected["class_names"]
    uids = expected["source_sop_instance_uids"]
    shape = tuple(expected["shape"])  # (slices, rows, columns)
    labels = np.fromfile(expected["labels_path"], dtype=np.uint8).reshape(shape)
    c = Checker()

    raw = pydicom.dcmread(seg_path)
    c.check(raw.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian, "explicit VR little endian",
            str(raw.file_meta.TransferSyntaxUID))
    c.check(raw.SOPClassUID == SEG_STORAGE, "SOP class is Segmentation Storage", str(raw.SOPClassUID))
    c.check(raw.file_meta.MediaStorageSOPInstanceUID == raw.SOPInstanceUID, "file meta names the instance")
    seg = hd.seg.segread(seg_path)
    c.check(seg.segmentation_type.value == "BINARY", "BINARY", str(seg.segmentation_type))
    c.check((raw.BitsAllocated, raw.BitsStored, raw.HighBit) == (1, 1, 0), "1 bit per pixel")

    source = {}
    for name in os.listdir(series_dir):
        ds = pydicom.dcmread(os.path.join(series_dir, name), stop_before_pixels=True)
        source[ds.SOPInstanceUID] = ds
    first = next(iter(source.values()))
    c.check(sorted(source) == sorted(uids), "the test's UIDs are the series' instances")
    for kw in ("StudyInstanceUID", "FrameOfReferenceUID", "PatientID", "PatientName", "PatientBirthDate",
               "PatientSex", "StudyDate", "StudyID", "AccessionNumber"):
        c.check(str(getattr(raw, kw, None)) == str(getattr(first, kw)), f"{kw} copied",
                f"{getattr(raw, kw, None)!r} vs {getattr(first, kw)!r}")
    # Text in the source's character set, or UTF-8 when some of it does not fit there.
    charset = raw.get("SpecificCharacterSet")
    c.check(charset in (first.get("SpecificCharacterSet"), "ISO_IR 192"), f"character set {charset}", str(charset))
    c.check(raw.SeriesInstanceUID != first.SeriesInstanceUID, "a new series")
    c.check(all(u.startswith("2.25.") and len(u) <= 64 for u in (raw.SeriesInstanceUID, raw.SOPInstanceUID)),
            "UIDs are 2.25 UIDs of at most 64 characters", f"{raw.SeriesInstanceUID} {raw.SOPInstanceUID}")

    refs = raw.ReferencedSeriesSequence
    c.check(len(refs) == 1 and refs[0].SeriesInstanceUID == first.SeriesInstanceUID,
            "ReferencedSeriesSequence names the source series")
    referenced = {(i.ReferencedSOPClassUID, i.ReferencedSOPInstanceUID) for i in refs[0].ReferencedInstanceSequence}
    c.check(referenced == {(CT_IMAGE_STORAGE, u) for u in uids}, "every source instance referenced",
            f"{len(referenced)} of {len(uids)}")
    src_uids = {u[2] for u in seg.get_source_image_uids()}
    c.check(src_uids == set(uids), "highdicom lists the source instances", f"{len(src_uids)} of {len(uids)}")

    # Segments: one per class 1..K, numbered as the class values.
    numbers = list(seg.segment_numbers)
    c.check(numbers == list(range(1, len(classes))), "one segment per class, numbered by class value",
            str(numbers))
    for n in numbers:
        d = seg.get_segment_description(n)
        name = classes[n]
        c.check(d.segment_label == name, f"segment {n} label", f"{d.segment_label!r} vs {name!r}")
        c.check(d.algorithm_type.value == "AUTOMATIC", f"segment {n} AUTOMATIC")
        # Known organs: CID 7150 Anatomical Structure; other names: Tissue, as category and type.
        known = name.lower() in EXPECTED_CODES
        want, modifier = EXPECTED_CODES.get(name.lower(), (SCT.Tissue, None))
        want_cat = codes.cid7150.AnatomicalStructure if known else SCT.Tissue
        cat = d.segmented_property_category
        c.check((cat.value, cat.scheme_designator) == (want_cat.value, "SCT"), f"segment {n} category",
                f"{cat.value} {cat.scheme_designator}")
        typ = d.segmented_property_type
        c.check((typ.value, typ.scheme_designator) == (want.value, "SCT"), f"segment {n} {name!r} type code",
                f"{typ.value} ({typ.meaning}) vs {want.value} ({want.meaning})")
        item = raw.SegmentSequence[numbers.index(n)].SegmentedPropertyTypeCodeSequence[0]
        mods = [m.CodeValue for m in getattr(item, "SegmentedPropertyTypeModifierCodeSequence", [])]
        c.check(mods == ([modifier.value] if modifier else []), f"segment {n} laterality", str(mods))

    # Every frame references the source instance at its position, and the pixels match.
    by_uid = {u: k for k, u in enumerate(uids)}
    frames_ok = True
    for f, item in enumerate(raw.PerFrameFunctionalGroupsSequence):
        src = item.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID
        pos = [float(v) for v in item.PlanePositionSequence[0].ImagePositionPatient]
        want = [float(v) for v in source[src].ImagePositionPatient]
        if src not in by_uid or max(abs(a - b) for a, b in zip(pos, want)) > 1e-3:
            frames_ok = False
            print(f"     frame {f + 1}: source {src} at {pos}, the source is at {want}")
    c.check(frames_ok, f"{len(raw.PerFrameFunctionalGroupsSequence)} frames at their source positions")
    got = seg.get_pixels_by_source_instance(
        source_sop_instance_uids=uids, segment_numbers=numbers, combine_segments=True, relabel=False,
        assert_missing_frames_are_empty=True)
    c.check(got.shape == labels.shape, "label map shape", f"{got.shape} vs {labels.shape}")
    if got.shape == labels.shape:
        diff = np.argwhere(got != labels)
        c.check(len(diff) == 0, f"label map equal ({int((labels > 0).sum())} labelled voxels)",
                f"{len(diff)} voxels differ, first (slice, row, column) {diff[:3].tolist()}")
    # Through highdicom's volume geometry as well: the SEG's frames stack onto the source grid.
    try:
        vol = seg.get_volume(combine_segments=True)
        c.check(int((vol.array > 0).sum()) == int((labels > 0).sum()), "highdicom volume has the voxels")
    except Exception as e:  # an empty SEG or highdicom version without get_volume
        print(f"note highdicom get_volume: {e}")
    print(f"{c.failures} failures")
    return 1 if c.failures else 0


def main(argv):
    if len(argv) == 3 and argv[1] == "make-series":
        make_series(argv[2])
        return 0
    if len(argv) == 5 and argv[1] == "check":
        return check(argv[2], argv[3], argv[4])
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv))
