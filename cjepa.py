"""
cjepa.py: C-JEPA (Mo and Tong, NeurIPS 2024) in one readable file.

C-JEPA is I-JEPA plus VICReg. A context encoder sees one large block of an image; a narrow
predictor, told only *where* the hidden target blocks are, predicts what an EMA "target encoder"
says about them. VICReg's variance and covariance terms keep the features from collapsing, and
its invariance term makes the predictions right on average. Read the sections in order:

    1. Vision Transformer       the encoder (context and target encoder share the architecture)
    2. Multi-block masks        one context block and M target blocks per image
    3. Predictor                predicts the target blocks' features from the context
    4. Targets and EMA          the target encoder follows the context encoder as a moving average
    5. VICReg and the loss      smooth L1 to the target encoder, plus what C-JEPA adds
    6. Optimisation             AdamW, the warm-up + cosine schedules, one training step
    7. Data                     ImageFolder, and the built-in Fashion-MNIST demo set
    8. Training loop            DDP, AMP, checkpoints, logs
    9. Linear probe             frozen target encoder + BatchNorm + Linear
   10. Benchmark and main

Usage:
    python cjepa.py                                       # the demo: CPU, minutes, no download
    python cjepa.py --data /imagenet --arch vit_b16       # pretraining on an ImageFolder tree
    torchrun --standalone --nproc_per_node=8 cjepa.py --data /imagenet --arch vit_b16
    python cjepa.py --benchmark --arch vit_b16            # speed and memory of one training step
    python cjepa.py --probe-only runs/demo/checkpoint.pt  # linear probe of a checkpoint

The demo, on 2 CPU cores, no GPU: 6 epochs on 10,000 Fashion-MNIST images in about 3.5 minutes,
then a linear probe of the target encoder: 79.9% top-1 (3 seeds), against 66.7% for the same
encoder randomly initialised and 60.7% for plain I-JEPA (--vicreg 0). README.md has the details.
"""
import argparse
import copy
import json
import math
import os
import sys
import time
from collections import OrderedDict
from contextlib import nullcontext
from datetime import timedelta

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torchvision import datasets, transforms as T
from tqdm import tqdm

HERE = os.path.dirname(os.path.abspath(__file__))


class CliError(Exception):
    """An error the user can act on: main() prints it as one line and exits with code 2."""


# =============================================================================================
# 1. Vision Transformer
# =============================================================================================
# name: (width, depth, heads, patch). vit_demo is ours: small enough to learn in minutes on a CPU.
ARCHS = {
    "vit_demo": (128, 4, 4, 4),
    "vit_t16": (192, 12, 3, 16),
    "vit_s16": (384, 12, 6, 16),
    "vit_b16": (768, 12, 12, 16),
    "vit_l16": (1024, 24, 16, 16),
    "vit_h14": (1280, 32, 16, 14),
    "vit_h16": (1280, 32, 16, 16),
}


def sincos_pos_embed(dim, grid):
    """Fixed 2-D sine-cosine positions, [grid*grid, dim] in raster order. As in the official
    I-JEPA/MAE code, the first half of the channels encodes the column, the second the row."""
    assert dim % 4 == 0, "the 2-D sin-cos embedding needs a width divisible by 4"
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim // 4))
    row, col = torch.meshgrid(torch.arange(grid), torch.arange(grid), indexing="ij")

    def embed_1d(pos):  # [N] -> [N, dim/2]
        angle = pos.flatten()[:, None] * omega[None, :]
        return torch.cat([angle.sin(), angle.cos()], dim=1)

    return torch.cat([embed_1d(col), embed_1d(row)], dim=1).float()


def gather_tokens(x, idx):
    """x [B, N, D], idx [..., B, K] patch indices -> [..., B, K, D]: the tokens of those patches."""
    return x[torch.arange(x.shape[0], device=x.device)[:, None], idx]


class Attention(nn.Module):
    def __init__(self, dim, heads):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.fused = True  # False: the explicit path everywhere (the benchmark's plain baseline)

    def forward(self, x, return_attn=False, last=None):  # x [B, N, D]; last: only the last queries
        B, N, D = x.shape
        q, k, v = self.qkv(x).view(B, N, 3, self.heads, D // self.heads).permute(2, 0, 3, 1, 4)
        if last:
            q, N = q[:, :, -last:], last
        if self.fused and not return_attn:
            # one fused kernel (flash / memory-efficient attention): never stores the N x N weights
            x = F.scaled_dot_product_attention(q, k, v)  # [B, heads, N, D/heads]
            attn = None
        else:  # softmax(q k^T / sqrt(d)) v, spelled out so that visualize.py can see the weights
            attn = (q @ k.transpose(-2, -1) * q.shape[-1] ** -0.5).softmax(dim=-1)  # [B, h, N, N]
            x = attn @ v
        x = self.proj(x.transpose(1, 2).reshape(B, N, D))
        return (x, attn) if return_attn else x


class Block(nn.Module):
    """Pre-norm transformer block: x + Attn(LN(x)), then x + MLP(LN(x))."""

    def __init__(self, dim, heads):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = nn.Sequential(OrderedDict(fc1=nn.Linear(dim, 4 * dim), act=nn.GELU(), fc2=nn.Linear(4 * dim, dim)))

    def forward(self, x, last=None):  # last: compute the outputs of the last `last` tokens only
        x = (x if last is None else x[:, -last:]) + self.attn(self.norm1(x), last=last)
        return x + self.mlp(self.norm2(x))


def init_weights(m):
    if isinstance(m, (nn.Linear, nn.Conv2d)):
        nn.init.trunc_normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.LayerNorm):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)


class VisionTransformer(nn.Module):
    """ViT without a class token. Parameter names follow the official I-JEPA encoder, so its
    released checkpoints load (after stripping the 'module.' prefix)."""

    def __init__(self, img_size, patch_size, width, depth, heads):
        super().__init__()
        self.grid = img_size // patch_size  # the image is a grid x grid array of patches
        self.patch_embed = nn.Sequential(OrderedDict(proj=nn.Conv2d(3, width, patch_size, patch_size)))
        self.register_buffer("pos_embed", sincos_pos_embed(width, self.grid)[None])  # [1, N, D], not learned
        self.blocks = nn.ModuleList(Block(width, heads) for _ in range(depth))
        self.norm = nn.LayerNorm(width, eps=1e-6)
        self.apply(init_weights)

    def embed(self, images, keep=None):  # images [B, 3, H, W], keep [B, K] -> tokens [B, K or N, D]
        x = self.patch_embed(images).flatten(2).transpose(1, 2) + self.pos_embed
        return x if keep is None else gather_tokens(x, keep)  # position first, so kept tokens know where they are

    def forward(self, images, keep=None):
        x = self.embed(images, keep)
        for block in self.blocks:
            x = block(x)
        return self.norm(x)

    def features(self, images, n_last=1):  # -> [B, n_last * D]: the probe's features
        """Mean patch token of each of the last n_last blocks (after the final norm), concatenated."""
        x, out = self.embed(images), []
        for i, block in enumerate(self.blocks):
            x = block(x)
            if i >= len(self.blocks) - n_last:
                out.append(self.norm(x).mean(dim=1))
        return torch.cat(out, dim=1)

    def last_attention(self, images):  # -> [B, heads, N, N]: the last block's attention weights
        x = self.embed(images)
        for block in self.blocks[:-1]:
            x = block(x)
        return self.blocks[-1].attn(self.blocks[-1].norm1(x), return_attn=True)[1]


