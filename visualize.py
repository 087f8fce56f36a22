r"""
visualize.py: where a C-JEPA checkpoint's encoders look (target beside context); runs' curves.

One row per image: the image, then the last block's attention in the target and in the context
encoder, as in the C-JEPA paper's figures. With no class token, a map shows the attention each
patch *receives*, averaged over the queries (and the heads, unless --heads), upsampled to the
image, in units of "uniform" (1: 1/N of the attention, as if every patch were attended alike).

    python visualize.py runs/demo/checkpoint.pt                 # 4 demo-set images, a photograph
    python visualize.py runs/demo/checkpoint.pt --masks --heads  # + a sampled mask, every head
    python visualize.py ckpt.pt photos/ cat.jpg --out cat.png    # your own images
    python visualize.py runs/demo/checkpoint.pt --compare runs/ijepa/checkpoint.pt  # Figures 3-5
    python visualize.py --curves runs/demo runs/ijepa       # loss, k-NN and rank per epoch
    python visualize.py --curves runs/e6 runs/e12 runs/e25  # runs of other lengths: Figure 1
"""
import argparse
import json
import os
import sys

import matplotlib
matplotlib.use("Agg")
import matplotlib.pyplot as plt
import torch
import torch.nn.functional as F
from matplotlib import cbook
from PIL import Image
from torchvision import transforms as T

import cjepa
from cjepa import CliError

EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp")
FASHION = ("T-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag",
           "ankle boot")


def load_encoders(path, arch=None, img_size=224):
    """cjepa.py's loader, plus what the figure needs: whether these are demo-set (grey 28 px)
    images, and the mask settings (an official checkpoint: the published ones)."""
    target, context, cfg = cjepa.load_encoders(path, arch, img_size)
    cfg.demo = hasattr(cfg, "data") and cfg.data is None
    if not hasattr(cfg, "n_targets"):  # an official I-JEPA checkpoint
        cfg = argparse.Namespace(**(cjepa.PRETRAIN | vars(cfg)))
    return target, context, cfg


# ---- the images ----------------------------------------------------------------------------------
def demo_images(n=4):
    """n test images of different classes from the demo set, and matplotlib's sample photograph."""
    data = cjepa.DemoImages("test", augment=False)
    labels = data.y.tolist()
    first = {y: labels.index(y) for y in list(dict.fromkeys(labels))[:n]}  # the first n to appear
    images = [(f"{FASHION[y]} (test #{i})", Image.fromarray(data.x[i].numpy()))
              for y, i in first.items()]
    with cbook.get_sample_data("grace_hopper.jpg") as f:
        images.append(("grace_hopper.jpg", Image.open(f).convert("RGB")))
    return images


def image_files(paths):  # files and folders -> [(name, PIL image)]
    files = []
    for p in paths:
        if os.path.isdir(p):
            found = sorted(os.path.join(p, f) for f in os.listdir(p)
                           if f.lower().endswith(EXTENSIONS))
            if not found:
                raise CliError(f"{p}: no {'/'.join(EXTENSIONS)} images in this folder")
            files += found
        elif os.path.isfile(p):
            files.append(p)
        else:
            raise CliError(f"{p}: no such image or folder")
    return [(os.path.basename(f), cjepa.load_image(f)) for f in files]


def prepare(image, cfg):
    """PIL image -> (what to show [H, W, 3] in 0..1, the model's input [3, H, W]), at the model's
    size: grey with the demo set's statistics for a demo model, else RGB with ImageNet's."""
    resize = T.Compose([T.Resize(cfg.img_size), T.CenterCrop(cfg.img_size), T.ToTensor()])
    shown = resize(image.convert("L" if cfg.demo else "RGB")).expand(3, -1, -1)
    mean, std = (((cjepa.DEMO_MEAN,) * 3, (cjepa.DEMO_STD,) * 3) if cfg.demo
                 else (cjepa.IMAGENET_MEAN, cjepa.IMAGENET_STD))
    return shown.permute(1, 2, 0), T.Normalize(mean, std)(shown)


