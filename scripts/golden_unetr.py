#!/usr/bin/env python3
"""Golden values for glmae-core's forward pass, computed independently in float64 numpy.

Writes one safetensors file per case under glmae-core/tests/data/: every UNETR parameter (named
as MONAI names them), the input window `__input__` and the expected logits `__logits__`; the
config is in the header's `__metadata__`. The model follows MONAI's UNETR, ViT, TransformerBlock,
SABlock, UnetResBlock, UnetrPrUpBlock, UnetrUpBlock and UnetOutBlock, written from their
definitions with numpy only (no torch, no glmae code).

Regenerate (numpy is the only dependency):
    pip install numpy && python3 scripts/golden_unetr.py
"""

import json
import math
import os
import struct

import numpy as np
from math import erf

CASES = {
    # Sin-cos position embedding on a non-cubic grid (3, 2, 1) catches any axis mix-up.
    "golden_sincos": dict(in_channels=1, img_size=[48, 32, 16], hidden_size=24, num_heads=2,
                          mlp_dim=48, qkv_bias=True, layer_norm_eps=1e-6, pos_embed="SinCos",
                          feature_size=4, out_channels=3, seed=1),
    # Learned table, no qkv bias, PyTorch's LayerNorm eps, two input channels.
    "golden_learned": dict(in_channels=2, img_size=[32, 32, 32], hidden_size=12, num_heads=3,
                           mlp_dim=24, qkv_bias=False, layer_norm_eps=1e-5, pos_embed="Learned",
                           feature_size=2, out_channels=2, seed=2),
}
DEPTH, PATCH = 12, 16