def make_encoder(args):
    width, depth, heads, patch = ARCHS[args.arch]
    return VisionTransformer(args.img_size, args.patch_size or patch, width, depth, heads)


# =============================================================================================
# 2. Multi-block masks
# =============================================================================================
# I-JEPA hides M target blocks (each 15-20% of the image) and shows the context encoder one large
# block (85-100%) with every target patch removed, so the targets can't be copied: they must be
# predicted from their surroundings. One block size per batch, positions per image.


def block_size(scale, aspect, H, W, gen):
    """Draw one (h, w) block shape: area = scale * H*W, h/w = aspect, at most (H-1) x (W-1)."""
    s = scale[0] + torch.rand(1, generator=gen).item() * (scale[1] - scale[0])
    a = aspect[0] + torch.rand(1, generator=gen).item() * (aspect[1] - aspect[0])
    h, w = round(math.sqrt(s * H * W * a)), round(math.sqrt(s * H * W / a))
    return min(max(h, 1), H - 1), min(max(w, 1), W - 1)


def place_blocks(n, h, w, H, W, gen):
    """n h x w blocks at random positions (every valid start, last row and column included) -> [n, H*W] bool."""
    top = torch.randint(0, H - h + 1, (n, 1), generator=gen)
    left = torch.randint(0, W - w + 1, (n, 1), generator=gen)
    rows = (torch.arange(H) >= top) & (torch.arange(H) < top + h)  # [n, H]: the rows each block covers
    cols = (torch.arange(W) >= left) & (torch.arange(W) < left + w)  # [n, W]
    return (rows[:, :, None] & cols[:, None, :]).flatten(1)  # [n, H*W], raster order


def random_subset(mask, gen):
    """mask [B, N] bool -> [B, K] indices, K = the smallest count: a random K of each row's patches,
    in raster order. (The official code keeps the first K, which biases the context to the top.)"""
    k = int(mask.sum(1).min())
    score = torch.rand(mask.shape, generator=gen).masked_fill(~mask, 2.0)  # members sort first
    return score.argsort(dim=1)[:, :k].sort(dim=1).values


def check_mask_config(H, W, n_targets, target_scale, context_scale, min_keep, target_aspect=(0.75, 1.5)):
    """Raise CliError unless every target block has >= min_keep patches and the context keeps
    >= min_keep patches at least when the targets overlap: then sample_masks always succeeds.
    (n_targets and context_scale can't break that: blocks may overlap, and the context falls back
    to every patch outside the targets.)"""
    if H < 2 or W < 2:
        raise CliError(f"a {H}x{W} patch grid is too small for masking: use a larger --img-size or smaller --patch-size")
    areas = []
    for s in target_scale:
        for a in torch.linspace(target_aspect[0], target_aspect[1], 101).tolist():
            h, w = round(math.sqrt(s * H * W * a)), round(math.sqrt(s * H * W / a))
            areas.append(min(max(h, 1), H - 1) * min(max(w, 1), W - 1))
    if min(areas) < min_keep or H * W - max(areas) < min_keep:
        raise CliError(f"the masks do not fit a {H}x{W} patch grid: target blocks of {min(areas)}-{max(areas)} patches "
                       f"with --min-keep {min_keep}; lower --min-keep or change --target-scale")


def sample_masks(B, H, W, gen, n_targets=4, target_scale=(0.15, 0.2), target_aspect=(0.75, 1.5),
                 context_scale=(0.85, 1.0), min_keep=10, tries=20):
    """The multi-block mask sampler, vectorised over the batch.
    Returns context indices [B, Kc] and target indices [M, B, Kt] (M = n_targets).
    Never hangs: each image gets `tries` candidate placements, and a defined fallback."""
    N, rows = H * W, torch.arange(B)
    th, tw = block_size(target_scale, target_aspect, H, W, gen)
    ch, cw = block_size(context_scale, (1.0, 1.0), H, W, gen)
    # Target blocks: the first of `tries` placements that leaves >= min_keep patches for the context.
    targets = place_blocks(B * tries * n_targets, th, tw, H, W, gen).view(B, tries, n_targets, N)
    free = ~targets.any(dim=2)  # [B, tries, N]: patches in no target block
    ok = free.sum(dim=2) >= min_keep
    targets = targets[rows, ok.int().argmax(dim=1)]  # [B, M, N]
    stuck = ~ok.any(dim=1)
    targets[stuck] = targets[stuck, :1]  # fallback: all M blocks on one spot (check_mask_config: that fits)
    free = ~targets.any(dim=1)  # [B, N]
    # Context block: the first of `tries` placements that keeps >= min_keep non-target patches.
    context = place_blocks(B * tries, ch, cw, H, W, gen).view(B, tries, N) & free[:, None]
    ok = context.sum(dim=2) >= min_keep
    context = context[rows, ok.int().argmax(dim=1)]  # [B, N]
    stuck = ~ok.any(dim=1)
    context[stuck] = free[stuck]  # fallback: every patch outside the targets
    # One length per batch, so each mask is a tensor: keep a random subset of each.
    ctx_idx = random_subset(context, gen)
    tgt_idx = random_subset(targets.transpose(0, 1).reshape(n_targets * B, N), gen).view(n_targets, B, -1)
    return ctx_idx, tgt_idx


