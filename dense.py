"""CLIP with Quality Captions: A Strong Pretraining for Vision Tasks (arXiv 2405.08911, Vasu et al., Apple).

The paper's claim: the same CLIP recipe trained on well-aligned (captioner-written) captions gives a better backbone
for semantic segmentation and depth estimation than alt-text, and beats MAE-style pre-training. This script is the
instrument: it fine-tunes any image backbone the repository writes or loads with a dense head and reports
single-scale mIoU (segmentation) or RMSE / AbsRel / delta<1.25 (depth). The pre-training itself is mobileclip.py with
`--caption-source synthetic|mix` (README, "CLIP with quality captions").

What is here: backbones (plain ViTs, MCi, SAM / SAM-CLIP encoders, MAE / timm ViTs) as feature pyramids (BEiT/MAE's
ViT-UperNet adapter: four blocks -> strides 4/8/16/32 by deconvolution and pooling; MCi's stage outputs); UperNet (PPM
+ FPN) with mmseg's auxiliary FCN head; the deconvolution depth head with the scale-invariant log loss; sliding-window
evaluation; ADE20K and NYUv2 folders and tar shards with seg.png / depth.png (the synthetic world's); protocol
presets; `compare`, the paper's comparison on the synthetic world. Left out: multi-scale / flip testing, EMA, mmseg's
photometric distortion, drop path and layer scale (the MAE config's 0.1, 1.0), NYUv2's Eigen crop, MobileCLIP-B.

Defaults where the spec is silent or unverified (spec 3.2, 7):
  segmentation  UperNet 512 wide, 512 crops, random short-side scale 0.5-2.0 x crop and flip, AdamW lr 3e-5 cosine
                to 3e-6, wd 0.1, 500 warm-up steps, 50 epochs of 4 x 8 GPUs (CoreNet's CatLIP ADE20K recipe, with the
                spec's UperNet head)
  depth         deconvolution head (3 x [deconv 4x4/2, BN, ReLU], 3x3 conv, sigmoid x max depth) on the deepest
                feature, SILog loss (lambda 0.85, x10), AdamW lr 1e-4 cosine, wd 0.01, 480 crops, 25 epochs of 4 x 8
                GPUs; metrics per image over valid pixels (depth > 0), then averaged
  new layers    head and ViT adapter at 10 x the backbone's lr (mmseg's decode-head lr_mult = 10)
  the world     2,400 images, 2 epochs of batch 16 (300 steps), lr 5e-4, wd 0.05, 64-px crops (a CPU run)
  evaluation    short side resized to the crop, crop windows slid at stride 2/3 crop (outputs averaged), resized to
                the label; common.miou of the whole set's confusion matrix (mmseg's IoUMetric), ignore index 255,
                ADE20K's reduce-zero-label on folders
  bad images    a training image that does not read is replaced by a random other one (counted), an evaluation
                image is left out (counted); more than --max-skip-frac of them stops the run with one line
Presets (--preset NAME: every field still at its default takes the preset's value; the run prints what it set):
  mae    mmseg's MAE-B UperNet ADE20K 512x512 160k config (48.1 mIoU, the MAE result the paper compares with):
         blocks 3,5,7,11 of 12 (--taps beit, BEiT's too), UperNet 768 wide, auxiliary FCN head (256 wide, on the
         stride-16 map, loss x0.4), AdamW lr 1e-4 for backbone and new layers, wd 0.05, layer decay 0.65, poly
         (power 1) to 0 with 1,500 warm-up steps, 160,000 steps of 16 images (2 x 8 GPUs), 512 crops, no clipping
  paper  the paper's text public here (abstract, spec 3.2) gives ADE20K, UperNet, 512 crops, ~160k iterations and
         single-scale mIoU, which `mae` sets; the rest is unknown, so `paper` is `mae`

Paper -> code:
  quality-caption pre-training (Sec. 3, spec 3.1)     -> mobileclip.py --caption-source (CaptionSource)
  ViT multi-scale adapter, MCi stages (spec 6)        -> ViTPyramid, tap_blocks, MCiPyramid, build/load_backbone
  segmentation head, loss, mIoU (spec 3.2, 5)         -> UperNet, FCNHead, F.cross_entropy, common.miou
  depth head, loss, RMSE (spec 3.2, 5)                -> DeconvDepthHead, silog_loss (+ reference), depth_errors
  the MAE protocol the paper compares with (Abstract) -> PRESETS, apply_preset, lr_scale
  frozen-feature probes                               -> LinearHead (--head linear --freeze-backbone)
  the claim on the synthetic world                    -> compare

Backbones: --model tiny | vit_tiny | vit_b32 | vit_b16 | vit_l16 | vit_l14 | vit_h16 (common.ViT), mobileclip_tiny |
mobileclip_s0..s4 | mobileclip2_s0..s4 (MCi), sam_<size> (SAM's encoder). --init: a mobileclip.py, catlip.py or
samclip.py run (--model is in it), a SAM .pth, an ml-mobileclip .pt or OpenCLIP MobileCLIP file (with --model), an
OpenAI / OpenCLIP ViT CLIP, an MAE / timm ViT; without it, random initialisation (the no-pre-training reference).

Commands:
  torchrun --nproc_per_node=8 dense.py seg --preset mae --model vit_b16 --init runs/b16/ckpt-100000.pt --data ADE/
  torchrun --nproc_per_node=8 dense.py seg --model mobileclip_s2 --init mobileclip_s2.pt --data ADE/
  torchrun --nproc_per_node=8 dense.py depth --model vit_b16 --init mae_pretrain_vit_base.pth --data nyuv2/
  python dense.py seg --init runs/x/ckpt-800.pt --head linear --freeze-backbone --data train/ --val-data val/
  python dense.py compare --pretrain-steps 400  # alt-text vs quality-caption CLIP -> mIoU and RMSE, synthetic world
Data: ADE/ = ADEChallengeData2016/{images,annotations}/{training,validation}/ (uint8 PNG labels, 0 = other);
nyuv2/{images,depth}/{train,test}/ (16-bit PNG, mm, 0 = invalid); tar shards with {jpg, seg.png, depth.png} (the
synthetic world's: label 0 = background, a class; depth 65535 = 1.0, 1 = near).
Result on the synthetic world (2-core CPU shared by four jobs; `compare`: tiny MCi CLIP, 400 steps of batch 128 per
caption source, then 300 fine-tuning steps per task; 1,000 held-out images), fine-tuned mIoU / RMSE: 17.0 / 0.135
without pre-training, 28.1 / 0.126 from alt-text CLIP, 23.5 / 0.129 from quality-caption CLIP (seed 1: 31.3 / 0.123
vs 21.0 / 0.128): with clean alt-text the paper's gain does not reproduce; with web-like alt-text (mobileclip.py
--alt-noise q) quality captions win from q ~ 0.375 (seed 0) or 0.5 (seed 1) on. README: all figures, commands.
"""
from __future__ import annotations

import dataclasses
import io
import json
import math
import os
import random
import tarfile
import time
import zlib
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image
from torch.nn.parallel import DistributedDataParallel as DDP

import common as C

