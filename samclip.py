"""SAM-CLIP: Merging Vision Foundation Models towards Semantic and Spatial Understanding
(arXiv 2310.15308, Wang et al., Apple).

SAM-CLIP turns SAM's ViT-B image encoder into one backbone with two heads: SAM's mask decoder (promptable
segmentation, kept by self-distillation from a frozen SAM) and a new CLIP head (zero-shot classification and
segmentation, distilled from a CLIP teacher). Stage I trains the CLIP head on the frozen backbone; stage II all but
the prompt encoder on L_CLIP + lambda L_SAM (backbone and SAM head at 0.1x lr); stage III the CLIP head alone again
at 224/448/1024, so one 1024-px backbone pass feeds both heads (App. C).

What is here: Segment Anything with the official parameter names (sam_vit_{b,l,h} load strictly) and its point,
box and mask prompts (`predict`); the CLIP head; stages I-III with the paper's losses, lrs, batch mix (a CLIP and a
SAM micro-batch, one optimizer step) and resolutions; SA-1B shards (COCO RLE in numpy); `segment` and `eval`:
zero-shot segmentation (Table 2's protocol) on VOC, Pascal Context, ADE20K, COCO-Stuff or the synthetic world,
optionally refined by the SAM head (App. C), ImageFolder zero-shot classification, COCO box-prompted mask mIoU
(SAM's retained skill); a tiny SAM teacher trained here (`train-sam`). Left out: iterative prompt simulation (one
point or box per mask), the CVNets variable-batch sampler (the CLIP size cycles per step), Table 3-4 probing, cached
teacher outputs, ViTDet boxes (COCO's ground-truth boxes prompt instead).

Paper -> code:
  SAM ViT-B image encoder, neck (spec 2.1); MViTv2 rel. pos.  -> ImageEncoderViT, EncoderBlock, rel_pos_bias
  prompt encoder, two-way mask decoder                       -> PromptEncoder, MaskDecoder, TwoWayTransformer
  CLIP head: 3 blocks from SAM's last, max-pool, LN, MLP     -> CLIPHead, SamClip.add_clip_head
  L_CLIP (Eq. 1), L_SAM = focal + dice vs frozen SAM (Eq. 2) -> cosine_distill_loss, sam_distill_loss
  L_CLIP + 10 L_SAM (Eq. 3); stages I-III (Sec. 4.1)         -> merge, build_student, train_loop
  zero-shot segmentation (Sec. 4.3, Table 2)                 -> dense_logits, segment_image, seg_eval
  CLIP + SAM head from one pass (Table 5, App. C)            -> refine_with_sam
  benchmarks' readers; SA-1B / COCO masks (RLE, polygons)    -> seg_pairs, DATASETS; rle_decode, coco_mask

Commands (real data, the paper's batch mix over 8 GPUs; the teacher is this repo's checkpoint or an OpenCLIP
state dict with --bpe):
  python samclip.py predict --init sam_vit_b_01ec64.pth --image photo.jpg --point 320,240 --out mask.png
  torchrun --nproc_per_node=8 samclip.py --stage 1 --init-sam sam_vit_b_01ec64.pth --teacher-clip clip_l14.pt \\
      --bpe bpe_simple_vocab_16e6.txt.gz --data-clip 'clip/{00000..04095}.tar' --clip-sizes 224,448 \\
      --batch-clip 256 --steps 400000 --warmup 2000 --out runs/s1
  torchrun --nproc_per_node=8 samclip.py --stage 2 --init runs/s1 --init-sam sam_vit_b_01ec64.pth \\
      --teacher-clip clip_l14.pt --bpe bpe_simple_vocab_16e6.txt.gz --data-clip 'clip/{00000..04095}.tar' \\
      --data-sam 'sa1b/sa_{000000..000063}.tar' --clip-sizes 224,448 --batch-clip 256 --batch-sam 4 \\
      --masks-per-image 32 --sam-size 1024 --steps 320000 --warmup 2000 --out runs/s2
  torchrun --nproc_per_node=8 samclip.py --stage 3 --init runs/s2 --teacher-clip clip_l14.pt \\
      --bpe bpe_simple_vocab_16e6.txt.gz --data-clip 'clip/{00000..04095}.tar' --batch-clip 256 --steps 60000 \\
      --out runs/s3
  python samclip.py segment --init runs/s3 --image x.jpg --classes "cat,dog,grass" --out seg.png [--refine]
  python samclip.py eval --init runs/s3 --dataset voc --data VOCdevkit/VOC2012 [--refine]
  python samclip.py eval --init runs/s3 --zeroshot-data imagenet/val --zeroshot-classnames names.txt
  python samclip.py eval --init runs/s3 --coco-instances instances_val2017.json --coco-images val2017
Tiny pipeline on the synthetic world (CPU):
  python samclip.py train-sam --out runs/sam_tiny
  python samclip.py --stage 1 --init-sam runs/sam_tiny --teacher-clip /path/mobileclip_run/ckpt-800.pt --out runs/s1
  python samclip.py --stage 2 --init runs/s1 --init-sam runs/sam_tiny --teacher-clip ... --out runs/s2
  python samclip.py eval --init runs/s2
Result: see the README's SAM-CLIP section (synthetic-world mIoU against chance, 2-core CPU).
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import functools
import io
import json
import math
import os
import random
import time
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision
from PIL import Image, ImageDraw
from torch.nn.parallel import DistributedDataParallel as DDP

import common as C

@dataclass
class Shared:  # the flags of every command
    device: str = "auto"  # auto | cuda | cpu
    seed: int = 0  # init, data order, prompts
    cache_dir: str = ""  # where the synthetic world is generated (default ~/.cache/effclip)
    synthetic_train: int = 40000  # synthetic training images
    synthetic_val: int = 1000  # synthetic held-out images (the evaluation set)
    synthetic_size: int = 64  # synthetic image size

@dataclass
class TrainShared(Shared):  # the flags of both training commands
    masks_per_image: int = 4  # prompts (masks) sampled per SAM image (paper: 32)
    box_prob: float = 0.5  # probability that a mask's prompt is its (noisy) box rather than a point in it
    focal_weight: float = 20.0  # focal : dice ratio of the mask loss (SAM: 20 : 1)
    weight_decay: float = 0.1  # AdamW weight decay (not stated; SAM's 0.1)
    warmup: int = 20  # linear warm-up steps, then cosine to 0.01 x the peak
    grad_clip: float = 1.0  # global gradient-norm clip; 0 = off
    workers: int = 1  # DataLoader workers per stream and rank
    log_every: int = 25  # steps between log lines
    ckpt_every: int = 500  # steps between checkpoints
    keep_ckpts: int = 2  # newest checkpoints kept
    resume: str = ""  # 'auto' = the latest checkpoint in --out, or a path
    overwrite: bool = False  # start over in an --out holding another run's checkpoints (moved to OUT/previous-N/)

@dataclass
class Config(TrainShared):
    stage: int = 1  # 1: CLIP-head probing (frozen backbone); 2: multi-task distillation; 3: resolution adaptation
    init_sam: str = ""  # stages 1-2: SAM weights, also the frozen SAM teacher: official .pth, or a train-sam run
    init: str = ""  # stages 2-3: the previous stage's checkpoint or run directory
    teacher_clip: str = ""  # CLIP teacher: a mobileclip.py checkpoint (bpe.txt beside it) or an OpenCLIP state dict
    bpe: str = ""  # CLIP merges file for an OpenCLIP teacher
    data_clip: str = ""  # tar shards of images for L_CLIP; empty = the synthetic world
    data_sam: str = ""  # SA-1B tar shards (jpg + json) for L_SAM; empty = the synthetic world's masks
    out: str = "runs/samclip"  # run directory
    steps: int = 300  # optimizer steps (paper: 20 epochs of 40.6M images at 2048 a step in stage I)
    batch_clip: int = 64  # CLIP images per step and process (paper: 2048 global)
    batch_sam: int = 8  # SA-1B images per step and process (paper: 32 global)
    clip_sizes: str = ""  # CLIP-side sizes cycled per step (paper: 224,448); empty = the model's (stage 3: + --init's)
    sam_size: int = 0  # SAM-side resolution (paper: 1024); 0 = the model's
    lr: float = 0.0  # CLIP-head learning rate; 0 = the paper's (stages 1 and 3: 8e-4, stage 2: 4e-5)
    backbone_lr_mult: float = 0.1  # stage 2: backbone and SAM head at this fraction of --lr (paper: 0.1)
    lambda_sam: float = 10.0  # weight of L_SAM in stage 2 (paper: 10)
    pool_first: bool = True  # the paper's head order: max-pool, LN, MLP; --no-pool-first: LN, MLP, max-pool
    head_hidden: int = 0  # hidden width of the CLIP head's MLP; 0 = the backbone width (the paper leaves it open)
    crop_scale: float = 0.5  # smallest area fraction of the CLIP images' random resized crop
    precision: str = "auto"  # auto (bf16 autocast on GPU, fp32 on CPU) | bf16 | fp32
    fused: bool = True  # fused attention (SDPA); --no-fused runs the explicit-softmax reference
    eval: bool = True  # at the end: zero-shot segmentation mIoU and SAM-head IoU on the synthetic held-out set
    eval_max: int = 500  # held-out images evaluated
    templates: str = "openai"  # prompt templates of the evaluation: openai (80) | default (7) | a file, one a line

@dataclass
class SamTrainConfig(TrainShared):
    model: str = "tiny"  # SAM size from MODELS
    data: str = ""  # SA-1B tar shards; empty = the synthetic world's masks
    out: str = "runs/sam_tiny"  # run directory
    steps: int = 800  # optimizer steps
    batch_size: int = 32  # images per step and process
    size: int = 0  # training resolution; 0 = the model's
    lr: float = 2e-3  # peak learning rate (SAM: 8e-4 at batch 256)
    warmup: int = 30  # linear warm-up steps

@dataclass
class PredictConfig(Shared):
    init: str = ""  # SAM weights: the official .pth, or any checkpoint or run directory of this script
    image: str = ""  # input image
    point: str = ""  # 'x,y[;x,y...]' foreground points in pixels of the original image
    neg_point: str = ""  # background points, same format
    box: str = ""  # 'x0,y0,x1,y1'
    mask_input: str = ""  # low-res logits of an earlier predict (its _logits.pt) as the mask prompt
    multimask: bool = True  # three candidate masks, keep the best by predicted IoU
    out: str = "out.png"  # the mask PNG (and its low-res logits, _logits.pt)

@dataclass
class SegShared(Shared):  # the flags of segment and eval
    init: str = ""  # a SAM-CLIP run (stage 1 or 2) or its checkpoint
    teacher_clip: str = ""  # the CLIP teacher for the text side; default: the run's
    bpe: str = ""  # CLIP merges for an OpenCLIP teacher
    templates: str = "openai"  # prompt templates: openai (the 80 of the paper) | default (7) | a file, one a line
    size: int = 0  # CLIP-head resolution; 0 = 448 (paper) for vit_b/l/h, the run's first CLIP size for tiny models
    refine: bool = False  # CLIP + SAM head from one pass at SAM's size (App. C): mask prompt + points per class
    refine_threshold: float = 0.5  # probability above which refinement points are drawn (paper: 0.5 for VOC)
    bg_threshold: float = 0.95  # background where the best class probability is below this (GroupViT: 0.95 VOC,
    # 0.35 Pascal Context); -1 = calibrated (eval: on 100 labelled training images; segment: the run's); 0 = none
    background: str = ""  # a background text class instead of the threshold (e.g. 'background')

@dataclass
class SegmentConfig(SegShared):
    image: str = ""  # input image
    classes: str = ""  # comma-separated class names
    out: str = "out.png"  # the label-map PNG (+ .json legend)

@dataclass
class EvalConfig(SegShared):
    dataset: str = ""  # voc | context | context59 | ade | cocostuff (DATASETS; needs --data); empty = synthetic
    data: str = ""  # the dataset's folder as mmsegmentation prepares it (VOCdevkit/VOC2012, ADEChallengeData2016, ...)
    split: str = ""  # its image list / folder; empty = the validation split
    classnames: str = ""  # file of class names, one a line, in label order (VOC's 21 built in)
    zeroshot_data: str = ""  # an ImageFolder for zero-shot classification (at the run's first CLIP size)
    zeroshot_classnames: str = ""  # its class names, one per folder in sorted order; default: the folder names
    coco_instances: str = ""  # a COCO instances JSON: mask mIoU of SAM-head masks from its boxes
    coco_images: str = ""  # the folder of its images
    eval_max: int = 0  # images evaluated per benchmark (0 = all)

# SAM sizes (build_sam.py constants); `tiny` is a CPU model for the synthetic world: 64 px, 8 x 8 tokens;
# `micro` is the tests' (32 px).
_SAM_1024 = dict(image_size=1024, patch=16, window=14, prompt_dim=256, decoder_mlp=2048, decoder_heads=8, mask_in=16,
                 iou_hidden=256)
MODELS = {
    "vit_b": dict(_SAM_1024, width=768, depth=12, heads=12, global_blocks=(2, 5, 8, 11)),
    "vit_l": dict(_SAM_1024, width=1024, depth=24, heads=16, global_blocks=(5, 11, 17, 23)),
    "vit_h": dict(_SAM_1024, width=1280, depth=32, heads=16, global_blocks=(7, 15, 23, 31)),
    "tiny": dict(image_size=64, patch=8, width=128, depth=4, heads=4, window=4, global_blocks=(1, 3),
                 prompt_dim=64, decoder_mlp=256, decoder_heads=4, mask_in=8, iou_hidden=64),
    "micro": dict(image_size=32, patch=4, width=64, depth=2, heads=2, window=4, global_blocks=(1,),  # the tests'
                  prompt_dim=32, decoder_mlp=64, decoder_heads=2, mask_in=8, iou_hidden=32),
}
SAM_MEAN, SAM_STD = (123.675, 116.28, 103.53), (58.395, 57.12, 57.375)  # 0-255 scale
VOC_CLASSES = ("background aeroplane bicycle bird boat bottle bus car cat chair cow diningtable dog horse motorbike "
               "person pottedplant sheep sofa train tvmonitor").split()

# ==== 1. SAM image encoder: ViT with windowed / global attention and decomposed relative positions ===========
# Tokens stay channels-last (B, H, W, C) throughout. Most blocks attend inside w x w windows (the grid is
# zero-padded bottom/right to a multiple of w); a few "global" blocks attend over the whole grid. Every
# attention adds a relative position term q . R[h - h'] + q . R[w - w'] (MViTv2's decomposition), with a
# learned table per axis of 2S - 1 rows; at another grid size the table is linearly resampled.
# LayerNorm over the channels of an NCHW map, eps 1e-6 (SAM's neck, prompt and decoder convs): torchvision's
# (ConvNeXt's), whose `weight` and `bias` are SAM's parameter names.
LayerNorm2d = functools.partial(torchvision.models.convnext.LayerNorm2d, eps=1e-6)

def MLPBlock(dim: int, hidden: int, act=nn.GELU) -> nn.Sequential:
    """lin1 -> act -> lin2, named as in the checkpoint."""
    return nn.Sequential(OrderedDict(lin1=nn.Linear(dim, hidden), act=act(), lin2=nn.Linear(hidden, dim)))

def rel_pos_lookup(q_size: int, k_size: int, table: torch.Tensor) -> torch.Tensor:
    """(q_size, k_size, Dh): the table row of every (query, key) offset along one axis. A table of another
    length than 2 max(q, k) - 1 is resampled linearly first (other resolutions in global blocks)."""
    L = 2 * max(q_size, k_size) - 1
    if table.shape[0] != L:
        table = F.interpolate(table.T[None], size=L, mode="linear")[0].T  # (L, Dh)
    q = torch.arange(q_size)[:, None] * max(k_size / q_size, 1.0)
    k = torch.arange(k_size)[None, :] * max(q_size / k_size, 1.0)
    return table[(q - k + (k_size - 1) * max(q_size / k_size, 1.0)).long()]

def rel_pos_bias(q: torch.Tensor, rel_h: torch.Tensor, rel_w: torch.Tensor) -> torch.Tensor:
    """Decomposed relative position term on an (h, w) grid: q (B, h, w, Dh), unscaled, -> (B, h*w, h*w)
    bias = q . Rh[h - h'] + q . Rw[w - w'] added to the attention logits."""
    B, h, w, Dh = q.shape
    bias_h = torch.einsum("bhwc,hkc->bhwk", q, rel_pos_lookup(h, h, rel_h).to(q.dtype))  # (B, h, w, h')
    bias_w = torch.einsum("bhwc,wkc->bhwk", q, rel_pos_lookup(w, w, rel_w).to(q.dtype))  # (B, h, w, w')
    return (bias_h[..., :, None] + bias_w[..., None, :]).reshape(B, h * w, h * w)

class EncoderAttention(nn.Module):
    """Self-attention on a (B, h, w, C) grid, fused qkv, plus the relative position bias: as SDPA's additive
    mask (fused), or an explicit fp32 softmax (the reference: --no-fused, and the tests)."""
    def __init__(self, dim: int, heads: int, rel_size: int):
        super().__init__()
        self.heads, self.fused = heads, True
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.rel_pos_h, self.rel_pos_w = (nn.Parameter(torch.zeros(2 * rel_size - 1, dim // heads)) for _ in "hw")
    def forward(self, x):
        B, h, w, D = x.shape
        H, Dh, N = self.heads, D // self.heads, h * w
        q, k, v = self.qkv(x).view(B, N, 3, H, Dh).permute(2, 0, 3, 1, 4)  # 3x (B, H, N, Dh)
        bias = rel_pos_bias(q.reshape(B * H, h, w, Dh), self.rel_pos_h, self.rel_pos_w).view(B, H, N, N)
        if self.fused:
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
        else:
            acc = torch.promote_types(q.dtype, torch.float32)  # scores in fp32 at least
            scores = (q.to(acc) * Dh**-0.5) @ k.to(acc).transpose(-2, -1) + bias.to(acc)  # (B, H, N, N)
            o = (scores.softmax(-1) @ v.to(acc)).to(q.dtype)
        return self.proj(o.transpose(1, 2).reshape(B, h, w, D))

def window_partition(x: torch.Tensor, w: int):
    """(B, H, W, C) -> (B * nW, w, w, C), zero-padding H and W bottom/right to multiples of w."""
    B, H, W, D = x.shape
    ph, pw = (w - H % w) % w, (w - W % w) % w
    x, Hp, Wp = F.pad(x, (0, 0, 0, pw, 0, ph)), H + ph, W + pw
    x = x.view(B, Hp // w, w, Wp // w, w, D).permute(0, 1, 3, 2, 4, 5)  # (B, nH, nW, w, w, C)
    return x.reshape(-1, w, w, D), (Hp, Wp)

def window_unpartition(x: torch.Tensor, w: int, padded: tuple, hw: tuple) -> torch.Tensor:
    """Inverse of window_partition: (B * nW, w, w, C) -> (B, H, W, C) with the padding cropped."""
    (Hp, Wp), (H, W) = padded, hw
    B = x.shape[0] // ((Hp // w) * (Wp // w))
    x = x.view(B, Hp // w, Wp // w, w, w, -1).permute(0, 1, 3, 2, 4, 5).reshape(B, Hp, Wp, -1)
    return x[:, :H, :W].contiguous()

class EncoderBlock(nn.Module):
    """Pre-norm block; `window` > 0 attends within windows, 0 globally (then rel_size = the token grid)."""
    def __init__(self, dim: int, heads: int, window: int, grid: int):
        super().__init__()
        self.window = window
        self.norm1, self.norm2 = nn.LayerNorm(dim, eps=1e-6), nn.LayerNorm(dim, eps=1e-6)
        self.attn, self.mlp = EncoderAttention(dim, heads, window or grid), MLPBlock(dim, 4 * dim)
    def forward(self, x):
        if self.window:  # attention inside each w x w window of the padded grid
            y, padded = window_partition(self.norm1(x), self.window)
            x = x + window_unpartition(self.attn(y), self.window, padded, x.shape[1:3])
        else:
            x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))

class ImageEncoderViT(nn.Module):
    """Patchify, + absolute positions (1, g, g, C), blocks, then the neck to (B, out, g, g).
    `forward_tokens` stops before the neck: the branch point of the CLIP head (spec 2.2)."""
    def __init__(self, image_size, patch, width, depth, heads, window, global_blocks, out_chans):
        super().__init__()
        self.img_size, g = image_size, image_size // patch
        self.patch_embed = nn.ModuleDict({"proj": nn.Conv2d(3, width, patch, patch)})  # the checkpoint's names
        self.pos_embed = nn.Parameter(torch.zeros(1, g, g, width))
        self.blocks = nn.ModuleList(EncoderBlock(width, heads, 0 if i in global_blocks else window, g)
                                    for i in range(depth))
        self.neck = nn.Sequential(nn.Conv2d(width, out_chans, 1, bias=False), LayerNorm2d(out_chans),
                                  nn.Conv2d(out_chans, out_chans, 3, padding=1, bias=False), LayerNorm2d(out_chans))
    def forward_tokens(self, x):
        x = self.patch_embed.proj(x).permute(0, 2, 3, 1)  # (B, h, w, C)
        pos = self.pos_embed
        if pos.shape[1:3] != x.shape[1:3]:  # other resolutions: bicubic resize of the grid (spec 6, design choice)
            pos = F.interpolate(pos.permute(0, 3, 1, 2), size=x.shape[1:3], mode="bicubic").permute(0, 2, 3, 1)
        x = x + pos
        for blk in self.blocks:
            x = blk(x)
        return x  # (B, h, w, C)
    def forward(self, x):
        return self.neck(self.forward_tokens(x).permute(0, 3, 1, 2))  # (B, out, h, w)

# ==== 2. Prompt encoder: random Fourier positions for points and boxes, a conv stack for mask prompts ========
class PositionEmbeddingRandom(nn.Module):
    """[sin, cos](2 pi (2c - 1) G) for c in [0, 1]^2; G (2, D/2) a fixed Gaussian, a buffer in the checkpoint."""
    def __init__(self, num_feats: int):
        super().__init__()
        self.register_buffer("positional_encoding_gaussian_matrix", torch.randn(2, num_feats))
    def encode(self, coords):
        z = 2 * math.pi * ((2 * coords - 1) @ self.positional_encoding_gaussian_matrix)  # (..., D/2)
        return torch.cat([torch.sin(z), torch.cos(z)], dim=-1)  # (..., D)
    def grid(self, h: int, w: int):
        """(D, h, w): the encoding of every cell centre of an h x w grid (the decoder's dense PE)."""
        dev = self.positional_encoding_gaussian_matrix.device
        y, x = torch.meshgrid((torch.arange(h, device=dev) + 0.5) / h, (torch.arange(w, device=dev) + 0.5) / w,
                              indexing="ij")
        return self.encode(torch.stack([x, y], dim=-1)).permute(2, 0, 1)

class PromptEncoder(nn.Module):
    """Sparse tokens for points and box corners, a dense map for a mask prompt (or `no_mask_embed`).
    Point labels: 1 foreground, 0 background, -1 padding, 2 / 3 a box's top-left / bottom-right corner."""
    def __init__(self, dim: int, grid: int, image_size: int, mask_in: int):
        super().__init__()
        self.embed_dim, self.image_embedding_size, self.input_image_size = dim, (grid, grid), (image_size, image_size)
        self.pe_layer, self.mask_input_size = PositionEmbeddingRandom(dim // 2), (4 * grid, 4 * grid)
        self.point_embeddings = nn.ModuleList(nn.Embedding(1, dim) for _ in range(4))
        self.not_a_point_embed, self.no_mask_embed = nn.Embedding(1, dim), nn.Embedding(1, dim)
        self.mask_downscaling = nn.Sequential(
            nn.Conv2d(1, mask_in // 4, 2, 2), LayerNorm2d(mask_in // 4), nn.GELU(),
            nn.Conv2d(mask_in // 4, mask_in, 2, 2), LayerNorm2d(mask_in), nn.GELU(), nn.Conv2d(mask_in, dim, 1))
    def get_dense_pe(self):
        return self.pe_layer.grid(*self.image_embedding_size)[None]  # (1, D, g, g)
    def embed_points(self, coords, labels):
        """coords (N, P, 2) pixels of the padded input, labels (N, P) -> (N, P, D). Coordinates move to
        pixel centres (+0.5); a padding point keeps only `not_a_point_embed`."""
        wh = torch.tensor(self.input_image_size[::-1], device=coords.device)
        z = self.pe_layer.encode((coords.float() + 0.5) / wh)  # (x, y) in [0, 1]
        z = torch.where(labels[..., None] == -1, torch.zeros_like(z), z)
        table = torch.cat([self.not_a_point_embed.weight] + [e.weight for e in self.point_embeddings])  # (5, D)
        return z + table[labels.long() + 1]
    def forward(self, points=None, boxes=None, masks=None, pad: bool = True):
        """points = (coords (N, P, 2), labels (N, P)), boxes (N, 4) xyxy, masks (N, 1, 4g, 4g) logits ->
        sparse (N, T, D), dense (N, D, g, g). Points without a box get one padding point (as SAM), unless
        pad=False: training prompts come as two tokens each (point + padding, or a box's corners 2, 3)."""
        n = next((t.shape[0] for t in (points and points[0], boxes, masks) if t is not None), 1)
        dev, parts = self.no_mask_embed.weight.device, []
        if points is not None:
            coords, labels = points
            if boxes is None and pad:
                coords = torch.cat([coords, torch.zeros_like(coords[:, :1])], 1)
                labels = torch.cat([labels, -torch.ones_like(labels[:, :1])], 1)
            parts.append(self.embed_points(coords, labels))
        if boxes is not None:
            parts.append(self.embed_points(boxes.reshape(-1, 2, 2), torch.tensor([[2, 3]], device=dev).expand(n, 2)))
        sparse = torch.cat(parts, 1) if parts else torch.empty(n, 0, self.embed_dim, device=dev)
        dense = self.mask_downscaling(masks) if masks is not None else \
            self.no_mask_embed.weight.reshape(1, -1, 1, 1).expand(n, -1, *self.image_embedding_size)
        return sparse, dense

# ==== 3. Mask decoder: a two-way transformer between prompt tokens and image tokens, hypernetwork masks ======
class DecoderAttention(nn.Module):
    """Attention with separate q/k/v/out projections; cross-attentions work at dim / downsample."""
    def __init__(self, dim: int, heads: int, downsample: int = 1):
        super().__init__()
        inner = dim // downsample
        self.heads, self.fused = heads, True
        self.q_proj, self.k_proj, self.v_proj = nn.Linear(dim, inner), nn.Linear(dim, inner), nn.Linear(dim, inner)
        self.out_proj = nn.Linear(inner, dim)
    def forward(self, q, k, v):
        q, k, v = (t.view(t.shape[0], t.shape[1], self.heads, -1).transpose(1, 2)  # (B, H, N, Dh)
                   for t in (self.q_proj(q), self.k_proj(k), self.v_proj(v)))
        o = (C.attention if self.fused else C.attention_reference)(q, k, v)
        return self.out_proj(o.transpose(1, 2).flatten(2))

class TwoWayBlock(nn.Module):
    """Tokens attend to themselves, tokens -> image, token MLP, image -> tokens; post-norm each time.
    Positional encodings are re-added to queries and keys at every attention (not to values)."""
    def __init__(self, dim: int, heads: int, mlp: int, skip_first_layer_pe: bool):
        super().__init__()
        self.skip_first_layer_pe = skip_first_layer_pe
        self.self_attn = DecoderAttention(dim, heads)
        self.cross_attn_token_to_image = DecoderAttention(dim, heads, 2)
        self.cross_attn_image_to_token = DecoderAttention(dim, heads, 2)
        self.mlp = MLPBlock(dim, mlp, nn.ReLU)
        self.norm1, self.norm2, self.norm3, self.norm4 = (nn.LayerNorm(dim) for _ in range(4))
    def forward(self, queries, keys, query_pe, key_pe):
        if self.skip_first_layer_pe:  # first block: the tokens are their own PE, no residual
            queries = self.self_attn(queries, queries, queries)
        else:
            q = queries + query_pe
            queries = queries + self.self_attn(q, q, queries)
        queries = self.norm1(queries)
        q, k = queries + query_pe, keys + key_pe
        queries = self.norm2(queries + self.cross_attn_token_to_image(q, k, keys))
        queries = self.norm3(queries + self.mlp(queries))
        q, k = queries + query_pe, keys + key_pe
        keys = self.norm4(keys + self.cross_attn_image_to_token(k, q, queries))
        return queries, keys

class TwoWayTransformer(nn.Module):
    def __init__(self, depth: int, dim: int, heads: int, mlp: int):
        super().__init__()
        self.layers = nn.ModuleList(TwoWayBlock(dim, heads, mlp, i == 0) for i in range(depth))
        self.final_attn_token_to_image = DecoderAttention(dim, heads, 2)
        self.norm_final_attn = nn.LayerNorm(dim)
    def forward(self, image, image_pe, tokens):
        """image, image_pe (N, D, g, g), tokens (N, T, D) -> tokens (N, T, D), image tokens (N, g*g, D)."""
        queries, keys, key_pe = tokens, image.flatten(2).transpose(1, 2), image_pe.flatten(2).transpose(1, 2)
        for layer in self.layers:
            queries, keys = layer(queries, keys, tokens, key_pe)
        q, k = queries + tokens, keys + key_pe
        return self.norm_final_attn(queries + self.final_attn_token_to_image(q, k, keys)), keys

class MLPHead(nn.Module):
    """`depth` Linear layers with ReLU between (the decoder's hypernetworks and IoU head)."""
    def __init__(self, dim: int, hidden: int, out: int, depth: int):
        super().__init__()
        dims = [dim] + [hidden] * (depth - 1) + [out]
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(dims[:-1], dims[1:]))
    def forward(self, x):
        for layer in self.layers[:-1]:
            x = F.relu(layer(x))
        return self.layers[-1](x)

class MaskDecoder(nn.Module):
    """Output tokens [iou, mask x 4] + prompt tokens through the two-way transformer; the image tokens are
    upscaled 4x to 32 ... 8 channels and each mask token's 3-layer hypernetwork gives the weights of a
    per-pixel dot product. Token 0 is the single-mask output, tokens 1-3 the ambiguity-aware ones."""
    def __init__(self, dim: int, heads: int, mlp: int, iou_hidden: int, num_multimask: int = 3):
        super().__init__()
        self.num_mask_tokens = n = num_multimask + 1
        self.transformer = TwoWayTransformer(2, dim, heads, mlp)
        self.iou_token, self.mask_tokens = nn.Embedding(1, dim), nn.Embedding(n, dim)
        self.output_upscaling = nn.Sequential(nn.ConvTranspose2d(dim, dim // 4, 2, 2), LayerNorm2d(dim // 4),
                                              nn.GELU(), nn.ConvTranspose2d(dim // 4, dim // 8, 2, 2), nn.GELU())
        self.output_hypernetworks_mlps = nn.ModuleList(MLPHead(dim, dim, dim // 8, 3) for _ in range(n))
        self.iou_prediction_head = MLPHead(dim, iou_hidden, n, 3)
    def forward(self, image_embeddings, image_pe, sparse, dense, multimask_output: bool = True, all_masks=False):
        """image_embeddings (1 or N, D, g, g) -> masks (N, 3 or 1, 4g, 4g) logits, iou (N, 3 or 1);
        all_masks=True returns all four outputs (distillation)."""
        N = sparse.shape[0]
        out_tokens = torch.cat([self.iou_token.weight, self.mask_tokens.weight])[None].expand(N, -1, -1)
        tokens = torch.cat([out_tokens, sparse], dim=1)  # (N, 1 + 4 + T, D)
        src = image_embeddings + dense  # one image's embedding broadcasts over its N prompts
        _, D, g, _ = src.shape
        hs, src = self.transformer(src, image_pe.expand(N, -1, -1, -1), tokens)
        up = self.output_upscaling(src.transpose(1, 2).reshape(N, D, g, g))  # (N, D/8, 4g, 4g)
        hyper = torch.stack([mlp(hs[:, 1 + i]) for i, mlp in enumerate(self.output_hypernetworks_mlps)], 1)
        masks = (hyper @ up.flatten(2)).view(N, -1, *up.shape[2:])  # (N, 4, 4g, 4g)
        iou = self.iou_prediction_head(hs[:, 0])  # (N, 4)
        if all_masks:
            return masks, iou
        sl = slice(1, None) if multimask_output else slice(0, 1)
        return masks[:, sl], iou[:, sl]

# ==== 4. SAM, its pre- and post-processing, and the CLIP head that turns it into SAM-CLIP ====================
class CLIPHead(nn.Module):
    """Sec. 3.2: blocks on the backbone's tokens (copies of SAM's last), max-pool over the patch tokens, LayerNorm,
    an MLP with two hidden layers into the teacher's space. `dense`: LN + MLP on every token, the per-patch
    embeddings of Fig. 2 (design choice). pool_first=False (--no-pool-first, the ablation) pools last (LN, MLP,
    max), so the distilled maximum is over per-patch embeddings, as CLIPpy does (README: on the synthetic world
    the paper's order gave chance-level dense outputs)."""
    def __init__(self, blocks: list, width: int, embed_dim: int, hidden: int, pool_first: bool = True):
        super().__init__()
        self.blocks, self.norm = nn.Sequential(*blocks), nn.LayerNorm(width)  # keys blocks.i as a ModuleList's
        self.mlp = nn.Sequential(nn.Linear(width, hidden), nn.GELU(), nn.Linear(hidden, hidden), nn.GELU(),
                                 nn.Linear(hidden, embed_dim))
        self.pool_first_ = pool_first
        self.register_buffer("pool_first", torch.tensor(pool_first))  # saved, so a checkpoint knows its order
    def tokens(self, x):
        return self.blocks(x)  # (B, h, w, C)
    def forward(self, x):
        if self.pool_first_:
            return self.mlp(self.norm(self.tokens(x).amax(dim=(1, 2))))  # (B, E)
        return self.dense(x).amax(dim=(1, 2))
    def dense(self, x):
        return self.mlp(self.norm(self.tokens(x)))  # (B, h, w, E)

class SamClip(nn.Module):
    """SAM: image_encoder + prompt_encoder + mask_decoder, named as the official checkpoint (the pixel mean
    and std are non-persistent buffers, so the state dict is exactly the official one); `add_clip_head` makes
    it SAM-CLIP, a `clip_head` branching off the encoder's last block, before the neck (spec 2.2)."""
    def __init__(self, image_size, patch, width, depth, heads, window, global_blocks, prompt_dim, decoder_mlp,
                 decoder_heads, mask_in, iou_hidden):
        super().__init__()
        self.image_encoder = ImageEncoderViT(image_size, patch, width, depth, heads, window, global_blocks, prompt_dim)
        self.prompt_encoder = PromptEncoder(prompt_dim, image_size // patch, image_size, mask_in)
        self.mask_decoder = MaskDecoder(prompt_dim, decoder_heads, decoder_mlp, iou_hidden)
        self.register_buffer("pixel_mean", torch.tensor(SAM_MEAN).view(-1, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(SAM_STD).view(-1, 1, 1), persistent=False)
        self.mask_threshold, self.patch = 0.0, patch
    def add_clip_head(self, embed_dim: int, hidden: int = 0, layers: int = 3, pool_first: bool = True):
        last, width = self.image_encoder.blocks[-1], self.image_encoder.pos_embed.shape[-1]
        self.clip_head = CLIPHead([copy.deepcopy(last) for _ in range(layers)], width, embed_dim, hidden or width,
                                  pool_first)
        return self
    def preprocess(self, x: torch.Tensor, hw=None) -> torch.Tensor:
        """(B, 3, h, w) in 0-255, resized already -> normalised, zero-padded bottom/right to the encoder's
        size (padding after normalisation). `hw` (B, 2): valid sizes of images already padded as uint8."""
        x = (x.float() - self.pixel_mean) / self.pixel_std
        if hw is not None:  # zero what lies outside each image's valid area
            ys, xs = torch.arange(x.shape[2], device=x.device), torch.arange(x.shape[3], device=x.device)
            x = x * ((ys[None, :, None] < hw[:, :1, None]) & (xs[None, None, :] < hw[:, 1:, None]))[:, None]
        S = self.image_encoder.img_size
        return F.pad(x, (0, max(0, S - x.shape[3]), 0, max(0, S - x.shape[2])))
    def decode(self, emb, coords=None, labels=None, boxes=None, mask_input=None, multimask=True, all_masks=False,
               pad=True):
        """Image embeddings (1 or N, D, g, g) + prompts (N of them) -> low-res mask logits and IoU. With
        pad=False, coords (N, 2, 2) and labels (N, 2) are token pairs, so a batch can mix points and boxes."""
        sparse, dense = self.prompt_encoder(None if coords is None else (coords, labels), boxes, mask_input, pad)
        return self.mask_decoder(emb, self.prompt_encoder.get_dense_pe(), sparse, dense, multimask, all_masks)
    def postprocess_masks(self, masks, input_hw, original_hw):
        """Low-res logits -> encoder size -> crop the padding -> original size (bilinear each time)."""
        S = self.image_encoder.img_size
        masks = F.interpolate(masks, (S, S), mode="bilinear", align_corners=False)[..., :input_hw[0], :input_hw[1]]
        return F.interpolate(masks, original_hw, mode="bilinear", align_corners=False)
    def encode_image(self, x, normalize: bool = False, dense: bool = False):
        """SAM-normalised (B, 3, S, S), any S the patch divides -> the pooled CLIP embedding (B, E), or with
        dense=True the per-patch embeddings (B, h, w, E)."""
        t = self.image_encoder.forward_tokens(x)  # (B, h, w, C)
        z = self.clip_head.dense(t) if dense else self.clip_head(t)
        return F.normalize(z, dim=-1) if normalize else z
    def forward(self, x, idx=None, coords=None, labels=None):
        """The training entry (what DDP wraps): without prompts, the pooled CLIP embeddings (B, E); with
        prompts (image index idx, coords, labels), all four mask outputs and IoUs of every prompt."""
        if coords is None:
            return self.encode_image(x)
        return self.decode(self.image_encoder(x)[idx], coords, labels, all_masks=True, pad=False)

def build_sam(name: str) -> SamClip:
    """An untrained SAM of MODELS[name] (`add_clip_head` makes it a SAM-CLIP)."""
    model = SamClip(**MODELS.get(name) or C.fail(f"unknown model '{name}'; choose one of {', '.join(MODELS)}"))
    model.model_name = name
    return model

def read_weights(path: str) -> dict:
    """A checkpoint file or run directory (its newest ckpt-*.pt that reads) -> the loaded dict, or one line."""
    if not os.path.exists(path):  # before load_checkpoint, which reads "" and "auto" as "start fresh"
        C.fail(f"checkpoint not found: {path}")
    ck = C.load_checkpoint("auto", path) if os.path.isdir(path) else C.load_checkpoint(path, "")
    return ck or C.fail(f"no ckpt-*.pt in {path}")

def load_sam(path: str, with_clip_head: bool = False, ck: dict | None = None) -> SamClip:
    """SAM (or SAM-CLIP) from the official sam_vit_{b,l,h}_*.pth (a flat state dict, loaded strictly), a checkpoint
    or run directory (its latest) of this script's train-sam or merge, or `ck`, that file already read."""
    ck = ck or read_weights(path)
    if "kind" in ck and "model" in ck:  # this script's checkpoint
        sd, name = ck["model"], ck["model_name"]
    else:  # an official file: the MODELS entry of its width, depth and token grid
        sd = C.unwrap_state_dict(ck)
        if "image_encoder.pos_embed" not in sd:
            C.fail(f"{path} is not a SAM state dict (no image_encoder.pos_embed)")
        _, g, _, w = sd["image_encoder.pos_embed"].shape
        depth = len({k.split(".")[2] for k in sd if k.startswith("image_encoder.blocks.")})
        name = next((n for n, m in MODELS.items() if (m["width"], m["depth"], m["image_size"] // m["patch"])
                     == (w, depth, g)), None) or C.fail(f"a SAM state dict of width {w}, depth {depth}, grid {g} "
                                                         "matches no entry of MODELS")
    model, head = build_sam(name), {k for k in sd if k.startswith("clip_head.")}
    if with_clip_head:
        if not head:
            C.fail(f"{path} has no CLIP head: give a SAM-CLIP (stage 1 or 2) checkpoint")
        model.add_clip_head(sd["clip_head.mlp.4.weight"].shape[0], sd["clip_head.mlp.0.weight"].shape[0],
                            len({k.split(".")[2] for k in head if k.startswith("clip_head.blocks.")}),
                            bool(sd["clip_head.pool_first"]))
    sd = {k: v for k, v in sd.items() if with_clip_head or k not in head}  # SAM alone: the head is dropped
    C.load_state_dict_checked(model, sd, f"SAM weights {path}")
    return model.eval()

def load_samclip(path: str, flag: str) -> tuple[SamClip, dict]:
    """A SAM-CLIP (stage 1 or 2) checkpoint or run of this script -> (model, the checkpoint's dict)."""
    ck = read_weights(path) if path else C.fail(f"needs {flag}, a SAM-CLIP (stage 1 or 2) run or checkpoint")
    if ck.get("kind") != "samclip":
        C.fail(f"{flag} {path} is not a SAM-CLIP checkpoint of this script")
    return load_sam(path, True, ck), ck

def resize_longest(img: Image.Image, size: int) -> Image.Image:
    """SAM's ResizeLongestSide: the longer side becomes `size`, rounding the other (bilinear)."""
    w, h = img.size
    s = size / max(w, h)
    return img.resize((int(w * s + 0.5), int(h * s + 0.5)), Image.BILINEAR)

def embed_image(sam: SamClip, img: Image.Image):
    """SAM's image path: img (PIL RGB) -> longest side to the encoder's size, normalised, padded -> (image
    embedding (1, D, g, g), the resized (h, w), the last block's tokens (1, g, g, C) for the CLIP head)."""
    small = resize_longest(img, sam.image_encoder.img_size)
    x = torchvision.transforms.functional.pil_to_tensor(small)[None].to(sam.pixel_mean.device)  # (1, 3, h, w)
    t = sam.image_encoder.forward_tokens(sam.preprocess(x))
    return sam.image_encoder.neck(t.permute(0, 3, 1, 2)), (small.size[1], small.size[0]), t

@torch.no_grad()
def predict_masks(sam: SamClip, img: Image.Image, points=None, labels=None, box=None, mask_input=None,
                  multimask: bool = True):
    """SamPredictor in one call: img (PIL RGB), points [(x, y)] with labels [1/0], box (x0, y0, x1, y1) in
    original pixels, mask_input (1, 1, 4g, 4g) logits -> (masks (K, H, W) bool, iou (K,), low-res logits)."""
    dev = sam.pixel_mean.device
    emb, (h, w), _ = embed_image(sam, img)
    scale = torch.tensor([w / img.size[0], h / img.size[1]], device=dev)  # prompts move with the resize
    coords = None if points is None else torch.tensor(points, dtype=torch.float32, device=dev)[None] * scale
    lab = None if labels is None else torch.tensor(labels, device=dev)[None]
    boxes = None if box is None else (torch.tensor(box, dtype=torch.float32, device=dev).view(2, 2) * scale).view(1, 4)
    low, iou = sam.decode(emb, coords, lab, boxes, mask_input, multimask)
    masks = sam.postprocess_masks(low, (h, w), (img.size[1], img.size[0]))
    return masks[0] > sam.mask_threshold, iou[0], low

# ==== 5. Losses: L_CLIP (cosine distillation) and L_SAM (focal + dice against the frozen SAM's masks) ========
def cosine_distill_loss(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Eq. 1: mean over images of 1 - cos(student, teacher), both (B, E), in fp32."""
    return (1 - F.cosine_similarity(student.float(), teacher.float(), dim=-1)).mean()

def focal_loss(logits, target, alpha: float = 0.25, gamma: float = 2.0) -> torch.Tensor:
    """Sigmoid focal loss (Lin et al. 2017; torchvision's) of (..., H, W) logits against targets in [0, 1], the
    mean over pixels -> (...). alpha 0.25, gamma 2: the usual defaults (SAM's own values are not published)."""
    return torchvision.ops.sigmoid_focal_loss(logits.float(), target.float(), alpha, gamma).flatten(-2).mean(-1)

def dice_loss(logits, target, eps: float = 1.0) -> torch.Tensor:
    """1 - (2 |P . T| + 1) / (|P| + |T| + 1) per mask, P = sigmoid(logits): (..., H, W) -> (...)."""
    p, t = torch.sigmoid(logits.float()).flatten(-2), target.float().flatten(-2)
    return 1 - (2 * (p * t).sum(-1) + eps) / (p.sum(-1) + t.sum(-1) + eps)

def mask_loss(logits, target, focal_weight: float = 20.0) -> torch.Tensor:
    """L_FD per mask: focal_weight * focal + dice (SAM's 20 : 1), (..., H, W) -> (...)."""
    return focal_weight * focal_loss(logits, target) + dice_loss(logits, target)

def sam_distill_loss(masks, iou, t_masks, t_iou, focal_weight: float = 20.0) -> torch.Tensor:
    """Eq. 2, L_SAM: the student's four outputs (N, 4, h, w) against the frozen SAM's for the same prompt,
    token by token (the head starts as a copy of the teacher's, so its tokens match; design choice), the
    teacher's logits binarised at 0 as the target; plus an MSE keeping the IoU head on the teacher's."""
    return mask_loss(masks, (t_masks > 0).float(), focal_weight).mean() + F.mse_loss(iou.float(), t_iou.float())

def sam_train_loss(masks, iou, gt, labels, focal_weight: float):
    """SAM's training loss on ground truth (train-sam), per prompt: a point is ambiguous, so the best of the
    three multimask outputs is trained (the minimum loss); a box trains the single-mask output. Plus the MSE
    of the IoU head against the actual IoU of each output mask."""
    per = mask_loss(masks, gt[:, None].float().expand_as(masks), focal_weight)  # (N, 4)
    loss = torch.where(labels[:, 0] == 1, per[:, 1:].min(dim=1).values, per[:, 0]).mean()
    return loss + F.mse_loss(iou.float(), mask_iou(masks > 0, gt[:, None].expand_as(masks)).detach())

def mask_iou(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """IoU of boolean masks (..., H, W) -> (...); 1 where both are empty."""
    inter, union = (pred & target).flatten(-2).sum(-1), (pred | target).flatten(-2).sum(-1)
    return torch.where(union > 0, inter / union.clamp(min=1), torch.ones_like(inter, dtype=torch.float))

# ==== 6. Data: SA-1B (jpg + json of COCO run-length masks), the synthetic world's masks, CLIP images =========
# COCO's compressed RLE: a mask is read column by column (Fortran order) as alternating runs of 0s and 1s,
# starting with 0s. Each run length is written as 5-bit groups, low first, as characters chr(48 + g) with
# bit 0x20 meaning "more groups follow" and bit 0x10 of the last group the sign; from the third run on, the
# value stored is the difference to the run two before.
def rle_counts(s: str) -> list[int]:
    """COCO compressed counts string -> run lengths."""
    counts, p = [], 0
    while p < len(s):
        x, k, more = 0, 0, True
        while more:
            c = ord(s[p]) - 48
            x |= (c & 0x1F) << (5 * k)
            more, p, k = bool(c & 0x20), p + 1, k + 1
            if not more and c & 0x10:  # negative: sign-extend
                x |= -1 << (5 * k)
        counts.append(x + (counts[-2] if len(counts) > 2 else 0))
    return counts

def rle_decode(rle: dict) -> np.ndarray:
    """{"size": [h, w], "counts": str or list} -> (h, w) uint8 mask, in numpy (no pycocotools)."""
    h, w = rle["size"]
    counts = rle_counts(rle["counts"]) if isinstance(rle["counts"], str) else list(rle["counts"])
    flat = np.repeat(np.arange(len(counts)) % 2, counts).astype(np.uint8)
    if flat.size != h * w:
        raise ValueError(f"RLE covers {flat.size} pixels, not {h}x{w}")
    return flat.reshape(w, h).T

def coco_mask(segmentation, h: int, w: int) -> np.ndarray:
    """A COCO annotation's mask -> (h, w) bool: RLE (compressed string or uncompressed counts) by rle_decode, or
    polygons [[x0, y0, x1, y1, ...], ...] filled by PIL (edge pixels may differ from pycocotools' by one)."""
    if isinstance(segmentation, dict):
        return rle_decode(segmentation).astype(bool)
    canvas = Image.new("L", (w, h))
    for poly in segmentation:
        ImageDraw.Draw(canvas).polygon([float(v) for v in poly], fill=1)
    return np.asarray(canvas, bool)

def sample_masks(sample: dict):
    """The masks of a sample, as zero-argument decoders (only the chosen ones are decoded): the synthetic
    world's seg.png (one mask per class id > 0), or SA-1B's json annotations (RLE)."""
    if "seg.png" in sample:
        seg = np.asarray(Image.open(io.BytesIO(sample["seg.png"])))
        return [(lambda i=i: seg == i) for i in np.unique(seg) if i > 0]
    return [(lambda a=a: rle_decode(a["segmentation"]).astype(bool))
            for a in json.loads(sample["json"]).get("annotations", [])]

def prompt_for(mask: np.ndarray, rng: random.Random, box_prob: float, noise_cap: float):
    """SAM's prompt simulation, first iteration only: a point uniform in the mask (label 1, plus a padding
    point), or the mask's box with per-coordinate noise of std 10% of the box side capped at noise_cap
    pixels (corner labels 2, 3). -> coords (2, 2), labels (2,)."""
    ys, xs = np.nonzero(mask)
    if rng.random() < box_prob:
        x0, x1, y0, y1 = xs.min(), xs.max(), ys.min(), ys.max()
        sx, sy = min(0.1 * (x1 - x0 + 1), noise_cap), min(0.1 * (y1 - y0 + 1), noise_cap)
        box = [x0 + rng.gauss(0, sx), y0 + rng.gauss(0, sy), x1 + rng.gauss(0, sx), y1 + rng.gauss(0, sy)]
        return torch.tensor(box, dtype=torch.float32).view(2, 2), torch.tensor([2, 3])
    j = rng.randrange(len(xs))
    return torch.tensor([[xs[j], ys[j]], [0, 0]], dtype=torch.float32), torch.tensor([1, -1])

def sam_decode(sample: dict, size: int, k: int, seed: int, box_prob: float) -> dict:
    """Sample -> {"image": uint8 (3, S, S) (longest side S, zero-padded), "hw": (2,) valid size, "coords":
    (K, 2, 2), "labels": (K, 2), "masks": uint8 (K, S, S)}: K masks drawn from the sample's (with replacement
    when it has fewer) and one prompt for each. Raises on a sample without masks (skipped and counted)."""
    img, decoders = C.decode_image(sample), sample_masks(sample)
    if not decoders:
        raise ValueError("no masks")
    rng, small = C.sample_rng(seed, sample), resize_longest(img, size)
    (w, h), image = small.size, torch.zeros(3, size, size, dtype=torch.uint8)
    image[:, :h, :w] = torchvision.transforms.functional.pil_to_tensor(small)
    n = len(decoders)
    picks = rng.sample(range(n), k) if n >= k else [rng.randrange(n) for _ in range(k)]  # with replacement if few
    prompts, masks = [], torch.zeros(k, size, size, dtype=torch.uint8)
    for j, i in enumerate(picks):
        m = np.asarray(Image.fromarray(decoders[i]().astype(np.uint8) * 255).resize((w, h), Image.NEAREST)) > 127
        if not m.any():  # a mask lost in the resize: keep its bounding pixel
            m = np.zeros((h, w), bool)
            m[min(h - 1, h // 2), min(w - 1, w // 2)] = True
        masks[j, :h, :w] = torch.from_numpy(m)
        prompts.append(prompt_for(m, rng, box_prob, 20 * size / 1024))  # SAM's noise cap: 20 px at 1024
    coords, labels = map(torch.stack, zip(*prompts))
    return {"image": image, "hw": torch.tensor([h, w]), "coords": coords, "labels": labels, "masks": masks}

def clip_decode(sample: dict, size: int, seed: int, scale: float) -> dict:
    """Sample -> {"image": uint8 (3, S, S)}: a random resized crop; the student and the teacher see the same
    view, each at its own resolution and normalisation (spec 6). Captions are not used (spec 4)."""
    img = C.decode_image_tensor(sample)
    box = C.random_resized_crop_box(*C.image_wh(img), C.sample_rng(seed, sample), (scale, 1.0))
    return {"image": C.image_to_uint8(img, size, box)}

def synthetic(cfg) -> dict:
    cache = cfg.cache_dir or os.path.join(os.path.expanduser("~"), ".cache", "effclip")
    return C.synthetic_world(cache, cfg.synthetic_train, cfg.synthetic_val, cfg.synthetic_size, seed=0)

def stream(shards: str, decode, batch: int, seed: int, workers: int, rank: int, world: int, pos: dict, start: int):
    """A resumable batch iterator over tar shards, and the DataPosition to record what it gave out; `pos` =
    {rank: {worker: [epoch, n]}} of the checkpoint resumed from, `start` its step."""
    mine, position = pos.get(rank, {}), C.DataPosition()
    position.pos = {int(w): p for w, p in mine.items()}
    try:
        s = C.ShardStream(C.expand_shards(shards), decode, batch, rank, world, seed, 500, mine, start)
    except FileNotFoundError as e:  # a missing --data path: one line
        C.fail(str(e))
    return iter(C.make_loader(s, workers, torch.cuda.is_available())), position

def sam_batch(batch: dict, sam: SamClip, device):
    """A sam_decode batch on the device: normalised padded images (B, 3, S, S), the image index of each of
    the B*K prompts, coords (B*K, 2, 2), labels (B*K, 2), ground-truth masks at the decoder's size (4g)."""
    x = sam.preprocess(batch["image"].to(device), batch["hw"].to(device))
    (B, K), low = batch["labels"].shape[:2], sam.prompt_encoder.mask_input_size[0]
    gt = F.interpolate(batch["masks"].to(device).float(), (low, low), mode="area") > 0.5  # (B, K, low, low)
    idx = torch.arange(B, device=device).repeat_interleave(K)  # the image of each prompt
    return x, idx, batch["coords"].to(device).flatten(0, 1), batch["labels"].to(device).flatten(0, 1), gt.flatten(0, 1)

# ==== 7. The training loop of both commands: train-sam (a small SAM, the tiny pipeline's teacher) and merge ===
def save_run(out, step, model, opt, cfg, kind, positions, extra=None):
    state = {"kind": kind, "model": model.state_dict(), "optimizer": opt.state_dict(), "step": step,
             "rng": C.rng_state(), "data": positions, "model_name": model.model_name,
             "config": dataclasses.asdict(cfg), **(extra or {})}
    C.save_checkpoint(path := os.path.join(out, f"ckpt-{step}.pt"), state)
    C.prune_checkpoints(out, cfg.keep_ckpts, written=path)

def resume_run(cfg, ck, model, opt, kind: str):
    """(start step, {stream: data position}) of `ck` (--resume, read before any work), restoring model, opt, RNG."""
    if ck is None:
        return 0, {}
    if ck.get("kind") != kind or ck.get("model_name") != model.model_name or ck["step"] > cfg.steps:
        C.fail(f"checkpoint {cfg.resume} is a '{ck.get('kind')}' of '{ck.get('model_name')}' at step {ck['step']}, "
               f"not a {kind} run of '{model.model_name}' within --steps {cfg.steps}")
    C.load_state_dict_checked(model, ck["model"], f"checkpoint {cfg.resume}")
    opt.load_state_dict(ck["optimizer"])
    C.set_rng_state(ck["rng"])
    C.print0(f"resumed from step {ck['step']}")
    return ck["step"], ck["data"]

def train_loop(cfg, kind: str, model, opt, dist, start: int, streams: dict, micro_steps, find_unused=False,
               final_eval=None, extra=None):
    """Steps start..cfg.steps: eval and checkpoint, `break` on the last step, `micro_steps(ddp, next_batch, step)`
    (forward and backward of each loss -> {name: loss}, "loss" first), clip, lr_at(step) of the optimizer's peak
    lr times each group's lr_mult, step, zero_grad, log. streams = {name: (batch iterator, DataPosition)}."""
    rank, local_rank, world, device = dist
    ddp = DDP(model, device_ids=[local_rank] if device.type == "cuda" else None,
              find_unused_parameters=find_unused) if world > 1 else model
    log, stop, t0, stopping = C.RunLog(cfg.out), C.StopSignal(), time.time(), False

    def next_batch(name):
        batch = next(streams[name][0])
        streams[name][1].update(batch)  # the data position a resume continues from
        return batch

    for step in C.progress(range(start, cfg.steps + 1), kind, initial=start, total=cfg.steps + 1):
        last_step = step == cfg.steps
        stopping = stop.requested if world == 1 else (step % cfg.log_every == 0 and stop.agreed(device))
        if last_step and final_eval is not None and rank == 0:
            log.log(step, **final_eval())
        if (last_step or stopping or step % cfg.ckpt_every == 0) and step > start:
            save_run(cfg.out, step, model, opt, cfg, kind, {k: p.state() for k, (_, p) in streams.items()}, extra)
        if last_step or stopping:
            break
        losses = micro_steps(ddp, next_batch, step)  # one optimizer step for all micro-steps
        gnorm = torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad],
                                               cfg.grad_clip or float("inf"))
        lr = C.lr_at(step, opt.defaults["lr"], cfg.warmup, cfg.steps, 0.01)
        for g in opt.param_groups:
            g["lr"] = lr * g.get("lr_mult", 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if (step + 1) % cfg.log_every == 0:
            if not torch.isfinite(losses["loss"]):
                C.fail(f"non-finite loss at step {step}; the last good checkpoint in {cfg.out} is kept")
            log.log(step + 1, **{k: v.item() for k, v in losses.items()}, lr=lr, grad_norm=gnorm.item(),
                    steps_per_s=cfg.log_every / (time.time() - t0))
            t0 = time.time()
    C.finish_run(cfg.out, C.latest_checkpoint(cfg.out), f"stopped by a signal at step {step}: --resume auto "
                 "continues from its checkpoint" if stopping and not last_step else "")
    C.cleanup_distributed()

def train_sam(cfg: SamTrainConfig):
    """Train a small SAM on the synthetic world's masks (or SA-1B shards): the SAM teacher of the tiny pipeline."""
    rank, local_rank, world, device = dist = C.setup_distributed(cfg.device)
    ck = C.load_checkpoint(cfg.resume, cfg.out)  # before any work: an unreadable file is one line
    torch.manual_seed(cfg.seed)
    C.document_run(cfg.out, cfg, [__file__, C.__file__])
    model = build_sam(cfg.model).to(device).train()
    opt = C.make_adamw(model, cfg.lr, cfg.weight_decay, betas=(0.9, 0.999))
    start, pos = resume_run(cfg, ck, model, opt, "sam")
    decode = functools.partial(sam_decode, size=cfg.size or MODELS[cfg.model]["image_size"], k=cfg.masks_per_image,
                               seed=cfg.seed, box_prob=cfg.box_prob)
    streams = {"sam": stream(cfg.data or synthetic(cfg)["train"], decode, cfg.batch_size, cfg.seed, cfg.workers, rank,
                             world, pos.get("sam", {}), start)}

    def micro_steps(ddp, next_batch, step):
        x, idx, coords, labels, gt = sam_batch(next_batch("sam"), model, device)
        masks, iou = ddp(x, idx, coords, labels)  # (B*K, 4, low, low), (B*K, 4)
        loss = sam_train_loss(masks, iou, gt, labels, cfg.focal_weight)
        loss.backward()
        best = mask_iou(masks[:, 1:] > 0, gt[:, None]).max(1).values  # the best of the 3 outputs
        return {"loss": loss.detach(), "mask_iou": best.mean()}

    train_loop(cfg, "sam", model, opt, dist, start, streams, micro_steps)

# ==== 8. Merging: stage I (head probing), II (multi-task distillation), III (resolution adaptation), Sec. 4.1 ===
def load_clip_teacher(path: str, bpe: str, device):
    """The frozen CLIP teacher: a mobileclip.py checkpoint with bpe.txt beside it, or an OpenAI/OpenCLIP state
    dict with --bpe (OpenCLIP ViT-L/14 DataComp-1B in the paper). -> (model, tokenizer, spec)."""
    import mobileclip  # only for its teacher loader (MobileCLIP and ViT CLIPs, OpenCLIP weights)
    model, tok, spec = mobileclip.load_teacher(path or C.fail(  # an unreadable file: its one line
        "--teacher-clip is required: a mobileclip.py checkpoint or an OpenCLIP state dict (with --bpe)"), bpe, device)
    return model.requires_grad_(False), tok, spec

def teacher_embed(teacher, spec: dict, x: torch.Tensor) -> torch.Tensor:
    """The teacher's normalised embedding of a uint8 (B, 3, S, S) view, at its own size and normalisation."""
    x = F.interpolate(x.float(), size=spec["image_size"], mode="bicubic", antialias=True, align_corners=False)
    return teacher.encode_image(C.normalize_images(x.clamp(0, 255), spec["mean"], spec["std"]), normalize=True)

def sam_normalize(x: torch.Tensor, size: int) -> torch.Tensor:
    """uint8 (B, 3, s, s) -> the CLIP branch's input: resized to size x size, SAM's mean/std, no padding."""
    x = x.float()
    if x.shape[-1] != size:
        x = F.interpolate(x, size=size, mode="bicubic", antialias=True, align_corners=False).clamp(0, 255)
    return C.normalize_images(x, [m / 255 for m in SAM_MEAN], [s / 255 for s in SAM_STD])

def param_groups_stage2(model: SamClip, mult: float, weight_decay: float) -> list[dict]:
    """Stage II: the CLIP head at the base learning rate, the backbone and the SAM head at mult x base
    (paper: 4e-5 and 4e-6). The prompt encoder stays frozen."""
    head = C.param_groups(model.clip_head, weight_decay)
    body = C.param_groups(nn.ModuleList([model.image_encoder, model.mask_decoder]), weight_decay)
    return [dict(g, lr_mult=m) for gs, m in ((head, 1.0), (body, mult)) for g in gs if g["params"]]

def build_student(cfg: Config, embed_dim: int, device):
    """Stage 1: SAM from --init-sam plus a new CLIP head (copies of the last block); stages 2 and 3: the previous
    stage's checkpoint. -> (model, the frozen SAM teacher (stage 2), the optimizer, --init's sizes)."""
    sam_teacher = None if cfg.stage == 3 else load_sam(cfg.init_sam or C.fail(
        "--init-sam is required: sam_vit_b_01ec64.pth or a train-sam run (also the frozen SAM teacher)"))
    model, ck = (copy.deepcopy(sam_teacher).add_clip_head(embed_dim, cfg.head_hidden, 3, cfg.pool_first), {}) \
        if cfg.stage == 1 else load_samclip(cfg.init, f"--stage {cfg.stage} --init")
    model.to(device).train()
    for m in model.modules():  # --no-fused: the explicit-softmax reference attention
        if isinstance(m, (EncoderAttention, DecoderAttention)):
            m.fused = cfg.fused
    if cfg.stage != 2:  # stages I and III (Sec. 4.1, spec 3.2): the CLIP head alone, at 8e-4
        model.requires_grad_(False).clip_head.requires_grad_(True)
        opt = C.make_adamw(model.clip_head, cfg.lr or 8e-4, cfg.weight_decay, betas=(0.9, 0.999))
        return model, None, opt, ck.get("clip_sizes", [])
    if model.model_name != sam_teacher.model_name:
        C.fail(f"--init is a {model.model_name}, --init-sam a {sam_teacher.model_name}")
    model.requires_grad_(True).prompt_encoder.requires_grad_(False)
    groups = param_groups_stage2(model, cfg.backbone_lr_mult, cfg.weight_decay)
    opt = torch.optim.AdamW(groups, lr=cfg.lr or 4e-5, betas=(0.9, 0.999))
    return model, sam_teacher.to(device).requires_grad_(False).eval(), opt, ck["clip_sizes"]

def merge(cfg: Config):
    """Merge SAM and CLIP: stage I trains a CLIP head on the frozen SAM, stage II both heads, stage III the CLIP
    head at SAM's resolution too (the default command)."""
    rank, local_rank, world, device = dist = C.setup_distributed(cfg.device)
    if cfg.stage not in (1, 2, 3):
        C.fail(f"--stage must be 1, 2 or 3, not {cfg.stage}")
    templates = C.templates_arg(cfg.templates)
    ck = C.load_checkpoint(cfg.resume, cfg.out)  # before any work: an unreadable file is one line
    torch.manual_seed(cfg.seed)
    C.document_run(cfg.out, cfg, [__file__, C.__file__])
    teacher, tok, spec = load_clip_teacher(cfg.teacher_clip, cfg.bpe, device)
    E = teacher_embed(teacher, spec, torch.zeros(1, 3, 8, 8, device=device)).shape[-1]
    model, sam_teacher, opt, init_sizes = build_student(cfg, E, device)
    S = model.image_encoder.img_size
    sizes = [int(s) for s in cfg.clip_sizes.split(",")] if cfg.clip_sizes else [S]
    if cfg.stage == 3 and not cfg.clip_sizes:  # the earlier stages' sizes and SAM's (paper: 224, 448, 1024)
        sizes = list(dict.fromkeys(init_sizes + [S]))
    bf16 = cfg.precision == "bf16" or (cfg.precision == "auto" and device.type == "cuda")
    C.print0(f"stage {cfg.stage}: {model.model_name}, CLIP head {sum(p.numel() for p in model.clip_head.parameters()):,}"
             f" params ({E}-d teacher), trainable {sum(p.numel() for p in model.parameters() if p.requires_grad):,}")
    start, pos = resume_run(cfg, ck, model, opt, "samclip")
    world_data = None if cfg.data_clip and (cfg.data_sam or cfg.stage != 2) else synthetic(cfg)
    streams = {"clip": stream(cfg.data_clip or world_data["train"], functools.partial(
        clip_decode, size=max(sizes), seed=cfg.seed, scale=cfg.crop_scale), cfg.batch_clip, cfg.seed, cfg.workers, rank,
        world, pos.get("clip", {}), start)}
    if cfg.stage == 2:
        streams["sam"] = stream(cfg.data_sam or world_data["train"], functools.partial(
            sam_decode, size=cfg.sam_size or S, k=cfg.masks_per_image, seed=cfg.seed + 1, box_prob=cfg.box_prob),
            cfg.batch_sam, cfg.seed + 1, cfg.workers, rank, world, pos.get("sam", {}), start)
    extra = {"stage": cfg.stage, "teacher_clip": os.path.abspath(cfg.teacher_clip), "bpe": cfg.bpe,
             "clip_sizes": sizes, "embed_dim": E}

    def micro_steps(ddp, next_batch, step):
        # ---- micro-step 1: L_CLIP on a CLIP batch at this step's resolution (Eq. 1) -----------------
        img = next_batch("clip")["image"].to(device, non_blocking=True)  # uint8 (B, 3, S_max, S_max)
        x = sam_normalize(img, sizes[step % len(sizes)])
        with torch.no_grad():
            target = teacher_embed(teacher, spec, img)  # (B, E), normalised
        # stage II all-reduces the gradients once, in the SAM micro-step's backward
        with ddp.no_sync() if world > 1 and cfg.stage == 2 else contextlib.nullcontext():
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                z = ddp(x)  # (B, E); stage I builds no graph through the frozen backbone
            l_clip = cosine_distill_loss(z, target)
            l_clip.backward()
        l_sam = torch.zeros((), device=device)
        # ---- micro-step 2: lambda L_SAM against the frozen SAM on a SAM batch (Eq. 2, 3) ------------
        if cfg.stage == 2:
            xs, idx, coords, labels, _ = sam_batch(next_batch("sam"), model, device)
            with torch.no_grad():
                t_masks, t_iou = sam_teacher(xs, idx, coords, labels)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                masks, iou = ddp(xs, idx, coords, labels)  # (B*K, 4, low, low), (B*K, 4)
            l_sam = sam_distill_loss(masks, iou, t_masks, t_iou, cfg.focal_weight)
            (cfg.lambda_sam * l_sam).backward()
        return {"loss": (l_clip + cfg.lambda_sam * l_sam).detach(), "l_clip": l_clip.detach(), "l_sam": l_sam.detach()}

    def final_eval():  # on the synthetic held-out set; `segment` uses the calibrated threshold by default
        res = synthetic_eval(model, (teacher, tok, spec), world_data, sizes[0], cfg.eval_max, device, sam_teacher,
                             cfg.stage == 3, templates)
        extra["bg_threshold"] = res["bg_threshold"]
        return res

    # DDP all-reduces only what trains: the CLIP head in stages I and III, all but the prompt encoder in stage II
    train_loop(cfg, "samclip", model, opt, dist, start, streams, micro_steps, cfg.stage == 2,
               final_eval if cfg.eval and world_data is not None else None, extra)

# ==== 9. Zero-shot semantic segmentation (Sec. 4.3, Table 2), the SAM-head refinement (App. C), benchmarks ====
# Table 2's protocol (CLIPpy's, which the paper follows): resize the image to 448 x 448 (a 28 x 28 token grid),
# per-patch embeddings from the CLIP head, cosine similarity with each class's text embedding averaged over
# OpenAI's 80 ImageNet templates, bilinear upsampling of the logits to the image, argmax per pixel. Background,
# which the paper leaves open, as GroupViT (which Table 2 compares with) does: softmax over the classes of
# 100 x cosine (CLIP's logit scale), background where the best probability is below --bg-threshold (or below
# the image's highest, so some pixel stays an object). Options: a threshold calibrated on labelled training
# images (-1), a background text class (--background NAME), or none (background pixels not scored).
# Benchmarks as mmsegmentation prepares them: (image dir, label dir, image list ('' = every .jpg), label
# suffix, reduce_zero_label, label 0 is background, (eval split, calibration split)).
_CONTEXT = ("JPEGImages", "SegmentationClassContext", "ImageSets/SegmentationContext/{}.txt", ".png")
DATASETS = {
    "voc": ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation/{}.txt", ".png", False, True, ("val", "train")),
    "context": (*_CONTEXT, False, True, ("val", "train")),  # Pascal Context 60 (with background), as GroupViT's 22.4
    "context59": (*_CONTEXT, True, False, ("val", "train")),
    "ade": ("images/{}", "annotations/{}", "", ".png", True, False, ("validation", "training")),  # ADE20K, 150
    "cocostuff": ("images/{}", "annotations/{}", "", "_labelTrainIds.png", False, False, ("val2017", "train2017")),
}

def text_classifier(clip_teacher, classnames: list[str], device, templates=C.OPENAI_IMAGENET_TEMPLATES):
    """(E, K) normalised text embeddings of the class names, averaged over the templates (frozen text encoder)."""
    model, tok, spec = clip_teacher
    return C.zeroshot_classifier(model, tok, classnames, templates, device, spec["context_length"])

@torch.no_grad()
def dense_logits(model: SamClip, img: Image.Image, size: int, classifier: torch.Tensor) -> torch.Tensor:
    """(K, H, W) cosine logits at the image's size: the image resized to size x size, the per-patch logits
    (K, h, w) upsampled bilinearly."""
    x = C.image_to_uint8(img, size, (0, 0, *img.size))[None].to(classifier.device)
    z = model.encode_image(sam_normalize(x, size), normalize=True, dense=True)  # (1, h, w, E)
    logits = (z @ classifier).permute(0, 3, 1, 2)  # (1, K, h, w)
    return F.interpolate(logits, (img.size[1], img.size[0]), mode="bilinear", align_corners=False)[0]

@torch.no_grad()
def refine_with_sam(model: SamClip, img: Image.Image, classifier: torch.Tensor, threshold: float,
                    rng: random.Random, drop_first: bool = False) -> torch.Tensor:
    """App. C, both heads from one backbone pass at SAM's size (what stage III trains the CLIP head for): the
    CLIP head's per-patch logits on the valid part of SAM's padded frame; for each class whose probability
    passes `threshold` somewhere, the SAM head prompted with that probability map (as logits at the
    mask-prompt size) and 1-3 points drawn where it passes. -> (K, H, W) SAM logits at image size, -inf for
    the classes not prompted (and without the first, background text class if drop_first)."""
    S, low, p = model.image_encoder.img_size, model.prompt_encoder.mask_input_size[0], model.patch
    emb, (h, w), tokens = embed_image(model, img)  # the one backbone pass
    gh, gw = math.ceil(h / p), math.ceil(w / p)  # the token grid that covers the image
    z = F.normalize(model.clip_head.dense(tokens)[:, :gh, :gw], dim=-1) @ classifier  # (1, gh, gw, K)
    logits = F.interpolate(z.permute(0, 3, 1, 2), (gh * p, gw * p), mode="bilinear")[0, int(drop_first):, :h, :w]
    probs = (100 * logits).softmax(0)  # CLIP's logit scale; (K, h, w) on the resized image
    frame = F.pad(probs, (0, S - w, 0, S - h))  # SAM's padded frame
    prompts = torch.logit(F.interpolate(frame[None], (low, low), mode="bilinear")[0], eps=1e-4)  # (K, low, low)
    scores = torch.full((len(probs), img.size[1], img.size[0]), -float("inf"), device=probs.device)
    for k in range(len(probs)):
        ys, xs = torch.nonzero(probs[k] > threshold, as_tuple=True)
        if len(ys) == 0:
            continue
        pick = rng.sample(range(len(ys)), min(len(ys), rng.randint(1, 3)))
        pts = torch.stack([xs[pick], ys[pick]], 1).float()[None]  # (1, n, 2) as (x, y)
        low_logits, _ = model.decode(emb, pts, torch.ones(1, len(pick), device=pts.device),
                                     mask_input=prompts[k][None, None], multimask=False)
        scores[k] = model.postprocess_masks(low_logits, (h, w), (img.size[1], img.size[0]))[0, 0]
    return scores

def segment_image(model, img, size, classifier, bg_text=False, bg_threshold=0.0, refine=False, threshold=0.5,
                  rng=None) -> torch.Tensor:
    """(H, W) labels: with a background rule 0 = background and 1 + k = class k, without one k. With
    bg_text, the classifier's first column is the background class."""
    if refine:  # a pixel no class's SAM mask claims (all logits < 0) is background
        best = refine_with_sam(model, img, classifier, threshold, rng or random.Random(0), bg_text).max(0)
        return torch.where(best.values > 0, best.indices + 1, 0) if bg_text or bg_threshold else best.indices
    logits = dense_logits(model, img, size, classifier)
    if bg_threshold and not bg_text:
        best = (100 * logits).softmax(0).max(0)
        return torch.where(best.values < min(bg_threshold, best.values.max().item()), 0, best.indices + 1)
    return logits.argmax(0)

@torch.no_grad()
def seg_eval(model, pairs, classnames, classifier, size, device, has_bg=True, bg_text=False, bg_threshold=0.0,
             refine=False, threshold=0.5, reduce_zero_label=False) -> dict:
    """mIoU (%, C.miou of the summed confusion matrix) over (PIL image, label map) pairs, 255 ignored; has_bg: label
    0 is background, 1 + k classnames[k] (not scored without a background rule); also chance (a random class per
    patch, upsampled the same way) and majority (all background or the first class)."""
    bg = has_bg and (bg_text or bool(bg_threshold))
    reduce = reduce_zero_label or (has_bg and not bg)
    K, g = len(classnames) + bg, size // model.patch  # g: the token grid
    conf, chance, majority = (torch.zeros(K, K, dtype=torch.long) for _ in range(3))
    gen, rng = torch.Generator().manual_seed(0), random.Random(0)
    for img, label in C.progress(pairs, "segmentation eval"):
        y = torch.from_numpy(np.asarray(label, np.int64))
        pred = segment_image(model, img, size, classifier, bg_text, bg_threshold, refine, threshold, rng)
        rand = F.interpolate(torch.rand(1, K, g, g, generator=gen), y.shape, mode="bilinear")[0].argmax(0)
        for c, p in ((conf, pred.cpu()), (chance, rand), (majority, torch.zeros_like(y))):
            c += C.confusion_matrix(p, y, K, reduce_zero_label=reduce)
    return {"miou": C.miou(conf), "chance_miou": C.miou(chance), "majority_miou": C.miou(majority),
            "pixel_acc": 100 * conf.diag().sum().item() / max(1, conf.sum().item())}

@torch.no_grad()
def calibrate_bg_threshold(model, pairs, classnames, classifier, size) -> float:
    """The background probability threshold with the best mIoU on labelled images (the only use of labels;
    pass training images): a search over quantiles of the best class probability."""
    best, cls, top, ys = [], [], [], []
    for img, label in C.progress(pairs, "background calibration"):
        b = (100 * dense_logits(model, img, size, classifier)).softmax(0).max(0)
        best.append(b.values.flatten().cpu())
        cls.append(b.indices.flatten().cpu() + 1)
        top.append(torch.full_like(best[-1], best[-1].max().item()))  # segment_image keeps the image's top pixel
        ys.append(torch.from_numpy(np.asarray(label, np.int64)).flatten())
    best, cls, top, ys = map(torch.cat, (best, cls, top, ys))
    taus = torch.quantile(best[::max(1, len(best) // 20000)], torch.linspace(0.02, 0.98, 49))
    K = len(classnames) + 1
    return max(taus.tolist(), key=lambda t: C.miou(C.confusion_matrix(torch.where((best < t) & (best < top), 0, cls),
                                                                      ys, K)))

def seg_pairs(name: str, root: str, split: str, n: int = 0):
    """(image, label map) of a DATASETS benchmark folder, read lazily: a palette PNG's indices or a grey PNG's
    values are the labels (255 ignored)."""
    img_dir, ann_dir, lst, suffix = DATASETS[name][:4]
    img_dir, ann_dir = (os.path.join(root, d.format(split)) for d in (img_dir, ann_dir))
    listing = os.path.join(root, lst.format(split)) if lst else img_dir
    if not os.path.exists(listing):
        C.fail(f"not a {name} folder as mmsegmentation prepares it: {listing} not found")
    ids = C.read_lines(listing) if lst else sorted(f[:-4] for f in os.listdir(img_dir) if f.endswith(".jpg"))
    for i in ids[: n or None]:
        yield open_image(os.path.join(img_dir, f"{i}.jpg")), np.asarray(Image.open(os.path.join(ann_dir, i + suffix)))

def synthetic_pairs(world: dict, n: int, split: str = "val"):
    """(image, mask, label, sample) of the synthetic world; mask 0 = background, 1 + k = SYNTH_SHAPES[k]."""
    out, skipped = [], {}
    for shard in C.expand_shards(world[split]):
        for s in C.iter_tar_samples(shard, skipped):
            if len(out) == n:
                return out
            out.append((C.decode_image(s), np.asarray(Image.open(io.BytesIO(s["seg.png"]))),
                        json.loads(s["json"])["label"], s))
    return out

@torch.no_grad()
def sam_head_iou(model: SamClip, samples, device) -> float:
    """Mean IoU (%) against the ground truth of the SAM head's mask for one point per object mask (the
    output the IoU head ranks first), at SAM's size: how much of SAM the model keeps."""
    model.eval()
    ious = []
    for i in range(0, len(samples), 64):
        batch = C.collate([sam_decode(s, model.image_encoder.img_size, 1, 0, 0.0) for s in samples[i:i + 64]])
        x, idx, coords, labels, gt = sam_batch(batch, model, device)
        masks, iou = model(x, idx, coords, labels)
        best = masks[:, 1:][torch.arange(len(masks)), iou[:, 1:].argmax(1)]  # (N, low, low)
        ious.append(mask_iou(best > 0, gt))
    return 100 * torch.cat(ious).mean().item()

@torch.no_grad()
def coco_box_miou(sam: SamClip, ann_file: str, image_dir: str, n: int = 0) -> float:
    """SAM's retained skill (Table 1's COCO column, SAM's protocol with ground-truth boxes in place of ViTDet's):
    mean IoU (%) over the non-crowd instances of a COCO instances JSON of the single-mask output prompted by
    each instance's box, against its mask (polygons or RLE, decoded by coco_mask)."""
    try:
        with open(ann_file) as f:
            coco, anns = json.load(f), {}
        for a in (a for a in coco["annotations"] if not a.get("iscrowd")):
            anns.setdefault(a["image_id"], []).append(a)
        images = [im for im in coco["images"] if im["id"] in anns][: n or None]
    except (OSError, ValueError, KeyError, TypeError) as e:
        C.fail(f"cannot read COCO instances {ann_file}: {type(e).__name__}: {e}")
    ious = []
    for im in C.progress(images, "box-prompted masks"):
        img, a = open_image(os.path.join(image_dir, im["file_name"])), anns[im["id"]]
        emb, (h, w), _ = embed_image(sam, img)
        W, H = img.size
        boxes = torchvision.ops.box_convert(torch.tensor([b["bbox"] for b in a], dtype=torch.float32), "xywh", "xyxy")
        low, _ = sam.decode(emb, boxes=(boxes * torch.tensor([w / W, h / H] * 2)).to(emb.device), multimask=False)
        pred = sam.postprocess_masks(low, (h, w), (H, W))[:, 0].cpu() > sam.mask_threshold  # (N, H, W)
        ious.append(mask_iou(pred, torch.from_numpy(np.stack([coco_mask(b["segmentation"], H, W) for b in a]))))
    return 100 * torch.cat(ious).mean().item() if ious else float("nan")

@torch.no_grad()
def synthetic_eval(model, clip_teacher, world, size, n, device, sam_teacher=None, refine=False,
                   templates=C.OPENAI_IMAGENET_TEMPLATES) -> dict:
    """On the synthetic held-out set: zero-shot segmentation mIoU and chance, background by the probability
    threshold 0.95 (seg_*), by one calibrated on min(n, 100) training images (seg_calibrated_*) or not scored
    (seg_objects_*); classification top-1 of the pooled embedding; the SAM head's IoU (and the frozen SAM's)."""
    model.eval()
    data, names = synthetic_pairs(world, n), list(C.SYNTH_SHAPES)
    pairs, classifier = [(a, b) for a, b, _, _ in data], text_classifier(clip_teacher, names, device, templates)
    tau = calibrate_bg_threshold(model, [(a, b) for a, b, _, _ in synthetic_pairs(world, min(n, 100), "train")],
                                 names, classifier, size)
    out = {"bg_threshold": tau}
    for tag, kw in (("seg", dict(bg_threshold=0.95)), ("seg_calibrated", dict(bg_threshold=tau)),
                    ("seg_objects", {})) + ((("seg_refined", dict(bg_threshold=0.95, refine=True)),) if refine else ()):
        out.update({f"{tag}_{k}": v for k, v in seg_eval(model, pairs, names, classifier, size, device, **kw).items()})
    x = torch.stack([C.image_to_uint8(a, size, (0, 0, *a.size)) for a, _, _, _ in data]).to(device)
    z = torch.cat([model.encode_image(sam_normalize(x[i:i + 128], size), normalize=True) for i in range(0, len(x), 128)])
    y = torch.tensor([c for _, _, c, _ in data])
    out["zeroshot_top1"] = 100 * ((z @ classifier).argmax(1).cpu() == y).float().mean().item()
    for key, m in (("sam_head_iou", model), ("sam_teacher_iou", sam_teacher)):  # how much of SAM is kept
        if m is not None:
            out[key] = sam_head_iou(m, [s for *_, s in data], device)
    model.train()
    return out

# ==== 10. Commands: predict, segment, eval, train-sam, and the merge (default) ===============================
def parse_points(text: str) -> list:
    try:
        return [[float(v) for v in p.split(",")] for p in text.split(";") if p.strip()]
    except ValueError:
        C.fail(f"cannot read points '{text}': use x,y;x,y")

def open_image(path: str) -> Image.Image:
    try:
        return Image.open(path).convert("RGB") if os.path.isfile(path) else C.fail(f"image not found: {path}")
    except (OSError, ValueError) as e:  # PIL's UnidentifiedImageError is an OSError
        C.fail(f"cannot read image {path}: {e}")

def predict_main(cfg: PredictConfig):
    """SAM from prompts (points, a box, an earlier mask): `predict --init sam.pth --image x.jpg --point 320,240`."""
    device = C.setup_distributed(cfg.device)[3]
    img = open_image(cfg.image)  # the inputs first, the model after them
    pos, neg = parse_points(cfg.point), parse_points(cfg.neg_point)
    box = parse_points(cfg.box)[0] if cfg.box else None
    if box is not None and len(box) != 4:
        C.fail("--box needs x0,y0,x1,y1")
    if not (pos or neg or box or cfg.mask_input):
        C.fail("give a prompt: --point, --neg-point, --box or --mask-input")
    try:
        mask_in = torch.load(cfg.mask_input, weights_only=True).to(device) if cfg.mask_input else None
    except Exception as e:  # missing, empty, not a tensor: one line
        C.fail(f"cannot read --mask-input {cfg.mask_input}: {type(e).__name__}: {str(e).strip()[:200] or 'no data'}")
    sam = load_sam(cfg.init or C.fail("predict needs --init, SAM weights")).to(device)
    masks, iou, low = predict_masks(sam, img, pos + neg or None, [1] * len(pos) + [0] * len(neg) if pos + neg else None,
                                    box, mask_in, cfg.multimask)
    best = int(iou.argmax())
    Image.fromarray(masks[best].cpu().numpy().astype(np.uint8) * 255).save(cfg.out)
    torch.save(low[:, best:best + 1].cpu(), os.path.splitext(cfg.out)[0] + "_logits.pt")  # for --mask-input
    print(f"{cfg.out}: mask {best} of {len(iou)}, predicted IoU {iou[best]:.3f}, area {masks[best].float().mean():.1%}")

def load_samclip_run(cfg: SegShared):
    """The SAM-CLIP model of --init, its CLIP teacher (the text side), CLIP-head size, checkpoint and device."""
    device = C.setup_distributed(cfg.device)[3]
    model, ck = load_samclip(cfg.init, "--init")
    teacher = load_clip_teacher(cfg.teacher_clip or ck["teacher_clip"], cfg.bpe or ck.get("bpe", ""), device)
    size = cfg.size or (448 if model.model_name.startswith("vit_") else ck["clip_sizes"][0])
    return model.to(device), teacher, size, ck, device

def segment_main(cfg: SegmentConfig):
    """Zero-shot semantic segmentation of an image into --classes: a label-map PNG and a .json legend."""
    classes = [c.strip() for c in cfg.classes.split(",") if c.strip()] or C.fail("segment needs --classes 'a,b,c'")
    img, templates = open_image(cfg.image), C.templates_arg(cfg.templates)
    model, teacher, size, ck, device = load_samclip_run(cfg)
    tau = ck.get("bg_threshold", 0.95) if cfg.bg_threshold < 0 else cfg.bg_threshold  # -1: the run's calibrated
    bg_text = bool(cfg.background)  # --background NAME: a text class instead of the threshold
    classifier = text_classifier(teacher, ([cfg.background] if bg_text else []) + classes, device, templates)
    pred = segment_image(model, img, size, classifier, bg_text, tau, cfg.refine, cfg.refine_threshold,
                         random.Random(cfg.seed)).cpu().numpy()
    names = (["background"] if bg_text or tau else []) + classes
    png = Image.fromarray(pred.astype(np.uint8), "P")
    png.putpalette([0, 0, 0] + np.random.default_rng(0).integers(40, 256, 3 * 255).tolist())
    png.save(cfg.out)
    area = {n: round(float((pred == i).mean()), 4) for i, n in enumerate(names)}
    with open(os.path.splitext(cfg.out)[0] + ".json", "w") as f:
        json.dump({"classes": names, "area": area}, f, indent=1)
    print(f"{cfg.out}: " + ", ".join(f"{n} {a:.1%}" for n, a in area.items()))

def eval_main(cfg: EvalConfig):
    """Zero-shot segmentation mIoU on a benchmark folder (--dataset, --data), zero-shot classification on an
    ImageFolder (--zeroshot-data), box-prompted mask mIoU on COCO (--coco-instances); with none of them, the
    synthetic held-out set (segmentation, classification top-1 and the SAM head's IoU)."""
    if cfg.dataset and (cfg.dataset not in DATASETS or not cfg.data):
        C.fail(f"--dataset is one of {', '.join(DATASETS)}, with --data its folder")
    if cfg.dataset and cfg.dataset != "voc" and not cfg.classnames:
        C.fail(f"--dataset {cfg.dataset} needs --classnames, a file of its class names in label order")
    templates = C.templates_arg(cfg.templates)
    model, teacher, size, ck, device = load_samclip_run(cfg)
    res, t0 = {}, time.time()
    if cfg.dataset:
        *_, reduce, has_bg, (val, train) = DATASETS[cfg.dataset]
        names = C.read_lines(cfg.classnames) if cfg.classnames else VOC_CLASSES
        names = names[1:] if has_bg else names  # the text classes; label 0 is background
        bg_text = has_bg and bool(cfg.background)
        classifier = text_classifier(teacher, ([cfg.background] if bg_text else []) + names, device, templates)
        tau = cfg.bg_threshold if has_bg else 0.0
        if tau < 0:  # calibrated on 100 images of the training split
            tau = calibrate_bg_threshold(model, list(seg_pairs(cfg.dataset, cfg.data, train, 100)), names,
                                         classifier, size)
        res = seg_eval(model, seg_pairs(cfg.dataset, cfg.data, cfg.split or val, cfg.eval_max), names, classifier,
                       size, device, has_bg, bg_text, tau, cfg.refine, cfg.refine_threshold, reduce)
        res["bg_threshold"] = tau
    if cfg.zeroshot_data:
        items, names = C.image_folder(cfg.zeroshot_data, C.read_lines(cfg.zeroshot_classnames)
                                      if cfg.zeroshot_classnames else None)
        res.update(C.zeroshot_eval(model, text_classifier(teacher, names, device, templates),
                                   items[: cfg.eval_max or None], ck["clip_sizes"][0], device, 64,
                                   [m / 255 for m in SAM_MEAN], [s / 255 for s in SAM_STD]))
    if cfg.coco_instances:
        res["coco_box_miou"] = coco_box_miou(model, cfg.coco_instances, cfg.coco_images, cfg.eval_max)
    if not res:
        res = synthetic_eval(model, teacher, synthetic(cfg), size, cfg.eval_max or cfg.synthetic_val, device,
                             refine=cfg.refine, templates=templates)
    res["seconds"] = round(time.time() - t0, 1)
    print(json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in res.items()}))
    return res

def main(argv=None):
    """`samclip.py [merge] [flags]`, `samclip.py train-sam|predict|segment|eval [flags]`; COMMAND --help: its flags."""
    return C.run_command(__doc__, {"merge": (merge, Config), "train-sam": (train_sam, SamTrainConfig),
                                   "predict": (predict_main, PredictConfig), "segment": (segment_main, SegmentConfig),
                                   "eval": (eval_main, EvalConfig)}, argv, default="merge")

if __name__ == "__main__":
    main()
