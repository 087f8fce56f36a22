"""
cjepa.py: C-JEPA (Mo and Tong, NeurIPS 2024) in one readable file.

C-JEPA is I-JEPA plus VICReg. A context encoder sees one large block of an image; a narrow
predictor, told only *where* the hidden target blocks are, predicts what an EMA "target encoder"
says about them. VICReg's variance and covariance terms keep the features from collapsing, and
its invariance term makes the predictions right on average.

The demo, on 2 CPU cores, no GPU: 6 epochs on 10,000 Fashion-MNIST images, then a linear probe
of the target encoder on 2,000 test images, in under 2 minutes (README.md has the details):

    linear probe, top-1 (mean of seeds 0, 1, 2)
    C-JEPA (this file)                          79.4%
    plain I-JEPA (--vicreg 0)                   63.5%
    the same encoder, randomly initialised      66.7%
    raw pixels                                  84.55%  (2 minutes of pretraining on 28 px
                                                         images do not beat the pixels)

Usage:
    python cjepa.py                                       # the demo: CPU, minutes, no download
    python cjepa.py --data /imagenet --arch vit_b16       # pretraining on an ImageFolder tree
    torchrun --standalone --nproc_per_node=8 cjepa.py --data /imagenet --arch vit_b16
    python cjepa.py --benchmark --arch vit_b16            # speed and memory of one training step
    python cjepa.py --probe-only runs/demo/checkpoint.pt  # linear probe of a checkpoint

Read it from the top. First the recipes' hyperparameters, then the method in its order:

    1. Vision Transformer       the encoder (context and target encoder share the architecture)
    2. Multi-block masks        one context block and M target blocks per image
    3. Predictor                predicts the target blocks' features from the context
    4. Targets and the loss     the EMA target encoder, the I-JEPA loss, then VICReg
    5. One training step        AdamW and its schedules, and train_step: the whole method at once

then the machinery that runs it, which a reader of the method can skip:

    6. Data                     ImageFolder, the built-in demo set, and each batch with its masks
    7. Devices, DDP and AMP     and the mixed-precision backward and AdamW step
    8. Checkpoints
    9. Training loop            epochs, stop signals, the log, collapse monitors
   10. Linear probe             frozen target encoder + BatchNorm + Linear; the k-NN monitor
   11. Benchmark
   12. Command line
"""
import argparse
import copy
import hashlib
import json
import math
import os
import signal
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

# =============================================================================================
# The recipes. Every flag not given on the command line takes its value from one of them.
# =============================================================================================
# The published C-JEPA ViT-B/16 settings (I-JEPA's recipe with C-JEPA's schedule, epochs and
# beta_vicreg; probe_blocks to save_every are ours): with --data, and for --benchmark (at batch
# 32 on a machine without CUDA). Each setting: (value, its --help text).
SETTINGS = dict(
    arch=("vit_b16", "the encoder: a preset of ARCHS (section 1)"),
    img_size=(224, "images are resized and cropped to this size"),
    epochs=(600, "pretraining epochs"),
    batch_size=(128, "images per process and step (128 x 16 GPUs = 2048 in the paper)"),
    lr=(1e-3, "peak learning rate, reached after the warm-up"),
    start_lr=(1e-4, "learning rate at the start of the warm-up"),
    final_lr=(1e-6, "learning rate at the end of the cosine decay"),
    warmup=(15.0, "epochs of linear learning-rate warm-up"),
    wd=((0.04, 0.4), "weight decay: rises along a cosine from the first value to the second"),
    ema=((0.996, 1.0), "the target encoder's EMA momentum: rises linearly over the run"),
    vicreg=(0.001, "beta_vicreg, the weight of all of VICReg; 0 gives plain I-JEPA's loss"),
    beta_sim=(25.0, "VICReg's invariance weight"),
    beta_std=(25.0, "VICReg's variance weight"),
    beta_cov=(1.0, "VICReg's covariance weight"),
    pred_width=(384, "the predictor's width: a narrow ViT"),
    pred_depth=(6, "the predictor's depth (12 for ViT-H in the paper)"),
    n_targets=(4, "M, the target blocks per image"),
    target_scale=((0.15, 0.2), "a target block's share of the image"),
    context_scale=((0.85, 1.0), "the context block's share, before the targets are removed"),
    min_keep=(10, "the fewest patches a mask may have (lowered to fit a small patch grid)"),
    clip=(0.0, "gradient-norm clipping; 0 is off (the paper clips nothing)"),
    probe_blocks=(1, "the probe's features: the mean patch token of the last N blocks"),
    probe_epochs=(20, "epochs of the linear probe's head; 0 skips the probe"),
    knn_images=(5000, "the per-epoch k-NN monitor's images from train and from val; 0 is off"),
    workers=(min(8, os.cpu_count() or 1), "data-loading workers of each training process"),
    out=("runs/pretrain", "the run folder: checkpoint.pt, log.jsonl, curves.png, probe.json"),
    save_every=(30.0, "minutes between checkpoints within an epoch, which can take hours"),
)
PRETRAIN = {name: value for name, (value, _) in SETTINGS.items()}

# With no --data: the demo, Fashion-MNIST at 28 px (a 7 x 7 patch grid) on a CPU in minutes.
# What it changes, and why.
DEMO = PRETRAIN | dict(
    arch="vit_demo",  # width 128, depth 4, patch 4: 0.8M parameters
    img_size=28,  # the demo set's images
    epochs=6,  # 936 steps: under 2 minutes on 2 CPU cores, the probe included
    batch_size=64,  # 156 steps an epoch on the 10,000 images
    warmup=0.3,  # epochs: 47 steps, 5% of the run
    wd=(0.04, 0.04),  # held at the published start value
    ema=(0.99, 1.0),  # a short run: the target encoder must move faster
    vicreg=0.01,  # 0.001 (the paper's) to 0.05 all work here; 0.01 leads the k-NN monitor
    pred_width=64,  # half the encoder's width, as 384 is half of ViT-B's 768
    pred_depth=3,  # shallower than 6, as the encoder is 4 blocks deep, not 12
    min_keep=4,  # 10 cannot fit a 7 x 7 grid, 6 can (a target block may have 6 patches); the
    # demo's results were all measured with 4
    clip=1.0,  # the paper clips nothing; every demo result in the README was measured with 1.0
    probe_blocks=4,  # the mean tokens of all 4 of vit_demo's blocks, side by side
    probe_epochs=30,  # the head trains on cached features: 30 epochs take seconds
    knn_images=1000,  # the whole demo set would cost half as much time as the training
    workers=0,  # the demo set is in memory: workers would only add start-up time
    out="runs/demo",  # the demo's run folder
    save_every=0.0,  # an epoch takes about 15 s: a checkpoint after each is enough
)

# --recipe small: the demo's settings for your own small images (--data DIR). The image size is
# the shorter side of the first readable training image, unless --img-size says otherwise.
SMALL = DEMO | dict(
    img_size=None,  # the first image's size
    workers=min(4, os.cpu_count() or 1),  # decoding image files: loader workers pay off here
    out="runs/small",  # its run folder
)

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
    batch = torch.arange(x.shape[0], device=x.device)[:, None]  # [B, 1]: image b takes its own
    return x[batch, idx]


