"""Tests for cjepa.py: each piece against a simple reference, then the whole training path.
Run: python -m pytest -q test_cjepa.py   (CPU, a few minutes on 2 cores)"""
import argparse
import contextlib
import copy
import glob
import json
import math
import os
import re
import runpy
import signal
import socket
import subprocess
import sys
import time
import types
from contextlib import nullcontext
from unittest import mock

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import cjepa
import visualize

HERE = os.path.dirname(os.path.abspath(__file__))
# A tiny model and schedule for the end-to-end tests: 28 px images, 7x7 patch grid.
TINY = ["--arch", "vit_demo", "--img-size", "28", "--batch-size", "8", "--epochs", "2",
        "--workers", "0", "--pred-width", "32", "--pred-depth", "1", "--min-keep", "4",
        "--warmup", "0.5", "--probe-epochs", "0", "--device", "cpu"]


def tiny_args(*extra):
    return cjepa.with_defaults(cjepa.parse_args(["--data", "unused"] + TINY + list(extra)))


def sample_masks(B, H, W, gen, **settings):
    """cjepa's sample_masks with the published mask settings, but for those given."""
    return cjepa.sample_masks(B, H, W, gen, argparse.Namespace(**(cjepa.PRETRAIN | settings)))


def write_image_folder(root, n_per_class=12, classes=2, size=36, splits=("train",)):
    """An ImageFolder of simple patterns: class 0 horizontal stripes, class 1 vertical ones,
    random phase and colour."""
    rng = np.random.default_rng(0)
    for split in splits:
        for c in range(classes):
            os.makedirs(os.path.join(root, split, f"class{c}"), exist_ok=True)
            for i in range(n_per_class):
                coords = np.arange(size)[:, None] if c == 0 else np.arange(size)[None, :]
                wave = (np.sin(coords / rng.uniform(1.5, 4) + rng.uniform(0, 6))
                        > 0).astype(np.float32)
                img = np.broadcast_to(wave, (size, size))[..., None] * rng.uniform(60, 255, 3)
                Image.fromarray(img.astype(np.uint8)).save(os.path.join(root, split, f"class{c}",
                                                                        f"{i}.png"))
    return root


def run_main(argv, capsys=None):
    """cjepa.main(argv) -> (exit code, stderr text)."""
    try:
        cjepa.main(argv)
        code = 0
    except SystemExit as e:
        code = e.code
    err = capsys.readouterr().err if capsys else ""
    return code, err


