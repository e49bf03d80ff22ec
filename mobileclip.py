"""MobileCLIP: Fast Image-Text Models through Multi-Modal Reinforced Training (arXiv 2311.17049), and the
MobileCLIP2 models (arXiv 2508.20691).

In: the MobileCLIP model zoo with reparameterisation and the official checkpoint layouts; the plain CLIP baseline
(common.py's towers); multi-modal reinforced training on DataCompDR shards (the official pair and mix-synthetic
modes) and `reinforce`, which writes such shards from any image-text shards; DDP, bf16 autocast, torch.compile;
zero-shot as OpenCLIP evaluates it, and retrieval. Out: the CoCa captioner (bring captions with --captions; the
synthetic world has its own accurate captioner), online KD with live teachers, the DataComp 38-task suite.

Paper -> code (spec: shared/papers/mobileclip.md):
  MCi image encoders, FastViT-derived (spec 2.2, 2.3)  -> MCi: MobileOneBlock stem, RepMixerBlock and
                                                          AttentionBlock stages, RepCPE, PatchEmbed
  MCt hybrid text encoder (spec 2.5); base text        -> TextEncoder(mct=True), TextRepMixerBlock; TextEncoder
  MobileCLIP-B: ViT-B/16 with a conv stem (spec 2.4)   -> ConvStemViT
  structural reparameterisation (spec 2.2)             -> reparameterize
  released checkpoints (spec 2.6)                      -> create_model(pretrained=), layout_name, export (command)
  L_CLIP, symmetric InfoNCE over the global batch      -> common.contrastive_loss
  L_Distill, teacher-ensemble KD over the global batch -> distill_loss (reference: distill_loss_reference)
  L = (1 - lambda) L_CLIP + lambda L_Distill, GT + syn -> reinforced_loss (--lambda-kd, --teacher-scales)
  DataCompDR: stored augmentations, exact replay (4.5) -> draw_augmentation, replay_augmentation, DRDecode (4.4)
  offline reinforcement (teachers, captioner; 4.3)     -> reinforce, reinforce_shard, caption_scene, load_teacher
  CLIP on quality captions (arXiv 2405.08911)          -> CaptionSource (--caption-source synthetic|mix)
  zero-shot (80 OpenAI templates), retrieval (5.1)     -> evaluate: common.zeroshot_classifier, retrieval_eval

Commands:
  python mobileclip.py                                  # tiny MCi/MCt CLIP on the synthetic world, CPU
  torchrun --nproc_per_node=8 mobileclip.py --data 'shards/{00000..00999}.tar' --model vit_b16 \\
      --bpe bpe_simple_vocab_16e6.txt.gz --batch-size 256 --steps 100000 --out runs/b16 --compile
  torchrun --nproc_per_node=8 mobileclip.py --data 'datacompdr12m_joined/{00000000..00001023}.tar' \\
      --reinforced --model mobileclip_s0 --bpe bpe_simple_vocab_16e6.txt.gz --batch-size 256 --steps 30000 \\
      --lr 1e-3 --weight-decay 0.2 --beta2 0.95 --warmup 1000 --teacher-scales 100,100 --lambda-kd 1
  torchrun --nproc_per_node=8 mobileclip.py reinforce --data shards/ --teachers a.pt,b.pt \\
      --bpe bpe_simple_vocab_16e6.txt.gz --captions captions.jsonl --num-augs 10 --out shards_dr/
  python mobileclip.py --eval-only --model mobileclip_s2 --init mobileclip_s2.pt --bpe bpe_simple_vocab_16e6.txt.gz \\
      --zeroshot-data imagenet/val --classnames imagenet_classnames.txt --templates openai --out runs/eval_s2
  python mobileclip.py export --ckpt runs/s0/ckpt-30000.pt --layout apple --out mobileclip_s0.pt  # or openclip

Result (the no-argument run, and reinforced against plain training): README.md, "Results".
"""
from __future__ import annotations

import copy
import dataclasses
import gzip
import hashlib
import io
import itertools
import json
import math
import os
import re
import time
import zlib
from collections import OrderedDict
from dataclasses import dataclass
import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image
from torch.nn.modules.utils import _pair
from torch.nn.parallel import DistributedDataParallel as DDP
from torchvision.models.convnext import LayerNorm2d  # LayerNorm over the channels of (B, C, H, W)
import common as C

RESAMPLE = {"bilinear": Image.BILINEAR, "bicubic": Image.BICUBIC}

@dataclass
class Shared:  # the flags of `train` and `reinforce`
    data: str = ""  # tar shards: a directory, a glob or 'shards/{00000..00099}.tar'; empty = the synthetic world
    model: str = "mobileclip_tiny"  # a name from MODELS or MOBILECLIP_MODELS
    out: str = "runs/mobileclip"  # run directory: config.json, log.jsonl, checkpoints (reinforce: the shards)
    batch_size: int = 128  # per process (the global batch is this x world size)
    seed: int = 0  # seeds the model init, data order and augmentation
    workers: int = 2  # DataLoader worker processes per rank
    device: str = "auto"  # auto | cuda | cpu
    bpe: str = ""  # CLIP merges file (bpe_simple_vocab_16e6.txt.gz); empty = train a BPE on the captions
    bpe_vocab: int = 2048  # vocabulary size of a BPE trained here
    cache_dir: str = ""  # where the synthetic world is generated (default ~/.cache/effclip)
    synthetic_train: int = 40000  # synthetic training images
    synthetic_val: int = 1000  # synthetic held-out images (zero-shot and retrieval)
    alt_noise: float = 0.0  # synthetic world: this fraction of the samples (fixed by key) gets an unrelated alt-text

@dataclass
class Config(Shared):
    steps: int = 800  # optimizer steps
    lr: float = 2e-3  # peak learning rate (AdamW)
    weight_decay: float = 0.1  # decoupled weight decay, on matrices only
    warmup: int = 100  # linear warm-up steps, then cosine to zero
    beta2: float = 0.98  # AdamW beta2 (CLIP uses 0.98)
    grad_clip: float = 1.0  # global gradient-norm clip; 0 = off
    shuffle_buffer: int = 2000  # samples held by each worker's shuffle buffer
    precision: str = "auto"  # auto (bf16 autocast on GPU, fp32 on CPU) | bf16 | fp32
    compile: bool = False  # torch.compile the model
    fused: bool = True  # fused attention (SDPA); --no-fused runs the explicit-softmax reference
    grad_checkpointing: bool = False  # recompute blocks in backward: ~1/3 more compute, much less memory
    log_every: int = 50  # steps between log lines (the only host syncs of the loop)
    eval: bool = True  # evaluate at the end of training (and every --eval-every steps)
    eval_every: int = 0  # steps between evaluations; 0 = at the end only
    ckpt_every: int = 500  # steps between checkpoints
    keep_ckpts: int = 2  # newest checkpoints kept in --out
    resume: str = ""  # 'auto' = the newest checkpoint in --out that reads (fresh if none), or a checkpoint path
    overwrite: bool = False  # start over in an --out holding another run's checkpoints (they move to OUT/previous-N/)
    init: str = ""  # OpenAI/OpenCLIP ViT or MobileCLIP file to start from (needs --bpe and the matching --model)
    act: str = "gelu"  # MLP activation: gelu | quick_gelu (what OpenAI's own CLIP weights were trained with)
    eval_only: bool = False  # evaluate --resume / --init and exit
    zeroshot_data: str = ""  # ImageFolder for zero-shot top-1/top-5; default: the synthetic held-out set
    classnames: str = ""  # file with one class name per line, in folder order (default: folder names)
    templates: str = "default"  # prompts: default (common's 7) | openai (the 80 of OpenCLIP's ImageNet eval) | FILE
    retrieval_data: str = ""  # tar shards of image-caption pairs for retrieval recall@1/5/10
    retrieval_max: int = 5000  # pairs used for retrieval
    max_skip_frac: float = 0.5  # stop if more than this fraction of the samples read is unusable
    reinforced: bool = False  # --data is DataCompDR-layout: replay stored augmentations, distil stored teachers
    lambda_kd: float = 1.0  # L = (1 - lambda) L_CLIP + lambda L_Distill per caption (1: DataCompDR-12M recipe)
    teacher_scales: str = "100,100"  # logit scale 1/tau_k of each teacher (v1: 100,100; MobileCLIP2: 70,60)
    mix_synthetic: bool = False  # --reinforced: each sample's text is its GT or, w.p. --synthetic-prob, a synthetic one
    syn_key: str = "^syn_text.*$"  # regex of the syn.json keys synthetic captions are drawn from
    caption_source: str = "alt"  # plain training: alt (the .txt) | synthetic (syn.json) | mix (synthetic w.p. p)
    synthetic_prob: float = 0.5  # --caption-source mix, --mix-synthetic: probability of a synthetic caption

@dataclass
class ReinforceConfig(Shared):
    teachers: str = ""  # teacher CLIP checkpoints, comma-separated (this repo's or OpenCLIP)
    num_augs: int = 10  # stored augmentations per image (DataCompDR: 30 for 12M, 10 for 1B)
    captions: str = ""  # JSON lines {"key", "captions"}; default: the synthetic world's captioner
    num_captions: int = 5  # synthetic captions per image from the world's captioner
    aug_size: int = 224  # image size translations are drawn for: DataCompDR's 224 whatever trains later; 0 = --model's
    aug_min_scale: float = 0.08  # RandomResizedCrop minimum area fraction (torchvision: 0.08)

@dataclass
class ExportConfig:
    ckpt: str = ""  # a checkpoint of `train` (OUT/ckpt-N.pt)
    layout: str = "openclip"  # openclip (open_clip.create_model(NAME, pretrained=FILE)) | apple (ml-mobileclip)
    out: str = ""  # the file to write

# Named sizes. vit_b32/b16/l14 are the OpenAI CLIP shapes (text context 77); the BPE vocabulary sets
# vocab_size. `tiny` is the CPU model of the smoke run.
_VIT_B = dict(image_size=224, width=768, layers=12, heads=12, embed_dim=512, text_width=512, text_layers=12,
              text_heads=8, context_length=77)
MODELS = {
    "tiny": dict(image_size=64, patch=8, width=128, layers=4, heads=4, embed_dim=128,
                 text_width=128, text_layers=3, text_heads=2, context_length=32),
    "vit_b32": dict(_VIT_B, patch=32),
    "vit_b16": dict(_VIT_B, patch=16),
    "vit_l14": dict(_VIT_B, patch=14, width=1024, layers=24, heads=16, embed_dim=768, text_width=768, text_heads=12)}