# =============================================================================================
# 3. Predictor
# =============================================================================================
class Predictor(nn.Module):
    """A narrow ViT. Input: the context tokens, plus one mask token per target patch (a shared
    learned vector + that patch's position). Output: the predicted target features."""

    def __init__(self, grid, dim, pred_dim, depth, heads):
        super().__init__()
        self.predictor_embed = nn.Linear(dim, pred_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, pred_dim))
        self.register_buffer("predictor_pos_embed", sincos_pos_embed(pred_dim, grid)[None])
        self.predictor_blocks = nn.ModuleList(Block(pred_dim, heads) for _ in range(depth))
        self.predictor_norm = nn.LayerNorm(pred_dim, eps=1e-6)
        self.predictor_proj = nn.Linear(pred_dim, dim)
        self.apply(init_weights)
        nn.init.trunc_normal_(self.mask_token, std=0.02)
        self.fast = True  # False: the benchmark's plain baseline (one target block at a time, all tokens to the end)

    def forward(self, z, ctx_idx, tgt_idx):  # z [B, Kc, D], ctx_idx [B, Kc], tgt_idx [M, B, Kt] -> [M, B, Kt, D]
        M, B, Kt = tgt_idx.shape
        if not self.fast and M > 1:
            return torch.cat([self(z, ctx_idx, idx[None]) for idx in tgt_idx])
        pos = self.predictor_pos_embed[0]  # [N, Dp]
        x = self.predictor_embed(z) + pos[ctx_idx]  # [B, Kc, Dp]
        # All M target blocks in one batch: the context is repeated once per block, so a block's
        # mask tokens see the context but never another block's.
        x = x.repeat(M, 1, 1)  # [M*B, Kc, Dp]
        masks = self.mask_token + pos[tgt_idx.flatten(0, 1)]  # [M*B, Kt, Dp]
        x = torch.cat([x, masks], dim=1)
        for block in self.predictor_blocks[:-1]:
            x = block(x)
        # Only the mask tokens' outputs are used: the last block skips the context tokens' MLP and
        # projection (in the benchmark, 11% of a ViT-T/16 step's FLOPs; the share varies with the masks)
        x = self.predictor_blocks[-1](x, last=Kt if self.fast else None)[:, -Kt:]  # [M*B, Kt, Dp]
        return self.predictor_proj(self.predictor_norm(x)).view(M, B, Kt, -1)


def make_predictor(args):
    width, depth, heads, patch = ARCHS[args.arch]
    return Predictor(args.img_size // (args.patch_size or patch), width, args.pred_width, args.pred_depth, heads)


# =============================================================================================
# 4. Targets and the EMA target encoder
# =============================================================================================
# The target encoder is a copy of the context encoder that gets no gradients. After every optimizer
# step it moves a little towards the context encoder. Predicting its slowly moving outputs (with an
# asymmetric predictor in between) is what keeps plain I-JEPA from collapsing to a constant.


@torch.no_grad()
def ema_update(target, online, m):
    """target <- m * target + (1 - m) * online, over all parameters in one fused foreach call."""
    torch._foreach_lerp_(list(target.parameters()), list(online.parameters()), 1.0 - m)


# =============================================================================================
# 5. The VICReg term, and the C-JEPA loss
# =============================================================================================
# C-JEPA adds VICReg's variance and covariance terms on the context encoder's features (averaged
# over each image's context patches), and its invariance term between the predicted and the target
# means. The statistics span the global batch: under DDP every rank's features are gathered.


def variance_covariance(c):
    """VICReg's variance and covariance terms of c [n, D], in fp32."""
    n, D = c.shape
    with torch.autocast(c.device.type, enabled=False):  # autocast would run c.T @ c in bf16
        c = c.float() - c.float().mean(dim=0)
        std = torch.sqrt(c.var(dim=0) + 1e-4)
        l_std = F.relu(1 - std).mean()  # hinge: every feature should vary across the batch
        cov = (c.T @ c) / (n - 1)  # [D, D]
        l_cov = (cov.pow(2).sum() - cov.diagonal().pow(2).sum()) / D  # features should be decorrelated
    return l_std, l_cov


class GatherBatch(torch.autograd.Function):
    """[B, D] on each rank -> [world*B, D], the global batch, with gradients back to each rank's part."""

    @staticmethod
    def forward(ctx, x):
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, x.contiguous())
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous()
        dist.all_reduce(grad)  # every rank's loss depends on this rank's part: sum their gradients
        # (DDP then averages the parameter gradients over ranks: the sum / world is the global gradient)
        return grad.chunk(dist.get_world_size())[dist.get_rank()]


def gather_batch(x):
    return GatherBatch.apply(x) if dist.is_available() and dist.is_initialized() else x


def cjepa_loss(encoder, predictor, target_encoder, images, ctx_idx, tgt_idx, args):
    """L = L_ijepa + beta_vicreg * (beta_sim * L_sim + beta_std * L_std + beta_cov * L_cov).
    Returns the loss and a dict of detached statistics for the log."""
    with torch.no_grad():  # targets: the target encoder sees the whole image
        h = target_encoder(images)  # [B, N, D]
        h = F.layer_norm(h, h.shape[-1:])  # normalised per patch, no affine
        t = gather_tokens(h, tgt_idx)  # [M, B, Kt, D]: the target blocks
    z = encoder(images, ctx_idx)  # [B, Kc, D]: the context encoder sees the context block only
    p = predictor(z, ctx_idx, tgt_idx)  # [M, B, Kt, D]
    l_ijepa = F.smooth_l1_loss(p, t)  # the I-JEPA loss: beta 1, mean over blocks, patches and features
    # VICReg, as we read the paper (no official code was released), with fp32 statistics
    c = gather_batch(z.float().mean(dim=1))  # [B_global, D]: mean context feature per image
    l_std, l_cov = variance_covariance(c)  # against total and dimensional collapse
    l_sim = F.mse_loss(p.float().mean(dim=(0, 2)), t.float().mean(dim=(0, 2)))  # get the mean of the targets right
    loss = l_ijepa + args.vicreg * (args.beta_sim * l_sim + args.beta_std * l_std + args.beta_cov * l_cov)
    stats = dict(loss=loss, ijepa=l_ijepa, sim=l_sim, std=l_std, cov=l_cov)
    return loss, {k: v.detach().float() for k, v in stats.items()} | {"pooled": h.mean(dim=1).float()}


def collapse_monitors(pooled):
    """pooled [n, D] target features -> (mean per-feature std, effective rank). The std alone
    misses dimensional collapse (features that vary but along few directions); the rank does not."""
    x = pooled.float() - pooled.float().mean(dim=0)
    s = torch.linalg.svdvals(x)
    p = s / s.sum()
    erank = torch.exp(-(p * torch.log(p.clamp_min(1e-12))).sum())
    return x.std(dim=0).mean().item(), erank.item()


# =============================================================================================
# 6. Optimisation
# =============================================================================================
def cosine(t, start, end):  # t in [0, 1]
    return end + (start - end) * 0.5 * (1 + math.cos(math.pi * min(max(t, 0.0), 1.0)))


def schedules(step, total, warmup, args):
    """Per-iteration (learning rate, weight decay, EMA momentum)."""
    if step < warmup:
        lr = args.start_lr + (args.lr - args.start_lr) * step / warmup
    else:
        lr = cosine((step - warmup) / max(1, total - warmup), args.lr, args.final_lr)
    wd = cosine(step / total, args.wd[0], args.wd[1])  # rises from wd[0] to wd[1]
    m = args.ema[0] + (args.ema[1] - args.ema[0]) * step / total
    return lr, wd, m


