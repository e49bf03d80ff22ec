"""Reinforce Data, Multiply Impact: Improved Model Accuracy and Robustness with Dataset Reinforcement
(arXiv 2303.08983, Faghri et al., Apple, ICCV 2023).

A dataset is reinforced once, offline: for every training image, NS random augmentations are drawn, a strong
teacher ensemble classifies each augmented view, and only the augmentation parameters and the teacher's top-k
class probabilities are stored. A student then trains with no teacher: it reloads the image, replays one stored
augmentation exactly and regresses onto the stored soft label (KL), so a step costs what an ERM step costs.

What is here: `reinforce` (the paper's four variants, the ensemble mean of softmax, fixed-size records: one .npy
(images, NS) per part, 55 B per +RA/RE augmentation at k = 10 against ml-dr's ~73; ranks share the parts, resumable
by part; generation applies the decoded record, so replay is exact) and `train`: on a reinforcement in this layout
or ml-dr's released one (ImageNet+, CIFAR-100+, Flowers-102+, Food-101+) replayed bit-identically to its
dr/transforms.py, or without one ml-dr's ERM baseline (and teachers); ml-dr's recipe. Models: torchvision's ResNets
(zero-initialised residual BNs), resnet_tiny/small (32 px stem), common.ViT + linear head, any torchvision
classifier. Left out: timm's IG-ResNeXt teachers, CVNets recipes, "zeros" densification, several reinforcements at
once. CIFAR-100+, Food-101+, Flowers-102+: write torchvision's train split, in its order, to tar shards (image +
`cls`, common.write_shard; Food-101's JPEG bytes as they are) and pass them as --data.

Paper -> code:
  variants RRC / +M* / +RA/RE / +M*+R* (spec 3.1); replay (4.4)  -> VARIANTS, draw_sample; apply_sample, MLDRStore
  compressed record (spec 4.4)                                   -> record_dtype, encode_sample, decode_sample
  teacher ensemble, mean of softmax(z / T), T = 1 (spec 2.1)      -> load_teachers, teacher_probs
  top-k storage, index = dataset position (spec 4.1)             -> reinforce, Data; ml-dr's files: read_pth
  "smooth" densification (spec 4.2); KL, batchmean (spec 3.2)    -> densify; kl_loss (fast), kl_loss_reference
  p = 0.99 reinforced, else ERM + one-hot (spec 3.2)             -> TrainImages
  ERM baseline: erm.yaml, CE + label smoothing 0.1 (spec 3.3)    -> TrainImages.standard, batch_mix
  SGD + Nesterov, decay on all, warm-up + cosine (spec 3.3)      -> make_optimizer, common.lr_at

Commands:
  torchrun --nproc_per_node=8 reinforce.py reinforce --data imagenet/train --image-size 224 \\
      --teachers resnet50=resnet50-11ad3fa6.pth,runs/my_teacher --num-samples 400 --topk 10 --out imagenet_plus
  # ImageNet+ (ml-dr's reinforced_data/ or a --out), every plus.yaml flag (8 x 128 = 1024); no --reinforced: erm.yaml
  torchrun --nproc_per_node=8 reinforce.py train --data imagenet/train --val-data imagenet/val --model resnet50 \\
      --image-size 224 --epochs 150 --batch-size 128 --lr 0.4 --momentum 0.9 --nesterov --weight-decay 1e-4 \\
      --decay-all --warmup-epochs 5 --label-smoothing 0.1 --aug erm --reinforce-p 0.99 --reinforced reinforced_data
  # CPU, the synthetic world (4000 images, 32 px): a teacher, its reinforcement, student vs ERM baseline
  python reinforce.py train --synthetic-train 12000 --epochs 15 --out runs/rf_teacher  # sees 3x the data
  python reinforce.py reinforce --teachers runs/rf_teacher --num-samples 20 --variant cropflip --out runs/rf_data
  python reinforce.py train --reinforced runs/rf_data --aug cropflip --epochs 20 --out runs/rf_student
  python reinforce.py train --aug cropflip --epochs 20 --out runs/rf_erm

Result (tests/test_reinforce.py's payoff, 4-class world, resnet_tiny at 16 px, 80 images, 60 epochs, 2-core CPU):
reinforced (crop + flip) beats ml-dr's ERM by +14.3/+25.3/+32.3 points over seeds 0-2. README: curves, more runs.
"""
from __future__ import annotations

import dataclasses
import glob
import io
import json
import math
import os
import random
import sys
import tarfile
import time
import zipfile
import zlib
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision
import torchvision.transforms.functional as TF
from PIL import Image
from torch.nn.parallel import DistributedDataParallel as DDP
from torchvision.models.resnet import BasicBlock, ResNet

import common as C

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)

@dataclass
class Shared:
    """Flags of both commands: the data, the synthetic world and the machine."""
    data: str = ""  # ImageFolder (one folder per class) or uncompressed tar shards with `cls` (or json label); empty = the synthetic world
    classnames: str = ""  # file, one class name per line, in label order (maps a json 'classname' to its label)
    seed: int = 0  # augmentation draws, data order, model init
    workers: int = 2  # DataLoader worker processes per rank
    device: str = "auto"  # auto | cuda | cpu
    precision: str = "auto"  # auto (bf16 autocast on GPU, fp32 on CPU) | bf16 | fp32
    cache_dir: str = ""  # where the synthetic world is generated (default ~/.cache/effclip)
    synthetic_train: int = 4000  # synthetic training images
    synthetic_val: int = 500  # synthetic held-out images (the evaluation ImageFolder)
    synthetic_size: int = 32  # synthetic image size in pixels

@dataclass
class ReinforceConfig(Shared):
    teachers: str = ""  # comma-separated: a `reinforce.py train` checkpoint or run dir, or ARCH=WEIGHTS (a torchvision state dict)
    out: str = "runs/reinforced"  # output folder: meta.json and part-NNNNN.npy
    num_samples: int = 20  # NS, augmentations stored per image (paper: 400 ImageNet+, 800 CIFAR-100+)
    topk: int = 10  # k, teacher probabilities kept per augmentation (paper: 10)
    variant: str = "randaug"  # cropflip | mixing | randaug | randaug_mixing (spec 3.1; the paper recommends randaug)
    image_size: int = 0  # size of the stored views; 0 = the first `reinforce.py train` teacher's size, else 224
    min_scale: float = 0.08  # smallest area fraction of the RandomResizedCrop (torchvision's default)
    mix_pool: int = 4  # MixUp/CutMix partners: this many images drawn uniformly per image (spec: its loader batch)
    batch_size: int = 256  # views per teacher forward
    part_size: int = 1000  # images per output file (the unit of resume and of rank splitting)
    temperature: float = 1.0  # the ensemble averages softmax(logits / T) (paper: 1)

@dataclass
class TrainConfig(Shared):
    reinforced: str = ""  # `reinforce`'s --out, or ml-dr's reinforced_data/ (config.pth.tar, {i}.pth.tar); empty = ERM
    val_data: str = ""  # ImageFolder for top-1; empty = the synthetic held-out set (none with --data: no eval)
    model: str = "resnet_tiny"  # a name from MODELS or any torchvision classification model
    num_classes: int = 0  # 0 = from the data
    image_size: int = 0  # 0 = the reinforced views' size, else the synthetic size, else the model's
    out: str = "runs/reinforce_train"  # run directory: config.json, log.jsonl, checkpoints, code copies
    epochs: int = 20  # passes over the data (paper: 150-1000)
    batch_size: int = 128  # per process (paper: 1024 over 8 GPUs)
    optimizer: str = "sgd"  # sgd (ml-dr's recipe) | adamw (ViTs)
    lr: float = 0.2  # peak learning rate (ml-dr ImageNet: 0.4 at batch 1024)
    momentum: float = 0.9  # SGD momentum
    nesterov: bool = True  # Nesterov momentum (ml-dr train.py's default, its ImageNet configs; CIFAR-100: off)
    weight_decay: float = 1e-4  # (configs/imagenet/erm.yaml and plus.yaml; CIFAR-100: 5e-4)
    decay_all: bool = True  # decay on every parameter, as ml-dr's configs; --no-decay-all: none on 1-D ones (biases, norms)
    warmup_epochs: float = 5.0  # linear warm-up, then cosine to 0 per step (configs/imagenet: 5; CIFAR-100: 0)
    label_smoothing: float = 0.1  # plain training only (paper ERM: 0.1; the reinforced loss ignores it)
    reinforce_p: float = 0.99  # probability of a stored sample; else the original image + --aug (no batch mixing), one-hot
    aug: str = "erm"  # plain training's augmentation: erm (ml-dr's erm.yaml) or a variant (mixing ones mix the labels)
    min_scale: float = 0.08  # smallest area fraction of the crop in plain training
    grad_clip: float = 0.0  # global gradient-norm clip; 0 = off
    eval_every: int = 0  # epochs between evaluations; 0 = at the end only
    ckpt_every: int = 500  # steps between checkpoints
    keep_ckpts: int = 2  # newest checkpoints kept in --out
    resume: str = ""  # 'auto' = the newest checkpoint in --out that reads (fresh if none), or a checkpoint path
    overwrite: bool = False  # start over in an --out that holds another run's checkpoints (they move to OUT/previous-N/)
    log_every: int = 50  # steps between log lines (the only host syncs of the loop)