# ---- the maps and the figure ---------------------------------------------------------------------
@torch.no_grad()
def last_block_attention(encoder, x):
    """x [B, 3, H, W] -> [B, heads, N, N]: the last block's attention weights,
    softmax(q k^T / sqrt(d)), spelled out (the model's fused attention need not form them)."""
    tokens = encoder.embed(x)
    for block in encoder.blocks[:-1]:
        tokens = block(tokens)
    last = encoder.blocks[-1]
    B, N, D = tokens.shape
    qkv = last.attn.qkv(last.norm1(tokens)).view(B, N, 3, last.attn.heads, D // last.attn.heads)
    q, k, _ = qkv.permute(2, 0, 3, 1, 4)  # each [B, heads, N, D/heads]
    return (q @ k.transpose(-2, -1) * q.shape[-1] ** -0.5).softmax(dim=-1)


@torch.no_grad()
def received_attention(encoder, x, per_head=False, mode="nearest"):
    """x [B, 3, H, W] -> [B, heads or 1, H, W]: the attention each patch receives in the last block,
    averaged over the queries (and the heads), x N (uniform = 1), upsampled to the image."""
    attn = last_block_attention(encoder, x)  # [B, heads, N queries, N keys]; rows sum to 1
    received = attn.mean(dim=2)  # [B, heads, N]: each key's column, averaged over the queries
    if not per_head:
        received = received.mean(dim=1, keepdim=True)
    maps = received.unflatten(2, (encoder.grid, encoder.grid)) * received.shape[-1]
    return F.interpolate(maps, size=x.shape[-2:], mode=mode)


def mask_overlay(cfg, gen):
    """One sampled mask, RGBA [grid, grid, 4]: the context blue, each target block its colour."""
    grid = cfg.img_size // cfg.patch_size
    try:
        cjepa.check_masks_fit(grid, cfg)  # a one-line error, not a fallback, where masks can't fit
    except CliError as e:
        raise CliError(f"--masks: {e}") from None
    ctx, tgt = cjepa.sample_masks(1, grid, grid, gen, cfg)  # [1, Kc], [M, 1, Kt]
    rgba = torch.zeros(grid * grid, 4)
    rgba[ctx[0]] = torch.tensor(plt.cm.tab10(0), dtype=torch.float)
    for m, idx in enumerate(tgt[:, 0]):
        rgba[idx] = torch.tensor(plt.cm.tab10(1 + m % 9), dtype=torch.float)
    rgba[:, 3] *= 0.6
    return rgba.view(grid, grid, 4).numpy()


def plot(images, encoders, cfg, args):
    """The figure: one row per image; columns image, [masks], then the map(s) of each encoder in
    `encoders`, a list of (title, encoder)."""
    shown, x = zip(*(prepare(im, cfg) for _, im in images))
    maps = torch.cat([received_attention(enc, torch.stack(x), args.heads, args.interp)
                      for _, enc in encoders], dim=1)  # [images, encoders (x heads), H, W]
    heads = range(maps.shape[1] // len(encoders)) if args.heads else [None]
    titles = (["image"] + ["sampled masks"] * args.masks
              + [name + ("" if i is None else f"\nhead {i}")
                 for name, _ in encoders for i in heads])
    fig, axes = plt.subplots(len(images), len(titles),
                             figsize=(2.2 * len(titles) + 0.6, 2.3 * len(images) + 0.5),
                             squeeze=False, layout="constrained")
    gen = torch.Generator().manual_seed(args.seed)
    for r, (name, _) in enumerate(images):
        for ax in axes[r]:
            ax.imshow(shown[r].numpy())
            ax.set(xticks=[], yticks=[])
        if args.masks:
            axes[r, 1].imshow(mask_overlay(cfg, gen),
                              extent=(-0.5, cfg.img_size - 0.5, cfg.img_size - 0.5, -0.5))
        for ax, m in zip(axes[r, 1 + args.masks:], maps[r]):  # one colour scale per row
            im = ax.imshow(m.numpy(), cmap="inferno", alpha=0.65, vmin=0,
                           vmax=maps[r].max().item())
        axes[r, 0].set_ylabel(name, fontsize=9)
        fig.colorbar(im, ax=axes[r, 1 + args.masks:].tolist(),
                     shrink=0.85, aspect=15).ax.tick_params(labelsize=7)
    for ax, title in zip(axes[0], titles):
        ax.set_title(title)
    epoch = "" if cfg.epoch is None else f", epoch {cfg.epoch}"
    heads = "" if args.heads else ", mean of the heads"
    masks = "; masks: blue = context, other colours = target blocks" if args.masks else ""
    fig.suptitle(f"{os.path.basename(args.checkpoint)} ({cfg.arch}, {cfg.img_size} px{epoch}): "
                 f"the attention each patch receives in the last block{heads}\n"
                 f"colour: \u00d7 uniform (1 = all patches alike){masks}", fontsize=10)
    return fig


def method(cfg):  # I-JEPA: beta_vicreg 0, or an official I-JEPA checkpoint
    return "C-JEPA" if getattr(cfg, "vicreg", 0) and hasattr(cfg, "data") else "I-JEPA"


def columns(target, context, cfg, args):
    """The encoders to draw, with their titles: with --compare, the other run's target first."""
    ours = [(f"{method(cfg)} target encoder", target), (f"{method(cfg)} context encoder", context)]
    if not args.compare:
        return ours
    other, _, other_cfg = load_encoders(args.compare, args.arch, args.img_size)
    mine = (cfg.arch, cfg.img_size, cfg.patch_size)
    theirs = (other_cfg.arch, other_cfg.img_size, other_cfg.patch_size)
    if mine != theirs:
        raise CliError(f"--compare {args.compare}: it is {theirs[0]} at {theirs[1]} px "
                       f"(patch {theirs[2]}), {args.checkpoint} is {mine[0]} at {mine[1]} px "
                       f"(patch {mine[2]}): the maps would not line up")
    return [(f"{method(other_cfg)} target encoder\n"
             f"({os.path.basename(os.path.dirname(os.path.abspath(args.compare)))})",
             other)] + ours


# ---- --curves: runs' log.jsonl, one point per epoch ----------------------------------------------
def read_run(folder):  # -> (its settings, its log lines, its probe table or None)
    log_path, ckpt_path = os.path.join(folder, "log.jsonl"), os.path.join(folder, "checkpoint.pt")
    if not os.path.exists(log_path) or not os.path.exists(ckpt_path):
        raise CliError(f"--curves {folder}: not a run folder (no log.jsonl and checkpoint.pt)")
    probe_path = os.path.join(folder, "probe.json")
    probe = json.load(open(probe_path)) if os.path.exists(probe_path) else None
    with open(log_path) as f:
        return cjepa.read_checkpoint(ckpt_path)["args"], [json.loads(line) for line in f], probe


def run_label(settings, varying):
    """C-JEPA or I-JEPA, with beta_vicreg and the other settings that differ between the runs."""
    label = ("I-JEPA (beta_vicreg 0)" if not settings["vicreg"]
             else f"C-JEPA (beta_vicreg {settings['vicreg']})")
    extra = [f"{k} {settings[k]}" for k in varying if k not in ("vicreg", "epochs")]
    return label + (", " + ", ".join(extra) if extra else "")


def plot_runs(folders):
    """Per epoch, the loss, k-NN monitor and effective rank; for runs of different lengths, the
    paper's Figure 1: probes against epochs. Runs alike but for the seed: mean and min-max band."""
    runs = [read_run(folder) for folder in folders]
    varying = [k for k in runs[0][0] if k not in ("seed", "out")
               and len({json.dumps(settings.get(k)) for settings, _, _ in runs}) > 1]
    figure_1 = "epochs" in varying
    panels = ({"probe": "linear probe top-1 % (target encoder)"} if figure_1 else
              {"loss": "training loss", "knn": "k-NN top-1 % (target encoder)",
               "erank": "effective rank of the target features"})
    groups = {}  # label -> one {panel: {epoch: value}} per run
    for folder, (settings, log, probe) in zip(folders, runs):
        if figure_1 and probe is None:
            raise CliError(f"--curves {folder}: no probe.json: its run's command probes it")
        if figure_1:  # one point: the probe after the run's last epoch
            log = [dict(epoch=settings["epochs"], probe=probe["cjepa_target_encoder"])]
        groups.setdefault(run_label(settings, varying), []).append(
            {key: {line["epoch"]: line[key] for line in log if key in line} for key in panels})
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels) + 1.5 * figure_1, 4),
                             squeeze=False, layout="constrained")
    for ax, (key, title) in zip(axes[0], panels.items()):
        for i, (label, group) in enumerate(groups.items()):
            xs = sorted(set().union(*(points[key] for points in group)))  # epochs
            values = [[points[key][x] for points in group if x in points[key]] for x in xs]
            seeds = f" ({len(group)} seeds)" if len(group) > 1 and not figure_1 else ""
            ax.plot(xs, [sum(v) / len(v) for v in values], marker=".", color=f"C{i}",
                    label=label + seeds)
            ax.fill_between(xs, [min(v) for v in values], [max(v) for v in values],
                            color=f"C{i}", alpha=0.2)
        ax.set(title=title, xlabel="pretraining epochs" if figure_1 else "epoch")
    for i, key in enumerate(("random_init_encoder", "raw_pixels") if figure_1 else ()):
        by_seed = {settings["seed"]: probe[key] for settings, _, probe in runs if key in probe}
        ax.axhline(sum(by_seed.values()) / max(1, len(by_seed)), color=f"C{len(groups) + i}",
                   linestyle="--", label=f"{key.replace('_', ' ')} (the mean over the seeds)")
        epochs = sorted({settings["epochs"] for settings, _, _ in runs})
        ax.set(xscale="log", xticks=epochs, xticklabels=epochs)
        ax.minorticks_off()  # the runs' epochs are the ticks
    axes[0, 0].legend(fontsize=8)
    return fig


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="visualize.py", description="Attention maps of a C-JEPA or "
                                "I-JEPA checkpoint's target and context encoders; or runs' curves.")
    p.add_argument("checkpoint", nargs="?", help="ours, or an official I-JEPA one (with --arch)")
    p.add_argument("images", nargs="*",
                   help="image files or folders (default: 4 demo-set images and a photograph)")
    p.add_argument("--arch", choices=cjepa.ARCHS, help="official I-JEPA checkpoints only")
    p.add_argument("--img-size", type=int, default=224, help="official I-JEPA checkpoints only")
    p.add_argument("--compare", metavar="CKPT", help="another run's checkpoint: its target "
                   "encoder's maps come first, as in the paper's figures")
    p.add_argument("--curves", nargs="+", metavar="RUN", help="instead of maps: these run "
                   "folders' loss, k-NN and rank per epoch; runs of other lengths: their probes")
    p.add_argument("--heads", action="store_true", help="one panel per head, not their mean")
    p.add_argument("--masks", action="store_true", help="add a column: one sampled mask")
    p.add_argument("--interp", choices=("nearest", "bilinear"), default="nearest")
    p.add_argument("--seed", type=int, default=0, help="of the sampled masks")
    p.add_argument("--out", help="the PNG to write (default: attention.png next to the checkpoint; "
                   "with --curves, curves.png in the first run folder)")
    args = p.parse_args(argv)
    if (args.checkpoint is None) == (args.curves is None):
        p.error("give a checkpoint, or --curves and run folders")
    return args


def main(argv=None):
    args = parse_args(argv)
    try:
        if args.curves:
            out = args.out or os.path.join(args.curves[0], "curves.png")
            fig = plot_runs(args.curves)
        else:
            target, context, cfg = load_encoders(args.checkpoint, args.arch, args.img_size)
            encoders = columns(target, context, cfg, args)
            images = image_files(args.images) if args.images else demo_images()
            out = args.out or os.path.join(os.path.dirname(os.path.abspath(args.checkpoint)),
                                           "attention.png")
            fig = plot(images, encoders, cfg, args)
        try:
            fig.savefig(out, dpi=100)
        except OSError as e:
            raise CliError(f"cannot write {out}: {e.strerror or e}") from None
        finally:
            plt.close(fig)
    except CliError as e:
        print(f"visualize.py: error: {e}", file=sys.stderr)
        sys.exit(2)
    print(out)
    return out


if __name__ == "__main__":
    main()
