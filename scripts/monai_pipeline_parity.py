"""MONAI's whole UNETR inference recipe against `glmae-infer segment`, on CT-like volumes this
script writes: Orientationd RAS, Spacingd 1.5 x 1.5 x 2 (bilinear), ScaleIntensityRanged
[-175, 250] -> [0, 1] clipped, CropForegroundd, sliding_window_inference (ROI 32, overlap 0.5,
gaussian), Invertd back to the source grid, argmax. The model is a small MONAI UNETR with random
weights (output layer scaled so labels are decisive), imported with `glmae-train import`.

    cargo build --release -p glmae-train -p glmae-infer
    python3 scripts/monai_pipeline_parity.py OUT_DIR [--nearest]

Prints the share of identical labels per volume. `--nearest` makes MONAI argmax first and invert
the labels by nearest neighbour, which is what glmae-infer does today; without it MONAI inverts
the probabilities bilinearly (`nearest_interp=False`), as its UNETR tutorials do.
"""
import os
import subprocess
import sys

import nibabel as nib
import numpy as np
import torch
from monai.inferers import sliding_window_inference
from monai.networks.nets import UNETR
from monai.transforms import (AsDiscreted, Compose, CropForegroundd, EnsureChannelFirstd, Invertd,
                              LoadImaged, Orientationd, ScaleIntensityRanged, Spacingd)
from safetensors.torch import save_file

BIN = os.environ.get("GLMAE_BIN", "target/release")


def phantom(shape, rng):
    g = np.stack(np.meshgrid(*[np.linspace(-1, 1, s) for s in shape], indexing="ij"))
    img = np.full(shape, -1000.0, np.float32)
    body = (g[0] ** 2 / 0.6 + g[1] ** 2 / 0.5 + g[2] ** 2 / 1.2) < 1
    img[body] = 40
    for _ in range(6):
        c, r = rng.uniform(-0.5, 0.5, 3), rng.uniform(0.1, 0.3)
        img[(((g - c[:, None, None, None]) ** 2).sum(0) < r * r) & body] = rng.uniform(-100, 250)
    return img + rng.normal(0, 10, shape).astype(np.float32)


def main(out, nearest):
    os.makedirs(out, exist_ok=True)
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    net = UNETR(in_channels=1, out_channels=3, img_size=(32, 32, 32), feature_size=4, hidden_size=24,
                mlp_dim=48, num_heads=2).eval()
    with torch.no_grad():
        net.out.conv.conv.weight.mul_(20.0)
        net.out.conv.conv.bias.mul_(20.0)
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, f"{out}/unetr.safetensors")
    subprocess.run([f"{BIN}/glmae-train", "import", f"{out}/unetr.safetensors", "--out", f"{out}/m.glmae",
                    "--heads", "2"], check=True, stdout=subprocess.DEVNULL)
    cases = {
        "ras, every axis >= ROI": (phantom((70, 60, 50), rng), np.diag([1.5, 1.5, 2.0, 1.0])),
        "ras, 12 slices < ROI": (phantom((70, 60, 12), rng), np.diag([1.5, 1.5, 2.0, 1.0])),
        "lps, target spacing": (phantom((90, 80, 20), rng),
                                np.array([[-1.5, 0, 0, 10], [0, -1.5, 0, -20], [0, 0, 2.0, 5], [0, 0, 0, 1]])),
        "ras, 0.8 x 0.8 x 3 mm": (phantom((90, 80, 20), rng), np.diag([0.8, 0.8, 3.0, 1.0])),
        "lps, 0.8 x 0.8 x 3 mm": (phantom((90, 80, 20), rng),
                                  np.array([[-0.8, 0, 0, 10], [0, -0.8, 0, -20], [0, 0, 3.0, 5], [0, 0, 0, 1]])),
    }
    for n, (name, (img, aff)) in enumerate(cases.items()):
        path = f"{out}/case{n}.nii.gz"
        nib.save(nib.Nifti1Image(np.round(img).astype(np.int16), aff), path)
        pre = Compose([
            LoadImaged(keys="image"), EnsureChannelFirstd(keys="image"), Orientationd(keys="image", axcodes="RAS"),
            Spacingd(keys="image", pixdim=(1.5, 1.5, 2.0), mode="bilinear"),
            ScaleIntensityRanged(keys="image", a_min=-175, a_max=250, b_min=0.0, b_max=1.0, clip=True),
            CropForegroundd(keys="image", source_key="image"),
        ])
        d = pre({"image": path})
        with torch.no_grad():
            d["pred"] = sliding_window_inference(d["image"][None], (32, 32, 32), 4, net, overlap=0.5,
                                                 mode="gaussian")[0]
        invert = Invertd(keys="pred", transform=pre, orig_keys="image", nearest_interp=nearest)
        argmax = AsDiscreted(keys="pred", argmax=True)
        d = Compose([argmax, invert] if nearest else [invert, argmax])(d)
        monai = d["pred"][0].numpy().astype(np.uint8)
        ours_path = f"{out}/case{n}.glmae.nii.gz"
        subprocess.run([f"{BIN}/glmae-infer", "segment", "--model", f"{out}/m.glmae", "--input", path,
                        "--output", ours_path, "--overlap", "0.5", "--blend", "gaussian"],
                       check=True, stdout=subprocess.DEVNULL)
        ours = np.asarray(nib.load(ours_path).dataobj)
        same = 100.0 * (monai == ours).mean() if monai.shape == ours.shape else float("nan")
        print(f"{name:28s} {str(img.shape):15s} identical labels {same:8.4f}%")


if __name__ == "__main__":
    main(sys.argv[1], "--nearest" in sys.argv[2:])