@dataclass
class Config:
    data: str = ""  # ADE20K / NYUv2 root (images/ + annotations/ or depth/) or tar shards; empty = synthetic world
    val_data: str = ""  # held-out tar shards or folder root (a --data root uses its validation split)
    model: str = ""  # a ViT of VITS (tiny = vit_tiny), a MobileCLIP MCi model, sam_<size>; empty = the --init run's
    init: str = ""  # backbone weights: a run or file of this repo, OpenAI/OpenCLIP, ml-mobileclip, SAM, MAE/timm
    out: str = "runs/dense"  # run directory: config.json, log.jsonl, checkpoints
    head: str = "auto"  # auto (upernet for seg, deconv for depth) | upernet | deconv | linear (BN + 1x1 conv probe)
    freeze_backbone: bool = False  # train the head (and the ViT adapter) only: a frozen-feature probe
    normalize: str = "auto"  # input normalisation: auto (by backbone and file) | clip | imagenet | none
    crop: int = 0  # training crop and sliding window (0 = 512 seg / 480 depth on folders, the model's size on shards)
    channels: int = 0  # head width (0 = 512 for UperNet, 256 for the depth head; 64/32 for backbones <= 256 wide)
    epochs: float = 0  # passes over the training images (0 = the task's default)
    steps: int = 0  # optimizer steps; overrides --epochs when > 0
    batch_size: int = 4  # per process
    lr: float = 0.0  # peak learning rate of the backbone (0 = the task's default)
    head_lr: float = 0.0  # peak learning rate of the new layers (0 = 10 x --lr, mmseg's decode-head lr_mult)
    min_lr_ratio: float = 0.1  # cosine floor as a fraction of the peak (CoreNet: 3e-5 -> 3e-6)
    weight_decay: float = -1.0  # AdamW weight decay (-1 = the task's default)
    warmup: int = 500  # linear warm-up steps (at most a fifth of the run)
    grad_clip: float = 1.0  # global gradient-norm clip; 0 = off
    layer_decay: float = 1.0  # lr x decay^(L - i) for backbone layer i of L (BEiT/MAE use 0.65); 1 = off
    schedule: str = "cosine"  # cosine (to --min-lr-ratio) | poly (mmseg's, power 1: linear from the first step)
    taps: str = "quarters"  # ViT blocks read: quarters (2,5,8,11 of 12) | beit (3,5,7,11 of 12) | four indices
    train_images: int = 0  # use only the first N training images (0 = all)
    val_images: int = 0  # evaluate on the first N held-out images (0 = all)
    seed: int = 0  # model init, data order, augmentation
    workers: int = 4  # DataLoader workers per rank
    device: str = "auto"  # auto | cuda | cpu
    precision: str = "auto"  # auto (bf16 autocast on GPU, fp32 on CPU) | bf16 | fp32
    log_every: int = 50  # steps between log lines (the only host syncs of the loop)
    eval_every: int = 0  # steps between evaluations; 0 = at the end only
    ckpt_every: int = 1000  # steps between checkpoints
    keep_ckpts: int = 2  # newest checkpoints kept in --out
    resume: str = ""  # 'auto' = the latest checkpoint in --out (fresh if none), or a checkpoint path
    overwrite: bool = False  # start over in an --out that holds another run's checkpoints (moved to OUT/previous-N/)
    eval_only: bool = False  # evaluate --resume (a fine-tuned checkpoint) and exit
    cache_dir: str = ""  # where the synthetic world is generated (default ~/.cache/effclip)
    max_skip_frac: float = 0.5  # stop if more than this fraction of the images read is unreadable

@dataclass
class SegConfig(Config):
    preset: str = ""  # a published protocol (PRESETS: mae | paper) for every flag left at its default
    aux_weight: float = 0.0  # weight of the auxiliary FCN head's loss (mmseg's MAE/BEiT configs: 0.4); 0 = no head
    reduce_zero_label: str = "auto"  # on = label 0 ignored, 1..K -> 0..K-1 (auto: on for folders, off for shards)
    classes: int = 0  # classes after the shift (0 = 150 for folders; 11 for the synthetic world's shards)

@dataclass
class DepthConfig(Config):
    depth_scale: float = 0.0  # PNG value / scale = depth (0 = 1000 for folders, NYUv2 mm; 65535 for shards)
    max_depth: float = 0.0  # the head's output range (0 = 10 for folders, NYUv2 metres; 1 for shards)

TASK_DEFAULTS = {"seg": dict(crop=512, epochs=50, lr=3e-5, weight_decay=0.1, scale=(0.5, 2.0)),  # folders: spec 3.2 and
                 "depth": dict(crop=480, epochs=25, lr=1e-4, weight_decay=0.01, scale=(1.0, 1.0))}  # the docstring
# The synthetic world (no --data): 64-px images, a few thousand, a shorter and hotter schedule (a CPU run; README).
WORLD_DEFAULTS = dict(train_images=2400, epochs=2, lr=5e-4, weight_decay=0.05)
# --preset (docstring): mmseg's configs/mae/upernet_mae-base_fp16_8x2_512x512_160k_ade20k.py and its bases; the new
# layers at the base lr (mmseg's layer-decay constructor gives them decay^0); global_batch is split over the ranks.
PRESETS = {"mae": dict(head="upernet", taps="beit", channels=768, aux_weight=0.4, crop=512, steps=160_000,
                       global_batch=16, lr=1e-4, head_lr=1e-4, weight_decay=0.05, layer_decay=0.65, schedule="poly",
                       min_lr_ratio=0.0, warmup=1500, grad_clip=0.0)}
PRESETS["paper"] = PRESETS["mae"]  # its public text gives nothing that differs (docstring)

# Plain ViTs (common.ViT). `image_size` is the size the positions were trained at; other sizes interpolate them.
VITS = {"vit_tiny": dict(image_size=64, patch=8, width=128, layers=4, heads=4),  # mobileclip.py / catlip.py `tiny`
        "vit_b32": dict(image_size=224, patch=32, width=768, layers=12, heads=12),
        "vit_b16": dict(image_size=224, patch=16, width=768, layers=12, heads=12),
        "vit_l16": dict(image_size=224, patch=16, width=1024, layers=24, heads=16),
        "vit_l14": dict(image_size=224, patch=14, width=1024, layers=24, heads=16),
        "vit_h16": dict(image_size=224, patch=16, width=1280, layers=32, heads=20)}
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)

