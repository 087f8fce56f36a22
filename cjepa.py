"""
cjepa.py: C-JEPA (Mo and Tong, NeurIPS 2024) in one readable file.

C-JEPA is I-JEPA plus VICReg. A context encoder sees one block of an image, not the rest; a narrow
predictor, told only *where* the hidden target blocks are, predicts what an EMA "target encoder"
says about them. VICReg's variance and covariance terms keep the features from collapsing, and
its invariance term makes the predictions right on average.

The demo, `python cjepa.py`, on 2 CPU cores, no GPU, no download: 6 epochs on 10,000
Fashion-MNIST images, then a linear probe of the target encoder on 2,000 test images, in about 3
minutes on a Zen 4 AMD EPYC (README.md: other CPUs). Linear probe, top-1, mean of seeds 0, 1, 2:

    C-JEPA (this file)                          79.0%
    plain I-JEPA (--vicreg 0)                   63.3%
    the same encoder, randomly initialised      66.7%
    raw pixels                                  84.55%  (ahead at 6 epochs, and at 50: README)

Pretraining: `python cjepa.py --data /imagenet --arch vit_b16`, or with torchrun on GPUs.
Read it from the top: the settings, the method (sections 1-5), then the machinery that runs it.
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

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torchvision import datasets, transforms as T
from tqdm import tqdm

# The settings ==================================================================================
# Each is a flag (--batch-size sets batch_size). With --data: the published C-JEPA ViT-B/16
# settings (I-JEPA's, with C-JEPA's schedule, epochs and beta_vicreg); ours: tries, clip onward.
PRETRAIN = dict(
    arch="vit_b16",  # the encoder: a preset of ARCHS (section 1)
    patch_size=None,  # None: the preset's patch size
    img_size=224,  # images are resized and cropped to this size
    crop_scale=(0.3, 1.0),  # RandomResizedCrop's share of the image: I-JEPA's only augmentation
    epochs=600,  # pretraining epochs
    batch_size=128,  # images per process and step (128 x 16 GPUs = 2048 in the paper)
    lr=1e-3,  # peak learning rate, reached after the warm-up
    start_lr=1e-4,  # learning rate at the start of the warm-up
    final_lr=1e-6,  # learning rate at the end of the cosine decay
    warmup=15.0,  # epochs of linear learning-rate warm-up
    wd=(0.04, 0.4),  # weight decay: rises along a cosine from the first value to the second
    ema=(0.996, 1.0),  # the target encoder's EMA momentum: rises linearly over the run
    vicreg=0.001,  # beta_vicreg, the weight of all of VICReg; 0 gives plain I-JEPA's loss
    beta_sim=25.0,  # VICReg's invariance weight
    beta_std=25.0,  # VICReg's variance weight
    beta_cov=1.0,  # VICReg's covariance weight
    pred_width=384,  # the predictor's width: a narrow ViT
    pred_depth=6,  # the predictor's depth (12 for ViT-H in the paper)
    n_targets=4,  # M, the target blocks per image
    target_scale=(0.15, 0.2),  # a target block's share of the image
    target_aspect=(0.75, 1.5),  # a target block's height / width
    context_scale=(0.85, 1.0),  # the context block's share, before the targets are removed
    min_keep=10,  # the fewest patches a mask may have
    tries=20,  # placements tried per image before the sampler's fallback (section 2)
    clip=0.0,  # gradient-norm clipping; 0 is off (the paper clips nothing)
    seed=0,  # of the initial weights, the data order, the crops and the masks
    probe_blocks=1,  # the probe's features: the mean patch token of the last N blocks
    probe_epochs=20,  # epochs of the linear probe's head; 0 skips the probe
    knn_images=5000,  # the per-epoch k-NN monitor's images from train and from val; 0 is off
    workers=min(8, os.cpu_count() or 1),  # data-loading workers of each training process
    out="runs/pretrain",  # the run folder: checkpoint.pt, log.jsonl, probe.json
    save_every=30.0,  # minutes between checkpoints within an epoch, which can take hours
)

# With no --data: the demo, Fashion-MNIST at 28 px (a 7 x 7 patch grid) on a CPU in minutes.
DEMO = PRETRAIN | dict(
    arch="vit_demo",  # width 128, depth 4, patch 4: 0.8M parameters
    img_size=28,  # the demo set's images
    epochs=6,  # 936 steps: 3 to 7 minutes on 2 CPU cores (README), the probe included
    batch_size=64,  # 156 steps an epoch on the 10,000 images
    warmup=0.3,  # epochs: 47 steps, 5% of the run
    wd=(0.04, 0.04),  # held at the published start value
    ema=(0.99, 1.0),  # a short run: the target encoder must move faster
    vicreg=0.01,  # 0.001 (the paper's) to 0.05 all work here; 0.01 leads the k-NN monitor
    pred_width=64,  # half the encoder's width, as 384 is half of ViT-B's 768
    pred_depth=3,  # shallower than 6, as the encoder is 4 blocks deep, not 12
    min_keep=4,  # 10 cannot fit a 7 x 7 grid: a target block may have 6 patches
    clip=1.0,  # the paper clips nothing; every demo result in the README was measured with 1.0
    probe_blocks=4,  # the mean tokens of all 4 of vit_demo's blocks, side by side
    probe_epochs=30,  # the head trains on cached features: 30 epochs take seconds
    knn_images=1000,  # the whole demo set would cost half as much time as the training
    workers=0,  # the demo set is in memory: workers would only add start-up time
    out="runs/demo",  # the demo's run folder
    save_every=0.0,  # an epoch takes seconds: a checkpoint after each is enough
)

# --recipe small: the demo's settings for your own small images (--data DIR).
SMALL = DEMO | dict(
    img_size=None,  # None: the shorter side of the first training image
    workers=min(4, os.cpu_count() or 1),  # decoding image files: loader workers pay off here
    out="runs/small",  # its run folder
)

# What each of these settings must be; check_args turns any other value into a one-line error.
LIMITS = [
    ("> 0", lambda v: v > 0, "img_size patch_size epochs lr pred_width pred_depth"),
    (">= 0", lambda v: v >= 0, "start_lr final_lr warmup vicreg beta_sim beta_std beta_cov clip "
                               "probe_epochs knn_images workers save_every"),
    (">= 1", lambda v: v >= 1, "n_targets min_keep tries probe_blocks"),
    (">= 0", lambda v: min(v) >= 0, "wd"),
    ("in [0, 1], the lower first", lambda v: 0 <= v[0] <= v[1] <= 1, "ema"),
    ("in (0, 1], the lower first", lambda v: 0 < v[0] <= v[1] <= 1,
     "crop_scale target_scale context_scale"),
    ("> 0, the lower first", lambda v: 0 < v[0] <= v[1], "target_aspect"),
]


# 1. Vision Transformer ========================================================================
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
        # softmax(q k^T / sqrt(d)) v. PyTorch picks the kernel: its flash and memory-efficient
        # ones never store the N x N weights; its math one (the benchmark's FLOP count) does.
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

    def forward(self, x, only_last=None):  # only_last: as in Attention (see Predictor)
        attended = self.attn(self.norm1(x), only_last)
        if only_last is not None:
            x = x[:, -only_last:]  # the residual stream of those tokens
        x = x + attended
        return x + self.mlp(self.norm2(x))


def init_weights(m):
    """Truncated-normal weights (std 0.02), zero biases, LayerNorms at 1 and 0: the official
    training's init (its models' rescaling of deeper blocks is undone by its init_model)."""
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
        self.register_buffer("pos_embed", sincos_pos_embed(width, self.grid)[None])  # not learned
        self.blocks = nn.ModuleList(Block(width, heads) for _ in range(depth))
        self.norm = nn.LayerNorm(width, eps=1e-6)
        self.apply(init_weights)

    def embed(self, images, keep=None):
        """images [B, 3, H, W], keep [B, K] patch indices -> tokens [B, K, D] (all N if no keep).
        The positions are added first, so the kept tokens know where they are."""
        x = self.patch_embed(images).flatten(2).transpose(1, 2) + self.pos_embed  # [B, N, D]
        return x if keep is None else gather_tokens(x, keep)

    def forward(self, images, keep=None):
        x = self.embed(images, keep)
        for block in self.blocks:
            x = block(x)
        return self.norm(x)


def make_encoder(args):
    width, depth, heads, _ = ARCHS[args.arch]
    return VisionTransformer(args.img_size, args.patch_size, width, depth, heads)


# 2. Multi-block masks =========================================================================
# I-JEPA hides M target blocks (each 15-20% of the image) and shows the context encoder one large
# block with every target patch removed, so the targets can't be copied: they must be predicted
# from their surroundings. Context and targets come from one view of the image: the masks are
# the method's only "augmentation" (the data adds I-JEPA's random resized crop; the demo, flips).
# One block size per batch, and each context cut to the batch's shortest: each mask is a tensor.
# The context block asks for 85-100% of the image, but no block spans the grid (the official
# sampler clips it too): on the demo's 7 x 7 grid it is always 6 x 6. With the targets removed
# and the cut to the shortest, the contexts are small: in the demo they average about 8 of 49
# patches; at 224 px with patch 16, about 48 of 196.
def block_shape(scale, aspect, H, W):
    """(h, w) of a block of area scale * H*W and h/w = aspect, clipped to 1..H-1 and 1..W-1."""
    h = round(math.sqrt(scale * H * W * aspect))
    w = round(math.sqrt(scale * H * W / aspect))
    return min(max(h, 1), H - 1), min(max(w, 1), W - 1)


def draw_block_shape(scale, aspect, H, W, gen):
    """A random (h, w), its scale and aspect ratio drawn independently, uniform in their ranges
    (the official code uses one random number for both, which ties a block's size to its shape)."""
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


def random_subset(mask, gen):
    """mask [B, N] bool -> [B, K] indices, K = the smallest count in the batch: a random K of each
    row's patches, in raster order (the official code keeps the first K: the topmost ones)."""
    k = int(mask.sum(dim=1).min())
    # Members get a random score, the others 2: sorting puts the members first, in random order
    score = torch.rand(mask.shape, generator=gen)
    score[~mask] = 2.0
    return score.argsort(dim=1)[:, :k].sort(dim=1).values


def sample_masks(B, H, W, gen, cfg):
    """The multi-block masks of B images on an H x W patch grid, vectorised -> context indices
    [B, Kc], target indices [M, B, Kt]. Never hangs: cfg.tries placements, then a fallback."""
    N, rows, M = H * W, torch.arange(B), cfg.n_targets
    th, tw = draw_block_shape(cfg.target_scale, cfg.target_aspect, H, W, gen)
    ch, cw = draw_block_shape(cfg.context_scale, (1.0, 1.0), H, W, gen)

    # Target blocks: per image, the first try whose M blocks together leave >= min_keep patches
    # free (argmax finds the first True; 0 where there is none).
    targets = place_blocks(B * cfg.tries * M, th, tw, H, W, gen).view(B, cfg.tries, M, N)
    free = ~targets.any(dim=2)  # [B, tries, N]: the patches in no target block
    ok = free.sum(dim=2) >= cfg.min_keep
    targets = targets[rows, ok.int().argmax(dim=1)]  # [B, M, N]: each image's chosen try
    stuck = ~ok.any(dim=1)
    # Fallback: all M blocks on the first one's spot (check_masks_fit makes sure that fits).
    targets[stuck] = targets[stuck, :1]
    free = ~targets.any(dim=1)  # [B, N]

    # Context block: per image, the first try that keeps >= min_keep patches outside the targets.
    context = place_blocks(B * cfg.tries, ch, cw, H, W, gen).view(B, cfg.tries, N)
    context = context & free[:, None]  # every target patch removed
    ok = context.sum(dim=2) >= cfg.min_keep
    context = context[rows, ok.int().argmax(dim=1)]  # [B, N]
    stuck = ~ok.any(dim=1)
    context[stuck] = free[stuck]  # fallback: every patch outside the targets

    # One length per batch, so that each mask is a tensor: keep a random subset of each context.
    ctx_idx = random_subset(context, gen)  # [B, Kc]
    per_block = targets.transpose(0, 1).reshape(M * B, N)  # row m*B + b: block m, image b
    tgt_idx = random_subset(per_block, gen).view(M, B, -1)  # [M, B, Kt]
    return ctx_idx, tgt_idx


# 3. Predictor =================================================================================
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
        """z [B, Kc, D] context tokens, ctx_idx [B, Kc], tgt_idx [M, B, Kt] -> [M, B, Kt, D]."""
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


# 4. Targets and the loss ======================================================================
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
    with torch.autocast("cuda" if c.is_cuda else "cpu", enabled=False):  # c.T @ c in fp32, not bf16
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
    # VICReg, as we read the paper, with fp32 statistics. Variance and covariance of the mean
    # context feature of each image, over the global batch (under DDP, gather_batch: section 7):
    c = gather_batch(z.float().mean(dim=1))  # [B_global, D]: one mean feature per image
    l_std, l_cov = variance_covariance(c)  # scalars: against total and dimensional collapse
    # Invariance: the prediction must get the mean of each image's target patches right
    l_sim = F.mse_loss(p.float().mean(dim=(0, 2)), t.float().mean(dim=(0, 2)))
    l_vicreg = args.beta_sim * l_sim + args.beta_std * l_std + args.beta_cov * l_cov
    loss = l_ijepa + args.vicreg * l_vicreg  # args.vicreg is beta_vicreg
    terms = dict(loss=loss, ijepa=l_ijepa, sim=l_sim, std=l_std, cov=l_cov)
    return loss, {name: value.detach().float() for name, value in terms.items()}


# 5. One training step =========================================================================
def cosine(t, start, end):
    """From start (t = 0) to end (t = 1) along half a cosine."""
    t = min(max(t, 0.0), 1.0)
    return end + (start - end) * 0.5 * (1 + math.cos(math.pi * t))


def schedules(step, total, warmup_steps, args):
    """(learning rate, weight decay, EMA momentum) at this step of `total`: set every step."""
    if step < warmup_steps:
        lr = args.start_lr + (args.lr - args.start_lr) * step / warmup_steps
    else:
        t = (step - warmup_steps) / max(1, total - warmup_steps)
        lr = cosine(t, args.lr, args.final_lr)
    wd = cosine(step / total, args.wd[0], args.wd[1])  # rises from wd[0] to wd[1]
    m = args.ema[0] + (args.ema[1] - args.ema[0]) * step / total
    return lr, wd, m


def build_run(args, device, autocast):
    """What a run trains, as one dict: the encoders, the predictor, AdamW (no weight decay on the
    1-D parameters: biases and norms), the autocast and the GradScaler that fp16 needs."""
    width, _, heads, _ = ARCHS[args.arch]
    encoder = make_encoder(args).to(device)
    predictor = Predictor(encoder.grid, width, args.pred_width, args.pred_depth, heads).to(device)
    target_encoder = copy.deepcopy(encoder).requires_grad_(False)  # then only the EMA moves it
    params = list(encoder.parameters()) + list(predictor.parameters())
    weights = dict(params=[p for p in params if p.ndim >= 2], weight_decay=args.wd[0])
    others = dict(params=[p for p in params if p.ndim < 2], weight_decay=0.0)
    opt = torch.optim.AdamW([weights, others], lr=args.lr, fused=device.type == "cuda")
    scaler = torch.amp.GradScaler(device.type, enabled=args.precision == "fp16")
    return dict(encoder=encoder, predictor=predictor, target_encoder=target_encoder, opt=opt,
                scaler=scaler, autocast=autocast)


def train_step(run, images, ctx_idx, tgt_idx, lr, wd, m, args):
    """One C-JEPA step on images [B, 3, H, W], their masks, and this step's lr, weight decay and EMA
    momentum -> (loss terms, each image's mean target feature [B, D] for the collapse monitors)."""
    encoder, predictor, target_encoder = run["encoder"], run["predictor"], run["target_encoder"]
    opt, scaler = run["opt"], run["scaler"]
    with run["autocast"]:  # the forward in bf16 or fp16 where the run uses them
        # Step 1. Targets: the target encoder sees the whole image
        h = target_features(target_encoder, images)  # [B, N, D]
        t = gather_tokens(h, tgt_idx)  # [M, B, Kt, D]: the target blocks
        # Step 2. Context and prediction: the context encoder sees the context block only
        z = encoder(images, ctx_idx)  # [B, Kc, D]
        p = predictor(z, ctx_idx, tgt_idx)  # [M, B, Kt, D]
        # Step 3. Loss
        loss, terms = cjepa_loss(p, t, z, args)
    check_finite(loss)  # a NaN loss stops the run before it reaches the weights (section 7)
    # Step 4. Backward and AdamW step. In fp16 the GradScaler scales the loss up, lest small
    # gradients round to 0, and unscales them for clipping and the step (skipped on overflow).
    for group in opt.param_groups:
        group["lr"] = lr
    opt.param_groups[0]["weight_decay"] = wd  # the group of weights; biases and norms: 0
    scaler.scale(loss).backward()
    if args.clip > 0:
        scaler.unscale_(opt)
        nn.utils.clip_grad_norm_([p for g in opt.param_groups for p in g["params"]], args.clip)
    scaler.step(opt)
    scaler.update()
    opt.zero_grad(set_to_none=True)
    # Step 5. EMA: the target encoder moves towards the context encoder
    ema_update(target_encoder, encoder, m)  # (a DDP wrapper has the same parameters)
    return terms, h.mean(dim=1).float()

# That is all of C-JEPA. Below is what runs it (the data draws the masks, the loop the schedules).

# 6. Data ======================================================================================
class CliError(Exception):
    """An error the user can act on: main() prints it as one line and exits with code 2."""


IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
# 10k train + 2k test Fashion-MNIST images, 28 x 28, 10 classes (README, "Data and licences")
DEMO_DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data/fashion_mnist_12k.npz")
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


def load_image(path):
    from PIL import Image
    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except (OSError, ValueError, SyntaxError) as e:  # what PIL raises on corrupt files
        raise CliError(f"{path}: unreadable image ({e}); remove or replace it") from None


def make_dataset(args, split, augment):
    """augment: RandomResizedCrop (the demo set: flips), else a resize and a center crop."""
    if args.data is None:
        return DemoImages("train" if split == "train" else "test", augment)
    crop = ([T.RandomResizedCrop(args.img_size, scale=tuple(args.crop_scale))] if augment
            else [T.Resize(args.img_size * 256 // 224), T.CenterCrop(args.img_size)])
    normalize = [T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)]
    root = os.path.join(args.data, split)  # missing or empty: FileNotFoundError, one line in main
    dataset = datasets.ImageFolder(root, T.Compose(crop + normalize), loader=load_image)
    if dataset.classes != datasets.folder.find_classes(os.path.join(args.data, "train"))[0]:
        raise CliError(f"{dataset.root} must hold the classes of {args.data}/train, by name")
    return dataset


def has_val(args):  # for the probe and the k-NN monitor; the demo set has its test images
    return args.data is None or os.path.isdir(os.path.join(args.data, "val"))


def seed_of(*keys):
    """A 63-bit seed from a hash of the keys, e.g. (seed, epoch, rank, batch)."""
    digest = hashlib.sha256(repr(keys).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


class EpochBatches(torch.utils.data.Dataset):
    """Item b is batch b of an epoch on this rank: images, labels and masks, drawn by the loader (in
    its workers, if any: as the official collate function) from (seed, epoch, rank, b) alone."""

    def __init__(self, dataset, args, rank, world):
        self.dataset, self.args, self.rank, self.world = dataset, args, rank, world
        self.per_rank = len(dataset) // (args.batch_size * world)  # whole global batches only
        if self.per_rank == 0:
            raise CliError(f"{len(dataset)} images, fewer than one global batch: lower "
                           "--batch-size")

    def __len__(self):
        return self.per_rank

    def set_epoch(self, epoch):
        """One permutation per epoch, the same on every rank; rank r takes every world-th image."""
        self.epoch = epoch
        gen = torch.Generator().manual_seed(seed_of(self.args.seed, epoch))
        order = torch.randperm(len(self.dataset), generator=gen)
        used = order[:self.per_rank * self.args.batch_size * self.world]
        self.order = used[self.rank::self.world].view(self.per_rank, self.args.batch_size)

    def __getitem__(self, b):
        seed = seed_of(self.args.seed, self.epoch, self.rank, b)
        torch.manual_seed(seed)  # for the crops and flips (--workers 0: the training process's)
        images, labels = torch.utils.data.default_collate(
            [self.dataset[i] for i in self.order[b].tolist()])
        grid = self.args.img_size // self.args.patch_size
        gen = torch.Generator().manual_seed(seed)
        ctx_idx, tgt_idx = sample_masks(len(images), grid, grid, gen, self.args)
        return images, labels, ctx_idx, tgt_idx


# 7. Devices, DDP and AMP ======================================================================
def setup(args):
    """-> (rank, world size, device, autocast); under torchrun, the process group too."""
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise CliError(f"--device {args.device}: this machine has no CUDA; use --device cpu")
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", device.index or 0)))
        torch.cuda.set_device(device)  # torchrun: one GPU per process
    if not args.precision:  # fp32 on a CPU; bf16 on GPUs, but fp16 on those that emulate bf16
        native = device.type == "cuda" and torch.cuda.is_bf16_supported(including_emulation=False)
        args.precision = "fp32" if device.type == "cpu" else "bf16" if native else "fp16"
    if args.precision == "fp16" and device.type != "cuda":
        raise CliError("--precision fp16 needs CUDA; on a CPU use fp32, or bf16 where it has AMX")
    if "RANK" in os.environ:  # launched by torchrun; multi-node works the same (env:// rendezvous)
        # torchrun keeps its store across the restarts of --max-restarts: each attempt takes keys
        # of its own, or it could read the last group's addresses (pytorch/pytorch#135712)
        store, _, _ = next(dist.rendezvous("env://"))
        attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=rank,
                                world_size=world, store=dist.PrefixStore(f"try{attempt}/", store))
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(args.precision)
    autocast = torch.autocast(device.type, dtype=dtype) if dtype else nullcontext()
    return rank, world, device, autocast


def check_finite(loss):
    """Stop every rank where one rank's loss is not finite (one alone would hang the others)."""
    if all_ranks_max([int(not torch.isfinite(loss))], loss.device)[0]:  # (a host sync)
        raise CliError(f"the loss is {loss.item()}: stopped before any weight changed; the last "
                       "save stands. Lower --lr, or try --precision fp32")


def all_ranks_max(values, device):  # (on the device: NCCL reduces GPU tensors only)
    values = torch.tensor(values, device=device)
    if dist.is_initialized():
        dist.all_reduce(values, op=dist.ReduceOp.MAX)
    return values.tolist()


def rank_mean(x):  # x itself in a single process
    if dist.is_initialized():
        x = x.clone()
        dist.all_reduce(x)
        x /= dist.get_world_size()
    return x


class GatherBatch(torch.autograd.Function):  # [B, D] per rank -> [world*B, D], with gradients
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


def gather_batch(x):  # x itself in a single process
    return GatherBatch.apply(x) if dist.is_initialized() else x


def unwrap(model):
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def compile_blocks(run):
    """In place: names and checkpoints stay. dynamic: the masks' lengths change every batch."""
    for key in ("encoder", "predictor", "target_encoder"):
        for block in [m for m in run[key].modules() if isinstance(m, Block)]:
            block.compile(dynamic=True)


# 8. Checkpoints ===============================================================================
def save_checkpoint(run, log, args, epoch, step=0):  # after `epoch` epochs, `step` batches
    """Atomic: a crash leaves the old checkpoint or the new one, never a broken one."""
    ckpt = {k: unwrap(run[k]).state_dict() for k in ("encoder", "predictor", "target_encoder")}
    ckpt.update(opt=run["opt"].state_dict(), scaler=run["scaler"].state_dict(), epoch=epoch,
                step=step, args=vars(args), log=log)
    path = os.path.join(args.out, "checkpoint.pt")
    os.makedirs(args.out, exist_ok=True)
    with open(path + ".tmp", "wb") as f:
        torch.save(ckpt, f)
        f.flush()
        os.fsync(f.fileno())  # on the disk before it replaces the old one
    os.replace(path + ".tmp", path)  # atomic on POSIX
    with open(os.path.join(args.out, "log.jsonl"), "w") as f:
        f.writelines(json.dumps(line) + "\n" for line in log)


def read_checkpoint(path):
    try:
        return torch.load(path, map_location="cpu", weights_only=True)  # weights_only: no code runs
    except Exception as e:  # (an empty file raises EOFError with no message)
        first_line = (str(e).strip().splitlines() or [""])[0][:200]
        raise CliError(f"{path} is not a checkpoint ({type(e).__name__}: {first_line})") from None


def load_weights(model, state, path, assign=False):  # strict: every weight fits, or one line
    try:
        model.load_state_dict(state, assign=assign)
    except RuntimeError as e:
        problem = str(e).splitlines()[1].strip()[:200]
        raise CliError(f"{path} is of another architecture: {problem}") from None


def resume(run, path):
    """Restore a run. Returns (epochs done, batches done of the next epoch, the log so far)."""
    ckpt = read_checkpoint(path)
    for key in ("encoder", "predictor", "target_encoder"):
        load_weights(unwrap(run[key]), ckpt[key], path)
    for group in ckpt["opt"]["param_groups"]:  # fused AdamW (CUDA) or not: this machine's choice
        group["fused"] = run["opt"].defaults["fused"]
    run["opt"].load_state_dict(ckpt["opt"])
    if ckpt["scaler"]:  # (empty: saved without fp16; a run that turns to fp16 starts a scaler)
        run["scaler"].load_state_dict(ckpt["scaler"])
    return ckpt["epoch"], ckpt["step"], ckpt["log"]


def load_encoders(path, arch=None, img_size=224):
    """-> (target encoder, context encoder, settings) of our or an official I-JEPA checkpoint."""
    ckpt = read_checkpoint(path)
    if not isinstance(ckpt, dict) or not all(isinstance(ckpt.get(k), dict)
                                             for k in ("encoder", "target_encoder")):
        raise CliError(f"{path} is not an I-JEPA or C-JEPA checkpoint (no encoder state dicts)")
    if isinstance(ckpt.get("args"), dict):  # ours
        cfg = argparse.Namespace(**ckpt["args"])
    elif arch is None:
        raise CliError(f"{path} has no 'args' (an official I-JEPA checkpoint?): name its "
                       "architecture with --arch, and its image size with --img-size")
    else:
        cfg = argparse.Namespace(arch=arch, img_size=img_size, patch_size=ARCHS[arch][3])
    encoders = []
    for key in ("target_encoder", "encoder"):
        with torch.device("meta"):  # shapes only: every weight comes from the file
            model = make_encoder(cfg)
        state = {k.removeprefix("module."): v.float() for k, v in ckpt[key].items()}
        load_weights(model, state, path, assign=True)
        encoders.append(model.eval())
    cfg.epoch = ckpt.get("epoch")
    return encoders[0], encoders[1], cfg


# 9. Training loop =============================================================================
# SIGTERM and SIGUSR1 (a cluster's notice of preemption): finish the step, save, exit
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
STOP = dict(signum=0)  # the stop signal that came (0: none yet)


def on_stop_signal(signum, frame):
    STOP["signum"] = signum


def ignore_stop_signals(worker_id):  # loader workers leave them to the training process
    for signum in STOP_SIGNALS:
        signal.signal(signum, signal.SIG_IGN)


def stop_if_signalled(where, rank, device):
    """After a save: where any rank had a stop signal, every rank exits with 128 + the signal (the
    reduction waits for rank 0's save: torchrun stops the rest when one rank exits)."""
    signum = all_ranks_max([STOP["signum"]], device)[0]
    if not signum:
        return
    if rank == 0:
        print(f"cjepa.py: stopped by {signal.Signals(signum).name} {where}; the same command "
              "continues the run", file=sys.stderr)
    sys.exit(128 + signum)  # non-zero: the run is not finished


def collapse_monitors(pooled):
    """pooled [n, D] -> (mean per-feature std, effective rank: exp of the entropy of the normalised
    singular values). The std misses dimensional collapse (features that vary along few axes)."""
    x = pooled.float() - pooled.float().mean(dim=0)
    p = torch.linalg.svdvals(x)
    p = p / p.sum()
    erank = torch.exp(-(p * torch.log(p.clamp_min(1e-12))).sum())
    return x.std(dim=0).mean().item(), erank.item()


def train_epoch(run, batches, epoch, first_step, log, args, rank, device):
    """One pass over the data, from first_step -> (its log line, a stop signal at its last step)."""
    iters, world, t0 = len(batches), batches.world, time.time()
    batches.set_epoch(epoch)
    batch_iter = iter(torch.utils.data.DataLoader(
        batches, batch_size=None, sampler=range(first_step, iters), num_workers=args.workers,
        pin_memory=device.type == "cuda", worker_init_fn=ignore_stop_signals))
    bar = tqdm(batch_iter, total=iters, initial=first_step, desc=f"epoch {epoch + 1}/{args.epochs}",
               disable=rank != 0, leave=False, dynamic_ncols=True)
    sums, pooled = 0.0, []
    try:
        for i, batch in enumerate(bar, start=first_step):
            images, _, ctx_idx, tgt_idx = (x.to(device, non_blocking=True) for x in batch)
            lr, wd, m = schedules(epoch * iters + i, iters * args.epochs,
                                  round(args.warmup * iters), args)
            terms, target_means = train_step(run, images, ctx_idx, tgt_idx, lr, wd, m, args)
            sums = sums + torch.stack(list(terms.values()))
            if sum(len(p) for p in pooled) < 2048:  # the collapse monitors' images
                pooled.append(target_means)
            if i % 10 == 0:
                bar.set_postfix(loss=f"{terms['loss'].item():.4f}", lr=f"{lr:.1e}")
            # After the same step on every rank: a stop signal, or a timed save (--save-every).
            due = args.save_every > 0 and time.time() - run["last_save"] >= 60 * args.save_every
            signum, save_due = all_ranks_max([STOP["signum"], int(due)], device)
            if (signum or save_due) and i + 1 < iters:  # (the last step's: in pretrain)
                if rank == 0:
                    save_checkpoint(run, log, args, epoch, step=i + 1)
                run["last_save"] = time.time()
                stop_if_signalled(f"at epoch {epoch + 1}, step {i + 1}", rank, device)
    finally:  # however the loop ends: the workers ignore SIGTERM, so Python's exit can't end them
        bar.close()
        if args.workers > 0:
            batch_iter._shutdown_workers()
    means = rank_mean(sums / (iters - first_step))
    feat_std, erank = collapse_monitors(torch.cat(pooled).cpu())
    line = dict(epoch=epoch + 1, **{k: round(v, 6) for k, v in zip(terms, means.tolist())})
    if first_step:  # a resumed epoch's line covers the steps after the resume only
        line["resumed_at_step"] = first_step
    seconds = time.time() - t0
    line.update(lr=lr, wd=wd, momentum=m, feat_std=round(feat_std, 4), erank=round(erank, 2),
                img_per_s=round((iters - first_step) * args.batch_size * world / seconds, 1))
    return line, signum  # signum: a stop signal at the last step


def pretrain(args, rank, world, device, autocast):
    """A run: its data, its models (or its run folder's checkpoint), the epochs, the probe."""
    train_set = make_dataset(args, "train", augment=True)
    monitor = eval_sets(args, args.knn_images) if has_val(args) else None  # checks val/ too
    batches = EpochBatches(train_set, args, rank, world)
    run = build_run(args, device, autocast)
    if args.compile:
        compile_blocks(run)
    ckpt_path = os.path.join(args.out, "checkpoint.pt")
    start, step, log = resume(run, ckpt_path) if os.path.exists(ckpt_path) else (0, 0, [])
    probe = args.probe_epochs > 0 and has_val(args)
    if start >= args.epochs and not (probe and not os.path.exists(f"{args.out}/probe.json")):
        print(f"{args.out} holds a finished run of {start} epochs: a new run takes a new --out")
        return run
    if world > 1:  # the target encoder gets no gradients and is not wrapped
        for key in ("encoder", "predictor"):
            ids = [device.index] if device.type == "cuda" else None
            run[key] = nn.parallel.DistributedDataParallel(run[key], device_ids=ids)
    if rank == 0 and start < args.epochs:  # (else: the probe of a finished run is still due)
        print(f"C-JEPA {args.arch}, {len(train_set)} images, {world} process(es) on {device}, "
              f"{args.precision}, epochs {start + 1}-{args.epochs} from step {step + 1}, "
              f"run folder {args.out}")
    STOP["signum"], run["last_save"] = 0, time.time()
    previous = {signum: signal.signal(signum, on_stop_signal) for signum in STOP_SIGNALS}
    try:
        for epoch in range(start, args.epochs):
            line, signum = train_epoch(run, batches, epoch, step * (epoch == start), log, args,
                                       rank, device)
            if monitor and args.knn_images and rank == 0 and not signum:  # others: a collective
                train, val = (extract_features(run["target_encoder"], s, args, device, autocast)
                              for s in monitor)
                line["knn"] = round(knn_accuracy(train, val), 2)
            log.append(line)
            if rank == 0:
                save_checkpoint(run, log, args, epoch + 1)
                tqdm.write(" ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                                    for k, v in line.items()))
            run["last_save"] = time.time()
            stop_if_signalled(f"after epoch {epoch + 1}", rank, device)  # at its last step or since
    finally:  # from here on (the probe), a signal ends the run at once: the same command probes
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    if rank == 0 and probe:
        run_probe(run["target_encoder"], args, device, autocast)
    return run


# 10. Linear probe and k-NN monitor ===========================================================
def probe_features(encoder, images, n_blocks):
    """-> [B, n_blocks * D]: the last n_blocks blocks' mean patch tokens (after the final norm)."""
    x = encoder.embed(images)
    means = []
    for i, block in enumerate(encoder.blocks):
        x = block(x)
        if i >= len(encoder.blocks) - n_blocks:
            means.append(encoder.norm(x).mean(dim=1))
    return torch.cat(means, dim=1)


def eval_sets(args, n=None):
    """The train and val images, not augmented; with n, a fixed random n of each."""
    sets = []
    for split in ("train", "val"):
        dataset = make_dataset(args, split, augment=False)
        gen = torch.Generator().manual_seed(seed_of(args.seed, split))
        chosen = torch.randperm(len(dataset), generator=gen)[:n].sort().values
        sets.append(torch.utils.data.Subset(dataset, chosen.tolist()) if n else dataset)
    return sets


@torch.no_grad()
def extract_features(encoder, dataset, args, device, autocast):
    """-> (features, labels), in host memory: the encoder's probe features, or the raw pixels."""
    loader = torch.utils.data.DataLoader(dataset, batch_size=256, num_workers=args.workers,
                                         worker_init_fn=ignore_stop_signals)  # (k-NN: in training)
    feats, labels = [], []
    for images, y in tqdm(loader, desc="features", leave=False, dynamic_ncols=True):
        images = images.to(device, non_blocking=True)
        x = images[:, :1] if args.data is None else images  # the demo's images are grey
        if encoder is not None:
            with autocast:
                x = probe_features(encoder.eval(), images, args.probe_blocks)
        feats.append(x.float().flatten(1).cpu())
        labels.append(y)
    return torch.cat(feats), torch.cat(labels)


def train_linear_head(train, val, epochs, device, seed=0):
    """BatchNorm (no affine) + Linear on cached features, in seconds -> top-1 (%) on val."""
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
    with torch.no_grad():
        predicted = head.eval()(x_val.to(device)).argmax(dim=1).cpu()
    return 100 * (predicted == y_val).float().mean().item()


def knn_accuracy(train, val, k=20, temperature=0.07):
    """Top-1 (%) of a k-nearest-neighbour classifier, as DINO's eval_knn: cosine similarity, and
    each of the k nearest train features votes for its class with weight exp(similarity / T)."""
    (x, y), (x_val, y_val) = train, val
    x, x_val = F.normalize(x, dim=1), F.normalize(x_val, dim=1)
    similarity, nearest = (x_val @ x.T).topk(min(k, len(x)), dim=1)  # [n_val, k] each
    votes = torch.zeros(len(x_val), int(max(y.max(), y_val.max())) + 1)
    votes.scatter_add_(1, y[nearest], (similarity / temperature).exp())
    return 100 * (votes.argmax(dim=1) == y_val).float().mean().item()


def run_probe(target_encoder, args, device, autocast, probe_only=False):
    """Linear probe of the frozen target encoder, of a random-init one and of the raw pixels (if
    they fit in 1 GB) -> OUT/probe.json; --probe-only: probe_<data>.json beside the checkpoint."""
    if not has_val(args):
        raise CliError(f"--data {args.data} has no val/ folder to probe on")
    train_set, val_set = eval_sets(args)
    torch.manual_seed(args.seed)
    rows = dict(cjepa_target_encoder=target_encoder,
                random_init_encoder=make_encoder(args).to(device))
    channels = 1 if args.data is None else 3  # the demo's images are grey
    if len(train_set) * channels * args.img_size ** 2 * 4 <= 2**30:
        rows["raw_pixels"] = None
    print(f"\nlinear probe, top-1 on {len(val_set)} val images ({len(train_set)} train images)"
          f":\n| {'features':<22} | top-1  |\n| {'-' * 22} | ------ |")
    results = {}
    for name, encoder in rows.items():
        train, val = (extract_features(encoder, s, args, device, autocast)
                      for s in (train_set, val_set))
        results[name] = round(train_linear_head(train, val, args.probe_epochs, device), 2)
        print(f"| {name:<22} | {results[name]:5.2f}% |", flush=True)
    data_name = "demo" if args.data is None else os.path.basename(os.path.abspath(args.data))
    path = os.path.join(args.out, f"probe_{data_name}.json" if probe_only else "probe.json")
    try:  # atomic: no probe.json means that the probe is still due
        with open(path + ".tmp", "w") as f:
            json.dump(results, f, indent=1)
        os.replace(path + ".tmp", path)
    except OSError as e:  # e.g. --probe-only in a read-only folder: the table above is the result
        print(f"warning: could not save the probe result: {e}", file=sys.stderr)
    return results


# 11. Benchmark ================================================================================
# For MFU: dense bf16 / fp16 peaks of SXM parts, from NVIDIA's data sheets (PCIe and NVL: lower).
GPU_PEAKS = {"H100": 989e12, "H200": 989e12, "B200": 2250e12, "A100": 312e12}


def benchmark(args, device, autocast):
    """Steps on random images, per batch of masks (lengths differ): warm-up, FLOP count, timing."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode
    cuda, grid, B = device.type == "cuda", args.img_size // args.patch_size, args.batch_size
    n_masks, rounds = (5, 4) if cuda else (3, 1)
    name = torch.cuda.get_device_name(device) if cuda else f"CPU, {torch.get_num_threads()} threads"
    print(f"benchmark: {args.arch}, {args.img_size} px, batch {B}, predictor {args.pred_width} x "
          f"{args.pred_depth}, {args.precision}, {'compiled' if args.compile else 'eager'} "
          f"blocks, {name}: {n_masks} batches of masks, {n_masks * rounds} timed steps")
    gen = torch.Generator().manual_seed(args.seed)
    images = torch.randn(B, 3, args.img_size, args.img_size, device=device)
    run = build_run(args, device, autocast)
    if args.compile:
        compile_blocks(run)
    flops, seconds, memory = 0.0, 0.0, 0.0  # per step; peak GPU MiB
    for _ in tqdm(range(n_masks), desc="batches of masks", leave=False, dynamic_ncols=True):
        ctx_idx, tgt_idx = (x.to(device) for x in sample_masks(B, grid, grid, gen, args))
        # Warm-up (and the compile, if any: torch.compile does not compile under a FLOP counter)
        train_step(run, images, ctx_idx, tgt_idx, args.lr, args.wd[0], args.ema[0], args)
        # torch's FLOP counter knows the GPU's fused attention kernels but not the CPU's (it would
        # count them as zero): on a CPU, count the plain attention, which does the same products.
        plain = sdpa_kernel(SDPBackend.MATH) if not cuda else nullcontext()
        with FlopCounterMode(display=False) as counter, plain:
            train_step(run, images, ctx_idx, tgt_idx, args.lr, args.wd[0], args.ema[0], args)
        flops += counter.get_total_flops() / n_masks
        for _ in range(rounds):
            if cuda:
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
            t0 = time.perf_counter()
            train_step(run, images, ctx_idx, tgt_idx, args.lr, args.wd[0], args.ema[0], args)
            if cuda:
                torch.cuda.synchronize()
                memory = max(memory, torch.cuda.max_memory_allocated() / 2**20)
            seconds += (time.perf_counter() - t0) / (n_masks * rounds)
    if not cuda:
        import resource  # the whole process's peak resident memory
        memory = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    peak = next((p for gpu, p in GPU_PEAKS.items() if gpu in name), None)
    peak = peak if cuda and args.precision != "fp32" else None  # half-precision peaks only
    mfu = f"{100 * flops / seconds / peak:4.1f}%" if peak else "  -  "
    print(f"| images/s | ms/step | peak memory MiB | GFLOP/image | MFU   |\n"
          f"|----------|---------|-----------------|-------------|-------|\n"
          f"| {B / seconds:8.1f} | {1000 * seconds:7.1f} | {memory:15.0f} "
          f"| {flops / B / 1e9:11.2f} | {mfu} |")
    print(f"MFU: of the {args.precision} SXM peak, {peak / 1e12:.0f} TFLOP/s" if peak else
          "MFU: none: it needs bf16 or fp16 on a GPU of GPU_PEAKS")
    return B / seconds


# 12. Command line =============================================================================
def parse_args(argv=None):
    p = argparse.ArgumentParser(description="C-JEPA; with no --data, the demo. The settings are "
                                "at the top of cjepa.py, defaults (demo | --data | --recipe small)")
    p.add_argument("--data", help="an ImageFolder tree: train/<class>/*, val/<class>/*")
    p.add_argument("--recipe", choices=("small",), help="the demo's settings for your images")
    for name, value in PRETRAIN.items():
        kind = dict(type=float, nargs=2) if isinstance(value, tuple) else dict(type=type(value))
        kind = dict(type=int) if name == "patch_size" else kind
        defaults = [" ".join(map(str, np.atleast_1d(r[name]))) for r in (DEMO, PRETRAIN, SMALL)]
        p.add_argument("--" + name.replace("_", "-"), help=f"({' | '.join(defaults)})",
                       choices=ARCHS if name == "arch" else None, **kind)
    p.add_argument("--probe-only", metavar="CKPT", help="probe a checkpoint (official I-JEPA: "
                   "with --arch, --img-size, --data)")
    p.add_argument("--device", help="cuda, cuda:N or cpu (default: cuda if there is one)")
    p.add_argument("--precision", choices=("bf16", "fp16", "fp32"), help="default: bf16 on "
                   "CUDA (fp16 without bf16), fp32 on a CPU")
    p.add_argument("--compile", action="store_true", help="torch.compile every transformer block")
    p.add_argument("--benchmark", action="store_true", help="time training steps: the --data "
                   "recipe (without CUDA: at batch 32)")
    return p.parse_args(argv)


def with_defaults(args):
    """Every setting not given, from its recipe."""
    recipe = DEMO if args.data is None and not args.benchmark else PRETRAIN
    if args.recipe == "small":
        if args.data is None:
            raise CliError("--recipe small is for your own images: give --data DIR")
        recipe = SMALL
    elif args.benchmark and not torch.cuda.is_available():
        recipe = PRETRAIN | dict(batch_size=32)  # a CPU: minutes, not hours
    for key, value in recipe.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.patch_size = ARCHS[args.arch][3] if args.patch_size is None else args.patch_size
    if args.img_size is None:  # --recipe small: the first image's size, in whole patches
        side = min(datasets.ImageFolder(os.path.join(args.data, "train"))[0][0].size)
        args.img_size = side - side % args.patch_size
    return args


def check_masks_fit(grid, cfg):
    """Every mask keeps min_keep patches if the smallest target block has min_keep, and the
    largest leaves as many outside it (the sampler's fallback puts all M blocks on one spot).
    A block never shrinks as its scale grows: the extremes are at the two ends of target_scale.
    There, its (h, w) changes only at the aspects where h or w passes a half-integer: the areas
    at those aspects and at one between each two hold the smallest and the largest block."""
    (a0, a1), areas = cfg.target_aspect, []
    for s in cfg.target_scale:
        n = s * grid * grid
        cuts = [(k + 0.5) ** 2 / n for k in range(grid)] + [n / (k + 0.5) ** 2 for k in range(grid)]
        cuts = sorted([a for a in cuts if a0 < a < a1] + [a0, a1])
        aspects = cuts + [(a + b) / 2 for a, b in zip(cuts, cuts[1:])]
        areas += [math.prod(block_shape(s, a, grid, grid)) for a in aspects]
    if grid < 2 or min(areas) < cfg.min_keep or grid * grid - max(areas) < cfg.min_keep:
        raise CliError(f"the masks do not fit a {grid}x{grid} patch grid: target blocks of "
                       f"{min(areas)}-{max(areas)} patches with --min-keep {cfg.min_keep}; lower "
                       "--min-keep, change --target-scale or use a larger --img-size")


def check_args(args):
    _, depth, heads, _ = ARCHS[args.arch]
    for words, ok, names in LIMITS:
        for name in names.split():
            value = getattr(args, name)
            if not (ok(value) and np.isfinite(value).all()):
                shown = " ".join(map(str, np.atleast_1d(value)))
                raise CliError(f"--{name.replace('_', '-')} {shown}: must be finite and {words}")
    if args.warmup > args.epochs:
        raise CliError(f"--warmup {args.warmup} is longer than the run's {args.epochs} epochs: "
                       "lower it, or raise --epochs")
    if args.probe_blocks > depth:
        raise CliError(f"--probe-blocks {args.probe_blocks}: {args.arch} has {depth} blocks; "
                       f"give 1 to {depth}")
    if args.data is None and not args.benchmark and args.img_size != 28:
        raise CliError(f"the demo's images are 28 px, not {args.img_size}: other sizes need --data")
    if args.batch_size < 2:
        raise CliError("--batch-size must be at least 2: VICReg's variance needs 2 images")
    if args.pred_width % 4 or args.pred_width % heads:
        raise CliError(f"--pred-width must be a multiple of 4 and of the {heads} heads")
    if args.img_size % args.patch_size:
        raise CliError(f"--img-size {args.img_size} is not a multiple of the patch size "
                       f"{args.patch_size}")
    if not args.probe_only:  # (a checkpoint is probed whatever its masks were)
        check_masks_fit(args.img_size // args.patch_size, args)


def main(argv=None):
    args = parse_args(argv)
    try:
        if args.probe_only:  # the architecture, and unless given the data, from the checkpoint
            encoder, _, saved = load_encoders(args.probe_only, args.arch, args.img_size or 224)
            args.arch, args.img_size, args.patch_size = saved.arch, saved.img_size, saved.patch_size
            for key in ("data", "recipe", "probe_blocks"):
                if getattr(args, key) is None:
                    setattr(args, key, getattr(saved, key, None))
        check_args(with_defaults(args))
        rank, world, device, autocast = setup(args)
        torch.manual_seed(args.seed)  # the same initial weights on every rank
        if args.benchmark:
            return benchmark(args, device, autocast)
        if args.probe_only:
            args.out = os.path.dirname(os.path.abspath(args.probe_only))
            return run_probe(encoder.to(device), args, device, autocast, probe_only=True)
        return pretrain(args, rank, world, device, autocast)
    except (CliError, FileNotFoundError) as e:  # (from a loader worker, with its traceback,
        message = str(e).strip().splitlines()[-1]  # whose last line is "...CliError: message")
        print(f"cjepa.py: error: {message.split('CliError: ')[-1]}", file=sys.stderr)
        sys.exit(2)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    main()