class Attention(nn.Module):
    def __init__(self, dim, heads):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x, only_last=None):
        """x [B, N, D] -> [B, N, D]; with only_last = n, the outputs of the last n tokens only,
        [B, n, D] (they still attend to all N tokens)."""
        B, N, D = x.shape
        qkv = self.qkv(x).view(B, N, 3, self.heads, D // self.heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)  # each [B, heads, N, D/heads]
        if only_last is not None:
            q = q[:, :, -only_last:]
        # softmax(q k^T / sqrt(d)) v in one fused kernel, which never stores the N x N weights
        x = F.scaled_dot_product_attention(q, k, v)  # [B, heads, queries, D/heads]
        x = x.transpose(1, 2).reshape(B, q.shape[2], D)  # the heads side by side again
        return self.proj(x)


class Block(nn.Module):
    """Pre-norm transformer block: x + Attn(LN(x)), then x + MLP(LN(x))."""

    def __init__(self, dim, heads):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        mlp = OrderedDict(fc1=nn.Linear(dim, 4 * dim), act=nn.GELU(), fc2=nn.Linear(4 * dim, dim))
        self.mlp = nn.Sequential(mlp)

    def forward(self, x, only_last=None):
        """only_last = n: compute the outputs of the last n tokens only (see Predictor)."""
        attended = self.attn(self.norm1(x), only_last)
        if only_last is not None:
            x = x[:, -only_last:]  # the residual stream of those tokens
        x = x + attended
        return x + self.mlp(self.norm2(x))


def init_weights(m):
    """Truncated-normal weights (std 0.02), zero biases, LayerNorms at 1 and 0. (The official code
    then also divides each block's attn.proj and mlp.fc2 weights by sqrt(2 * the block's number,
    from 1): this file does not.)"""
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
        proj = nn.Conv2d(3, width, patch_size, patch_size)  # one token per patch
        self.patch_embed = nn.Sequential(OrderedDict(proj=proj))
        pos_embed = sincos_pos_embed(width, self.grid)[None]  # [1, N, D], fixed: not learned
        self.register_buffer("pos_embed", pos_embed)
        self.blocks = nn.ModuleList(Block(width, heads) for _ in range(depth))
        self.norm = nn.LayerNorm(width, eps=1e-6)
        self.apply(init_weights)

    def embed(self, images, keep=None):
        """images [B, 3, H, W], keep [B, K] patch indices -> tokens [B, K, D] (all N if no keep).
        The positions are added first, so the kept tokens know where they are."""
        x = self.patch_embed(images).flatten(2).transpose(1, 2) + self.pos_embed  # [B, N, D]
        if keep is None:
            return x
        return gather_tokens(x, keep)

    def forward(self, images, keep=None):
        x = self.embed(images, keep)
        for block in self.blocks:
            x = block(x)
        return self.norm(x)


def make_encoder(args):
    width, depth, heads, _ = ARCHS[args.arch]
    return VisionTransformer(args.img_size, args.patch_size, width, depth, heads)


# =============================================================================================
# 2. Multi-block masks
# =============================================================================================
# I-JEPA hides M target blocks (each 15-20% of the image) and shows the context encoder one large
# block (85-100%) with every target patch removed, so the targets can't be copied: they must be
# predicted from their surroundings. The masks are the only "augmentation" the method needs:
# context and targets come from one view of the image, with no hand-made distortions (the data
# pipeline adds a random resized crop, as I-JEPA does; the demo, horizontal flips). One block size
# per batch, so that every image's target blocks have the same length; positions are drawn per
# image, and the contexts are cut to the batch's shortest, so that each mask is one tensor.
TARGET_ASPECT = (0.75, 1.5)  # a target block's height / width


def block_shape(scale, aspect, H, W):
    """(h, w) of a block of area scale * H*W and h/w = aspect, clipped to 1..H-1 and 1..W-1."""
    h = round(math.sqrt(scale * H * W * aspect))
    w = round(math.sqrt(scale * H * W / aspect))
    return min(max(h, 1), H - 1), min(max(w, 1), W - 1)


def draw_block_shape(scale, aspect, H, W, gen):
    """A random (h, w) with scale and aspect ratio uniform in their ranges. They are drawn
    independently; the official code uses one random number for both, which ties a block's
    size to its shape."""
    s = scale[0] + torch.rand(1, generator=gen).item() * (scale[1] - scale[0])
    a = aspect[0] + torch.rand(1, generator=gen).item() * (aspect[1] - aspect[0])
    return block_shape(s, a, H, W)


def place_blocks(n, h, w, H, W, gen):
    """n blocks of h x w at random positions -> [n, H*W] bool. Every valid start can be drawn,
    the last row and column included (the official sampler's bound excludes them)."""
    top = torch.randint(0, H - h + 1, (n, 1), generator=gen)
    left = torch.randint(0, W - w + 1, (n, 1), generator=gen)
    rows = (torch.arange(H) >= top) & (torch.arange(H) < top + h)  # [n, H]: the rows covered
    cols = (torch.arange(W) >= left) & (torch.arange(W) < left + w)  # [n, W]
    return (rows[:, :, None] & cols[:, None, :]).flatten(1)  # [n, H*W], raster order


def first_true(ok):
    """ok [B, tries] bool -> [B]: the index of each row's first True (0 where there is none)."""
    return ok.int().argmax(dim=1)  # argmax returns the first of equal maxima


def random_subset(mask, gen):
    """mask [B, N] bool -> [B, K] indices, K = the smallest count in the batch: a random K of
    each row's patches, in raster order. (The official code keeps the first K, which biases the
    contexts towards the top of the image. It cuts the target masks the same way, but a batch's
    target blocks all have one size, so nothing of them is cut, there or here.)"""
    k = int(mask.sum(dim=1).min())
    # A random score for every member patch and 2 (above any score) for the others: sorting by
    # score puts each row's members first, in random order.
    score = torch.rand(mask.shape, generator=gen)
    score[~mask] = 2.0
    chosen = score.argsort(dim=1)[:, :k]
    return chosen.sort(dim=1).values


def sample_masks(B, H, W, gen, n_targets=4, target_scale=(0.15, 0.2), target_aspect=TARGET_ASPECT,
                 context_scale=(0.85, 1.0), min_keep=10, tries=20):
    """The multi-block mask sampler, vectorised over the batch, for an H x W patch grid.
    Returns context indices [B, Kc] and target indices [M, B, Kt] (M = n_targets).
    Never hangs: each image gets `tries` candidate placements, then a defined fallback."""
    N, rows = H * W, torch.arange(B)
    th, tw = draw_block_shape(target_scale, target_aspect, H, W, gen)
    ch, cw = draw_block_shape(context_scale, (1.0, 1.0), H, W, gen)

    # Target blocks: per image, the first try whose M blocks leave >= min_keep patches free.
    targets = place_blocks(B * tries * n_targets, th, tw, H, W, gen)
    targets = targets.view(B, tries, n_targets, N)
    free = ~targets.any(dim=2)  # [B, tries, N]: the patches in no target block
    ok = free.sum(dim=2) >= min_keep
    targets = targets[rows, first_true(ok)]  # [B, M, N]: each image's chosen try
    stuck = ~ok.any(dim=1)
    # Fallback: all M blocks on the first one's spot (check_masks_fit makes sure that fits).
    targets[stuck] = targets[stuck, :1]
    free = ~targets.any(dim=1)  # [B, N]

    # Context block: per image, the first try that keeps >= min_keep patches outside the targets.
    context = place_blocks(B * tries, ch, cw, H, W, gen).view(B, tries, N)
    context = context & free[:, None]  # every target patch removed
    ok = context.sum(dim=2) >= min_keep
    context = context[rows, first_true(ok)]  # [B, N]
    stuck = ~ok.any(dim=1)
    context[stuck] = free[stuck]  # fallback: every patch outside the targets

    # One length per batch, so that each mask is a tensor: keep a random subset of each context.
    ctx_idx = random_subset(context, gen)  # [B, Kc]
    per_block = targets.transpose(0, 1).reshape(n_targets * B, N)  # row m*B + b: block m, image b
    tgt_idx = random_subset(per_block, gen).view(n_targets, B, -1)  # [M, B, Kt]
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

    def forward(self, z, ctx_idx, tgt_idx):
        """z [B, Kc, D] context encoder output, ctx_idx [B, Kc], tgt_idx [M, B, Kt]
        -> predictions [M, B, Kt, D]."""
        M, B, Kt = tgt_idx.shape
        pos = self.predictor_pos_embed[0]  # [N, Dp]
        x = self.predictor_embed(z) + pos[ctx_idx]  # [B, Kc, Dp]
        # All M target blocks in one batch: the context is repeated once per block, so a block's
        # mask tokens see the context but never another block's.
        x = x.repeat(M, 1, 1)  # [M*B, Kc, Dp]
        mask_tokens = self.mask_token + pos[tgt_idx.flatten(0, 1)]  # [M*B, Kt, Dp]
        x = torch.cat([x, mask_tokens], dim=1)
        for block in self.predictor_blocks[:-1]:
            x = block(x)
        # Only the mask tokens' outputs are predictions: the last block computes no others.
        x = self.predictor_blocks[-1](x, only_last=Kt)  # [M*B, Kt, Dp]
        return self.predictor_proj(self.predictor_norm(x)).view(M, B, Kt, -1)


def make_predictor(args):
    width, depth, heads, _ = ARCHS[args.arch]
    grid = args.img_size // args.patch_size
    return Predictor(grid, width, args.pred_width, args.pred_depth, heads)


# =============================================================================================
# 4. Targets and the loss
# =============================================================================================
# The target encoder is a copy of the context encoder that gets no gradients. After every
# optimizer step it moves a little towards the context encoder (an exponential moving average).
# The predictor must match its output on the target blocks: that is I-JEPA. Nothing in that loss
# stops the features from collapsing into a few directions: in the demo, plain I-JEPA's target
# features span about 4 effective dimensions of 128 (README). C-JEPA adds VICReg's terms against it.


@torch.no_grad()
def target_features(target_encoder, images):
    """The target encoder's view of the whole image, [B, N, D]: what the predictor must predict.
    Each patch's features are normalised (layer norm without affine), as in the official code:
    that fixes the targets' scale, so the loss cannot shrink by shrinking the targets."""
    h = target_encoder(images)
    return F.layer_norm(h, h.shape[-1:])


@torch.no_grad()
def ema_update(target, online, m):
    """target <- m * target + (1 - m) * online, parameter by parameter."""
    for t, o in zip(target.parameters(), online.parameters()):
        t.lerp_(o, 1.0 - m)


def variance_covariance(c):
    """VICReg's variance and covariance terms of c [n, D], in fp32."""
    n, D = c.shape
    autocast_device = "cuda" if c.is_cuda else "cpu"
    with torch.autocast(autocast_device, enabled=False):  # autocast would run c.T @ c in bf16
        c = c.float() - c.float().mean(dim=0)
        std = torch.sqrt(c.var(dim=0) + 1e-4)
        l_std = F.relu(1 - std).mean()  # hinge: every feature should vary across the batch
        cov = (c.T @ c) / (n - 1)  # [D, D]
        off_diagonal = cov.pow(2).sum() - cov.diagonal().pow(2).sum()
        l_cov = off_diagonal / D  # features should be decorrelated
    return l_std, l_cov


def cjepa_loss(p, t, z, args):
    """L = L_ijepa + beta_vicreg * (beta_sim * L_sim + beta_std * L_std + beta_cov * L_cov).
    p [M, B, Kt, D] predictions, t [M, B, Kt, D] targets, z [B, Kc, D] context encoder output.
    Returns the loss and its terms, detached, for the log."""
    # I-JEPA: smooth L1 (quadratic below 1, linear above), mean over blocks, patches, features
    l_ijepa = F.smooth_l1_loss(p, t)
    # VICReg, as we read the paper, with fp32 statistics.
    # Variance and covariance of the mean context feature of each image, over the global batch
    # (under DDP, gather_batch collects every process's images: section 7):
    c = gather_batch(z.float().mean(dim=1))  # [B_global, D]: one mean feature per image
    l_std, l_cov = variance_covariance(c)  # scalars: against total and dimensional collapse
    # Invariance: the prediction must get the mean of each image's target patches right
    l_sim = F.mse_loss(p.float().mean(dim=(0, 2)), t.float().mean(dim=(0, 2)))
    l_vicreg = args.beta_sim * l_sim + args.beta_std * l_std + args.beta_cov * l_cov
    loss = l_ijepa + args.vicreg * l_vicreg  # args.vicreg is beta_vicreg
    terms = dict(loss=loss, ijepa=l_ijepa, sim=l_sim, std=l_std, cov=l_cov)
    return loss, {name: value.detach().float() for name, value in terms.items()}


# =============================================================================================
# 5. One training step
# =============================================================================================
def cosine(t, start, end):
    """From start (t = 0) to end (t = 1) along half a cosine."""
    t = min(max(t, 0.0), 1.0)
    return end + (start - end) * 0.5 * (1 + math.cos(math.pi * t))


def schedules(step, total, warmup_steps, args):
    """(learning rate, weight decay, EMA momentum) at this step of `total`: they change every
    step, not every epoch."""
    if step < warmup_steps:
        lr = args.start_lr + (args.lr - args.start_lr) * step / warmup_steps
    else:
        t = (step - warmup_steps) / max(1, total - warmup_steps)
        lr = cosine(t, args.lr, args.final_lr)
    wd = cosine(step / total, args.wd[0], args.wd[1])  # rises from wd[0] to wd[1]
    m = args.ema[0] + (args.ema[1] - args.ema[0]) * step / total
    return lr, wd, m


def make_optimizer(modules, args, device):
    """AdamW; biases and norms (every 1-D parameter) get no weight decay."""
    params = [p for module in modules for p in module.parameters()]
    weights = dict(params=[p for p in params if p.ndim >= 2], weight_decay=args.wd[0])
    others = dict(params=[p for p in params if p.ndim < 2], weight_decay=0.0)
    return torch.optim.AdamW([weights, others], lr=args.lr, fused=device.type == "cuda")


def build_run(args, device, autocast):
    """What a run trains, as one dict: the context encoder, the predictor, the target encoder
    (a copy of the context encoder) and AdamW; and for the machinery, the mixed precision, the
    GradScaler that fp16 needs (section 7) and the run's log (one line per epoch)."""
    encoder = make_encoder(args).to(device)
    predictor = make_predictor(args).to(device)
    target_encoder = copy.deepcopy(encoder).requires_grad_(False)  # then only the EMA moves it
    opt = make_optimizer([encoder, predictor], args, device)
    scaler = torch.amp.GradScaler(device.type, enabled=args.precision == "fp16")
    return dict(encoder=encoder, predictor=predictor, target_encoder=target_encoder, opt=opt,
                autocast=autocast, scaler=scaler, log=[])


def train_step(run, images, ctx_idx, tgt_idx, lr, wd, m, args):
    """One whole C-JEPA step on a batch of images [B, 3, H, W] and its masks (one context block
    [B, Kc] and M target blocks [M, B, Kt] per image, drawn with the batch by sample_masks in
    the data loader), with this step's learning rate, weight decay and EMA momentum. Returns the
    loss terms (for the log) and the mean normalised target feature of each image [B, D] (for
    the collapse monitors)."""
    encoder, predictor, target_encoder = run["encoder"], run["predictor"], run["target_encoder"]
    with run["autocast"]:  # the forward in bf16 or fp16 where the run uses them (section 7)
        # Step 1. Targets: the target encoder sees the whole image
        h = target_features(target_encoder, images)  # [B, N, D]
        t = gather_tokens(h, tgt_idx)  # [M, B, Kt, D]: the target blocks
        # Step 2. Context and prediction: the context encoder sees the context block only
        z = encoder(images, ctx_idx)  # [B, Kc, D]
        p = predictor(z, ctx_idx, tgt_idx)  # [M, B, Kt, D]
        # Step 3. Loss
        loss, terms = cjepa_loss(p, t, z, args)
    # Step 4. Backward and AdamW step, at this step's learning rate and weight decay
    for group in run["opt"].param_groups:
        group["lr"] = lr
    run["opt"].param_groups[0]["weight_decay"] = wd  # the group of weights; biases and norms: 0
    backward_and_step(run, loss, args)  # (section 7 adds the checks, fp16 and clipping)
    # Step 5. EMA: the target encoder moves towards the context encoder
    ema_update(target_encoder, encoder, m)  # (a DDP wrapper has the same parameters)
    return terms, h.mean(dim=1).float()

# That is all of C-JEPA. Everything below runs it: the data (which draws each batch's masks),
# devices, checkpoints, the loop (this step's schedules), the probe and the benchmark.


# =============================================================================================
# 6. Data
# =============================================================================================
class CliError(Exception):
    """An error the user can act on: main() prints it as one line and exits with code 2."""


IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
# 10k train + 2k test Fashion-MNIST images, 28 x 28, 10 classes (README, "Data and licences")
DEMO_DATA = os.path.join(HERE, "data", "fashion_mnist_12k.npz")
DEMO_MEAN, DEMO_STD = 0.2867, 0.3540  # of the demo set's pixels, in 0..1


class DemoImages(torch.utils.data.Dataset):
    """The built-in demo set: uint8 grey images [n, 28, 28] -> normalised [3, 28, 28] tensors."""

    def __init__(self, split, augment):
        with np.load(DEMO_DATA) as d:
            self.x = torch.from_numpy(d[f"x_{split}"])
            self.y = torch.from_numpy(d[f"y_{split}"]).long()
        self.augment = augment

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        x = (self.x[i].float() / 255 - DEMO_MEAN) / DEMO_STD
        if self.augment and torch.rand(1).item() < 0.5:
            x = x.flip(-1)  # horizontal flip
        return x.expand(3, -1, -1), self.y[i]


def load_rgb(path):
    """An image file -> an 8-bit RGB PIL image. 16-bit images (PNG's grey 'I;16' and 'I') are
    scaled to 8 bits; PIL's own convert('RGB') would clip them at 255."""
    from PIL import Image
    with Image.open(path) as image:
        if image.mode.startswith("I"):
            pixels = np.asarray(image, dtype=np.float64) / 257  # 65535 -> 255
            image = Image.fromarray(pixels.clip(0, 255).round().astype(np.uint8))
        return image.convert("RGB")


class SafeImageFolder(datasets.ImageFolder):
    """An ImageFolder that replaces an unreadable image by the next readable one, with a warning
    the first time a process meets it: in the training process (--workers 0) once per run, in
    loader workers once per worker and epoch. (The probe's sets warn for themselves.)"""

    def __getitem__(self, i):
        for j in range(i, i + len(self)):
            j = j % len(self)
            try:
                return super().__getitem__(j)
            except (OSError, ValueError, SyntaxError) as e:  # what PIL raises on corrupt files
                print(f"warning: skipping unreadable image {self.samples[j][0]} ({e})",
                      file=sys.stderr)
                self.samples[j] = self.samples[(j + 1) % len(self)]  # not again in this process
        raise CliError(f"no readable image in {self.root}")


def make_dataset(args, split, augment):
    """split 'train' or 'val'. augment: RandomResizedCrop (the demo set: horizontal flips), else
    a resize and a center crop (the demo set: the images as they are)."""
    if args.data is None:
        return random_part(DemoImages("train" if split == "train" else "test", augment),
                           args.subset, args.seed, split, "subset")
    root = os.path.join(args.data, split)
    if not os.path.isdir(root):
        where = "no such folder" if not os.path.isdir(args.data) else f"has no {split}/ folder"
        raise CliError(f"--data {args.data}: {where}: expected an ImageFolder tree "
                       f"{args.data}/{split}/<class>/<image>")
    if augment:
        crop = [T.RandomResizedCrop(args.img_size, scale=(0.3, 1.0))]
    else:
        crop = [T.Resize(args.img_size * 256 // 224), T.CenterCrop(args.img_size)]
    transform = T.Compose(crop + [T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)])
    try:
        dataset = SafeImageFolder(root, transform, loader=load_rgb)
    except FileNotFoundError as e:  # no class folders, or no images in them
        raise CliError(f"{root}: {e}") from None
    if split != "train":  # labels by class name, as train/ numbers them, so that none shifts
        train_classes = datasets.folder.find_classes(os.path.join(args.data, "train"))[0]
        unknown = sorted(set(dataset.classes) - set(train_classes))
        if unknown:
            raise CliError(f"{root} has classes that train/ has not: {', '.join(unknown[:5])}")
        dataset.samples = [(path, train_classes.index(dataset.classes[label]))
                           for path, label in dataset.samples]
    return random_part(dataset, args.subset, args.seed, split, "subset")


def seed_of(*keys):
    """A 63-bit seed from a hash of the keys, e.g. (seed, epoch, rank, batch)."""
    digest = hashlib.sha256(repr(keys).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def random_part(dataset, n, *keys):
    """A random n of the dataset's items, in their order and fixed by the keys; all if n is None
    or not smaller."""
    if not n or n >= len(dataset):
        return dataset
    chosen = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed_of(*keys)))
    return torch.utils.data.Subset(dataset, chosen[:n].sort().values.tolist())


class EpochBatches(torch.utils.data.Dataset):
    """Item b is batch b of an epoch on this rank: its images, labels and masks, all drawn from
    (seed, epoch, rank, b) alone, whatever the loader workers or the step a run resumed from.
    The loader's workers draw the masks, as the official code's collate function does."""

    def __init__(self, dataset, args, rank, world):
        self.dataset, self.args, self.rank, self.world = dataset, args, rank, world
        self.per_rank = len(dataset) // (args.batch_size * world)  # whole global batches only

    def __len__(self):
        return self.per_rank

    def set_epoch(self, epoch):
        """One permutation of the images per epoch, the same on every rank; rank r takes every
        world-th image of it."""
        self.epoch = epoch
        gen = torch.Generator().manual_seed(seed_of(self.args.seed, epoch))
        order = torch.randperm(len(self.dataset), generator=gen)
        used = order[:self.per_rank * self.args.batch_size * self.world]
        self.order = used[self.rank::self.world].view(self.per_rank, self.args.batch_size)

    def __getitem__(self, b):
        seed = seed_of(self.args.seed, self.epoch, self.rank, b)
        # The crops and flips draw from the global RNG: seed it. (With --workers 0 that is the
        # training process's: each batch seeds it anew, so other draws from it do not matter.)
        torch.manual_seed(seed)
        images, labels = torch.utils.data.default_collate(
            [self.dataset[i] for i in self.order[b].tolist()])
        grid = self.args.img_size // self.args.patch_size
        gen = torch.Generator().manual_seed(seed)
        ctx_idx, tgt_idx = sample_masks(len(images), grid, grid, gen, **mask_config(self.args))
        return images, labels, ctx_idx, tgt_idx


def mask_config(args):
    return dict(n_targets=args.n_targets, target_scale=args.target_scale,
                context_scale=args.context_scale, min_keep=args.min_keep)


# =============================================================================================
# 7. Devices, DDP and AMP
# =============================================================================================
def setup(args):
    """The device, the precision and, under torchrun, the process group.
    Returns (rank, world size, device, autocast context)."""
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    args.world = world  # saved with the run: another number of processes needs --resume
    try:
        device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    except RuntimeError as e:  # torch lists the device types it knows
        raise CliError(f"--device {args.device}: {e}") from None
    if device.type == "cuda":
        if "LOCAL_RANK" in os.environ:  # torchrun: one GPU per process
            device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if (device.index or 0) >= gpus:
            raise CliError(f"--device {args.device}: this machine has {gpus} CUDA device(s)")
        torch.cuda.set_device(device.index or 0)  # for synchronize(), memory stats, pinned memory
    if not args.precision:  # fp32 on a CPU; bf16 on GPUs, but fp16 on those that emulate bf16
        args.precision = "fp32"
        if device.type == "cuda":
            native = torch.cuda.is_bf16_supported(including_emulation=False)
            args.precision = "bf16" if native else "fp16"
    if args.precision == "fp16" and device.type != "cuda":
        raise CliError("--precision fp16 needs CUDA; on a CPU use fp32, or bf16 where it has AMX")
    if "RANK" in os.environ:  # launched by torchrun; multi-node works the same (env:// rendezvous)
        timeout = timedelta(minutes=args.dist_timeout)  # then a rank waiting on a dead peer exits
        # torchrun keeps its store across the restarts of --max-restarts: each attempt takes keys
        # of its own, or it could read the last group's addresses (pytorch/pytorch#135712)
        store, _, _ = next(dist.rendezvous("env://", timeout=timeout))
        attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=rank,
                                store=dist.PrefixStore(f"attempt{attempt}/", store),
                                world_size=world, timeout=timeout)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(args.precision)
    autocast = torch.autocast(device.type, dtype=dtype) if dtype else nullcontext()
    return rank, world, device, autocast


