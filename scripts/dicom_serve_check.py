#!/usr/bin/env python3
"""The DICOM network side of `glmae-infer/tests/serve.rs` (and of the docs' timing), with
pynetdicom, pydicom and highdicom.

    dicom_serve_check.py dest OUT_DIR [AE_TITLE]
        A storage SCP for Segmentation Storage on 127.0.0.1, on a free port: prints
        `port N` on stdout once listening, writes each object received to
        OUT_DIR/<SOPInstanceUID>.dcm (atomically, with a `received <time> <file>` line on
        stdout), and stops when its standard input closes (so it cannot outlive the test that
        started it) or after an hour.

    dicom_serve_check.py send HOST PORT CALLED_AE CASES_DIR [--refused SERIES_DIR]
        C-ECHO, then sends the series CASES_DIR/axial_explicit and CASES_DIR/oblique
        (scripts/dicom_series.py make) at once, each on its own association and thread; then,
        on one more association, three malformed files that must be refused with C000 (pixel
        data shorter than its image size, no SeriesInstanceUID, a SeriesInstanceUID that is a path) and, with
        --refused, the first file of SERIES_DIR, which must be refused with A700 (the server
        runs with --max-pending-series 2). Prints one JSON line; exits 1 on any other status.

    dicom_serve_check.py send-series HOST PORT CALLED_AE SERIES_DIR
        Sends one folder of DICOM files on one association; prints the time the last
        response arrived (Unix seconds) as JSON.

    dicom_serve_check.py check DEST_DIR SERVER_OUT CASES_DIR CLASSES
        Reads each SEG in DEST_DIR with highdicom.seg.segread and checks it: Segmentation
        Storage, one segment per class but the background (CLASSES classes in all), the source
        series and study are those of one of the two series sent (each exactly once), every
        referenced instance is one of that series' files, the frame count agrees with the
        per-frame groups, and SERVER_OUT/<series>.seg.dcm is the same object. Prints one line
        per check; exits 1 on a mismatch.
"""

import json
import os
import sys
import threading
import time

SEG_STORAGE = "1.2.840.10008.5.1.4.1.1.66.4"
SENT_CASES = ("axial_explicit", "oblique")


def dicom_files(folder):
    out = []
    for root, _dirs, files in os.walk(folder):
        for f in sorted(files):
            if not f.startswith(".") and not f.endswith((".json", ".txt")):
                out.append(os.path.join(root, f))
    return sorted(out)


def requested_contexts(ae):
    from pydicom.uid import ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian
    from pynetdicom.sop_class import CTImageStorage, MRImageStorage, Verification
    syntaxes = [ExplicitVRLittleEndian, ImplicitVRLittleEndian, ExplicitVRBigEndian]
    # One context per transfer syntax, so each file goes in its own.
    for ts in syntaxes:
        ae.add_requested_context(CTImageStorage, ts)
        ae.add_requested_context(MRImageStorage, ts)
    ae.add_requested_context(Verification)