def make_optimizer(modules, args, device):
    params = [p for module in modules for p in module.parameters()]
    groups = [dict(params=[p for p in params if p.ndim >= 2], weight_decay=args.wd[0]),  # weights
              dict(params=[p for p in params if p.ndim < 2], weight_decay=0.0)]  # biases, norms: no decay
    return torch.optim.AdamW(groups, lr=args.lr, fused=device.type == "cuda")


def unwrap(model):
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def train_step(run, images, ctx_idx, tgt_idx, lr, wd, m, args):
    """One optimizer step on one batch, then the EMA update of the target encoder."""
    opt, scaler = run["opt"], run["scaler"]
    for group in opt.param_groups:
        group["lr"] = lr
    opt.param_groups[0]["weight_decay"] = wd
    with run["autocast"]:
        loss, stats = cjepa_loss(run["encoder"], run["predictor"], run["target_encoder"], images, ctx_idx, tgt_idx, args)
    if not torch.isfinite(loss):  # stop before a NaN reaches the weights (costs one host sync a step)
        raise FloatingPointError(f"the loss is {loss.item()}")
    scaler.scale(loss).backward()
    if args.clip > 0:
        scaler.unscale_(opt)
        nn.utils.clip_grad_norm_([p for g in opt.param_groups for p in g["params"]], args.clip)
    scaler.step(opt)
    scaler.update()
    opt.zero_grad(set_to_none=True)
    ema_update(run["target_encoder"], unwrap(run["encoder"]), m)
    return stats


# =============================================================================================
# 7. Data
# =============================================================================================
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
DEMO_DATA = os.path.join(HERE, "data", "fashion_mnist_12k.npz")  # 10k train + 2k test, 28 x 28, 10 classes


class DemoImages(torch.utils.data.Dataset):
    """The built-in demo set: uint8 grey images [n, 28, 28] -> normalised [3, 28, 28] tensors."""

    def __init__(self, split, augment):
        with np.load(DEMO_DATA) as d:
            self.x, self.y = torch.from_numpy(d[f"x_{split}"]), torch.from_numpy(d[f"y_{split}"]).long()
        self.augment = augment

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        x = (self.x[i].float() / 255 - 0.2867) / 0.3540  # the set's mean and std
        if self.augment and torch.rand(1).item() < 0.5:
            x = x.flip(-1)  # horizontal flip
        return x.expand(3, -1, -1), self.y[i]


class SafeImageFolder(datasets.ImageFolder):
    """An ImageFolder that replaces an unreadable image by the next readable one, warning once per file."""

    def __getitem__(self, i):
        for j in range(i, i + len(self)):
            try:
                return super().__getitem__(j % len(self))
            except (OSError, ValueError, SyntaxError) as e:  # what PIL raises on corrupt files
                print(f"warning: skipping unreadable image {self.samples[j % len(self)][0]} ({e})", file=sys.stderr)
                self.samples[j % len(self)] = self.samples[(j + 1) % len(self)]  # not again in this worker
        raise CliError(f"no readable image in {self.root}")


def make_dataset(args, split, augment):
    """split 'train' or 'val'; augment: RandomResizedCrop for pretraining, else a center crop."""
    dataset = load_images(args, split, augment)
    if args.subset:  # the first N images only: quick checks
        dataset = torch.utils.data.Subset(dataset, range(min(args.subset, len(dataset))))
    return dataset


def load_images(args, split, augment):
    if args.data is None:
        return DemoImages("train" if split == "train" else "test", augment)
    root = os.path.join(args.data, split)
    if not os.path.isdir(args.data):
        raise CliError(f"--data {args.data}: no such folder")
    if not os.path.isdir(root):
        raise CliError(f"--data {args.data} has no {split}/ folder: expected an ImageFolder tree {args.data}/{split}/<class>/<image>")
    if augment:
        crop = [T.RandomResizedCrop(args.img_size, scale=(0.3, 1.0))]
    else:
        crop = [T.Resize(args.img_size * 256 // 224), T.CenterCrop(args.img_size)]
    transform = T.Compose(crop + [T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)])
    try:
        return SafeImageFolder(root, transform)
    except FileNotFoundError as e:  # no class folders, or no images in them
        raise CliError(f"{root}: {e}") from None


# =============================================================================================
# 8. Training loop
# =============================================================================================
ARCH_KEYS = ("arch", "img_size", "patch_size", "pred_width", "pred_depth")  # what must match on --resume
TRAIN_KEYS = ("data", "epochs", "batch_size", "lr", "start_lr", "final_lr", "warmup", "wd", "ema", "vicreg", "beta_sim",
              "beta_std", "beta_cov", "n_targets", "target_scale", "context_scale", "min_keep", "clip", "seed")  # warned about


def setup(args):
    """Check the arguments, pick the device and precision, and join the process group under torchrun.
    Returns (rank, world size, device, autocast context)."""
    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    cuda = args.device.startswith("cuda")
    if cuda and not torch.cuda.is_available():
        raise CliError(f"--device {args.device}: this machine has no CUDA device; use --device cpu")
    if not args.precision:  # bf16 autocast is ~20x slower on CPUs, and emulated (slow) on GPUs before A100
        args.precision = "fp32" if not cuda else "bf16" if torch.cuda.is_bf16_supported(including_emulation=False) else "fp16"
    if args.precision != "fp32" and not cuda:
        raise CliError(f"--precision {args.precision} needs CUDA; on the CPU use --precision fp32")
    args.patch_size = args.patch_size or ARCHS[args.arch][3]
    if args.img_size % args.patch_size:
        raise CliError(f"--img-size {args.img_size} is not a multiple of the patch size {args.patch_size}")
    width, depth, heads, _ = ARCHS[args.arch]
    problems = {f"--pred-width {args.pred_width} must be a multiple of 4 and of the {heads} heads":
                args.pred_width % 4 or args.pred_width % heads,
                f"--probe-blocks {args.probe_blocks} must be between 1 and the depth {depth}": not 1 <= args.probe_blocks <= depth,
                "--pred-depth and --n-targets must be at least 1": args.pred_depth < 1 or args.n_targets < 1,
                f"--batch-size {args.batch_size} (per process) must be at least 2": args.batch_size < 2,  # VICReg's variance
                "--workers must be 0 or more": args.workers < 0}
    for message, bad in problems.items():
        if bad:
            raise CliError(message)
    if not args.probe_only:
        grid = args.img_size // args.patch_size
        check_mask_config(grid, grid, args.n_targets, args.target_scale, args.context_scale, args.min_keep)
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    try:
        device = torch.device(args.device)
    except RuntimeError:
        raise CliError(f"--device {args.device}: expected cpu, cuda or cuda:N") from None
    if "RANK" in os.environ and cuda:  # torchrun: one GPU per process
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
    if cuda and device.index is not None:
        if device.index >= torch.cuda.device_count():
            raise CliError(f"--device {args.device}: this machine has {torch.cuda.device_count()} CUDA device(s)")
        torch.cuda.set_device(device)  # the current device: synchronize(), memory statistics, pinned memory
    if "RANK" in os.environ:  # launched by torchrun; multi-node works the same (env:// rendezvous)
        # a rank that waits longer than this for a dead peer exits instead of hanging forever
        dist.init_process_group("nccl" if cuda else "gloo", timeout=timedelta(minutes=args.dist_timeout))
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(args.precision)
    autocast = torch.autocast("cuda", dtype=dtype) if dtype else nullcontext()
    return rank, world, device, autocast


def build_run(args, device, autocast):
    """The models, optimizer and scaler of a run, as one dict."""
    encoder = make_encoder(args).to(device)
    predictor = make_predictor(args).to(device)
    target_encoder = copy.deepcopy(encoder).requires_grad_(False)  # starts equal; then only EMA moves it
    if args.compile:  # each block's norms, GELU and adds fused into fewer kernels; dynamic: mask sizes vary per batch
        for block in (m for model in (encoder, predictor, target_encoder) for m in model.modules() if isinstance(m, Block)):
            block.compile(dynamic=True)  # in place: parameter names and checkpoints stay the same
    opt = make_optimizer([encoder, predictor], args, device)
    scaler = torch.amp.GradScaler(device.type, enabled=args.precision == "fp16")  # only fp16 needs loss scaling
    return dict(encoder=encoder, predictor=predictor, target_encoder=target_encoder, opt=opt, scaler=scaler, autocast=autocast)


def save_checkpoint(path, run, epoch, args, **extra):
    """Atomic: write a temporary file, flush it to disk, then rename, so a crash never leaves a broken checkpoint."""
    ckpt = dict(encoder=unwrap(run["encoder"]).state_dict(), predictor=unwrap(run["predictor"]).state_dict(),
                target_encoder=run["target_encoder"].state_dict(), opt=run["opt"].state_dict(),
                scaler=run["scaler"].state_dict(), epoch=epoch, args=vars(args), **extra)
    atomic_save(ckpt, path)


def atomic_save(obj, path):
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)  # atomic on POSIX: readers see the old file or the new one, never half of one