def backward_and_step(run, loss, args):
    """Step 4 of train_step, with what mixed precision and DDP need: the loss is checked on every
    rank first (a NaN loss never reaches the weights), fp16's GradScaler scales the loss and
    unscales the gradients (in bf16 and fp32 it does nothing), and --clip clips their norm."""
    if not all_finite(loss):  # (this costs a host sync)
        raise FloatingPointError(f"the loss is {loss.item()}")
    opt, scaler = run["opt"], run["scaler"]
    scaler.scale(loss).backward()
    if args.clip > 0:
        scaler.unscale_(opt)
        nn.utils.clip_grad_norm_([p for g in opt.param_groups for p in g["params"]], args.clip)
    scaler.step(opt)
    scaler.update()
    opt.zero_grad(set_to_none=True)


def all_finite(loss):
    """Is the loss finite on every rank? (Under DDP a rank that stopped alone would leave the
    others waiting in their backward's all-reduce.)"""
    finite = torch.isfinite(loss).float()
    if dist.is_initialized():
        dist.all_reduce(finite, op=dist.ReduceOp.MIN)
    return bool(finite)


class GatherBatch(torch.autograd.Function):
    """[B, D] on each rank -> [world*B, D], the global batch, with gradients back to each
    rank's part."""

    @staticmethod
    def forward(ctx, x):
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, x.contiguous())
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous()
        # Every rank's loss depends on this rank's part: sum their gradients. (DDP then averages
        # the parameter gradients over ranks: the sum / world is the global batch's gradient.)
        dist.all_reduce(grad)
        return grad.chunk(dist.get_world_size())[dist.get_rank()]