# ==== MobileCLIP models (spec 2) ===================================================================================
# Module and attribute names are apple/ml-mobileclip's, so its v1 `.pt` files load strictly into the unfused
# modules after renaming `image_encoder.model.` -> `visual.`, `text_encoder.` -> `text.` and `qkv_proj`/`out_proj`
# -> `qkv`/`proj` (common.Attention). OpenCLIP files (timm trunks) are mapped name by name by `layout_name`.
def named(**modules):
    """nn.Sequential whose children carry the checkpoints' names (`.conv`/`.bn`, `.block`, `.pos_embed`)."""
    return nn.Sequential(OrderedDict(modules))

def replace_all(key, pairs):
    """key with each (old, new) substring of `pairs` replaced in turn: one checkpoint-name mapping."""
    for old, new in pairs:
        key = key.replace(old, new)
    return key

def conv_bn(cin, cout, k, stride=1, groups=1):
    """Conv (no bias) + BatchNorm: one branch of a train-time block."""
    conv = nn.Conv2d(cin, cout, k, stride, [s // 2 for s in _pair(k)], groups=groups, bias=False)
    return named(conv=conv, bn=nn.BatchNorm2d(cout))

def fold(branches, k, groups):
    """(kernel, bias) of the one kxk conv equal to a sum of train-time branches, each a conv+BN or a BN alone (the
    skip: BN(I * x), I the 1x1 kernel with a 1 where output channel i reads its own input, index i mod C/groups).
    RepVGG (2101.03697) Sec. 3.3: BN(W * x) = (W t) * x + (beta - mu t), t = gamma / sqrt(var + eps); a smaller
    kernel (1x1, 3x3) is zero-padded to k, centred: the same map as a k-conv with padding k // 2."""
    w_sum = b_sum = 0
    for br in branches:
        bn = br if isinstance(br, nn.BatchNorm2d) else br.bn
        t = bn.weight / (bn.running_var + bn.eps).sqrt()
        w = (br.conv.weight if br is not bn else  # (C_out, C_in/groups, kh, kw); the skip's I: (C, C/groups, 1, 1)
             torch.eye(len(t) // groups, dtype=t.dtype, device=t.device).repeat(groups, 1)[:, :, None, None])
        dh, dw = (k[0] - w.shape[2]) // 2, (k[1] - w.shape[3]) // 2
        w_sum = w_sum + F.pad(w, [dw, dw, dh, dh]) * t.reshape(-1, 1, 1, 1)
        b_sum = b_sum + bn.bias - bn.running_mean * t
    return w_sum, b_sum

def folded_conv(w, b, stride=1, groups=1):
    """The one inference-time conv (with bias) that carries a folded kernel w (C_out, C_in/groups, kh, kw)."""
    conv = nn.Conv2d(w.shape[1] * groups, len(w), w.shape[2:], stride, [s // 2 for s in w.shape[2:]], groups=groups)
    conv.weight, conv.bias = nn.Parameter(w.detach().clone()), nn.Parameter(b.detach().clone())
    return conv

def add_identity(w):
    """w + the kernel of the identity map, for a depthwise kernel (C, 1, kh, kw): a 1 at each centre tap."""
    w = w.clone()
    w[:, 0, w.shape[2] // 2, w.shape[3] // 2] += 1
    return w

class SqueezeExcite(nn.Module):
    """Squeeze-excitation (1709.01507): x * sigmoid(up(relu(down(mean(x))))), 1x1 convs, named as the checkpoints
    name them: Apple's `reduce`/`expand` in `conv_exp` (C/16), timm's `fc1`/`fc2` in the downsamples (C/4, to 8)."""

    def __init__(self, dim, hidden, names=("fc1", "fc2")):
        super().__init__()
        self.names = names
        self.add_module(names[0], nn.Conv2d(dim, hidden, 1))
        self.add_module(names[1], nn.Conv2d(hidden, dim, 1))

    def forward(self, x):
        down, up = (getattr(self, n) for n in self.names)
        return x * torch.sigmoid(up(F.relu(down(x.mean((2, 3), keepdim=True)))))

class MobileOneBlock(nn.Module):
    """MobileOne block (2206.04040), train-time: act(se(sum of branches)). Branches: `rbr_conv[i]` (kxk
    conv+BN), `rbr_scale` (1x1 conv+BN; only if the kernel's first dim > 1), `rbr_skip` (BN alone; only
    if in == out and stride 1). `reparameterize` sums the folded branches into `reparam_conv`."""

    def __init__(self, cin, cout, k, stride=1, groups=1, act=True, se=False, scale_branch=True, n_conv=1):
        super().__init__()
        self.k, self.stride, self.groups = _pair(k), stride, groups
        self.se = SqueezeExcite(cout, int(cout * 0.0625), ("reduce", "expand")) if se else nn.Identity()
        self.activation = nn.GELU() if act else nn.Identity()
        self.rbr_skip = nn.BatchNorm2d(cin) if cin == cout and stride == 1 else None
        self.rbr_conv = nn.ModuleList(conv_bn(cin, cout, self.k, stride, groups) for _ in range(n_conv)) or None
        self.rbr_scale = conv_bn(cin, cout, 1, stride, groups) if self.k[0] > 1 and scale_branch else None
        self.reparam_conv = None

    def branches(self):
        return [b for b in (self.rbr_scale, self.rbr_skip, *(self.rbr_conv or [])) if b is not None]

    def forward(self, x):
        out = self.reparam_conv(x) if self.reparam_conv is not None else sum(br(x) for br in self.branches())
        return self.activation(self.se(out))

    def fused(self):
        return fold(self.branches(), self.k, self.groups)

    def reparameterize(self):
        self.reparam_conv = folded_conv(*self.fused(), self.stride, self.groups)
        self.rbr_skip = self.rbr_conv = self.rbr_scale = None

class ReparamLargeKernelConv(nn.Module):
    """RepLKNet-style (2203.06717) downsampling conv: a 7x7/2 conv+BN with a parallel 3x3/2 conv+BN, one group per
    input channel (C -> C', 2 outputs per group), then SE (optional) and GELU (timm's `lkc_use_act=True`)."""

    def __init__(self, cin, cout, se=False):
        super().__init__()
        self.lkb_origin, self.small_conv = conv_bn(cin, cout, 7, 2, cin), conv_bn(cin, cout, 3, 2, cin)
        self.se = SqueezeExcite(cout, max(8, int(cout / 4 + 4) // 8 * 8)) if se else nn.Identity()
        self.activation, self.lkb_reparam = nn.GELU(), None

    def forward(self, x):
        out = self.lkb_reparam(x) if self.lkb_reparam is not None else self.lkb_origin(x) + self.small_conv(x)
        return self.activation(self.se(out))

    def reparameterize(self):
        groups = self.lkb_origin.conv.groups
        self.lkb_reparam = folded_conv(*fold([self.lkb_origin, self.small_conv], (7, 7), groups), 2, groups)
        self.lkb_origin = self.small_conv = None

class RepMixer(nn.Module):
    """FastViT's token mixer (2303.14189, Eq. 2): x + gamma * (mixer(x) - norm(x)), `mixer` a depthwise
    MobileOneBlock without activation (kxk conv+BN, 1x1 scale branch, BN skip), `norm` a BN skip alone.
    Everything is linear, so it folds into one depthwise conv: identity + gamma * (W_mixer - W_norm)."""

    def __init__(self, dim, k=3):
        super().__init__()
        self.norm = MobileOneBlock(dim, dim, k, groups=dim, act=False, scale_branch=False, n_conv=0)
        self.mixer = MobileOneBlock(dim, dim, k, groups=dim, act=False)
        self.layer_scale, self.reparam_conv = nn.Parameter(1e-5 * torch.ones(dim, 1, 1)), None

    def forward(self, x):
        folded = self.reparam_conv
        return folded(x) if folded is not None else x + self.layer_scale * (self.mixer(x) - self.norm(x))

    def reparameterize(self):
        (wm, bm), (wn, bn), g = self.mixer.fused(), self.norm.fused(), self.layer_scale
        w = add_identity(g.unsqueeze(-1) * (wm - wn))  # (C, 1, kh, kw)
        self.reparam_conv = folded_conv(w, g.flatten() * (bm - bn), groups=len(w))
        self.mixer = self.norm = None
        del self.layer_scale

class ConvFFN(nn.Module):
    """FastViT ConvFFN: depthwise kxk conv + BN (local mixing), then a 1x1 MLP C -> hidden -> C with GELU."""

    def __init__(self, dim, hidden, k=7):
        super().__init__()
        self.conv = conv_bn(dim, dim, k, 1, dim)
        self.fc1, self.act, self.fc2 = nn.Conv2d(dim, hidden, 1), nn.GELU(), nn.Conv2d(hidden, dim, 1)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(self.conv(x))))

class RepCPE(nn.Module):
    """Conditional positional encoding (2102.10882) as a residual depthwise 7x7 conv, x + pe(x)."""

    def __init__(self, dim, k=7):
        super().__init__()
        self.pe, self.reparam_conv = nn.Conv2d(dim, dim, k, 1, k // 2, groups=dim), None

    def forward(self, x):
        return self.reparam_conv(x) if self.reparam_conv is not None else x + self.pe(x)

    def reparameterize(self):
        w = add_identity(self.pe.weight)
        self.reparam_conv, self.pe = folded_conv(w, self.pe.bias, groups=len(w)), None

class RepMixerBlock(nn.Module):
    """MetaFormer block with RepMixer: x = RepMixer(x); x = x + gamma * ConvFFN(x) (gamma init 1e-5)."""

    def __init__(self, dim, k=3, mlp_ratio=3.0, ffn_k=7):
        super().__init__()
        self.token_mixer = RepMixer(dim, k)
        self.convffn = ConvFFN(dim, int(dim * mlp_ratio), ffn_k)
        self.layer_scale = nn.Parameter(1e-5 * torch.ones(dim, 1, 1))

    def forward(self, x):
        x = self.token_mixer(x)
        return x + self.layer_scale * self.convffn(x)

class AttentionBlock(nn.Module):
    """MetaFormer block with self-attention over the H*W tokens of the last stage(s):
    x = x + gamma1 * MHSA(Norm(x)); x = x + gamma2 * ConvFFN(x). Norm is BatchNorm2d (MCi0-2) or
    LayerNorm2d (MCi3/4); heads of 32 channels, no qkv bias, no positional bias (RepCPE gives positions)."""

    def __init__(self, dim, mlp_ratio=3.0, norm="bn"):
        super().__init__()
        self.norm = nn.BatchNorm2d(dim) if norm == "bn" else LayerNorm2d(dim, eps=1e-5)  # channels-first LN
        self.token_mixer = C.Attention(dim, dim // 32)
        self.token_mixer.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.convffn = ConvFFN(dim, int(dim * mlp_ratio))
        self.layer_scale_1, self.layer_scale_2 = (nn.Parameter(1e-5 * torch.ones(dim, 1, 1)) for _ in range(2))

    def forward(self, x):
        B, D, H, W = x.shape
        t = self.token_mixer(self.norm(x).flatten(2).transpose(1, 2))  # (B, H*W, D)
        x = x + self.layer_scale_1 * t.transpose(1, 2).reshape(B, D, H, W)
        return x + self.layer_scale_2 * self.convffn(x)

class PatchEmbed(nn.Module):
    """FastViT's downsampler between stages: ReparamLargeKernelConv (7x7/2, C -> C') then a 1x1 MobileOneBlock.
    A class, not an nn.Sequential: dense.py, cliptex.py and transfer.py find the stages as the Sequentials."""

    def __init__(self, cin, cout, se=False):
        super().__init__()
        self.proj = nn.Sequential(ReparamLargeKernelConv(cin, cout, se), MobileOneBlock(cout, cout, 1))

    def forward(self, x):
        return self.proj(x)

class ProjectionHead(nn.Module):
    """Map to the joint space, x @ proj (Apple's GlobalPool2D / SimpleImageProjectionHead); a feature map
    is mean-pooled first. `bias` only for towers trained as timm models in OpenCLIP (timm's `head.fc`)."""

    def __init__(self, cin, cout, bias=False):
        super().__init__()
        self.proj = nn.Parameter(torch.randn(cin, cout) * cin**-0.5)
        self.bias = nn.Parameter(torch.zeros(cout)) if bias else None

    def forward(self, x):
        x = (x.mean((2, 3)) if x.dim() == 4 else x) @ self.proj  # (B, E)
        return x if self.bias is None else x + self.bias

# timm's fastvit names for Apple's (the inverse of timm's `checkpoint_filter_fn`), one name part at a time.
_TIMM_PARTS = {"patch_embed": "stem", "rbr_conv": "conv_kxk", "rbr_scale": "conv_scale", "rbr_skip": "identity",
               "conv_exp": "final_conv", "lkb_origin": "large_conv", "lkb_reparam": "reparam_conv",
               "convffn": "mlp", "pe": "pos_enc", "reduce": "fc1", "expand": "fc2"}

class MCi(nn.Module):
    """MCi image encoder (spec 2.2, 2.3): FastViT with a MobileOne stem (3x3/2, depthwise 3x3/2, 1x1:
    stride 4), RepMixer stages, then attention stages each preceded by RepCPE, a PatchEmbed before every
    stage but the first, `conv_exp` (depthwise 3x3 to 2C with SE), mean pool and projection.
    `network` is Apple's flat list [stage0, down, stage1, down, stage2, down, cpe, stage3, ...]."""

    def __init__(self, depths, widths, mlp_ratio, se, attn, embed_dim, attn_norm="bn", stem_scale=True,
                 head_bias=False):
        super().__init__()
        c0 = widths[0]
        self.patch_embed = nn.Sequential(MobileOneBlock(3, c0, 3, 2, scale_branch=stem_scale),
                                         MobileOneBlock(c0, c0, 3, 2, groups=c0, scale_branch=stem_scale),
                                         MobileOneBlock(c0, c0, 1))
        net = []  # (timm's name, module) of each `network` entry: stages.i.{downsample,pos_emb,blocks}
        for i, (depth, c) in enumerate(zip(depths, widths)):
            net += [(f"stages.{i}.downsample", PatchEmbed(widths[i - 1], c, se[i]))] if i > 0 else []
            net += [(f"stages.{i}.pos_emb", RepCPE(c))] if attn[i] else []
            blocks = [AttentionBlock(c, mlp_ratio, attn_norm) if attn[i] else RepMixerBlock(c, 3, mlp_ratio)
                      for _ in range(depth)]
            net.append((f"stages.{i}.blocks", nn.Sequential(*blocks)))
        self.timm_prefix, self.network = [n for n, _ in net], nn.ModuleList(m for _, m in net)
        self.conv_exp = MobileOneBlock(widths[-1], 2 * widths[-1], 3, groups=widths[-1], se=True)
        self.head = ProjectionHead(2 * widths[-1], embed_dim, head_bias)

    def forward(self, x):
        x = self.patch_embed(x)  # (B, C0, H/4, W/4)
        for m in self.network:
            x = m(x)
        return self.head(self.conv_exp(x))  # (B, E)

    def timm_name(self, key):
        p = key.split(".")
        if p[0] == "network":
            p = self.timm_prefix[int(p[1])].split(".") + p[2:]
        if p[0] == "head":
            return "head.fc.weight" if p[1] == "proj" else "head.fc.bias"
        p = [_TIMM_PARTS.get(s, s) for s in p]
        return ".".join(p + ["gamma"] if p[-1].startswith("layer_scale") else p)

# Sizes (spec 2.2, 2.3). MCi3/4: 5 stages (stride 64, two attention stages), no SE in the downsamples,
# MLP ratio 4, LayerNorm before attention, no scale branch in the stem.
_MCI4 = dict(mlp_ratio=3.0, se=(0, 0, 1, 1), attn=(0, 0, 0, 1))
_MCI5 = dict(mlp_ratio=4.0, se=(0,) * 5, attn=(0, 0, 0, 1, 1), attn_norm="ln", stem_scale=False)
_MCI = {"mci0": dict(_MCI4, depths=(2, 6, 10, 2), widths=(64, 128, 256, 512)),
        "mci1": dict(_MCI4, depths=(4, 12, 20, 4), widths=(64, 128, 256, 512)),
        "mci2": dict(_MCI4, depths=(4, 12, 24, 4), widths=(80, 160, 320, 640)),
        "mci3": dict(_MCI5, depths=(2, 12, 24, 4, 2), widths=(96, 192, 384, 768, 1536)),
        "mci4": dict(_MCI5, depths=(2, 12, 24, 4, 4), widths=(128, 256, 512, 1024, 2048)),
        "mci_tiny": dict(_MCI4, depths=(1, 1, 2, 1), widths=(32, 64, 128, 256))}

# ---- text encoders and the ViT-B/16 image encoder (Apple's ml-cvnets transformer) ----------------------
class LayerNormFP32(nn.LayerNorm):
    """LayerNorm computed in fp32 and cast back (Apple's `layer_norm_fp32`)."""

    def forward(self, x):
        return super().forward(x.float()).to(x.dtype)

class LearnedPositions(nn.Module):
    """Learned positions (1, 1, N, D); another length is resized bilinearly as a 1-D sequence. Apple wraps
    it once more, hence `named(pos_embed=...)` and the names `...pos_embed.pos_embed`."""

    def __init__(self, n, dim):
        super().__init__()
        self.pos_embed = nn.Parameter(nn.init.trunc_normal_(torch.empty(1, 1, n, dim), std=dim**-0.5))

    def forward(self, n):
        pe = self.pos_embed
        pe = pe if n == pe.shape[2] else F.interpolate(pe, size=(n, pe.shape[3]), mode="bilinear")
        return pe.reshape(1, n, -1)  # (1, N, D)

class TransformerEncoder(nn.Module):
    """Pre-norm layer: x += MHA(LN(x)); x += FFN(LN(x)). The Identity slots stand for Apple's zero-rate
    dropouts, so that the parameter indices (pre_norm_ffn.1 and .4) match the checkpoints."""

    def __init__(self, dim, heads, ffn, eps=1e-5):
        super().__init__()
        self.pre_norm_mha = nn.Sequential(LayerNormFP32(dim, eps=eps), C.Attention(dim, heads), nn.Identity())
        self.pre_norm_ffn = nn.Sequential(LayerNormFP32(dim, eps=eps), nn.Linear(dim, ffn), nn.GELU(),
                                          nn.Identity(), nn.Linear(ffn, dim), nn.Identity())

    def forward(self, x, causal=False):
        x = x + self.pre_norm_mha[1](self.pre_norm_mha[0](x), causal=causal)
        return x + self.pre_norm_ffn(x)

class TextRepMixerBlock(RepMixerBlock):
    """MCt's convolutional block (spec 2.5): a RepMixerBlock on the sequence seen as a 1 x L image with
    kernels (1, 11), no 1x1 branch. Non-causal, and its BatchNorms normalise over the positions."""

    def __init__(self, dim, k=11):
        super().__init__(dim, (1, k), 4.0, (1, k))

    def forward(self, x, causal=False):
        x = x.transpose(1, 2).unsqueeze(2)  # (B, L, D) -> (B, D, 1, L)
        return super().forward(x).squeeze(2).transpose(1, 2)

class TextEncoder(nn.Module):
    """Text tower (spec 2.5): token + learned positions, `transformer` layers (MCt: RepMixerBlock, 4
    transformer layers, RepMixerBlock; base: 12 layers), final LN, the feature at the EOT token (the
    largest id, so argmax), projection. Causal only for MobileCLIP-B; the others attend bidirectionally
    with no padding mask, so padding tokens are attended to, as in the released weights."""

    def __init__(self, vocab_size=49408, context_length=77, width=512, heads=8, layers=12, embed_dim=512,
                 mct=False, causal=False):
        super().__init__()
        ffn = int(math.ceil(width * 4 / 16) * 16)  # hidden size rounded up to a multiple of 16
        self.causal, self.embedding_layer = causal, nn.Embedding(vocab_size, width)
        self.positional_embedding = named(pos_embed=LearnedPositions(context_length, width))
        blocks = [TransformerEncoder(width, heads, ffn) for _ in range(layers)]
        if mct:  # a RepMixerBlock at each end: convolutional token mixing, cheaper than attention
            blocks = [TextRepMixerBlock(width)] + blocks + [TextRepMixerBlock(width)]
        self.transformer = nn.ModuleList(blocks)
        self.final_layer_norm = LayerNormFP32(width)
        self.projection_layer = nn.Parameter(torch.randn(width, embed_dim) * width**-0.5)

    def forward(self, ids):
        x = self.embedding_layer(ids)  # (B, L, D); Apple computes an embed_scale but never applies it
        x = x + self.positional_embedding(ids.shape[1]).to(x.dtype)
        for layer in self.transformer:
            x = layer(x, causal=self.causal)
        x = self.final_layer_norm(x)
        return x[torch.arange(x.shape[0], device=x.device), ids.argmax(dim=-1)] @ self.projection_layer

def conv_norm_act(cin, cout, k, pad, norm_act=True):
    """conv (k x k, stride k) [+ BN + GELU], Apple's names `.block.{conv,norm,act}`."""
    conv = nn.Conv2d(cin, cout, k, k, pad, bias=not norm_act)
    block = named(conv=conv, norm=nn.BatchNorm2d(cout), act=nn.GELU()) if norm_act else named(conv=conv)
    return named(block=block)

class ConvStemViT(nn.Module):
    """MobileCLIP-B's ViT-B/16 (spec 2.4): patchify in three convs (4x4/4 + BN + GELU, 2x2/2 + BN + GELU,
    2x2/2), learned positions added to the patches only (the CLS token gets none, as in DeiT-III
    2204.07118), 12 pre-norm layers, final LN, CLS token @ proj. Apple pads the 4x4 conv by 1 pixel
    (int((k-1)/2)); timm's port, which MobileCLIP2-B was trained with, pads 0, has LN eps 1e-6 and a head bias."""

    def __init__(self, width=768, layers=12, heads=12, embed_dim=512, timm_tower=False):
        super().__init__()
        c, eps = width // 4, 1e-6 if timm_tower else 1e-5
        self.patch_emb = nn.Sequential(conv_norm_act(3, c, 4, 0 if timm_tower else 1), conv_norm_act(c, c, 2, 0),
                                       conv_norm_act(c, width, 2, 0, norm_act=False))
        self.cls_token = nn.Parameter(nn.init.trunc_normal_(torch.zeros(1, 1, width), std=0.02))
        self.pos_embed = named(pos_embed=LearnedPositions((224 // 16) ** 2, width))
        self.transformer = nn.Sequential(*[TransformerEncoder(width, heads, 4 * width, eps) for _ in range(layers)])
        self.post_transformer_norm = LayerNormFP32(width, eps=eps)
        self.classifier = ProjectionHead(width, embed_dim, bias=timm_tower)

    def forward(self, x):
        x = self.patch_emb(x).flatten(2).transpose(1, 2)  # (B, N, D)
        x = x + self.pos_embed(x.shape[1]).to(x.dtype)
        x = torch.cat([self.cls_token.to(x.dtype).expand(x.shape[0], -1, -1), x], dim=1)  # (B, 1 + N, D)
        x = self.post_transformer_norm(self.transformer(x))
        return self.classifier(x[:, 0])  # (B, E)

    def timm_name(self, key):
        return replace_all(key, _TIMM_VIT_B)

# timm's `vit_base_mci_224` names for ours (the inverse of timm's `_convert_mobileclip`).
_TIMM_VIT_B = [("patch_emb.", "patch_embed.backbone."), (".block.conv", ".conv"), (".block.norm", ".bn"),
               ("transformer.", "blocks."), ("pre_norm_mha.0", "norm1"), ("pre_norm_mha.1", "attn"),
               ("pre_norm_ffn.0", "norm2"), ("pre_norm_ffn.1", "mlp.fc1"), ("pre_norm_ffn.4", "mlp.fc2"),
               ("post_transformer_norm", "norm"), ("pos_embed.pos_embed.pos_embed", "pos_embed"),
               ("classifier.proj", "head.weight"), ("classifier.bias", "head.bias")]

class ClipViT(C.ViT):
    """MobileCLIP2-L/14's tower, timm's `vit_large_patch14_clip_224`: common.ViT plus the bias of timm's
    linear head (OpenCLIP used the timm classifier as the projection)."""

    def __init__(self, embed_dim=768, **kw):
        super().__init__(embed_dim=embed_dim, **kw)
        self.proj_bias = nn.Parameter(torch.zeros(embed_dim))

    def forward(self, x):
        return super().forward(x) + self.proj_bias

    def timm_name(self, key):
        renamed = {"patch_embed.weight": "patch_embed.proj.weight", "proj": "head.weight", "proj_bias": "head.bias"}
        return renamed.get(key, key)  # blocks, norms, cls_token, pos_embed: common.ViT already uses timm's names

# ---- the model zoo ---------------------------------------------------------------------------------
# image: tower; mean/std: input normalisation (v1: none, the [0,1] RGB of ToTensor; MobileCLIP2-S0/S2/B also none,
# S3/S4/L-14 OpenAI CLIP mean/std, per OpenCLIP's pretrained configs and timm's cfgs); timm_tower: the image tower
# was trained as a timm model in OpenCLIP (head bias, ViT-B quirks above); layout: the layout of the released file.
# MobileCLIP-S3/S4/L-14 reuse the MobileCLIP2 configs (their normalisation is assumed, not confirmed).
_V1 = dict(image_size=256, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0), interpolation="bilinear", embed_dim=512,
           text="base", text_width=512, text_heads=8, text_layers=12, context_length=77, causal=False,
           timm_tower=False, layout="apple")
_V2 = dict(_V1, timm_tower=True, layout="openclip")
_V2_768 = dict(_V2, mean=C.CLIP_MEAN, std=C.CLIP_STD, embed_dim=768, text_width=768, text_heads=12)
MOBILECLIP_MODELS = {
    "mobileclip_s0": dict(_V1, image="mci0", text="mct", text_layers=4),
    "mobileclip_s1": dict(_V1, image="mci1"),
    "mobileclip_s2": dict(_V1, image="mci2"),
    "mobileclip_b": dict(_V1, image="vit_b16", image_size=224, causal=True),
    "mobileclip_s3": dict(_V2_768, image="mci3"),
    "mobileclip_s4": dict(_V2_768, image="mci4"),
    "mobileclip_l14": dict(_V2_768, image="vit_l14", image_size=224, interpolation="bicubic"),
    "mobileclip2_s0": dict(_V2, image="mci0"),
    "mobileclip2_s2": dict(_V2, image="mci2"),
    "mobileclip2_b": dict(_V2, image="vit_b16", image_size=224, causal=True),
    "mobileclip2_s3": dict(_V2_768, image="mci3"),
    "mobileclip2_s4": dict(_V2_768, image="mci4"),
    "mobileclip2_l14": dict(_V2_768, image="vit_l14", image_size=224, interpolation="bicubic"),
    # CPU smoke run: 64 px (stages at 16, 8, 4, 2 px), a 1-layer MCt; 2.0M parameters with a 2048-token BPE.
    "mobileclip_tiny": dict(_V1, image="mci_tiny", image_size=64, embed_dim=128, text="mct", text_width=128,
                            text_heads=4, text_layers=1, context_length=32)}

def init_weights(model):
    """Apple's / timm's initialisation where it differs from torch's defaults: linear layers and the ConvFFN
    convs trunc-normal(0.02) with zero bias, token embeddings normal(0.02)."""
    for m in model.modules():
        for c in [m] if isinstance(m, nn.Linear) else [m.conv.conv, m.fc1, m.fc2] if isinstance(m, ConvFFN) else []:
            nn.init.trunc_normal_(c.weight, std=0.02)
            if c.bias is not None:
                nn.init.zeros_(c.bias)
        if isinstance(m, nn.Embedding):
            nn.init.normal_(m.weight, std=0.02)

def create_model(name, pretrained=None, vocab_size=49408):
    """A MobileCLIP model (common.CLIP: `.visual`, `.text`, `logit_scale`) in its unfused train-time form;
    `pretrained`: an ml-mobileclip `.pt` or an OpenCLIP file of the same model."""
    cfg = MOBILECLIP_MODELS.get(name) or C.fail(f"unknown MobileCLIP model '{name}'; choose one of "
                                                f"{', '.join(MOBILECLIP_MODELS)}")
    E, image = cfg["embed_dim"], cfg["image"]
    visual = (MCi(**_MCI[image], embed_dim=E, head_bias=cfg["timm_tower"]) if image in _MCI else
              ConvStemViT(embed_dim=E, timm_tower=cfg["timm_tower"]) if image == "vit_b16" else
              ClipViT(embed_dim=E, image_size=224, patch=14, width=1024, layers=24, heads=16))
    text = TextEncoder(vocab_size, cfg["context_length"], cfg["text_width"], cfg["text_heads"], cfg["text_layers"],
                       E, cfg["text"] == "mct", cfg["causal"])
    for tower in (visual, text) if image != "vit_l14" else (text,):  # common.ViT has its own
        init_weights(tower)
    model = C.CLIP(visual, text)
    if pretrained:
        load_pretrained(model, pretrained, name)
    return model

def reparameterize(model):
    """A deep copy in eval mode with every train-time branch folded (the text RepMixer too): from the BN running
    statistics, so it computes what the unfused model computes in eval mode, with fewer, plain convs."""
    model = copy.deepcopy(model)
    with torch.no_grad():
        for m in model.modules():  # parents first (a RepMixer folds its own two MobileOneBlocks, then skips them)
            if hasattr(m, "reparameterize"):
                m.reparameterize()
    return model.eval()

# ---- checkpoint layouts ------------------------------------------------------------------------------
_APPLE_INFIX = [("mha.1.qkv.", "mha.1.qkv_proj."), ("mha.1.proj.", "mha.1.out_proj.")]  # pre_norm_mha.1: Apple's MHA
# OpenCLIP's text names for ours (the inverse of OpenCLIP's `convert_mobile_clip_state_dict`).
_OPENCLIP_TEXT = [("embedding_layer", "token_embedding"), ("transformer.", "transformer.resblocks."),
                  ("positional_embedding.pos_embed.pos_embed", "positional_embedding"), ("pre_norm_mha.0", "ln_1"),
                  ("pre_norm_mha.1.qkv.weight", "attn.in_proj_weight"),
                  ("pre_norm_mha.1.qkv.bias", "attn.in_proj_bias"), ("pre_norm_mha.1.proj", "attn.out_proj"),
                  ("pre_norm_ffn.0", "ln_2"), ("pre_norm_ffn.1", "mlp.c_fc"), ("pre_norm_ffn.4", "mlp.c_proj"),
                  ("final_layer_norm", "ln_final"), ("projection_layer", "text_projection")]
_TRANSPOSED = ("visual.head.proj", "visual.classifier.proj", "visual.proj")  # (C, E) here; timm's Linear: (E, C)

def layout_name(model, key, layout):
    """Our state-dict key -> its name in a released file: `apple` (ml-mobileclip .pt: image_encoder.model.*,
    text_encoder.*) or `openclip` (visual.trunk.* with timm names, text.* with OpenCLIP names); `ours`: as is."""
    if key == "logit_scale" or layout == "ours":
        return key
    tower, rest = key.split(".", 1)
    if layout == "openclip" and tower == "visual":
        return "visual.trunk." + model.visual.timm_name(rest)
    rest = replace_all(rest, _APPLE_INFIX if layout == "apple" else _OPENCLIP_TEXT)
    prefix = "text." if layout == "openclip" else "image_encoder.model." if tower == "visual" else "text_encoder."
    return prefix + rest

def export_state_dict(model, layout):
    """Our state dict in a released layout, names and shapes as ml-mobileclip or OpenCLIP save them."""
    if layout == "openclip" and isinstance(model.text.transformer[0], TextRepMixerBlock):
        C.fail("OpenCLIP has no MCt text encoder (mobileclip_s0): export it in the 'apple' layout")
    out = {}
    for k, v in model.state_dict().items():
        name = layout_name(model, k, layout)
        if layout == "openclip" and k in _TRANSPOSED:
            v = v.t()  # a Linear's (E, C)
        elif layout == "openclip" and name in ("visual.trunk.pos_embed", "visual.trunk.cls_token"):
            v = v.reshape(1, -1, v.shape[-1])  # timm's (1, N, D)
        elif layout == "openclip" and name == "text.positional_embedding":
            v = v.reshape(-1, v.shape[-1])  # OpenCLIP's (N, D)
        out[name] = v
    if layout == "apple" and any(k.endswith(("head.bias", "classifier.bias")) for k in out):
        C.fail("this image head has a bias (a timm tower), which ml-mobileclip's has not: use --layout openclip")
    head_bias = "visual.trunk.head.fc.bias" if isinstance(model.visual, MCi) else "visual.trunk.head.bias"
    if layout == "openclip" and head_bias not in out:  # timm's conversion of a v1 file adds a zero bias
        out[head_bias] = torch.zeros_like(out[head_bias.replace("bias", "weight")][:, 0])
    return out

def read_weights(path: str, what: str) -> dict:
    """A weights file as a dict (OpenAI's TorchScript archives through torch.jit.load), or one line saying why not."""
    if not os.path.isfile(path):
        C.fail(f"{what} not found: {path}")
    try:
        return C.read_checkpoint(path)
    except ValueError as e:
        if "TorchScript" not in str(e):
            C.fail(f"cannot read {what} {path}: {e}")
    return torch.jit.load(path, map_location="cpu").state_dict()

def fit_head_bias(model, sd: dict):
    """A v1 MCi / ViT-B tower trained as a timm model in OpenCLIP learns a bias in its head, which Apple's head has
    not: when `sd` holds a non-zero one, the head gets a bias parameter (x @ proj + b), so the file loads strictly."""
    head = getattr(model.visual, "head", getattr(model.visual, "classifier", None))  # MCi, ConvStemViT; not ClipViT
    bias = [v for k, v in sd.items() if k.endswith(("head.fc.bias", "head.bias", "classifier.bias"))]
    if isinstance(head, ProjectionHead) and head.bias is None and bias and bias[0].any():
        head.bias = nn.Parameter(torch.zeros_like(head.proj[0]))

def load_pretrained(model, path, name="", sd=None):
    """Load an ml-mobileclip `.pt` or an OpenCLIP MobileCLIP file (`sd`: already read) strictly into the `model`."""
    sd = C.unwrap_state_dict(read_weights(path, "checkpoint") if sd is None else sd)  # DDP-/compile-wrapped saves
    fit_head_bias(model, sd)
    has = lambda prefix: any(k.startswith(prefix) for k in sd)
    layout = ("apple" if has("image_encoder.") else "openclip" if has("visual.trunk.") else "ours" if has("visual.")
              else C.fail(f"{path} is neither an ml-mobileclip .pt (image_encoder.*), an OpenCLIP file "
                          f"(visual.trunk.*) nor a state dict of this repository (visual.*, text.*)"))
    own = model.state_dict()
    ours = {layout_name(model, k, layout): k for k in own}
    out = {}
    for k, v in sd.items():
        if k not in ours and k.endswith(("head.fc.bias", "head.bias")) and not v.any():
            continue  # the zero bias timm's conversion adds to a v1 head
        k = ours.get(k, k)
        if k in own:
            v = v.t() if layout == "openclip" and k in _TRANSPOSED else v
            v = v.reshape(own[k].shape) if v.numel() == own[k].numel() else v
        out[k] = v.to(own[k].dtype) if k in own else v
    C.load_state_dict_checked(model, out, f"{path} ({layout} layout) for {name or 'this model'}")

def export(cfg: ExportConfig):
    """A trained model's weights in OpenCLIP's layout (open_clip.create_model(NAME, pretrained=FILE): MobileCLIP2, v1
    but S0, the ViT CLIPs of MODELS) or ml-mobileclip's (its v1 models); both load back (--init, create_model)."""
    if not cfg.ckpt or not cfg.out or cfg.layout not in ("openclip", "apple"):
        C.fail("export needs --ckpt CKPT, --layout openclip|apple and --out FILE")
    ckpt = C.load_checkpoint(cfg.ckpt, "")
    name = ckpt.get("model_name")
    if "model" not in ckpt or name not in MOBILECLIP_MODELS and not (name in MODELS and cfg.layout == "openclip"):
        C.fail(f"{cfg.ckpt} is not a checkpoint of `train`" if name not in MODELS else
               f"{cfg.ckpt} is a ViT CLIP ({name}): it exports to --layout openclip only")
    if name in MODELS:  # a plain ViT CLIP: OpenAI/OpenCLIP names
        sd = C.ours_to_openclip(ckpt["model"])
    else:
        model = create_model(name, vocab_size=ckpt.get("vocab_size", 49408))
        fit_head_bias(model, ckpt["model"])
        C.load_state_dict_checked(model, ckpt["model"], f"checkpoint {cfg.ckpt}")
        sd = export_state_dict(model, cfg.layout)
    C.save_checkpoint(cfg.out, sd)  # a temporary file, then renamed
    C.print0(f"results: {name} in the {cfg.layout} layout ({len(sd)} tensors): {cfg.out}")

# ==== Data and tokenizer =============================================================================================
def resolve_data(cfg: Config) -> tuple[str, str, str]:
    """(train shards, zero-shot ImageFolder, retrieval shards): the user's, or the synthetic world's (not made for
    --eval-only on the user's evaluation data)."""
    zs, ret = getattr(cfg, "zeroshot_data", ""), getattr(cfg, "retrieval_data", "")  # train's; reinforce: the world's
    if not cfg.data and getattr(cfg, "eval_only", False) and (zs or ret):
        return "", zs, ret
    if cfg.data:
        if cfg.alt_noise:
            C.fail("--alt-noise needs the synthetic world (no --data): it writes its captions from random scenes")
        try:
            first = C.expand_shards(cfg.data)[0]
        except FileNotFoundError as e:
            C.fail(str(e))
        defaults = os.path.join(os.path.dirname(first), "eval.json")  # `reinforce` of the synthetic world
        d = json.load(open(defaults)) if os.path.isfile(defaults) else {}
        return cfg.data, zs or d.get("zeroshot_data", ""), ret or d.get("retrieval_data", "")
    if getattr(cfg, "reinforced", False):
        C.fail("--reinforced needs --data: DataCompDR shards, or those `python mobileclip.py reinforce` wrote")
    cache = cfg.cache_dir or os.path.join(os.path.expanduser("~"), ".cache", "effclip")
    world = C.synthetic_world(cache, cfg.synthetic_train, cfg.synthetic_val, model_spec(cfg.model)["image_size"], 0)
    return world["train"], zs or world["val_folder"], ret or world["val"]

def make_tokenizer(cfg: Config, shards: str):
    """The CLIP BPE from --bpe, the one saved in --out by an earlier run, or one trained on the first
    captions of the training data (rank 0 trains and saves it; the others wait and read it)."""
    saved = os.path.join(cfg.out, "bpe.txt")
    if cfg.bpe:
        try:
            return C.Tokenizer(cfg.bpe)
        except (FileNotFoundError, ValueError) as e:
            C.fail(str(e))
    if not os.path.exists(saved) and C.get_rank() == 0:
        if not shards:
            C.fail("--eval-only on your data needs --bpe (or --out holding the run's bpe.txt)")
        captions, skipped = [], {}
        for path in C.expand_shards(shards):
            for s in C.iter_tar_samples(path, skipped):
                try:
                    captions.append(C.decode_caption(s))
                except Exception as e:
                    skipped[type(e).__name__] = skipped.get(type(e).__name__, 0) + 1
            if len(captions) >= 50000:
                break
        if not captions:
            C.fail(f"no caption in --data to train a BPE on (skipped: {skipped or 'no samples'}); check --data")
        C.print0(f"training a {cfg.bpe_vocab}-token BPE on {len(captions)} captions -> {saved}")
        C.Tokenizer(merges=C.train_bpe(captions, cfg.bpe_vocab)).save(saved)
    C.barrier()
    return C.Tokenizer(saved)

def model_spec(name: str) -> dict:
    """Image size, text context, input normalisation and resize filter of a named model."""
    if name in MOBILECLIP_MODELS:
        return MOBILECLIP_MODELS[name]
    if name in MODELS:
        return dict(MODELS[name], mean=C.CLIP_MEAN, std=C.CLIP_STD, interpolation="bicubic")
    C.fail(f"unknown model '{name}'; choose one of {', '.join([*MODELS, *MOBILECLIP_MODELS])}")

def build_model(cfg: Config, vocab_size: int) -> C.CLIP:
    if cfg.model in MOBILECLIP_MODELS:  # convolutional towers run in channels_last
        m = create_model(cfg.model, vocab_size=vocab_size).to(memory_format=torch.channels_last)
    else:
        m = C.build_clip(**MODELS[cfg.model], vocab_size=vocab_size, act=cfg.act,
                         grad_checkpointing=cfg.grad_checkpointing)
    return C.set_fused(m, cfg.fused)

def preprocess(images: torch.Tensor, spec: dict) -> torch.Tensor:
    """uint8 batch on the device -> the model's input: its normalisation (none for MobileCLIP v1), and
    channels_last, which the convolutional towers prefer and a ViT's patchify conv does not mind."""
    return C.normalize_images(images, spec["mean"], spec["std"]).contiguous(memory_format=torch.channels_last)

def load_init(model: C.CLIP, cfg: Config, sd=None):
    """--init: OpenAI/OpenCLIP weights (a state dict, or OpenAI's TorchScript archive; `sd`, if already read)."""
    sd = read_weights(cfg.init, "--init") if sd is None else sd
    try:
        shape = C.openclip_config(sd)
    except ValueError as e:
        C.fail(f"--init {cfg.init}: {e}")
    fits = [n for n, s in MODELS.items() if all(shape[k] == v for k, v in s.items() if "heads" not in k)]
    if cfg.model not in fits:
        C.fail(f"--init {cfg.init} is patch {shape['patch']}, width {shape['width']}: use --model "
               f"{' or '.join(fits) or '(none of MODELS; add its shape to MODELS)'}")
    C.load_state_dict_checked(model, {k: v.float() for k, v in C.openclip_to_ours(sd).items()}, f"--init {cfg.init}")

# ==== Multi-modal reinforced training (paper Sec. 3; spec 3.1 and 4) =================================================
def draw_augmentation(rng, width: int, height: int, size: int, min_scale: float) -> list:
    """One stored augmentation in DataCompDR's compressed form [[i, j, h, w], [[op, m], [op, m]]]: a
    RandomResizedCrop box in original-image pixels (top, left, height, width) and two RandAugment ops at
    magnitude 9 of 31, translations in pixels of a `size` crop (224 for the published data)."""
    left, top, right, bottom = C.random_resized_crop_box(width, height, rng, (min_scale, 1.0))
    return [[top, left, bottom - top, right - left], C.rand_augment_params(rng, size)]

def replay_augmentation(img: Image.Image, param: list, size: int, resample=Image.BICUBIC) -> torch.Tensor:
    """Replay a stored augmentation on the original image -> uint8 (3, size, size): crop the box, resize it
    to `size` (the student's, or a teacher's), apply the RandAugment ops. The same image and parameters give
    bit-identical pixels, so the student sees exactly the view the teachers embedded."""
    (i, j, h, w), ops = (int(v) for v in param[-2]), param[-1]  # a leading MixUp/CutMix pair id is not used
    img = img.crop((j, i, j + w, i + h)).resize((size, size), resample)
    img = C.apply_rand_augment(img, ops) if ops else img  # null = RandAugment skipped
    return torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1)  # (3, S, S)

def read_embeddings(sample: dict) -> dict:
    """The teachers' embeddings of a sample: `npz` (float32) or `pth.gz` (bf16 torch.save) -> float32 arrays."""
    if "npz" in sample:
        with np.load(io.BytesIO(sample["npz"])) as z:
            return {k: z[k].astype(np.float32) for k in z.files}
    if "pth.gz" in sample:
        d = torch.load(io.BytesIO(gzip.decompress(sample["pth.gz"])), map_location="cpu", weights_only=True)
        return {k: v.float().numpy() for k, v in d.items()}
    raise KeyError("no npz or pth.gz embeddings")

class DRDecode:
    """A joined DataCompDR sample (image, txt, syn.json, paug.json, npz | pth.gz) -> the student's inputs (spec 4.4):
    one stored augmentation (drawn by the per-sample, per-epoch RNG) replayed bicubic, whatever the model's eval
    filter (the official code replays at the student's RandomResizedCrop, which OpenCLIP makes bicubic), the GT
    caption, one synthetic caption, and the teachers' embeddings of that view and of both captions. `mix` (the
    official mix-synthetic mode): one caption per sample, the synthetic one (and its embedding) w.p. `mix`.
    Anything missing or malformed raises, and ShardStream skips and counts the sample."""

    def __init__(self, tokenizer, size: int, ctx: int, seed: int, syn_key: str, teachers: int, mix=None):
        self.tokenizer, self.size, self.ctx, self.seed, self.mix = tokenizer, size, ctx, seed, mix
        self.syn_key, self.teachers = re.compile(syn_key), teachers

    def __call__(self, sample: dict) -> dict:
        rng = C.sample_rng(self.seed, sample)
        gt, syn = C.decode_caption(sample), json.loads(sample["syn.json"])
        paug = json.loads(sample["paug.json"])["param_aug"]
        paug = json.loads(paug) if isinstance(paug, str) else paug  # the HF viewer form is a JSON string
        emb = read_embeddings(sample)
        if (n := json.loads(sample.get("json", b"{}")).get("teachers", self.teachers)) != self.teachers:
            raise ValueError(f"sample has {n} teachers, --teacher-scales gives {self.teachers}")
        a = rng.randrange(len(paug))
        key = rng.choice(sorted(k for k in syn if self.syn_key.match(k) and syn[k]))
        c = rng.randrange(len(syn[key]))
        text_emb = emb["text_emb"]
        # v1 layout: text_emb = [GT, syn_0..syn_4]; RayGen layout: a separate `<key>_emb` per caption key
        syn_emb = text_emb[1 + c] if len(text_emb) > 1 else emb[f"{key}_emb"][c]
        ids, syn_emb = self.tokenizer([gt, syn[key][c]], self.ctx), torch.from_numpy(syn_emb)  # ids: (2, L)
        out = {"image": replay_augmentation(C.decode_image(sample), paug[a], self.size, Image.BICUBIC), "ids": ids[0],
               "img_emb": torch.from_numpy(emb["image_emb"][a]), "txt_emb": torch.from_numpy(text_emb[0])}
        if self.mix is None:  # pair mode: both captions, two loss terms
            return {**out, "syn_ids": ids[1], "syn_emb": syn_emb}
        return {**out, "ids": ids[1], "txt_emb": syn_emb} if rng.random() < self.mix else out

def distill_loss(img, txt, t_img, t_txt, logit_scale, teacher_scales) -> torch.Tensor:
    """L_Distill (spec 3.1), distributed like common.contrastive_loss: this rank's B rows against the W*B
    gathered columns. Teacher k's target is the softmax of its own similarities over the global batch,
    P_k = softmax(s_k A_k B_k^T), averaged over teachers after the softmax; the loss is the cross-entropy of
    the student's log-softmax against it, in both directions (= mean_k KL(P_k || Q) + const).
    img, txt: (B, E) normalised student embeddings; t_img, t_txt: (B, K*D), K teachers' normalised D-dim
    embeddings side by side; logit_scale: the student's scale; teacher_scales: K floats 1/tau_k."""
    all_img, all_txt = C.all_gather_with_grad(img).float(), C.all_gather_with_grad(txt).float()  # (W*B, E)
    log_q_i2t = (logit_scale.float() * img.float() @ all_txt.T).log_softmax(dim=1)  # (B, W*B)
    log_q_t2i = (logit_scale.float() * txt.float() @ all_img.T).log_softmax(dim=1)  # (B, W*B)
    with torch.no_grad():  # teachers: fixed targets, fp32
        K = len(teacher_scales)
        a, b = t_img.float().unflatten(1, (K, -1)), t_txt.float().unflatten(1, (K, -1))  # (B, K, D)
        all_a, all_b = C.all_gather_with_grad(a), C.all_gather_with_grad(b)  # (W*B, K, D)
        p_i2t = sum((s * a[:, k] @ all_b[:, k].T).softmax(dim=1) for k, s in enumerate(teacher_scales)) / K
        p_t2i = sum((s * b[:, k] @ all_a[:, k].T).softmax(dim=1) for k, s in enumerate(teacher_scales)) / K
    return -((p_i2t * log_q_i2t).sum(dim=1).mean() + (p_t2i * log_q_t2i).sum(dim=1).mean()) / 2

def distill_loss_reference(img, txt, t_img, t_txt, logit_scale, teacher_scales) -> torch.Tensor:
    """The readable version on one process and the whole batch: full similarity matrices, explicit softmax
    and log, one KL-style cross-entropy per teacher and direction (rows: image -> text; columns: text -> image)."""
    K, D = len(teacher_scales), t_img.shape[1] // len(teacher_scales)
    student = logit_scale.float() * img.float() @ txt.float().T  # (N, N), row i = image i
    loss = 0.0
    for k, s in enumerate(teacher_scales):
        teacher = s * t_img[:, k * D:(k + 1) * D].float() @ t_txt[:, k * D:(k + 1) * D].float().T  # (N, N)
        for dim in (1, 0):  # image -> text over rows, text -> image over columns
            p = torch.exp(teacher) / torch.exp(teacher).sum(dim=dim, keepdim=True)
            log_q = student - torch.logsumexp(student, dim=dim, keepdim=True)
            loss = loss - (p * log_q).sum(dim=dim).mean() / (2 * K)
    return loss

def reinforced_loss(img, txt, syn, batch, logit_scale, lambda_: float, teacher_scales) -> torch.Tensor:
    """The MobileCLIP loss (spec 3.1): (1 - lambda) L_CLIP + lambda L_Distill for the ground-truth and the synthetic
    caption, summed (syn None: the mix-synthetic mode's one caption). lambda = 1 (the DataCompDR-12M recipe) leaves
    the ground-truth pairing out of the loss: all signal comes from the teachers."""
    t_img, loss = batch["img_emb"], 0.0
    for t, t_txt in [(txt, batch["txt_emb"])] + ([(syn, batch["syn_emb"])] if syn is not None else []):
        if lambda_ < 1:
            loss = loss + (1 - lambda_) * C.contrastive_loss(img, t, logit_scale)
        if lambda_ > 0:
            loss = loss + lambda_ * distill_loss(img, t, t_img, t_txt, logit_scale, teacher_scales)
    return loss

# ---- making reinforced data: python mobileclip.py reinforce ----------------------------------------------
def caption_scene(scene: dict, rng) -> str:
    """The synthetic world's accurate captioner (the stand-in for the paper's CoCa): every attribute of the
    picture (from the sample's json "scene"), in one of a few phrasings, where the alt-text keeps only some."""
    style = "outlined " if scene["outlined"] else ""
    obj = (f"a {scene['size']} {scene['colour']} {style}{scene['shape']} {scene['position']}" if scene["count"] == 1
           else f"{('two', 'three')[scene['count'] - 2]} {scene['colour']} {style}{scene['shape']}s")
    bg = f"a {scene['texture']} {scene['background']} background"
    extra = "".join(f" and a small {c} {s}" for c, s in scene["distractors"])
    return rng.choice(("{o}{e} on {b}", "a photo of {o}{e} on {b}", "an image showing {o}{e}, on {b}",
                       "{b} with {o}{e}")).format(o=obj, e=extra, b=bg)

class CaptionSource:
    """Plain CLIP on quality captions (arXiv 2405.08911; spec dense.md 3.1 (b)): each alt-text is replaced by one of
    the sample's synthetic captions (syn.json's keys matching --syn-key, or the world's captioner's; none raises),
    always (`synthetic`) or w.p. p (`mix`), one contrastive loss. Option (a), both captions' losses summed, is
    `--reinforced --lambda-kd 0`. --alt-noise q makes the world's alt-text web-like; a replaced caption is correct."""

    def __init__(self, decode, source: str, prob: float, syn_key: str, seed: int, noise: float = 0.0):
        if source not in ("alt", "synthetic", "mix") or not 0 <= noise <= 1:
            C.fail(f"--caption-source must be alt, synthetic or mix (not '{source}'), --alt-noise in [0, 1]")
        self.decode, self.prob, self.noise = decode, {"alt": 0.0, "synthetic": 1.0}.get(source, prob), noise
        self.syn_key, self.seed = re.compile(syn_key), seed + 1  # an RNG stream apart from the crop's

    def __call__(self, sample: dict) -> dict:
        rng = C.sample_rng(self.seed, sample)
        if rng.random() >= self.prob:
            caption = unrelated_alt_text(sample, self.noise)
        elif "syn.json" in sample:
            syn = json.loads(sample["syn.json"])
            caption = rng.choice([c for k in sorted(syn) if self.syn_key.match(k) for c in syn[k]])
        else:
            caption = caption_scene(json.loads(sample["json"])["scene"], rng)
        return self.decode({**sample, "txt": caption.encode()} if caption else sample)

def unrelated_alt_text(sample: dict, q: float):
    """--alt-noise: for a fraction q of the world's samples, drawn from the key alone (the same samples every epoch,
    seed and worker layout; nested in q), the alt-text of an unrelated random picture in the world's alt-text style,
    redrawn until it does not name the sample's shape; None for the others (their alt-text is kept)."""
    if not q:  # no generator made: the common case costs nothing
        return None
    noise = np.random.default_rng(zlib.crc32(f"alt-noise/{sample['__key__']}".encode()))
    if noise.random() >= q:
        return None
    shape = json.loads(sample["json"])["scene"]["shape"]
    while shape in (caption := C.render_sample(noise, 8)["caption"]):  # 8 px: only the caption is used
        pass
    return caption

def load_teacher(path: str, bpe: str, device):
    """A teacher: this repo's checkpoint (its tokenizer is the bpe.txt beside it, or --bpe) or an
    OpenAI/OpenCLIP state dict (--bpe, the CLIP merges). Returns (model, tokenizer, spec), in eval mode."""
    ckpt = read_weights(path, "teacher checkpoint")
    beside = os.path.join(os.path.dirname(path), "bpe.txt")
    merges = beside if "model_name" in ckpt and os.path.isfile(beside) else bpe
    tok = C.Tokenizer(merges or C.fail(f"teacher {path}: no tokenizer (no bpe.txt beside it); give --bpe"))
    if "model_name" in ckpt:  # a checkpoint of this script
        cfg = Config(model=ckpt["model_name"], act=ckpt.get("config", {}).get("act", "gelu"))
        model, spec = build_model(cfg, ckpt["vocab_size"]), model_spec(cfg.model)
        fit_head_bias(model, ckpt["model"])
        C.load_state_dict_checked(model, ckpt["model"], f"teacher {path}")
        if cfg.model in MOBILECLIP_MODELS:  # a teacher only infers: fold the train-time branches
            model = reparameterize(model)
    else:
        try:
            model = C.clip_from_openclip(C.unwrap_state_dict(ckpt))
        except ValueError as e:
            C.fail(f"teacher {path}: {e}")
        spec = dict(image_size=model.visual.image_size, context_length=model.text.context_length,
                    mean=C.CLIP_MEAN, std=C.CLIP_STD, interpolation="bicubic")
    return model.to(device).eval(), tok, spec

def embed_views(teachers, views: list, texts: list, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Every teacher's normalised embeddings side by side, of the views [(image, param)] replayed at its own input
    size -> (len(views), K*D), and of the texts -> (len(texts), K*D)."""
    img_out, txt_out = [], []
    for model, tok, spec in teachers:
        device = next(model.parameters()).device
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            zi = []
            for i in range(0, len(views), batch):
                x = torch.stack([replay_augmentation(im, p, spec["image_size"], RESAMPLE[spec["interpolation"]])
                                 for im, p in views[i:i + batch]]).to(device)
                zi.append(model.encode_image(preprocess(x, spec), normalize=True).float())
            zt = [model.encode_text(tok(texts[i:i + batch], spec["context_length"]).to(device), True).float()
                  for i in range(0, len(texts), batch)]
        img_out.append(torch.cat(zi))
        txt_out.append(torch.cat(zt))
    return torch.cat(img_out, dim=1).cpu(), torch.cat(txt_out, dim=1).cpu()

def reinforce_shard(path: str, teachers, captions: dict, cfg: Config, skipped: dict):
    """Yield the DataCompDR-layout samples of one input shard (spec 4.3): the original members (the joined
    form, so training reads them directly), syn.json, paug.json, npz {image_emb (A, K*D), text_emb (1+S, K*D):
    GT first, then the synthetic captions}, and json with the teacher count and the image's sha256."""
    size = cfg.aug_size or model_spec(cfg.model)["image_size"]  # the crop size translations are drawn for

    def prepared():  # (image, augmentations, GT caption, synthetic captions, members kept) of each usable sample
        for s in C.iter_tar_samples(path, skipped):
            try:
                if wrong := unrelated_alt_text(s, cfg.alt_noise):  # --alt-noise: stored as the alt-text
                    s = {**s, "txt": wrong.encode()}
                img, gt, rng = C.decode_image(s), C.decode_caption(s), C.sample_rng(cfg.seed, s)
                # --captions, else the synthetic world's accurate captioner, from the ground-truth scene
                syn = (captions[s["__key__"].rsplit("/", 1)[-1]] if captions else
                       [caption_scene(json.loads(s["json"])["scene"], rng) for _ in range(cfg.num_captions)])
            except Exception as e:
                skipped[type(e).__name__] = skipped.get(type(e).__name__, 0) + 1
                continue
            params = [draw_augmentation(rng, *img.size, size, cfg.aug_min_scale) for _ in range(cfg.num_augs)]
            yield img, params, gt, syn, {k: v for k, v in s.items() if k not in ("npz", "pth.gz")}

    samples = prepared()
    while chunk := list(itertools.islice(samples, cfg.batch_size)):  # the teachers embed a batch at a time
        views = [(img, p) for img, params, *_ in chunk for p in params]
        zi, zt = embed_views(teachers, views, [t for _, _, gt, syn, _ in chunk for t in [gt, *syn]], cfg.batch_size)
        for img, params, gt, syn, s in chunk:
            n_img, n_txt = len(params), 1 + len(syn)
            buf = io.BytesIO()
            np.savez(buf, image_emb=zi[:n_img].numpy(), text_emb=zt[:n_txt].numpy())
            zi, zt = zi[n_img:], zt[n_txt:]
            meta = dict(json.loads(s.get("json", b"{}")), teachers=len(teachers),
                        sha256=hashlib.sha256(next(s[k] for k in C.IMAGE_EXTS if k in s)).hexdigest())
            yield {**s, "syn.json": {"syn_text": syn}, "paug.json": {"param_aug": params}, "npz": buf.getvalue(),
                   "json": meta}

@torch.no_grad()
def reinforce(cfg: ReinforceConfig):
    """Write DataCompDR-layout shards of --data (reinforce_shard), the shards split over the ranks; a finished
    output shard is never redone, so an interrupted run resumes by running it again."""
    rank, local_rank, world, device = C.setup_distributed(cfg.device)
    if not cfg.teachers:
        C.fail("reinforce needs --teachers a.pt[,b.pt...]: CLIP checkpoints (this repo's or OpenCLIP)")
    try:  # JSON lines {"key", "captions"}
        captions = {str(d["key"]): list(d["captions"]) for d in map(json.loads, C.read_lines(cfg.captions))
                    } if cfg.captions else {}
    except (ValueError, KeyError, TypeError) as e:
        C.fail(f"--captions {cfg.captions}: not JSON lines of {{\"key\", \"captions\"}} ({type(e).__name__}: {e})")
    teachers = [load_teacher(p, cfg.bpe, device) for p in cfg.teachers.split(",")]
    C.document_run(cfg.out, cfg, [__file__, C.__file__])
    data, zs, ret = resolve_data(cfg)
    shards = C.expand_shards(data)
    if not cfg.data and rank == 0:  # the synthetic world: training on the output evaluates on its held-out set
        json.dump({"zeroshot_data": zs, "retrieval_data": ret}, open(os.path.join(cfg.out, "eval.json"), "w"))
    scales = ",".join(f"{m.logit_scale.exp().clamp(max=100).item():.1f}" for m, _, _ in teachers)
    C.print0(f"teachers: {len(teachers)}; their learned logit scales: {scales} (--teacher-scales to train with)")
    root = os.path.commonpath([os.path.dirname(p) for p in shards])
    done, skipped = 0, {}  # skipped samples by reason, over this rank's shards
    for path in C.progress(shards[rank::world], f"reinforce (rank {rank})"):
        out = os.path.join(cfg.out, os.path.relpath(path, root))
        if os.path.exists(out):
            continue
        os.makedirs(os.path.dirname(out), exist_ok=True)
        n = C.write_shard(out, reinforce_shard(path, teachers, captions, cfg, skipped))
        if not n:  # nothing usable: no empty shard left behind to pass for a finished one
            os.remove(out)
        done += n
    if not done and skipped:
        C.fail(f"rank {rank}: no usable sample in its shards of --data; skipped: {skipped}")
    print(f"rank {rank}: wrote {done} samples to {cfg.out}; skipped: {skipped or 'none'}", flush=True)
    C.barrier()
    C.finish_run(cfg.out, extra=f"shards {cfg.out}/**/*.tar")
    C.cleanup_distributed()

# ==== Evaluation =====================================================================================================
@torch.no_grad()
def evaluate(model, tokenizer, cfg: Config, zs_dir: str, ret_shards: str, device) -> dict:
    """Zero-shot top-1/top-5 on an ImageFolder and retrieval recall@1/5/10 on caption shards."""
    model.eval()
    spec, metrics = model_spec(cfg.model), {}
    resample = RESAMPLE[spec["interpolation"]]
    if zs_dir:
        # OpenCLIP's protocol (--templates openai: its 80 prompts), the images by its eval transform and model filter
        items, names = C.image_folder(zs_dir, C.read_lines(cfg.classnames) if cfg.classnames else None)
        templates = C.templates_arg(cfg.templates or "default")
        clf = C.zeroshot_classifier(model, tokenizer, names, templates, device, spec["context_length"])
        metrics.update(C.zeroshot_eval(model, clf, items, spec["image_size"], device, mean=spec["mean"],
                                       std=spec["std"], resample=resample))
    if ret_shards:
        decode = C.ImageTextDecode(tokenizer, spec["image_size"], spec["context_length"], train=False,
                                   resample=resample)
        stream = C.ShardStream(C.expand_shards(ret_shards), decode, 256, shuffle_buffer=1, epochs=1, drop_last=False)
        img, txt, n = [], [], 0
        for b in C.progress(C.make_loader(stream, 0, False), "retrieval"):  # no usable sample: one line
            img.append(model.encode_image(preprocess(b["image"].to(device), spec)).float())
            txt.append(model.encode_text(b["ids"].to(device)).float())
            if (n := n + len(b["ids"])) >= cfg.retrieval_max:
                break
        metrics.update(C.retrieval_eval(torch.cat(img)[:cfg.retrieval_max], torch.cat(txt)[:cfg.retrieval_max]))
    model.train()
    return metrics

# ==== Training =======================================================================================================
def check_inputs(cfg: Config) -> list[float]:
    """Before any work, one line for a flag that cannot work or a missing file (the teacher scales if all is well)."""
    try:
        scales = [float(s) for s in cfg.teacher_scales.split(",")]
    except ValueError:
        scales = [0.0]
    C.templates_arg(cfg.templates or "default")  # a missing or malformed file: one line
    evals = (("--zeroshot-data", cfg.zeroshot_data), ("--classnames", cfg.classnames))
    for bad, msg in [(not all(0 < s < math.inf for s in scales), f"--teacher-scales {cfg.teacher_scales}: "
                      "comma-separated numbers > 0 (1/tau of each teacher)"),
                     (cfg.lambda_kd > 1, f"--lambda-kd {cfg.lambda_kd}: must be between 0 and 1"),
                     (cfg.caption_source not in ("alt", "synthetic", "mix"), "--caption-source: alt, synthetic or mix"),
                     (cfg.mix_synthetic and not cfg.reinforced, "--mix-synthetic needs --reinforced (plain "
                      "training: --caption-source mix)"),
                     (cfg.init and not cfg.bpe, "--init needs --bpe bpe_simple_vocab_16e6.txt.gz, its tokenizer")
                     ] + [(path and not os.path.exists(path), f"{flag} not found: {path}") for flag, path in evals]:
        if bad:
            C.fail(msg)
    return scales

def make_decode(cfg: Config, tokenizer, spec: dict, teachers: int):
    """`train`'s sample decoder: DataCompDR replay with the teachers' embeddings (--reinforced: caption pairs, or
    --mix-synthetic), else OpenCLIP's training transform on the alt-text or a quality caption (--caption-source)."""
    if cfg.reinforced:
        return DRDecode(tokenizer, spec["image_size"], spec["context_length"], cfg.seed, cfg.syn_key, teachers,
                        cfg.synthetic_prob if cfg.mix_synthetic else None)
    decode = C.ImageTextDecode(tokenizer, spec["image_size"], spec["context_length"], True, cfg.seed,
                               resample=RESAMPLE[spec["interpolation"]])
    if cfg.caption_source != "alt" or cfg.alt_noise:  # quality captions (dense.py's pre-training), noise
        decode = CaptionSource(decode, cfg.caption_source, cfg.synthetic_prob, cfg.syn_key, cfg.seed, cfg.alt_noise)
    return decode

def train(cfg: Config):
    """Train a CLIP: plain, on quality captions, or multi-modal reinforced (the default command).
    SIGTERM/SIGINT (also to the whole process group) save a checkpoint and exit 0; --resume auto continues exactly."""
    rank, local_rank, world, device = C.setup_distributed(cfg.device)
    spec, scales = model_spec(cfg.model), check_inputs(cfg)
    ckpt = C.load_checkpoint(cfg.resume, cfg.out) if cfg.resume != "auto" else None  # a bad file: one line, now
    sd = read_weights(cfg.init, "--init") if cfg.init else None  # the --init weights
    C.document_run(cfg.out, cfg, [__file__, C.__file__])  # claims --out (one run at a time), start record
    ckpt = C.load_checkpoint("auto", cfg.out) if cfg.resume == "auto" else ckpt
    if ckpt is not None and ckpt.get("model_name") != cfg.model:
        C.fail(f"checkpoint {cfg.resume} is of model '{ckpt.get('model_name')}', not --model {cfg.model}")
    keys = {"model"} if cfg.eval_only else {"model", "optimizer", "step", "rng", "data"}
    if ckpt is not None and (missing := keys - ckpt.keys()):
        C.fail(f"checkpoint {cfg.resume} is not a training checkpoint of this script (no {', '.join(sorted(missing))})")
    torch.manual_seed(cfg.seed)  # same init on every rank (DDP also broadcasts it)
    shards, zs_dir, ret_shards = resolve_data(cfg)
    tokenizer = make_tokenizer(cfg, shards)
    model = build_model(cfg, tokenizer.vocab_size).to(device)
    C.print0(f"model {cfg.model}: image {sum(p.numel() for p in model.visual.parameters()) / 1e6:.2f}M"
             f" + text {sum(p.numel() for p in model.text.parameters()) / 1e6:.2f}M parameters")
    log = C.RunLog(cfg.out)
    # ---- start: fresh, from public weights, or resumed (the model complete before the optimizer sees it) ----
    start, data_pos = 0, {}
    if sd is not None:
        load_pretrained(model, cfg.init, cfg.model, sd) if cfg.model in MOBILECLIP_MODELS else load_init(model, cfg, sd)
    if ckpt is not None:
        fit_head_bias(model, ckpt["model"])
        C.load_state_dict_checked(model, ckpt["model"], f"checkpoint {cfg.resume}")
        C.print0(f"resumed from step {ckpt.get('step', 0)} of {cfg.resume}")
    if cfg.eval_only:
        log.log(ckpt.get("step", 0) if ckpt else 0, **evaluate(model, tokenizer, cfg, zs_dir, ret_shards, device))
        C.finish_run(cfg.out)
        return C.cleanup_distributed()
    opt = C.make_adamw(model, cfg.lr, cfg.weight_decay, betas=(0.9, cfg.beta2))
    if ckpt is not None:
        opt.load_state_dict(ckpt["optimizer"])
        C.set_rng_state(ckpt["rng"])
        start = ckpt["step"]
        if len(ckpt["data"]) == world and len(ckpt["data"].get(rank, {})) == max(1, cfg.workers):
            data_pos = ckpt["data"][rank]
        else:
            C.print0("warning: world size or --workers changed; the data stream restarts at its beginning")
    # ---- data -----------------------------------------------------------------------------------
    stream = C.ShardStream(C.expand_shards(shards), make_decode(cfg, tokenizer, spec, len(scales)), cfg.batch_size,
                           rank, world, cfg.seed, cfg.shuffle_buffer, data_pos, start)
    batches = iter(C.make_loader(stream, cfg.workers, device.type == "cuda"))
    position = C.DataPosition()
    position.pos = {int(w): p for w, p in data_pos.items()}  # workers with no new batch keep their place
    # ---- wrap: DDP, compile, precision --------------------------------------------------------------
    train_model = DDP(model, device_ids=[local_rank] if device.type == "cuda" else None) if world > 1 else model
    train_model = torch.compile(train_model) if cfg.compile else train_model
    bf16 = cfg.precision == "bf16" or (cfg.precision == "auto" and device.type == "cuda")
    stop = C.StopSignal()  # the loader's workers ignore SIGTERM/SIGINT: a signal to the group reaches only us
    nonfinite = torch.zeros((), dtype=torch.bool, device=device)  # any NaN/inf loss since the last check
    t0, t_data, seen, saved = time.time(), 0.0, 0, None
    for step in C.progress(range(start, cfg.steps + 1), "train"):
        last_step = step == cfg.steps
        stopping = stop.requested if world == 1 else (step % cfg.log_every == 0 and stop.agreed(device))
        # ---- evaluate -----------------------------------------------------------------------------
        if cfg.eval and (last_step or (cfg.eval_every and step % cfg.eval_every == 0 and step > start)):
            if rank == 0:
                log.log(step, **evaluate(model, tokenizer, cfg, zs_dir, ret_shards, device))
            C.barrier()
        # ---- checkpoint (never one with a non-finite loss behind it) ------------------------------
        if (last_step or stopping or (step % cfg.ckpt_every == 0 and step > start)) and step > start:
            if nonfinite.item():
                C.fail(f"non-finite loss before step {step}; the last good checkpoint in {cfg.out} is kept")
            state = {"model": model.state_dict(), "optimizer": opt.state_dict(), "step": step,
                     "rng": C.rng_state(), "data": position.state(), "model_name": cfg.model,
                     "config": dataclasses.asdict(cfg), "vocab_size": tokenizer.vocab_size}
            C.save_checkpoint(saved := os.path.join(cfg.out, f"ckpt-{step}.pt"), state)
            C.prune_checkpoints(cfg.out, cfg.keep_ckpts, written=saved)
        if last_step or stopping:
            break
        # ---- forward, backward, step --------------------------------------------------------------
        td = time.time()
        batch = next(batches)
        t_data += time.time() - td
        position.update(batch)
        images = preprocess(batch["image"].to(device, non_blocking=True), spec)  # (B, 3, S, S) float
        ids = batch["ids"].to(device, non_blocking=True)  # (B, L)
        pair = "syn_ids" in batch  # reinforced, pair mode: GT and synthetic captions in one text forward (2B, L)
        ids = torch.cat([ids, batch["syn_ids"].to(device, non_blocking=True)]) if pair else ids
        teach = {k: v.to(device, non_blocking=True) for k, v in batch.items() if k.endswith("_emb")}
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            img, txt, scale = train_model(images, ids)
            if cfg.reinforced:
                gt, syn = txt.chunk(2) if pair else (txt, None)  # (B, E) each
                loss = reinforced_loss(img, gt, syn, teach, scale, cfg.lambda_kd, scales)
            else:
                loss = C.contrastive_loss(img, txt, scale)
        loss.backward()
        gnorm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip or float("inf"))
        C.set_lr(opt, C.lr_at(step, cfg.lr, cfg.warmup, cfg.steps))
        opt.step()
        opt.zero_grad(set_to_none=True)
        nonfinite |= ~torch.isfinite(loss.detach())
        seen += len(images)
        # ---- log (the only host sync) ---------------------------------------------------------------
        if (step + 1) % cfg.log_every == 0:
            if nonfinite.item():
                C.fail(f"non-finite loss at step {step}; the last good checkpoint in {cfg.out} is kept")
            dt, skipped = time.time() - t0, position.skip_totals()
            read = seen + sum(skipped.values())
            if read and sum(skipped.values()) / read > cfg.max_skip_frac:
                C.fail(f"{sum(skipped.values())} of {read} samples unusable ({skipped}); check --data")
            log.log(step + 1, loss=loss.item(), lr=opt.param_groups[0]["lr"], grad_norm=gnorm.item(),
                    logit_scale=scale.item(), samples_per_s=seen * world / dt, data_frac=t_data / dt,
                    skipped=sum(skipped.values()))
            t0, t_data, seen = time.time(), 0.0, 0
    batches.close()  # shuts the loader's workers down (they ignore the stop signals, so nothing else will)
    C.finish_run(cfg.out, saved)
    C.cleanup_distributed()

def main(argv=None):
    return C.run_command(__doc__, {"train": (train, Config), "reinforce": (reinforce, ReinforceConfig),
                                   "export": (export, ExportConfig)}, argv, default="train")

if __name__ == "__main__":
    main()