# Torchvision's ResNets, the last BN of each residual block starting at zero (zero_init_residual, Goyal et al.
# 2017): every block begins as the identity, which helps short runs from scratch. `widths` entries are
# torchvision's ResNet with BasicBlocks at those widths and a 3x3 stride-1 stem without max-pool, so that 32 px
# images do not shrink to 1x1. ViTs: common.ViT plus a linear head. Any other name: a torchvision classifier.
MODELS = {
    **{f"resnet{d}": dict(torchvision=dict(zero_init_residual=True), image_size=224) for d in (18, 34, 50, 101)},
    "resnet_tiny": dict(layers=(1, 1, 1, 1), widths=(16, 32, 64, 128), image_size=32),
    "resnet_small": dict(layers=(2, 2, 2, 2), widths=(32, 64, 128, 256), image_size=32),
    **{f"vit_{n}": dict(vit=True, image_size=224, patch=16, width=w, layers=12, heads=w // 64)  # tiny: DeiT-Ti
       for n, w in (("tiny", 192), ("small", 384), ("base", 768))},
    "vit_cpu": dict(vit=True, image_size=32, patch=4, width=128, layers=4, heads=4),
}

# ==== 1. Models: torchvision's ResNets (and a small-image variant), ViT classifier, torchvision by name ======
def small_resnet(layers, widths, num_classes: int) -> nn.Module:
    """torchvision's ResNet (He et al. 2016) with BasicBlocks of `widths` channels and a 3x3 stride-1 stem
    without max-pool: torchvision's module names and forward, its initialisation redone for the new modules."""
    m = ResNet(BasicBlock, list(layers), num_classes)
    m.conv1, m.bn1, m.maxpool = nn.Conv2d(3, widths[0], 3, 1, 1, bias=False), nn.BatchNorm2d(widths[0]), nn.Identity()
    m.inplanes = widths[0]  # _make_layer reads the input width from here and advances it
    for s, (n, w) in enumerate(zip(layers, widths)):
        setattr(m, f"layer{s + 1}", m._make_layer(BasicBlock, w, n, stride=1 if s == 0 else 2))
    m.fc = nn.Linear(widths[-1], num_classes)
    for mod in m.modules():  # as torchvision's ResNet(zero_init_residual=True); new BNs are already 1 and 0
        if isinstance(mod, nn.Conv2d):
            nn.init.kaiming_normal_(mod.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(mod, BasicBlock):
            nn.init.zeros_(mod.bn2.weight)
    return m

class ViTClassifier(nn.Module):
    """common.ViT without its CLIP projection, a linear head on the class token."""

    def __init__(self, num_classes: int, image_size: int, patch: int, width: int, layers: int, heads: int, **_):
        super().__init__()
        self.visual = C.ViT(image_size, patch, width, layers, heads, embed_dim=width)
        self.visual.proj = None
        self.head = nn.Linear(width, num_classes)

    def forward(self, x):
        return self.head(self.visual.forward_tokens(x)[:, 0])  # (B, classes)

def build_model(name: str, num_classes: int, image_size: int = 0) -> nn.Module:
    """A classifier by name: a MODELS entry, else any torchvision classification model."""
    spec = dict(MODELS.get(name, {}))
    spec["image_size"] = image_size or spec.get("image_size", 224)
    if spec.get("vit"):
        if spec["image_size"] % spec["patch"]:
            C.fail(f"--image-size {spec['image_size']} is not a multiple of the patch size {spec['patch']}")
        return ViTClassifier(num_classes=num_classes, **spec)
    if "widths" in spec:
        return small_resnet(spec["layers"], spec["widths"], num_classes)
    if name not in torchvision.models.list_models(module=torchvision.models):
        C.fail(f"unknown model '{name}': neither in MODELS ({', '.join(MODELS)}) nor a torchvision classifier")
    return torchvision.models.get_model(name, num_classes=num_classes, **spec.get("torchvision", {}))


# ==== 2. Data: an image per index, in the order the reinforcement is stored (spec 4.1) =======================
class Data:
    """Images by position: an ImageFolder in torchvision's order (the published sets'), or tar shards' samples in
    shard order, read by seek. A reinforcement is valid for that order only: `fingerprint` ties the two."""

    def __init__(self, items: list, labels: list[int], classnames: list[str]):
        self.items, self.labels, self.classnames, self.num_classes = items, labels, classnames, len(classnames)
        names = "\n".join(f"{os.path.basename(s) if isinstance(s, str) else f'{os.path.basename(s[0])}@{s[1]}'}"
                          f":{y}" for s, y in zip(items, labels))
        self.fingerprint = f"{len(items)}-{zlib.crc32(names.encode()):08x}"

    def __len__(self):
        return len(self.items)

    def load(self, i: int) -> Image.Image:
        src = self.items[i]
        if isinstance(src, str):
            return Image.open(src).convert("RGB")
        with open(src[0], "rb") as f:  # (shard, offset, size): one seek, one read
            f.seek(src[1])
            return Image.open(io.BytesIO(f.read(src[2]))).convert("RGB")

def tar_labels(path: str, skipped: dict) -> tuple[list, list]:
    """[(path, offset, size)] of each sample's image and its label: `cls` (int), else the json's 'classname' (str,
    mapped by load_data), else its 'label'; samples without both are left out. An empty, unreadable or cut-off tar
    is counted in `skipped` by reason (a cut-off one keeps the whole samples before the cut)."""
    items, labels, sample = [], [], {}

    def flush():
        img = next((sample[e] for e in C.IMAGE_EXTS if e in sample), None)
        try:
            meta = {"label": sample["cls"].decode().strip()} if "cls" in sample else json.loads(sample["json"])
            y = str(meta["classname"]) if "classname" in meta else int(meta["label"])
        except (KeyError, ValueError):
            return
        if img is not None:
            items.append(img)
            labels.append(y)

    if os.path.getsize(path) == 0:
        skipped["empty shard"] = skipped.get("empty shard", 0) + 1
        return items, labels
    try:
        with tarfile.open(path, "r:") as tar:  # uncompressed only: training reads images back by offset
            key = None
            for m in tar:
                if not m.isfile():
                    continue
                d, base = os.path.split(m.name)
                k, _, suffix = base.partition(".")
                if os.path.join(d, k) != key and sample:
                    flush()
                    sample = {}
                key = os.path.join(d, k)
                small = suffix in ("cls", "json")
                sample[suffix] = tar.extractfile(m).read() if small else (path, m.offset_data, m.size)
    except (tarfile.TarError, EOFError, OSError) as e:  # not a plain tar, or cut off: the last sample may be partial
        why = "not an uncompressed tar" if not items and not sample else "cut-off tar"
        skipped[why] = skipped.get(why, 0) + 1
        C.print0(f"data: {path}: {why} ({type(e).__name__}: {str(e)[:100]}); {len(items)} samples kept",
                 file=sys.stderr)
        sample = {}
    if sample:
        flush()
    return items, labels

def synthetic(cfg: Shared) -> dict:
    cache = cfg.cache_dir or os.path.join(os.path.expanduser("~"), ".cache", "effclip")
    return C.synthetic_world(cache, cfg.synthetic_train, cfg.synthetic_val, cfg.synthetic_size, seed=0)

def load_data(cfg: Shared) -> Data:
    """--data as an ImageFolder or tar shards; without it the synthetic world's training shards."""
    names = C.read_lines(cfg.classnames) if cfg.classnames else None
    if not cfg.data:
        world = synthetic(cfg)
        names, spec = world["classnames"], world["train"]  # sorted names: the order of its val ImageFolder
    elif os.path.isdir(cfg.data) and not glob.glob(os.path.join(cfg.data, "*.tar")):
        items, classnames = C.image_folder(cfg.data, names)
        return Data([p for p, _ in items], [y for _, y in items], classnames)
    else:
        spec = cfg.data
    try:
        shards = C.expand_shards(spec)
    except FileNotFoundError as e:
        C.fail(str(e))
    skipped = {}
    found = [tar_labels(path, skipped) for path in shards]  # [(items, labels)] by shard
    items, labels = [x for i, _ in found for x in i], [y for _, ys in found for y in ys]
    if not items:
        C.fail(f"no samples with an image and a label (cls or json) in {spec}; skipped shards: "
               + (", ".join(f"{k} {v}" for k, v in sorted(skipped.items())) or "none"))
    # Class names -> indices in sorted order (an ImageFolder's: the val set's) unless --classnames gives the order
    words = names or sorted({y for y in labels if isinstance(y, str)})
    unknown = {y for y in labels if isinstance(y, str)} - set(words)
    if unknown:
        C.fail(f"classnames {sorted(unknown)[:5]} of {spec} are not in --classnames")
    index = {w: c for c, w in enumerate(words)}
    labels = [index[y] if isinstance(y, str) else y for y in labels]
    n = max(max(labels) + 1, len(words))
    return Data(items, labels, words + [str(c) for c in range(len(words), n)])


# ==== 3. Replayable augmentations (spec 3.1 and 4.4) =========================================================
# All four variants: RandomResizedCrop + flip (p = 1/2); "randaug" adds RandAugment (2 ops, magnitude 9 of 31, p = 1)
# and RandomErasing (p = 0.25, black); "mixing" adds MixUp (alpha 1, lambda halved, p = 1/2) then CutMix (alpha 1,
# p = 1/2) with a partner, each its own coin. "erm", plain training only: ml-dr's erm.yaml, randaug's view without
# the flip (the config has none) and per batch MixUp (alpha 0.2) or CutMix (alpha 1), batch_mix.
VARIANTS = {"cropflip": (False, False), "mixing": (False, True), "randaug": (True, False),
            "randaug_mixing": (True, True), "erm": (True, False)}  # name -> (RandAugment + erasing, MixUp + CutMix)
RA_OPS, RA_MAGNITUDE, RA_BINS, ERASE_P, MIXUP_P, CUTMIX_P = 2, 9, 31, 0.25, 0.5, 0.5
MIX_GRID = 510  # MixUp's lambda / 2 in [0, 1/2] is stored as a byte: lambda / 2 = q / 510

def erase_box(rng: random.Random, size: int, scale=(0.02, 0.33), ratio=(0.3, 3.3)):
    """RandomErasing's region (top, left, h, w) in a size x size view, torchvision's defaults; None if none of
    10 tries fits (the image is then left as it is)."""
    for _ in range(10):
        area = size * size * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(math.log(ratio[0]), math.log(ratio[1])))
        h, w = round(math.sqrt(area * aspect)), round(math.sqrt(area / aspect))
        if h < size and w < size:
            return rng.randint(0, size - h), rng.randint(0, size - w), h, w
    return None

def cutmix_box(rng: random.Random, size: int, alpha: float = 1.0):
    """CutMix (Yun et al. 2019): lambda ~ Beta(alpha, alpha), a box of side size * sqrt(1 - lambda) around a
    uniform centre, clipped to the view (ml-dr's rand_bbox): (top, left, h, w)."""
    cut = int(size * math.sqrt(1 - rng.betavariate(alpha, alpha)))
    cy, cx = rng.randrange(size), rng.randrange(size)
    y1, y2, x1, x2 = max(cy - cut // 2, 0), min(cy + cut // 2, size), max(cx - cut // 2, 0), min(cx + cut // 2, size)
    return y1, x1, y2 - y1, x2 - x1

def draw_view(rng: random.Random, w: int, h: int, size: int, randaug: bool, min_scale: float, flip=True) -> dict:
    """The single-image ops: crop box (top, left, h, w) in original pixels, flip (never without `flip`),
    RandAugment [(op, negative)], erase box or None."""
    left, top, right, bottom = C.random_resized_crop_box(w, h, rng, (min_scale, 1.0))
    view = dict(box=(top, left, bottom - top, right - left), flip=flip and rng.random() < 0.5, ra=None, erase=None)
    if randaug:
        view["ra"] = [(k, m < 0) for k, m in C.rand_augment_params(rng, size, RA_OPS, RA_MAGNITUDE, RA_BINS)]
        view["erase"] = erase_box(rng, size) if rng.random() < ERASE_P else None
    return view

def draw_sample(rng: random.Random, wh, size: int, variant: str, min_scale: float, pool=()) -> dict:
    """One augmentation of an image of size `wh`: its view, and with mixing a partner drawn from `pool`
    [(index, (w, h))] with the partner's own view, the MixUp weight code and the CutMix box."""
    randaug, mixing = VARIANTS[variant]
    s = dict(view=draw_view(rng, *wh, size, randaug, min_scale, flip=variant != "erm"), id2=-1, view2=None,
             mixup=None, cutmix=None)
    if mixing and pool:
        mixup = round(rng.betavariate(1.0, 1.0) / 2 * MIX_GRID) if rng.random() < MIXUP_P else None
        cutmix = cutmix_box(rng, size) if rng.random() < CUTMIX_P else None
        if mixup is not None or cutmix is not None:
            j, (w2, h2) = pool[rng.randrange(len(pool))]
            s.update(id2=j, view2=draw_view(rng, w2, h2, size, randaug, min_scale), mixup=mixup, cutmix=cutmix)
    return s

def batch_mix(x: torch.Tensor, t: torch.Tensor, rng: random.Random, mixup_alpha=0.2, cutmix_alpha=1.0):
    """ml-dr's ERM (erm.yaml, MixingTransforms): per batch MixUp (Zhang et al. 2018; lambda ~ Beta(0.2, 0.2)) or
    CutMix (Beta(1, 1)), uniformly, partners a permutation of the batch, targets mixed as the pixels (CutMix: by
    area). x (B, 3, S, S), t (B, C). ml-dr's CutMix slices a batch x[:, y1:y2, x1:x2], channels and rows of (B, C,
    H, W); here the box is spatial, as in CutMix and ml-dr's single-image replay (design choice)."""
    perm = torch.tensor(rng.sample(range(len(x)), len(x)), device=x.device)
    if rng.random() < 0.5:
        lam = rng.betavariate(mixup_alpha, mixup_alpha)
        return lam * x + (1 - lam) * x[perm], lam * t + (1 - lam) * t[perm]
    i, j, h, w = cutmix_box(rng, x.shape[-1], cutmix_alpha)
    x, a = x.clone(), h * w / x.shape[-1] ** 2
    x[..., i:i + h, j:j + w] = x[perm][..., i:i + h, j:j + w]
    return x, (1 - a) * t + a * t[perm]

def apply_view(img: Image.Image, view: dict, size: int) -> torch.Tensor:
    """Spec 4.4's fixed order on a PIL image: crop + bilinear resize, flip, RandAugment; then uint8 and
    erasing to 0 (black, as erasing before Normalize). -> uint8 (3, size, size)."""
    t, l, h, w = view["box"]
    img = img.resize((size, size), Image.BILINEAR, box=(l, t, l + w, t + h))
    if view["flip"]:
        img = img.transpose(Image.FLIP_LEFT_RIGHT)
    if view["ra"]:  # the magnitude is fixed: (op, sign) gives back the value common.rand_augment_params drew
        ops = [[k, C.rand_augment_magnitude(k, neg, size, RA_MAGNITUDE, RA_BINS)] for k, neg in view["ra"]]
        img = C.apply_rand_augment(img, ops)
    x = torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1)  # (3, S, S)
    if view["erase"]:
        i, j, eh, ew = view["erase"]
        x[:, i:i + eh, j:j + ew] = 0
    return x

def apply_sample(img: Image.Image, s: dict, size: int, partner: Image.Image | None = None) -> torch.Tensor:
    """The view, then MixUp and CutMix with the partner's own view. MixUp weighs the image by lambda/2 <= 1/2 (the
    partner dominates: ml-dr's quirk, spec 6; harmless, the label is the teacher's). Rounded to uint8."""
    x = apply_view(img, s["view"], size)
    if s["id2"] < 0:
        return x
    x2 = apply_view(partner, s["view2"], size)
    if s["mixup"] is not None:
        lam = s["mixup"] / MIX_GRID
        x = (lam * x.float() + (1 - lam) * x2.float()).round().to(torch.uint8)
    if s["cutmix"] is not None:
        i, j, h, w = s["cutmix"]
        x[:, i:i + h, j:j + w] = x2[:, i:i + h, j:j + w]
    return x


# ==== 4. The stored record: fixed-size binary, one per augmentation (spec 4.3 and 4.4) =======================
FLIP, ERASE, MIXUP, CUTMIX, BAD = 1, 2, 4, 8, 128  # bits of `flags` (`flags2`: the partner's FLIP, ERASE)

def record_dtype(variant: str, k: int, size: int, num_classes: int) -> np.dtype:
    """Packed numpy record. Crop boxes in original pixels (uint16), boxes in the view in uint8 up to 255 px,
    a RandAugment op as one byte (index | negative << 7), fp16 probabilities, int16 class ids."""
    randaug, mixing = VARIANTS[variant]
    px = np.uint8 if size <= 255 else np.int16
    view = [("box", np.uint16, (4,)), ("flags", np.uint8)]
    view += [("ra", np.uint8, (RA_OPS,)), ("erase", px, (4,))] if randaug else []
    fields = list(view)
    if mixing:
        fields += [("id2", np.int32), ("mix", np.uint8), ("cut", px, (4,))] + [(n + "2", *r) for n, *r in view]
    fields += [("prob", np.float16, (k,)), ("cls", np.int16 if num_classes <= 2**15 else np.int32, (k,))]
    return np.dtype(fields)  # packed: itemsize is the sum of the fields

def encode_view(rec, view: dict, suffix: str = ""):
    rec["box" + suffix] = view["box"]
    flags = FLIP * view["flip"] + ERASE * (view["erase"] is not None)
    if view["ra"] is not None:
        rec["ra" + suffix] = [k | (neg << 7) for k, neg in view["ra"]]
        rec["erase" + suffix] = view["erase"] or (0, 0, 0, 0)
    return flags

def decode_view(rec, flags: int, suffix: str = "") -> dict:
    return {"box": tuple(int(v) for v in rec["box" + suffix]), "flip": bool(flags & FLIP),
            "ra": [(int(b) & 127, bool(b >> 7)) for b in rec["ra" + suffix]] if "ra" + suffix in rec.dtype.names else None,
            "erase": tuple(int(v) for v in rec["erase" + suffix]) if flags & ERASE else None}

def encode_sample(s: dict, dtype: np.dtype) -> np.ndarray:
    """A sample dict (draw_sample) -> one record (labels left empty)."""
    rec = np.zeros((), dtype)
    flags = encode_view(rec, s["view"])
    if "id2" in dtype.names:
        rec["id2"] = s["id2"]
        if s["id2"] >= 0:
            rec["flags2"] = encode_view(rec, s["view2"], "2")
            rec["mix"], rec["cut"] = s["mixup"] or 0, s["cutmix"] or (0, 0, 0, 0)
            flags += MIXUP * (s["mixup"] is not None) + CUTMIX * (s["cutmix"] is not None)
    rec["flags"] = flags
    return rec

def decode_sample(rec) -> dict:
    """One record -> the sample dict that generated it (exactly: every field is an integer)."""
    flags = int(rec["flags"])
    s = {"view": decode_view(rec, flags), "id2": -1, "view2": None, "mixup": None, "cutmix": None}
    if "id2" in rec.dtype.names and int(rec["id2"]) >= 0:
        s.update(id2=int(rec["id2"]), view2=decode_view(rec, int(rec["flags2"]), "2"),
                 mixup=int(rec["mix"]) if flags & MIXUP else None,
                 cutmix=tuple(int(v) for v in rec["cut"]) if flags & CUTMIX else None)
    return s

def densify(prob, cls, num_classes: int) -> torch.Tensor:
    """Spec 4.2 "smooth": the top-k probabilities at their classes, the leftover mass 1 - sum(top-k) spread evenly
    over the other C - k (each had at most the smallest kept one: the top-k stay the top-k). A sum past 1 (fp16
    rounding): leftover 0 and the k values renormalised (design choice; ml-dr falls back to "zeros")."""
    p, c = torch.as_tensor(np.asarray(prob, dtype=np.float32)), torch.as_tensor(np.asarray(cls, dtype=np.int64))
    rest = (1 - p.sum()).clamp(min=0) / max(1, num_classes - len(p))
    t = torch.full((num_classes,), float(rest))
    t[c] = p
    return t / t.sum()


# ==== 5. Reinforcement: teachers, the views of a group of images, the output parts ===========================
def load_teachers(spec: str, num_classes: int, device) -> list[tuple[nn.Module, int]]:
    """[(model in eval mode, its training size or 0)] from --teachers: this script's checkpoints (views resized to
    their size), or ARCH=WEIGHTS, a torchvision state dict or weights name (views as they are)."""
    teachers = []
    for item in filter(None, (s.strip() for s in spec.split(","))):
        if "=" in item:
            arch, weights = item.split("=", 1)
            if os.path.isfile(weights):
                try:
                    sd = C.read_checkpoint(weights)
                except (ValueError, OSError) as e:  # empty, not a state dict, not a torch file: one line
                    C.fail(f"teacher {item}: cannot read {weights}: {e}")
                sd = C.unwrap_state_dict(sd.get("state_dict", sd.get("model", sd)))
                model = build_model(arch, num_classes)
                C.load_state_dict_checked(model, sd, f"teacher {item}")
            else:  # a torchvision weights name, e.g. resnet50=IMAGENET1K_V2 (downloads)
                try:
                    model = torchvision.models.get_model(arch, weights=weights)
                except Exception as e:  # an unknown architecture or weights name, or no download
                    C.fail(f"teacher {item}: no file {weights} and no torchvision weights of that name ({e})")
            size = 0
        else:
            ckpt = C.load_checkpoint("auto", item) if os.path.isdir(item) else C.load_checkpoint(item, "")
            if ckpt is None or ckpt.get("kind") != "reinforce_classifier":  # a run directory: its newest that reads
                C.fail(f"{item} is not a checkpoint of `reinforce.py train` or a run directory with one")
            model = build_model(ckpt["model_name"], ckpt["num_classes"], ckpt["image_size"])
            C.load_state_dict_checked(model, ckpt["model"], f"teacher {item}")
            size = ckpt["image_size"]
        teachers.append((model.eval().to(device), size))
    if not teachers:
        C.fail("--teachers is empty; train one first: python reinforce.py train --model resnet_small --out runs/t")
    return teachers

@torch.no_grad()
def teacher_probs(teachers, x: torch.Tensor, temperature: float, bf16: bool) -> torch.Tensor:
    """uint8 views (V, 3, S, S) -> the ensemble's mean of softmax(logits / T), fp32 (V, C) (spec 2.1)."""
    probs = 0
    for model, size in teachers:
        xt = C.normalize_images(x, IMAGENET_MEAN, IMAGENET_STD)
        if size and size != x.shape[-1]:
            xt = F.interpolate(xt, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
        with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=bf16):
            logits = model(xt)
        probs = probs + F.softmax(logits.float() / temperature, dim=-1)
    return probs / len(teachers)

class ReinforceViews(torch.utils.data.Dataset):
    """Loader item = a group of images of one part: their NS records (labels empty) and the rendered views
    (V, 3, S, S) with, per view, its (row, sample) in the group. DataLoader workers render in parallel."""

    def __init__(self, data: Data, groups, cfg: ReinforceConfig, size: int, dtype: np.dtype):
        self.data, self.groups, self.cfg, self.size, self.dtype = data, groups, cfg, size, dtype

    def __len__(self):
        return len(self.groups)

    def __getitem__(self, g):
        part, idx = self.groups[g]
        cfg, recs, views, owner = self.cfg, np.zeros((len(idx), self.cfg.num_samples), self.dtype), [], []
        for r, i in enumerate(idx):
            rng = random.Random(zlib.crc32(f"reinforce/{cfg.seed}/{i}".encode()))  # not ranks, workers, parts, resume
            try:
                img = self.data.load(i)
            except Exception:  # unreadable: its records are flagged, training skips them
                recs[r]["flags"] = BAD
                continue
            pool = {}  # mixing partners (spec 3.1); an unreadable partner is left out
            for j in ([rng.randrange(len(self.data)) for _ in range(cfg.mix_pool)] if VARIANTS[cfg.variant][1] else []):
                try:
                    pool[j] = pool[j] if j in pool else self.data.load(j)
                except Exception:
                    pass
            for n in range(cfg.num_samples):
                recs[r, n] = rec = encode_sample(draw_sample(rng, img.size, self.size, cfg.variant, cfg.min_scale,
                                                             [(j, im.size) for j, im in pool.items()]), self.dtype)
                # generation applies the decoded record: what training replays is what the teacher saw
                s = decode_sample(rec)
                views.append(apply_sample(img, s, self.size, pool.get(s["id2"])))
                owner.append((r, n))
        x = torch.stack(views) if views else torch.zeros(0, 3, self.size, self.size, dtype=torch.uint8)
        return part, idx, recs, x, owner

def part_path(out: str, p: int) -> str:
    return os.path.join(out, f"part-{p:05d}.npy")

def write_meta(out: str, meta: dict, check_only: bool = False):
    """Rank 0 writes meta.json; a later run into the same folder must agree on everything that shapes it."""
    path, meta = os.path.join(out, "meta.json"), json.loads(json.dumps(meta))  # tuples -> lists, as stored
    if os.path.exists(path):
        old = read_meta(path, f"--out {out}")
        diff = [k for k in meta if k != "teachers" and old.get(k) != meta[k]]
        if diff:
            C.fail(f"{out} holds a different reinforcement ({', '.join(diff)} differ); use another --out")
    elif C.get_rank() == 0 and not check_only:
        os.makedirs(out, exist_ok=True)
        with open(path + ".tmp", "w") as f:
            json.dump(meta, f, indent=1)
        os.replace(path + ".tmp", path)

def read_meta(path: str, what: str) -> dict:
    try:
        with open(path) as f:
            meta = json.load(f)
    except (OSError, ValueError) as e:
        meta = f"{type(e).__name__}: {e}"
    if not isinstance(meta, dict) or "fingerprint" not in meta:
        C.fail(f"{what}: {path} is not a reinforcement's meta.json ({meta if isinstance(meta, str) else 'no fingerprint'})")
    return meta

def unreadable(data: Data, n: int = 100) -> str:
    """Why the first `n` images do not load, by reason ("OSError 6"): for a run that found no readable image."""
    why = {}
    for i in range(min(n, len(data))):
        try:
            data.load(i)
        except Exception as e:
            why[type(e).__name__] = why.get(type(e).__name__, 0) + 1
    return f"reasons in the first {min(n, len(data))} tried: " + ", ".join(f"{k} {v}" for k, v in sorted(why.items()))

def reinforce(cfg: ReinforceConfig):
    """Reinforce a dataset: NS stored augmentations per image, each with the teacher ensemble's top-k.

    Resumable by part: a rerun of the same command writes only the missing part-NNNNN.npy files; SIGTERM
    stops after the parts in flight are written. Under torchrun the parts are shared out over the ranks."""
    rank, local_rank, world, device = C.setup_distributed(cfg.device)
    check_flags(cfg)
    C.claim_out(cfg.out)  # one run per folder (run.lock), before anything is read or written
    data = load_data(cfg)
    if cfg.topk > data.num_classes:
        C.fail(f"--topk {cfg.topk} is more than the {data.num_classes} classes")
    teachers = load_teachers(cfg.teachers, data.num_classes, device)
    size = cfg.image_size or next((s for _, s in teachers if s), 224)  # default: the first teacher's own size
    bf16 = cfg.precision == "bf16" or (cfg.precision == "auto" and device.type == "cuda")
    dtype = record_dtype(cfg.variant, cfg.topk, size, data.num_classes)
    meta = {"format": 1, "variant": cfg.variant, "num_samples": cfg.num_samples, "topk": cfg.topk,
            "image_size": size, "min_scale": cfg.min_scale, "mix_pool": cfg.mix_pool, "seed": cfg.seed,
            "num_images": len(data), "num_classes": data.num_classes, "classnames": data.classnames,
            "part_size": cfg.part_size, "fingerprint": data.fingerprint, "temperature": cfg.temperature,
            "dtype": [list(d) for d in dtype.descr], "record_bytes": dtype.itemsize, "teachers": cfg.teachers}
    write_meta(cfg.out, meta, check_only=True)  # another reinforcement in --out: one line, nothing written
    C.document_run(cfg.out, cfg, [__file__, C.__file__])
    write_meta(cfg.out, meta)
    C.barrier()

    # ---- this rank's unfinished parts, cut into groups of about one teacher batch of views -------------
    n_parts = math.ceil(len(data) / cfg.part_size)
    todo = [p for p in range(rank, n_parts, world) if not os.path.exists(part_path(cfg.out, p))]
    per = max(1, cfg.batch_size // cfg.num_samples)
    groups = [(p, list(range(lo, min(lo + per, (p + 1) * cfg.part_size, len(data)))))
              for p in todo for lo in range(p * cfg.part_size, min((p + 1) * cfg.part_size, len(data)), per)]
    done = sum(os.path.exists(part_path(cfg.out, p)) for p in range(n_parts))
    C.print0(f"{len(data)} images, {data.num_classes} classes, {n_parts} parts ({done} done), {len(teachers)} "
             f"teacher(s), {dtype.itemsize} bytes per augmentation record")
    loader = torch.utils.data.DataLoader(ReinforceViews(data, groups, cfg, size, dtype), batch_size=None,
                                         collate_fn=tuple, num_workers=cfg.workers,  # tuple: records stay numpy
                                         worker_init_fn=C.ignore_stop_signals)
    pending, t0, stop = {}, time.time(), C.StopSignal()  # workers ignore SIGTERM: this process stops them
    for part, idx, recs, x, owner in C.progress(loader, "reinforce", total=len(groups)):
        if stop.requested:  # written parts are whole; a rerun does the rest
            break
        if len(x):
            probs = torch.cat([teacher_probs(teachers, x[i:i + cfg.batch_size].to(device), cfg.temperature, bf16)
                               for i in range(0, len(x), cfg.batch_size)])  # (V, C)
            if probs.shape[1] != data.num_classes:
                C.fail(f"the teachers output {probs.shape[1]} classes, the data has {data.num_classes}")
            top = probs.topk(cfg.topk, dim=1)  # sorted, unlike the official argpartition
            rows, cols = (np.array(v) for v in zip(*owner))
            recs["prob"][rows, cols] = top.values.cpu().half().numpy()
            recs["cls"][rows, cols] = top.indices.cpu().numpy()
        done = pending.setdefault(part, {})
        done.update(zip(idx, recs))
        lo = part * cfg.part_size
        if len(done) == min(cfg.part_size, len(data) - lo):  # the part is complete: write it atomically
            tmp = part_path(cfg.out, part) + ".tmp.npy"
            np.save(tmp, np.stack([done[i] for i in range(lo, lo + len(done))]))  # (images, NS) records
            os.replace(tmp, part_path(cfg.out, part))
            del pending[part]
    C.barrier()
    written = [p for p in range(n_parts) if os.path.exists(part_path(cfg.out, p))]
    if rank == 0 and len(written) < n_parts:
        C.print0(f"stopped: {len(written)} of {n_parts} parts written; the same command writes the rest")
    elif rank == 0:
        total = sum(os.path.getsize(part_path(cfg.out, p)) for p in written)
        bad = sum(int((np.load(part_path(cfg.out, p), mmap_mode="r")["flags"][:, 0] & BAD).astype(bool).sum())
                  for p in written)  # images that did not load, over every part
        if bad == len(data):  # a whole pass without one readable image: say so, never train on it
            C.fail(f"no readable image in --data: all {bad} failed to load; {unreadable(data)}; fix the "
                   f"images and delete {cfg.out}")
        C.print0(f"done in {time.time() - t0:.0f}s: {total / (len(data) * cfg.num_samples):.1f} bytes per augmentation"
                 f" on disk ({dtype.itemsize} per record), {bad} unreadable images")
    C.finish_run(cfg.out, extra=f"reinforcement {os.path.join(cfg.out, 'meta.json')} + part-*.npy")
    C.cleanup_distributed()


# ==== 6. Training on the reinforced dataset (spec 3.2), or plain ERM training (the baseline, the teachers) ===
class Reinforced:
    """A reinforcement folder, memory-mapped: record(i, j) = sample j of image i."""

    def __init__(self, root: str, data: Data):
        self.meta = meta = read_meta(os.path.join(root, "meta.json"), f"--reinforced {root}")
        if meta["fingerprint"] != data.fingerprint:
            C.fail(f"--reinforced {root} was made from other data ({meta['num_images']} images, fingerprint "
                   f"{meta['fingerprint']}; --data has {len(data)}, {data.fingerprint}): indices would not match")
        try:
            n_parts = math.ceil(len(data) / meta["part_size"])
            self.parts = [np.load(part_path(root, p), mmap_mode="r") for p in range(n_parts)]
        except (OSError, ValueError) as e:  # missing (an unfinished run) or unreadable
            C.fail(f"--reinforced {root}: a part is missing or unreadable ({type(e).__name__}: {e}); rerun `reinforce`")
        self.ns, self.size, self.num_classes = meta["num_samples"], meta["image_size"], meta["num_classes"]

    def record(self, i: int, j: int):
        return self.parts[i // self.meta["part_size"]][i % self.meta["part_size"], j]

    def replay(self, data: Data, i: int, j: int):
        """Sample j of image i -> (uint8 view (3, S, S), densified target)."""
        rec = self.record(i, j)
        if rec["flags"] & BAD:
            raise BadRecord("unreadable at reinforcement")
        s = decode_sample(rec)
        partner = data.load(s["id2"]) if s["id2"] >= 0 else None
        return apply_sample(data.load(i), s, self.size, partner), densify(rec["prob"], rec["cls"], data.num_classes)

class BadRecord(ValueError):
    """A stored record that does not read or replay: counted and skipped."""

# ml-dr's released layout (ImageNet+, CIFAR-100+, Flowers-102+, Food-101+; spec 4.1, 4.4): dr/transforms.py's ops
# in its fixed order, whatever order the config lists; the four without parameters have no record entry.
MLDR_OPS = ("uint8", "resize", "center_crop", "random_crop", "random_resized_crop", "random_horizontal_flip",
            "rand_augment", "to_tensor", "random_erase", "normalize", "mixup", "cutmix")
MLDR_FIXED, MLDR_CROPS = ("uint8", "center_crop", "to_tensor", "normalize"), MLDR_OPS[2:5]  # the last crop: the size

def read_pth(path: str):
    """A torch.save file (its zip's data.pkl, or a plain pickle) through common's restricted unpickler: containers,
    strings, numbers, numpy scalars (ml-dr's mixing draws, which torch.load(weights_only=True) refuses), no code."""
    if not zipfile.is_zipfile(path):
        return C.safe_unpickle(path, numpy=True)
    with zipfile.ZipFile(path) as z:
        return C.safe_unpickle(z.read(next(n for n in z.namelist() if n.endswith("data.pkl"))), numpy=True)

class MLDRStore:
    """ml-dr's layout: config.pth.tar (its reinforcement config) and {index}.pth.tar = (index, [{"params": compressed
    parameters, "prob": (top-k probabilities, classes)}] * NS), index = position in --data. replay() follows
    dr/data.py's ReinforcedDataset and dr/transforms.py's Compose.decompress + reapply on the PIL image with the
    same torchvision calls: ml-dr's training view bit for bit, a normalised float (3, S, S)."""

    def __init__(self, root: str, data: Data):
        self.root, n = root, len(data)
        try:
            cfg = read_pth(os.path.join(root, "config.pth.tar"))
            ops = {k: dict(v) for k, v in cfg["reinforce"]["image_augmentation"].items()}
            self.ns, classes = int(cfg["reinforce"]["num_samples"]), int(cfg.get("num_classes", data.num_classes))
        except (OSError, ValueError, KeyError, TypeError, StopIteration) as e:
            C.fail(f"--reinforced {root}: config.pth.tar is not ml-dr's reinforcement config ({type(e).__name__}: {e})")
        ops = {k: v for k, v in ops.items() if v.pop("enable", True)}  # ml-dr's clean_config
        if set(ops) - set(MLDR_OPS) or not set(MLDR_CROPS) & set(ops) or ops.get("random_crop", {}).get("pad_if_needed"):
            C.fail(f"--reinforced {root}: ops {sorted(ops)}: not ml-dr's replayable ones with a crop, no pad_if_needed")
        if classes != data.num_classes or not os.path.exists(self.file(n - 1)) or os.path.exists(self.file(n)):
            C.fail(f"--reinforced {root} is not for --data ({classes} classes, its records must end at index {n - 1}; "
                   f"--data has {data.num_classes} classes, {n} images): ml-dr's indices are positions in the dataset")
        self.ops, self.mixing = [(k, ops[k]) for k in MLDR_OPS if k in ops], "mixup" in ops or "cutmix" in ops
        size = [ops[k]["size"] for k in MLDR_CROPS if k in ops][-1]
        self.size, self.num_classes = size if isinstance(size, int) else size[0], data.num_classes
        norm = ops.get("normalize", {"mean": (0.0,) * 3, "std": (1.0,) * 3})
        self.mean, self.std = tuple(norm["mean"]), tuple(norm["std"])
        self.meta = {"variant": "ml-dr " + "+".join(k for k, _ in self.ops if k not in MLDR_FIXED), "topk": "stored"}

    def file(self, i: int) -> str:
        return os.path.join(self.root, f"{i}.pth.tar")

    def view(self, img: Image.Image, params: dict, side: int) -> torch.Tensor:
        """Compose.reapply's single-image ops on a PIL image; `side` 0 = the image, 1 = the mixing partner."""
        for k, kw in self.ops:
            p = params[k][side] if k in params and k not in ("mixup", "cutmix") else None
            if k == "center_crop":
                img = TF.center_crop(img, kw["size"])
            elif k in ("to_tensor", "normalize"):  # uint8 / 255 (the "uint8" op leaves a PIL image as it is)
                img = TF.to_tensor(img) if k == "to_tensor" else TF.normalize(img, kw["mean"], kw["std"])
            elif p is None or k == "uint8":
                continue
            elif k == "resize":  # ml-dr's Resize applies its configured size, whatever was stored
                img = TF.resize(img, kw["size"])
            elif k == "random_crop":  # RandomCrop.forward: its padding, then the stored (top, left)
                h, w = (kw["size"],) * 2 if isinstance(kw["size"], int) else kw["size"]
                if kw.get("padding") is not None:  # torchvision RandomCrop's fill and mode defaults
                    img = TF.pad(img, kw["padding"], kw.get("fill", 0), kw.get("padding_mode", "constant"))
                img = TF.crop(img, int(p[0]), int(p[1]), h, w)
            elif k == "random_resized_crop":  # (top, left, h, w) in original pixels, bilinear, antialiased
                img = TF.resized_crop(img, *(int(v) for v in p), [self.size] * 2 if isinstance(kw["size"], int)
                                      else list(kw["size"]), antialias=True)
            elif k == "random_horizontal_flip":
                img = TF.hflip(img) if p else img
            elif k == "rand_augment":  # [(op index, signed magnitude)], torchvision's ops, nearest, no fill
                img = C.apply_rand_augment(img, p)
            elif k == "random_erase" and p[0] != -1:  # (top, left, h, w) set to 0 before Normalize
                img[:, p[0]:p[0] + p[2], p[1]:p[1] + p[3]] = 0
        return img

    def replay(self, data: Data, i: int, j: int):
        """Sample j (modulo the file's count) of image i -> (normalised float view, densified target)."""
        try:
            index, samples = read_pth(self.file(i))
            s = samples[j % len(samples)]
            if index != i:
                raise ValueError(f"holds index {index}")
            # Compose.decompress: [id2 or None (only with mixing)] + one entry per op with parameters (None: not
            # applied) -> {op: (image's params, partner's)}; a mixed record stores each view op as a pair
            rec, id2 = (s["params"][1:], s["params"][0]) if self.mixing else (s["params"], None)
            names = [k for k, _ in self.ops if k not in MLDR_FIXED]
            params = {k: p if k in ("mixup", "cutmix") else (p[0], p[1]) if id2 is not None and len(p) > 1
                      else (p, None) for k, p in zip(names, rec, strict=True) if p is not None}
            target = densify(*s["prob"], self.num_classes)
        except Exception as e:
            raise BadRecord(f"{self.file(i)}: {type(e).__name__}: {e}") from None
        img, partner = data.load(i), data.load(int(id2)) if id2 is not None else None
        try:
            x = self.view(img, params, 0)
            x2 = self.view(partner, params, 1) if partner is not None else None
            if "mixup" in params:  # lambda already divided by div_by
                x = float(params["mixup"]) * x + (1 - float(params["mixup"])) * x2
            if "cutmix" in params:  # [lambda, y1, x1, y2, x2]: the box along H, then W
                y1, x1, y2, x2_ = (int(v) for v in params["cutmix"][1:])  # x is this sample's own tensor
                x[:, y1:y2, x1:x2_] = x2[:, y1:y2, x1:x2_]
        except Exception as e:
            raise BadRecord(f"{self.file(i)}: {type(e).__name__}: {e}") from None
        return x, target

class TrainImages(torch.utils.data.Dataset):
    """(epoch, index) -> (view (3, S, S): uint8, or ml-dr's normalised float; target (C,); status: 0, 1 an unreadable
    image, 2 a record that fails, both with a zero target: no loss). With probability p (with a reinforcement) one
    of the NS stored samples, uniformly, replayed exactly, target its densified teacher probabilities; otherwise
    a fresh --aug augmentation, one-hot labels (mixed as the pixels are). Draws seeded by (seed, epoch, index)."""

    def __init__(self, data: Data, size: int, seed: int, store, p: float, aug: str, min_scale: float, smoothing: float):
        self.data, self.size, self.seed, self.store, self.p = data, size, seed, store, p
        self.aug, self.min_scale, self.smoothing = aug, min_scale, smoothing

    def __len__(self):
        return len(self.data)

    def __getitem__(self, key):
        epoch, i = key
        rng, status = random.Random(zlib.crc32(f"train/{self.seed}/{epoch}/{i}".encode())), 0
        try:
            if self.store is not None and rng.random() < self.p:
                x, t = self.store.replay(self.data, i, rng.randrange(self.store.ns))
            else:
                x, t = self.standard(i, rng)
        except Exception as e:
            status = 2 if isinstance(e, BadRecord) else 1
            x, t = torch.zeros(3, self.size, self.size, dtype=torch.uint8), torch.zeros(self.data.num_classes)
        mldr = isinstance(self.store, MLDRStore)
        if mldr and x.dtype == torch.uint8:  # as ml-dr's to_tensor + normalize
            x = TF.normalize(x.float().div(255), self.store.mean, self.store.std)
        if x.shape[-1] != self.size:  # a student at another resolution than the stored views
            x = F.interpolate(x[None].float(), size=(self.size, self.size), mode="bilinear", antialias=True)[0]
            x = x if mldr else x.round().clamp(0, 255).to(torch.uint8)
        return x, t, status

    def standard(self, i: int, rng: random.Random):
        img, n, j = self.data.load(i), self.data.num_classes, rng.randrange(len(self.data))
        partner = self.data.load(j) if VARIANTS[self.aug][1] else None
        s = draw_sample(rng, img.size, self.size, self.aug, self.min_scale, [(j, partner.size)] if partner else ())
        x, t = apply_sample(img, s, self.size, partner), F.one_hot(torch.tensor(self.data.labels[i]), n).float()
        if s["id2"] >= 0:  # the label of a mixed image, mixed as the pixels were
            t2 = F.one_hot(torch.tensor(self.data.labels[j]), n).float()
            if s["mixup"] is not None:
                t = (s["mixup"] / MIX_GRID) * t + (1 - s["mixup"] / MIX_GRID) * t2
            if s["cutmix"] is not None:
                a = s["cutmix"][2] * s["cutmix"][3] / self.size ** 2
                t = (1 - a) * t + a * t2
        return x, (1 - self.smoothing) * t + self.smoothing / n

def kl_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """KL(target || softmax(logits)) summed over classes, averaged over the batch ("batchmean", T = 1;
    spec 3.2). With a one-hot target it is the cross-entropy. fp32; 0 log 0 = 0 via xlogy."""
    logp = F.log_softmax(logits.float(), dim=-1)  # (B, C)
    return (torch.xlogy(target, target) - target * logp).sum() / logits.shape[0]

def kl_loss_reference(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return F.kl_div(F.log_softmax(logits.float(), dim=-1), target, reduction="batchmean")

@torch.no_grad()
def evaluate(model: nn.Module, items, size: int, device, mean=IMAGENET_MEAN, std=IMAGENET_STD, batch_size=256) -> float:
    """Top-1 (%) on [(path, label)]: resize the shorter side, centre crop (the paper: 256 -> 224 crop)."""
    model.eval()
    correct = 0
    for i in C.progress(range(0, len(items), batch_size), "eval"):
        chunk = items[i:i + batch_size]
        x = C.normalize_images(C.eval_images([p for p, _ in chunk], size, Image.BILINEAR).to(device), mean, std)
        y = torch.tensor([y for _, y in chunk], device=device)
        correct += (model(x).argmax(1) == y).sum().item()
    model.train()
    return 100 * correct / max(1, len(items))

def make_optimizer(model: nn.Module, name: str, lr: float, weight_decay: float, momentum: float,
                   nesterov: bool = True, decay_all: bool = True):
    """ml-dr's train.get_optimizer: SGD with (Nesterov) momentum or AdamW, weight decay on every parameter;
    without `decay_all`, 1-D parameters (biases, norm weights) get none, its no_decay_bn_filter_bias rule."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if decay_all or p.ndim > 1], "weight_decay": weight_decay}]
    groups += [] if decay_all else [{"params": [p for p in params if p.ndim <= 1], "weight_decay": 0.0}]
    if name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=momentum, nesterov=nesterov and momentum > 0)
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.999), fused=next(model.parameters()).is_cuda)

def val_items(cfg: TrainConfig, data: Data):
    if cfg.val_data:
        items, names = C.image_folder(cfg.val_data)
        if len(names) != data.num_classes:
            C.fail(f"--val-data has {len(names)} class folders, the training data {data.num_classes} classes")
        return items
    if cfg.data:
        return []
    items, names = C.image_folder(synthetic(cfg)["val_folder"])  # a small set may miss classes: map by name
    return [(p, data.classnames.index(names[y])) for p, y in items]

def check_flags(cfg: Shared):
    """What the range checks of common.parse_config leave open, before any work ("erm" is no reinforcement)."""
    for k, ok in (("precision", ("auto", "bf16", "fp32")), ("aug", list(VARIANTS)), ("variant", list(VARIANTS)[:4]),
                  ("optimizer", ("sgd", "adamw"))):
        if getattr(cfg, k, ok[0]) not in ok:
            C.fail(f"--{k} must be one of {', '.join(ok)}, not '{getattr(cfg, k)}'")
    if cfg.synthetic_size < 8:
        C.fail(f"--synthetic-size {cfg.synthetic_size}: must be >= 8")

def train(cfg: TrainConfig):
    """Train a classifier: on a reinforced dataset (--reinforced), or plain ERM (the baseline, or a teacher).

    A flat step loop over epochs, SGD (or AdamW) with warm-up + cosine, resumable at any step (--resume auto),
    SIGTERM-safe (a checkpoint at the current step, exit 0), DDP under torchrun, bf16 on GPU. Its checkpoints
    are the teachers that `reinforce` reads."""
    rank, local_rank, world, device = C.setup_distributed(cfg.device)
    check_flags(cfg)
    C.document_run(cfg.out, cfg, [__file__, C.__file__])  # claims --out (run.lock) before anything is written
    ckpt = C.load_checkpoint(cfg.resume, cfg.out)  # an unreadable --resume file: one line, before any work
    if ckpt is not None and (ckpt.get("kind") != "reinforce_classifier" or ckpt.get("model_name") != cfg.model):
        C.fail(f"checkpoint {cfg.resume} is not a `reinforce.py train` checkpoint of {cfg.model}")
    data = load_data(cfg)
    if cfg.num_classes:
        if cfg.num_classes < data.num_classes:  # labels past the head would all be "unreadable" (zero targets)
            C.fail(f"--num-classes {cfg.num_classes} is less than the data's {data.num_classes} classes")
        data.classnames = data.classnames + [str(c) for c in range(len(data.classnames), cfg.num_classes)]
        data.num_classes = cfg.num_classes
    mldr = cfg.reinforced and os.path.isfile(os.path.join(cfg.reinforced, "config.pth.tar"))  # ml-dr's layout
    store = (MLDRStore if mldr else Reinforced)(cfg.reinforced, data) if cfg.reinforced else None
    norm = (store.mean, store.std) if isinstance(store, MLDRStore) else (IMAGENET_MEAN, IMAGENET_STD)
    size = cfg.image_size or (store.size if store else cfg.synthetic_size if not cfg.data else
                              MODELS.get(cfg.model, {}).get("image_size", 224))
    torch.manual_seed(cfg.seed)
    model = build_model(cfg.model, data.num_classes, size).to(device)
    opt = make_optimizer(model, cfg.optimizer, cfg.lr, cfg.weight_decay, cfg.momentum, cfg.nesterov, cfg.decay_all)
    gb, per_epoch = cfg.batch_size * world, max(1, len(data) // (cfg.batch_size * world))
    steps, warmup = cfg.epochs * per_epoch, int(cfg.warmup_epochs * per_epoch)
    evals, log = val_items(cfg, data), C.RunLog(cfg.out)
    C.print0(f"{len(data)} images, {data.num_classes} classes, {len(evals)} held out, {steps} steps of {gb}, "
             f"{sum(p.numel() for p in model.parameters()):,} parameters, "
             + (f"reinforced ({store.meta['variant']}, NS {store.ns}, k {store.meta['topk']})" if store
                else f"plain ERM ({cfg.aug}, label smoothing {cfg.label_smoothing})"))

    # ---- resume: the data position is the step (C.StepBatches) ---------------------------------------
    start = 0
    if ckpt is not None:
        C.load_state_dict_checked(model, ckpt["model"], f"checkpoint {cfg.resume}")
        opt.load_state_dict(ckpt["optimizer"])
        C.set_rng_state(ckpt["rng"])
        start = ckpt["step"]
        if start > steps:
            C.fail(f"the checkpoint is at step {start}, past this run's {steps} steps (--epochs {cfg.epochs})")
        C.print0(f"resumed from step {start}")
    dataset = TrainImages(data, size, cfg.seed, store, cfg.reinforce_p, cfg.aug, cfg.min_scale,
                          0.0 if store else cfg.label_smoothing)
    batches = iter(torch.utils.data.DataLoader(  # workers ignore SIGTERM/SIGINT: this process stops them
        dataset, batch_sampler=C.StepBatches(len(data), gb, start, steps, cfg.seed, rank, world),
        num_workers=cfg.workers, pin_memory=device.type == "cuda", worker_init_fn=C.ignore_stop_signals))
    ddp = DDP(model, device_ids=[local_rank] if device.type == "cuda" else None) if world > 1 else model
    bf16 = cfg.precision == "bf16" or (cfg.precision == "auto" and device.type == "cuda")
    stop, t0, skipped, bad = C.StopSignal(), time.time(), torch.zeros((), device=device), torch.zeros((), device=device)
    seen, epoch_start = 0, (0, 0)  # images read by this rank; (seen, skipped) when the epoch began
    path, stopping, last_step = None, False, False
    for step in C.progress(range(start, steps + 1), "train", initial=start, total=steps + 1):
        last_step = step == steps
        stopping = stop.requested if world == 1 else (step % cfg.log_every == 0 and stop.agreed(device))

        # ---- evaluate -----------------------------------------------------------------------------
        epoch_end = cfg.eval_every and step % (cfg.eval_every * per_epoch) == 0 and step > start
        if evals and (last_step or epoch_end):
            if rank == 0:
                log.log(step, top1=evaluate(model, evals, size, device, *norm), epoch=step / per_epoch)
            C.barrier()

        # ---- checkpoint (these are also the teachers of `reinforce`) --------------------------------
        if (last_step or stopping or step % cfg.ckpt_every == 0) and step > start:
            state = {"kind": "reinforce_classifier", "model": model.state_dict(), "optimizer": opt.state_dict(),
                     "step": step, "rng": C.rng_state(), "model_name": cfg.model, "num_classes": data.num_classes,
                     "image_size": size, "classnames": data.classnames, "config": dataclasses.asdict(cfg)}
            C.save_checkpoint(path := os.path.join(cfg.out, f"ckpt-{step}.pt"), state)
            C.prune_checkpoints(cfg.out, cfg.keep_ckpts, written=path)
        if last_step or stopping:
            break

        # ---- forward, backward, step ---------------------------------------------------------------
        x, target, status = next(batches)
        x = x.to(device, non_blocking=True)  # (B, 3, S, S): uint8, or ml-dr replay's normalised floats
        x = C.normalize_images(x, *norm) if x.dtype == torch.uint8 else x
        target, status = target.to(device, non_blocking=True), status.to(device, non_blocking=True)  # (B, C), (B,)
        skipped, bad = skipped + (status > 0).sum(), bad + (status == 2).sum()  # zero targets: add no loss
        if store is None and cfg.aug == "erm":  # ml-dr's ERM: MixUp or CutMix per batch, drawn by (seed, step, rank)
            x, target = batch_mix(x, target, random.Random(zlib.crc32(f"mix/{cfg.seed}/{step}/{rank}".encode())))
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            logits = ddp(x)
        loss = kl_loss(logits, target)
        loss.backward()
        if cfg.grad_clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        C.set_lr(opt, C.lr_at(step, cfg.lr, warmup, steps))
        opt.step()
        opt.zero_grad(set_to_none=True)
        seen += len(target)
        if (step + 1) % per_epoch == 0:  # an epoch without one readable image: stop (one sync per epoch)
            counts = torch.tensor([seen - epoch_start[0], skipped.item() - epoch_start[1]], device=device)
            if world > 1:
                torch.distributed.all_reduce(counts)
            if counts[0] > 0 and counts[1] == counts[0]:
                C.fail(f"no readable image in epoch {(step + 1) // per_epoch}: all {int(counts[0])} failed to load; "
                       f"{unreadable(data)}")
            epoch_start = (seen, skipped.item())
        if (step + 1) % cfg.log_every == 0:
            if not math.isfinite(loss.item()):  # the last checkpoint stays the last good one
                C.fail(f"loss is {loss.item()} at step {step + 1}; stopping (resume from a checkpoint, lower --lr)")
            log.log(step + 1, loss=loss.item(), lr=opt.param_groups[0]["lr"], skipped=int(skipped.item()),
                    bad_records=int(bad.item()), images_per_s=cfg.log_every * gb / (time.time() - t0))
            t0 = time.time()
    if stopping and not last_step:
        C.print0(f"stopped by a signal at step {step}: --resume auto continues from {path}")
    counts = torch.stack([bad, skipped - bad])  # the results line has the counts, over all ranks
    if world > 1:
        torch.distributed.all_reduce(counts)
    C.finish_run(cfg.out, path, f"skipped {int(counts[0])} stored records that failed to read or replay and "
                                f"{int(counts[1])} unreadable images")
    C.cleanup_distributed()

def main(argv=None):
    """`reinforce.py reinforce|train [flags]`; `reinforce.py COMMAND --help` lists that command's flags."""
    return C.run_command(__doc__, {"reinforce": (reinforce, ReinforceConfig), "train": (train, TrainConfig)}, argv)

if __name__ == "__main__":
    main()