def gather_batch(x):
    """The global batch under DDP; x itself in a single process."""
    return GatherBatch.apply(x) if dist.is_initialized() else x


def wrap_ddp(run, device):
    """DDP for the two trained models; the target encoder gets no gradients and is not wrapped."""
    ids = [device.index] if device.type == "cuda" else None
    for key in ("encoder", "predictor"):
        run[key] = nn.parallel.DistributedDataParallel(run[key], device_ids=ids)


def unwrap(model):
    """The model inside a DDP wrapper (the one whose state dict a checkpoint holds)."""
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def compile_blocks(run):
    """--compile: torch.compile every transformer block, in place, so that parameter names and
    checkpoints stay the same. dynamic=True: the masks' lengths change from batch to batch."""
    for key in ("encoder", "predictor", "target_encoder"):
        for module in run[key].modules():
            if isinstance(module, Block):
                module.compile(dynamic=True)


# =============================================================================================
# 8. Checkpoints
# =============================================================================================
# what must match on --resume
ARCH_KEYS = ("arch", "img_size", "patch_size", "pred_width", "pred_depth")
# what may change on --resume, with a warning
TRAIN_KEYS = ("data", "epochs", "batch_size", "lr", "start_lr", "final_lr", "warmup", "wd", "ema",
              "vicreg", "beta_sim", "beta_std", "beta_cov", "n_targets", "target_scale",
              "context_scale", "min_keep", "clip", "seed", "world")


def save_checkpoint(run, args, epoch, step=0, progress=None):
    """Save the run in args.out, then log.jsonl from the checkpoint's log. epoch: the epochs done;
    step and progress: the batches done of the next one and its sums so far (mid-epoch)."""
    path = os.path.join(args.out, "checkpoint.pt")
    ckpt = dict(encoder=unwrap(run["encoder"]).state_dict(),
                predictor=unwrap(run["predictor"]).state_dict(),
                target_encoder=run["target_encoder"].state_dict(),
                opt=run["opt"].state_dict(), scaler=run["scaler"].state_dict(),
                epoch=epoch, step=step, args=vars(args), log=run["log"], progress=progress)
    try:
        atomic_save(ckpt, path)
    except OSError as e:  # a full disk, a folder made read-only, ...
        previous = "the previous one is intact" if os.path.exists(path) else "there is none yet"
        raise CliError(f"could not write the checkpoint {path} ({e.strerror or e}); "
                       f"{previous}") from None
    with open(os.path.join(args.out, "log.jsonl"), "w") as f:
        f.writelines(json.dumps(line) + "\n" for line in run["log"])


def atomic_save(obj, path):
    """Write a temporary file, flush it to disk, then rename it over `path`: a crash never
    leaves a broken checkpoint, and a failed write leaves the old one and no temporary file."""
    tmp = path + ".tmp"
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)  # atomic on POSIX: readers see the old file or the new one
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def read_checkpoint(path):
    try:
        return torch.load(path, map_location="cpu", weights_only=True)  # weights_only: no code runs
    except FileNotFoundError:
        raise CliError(f"{path}: no such checkpoint") from None
    except Exception as e:  # (an empty file raises EOFError with no message)
        first_line = (str(e).strip().splitlines() or [""])[0][:200]
        raise CliError(f"{path} is not a checkpoint ({type(e).__name__}: {first_line})") from None


