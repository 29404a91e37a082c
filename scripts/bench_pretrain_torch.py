#!/usr/bin/env python3
"""The GL-MAE pretraining step of glmae-train, in PyTorch, timed on the same machine.

Same sizes as `cargo bench -p glmae-train --bench pretrain_step`: ViT-T encoder (192 x 12, 3
heads, MLP 768, patch 16), MAE decoder 128 x 4 (4 heads), projection head 2048/2048/512, per volume
2 global views of 160^3 and 4 local views of 96^3 with 75% of tokens masked, EMA teacher on the
unmasked global views, masked-patch MSE + centred consistency cross-entropy, AdamW, global-norm
clipping. Views are random tensors (loading is timed separately by glmae-data's benchmark).

    pip install torch
    python3 scripts/bench_pretrain_torch.py --threads 2 --steps 3 [--ablation full|local-only]
    python3 scripts/bench_pretrain_torch.py --device cuda --steps 10 [--bf16]

On CUDA, --bf16 runs the step under torch.autocast (bf16 matmuls, f32 master weights), PyTorch's
usual mixed precision; glmae-train's --precision bf16 keeps every tensor in bf16.
"""

import argparse
import copy
import math
import time

import torch
import torch.nn as nn
import torch.nn.functional as F


class Block(nn.Module):
    def __init__(self, dim, heads, mlp):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(dim, eps=1e-6), nn.LayerNorm(dim, eps=1e-6)
        self.qkv, self.out_proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.linear1, self.linear2 = nn.Linear(dim, mlp), nn.Linear(mlp, dim)
        self.heads = heads

    def forward(self, x):
        b, n, e = x.shape
        q, k, v = self.qkv(self.norm1(x)).reshape(b, n, 3, self.heads, e // self.heads).permute(2, 0, 3, 1, 4)
        att = (q @ k.transpose(-2, -1) / math.sqrt(e // self.heads)).softmax(-1)
        x = x + self.out_proj((att @ v).transpose(1, 2).reshape(b, n, e))
        return x + self.linear2(F.gelu(self.linear1(self.norm2(x))))


class Vit(nn.Module):
    def __init__(self, dim=192, depth=12, heads=3, mlp=768, patch_values=4096):
        super().__init__()
        self.embed = nn.Linear(patch_values, dim)
        self.blocks = nn.ModuleList(Block(dim, heads, mlp) for _ in range(depth))
        self.norm = nn.LayerNorm(dim, eps=1e-6)

    def forward(self, tokens, pos, keep=None):
        x = self.embed(tokens) + pos
        if keep is not None:
            x = torch.gather(x, 1, keep.unsqueeze(-1).expand(-1, -1, x.shape[-1]))
        for blk in self.blocks:
            x = blk(x)
        return self.norm(x)


class Decoder(nn.Module):
    def __init__(self, hidden=192, width=128, depth=4, heads=4, patch_values=4096):
        super().__init__()
        self.embed = nn.Linear(hidden, width)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, width))
        self.blocks = nn.ModuleList(Block(width, heads, 4 * width) for _ in range(depth))
        self.norm = nn.LayerNorm(width, eps=1e-6)
        self.pred = nn.Linear(width, patch_values)

    def forward(self, latent, restore, pos):
        x = self.embed(latent)
        b, kept, w = x.shape
        x = torch.cat([x, self.mask_token.expand(b, restore.shape[1] - kept, w)], 1)
        x = torch.gather(x, 1, restore.unsqueeze(-1).expand(-1, -1, w)) + pos
        for blk in self.blocks:
            x = blk(x)
        return self.pred(self.norm(x))


def head(hidden=192):
    return nn.Sequential(nn.Linear(hidden, 2048), nn.GELU(), nn.Linear(2048, 2048), nn.GELU(), nn.Linear(2048, 512))


def views(count, size, device):
    n = (size // 16) ** 3
    kept = int(n * 0.25)
    tokens = torch.rand(count, n, 4096, device=device)
    order = torch.rand(count, n, device=device).argsort(1)
    restore = order.argsort(1)
    mask = (restore >= kept).float()
    return tokens, order[:, :kept], restore, mask


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--ablation", default="full", choices=["full", "local-only"])
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--bf16", action="store_true", help="autocast to bf16 (CUDA)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    dev = torch.device(args.device)
    vit, dec, proj = Vit().to(dev), Decoder().to(dev), head().to(dev)
    t_vit, t_head = copy.deepcopy(vit).requires_grad_(False), copy.deepcopy(proj).requires_grad_(False)
    params = list(vit.parameters()) + list(dec.parameters()) + list(proj.parameters())
    opt = torch.optim.AdamW(params, lr=1e-4, betas=(0.9, 0.95), weight_decay=0.05)
    center = torch.zeros(512, device=dev)
    b = args.batch

    def step():
        nonlocal center
        lt, lk, lr_, lm = views(4 * b, 96, dev)
        pos_l, dpos_l = torch.zeros(216, 192, device=dev), torch.zeros(216, 128, device=dev)
        lat_l = vit(lt, pos_l, lk)
        rec = ((dec(lat_l, lr_, dpos_l) - lt) ** 2).mean(-1).mul(lm).sum() / lm.sum()
        if args.ablation == "full":
            gt, gk, gr, gm = views(2 * b, 160, dev)
            pos_g, dpos_g = torch.zeros(1000, 192, device=dev), torch.zeros(1000, 128, device=dev)
            lat_g = vit(gt, pos_g, gk)
            rec = rec + ((dec(lat_g, gr, dpos_g) - gt) ** 2).mean(-1).mul(gm).sum() / gm.sum()
            with torch.no_grad():
                t = t_head(t_vit(gt, pos_g).mean(1))
            s = torch.cat([proj(lat_g.mean(1)).reshape(b, 2, 512), proj(lat_l.mean(1)).reshape(b, 4, 512)], 1)
            pt = ((t - center) / 0.04).softmax(-1).reshape(b, 2, 512)
            cons = -(pt @ F.log_softmax(s / 0.1, -1).transpose(1, 2)).mean()
            rec = rec + cons
            center = 0.9 * center + 0.1 * t.mean(0)
        opt.zero_grad()
        rec.backward()
        torch.nn.utils.clip_grad_norm_(params, 3.0)
        opt.step()
        with torch.no_grad():
            for tp, sp in zip(list(t_vit.parameters()) + list(t_head.parameters()), list(vit.parameters()) + list(proj.parameters())):
                tp.mul_(0.996).add_(sp, alpha=0.004)

    def timed_step():
        with torch.autocast(args.device, dtype=torch.bfloat16, enabled=args.bf16):
            step()

    timed_step()  # warm-up
    sync = torch.cuda.synchronize if args.device == "cuda" else (lambda: None)
    sync()
    start = time.perf_counter()
    for _ in range(args.steps):
        timed_step()
    sync()
    per = (time.perf_counter() - start) / args.steps
    n_views = b * (4 if args.ablation == "local-only" else 6)
    if args.device == "cuda":
        where = f"{torch.cuda.get_device_name()}{', bf16 autocast' if args.bf16 else ''}"
    else:
        where = f"CPU, {args.threads} threads"
    print(f"| ViT-T | {args.ablation} | PyTorch {torch.__version__} {where} | {b} | {per:.3f} | {n_views / per:.2f} |")


if __name__ == "__main__":
    main()