def read_checkpoint(path):
    try:
        return torch.load(path, map_location="cpu", weights_only=True)  # weights_only: no code runs
    except FileNotFoundError:
        raise CliError(f"{path}: no such checkpoint") from None
    except Exception as e:  # (an empty file raises EOFError with no message)
        first = (str(e).strip().splitlines() or [""])[0][:200]
        raise CliError(f"{path} is not a checkpoint ({type(e).__name__}{': ' * bool(first)}{first})") from None


def load_checkpoint(path, args=None):
    """Load one of our checkpoints; with args, check that its architecture is the same."""
    ckpt = read_checkpoint(path)
    if not isinstance(ckpt, dict) or not isinstance(ckpt.get("args"), dict) or "target_encoder" not in ckpt:
        raise CliError(f"{path} is not a C-JEPA checkpoint of this project (no 'target_encoder' and 'args' entries)")
    saved = ckpt["args"]
    if args is not None:
        diff = [f"{k} {saved.get(k)} vs {getattr(args, k)}" for k in ARCH_KEYS if saved.get(k) != getattr(args, k)]
        if diff:
            raise CliError(f"{path} is of another architecture (checkpoint vs now): {', '.join(diff)}")
        same = lambda a, b: list(a) == list(b) if isinstance(a, (list, tuple)) else a == b
        changed = [f"{k} {saved.get(k)} -> {getattr(args, k)}" for k in TRAIN_KEYS if not same(saved.get(k), getattr(args, k))]
        if changed and int(os.environ.get("RANK", 0)) == 0:
            print(f"warning: resuming with other settings than the checkpoint's: {', '.join(changed)}", file=sys.stderr)
    return ckpt


def resume(run, ckpt):
    """Restore a run from a checkpoint; returns the epoch to start from."""
    unwrap(run["encoder"]).load_state_dict(ckpt["encoder"])
    unwrap(run["predictor"]).load_state_dict(ckpt["predictor"])
    run["target_encoder"].load_state_dict(ckpt["target_encoder"])
    for group in ckpt["opt"]["param_groups"]:  # fused AdamW (CUDA) or not is this machine's choice, not the checkpoint's
        group["fused"] = run["opt"].defaults["fused"]
    run["opt"].load_state_dict(ckpt["opt"])
    if ckpt["scaler"]:  # empty unless the run used fp16
        run["scaler"].load_state_dict(ckpt["scaler"])
    return ckpt["epoch"]


def mask_config(args):
    return dict(n_targets=args.n_targets, target_scale=args.target_scale, context_scale=args.context_scale, min_keep=args.min_keep)


def train_epoch(run, loader, epoch, args, device, rank, world):
    """One pass over the data; returns the epoch's log line (a dict), averaged over ranks."""
    iters = len(loader)
    total, warmup = iters * args.epochs, round(args.warmup * iters)
    grid = args.img_size // args.patch_size
    # Every epoch's randomness (crops, masks, data order) is seeded from (seed, epoch, rank), so a
    # resumed run draws exactly what the uninterrupted run would have.
    torch.manual_seed(args.seed + 1000 * epoch + rank)
    gen = torch.Generator().manual_seed(args.seed + 1000 * epoch + rank)
    if isinstance(loader.sampler, torch.utils.data.DistributedSampler):
        loader.sampler.set_epoch(epoch)
    sums, pooled, t0 = 0, [], time.time()
    bar = tqdm(loader, desc=f"epoch {epoch + 1}/{args.epochs}", disable=rank != 0, leave=False, dynamic_ncols=True)
    for i, (images, _) in enumerate(bar):
        step = epoch * iters + i
        lr, wd, m = schedules(step, total, warmup, args)
        ctx_idx, tgt_idx = sample_masks(len(images), grid, grid, gen, **mask_config(args))
        images, ctx_idx, tgt_idx = (x.to(device, non_blocking=True) for x in (images, ctx_idx, tgt_idx))
        try:
            stats = train_step(run, images, ctx_idx, tgt_idx, lr, wd, m, args)
        except FloatingPointError as e:
            ckpt = os.path.join(args.out, "checkpoint.pt")
            last = ckpt if os.path.exists(ckpt) else "none yet"
            raise CliError(f"{e} at epoch {epoch + 1}, step {i + 1}: stopped before any weight changed; last good "
                           f"checkpoint: {last}. Lower --lr, or try --precision fp32") from None
        p = stats.pop("pooled")
        if len(pooled) * len(p) < 2048:  # enough pooled target features for the collapse monitors
            pooled.append(p)
        names = list(stats)
        sums = sums + torch.stack([stats[k] for k in names])  # summed on the device
        if i % 10 == 0:
            bar.set_postfix(loss=f"{stats['loss'].item():.4f}", lr=f"{lr:.1e}")
    means = sums / iters
    if world > 1:
        dist.all_reduce(means)
        means /= world
    feat_std, erank = collapse_monitors(torch.cat(pooled))
    seconds = time.time() - t0
    return dict(epoch=epoch + 1, **{k: round(v, 6) for k, v in zip(names, means.tolist())}, lr=lr, wd=wd, momentum=m,
                feat_std=round(feat_std, 4), erank=round(erank, 2), img_per_s=round(iters * len(images) * world / seconds, 1),
                minutes=round(seconds / 60, 2))