def resume(run, path, args):
    """Restore a run from one of our checkpoints, of the same architecture. The same command
    continues a run with its own settings; --resume may change some, with a warning. Returns
    (epochs done, batches done of the next epoch, that epoch's progress so far or None)."""
    ckpt = read_checkpoint(path)
    if not isinstance(ckpt, dict) or not isinstance(ckpt.get("args"), dict):
        raise CliError(f"{path} is not a C-JEPA checkpoint of this project (no 'args' entry)")
    saved = ckpt["args"]
    diff = [f"{k} {saved.get(k)} vs {getattr(args, k)}"
            for k in ARCH_KEYS if saved.get(k) != getattr(args, k)]
    if diff:
        raise CliError(f"{path} is of another architecture (checkpoint vs now): {', '.join(diff)}")
    changed = [f"{k} {saved[k]} -> {getattr(args, k)}" for k in TRAIN_KEYS if k in saved
               and json.dumps(saved[k]) != json.dumps(getattr(args, k))]  # (tuples == lists)
    if changed and not args.resume:
        raise CliError(f"{args.out} holds a run with other settings (then -> now): "
                       f"{', '.join(changed)}; give another --out, replace it with --overwrite, "
                       f"or continue it with these settings with --resume {path}")
    if changed and int(os.environ.get("RANK", 0)) == 0:
        print(f"warning: resuming with other settings than the checkpoint's: {', '.join(changed)}",
              file=sys.stderr)
    unwrap(run["encoder"]).load_state_dict(ckpt["encoder"])
    unwrap(run["predictor"]).load_state_dict(ckpt["predictor"])
    run["target_encoder"].load_state_dict(ckpt["target_encoder"])
    for group in ckpt["opt"]["param_groups"]:  # fused AdamW (CUDA) or not: this machine's choice
        group["fused"] = run["opt"].defaults["fused"]
    run["opt"].load_state_dict(ckpt["opt"])
    if ckpt["scaler"]:  # empty unless the run used fp16
        run["scaler"].load_state_dict(ckpt["scaler"])
    run["log"] = ckpt.get("log", [])
    old_log = os.path.join(os.path.dirname(path), "log.jsonl")
    if "log" not in ckpt and os.path.exists(old_log):  # a checkpoint from before the log was in it
        with open(old_log) as f:
            run["log"] = [json.loads(line) for line in f][:ckpt["epoch"]]
    return ckpt["epoch"], ckpt.get("step", 0), ckpt.get("progress")


def load_encoders(path, arch=None, img_size=224):
    """The (target encoder, context encoder, settings) of a checkpoint: ours (its settings in
    'args'), or the official I-JEPA format ('module.' keys, no 'args'), whose architecture and
    image size arch and img_size name. Every weight must fit: no silent partial load."""
    ckpt = read_checkpoint(path)
    if not isinstance(ckpt, dict) or not all(isinstance(ckpt.get(k), dict)
                                             for k in ("encoder", "target_encoder")):
        raise CliError(f"{path} is not an I-JEPA or C-JEPA checkpoint (no 'encoder' and "
                       "'target_encoder' state dicts)")
    if isinstance(ckpt.get("args"), dict):  # ours: the checkpoint names its own settings
        cfg = argparse.Namespace(**ckpt["args"])
    elif arch is None:
        raise CliError(f"{path} has no 'args' (an official I-JEPA checkpoint?): name its "
                       "architecture with --arch, and its image size with --img-size")
    else:
        cfg = argparse.Namespace(arch=arch, img_size=img_size, patch_size=ARCHS[arch][3])
    cfg.epoch = ckpt.get("epoch")
    encoders = []
    for key in ("target_encoder", "encoder"):
        state = {k.removeprefix("module."): v.float() for k, v in ckpt[key].items()}
        with torch.device("meta"):  # shapes only: every weight comes from the file
            model = make_encoder(cfg)
        try:
            model.load_state_dict(state, assign=True)  # strict: each weight has its place
        except RuntimeError as e:  # its 2nd line: the missing keys, or else what does not fit
            problem = str(e).splitlines()[1].strip()[:200]
            raise CliError(f"{path}: the {key} weights do not fit --arch {cfg.arch} at "
                           f"--img-size {cfg.img_size}: {problem}") from None
        encoders.append(model.eval())
    return encoders[0], encoders[1], cfg


# =============================================================================================
# 9. Training loop
# =============================================================================================
# SIGTERM, SIGUSR1 (a cluster's notice of preemption) and SIGINT (Ctrl-C) ask a run to finish
# its step, save and exit with 128 + the signal, so that a scheduler can requeue it.
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)
STOP = dict(signum=0)  # the stop signal that came (0: none yet)


def on_stop_signal(signum, frame):
    # A second Ctrl-C stops at once. (torchrun runs its workers in a session of their own: a
    # Ctrl-C reaches them once, passed on by torchrun.)
    if STOP["signum"] == signum == signal.SIGINT:
        print("\nsecond Ctrl-C: stopping now, without saving", file=sys.stderr)
        os._exit(130)
    STOP["signum"] = STOP["signum"] or signum


def ignore_stop_signals(worker_id):
    """A loader worker leaves the stop signals to the training process, which handles them after
    its step. (A worker started by spawn would otherwise be killed by one, and crash the run.)"""
    for signum in STOP_SIGNALS:
        signal.signal(signum, signal.SIG_IGN)


def collapse_monitors(pooled):
    """pooled [n, D] target features -> (mean per-feature std, effective rank). The std alone
    misses dimensional collapse (features that vary but along few directions); the rank does
    not: it is exp of the entropy of the normalised singular values."""
    x = pooled.float() - pooled.float().mean(dim=0)
    s = torch.linalg.svdvals(x)
    p = s / s.sum()
    erank = torch.exp(-(p * torch.log(p.clamp_min(1e-12))).sum())
    return x.std(dim=0).mean().item(), erank.item()


def train_epoch(run, batches, epoch, args, rank, device, progress):
    """One pass over the data, from the step that a resumed run's progress reached. Saves
    mid-epoch when --save-every says so, and when a stop signal came: then it returns None.
    Else it returns the epoch's log line."""
    iters = len(batches)
    total, warmup_steps = iters * args.epochs, round(args.warmup * iters)
    progress["sums"] = torch.as_tensor(progress["sums"], device=device)
    batches.set_epoch(epoch)
    loader = torch.utils.data.DataLoader(batches, batch_size=None,
                                         sampler=range(progress["step"], iters),
                                         num_workers=args.workers, pin_memory=device.type == "cuda",
                                         worker_init_fn=ignore_stop_signals)
    t0 = time.time() - progress["seconds"]
    bar = tqdm(total=iters, initial=progress["step"], desc=f"epoch {epoch + 1}/{args.epochs}",
               disable=rank != 0, leave=False, dynamic_ncols=True)
    with bar:  # closed (and cleared) however the loop ends
        for i, batch in enumerate(loader, start=progress["step"]):
            images, _, ctx_idx, tgt_idx = (x.to(device, non_blocking=True) for x in batch)
            lr, wd, m = schedules(epoch * iters + i, total, warmup_steps, args)
            try:
                terms, target_means = train_step(run, images, ctx_idx, tgt_idx, lr, wd, m, args)
            except FloatingPointError as e:
                raise CliError(f"{e} at epoch {epoch + 1}, step {i + 1}: stopped before any "
                               "weight changed; the last good checkpoint, if any, is "
                               f"{os.path.join(args.out, 'checkpoint.pt')}. Lower --lr, or try "
                               "--precision fp32") from None
            # the epoch's sums and the monitors' target features stay on the device: no sync here
            progress["step"], progress["names"] = i + 1, list(terms)
            progress["sums"] = progress["sums"] + torch.stack(list(terms.values()))
            if sum(len(p) for p in progress["pooled"]) < 2048:
                progress["pooled"].append(target_means)
            bar.update()
            if i % 10 == 0:
                bar.set_postfix(loss=f"{terms['loss'].item():.4f}", lr=f"{lr:.1e}")
            # after the same step on every rank: a stop signal, or a timed save (--save-every)
            due = args.save_every > 0 and time.time() - run["last_save"] >= 60 * args.save_every
            signum, save_due = all_ranks_max([STOP["signum"], int(due)], device)
            if signum or save_due:  # (the ranks' mean sums: the same resumed epoch on each)
                saved = dict(progress, sums=rank_mean(progress["sums"]).cpu(),
                             pooled=[p.cpu() for p in progress["pooled"]], seconds=time.time() - t0)
                if rank == 0:
                    save_checkpoint(run, args, epoch, step=i + 1, progress=saved)
                run["last_save"] = time.time()
            if signum:
                if dist.is_initialized():
                    dist.barrier()  # no rank exits before rank 0 has saved
                say_stopped(signum, f"at epoch {epoch + 1}, step {i + 1}", args, rank)
                return None
    progress["seconds"] = time.time() - t0
    return log_line(progress, epoch, iters, args)


def all_ranks_max(values, device):
    """The largest of each value over all ranks (NCCL reduces GPU tensors only)."""
    values = torch.tensor(values)
    if dist.is_initialized():
        values = values.to(device)
        dist.all_reduce(values, op=dist.ReduceOp.MAX)
    return values.tolist()


def rank_mean(x):
    """The mean of x over the ranks under DDP (x itself in a single process)."""
    if dist.is_initialized():
        x = x.clone()
        dist.all_reduce(x)
        x /= dist.get_world_size()
    return x


def log_line(progress, epoch, iters, args):
    """The epoch's log line: the loss terms averaged over the steps and the ranks, the schedules
    of its last step, and the collapse monitors of rank 0's target features (of the epoch's first
    2048 or more images)."""
    means = rank_mean(progress["sums"] / iters)
    feat_std, erank = collapse_monitors(torch.cat([p.cpu() for p in progress["pooled"]]))
    lr, wd, m = schedules((epoch + 1) * iters - 1, iters * args.epochs,
                          round(args.warmup * iters), args)
    line = dict(epoch=epoch + 1)
    line.update({k: round(v, 6) for k, v in zip(progress["names"], means.tolist())})
    line.update(lr=lr, wd=wd, momentum=m, feat_std=round(feat_std, 4), erank=round(erank, 2))
    seconds = progress["seconds"]
    line.update(img_per_s=round(iters * args.batch_size * args.world / seconds, 1),
                minutes=round(seconds / 60, 2))
    return line


