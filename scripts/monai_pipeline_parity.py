"""MONAI's whole UNETR inference recipe on CT-like volumes this script writes, for the parity test
`tests/tests/monai_pipeline.rs` (which runs `glmae-infer`'s pipeline on the same files and model):

    LoadImaged, EnsureChannelFirstd, Orientationd RAS, Spacingd 1.5 x 1.5 x 2 (bilinear),
    ScaleIntensityRanged [-175, 250] -> [0, 1] clipped, CropForegroundd,
    sliding_window_inference (ROI 32, overlap 0.5, gaussian), softmax,
    Invertd (nearest_interp=False: the probabilities go back bilinearly), argmax

as MONAI's bundles run it (Activationsd softmax, Invertd, AsDiscreted argmax). The model is a small
MONAI UNETR with random weights, its output layer scaled so that labels are decisive.

    python3 scripts/monai_pipeline_parity.py OUT_DIR

writes OUT_DIR/unetr.safetensors, and per case caseN.nii.gz (the input), caseN.probs.f32 (MONAI's
inverted probabilities, float32 little-endian, [C, X, Y, Z] C order), caseN.labels.u8 ([X, Y, Z])
and cases.txt (one line per case: file name, then a description).
"""
import os
import sys

import nibabel as nib
import numpy as np
import torch
from monai.inferers import sliding_window_inference
from monai.networks.nets import UNETR
from monai.transforms import (Activationsd, AsDiscreted, Compose, CropForegroundd, EnsureChannelFirstd,
                              Invertd, LoadImaged, Orientationd, ScaleIntensityRanged, Spacingd)
from safetensors.torch import save_file


def phantom(shape, rng, body=1.0):
    """An ellipsoidal body at 40 HU in air (-1000), six spheres of -100..250 HU, noise sd 10.
    `body` < 1 shrinks the body, leaving air margins for the foreground crop."""
    g = np.stack(np.meshgrid(*[np.linspace(-1, 1, s) for s in shape], indexing="ij")) / body
    img = np.full(shape, -1000.0, np.float32)
    inside = (g[0] ** 2 / 0.6 + g[1] ** 2 / 0.5 + g[2] ** 2 / 1.2) < 1
    img[inside] = 40
    for _ in range(6):
        c, r = rng.uniform(-0.5, 0.5, 3), rng.uniform(0.1, 0.3)
        img[(((g - c[:, None, None, None]) ** 2).sum(0) < r * r) & inside] = rng.uniform(-100, 250)
    return img + rng.normal(0, 10, shape).astype(np.float32)


def oblique(spacing, degrees, origin):
    """An affine rotated by `degrees` about the z axis."""
    t = np.deg2rad(degrees)
    rot = np.array([[np.cos(t), -np.sin(t), 0], [np.sin(t), np.cos(t), 0], [0, 0, 1]])
    a = np.eye(4)
    a[:3, :3] = rot @ np.diag(spacing)
    a[:3, 3] = origin
    return a


def lps(spacing, origin):
    return np.array([[-spacing[0], 0, 0, origin[0]], [0, -spacing[1], 0, origin[1]],
                     [0, 0, spacing[2], origin[2]], [0, 0, 0, 1.0]])


def main(out):
    os.makedirs(out, exist_ok=True)
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    net = UNETR(in_channels=1, out_channels=3, img_size=(32, 32, 32), feature_size=4, hidden_size=24,
                mlp_dim=48, num_heads=2).eval()
    with torch.no_grad():
        net.out.conv.conv.weight.mul_(20.0)
        net.out.conv.conv.bias.mul_(20.0)
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, f"{out}/unetr.safetensors")
    ras = lambda s: np.diag([*s, 1.0])  # noqa: E731
    # (description, image, affine, stored as: "int16", "int16 slope" or "float32")
    cases = [
        ("RAS at the target spacing, odd sizes, every axis >= ROI", phantom((71, 61, 53), rng),
         ras((1.5, 1.5, 2.0)), "int16"),
        ("RAS, 13 slices: shorter than the ROI on one axis", phantom((70, 60, 13), rng),
         ras((1.5, 1.5, 2.0)), "int16"),
        ("RAS, 21 x 13: shorter than the ROI on two axes", phantom((70, 21, 13), rng),
         ras((1.5, 1.5, 2.0)), "int16"),
        ("RAS, 0.8 x 0.8 x 3 mm (anisotropic, resampled)", phantom((91, 81, 21), rng),
         ras((0.8, 0.8, 3.0)), "int16"),
        ("LPS, 0.8 x 0.8 x 3 mm", phantom((91, 81, 21), rng), lps((0.8, 0.8, 3.0), (10, -20, 5)), "float32"),
        ("oblique (12 degrees about z), 1.2 x 1.1 x 2.5 mm", phantom((67, 59, 19), rng),
         oblique((1.2, 1.1, 2.5), 12, (-30, 15, 40)), "int16"),
        ("air margins (body at 60% of the field), 1.7 x 1.3 x 1.6 mm", phantom((75, 69, 41), rng, body=0.6),
         ras((1.7, 1.3, 1.6)), "int16"),
        ("int16 with scl_slope 0.5, scl_inter -1024", phantom((63, 57, 29), rng),
         ras((1.5, 1.5, 2.0)), "int16 slope"),
    ]
    pre = Compose([
        LoadImaged(keys="image"), EnsureChannelFirstd(keys="image"), Orientationd(keys="image", axcodes="RAS"),
        Spacingd(keys="image", pixdim=(1.5, 1.5, 2.0), mode="bilinear"),
        ScaleIntensityRanged(keys="image", a_min=-175, a_max=250, b_min=0.0, b_max=1.0, clip=True),
        CropForegroundd(keys="image", source_key="image"),
    ])
    post = Compose([
        Activationsd(keys="pred", softmax=True),
        Invertd(keys="pred", transform=pre, orig_keys="image", nearest_interp=False),
    ])
    lines = []
    for n, (name, img, aff, stored) in enumerate(cases):
        path = f"{out}/case{n}.nii.gz"
        if stored == "int16 slope":
            # Stored values v give HU 0.5 v - 1024: the reader must apply the scaling.
            raw = np.clip(np.round((img + 1024) / 0.5), -32768, 32767).astype(np.int16)
            nii = nib.Nifti1Image(raw, aff)
            nii.header.set_slope_inter(0.5, -1024)
        elif stored == "int16":
            nii = nib.Nifti1Image(np.round(img).astype(np.int16), aff)
        else:
            nii = nib.Nifti1Image(img.astype(np.float32), aff)
        nib.save(nii, path)
        d = pre({"image": path})
        with torch.no_grad():
            d["pred"] = sliding_window_inference(d["image"][None], (32, 32, 32), 4, net, overlap=0.5,
                                                 mode="gaussian")[0]
        d = post(d)
        probs = d["pred"].numpy().astype(np.float32)
        labels = AsDiscreted(keys="pred", argmax=True)(d)["pred"][0].numpy().astype(np.uint8)
        assert probs.shape[1:] == img.shape, (probs.shape, img.shape)
        probs.astype("<f4").tofile(f"{out}/case{n}.probs.f32")
        labels.tofile(f"{out}/case{n}.labels.u8")
        lines.append(f"case{n}.nii.gz {name}")
    with open(f"{out}/cases.txt", "w") as f:
        f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main(sys.argv[1])
