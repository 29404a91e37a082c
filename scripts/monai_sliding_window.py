"""MONAI's sliding_window_inference on volumes the test names, with a model any implementation can
repeat exactly: class 0 = 2 x input + 0.01 x (window-local index along the last axis), class 1 =
-input + 0.02 x (window-local index along the middle axis). Position-dependent logits make the
window placement, the padding and the blending visible in the output.

    python3 scripts/monai_sliding_window.py OUT_DIR

Writes OUT_DIR/cases.json (shape, roi, overlap, mode per case) and, per case N, caseN.in.f32 and
caseN.out.f32 (little-endian f32, C order; the output is (2, *shape)). Used by
glmae-data/tests/monai_sliding_window.rs.
"""
import json
import os
import sys

import numpy as np
import torch
from monai.inferers import sliding_window_inference

CASES = [
    # (shape, roi, overlap, mode)
    ((37, 29, 23), (16, 16, 8), 0.5, "gaussian"),
    ((37, 29, 23), (16, 16, 8), 0.25, "constant"),
    ((40, 22, 9), (16, 32, 16), 0.5, "gaussian"),  # two axes shorter than the ROI
    ((11, 13, 5), (16, 16, 16), 0.5, "gaussian"),  # every axis shorter
    ((33, 20, 30), (32, 20, 8), 0.5, "constant"),  # one axis exactly the ROI
    ((45, 17, 12), (24, 24, 7), 0.5, "gaussian"),  # odd ROI, short middle axis
]


def model(x):
    _, _, h, w, d = x.shape
    kk = torch.arange(d, dtype=torch.float32).view(1, 1, 1, 1, d)
    jj = torch.arange(w, dtype=torch.float32).view(1, 1, 1, w, 1)
    return torch.cat([2.0 * x + 0.01 * kk, -x + 0.02 * jj], dim=1)


def main(out):
    os.makedirs(out, exist_ok=True)
    rng = np.random.default_rng(0)
    meta = []
    for n, (shape, roi, overlap, mode) in enumerate(CASES):
        image = rng.random(shape, dtype=np.float32)
        with torch.no_grad():
            y = sliding_window_inference(
                torch.from_numpy(image)[None, None], roi, 4, model, overlap=overlap, mode=mode
            )[0]
        image.astype("<f4").tofile(os.path.join(out, f"case{n}.in.f32"))
        y.numpy().astype("<f4").tofile(os.path.join(out, f"case{n}.out.f32"))
        meta.append({"shape": shape, "roi": roi, "overlap": overlap, "mode": mode})
    with open(os.path.join(out, "cases.json"), "w") as f:
        json.dump(meta, f)


if __name__ == "__main__":
    main(sys.argv[1])
