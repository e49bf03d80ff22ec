"""FastFill: Efficient Compatible Model Update (arXiv 2303.04766, ICLR 2023, Jaeckle et al., Apple).

A retrieval system holds a gallery embedded by an old model phi_old. A better model phi_new arrives and
queries are embedded with it, but re-embedding ("backfilling") the whole gallery is slow. FastFill learns
a transformation h that maps old gallery features into the new space (FCT's two-branch MLP, trained with
alignment + the new classifier's cross-entropy under a learned per-item uncertainty sigma), then backfills
the gallery item by item in order of decreasing sigma, so retrieval recovers fast at small backfilled
fractions. The figure of merit is the area under the backfilling curve (CMC top-1/top-5, mAP).

What is here: the embedding backbones (torchvision's ResNet-18/50 in apple/ml-fct's layout, whose checkpoints
load strictly: a 128-d ReLU'd embedding out of the last block and a bias-free 1x1-conv classifier; or any
torchvision classifier by name with a projection to the embedding), their training (SGD, cosine with warm-up,
label smoothing; optionally BCT's influence loss), the transformation with the uncertainty head, optionally fed by
a side-information model (FCT's psi; without one the old feature feeds both branches, as in the released FastFill
configs), and its recipe (Adam, cosine, BN frozen for the second half), backfilling with the three orderings, the
retrieval metrics with self-matches excluded (ml-fct's eval transform), the curve as log.jsonl, CSV and PNG, and a
no-argument run that does all of it on the synthetic world. Not here: the biased-model experiment and the RBT
baseline (undefined in the public sources).

Paper -> code:
  phi_old, phi_new: ResNet-50, 128-d embedding (FCT)   -> ResNet (embedding_block), build_model, train
  BCT influence loss (baseline new model)              -> train (train-model --bct OLD), bct_loss
  h: two-branch MLP + BN, sigma head (Sec. 3)          -> Transformation
  side-information h(phi_old, psi) (FCT)               -> align --side-info PSI
  L = mean(0.5 exp(-s) (MSE + CE_ls) + 0.5 s) (Eq. 5)  -> fastfill_loss (reference: fastfill_loss_reference)
  FCT: the same h, MSE only                            -> --loss fct
  backfilling orderings: sigma, random, distance       -> backfill_order
  CMC top-k and mAP, self excluded; AUC (Sec. 4)       -> retrieval_metrics, backfill_curve

Commands:
  python fastfill.py                                   # the whole pipeline on the synthetic world, CPU
  torchrun --nproc_per_node=8 fastfill.py train-model --data imagenet/train --classes 500 --model resnet50 \\
      --batch-size 128 --epochs 100 --lr 1.024 --out old/
  torchrun --nproc_per_node=8 fastfill.py train-model --data imagenet/train --model resnet50 --batch-size 128 \\
      --epochs 100 --lr 1.024 --out new/
  torchrun --nproc_per_node=8 fastfill.py align --old old/ --new new/ --data imagenet/train --batch-size 128 \\
      --epochs 80 --out align/
  python fastfill.py backfill --old old/ --new new/ --align align/ --data imagenet/val --order sigma,random,distance \\
      --out backfill/

Result (the no-argument run): README.md, "FastFill".
"""
from __future__ import annotations

import dataclasses
import math
import os
import random
import time
import zlib
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision
import torchvision.transforms.v2.functional as TF
from PIL import Image, ImageDraw
from torch.nn.parallel import DistributedDataParallel as DDP
from torchvision.models.resnet import BasicBlock, Bottleneck, conv1x1

import common as C

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


@dataclass
class Shared:
    """Flags of every command: the data, the synthetic world, the run directory and the machine."""
    data: str = ""  # ImageFolder to train on (backfill: the query = gallery set); empty = the synthetic world
    out: str = "runs/fastfill"  # run directory: config.json, log.jsonl, checkpoints, curves
    seed: int = 0  # model init, data order, augmentation
    workers: int = 2  # DataLoader worker processes per rank
    device: str = "auto"  # auto | cuda | cpu
    cache_dir: str = ""  # where the synthetic world is generated (default ~/.cache/effclip)
    synthetic_train: int = 6000  # synthetic training images
    synthetic_val: int = 2000  # synthetic held-out images (the query = gallery set)


@dataclass
class Training(Shared):
    """Flags of the two training commands (train-model, align)."""
    epochs: int = 0  # 0 = the recipe's: 100 (train-model), 80 (align)
    batch_size: int = 256  # per process
    lr: float = 0.0  # 0 = the recipe's: SGD 1.024 x batch/1024 (train-model), Adam 5e-4 (align)
    weight_decay: float = 2**-15  # both recipes: 3.05e-5
    warmup_epochs: float = 5  # linear warm-up, then cosine to zero
    label_smoothing: float = 0.1  # train-model and the CE term of align
    crop_scale: float = 0.08  # smallest area fraction of the random resized crop
    precision: str = "auto"  # auto (bf16 autocast on GPU, fp32 on CPU) | bf16 | fp32
    log_every: int = 50  # steps between log lines
    ckpt_every: int = 500  # steps between checkpoints (and one at the end)
    resume: str = "auto"  # 'auto' = the newest checkpoint in --out that reads (fresh if none), '' = fresh, or a path
    overwrite: bool = False  # start over in an --out that holds another run's checkpoints (they move to OUT/previous-N/)


@dataclass
class TrainModelConfig(Training):
    val_data: str = ""  # ImageFolder for top-1 at the end; empty = the synthetic held-out set if synthetic
    model: str = "resnet_tiny"  # resnet_tiny | resnet18 | resnet50 | torchvision:<name>, e.g. torchvision:vgg16
    embed_dim: int = 128  # embedding width (paper: 128)
    classes: int = 0  # train on the first N classes only (the old model: half); 0 = all
    bct: str = ""  # old model checkpoint -> BCT influence loss through its frozen classifier
    bct_weight: float = 1.0  # weight of the influence loss
    momentum: float = 0.875  # SGD momentum
    image_size: int = 224  # training/eval resolution (the synthetic world: 32)


@dataclass
class AlignConfig(Training):
    old: str = ""  # the old model (checkpoint or its run directory)
    new: str = ""  # the new model
    side_info: str = ""  # side-information model (a train-model run, ml-fct's imagenet_500_simclr.pt); '' = the old
    loss: str = "fastfill"  # fastfill (MSE + CE under sigma) | fct (MSE only, no sigma head)
    inner_dim: int = 2048  # width of the mixer MLP (paper: 2048)
    mu_uncertainty: float = 0.5  # the 0.5 of 0.5 exp(-s) L + 0.5 s


