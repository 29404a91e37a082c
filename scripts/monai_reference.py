#!/usr/bin/env python3
"""A MONAI UNETR with random weights, its state dict, an input and MONAI's output, for the import
parity test (glmae-train/tests/monai_import.rs).

    pip install torch monai einops safetensors
    python3 scripts/monai_reference.py OUT_DIR

Writes OUT_DIR/unetr.safetensors (the state dict as MONAI names it), OUT_DIR/io.safetensors
(`input`, `logits`), OUT_DIR/config.json, and the same weights as PyTorch checkpoints:
- unetr.pt: `torch.save(state_dict)` (zip container);
- unetr_legacy.pt: the same in the pre-1.6 container (`_use_new_zipfile_serialization=False`);
- unetr_student.pth: the GL-MAE authors' layout, `{"student": {"module.backbone.<name>": ...},
  "teacher": <other weights>, "epoch", "args": argparse.Namespace}` (DINO's checkpoint format);
- unetr_state_dict.pt: a training checkpoint, `{"state_dict": ..., "optimizer": ..., "epoch"}`.
"""

import argparse
import json
import os
import sys

import torch
from monai.networks.nets import UNETR
from safetensors.torch import save_file

CONFIG = dict(in_channels=1, out_channels=3, img_size=(32, 32, 32), feature_size=4, hidden_size=24,
              mlp_dim=48, num_heads=2, qkv_bias=False)


def main():
    out = sys.argv[1]
    os.makedirs(out, exist_ok=True)
    torch.manual_seed(0)
    net = UNETR(**CONFIG).eval()
    with torch.no_grad():
        # Non-trivial norms and biases so that every parameter matters.
        for name, p in net.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
        x = torch.rand(1, 1, *CONFIG["img_size"])
        y = net(x)
    state = {k: v.contiguous() for k, v in net.state_dict().items()}
    save_file(state, os.path.join(out, "unetr.safetensors"))
    torch.save(net.state_dict(), os.path.join(out, "unetr.pt"))
    torch.save(net.state_dict(), os.path.join(out, "unetr_legacy.pt"), _use_new_zipfile_serialization=False)
    # The teacher differs from the student, so that reading the wrong one shows in the logits.
    student = {"module.backbone." + k: v for k, v in net.state_dict().items()}
    teacher = {k: v + 0.5 for k, v in student.items()}
    args = argparse.Namespace(arch="vit_base", lr=1e-2, out_dim=512)
    torch.save({"student": student, "teacher": teacher, "epoch": 100, "args": args},
               os.path.join(out, "unetr_student.pth"))
    snapshot = {k: v.clone() for k, v in state.items()}  # `state` aliases the parameters
    opt = torch.optim.AdamW(net.parameters())
    net(x).sum().backward()
    opt.step()  # optimizer state with integer keys, as a real training checkpoint has
    torch.save({"state_dict": snapshot, "optimizer": opt.state_dict(), "epoch": 3},
               os.path.join(out, "unetr_state_dict.pt"))
    save_file({"input": x.contiguous(), "logits": y.contiguous()}, os.path.join(out, "io.safetensors"))
    with open(os.path.join(out, "config.json"), "w") as f:
        json.dump(CONFIG, f)
    print(f"{len(state)} tensors; logits {tuple(y.shape)}")


if __name__ == "__main__":
    main()