def params(c, rng):
    """Every parameter with its shape, in MONAI's naming; values uniform +-1/sqrt(fan_in)."""
    e, m, ci, f, k = c["hidden_size"], c["mlp_dim"], c["in_channels"], c["feature_size"], c["out_channels"]
    grid = [s // PATCH for s in c["img_size"]]
    shapes = {"vit.patch_embedding.patch_embeddings.weight": (e, ci, PATCH, PATCH, PATCH),
              "vit.patch_embedding.patch_embeddings.bias": (e,)}
    if c["pos_embed"] == "Learned":
        shapes["vit.patch_embedding.position_embeddings"] = (1, int(np.prod(grid)), e)
    for i in range(DEPTH):
        b = f"vit.blocks.{i}"
        shapes.update({f"{b}.mlp.linear1.weight": (m, e), f"{b}.mlp.linear1.bias": (m,),
                       f"{b}.mlp.linear2.weight": (e, m), f"{b}.mlp.linear2.bias": (e,),
                       f"{b}.norm1.weight": (e,), f"{b}.norm1.bias": (e,),
                       f"{b}.attn.out_proj.weight": (e, e), f"{b}.attn.out_proj.bias": (e,),
                       f"{b}.attn.qkv.weight": (3 * e, e),
                       f"{b}.norm2.weight": (e,), f"{b}.norm2.bias": (e,)})
        if c["qkv_bias"]:
            shapes[f"{b}.attn.qkv.bias"] = (3 * e,)
    shapes.update({"vit.norm.weight": (e,), "vit.norm.bias": (e,)})

    def res(prefix, i, o):
        shapes[f"{prefix}.conv1.conv.weight"] = (o, i, 3, 3, 3)
        shapes[f"{prefix}.conv2.conv.weight"] = (o, o, 3, 3, 3)
        if i != o:
            shapes[f"{prefix}.conv3.conv.weight"] = (o, i, 1, 1, 1)

    res("encoder1.layer", ci, f)
    for name, o, layers in [("encoder2", 2 * f, 2), ("encoder3", 4 * f, 1), ("encoder4", 8 * f, 0)]:
        shapes[f"{name}.transp_conv_init.conv.weight"] = (e, o, 2, 2, 2)
        for j in range(layers):
            shapes[f"{name}.blocks.{j}.0.conv.weight"] = (o, o, 2, 2, 2)
            res(f"{name}.blocks.{j}.1", o, o)
    for name, i, o in [("decoder5", e, 8 * f), ("decoder4", 8 * f, 4 * f), ("decoder3", 4 * f, 2 * f), ("decoder2", 2 * f, f)]:
        shapes[f"{name}.transp_conv.conv.weight"] = (i, o, 2, 2, 2)
        res(f"{name}.conv_block", 2 * o, o)
    shapes["out.conv.conv.weight"] = (k, f, 1, 1, 1)
    shapes["out.conv.conv.bias"] = (k,)

    out = {}
    for name, shape in shapes.items():
        if len(shape) == 1:
            centre = 1.0 if name.endswith("norm1.weight") or name.endswith("norm2.weight") or name == "vit.norm.weight" else 0.0
            out[name] = centre + 0.1 * rng.uniform(-1, 1, shape)
        elif name.endswith("position_embeddings"):
            out[name] = 0.02 * rng.uniform(-1, 1, shape)
        else:
            fan_in = shape[0] if "transp_conv" in name or name.endswith(".0.conv.weight") else int(np.prod(shape[1:]))
            out[name] = rng.uniform(-1, 1, shape) / math.sqrt(fan_in)
        out[name] = out[name].astype(np.float32)
    return out


def layer_norm(x, w, b, eps):
    mean = x.mean(-1, keepdims=True)
    var = ((x - mean) ** 2).mean(-1, keepdims=True)
    return (x - mean) / np.sqrt(var + eps) * w + b


def gelu(x):
    return 0.5 * x * (1.0 + np.vectorize(erf)(x / math.sqrt(2.0)))


def sincos(grid, e):
    """MONAI build_sincos_position_embedding, 3-D: [sin w, cos w, sin h, cos h, sin d, cos d]."""
    h, w, d = np.meshgrid(*[np.arange(g, dtype=np.float64) for g in grid], indexing="ij")
    pos_dim = e // 6
    omega = 1.0 / 10000.0 ** (np.arange(pos_dim) / pos_dim)
    parts = []
    for coord in (w, h, d):
        o = np.outer(coord.flatten(), omega)
        parts += [np.sin(o), np.cos(o)]
    return np.concatenate(parts, axis=1)


def conv3d(x, w, pad):
    """x (C, D, H, W), w (O, C, k, k, k), stride 1, zero padding `pad`."""
    k = w.shape[2]
    xp = np.pad(x, ((0, 0), (pad, pad), (pad, pad), (pad, pad)))
    d, h, ww = (s + 2 * pad - k + 1 for s in x.shape[1:])
    out = np.zeros((w.shape[0], d, h, ww))
    for a in range(k):
        for b in range(k):
            for c in range(k):
                out += np.einsum("oc,czyx->ozyx", w[:, :, a, b, c], xp[:, a:a + d, b:b + h, c:c + ww])
    return out


def up2(x, w):
    """ConvTranspose3d k = s = 2: every input voxel becomes a 2x2x2 block."""
    c, d, h, ww = x.shape
    out = np.zeros((w.shape[1], 2 * d, 2 * h, 2 * ww))
    for a in range(2):
        for b in range(2):
            for cc in range(2):
                out[:, a::2, b::2, cc::2] = np.einsum("co,czyx->ozyx", w[:, :, a, b, cc], x)
    return out


def instance_norm(x, eps=1e-5):
    mean = x.mean(axis=(1, 2, 3), keepdims=True)
    var = x.var(axis=(1, 2, 3), keepdims=True)
    return (x - mean) / np.sqrt(var + eps)


def lrelu(x):
    return np.where(x < 0, 0.01 * x, x)


def res_block(p, prefix, x):
    out = lrelu(instance_norm(conv3d(x, p[f"{prefix}.conv1.conv.weight"], 1)))
    out = instance_norm(conv3d(out, p[f"{prefix}.conv2.conv.weight"], 1))
    key = f"{prefix}.conv3.conv.weight"
    residual = instance_norm(conv3d(x, p[key], 0)) if key in p else x
    return lrelu(out + residual)


def forward(c, p, x):
    e, heads = c["hidden_size"], c["num_heads"]
    grid = [s // PATCH for s in c["img_size"]]
    n = int(np.prod(grid))
    # Patch embedding: Conv3d k = s = 16, flatten(2).transpose(1, 2).
    w = p["vit.patch_embedding.patch_embeddings.weight"].reshape(e, -1)
    ci = x.shape[0]
    patches = x.reshape(ci, grid[0], PATCH, grid[1], PATCH, grid[2], PATCH)
    patches = patches.transpose(1, 3, 5, 0, 2, 4, 6).reshape(n, -1)
    t = patches @ w.T + p["vit.patch_embedding.patch_embeddings.bias"]
    if c["pos_embed"] == "Learned":
        t = t + p["vit.patch_embedding.position_embeddings"][0]
    else:
        t = t + sincos(grid, e)
    hidden = []
    dh = e // heads
    for i in range(DEPTH):
        b = lambda s: p[f"vit.blocks.{i}.{s}"]
        h = layer_norm(t, b("norm1.weight"), b("norm1.bias"), c["layer_norm_eps"])
        qkv = h @ b("attn.qkv.weight").T
        if c["qkv_bias"]:
            qkv = qkv + b("attn.qkv.bias")
        qkv = qkv.reshape(n, 3, heads, dh).transpose(1, 2, 0, 3)  # (qkv, head, token, dh)
        q, k, v = qkv
        att = np.einsum("hxd,hyd->hxy", q, k) / math.sqrt(dh)
        att = np.exp(att - att.max(-1, keepdims=True))
        att = att / att.sum(-1, keepdims=True)
        o = np.einsum("hxy,hyd->xhd", att, v).reshape(n, e)
        t = t + o @ b("attn.out_proj.weight").T + b("attn.out_proj.bias")
        h = layer_norm(t, b("norm2.weight"), b("norm2.bias"), c["layer_norm_eps"])
        h = gelu(h @ b("mlp.linear1.weight").T + b("mlp.linear1.bias"))
        t = t + h @ b("mlp.linear2.weight").T + b("mlp.linear2.bias")
        hidden.append(t)
    last = layer_norm(t, p["vit.norm.weight"], p["vit.norm.bias"], c["layer_norm_eps"])
    proj = lambda z: z.T.reshape(e, *grid)

    def pr_up(name, z, layers):
        y = up2(z, p[f"{name}.transp_conv_init.conv.weight"])
        for j in range(layers):
            y = up2(y, p[f"{name}.blocks.{j}.0.conv.weight"])
            y = res_block(p, f"{name}.blocks.{j}.1", y)
        return y

    def up(name, y, skip):
        y = up2(y, p[f"{name}.transp_conv.conv.weight"])
        return res_block(p, f"{name}.conv_block", np.concatenate([y, skip], axis=0))

    enc1 = res_block(p, "encoder1.layer", x)
    enc2 = pr_up("encoder2", proj(hidden[3]), 2)
    enc3 = pr_up("encoder3", proj(hidden[6]), 1)
    enc4 = pr_up("encoder4", proj(hidden[9]), 0)
    d3 = up("decoder5", proj(last), enc4)
    d2 = up("decoder4", d3, enc3)
    d1 = up("decoder3", d2, enc2)
    d0 = up("decoder2", d1, enc1)
    w = p["out.conv.conv.weight"]
    return conv3d(d0, w, 0) + p["out.conv.conv.bias"][:, None, None, None]


def save_safetensors(path, tensors, metadata):
    header = {"__metadata__": metadata}
    offset, blobs = 0, []
    for name, a in tensors.items():
        blob = np.ascontiguousarray(a, dtype="<f4").tobytes()
        header[name] = {"dtype": "F32", "shape": list(a.shape), "data_offsets": [offset, offset + len(blob)]}
        offset += len(blob)
        blobs.append(blob)
    h = json.dumps(header).encode()
    h += b" " * (-len(h) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(h)) + h + b"".join(blobs))


def main():
    out_dir = os.path.join(os.path.dirname(__file__), "..", "glmae-core", "tests", "data")
    os.makedirs(out_dir, exist_ok=True)
    for name, c in CASES.items():
        rng = np.random.default_rng(c["seed"])
        p = params(c, rng)
        x = rng.uniform(0, 1, (c["in_channels"], *c["img_size"])).astype(np.float32)
        logits = forward(c, {k: v.astype(np.float64) for k, v in p.items()}, x.astype(np.float64))
        tensors = dict(p, __input__=x, __logits__=logits.astype(np.float32))
        meta = {"config": json.dumps({k: v for k, v in c.items() if k != "seed"})}
        save_safetensors(os.path.join(out_dir, f"{name}.safetensors"), tensors, meta)
        print(f"{name}: logits {logits.shape}, |logits| max {np.abs(logits).max():.4f}")


if __name__ == "__main__":
    main()