@dataclass
class BackfillConfig(Shared):
    old: str = ""  # the old model (checkpoint or its run directory)
    new: str = ""  # the new model
    align: str = ""  # the transformation; empty = none (old features as they are, e.g. after BCT)
    order: str = "sigma,random,distance"  # orderings to evaluate (sigma needs a fastfill --align)
    points: int = 22  # fractions i/(points-1), i = 0..points-1 (the official 22)


@dataclass
class Config(TrainModelConfig, AlignConfig, BackfillConfig):
    """Every flag: the no-command run (the whole pipeline) passes them on to its stages."""


# ---- 1. Embedding models: ResNet with a D-dim embedding and a bias-free 1x1-conv classifier (FCT layout) ------------
# apple/ml-fct's ResNet (models/resnet.py) is torchvision's with two changes: the last block of layer4 outputs
# `embed_dim` channels with a ReLU after it (`last_nonlin`), through a 1x1 conv + BN projection shortcut, and the
# classifier `fc` is a bias-free 1x1 conv on the pooled (B, D, 1, 1) feature. Its BasicBlock takes planes =
# embed_dim (both 3x3 convs that wide), its Bottleneck widens only the last 1x1 conv. The names are torchvision's
# (conv1, bn1, layer1.0.downsample.0, ...), so ml-fct's checkpoints load strictly (`fct_checkpoint`).


def embedding_block(block: nn.Module, embed_dim: int) -> nn.Module:
    """The same torchvision block (input, planes, stride) in ml-fct's embedding layout (see above)."""
    cin, planes, stride = block.conv1.in_channels, block.conv1.out_channels, block.stride
    down = (nn.Sequential(conv1x1(cin, embed_dim, stride), nn.BatchNorm2d(embed_dim))
            if stride != 1 or cin != embed_dim else None)
    if isinstance(block, BasicBlock):
        return BasicBlock(cin, embed_dim, stride, down)
    new = Bottleneck(cin, planes, stride, down)  # 1x1, 3x3, 1x1: the last maps planes -> embed_dim (not 4 planes)
    new.conv3, new.bn3 = conv1x1(planes, embed_dim), nn.BatchNorm2d(embed_dim)
    return new