# ==== 1. Backbones -> a feature pyramid (spec 6: strides 4/8/16/32 for FPN/UperNet) ===================================
def resize_positions(pos: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """(1 + g*g, D) learned positions (class token first) -> (1 + h*w, D), the grid resized bicubically
    (spec 6: 32 x 32 tokens at 512 px for ViT-B/16)."""
    g = math.isqrt(pos.shape[0] - 1)
    if (g, g) == (h, w):
        return pos
    grid = pos[1:].reshape(1, g, g, -1).permute(0, 3, 1, 2)  # (1, D, g, g)
    grid = F.interpolate(grid.float(), size=(h, w), mode="bicubic", align_corners=False).to(pos.dtype)
    return torch.cat([pos[:1], grid.flatten(2)[0].t()])  # (1 + h*w, D)

def tap_blocks(depth: int, taps: str) -> list[int]:
    """The four blocks a ViT pyramid reads (0-based): quarters, the last of each quarter of the depth (2,5,8,11 of
    12); beit, BEiT's and MAE's out_indices, the ends of 1/3, 1/2, 2/3 and all of it (3,5,7,11 of 12, 7,11,15,23 of
    24); or four indices. A shallow encoder may read a block twice."""
    if taps in ("quarters", "beit"):
        fracs, rnd = ((1 / 4, 1 / 2, 3 / 4, 1), int) if taps == "quarters" else ((1 / 3, 1 / 2, 2 / 3, 1), round)
        return [max(0, rnd(f * depth) - 1) for f in fracs]
    try:
        out = [int(t) for t in taps.split(",")]
    except ValueError:
        out = []
    if len(out) != 4 or not all(0 <= t < depth for t in out):
        C.fail(f"--taps {taps}: quarters, beit or four block indices in 0..{depth - 1}")
    return out

class ViTPyramid(nn.Module):
    """A plain ViT (common.ViT, or SAM's windowed encoder) as four maps: the outputs of four blocks (tap_blocks) at
    stride p (the patch), brought to p/4 (two 2x2 deconvolutions with BN and GELU between), p/2 (one deconvolution),
    p (as is) and 2p (2x2 max pooling): BEiT's and MAE's ViT-UperNet adapter. For ViT-B/16: strides 4, 8, 16, 32."""

    def __init__(self, encoder: nn.Module, patch: int, width: int, depth: int):
        super().__init__()
        self.encoder, self.patch, self.taps = encoder, patch, tap_blocks(depth, "quarters")
        self.fpn = nn.ModuleList([
            nn.Sequential(nn.ConvTranspose2d(width, width, 2, 2), nn.BatchNorm2d(width), nn.GELU(),
                          nn.ConvTranspose2d(width, width, 2, 2)),
            nn.ConvTranspose2d(width, width, 2, 2), nn.Identity(), nn.MaxPool2d(2)])
        self.channels, self.strides = [width] * 4, [patch // 4, patch // 2, patch, 2 * patch]

    def pretrained(self) -> list[nn.Module]:
        return [self.encoder]

    def layer_id(self, name: str) -> tuple[int, int]:
        """(layer of parameter `name`, layers): patch embedding and positions 0, block i i + 1 (layer decay)."""
        p = name.split(".")
        return (int(p[2]) + 1 if p[:2] == ["encoder", "blocks"] else 0), len(self.encoder.blocks) + 1

    def tapped(self, x: torch.Tensor) -> list[torch.Tensor]:
        """(B, 3, H, W) -> the tapped blocks' patch tokens, each (B, D, H/p, W/p)."""
        enc, outs = self.encoder, {}
        if isinstance(enc, C.ViT):  # class token + learned positions (interpolated), ln_pre, blocks
            x = enc.patch_embed(x)  # (B, D, h, w)
            B, D, h, w = x.shape
            x = torch.cat([enc.cls_token.to(x.dtype).expand(B, 1, D), x.flatten(2).transpose(1, 2)], 1)
            x = enc.norm_pre(x + resize_positions(enc.pos_embed, h, w).to(x.dtype))  # (B, 1 + h*w, D)
            for i, blk in enumerate(enc.blocks):
                x = blk(x)
                if i in self.taps:
                    outs[i] = x[:, 1:].transpose(1, 2).reshape(B, D, h, w)
            return [outs[i] for i in self.taps]
        x = enc.patch_embed.proj(x).permute(0, 2, 3, 1)  # SAM: (B, h, w, D); positions resized by its own rule
        pos = enc.pos_embed
        if pos.shape[1:3] != x.shape[1:3]:
            pos = F.interpolate(pos.permute(0, 3, 1, 2), size=x.shape[1:3], mode="bicubic",
                                align_corners=False).permute(0, 2, 3, 1)
        x = x + pos
        for i, blk in enumerate(enc.blocks):
            x = blk(x)
            if i in self.taps:
                outs[i] = x.permute(0, 3, 1, 2)  # (B, D, h, w)
        return [outs[i] for i in self.taps]

    def drop_adapter(self):
        """Plain tapped maps, all at stride p (a linear probe of the frozen ViT stays linear)."""
        self.fpn, self.strides = None, [self.patch] * 4

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        maps = self.tapped(x)
        return maps if self.fpn is None else [f(t) for f, t in zip(self.fpn, maps)]

class MCiPyramid(nn.Module):
    """MCi (MobileCLIP's FastViT hybrid) as its stage outputs: strides 4/8/16/32 (and 64 for MCi3/4's fifth
    stage). The stem, downsamplers and RepCPE stay in their unfused train-time form (spec 6: fine-tune
    unfused, reparameterise for deployment); conv_exp and the projection head are dropped."""

    def __init__(self, mci: nn.Module):
        super().__init__()
        self.patch_embed, self.network = mci.patch_embed, mci.network
        self.stage_ends = [i for i, m in enumerate(self.network) if isinstance(m, nn.Sequential)]
        self.channels = [self.network[i][0].convffn.fc2.out_channels for i in self.stage_ends]
        self.strides = [4 * 2 ** i for i in range(len(self.stage_ends))]

    def pretrained(self) -> list[nn.Module]:
        return [self.patch_embed, self.network]

    def layer_id(self, name: str) -> tuple[int, int]:
        """(layer, layers) for layer decay: the stem 0, the blocks 1.. in order; a downsampler or RepCPE
        shares the layer of the block after it (a heuristic)."""
        p, total = name.split("."), sum(len(self.network[i]) for i in self.stage_ends)
        if p[0] != "network":
            return 0, total + 1
        j, seen = int(p[1]), sum(len(self.network[i]) for i in self.stage_ends if i < int(p[1]))
        return seen + (int(p[2]) + 1 if j in self.stage_ends else 1), total + 1

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        x, outs = self.patch_embed(x), []  # (B, C0, H/4, W/4)
        for i, m in enumerate(self.network):
            x = m(x)
            if i in self.stage_ends:
                outs.append(x)  # (B, C_s, H/2^(s+2), W/2^(s+2))
        return outs

def vit_from_state(sd: dict, heads: int = 0, act: str = "gelu") -> C.ViT:
    """A common.ViT shaped like the state dict (our names; width, patch, grid and depth read from the shapes),
    without the CLIP projection; `heads` (not stored in a state dict) defaults to 64-wide heads."""
    width, _, patch, _ = sd["patch_embed.weight"].shape
    grid = math.isqrt(sd["pos_embed"].shape[0] - 1)
    layers = len({k.split(".")[1] for k in sd if k.startswith("blocks.")})
    mlp = sd["blocks.0.mlp.fc1.weight"].shape[0] / width
    return C.ViT(grid * patch, patch, width, layers, heads or width // 64, width, mlp, act)

def vit_pyramid(vit: C.ViT, mean=C.CLIP_MEAN, std=C.CLIP_STD) -> tuple[ViTPyramid, dict]:
    """A common.ViT as a pyramid (no ln_post, no joint embedding: unused, they would upset DDP), and its info."""
    vit.proj = vit.norm = None
    return ViTPyramid(vit, vit.patch, vit.patch_embed.out_channels, len(vit.blocks)), dict(
        kind="vit", image_size=vit.image_size, mean=mean, std=std)

def timm_vit_to_ours(sd: dict) -> tuple[dict, bool]:
    """MAE / timm ViT names -> common.ViT's (the blocks already match): patch_embed.proj -> patch_embed,
    (1, N, D) tokens -> (N, D). Returns the renamed dict and whether the file has ln_pre (CLIP-style)."""
    out = {}
    for k, v in sd.items():
        if k.startswith(("patch_embed.proj.", "blocks.", "cls_token", "pos_embed", "norm_pre.")):
            k = k.replace("patch_embed.proj.", "patch_embed.")
            shape = {"cls_token": (-1,), "pos_embed": (-1, v.shape[-1])}.get(k, v.shape)
            out[k] = v.reshape(shape)
    return out, "norm_pre.weight" in out

def build_backbone(name: str) -> tuple[nn.Module, dict]:
    """A feature pyramid for a named backbone, randomly initialised, and its info: kind, native image size and
    input normalisation (mean, std)."""
    import mobileclip as M
    name = "vit_tiny" if name == "tiny" else name
    if name in VITS:
        return vit_pyramid(C.ViT(**VITS[name], embed_dim=VITS[name]["width"]))
    if name in M.MOBILECLIP_MODELS and M.MOBILECLIP_MODELS[name]["image"] in M._MCI:
        spec = M.MOBILECLIP_MODELS[name]
        return MCiPyramid(M.create_model(name, vocab_size=1).visual), dict(
            kind="mci", image_size=spec["image_size"], mean=spec["mean"], std=spec["std"])
    if name.startswith("sam_"):
        import samclip as S
        return sam_pyramid(S.build_sam(name[4:]).image_encoder)
    mci = [n for n, s in M.MOBILECLIP_MODELS.items() if s["image"] in M._MCI]
    C.fail(f"unknown backbone '{name}'; choose tiny, one of {', '.join(VITS)}, {', '.join(mci)}, or sam_<size> "
           f"(sam_vit_b, sam_tiny, ...)")

def sam_pyramid(enc: nn.Module) -> tuple[ViTPyramid, dict]:
    """SAM's encoder without its neck (the pyramid taps the blocks), and its info."""
    enc.neck, w = None, enc.patch_embed.proj
    return ViTPyramid(enc, w.kernel_size[0], w.out_channels, len(enc.blocks)), dict(
        kind="sam", image_size=enc.img_size, mean=IMAGENET_MEAN, std=IMAGENET_STD)

def read_init(path: str) -> dict:
    """A checkpoint file, or a run directory of this repository (its latest ckpt-*.pt)."""
    if os.path.isdir(path):
        path = C.latest_checkpoint(path) or C.fail(f"--init {path}: no ckpt-*.pt in this directory")
    if not os.path.isfile(path):
        C.fail(f"--init file not found: {path}")
    try:
        return C.read_checkpoint(path)
    except (ValueError, OSError) as e:
        if "TorchScript" not in str(e):  # torch.load names a TorchScript archive as such
            C.fail(f"cannot read --init {path}: {e}")
    return torch.jit.load(path, map_location="cpu").state_dict()  # OpenAI distributes TorchScript archives

def load_backbone(name: str, init: str) -> tuple[nn.Module, dict, str]:
    """The backbone of a checkpoint as a feature pyramid: (pyramid, info, model name). Recognised by its keys:
    mobileclip.py runs (ViT or MCi, `model_name` inside), catlip.py runs, samclip.py runs and SAM files,
    ml-mobileclip / OpenCLIP MobileCLIP files (MCi; need --model), OpenAI / OpenCLIP ViT CLIPs, MAE and timm ViTs."""
    import mobileclip as M
    ck = read_init(init)
    what = f"--init {init}"
    if isinstance(ck, dict) and "model" in ck and "model_name" in ck:  # a run of this repository
        kind, run_name, sd = ck.get("kind", "clip"), ck["model_name"], ck["model"]
        if kind.startswith("sam") or any(k.startswith("image_encoder.") for k in sd):
            import samclip as S
            enc = S.load_sam(init if not os.path.isdir(init) else C.latest_checkpoint(init)).image_encoder
            return (*sam_pyramid(enc), f"sam_{run_name}")
        if name and name not in (run_name, "vit_tiny" if run_name == "tiny" else run_name):
            C.fail(f"{what} is a '{run_name}' run, not --model {name}")
        visual = {k[7:]: v for k, v in sd.items() if k.startswith("visual.") and k != "visual.proj"}
        if run_name in M.MOBILECLIP_MODELS:
            pyr, info = build_backbone(run_name)
            mci = M.create_model(run_name, vocab_size=1).visual
            mci.head = mci.conv_exp = None  # the pyramid keeps the stages only
            visual = {k: v for k, v in visual.items() if not k.startswith(("head.", "conv_exp."))}
            C.load_state_dict_checked(mci, visual, what)
            return MCiPyramid(mci), info, run_name
        heads = {**M.MODELS, **VITS}.get(run_name, {}).get("heads", 0)
        vit = vit_from_state(visual, heads, ck.get("config", {}).get("act", "gelu"))
        vit.proj = vit.norm = None
        C.load_state_dict_checked(vit, {k: v for k, v in visual.items() if k in vit.state_dict()}, what)
        return (*vit_pyramid(vit), run_name)
    sd = C.unwrap_state_dict(ck) if isinstance(ck, dict) else {}
    has = lambda p: any(k.startswith(p) for k in sd)
    if has("image_encoder.pos_embed") or "image_encoder.pos_embed" in sd:  # official SAM files
        import samclip as S
        return (*sam_pyramid(S.load_sam(init).image_encoder), "sam")
    if has("image_encoder.model.") or has("visual.trunk."):  # ml-mobileclip / OpenCLIP MobileCLIP
        if name not in M.MOBILECLIP_MODELS:
            C.fail(f"{what} is a released MobileCLIP file: name it with --model (mobileclip_s2, mobileclip2_s0, ...)")
        pyr, info = build_backbone(name)
        model = M.create_model(name, init)
        return MCiPyramid(model.visual), info, name
    if "visual.conv1.weight" in sd:  # OpenAI / OpenCLIP ViT CLIP (OpenAI's activation: QuickGELU)
        ours = {k[7:]: v.float() for k, v in C.openclip_to_ours(sd).items() if k.startswith("visual.")}
        sd_name, heads, act = "openclip", C.openclip_config(sd)["heads"], "quick_gelu"
    elif "patch_embed.proj.weight" in sd and "blocks.0.attn.qkv.weight" in sd:  # MAE / timm ViT
        ours, ln_pre = timm_vit_to_ours(sd)
        sd_name, heads, act = "timm", VITS.get(name, {}).get("heads", 0), "gelu"
    else:
        C.fail(f"{what}: not a checkpoint this script knows (a run of this repo, SAM, MobileCLIP, OpenCLIP, MAE/timm)")
    v = VITS.get("vit_tiny" if name == "tiny" else name, {})
    heads = v["heads"] if v.get("width") == ours["patch_embed.weight"].shape[0] else heads  # not in the file
    vit = vit_from_state(ours, heads, act)
    vit.proj = vit.norm = None
    if sd_name == "timm":  # MAE/timm: a patch-embedding bias, no ln_pre, LayerNorm eps 1e-6
        w = vit.patch_embed
        vit.patch_embed = nn.Conv2d(3, w.out_channels, w.kernel_size, w.stride, bias="patch_embed.bias" in ours)
        vit.norm_pre = vit.norm_pre if ln_pre else nn.Identity()
        for m in vit.modules():
            if isinstance(m, nn.LayerNorm):
                m.eps = 1e-6
    own = vit.state_dict()
    ignored = sorted(k for k in ours if k not in own and not k.startswith(("norm.", "proj", "fc_norm.", "head")))
    if ignored:
        C.print0(f"{what}: ignoring {len(ignored)} tensors not in the backbone (e.g. {ignored[:3]})")
    C.load_state_dict_checked(vit, {k: v for k, v in ours.items() if k in own}, what)
    norm = (C.CLIP_MEAN, C.CLIP_STD) if sd_name == "openclip" else (IMAGENET_MEAN, IMAGENET_STD)
    return (*vit_pyramid(vit, *norm), name or sd_name)

# ==== 2. Heads: UperNet for segmentation, the deconvolution decoder for depth, a linear probe for both ================
def conv_bn_relu(cin: int, cout: int, k: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, k, padding=k // 2, bias=False), nn.BatchNorm2d(cout), nn.ReLU(True))

def upsample(x: torch.Tensor, size) -> torch.Tensor:
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False)

class UperNet(nn.Module):
    """UperNet (Xiao et al. 2018, as mmseg's UPerHead): a pyramid pooling module (PSPNet, pool sizes 1/2/3/6) on
    the deepest level, a top-down FPN over the others, every level's 3x3-smoothed map upsampled to the finest
    one, concatenated, fused by a 3x3 conv, dropout 0.1, a 1x1 classifier. Output at the finest stride."""

    def __init__(self, in_channels: list[int], channels: int, out_channels: int, pool_sizes=(1, 2, 3, 6)):
        super().__init__()
        top = in_channels[-1]
        self.ppm = nn.ModuleList(nn.Sequential(nn.AdaptiveAvgPool2d(s), conv_bn_relu(top, channels, 1))
                                 for s in pool_sizes)
        self.bottleneck = conv_bn_relu(top + len(pool_sizes) * channels, channels, 3)
        self.lateral = nn.ModuleList(conv_bn_relu(c, channels, 1) for c in in_channels[:-1])
        self.smooth = nn.ModuleList(conv_bn_relu(channels, channels, 3) for _ in in_channels[:-1])
        self.fuse = conv_bn_relu(len(in_channels) * channels, channels, 3)
        self.dropout = nn.Dropout2d(0.1)
        self.classifier = nn.Conv2d(channels, out_channels, 1)

    def forward(self, feats: list[torch.Tensor]) -> torch.Tensor:
        x = feats[-1]  # (B, C_top, h, w)
        psp = [x] + [upsample(m(x), x.shape[2:]) for m in self.ppm]
        maps = [lat(f) for lat, f in zip(self.lateral, feats)] + [self.bottleneck(torch.cat(psp, 1))]
        for i in range(len(maps) - 1, 0, -1):  # top-down: each level += the coarser one, upsampled
            maps[i - 1] = maps[i - 1] + upsample(maps[i], maps[i - 1].shape[2:])
        maps = [s(m) for s, m in zip(self.smooth, maps)] + maps[-1:]
        size = maps[0].shape[2:]
        fused = self.fuse(torch.cat([maps[0]] + [upsample(m, size) for m in maps[1:]], 1))  # (B, ch, H/s0, W/s0)
        return self.classifier(self.dropout(fused))  # (B, K, H/s0, W/s0)

class DeconvDepthHead(nn.Module):
    """The light depth decoder of MIM-style evaluations (design choice, spec 2): on the deepest level, three
    [4x4 stride-2 transposed conv, BN, ReLU] (x8 resolution), a 3x3 conv to one channel. Output: a logit at
    1/8 of the deepest stride; `DenseModel` maps it to (0, max_depth) with a sigmoid."""

    def __init__(self, in_channels: list[int], channels: int, out_channels: int = 1):
        super().__init__()
        layers, c = [], in_channels[-1]
        for _ in range(3):
            layers += [nn.ConvTranspose2d(c, channels, 4, 2, 1, bias=False), nn.BatchNorm2d(channels), nn.ReLU(True)]
            c = channels
        self.net = nn.Sequential(*layers, nn.Conv2d(channels, out_channels, 3, padding=1))

    def forward(self, feats: list[torch.Tensor]) -> torch.Tensor:
        return self.net(feats[-1])  # (B, 1, 8h, 8w)

class LinearHead(nn.Module):
    """A probe of frozen features: every level upsampled to the finest, concatenated, BatchNorm, one 1x1 conv
    (a linear map per pixel)."""

    def __init__(self, in_channels: list[int], channels: int, out_channels: int):
        super().__init__()
        self.norm = nn.BatchNorm2d(sum(in_channels))
        self.classifier = nn.Conv2d(sum(in_channels), out_channels, 1)

    def forward(self, feats: list[torch.Tensor]) -> torch.Tensor:
        size = feats[0].shape[2:]
        return self.classifier(self.norm(torch.cat([feats[0]] + [upsample(f, size) for f in feats[1:]], 1)))

class FCNHead(nn.Module):
    """mmseg's auxiliary FCNHead as the MAE/BEiT UperNet configs set it: on the third level (stride 16 for ViT-B),
    a 3x3 conv-BN-ReLU to `channels` (256), dropout 0.1, a 1x1 classifier. Deep supervision: its loss is added in
    training only."""

    def __init__(self, in_channels: list[int], channels: int, out_channels: int, level: int = 2):
        super().__init__()
        self.level = min(level, len(in_channels) - 1)
        self.net = nn.Sequential(conv_bn_relu(in_channels[self.level], channels, 3), nn.Dropout2d(0.1),
                                 nn.Conv2d(channels, out_channels, 1))

    def forward(self, feats: list[torch.Tensor]) -> torch.Tensor:
        return self.net(feats[self.level])  # (B, K, H/s, W/s)

HEADS = {"upernet": UperNet, "deconv": DeconvDepthHead, "linear": LinearHead}

class DenseModel(nn.Module):
    """Backbone pyramid + head (+ an auxiliary head, whose output comes second in training mode only); depth outputs
    go through sigmoid x max_depth. With `frozen`, the pretrained part of the backbone stays in eval mode (BN
    statistics fixed) and gets no gradients."""

    def __init__(self, backbone: nn.Module, head: nn.Module, max_depth: float = 0.0, frozen: bool = False,
                 aux: nn.Module | None = None):
        super().__init__()
        self.backbone, self.head, self.max_depth, self.frozen, self.aux = backbone, head, max_depth, frozen, aux
        for m in backbone.pretrained() if frozen else []:
            m.requires_grad_(False)

    def train(self, mode: bool = True):
        super().train(mode)
        for m in self.backbone.pretrained() if self.frozen else []:
            m.eval()
        return self

    def forward(self, x: torch.Tensor):
        feats = self.backbone(x)
        out = self.head(feats)  # (B, K or 1, H/s, W/s)
        if self.aux is not None and self.training:
            return out, self.aux(feats)
        return torch.sigmoid(out.float()) * self.max_depth if self.max_depth else out

# ==== 3. Losses and metrics (spec 3.2, 5) =============================================================================
def silog_loss(pred: torch.Tensor, target: torch.Tensor, lambda_: float = 0.85) -> torch.Tensor:
    """Scale-invariant log loss (Eigen et al. 2014, with BTS's lambda 0.85 and x10) over the valid pixels
    (target > 0) of the whole batch: 10 sqrt(mean d^2 - lambda (mean d)^2), d = log pred - log target.
    Masked sums instead of boolean indexing: no host sync, CUDA-friendly; reference below."""
    valid = target > 0
    d = torch.where(valid, pred.float().clamp_min(1e-6).log() - target.float().clamp_min(1e-6).log(), 0.0)
    n = valid.sum().clamp_min(1)
    mean_d, mean_d2 = d.sum() / n, (d * d).sum() / n
    return 10 * (mean_d2 - lambda_ * mean_d ** 2).clamp_min(1e-12).sqrt()

def silog_loss_reference(pred: torch.Tensor, target: torch.Tensor, lambda_: float = 0.85) -> torch.Tensor:
    valid = target > 0
    d = torch.log(pred[valid].double()) - torch.log(target[valid].double())
    return (10 * torch.sqrt((d ** 2).mean() - lambda_ * d.mean() ** 2)).float()

def depth_errors(pred: torch.Tensor, target: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per-image (B,) RMSE, AbsRel = mean |p - t| / t and delta1 = fraction with max(p/t, t/p) < 1.25, over the
    valid pixels (target > 0) of each image; pred and target (B, H, W) or (B, 1, H, W)."""
    pred, target = pred.float().flatten(1), target.float().flatten(1)  # (B, P)
    valid = (target > 0).float()
    n, p, t = valid.sum(1).clamp_min(1), pred.clamp_min(1e-6), target.clamp_min(1e-6)
    rmse = (((p - t) ** 2 * valid).sum(1) / n).sqrt()
    absrel = ((p - t).abs() / t * valid).sum(1) / n
    delta1 = ((torch.maximum(p / t, t / p) < 1.25).float() * valid).sum(1) / n
    return {"rmse": rmse, "absrel": absrel, "delta1": delta1}

# ==== 4. Data: ADE20K / NYUv2 folders and tar shards with seg.png / depth.png, read by (epoch, index) =================
SPLITS = {"train": ("training", "train"), "val": ("validation", "val", "test")}
TARGET_DIRS, TARGET_SUFFIX = {"seg": "annotations", "depth": "depth"}, {"seg": "seg.png", "depth": "depth.png"}

def index_folder(root: str, task: str, split: str) -> list[tuple]:
    """ADE20K's layout (images/training/x.jpg + annotations/training/x.png; validation) and the same with
    depth/ for NYUv2 (train / test also accepted): items ("file", image path, target path), sorted by name."""
    for s in SPLITS[split]:
        img_dir, tgt_dir = os.path.join(root, "images", s), os.path.join(root, TARGET_DIRS[task], s)
        if os.path.isdir(img_dir) and os.path.isdir(tgt_dir):
            targets = {os.path.splitext(f)[0]: f for f in os.listdir(tgt_dir) if f.endswith(".png")}
            items = [("file", os.path.join(img_dir, f), os.path.join(tgt_dir, targets[os.path.splitext(f)[0]]))
                     for f in sorted(os.listdir(img_dir))
                     if f.rsplit(".", 1)[-1].lower() in C.IMAGE_EXTS and os.path.splitext(f)[0] in targets]
            if not items:
                C.fail(f"no image with a matching {TARGET_DIRS[task]} PNG in {img_dir}")
            return items
    C.fail(f"{root}: expected images/<{'|'.join(SPLITS[split])}>/ and {TARGET_DIRS[task]}/<same>/ folders")

def index_shards(spec: str, task: str) -> list[tuple]:
    """Tar shards: items ("tar", path, (offset, size) of the image, (offset, size) of the target), found by one
    pass over the member headers, so that any sample can be read alone (random access, resumable by step)."""
    try:
        paths = C.expand_shards(spec)
    except FileNotFoundError as e:
        C.fail(str(e))
    items, broken = [], 0
    for path in paths:
        if not path.endswith(".tar"):
            C.fail(f"{path}: dense.py reads uncompressed .tar shards (members are read by their offsets)")
        samples = {}
        try:
            with tarfile.open(path, "r") as tar:
                for m in tar:
                    d, base = os.path.split(m.name)
                    key, _, suffix = base.partition(".")
                    if m.isfile():
                        samples.setdefault(os.path.join(d, key), {})[suffix.lower()] = (m.offset_data, m.size)
        except (tarfile.TarError, OSError):  # empty, cut off or damaged: the samples read before it count
            broken += 1
        for s in samples.values():
            img = next((s[e] for e in C.IMAGE_EXTS if e in s), None)
            if img and TARGET_SUFFIX[task] in s:
                items.append(("tar", path, img, s[TARGET_SUFFIX[task]]))
    if not items:
        C.fail(f"no sample with an image and a {TARGET_SUFFIX[task]} in {spec} ({broken} of {len(paths)} unreadable)")
    return items

def read_item(item: tuple) -> tuple[Image.Image, Image.Image]:
    """(RGB image, target) decoded here, so that a broken file raises here."""
    if item[0] == "file":
        img, tgt = Image.open(item[1]), Image.open(item[2])
    else:
        data = []
        with open(item[1], "rb") as f:
            for offset, size in (item[2], item[3]):  # the members' bytes, found by index_shards
                f.seek(offset)
                data.append(io.BytesIO(f.read(size)))
        img, tgt = map(Image.open, data)
    tgt.load()
    return img.convert("RGB"), tgt

MAX_TRIES = 32  # reads per training sample: a broken one is replaced by random others (all broken: one line)

class DenseData(torch.utils.data.Dataset):
    """Image + target, by key. Train (key = (epoch, index), from common.StepBatches): random short-side scale
    (`scale` x crop), pad (image 0, label 255, depth 0 = invalid), random crop, horizontal flip, all seeded by
    (seed, epoch, index); an unreadable sample is replaced by random others ("skipped": how many failed). Eval (key
    = index): the image resized so its short side is the crop, the target as stored; None if it does not read.
    Labels: uint8 PNG, `reduce_zero_label` maps 0 and 255 to 255 (ignored), k to k - 1. Depth: PNG / scale."""

    def __init__(self, items, task: str, crop: int, train: bool, seed: int, scale, reduce_zero_label: bool,
                 depth_scale: float):
        self.items, self.task, self.crop, self.train, self.seed, self.scale = items, task, crop, train, seed, scale
        self.reduce, self.depth_scale = reduce_zero_label, depth_scale

    def __len__(self):
        return len(self.items)

    def target(self, tgt: Image.Image) -> torch.Tensor:
        a = np.asarray(tgt)
        if self.task == "depth":
            return torch.from_numpy(a.astype(np.float32) / self.depth_scale)  # (H, W), 0 = invalid
        a = a.astype(np.int64)
        return torch.from_numpy(np.where((a == 0) | (a == 255), 255, a - 1) if self.reduce else a)  # (H, W)

    def __getitem__(self, key):
        epoch, i = key if isinstance(key, tuple) else (0, key)
        rng, j, first = random.Random(zlib.crc32(f"{self.seed}/{epoch}/{i}".encode())), i, ""
        for bad in range(MAX_TRIES if self.train else 1):
            try:
                img, tgt = read_item(self.items[j])
                break
            except Exception as e:  # a corrupt image or target: another one, drawn from (seed, epoch, index)
                first = first or f"cannot read sample {i} of {self.items[i][1]}: {type(e).__name__}: {e}"
                j = rng.randrange(len(self.items))
        else:  # evaluation leaves it out; training has no readable sample in reach: one line (no worker traceback)
            if not self.train:
                return None
            raise C.DataError(f"{first} (nor {MAX_TRIES - 1} random others in its place)")
        w, h = img.size
        if not self.train:
            r = self.crop / min(w, h)
            img = img.resize((max(1, round(w * r)), max(1, round(h * r))), Image.BICUBIC)
            return {"image": torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1), "target": self.target(tgt)}
        r = self.crop * rng.uniform(*self.scale) / min(w, h)
        size = (max(1, round(w * r)), max(1, round(h * r)))
        img, tgt = img.resize(size, Image.BICUBIC), tgt.resize(size, Image.NEAREST)
        x = torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1)  # (3, h', w') uint8
        y = self.target(tgt)  # (h', w')
        pad = (0, max(0, self.crop - y.shape[1]), 0, max(0, self.crop - y.shape[0]))  # right, bottom
        x, y = F.pad(x, pad), F.pad(y, pad, value=255 if self.task == "seg" else 0)
        top, left = rng.randint(0, y.shape[0] - self.crop), rng.randint(0, y.shape[1] - self.crop)
        x, y = x[:, top:top + self.crop, left:left + self.crop], y[top:top + self.crop, left:left + self.crop]
        if rng.random() < 0.5:
            x, y = x.flip(-1), y.flip(-1)
        return {"image": x.contiguous(), "target": y.contiguous(), "skipped": bad}

def resolve_data(cfg: Config, task: str, image_size: int) -> dict:
    """Train and held-out items and the defaults that depend on the data: folders are real datasets (ADE20K:
    label 0 = 'other', ignored; NYUv2: millimetres, 10 m), tar shards the synthetic world's kind (label 0 =
    background, a real class; depth 1.0 = 65535)."""
    world, cache = not cfg.data, cfg.cache_dir or os.path.join(os.path.expanduser("~"), ".cache", "effclip")
    w = C.synthetic_world(cache, 40000, 1000, 64) if world else {}  # mobileclip.py's world: one cache for both
    train_spec, val_spec = cfg.data or w["train"], cfg.val_data or w.get("val", "")
    folder = os.path.isdir(os.path.join(train_spec, "images"))
    train = index_folder(train_spec, task, "train") if folder else index_shards(train_spec, task)
    if not val_spec and not folder:
        C.fail("--val-data is needed with tar shards (held-out shards with the same members)")
    val_spec = val_spec or train_spec
    val = index_folder(val_spec, task, "val") if os.path.isdir(os.path.join(val_spec, "images")) else \
        index_shards(val_spec, task)
    n_train = cfg.train_images or (WORLD_DEFAULTS["train_images"] if world else 0)
    return dict(train=train[:n_train or None], val=val[:cfg.val_images or None], folder=folder, world=world)

# ==== 5. Fine-tuning: optimiser groups, sliding-window evaluation, the loop ===========================================
def param_groups(model: DenseModel, lr: float, head_lr: float, weight_decay: float, layer_decay: float) -> list[dict]:
    """AdamW groups by (peak lr, decay): the pretrained backbone at lr x layer_decay^(L - layer) (BEiT's layer
    decay; 1 = off), the new layers (head, ViT adapter) at head_lr; no decay on norms, biases, positions."""
    groups = {}
    pretrained = {id(p) for m in model.backbone.pretrained() for p in m.parameters()}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        layer, layers = model.backbone.layer_id(name[len("backbone."):]) if id(p) in pretrained else (0, 0)
        peak = lr * layer_decay ** (layers - layer) if id(p) in pretrained else head_lr
        wd = 0.0 if p.ndim < 2 or any(n in name for n in C.NO_DECAY_NAMES) else weight_decay
        groups.setdefault((peak, wd), []).append(p)
    return [{"params": ps, "peak_lr": peak, "weight_decay": wd} for (peak, wd), ps in groups.items()]

@torch.no_grad()
def slide_predict(model: nn.Module, x: torch.Tensor, crop: int, out_channels: int) -> torch.Tensor:
    """mmseg's sliding-window inference: crop x crop windows at stride 2/3 crop over (B, 3, H, W), each window's
    output upsampled to the window, overlaps averaged. Returns (B, out_channels, H, W) in fp32."""
    B, _, H, W = x.shape
    stride = max(1, 2 * crop // 3)
    out = x.new_zeros(B, out_channels, H, W, dtype=torch.float32)
    count = x.new_zeros(1, 1, H, W, dtype=torch.float32)
    for i in range(max(H - crop + stride - 1, 0) // stride + 1):
        for j in range(max(W - crop + stride - 1, 0) // stride + 1):
            y1, x1 = max(min(i * stride + crop, H) - crop, 0), max(min(j * stride + crop, W) - crop, 0)
            y2, x2 = min(y1 + crop, H), min(x1 + crop, W)
            out[:, :, y1:y2, x1:x2] += upsample(model(x[:, :, y1:y2, x1:x2]).float(), (y2 - y1, x2 - x1))
            count[:, :, y1:y2, x1:x2] += 1
    return out / count

@torch.no_grad()
def evaluate(model: DenseModel, items, task: str, cfg: Config, s: dict, device) -> dict:
    """Single-scale evaluation of this rank's share of the held-out items, summed over ranks: common.miou of the
    whole set's confusion matrix (seg; ADE20K's reduce-zero-label applied there), or the per-image depth errors
    averaged over images (depth). Unreadable images are left out and counted; above --max-skip-frac, one line."""
    rank, world = C.get_rank(), C.get_world_size()
    data = DenseData(items[rank::world], task, s["crop"], False, 0, (1, 1), False, s["depth_scale"])  # labels as read
    loader = C.Loader(data, batch_size=cfg.batch_size, num_workers=min(cfg.workers, 2), collate_fn=list,
                      worker_init_fn=C.ignore_stop_signals)
    was_training = model.training
    model.eval()
    K, bad, read = s["classes"] if task == "seg" else 1, 0, 0
    conf = torch.zeros(K, K, dtype=torch.long)
    sums = torch.zeros(6, dtype=torch.float64, device=device)  # rmse, absrel, delta1, images, unreadable, read
    for batch in C.progress(loader, f"eval {task}"):
        by_size, bad, read = {}, bad + sum(it is None for it in batch), read + len(batch)
        for it in (it for it in batch if it is not None):  # real images differ in size: one forward per size
            by_size.setdefault((tuple(it["image"].shape), tuple(it["target"].shape)), []).append(it)
        for group in by_size.values():
            x = C.normalize_images(torch.stack([it["image"] for it in group]).to(device), s["mean"], s["std"])
            y = torch.stack([it["target"] for it in group]).to(device)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=s["bf16"]):
                out = upsample(slide_predict(model, x, s["crop"], K), y.shape[-2:])  # (B, K, H, W) at the label
            if task == "seg":
                conf += C.confusion_matrix(out.argmax(1), y, K, reduce_zero_label=s["reduce_zero_label"])
            else:
                e = depth_errors(out[:, 0], y)
                sums[:4] += torch.stack([e["rmse"].sum(), e["absrel"].sum(), e["delta1"].sum(),
                                         torch.tensor(float(len(y)), device=device)]).double()
    sums[4:], conf = torch.tensor([bad, read], dtype=torch.float64), conf.to(device)
    if world > 1:
        torch.distributed.all_reduce(conf)
        torch.distributed.all_reduce(sums)
    model.train(was_training)
    bad, n = sums[4].item(), max(1.0, sums[3].item())
    if bad > cfg.max_skip_frac * sums[5].item():
        C.fail(f"{bad:.0f} of {sums[5].item():.0f} held-out images unreadable (--max-skip-frac {cfg.max_skip_frac})")
    skipped = {"skipped": int(bad)} if bad else {}
    if task == "seg":
        return {"miou": C.miou(conf), "pixel_acc": 100 * conf.diag().sum().item() / max(1, conf.sum().item()),
                **skipped}
    return {"rmse": sums[0].item() / n, "absrel": sums[1].item() / n, "delta1": sums[2].item() / n, **skipped}

def settings(cfg: Config, task: str, info: dict, data: dict, width: int) -> dict:
    """Every default that depends on the task, the data and the backbone, resolved once (logged)."""
    folder, world, d = data["folder"], data["world"], TASK_DEFAULTS[task]
    norm = {"clip": (C.CLIP_MEAN, C.CLIP_STD), "imagenet": (IMAGENET_MEAN, IMAGENET_STD),
            "none": ((0.0,) * 3, (1.0,) * 3), "auto": (info["mean"], info["std"])}
    rz = getattr(cfg, "reduce_zero_label", "auto")  # seg's and depth's own flags: defaults for the other task
    head = cfg.head if cfg.head != "auto" else "upernet" if task == "seg" else "deconv"
    lr = cfg.lr or (WORLD_DEFAULTS["lr"] if world else d["lr"])
    small = width <= 256
    return dict(head=head, crop=cfg.crop or (d["crop"] if folder else info["image_size"]),
        channels=cfg.channels or ((64 if small else 512) if head == "upernet" else (32 if small else 256)),
        lr=lr, head_lr=cfg.head_lr or 10 * lr,
        weight_decay=cfg.weight_decay if cfg.weight_decay >= 0 else WORLD_DEFAULTS["weight_decay"] if world
        else d["weight_decay"],
        epochs=cfg.epochs or (WORLD_DEFAULTS["epochs"] if world else d["epochs"]), scale=d["scale"],
        reduce_zero_label=rz == "on" or (rz == "auto" and folder),
        classes=getattr(cfg, "classes", 0) or (150 if folder else 1 + len(C.SYNTH_SHAPES)),
        depth_scale=getattr(cfg, "depth_scale", 0) or (1000.0 if folder else 65535.0),
        max_depth=(getattr(cfg, "max_depth", 0) or (10.0 if folder else 1.0)) if task == "depth" else 0.0,
        mean=norm[cfg.normalize][0], std=norm[cfg.normalize][1], aux_weight=getattr(cfg, "aux_weight", 0.0))

def apply_preset(cfg: SegConfig, world: int) -> SegConfig:
    """--preset: its value for every field still at its default (a flag given at its default value counts as not
    given); the global batch split over the ranks. Prints what it set and what the command line kept."""
    if not cfg.preset:
        return cfg
    p = dict(PRESETS.get(cfg.preset) or C.fail(f"--preset must be {', '.join(PRESETS)}, not '{cfg.preset}'"))
    p["batch_size"] = max(1, p.pop("global_batch") // world)
    p["head_lr"] = cfg.lr or p["head_lr"]  # the new layers follow a --lr given on the command line
    defaults = {f.name: f.default for f in dataclasses.fields(cfg)}
    sets = {k: v for k, v in p.items() if getattr(cfg, k) == defaults[k]}
    kept = {k: getattr(cfg, k) for k in p if k not in sets}
    C.print0(f"--preset {cfg.preset} sets " + " ".join(f"--{k.replace('_', '-')} {v}" for k, v in sets.items())
             + (f"; kept from the command line: {json.dumps(kept)}" if kept else ""))
    return dataclasses.replace(cfg, **sets)

def lr_scale(step: int, warmup: int, total: int, min_ratio: float, schedule: str) -> float:
    """The lr as a fraction of its peak: linear warm-up then cosine to min_ratio, or mmseg's poly of power 1 (linear
    from 1 at step 0 to min_ratio at the end) with the linear warm-up ramp multiplied on."""
    if schedule == "cosine":
        return C.lr_at(step, 1.0, warmup, total, min_ratio)
    return (min_ratio + (1 - min_ratio) * (1 - step / max(1, total))) * min(1.0, (step + 1) / max(1, warmup))

def finetune(cfg: SegConfig | DepthConfig) -> dict:
    """Fine-tune a backbone with a dense head; held-out mIoU (seg) or RMSE / AbsRel / delta1 (depth) at the end.

    Returns the final metrics (also in OUT/log.jsonl), {} if a signal stopped it (saved; --resume auto continues)."""
    task, stop = "seg" if isinstance(cfg, SegConfig) else "depth", C.StopSignal()  # SIGTERM, SIGINT: save, exit 0
    rank, local_rank, world, device = C.setup_distributed(cfg.device)
    cfg = apply_preset(cfg, world) if task == "seg" else cfg
    for flag, lo, hi in (("min_lr_ratio", 0, 1), ("layer_decay", 1e-9, 1), ("crop", 0, None), ("channels", 0, None)):
        if getattr(cfg, flag) < lo or (hi is not None and getattr(cfg, flag) > hi):
            C.fail(f"--{flag.replace('_', '-')} {getattr(cfg, flag)}: must be in [{lo}, {hi or 'inf'}]")
    for flag, ok in (("normalize", ("auto", "clip", "imagenet", "none")), ("head", ("auto", *HEADS)),
                     ("reduce_zero_label", ("auto", "on", "off")), ("schedule", ("cosine", "poly"))):
        if getattr(cfg, flag, "auto") not in ok:
            C.fail(f"--{flag.replace('_', '-')} must be {', '.join(ok)}, not '{getattr(cfg, flag)}'")
    torch.manual_seed(cfg.seed)  # same head init on every rank (DDP also broadcasts it)
    C.document_run(cfg.out, cfg, [__file__, C.__file__])
    name = cfg.model or "mobileclip_tiny"  # without --init: the from-scratch baseline (no pre-training)
    backbone, info, name = load_backbone(cfg.model, cfg.init) if cfg.init else (*build_backbone(name), name)
    data = resolve_data(cfg, task, info["image_size"])
    s = settings(cfg, task, info, data, max(backbone.channels))
    s["bf16"] = cfg.precision == "bf16" or (cfg.precision == "auto" and device.type == "cuda")
    if isinstance(backbone, ViTPyramid):
        backbone.taps = tap_blocks(len(backbone.encoder.blocks), cfg.taps)
        if s["head"] == "linear":
            backbone.drop_adapter()
    head = HEADS[s["head"]](backbone.channels, s["channels"], s["classes"] if task == "seg" else 1)
    aux = FCNHead(backbone.channels, 256, s["classes"]) if task == "seg" and s["aux_weight"] else None
    model = DenseModel(backbone, head, s["max_depth"], cfg.freeze_backbone, aux).to(device)
    n_train = len(data["train"])
    steps = cfg.steps or max(1, round(s["epochs"] * n_train / (cfg.batch_size * world)))
    warmup = min(cfg.warmup, steps // 5)
    C.print0(f"{task} | backbone {name} ({info['kind']}, strides {backbone.strides}, "
             f"{sum(p.numel() for p in backbone.parameters()) / 1e6:.2f}M) | head {s['head']} "
             f"({sum(p.numel() for p in head.parameters()) / 1e6:.2f}M) | {n_train} train / {len(data['val'])} "
             f"held-out images | {steps} steps | " + json.dumps({k: v for k, v in s.items() if "mean" != k != "std"}))
    groups = param_groups(model, s["lr"], s["head_lr"], s["weight_decay"], cfg.layer_decay)
    opt = torch.optim.AdamW(groups, lr=s["lr"], betas=(0.9, 0.999), fused=device.type == "cuda")
    log = C.RunLog(cfg.out)

    # ---- resume ---------------------------------------------------------------------------------
    start, ckpt = 0, C.load_checkpoint(cfg.resume, cfg.out)
    if ckpt is not None:
        if ckpt.get("kind") != "dense" or ckpt.get("task") != task or ckpt.get("model_name") != name:
            C.fail(f"checkpoint {cfg.resume} is a {ckpt.get('kind')} {ckpt.get('task')} run of "
                   f"'{ckpt.get('model_name')}', not dense {task} of '{name}'")
        C.load_state_dict_checked(model, ckpt["model"], f"checkpoint {cfg.resume}")
        if not cfg.eval_only:
            opt.load_state_dict(ckpt["optimizer"])
            start = ckpt["step"]
        C.print0(f"resumed from step {ckpt['step']} of {cfg.resume}")
    if cfg.eval_only:
        metrics = evaluate(model, data["val"], task, cfg, s, device)
        log.log(ckpt["step"] if ckpt else 0, **metrics)
        C.cleanup_distributed()
        C.finish_run(cfg.out)
        return metrics

    # ---- data: step-indexed, so resuming at step s replays what an uninterrupted run saw ------------
    train_data = DenseData(data["train"], task, s["crop"], True, cfg.seed, s["scale"], s["reduce_zero_label"],
                           s["depth_scale"])
    sampler = C.StepBatches(n_train, cfg.batch_size * world, start, steps, cfg.seed, rank, world)
    batches = iter(torch.utils.data.DataLoader(train_data, batch_sampler=sampler, num_workers=cfg.workers,
                                               pin_memory=device.type == "cuda", worker_init_fn=C.ignore_stop_signals))
    if ckpt is not None:  # after the DataLoader, whose iterator draws its base seed from the global RNG
        C.set_rng_state(ckpt["rng"])
    train_model = DDP(model, device_ids=[local_rank] if device.type == "cuda" else None) if world > 1 else model
    model.train()
    nonfinite = torch.zeros((), dtype=torch.bool, device=device)
    metrics, t0, seen, reads = {}, time.time(), 0, [0, 0]  # reads: unreadable, all (training images)
    for step in C.progress(range(start, steps + 1), task):
        last_step = step == steps
        stopping = stop.requested if world == 1 else (step % cfg.log_every == 0 and stop.agreed(device))

        # ---- evaluate -----------------------------------------------------------------------------
        if last_step or (cfg.eval_every and step % cfg.eval_every == 0 and step > start):
            metrics = evaluate(model, data["val"], task, cfg, s, device)
            log.log(step, **metrics)

        # ---- checkpoint (never one with a non-finite loss behind it) ------------------------------
        if (last_step or stopping or step % cfg.ckpt_every == 0) and step > start:
            if nonfinite.item():
                C.fail(f"non-finite loss before step {step}; the last good checkpoint in {cfg.out} is kept")
            C.save_checkpoint(os.path.join(cfg.out, f"ckpt-{step}.pt"), {
                "kind": "dense", "task": task, "model": model.state_dict(), "optimizer": opt.state_dict(),
                "step": step, "rng": C.rng_state(), "model_name": name, "config": dataclasses.asdict(cfg)})
            C.prune_checkpoints(cfg.out, cfg.keep_ckpts, written=os.path.join(cfg.out, f"ckpt-{step}.pt"))
        if last_step or stopping:
            break

        # ---- forward, backward, step --------------------------------------------------------------
        try:
            batch = next(batches)
        except C.DataError as e:  # an unreadable sample: the workers shut down, then one line (no worker traceback)
            getattr(batches, "_shutdown_workers", lambda: None)()
            C.fail(str(e).strip().splitlines()[-1].removeprefix(f"{C.DataError.__module__}.DataError: "))
        bad = int(batch["skipped"].sum())  # counted on the host, in the workers
        reads = [reads[0] + bad, reads[1] + bad + len(batch["skipped"])]
        x = C.normalize_images(batch["image"].to(device, non_blocking=True), s["mean"], s["std"])  # (B, 3, S, S)
        y = batch["target"].to(device, non_blocking=True)  # (B, crop, crop): labels or depth
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=s["bf16"]):
            out = train_model(x)
        out, aux = out if isinstance(out, tuple) else (out, None)  # aux: the FCN head's output
        out = upsample(out.float(), y.shape[-2:])  # (B, K or 1, crop, crop)
        loss = F.cross_entropy(out, y, ignore_index=255) if task == "seg" else silog_loss(out[:, 0], y)
        if aux is not None:  # deep supervision, mmseg's auxiliary loss
            loss = loss + s["aux_weight"] * F.cross_entropy(upsample(aux.float(), y.shape[-2:]), y, ignore_index=255)
        loss.backward()
        gnorm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip or float("inf"))
        scale = lr_scale(step, warmup, steps, cfg.min_lr_ratio, cfg.schedule)
        for g in opt.param_groups:
            g["lr"] = g["peak_lr"] * scale
        opt.step()
        opt.zero_grad(set_to_none=True)
        nonfinite |= ~torch.isfinite(loss.detach())
        seen += len(x)

        # ---- log (the only host sync) ---------------------------------------------------------------
        if (step + 1) % cfg.log_every == 0:
            if nonfinite.item():
                C.fail(f"non-finite loss at step {step}; the last good checkpoint in {cfg.out} is kept")
            if reads[0] > cfg.max_skip_frac * reads[1]:
                C.fail(f"{reads[0]} of {reads[1]} training images read were unreadable (--max-skip-frac "
                       f"{cfg.max_skip_frac}); check --data")
            log.log(step + 1, loss=loss.item(), lr=s["lr"] * scale, grad_norm=gnorm.item(),
                    images_per_s=seen * world / (time.time() - t0), skipped=reads[0])
            t0, seen = time.time(), 0
    C.cleanup_distributed()
    if not last_step:
        C.print0(f"stopped at step {step}; run again with --resume auto to continue")
        return {}
    C.finish_run(cfg.out, os.path.join(cfg.out, f"ckpt-{step}.pt"))
    return metrics

# ==== 6. The claim on the synthetic world: alt-text vs quality-caption CLIP, fine-tuned for both tasks ================
@dataclass
class CompareConfig:
    model: str = "mobileclip_tiny"  # the CLIP both pre-trainings train: mobileclip_tiny (MCi) or tiny (ViT)
    out: str = "runs/dense_compare"  # pre_<source>/, <task>_<source>/ and the summary in log.jsonl
    data: str = ""  # training shards with captions, seg.png and depth.png (empty = the synthetic world)
    val_data: str = ""  # held-out shards for the fine-tunings (with --data)
    pretrain_steps: int = 400  # mobileclip.py steps per caption source (half its no-argument run, for a shared CPU)
    pretrain_batch: int = 128  # mobileclip.py batch size
    init_alt: str = ""  # an existing alt-text pre-training (run directory or checkpoint) instead of training one
    init_synthetic: str = ""  # an existing --caption-source synthetic pre-training instead of training one
    scratch: bool = False  # also fine-tune a randomly initialised backbone (the no-pre-training reference)
    steps: int = 0  # fine-tuning steps per task (0 = the world's default: 2 epochs of 2400 images, 300 steps)
    batch_size: int = 16  # fine-tuning batch size
    train_images: int = 0  # fine-tuning images (0 = the world's default, 2400)
    val_images: int = 0  # held-out images scored (0 = all 1000)
    head: str = "auto"  # auto (UperNet / deconvolution) or linear (frozen-feature probes need --freeze-backbone)
    freeze_backbone: bool = False  # probe the frozen features instead of fine-tuning
    lr: float = 0.0  # fine-tuning lr (0 = the world's default)
    workers: int = 2  # DataLoader workers
    cache_dir: str = ""  # where the synthetic world is generated (default ~/.cache/effclip)
    seed: int = 0  # seeds the pre-trainings and the fine-tunings

def compare(cfg: CompareConfig) -> dict:
    """The paper's claim: the same tiny CLIP pre-trained on alt-text and on quality captions, fine-tuned for both tasks.

    mobileclip.py --caption-source alt | synthetic (same model, steps, batch, seed), each backbone fine-tuned for seg
    and depth with the same recipe; mIoU and RMSE side by side (README: the four figures). Every stage resumes."""
    import mobileclip as M
    if cfg.pretrain_steps < 1:
        C.fail(f"--pretrain-steps {cfg.pretrain_steps}: must be >= 1")
    C.claim_out(cfg.out, resume="auto")  # each stage claims its own sub-directory
    inits = {"alt": cfg.init_alt, "synthetic": cfg.init_synthetic}
    for source in inits:
        if not inits[source]:
            run = os.path.join(cfg.out, f"pre_{source}")
            if not os.path.exists(os.path.join(run, f"ckpt-{cfg.pretrain_steps}.pt")):
                C.print0(f"---- pre-training {cfg.model} on {source} captions -> {run}")
                M.main(["--model", cfg.model, "--caption-source", source, "--steps", str(cfg.pretrain_steps),
                        "--batch-size", str(cfg.pretrain_batch), "--out", run, "--resume", "auto",
                        "--workers", str(cfg.workers), "--seed", str(cfg.seed)]
                       + (["--cache-dir", cfg.cache_dir] if cfg.cache_dir else [])
                       + (["--data", cfg.data, "--no-eval"] if cfg.data else []))
            inits[source] = os.path.join(run, f"ckpt-{cfg.pretrain_steps}.pt")
            if not os.path.exists(inits[source]):  # stopped by a signal: the same command continues
                return {}
    inits.update({"scratch": ""} if cfg.scratch else {})  # --scratch: also the no-pre-training reference
    common = ["--batch-size", str(cfg.batch_size), "--head", cfg.head, "--workers", str(cfg.workers),
              "--seed", str(cfg.seed), "--resume", "auto", "--log-every", "25"]
    for flag in ("data", "val_data", "steps", "train_images", "val_images", "lr", "cache_dir"):
        if getattr(cfg, flag):
            common += ["--" + flag.replace("_", "-"), str(getattr(cfg, flag))]
    common += ["--freeze-backbone"] if cfg.freeze_backbone else []
    results = {}
    for source, init in inits.items():
        results[source] = {}
        for task in ("seg", "depth"):
            out = os.path.join(cfg.out, f"{task}_{source}")
            C.print0(f"---- {task} from the {source} backbone -> {out}")
            init_args = ["--init", init] if init else ["--model", cfg.model]
            results[source].update(r := main([task, *init_args, "--out", out, *common]))
            if not r:  # stopped by a signal
                return {}
    log = C.RunLog(cfg.out)
    C.print0(f"\n{'pre-training':14s} {'mIoU (%)':>9s} {'RMSE':>8s} {'AbsRel':>8s} {'delta1':>8s}")
    for source, r in results.items():
        C.print0(f"{source:14s} {r['miou']:9.2f} {r['rmse']:8.4f} {r['absrel']:8.4f} {r['delta1']:8.4f}")
        log.log(0, source=source, **r)
    C.finish_run(cfg.out, extra=f"the runs {cfg.out}/{{pre,seg,depth}}_<source>/")
    return results

def main(argv: list[str] | None = None) -> dict:
    """`seg` / `depth`: the final held-out metrics ({} if stopped by a signal); `compare`: them per pre-training."""
    commands = {"seg": (finetune, SegConfig), "depth": (finetune, DepthConfig), "compare": (compare, CompareConfig)}
    return C.run_command(__doc__, commands, argv)

if __name__ == "__main__":
    main()
