"""Weight subcloning: direct initialization of transformers using larger pretrained ones (arXiv 2312.09299).

A small transformer (the destination) is initialised from a larger pretrained one of the same family (the
parent): rank neurons by their mean |activation| on a small data sample, keep the top residual neurons at the
same indices in every layer, the top heads (whole) and the top FFN neurons of each layer, drop blocks from
the middle, and rescale the weight matrices so that neuron statistics survive the smaller fan-in. The
destination then trains with a much lower learning rate and weight decay than from random init (Table 1).

What is here: the paper's parents, Hugging Face GPT-2 folders (gpt2 ... gpt2-xl, `load_gpt2`) and ImageNet
ViT-B/16 classifiers of torchvision or timm (`vit_classifier`); also this repository's CLIP (both towers), its
GPT-style LM, OpenAI/OpenCLIP ViT CLIP files and mobileclip.py checkpoints. `train` trains a destination or a
random init (contrastive, next-token or class cross-entropy loss); `compare` counts the steps each init needs to
a fixed target. A GPT-2 folder's text goes through GPT-2's own byte-level BPE (its vocab.json + merges.txt,
`GPT2Tokenizer`, also --bpe FOLDER); other text through common.Tokenizer. Not here: depth increase by block
duplication (unused in the paper's experiments); the plots of Figs. 2-5 (`clone` prints Fig. 2's ratio per block).

Paper -> code:
  Sec. 4.1 neuron importance, mean |activation| over batch and tokens  -> importance (forward hooks)
  Sec. 4.1 residual consistency: one ranking, summed over layers        -> importance["residual"], select
  Sec. 4.1 attention heads ranked as wholes, scored after the softmax   -> importance["heads"], select
  Sec. 4.1 FFN neurons ranked per layer                                  -> importance["ffn"], select
  Sec. 4.1 re-ordering then slicing (ablation Fig. 14: --no-reorder)    -> top
  Sec. 4.1 weight scaling sqrt(d / d') (ablation Fig. 12: --no-scale)   -> take
  Sec. 3 / Fig. 2 additive residual, Sec. 4.2 remove middle blocks      -> keep_blocks, importance["ratio"]
  Table 1 learning rate and weight decay, subcloned vs random            -> TABLE1, hyper
  Sec. 5 speed-up: steps to 70% top-1 (ViT) / perplexity 12 (GPT-2)     -> TARGETS, steps_to_target, compare

Checkpoints (`clone`; `train`, which resumes): {"model", "layout", "kind", "arch", "bpe_merges", ...}; a CLIP in
the OpenAI/OpenCLIP layout (mobileclip.py --init reads it), a GPT or ViT classifier in our names.

Commands:
  python subclone.py compare                        # parent -> subclone -> subcloned vs random, CPU, synthetic
  python subclone.py clone --init vit_b_16.pth --data imagenet/ --model vit_b16_in1k_half --out b16_half.pt
  torchrun --nproc_per_node=8 subclone.py train --init b16_half.pt --data 'imagenet/{0000..1023}.tar' \
      --val-data 'imagenet-val/{00..63}.tar' --batch-size 128 --steps 100000  # Table 1: lr 1e-4, wd 0.005
  python subclone.py compare --kind vit --parent vit_b_16.pth --data imagenet/ --val-data imagenet-val/  # 70%
  python subclone.py clone --init gpt2-large/ --data text-shards/ --model gpt2_medium --out m.pt  # GPT-2's BPE

Result on the synthetic world (2-core CPU shared with other jobs; README.md has the curves and older runs):
  small_parent (300 steps, 29.3% zero-shot) -> small, 200 steps, target 22% top-1 set before the run, seeds 0-2:
    subcloned at step 20, 20, 20; random (Table 1) at step 160, 160, 160: 8.0x (evaluated every 10 steps).
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import time
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP

import common as C

@dataclass
class Config:
    data: str = ""  # tar shards (image + caption, or + .cls label for a ViT classifier); empty = the synthetic world
    out: str = "runs/subclone"  # clone: the output file; train / compare: the run directory
    init: str = ""  # clone: the parent; train: a subcloned checkpoint (empty = random init of --model)
    model: str = ""  # a name from MODELS: train's random-init shape, clone's destination shape
    bpe: str = ""  # CLIP merges file or GPT-2 folder (vocab.json + merges.txt); default: --init's or bpe.txt beside it
    act: str = "gelu"  # activation of an OpenCLIP parent (quick_gelu for OpenAI's own weights)
    device: str = "auto"  # auto | cuda | cpu
    cache_dir: str = ""  # synthetic world cache (default ~/.cache/effclip)
    synthetic_train: int = 40000  # synthetic training images
    synthetic_val: int = 1000  # synthetic held-out images

@dataclass
class CloneConfig(Config):  # the destination shape (0 = keep the parent's; heads = width / the parent's head width)
    depth: int = 0  # blocks of the ViT / GPT (removed from the middle)
    width: int = 0  # residual width of the ViT / GPT
    heads: int = 0  # attention heads; must equal width / the parent's head width (heads are kept whole)
    mlp: int = 0  # FFN hidden size (sets the MLP ratio, shared by both CLIP towers)
    text_depth: int = 0  # blocks of the CLIP text tower
    text_width: int = 0  # residual width of the CLIP text tower
    calib_samples: int = 1024  # samples that rank the neurons (the paper: 0.5 percent of ImageNet)
    scale: bool = True  # multiply weight matrices by sqrt(fan-in parent / fan-in child) (Sec. 4.1)
    reorder: bool = True  # rank neurons before slicing; --no-reorder slices the first ones (Fig. 14)

@dataclass
class TrainConfig(Config):
    val_data: str = ""  # held-out shards: retrieval + loss (CLIP), perplexity (GPT), top-1 (ViT); default: synthetic
    zeroshot_data: str = ""  # ImageFolder for zero-shot top-1 (CLIP); default: the synthetic held-out set
    steps: int = 400  # optimizer steps
    batch_size: int = 128  # per process
    lr: float = 0.0  # peak learning rate; 0 = Table 1 (subcloned or random, by --init)
    weight_decay: float = -1.0  # AdamW weight decay; < 0 = Table 1
    warmup: int = 50  # linear warm-up steps, then cosine to zero
    beta2: float = 0.98  # AdamW beta2
    grad_clip: float = 1.0  # global gradient-norm clip; 0 = off
    seed: int = 0  # model init, data order, augmentation
    workers: int = 2  # DataLoader workers per rank
    shuffle_buffer: int = 2000  # samples in each worker's shuffle buffer
    precision: str = "auto"  # auto (bf16 on GPU, fp32 on CPU) | bf16 | fp32
    log_every: int = 50  # steps between log lines
    eval_every: int = 50  # steps between evaluations (and at the end); 0 = at the end only
    eval_max: int = 1000  # held-out samples for zero-shot / retrieval and val_loss / perplexity
    ckpt_every: int = 500  # steps between checkpoints
    keep_ckpts: int = 2  # newest checkpoints kept
    resume: str = ""  # 'auto' = the latest checkpoint in --out, or a path
    overwrite: bool = False  # start over in an --out that holds another run's checkpoints (moved to OUT/previous-N/)

@dataclass
class CompareConfig(TrainConfig, CloneConfig):  # compare trains (train's flags) and clones (clone's flags)
    kind: str = "clip"  # clip (ViT + text CLIP) | gpt (causal LM on the captions) | vit (ImageNet classifier)
    parent_model: str = ""  # the parent's MODELS name (default: small_parent / gpt_parent / vit_b16_in1k)
    parent_steps: int = 600  # steps of parent training
    parent_lr: float = 0.0  # the parent's peak LR; 0 = --lr, else Table 1 for random init
    random_lr: float = 0.0  # also train the random init at this LR (a tuned baseline); 0 = skip
    parent: str = ""  # a trained parent checkpoint to subclone instead of training one (one parent, several seeds)
    target: float = 0.0  # the fixed target of the speed-up, set before the run; 0 = TARGETS[--kind]

# Named shapes. CPU comparisons: `small_parent` -> `small` (half width, 32 px), `parent` -> `tiny` (mobileclip.py's
# tiny, 64 px), `gpt_parent` -> `gpt_tiny` (half width and depth). The paper's: gpt2_large -> gpt2_medium,
# vit_b16_in1k -> vit_b16_in1k_half (the ImageNet ViT-B; half width and depth); vit_b16_half: a CLIP's.
MODELS = {
    "small_parent": dict(kind="clip", image_size=32, patch=8, width=128, layers=4, heads=4, embed_dim=128,
                         text_width=128, text_layers=3, text_heads=2, context_length=32),
    "small": dict(kind="clip", image_size=32, patch=8, width=64, layers=4, heads=2, embed_dim=128,
                  text_width=64, text_layers=3, text_heads=1, context_length=32),
    "parent": dict(kind="clip", image_size=64, patch=8, width=256, layers=4, heads=8, embed_dim=128,
                   text_width=256, text_layers=3, text_heads=4, context_length=32),
    "tiny": dict(kind="clip", image_size=64, patch=8, width=128, layers=4, heads=4, embed_dim=128,
                 text_width=128, text_layers=3, text_heads=2, context_length=32),
    "vit_b16": dict(kind="clip", image_size=224, patch=16, width=768, layers=12, heads=12, embed_dim=512,
                    text_width=512, text_layers=12, text_heads=8, context_length=77),
    "vit_b16_half": dict(kind="clip", image_size=224, patch=16, width=384, layers=12, heads=6, embed_dim=512,
                         text_width=256, text_layers=12, text_heads=4, context_length=77),
    "gpt_parent": dict(kind="gpt", width=128, layers=6, heads=4, context_length=32),
    "gpt_tiny": dict(kind="gpt", width=64, layers=3, heads=2, context_length=32),
    "gpt2_large": dict(kind="gpt", width=1280, layers=36, heads=20, context_length=1024),
    "gpt2_medium": dict(kind="gpt", width=1024, layers=24, heads=16, context_length=1024),
    "vit_b16_in1k": dict(kind="vit", image_size=224, patch=16, width=768, layers=12, heads=12, num_classes=1000),
    "vit_b16_in1k_half": dict(kind="vit", image_size=224, patch=16, width=384, layers=6, heads=6, num_classes=1000)}

# Table 1 (Sec. 5.1): (lr, weight decay) by (kind, subcloned). The CLIP runs use the ViT values. A subcloned
# model sits near a good optimum: a high LR makes it forget, a strong WD undoes what the parent learned.
TABLE1 = {("clip", False): (2e-3, 0.2), ("clip", True): (1e-4, 0.005), ("gpt", False): (1e-4, 0.1),
          ("gpt", True): (1e-4, 0.001), ("vit", False): (2e-3, 0.2), ("vit", True): (1e-4, 0.005)}
# Sec. 5's measure: steps to a fixed target set before training (ViT: 70% top-1, GPT-2: perplexity 12). On the
# synthetic world (design choice) 25% zero-shot top-1, which both inits of `small` reach in 400 steps.
TARGETS = {"clip": ("zeroshot_top1", 25.0), "gpt": ("val_ppl", 12.0), "vit": ("top1", 70.0)}

# ---- The models: the LM of the GPT-2 experiment, the ImageNet ViT classifier of the ViT experiment ---------
class GPT(nn.Module):
    """A GPT-2-style decoder from common.Block: token + learned position embeddings, causal pre-norm blocks,
    final LayerNorm, an untied LM head (untied so that subcloning can scale it as a matrix while the
    embedding, a lookup table, keeps its values). act "gelu_tanh" is GPT-2's gelu_new; eps, its LayerNorms'."""
    def __init__(self, vocab_size=49408, context_length=32, width=256, layers=8, heads=8, mlp_ratio=4.0, act="gelu",
                 eps=1e-5):
        super().__init__()
        self.context_length = context_length
        self.token_embed = nn.Embedding(vocab_size, width)
        nn.init.normal_(self.token_embed.weight, std=0.02)
        self.pos_embed = nn.Parameter(torch.randn(context_length, width) * 0.01)
        self.blocks = nn.ModuleList(C.Block(width, heads, mlp_ratio, act) for _ in range(layers))
        self.norm, self.head = nn.LayerNorm(width), nn.Linear(width, vocab_size, bias=False)
        for m in self.modules():
            if isinstance(m, nn.LayerNorm):
                m.eps = eps
            if isinstance(m, C.MLP) and act == "gelu_tanh":
                m.act = nn.GELU(approximate="tanh")
    def forward(self, ids):
        x = self.token_embed(ids) + self.pos_embed[: ids.shape[1]]  # (B, N, D)
        for blk in self.blocks:
            x = blk(x, causal=True)
        return self.head(self.norm(x))  # (B, N, V)

def last_eot(ids):
    """Each row's last eot position (eot has the largest id; GPT-2's rows also open with one) = its target count."""
    return ids.shape[1] - 1 - ids.flip(1).argmax(dim=1)

def lm_loss(model, ids):
    """Next-token cross-entropy on captions [sot, ..., eot, 0, ...]: targets up to and including the last eot."""
    logits = model(ids[:, :-1])  # (B, N-1, V)
    target = ids[:, 1:].clone()
    eot = last_eot(ids)
    target[torch.arange(target.shape[1], device=ids.device)[None] >= eot[:, None]] = -100  # padding
    return F.cross_entropy(logits.float().flatten(0, 1), target.flatten(), ignore_index=-100)

class ViTClassifier(C.ViT):
    """The paper's ViT-B/16 parent, an ImageNet classifier, in common.ViT's names: the function of torchvision's
    vit_b_16 and timm's vit_base_patch16_224 (patch conv with a bias, no pre-norm, LayerNorm eps 1e-6, exact
    GELU, the normed class token through a linear head). mean / std: the input normalisation of its weights."""
    def __init__(self, image_size=224, patch=16, width=768, layers=12, heads=12, num_classes=1000, mlp_ratio=4.0,
                 mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225)):
        super().__init__(image_size, patch, width, layers, heads, 1, mlp_ratio)
        del self.proj
        self.patch_embed, self.norm_pre = nn.Conv2d(3, width, patch, patch), nn.Identity()
        self.head, self.mean, self.std = nn.Linear(width, num_classes), mean, std
        for m in self.modules():
            if isinstance(m, nn.LayerNorm):
                m.eps = 1e-6
    def forward(self, x):
        return self.head(self.forward_tokens(x)[:, 0])  # (B, classes)

# torchvision's vit_b_16 names -> ours (timm's differ only in patch_embed.proj and the (1, 1, D) cls token)
TORCHVISION_VIT = [(r"^conv_proj\.", "patch_embed."), (r"^class_token$", "cls_token"),
                   (r"^encoder\.pos_embedding$", "pos_embed"), (r"^encoder\.ln\.", "norm."),
                   (r"^encoder\.layers\.encoder_layer_(\d+)\.", r"blocks.\1."), (r"\.ln_1\.", ".norm1."),
                   (r"\.ln_2\.", ".norm2."), (r"self_attention\.in_proj_", "attn.qkv."),
                   (r"self_attention\.out_proj\.", "attn.proj."), (r"\.mlp\.(0|linear_1)\.", ".mlp.fc1."),
                   (r"\.mlp\.(3|linear_2)\.", ".mlp.fc2."), (r"^heads\.head\.", "head."),
                   (r"^patch_embed\.proj\.", "patch_embed.")]

def vit_classifier(sd: dict) -> tuple[nn.Module, dict, dict]:
    """An ImageNet ViT state dict of torchvision (`vit_b_16`) or timm (`vit_base_patch16_224`) -> (ViTClassifier,
    its state dict in our names, arch). Shapes from the tensors; heads of 64 (16 of 80 at width 1280, ViT-H).
    Input normalisation (the file does not say): ImageNet's mean / std for torchvision, 0.5 / 0.5 for timm."""
    timm = "patch_embed.proj.weight" in sd
    for old, new in TORCHVISION_VIT:
        sd = {re.sub(old, new, k): v for k, v in sd.items()}
    sd["cls_token"], sd["pos_embed"] = sd["cls_token"].reshape(-1), sd["pos_embed"].flatten(0, -2)
    width, _, patch, _ = sd["patch_embed.weight"].shape
    arch = dict(image_size=math.isqrt(sd["pos_embed"].shape[0] - 1) * patch, patch=patch, width=width,
                layers=len({k.split(".")[1] for k in sd if k.startswith("blocks.")}),
                heads={1280: 16}.get(width, width // 64), num_classes=sd["head.weight"].shape[0],
                mlp_ratio=sd["blocks.0.mlp.fc1.weight"].shape[0] / width,
                mean=(0.5,) * 3 if timm else (0.485, 0.456, 0.406), std=(0.5,) * 3 if timm else (0.229, 0.224, 0.225))
    return ViTClassifier(**arch), sd, arch

def build(kind: str, arch: dict) -> nn.Module:
    return C.build_clip(**arch) if kind == "clip" else ViTClassifier(**arch) if kind == "vit" else GPT(**arch)

def towers(model: nn.Module) -> dict:
    """The transformer stacks of a model, by state-dict prefix: each one has its own residual stream."""
    if isinstance(model, C.CLIP):
        if not isinstance(model.visual, C.ViT) or not isinstance(model.text, C.TextTransformer):
            C.fail("subcloning needs ViT and transformer text towers (MobileCLIP MCi/MCt are not supported)")
        return {"visual.": model.visual, "text.": model.text}
    return {"": model}

# ---- Sec. 4.1: neuron importance = mean |activation| over batch and tokens, collected with forward hooks ----
@torch.no_grad()
def importance(tower: nn.Module, run, batches) -> dict:
    """Run `run(batch)` (which calls `tower`) over `batches` and score the neurons of `tower.blocks`:
    residual  (D,)        the residual stream's |x| summed over every point linked by residual paths: the
                          input of block 0 (the embeddings) and the output of each block (Sec. 4.1, "blue")
    heads     [(H,)] * L  per block, |softmax(QK^T)V| before the out-projection, averaged within each head
    ffn       [(M,)] * L  per block, |act(fc1 x)|, the FFN hidden neurons ("yellow"), ranked per layer
    ratio     [float] * L per block, ||f(x)|| / ||x + f(x)||: small in the middle blocks (Sec. 3, Fig. 2)."""
    blocks = tower.blocks
    L, sums, count = len(blocks), {}, [0]
    def add(key, x):  # x (B, N, K): accumulate the sum over batch and tokens, divide by the count at the end
        sums[key] = sums.get(key, 0) + x.detach().float().abs().sum(dim=(0, 1))
    def pre0(m, args):
        count[0] += args[0].shape[0] * args[0].shape[1]
        add("embed", args[0])

    hooks = [blocks[0].register_forward_pre_hook(pre0)]
    for i, blk in enumerate(blocks):
        def out_hook(m, args, y, i=i):
            add(("res", i), y)
            f, nrm = (y - args[0]).float().norm(dim=-1), y.float().norm(dim=-1)  # (B, N) each
            sums[("ratio", i)] = sums.get(("ratio", i), 0) + (f / nrm.clamp_min(1e-12)).sum()
        hooks += [blk.register_forward_hook(out_hook),
                  blk.attn.proj.register_forward_pre_hook(lambda m, a, i=i: add(("heads", i), a[0])),
                  blk.mlp.fc2.register_forward_pre_hook(lambda m, a, i=i: add(("ffn", i), a[0]))]
    try:
        for b in batches:
            run(b)
    finally:
        for h in hooks:
            h.remove()
    if not count[0]:
        C.fail("no calibration samples were read: check --data")
    n = count[0]
    sums = {k: v.cpu() for k, v in sums.items()}  # scores index the parent's CPU state dict, also after a GPU pass
    H = [blk.attn.heads for blk in blocks]
    return {"residual": (sums["embed"] + sum(sums[("res", i)] for i in range(L))) / n,
            "heads": [(sums[("heads", i)] / n).view(H[i], -1).mean(dim=1) for i in range(L)],  # (H, Dh) -> (H,)
            "ffn": [sums[("ffn", i)] / n for i in range(L)], "ratio": [float(sums[("ratio", i)] / n) for i in range(L)]}

# ---- Selection: one residual index set, whole heads, FFN neurons per layer, blocks from the middle ---------
def top(score: torch.Tensor, k: int, reorder: bool = True) -> torch.Tensor:
    """The k most important indices, most important first (re-ordering, then slicing the leading block);
    without re-ordering, the first k (the ablation of Fig. 14)."""
    if k > len(score):
        raise ValueError(f"cannot keep {k} of {len(score)}")
    return torch.argsort(score, descending=True, stable=True)[:k] if reorder else torch.arange(k)

def keep_blocks(n: int, n_keep: int) -> list[int]:
    """Sec. 4.2: drop n - n_keep blocks from the middle, keeping the first ceil(n_keep/2) and the last
    floor(n_keep/2) (Fig. 2: the middle blocks are closest to the identity)."""
    if not 1 <= n_keep <= n:
        raise ValueError(f"cannot keep {n_keep} of {n} blocks (depth can only shrink here)")
    return list(range((n_keep + 1) // 2)) + list(range(n - n_keep // 2, n))

def select(scores: dict, width: int, heads: int, mlp: int, depth: int, reorder: bool = True) -> dict:
    """Index sets of the destination, from the parent's scores: `residual` (width,), shared by all layers;
    `blocks`, the kept parent blocks; per kept block the kept `heads` and `ffn` neurons."""
    kept = keep_blocks(len(scores["heads"]), depth)
    return {"residual": top(scores["residual"], width, reorder), "blocks": kept,
            "heads": [top(scores["heads"][i], heads, reorder) for i in kept],
            "ffn": [top(scores["ffn"][i], mlp, reorder) for i in kept]}

# ---- Slicing and weight scaling (Sec. 4.1) -----------------------------------------------------------------
def take(w: torch.Tensor, rows=None, cols=None, scale: bool = True) -> torch.Tensor:
    """w[rows][:, cols] for a weight used as x @ w.T (nn.Linear: rows = outputs, cols = inputs). A matrix
    whose inputs are subsampled is multiplied by sqrt(n_in / n_in') (Sec. 4.1): with i.i.d. inputs an output
    neuron's std grows with sqrt(fan-in), so this keeps the parent's output statistics; it is the paper's
    sqrt(d / d') when every width shrinks by d / d'. Vectors (norms, biases) are never scaled."""
    if rows is not None:
        w = w[rows]
    if cols is not None:
        n_in = w.shape[1]
        w = w[:, cols] * (math.sqrt(n_in / len(cols)) if scale else 1.0)
    return w.clone()

def subclone_block(p: dict, res, heads, ffn, head_dim: int, scale: bool = True) -> dict:
    """One pre-norm block's tensors (common.Block names, prefix stripped) restricted to the residual neurons
    `res`, the whole heads `heads` and the FFN neurons `ffn`. The fused qkv rows are [q; k; v], each head-major,
    so a head's rows are sliced inside each of the three parts; the out-projection's input columns follow."""
    D = p["attn.qkv.weight"].shape[1]  # the parent's attention inner width = residual width
    in_heads = torch.cat([h * head_dim + torch.arange(head_dim) for h in heads.tolist()])  # (h' Dh,)
    qkv_rows = torch.cat([j * D + in_heads for j in range(3)])  # (3 h' Dh,)
    # q and k are both scaled by sqrt(D / d'), so the logits q.k / sqrt(Dh) are (D / d') x those of the plain
    # slice; under the i.i.d. reading of Sec. 4.1 that restores the parent's logit scale (the paper is silent).
    t = lambda k, rows, cols: take(p[f"{k}.weight"], rows, cols, scale)  # index tensors copy: no memory is shared
    return {"norm1.weight": p["norm1.weight"][res], "norm1.bias": p["norm1.bias"][res],
            "attn.qkv.weight": t("attn.qkv", qkv_rows, res), "attn.qkv.bias": p["attn.qkv.bias"][qkv_rows],
            "attn.proj.weight": t("attn.proj", res, in_heads), "attn.proj.bias": p["attn.proj.bias"][res],
            "norm2.weight": p["norm2.weight"][res], "norm2.bias": p["norm2.bias"][res],
            "mlp.fc1.weight": t("mlp.fc1", ffn, res), "mlp.fc1.bias": p["mlp.fc1.bias"][ffn],
            "mlp.fc2.weight": t("mlp.fc2", res, ffn), "mlp.fc2.bias": p["mlp.fc2.bias"][res]}

def subclone_tower(sd: dict, idx: dict, head_dim: int, scale: bool = True) -> dict:
    """A tower's state dict (ViT, text tower or GPT; prefix stripped) restricted to the index sets `idx` of
    `select`. Everything that touches the residual stream uses the same `residual` indices: embeddings
    (columns), cls token, positions, every LayerNorm, the final projection / LM head (input side)."""
    res, out = idx["residual"], {}
    for new, old in enumerate(idx["blocks"]):
        p = {k[len(f"blocks.{old}."):]: v for k, v in sd.items() if k.startswith(f"blocks.{old}.")}
        blk = subclone_block(p, res, idx["heads"][new], idx["ffn"][new], head_dim, scale)
        out.update({f"blocks.{new}.{k}": v for k, v in blk.items()})
    for k, v in sd.items():  # the rest, outside the blocks
        if k.startswith("blocks."):
            continue
        if k.startswith("patch_embed.") or k == "cls_token" or k.startswith("norm"):  # the conv's (D, 3, p, p)
            out[k] = v[res].clone()  # output channels (its fan-in 3 p p is whole) and (D,) vectors: never scaled
        elif k == "head.bias":  # (classes,) of a classifier: the label space is kept
            out[k] = v.clone()
        elif k in ("pos_embed", "token_embed.weight"):  # (N or V, D) lookup tables: columns, no scaling
            out[k] = v[:, res].clone()
        elif k == "proj":  # (D, E), used as x @ proj: the residual side is the input, scaled
            out[k] = take(v.T, None, res, scale).T.contiguous()
        elif k == "head.weight":  # (V, D) LM head
            out[k] = take(v, None, res, scale)
        else:
            raise KeyError(f"subclone_tower does not know how to slice {k}")
    return out

def tower_shape(tower: nn.Module) -> dict:
    blk = tower.blocks[0]
    return {"width": blk.norm1.weight.shape[0], "heads": blk.attn.heads, "mlp": blk.mlp.fc1.weight.shape[0],
            "depth": len(tower.blocks)}

def destination(model: nn.Module, kind: str, arch: dict, cfg: CloneConfig) -> tuple[dict, dict]:
    """The destination's architecture (build kwargs) and each tower's target shape, from --depth/--width/...
    (0 = the parent's). Heads keep their full width (Sec. 4.1), so heads = width / parent head width."""
    shapes, new = {}, dict(arch)
    flags = {"visual." if kind == "clip" else "": (cfg.width, cfg.heads, cfg.mlp, cfg.depth),
             "text.": (cfg.text_width, 0, 0, cfg.text_depth)}
    ratio = None
    for prefix, tower in towers(model).items():
        s = tower_shape(tower)
        width, heads, mlp, depth = flags[prefix]
        width, depth = width or s["width"], depth or s["depth"]
        head_dim = s["width"] // s["heads"]
        if width % head_dim or width > s["width"]:
            C.fail(f"{prefix or 'model '}width {width}: must be <= {s['width']} and a multiple of the parent's "
                   f"head width {head_dim} (heads are kept whole)")
        if heads and heads != width // head_dim:
            C.fail(f"--heads {heads}: width {width} with whole heads of {head_dim} means {width // head_dim} heads")
        if depth > s["depth"]:
            C.fail(f"{prefix or 'model '}depth {depth} > the parent's {s['depth']}")
        ratio = ratio or (mlp / width if mlp else s["mlp"] / s["width"])  # build_clip shares one MLP ratio
        if int(width * ratio) > s["mlp"]:
            C.fail(f"{prefix or 'model '}FFN {int(width * ratio)} > the parent's: the MLP ratio can only shrink")
        shapes[prefix] = dict(width=width, heads=width // head_dim, mlp=int(width * ratio), depth=depth,
                              head_dim=head_dim)
    v, t = shapes["visual." if kind == "clip" else ""], shapes.get("text.")
    new.update(width=v["width"], heads=v["heads"], layers=v["depth"], mlp_ratio=ratio)
    if t:
        new.update(text_width=t["width"], text_heads=t["heads"], text_layers=t["depth"])
    return new, shapes

@torch.no_grad()
def subclone(model: nn.Module, kind: str, arch: dict, scores: dict, cfg: CloneConfig) -> tuple[nn.Module, dict, dict]:
    """Parent + its importance scores (by tower prefix) -> (destination model, its arch, the index sets)."""
    new_arch, shapes = destination(model, kind, arch, cfg)
    sd, out, chosen = model.state_dict(), {}, {}
    for prefix, s in shapes.items():
        idx = chosen[prefix] = select(scores[prefix], s["width"], s["heads"], s["mlp"], s["depth"], cfg.reorder)
        tsd = {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
        out.update({prefix + k: v for k, v in subclone_tower(tsd, idx, s["head_dim"], cfg.scale).items()})
    if kind == "clip":
        out["logit_scale"] = sd["logit_scale"].clone()
    child = build(kind, new_arch)
    C.load_state_dict_checked(child, out, "the subcloned weights")
    return child, new_arch, chosen

# ---- Checkpoints, tokenizer, data --------------------------------------------------------------------------
def model_spec(name: str) -> tuple[str, dict]:
    if name not in MODELS:
        C.fail(f"unknown model '{name}'; choose one of {', '.join(MODELS)}")
    return MODELS[name]["kind"], {k: v for k, v in MODELS[name].items() if k != "kind"}

def read_file(path: str):
    """A checkpoint or state dict (weights_only), or the weights of a TorchScript archive (OpenAI's files)."""
    if not os.path.isfile(path):
        C.fail(f"--init file not found: {path}")
    try:
        return C.read_checkpoint(path)
    except (ValueError, OSError) as e:  # unless a TorchScript archive, which weights_only refuses by name
        if "TorchScript" not in str(e):
            C.fail(f"cannot read --init {path}: {e}")
    try:
        return torch.jit.load(path, map_location="cpu").state_dict()
    except Exception as e:
        C.fail(f"cannot read --init {path} (a TorchScript archive): {type(e).__name__}: {str(e).strip()[:200]}")

SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                      "I64": torch.int64, "I32": torch.int32, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool}

def read_safetensors(path: str) -> dict:
    """A .safetensors file without the package: an 8-byte little-endian header size n, n bytes of JSON
    {name: {"dtype", "shape", "data_offsets": [begin, end]}} (offsets into the data that follows; an optional
    "__metadata__" entry), then the raw little-endian tensors. The tensors are views of one buffer read once."""
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        try:
            header = json.loads(f.read(n))
        except (ValueError, UnicodeDecodeError) as e:
            raise ValueError(f"not a safetensors file (its JSON header: {e})") from None
        data = bytearray(max(0, os.path.getsize(path) - 8 - n))
        f.readinto(data)
    out = {}
    for name, t in ((k, v) for k, v in header.items() if k != "__metadata__"):
        (a, b), dtype = t["data_offsets"], SAFETENSORS_DTYPES.get(t["dtype"])
        if dtype is None or not 0 <= a <= b <= len(data) or b - a != math.prod(t["shape"]) * dtype.itemsize:
            raise ValueError(f"tensor {name}: dtype {t['dtype']}, shape {t['shape']}, offsets {[a, b]} do not fit")
        x = torch.frombuffer(data, dtype=dtype, count=(b - a) // dtype.itemsize, offset=a) if b > a else torch.zeros(0)
        out[name] = x.view(t["shape"])
    return out

# modeling_gpt2.py's names -> GPT's, per block. Conv1D stores (in, out): transposed to nn.Linear's (out, in).
GPT2_NAMES = {"ln_1": "norm1", "attn.c_attn": "attn.qkv", "attn.c_proj": "attn.proj", "ln_2": "norm2",
              "mlp.c_fc": "mlp.fc1", "mlp.c_proj": "mlp.fc2"}

def load_gpt2(path: str) -> tuple[nn.Module, dict]:
    """A Hugging Face GPT-2 directory (config.json + model.safetensors or pytorch_model.bin: gpt2, -medium,
    -large, -xl) as a GPT with the same logits as GPT2LMHeadModel: learned positions (wpe), gelu_new, the
    config's LayerNorm eps, c_attn's [q; k; v] columns (head-major, our qkv rows once transposed), and the
    head tied to the token embedding (wte), copied here so that subcloning scales the head alone."""
    try:
        with open(os.path.join(path, "config.json")) as f:
            cfg = json.load(f)
        file = next(os.path.join(path, f) for f in ("model.safetensors", "pytorch_model.bin")
                    if os.path.isfile(os.path.join(path, f)))
        sd = read_safetensors(file) if file.endswith(".safetensors") else \
            torch.load(file, map_location="cpu", weights_only=True)
    except Exception as e:  # no config.json, no model.safetensors / pytorch_model.bin (StopIteration), a broken file
        C.fail(f"cannot read --init {path} as a Hugging Face GPT-2 folder: {type(e).__name__}: {str(e)[:200]}")
    unsupported = [k for k, v in (("scale_attn_weights", False), ("scale_attn_by_inverse_layer_idx", True),
                                  ("add_cross_attention", True)) if cfg.get(k, not v) == v]
    act = {"gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "gelu": "gelu", "quick_gelu": "quick_gelu"}.get(
        cfg.get("activation_function", "gelu_new"))
    if cfg.get("model_type") != "gpt2" or unsupported or act is None:
        C.fail(f"--init {path}: model_type {cfg.get('model_type')}, activation {cfg.get('activation_function')}, "
               f"{unsupported or 'no other option'}: only GPT-2 (model_type gpt2, standard attention) loads")
    sd = {k.removeprefix("transformer."): v for k, v in sd.items()}
    D, L = cfg["n_embd"], cfg["n_layer"]
    arch = dict(vocab_size=cfg["vocab_size"], context_length=cfg.get("n_positions", cfg.get("n_ctx", 1024)), width=D,
                layers=L, heads=cfg["n_head"], mlp_ratio=(cfg.get("n_inner") or 4 * D) / D, act=act,
                eps=cfg.get("layer_norm_epsilon", 1e-5))
    try:
        head = sd["wte.weight"] if cfg.get("tie_word_embeddings", True) else sd["lm_head.weight"]
        ours = {"token_embed.weight": sd["wte.weight"], "pos_embed": sd["wpe.weight"], "norm.weight": sd["ln_f.weight"],
                "norm.bias": sd["ln_f.bias"], "head.weight": head.clone()}
        for i, (hf, name) in ((i, kv) for i in range(L) for kv in GPT2_NAMES.items()):
            w = sd[f"h.{i}.{hf}.weight"]
            ours[f"blocks.{i}.{name}.weight"], ours[f"blocks.{i}.{name}.bias"] = \
                w if hf.startswith("ln") else w.t(), sd[f"h.{i}.{hf}.bias"]
    except KeyError as e:
        C.fail(f"--init {path}: no tensor {e} (a GPT-2 of {L} blocks has wte, wpe, h.N.*, ln_f)")
    model = GPT(**arch)
    C.load_state_dict_checked(model, {k: v.float() for k, v in ours.items()}, f"--init {path}")
    return model, arch

class GPT2Tokenizer(C.Tokenizer):
    """GPT-2's byte-level BPE from an HF folder's vocab.json + merges.txt: GPT-2's pattern cuts the raw text
    (contractions 's 't 're 've 'm 'll 'd; runs of letters, numbers or other symbols, each with one optional leading
    space; whitespace), a piece's UTF-8 bytes map to printable characters (common's byte table is GPT-2's), and
    common's _bpe merges the lowest-ranked pair until none is a merge. Rows: [sot] + ids + [eot], sot = eot =
    <|endoftext|> (the largest id, split off first), GPT-2's document separator; lm_loss ends a row at its last."""
    def __init__(self, vocab: dict, merges: list, context_length: int = 1024):
        self.encoder, self.merges = dict(vocab), [tuple(m) for m in merges]
        self.decoder, self.ranks = {i: s for s, i in self.encoder.items()}, {m: r for r, m in enumerate(self.merges)}
        self.vocab_size, self.eot_token = len(self.encoder), self.encoder["<|endoftext|>"]
        self.sot_token, self.context_length, self._cache = self.eot_token, context_length, {}
        if "pattern" not in vars(GPT2Tokenizer):  # GPT-2's pre-tokenisation regex, built once per process
            # re has no \p{L} / \p{N}. In str patterns \w is exactly \p{L} | \p{N} | "_" and \d is Nd, so only the
            # numbers that are not digits (Nl, No: Roman numerals, superscripts, fractions) are listed, as ranges x
            # (re tests a class's astral items one by one): letters [^\W\d_x], numbers [\dx]. re's \s also takes
            # U+001C-001F, GPT-2's \s (White_Space) does not: s, S. The one difference left: code points unassigned in
            # Python's Unicode (unicodedata.unidata_version) are symbols here, maybe letters for the regex package.
            n = [c for c in range(0x110000) if chr(c).isnumeric() and not (chr(c).isdecimal() or chr(c).isalpha())]
            x = "".join(f"{chr(a)}-{chr(b)}" for a, b in zip([c for p, c in zip([-2] + n, n) if c != p + 1],
                                                             [c for c, q in zip(n, n[1:] + [-2]) if q != c + 1]))
            s, S = r"[^\S\x1c-\x1f]", r"[\S\x1c-\x1f]"
            GPT2Tokenizer.pattern = re.compile(rf"'s|'t|'re|'ve|'m|'ll|'d| ?[^\W\d_{x}]+| ?[\d{x}]+"
                                               rf"| ?(?:[^\s\w]|[_\x1c-\x1f])+|{s}+(?!{S})|{s}+")
        self.pattern = GPT2Tokenizer.pattern  # also on the instance: pickled to spawned DataLoader workers
    @classmethod
    def read(cls, folder: str) -> GPT2Tokenizer:
        """From vocab.json ({token: id}) and merges.txt ("a b" lines in rank order after a "#version" line)."""
        with open(os.path.join(folder, "vocab.json"), encoding="utf-8") as f:
            vocab, lines = json.load(f), C.read_lines(os.path.join(folder, "merges.txt"))
        return cls(vocab, [ln.split() for ln in lines if not ln.startswith("#version")])
    def _encode_word(self, piece: str) -> list[int]:
        if (ids := self._cache.get(piece)) is None:
            sym = self._bpe([C._byte_table()[b] for b in piece.encode("utf-8")])
            ids = [self.encoder.get(t, self.eot_token) for t in sym]  # eot is also GPT-2's unknown token
            self._cache.update({piece: ids} if len(self._cache) < 1_000_000 else {})
        return ids
    def encode(self, text: str) -> list[int]:
        """Token ids of `text`, without added eot (a literal <|endoftext|> in the text is one)."""
        return [i for k, doc in enumerate(text.split("<|endoftext|>")) for i in [self.eot_token] * (k > 0)
                + [j for p in self.pattern.findall(doc) for j in self._encode_word(p)]]
    def decode(self, ids) -> str:
        """Text of `ids`, as is (invalid UTF-8, e.g. a multi-byte character cut in two, becomes U+FFFD)."""
        byte_of = {c: b for b, c in C._byte_table().items()}
        return bytes(byte_of[c] for i in ids for c in self.decoder[int(i)]).decode("utf-8", errors="replace")

def load_model(path: str, act: str = "gelu") -> tuple[nn.Module, str, dict, list | None]:
    """(model, kind, arch, stored tokenizer or None) from this script's clone / train output, a mobileclip.py ViT
    CLIP checkpoint, an OpenAI/OpenCLIP ViT CLIP state dict, a torchvision/timm ImageNet ViT or an HF GPT-2 folder."""
    if os.path.isdir(path):  # its tokenizer: make_tokenizer reads the folder's vocab.json + merges.txt
        model, arch = load_gpt2(path)
        return model, "gpt", arch, None
    ck = read_file(path)
    if not isinstance(ck, dict):
        C.fail(f"{path} is not a state dict or checkpoint")
    if "kind" in ck and "arch" in ck:  # this script's
        kind, arch = ck["kind"], ck["arch"]
        sd = C.openclip_to_ours(ck["model"]) if ck.get("layout") == "openclip" else ck["model"]
        merges = ck.get("bpe_merges")
    elif "model_name" in ck and "model" in ck:  # mobileclip.py's training checkpoint
        import mobileclip
        if ck["model_name"] not in mobileclip.MODELS:
            C.fail(f"{path} is a '{ck['model_name']}' model: only ViT CLIPs ({', '.join(mobileclip.MODELS)}) subclone")
        kind, sd, merges = "clip", ck["model"], None
        arch = dict(mobileclip.MODELS[ck["model_name"]], vocab_size=ck["vocab_size"],
                    act=ck.get("config", {}).get("act", "gelu"))
    elif {"conv_proj.weight", "patch_embed.proj.weight"} & set(C.unwrap_state_dict(ck)):  # torchvision / timm
        model, sd, arch = vit_classifier(C.unwrap_state_dict(ck))
        kind, merges = "vit", None
    else:  # an OpenAI / OpenCLIP file: the shape is inferred from the tensors
        try:
            shape = C.openclip_config(ck)
        except (ValueError, KeyError) as e:
            C.fail(f"{path}: {e}")
        # heads = width / 64 (80, 88, 104 for H, g, bigG): the file does not store them
        return C.clip_from_openclip(ck, act=act), "clip", dict(shape, act=act), None
    model = build(kind, arch)
    C.load_state_dict_checked(model, sd, f"--init {path}")
    return model, kind, arch, merges

def stored(tok) -> list | dict:
    """A tokenizer as checkpoints keep it ("bpe_merges"): CLIP's merges, or GPT-2's {"vocab", "merges"}."""
    merges = [list(m) for m in tok.merges]
    return {"vocab": tok.encoder, "merges": merges} if isinstance(tok, GPT2Tokenizer) else merges

def make_tokenizer(cfg: Config, merges, shards: str, init: str = ""):
    """--bpe, else a GPT-2 folder's own (--init), else the checkpoint's (`stored`), else bpe.txt beside it
    (mobileclip.py's run directory), else one trained on the captions and saved in --out (rank 0; the others wait)."""
    path = cfg.bpe or (init if init and os.path.isdir(init) else "")
    try:
        if path:
            return GPT2Tokenizer.read(path) if os.path.isdir(path) else C.Tokenizer(path)
    except (OSError, ValueError, KeyError) as e:  # GPT-2's: vocab.json with <|endoftext|>, merges.txt
        C.fail(f"cannot read the tokenizer {path}: {type(e).__name__}: {e}" + " (pass --bpe)" * (path != cfg.bpe))
    if merges:
        return GPT2Tokenizer(**merges) if isinstance(merges, dict) else C.Tokenizer(merges=merges)
    beside = os.path.join(os.path.dirname(os.path.abspath(init)), "bpe.txt") if init else ""
    if beside and os.path.exists(beside):
        return C.Tokenizer(beside)
    if init:
        C.fail(f"{init} stores no tokenizer: pass --bpe (the merges file the parent was trained with)")
    saved = os.path.join(cfg.out, "bpe.txt")
    if not os.path.exists(saved) and C.get_rank() == 0:
        captions, skipped = [], {}
        for path in C.expand_shards(shards):
            for s in C.iter_tar_samples(path, skipped):
                try:
                    captions.append(C.decode_caption(s))
                except Exception:
                    pass
            if len(captions) >= 50000:
                break
        if not captions:
            C.fail(f"no readable caption in --data {shards} to train a BPE on (skipped: {skipped or 'no .txt'}); "
                   f"pass --bpe or check the data")
        os.makedirs(cfg.out, exist_ok=True)
        C.Tokenizer(merges=C.train_bpe(captions, 2048)).save(saved)
    C.barrier()
    return C.Tokenizer(saved)

def resolve_data(cfg: Config, image_size: int) -> tuple[str, str, str]:
    """(train shards, held-out shards, zero-shot ImageFolder): --data, or the synthetic world's (clone has no
    held-out flags: the first is the calibration sample)."""
    val, zs = getattr(cfg, "val_data", ""), getattr(cfg, "zeroshot_data", "")
    for spec in (cfg.data, val):
        try:
            C.expand_shards(spec) if spec else None
        except FileNotFoundError as e:
            C.fail(str(e))
    if zs and not os.path.isdir(zs):
        C.fail(f"--zeroshot-data {zs}: not a folder")
    if cfg.data:
        return cfg.data, val, zs
    cache = cfg.cache_dir or os.path.join(os.path.expanduser("~"), ".cache", "effclip")
    w = C.synthetic_world(cache, cfg.synthetic_train, cfg.synthetic_val, image_size, seed=0)
    return w["train"], val or w["val"], zs or w["val_folder"]

class TextDecode:
    """Sample -> {"ids": (L,)}: the caption alone, for the language model."""
    def __init__(self, tokenizer, context_length: int):
        self.tokenizer, self.context_length = tokenizer, context_length
    def __call__(self, sample):
        return {"ids": self.tokenizer([C.decode_caption(sample)], self.context_length)[0]}

class LabelDecode:
    """Sample -> {"image": uint8 (3, S, S), "label": class}: the class from `.cls` (ImageNet webdataset shards) or
    the `label` of `.json` (the synthetic world). Train: RandomResizedCrop (scale 0.08-1, torchvision's ImageNet
    recipe, design choice); eval: common.eval_transform (shorter side to S, centre crop)."""
    def __init__(self, size: int, train: bool, seed: int = 0):
        self.size, self.train, self.seed = size, train, seed
    def __call__(self, sample):
        label = torch.tensor(int(sample["cls"]) if "cls" in sample else json.loads(sample["json"])["label"])
        if not self.train:
            return {"image": C.eval_transform(C.decode_image(sample), self.size), "label": label}
        img = C.decode_image_tensor(sample)
        box = C.random_resized_crop_box(*C.image_wh(img), C.sample_rng(self.seed, sample), (0.08, 1.0))
        return {"image": C.image_to_uint8(img, self.size, box), "label": label}

def decoder(kind: str, arch: dict, tok, train: bool, seed: int = 0):
    if kind == "vit":
        return LabelDecode(arch["image_size"], train, seed)
    ctx = arch["context_length"]
    return C.ImageTextDecode(tok, arch["image_size"], ctx, train, seed) if kind == "clip" else TextDecode(tok, ctx)

def batch_len(b: dict) -> int:
    return len(b["image"] if "image" in b else b["ids"])

def held_out(shards: str, decode, limit: int, batch: int = 250):
    """The first `limit` samples of `shards`, in order, in batches."""
    n, stream = 0, C.ShardStream(C.expand_shards(shards), decode, min(batch, limit), shuffle_buffer=1, epochs=1,
                                 drop_last=False)
    try:
        for b in stream:
            yield b
            n += batch_len(b)
            if n >= limit:
                break
    except C.DataError as e:  # not one usable sample in the shards
        C.fail(str(e))

# ---- clone: parent -> importance on a small sample -> destination checkpoint -------------------------------
def run_fns(model: nn.Module, kind: str, device) -> dict:
    """How to push a calibration batch through each tower (by prefix)."""
    if kind == "vit":
        return {"": lambda b: model(C.normalize_images(b["image"].to(device), model.mean, model.std))}
    if kind == "clip":
        return {"visual.": lambda b: model.visual(C.normalize_images(b["image"].to(device))),
                "text.": lambda b: model.text(b["ids"].to(device))}
    return {"": lambda b: model(b["ids"].to(device))}

def clone(cfg: CloneConfig):
    """Subclone a parent into a smaller destination: rank its neurons on a data sample, slice, rescale, save.

    Writes one checkpoint (--out FILE.pt, or OUT/subclone.pt) that `train --init` and mobileclip.py read."""
    if not cfg.init:
        C.fail("clone needs --init PARENT (a checkpoint of this script or mobileclip.py, or an OpenCLIP file)")
    for f in ("depth", "width", "heads", "mlp", "text_depth", "text_width"):
        if getattr(cfg, f) < 0:
            C.fail(f"--{f.replace('_', '-')} {getattr(cfg, f)}: must be >= 0 (0 = the parent's)")
    if cfg.calib_samples < 1:
        C.fail(f"--calib-samples {cfg.calib_samples}: must be >= 1")
    _, _, _, device = C.setup_distributed(cfg.device)
    model, kind, arch, merges = load_model(cfg.init, cfg.act)
    if cfg.model:  # a named destination shape sets every flag not given
        dkind, spec = model_spec(cfg.model)
        if dkind != kind:
            C.fail(f"--model {cfg.model} is a {dkind}, the parent a {kind}")
        other = [k for k in ("image_size", "patch", "embed_dim", "context_length", "num_classes")
                 if k in spec and spec[k] != arch[k]]
        if other:
            C.fail(f"--model {cfg.model} differs from the parent in {other[0]} ({spec[other[0]]} vs "
                   f"{arch[other[0]]}): subcloning changes only widths and depths")
        named = dict(width=spec["width"], depth=spec["layers"], heads=spec["heads"],
                     **(dict(text_width=spec["text_width"], text_depth=spec["text_layers"]) if kind == "clip" else {}))
        cfg = dataclasses.replace(cfg, **{k: getattr(cfg, k) or v for k, v in named.items()})
    shards, _, _ = resolve_data(cfg, arch.get("image_size", 64))
    tok = None if kind == "vit" else make_tokenizer(cfg, merges, shards, cfg.init)
    if tok and tok.vocab_size != arch["vocab_size"]:
        C.fail(f"the tokenizer has {tok.vocab_size} tokens, the parent {arch['vocab_size']}: pass the parent's --bpe")
    model.to(device).eval()
    # Sec. 4.1: one pass of the parent over a small sample gives every score.
    batches = list(held_out(shards, decoder(kind, arch, tok, train=False), cfg.calib_samples, 64))
    t0 = time.time()
    scores = {p: importance(tower, run_fns(model, kind, device)[p], batches) for p, tower in towers(model).items()}
    for p, s in scores.items():
        C.print0(f"{p or 'model.'} ||f(x)|| / ||x + f(x)|| per block (Fig. 2):", *(f"{r:.3f}" for r in s["ratio"]))
    child, new_arch, chosen = subclone(model.cpu(), kind, arch, scores, cfg)
    for p, idx in chosen.items():
        C.print0(f"{p or 'model.'} keeps blocks {idx['blocks']} of {len(scores[p]['heads'])}, "
                 f"{len(idx['residual'])} of {len(scores[p]['residual'])} residual neurons")
    sd = C.ours_to_openclip(child.state_dict()) if kind == "clip" else child.state_dict()
    out = cfg.out if cfg.out.endswith(".pt") else os.path.join(cfg.out, "subclone.pt")
    info = {"parent": os.path.abspath(cfg.init), "calib_samples": sum(map(batch_len, batches)),
            "scale": cfg.scale, "reorder": cfg.reorder, "blocks": {p: idx["blocks"] for p, idx in chosen.items()},
            "residual": {p: idx["residual"] for p, idx in chosen.items()}}
    C.save_checkpoint(out, {"model": sd, "layout": "openclip" if kind == "clip" else "ours", "kind": kind,
                            "arch": new_arch, "bpe_merges": tok and stored(tok), "subclone": info})
    n_old, n_new = (sum(p.numel() for p in m.parameters()) for m in (model, child))
    C.print0(f"subcloned {n_old / 1e6:.2f}M -> {n_new / 1e6:.2f}M parameters in {time.time() - t0:.1f}s -> {out}")
    return out

# ---- train: the destination (or any shape of MODELS from random init), CLIP or LM --------------------------
def hyper(cfg: TrainConfig, kind: str, subcloned: bool) -> tuple[float, float]:
    """--lr / --weight-decay, or Table 1's values for this kind and init."""
    lr, wd = TABLE1[(kind, subcloned)]
    return cfg.lr or lr, wd if cfg.weight_decay < 0 else cfg.weight_decay

@torch.no_grad()
def evaluate(model, kind: str, arch: dict, tok, val: str, zs_dir: str, limit: int, device) -> dict:
    """CLIP: zero-shot top-1/top-5 on the ImageFolder, retrieval recall@1/5/10 and the contrastive loss on the
    held-out pairs. GPT: held-out next-token loss and perplexity. ViT classifier: held-out top-1."""
    model.eval()
    metrics = {}
    if kind == "clip" and zs_dir:
        items, names = C.image_folder(zs_dir)
        items = items[:: max(1, len(items) // limit)][:limit]  # a stride: the folder is sorted by class
        clf = C.zeroshot_classifier(model, tok, names, C.DEFAULT_TEMPLATES, device, arch["context_length"])
        metrics.update(C.zeroshot_eval(model, clf, items, arch["image_size"], device))
    if val:
        img, txt, nll, ntok = [], [], 0.0, 0
        for b in held_out(val, decoder(kind, arch, tok, train=False), limit):
            if kind == "vit":
                pred = model(C.normalize_images(b["image"].to(device), arch["mean"], arch["std"])).argmax(dim=-1)
                nll, ntok = nll + (pred.cpu() == b["label"]).sum().item(), ntok + len(pred)  # hits, images
                continue
            ids = b["ids"].to(device)
            if kind == "clip":
                img.append(model.encode_image(C.normalize_images(b["image"].to(device))).float())
                txt.append(model.encode_text(ids).float())
            else:
                n = int(last_eot(ids).sum())
                nll, ntok = nll + lm_loss(model, ids).item() * n, ntok + n
        if kind == "clip":
            img, txt = F.normalize(torch.cat(img), dim=-1), F.normalize(torch.cat(txt), dim=-1)  # (N, E) each
            metrics.update(C.retrieval_eval(img, txt))
            # the CLIP loss over all N held-out pairs at once (chance: log N): smooth where top-1 on a few
            # hundred images is noisy, so small comparisons can rank two inits by it
            scale = model.logit_scale.exp().clamp(max=100.0)
            metrics["val_loss"] = C.contrastive_loss_reference(img, txt, scale).item()
        elif kind == "vit":
            metrics["top1"] = 100 * nll / ntok
        else:
            metrics.update(val_loss=nll / ntok, val_ppl=math.exp(nll / ntok))
    model.train()
    return metrics

def step_loss(model, kind: str, arch: dict, batch: dict, device) -> torch.Tensor:
    """One batch's training loss: CLIP's contrastive loss, the LM's next-token loss, or the classifier's CE."""
    if kind == "gpt":
        return lm_loss(model, batch["ids"].to(device, non_blocking=True))  # ids (B, L)
    x = batch["image"].to(device, non_blocking=True)  # uint8 (B, 3, S, S)
    if kind == "vit":  # logits (B, classes)
        logits = model(C.normalize_images(x, arch["mean"], arch["std"])).float()
        return F.cross_entropy(logits, batch["label"].to(device, non_blocking=True))
    img, txt, scale = model(C.normalize_images(x), batch["ids"].to(device, non_blocking=True))
    return C.contrastive_loss(img, txt, scale)

def train(cfg: TrainConfig, stop: C.StopSignal | None = None) -> str | None:
    """Train a subcloned (--init) or randomly initialised (--model) destination, CLIP or the language model.

    Table 1's learning rate and weight decay for the init unless given; held-out metrics at step 0 and every
    --eval-every steps in log.jsonl; SIGTERM saves a checkpoint, --resume auto continues."""
    stop = stop or C.StopSignal()  # from here on SIGTERM / SIGINT save at the current step and exit 0
    rank, local_rank, world, device = C.setup_distributed(cfg.device)
    for flag in ("steps", "eval_max"):
        if getattr(cfg, flag) < 1:
            C.fail(f"--{flag.replace('_', '-')} {getattr(cfg, flag)}: must be >= 1")
    torch.manual_seed(cfg.seed)  # the same random init on every rank and in every run
    C.document_run(cfg.out, cfg, [__file__, C.__file__])
    log = C.RunLog(cfg.out)

    # ---- model: resumed, subcloned (--init) or random (--model) ----------------------------------
    ckpt = C.load_checkpoint(cfg.resume, cfg.out)
    merges, init = None, cfg.init
    if ckpt is not None:
        if not {"kind", "arch", "bpe_merges", "subcloned", "optimizer", "step"} <= set(ckpt):
            C.fail(f"--resume {cfg.resume}: not a checkpoint of `subclone.py train` (keys {sorted(ckpt)[:6]})")
        kind, arch, merges, subcloned = ckpt["kind"], ckpt["arch"], ckpt["bpe_merges"], ckpt["subcloned"]
        model = build(kind, arch)
        C.load_state_dict_checked(model, ckpt["model"], f"checkpoint {cfg.resume}")
    elif cfg.init:
        model, kind, arch, merges = load_model(cfg.init, cfg.act)
        subcloned = True
    else:
        kind, arch = model_spec(cfg.model or "small")
        subcloned = False
    shards, val, zs_dir = resolve_data(cfg, arch.get("image_size", 64))
    tok = None if kind == "vit" else make_tokenizer(cfg, merges, shards, init if ckpt is None else "")
    if ckpt is None and not cfg.init:
        arch = dict(arch, vocab_size=tok.vocab_size) if tok else arch
        model = build(kind, arch)
    if tok and tok.vocab_size != arch["vocab_size"]:
        C.fail(f"the tokenizer has {tok.vocab_size} tokens, the model {arch['vocab_size']}: pass the matching --bpe")
    model.to(device)
    lr, wd = hyper(cfg, kind, subcloned)
    C.print0(f"{kind} {json.dumps(arch)}: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters, "
             f"{'subcloned' if subcloned else 'random'} init, lr {lr:g}, weight decay {wd:g}")
    opt = C.make_adamw(model, lr, wd, betas=(0.9, cfg.beta2))
    start, data_pos = 0, {}
    if ckpt is not None:
        opt.load_state_dict(ckpt["optimizer"])
        C.set_rng_state(ckpt["rng"])
        start = ckpt["step"]
        if len(ckpt["data"]) == world and len(ckpt["data"].get(rank, {})) == max(1, cfg.workers):
            data_pos = ckpt["data"][rank]
        C.print0(f"resumed from step {start} of {cfg.resume}")
        if start > cfg.steps:
            C.fail(f"the checkpoint is at step {start}, past --steps {cfg.steps}")

    # ---- data -----------------------------------------------------------------------------------
    stream = C.ShardStream(C.expand_shards(shards), decoder(kind, arch, tok, True, cfg.seed), cfg.batch_size,
                           rank, world, cfg.seed, cfg.shuffle_buffer, data_pos, start)
    batches = iter(C.make_loader(stream, cfg.workers, device.type == "cuda"))
    position = C.DataPosition()
    position.pos = {int(w): p for w, p in data_pos.items()}

    train_model = DDP(model, device_ids=[local_rank] if device.type == "cuda" else None) if world > 1 else model
    bf16 = cfg.precision == "bf16" or (cfg.precision == "auto" and device.type == "cuda")
    t0, seen = time.time(), 0
    nonfinite = torch.zeros((), dtype=torch.bool, device=device)
    for step in C.progress(range(start, cfg.steps + 1), "train"):
        last_step = step == cfg.steps
        stopping = stop.requested if world == 1 else (step % cfg.log_every == 0 and stop.agreed(device))

        # ---- evaluate (also at step 0: where each init starts) ------------------------------------
        if last_step or (cfg.eval_every and step % cfg.eval_every == 0 and (step > start or step == 0)):
            if rank == 0:
                log.log(step, **evaluate(model, kind, arch, tok, val, zs_dir, cfg.eval_max, device))
            C.barrier()

        # ---- checkpoint (the format load_model reads, so a trained model can be a parent) ---------
        if (last_step or stopping or step % cfg.ckpt_every == 0) and step > start:
            if nonfinite.item():
                C.fail(f"non-finite loss before step {step}; the last good checkpoint in {cfg.out} is kept")
            C.save_checkpoint(os.path.join(cfg.out, f"ckpt-{step}.pt"), {
                "model": model.state_dict(), "layout": "ours", "kind": kind, "arch": arch, "subcloned": subcloned,
                "bpe_merges": tok and stored(tok), "optimizer": opt.state_dict(), "step": step,
                "rng": C.rng_state(), "data": position.state(), "config": dataclasses.asdict(cfg)})
            C.prune_checkpoints(cfg.out, cfg.keep_ckpts, written=os.path.join(cfg.out, f"ckpt-{step}.pt"))
        if last_step or stopping:
            break

        # ---- forward, backward, step --------------------------------------------------------------
        batch = next(batches)
        position.update(batch)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            loss = step_loss(train_model, kind, arch, batch, device)
        loss.backward()
        gnorm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip or float("inf"))
        C.set_lr(opt, C.lr_at(step, lr, cfg.warmup, cfg.steps))
        opt.step()
        opt.zero_grad(set_to_none=True)
        nonfinite |= ~torch.isfinite(loss.detach())
        seen += batch_len(batch)

        # ---- log (the only host sync) ---------------------------------------------------------------
        if (step + 1) % cfg.log_every == 0:
            if nonfinite.item():
                C.fail(f"non-finite loss at step {step}; the last good checkpoint in {cfg.out} is kept")
            log.log(step + 1, loss=loss.item(), lr=opt.param_groups[0]["lr"], grad_norm=gnorm.item(),
                    samples_per_s=seen * world / (time.time() - t0))
            t0, seen = time.time(), 0
    C.cleanup_distributed()
    final = os.path.join(cfg.out, f"ckpt-{step}.pt")
    if not last_step:
        C.print0(f"stopped at step {step}" + (f", checkpoint {final}" if step > start else "")
                 + "; run again with --resume auto to continue")
        return None
    C.finish_run(cfg.out, final)
    return final

# ---- compare: train a parent, subclone it, train the destination from subcloned and from random init -------
def read_log(out: str) -> list[dict]:
    """The step records of OUT/log.jsonl (each invocation's start record has no step)."""
    with open(os.path.join(out, "log.jsonl")) as f:
        return [r for r in map(json.loads, f) if "step" in r]

def steps_to_target(log: list[dict], metric: str, target: float, higher: bool = True) -> int | None:
    """The first evaluated step at which `metric` reaches the fixed `target` (>= it, or <= it for losses and
    perplexities), None if never: the paper's "steps (epochs, tokens) to 70% top-1 / perplexity 12"."""
    reached = (lambda v: v >= target) if higher else (lambda v: v <= target)
    return next((r["step"] for r in log if metric in r and reached(r[metric])), None)

def speedup(sub: list[dict], rnd: list[dict], metric: str, target: float | None = None, higher: bool = True) -> dict:
    """Steps of each init to `target` (default: the random init's final value) and their ratio, random /
    subcloned (the paper's "4x faster", Figs. 1, 9, 10); inf when the subclone starts at the target."""
    target = [r[metric] for r in rnd if metric in r][-1] if target is None else target
    r_steps, s_steps = steps_to_target(rnd, metric, target, higher), steps_to_target(sub, metric, target, higher)
    ratio = None if None in (r_steps, s_steps) else r_steps / s_steps if s_steps else float("inf")
    return {"metric": metric, "target": target, "random_steps": r_steps, "subcloned_steps": s_steps, "speedup": ratio}

def compare(cfg: CompareConfig):
    """Sec. 5: train a parent, subclone it, train the destination from the subclone and from random init.

    Each training with its Table 1 lr / wd, in OUT/parent, OUT/subcloned, OUT/random; every stage resumes (run the
    same command again to continue); the curves side by side and the speed-ups in OUT/compare.json."""
    stop = C.StopSignal()  # one for every stage: a signal in any of them stops the comparison
    if cfg.kind not in TARGETS:
        C.fail(f"--kind {cfg.kind}: must be clip, gpt or vit")
    if cfg.parent_steps < 1:
        C.fail(f"--parent-steps {cfg.parent_steps}: must be >= 1")
    if cfg.parent and not os.path.exists(cfg.parent):
        C.fail(f"--parent {cfg.parent}: not found")
    C.claim_out(cfg.out, resume="auto")  # the stages claim their own sub-folders
    pair = {"clip": ("small_parent", "small"), "gpt": ("gpt_parent", "gpt_tiny"),
            "vit": ("vit_b16_in1k", "vit_b16_in1k_half")}[cfg.kind]
    child = cfg.model or pair[1]
    dkind, spec = model_spec(child)
    if dkind != cfg.kind:
        C.fail(f"--model {child} is a {dkind}, not --kind {cfg.kind}")
    metric, target = TARGETS[cfg.kind][0], cfg.target or TARGETS[cfg.kind][1]
    higher = not metric.startswith("val_")
    C.print0(f"fixed target, set before the run: {metric} {'>=' if higher else '<='} {target:g}")
    run = lambda name, **kw: dataclasses.replace(cfg, out=os.path.join(cfg.out, name), resume="auto", **kw)
    parent = run("parent", model=cfg.parent_model or pair[0], init="",
                 steps=cfg.parent_steps, lr=cfg.parent_lr or cfg.lr)
    big = cfg.parent or os.path.join(parent.out, f"ckpt-{parent.steps}.pt")
    if not os.path.exists(big) and train(parent, stop) is None:
        return None
    small = clone(dataclasses.replace(cfg, init=big, model=child, out=os.path.join(cfg.out, "subclone.pt")))
    bpe = cfg.bpe or (big if os.path.isdir(big) else os.path.join(os.path.dirname(big), "bpe.txt"))  # the parent's
    stages = {"subcloned": run("subcloned", init=small, model=child),
              "random": run("random", init="", model=child, bpe=bpe)}
    tuned = f"random_lr{cfg.random_lr:g}"  # a baseline with a tuned LR, not Table 1's: is the gap the init or the LR?
    stages.update({tuned: run(tuned, init="", model=child, bpe=bpe, lr=cfg.random_lr)} if cfg.random_lr else {})
    for stage in stages.values():  # a stage whose last checkpoint exists was done in an earlier call
        if not os.path.exists(os.path.join(stage.out, f"ckpt-{stage.steps}.pt")) and train(stage, stop) is None:
            return None
    logs = {name: read_log(st.out) for name, st in stages.items()}
    metrics = (["zeroshot_top1", "retrieval_i2t_r1", "retrieval_t2i_r1", "retrieval_i2t_r10", "retrieval_t2i_r10",
                "val_loss"] if cfg.kind == "clip" else [metric])
    names = list(logs)
    C.print0("step | " + " | ".join(f"{m}: {' / '.join(names)}" for m in metrics))
    for step in [r["step"] for r in logs["subcloned"] if metrics[0] in r]:
        row = {n: next((r for r in logs[n] if r["step"] == step and metrics[0] in r), {}) for n in names}
        C.print0(f"{step} | " + " | ".join(" / ".join(f"{row[n].get(m, float('nan')):.2f}" for n in names)
                                           for m in metrics))
    # the fixed target first (the paper's measure), then each metric's final value of each random baseline
    result = [dict(speedup(logs["subcloned"], logs[n], metric, target, higher), baseline=n, fixed=True)
              for n in names[1:]]
    result += [dict(speedup(logs["subcloned"], logs[n], m, higher=not m.startswith("val_")), baseline=n, fixed=False)
               for n in names[1:] for m in metrics]
    for s in result:
        x = "not reached by both" if s["speedup"] is None else f"speed-up {s['speedup']:.2f}x"
        C.print0(f"{'fixed target' if s['fixed'] else 'final value of ' + s['baseline']} {s['metric']} "
                 f"{s['target']:.2f}: reached by {s['baseline']} at step {s['random_steps']}, by subcloned at step "
                 f"{s['subcloned_steps']} ({x})")
    with open(os.path.join(cfg.out, "compare.json"), "w") as f:
        json.dump(result, f, indent=1)
    C.print0(f"results: {os.path.join(cfg.out, 'compare.json')} | runs {cfg.out}/{{parent,{','.join(stages)}}} "
             f"(log.jsonl, checkpoints) | subclone {small}")
    return result

def main(argv=None):
    commands = {"clone": (clone, CloneConfig), "train": (train, TrainConfig), "compare": (compare, CompareConfig)}
    return C.run_command(__doc__, commands, argv)

if __name__ == "__main__":
    main()