def residual_sum(block: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """A torchvision block's output before its final ReLU (`last_nonlin=False`): branch + shortcut."""
    n = 3 if isinstance(block, Bottleneck) else 2
    out = x
    for i in range(1, n + 1):
        out = getattr(block, f"bn{i}")(getattr(block, f"conv{i}")(out))
        out = F.relu(out) if i < n else out
    return out + (x if block.downsample is None else block.downsample(x))


class ResNet(torchvision.models.resnet.ResNet):
    """(B, 3, H, W) -> (logits (B, classes), feature (B, D)). torchvision's ResNet with the FCT embedding
    block and classifier. `width`: the stem's width (stages are width x 1, 2, 4, 8, torchvision's 64 by
    default); `small_stem`: a 3x3/1 stem without max-pool for 32-px images (the CPU model)."""

    def __init__(self, layers, classes, embed_dim=128, width=64, bottleneck=True, small_stem=False,
                 last_nonlin=True):
        block = Bottleneck if bottleneck else BasicBlock
        # Built on a forked RNG, then initialised below: the weights drawn from a seed depend on the layout
        # only, not on how torchvision builds and initialises it.
        with torch.random.fork_rng(devices=[]):
            super().__init__(block, list(layers), num_classes=classes)
            if small_stem or width != 64:  # the CPU model: another stem, stages rebuilt by torchvision's code
                k, s = (3, 1) if small_stem else (7, 2)
                self.conv1, self.bn1 = nn.Conv2d(3, width, k, s, k // 2, bias=False), nn.BatchNorm2d(width)
                self.maxpool = nn.Identity() if small_stem else self.maxpool
                self.inplanes = width  # the input width of the next _make_layer
                for i, n in enumerate(layers):
                    setattr(self, f"layer{i + 1}", self._make_layer(block, width * 2**i, n, stride=1 if i == 0 else 2))
            self.layer4[-1] = embedding_block(self.layer4[-1], embed_dim)
            self.fc = nn.Conv2d(embed_dim, classes, 1, bias=False)
        # torchvision redraws every conv with kaiming_normal_(fan_out); apple/ml-fct keeps PyTorch's default
        # (kaiming_uniform_, a = sqrt 5), as did this file before it used torchvision: restored, in module order.
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                m.reset_parameters()
        self.embed_dim, self.last_nonlin = embed_dim, last_nonlin

    def forward(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4[:-1](self.layer3(self.layer2(self.layer1(x))))
        x = self.layer4[-1](x) if self.last_nonlin else residual_sum(self.layer4[-1], x)  # (B, D, h, w)
        feature = self.avgpool(x)  # (B, D, 1, 1)
        return self.fc(feature).flatten(1), feature.flatten(1)


class TorchvisionEmbedder(nn.Module):
    """Any torchvision classifier as an embedder: its trunk up to the input of its last linear layer, a
    linear projection to D with a ReLU (the FCT embedding), and the bias-free 1x1-conv classifier."""

    def __init__(self, name, classes, embed_dim=128):
        super().__init__()
        if name.lower() not in torchvision.models.list_models():
            C.fail(f"unknown torchvision model '{name}' (torchvision.models.list_models() names them)")
        self.trunk = torchvision.models.get_model(name, num_classes=1000)
        heads = [n for n, m in self.trunk.named_modules() if isinstance(m, nn.Linear)]
        if not heads:
            C.fail(f"torchvision model '{name}' has no linear classifier to replace by the embedding")
        width = self.trunk.get_submodule(heads[-1]).in_features
        parent, _, leaf = heads[-1].rpartition(".")
        setattr(self.trunk.get_submodule(parent) if parent else self.trunk, leaf, nn.Identity())
        self.embed = nn.Sequential(nn.Linear(width, embed_dim), nn.ReLU())
        self.fc = nn.Conv2d(embed_dim, classes, 1, bias=False)
        self.embed_dim = embed_dim

    def forward(self, x):
        feature = self.embed(self.trunk(x))  # (B, D)
        return self.fc(feature[:, :, None, None]).flatten(1), feature


# name -> (blocks per stage, stem width, bottleneck, small stem)
MODELS = {"resnet50": ((3, 4, 6, 3), 64, True, False), "resnet18": ((2, 2, 2, 2), 64, False, False),
          "resnet_tiny": ((1, 1, 1, 1), 16, False, True)}


def build_model(name: str, classes: int, embed_dim: int) -> nn.Module:
    if name.startswith("torchvision:"):
        return TorchvisionEmbedder(name.split(":", 1)[1], classes, embed_dim)
    if name not in MODELS:
        C.fail(f"unknown model '{name}'; choose one of {', '.join(MODELS)} or torchvision:<name>")
    layers, width, bottleneck, small = MODELS[name]
    return ResNet(layers, classes, embed_dim, width, bottleneck, small)


# ---- 2. The transformation h and its loss (Sec. 3; spec 2.1 and 3.2) ------------------------------------------------


class ConvBlock(nn.Module):
    """A 1x1 conv on a (B, C, 1, 1) feature (a linear layer), then BN and ReLU; no bias when BN follows."""

    def __init__(self, cin, cout, norm_act=True):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, 1, bias=not norm_act)
        self.normalizer = nn.BatchNorm2d(cout) if norm_act else None
        self.activation = nn.ReLU() if norm_act else None

    def forward(self, x):
        x = self.conv(x)
        return x if self.normalizer is None else self.activation(self.normalizer(x))


class Transformation(nn.Module):
    """h(old, side) -> (new-space feature (B, D_new), s (B, sigma_dim) or None). Branch p1 reads the old
    feature (D_old -> 2 D_old -> 2 D_new), p2 the side information (D_side -> 2 D_side -> 2 D_new), the mixer
    maps their concatenation through two inner layers to D_new. FastFill adds `sigma`, a linear head on the
    output that predicts s = log sigma^2, the item's alignment uncertainty. Without a side-information model
    the old feature feeds both branches, as in the released FastFill configs."""

    def __init__(self, d_old, d_new, d_side=None, inner=2048, sigma_dim=1):
        super().__init__()
        d_side = d_side or d_old
        self.p1 = nn.Sequential(ConvBlock(d_old, 2 * d_old), ConvBlock(2 * d_old, 2 * d_new))
        self.p2 = nn.Sequential(ConvBlock(d_side, 2 * d_side), ConvBlock(2 * d_side, 2 * d_new))
        self.mixer = nn.Sequential(ConvBlock(4 * d_new, inner), ConvBlock(inner, inner),
                                   ConvBlock(inner, d_new, norm_act=False))
        self.sigma = nn.Linear(d_new, sigma_dim) if sigma_dim else None

    def forward(self, old, side=None):
        side = old if side is None else side
        x = torch.cat([self.p1(old[:, :, None, None]), self.p2(side[:, :, None, None])], dim=1)  # (B, 4 D_new, 1, 1)
        h = self.mixer(x).flatten(1)  # (B, D_new)
        return h, (self.sigma(h) if self.sigma is not None else None)


def fastfill_loss(h, s, target, logits, labels, mu_uncertainty=0.5, smoothing=0.1, mu_disc=1.0):
    """Eq. 5 (spec 3.2): per item L_i = MSE(h_i, phi_new_i) (mean over D) + mu_disc * CE_ls(W_new h_i, y_i);
    with the uncertainty head, loss = mean_i(mu e^{-s_i} L_i + mu s_i) (Kendall & Gal's aleatoric weighting:
    hard items learn a large s, which down-weights them and costs mu s). s = None (FCT): mean_i L_i."""
    per = (h.float() - target.float()).pow(2).mean(dim=1)  # (B,)
    if mu_disc:
        per = per + mu_disc * F.cross_entropy(logits.float(), labels, label_smoothing=smoothing, reduction="none")
    if s is None:
        return per.mean()
    s = s.float().mean(dim=1)  # (B,); sigma_dim > 1: the mean over dimensions
    return (mu_uncertainty * torch.exp(-s) * per + mu_uncertainty * s).mean()


def fastfill_loss_reference(h, s, target, logits, labels, mu_uncertainty=0.5, smoothing=0.1, mu_disc=1.0):
    """The same, one item at a time with the smoothed cross-entropy written out:
    CE_ls = -(1 - eps) log p_y - eps/K sum_k log p_k."""
    total = 0.0
    for i in range(len(h)):
        mse = sum((float(a) - float(b)) ** 2 for a, b in zip(h[i], target[i])) / h.shape[1]
        logp = [v - math.log(sum(math.exp(u) for u in logits[i].tolist())) for v in logits[i].tolist()]
        ce = -(1 - smoothing) * logp[int(labels[i])] - smoothing / len(logp) * sum(logp)
        L, si = mse + mu_disc * ce, None if s is None else float(s[i].float().mean())
        total += L if si is None else mu_uncertainty * math.exp(-si) * L + mu_uncertainty * si
    return total / len(h)


def bct_loss(old_classifier: nn.Module, feature, labels, old_classes: int):
    """BCT's influence loss (Shen et al. 2020): the old model's frozen classifier applied to the new
    embedding, cross-entropy on the items of classes the old model knows."""
    seen = labels < old_classes
    if not seen.any():
        return feature.sum() * 0
    logits = old_classifier(feature[seen][:, :, None, None]).flatten(1)
    return F.cross_entropy(logits.float(), labels[seen])


# ---- 3. Retrieval metrics and backfilling (Sec. 4; spec 5.1) --------------------------------------------------------


@torch.no_grad()
def retrieval_metrics(query, gallery, labels, chunk: int = 1024) -> dict:
    """CMC top-1/top-5 and mAP (%) with query set = gallery set: query i never retrieves gallery item i.
    L2 distance; ties in the CMC ranking go to the lower gallery index (stable sort). mAP is sklearn's
    average_precision_score per query over the other N-1 items (score = -distance; tied scores form one
    threshold, so a tie of a positive and a negative counts as half a hit), averaged over the queries that
    have a positive. Distances are computed `chunk` queries at a time, so N x N never exists at once."""
    N = len(query)
    top1 = top5 = ap_sum = 0.0
    ap_n = 0
    for lo in range(0, N, chunk):
        q, idx = query[lo:lo + chunk].float(), torch.arange(lo, min(lo + chunk, N))
        d = torch.cdist(q, gallery.float())  # (c, N)
        d[torch.arange(len(q)), idx] = float("inf")  # self excluded
        d, order = d.sort(dim=1, stable=True)
        d, order = d[:, :-1], order[:, :-1]  # drop the self column, now last
        hit = (labels[order] == labels[idx][:, None]).float()  # (c, N-1), in ranked order
        top1 += hit[:, 0].sum().item()
        top5 += hit[:, :5].amax(dim=1).sum().item()
        # AP with ties: every item of a tie group takes the precision at the group's end.
        pos = torch.arange(N - 1).expand_as(d)
        is_end = torch.ones_like(hit, dtype=torch.bool)
        is_end[:, :-1] = d[:, 1:] != d[:, :-1]
        big = torch.full_like(pos, N)
        end = torch.where(is_end, pos, big).flip(1).cummin(dim=1).values.flip(1)  # group end per rank
        tp_at_end = hit.cumsum(dim=1).gather(1, end)
        n_pos = hit.sum(dim=1)
        ap = (hit * tp_at_end / (end + 1)).sum(dim=1) / n_pos.clamp(min=1)
        ap_sum += ap[n_pos > 0].sum().item()
        ap_n += int((n_pos > 0).sum())
    return {"top1": 100 * top1 / N, "top5": 100 * top5 / N, "mAP": 100 * ap_sum / max(1, ap_n)}


def backfill_order(kind: str, n: int, sigma=None, h=None, new=None, seed: int = 0) -> torch.Tensor:
    """Which gallery items are re-embedded first (spec 5.1): `sigma` (FastFill) the most uncertain first,
    free at update time; `random` (FCT/BCT); `distance` an oracle, the items worst aligned
    ||phi_new - h(phi_old)|| first (it needs the new features backfilling tries to avoid computing)."""
    if kind == "random":
        return torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    if kind == "sigma":
        if sigma is None:
            C.fail("--order sigma needs a FastFill transformation (--align trained with --loss fastfill)")
        return sigma.float().mean(dim=1).argsort(descending=True, stable=True)
    if kind == "distance":
        return (new.float() - h.float()).norm(dim=1).argsort(descending=True, stable=True)
    C.fail(f"unknown order '{kind}'; choose sigma, random or distance")


def backfill_curve(query, gallery_old, gallery_new, labels, order, points: int = 22) -> list[dict]:
    """The gallery starts as the transformed old features and has its first floor(i n / (points-1)) items
    in `order` replaced by new ones, i = 0..points-1; metrics at each fraction. AUC = their plain mean."""
    n, curve = len(labels), []
    for i in C.progress(range(points), "backfill"):
        k = i * n // (points - 1)
        gallery = gallery_old.clone()
        gallery[order[:k]] = gallery_new[order[:k]]
        curve.append({"fraction": k / n, **retrieval_metrics(query, gallery, labels)})
    return curve


def auc(curve: list[dict]) -> dict:
    return {f"auc_{m}": sum(p[m] for p in curve) / len(curve) for m in ("top1", "top5", "mAP")}


def plot_curves(curves: dict, metric: str, path: str, size=(640, 420)):
    """Backfilling curves as a PNG drawn with PIL: fraction backfilled (x) against `metric` (y)."""
    W, H, m = *size, 50
    img = Image.new("RGB", size, "white")
    dr = ImageDraw.Draw(img)
    ys = [p[metric] for c in curves.values() for p in c]
    lo, hi = math.floor(min(ys) - 1), math.ceil(max(ys) + 1)
    xy = lambda f, v: (m + f * (W - 2 * m), H - m - (v - lo) / (hi - lo) * (H - 2 * m))
    dr.rectangle([m, m, W - m, H - m], outline="black")
    for t in range(6):
        dr.text((m - 30, xy(0, lo + t * (hi - lo) / 5)[1] - 5), f"{lo + t * (hi - lo) / 5:.1f}", fill="black")
        dr.text((xy(t / 5, lo)[0] - 8, H - m + 6), f"{t / 5:.1f}", fill="black")
    colours = ["#d62728", "#1f77b4", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b"]
    for j, (name, c) in enumerate(curves.items()):
        dr.line([xy(p["fraction"], p[metric]) for p in c], fill=colours[j % 6], width=2)
        dr.text((m + 10, m + 8 + 14 * j), f"{name}  (AUC {auc(c)['auc_' + metric]:.1f})", fill=colours[j % 6])
    dr.text((W // 2 - 60, H - 22), "fraction backfilled", fill="black")
    dr.text((8, 8), metric + " (%)", fill="black")
    img.save(path)


# ---- 4. Data: ImageFolders (or the synthetic world written as ImageFolders) -----------------------------------------


class FolderImages(torch.utils.data.Dataset):
    """Map-style ImageFolder read by key (epoch, index). Train: random resized crop + flip seeded by (seed, epoch,
    index), independent of workers and resumes; eval (epoch < 0): ml-fct's Resize(256) + CenterCrop(224) (scaled
    to the size). An unreadable image becomes label -1 (ignored by the losses, counted) instead of a crash."""

    def __init__(self, items, size: int, seed: int = 0, scale: float = 0.08):
        self.items, self.size, self.seed, self.scale = items, size, seed, scale

    def __len__(self):
        return len(self.items)

    def __getitem__(self, key):
        epoch, i = key
        path, label = self.items[i]
        try:
            with open(path, "rb") as f:
                img = C.bytes_to_tensor(f.read())  # uint8 (3, H, W)
        except Exception:
            return torch.zeros(3, self.size, self.size, dtype=torch.uint8), -1
        if epoch < 0:  # eval, ml-fct's ImageNet one: shorter side to 256/224 of the size (bilinear), centre crop
            return TF.center_crop(TF.resize(img, round(self.size * 256 / 224), antialias=True), [self.size] * 2), label
        rng = random.Random(zlib.crc32(f"{self.seed}/{epoch}/{i}".encode()))
        x = C.image_to_uint8(img, self.size, C.random_resized_crop_box(*C.image_wh(img), rng, (self.scale, 1.0)),
                             Image.BILINEAR)
        return (x.flip(-1) if rng.random() < 0.5 else x), label


def synthetic_folders(cache_dir: str, n_train: int, n_val: int, size: int, seed: int = 0) -> tuple[str, str]:
    """The synthetic world (10 shape classes) as train and val ImageFolders, written once by rank 0."""
    root = os.path.join(cache_dir or os.path.join(os.path.expanduser("~"), ".cache", "effclip"),
                        f"fastfill-{C.SYNTH_VERSION}-{n_train}-{n_val}-{size}px-seed{seed}")
    if C.get_rank() == 0 and not os.path.exists(os.path.join(root, "DONE")):
        for split, n in (("train", n_train), ("val", n_val)):
            for name in C.SYNTH_SHAPES:
                os.makedirs(os.path.join(root, split, name), exist_ok=True)
            for s in C.progress(C.synthetic_split(seed, n, size, split), f"synthetic {split}", total=n):
                s["image"].save(os.path.join(root, split, C.SYNTH_SHAPES[s["label"]], s["key"] + ".png"))
        open(os.path.join(root, "DONE"), "w").write("ok\n")
    C.barrier()
    return os.path.join(root, "train"), os.path.join(root, "val")


def resolve_data(cfg: Shared, split: str) -> str:
    """--data, or the synthetic world's `split` folder (which also sets the 32-px image size)."""
    if cfg.data:
        return cfg.data
    train, val = synthetic_folders(cfg.cache_dir, cfg.synthetic_train, cfg.synthetic_val, 32, cfg.seed)
    return train if split == "train" else val


def to_input(x: torch.Tensor, device) -> torch.Tensor:
    """uint8 (B, 3, S, S) -> normalised float on the device (ImageNet mean/std), channels_last."""
    x = C.normalize_images(x.to(device, non_blocking=True), IMAGENET_MEAN, IMAGENET_STD)
    return x.contiguous(memory_format=torch.channels_last)


# ---- 5. Checkpoints of the three stages -----------------------------------------------------------------------------


def load_stage(path: str, kind: str, device) -> tuple[nn.Module, dict]:
    """A finished model/transformation from its checkpoint or run directory (the newest checkpoint that reads), or
    an apple/ml-fct backbone file (`fct_checkpoint`), frozen, in eval mode."""
    if os.path.isdir(path):
        ck = C.load_checkpoint("auto", path) or C.fail(f"no ckpt-*.pt in {path}")
    elif kind == "model" and is_torchscript(path):  # ml-fct exports TorchScript; its weights are all we read
        ck = {"model": torch.jit.load(path, map_location="cpu").state_dict()}
    else:
        ck = C.load_checkpoint(path, "")  # one line if unreadable
    if kind == "model" and "kind" not in ck:
        ck = fct_checkpoint(ck, path)
    if ck.get("kind") != kind:
        C.fail(f"{path} is not a {kind} checkpoint (kind {ck.get('kind')!r})")
    if kind == "model":
        m = build_model(ck["model_name"], ck["classes"], ck["embed_dim"])
    else:
        m = Transformation(ck["d_old"], ck["d_new"], ck.get("d_side"), ck["inner_dim"], ck["sigma_dim"])
    C.load_state_dict_checked(m, ck["model"], path)
    return m.to(device).eval().requires_grad_(False), ck


def is_torchscript(path: str) -> bool:
    """A zip archive with TorchScript's records (torch.jit.save), not a plain torch.save file."""
    import zipfile
    try:
        return any(n.endswith("/constants.pkl") for n in zipfile.ZipFile(path).namelist())
    except (zipfile.BadZipFile, OSError):
        return False


def fct_checkpoint(sd: dict, path: str) -> dict:
    """An apple/ml-fct ResNet-18/50 (its backbones and side-information models, e.g. imagenet_500_simclr.pt) as a
    train-model checkpoint: the weights (its TorchScript FeatureExtractor's under `model.`), the layout read from
    them, 224 px (ml-fct's ImageNet transform)."""
    sd = {k.removeprefix("model."): v for k, v in C.unwrap_state_dict(sd).items()}
    blocks = tuple(1 + max((int(k.split(".")[1]) for k in sd if k.startswith(f"layer{i}.")), default=-1)
                   for i in range(1, 5))
    name = {((2, 2, 2, 2), False): "resnet18", ((3, 4, 6, 3), True): "resnet50"}.get(
        (blocks, "layer1.0.conv3.weight" in sd))
    if name is None or getattr(sd.get("fc.weight"), "ndim", 0) != 4:
        C.fail(f"{path} is neither a fastfill.py checkpoint nor an ml-fct ResNet-18/50 (blocks {blocks})")
    classes, dim = sd["fc.weight"].shape[:2]
    return {"kind": "model", "model_name": name, "classes": classes, "embed_dim": dim, "image_size": 224, "model": sd}


def check_flags(cfg: Shared):
    """What the range checks of common.parse_config leave open, one line each, before any work."""
    bad = []  # (is it wrong, the line)
    if isinstance(cfg, Training):
        bad += [(cfg.precision not in ("auto", "bf16", "fp32"), f"--precision {cfg.precision}: auto, bf16 or fp32"),
                (cfg.weight_decay < 0, f"--weight-decay {cfg.weight_decay}: must be >= 0")]
    if isinstance(cfg, TrainModelConfig):
        bad += [(cfg.model not in MODELS and not cfg.model.startswith("torchvision:"),
                 f"unknown model '{cfg.model}'; choose one of {', '.join(MODELS)} or torchvision:<name>"),
                (cfg.embed_dim < 1, f"--embed-dim {cfg.embed_dim}: must be >= 1"),
                (cfg.image_size < 1, f"--image-size {cfg.image_size}: must be >= 1")]
    if isinstance(cfg, AlignConfig):
        bad += [(cfg.loss not in ("fastfill", "fct"), f"--loss must be fastfill or fct, not '{cfg.loss}'"),
                (cfg.inner_dim < 1, f"--inner-dim {cfg.inner_dim}: must be >= 1"),
                (cfg.mu_uncertainty <= 0, f"--mu-uncertainty {cfg.mu_uncertainty}: must be > 0")]
    if isinstance(cfg, BackfillConfig):
        orders = [o.strip() for o in cfg.order.split(",") if o.strip()]
        bad += [(not orders or bool(set(orders) - {"sigma", "random", "distance"}),
                 f"--order {cfg.order}: a comma-separated list of sigma, random, distance"),
                (cfg.points < 2, f"--points {cfg.points}: must be >= 2")]
    for wrong, line in bad:
        if wrong:
            C.fail(line)


def recipe(cfg: Training, stage: str) -> tuple[int, float]:
    """(epochs, peak lr) of the official recipes unless given: backbones SGD 1.024 at batch 1024 (scaled
    linearly with the global batch), 100 epochs; the transformation Adam 5e-4, 80 epochs."""
    gb = cfg.batch_size * C.get_world_size()
    if stage == "model":
        return cfg.epochs or 100, cfg.lr or 1.024 * gb / 1024
    return cfg.epochs or 80, cfg.lr or 5e-4


# ---- 6. Training: the backbones (train-model) and the transformation (align) ----------------------------------------


def classify(model: nn.Module, feature: torch.Tensor) -> torch.Tensor:
    """A model's bias-free 1x1-conv classifier on (B, D) features -> (B, classes) logits."""
    return model.fc(feature[:, :, None, None]).flatten(1)


def setup_stage(cfg: Training, stage: str, classes: int, classnames: list, device):
    """(trained module, optimizer, frozen helpers, checkpoint metadata) of one stage."""
    if stage == "model":
        model = build_model(cfg.model, classes, cfg.embed_dim).to(device, memory_format=torch.channels_last)
        # SGD on every parameter, as the FCT backbone configs (no exclusions from weight decay)
        opt = torch.optim.SGD(model.parameters(), lr=0.0, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
        helpers = {"old": load_stage(cfg.bct, "model", device) if cfg.bct else None}
        meta = {"kind": "model", "model_name": cfg.model, "classes": classes, "embed_dim": cfg.embed_dim,
                "classnames": classnames[:classes]}
        return model, opt, helpers, meta
    old, new = load_stage(cfg.old, "model", device), load_stage(cfg.new, "model", device)
    side = load_stage(cfg.side_info, "model", device) if cfg.side_info else None  # FCT's side-info model psi
    if new[1]["classes"] != classes:
        C.fail(f"the new model has {new[1]['classes']} classes, --data {classes}: align on the new model's data")
    sigma_dim, dims = 1 if cfg.loss == "fastfill" else 0, (old[1]["embed_dim"], new[1]["embed_dim"])
    model = Transformation(*dims, side and side[1]["embed_dim"], cfg.inner_dim, sigma_dim)
    opt = torch.optim.Adam(model.to(device).parameters(), lr=0.0, weight_decay=cfg.weight_decay)
    meta = {"kind": "align", "loss": cfg.loss, "d_old": dims[0], "d_new": dims[1], "inner_dim": cfg.inner_dim,
            "sigma_dim": sigma_dim, "d_side": side and side[1]["embed_dim"],
            "side_info": os.path.abspath(cfg.side_info) if side else ""}
    return model, opt, {"old": old, "new": new, "side": side}, meta


def unreadable(items, n: int = 100) -> str:
    """Why the first `n` images of [(path, label)] do not decode, by reason: for the one line of a run that
    found no readable image."""
    why = {}
    for path, _ in items[:n]:
        try:
            with open(path, "rb") as f:
                C.bytes_to_tensor(f.read())
        except Exception as e:
            why[type(e).__name__] = why.get(type(e).__name__, 0) + 1
    return f"reasons in the first {min(n, len(items))} tried: " + ", ".join(f"{k} {v}" for k, v in sorted(why.items()))


def train(cfg: Training, stage: str):
    """train-model (stage "model") or align (stage "align"): a flat step loop over epochs of an ImageFolder,
    linear warm-up + cosine, resumable at any step, SIGTERM-safe, DDP under torchrun, bf16 on GPU."""
    rank, local_rank, world, device = C.setup_distributed(cfg.device)
    check_flags(cfg)
    torch.manual_seed(cfg.seed)
    C.document_run(cfg.out, cfg, [__file__, C.__file__])  # claims --out (run.lock) before anything is written
    ck = C.load_checkpoint(cfg.resume, cfg.out)  # an unreadable --resume file: one line, before any work
    if ck is not None and (ck.get("kind") != ("model" if stage == "model" else "align") or ck.get("final")):
        C.fail(f"{cfg.resume if cfg.resume != 'auto' else cfg.out} holds a finished or different run; use a new "
               f"--out, or --resume '' --overwrite to start over")
    items, classnames = C.image_folder(resolve_data(cfg, "train"))
    # the held-out folder is resolved here, on every rank: resolve_data may wait at a barrier
    val_root = "" if stage != "model" else cfg.val_data or ("" if cfg.data else resolve_data(cfg, "val"))
    if stage == "model" and cfg.classes:  # the old model sees the first N classes only
        if cfg.classes > len(classnames):
            C.fail(f"--classes {cfg.classes} but --data has {len(classnames)} class folders")
        items = [(p, y) for p, y in items if y < cfg.classes]
    classes = cfg.classes if stage == "model" and cfg.classes else len(classnames)
    model, opt, helpers, meta = setup_stage(cfg, stage, classes, classnames, device)
    size = helpers["new"][1]["image_size"] if stage == "align" else (cfg.image_size if cfg.data else 32)
    meta["image_size"] = size
    epochs, peak_lr = recipe(cfg, stage)
    gb = cfg.batch_size * world
    per_epoch = max(1, len(items) // gb)
    steps = epochs * per_epoch
    warmup = int(round(cfg.warmup_epochs * steps / epochs))
    C.print0(f"{stage}: {len(items)} images of {classes} classes, {steps} steps of {gb} ({epochs} epochs), "
             f"peak lr {peak_lr:.4g}, {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters")
    log = C.RunLog(cfg.out)

    # ---- resume: the data position is the step (C.StepBatches) ---------------------------------------
    start = 0
    if ck is not None:
        C.load_state_dict_checked(model, ck["model"], f"checkpoint in {cfg.out}")
        opt.load_state_dict(ck["optimizer"])
        C.set_rng_state(ck["rng"])
        start = ck["step"]
        if start > steps:
            C.fail(f"the checkpoint is at step {start}, past this run's {steps} steps ({epochs} epochs)")
        C.print0(f"resumed at step {start}")
    data = FolderImages(items, size, cfg.seed, cfg.crop_scale)
    sampler = C.StepBatches(len(items), gb, start, steps, cfg.seed, rank, world)
    batches = iter(torch.utils.data.DataLoader(  # workers ignore SIGTERM/SIGINT: this process stops them
        data, batch_sampler=sampler, num_workers=cfg.workers, pin_memory=device.type == "cuda",
        worker_init_fn=C.ignore_stop_signals))
    ddp = DDP(model, device_ids=[local_rank] if device.type == "cuda" else None) if world > 1 else model
    bf16 = cfg.precision == "bf16" or (cfg.precision == "auto" and device.type == "cuda")
    stop, t0, bad = C.StopSignal(), time.time(), torch.zeros((), dtype=torch.long, device=device)
    seen, epoch_start = 0, (0, 0)  # images read by this rank; (seen, bad) when the epoch began
    path, stopping, last_step = None, False, False
    for step in C.progress(range(start, steps + 1), stage, initial=start, total=steps + 1):
        last_step = step == steps
        stopping = stop.requested if world == 1 else (step % cfg.log_every == 0 and stop.agreed(device))

        # ---- checkpoint (atomic; the last one is marked final) --------------------------------------
        if (last_step or stopping or step % cfg.ckpt_every == 0) and step > start:
            state = {**meta, "model": model.state_dict(), "optimizer": opt.state_dict(), "step": step,
                     "rng": C.rng_state(), "final": last_step, "config": dataclasses.asdict(cfg)}
            path = os.path.join(cfg.out, f"ckpt-{step}.pt")
            C.save_checkpoint(path, state)
            C.prune_checkpoints(cfg.out, 2, written=path)
        if last_step or stopping:
            break

        # ---- one step -----------------------------------------------------------------------------
        x, y = next(batches)
        x, y = to_input(x, device), y.to(device, non_blocking=True)
        ok = y >= 0  # unreadable images are label -1
        bad += (~ok).sum()  # on the device: no host sync
        seen += len(y)
        C.set_lr(opt, C.lr_at(step, peak_lr, warmup, steps))
        # align: the transformation's BN statistics are frozen for the second half (`switch_mode_to_eval`)
        ddp.train(stage == "model" or step < steps // 2)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            if stage == "model":
                logits, feature = ddp(x)
                loss = F.cross_entropy(logits[ok].float(), y[ok], label_smoothing=cfg.label_smoothing)
                if helpers["old"] is not None:  # BCT: stay readable by the old model's classifier
                    old, old_ck = helpers["old"]
                    loss = loss + cfg.bct_weight * bct_loss(old.fc, feature[ok], y[ok], old_ck["classes"])
            else:
                (old, _), (new, _), side = helpers["old"], helpers["new"], helpers["side"]
                with torch.no_grad():  # (B, D) each, frozen; no side-info model: the old feature feeds both branches
                    f_old, f_new = old(x)[1][ok], new(x)[1][ok]
                    f_side = side[0](x)[1][ok] if side else None
                h, s = ddp(f_old, f_side)
                loss = fastfill_loss(h, s, f_new, classify(new, h), y[ok], cfg.mu_uncertainty,
                                     cfg.label_smoothing, mu_disc=1.0 if cfg.loss == "fastfill" else 0.0)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        log_step = (step + 1) % cfg.log_every == 0
        if (step + 1) % per_epoch == 0 or (log_step and not math.isfinite(loss.item())):
            # a whole epoch without one readable image (its loss is NaN): one line with the reasons
            counts = torch.stack([torch.tensor(seen - epoch_start[0], device=device), bad - epoch_start[1]])
            if world > 1 and (step + 1) % per_epoch == 0:
                torch.distributed.all_reduce(counts)
            if counts[0] > 0 and counts[1] == counts[0]:
                C.fail(f"no readable image in epoch {step // per_epoch + 1}{'' if (step + 1) % per_epoch == 0 else ' so far'}"
                       f": all {int(counts[0])} failed to load; {unreadable(items)}")
            if (step + 1) % per_epoch == 0:
                epoch_start = (seen, int(bad))
        if log_step:
            if not math.isfinite(loss.item()):
                C.fail(f"non-finite loss at step {step}; the last good checkpoint in {cfg.out} is kept")
            log.log(step + 1, loss=loss.item(), lr=opt.param_groups[0]["lr"], epoch=(step + 1) * epochs / steps,
                    samples_per_s=cfg.log_every * gb / (time.time() - t0), unreadable=int(bad))
            t0 = time.time()

    # ---- the backbone's own check: top-1 on held-out images --------------------------------------------
    if stage == "model" and last_step and rank == 0 and val_root:
        val, _ = C.image_folder(val_root)
        val = [(p, y) for p, y in val if y < classes]
        feats, labels, logits = extract(model.eval(), val, size, device, workers=cfg.workers, logits=True)
        log.log(steps, top1=100 * (logits.argmax(1) == labels).float().mean().item(), val_images=len(val))
    if stopping and not last_step:
        C.print0(f"stopped by a signal at step {step}: --resume auto continues from {path}")
    C.finish_run(cfg.out, path)
    C.cleanup_distributed()


@torch.no_grad()
def extract(model: nn.Module, items, size: int, device, batch: int = 256, workers: int = 2, logits=False):
    """Features (N, D) and labels (N,) of an ImageFolder list, eval transform (and the logits if asked)."""
    data = FolderImages(items, size)
    keys = [[(-1, i) for i in range(lo, min(lo + batch, len(items)))] for lo in range(0, len(items), batch)]
    feats, labels, outs = [], [], []
    loader = torch.utils.data.DataLoader(data, batch_sampler=keys, num_workers=workers,
                                         worker_init_fn=C.ignore_stop_signals)
    for x, y in C.progress(loader, "embed"):
        out, f = model(to_input(x, device))
        feats.append(f.float().cpu())
        labels.append(y)
        outs.append(out.float().cpu())
    feats, labels = torch.cat(feats), torch.cat(labels)
    return (feats, labels, torch.cat(outs)) if logits else (feats, labels)


# ---- 7. Backfilling and its evaluation (spec 5.1) -------------------------------------------------------------------


def gallery_features(cfg: BackfillConfig, device) -> dict:
    """Old, new and transformed-old features (with sigma) of the query = gallery set."""
    old, old_ck = load_stage(cfg.old, "model", device)
    new, new_ck = load_stage(cfg.new, "model", device)
    align, a_ck = load_stage(cfg.align, "align", device) if cfg.align else (None, {})
    if "sigma" in cfg.order and a_ck.get("loss") != "fastfill":  # checked before the features are computed
        C.fail("--order sigma needs a FastFill transformation (--align trained with --loss fastfill)")
    if not cfg.align and old_ck["embed_dim"] != new_ck["embed_dim"]:
        C.fail(f"old ({old_ck['embed_dim']}-d) and new ({new_ck['embed_dim']}-d) features differ: pass --align")
    items, _ = C.image_folder(resolve_data(cfg, "val"))
    f_old, labels = extract(old, items, old_ck["image_size"], device, workers=cfg.workers)
    if not (labels >= 0).any():
        C.fail(f"no readable image in {cfg.data or 'the synthetic held-out set'}: all {len(labels)} failed to "
               f"load; {unreadable(items)}")
    f_new, _ = extract(new, items, new_ck["image_size"], device, workers=cfg.workers)
    h, sigma, name = f_old, None, "no transformation"
    if align is not None:  # h(old, side): the side-information model's features, or the old ones again
        side, side_ck = load_stage(a_ck["side_info"], "model", device) if a_ck.get("side_info") else (None, {})
        f_side = extract(side, items, side_ck["image_size"], device, workers=cfg.workers)[0] if side else f_old
        with torch.no_grad():
            h, sigma = (torch.cat(t) if t[0] is not None else None for t in zip(
                *(align(c.to(device), d.to(device)) for c, d in zip(f_old.split(1024), f_side.split(1024)))))
        h, sigma = h.cpu(), sigma.cpu() if sigma is not None else None
        name = "FastFill" if a_ck["loss"] == "fastfill" else "FCT"
    return {"old": f_old, "new": f_new, "h": h, "sigma": sigma, "labels": labels, "name": name}


def backfill(cfg: BackfillConfig) -> dict:
    """Evaluate backfilling: a retrieval curve per ordering (sigma, random, distance) and its area.

    Reference points (old/old, new/new, new queries against the un-backfilled gallery), then one backfilling
    curve per ordering, written to log.jsonl, curves.csv and a PNG per metric."""
    device = C.setup_distributed(cfg.device)[3]
    check_flags(cfg)
    if not (cfg.old and cfg.new):
        C.fail("backfill needs --old and --new (and --align for a transformation)")
    C.document_run(cfg.out, cfg, [__file__, C.__file__])
    g = gallery_features(cfg, device)
    labels, log = g["labels"], C.RunLog(cfg.out)
    ok = labels >= 0
    if not ok.all():
        C.print0(f"skipping {int((~ok).sum())} unreadable images")
        g = {k: (v[ok] if torch.is_tensor(v) else v) for k, v in g.items()}
        labels = g["labels"]
    refs = {"old/old": retrieval_metrics(g["old"], g["old"], labels),
            "new/new": retrieval_metrics(g["new"], g["new"], labels)}
    for name, r in refs.items():
        log.log(0, setting=name, **r)
    curves = {}
    for kind in [o.strip() for o in cfg.order.split(",") if o.strip()]:
        order = backfill_order(kind, len(labels), g["sigma"], g["h"], g["new"], cfg.seed)
        curves[f"{g['name']} {kind}"] = backfill_curve(g["new"], g["h"], g["new"], labels, order, cfg.points)
    write_curves(curves, refs, cfg.out, log)
    C.finish_run(cfg.out, extra=f"curves {os.path.join(cfg.out, 'curves.csv')}, plots {cfg.out}/backfill_*.png")
    return {"refs": refs, "curves": curves}


def write_curves(curves: dict, refs: dict, out: str, log):
    """The summary lines, curves.csv (setting, fraction, top1, top5, mAP) and one PNG per metric."""
    if C.get_rank() != 0:
        return
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "curves.csv"), "w") as f:
        f.write("setting,fraction,top1,top5,mAP\n")
        for name, c in curves.items():
            for p in c:
                f.write(f"{name},{p['fraction']:.4f},{p['top1']:.3f},{p['top5']:.3f},{p['mAP']:.3f}\n")
    for name, c in curves.items():
        log.log(len(c) - 1, setting=name, no_backfill_mAP=c[0]["mAP"], **auc(c))
    for metric in ("mAP", "top1"):
        plot_curves(curves, metric, os.path.join(out, f"backfill_{metric}.png"))
    C.print0("\n" + f"{'setting':28s} {'top1':>6s} {'top5':>6s} {'mAP':>6s}   (AUC over the backfilling curve)")
    for name, r in refs.items():
        C.print0(f"{name:28s} {r['top1']:6.1f} {r['top5']:6.1f} {r['mAP']:6.1f}")
    for name, c in curves.items():
        a = auc(c)
        C.print0(f"{name:28s} {a['auc_top1']:6.1f} {a['auc_top5']:6.1f} {a['auc_mAP']:6.1f}")


# ---- 8. The no-argument run: the whole comparison on the synthetic world --------------------------------------------


def demo(cfg: Config):
    """The whole comparison on the synthetic world: what `python fastfill.py` with no command runs.

    Old model on the first half of the classes, new model on all, FastFill and FCT transformations, then
    backfilling curves: FastFill in sigma / random / distance-oracle order and FCT in random order. Finished
    stages in --out are reused, so an interrupted demo continues where it stopped (--overwrite: starts over)."""
    C.document_run(cfg.out, cfg, [__file__, C.__file__])
    # 32-px images: crops below a third of the area would often cut the shape away
    small = dict(epochs=cfg.epochs or 20, resume="" if cfg.overwrite else "auto", image_size=32,
                 crop_scale=max(cfg.crop_scale, 0.35))
    sub = lambda name, **kw: dataclasses.replace(cfg, out=os.path.join(cfg.out, name), **{**small, **kw})
    n_old = len(C.SYNTH_SHAPES) // 2
    for name, stage, kw in (("old", "model", dict(classes=n_old)), ("new", "model", dict(classes=0)),
                            ("fastfill", "align", dict(loss="fastfill", epochs=cfg.epochs or 15)),
                            ("fct", "align", dict(loss="fct", epochs=cfg.epochs or 15))):
        c = sub(name, old=os.path.join(cfg.out, "old"), new=os.path.join(cfg.out, "new"), **kw)
        if cfg.overwrite or not ((ck := C.load_checkpoint("auto", c.out)) and ck.get("final")):
            C.print0(f"---- {name} ({stage}) -> {c.out}")
            train(c, stage)
    curves, refs = {}, {}
    for name, orders in (("fastfill", "sigma,random,distance"), ("fct", "random")):
        c = sub(f"backfill_{name}", old=os.path.join(cfg.out, "old"), new=os.path.join(cfg.out, "new"),
                align=os.path.join(cfg.out, name), order=orders)
        r = backfill(c)
        curves.update(r["curves"]), refs.update(r["refs"])
    C.print0("\n==== all settings ====")
    write_curves(curves, refs, cfg.out, C.RunLog(cfg.out))
    C.finish_run(cfg.out, extra=f"curves {os.path.join(cfg.out, 'curves.csv')}, plots {cfg.out}/backfill_*.png, "
                                f"stages {cfg.out}/{{old,new,fastfill,fct}}")


def train_model(cfg: TrainModelConfig):
    """Train an embedding model: the old one (--classes N), the new one, or a BCT one (--bct OLD).

    torchvision's ResNet with FCT's D-dim embedding and bias-free classifier (or any torchvision classifier),
    SGD with warm-up + cosine and label smoothing, resumable at any step (--resume auto, the default),
    SIGTERM-safe (a checkpoint at the current step, exit 0), DDP under torchrun, bf16 on GPU."""
    return train(cfg, "model")


def train_align(cfg: AlignConfig):
    """Train the transformation h from the old model's features to the new one's (FastFill, or --loss fct).

    The old and new models stay frozen; Adam with warm-up + cosine, BN frozen for the second half; resumable
    and SIGTERM-safe as train-model."""
    check_flags(cfg)
    if not (cfg.old and cfg.new):
        C.fail("align needs --old and --new model checkpoints (fastfill.py train-model)")
    return train(cfg, "align")


def main(argv=None):
    """`fastfill.py [train-model|align|backfill|demo] [flags]`: flags alone run the demo."""
    return C.run_command(__doc__, {"train-model": (train_model, TrainModelConfig), "align": (train_align, AlignConfig),
                                   "backfill": (backfill, BackfillConfig), "demo": (demo, Config)}, argv, default="demo")


if __name__ == "__main__":
    main()