def pretrain(args, rank, world, device, autocast):
    master = rank == 0
    train_set = make_dataset(args, "train", augment=True)
    if len(train_set) < args.batch_size * world:
        raise CliError(f"{len(train_set)} training images are fewer than one global batch "
                       f"({args.batch_size} x {world} processes): lower --batch-size")
    sampler = torch.utils.data.DistributedSampler(train_set, world, rank, seed=args.seed, drop_last=True) if world > 1 else None
    loader = torch.utils.data.DataLoader(train_set, args.batch_size, shuffle=sampler is None, sampler=sampler,
                                         num_workers=args.workers, pin_memory=device.type == "cuda", drop_last=True)
    run = build_run(args, device, autocast)
    start = resume(run, load_checkpoint(args.resume, args)) if args.resume else 0
    # A folder with no readable image fails here, in one line, not inside a loader worker. (After the
    # weights' init, so that the random crop it draws does not change the initial weights.)
    train_set[0]
    if world > 1:  # the target encoder is not wrapped: it gets no gradients
        ids = [device.index] if device.type == "cuda" else None
        # broadcast_buffers=False: the only buffers are the fixed positions, the same on every rank
        run["encoder"] = nn.parallel.DistributedDataParallel(run["encoder"], device_ids=ids, broadcast_buffers=False)
        run["predictor"] = nn.parallel.DistributedDataParallel(run["predictor"], device_ids=ids, broadcast_buffers=False)
    ckpt_path = os.path.join(args.out, "checkpoint.pt")
    if master:
        os.makedirs(args.out, exist_ok=True)
        n_params = sum(p.numel() for p in unwrap(run["encoder"]).parameters()) / 1e6
        print(f"C-JEPA {args.arch} ({n_params:.1f}M params), {len(train_set)} images, {world} process(es) on {device}, "
              f"{args.precision}, epochs {start + 1}-{args.epochs}, run folder {args.out}")
    epoch = start
    while epoch < min(args.epochs, args.stop_after or args.epochs):  # --stop-after: e.g. a job's time limit
        line = train_epoch(run, loader, epoch, args, device, rank, world)
        epoch += 1
        if master:  # the checkpoint first: a crash in between must not log an epoch that resume will redo
            save_checkpoint(ckpt_path, run, epoch, args)
            with open(os.path.join(args.out, "log.jsonl"), "a") as f:
                f.write(json.dumps(line) + "\n")
            tqdm.write(" ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in line.items()))
    if dist.is_initialized():
        dist.destroy_process_group()
    if master and epoch > start:
        plot_curves(args.out)
    if master and epoch == args.epochs and args.probe_epochs > 0:
        run_probe(run["target_encoder"], args, device, autocast, ckpt_path)
    return run


def plot_curves(out):
    """curves.png: the losses and the collapse monitors, one point per epoch, from log.jsonl."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    with open(os.path.join(out, "log.jsonl")) as f:
        log = [json.loads(line) for line in f]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    panels = {"training loss": ("loss", "ijepa"), "per-feature std of the target features": ("feat_std",),
              "effective rank of the target features": ("erank",)}
    for ax, (title, keys) in zip(axes, panels.items()):
        for key in keys:
            ax.plot([line["epoch"] for line in log], [line[key] for line in log], marker=".", label=key)
        ax.set(title=title, xlabel="epoch", yscale="log" if "loss" in keys else "linear")
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(os.path.join(out, "curves.png"), dpi=90)
    plt.close(fig)


# =============================================================================================
# 9. Linear probe
# =============================================================================================
@torch.no_grad()
def extract_features(fn, dataset, device, autocast, workers):
    """fn: images -> features. Run once over a dataset (no augmentation); features stay on the device."""
    loader = torch.utils.data.DataLoader(dataset, batch_size=256, num_workers=workers)
    feats, labels = [], []
    for images, y in tqdm(loader, desc="probe features", leave=False, dynamic_ncols=True):
        with autocast:
            feats.append(fn(images.to(device, non_blocking=True)).float())
        labels.append(y.to(device))
    return torch.cat(feats), torch.cat(labels)


def train_linear_head(train, val, epochs, device, seed=0):
    """BatchNorm (no affine) + Linear, trained on cached features; returns top-1 on val, in %.
    Training on cached features takes seconds: the backbone never runs again."""
    (x, y), (x_val, y_val) = train, val
    torch.manual_seed(seed)
    n_classes = int(max(y.max(), y_val.max())) + 1
    head = nn.Sequential(nn.BatchNorm1d(x.shape[1], affine=False), nn.Linear(x.shape[1], n_classes)).to(device)
    nn.init.normal_(head[1].weight, std=0.01)
    nn.init.zeros_(head[1].bias)
    opt = torch.optim.AdamW(head.parameters(), lr=1e-2, weight_decay=0.05)
    batch = max(256, len(x) // 200)  # 256 for small sets; ImageNet: 200 steps an epoch
    lr_decay = torch.optim.lr_scheduler.CosineAnnealingLR(opt, epochs * math.ceil(len(x) / batch))
    for _ in range(epochs):
        for idx in torch.randperm(len(x), device=device).split(batch):
            loss = F.cross_entropy(head(x[idx]), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            lr_decay.step()
    head.eval()
    return 100 * (head(x_val).argmax(dim=1) == y_val).float().mean().item()


def run_probe(target_encoder, args, device, autocast, ckpt_path):
    """Linear probe of the frozen target encoder on train -> val (the demo: also a random-init
    encoder and raw pixels). Prints a table, writes probe.json and adds the result to the checkpoint."""
    if args.data is not None and not os.path.isdir(os.path.join(args.data, "val")):
        print(f"no {os.path.join(args.data, 'val')} folder: skipping the linear probe")
        return None
    t0 = time.time()
    train_set, val_set = make_dataset(args, "train", augment=False), make_dataset(args, "val", augment=False)
    encoder = target_encoder.eval()
    rows = {"cjepa_target_encoder": lambda images: encoder.features(images, args.probe_blocks)}
    if args.data is None:  # the demo's baselines: what the probe gets without C-JEPA
        torch.manual_seed(args.seed)
        random_encoder = make_encoder(args).to(device).eval()
        rows["random_init_encoder"] = lambda images: random_encoder.features(images, args.probe_blocks)
        rows["raw_pixels"] = lambda images: images[:, 0].flatten(1)
    results, head_seconds = {}, 0.0
    for name, fn in rows.items():
        train = extract_features(fn, train_set, device, autocast, args.workers)
        val = extract_features(fn, val_set, device, autocast, args.workers)
        t1 = time.time()
        results[name] = round(train_linear_head(train, val, args.probe_epochs, device), 2)
        head_seconds += time.time() - t1
    print(f"\nlinear probe, top-1 on {len(val_set)} val images ({args.probe_epochs} epochs on {len(train_set)} cached "
          f"train features; {time.time() - t0:.0f} s, of which {head_seconds:.1f} s training the heads):")
    print(f"| {'features':<22} | top-1  |\n| {'-' * 22} | ------ |")
    for name, acc in results.items():
        print(f"| {name:<22} | {acc:5.2f}% |")
    try:
        with open(os.path.join(args.out, "probe.json"), "w") as f:
            json.dump(results, f, indent=1)
        if os.path.exists(ckpt_path):
            atomic_save(torch.load(ckpt_path, map_location="cpu", weights_only=True) | {"probe": results}, ckpt_path)
    except OSError as e:  # e.g. --probe-only on a checkpoint in a read-only folder: the table above is the result
        print(f"warning: could not save the probe result: {e}", file=sys.stderr)
    return results


# =============================================================================================
# 10. Benchmark and main
# =============================================================================================
PEAK_BF16_FLOPS = {"H100 PCIe": 756e12, "H100": 989e12, "H200": 989e12, "A100": 312e12}  # dense peaks, for MFU


def benchmark(args, device, autocast):
    """Training steps on random images with the published masks: the fast path (fused attention,
    all target blocks in one batch) against the plain one (explicit attention, one block at a time)
    and, with --compile, the fast path compiled. The paths' steps alternate, so a machine that slows
    down or speeds up affects all alike."""
    from torch.utils.flop_counter import FlopCounterMode
    cuda, steps = device.type == "cuda", 20 if device.type == "cuda" else 6
    grid, B = args.img_size // args.patch_size, args.batch_size
    gen = torch.Generator().manual_seed(args.seed)
    images = torch.randn(B, 3, args.img_size, args.img_size, device=device)
    t0 = time.perf_counter()
    masks = [[x.to(device) for x in sample_masks(B, grid, grid, gen, **mask_config(args))] for _ in range(steps + 1)]
    mask_ms = 1000 * (time.perf_counter() - t0) / (steps + 1)  # CPU work of the training loop's process, per batch
    name = torch.cuda.get_device_name(device) if cuda else f"CPU, {torch.get_num_threads()} threads"
    peak = next((v for k, v in PEAK_BF16_FLOPS.items() if k in name), None) if args.precision == "bf16" else None
    runs, flops, seconds, memory, first_step = {}, {}, {}, {}, {}
    for path in ("fast", "plain", "compiled") if args.compile else ("fast", "plain"):
        torch.manual_seed(args.seed)
        runs[path] = build_run(argparse.Namespace(**vars(args) | dict(compile=path == "compiled")), device, autocast)
        for module in (m for key in ("encoder", "predictor", "target_encoder") for m in runs[path][key].modules()):
            if isinstance(module, Attention):
                module.fused = path != "plain"
            if isinstance(module, Predictor):
                module.fast = path != "plain"
        t0 = time.perf_counter()
        with FlopCounterMode(display=False) if path != "compiled" else nullcontext() as counter:  # also a warm-up
            train_step(runs[path], images, *masks[0], args.lr, args.wd[0], args.ema[0], args)
        first_step[path] = time.perf_counter() - t0  # the compiled path compiles in it
        flops[path], seconds[path], memory[path] = counter.get_total_flops() if counter else flops["fast"], 0.0, 0.0
        if path == "fast":
            predictor_share = sum(counter.get_flop_counts().get("Predictor", {}).values()) / flops[path]
    for ctx_idx, tgt_idx in masks[1:]:
        for path, run in runs.items():
            if cuda:
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
            t0 = time.perf_counter()
            train_step(run, images, ctx_idx, tgt_idx, args.lr, args.wd[0], args.ema[0], args)
            if cuda:
                torch.cuda.synchronize()
                memory[path] = max(memory[path], torch.cuda.max_memory_allocated() / 2**20)
            seconds[path] += (time.perf_counter() - t0) / steps
    if not cuda:  # the whole process's peak resident memory, all paths together
        import resource
        memory = dict.fromkeys(runs, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    print(f"benchmark: {args.arch}, {args.img_size} px, batch {B}, predictor {args.pred_width} x {args.pred_depth}, "
          f"{args.precision}, {name}, {steps} steps per path (all paths' models stay in memory)")
    print("| path     | images/s | ms/step | peak memory MB | GFLOP/image | MFU   |\n|----------|----------|---------|----------------|-------------|-------|")
    for path in runs:
        mfu = f"{100 * flops[path] / seconds[path] / peak:4.1f}%" if peak else "  -  "
        print(f"| {path:<8} | {B / seconds[path]:8.1f} | {1000 * seconds[path]:7.1f} | {memory[path]:14.0f} "
              f"| {flops[path] / B / 1e9:11.2f} | {mfu} |")
    print(f"fast path speed-up over the plain path: {seconds['plain'] / seconds['fast']:.2f}x; "
          f"the predictor does {100 * predictor_share:.0f}% of the fast path's FLOPs; sampling a batch's masks "
          f"takes {mask_ms:.1f} ms")
    if args.compile:
        print(f"compiled path: {seconds['fast'] / seconds['compiled']:.2f}x the fast path; its first step "
              f"(compilation) took {first_step['compiled']:.0f} s")
    benchmark_data(args)
    return {path: B / seconds[path] for path in runs}


def benchmark_data(args, batches=10):
    """Images/s of the data pipeline alone (JPEG decode + RandomResizedCrop on --workers workers):
    how many workers one GPU needs. On --data if given, else on generated JPEGs."""
    import tempfile
    from PIL import Image
    with tempfile.TemporaryDirectory() as tmp:
        data = args.data
        if data is None or not os.path.isdir(os.path.join(data, "train")):
            data = tmp
            os.makedirs(os.path.join(tmp, "train", "x"))
            for i in range(256):  # ImageNet-sized random JPEGs
                pixels = np.random.default_rng(i).integers(0, 256, (375, 500, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(os.path.join(tmp, "train", "x", f"{i}.jpg"), quality=90)
        dataset = make_dataset(argparse.Namespace(**{**vars(args), "data": data}), "train", augment=True)
        loader = torch.utils.data.DataLoader(dataset, 32, shuffle=True, num_workers=args.workers, drop_last=True)
        n, it = 0, iter(loader)
        next(it)  # worker start-up is not counted
        t0 = time.perf_counter()
        for _, (images, _) in zip(range(batches), it):
            n += len(images)
        print(f"data pipeline ({'generated JPEGs' if data == tmp else data}, {args.img_size} px, {args.workers} workers): "
              f"{n / (time.perf_counter() - t0):.0f} images/s")


# Published I-JEPA / C-JEPA ViT-B/16 settings (DESIGN.md §6): the defaults with --data.
PRETRAIN = dict(arch="vit_b16", img_size=224, epochs=600, batch_size=128, lr=1e-3, start_lr=1e-4, final_lr=1e-6,
                warmup=15.0, wd=(0.04, 0.4), ema=(0.996, 1.0), vicreg=0.001, pred_width=384, pred_depth=6,
                n_targets=4, target_scale=(0.15, 0.2), context_scale=(0.85, 1.0), min_keep=10, clip=0.0,
                probe_blocks=1, probe_epochs=20, workers=min(8, os.cpu_count() or 1), out="runs/pretrain")
# The demo (no --data): Fashion-MNIST at 28 px, a 7x7 patch grid. Chosen by measurement (README, "The demo").
DEMO = dict(arch="vit_demo", img_size=28, epochs=6, batch_size=64, lr=1e-3, start_lr=1e-4, final_lr=1e-6,
            warmup=0.3, wd=(0.04, 0.04), ema=(0.99, 1.0), vicreg=0.01, pred_width=64, pred_depth=3,
            n_targets=4, target_scale=(0.15, 0.2), context_scale=(0.85, 1.0), min_keep=4, clip=1.0,
            probe_blocks=4, probe_epochs=30, workers=0, out="runs/demo")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="C-JEPA self-supervised pretraining (no --data: the built-in demo)")
    p.add_argument("--data", help="ImageFolder root with train/<class>/* (and val/<class>/* for the probe)")
    p.add_argument("--arch", choices=ARCHS)
    p.add_argument("--img-size", type=int)
    p.add_argument("--patch-size", type=int, help="override the architecture's patch size")
    p.add_argument("--epochs", type=int)
    p.add_argument("--batch-size", type=int, help="per process")
    p.add_argument("--lr", type=float, help="peak learning rate, after the warm-up")
    p.add_argument("--start-lr", type=float)
    p.add_argument("--final-lr", type=float)
    p.add_argument("--warmup", type=float, help="warm-up epochs")
    p.add_argument("--wd", type=float, nargs=2, help="weight decay: start and end of its cosine")
    p.add_argument("--ema", type=float, nargs=2, help="EMA momentum: start and end")
    p.add_argument("--vicreg", type=float, help="beta_vicreg; 0 is plain I-JEPA")
    p.add_argument("--beta-sim", type=float, default=25.0)
    p.add_argument("--beta-std", type=float, default=25.0)
    p.add_argument("--beta-cov", type=float, default=1.0)
    p.add_argument("--pred-width", type=int)
    p.add_argument("--pred-depth", type=int)
    p.add_argument("--n-targets", type=int, help="target blocks per image (M)")
    p.add_argument("--target-scale", type=float, nargs=2)
    p.add_argument("--context-scale", type=float, nargs=2)
    p.add_argument("--min-keep", type=int, help="fewest patches in a mask")
    p.add_argument("--clip", type=float, help="gradient-norm clipping (0: off)")
    p.add_argument("--probe-blocks", type=int, help="probe features: mean tokens of the last N blocks")
    p.add_argument("--probe-epochs", type=int, help="0: no probe")
    p.add_argument("--out", help="run folder: checkpoint.pt, log.jsonl, curves.png, probe.json")
    p.add_argument("--resume", metavar="CKPT", help="continue a run from its checkpoint")
    p.add_argument("--stop-after", type=int, metavar="EPOCH", help="stop after this epoch; --resume continues")
    p.add_argument("--probe-only", metavar="CKPT", help="only run the linear probe of a checkpoint")
    p.add_argument("--device", help="cuda or cpu (default: cuda if there is one)")
    p.add_argument("--precision", choices=("bf16", "fp16", "fp32"), help="default: bf16 on CUDA, fp32 on CPU")
    p.add_argument("--workers", type=int, help="data-loading processes per GPU")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--subset", type=int, help="use only the first N images of each split (quick checks)")
    p.add_argument("--dist-timeout", type=float, default=10.0, help="minutes a rank waits for a dead peer")
    p.add_argument("--compile", action="store_true", help="torch.compile every transformer block (--benchmark: adds a row)")
    p.add_argument("--benchmark", action="store_true", help="time training steps on random images")
    args = p.parse_args(argv)
    return args if args.probe_only else with_defaults(args)  # --probe-only: once the checkpoint is read


def with_defaults(args):
    """Fill every option not given with the demo's defaults (no --data) or the published ones."""
    for key, value in (DEMO if args.data is None and not args.benchmark else PRETRAIN).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    return args


def main(argv=None):
    args = parse_args(argv)
    try:
        if args.probe_only:  # the architecture, and by default the data and features, come from the checkpoint
            ckpt = load_checkpoint(args.probe_only)
            for key in ARCH_KEYS:
                setattr(args, key, ckpt["args"][key])
            args.data = args.data or ckpt["args"].get("data")
            args.probe_blocks = args.probe_blocks or ckpt["args"]["probe_blocks"]
            with_defaults(args)
        rank, world, device, autocast = setup(args)
        torch.manual_seed(args.seed)  # the same initial weights on every rank (the target encoder is not broadcast)
        if args.benchmark:
            return benchmark(args, device, autocast)
        if args.probe_only:
            encoder = make_encoder(args).to(device)
            encoder.load_state_dict(ckpt["target_encoder"])
            args.out = os.path.dirname(os.path.abspath(args.probe_only))
            return run_probe(encoder, args, device, autocast, args.probe_only)
        return pretrain(args, rank, world, device, autocast)
    except CliError as e:
        print(f"cjepa.py: error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