def dest(out_dir, ae_title="DEST"):
    import pydicom
    from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
    from pynetdicom import AE, evt

    os.makedirs(out_dir, exist_ok=True)
    lock = threading.Lock()

    def on_store(event):
        ds = event.dataset
        ds.file_meta = event.file_meta
        name = str(ds.SOPInstanceUID)
        tmp = os.path.join(out_dir, "." + name + ".tmp")
        ds.save_as(tmp, enforce_file_format=True)
        os.replace(tmp, os.path.join(out_dir, name + ".dcm"))
        with lock:
            print(f"received {time.time():.3f} {name}.dcm", flush=True)
        return 0x0000

    ae = AE(ae_title=ae_title)
    ae.add_supported_context(SEG_STORAGE, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
    server = ae.start_server(("127.0.0.1", 0), block=False, evt_handlers=[(evt.EVT_C_STORE, on_store)])
    print(f"port {server.server_address[1]}", flush=True)
    done = threading.Event()

    def wait_stdin():
        sys.stdin.read()
        done.set()

    threading.Thread(target=wait_stdin, daemon=True).start()
    done.wait(3600)
    server.shutdown()
    return 0


def associate(host, port, called):
    from pynetdicom import AE
    ae = AE(ae_title="SENDER")
    requested_contexts(ae)
    assoc = ae.associate(host, int(port), ae_title=called)
    if not assoc.is_established:
        raise RuntimeError(f"no association with {called}@{host}:{port}")
    return assoc


def send_folder(host, port, called, folder):
    """Sends every file of `folder` by path (pynetdicom sends a file's data set as stored);
    returns the statuses."""
    assoc = associate(host, port, called)
    statuses = []
    try:
        for path in dicom_files(folder):
            st = assoc.send_c_store(path)
            statuses.append(int(st.Status) if "Status" in st else None)
    finally:
        assoc.release()
    return statuses


def malformed(cases_dir, work):
    """Three files the server must refuse with C000, made from one good slice."""
    import pydicom
    from pydicom import config
    from pydicom.uid import generate_uid
    config.settings.writing_validation_mode = config.WARN
    src = dicom_files(os.path.join(cases_dir, "axial_explicit"))[0]
    os.makedirs(work, exist_ok=True)
    out = []
    # Pixel data cut short: pydicom reads what is there and pynetdicom sends a data set whose
    # PixelData is shorter than Rows x Columns say.
    ds = pydicom.dcmread(src)
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    p = os.path.join(work, "truncated.dcm")
    ds.save_as(p, enforce_file_format=True)
    with open(p, "r+b") as f:
        f.truncate(os.path.getsize(p) - 300)
    out.append(("pixel data cut short", p))
    # No SeriesInstanceUID.
    ds = pydicom.dcmread(src)
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    del ds.SeriesInstanceUID
    p = os.path.join(work, "no_series.dcm")
    ds.save_as(p, enforce_file_format=True)
    out.append(("no SeriesInstanceUID", p))
    # A SeriesInstanceUID that would be a path out of the spool.
    ds = pydicom.dcmread(src)
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.SeriesInstanceUID = "../../escaped"
    p = os.path.join(work, "path_series.dcm")
    ds.save_as(p, enforce_file_format=True)
    out.append(("path as SeriesInstanceUID", p))
    return out


def send(host, port, called, cases_dir, refused_dir=None):
    from pynetdicom import AE
    result = {"ok": True}
    assoc = associate(host, port, called)
    echo = assoc.send_c_echo()
    assoc.release()
    result["echo"] = int(echo.Status) if "Status" in echo else None
    if result["echo"] != 0:
        result["ok"] = False

    statuses = {}

    def run(name):
        try:
            statuses[name] = send_folder(host, port, called, os.path.join(cases_dir, name))
        except Exception as e:  # reported in the JSON line
            statuses[name] = [repr(e)]

    threads = [threading.Thread(target=run, args=(n,)) for n in SENT_CASES]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    result["series"] = statuses
    for name in SENT_CASES:
        st = statuses.get(name, [])
        if not st or any(s != 0 for s in st):
            result["ok"] = False

    work = os.path.join(cases_dir, "malformed")
    assoc = associate(host, port, called)
    try:
        bad = {}
        for what, path in malformed(cases_dir, work):
            st = assoc.send_c_store(path)
            bad[what] = int(st.Status) if "Status" in st else None
            if bad[what] != 0xC000:
                result["ok"] = False
        result["malformed"] = bad
        if refused_dir:
            st = assoc.send_c_store(dicom_files(refused_dir)[0])
            result["queue_full"] = int(st.Status) if "Status" in st else None
            if result["queue_full"] != 0xA700:
                result["ok"] = False
    finally:
        assoc.release()
    print(json.dumps(result))
    return 0 if result["ok"] else 1


def send_series(host, port, called, folder):
    statuses = send_folder(host, port, called, folder)
    done = time.time()
    ok = all(s == 0 for s in statuses)
    print(json.dumps({"ok": ok, "instances": len(statuses), "last_response": round(done, 3)}))
    return 0 if ok else 1


def check(dest_dir, server_out, cases_dir, classes):
    import pydicom
    import highdicom as hd
    cases = json.load(open(os.path.join(cases_dir, "cases.json")))
    sources = {}
    for name in SENT_CASES:
        files = dicom_files(os.path.join(cases_dir, name))
        first = pydicom.dcmread(files[0], stop_before_pixels=True)
        sop = {str(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID) for f in files}
        sources[cases[name]["series"]] = (name, str(first.StudyInstanceUID), sop)
    failures = []

    def expect(cond, what):
        print(("ok   " if cond else "FAIL ") + what)
        if not cond:
            failures.append(what)

    segs = sorted(f for f in os.listdir(dest_dir) if f.endswith(".dcm"))
    expect(len(segs) == len(SENT_CASES), f"{len(segs)} SEG objects received, expected {len(SENT_CASES)}")
    seen = set()
    for f in segs:
        seg = hd.seg.segread(os.path.join(dest_dir, f))
        expect(seg.SOPClassUID == SEG_STORAGE, f"{f}: SOP class {seg.SOPClassUID}")
        refs = seg.get_source_image_uids()
        series = {r[1] for r in refs}
        expect(len(series) == 1, f"{f}: references one series ({sorted(series)})")
        uid = next(iter(series), None)
        expect(uid in sources, f"{f}: the referenced series {uid} is one of those sent")
        if uid not in sources:
            continue
        name, study, sops = sources[uid]
        expect(uid not in seen, f"{f}: the only SEG of {name}")
        seen.add(uid)
        expect(str(seg.StudyInstanceUID) == study, f"{f}: in the source's study")
        ref_sops = {r[2] for r in refs}
        expect(ref_sops and ref_sops <= sops, f"{f}: {len(ref_sops)} referenced instances, all of {name}'s {len(sops)}")
        frames = int(seg.NumberOfFrames)
        per_frame = len(seg.PerFrameFunctionalGroupsSequence)
        expect(frames == per_frame and frames >= 1, f"{f}: {frames} frames, {per_frame} per-frame groups")
        for item in seg.PerFrameFunctionalGroupsSequence:
            src = item.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID
            if src not in sops:
                expect(False, f"{f}: a frame's source {src} is not an instance of {name}")
                break
        expect(len(seg.SegmentSequence) == classes - 1, f"{f}: {len(seg.SegmentSequence)} segments for {classes} classes")
        ours = os.path.join(server_out, f"{uid}.seg.dcm")
        same = os.path.exists(ours) and str(pydicom.dcmread(ours, stop_before_pixels=True).SOPInstanceUID) == str(seg.SOPInstanceUID)
        expect(same, f"{f}: the server's {ours} is the object received")
    expect(seen == set(sources), f"SEGs for {sorted(sources[s][0] for s in seen)}")
    return 1 if failures else 0


if __name__ == "__main__":
    a = sys.argv[1:]
    if len(a) in (2, 3) and a[0] == "dest":
        sys.exit(dest(*a[1:]))
    elif len(a) in (5, 7) and a[0] == "send":
        refused = a[6] if len(a) == 7 and a[5] == "--refused" else None
        sys.exit(send(a[1], a[2], a[3], a[4], refused))
    elif len(a) == 5 and a[0] == "send-series":
        sys.exit(send_series(*a[1:]))
    elif len(a) == 5 and a[0] == "check":
        sys.exit(check(a[1], a[2], a[3], int(a[4])))
    else:
        sys.exit(__doc__)