def say_stopped(signum, where, args, rank):
    if rank == 0:
        print(f"cjepa.py: stopped by {signal.Signals(signum).name} {where}; the same command "
              f"continues it from {os.path.join(args.out, 'checkpoint.pt')}", file=sys.stderr)


def train(run, batches, start, last_epoch, progress, args, rank, device):
    """Epochs start + 1 to last_epoch, each one trained, scored by the k-NN monitor, saved and
    logged. Returns the epochs done; STOP['signum'] says if a signal ended the run early."""
    monitor = knn_sets(args) if rank == 0 else None
    STOP["signum"], run["last_save"] = 0, time.time()
    previous = {signum: signal.signal(signum, on_stop_signal) for signum in STOP_SIGNALS}
    try:
        for epoch in range(start, last_epoch):
            if epoch > start or progress is None:  # an epoch that starts at its first step
                progress = dict(step=0, sums=0.0, pooled=[], seconds=0.0)
            line = train_epoch(run, batches, epoch, args, rank, device, progress)
            if line is None:  # a stop signal: saved mid-epoch
                return epoch
            if monitor:
                t0 = time.time()
                line["knn"] = knn_monitor(run["target_encoder"], monitor, args, device,
                                          run["autocast"])
                line["knn_seconds"] = round(time.time() - t0, 1)
            run["log"].append(line)
            if rank == 0:
                save_checkpoint(run, args, epoch + 1)
                tqdm.write(" ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                                    for k, v in line.items()))
            run["last_save"] = time.time()
        if STOP["signum"]:  # it came after the last step: the epoch's checkpoint is saved
            say_stopped(STOP["signum"], f"after epoch {last_epoch}", args, rank)
        return last_epoch
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def pretrain(args, rank, world, device, autocast):
    """A whole run: its data and models (or a checkpoint's), the epochs, curves.png, the probe."""
    train_set = make_dataset(args, "train", augment=True)
    if len(train_set) < args.batch_size * world:
        raise CliError(f"{len(train_set)} training images are fewer than one global batch "
                       f"({args.batch_size} x {world} processes): lower --batch-size")
    continued = checkpoint_to_continue(args)
    if args.data is not None and has_val(args):
        make_dataset(args, "val", augment=False)  # a val/ class that train/ lacks: said now
    batches = EpochBatches(train_set, args, rank, world)
    run = build_run(args, device, autocast)
    if args.compile:
        compile_blocks(run)
    start, step, progress = resume(run, continued, args) if continued else (0, 0, None)
    # A folder with no readable image fails here, in one line, not inside a loader worker. (After
    # the weights' init, so that the random crop it draws does not change the initial weights.)
    train_set[0]
    if world > 1:
        wrap_ddp(run, device)
    last_epoch = min(args.epochs, args.stop_after or args.epochs)  # --stop-after: stop early
    if start >= last_epoch:  # a finished run, or --stop-after reached
        if rank == 0:
            say_nothing_to_train(args, start)
        return run
    if rank == 0:
        make_run_folder(args, new_run=not continued)
        n_params = sum(p.numel() for p in unwrap(run["encoder"]).parameters()) / 1e6
        if continued and not args.resume:
            print(f"{args.out} holds this run: continuing it after epoch {start}, step {step}")
        print(f"C-JEPA {args.arch} ({n_params:.1f}M params), {len(train_set)} images, {world} "
              f"process(es) on {device}, {args.precision}, epochs {start + 1}-{last_epoch} of "
              f"{args.epochs}, run folder {args.out}")
    epoch = train(run, batches, start, last_epoch, progress, args, rank, device)
    if dist.is_initialized():  # the probe runs on rank 0 alone: the other ranks may exit
        dist.destroy_process_group()
    if rank == 0 and not STOP["signum"] and epoch > start:
        import visualize  # curves.png: the loss, the collapse monitors and the k-NN monitor
        visualize.plot_curves(args.out)
        if epoch == args.epochs and args.probe_epochs > 0:
            run_probe(run["target_encoder"], args, device, autocast)
    return run


def say_nothing_to_train(args, start):
    """A run that has nothing to train says why; a finished one shows its probe table."""
    if start < args.epochs:
        print(f"nothing to train: the checkpoint has {start} of {args.epochs} epochs; "
              f"--stop-after is {args.stop_after}")
        return
    print(f"nothing to train: the checkpoint has {start} of {args.epochs} epochs; the run is "
          "finished (--resume with a larger --epochs continues it)")
    probe = os.path.join(args.out, "probe.json")
    if os.path.exists(probe):
        with open(probe) as f:
            print_probe_table(json.load(f), f"its linear probe ({probe}):")


def checkpoint_to_continue(args):
    """The checkpoint that a run continues: --resume's, else its run folder's own, so that the
    same command continues a stopped run (a requeued job, a torchrun restart); None for a new
    run. Without --overwrite, a run never writes over another run's checkpoint."""
    own = os.path.join(args.out, "checkpoint.pt")
    if not os.path.exists(own) or args.overwrite:
        return args.resume
    if args.resume and os.path.abspath(args.resume) != os.path.abspath(own):
        raise CliError(f"{args.out} holds a run already: continue it with the same command "
                       "(without --resume), give another --out, or replace it with --overwrite")
    return own


def make_run_folder(args, new_run):
    """The run folder, writable; a new run (--overwrite) removes an old run's outputs."""
    try:
        os.makedirs(args.out, exist_ok=True)
    except OSError as e:
        raise CliError(f"cannot make the run folder --out {args.out}: {e.strerror or e}") from None
    if not os.access(args.out, os.W_OK):
        raise CliError(f"the run folder --out {args.out} is not writable")
    for name in ("log.jsonl", "curves.png", "probe.json") if new_run else ():
        if os.path.exists(os.path.join(args.out, name)):
            os.remove(os.path.join(args.out, name))


# =============================================================================================
# 10. Linear probe
# =============================================================================================
def probe_features(encoder, images, n_blocks):
    """-> [B, n_blocks * D]: the mean patch token of each of the last n_blocks blocks (after the
    final norm), concatenated. There is no class token to probe."""
    x = encoder.embed(images)
    means = []
    for i, block in enumerate(encoder.blocks):
        x = block(x)
        if i >= len(encoder.blocks) - n_blocks:
            means.append(encoder.norm(x).mean(dim=1))
    return torch.cat(means, dim=1)


@torch.no_grad()
def extract_features(fn, dataset, device, autocast, workers):
    """fn: images -> features, over a dataset, kept in host memory (not on the GPU beside the
    training models: ViT-H/14 with 4 probe blocks makes 26 GB of them on ImageNet)."""
    loader = torch.utils.data.DataLoader(dataset, batch_size=256, num_workers=workers)
    feats, labels = [], []
    for images, y in tqdm(loader, desc="probe features", leave=False, dynamic_ncols=True):
        with autocast:
            feats.append(fn(images.to(device, non_blocking=True)).float().cpu())
        labels.append(y)
    return torch.cat(feats), torch.cat(labels)


def train_linear_head(train, val, epochs, device, seed=0):
    """BatchNorm (no affine) + Linear, trained on cached features; returns top-1 on val, in %.
    Training on cached features takes seconds: the backbone never runs again."""
    (x, y), (x_val, y_val) = train, val
    torch.manual_seed(seed)
    n_classes = int(max(y.max(), y_val.max())) + 1
    head = nn.Sequential(nn.BatchNorm1d(x.shape[1], affine=False), nn.Linear(x.shape[1], n_classes))
    head = head.to(device)
    nn.init.normal_(head[1].weight, std=0.01)
    nn.init.zeros_(head[1].bias)
    opt = torch.optim.AdamW(head.parameters(), lr=1e-2, weight_decay=0.05)
    batch = max(256, len(x) // 200)  # 256 for small sets; ImageNet: about 200 steps an epoch
    lr_decay = torch.optim.lr_scheduler.CosineAnnealingLR(opt, epochs * math.ceil(len(x) / batch))
    for _ in range(epochs):
        for idx in torch.randperm(len(x)).split(batch):
            loss = F.cross_entropy(head(x[idx].to(device)), y[idx].to(device))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            lr_decay.step()
    head.eval()
    correct = 0
    with torch.no_grad():  # in batches: the val features stay in host memory too
        for idx in torch.arange(len(x_val)).split(4096):
            predicted = head(x_val[idx].to(device)).argmax(dim=1).cpu()
            correct += (predicted == y_val[idx]).sum().item()
    return 100 * correct / len(x_val)


def print_probe_table(results, title=None):
    if title:
        print(title)
    print(f"| {'features':<22} | top-1  |\n| {'-' * 22} | ------ |")
    for name, acc in results.items():
        print(f"| {name:<22} | {acc:5.2f}% |")


def has_val(args):
    """Is there a val/ split to probe on? (The demo set has its test split.)"""
    return args.data is None or os.path.isdir(os.path.join(args.data, "val"))


def knn_accuracy(train, val, k=20, temperature=0.07):
    """Top-1 (%) of a k-nearest-neighbour classifier, as DINO's eval_knn: cosine similarity, and
    each of the k nearest train features votes for its class with weight exp(similarity / T)."""
    (x, y), (x_val, y_val) = train, val
    x, x_val = F.normalize(x, dim=1), F.normalize(x_val, dim=1)
    n_classes = int(max(y.max(), y_val.max())) + 1
    correct = 0
    for idx in torch.arange(len(x_val)).split(1024):
        similarity, nearest = (x_val[idx] @ x.T).topk(min(k, len(x)), dim=1)  # [n, k] each
        votes = torch.zeros(len(idx), n_classes)
        votes.scatter_add_(1, y[nearest], (similarity / temperature).exp())
        correct += (votes.argmax(dim=1) == y_val[idx]).sum().item()
    return 100 * correct / len(x_val)


def knn_sets(args):
    """The k-NN monitor's images: a fixed random --knn-images of train and of val, not augmented
    (None without val/, or with --knn-images 0)."""
    if not args.knn_images or not has_val(args):
        return None
    return [random_part(make_dataset(args, split, augment=False), args.knn_images, args.seed,
                        split) for split in ("train", "val")]


def knn_monitor(target_encoder, sets, args, device, autocast):
    """A cheap quality monitor during pretraining: k-NN top-1 (%) on the target encoder's probe
    features of the monitor's images. Rank 0 runs it alone; the others wait for it at the next
    step's collectives."""
    target_encoder.eval()

    def features(images):
        return probe_features(target_encoder, images, args.probe_blocks)

    train = extract_features(features, sets[0], device, autocast, args.workers)
    val = extract_features(features, sets[1], device, autocast, args.workers)
    return round(knn_accuracy(train, val), 2)


def run_probe(target_encoder, args, device, autocast, probe_only=False):
    """Linear probe of the frozen target encoder, beside the same probe on a random-init encoder
    and on the raw pixels (where they fit in 1 GB). Writes the table to probe.json and the
    checkpoint, or with --probe-only to probe_<data>.json (the run's own probe stays)."""
    if not has_val(args):
        if probe_only:  # the probe is the whole job
            raise CliError(f"--data {args.data} has no val/ folder to probe on")
        print(f"no {os.path.join(args.data, 'val')} folder: skipping the linear probe")
        return None
    t0 = time.time()
    train_set = make_dataset(args, "train", augment=False)
    val_set = make_dataset(args, "val", augment=False)
    n = args.probe_blocks
    target_encoder.eval()
    torch.manual_seed(args.seed)
    random_encoder = make_encoder(args).to(device).eval()
    rows = {"cjepa_target_encoder": lambda images: probe_features(target_encoder, images, n),
            "random_init_encoder": lambda images: probe_features(random_encoder, images, n)}
    channels = 1 if args.data is None else 3  # the demo's images are grey
    if len(train_set) * channels * args.img_size ** 2 * 4 <= 2**30:
        rows["raw_pixels"] = lambda images: images[:, :channels].flatten(1)
    results, head_seconds = {}, 0.0
    for name, fn in rows.items():
        train = extract_features(fn, train_set, device, autocast, args.workers)
        val = extract_features(fn, val_set, device, autocast, args.workers)
        t1 = time.time()
        results[name] = round(train_linear_head(train, val, args.probe_epochs, device), 2)
        head_seconds += time.time() - t1
    print(f"\nlinear probe, top-1 on {len(val_set)} val images ({args.probe_epochs} epochs on "
          f"{len(train_set)} cached train features; {time.time() - t0:.0f} s, of which "
          f"{head_seconds:.1f} s training the heads):")
    print_probe_table(results)
    data_name = "demo" if args.data is None else os.path.basename(os.path.abspath(args.data))
    path = os.path.join(args.out, f"probe_{data_name}.json" if probe_only else "probe.json")
    try:
        with open(path, "w") as f:
            json.dump(results, f, indent=1)
        if not probe_only:
            ckpt_path = os.path.join(args.out, "checkpoint.pt")
            atomic_save(read_checkpoint(ckpt_path) | {"probe": results}, ckpt_path)
        print(f"written to {path}")
    except OSError as e:  # e.g. --probe-only in a read-only folder: the table above is the result
        print(f"warning: could not save the probe result: {e}", file=sys.stderr)
    return results


# =============================================================================================
# 11. Benchmark
# =============================================================================================
# For MFU: the dense bf16 / fp16 tensor-core peaks of the SXM parts of common data-centre GPUs,
# from NVIDIA's data sheets (H100 PCIe, H100 NVL and H200 NVL have lower peaks: their MFU reads
# low here).
GPU_PEAKS = {"H100": 989e12, "H200": 989e12, "B200": 2250e12, "A100": 312e12}


def gpu_peak(name, precision):
    """The peak FLOP/s of a GPU of this name in this precision, or None where it is not known."""
    if precision == "fp32":  # (the peaks above are half-precision tensor-core ones)
        return None
    return next((peak for gpu, peak in GPU_PEAKS.items() if gpu in name), None)


def timed_steps(run, images, masks, args, device, desc):
    """Seconds per train_step over these masks, and the peak GPU memory in MiB (0 on a CPU)."""
    cuda, seconds, memory = device.type == "cuda", 0.0, 0.0
    for ctx_idx, tgt_idx in tqdm(masks, desc=desc, leave=False, dynamic_ncols=True):
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        ctx_idx, tgt_idx = ctx_idx.to(device), tgt_idx.to(device)
        train_step(run, images, ctx_idx, tgt_idx, args.lr, args.wd[0], args.ema[0], args)
        if cuda:
            torch.cuda.synchronize()
            memory = max(memory, torch.cuda.max_memory_allocated() / 2**20)
        seconds += time.perf_counter() - t0
    return seconds / len(masks), memory


def count_flops(run, images, masks, args, device):
    """The FLOPs of training steps, in all and in the predictor. torch's FLOP counter knows the
    GPU's fused attention kernels but not the CPU's (it would count them as zero): on a CPU,
    count the plain attention, which does the same matrix products."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode
    plain = sdpa_kernel(SDPBackend.MATH) if device.type == "cpu" else nullcontext()
    with FlopCounterMode(display=False) as counter, plain:
        timed_steps(run, images, masks, args, device, "counting FLOPs")
    predictor = sum(counter.get_flop_counts().get("Predictor", {}).values())
    return counter.get_total_flops(), predictor


def benchmark(args, device, autocast):
    """Training steps on random images with the recipe's masks: images/s, ms/step, peak memory,
    FLOPs and, on a GPU of GPU_PEAKS, MFU; then, with --data, the data pipeline's images/s."""
    cuda, grid, B = device.type == "cuda", args.img_size // args.patch_size, args.batch_size
    steps = 20 if cuda else 3
    name = torch.cuda.get_device_name(device) if cuda else f"CPU, {torch.get_num_threads()} threads"
    blocks = "compiled" if args.compile else "eager"
    print(f"benchmark: {args.arch}, {args.img_size} px, batch {B}, predictor {args.pred_width} x "
          f"{args.pred_depth}, {args.precision}, {blocks} blocks, {name}: one step to count the "
          f"FLOPs{', one to compile' if args.compile else ''}, then {steps} timed", flush=True)
    gen = torch.Generator().manual_seed(args.seed)
    t0 = time.perf_counter()
    masks = [sample_masks(B, grid, grid, gen, **mask_config(args)) for _ in range(10)]
    mask_ms = 1000 * (time.perf_counter() - t0) / len(masks)  # a loader worker's, per batch
    # Every step trains on the same images and masks: the FLOPs counted are the FLOPs timed.
    images, masks = torch.randn(B, 3, args.img_size, args.img_size, device=device), masks[:1]
    torch.manual_seed(args.seed)
    run = build_run(args, device, autocast)
    flops, predictor_flops = count_flops(run, images, masks, args, device)  # an eager step
    if args.compile:
        compile_blocks(run)
        compile_seconds, _ = timed_steps(run, images, masks, args, device, "compiling")
    seconds, memory = timed_steps(run, images, masks * steps, args, device, "timed steps")
    if not cuda:
        import resource  # the whole process's peak resident memory
        memory = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    peak = gpu_peak(name, args.precision) if cuda else None
    mfu = f"{100 * flops / seconds / peak:4.1f}%" if peak else "  -  "
    print(f"| blocks   | images/s | ms/step | peak memory MiB | GFLOP/image | MFU   |\n"
          f"|----------|----------|---------|-----------------|-------------|-------|\n"
          f"| {blocks:<8} | {B / seconds:8.1f} | {1000 * seconds:7.1f} | {memory:15.0f} "
          f"| {flops / B / 1e9:11.2f} | {mfu} |")
    mfu_note = f"of the {args.precision} SXM peak, {peak / 1e12:.0f} TFLOP/s" if peak else (
        "none: it needs bf16 or fp16 on a GPU of GPU_PEAKS")
    print(f"MFU: {mfu_note}; the predictor does "
          f"{100 * predictor_flops / flops:.0f}% of the FLOPs; sampling a batch's masks takes "
          f"{mask_ms:.1f} ms")
    if args.compile:
        print(f"the compiling step took {compile_seconds:.0f} s")
    if args.data:
        benchmark_data(args)
    return B / seconds


def benchmark_data(args):
    """Images/s of the data pipeline alone (decoding and RandomResizedCrop on --workers workers)
    over up to 20 batches of 32 after the first: how many workers one GPU needs."""
    loader = torch.utils.data.DataLoader(make_dataset(args, "train", augment=True), 32,
                                         shuffle=True, num_workers=args.workers)
    batches = iter(loader)
    next(batches, None)  # worker start-up is not counted
    n, t0 = 0, time.perf_counter()
    for _, (images, _) in zip(range(20), batches):
        n += len(images)
    print(f"data pipeline ({args.data}, {args.img_size} px, {args.workers} workers): "
          f"{n / (time.perf_counter() - t0):.0f} images/s over {n} images")


# =============================================================================================
# 12. Command line
# =============================================================================================
def parse_args(argv=None):
    """--data and --recipe, a flag for each recipe setting (its help, and its default in each
    recipe), then the other flags. The recipe's defaults are filled in by with_defaults."""
    p = argparse.ArgumentParser(description="C-JEPA pretraining; with no --data, the built-in "
                                "demo. A setting's defaults: (demo | --data | --recipe small).")
    p.add_argument("--data", help="an ImageFolder tree: train/<class>/* (and val/<class>/* for "
                   "the probe and the k-NN monitor)")
    p.add_argument("--recipe", choices=("small",), help="the demo's settings for your own small "
                   "images, minutes on a CPU")
    for name, (value, text) in SETTINGS.items():
        kind = dict(type=float, nargs=2) if isinstance(value, tuple) else dict(type=type(value))
        defaults = " | ".join(show_default(recipe[name]) for recipe in (DEMO, PRETRAIN, SMALL))
        p.add_argument("--" + name.replace("_", "-"), help=f"{text} ({defaults})",
                       choices=ARCHS if name == "arch" else None, **kind)
    p.add_argument("--patch-size", type=int, help="override the architecture's patch size")
    p.add_argument("--resume", metavar="CKPT", help="continue a run from its checkpoint")
    p.add_argument("--overwrite", action="store_true", help="start a new run in a used --out")
    p.add_argument("--stop-after", type=int, metavar="EPOCH", help="stop after this epoch")
    p.add_argument("--probe-only", metavar="CKPT", help="only probe a checkpoint: ours, or an "
                   "official I-JEPA one (then give --arch, --img-size and --data)")
    p.add_argument("--device", help="cuda, cuda:N or cpu (default: cuda if there is one)")
    p.add_argument("--precision", choices=("bf16", "fp16", "fp32"), help="default: bf16 on "
                   "CUDA (fp16 on GPUs without bf16), fp32 on a CPU; bf16 runs on a CPU too")
    p.add_argument("--seed", type=int, default=0, help="(default 0)")
    p.add_argument("--subset", type=int, metavar="N", help="a fixed random N images of each split")
    p.add_argument("--dist-timeout", type=float, default=10.0, metavar="MINUTES", help="how "
                   "long a rank waits for the others: a dead peer, rank 0's saves (default 10)")
    p.add_argument("--compile", action="store_true", help="torch.compile every transformer block")
    p.add_argument("--benchmark", action="store_true", help="time training steps on random "
                   "images: the --data recipe, at batch 32 where there is no CUDA (minutes for "
                   "ViT-B/16 on a CPU)")
    args = p.parse_args(argv)
    if args.probe_only:  # the defaults come once the checkpoint is read
        return args
    return with_defaults(args)


def show_default(value):
    if isinstance(value, tuple):
        return " ".join(str(v) for v in value)
    return "first image" if value is None else str(value)  # (None: SMALL's image size)


def with_defaults(args):
    """Fill every setting not given from a recipe: --recipe small, else DEMO without --data (and
    without --benchmark), else PRETRAIN (for --benchmark without CUDA, at batch 32). A recipe's
    min_keep that cannot fit the patch grid is lowered to the largest that fits, and said once."""
    if args.recipe == "small":
        recipe = SMALL
    elif args.benchmark and not torch.cuda.is_available():
        recipe = PRETRAIN | dict(batch_size=32)  # a CPU: minutes, not hours
    elif args.data is None and not args.benchmark:
        recipe = DEMO
    else:
        recipe = PRETRAIN
    given = {key for key in recipe if getattr(args, key) is not None}
    for key, value in recipe.items():
        if key not in given:
            setattr(args, key, value)
    if args.img_size is None:  # --recipe small
        args.img_size = first_image_size(args.data) if args.data else 28
    args.patch_size = args.patch_size or ARCHS[args.arch][3]
    if "img_size" not in given:  # a whole number of patches
        args.img_size -= args.img_size % args.patch_size
    grid = args.img_size // args.patch_size
    if "min_keep" not in given and not args.probe_only and grid >= 2:
        fitting = args.min_keep
        while fitting > 1 and not masks_fit(grid, grid, args.target_scale, fitting):
            fitting -= 1
        if fitting != args.min_keep and int(os.environ.get("RANK", 0)) == 0:
            print(f"note: min_keep {args.min_keep} cannot fit a {grid}x{grid} patch grid: using "
                  f"{fitting} (--min-keep sets it)", file=sys.stderr)
        args.min_keep = fitting
    return args


def first_image_size(data):
    """The shorter side of the first readable image in data/train, for --recipe small."""
    try:
        return min(SafeImageFolder(os.path.join(data, "train"), loader=load_rgb)[0][0].size)
    except (OSError, CliError):  # make_dataset will say what is wrong with the folder
        return 28


def target_areas(H, W, target_scale, target_aspect=TARGET_ASPECT):
    """The smallest and largest area (in patches) a target block can have."""
    aspects = torch.linspace(target_aspect[0], target_aspect[1], 101).tolist()
    areas = [math.prod(block_shape(s, a, H, W)) for s in target_scale for a in aspects]
    return min(areas), max(areas)


def masks_fit(H, W, target_scale, min_keep):
    """Does every target block have >= min_keep patches, and does the context keep >= min_keep
    patches at least when the targets overlap? Then sample_masks always succeeds. (The number
    of targets and the context's scale can't break that: blocks may overlap, and the context
    falls back to every patch outside the targets.)"""
    smallest, largest = target_areas(H, W, target_scale)
    return smallest >= min_keep and H * W - largest >= min_keep


def check_masks_fit(H, W, target_scale, min_keep):
    if H < 2 or W < 2:
        raise CliError(f"a {H}x{W} patch grid is too small for masking: use a larger --img-size "
                       "or a smaller --patch-size")
    if not masks_fit(H, W, target_scale, min_keep):
        smallest, largest = target_areas(H, W, target_scale)
        raise CliError(f"the masks do not fit a {H}x{W} patch grid: target blocks of "
                       f"{smallest}-{largest} patches with --min-keep {min_keep}; lower "
                       "--min-keep or change --target-scale")


def check_args(args):
    """One-line errors for settings that cannot work, before anything runs."""
    if args.recipe == "small" and args.data is None and not args.benchmark:
        raise CliError("--recipe small is for your own images: give --data DIR (without "
                       "--data, python cjepa.py runs the demo)")
    if args.data is None and not args.benchmark and args.img_size != 28:
        raise CliError(f"the demo set's images are 28 x 28 px, not {args.img_size}: give --data "
                       "DIR for other image sizes (and to probe an official checkpoint)")
    width, depth, heads, _ = ARCHS[args.arch]
    least = dict(batch_size=2, epochs=1, pred_depth=1, n_targets=1, probe_blocks=1, workers=0,
                 save_every=0, probe_epochs=1 if args.probe_only else 0)  # (VICReg needs 2 images)
    for name, value in least.items():
        if getattr(args, name) < value:
            raise CliError(f"--{name.replace('_', '-')} must be at least {value}")
    if args.probe_blocks > depth:
        raise CliError(f"--probe-blocks {args.probe_blocks} is more than the depth {depth}")
    if args.pred_width % 4 or args.pred_width % heads:
        raise CliError(f"--pred-width {args.pred_width} must be a multiple of 4 and of the "
                       f"{heads} heads")
    if args.img_size % args.patch_size:
        raise CliError(f"--img-size {args.img_size} is not a multiple of the patch size "
                       f"{args.patch_size}")
    if not args.probe_only:
        grid = args.img_size // args.patch_size
        check_masks_fit(grid, grid, args.target_scale, args.min_keep)


def main(argv=None):
    args = parse_args(argv)
    try:
        if args.probe_only:
            # the architecture, and by default the data and features, come from the checkpoint
            # (an official I-JEPA one: --arch and --img-size say what it is, --data what to probe)
            encoder, _, saved = load_encoders(args.probe_only, args.arch, args.img_size or 224)
            args.arch, args.img_size, args.patch_size = saved.arch, saved.img_size, saved.patch_size
            args.data = args.data or getattr(saved, "data", None)
            args.recipe = args.recipe or getattr(saved, "recipe", None)
            args.probe_blocks = args.probe_blocks or getattr(saved, "probe_blocks", None)
            with_defaults(args)
        check_args(args)
        rank, world, device, autocast = setup(args)
        # the same initial weights on every rank (the target encoder is not broadcast)
        torch.manual_seed(args.seed)
        if args.benchmark:
            return benchmark(args, device, autocast)
        if args.probe_only:
            args.out = os.path.dirname(os.path.abspath(args.probe_only))
            return run_probe(encoder.to(device), args, device, autocast, probe_only=True)
        run = pretrain(args, rank, world, device, autocast)
        if STOP["signum"]:  # non-zero, so that a scheduler requeues the job
            sys.exit(128 + STOP["signum"])
        return run
    except CliError as e:
        print(f"cjepa.py: error: {e}", file=sys.stderr)
        sys.exit(2)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    main()