# --------------------------------------------------------------------- 1. the ViT
def test_sincos_matches_direct_formula():
    dim, grid = 16, 5
    table = cjepa.sincos_pos_embed(dim, grid)
    assert table.shape == (grid * grid, dim)
    for n in range(grid * grid):
        row, col = divmod(n, grid)  # raster order
        for half, pos in ((0, col), (1, row)):  # first half: column, second half: row
            for i in range(dim // 4):
                freq = 1 / 10000 ** (2 * i / (dim // 2))
                assert (table[n, half * dim // 2 + i].item()
                        == pytest.approx(math.sin(pos * freq), abs=1e-6))
                assert (table[n, half * dim // 2 + dim // 4 + i].item()
                        == pytest.approx(math.cos(pos * freq), abs=1e-6))


def explicit_attention(attn, x):
    """The reference: softmax(q k^T / sqrt(d)) v written out, one head at a time, with its
    weights."""
    B, N, D = x.shape
    d = D // attn.heads
    q, k, v = attn.qkv(x).split(D, dim=-1)
    heads, weights = [], []
    for h in range(attn.heads):
        qh, kh, vh = (t[..., h * d:(h + 1) * d] for t in (q, k, v))
        w = torch.softmax(qh @ kh.transpose(1, 2) / math.sqrt(d), dim=-1)  # [B, N, N]
        heads.append(w @ vh)
        weights.append(w)
    return attn.proj(torch.cat(heads, dim=-1)), torch.stack(weights, dim=1)


def test_fused_attention_matches_explicit():
    torch.manual_seed(0)
    attn = cjepa.Attention(32, 4)
    x = torch.randn(3, 10, 32)
    explicit, weights = explicit_attention(attn, x)
    torch.testing.assert_close(attn(x), explicit, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(weights.sum(-1), torch.ones(3, 4, 10))
    # only_last: the last queries' outputs, attending to every token
    torch.testing.assert_close(attn(x, only_last=4), explicit[:, -4:], atol=1e-5, rtol=1e-5)


def test_flop_count_counts_cpu_attention_as_the_explicit_products(monkeypatch, capsys):
    """On the CPU, torch's FLOP counter would count the fused attention kernel as zero: the
    benchmark counts the plain attention, whose products are the explicit ones."""
    from torch.utils.flop_counter import FlopCounterMode
    gflops = {}
    for name in ("ours", "explicit"):
        if name == "explicit":
            def explicit(q, k, v):  # softmax(q k^T / sqrt(d)) v, written out
                weights = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])
                return torch.softmax(weights, dim=-1) @ v
            monkeypatch.setattr(cjepa.F, "scaled_dot_product_attention", explicit)
        cjepa.main(TINY_BENCHMARK)
        row = capsys.readouterr().out.splitlines()[-2].split("|")
        gflops[name] = float(row[4])
    assert gflops["ours"] == gflops["explicit"]
    # the mean over the benchmark's 3 batches of masks (drawn from --seed 0), per image
    args, cpu = tiny_args("--seed", "0"), torch.device("cpu")
    gen, run = torch.Generator().manual_seed(0), cjepa.build_run(args, cpu, nullcontext())
    counts = []
    for _ in range(3):
        masks = cjepa.sample_masks(8, 7, 7, gen, args)
        with FlopCounterMode(display=False) as counter:
            cjepa.train_step(run, torch.randn(8, 3, 28, 28), *masks, 1e-3, 0.04, 0.996, args)
        counts.append(counter.get_total_flops())
    assert gflops["explicit"] == pytest.approx(sum(counts) / 3 / 8 / 1e9, abs=0.006)
    monkeypatch.undo()
    with FlopCounterMode(display=False) as fused:  # torch's counter alone, on the last masks
        cjepa.train_step(run, torch.randn(8, 3, 28, 28), *masks, 1e-3, 0.04, 0.996, args)
    assert counts[-1] > fused.get_total_flops()  # which missed attention's products


def test_block_with_only_last_equals_the_full_block_sliced():
    torch.manual_seed(0)
    block = cjepa.Block(32, 4)
    x = torch.randn(3, 12, 32)
    torch.testing.assert_close(block(x, only_last=5), block(x)[:, -5:], atol=1e-5, rtol=1e-5)


def test_encoder_keep_gathers_after_positions():
    torch.manual_seed(0)
    enc = cjepa.VisionTransformer(28, 4, 32, 2, 2).eval()
    images = torch.randn(2, 3, 28, 28)
    full = enc(images)
    assert full.shape == (2, 49, 32)
    every = torch.arange(49).repeat(2, 1)
    torch.testing.assert_close(enc(images, every), full, atol=1e-5, rtol=1e-5)
    # a kept patch's token before the blocks = its patch embedding + its own position
    keep = torch.tensor([[5, 17], [0, 48]])
    tokens = enc.embed(images, keep)
    patches = enc.patch_embed(images).flatten(2).transpose(1, 2)
    torch.testing.assert_close(tokens[1, 1], patches[1, 48] + enc.pos_embed[0, 48])
    assert set(dict(enc.named_parameters())) >= {"patch_embed.proj.weight",
                                                 "blocks.0.attn.qkv.bias",
                                                 "blocks.1.mlp.fc2.weight", "norm.weight"}
    assert enc.state_dict()["pos_embed"].shape == (1, 49, 32)


def randomised(module, seed=0):
    """Every parameter random, the norms' too: in a fresh model all LayerNorms are alike (weight
    1, bias 0), which would hide a mix-up between them."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
    return module


def test_block_and_encoder_match_their_formulas_with_every_parameter_random():
    block = randomised(cjepa.Block(32, 4))
    x = torch.randn(3, 10, 32, generator=torch.Generator().manual_seed(1))
    a = x + explicit_attention(block.attn, block.norm1(x))[0]  # x + Attn(LN1(x))
    ref = a + block.mlp.fc2(F.gelu(block.mlp.fc1(block.norm2(a))))  # a + MLP(LN2(a))
    torch.testing.assert_close(block(x), ref, atol=1e-4, rtol=1e-4)
    encoder = randomised(cjepa.VisionTransformer(28, 4, 32, 2, 2), seed=2)
    images = torch.randn(2, 3, 28, 28, generator=torch.Generator().manual_seed(3))
    proj = encoder.patch_embed.proj
    tokens = F.conv2d(images, proj.weight, proj.bias, stride=4).flatten(2).transpose(1, 2)
    tokens = tokens + cjepa.sincos_pos_embed(32, 7)  # each patch's token knows its place
    for blk in encoder.blocks:
        tokens = blk(tokens)
    ref = F.layer_norm(tokens, (32,), encoder.norm.weight, encoder.norm.bias, eps=1e-6)
    torch.testing.assert_close(encoder(images), ref, atol=1e-4, rtol=1e-4)


def test_fresh_weights_follow_init_weights():
    """Linear and patch-embedding weights: truncated normal with std 0.02; biases 0; LayerNorms
    1 and 0; the predictor's mask token: std 0.02 too (the official code also scales down each
    block's output projections: not here)."""
    torch.manual_seed(0)
    encoder = cjepa.VisionTransformer(224, 16, 192, 2, 3)
    predictor = cjepa.Predictor(14, 192, 96, 2, 3)
    for model in (encoder, predictor):
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                expected = 1.0 if "norm" in name and name.endswith("weight") else 0.0
                assert torch.all(p == expected), name
            elif name != "mask_token":
                assert abs(p.std().item() - 0.02) < 0.002, name
    assert abs(predictor.mask_token.std().item() - 0.02) < 0.006


# --------------------------------------------------------------------- 2. the masks
def rectangle(idx, W):
    """Patch indices -> (h, w) if they form a filled rectangle, else None."""
    rows, cols = idx // W, idx % W
    h, w = int(rows.max() - rows.min() + 1), int(cols.max() - cols.min() + 1)
    return (h, w) if h * w == len(idx) else None


@pytest.mark.parametrize("grid", [4, 7, 14, 32])
def test_mask_invariants(grid):
    min_keep = {4: 2, 7: 4}.get(grid, 10)
    N, seen_last_row, seen_last_col = grid * grid, False, False
    for seed in range(25):
        ctx, tgt = sample_masks(6, grid, grid, torch.Generator().manual_seed(seed),
                                      min_keep=min_keep)
        # [B, Kc] and [M, B, Kt]: one length per batch
        assert ctx.shape[0] == 6 and tgt.shape[:2] == (4, 6)
        assert ctx.shape[1] >= min_keep and tgt.shape[2] >= min_keep
        for b in range(6):
            c = set(ctx[b].tolist())
            assert len(c) == ctx.shape[1] and max(c) < N
            for m in range(4):
                t = tgt[m, b]
                assert not c & set(t.tolist()), "the context must exclude every target patch"
                h, w = rectangle(t, grid)  # targets are never truncated: whole blocks
                assert h < grid and w < grid
                lo, hi = 0.15 * N, 0.2 * N
                # the scale bounds, allowing for rounding
                assert lo / 2 <= h * w <= hi * 2 + 2 * grid
                seen_last_row |= int((t // grid).max()) == grid - 1
                seen_last_col |= int((t % grid).max()) == grid - 1
    assert seen_last_row and seen_last_col, "blocks must start on every valid row and column"


def test_masks_are_reproducible_and_random_subsets():
    a = sample_masks(8, 14, 14, torch.Generator().manual_seed(3))
    b = sample_masks(8, 14, 14, torch.Generator().manual_seed(3))
    c = sample_masks(8, 14, 14, torch.Generator().manual_seed(4))
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert a[0].shape != c[0].shape or not torch.equal(a[0], c[0])
    ctx = a[0]
    assert torch.all(ctx[:, 1:] > ctx[:, :-1]), "kept in raster order, no repeats"
    # truncation to the common length keeps a random subset, not the lowest raster indices
    mask = torch.zeros(2, 49, dtype=torch.bool)
    mask[0], mask[1, :10] = True, True
    kept = [cjepa.random_subset(mask, torch.Generator().manual_seed(s)) for s in range(20)]
    assert all(k.shape == (2, 10) for k in kept)
    assert all(torch.equal(k[1], torch.arange(10)) for k in kept)
    assert len({tuple(k[0].tolist()) for k in kept}) == 20 and max(k[0].max() for k in kept) > 40


def test_mask_sampler_never_hangs_on_4x4_and_rejects_impossible_configs():
    t0 = time.time()
    for seed in range(200):
        ctx, tgt = sample_masks(4, 4, 4, torch.Generator().manual_seed(seed), min_keep=2)
        assert ctx.shape[1] >= 2
    assert time.time() - t0 < 20
    with pytest.raises(cjepa.CliError, match="do not fit"):
        cjepa.check_masks_fit(4, argparse.Namespace(**cjepa.PRETRAIN))
    cjepa.check_masks_fit(14, argparse.Namespace(**cjepa.PRETRAIN))  # the published defaults fit
    demo = argparse.Namespace(**cjepa.DEMO)
    cjepa.check_masks_fit(7, demo)  # the demo's fit its 7 x 7 grid, but not with min_keep 7
    with pytest.raises(cjepa.CliError, match="target blocks of 6-"):
        cjepa.check_masks_fit(7, argparse.Namespace(**(cjepa.DEMO | dict(min_keep=7))))


def block_shapes_by_boxes(scale, aspect, H, W, closed):
    """A reference: the (h, w) whose box of (X, Y) that round to it meets the region of (X, Y) =
    (sqrt(s*H*W*a), sqrt(s*H*W/a)), by the separating axis theorem in (log X, log Y). Closed
    boxes admit every tie of round() both ways (a superset), open ones none (a subset)."""
    (a0, a1), (A0, A1) = aspect, (scale[0] * H * W, scale[1] * H * W)
    x0, x1, y0, y1 = (A0 * a0) ** 0.5, (A1 * a1) ** 0.5, (A0 / a1) ** 0.5, (A1 / a0) ** 0.5
    le = (lambda p, q: p <= q) if closed else (lambda p, q: p < q)
    shapes = set()
    for h in range(math.floor(x1 + 0.5) + 1):
        for w in range(math.floor(y1 + 0.5) + 1):
            hl, hh, wl, wh = max(h - 0.5, 1e-9), h + 0.5, max(w - 0.5, 1e-9), w + 0.5
            if (le(hl, x1) and le(x0, hh) and le(wl, y1) and le(y0, wh) and le(hl * wl, A1)
                    and le(A0, hh * wh) and le(hl / wh, a1) and le(a0, hh / wl)):
                shapes.add((min(max(h, 1), H - 1), min(max(w, 1), W - 1)))
    return shapes


def checked_areas(grid, scale, aspect):
    """The smallest and largest target block that check_masks_fit finds, from its message."""
    cfg = argparse.Namespace(target_scale=scale, target_aspect=aspect, min_keep=10**9)
    with pytest.raises(cjepa.CliError) as e:
        cjepa.check_masks_fit(grid, cfg)
    return tuple(int(n) for n in re.search(r"of (\d+)-(\d+) patches", str(e.value)).groups())


def test_the_masks_check_finds_the_smallest_and_largest_block_exactly():
    # grid 38, scale 0.05-0.1: an 8 x 8 block (64 patches) needs an aspect within 0.07% of 1
    assert cjepa.block_shape(0.05, 1.0, 38, 38) == (8, 8)
    assert checked_areas(38, (0.05, 0.1), (0.75, 1.5)) == (64, 156)
    for grid in range(2, 40, 3):
        for scale, aspect in (((0.15, 0.2), (0.75, 1.5)), ((0.05, 0.1), (0.5, 0.6)),
                              ((0.01, 0.9), (0.2, 5.0)), ((0.85, 1.0), (1.0, 1.0))):
            low, high = checked_areas(grid, scale, aspect)
            for closed, sign in ((True, 1), (False, -1)):
                areas = [h * w for h, w in block_shapes_by_boxes(scale, aspect, grid, grid, closed)]
                assert sign * (low - min(areas)) >= 0 and sign * (max(areas) - high) >= 0


@pytest.mark.parametrize("flags, words", [
    (["--epochs", "0"], "--epochs 0: must be finite and > 0"), (["--batch-size", "0"], "at least 2"),
    (["--lr", "-1"], "--lr -1.0: must be finite and > 0"), (["--lr", "nan"], "must be finite"),
    (["--start-lr", "-0.0001"], ">= 0"), (["--img-size", "0"], "--img-size 0: must be finite and > 0"),
    (["--wd", "0.04", "-0.1"], "--wd 0.04 -0.1: must be finite and >= 0"), (["--vicreg", "-1"], ">= 0"),
    (["--beta-cov", "-1"], ">= 0"), (["--probe-epochs", "-1"], ">= 0"),
    (["--knn-images", "-5"], ">= 0"), (["--save-every", "-1"], ">= 0"),
    (["--workers", "-1"], ">= 0"), (["--clip", "-1"], ">= 0"),
    (["--ema", "1.5", "1.0"], "--ema 1.5 1.0: must be finite and in [0, 1]"),
    (["--target-scale", "0.2", "1.1"], "in (0, 1]"), (["--crop-scale", "-0.1", "1"], "in (0, 1]"),
    (["--context-scale", "1.0", "0.85"], "the lower first"),
    (["--target-aspect", "1.5", "0.75"], "the lower first"), (["--target-aspect", "0", "1"], "> 0"),
    (["--lr", "inf"], "must be finite"), (["--target-aspect", "0.5", "inf"], "must be finite"),
    (["--target-scale", "0", "0.2"], "in (0, 1]"), (["--ema", "0.9", "0.5"], "the lower first"),
    (["--patch-size", "0"], "--patch-size 0: must be finite and > 0"),
    (["--warmup", "100"], "--warmup 100.0 is longer than the run's 6 epochs"),
    (["--n-targets", "0"], ">= 1"), (["--min-keep", "0"], ">= 1"), (["--tries", "0"], ">= 1"),
    (["--probe-blocks", "0"], ">= 1"), (["--probe-blocks", "9"], "vit_demo has 4 blocks"),
])
def test_every_bad_setting_is_a_one_line_error_before_anything_is_written(tmp_path, capsys,
                                                                          monkeypatch, flags, words):
    def pretrain(*args):
        raise AssertionError(f"{flags} reached the training")

    monkeypatch.setattr(cjepa, "pretrain", pretrain)
    out = tmp_path / "new_folder"
    assert_one_line_error(*run_main([*flags, "--out", str(out)], capsys), words)
    assert not out.exists()


def test_blocks_are_whole_rectangles_at_every_position():
    blocks = cjepa.place_blocks(500, 3, 2, 7, 7, torch.Generator().manual_seed(0))
    for block in blocks:
        assert rectangle(block.nonzero()[:, 0], 7) == (3, 2)
    grid = blocks.view(500, 7, 7)
    tops = grid.any(dim=2).int().argmax(dim=1)  # each block's first row
    lefts = grid.any(dim=1).int().argmax(dim=1)  # and first column
    assert set(tops.tolist()) == set(range(5))  # every start, the last (7 - 3) included
    assert set(lefts.tolist()) == set(range(6))  # along the other axis too (7 - 2)


def test_block_shapes_draw_scale_and_aspect_independently_over_their_ranges():
    gen, H, W = torch.Generator().manual_seed(0), 400, 400  # a fine grid: little rounding
    shapes = [cjepa.draw_block_shape((0.15, 0.2), (0.75, 1.5), H, W, gen) for _ in range(2000)]
    scale = torch.tensor([h * w / (H * W) for h, w in shapes])
    aspect = torch.tensor([h / w for h, w in shapes])  # height / width
    assert 0.147 < scale.min() < 0.152 and 0.198 < scale.max() < 0.203
    assert 0.74 < aspect.min() < 0.77 and 1.47 < aspect.max() < 1.51
    assert abs(torch.corrcoef(torch.stack([scale, aspect]))[0, 1]) < 0.1  # independent draws
    # no block spans the whole grid: a context block of 85-100% is at most (H - 1) x (W - 1)
    assert cjepa.block_shape(1.0, 1.0, 7, 7) == (6, 6)
    assert cjepa.block_shape(0.001, 1.0, 7, 7) == (1, 1)


def test_the_context_block_is_square():
    """Small targets barely dent it: the context's bounding box is the block, h = w (aspect 1)."""
    for seed in range(20):
        ctx, _ = sample_masks(1, 14, 14, torch.Generator().manual_seed(seed), n_targets=1,
                              target_scale=(0.02, 0.02), context_scale=(0.5, 0.5), min_keep=4)
        rows, cols = ctx[0] // 14, ctx[0] % 14
        assert rows.max() - rows.min() == cols.max() - cols.min() == 9  # 10 x 10 of 196 patches


def test_a_try_that_leaves_exactly_min_keep_patches_is_taken():
    """Two 2 x 2 target blocks on a 4 x 4 grid leave 8, 10 or 12 patches free; with min_keep 10,
    blocks that overlap by 2 patches are as good as blocks on one spot."""
    gen = torch.Generator().manual_seed(0)
    _, tgt = sample_masks(200, 4, 4, gen, n_targets=2, target_scale=(0.25, 0.25),
                                min_keep=10)
    free = [16 - len(set(tgt[0, b].tolist()) | set(tgt[1, b].tolist())) for b in range(200)]
    assert min(free) == 10 and max(free) == 12


def test_masks_fall_back_when_no_try_fits():
    """One try, and a min_keep that 4 random target blocks seldom leave free: an image falls back
    to all 4 blocks on the first one's spot, and to a context of every patch outside them."""
    gen = torch.Generator().manual_seed(0)
    ctx, tgt = sample_masks(32, 4, 4, gen, target_scale=(0.25, 0.25), min_keep=12, tries=1)
    assert tgt.shape == (4, 32, 4) and ctx.shape == (32, 12)
    for b in range(32):
        assert all(torch.equal(tgt[m, b], tgt[0, b]) for m in range(4))
        assert set(ctx[b].tolist()) == set(range(16)) - set(tgt[0, b].tolist())


# --------------------------------------------------------------------- 3. the predictor
def predict_one_block(pred, z, ctx_idx, idx):
    """The reference predictor, for one target block idx [B, Kt]: the context tokens and the mask
    tokens, every token through every block, then the mask tokens' outputs."""
    pos = pred.predictor_pos_embed[0]
    x = torch.cat([pred.predictor_embed(z) + pos[ctx_idx], pred.mask_token + pos[idx]], dim=1)
    for block in pred.predictor_blocks:
        x = block(x)
    return pred.predictor_proj(pred.predictor_norm(x))[:, -idx.shape[1]:]


def test_predictor_batched_equals_one_block_at_a_time():
    torch.manual_seed(0)
    pred = cjepa.Predictor(7, 32, 16, 2, 2)
    ctx, tgt = sample_masks(3, 7, 7, torch.Generator().manual_seed(0), min_keep=4)
    z = torch.randn(3, ctx.shape[1], 32)
    out = pred(z, ctx, tgt)
    assert out.shape == (4, 3, tgt.shape[2], 32)
    for m in range(4):
        torch.testing.assert_close(out[m], predict_one_block(pred, z, ctx, tgt[m]),
                                   atol=1e-5, rtol=1e-5)


# ----------------------------------------------------------- 4. targets and the loss, EMA; monitors
def test_ema_endpoints():
    torch.manual_seed(0)
    online, target = torch.nn.Linear(4, 4), torch.nn.Linear(4, 4)
    before = [p.clone() for p in target.parameters()]
    cjepa.ema_update(target, online, 1.0)
    assert all(torch.equal(p, q) for p, q in zip(target.parameters(), before))
    cjepa.ema_update(target, online, 0.5)
    for p, q, o in zip(target.parameters(), before, online.parameters()):
        torch.testing.assert_close(p, 0.5 * q + 0.5 * o)
    cjepa.ema_update(target, online, 0.0)
    assert all(torch.equal(p, o) for p, o in zip(target.parameters(), online.parameters()))


def test_variance_covariance_against_naive_loops():
    torch.manual_seed(0)
    c = torch.randn(6, 5) * torch.tensor([0.1, 0.5, 1.0, 2.0, 3.0])
    l_std, l_cov = cjepa.variance_covariance(c)
    n, D = c.shape
    mean = [sum(c[i, d].item() for i in range(n)) / n for d in range(D)]
    cov = [[sum((c[i, a].item() - mean[a]) * (c[i, b].item() - mean[b]) for i in range(n)) / (n - 1)
            for b in range(D)] for a in range(D)]
    std_ref = sum(max(0.0, 1 - math.sqrt(cov[d][d] + 1e-4)) for d in range(D)) / D
    cov_ref = sum(cov[a][b] ** 2 for a in range(D) for b in range(D) if a != b) / D
    assert l_std.item() == pytest.approx(std_ref, rel=1e-5)
    assert l_cov.item() == pytest.approx(cov_ref, rel=1e-5)
    # under autocast the statistics stay fp32: a bf16 c.T @ c would be off by ~1e-3
    c = torch.randn(256, 64) * 3 + 1
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = cjepa.variance_covariance(c)
    torch.testing.assert_close(got, cjepa.variance_covariance(c), rtol=1e-5, atol=1e-6)


def test_targets_are_the_normalised_target_blocks():
    # (random parameters: a fresh encoder's own final LayerNorm would leave its output
    # normalised already)
    enc = randomised(cjepa.VisionTransformer(28, 4, 32, 2, 2))
    images = torch.randn(2, 3, 28, 28)
    h = cjepa.target_features(enc, images)
    assert not h.requires_grad  # no gradient flows into the target encoder
    out = enc(images)
    for b, n in ((0, 0), (1, 30)):  # each patch: zero mean, unit variance over its features
        ref = (out[b, n] - out[b, n].mean()) / torch.sqrt(out[b, n].var(unbiased=False) + 1e-5)
        torch.testing.assert_close(h[b, n], ref.detach(), atol=1e-5, rtol=1e-5)
    idx = torch.tensor([[[3, 9], [0, 48]]])  # [M=1, B=2, Kt=2]
    t = cjepa.gather_tokens(h, idx)
    assert t.shape == (1, 2, 2, 32)
    assert torch.equal(t[0, 1, 1], h[1, 48]) and torch.equal(t[0, 0, 0], h[0, 3])


def test_vicreg_zero_is_plain_ijepa():
    torch.manual_seed(0)
    args = tiny_args("--vicreg", "0")
    enc, pred = cjepa.VisionTransformer(28, 4, 32, 2, 2), cjepa.Predictor(7, 32, 16, 1, 2)
    images = torch.randn(4, 3, 28, 28)
    ctx, tgt = sample_masks(4, 7, 7, torch.Generator().manual_seed(0), min_keep=4)
    h = F.layer_norm(enc(images), (32,)).detach()
    t = h[torch.arange(4)[:, None], tgt]  # [M, B, Kt, D]
    z = enc(images, ctx)
    p = pred(z, ctx, tgt)
    loss, stats = cjepa.cjepa_loss(p, t, z, args)
    ref = torch.stack([F.smooth_l1_loss(predict_one_block(pred, z, ctx, tgt[m]),
                                        h[torch.arange(4)[:, None], tgt[m]])
                       for m in range(4)]).mean()
    torch.testing.assert_close(loss, ref, atol=1e-5, rtol=1e-5)
    args.vicreg = 1.0
    loss2, stats2 = cjepa.cjepa_loss(p, t, z, args)
    expected = stats2["ijepa"] + 25 * stats2["sim"] + 25 * stats2["std"] + stats2["cov"]
    torch.testing.assert_close(loss2.detach(), expected, atol=1e-5, rtol=1e-5)
    # the invariance term: the mean prediction of each image against the mean target
    sim = F.mse_loss(p.mean(dim=(0, 2)), t.mean(dim=(0, 2)))
    torch.testing.assert_close(stats2["sim"], sim.detach(), atol=1e-6, rtol=1e-5)


def reference_loss(p, t, z, beta_vicreg, beta_sim=25.0, beta_std=25.0, beta_cov=1.0):
    """C-JEPA's loss as we read the paper, written out: smooth L1 on the target blocks, then
    VICReg's variance and covariance of each image's mean context feature, and its invariance
    between each image's mean prediction and mean target."""
    c = z.mean(dim=1)
    c = c - c.mean(dim=0)
    n, D = c.shape
    l_std = F.relu(1 - torch.sqrt(c.var(dim=0) + 1e-4)).mean()
    cov = c.T @ c / (n - 1)
    l_cov = ((cov ** 2).sum() - (cov.diagonal() ** 2).sum()) / D
    l_sim = ((p.mean(dim=(0, 2)) - t.mean(dim=(0, 2))) ** 2).mean()
    vicreg = beta_sim * l_sim + beta_std * l_std + beta_cov * l_cov
    return F.smooth_l1_loss(p, t) + beta_vicreg * vicreg


def test_loss_and_its_gradients_match_the_formula():
    """The value and the gradients with respect to the predictions and the context encoder's
    output: a term computed from the wrong tensor, or detached, changes one of them."""
    gen = torch.Generator().manual_seed(0)
    p = torch.randn(4, 6, 5, 16, generator=gen).requires_grad_()
    t = torch.randn(4, 6, 5, 16, generator=gen)
    z = (0.5 * torch.randn(6, 9, 16, generator=gen)).requires_grad_()  # std < 1: the hinge acts
    args = tiny_args("--vicreg", "0.5")
    got = cjepa.cjepa_loss(p, t, z, args)[0]
    ref = reference_loss(p, t, z, 0.5)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)
    for a, b in zip(torch.autograd.grad(got, (p, z)), torch.autograd.grad(ref, (p, z))):
        assert b.abs().max() > 0
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-7)


def test_collapse_monitors_see_dimensional_collapse():
    torch.manual_seed(0)
    spread = torch.randn(512, 32)
    collapsed = torch.randn(512, 2) @ torch.randn(2, 32) * 3  # large std, but only 2 directions
    std_a, rank_a = cjepa.collapse_monitors(spread)
    std_b, rank_b = cjepa.collapse_monitors(collapsed)
    assert std_b > std_a and rank_b < 2.5 < 25 < rank_a


def test_knn_accuracy_against_brute_force():
    torch.manual_seed(0)
    x, y = torch.randn(60, 8), torch.randint(0, 3, (60,))
    x_val, y_val = torch.randn(25, 8), torch.randint(0, 3, (25,))
    correct = 0
    for v, label in zip(x_val, y_val):  # DINO's rule, one query at a time
        sims = sorted(((F.cosine_similarity(v, u, dim=0).item(), int(c)) for u, c in zip(x, y)),
                      reverse=True)
        votes = [0.0, 0.0, 0.0]
        for s, c in sims[:20]:
            votes[c] += math.exp(s / 0.07)
        correct += votes.index(max(votes)) == int(label)
    assert cjepa.knn_accuracy((x, y), (x_val, y_val)) == pytest.approx(100 * correct / 25)
    # one twin of class 0 outweighs 19 less similar neighbours of class 1 (exp(similarity / T))
    v = torch.tensor([[1.0, 0.0]])
    near = torch.tensor([[0.6, 0.8]]).repeat(19, 1)  # cosine 0.6
    train = (torch.cat([v, near]), torch.tensor([0] + [1] * 19))
    assert cjepa.knn_accuracy(train, (v, torch.tensor([0]))) == 100
    # 60 of class 2 just outside the 20 nearest (class 1) would outvote them: they must not vote
    near = torch.tensor([[0.5, math.sqrt(0.75)]]).repeat(20, 1)  # cosine 0.5
    far = torch.tensor([[0.45, -math.sqrt(1 - 0.45 ** 2)]]).repeat(60, 1)  # cosine 0.45
    train = (torch.cat([near, far]), torch.tensor([1] * 20 + [2] * 60))
    assert cjepa.knn_accuracy(train, (v, torch.tensor([1]))) == 100
    one_hot = F.one_hot(y, 3).float()  # features that are the labels: every neighbour agrees
    assert cjepa.knn_accuracy((one_hot, y), (one_hot, y)) == 100


def test_probe_features_are_the_last_n_blocks_mean_tokens():
    """2 of 4 blocks: the selection must take the last two, normed and mean-pooled, in order."""
    encoder = randomised(cjepa.VisionTransformer(28, 4, 32, 4, 2))
    images = torch.randn(3, 3, 28, 28, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        x, outputs = encoder.embed(images), []
        for block in encoder.blocks:
            x = block(x)
            outputs.append(encoder.norm(x).mean(dim=1))
        got = cjepa.probe_features(encoder, images, 2)
    torch.testing.assert_close(got, torch.cat(outputs[2:], dim=1))
    torch.testing.assert_close(cjepa.probe_features(encoder, images, 1), outputs[3])


def test_probe_rows_are_the_encoder_a_fresh_seeded_one_and_the_pixels(tmp_path, monkeypatch):
    args = cjepa.with_defaults(cjepa.parse_args(["--probe-epochs", "1", "--out", str(tmp_path)]))
    seen = []

    def fake_features(encoder, dataset, args, device, autocast):  # random features: fast
        seen.append(encoder)
        return torch.randn(len(dataset), 4), torch.randint(0, 10, (len(dataset),))

    monkeypatch.setattr(cjepa, "extract_features", fake_features)
    torch.manual_seed(1)
    trained = cjepa.make_encoder(args)
    results = cjepa.run_probe(trained, args, torch.device("cpu"), nullcontext())
    assert list(results) == ["cjepa_target_encoder", "random_init_encoder", "raw_pixels"]
    assert seen[0] is seen[1] is trained and seen[4] is seen[5] is None  # (train, val) each
    torch.manual_seed(args.seed)
    fresh = cjepa.make_encoder(args).state_dict()
    assert seen[2] is seen[3] and seen[2] is not trained
    assert all(torch.equal(v, fresh[k]) for k, v in seen[2].state_dict().items())
    assert json.load(open(tmp_path / "probe.json")) == results


def test_the_probe_head_scores_with_its_running_statistics():
    """The head's BatchNorm trains on batch statistics and scores with its running ones: a val set
    of one image per class is scored (in training mode BatchNorm would refuse a batch of one) and
    a val set shifted far from the train set scores as a fixed linear map of it would."""
    gen = torch.Generator().manual_seed(0)
    y = torch.arange(200) % 2
    x = torch.randn(200, 8, generator=gen) + 3.0 * y[:, None]  # two separable classes
    train = (x, y)
    for i in (0, 1):
        assert cjepa.train_linear_head(train, (x[i:i + 1], y[i:i + 1]), 5, "cpu") == 100.0
    # shifted by +100: the running statistics map every val image to class 1
    shifted = cjepa.train_linear_head(train, (x + 100.0, y), 5, "cpu")
    assert shifted == pytest.approx(50.0)


def test_knn_and_probe_sets_are_fixed_random_subsets_of_each_split(tmp_path):
    data = write_image_folder(str(tmp_path / "data"), n_per_class=20, splits=("train", "val"))
    args = tiny_args("--data", data)
    train, val = cjepa.eval_sets(args, 10)
    again = cjepa.eval_sets(args, 10)
    assert len(train) == len(val) == 10 and train.indices == again[0].indices
    assert train.indices != list(range(10)) and train.indices != val.indices  # random, per split
    assert {train.dataset.samples[i][1] for i in train.indices} == {0, 1}
    full = cjepa.eval_sets(args)
    assert len(full[0]) == len(full[1]) == 40


# --------------------------------------------------------------------- 5. one training step
def test_schedule_endpoints():
    args = tiny_args("--lr", "1e-3", "--start-lr", "1e-4", "--final-lr", "1e-6",
                     "--wd", "0.04", "0.4", "--ema", "0.996", "1.0")
    total, warmup = 1000, 150
    lr0, wd0, m0 = cjepa.schedules(0, total, warmup, args)
    lr1, _, _ = cjepa.schedules(warmup, total, warmup, args)
    lr2, wd2, m2 = cjepa.schedules(total, total, warmup, args)
    assert (lr0, wd0, m0) == pytest.approx((1e-4, 0.04, 0.996))
    assert lr1 == pytest.approx(1e-3)
    assert (lr2, wd2, m2) == pytest.approx((1e-6, 0.4, 1.0))
    lrs = [cjepa.schedules(s, total, warmup, args)[0] for s in range(total)]
    assert (max(lrs) == pytest.approx(1e-3)
            and all(a <= b for a, b in zip(lrs[:warmup], lrs[1:warmup + 1])))


def test_schedules_follow_their_formulas_at_every_step():
    args = tiny_args("--lr", "1e-3", "--start-lr", "1e-4", "--final-lr", "1e-6",
                     "--wd", "0.04", "0.4", "--ema", "0.996", "1.0")
    total, warmup = 1000, 150
    for step in range(total):
        if step < warmup:  # linear warm-up, then a cosine from the peak to final_lr
            lr = 1e-4 + (1e-3 - 1e-4) * step / warmup
        else:
            t = (step - warmup) / (total - warmup)
            lr = 1e-6 + (1e-3 - 1e-6) * 0.5 * (1 + math.cos(math.pi * t))
        wd = 0.4 + (0.04 - 0.4) * 0.5 * (1 + math.cos(math.pi * step / total))  # a cosine up
        m = 0.996 + (1.0 - 0.996) * step / total  # linear
        assert cjepa.schedules(step, total, warmup, args) == pytest.approx((lr, wd, m), rel=1e-9)


def test_weight_decay_only_on_weights():
    run = cjepa.build_run(tiny_args(), torch.device("cpu"), nullcontext())
    decayed = {id(p) for p in run["opt"].param_groups[0]["params"]}
    assert run["opt"].param_groups[1]["weight_decay"] == 0
    for key in ("encoder", "predictor"):
        for name, p in run[key].named_parameters():
            assert (id(p) in decayed) == (p.ndim >= 2 and not name.endswith("bias")), name


def test_one_training_step_changes_weights():
    torch.manual_seed(0)
    args = tiny_args("--vicreg", "0.01")
    run = cjepa.build_run(args, torch.device("cpu"), nullcontext())
    before = {k: v.clone() for k, v in run["encoder"].state_dict().items()}
    target_before = {k: v.clone() for k, v in run["target_encoder"].state_dict().items()}
    ctx, tgt = sample_masks(8, 7, 7, torch.Generator().manual_seed(0), min_keep=4)
    stats, target_means = cjepa.train_step(run, torch.randn(8, 3, 28, 28), ctx, tgt,
                                           1e-3, 0.04, 0.9, args)
    assert target_means.shape == (8, 128) and not target_means.requires_grad  # vit_demo: width 128
    assert math.isfinite(stats["loss"].item()) and stats["loss"].item() > 0
    after = run["encoder"].state_dict()
    assert not torch.equal(before["blocks.0.attn.qkv.weight"], after["blocks.0.attn.qkv.weight"])
    # the target moved 10% of the way towards the context encoder
    k = "blocks.0.attn.qkv.weight"
    torch.testing.assert_close(run["target_encoder"].state_dict()[k],
                               0.9 * target_before[k] + 0.1 * after[k])
    assert all(p.grad is None for p in run["target_encoder"].parameters())


def test_a_step_uses_its_schedules_and_a_run_starts_from_one_encoder():
    """The step's learning rate and weight decay are the ones it is given (biases and norms keep
    no decay); the target encoder starts as a copy of the context encoder; the features returned
    for the collapse monitors are the normalised targets, before the EMA moved the encoder."""
    torch.manual_seed(0)
    args = tiny_args()
    run = cjepa.build_run(args, torch.device("cpu"), nullcontext())
    target = run["target_encoder"].state_dict()
    for key, value in run["encoder"].state_dict().items():
        assert torch.equal(value, target[key]), key
    before = copy.deepcopy(run["target_encoder"])
    images = torch.randn(8, 3, 28, 28)
    ctx, tgt = sample_masks(8, 7, 7, torch.Generator().manual_seed(0), min_keep=4)
    _, target_means = cjepa.train_step(run, images, ctx, tgt, 3e-4, 0.25, 0.9, args)
    weights, others = run["opt"].param_groups
    assert (weights["lr"], weights["weight_decay"], others["lr"], others["weight_decay"]) == (
        3e-4, 0.25, 3e-4, 0.0)
    torch.testing.assert_close(target_means, cjepa.target_features(before, images).mean(dim=1))


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_step_matches_fp32(precision):
    """The GPU's AMP code path (autocast, GradScaler for fp16), run under CPU autocast: same losses
    as fp32 within half-precision tolerance, fp32 VICReg statistics, and a finite update."""
    args = tiny_args("--vicreg", "0.01")
    args.precision = precision
    ctx, tgt = sample_masks(8, 7, 7, torch.Generator().manual_seed(0), min_keep=4)
    images, stats = torch.randn(8, 3, 28, 28), {}
    for mode in ("fp32", precision):
        torch.manual_seed(0)
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(mode)
        autocast = torch.autocast("cpu", dtype=dtype) if dtype else nullcontext()
        run = cjepa.build_run(args, torch.device("cpu"), autocast)
        stats[mode], _ = cjepa.train_step(run, images, ctx, tgt, 1e-3, 0.04, 0.9, args)
    # loss scaling only where fp16 needs it
    assert run["scaler"].is_enabled() == (precision == "fp16")
    for key in ("loss", "ijepa", "sim", "std", "cov"):
        assert stats[precision][key].dtype == torch.float32
        torch.testing.assert_close(stats[precision][key], stats["fp32"][key], rtol=2e-2, atol=1e-3)
    assert all(torch.isfinite(p).all() for p in run["encoder"].parameters())


def test_fp16_gradscaler_steps_with_clipping_match_fp32():
    """The fp16 path with values (CPU autocast in float16 and a CPU GradScaler): two steps with
    gradient clipping at 0.05, so that clipping acts. The scaler must scale the loss, unscale the
    gradients before clipping, step and update: AdamW's moments (the clipped gradients) and the
    weights then follow the fp32 run within half-precision tolerance."""
    args = tiny_args("--vicreg", "0.01", "--clip", "0.05")
    ctx, tgt = sample_masks(8, 7, 7, torch.Generator().manual_seed(0), min_keep=4)
    images, runs = torch.randn(8, 3, 28, 28), {}
    for precision, autocast in (("fp32", nullcontext()),
                                ("fp16", torch.autocast("cpu", dtype=torch.float16))):
        args.precision = precision
        torch.manual_seed(0)
        runs[precision] = run = cjepa.build_run(args, torch.device("cpu"), autocast)
        for _ in range(2):
            cjepa.train_step(run, images, ctx, tgt, 1e-3, 0.04, 0.9, args)
    assert runs["fp16"]["scaler"].is_enabled() and runs["fp16"]["scaler"].get_scale() > 1
    for key in ("exp_avg", "exp_avg_sq"):
        moments = [torch.cat([s[key].flatten() for s in runs[p]["opt"].state.values()])
                   for p in ("fp32", "fp16")]
        ratio = moments[1].norm() / moments[0].norm()
        assert 0.9 < ratio < 1.1 and F.cosine_similarity(*moments, dim=0) > 0.98, (key, ratio)
    for a, b in zip(runs["fp32"]["encoder"].parameters(), runs["fp16"]["encoder"].parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=2e-3)


# ----------------------------------------------------------- the CUDA path, without a GPU
# This project has not yet run on a GPU. These tests run the CUDA code path on fake CUDA tensors
# (shapes, dtypes and devices, no values) and DDP on the meta device with a fake process group.
# They use torch internals: where a torch release has moved them, the tests skip with the reason.
def fake_cuda_mode():
    fake_tensor = pytest.importorskip("torch._subclasses.fake_tensor")
    from torch.cuda.amp import common
    if not hasattr(common, "amp_definitely_not_available"):
        pytest.skip("torch.cuda.amp.common.amp_definitely_not_available is gone")
    return fake_tensor.FakeTensorMode(allow_non_fake_inputs=True)


@contextlib.contextmanager
def cuda_amp_allowed():
    """autocast("cuda") and GradScaler("cuda") switch themselves off without a GPU: not here."""
    with mock.patch("torch.cuda.amp.common.amp_definitely_not_available", return_value=False), \
            mock.patch("torch.cuda.is_bf16_supported", return_value=True):
        yield


def backward_by_hand(run):
    """No backward runs on fake CUDA tensors: give every trained parameter a gradient instead."""
    def backward(loss, *args, **kwargs):
        for group in run["opt"].param_groups:
            for p in group["params"]:
                p.grad = torch.full_like(p, 1e-3)
    return backward


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_cuda_step_on_fake_tensors(precision):
    """The loss and one whole train_step on fake CUDA: autocast's dtypes, fused AdamW, the
    GradScaler (fp16), clipping and the EMA, with no tensor left on (or brought back to) the CPU."""
    args = tiny_args("--vicreg", "0.01", "--clip", "1")
    args.precision = precision
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    ctx, tgt = sample_masks(8, 7, 7, torch.Generator().manual_seed(0), min_keep=4)
    images = torch.randn(8, 3, 28, 28)
    torch.manual_seed(0)
    cpu_run = cjepa.build_run(args, torch.device("cpu"), nullcontext())
    cuda = torch.device("cuda")
    with fake_cuda_mode():
        run = dict(cpu_run)
        for key in ("encoder", "predictor", "target_encoder"):
            run[key] = cpu_run[key].to(cuda)
        with cuda_amp_allowed():
            run["autocast"] = torch.autocast("cuda", dtype=dtype)
            params = [*run["encoder"].parameters(), *run["predictor"].parameters()]
            run["opt"] = torch.optim.AdamW(  # as build_run makes it on CUDA
                [dict(params=[p for p in params if p.ndim >= 2], weight_decay=0.04),
                 dict(params=[p for p in params if p.ndim < 2], weight_decay=0.0)],
                lr=args.lr, fused=True)
            run["scaler"] = torch.amp.GradScaler("cuda", enabled=precision == "fp16")
            assert (run["opt"].defaults["fused"]
                    and run["scaler"].is_enabled() == (precision == "fp16"))
            with run["autocast"]:  # steps 1-3 of train_step, to see the tensors
                h = cjepa.target_features(run["target_encoder"], images.to(cuda))
                z = run["encoder"](images.to(cuda), ctx.to(cuda))
                p = run["predictor"](z, ctx.to(cuda), tgt.to(cuda))
                loss, terms = cjepa.cjepa_loss(p, cjepa.gather_tokens(h, tgt.to(cuda)), z, args)
            # the predictor's matmuls in half precision
            assert p.dtype == dtype and p.device.type == "cuda"
            assert loss.dtype == torch.float32 and loss.device.type == "cuda"
            # the whole step; a fake tensor has no value to test for NaN
            with mock.patch.object(torch.Tensor, "backward", backward_by_hand(run)), \
                    mock.patch.object(cjepa, "check_finite", lambda loss: None):
                terms, target_means = cjepa.train_step(run, images.to(cuda), ctx.to(cuda),
                                                       tgt.to(cuda), 1e-3, 0.04, 0.9, args)
        assert all(v.dtype == torch.float32 and v.device.type == "cuda" for v in terms.values())
        assert target_means.shape == (8, 128) and target_means.device.type == "cuda"
        first = next(run["encoder"].parameters())
        # AdamW stepped on the GPU
        assert run["opt"].state[first]["exp_avg"].device.type == "cuda"
        assert all(p.device.type == "cuda" for p in run["target_encoder"].parameters())


def test_probe_features_on_fake_cuda_come_back_to_host_memory():
    args = tiny_args()
    torch.manual_seed(0)
    encoder = cjepa.make_encoder(args)
    data = cjepa.DemoImages("test", augment=False)
    subset = torch.utils.data.Subset(data, range(300))
    # (a loader draws a seed: not on fake tensors)
    batches = list(torch.utils.data.DataLoader(subset, batch_size=256))
    with fake_cuda_mode():
        encoder = encoder.to("cuda")
        with cuda_amp_allowed(), mock.patch.object(torch.utils.data, "DataLoader",
                                                   lambda *a, **k: batches):
            autocast = torch.autocast("cuda", dtype=torch.bfloat16)
            x, y = cjepa.extract_features(encoder, subset, tiny_args("--probe-blocks", "2"),
                                          torch.device("cuda"), autocast)
    assert x.shape == (300, 2 * 128) and x.dtype == torch.float32 and x.device.type == "cpu"
    assert y.shape == (300,) and y.device.type == "cpu"


def test_ddp_step_on_the_meta_device_with_a_fake_process_group():
    """The whole train_step under DDP with 2 ranks: VICReg's gather and its backward, DDP's
    gradient buckets, clipping, AdamW and the EMA, on meta tensors (shapes only)."""
    fake_pg = pytest.importorskip("torch.testing._internal.distributed.fake_pg")
    import torch.distributed as dist
    args = tiny_args("--vicreg", "0.01", "--clip", "1")
    meta = torch.device("meta")
    seen = {}
    real_vc, real_backward = cjepa.variance_covariance, cjepa.GatherBatch.backward

    def variance_covariance(c):
        seen["statistics of"] = c.shape
        return real_vc(c)

    def gather_backward(ctx, grad):
        seen["gather backward"] = grad.shape
        return real_backward(ctx, grad)

    # DDP's gradient all-reduce (the fake group's future is empty)
    def allreduce_hook(state, bucket):
        dist.all_reduce(bucket.buffer())
        seen["buckets"] = seen.get("buckets", 0) + 1
        done = torch.futures.Future()
        done.set_result(bucket.buffer())
        return done

    dist.init_process_group("fake", store=fake_pg.FakeStore(), rank=0, world_size=2)
    try:
        torch.manual_seed(0)
        run = cjepa.build_run(args, meta, nullcontext())
        # (DDP's start-up check of the shapes reads values, which meta tensors have not)
        with mock.patch("torch.nn.parallel.distributed._verify_param_shape_across_processes"):
            for key in ("encoder", "predictor"):
                run[key] = torch.nn.parallel.DistributedDataParallel(run[key])
        for key in ("encoder", "predictor"):
            run[key].register_comm_hook(None, allreduce_hook)
        ctx, tgt = sample_masks(8, 7, 7, torch.Generator().manual_seed(0), min_keep=4)
        with mock.patch.object(cjepa, "variance_covariance", variance_covariance), \
                mock.patch.object(cjepa.GatherBatch, "backward", staticmethod(gather_backward)), \
                mock.patch.object(cjepa, "check_finite", lambda loss: None):
            terms, _ = cjepa.train_step(run, torch.randn(8, 3, 28, 28, device=meta), ctx.to(meta),
                                        tgt.to(meta), 1e-3, 0.04, 0.9, args)
    finally:
        dist.destroy_process_group()
    assert seen["statistics of"] == (16, 128)  # the global batch: 2 ranks x 8 images
    assert seen["gather backward"] == (16, 128) and seen["buckets"] >= 2
    assert all(v.device.type == "meta" for v in terms.values())
    first = next(run["encoder"].parameters())
    assert run["opt"].state[first]["exp_avg"].device.type == "meta"


# ----------------------------------------------------------- 6, 8, 9. data, checkpoints, the loop
def test_short_run_drops_the_loss_and_writes_a_run_folder(tmp_path, capsys, monkeypatch):
    data = write_image_folder(str(tmp_path / "data"), n_per_class=32, splits=("train", "val"))
    out = str(tmp_path / "run")
    code, err = run_main(["--data", data, "--out", out, *TINY, "--epochs", "4", "--lr", "2e-3",
                          "--probe-epochs", "20"], capsys)
    assert code == 0, err
    log = [json.loads(line) for line in open(os.path.join(out, "log.jsonl"))]
    assert [line["epoch"] for line in log] == [1, 2, 3, 4]
    assert log[-1]["ijepa"] < log[0]["ijepa"]
    assert {"loss", "ijepa", "sim", "std", "cov", "lr", "wd", "momentum", "feat_std", "erank",
            "img_per_s", "knn"} <= set(log[0])
    ckpt = torch.load(os.path.join(out, "checkpoint.pt"), weights_only=True)
    assert ckpt["epoch"] == 4 and set(ckpt) >= {"encoder", "predictor", "target_encoder", "opt",
                                                "scaler", "args", "log", "step"}
    assert ckpt["args"]["arch"] == "vit_demo" and ckpt["log"] == log
    probe = json.load(open(os.path.join(out, "probe.json")))["cjepa_target_encoder"]
    # (mean-pooled tokens barely see stripe orientation: the demo test checks learning)
    assert 0 < probe <= 100
    code, err = run_main(["--probe-only", os.path.join(out, "checkpoint.pt"),
                          "--probe-epochs", "20", "--device", "cpu"], capsys)
    assert code == 0, err
    # named by its data: probe.json stays
    again = json.load(open(os.path.join(out, "probe_data.json")))
    assert again["cjepa_target_encoder"] == probe  # same features, same seed
    assert set(again) == {"cjepa_target_encoder", "random_init_encoder", "raw_pixels"}
    def read_only(*args, **kwargs):  # (tests run as root here, so chmod would not stop a write)
        raise PermissionError(13, "Permission denied", os.path.join(out, "probe.json"))
    monkeypatch.setattr(cjepa.json, "dump", read_only)
    code, err = run_main(["--probe-only", os.path.join(out, "checkpoint.pt"),
                          "--probe-epochs", "1", "--device", "cpu"], capsys)
    assert (code == 0 and "Traceback" not in err
            and "warning: could not save the probe result" in err), err
    # run again: a finished run says so, and changes nothing
    before = open(os.path.join(out, "checkpoint.pt"), "rb").read()
    cjepa.main(["--data", data, "--out", out, *TINY, "--epochs", "4"])
    assert "holds a finished run of 4 epochs" in capsys.readouterr().out
    assert open(os.path.join(out, "checkpoint.pt"), "rb").read() == before


def test_warmup_in_epochs_and_save_every_in_minutes_become_steps_and_seconds(tmp_path, capsys,
                                                                            monkeypatch):
    """--warmup counts epochs: 1.5 epochs of 3 steps are round(4.5) = 4 steps, of 6 in all; the
    log's schedules at each epoch's last step (steps 2 and 5) follow. --save-every counts minutes:
    on a clock that says 45 s have passed at every step, 0.5 minutes save within the epoch and 1
    minute does not."""
    data = write_image_folder(str(tmp_path / "data"))  # 24 images, batch 8: 3 steps an epoch
    flags = ["--data", data, *TINY, "--warmup", "1.5", "--lr", "1e-3", "--start-lr", "1e-4",
             "--final-lr", "1e-6", "--ema", "0.9", "1.0"]
    calls = []

    def time_now():  # the run's start, then 45 s later (and a millisecond per call more)
        calls.append(1)
        return 0.0 if len(calls) == 1 else 45.0 + 1e-3 * len(calls)

    saves, real_save = [], cjepa.save_checkpoint

    def save(run, log, args, epoch, step=0):
        saves.append((epoch, step))
        real_save(run, log, args, epoch, step)

    monkeypatch.setattr(cjepa, "save_checkpoint", save)
    for minutes, expected in (("1", [(1, 0), (2, 0)]), ("0.5", [(0, 1), (1, 0), (2, 0)])):
        saves.clear()
        calls.clear()
        monkeypatch.setattr(cjepa, "time", types.SimpleNamespace(time=time_now))
        code, err = run_main([*flags, "--save-every", minutes, "--out",
                              str(tmp_path / f"save{minutes}")], capsys)
        assert code == 0 and saves == expected, (minutes, saves, err)
    log = [json.loads(line) for line in open(tmp_path / "save1" / "log.jsonl")]
    assert log[0]["lr"] == pytest.approx(1e-4 + (1e-3 - 1e-4) * 2 / 4)  # step 2, warming up
    assert log[1]["lr"] == pytest.approx((1e-3 + 1e-6) / 2)  # step 5: half of the cosine
    momenta = [0.9 + 0.1 * 2 / 6, 0.9 + 0.1 * 5 / 6]
    assert [line["momentum"] for line in log] == pytest.approx(momenta)


class SigtermOnFirstItem(torch.utils.data.Dataset):
    """4 images; reading the first sends SIGTERM to the reading process (a loader worker)."""

    def __len__(self):
        return 4

    def __getitem__(self, i):
        if i == 0:
            os.kill(os.getpid(), signal.SIGTERM)
        return torch.zeros(3, 28, 28), 0


def test_the_monitors_loader_workers_leave_a_stop_signal_to_the_training_process():
    """torchrun sends SIGTERM to the whole process group: a loader worker of the k-NN monitor that
    gets it must live on (the training process stops after the epoch's save)."""
    args = tiny_args("--workers", "1", "--probe-blocks", "1")
    encoder = cjepa.make_encoder(args)
    feats, labels = cjepa.extract_features(encoder, SigtermOnFirstItem(), args, "cpu", nullcontext())
    assert feats.shape == (4, 128) and labels.tolist() == [0] * 4


def test_a_run_continues_in_fp16_from_a_checkpoint_saved_without_it(tmp_path):
    """fp32 and bf16 save an empty GradScaler state; fp16 then starts a scaler of its own."""
    args = tiny_args("--out", str(tmp_path))
    cjepa.save_checkpoint(cjepa.build_run(args, torch.device("cpu"), nullcontext()), [], args, 1)
    args.precision = "fp16"
    run = cjepa.build_run(args, torch.device("cpu"), nullcontext())
    assert cjepa.resume(run, str(tmp_path / "checkpoint.pt"))[0] == 1
    assert run["scaler"].is_enabled() and run["scaler"].get_scale() == 2.0 ** 16


def test_checkpoint_round_trip(tmp_path):
    torch.manual_seed(0)
    args = tiny_args()
    run = cjepa.build_run(args, torch.device("cpu"), nullcontext())
    ctx, tgt = sample_masks(8, 7, 7, torch.Generator().manual_seed(0), min_keep=4)
    cjepa.train_step(run, torch.randn(8, 3, 28, 28), ctx, tgt, 1e-3, 0.04, 0.9, args)
    args.out, path = str(tmp_path), str(tmp_path / "checkpoint.pt")
    cjepa.save_checkpoint(run, [{"epoch": 3}], args, 3, step=2)
    assert not os.path.exists(path + ".tmp")
    fresh = cjepa.build_run(args, torch.device("cpu"), nullcontext())
    assert cjepa.resume(fresh, path) == (3, 2, [{"epoch": 3}])
    for key in ("encoder", "predictor", "target_encoder"):
        for (k, a), b in zip(run[key].state_dict().items(), fresh[key].state_dict().values()):
            assert torch.equal(a, b), k
    assert (fresh["opt"].state_dict()["state"][0]["step"]
            == run["opt"].state_dict()["state"][0]["step"])
    assert open(tmp_path / "log.jsonl").read() == '{"epoch": 3}\n'


def test_resume_keeps_this_machines_adamw_implementation(tmp_path):
    """A checkpoint written with plain AdamW (a CPU run) resumed where AdamW is fused (CUDA) stays
    fused, and takes the same next step."""
    torch.manual_seed(0)
    args = tiny_args()
    run = cjepa.build_run(args, torch.device("cpu"), nullcontext())
    gen, images = torch.Generator().manual_seed(0), torch.randn(8, 3, 28, 28)
    cjepa.train_step(run, images, *sample_masks(8, 7, 7, gen, min_keep=4),
                     1e-3, 0.04, 0.9, args)
    args.out, path = str(tmp_path), str(tmp_path / "checkpoint.pt")
    cjepa.save_checkpoint(run, [], args, 1)
    masks, weights = sample_masks(8, 7, 7, gen, min_keep=4), {}
    for fused in (False, True):
        fresh = cjepa.build_run(args, torch.device("cpu"), nullcontext())
        groups = [dict(params=g["params"], weight_decay=g["weight_decay"])
                  for g in fresh["opt"].param_groups]
        # as build_run builds it on CUDA
        fresh["opt"] = torch.optim.AdamW(groups, lr=args.lr, fused=fused)
        cjepa.resume(fresh, path)
        assert all(g["fused"] == fused for g in fresh["opt"].param_groups)
        cjepa.train_step(fresh, images, *masks, 1e-3, 0.04, 0.9, args)
        weights[fused] = fresh["encoder"].state_dict()
    torch.testing.assert_close(weights[True], weights[False])


def assert_same_run(a, b):
    """Two checkpoints hold the same weights, bit for bit, after the same number of AdamW steps."""
    for key in ("encoder", "predictor", "target_encoder"):
        for k in a[key]:
            assert torch.equal(a[key][k], b[key][k]), f"{key}.{k}"
    assert a["opt"]["state"][0]["step"] == b["opt"]["state"][0]["step"]


def log_epochs(out):
    return [json.loads(line)["epoch"] for line in open(os.path.join(out, "log.jsonl"))]


def load(out):
    return torch.load(os.path.join(out, "checkpoint.pt"), weights_only=True)


KILL_AFTER_A_TIMED_SAVE = """
import sys, time, cjepa
real_step = cjepa.train_step
def slow_step(*args, **kwargs):  # slow enough for the test to kill it mid-epoch
    time.sleep(0.3)
    return real_step(*args, **kwargs)
cjepa.train_step = slow_step
cjepa.main(sys.argv[1:])
"""


def sigterm_at_call(n, monkeypatch):
    """train_step, with a SIGTERM to this process during its n-th call."""
    real_step, calls = cjepa.train_step, []

    def step_then_sigterm(*args, **kwargs):
        calls.append(1)
        if len(calls) == n:
            os.kill(os.getpid(), signal.SIGTERM)
        return real_step(*args, **kwargs)

    monkeypatch.setattr(cjepa, "train_step", step_then_sigterm)


def test_the_same_command_continues_from_any_step_to_the_same_weights(tmp_path, capsys,
                                                                      monkeypatch):
    """Stopped by SIGTERM in the middle of an epoch or at its last step, or killed (SIGKILL) after
    a timed mid-epoch save: the same command (as a requeued job runs it) continues the run, which
    ends bit for bit where the uninterrupted one does, and log.jsonl holds every epoch once."""
    data = write_image_folder(str(tmp_path / "data"))  # 24 images, batch 8: 3 steps an epoch
    flags = ["--data", data, *TINY, "--epochs", "3"]
    whole = str(tmp_path / "whole")
    assert run_main([*flags, "--out", whole], capsys)[0] == 0
    whole_log = [json.loads(line) for line in open(os.path.join(whole, "log.jsonl"))]

    # 1. SIGTERM during epoch 2, step 2: the step ends, the checkpoint is saved, exit 128 + 15;
    # 2. SIGTERM during the last step of epoch 1: the epoch ends, saves and stops
    # (the first with loader workers, which leave the signal to the training process)
    for n, where, saved, workers in ((5, "at epoch 2, step 2", (1, 2), "2"),
                                     (3, "after epoch 1", (1, 0), "0")):
        stopped = str(tmp_path / f"stopped{n}")
        sigterm_at_call(n, monkeypatch)
        code, err = run_main([*flags, "--out", stopped, "--workers", workers], capsys)
        monkeypatch.undo()
        assert code == 128 + signal.SIGTERM, err
        assert f"stopped by SIGTERM {where}; the same command continues" in err, err
        assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL  # handlers restored
        ckpt = load(stopped)
        assert (ckpt["epoch"], ckpt["step"]) == saved
        assert run_main([*flags, "--out", stopped], capsys)[0] == 0
        # fails if the resume restarts epoch 2 from its first batch
        assert_same_run(load(whole), load(stopped))
        log = [json.loads(line) for line in open(os.path.join(stopped, "log.jsonl"))]
        assert [line["epoch"] for line in log] == [1, 2, 3]
        assert log[1].get("resumed_at_step", 0) == saved[1] and "resumed_at_step" not in log[2]
        for key in ("loss", "ijepa", "erank"):  # epochs 1 and 3 as in the uninterrupted run
            assert log[0][key] == whole_log[0][key] and log[2][key] == whole_log[2][key], key

    # 3. SIGKILL after a timed save (--save-every) within an epoch
    killed = str(tmp_path / "killed")
    proc = subprocess.Popen([sys.executable, "-c", KILL_AFTER_A_TIMED_SAVE, *flags, "--out", killed,
                             "--save-every", "0.001"], cwd=HERE, stderr=subprocess.DEVNULL)
    path, deadline = os.path.join(killed, "checkpoint.pt"), time.time() + 120
    while time.time() < deadline:
        if os.path.exists(path) and torch.load(path, weights_only=True)["step"] > 0:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    ckpt = load(killed)
    assert ckpt["step"] > 0  # a mid-epoch save: only the steps after it are lost
    assert run_main([*flags, "--out", killed], capsys)[0] == 0
    assert_same_run(load(whole), load(killed))
    assert log_epochs(killed) == [1, 2, 3]


PROBE_GETS_SIGTERM = """
import os, signal, sys, cjepa
def killed_head(*args, **kwargs):  # a SIGTERM during the probe: the default action ends it
    os.kill(os.getpid(), signal.SIGTERM)
cjepa.train_linear_head = killed_head
cjepa.main(sys.argv[1:])
"""


def test_a_stop_signal_at_an_epochs_end_stops_there_and_the_probe_is_never_lost(tmp_path, capsys,
                                                                                monkeypatch):
    """SIGTERM during the last epoch's last step: the epoch saves, with no k-NN monitor and no
    probe, and the run exits 128 + 15. The same command then runs only the probe; killed during
    the probe, the same command probes again; a run with its probe says it is finished."""
    data = write_image_folder(str(tmp_path / "data"), splits=("train", "val"))
    out = str(tmp_path / "run")
    flags = ["--data", data, *TINY, "--epochs", "2", "--knn-images", "8", "--probe-epochs", "1",
             "--out", out]  # 24 images, batch 8: 3 steps an epoch
    sigterm_at_call(6, monkeypatch)
    code, err = run_main(flags, capsys)
    monkeypatch.undo()
    assert code == 128 + signal.SIGTERM and "stopped by SIGTERM after epoch 2" in err, err
    ckpt = load(out)
    assert (ckpt["epoch"], ckpt["step"]) == (2, 0)
    assert "knn" in ckpt["log"][0] and "knn" not in ckpt["log"][1]  # no monitor after the signal
    assert not os.path.exists(os.path.join(out, "probe.json"))
    # killed during the probe (a subprocess: the default SIGTERM ends the process)
    proc = subprocess.run([sys.executable, "-c", PROBE_GETS_SIGTERM, *flags], cwd=HERE,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == -signal.SIGTERM, proc.stderr[-2000:]
    assert not os.path.exists(os.path.join(out, "probe.json"))
    # the same command: the probe only, on the same weights
    steps = torch.load(os.path.join(out, "checkpoint.pt"), weights_only=True)["opt"]["state"][0]
    assert run_main(flags, capsys)[0] == 0
    assert set(json.load(open(os.path.join(out, "probe.json")))) == {
        "cjepa_target_encoder", "random_init_encoder", "raw_pixels"}
    assert load(out)["opt"]["state"][0]["step"] == steps["step"]  # no step trained
    capsys.readouterr()
    assert run_main(flags)[0] == 0
    assert "holds a finished run of 2 epochs" in capsys.readouterr().out


def test_a_stop_signal_stops_a_run_of_one_step_an_epoch(tmp_path, capsys, monkeypatch):
    """Every step is an epoch's last: a SIGTERM during the third stops the run after epoch 3."""
    data = write_image_folder(str(tmp_path / "data"))  # 24 images
    out = str(tmp_path / "run")
    sigterm_at_call(3, monkeypatch)
    code, err = run_main(["--data", data, *TINY, "--batch-size", "24", "--epochs", "300",
                          "--out", out], capsys)
    assert code == 128 + signal.SIGTERM and "after epoch 3;" in err, err
    assert (load(out)["epoch"], load(out)["step"]) == (3, 0)


def test_recipes_masks_fit_their_grids_and_help_shows_every_default(tmp_path, capsys):
    for recipe, grid in ((cjepa.DEMO, 7), (cjepa.PRETRAIN, 14), (cjepa.SMALL, 8)):
        cjepa.check_masks_fit(grid, argparse.Namespace(**recipe))  # (SMALL: 32 px images)
    data = write_image_folder(str(tmp_path / "data"), size=33)
    small = cjepa.with_defaults(cjepa.parse_args(["--data", data, "--recipe", "small"]))
    assert ((small.arch, small.epochs, small.vicreg, small.out, small.img_size)
            == ("vit_demo", 6, 0.01, "runs/small", 32))  # the first image's size, whole patches
    given = cjepa.with_defaults(cjepa.parse_args(["--data", data, "--recipe", "small",
                                                  "--img-size", "30", "--min-keep", "9"]))
    assert (given.img_size, given.min_keep) == (30, 9)  # given: kept
    with pytest.raises(SystemExit):
        cjepa.parse_args(["--help"])
    text = " ".join(capsys.readouterr().out.split())  # the help, its line breaks undone
    assert "--epochs EPOCHS (6 | 600 | 6)" in text
    assert "(0.99 1.0 | 0.996 1.0 | 0.99 1.0)" in text
    for key in cjepa.PRETRAIN:  # every setting is a flag
        assert "--" + key.replace("_", "-") in text, key


def test_batches_and_masks_do_not_depend_on_the_workers_or_the_start(tmp_path):
    data = write_image_folder(str(tmp_path / "data"), n_per_class=16)
    args = tiny_args("--data", data, "--batch-size", "4")
    batches = cjepa.EpochBatches(cjepa.make_dataset(args, "train", augment=True), args, 0, 1)
    batches.set_epoch(3)
    runs = {}
    for workers, start in ((0, 0), (2, 0), (2, 5)):
        loader = torch.utils.data.DataLoader(batches, batch_size=None, num_workers=workers,
                                             sampler=range(start, len(batches)))
        runs[workers, start] = list(loader)
    assert len(runs[0, 0]) == 8 and len(runs[2, 5]) == 3
    for ours, theirs in ((runs[0, 0], runs[2, 0]), (runs[0, 0][5:], runs[2, 5])):
        for a, b in zip(ours, theirs):  # images (random crops), labels, context and target masks
            assert all(torch.equal(x, y) for x, y in zip(a, b))
    first = runs[0, 0]
    assert not torch.equal(first[0][0], first[1][0]) and first[0][2].shape[0] == 4
    batches.set_epoch(4)  # another epoch: another order, other crops and masks
    assert not torch.equal(batches[0][0], first[0][0])


def test_each_batch_and_rank_draws_its_own_images_crops_and_masks(tmp_path):
    data = write_image_folder(str(tmp_path / "data"), n_per_class=16)  # 32 images
    args = tiny_args("--data", data, "--batch-size", "4")
    dataset = cjepa.make_dataset(args, "train", augment=True)
    ranks = [cjepa.EpochBatches(dataset, args, rank, 2) for rank in (0, 1)]
    for batches in ranks:
        batches.set_epoch(0)
    assert len(ranks[0]) == len(ranks[1]) == 32 // (4 * 2)  # whole global batches
    taken = [set(batches.order.flatten().tolist()) for batches in ranks]
    assert not taken[0] & taken[1] and len(taken[0] | taken[1]) == 32  # disjoint shares
    masks = [batches[b][2:] for batches in ranks for b in range(len(batches))]
    for i, one in enumerate(masks):  # no two batches, of one rank or of two, share their masks
        for other in masks[i + 1:]:
            assert not all(x.shape == y.shape and torch.equal(x, y) for x, y in zip(one, other))


def test_each_epoch_draws_its_own_order_of_every_image():
    args = tiny_args("--batch-size", "4")
    numbered = torch.utils.data.TensorDataset(torch.arange(32), torch.arange(32))  # image i is i
    batches = cjepa.EpochBatches(numbered, args, 0, 1)
    orders = []
    for epoch in (0, 1):
        batches.set_epoch(epoch)
        orders.append(torch.cat([batches[b][0] for b in range(len(batches))]).tolist())
    assert sorted(orders[0]) == sorted(orders[1]) == list(range(32))  # every image once an epoch
    assert orders[0] != orders[1]


def test_demo_images_flip_about_half_the_time():
    augmented = cjepa.DemoImages("test", augment=True)
    plain = cjepa.DemoImages("test", augment=False)
    torch.manual_seed(0)
    flipped = 0
    for i in range(400):
        x, y = augmented[i][0], plain[i][0]
        if not torch.equal(x, y):
            assert torch.equal(x, y.flip(-1))
            flipped += 1
    assert 150 < flipped < 250


# --------------------------------------------------------------------- 7. DDP and torchrun
def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ddp_batch():
    torch.manual_seed(1)
    images = torch.randn(8, 3, 28, 28)
    ctx, tgt = sample_masks(8, 7, 7, torch.Generator().manual_seed(1), min_keep=4)
    return images, ctx, tgt


def one_step(rank, world):
    """One training step on this rank's share of a fixed global batch of 8; returns the updated
    weights."""
    # a large VICReg weight: the gathered statistics matter
    args = tiny_args("--vicreg", "1.0", "--clip", "1.0")
    torch.manual_seed(0)
    run = cjepa.build_run(args, torch.device("cpu"), nullcontext())
    # SGD, so the weights' change is the gradient (Adam's first step is ~lr * sign(grad): it would
    # magnify rounding noise in near-zero gradients)
    run["opt"] = torch.optim.SGD([dict(params=g["params"]) for g in run["opt"].param_groups],
                                 lr=0.1)
    if world > 1:
        for key in ("encoder", "predictor"):
            run[key] = torch.nn.parallel.DistributedDataParallel(run[key])
    images, ctx, tgt = ddp_batch()
    share = slice(rank * 8 // world, (rank + 1) * 8 // world)
    cjepa.train_step(run, images[share], ctx[share], tgt[:, share], 0.1, 0.04, 0.99, args)
    return {key: cjepa.unwrap(run[key]).state_dict()
            for key in ("encoder", "predictor", "target_encoder")}


def ddp_worker(rank, world, port, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    weights = one_step(rank, world)
    if rank == 0:
        torch.save(weights, out)
    torch.distributed.destroy_process_group()


def test_ddp_step_equals_one_process_on_the_global_batch(tmp_path):
    out = str(tmp_path / "ddp.pt")
    torch.multiprocessing.spawn(ddp_worker, args=(2, free_port(), out), nprocs=2)
    ddp, single = torch.load(out, weights_only=True), one_step(0, 1)
    for key in single:
        for k in single[key]:
            torch.testing.assert_close(ddp[key][k], single[key][k], atol=2e-6, rtol=1e-4,
                                       msg=f"{key}.{k}")
    torch.manual_seed(0)
    initial = cjepa.make_encoder(tiny_args()).state_dict()["blocks.0.attn.qkv.weight"]
    # a real update
    assert (single["encoder"]["blocks.0.attn.qkv.weight"] - initial).abs().max() > 1e-4


TORCHRUN = [sys.executable, "-m", "torch.distributed.run"]
ONE_THREAD = {**os.environ, "OMP_NUM_THREADS": "1"}


def torchrun(*argv, launcher=("--standalone", "--nproc_per_node=2"), timeout=240):
    cmd = [*TORCHRUN, *launcher, os.path.join(HERE, "cjepa.py"), *argv]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=ONE_THREAD)


def ranks_disagree_worker(rank, world, port, out):
    """Each rank its own values: the reductions must take every rank's, not its own."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    # (the last: the same stop signal on every rank, as SIGTERM to a job reaches them all)
    result = {"max": cjepa.all_ranks_max([rank, 1 - rank, 0, 15], torch.device("cpu")),
              "mean": cjepa.rank_mean(torch.tensor([2.0 * rank, 1.0])).tolist()}
    try:  # only rank 1's loss is NaN: both ranks must stop
        cjepa.check_finite(torch.tensor(float("nan") if rank == 1 else 1.0))
        result["stopped"] = False
    except cjepa.CliError:
        result["stopped"] = True
    torch.save(result, f"{out}.{rank}")
    torch.distributed.destroy_process_group()


def test_reductions_over_ranks_take_every_ranks_value(tmp_path):
    out = str(tmp_path / "r")
    torch.multiprocessing.spawn(ranks_disagree_worker, args=(2, free_port(), out), nprocs=2)
    for rank in (0, 1):
        result = torch.load(f"{out}.{rank}", weights_only=True)
        assert result == {"max": [1, 1, 0, 15], "mean": [1.0, 1.0], "stopped": True}, rank


def test_torchrun_two_processes_train_and_probe(tmp_path):
    data = write_image_folder(str(tmp_path / "data"), splits=("train", "val"))
    out = str(tmp_path / "run")
    r = torchrun("--data", data, "--out", out, *TINY, "--batch-size", "4", "--epochs", "1",
                 "--probe-epochs", "5")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "2 process(es)" in r.stdout and "cjepa_target_encoder" in r.stdout
    log = [json.loads(line) for line in open(os.path.join(out, "log.jsonl"))]
    assert [line["epoch"] for line in log] == [1]  # only rank 0 writes
    # the k-NN monitor under DDP (rank 0 alone) gives what one process gives on the same encoder
    args = tiny_args("--data", data)
    encoder = cjepa.make_encoder(args)
    encoder.load_state_dict(load(out)["target_encoder"])
    train, val = (cjepa.extract_features(encoder, s, args, torch.device("cpu"), nullcontext())
                  for s in cjepa.eval_sets(args, args.knn_images))
    single = round(cjepa.knn_accuracy(train, val), 2)
    assert log[-1]["knn"] == single and 0 < single <= 100


def wait_for_a_save(out, at_least, proc, timeout=120):
    """Wait until out/checkpoint.pt is at (epoch, step) >= at_least."""
    path, deadline = os.path.join(out, "checkpoint.pt"), time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        try:
            ckpt = torch.load(path, weights_only=True)
            if (ckpt["epoch"], ckpt["step"]) >= at_least:
                return ckpt
        except (FileNotFoundError, EOFError, RuntimeError):  # not there yet
            pass
        time.sleep(0.05)
    raise AssertionError(f"no checkpoint at {at_least} in {out}")


def test_torchrun_stops_restarts_and_runs_on_two_nodes_like_one_uninterrupted_run(tmp_path):
    """Two torchrun launchers of one process each (two nodes) run uninterrupted; one launcher of
    2 processes ends with the same weights after SIGTERM to torchrun (every rank stops after the
    same step) and the same command, and after a worker killed under --max-restarts=1, which
    restarts the group from the last save."""
    # 48 images: 12 steps an epoch
    data = write_image_folder(str(tmp_path / "data"), n_per_class=24)
    flags = ["--data", data, *TINY, "--batch-size", "2", "--epochs", "5"]
    # two nodes, the uninterrupted run: two launchers of one process each, a c10d rendezvous
    whole, stopped, restarted = (str(tmp_path / name) for name in ("whole", "stopped", "restarted"))
    endpoint = f"--rdzv-endpoint=127.0.0.1:{free_port()}"
    nodes = [subprocess.Popen([*TORCHRUN, "--nnodes=2", "--nproc_per_node=1", "--rdzv-backend=c10d",
                               endpoint, "--rdzv-id=two_nodes",
                               os.path.join(HERE, "cjepa.py"), *flags, "--out", whole],
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                              env=ONE_THREAD)
             for _ in range(2)]
    assert all(node.wait(timeout=180) == 0 for node in nodes), nodes[0].stderr.read()[-3000:]
    whole_log = [json.loads(line) for line in open(os.path.join(whole, "log.jsonl"))]

    # 1. SIGTERM: torchrun passes it on to both ranks; rank 0 says where they stopped
    cmd = [*TORCHRUN, "--standalone", "--nproc_per_node=2", os.path.join(HERE, "cjepa.py"), *flags]
    proc = subprocess.Popen([*cmd, "--out", stopped], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, env=ONE_THREAD)
    wait_for_a_save(stopped, (1, 0), proc)
    time.sleep(0.3)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode != 0
    assert err.count("cjepa.py: stopped by SIGTERM") == 1, err[-3000:]
    ckpt = load(stopped)
    assert 1 <= ckpt["epoch"] < 5, "the signal came too late to test a continued run"
    r = torchrun(*flags, "--out", stopped)
    resumed = f"epochs {ckpt['epoch'] + 1}-5 from step {ckpt['step'] + 1}"
    assert r.returncode == 0 and resumed in r.stdout, r.stderr[-3000:]
    assert_same_run(load(whole), load(stopped))
    assert log_epochs(stopped) == list(range(1, 6))
    first = json.loads(open(os.path.join(stopped, "log.jsonl")).readline())
    assert first["loss"] == pytest.approx(whole_log[0]["loss"], rel=1e-6)  # the mean over ranks

    # 2. --max-restarts=1: a worker dies (SIGKILL) after a timed save in the middle of an epoch
    cmd = [*TORCHRUN, "--standalone", "--nproc_per_node=2", "--max-restarts=1",
           os.path.join(HERE, "cjepa.py"), *flags, "--out", restarted, "--save-every", "0.001"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=ONE_THREAD)
    wait_for_a_save(restarted, (1, 3), proc)
    workers = subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True,
                             text=True).stdout.split()
    assert len(workers) == 2
    os.kill(int(workers[1]), signal.SIGKILL)
    out, _ = proc.communicate(timeout=180)
    assert proc.returncode == 0, out[-3000:]
    assert out.count("process(es) on cpu") == 2, out[-3000:]  # the start, and the restart
    assert "connectFullMesh" not in out, out[-3000:]
    assert_same_run(load(whole), load(restarted))
    assert log_epochs(restarted) == list(range(1, 6))


# --------------------------------------------------------------------- bad input, crashes
def assert_one_line_error(code, err, *fragments):
    assert code == 2, err
    # (tqdm bars share stderr)
    lines = [line for line in err.replace("\r", "\n").splitlines() if "error:" in line]
    assert ("Traceback" not in err and len(lines) == 1
            and lines[0].startswith("cjepa.py: error: ")), err
    for fragment in fragments:
        assert fragment in lines[0], err


def test_clear_errors_for_bad_input(tmp_path, capsys):
    empty = tmp_path / "empty"
    (empty / "train").mkdir(parents=True)
    data = write_image_folder(str(tmp_path / "data"))
    out = ["--out", str(tmp_path / "run")]
    assert_one_line_error(*run_main(["--data", str(tmp_path / "nope"), *TINY, *out], capsys),
                          "No such file or directory", "nope/train")
    assert_one_line_error(*run_main(["--data", str(empty), *TINY, *out], capsys), "class folder")
    assert_one_line_error(*run_main(["--data", data, *TINY, *out, "--img-size", "30"], capsys),
                          "not a multiple of the patch size 4")
    assert_one_line_error(*run_main(["--data", data, *TINY, *out, "--min-keep", "20"], capsys),
                          "do not fit a 7x7")
    assert_one_line_error(*run_main(["--data", data, *TINY, *out, "--precision", "fp16"], capsys),
                          "needs CUDA")
    if not torch.cuda.is_available():
        assert_one_line_error(*run_main(["--data", data, *TINY, *out, "--device", "cuda"], capsys),
                              "has no CUDA")
    assert_one_line_error(*run_main(["--data", data, *TINY, *out, "--batch-size", "64"], capsys),
                          "fewer than one global batch")
    assert_one_line_error(*run_main(["--data", data, *TINY, *out, "--batch-size", "1"], capsys),
                          "at least 2")
    assert_one_line_error(*run_main(["--data", data, *TINY, *out, "--pred-width", "30"], capsys),
                          "multiple of 4")
    assert_one_line_error(*run_main([*out, "--img-size", "32"], capsys), "demo's images are 28")
    assert_one_line_error(*run_main(["--recipe", "small", *out], capsys), "give --data DIR")
    assert_one_line_error(*run_main(["--probe-only", str(tmp_path / "missing.pt")], capsys),
                          "is not a checkpoint", "No such file")
    not_ckpt = tmp_path / "notes.txt"
    not_ckpt.write_text("hello")
    assert_one_line_error(*run_main(["--probe-only", str(not_ckpt)], capsys), "is not a checkpoint")
    torch.save({"weights": torch.zeros(3)}, tmp_path / "other.pt")
    assert_one_line_error(*run_main(["--probe-only", str(tmp_path / "other.pt")], capsys),
                          "not an I-JEPA or C-JEPA checkpoint")
    os.makedirs(tmp_path / "run")  # a run folder whose checkpoint.pt is no checkpoint
    (tmp_path / "run" / "checkpoint.pt").write_bytes(b"")
    assert_one_line_error(*run_main(["--data", data, *TINY, *out], capsys), "is not a checkpoint")


def test_val_classes_must_be_trains_and_probe_needs_val(tmp_path, capsys):
    data = write_image_folder(str(tmp_path / "data"), splits=("train", "val"))
    out = ["--out", str(tmp_path / "run")]
    os.rename(os.path.join(data, "val", "class1"), os.path.join(data, "val", "class9"))
    assert_one_line_error(*run_main(["--data", data, *TINY, *out], capsys),
                          "must hold the classes of")
    assert not os.path.exists(tmp_path / "run")  # said before anything trained
    os.rename(os.path.join(data, "val", "class9"), os.path.join(data, "val", "class1"))
    os.makedirs(os.path.join(data, "val", "class2"))  # one class more than train/
    Image.new("RGB", (36, 36)).save(os.path.join(data, "val", "class2", "x.png"))
    assert_one_line_error(*run_main(["--data", data, *TINY, *out], capsys),
                          "must hold the classes of")
    no_val = write_image_folder(str(tmp_path / "no_val"))
    assert run_main(["--data", no_val, *TINY, *out, "--epochs", "1", "--probe-epochs", "2"],
                    capsys)[0] == 0  # trains, without the k-NN monitor and the probe
    assert "knn" not in json.loads(open(tmp_path / "run" / "log.jsonl").readline())
    assert_one_line_error(*run_main(["--probe-only", str(tmp_path / "run" / "checkpoint.pt")],
                                    capsys), "has no val/ folder")


def test_resume_of_another_architecture_names_the_mismatch(tmp_path, capsys):
    data = write_image_folder(str(tmp_path / "data"))
    out = str(tmp_path / "run")
    assert run_main(["--data", data, "--out", out, *TINY, "--epochs", "1"], capsys)[0] == 0
    before = load(out)
    code, err = run_main(["--data", data, "--out", out, *TINY, "--pred-width", "48"], capsys)
    assert_one_line_error(code, err, "is of another architecture", "size mismatch")
    assert_same_run(before, load(out))


def test_nan_loss_stops_with_the_step_and_keeps_the_last_good_checkpoint(tmp_path, capsys,
                                                                          monkeypatch):
    data = write_image_folder(str(tmp_path / "data"))
    out = str(tmp_path / "run")
    real_loss, calls = cjepa.cjepa_loss, []

    def loss_that_explodes(*a, **k):  # 3 steps per epoch: the 5th call is epoch 2, step 2
        loss, stats = real_loss(*a, **k)
        calls.append(1)
        return (loss * float("nan") if len(calls) == 5 else loss), stats

    monkeypatch.setattr(cjepa, "cjepa_loss", loss_that_explodes)
    code, err = run_main(["--data", data, "--out", out, *TINY, "--epochs", "3"], capsys)
    assert_one_line_error(code, err, "the loss is nan", "before any weight changed")
    ckpt = load(out)
    assert ckpt["epoch"] == 1 and all(torch.isfinite(v).all() for v in ckpt["encoder"].values())


def test_an_unreadable_image_stops_the_run_and_is_named(tmp_path, capsys):
    data = write_image_folder(str(tmp_path / "data"))
    bad = os.path.join(data, "train", "class0", "broken.jpg")
    with open(bad, "wb") as f:
        f.write(b"\xff\xd8\xff\xe0 this is not really a jpeg")
    for workers in ("0", "2"):  # in the training process, and in a loader worker
        code, err = run_main(["--data", data, "--out", str(tmp_path / f"run{workers}"), *TINY,
                              "--epochs", "1", "--workers", workers], capsys)
        assert_one_line_error(code, err, bad, "unreadable image")


KILL_WHILE_SAVING = """
import argparse, sys, torch, cjepa
class Big:  # a model whose state dict is n numbers
    def __init__(self, n):
        self.n = n
    def state_dict(self):
        return {"x": torch.full((self.n,), float(self.n))}
run = {key: Big(10) for key in ("encoder", "predictor", "target_encoder", "opt", "scaler")}
args = argparse.Namespace(out=sys.argv[1])
cjepa.save_checkpoint(run, [], args, 1)
print("saved", flush=True)
run["encoder"] = Big(150_000_000)  # 600 MB: killed while writing
cjepa.save_checkpoint(run, [], args, 2)
"""


def test_checkpoint_survives_sigkill_during_write(tmp_path):
    path = str(tmp_path / "checkpoint.pt")
    proc = subprocess.Popen([sys.executable, "-c", KILL_WHILE_SAVING, str(tmp_path)], cwd=HERE,
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "saved"
    deadline = time.time() + 60
    while (not (os.path.exists(path + ".tmp") and os.path.getsize(path + ".tmp") > 0)
           and time.time() < deadline):
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    ckpt = torch.load(path, weights_only=True)  # the previous one, intact
    assert ckpt["epoch"] == 1 and torch.equal(ckpt["encoder"]["x"], torch.full((10,), 10.0))


def test_ddp_exits_when_a_rank_dies(tmp_path):
    data = write_image_folder(str(tmp_path / "data"))
    out = str(tmp_path / "run")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           os.path.join(HERE, "cjepa.py"),
           "--data", data, "--out", out, *TINY, "--batch-size", "2", "--epochs", "1000"]
    torchrun_proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                     env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        deadline = time.time() + 120
        while not os.path.exists(os.path.join(out, "log.jsonl")) and time.time() < deadline:
            time.sleep(0.2)
        assert os.path.exists(os.path.join(out, "log.jsonl")), "training did not start"
        workers = subprocess.run(["pgrep", "-P", str(torchrun_proc.pid)], capture_output=True,
                                 text=True).stdout.split()
        assert len(workers) == 2
        os.kill(int(workers[1]), signal.SIGKILL)
        t0 = time.time()
        assert torchrun_proc.wait(timeout=90) != 0
        assert time.time() - t0 < 90
        time.sleep(1)
        assert subprocess.run(["pgrep", "-P", str(torchrun_proc.pid)],
                              capture_output=True).returncode != 0
    finally:
        torchrun_proc.kill()


# --------------------------------------------------------------------- demo and benchmark
def test_short_demo_learns_from_the_shipped_images(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(cjepa.DemoImages, "__len__", lambda self: 1000)  # the first 1000 of each
    out = str(tmp_path / "demo")
    code, err = run_main(["--out", out, "--epochs", "2", "--probe-epochs", "10"], capsys)
    assert code == 0, err
    probe = json.load(open(os.path.join(out, "probe.json")))
    assert set(probe) == {"cjepa_target_encoder", "random_init_encoder", "raw_pixels"}
    assert probe["cjepa_target_encoder"] > 40  # chance is 10%
    assert [json.loads(line)["epoch"] for line in open(os.path.join(out, "log.jsonl"))] == [1, 2]


TINY_BENCHMARK = ["--benchmark", "--arch", "vit_demo", "--img-size", "28", "--batch-size", "8",
                  "--device", "cpu", "--pred-width", "32", "--pred-depth", "1", "--min-keep", "4",
                  "--workers", "0"]


def test_benchmark_prints_its_table(capsys):
    cjepa.main(TINY_BENCHMARK)
    out = capsys.readouterr().out
    assert "3 batches of masks, 3 timed steps" in out and "eager blocks" in out, out
    row = out.splitlines()[-2].split("|")
    assert float(row[1]) > 0 and float(row[4]) > 0  # images/s and GFLOP/image
    assert "MFU: none: it needs bf16 or fp16 on a GPU" in out and row[5].strip() == "-"


def test_compiled_blocks_train_like_eager_ones(monkeypatch):
    """--compile: the same losses and weights as eager over steps whose mask sizes differ (dynamic
    shapes, no recompilation per batch), and the same checkpoint keys. (With torch's aot_eager
    backend: inductor's code generation would take most of a minute on a cold cache.)"""
    real_compile = torch.nn.Module.compile
    monkeypatch.setattr(torch.nn.Module, "compile",
                        lambda self, **kw: real_compile(self, backend="aot_eager", **kw))
    args = tiny_args("--vicreg", "0.01")
    gen, images, runs, losses = torch.Generator().manual_seed(0), torch.randn(8, 3, 28, 28), {}, {}
    masks = [sample_masks(8, 7, 7, gen, min_keep=4, target_scale=s)
             for s in ((0.15, 0.15), (0.3, 0.3))]
    assert masks[0][1].shape != masks[1][1].shape
    for compile_ in (False, True):
        torch.manual_seed(0)
        runs[compile_] = cjepa.build_run(args, torch.device("cpu"), nullcontext())
        if compile_:
            cjepa.compile_blocks(runs[compile_])
        losses[compile_] = [cjepa.train_step(runs[compile_], images, *masks[0],
                                             1e-3, 0.04, 0.9, args)[0]["loss"]]
        # other mask sizes reuse the compiled blocks
        with torch._dynamo.config.patch(error_on_recompile=True):
            losses[compile_].append(cjepa.train_step(runs[compile_], images, *masks[1],
                                                     1e-3, 0.04, 0.9, args)[0]["loss"])
    torch.testing.assert_close(losses[True], losses[False], rtol=1e-4, atol=1e-5)
    eager, compiled = runs[False]["encoder"].state_dict(), runs[True]["encoder"].state_dict()
    assert list(compiled) == list(eager)
    torch.testing.assert_close(compiled, eager, rtol=1e-3, atol=1e-5)


# --------------------------------------------------------------------- visualize.py
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def run_visualize(argv, capsys):
    """visualize.main(argv) -> (exit code, stdout, stderr)."""
    try:
        visualize.main(argv)
        code = 0
    except SystemExit as e:
        code = e.code
    out = capsys.readouterr()
    return code, out.out, out.err


def png_size(path):
    with open(path, "rb") as f:
        assert f.read(8) == PNG_MAGIC, f"{path} is not a PNG"
    with Image.open(path) as im:
        return im.size


def official_checkpoint(path, img_size=32):
    """An official-format I-JEPA checkpoint of a vit_t16: 'module.' keys, no 'args'."""
    torch.manual_seed(0)
    with torch.device("meta"):  # the shapes, without the slow random init
        shapes = {k: v.shape for k, v
                  in cjepa.VisionTransformer(img_size, 16, 192, 12, 3).state_dict().items()}
    states = [{f"module.{k}": 0.02 * torch.randn(shape) for k, shape in shapes.items()}
              for _ in range(2)]
    torch.save(dict(encoder=states[0], target_encoder=states[1], predictor={}, opt={}, epoch=1,
                    lr=1e-3), path)
    return states


def test_attention_rows_sum_to_one_and_received_maps_follow_the_grid():
    torch.manual_seed(0)
    encoder = cjepa.VisionTransformer(28, 4, 32, 2, 2).eval()
    x = torch.randn(3, 3, 28, 28)
    attn = visualize.last_block_attention(encoder, x)
    assert attn.shape == (3, 2, 49, 49)
    with torch.no_grad():  # the weights are the last block's: the reference's, on the same tokens
        tokens = encoder.embed(x)
        for block in encoder.blocks[:-1]:
            tokens = block(tokens)
        _, reference = explicit_attention(encoder.blocks[-1].attn, encoder.blocks[-1].norm1(tokens))
    torch.testing.assert_close(attn, reference, atol=1e-6, rtol=1e-5)
    # each query's weights sum to 1
    torch.testing.assert_close(attn.sum(dim=-1), torch.ones(3, 2, 49))
    maps = visualize.received_attention(encoder, x)
    per_head = visualize.received_attention(encoder, x, per_head=True)
    assert maps.shape == (3, 1, 28, 28) and per_head.shape == (3, 2, 28, 28)
    # units of uniform: the mean is 1
    torch.testing.assert_close(maps.mean(dim=(1, 2, 3)), torch.ones(3))
    torch.testing.assert_close(per_head.mean(dim=1, keepdim=True), maps)
    received = attn.mean(dim=2).mean(dim=1) * 49  # [B, N]: by hand
    # patch (row, col) covers pixels 4*row.., 4*col..
    for b, row, col in ((0, 0, 6), (1, 5, 2), (2, 3, 3)):
        assert (maps[b, 0, 4 * row + 2, 4 * col + 1].item()
                == pytest.approx(received[b, 7 * row + col].item(), rel=1e-5))


def ours_checkpoint(path):
    """A checkpoint in our format, with the demo's full args (28 px, patch 4, data None)."""
    args = cjepa.with_defaults(cjepa.parse_args([]))
    torch.manual_seed(0)
    encoder, target = cjepa.make_encoder(args), cjepa.make_encoder(args)
    torch.save(dict(encoder=encoder.state_dict(), target_encoder=target.state_dict(), predictor={},
                    epoch=1, args=vars(args)), path)
    return encoder, target


def test_writes_a_png_for_our_checkpoint(tmp_path, capsys):
    ckpt = str(tmp_path / "checkpoint.pt")
    encoder, target = ours_checkpoint(ckpt)
    loaded_target, loaded_context, cfg = visualize.load_encoders(ckpt)
    # each encoder got its own weights
    for a, b in ((loaded_target, target), (loaded_context, encoder)):
        for (k, v), w in zip(a.state_dict().items(), b.state_dict().values()):
            assert torch.equal(v, w), k
    assert cfg.demo and cfg.min_keep == 4 and cfg.img_size // cfg.patch_size == 7
    # a demo-set image goes through prepare() exactly as the demo set normalises it
    data = cjepa.DemoImages("test", augment=False)
    shown, x = visualize.prepare(Image.fromarray(data.x[5].numpy()), cfg)
    torch.testing.assert_close(x, data[5][0])
    assert shown.shape == (28, 28, 3) and 0 <= shown.min() and shown.max() <= 1

    # default: 4 demo images + the photograph, attention.png next to the checkpoint
    code, out, err = run_visualize([ckpt], capsys)
    assert code == 0, err
    png = str(tmp_path / "attention.png")
    assert out.strip() == png
    width, height = png_size(png)
    assert height > width > 300  # 5 rows, 3 columns
    with Image.open(png) as im:
        assert np.asarray(im.convert("L")).std() > 20  # not blank

    # --masks --heads on image files from a folder: 2 rows; 1 + 1 + 2 x 4 heads columns
    folder = tmp_path / "imgs"
    folder.mkdir()
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (40, 60, 3), dtype=np.uint8)).save(folder / "a.png")
    Image.fromarray(rng.integers(0, 255, (50, 30, 3), dtype=np.uint8)).save(folder / "b.jpg")
    (folder / "notes.txt").write_text("not an image")  # skipped: not an image extension
    heads = str(tmp_path / "heads.png")
    code, out, err = run_visualize([ckpt, str(folder), "--masks", "--heads",
                                    "--out", heads], capsys)
    assert code == 0, err
    assert out.strip() == heads
    width, height = png_size(heads)
    assert width > 3 * height  # 10 columns, 2 rows


def test_writes_a_png_for_an_official_checkpoint(tmp_path, capsys):
    ckpt = str(tmp_path / "IN1K-vit.t.16.pth.tar")
    states = official_checkpoint(ckpt)
    target, context, cfg = visualize.load_encoders(ckpt, "vit_t16", 32)
    # ImageNet-style; the published mask settings
    assert not cfg.demo and cfg.min_keep == 10
    for model, state in ((context, states[0]), (target, states[1])):
        assert torch.equal(model.blocks[11].attn.qkv.weight,
                           state["module.blocks.11.attn.qkv.weight"])
    out_png = str(tmp_path / "official.png")
    code, out, err = run_visualize([ckpt, "--arch", "vit_t16", "--img-size", "32",
                                    "--out", out_png], capsys)
    assert code == 0, err
    assert out.strip() == out_png
    width, height = png_size(out_png)
    assert height > width


def test_probe_only_of_an_official_checkpoint(tmp_path, capsys):
    data = write_image_folder(str(tmp_path / "data"), splits=("train", "val"), size=32)
    ckpt = str(tmp_path / "official" / "IN1K-vit.t.16.pth.tar")
    os.makedirs(os.path.dirname(ckpt))
    official_checkpoint(ckpt)
    argv = ["--probe-only", ckpt, "--arch", "vit_t16", "--img-size", "32", "--probe-epochs", "2",
            "--device", "cpu"]
    code, err = run_main(argv + ["--data", data], capsys)
    assert code == 0, err
    probe = json.load(open(tmp_path / "official" / "probe_data.json"))
    assert set(probe) == {"cjepa_target_encoder", "random_init_encoder", "raw_pixels"}
    assert_one_line_error(*run_main(argv, capsys), "the demo's images are 28")  # no --data
    assert_one_line_error(*run_main(argv[:2] + ["--data", data], capsys),
                          "name its architecture with --arch")


def test_one_line_errors_with_exit_code_2(tmp_path, capsys):
    ckpt = str(tmp_path / "official.pth.tar")
    official_checkpoint(ckpt)
    text = tmp_path / "notes.txt"
    text.write_text("hello\n")
    torch.save([1, 2, 3], str(tmp_path / "list.pt"))
    ours = str(tmp_path / "ours.pt")
    ours_checkpoint(ours)
    cases = [
        ([ckpt, "--arch", "vit_s16", "--img-size", "32"], "size mismatch"),  # another architecture
        ([ckpt, "--arch", "vit_t16", "--img-size", "64"], "pos_embed"),  # another image size
        ([ckpt, "--img-size", "32"], "name its architecture with --arch"),  # official, no --arch
        # a 2x2 grid: masks can't fit
        ([ckpt, "--arch", "vit_t16", "--img-size", "32", "--masks"], "--masks"),
        ([str(text)], "is not a checkpoint"),
        ([str(tmp_path / "list.pt")], "not an I-JEPA or C-JEPA checkpoint"),
        ([str(tmp_path / "missing.pt")], "is not a checkpoint"),
        ([ours, str(text)], "unreadable image"),
        ([ours, str(tmp_path / "nope.jpg")], "no such image"),
    ]
    for argv, expected in cases:
        code, out, err = run_visualize(argv + ["--out", str(tmp_path / "x.png")], capsys)
        assert code == 2, (argv, err)
        assert err.startswith("visualize.py: error: ") and err.count("\n") == 1, err
        assert expected in err, err
    assert not os.path.exists(tmp_path / "x.png")


def test_compare_draws_the_papers_four_columns(tmp_path, capsys):
    ours, other = str(tmp_path / "cjepa.pt"), str(tmp_path / "ijepa" / "checkpoint.pt")
    ours_checkpoint(ours)
    os.makedirs(os.path.dirname(other))
    ours_checkpoint(other)
    ckpt = torch.load(other, weights_only=True)
    ckpt["args"]["vicreg"] = 0.0  # an I-JEPA run
    torch.save(ckpt, other)
    target, context, cfg = visualize.load_encoders(ours)
    args = visualize.parse_args([ours, "--compare", other])
    titles = [title for title, _ in visualize.columns(target, context, cfg, args)]
    assert titles == ["I-JEPA target encoder\n(ijepa)", "C-JEPA target encoder",
                      "C-JEPA context encoder"]
    png = str(tmp_path / "compare.png")
    code, out, err = run_visualize([ours, "--compare", other, "--out", png], capsys)
    assert code == 0, err
    three = str(tmp_path / "three.png")
    assert run_visualize([ours, "--out", three], capsys)[0] == 0
    # one more column
    assert png_size(png)[0] > png_size(three)[0] and png_size(png)[1] == png_size(three)[1]
    official = str(tmp_path / "official.pth.tar")
    official_checkpoint(official)
    code, out, err = run_visualize([ours, "--compare", official, "--arch", "vit_t16",
                                    "--img-size", "32", "--out", str(tmp_path / "x.png")], capsys)
    assert (code == 2 and err.startswith("visualize.py: error: --compare")
            and err.count("\n") == 1), err
    assert "vit_t16 at 32 px" in err and "would not line up" in err


def test_curves_plot_runs_grouped_by_their_settings(tmp_path, capsys):
    data = write_image_folder(str(tmp_path / "data"), splits=("train", "val"))
    runs = []
    for vicreg, seed in (("0.01", "0"), ("0.01", "1"), ("0", "0")):
        out = str(tmp_path / f"v{vicreg}_s{seed}")
        assert run_main(["--data", data, "--out", out, *TINY, "--vicreg", vicreg,
                         "--seed", seed], capsys)[0] == 0
        runs.append(out)
    assert "knn" in json.loads(open(os.path.join(runs[0], "log.jsonl")).readline())
    fig = visualize.plot_runs(runs)
    labels = [text.get_text() for text in fig.axes[0].get_legend().get_texts()]
    assert labels == ["C-JEPA (beta_vicreg 0.01) (2 seeds)", "I-JEPA (beta_vicreg 0)"]
    band = fig.axes[1].collections[0].get_paths()[0].vertices[:, 1]  # k-NN: the 2 seeds' range
    knn = [[json.loads(line)["knn"] for line in open(os.path.join(run, "log.jsonl"))]
           for run in runs[:2]]
    assert min(band) == pytest.approx(min(map(min, knn)))
    code, out, err = run_visualize(["--curves", runs[0]], capsys)  # one run: OUT/curves.png
    assert code == 0 and out.strip() == os.path.join(runs[0], "curves.png"), err
    png = str(tmp_path / "fig1.png")
    code, out, err = run_visualize(["--curves", *runs, "--out", png], capsys)
    assert code == 0 and out.strip() == png, err
    assert png_size(png)[0] > 600
    code, out, err = run_visualize(["--curves", str(data)], capsys)
    assert code == 2 and "not a run folder" in err and err.count("\n") == 1, err


def test_curves_of_runs_of_different_lengths_draw_the_probes_against_the_epochs(tmp_path, capsys):
    """The paper's Figure 1 from run folders: C-JEPA's probe after 1 and 2 epochs (2 seeds at 1),
    I-JEPA's after 1, and the random-init encoder and raw pixels as flat lines at their means over
    the seeds. (Each probe.json is written here, with numbers that tell the runs apart.)"""
    data, first = write_image_folder(str(tmp_path / "data")), str(tmp_path / "first")
    assert run_main(["--data", data, "--out", first, *TINY, "--epochs", "1"], capsys)[0] == 0
    runs = {}
    for i, (epochs, vicreg, seed) in enumerate(((1, 0.01, 0), (1, 0.01, 1), (2, 0.01, 0),
                                                (1, 0.0, 0))):
        out = tmp_path / f"e{epochs}_v{vicreg}_s{seed}"  # the first run, as if with these flags
        out.mkdir()
        ckpt = load(first)
        ckpt["args"].update(epochs=epochs, vicreg=vicreg, seed=seed, out=str(out))
        torch.save(ckpt, out / "checkpoint.pt")
        (out / "log.jsonl").write_text(open(os.path.join(first, "log.jsonl")).read())
        runs[str(out)] = dict(cjepa_target_encoder=60.0 + 5 * i, random_init_encoder=40.0 + seed,
                              raw_pixels=80.0)
        (out / "probe.json").write_text(json.dumps(runs[str(out)]))
    fig = visualize.plot_runs(list(runs))
    (ax,) = fig.axes
    lines = {line.get_label(): line.get_xydata() for line in ax.get_lines()}
    np.testing.assert_allclose(lines["C-JEPA (beta_vicreg 0.01)"], [[1, 62.5], [2, 70.0]])
    np.testing.assert_allclose(lines["I-JEPA (beta_vicreg 0)"], [[1, 75.0]])
    band = ax.collections[0].get_paths()[0].vertices[:, 1]  # C-JEPA: the seeds' range at 1 epoch
    assert (min(band), max(band)) == (60.0, 70.0)
    for key, mean in (("random init encoder", 40.5), ("raw pixels", 80.0)):  # seeds 0 and 1
        assert set(lines[f"{key} (the mean over the seeds)"][:, 1]) == {mean}, lines
    assert ax.get_xscale() == "log" and ax.get_xlabel() == "pretraining epochs"
    assert list(ax.get_xticks()) == [1, 2]  # every run's epochs (I-JEPA's group has only 1)
    png = str(tmp_path / "figure1.png")
    code, out, err = run_visualize(["--curves", *runs, "--out", png], capsys)
    assert code == 0 and out.strip() == png and png_size(png)[0] > 400, err
    os.remove(os.path.join(list(runs)[2], "probe.json"))
    code, out, err = run_visualize(["--curves", *runs], capsys)
    assert code == 2 and "no probe.json" in err and err.count("\n") == 1, err


def test_script_entry_point(tmp_path, monkeypatch, capsys):
    """`python visualize.py FILE` runs main() (in-process via runpy: no second torch import)."""
    text = tmp_path / "notes.txt"
    text.write_text("hello\n")
    monkeypatch.setattr(sys, "argv", ["visualize.py", str(text)])
    with pytest.raises(SystemExit) as e:
        runpy.run_path(os.path.join(HERE, "visualize.py"), run_name="__main__")
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("visualize.py: error: ") and err.count("\n") == 1, err
