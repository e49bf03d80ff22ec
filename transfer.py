"""Knowledge Transfer from Vision Foundation Models for Efficient Training of Small Task-specific Models
(arXiv 2311.18237, ICML 2024, Vemulapalli, Pouransari, Faghri, Mehta, Farajtabar, Rastegari, Tuzel; Apple).

A large vision foundation model (VFM) knows a lot, a small deployable model little, and the target task has only a few
labels. Task-oriented knowledge transfer: (1) fine-tune the VFM with a task head on the few labels, (2) distil that
teacher into the small model on a large *unlabelled* transfer set (KL between the teacher's and the student's softmax
outputs, per image or per pixel), (3) fine-tune the small model on the labels. Without a large in-domain unlabelled
set, the transfer set is *retrieved*: the labelled images are queries, a web-scale pool is searched by image-embedding
cosine similarity, and the union of every query's neighbours is the transfer set.

What is here: `retrieve` (exact chunked top-k over the pool, split over ranks and workers, written as shards: the
de-duplicated union, or the paper's size rule `--transfer-size`; `--random-size`: the random-subset baseline),
`teacher`, `distill` and `finetune` for classification and semantic segmentation (mIoU on whole images), on shards or
apple/ml-vfm-kt's split and retrieved-image lists (read_list). VFMs: this repo's CLIP ViTs and MCi towers, OpenAI /
OpenCLIP ViT state dicts, SAM-CLIP; small models: MCi (mci0-4, mci_tiny), torchvision's `.features` models by name;
baselines: task-agnostic feature distillation (`--kd features`: contrastive on the pooled embedding, per-patch cosine
for segmentation), fine-tuning from scratch, CLIP pre-training or ImageNet weights (`--init imagenet[=FILE.pth]`). Not
here: DINOv2 (not in torch/torchvision), DeepLabV3 heads (a light FPN-style head), the paper's schedules (not public).

Paper -> code:
  step 1, fine-tune the VFM with a task head           -> `teacher` (linear-probe warm-up, backbone at 0.1x lr)
  step 2, KD on the transfer set, no labels            -> `distill --kd task`, kd_loss (reference: kd_loss_reference)
          per-pixel KD, student resized to teacher grid -> kd_loss on (B, K, h, w)
  step 3, fine-tune the small model on the labels      -> `finetune --init <distill run>`
  retrieval-augmented transfer set (Sec. 5)            -> `retrieve`, nearest_neighbours, merge_topk
  task-agnostic VFM distillation (baseline)            -> `distill --kd features`, feature_kd_loss
  ImageNet / CLIP pre-training baselines               -> `finetune --init imagenet[=FILE] | clip.pt`
  top-1 / mIoU (whole images, sliding windows)         -> evaluate, slide_logits (common.confusion_matrix, miou)

Commands:
  python transfer.py --foundation runs/mobileclip --pool-shards 2 --pool-offdomain 0.8 --per-query 40 \\
      --batch-size 32 --warmup 20      # the whole comparison on the synthetic world, CPU (40 min)
  torchrun --nproc_per_node=8 transfer.py retrieve --queries labelled/ --pool 'pool/{00000..09999}.tar' \\
      --encoder clip.pt --per-query 100 --out transfer_set/
  torchrun --nproc_per_node=8 transfer.py teacher --foundation ViT-L-14.pt --data labelled/ --test test/ \\
      --num-classes 10 --out runs/teacher
  torchrun --nproc_per_node=8 transfer.py distill --teacher runs/teacher --data transfer_set/ \\
      --student torchvision:mobilenet_v3_large --num-classes 10 --steps 20000 --out runs/kd
  # ADE20K from ml-vfm-kt's lists (D=ml-vfm-kt/datasplits/ADE20K, A=ADEChallengeData2016): teacher --task seg
  #   --num-classes 150 --reduce-zero-label --data $D/train_1200img.txt@$A --test $D/test.txt@$A, then distill
  #   --data $D/yfcc_retrieved_images_with_1200query.txt@yfcc15m/ and finetune as below
  torchrun --nproc_per_node=8 transfer.py finetune --init runs/kd --data labelled/ --test test/ \\
      --student torchvision:mobilenet_v3_large --num-classes 10 --out runs/ft

Data: tar shards, {key}.jpg|png + {key}.json {"label": k} or {key}.seg.png (--task seg: 0 = background, 1..K the
classes, 255 ignored, other values background); or an apple/ml-vfm-kt list, LIST.txt@IMAGE_ROOT (read_list).

Result (README.md "Knowledge transfer", loaded 2-core CPU; 3 of the 10 shapes, 10 labels each, chance 33.3%): on a
pool 80% off-domain, KD on the retrieved set (60% in-task) 59.2 / 59.9 / 61.9 top-1 (seeds 0-2) vs 45.5 / 40.5 / 40.5 on
a random set as large and 40.1 / 45.2 / 44.1 with the labels only: the paper's retrieval gain, beyond the seed spread.
"""
from __future__ import annotations

import dataclasses
import functools
import io
import itertools
import json
import math
import os
import time
import zlib
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
import torchvision
import torchvision.transforms.v2.functional as TF
from PIL import Image, ImageDraw
from torch.nn.parallel import DistributedDataParallel as DDP

import common as C

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


@dataclass
class Shared:  # one dataclass per command (its --help lists its own flags only); the demo's Config has them all
    out: str = "runs/transfer"  # run directory: config.json, log.jsonl, checkpoints (retrieve: the shards)
    image_size: int = 0  # data resolution; 0 = 224 (the synthetic world: 64)
    batch_size: int = 64  # per process
    seed: int = 0  # model init, data order, augmentation
    workers: int = 2  # DataLoader worker processes per rank
    device: str = "auto"  # auto | cuda | cpu

@dataclass
class RetrieveConfig(Shared):
    queries: str = ""  # the labelled target images (shards): the queries
    pool: str = ""  # the unlabelled pool (shards), e.g. DataComp
    encoder: str = ""  # the frozen image encoder (same kinds as --foundation)
    act: str = "gelu"  # MLP activation of an OpenAI/OpenCLIP ViT (quick_gelu for OpenAI's weights)
    per_query: int = 100  # neighbours per query (balanced: every query gets the same number), their union kept
    transfer_size: int = 0  # instead the paper's size rule: k = N // Q per query, duplicates kept (Q x k samples)
    random_size: int = 0  # instead draw this many pool images uniformly at random (the baseline)
    shard_size: int = 5000  # samples per written shard

@dataclass
class TrainConfig(Shared):
    task: str = "cls"  # cls (image classification) | seg (semantic segmentation)
    num_classes: int = 10  # classes of the target task: labels 0..K-1 (seg: mask values 1..K, 0 = background)
    data: str = ""  # teacher/finetune: the labelled target shards; distill: the transfer set (labels unused)
    test: str = ""  # held-out labelled shards for top-1 / mIoU at the end; empty = no evaluation
    steps: int = 0  # 0 = the stage's default (the CPU demo's): teacher 150, distill 400, finetune 150
    lr: float = 0.0  # peak AdamW lr; 0 = the stage's default: teacher 1e-3, distill 2e-3, finetune 2e-3
    weight_decay: float = 0.05  # decoupled weight decay (not on norms, biases, embeddings)
    warmup: int = 50  # linear warm-up steps, then cosine to zero
    grad_clip: float = 1.0  # global gradient-norm clip; 0 = off
    crop_scale: float = 0.5  # smallest area fraction of the random resized crop (teacher, student: the same view)
    shuffle_buffer: int = 2000  # samples in each worker's shuffle buffer
    precision: str = "auto"  # auto (bf16 autocast on GPU, fp32 on CPU) | bf16 | fp32
    log_every: int = 50  # steps between log lines
    ckpt_every: int = 500  # steps between checkpoints (and one at the end)
    keep_ckpts: int = 2  # newest checkpoints kept
    resume: str = "auto"  # 'auto' = the newest readable checkpoint in --out (fresh if none), '' = fresh, or a path
    overwrite: bool = False  # start over in an --out holding another run's checkpoints (they move to OUT/previous-N/)
    reduce_zero_label: bool = False  # seg: mask value 0 is "other", ignored (ADE20K as mmsegmentation prepares it)

@dataclass
class TeacherConfig(TrainConfig):
    foundation: str = ""  # the VFM to fine-tune (mobileclip.py / samclip.py run or checkpoint, OpenCLIP ViT)
    act: str = "gelu"  # MLP activation of an OpenAI/OpenCLIP ViT foundation (quick_gelu for OpenAI's weights)
    backbone_lr_mult: float = 0.1  # the VFM backbone's lr relative to the head's
    probe_steps: int = 50  # steps with the backbone frozen (linear-probe warm-up) before the full fine-tune

@dataclass
class DistillConfig(TrainConfig):
    student: str = "mci_tiny"  # small model: mci0..mci4 | mci_tiny | torchvision:<name> (e.g. mobilenet_v3_large)
    kd: str = "task"  # task (KL on the teacher's outputs) | features (task-agnostic, the frozen VFM)
    teacher: str = ""  # --kd task: the fine-tuned teacher (a `teacher` run directory or checkpoint)
    temperature: float = 1.0  # KD temperature T; the loss is multiplied by T^2
    foundation: str = ""  # --kd features: the frozen VFM whose features are distilled
    act: str = "gelu"  # MLP activation of an OpenAI/OpenCLIP ViT foundation (quick_gelu for OpenAI's weights)

@dataclass
class FinetuneConfig(TrainConfig):
    student: str = "mci_tiny"  # small model: mci0..mci4 | mci_tiny | torchvision:<name> (e.g. mobilenet_v3_large)
    init: str = ""  # '' (scratch) | a distill run/ckpt | a mobileclip.py ckpt (CLIP) | imagenet[=FILE.pth]

@dataclass
class Config(RetrieveConfig, TeacherConfig, DistillConfig, FinetuneConfig):
    foundation: str = ""  # the VFM (mobileclip.py / samclip.py run, OpenCLIP ViT); empty = a tiny CLIP trained first
    init: str = ""  # a mobileclip.py mobileclip_tiny run: adds the CLIP pre-training + fine-tune arm
    cache_dir: str = ""  # where the synthetic world is generated (default ~/.cache/effclip)
    synthetic_train: int = 40000  # synthetic training images: the pool (and the CLIP's pre-training set)
    synthetic_val: int = 1000  # synthetic held-out images: the test set
    shots: int = 10  # labelled images per class
    demo_classes: int = 3  # the task's classes (the pool holds all 10 shapes: random sets are mostly off-task)
    pool_shards: int = 0  # the first N training shards form the pool; 0 = all
    pool_offdomain: float = 0.0  # this fraction of the pool is off-domain clutter images (web-like); 0 = none
    clip_steps: int = 800  # without --foundation: steps of the tiny CLIP trained as the VFM


# ---- 1. Models: the VFM (teacher backbone), the small target models, task heads --------------------------------------
# Every model normalises (a VFM: and resizes) the same uint8 view (B, 3, S, S) itself, so teacher and student see the
# same augmented pixels (spec 6). A backbone returns (pooled (B, D), [maps (B, C_i, h_i, w_i), finest first]).

def to_input(x: torch.Tensor, size: int, mean, std) -> torch.Tensor:
    """uint8 (B, 3, s, s) -> float at size x size, normalised."""
    if x.shape[-1] != size:
        x = F.interpolate(x.float(), size=(size, size), mode="bicubic", antialias=True).clamp(0, 255)
    return C.normalize_images(x, mean, std)  # -> float

class Foundation(nn.Module):
    """A VFM image encoder. kind 'vit': common.ViT (pooled = the CLIP embedding, map = the patch grid); 'sam':
    SAM-CLIP (its CLIP head, the encoder tokens before the neck); 'mci': a MobileCLIP's MCi (embedding, last stage)."""

    def __init__(self, encoder: nn.Module, kind: str, size: int, mean, std):
        super().__init__()
        self.encoder, self.kind, self.size, self.mean, self.std = encoder, kind, size, tuple(mean), tuple(std)
        self.dims = output_dims(self)  # (pooled D, [C_i of each map])

    def forward(self, x):
        x, e = to_input(x, self.size, self.mean, self.std), self.encoder
        if self.kind == "vit":
            t = e.forward_tokens(x)  # (B, 1 + N, W)
            g = int(math.isqrt(t.shape[1] - 1))
            return t[:, 0] @ e.proj, [t[:, 1:].transpose(1, 2).reshape(len(x), -1, g, g)]  # (B, E), (B, W, g, g)
        if self.kind == "sam":
            t = e.image_encoder.forward_tokens(x)  # (B, h, w, C)
            return e.clip_head(t), [t.permute(0, 3, 1, 2)]
        maps = mci_stages(e, x)
        return e.head(e.conv_exp(maps[-1])), maps[-1:]

@torch.no_grad()
def output_dims(backbone: nn.Module, size: int = 64) -> tuple[int, list[int]]:
    """(pooled width, [channels of each map]) from one dummy image, in eval mode (BN statistics untouched)."""
    was = backbone.training
    pooled, maps = backbone.eval()(torch.zeros(1, 3, size, size, dtype=torch.uint8))
    backbone.train(was)
    return pooled.shape[1], [m.shape[1] for m in maps]

def mci_stages(mci: nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    """The output of every stage of an MCi tower: strides 4, 8, 16, 32 (MCi3/4: and 64)."""
    x, maps = mci.patch_embed(x), []
    for m in mci.network:
        x = m(x)
        if isinstance(m, nn.Sequential):  # a stage's blocks (PatchEmbed and RepCPE are not Sequential)
            maps.append(x)
    return maps

def read_checkpoint(path: str, flag: str) -> dict:
    """A checkpoint file, or a run directory's newest checkpoint that reads; else one line naming `flag`."""
    if not path:
        C.fail(f"{flag} is needed (a checkpoint or run directory)")
    if os.path.isdir(path):
        return C.load_checkpoint("auto", path) or C.fail(f"{flag} {path}: no ckpt-*.pt in that directory")
    try:
        return C.read_checkpoint(path)
    except (ValueError, OSError) as e:  # a missing file: OSError
        C.fail(f"{flag}{'' if flag.endswith('=') else ' '}{path}: " +
               (f"cannot read it ({e})" if os.path.isfile(path) else "file not found"))

def load_foundation(path: str, act: str = "gelu", flag: str = "--foundation") -> Foundation:
    """A VFM from a mobileclip.py checkpoint (CLIP ViT or MobileCLIP), a samclip.py SAM-CLIP checkpoint,
    or an OpenAI/OpenCLIP ViT state dict; only its image side is kept."""
    ck = read_checkpoint(path, flag)
    sd = ck.get("model") if isinstance(ck.get("model"), dict) else ck
    if any(k.startswith("image_encoder.") for k in sd):  # SAM-CLIP
        import samclip
        sam = samclip.load_sam(path, with_clip_head=True, ck=ck)
        del sam.prompt_encoder, sam.mask_decoder, sam.image_encoder.neck  # the CLIP branch only
        norm = [m / 255 for m in samclip.SAM_MEAN], [s / 255 for s in samclip.SAM_STD]
        return Foundation(sam, "sam", sam.image_encoder.img_size, *norm)
    if "model_name" in ck and "vocab_size" in ck:  # mobileclip.py
        import mobileclip as MC
        clip = MC.build_model(MC.Config(model=ck["model_name"], act=ck.get("config", {}).get("act", "gelu")),
                              ck["vocab_size"])
        C.load_state_dict_checked(clip, ck["model"], f"{flag} {path}")
        spec, v = MC.model_spec(ck["model_name"]), clip.visual
        kind = "vit" if isinstance(v, C.ViT) else "mci" if isinstance(v, MC.MCi) else None
        if kind is None:
            C.fail(f"{flag} {path}: the image tower of {ck['model_name']} is not supported as a VFM (ViT or MCi)")
        return Foundation(v, kind, spec["image_size"], spec["mean"], spec["std"])
    sd = C.unwrap_state_dict(sd)
    if not any(k.startswith("visual.") for k in sd):
        C.fail(f"{flag} {path} is neither a mobileclip.py / samclip.py checkpoint nor an OpenAI/OpenCLIP state dict")
    v = C.clip_from_openclip(sd, act=act).visual
    return Foundation(v, "vit", v.image_size, C.CLIP_MEAN, C.CLIP_STD)

class MCiBackbone(nn.Module):
    """An MCi image tower without its projection head: pooled = mean of `conv_exp` (B, 2 C_last)."""

    def __init__(self, name: str):
        super().__init__()
        import mobileclip as MC
        if name not in MC._MCI:
            C.fail(f"unknown student '{name}'; choose one of {', '.join(MC._MCI)} or torchvision:<name>")
        self.mci = MC.MCi(**MC._MCI[name], embed_dim=1)
        self.mci.head = None  # the CLIP projection is not part of a task model
        MC.init_weights(self.mci)
        self.mean, self.std = (MC.MOBILECLIP_MODELS["mobileclip_s0"][k] for k in ("mean", "std"))  # v1's: none

    def forward(self, x):
        maps = mci_stages(self.mci, to_input(x, x.shape[-1], self.mean, self.std))
        return self.mci.conv_exp(maps[-1]).mean((2, 3)), maps[1:]  # (B, 2C), the maps at strides 8, 16, 32

class TorchvisionBackbone(nn.Module):
    """A torchvision classifier's `.features` trunk; the maps are the last of each resolution. weights: None (random),
    "DEFAULT" (torchvision's ImageNet weights) or a .pth of the whole classifier (mobilenet_v3_large-8738ca79.pth)."""

    def __init__(self, name: str, weights: str | None = None):
        super().__init__()
        if name not in (zoo := torchvision.models.list_models(module=torchvision.models)):  # classifiers only
            C.fail(f"torchvision has no classifier '{name}'; e.g. {', '.join(n for n in zoo if 'mobilenet' in n)}")
        try:  # "DEFAULT": torchvision's ImageNet weights, downloaded once into TORCH_HOME
            m = torchvision.models.get_model(name, weights="DEFAULT" if weights == "DEFAULT" else None)
        except Exception as e:  # offline, a proxy, a corrupt cached file
            C.fail(f"--init imagenet: torchvision could not fetch the {name} weights ({type(e).__name__}: "
                   f"{str(e)[:150]}); download them and pass --init imagenet=FILE")
        if not hasattr(m, "features"):
            C.fail(f"torchvision:{name} has no `.features` trunk; use a MobileNet, EfficientNet or MNASNet")
        if weights not in (None, "DEFAULT"):  # strict; BN step counters (unused) missing from old files: the model's
            own = {k: v for k, v in m.state_dict().items() if k.endswith("num_batches_tracked")}
            sd = {**own, **C.unwrap_state_dict(read_checkpoint(weights, "--init imagenet="))}
            C.load_state_dict_checked(m, sd, f"--init imagenet={weights} (torchvision:{name})")
        self.features, self.mean, self.std = m.features, IMAGENET_MEAN, IMAGENET_STD

    def forward(self, x):
        x, maps = to_input(x, x.shape[-1], self.mean, self.std), []
        for layer in self.features:
            x = layer(x)
            if maps and x.shape[-1] == maps[-1].shape[-1]:
                maps[-1] = x  # the same resolution: keep its last map
            else:
                maps.append(x)
        return x.mean((2, 3)), maps[-2:]  # (B, C), the stride-16 and stride-32 maps

def imagenet_weights(init: str) -> str | None:
    """--init imagenet -> "DEFAULT" (downloaded by torchvision), imagenet=FILE -> FILE, anything else -> None."""
    return "DEFAULT" if init == "imagenet" else init.split("=", 1)[1] if init.startswith("imagenet=") else None

def build_backbone(name: str, weights: str | None = None) -> nn.Module:
    if name.startswith("torchvision:"):
        return TorchvisionBackbone(name.split(":", 1)[1], weights)
    if weights:
        C.fail(f"no ImageNet weights for '{name}' here; use --student torchvision:<name> --init imagenet[=FILE]")
    return MCiBackbone(name)

class SegHead(nn.Module):
    """A light FPN-style head (design choice; the paper's is DeepLabV3-like): 1x1 lateral convs to `width`,
    upsampled to the finest map and summed, 3x3 conv + BN + ReLU, 1x1 classifier -> (B, K + 1, h, w)."""

    def __init__(self, dims: list[int], classes: int, width: int = 64):
        super().__init__()
        self.lateral = nn.ModuleList(nn.Conv2d(d, width, 1) for d in dims)
        self.fuse = nn.Sequential(nn.Conv2d(width, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU())
        self.classifier = nn.Conv2d(width, classes, 1)

    def forward(self, maps):
        size = maps[0].shape[-2:]
        x = sum(F.interpolate(l(m), size=size, mode="bilinear", align_corners=False) if m.shape[-2:] != size else l(m)
                for l, m in zip(self.lateral, maps))
        return self.classifier(self.fuse(x))

class TaskModel(nn.Module):
    """backbone + task head: (B, K) logits (a linear head on the pooled feature) or (B, K + 1, h, w)."""

    def __init__(self, backbone: nn.Module, task: str, num_classes: int):
        super().__init__()
        self.backbone, self.task, (pooled, maps) = backbone, task, output_dims(backbone)
        self.head = nn.Linear(pooled, num_classes) if task == "cls" else SegHead(maps, num_classes + 1)

    def forward(self, x):
        pooled, maps = self.backbone(x)
        return self.head(pooled if self.task == "cls" else maps)

class FeatureDistiller(nn.Module):
    """Task-agnostic transfer: the student and linear maps of its pooled feature (seg: and finest map) to the VFM's."""

    def __init__(self, backbone: nn.Module, vfm_dims, task: str):
        super().__init__()
        self.backbone, (pooled, maps) = backbone, output_dims(backbone)
        self.proj = nn.Linear(pooled, vfm_dims[0])
        self.proj_dense = nn.Conv2d(maps[0], vfm_dims[1][0], 1) if task == "seg" else None

    def forward(self, x):
        pooled, maps = self.backbone(x)
        return self.proj(pooled), (self.proj_dense(maps[0]) if self.proj_dense is not None else None)


# ---- 2. Losses: KD on the teacher's outputs (step 2), task-agnostic feature distillation, the task loss --------------

def kd_loss(student: torch.Tensor, teacher: torch.Tensor, T: float = 1.0) -> torch.Tensor:
    """KL(p_teacher || p_student) of the softmax at temperature T over dim 1, times T^2 (Hinton et al. 2015), averaged
    over images (and pixels of (B, K, h, w) maps, the student's resized to the teacher's grid first). fp32."""
    if student.dim() == 4 and student.shape[-2:] != teacher.shape[-2:]:
        student = F.interpolate(student.float(), size=teacher.shape[-2:], mode="bilinear", align_corners=False)
    log_ps, log_pt = F.log_softmax(student.float() / T, dim=1), F.log_softmax(teacher.float() / T, dim=1)
    return (log_pt.exp() * (log_pt - log_ps)).sum(dim=1).mean() * T * T

def kd_loss_reference(student: torch.Tensor, teacher: torch.Tensor, T: float = 1.0) -> float:
    """The same, one image (and one pixel) at a time in plain Python: sum_k p_k (log p_k - log q_k)."""
    if student.dim() == 2:
        student, teacher = student[:, :, None, None], teacher[:, :, None, None]
    terms = []
    for b, i, j in itertools.product(range(student.shape[0]), range(student.shape[2]), range(student.shape[3])):
        s, t = [float(v) / T for v in student[b, :, i, j]], [float(v) / T for v in teacher[b, :, i, j]]
        ls, lt = math.log(sum(math.exp(v) for v in s)), math.log(sum(math.exp(v) for v in t))
        terms.append(sum(math.exp(tk - lt) * ((tk - lt) - (sk - ls)) for sk, tk in zip(s, t)))
    return sum(terms) / len(terms) * T * T

def feature_kd_loss(s_pooled, t_pooled, s_map=None, t_map=None, tau: float = 0.07) -> torch.Tensor:
    """Task-agnostic distillation (a reviewer reports a contrastive loss): CLIP's InfoNCE, fixed temperature (a design
    choice), of projected student and VFM pooled features over the global batch; seg: + 1 - cosine per VFM patch."""
    scale = torch.tensor(1.0 / tau, device=s_pooled.device)
    loss = C.contrastive_loss(F.normalize(s_pooled.float(), dim=-1), F.normalize(t_pooled.float(), dim=-1), scale)
    if s_map is not None:
        s_map = F.interpolate(s_map.float(), size=t_map.shape[-2:], mode="bilinear", align_corners=False)
        loss = loss + (1 - F.cosine_similarity(s_map, t_map.float(), dim=1)).mean()
    return loss

def task_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Cross-entropy on labels (B,), or per pixel on masks (B, H, W) with the logits upsampled to them; IGNORE pixels
    count for nothing (a batch of only those: 0, not NaN)."""
    if logits.dim() == 4 and logits.shape[-2:] != target.shape[-2:]:
        logits = F.interpolate(logits.float(), size=target.shape[-2:], mode="bilinear", align_corners=False)
    loss = F.cross_entropy(logits.float(), target, ignore_index=IGNORE, reduction="sum")
    return loss / (target != IGNORE).sum().clamp(min=1)


# ---- 3. Evaluation: top-1, and mIoU on whole images (common.confusion_matrix and common.miou) ----------------------
IGNORE = 255  # a label-map value never trained on nor scored (mmsegmentation's ignore index)

def read_mask(sample: dict, K: int, reduce_zero_label: bool = False, size: int = 0, box=None) -> torch.Tensor:
    """The sample's label map (with `box`: that crop resized to size x size, nearest) as targets (H, W): 0 background,
    1..K the classes, IGNORE kept, others (classes outside the task) background. reduce_zero_label (ADE20K): 0 ("other")
    and others IGNORE, the background channel never a target nor predicted (evaluate), mIoU over the K classes."""
    m = Image.open(io.BytesIO(sample["seg.png"]))
    m = torch.from_numpy(np.asarray(m.resize((size, size), Image.NEAREST, box=box) if box else m, np.int64).copy())
    other = (m > K) & (m != IGNORE)
    return m.masked_fill(other | (m == 0), IGNORE) if reduce_zero_label else m.masked_fill(other, 0)

@torch.no_grad()
def slide_logits(model: nn.Module, x: torch.Tensor, size: int, stride: int) -> torch.Tensor:
    """mmsegmentation's sliding-window inference: uint8 (1, 3, H, W), H, W >= size -> (1, C, H, W), the logits of size x
    size windows every `stride` px (the last flush with the edge) upsampled to the window, averaged where they meet."""
    H, W = x.shape[-2:]
    starts = lambda n: sorted({*range(0, n - size, stride), n - size})
    boxes = [(i, j) for i in starts(H) for j in starts(W)]
    logits = model(torch.stack([x[0, :, i:i + size, j:j + size] for i, j in boxes]))  # (n, C, h, w)
    logits = F.interpolate(logits.float(), size=(size, size), mode="bilinear", align_corners=False)
    total, count = logits.new_zeros(1, logits.shape[1], H, W), logits.new_zeros(1, 1, H, W)
    for (i, j), window in zip(boxes, logits):
        total[0, :, i:i + size, j:j + size] += window
        count[..., i:i + size, j:j + size] += 1
    return total / count

@torch.no_grad()
def evaluate(model: nn.Module, cfg: Config, device) -> dict:
    """One confusion matrix over --test (ranks split it): top-1 on the eval crop, or mIoU and pixel accuracy on whole
    images as mmsegmentation (shorter side to the crop, windows every 2/3 crop, logits at the label map's size)."""
    was, rank, world = model.training, C.get_rank(), C.get_world_size()
    model.eval()
    n, S = cfg.num_classes + (cfg.task == "seg"), cfg.image_size or 224
    conf = torch.zeros(n, n, dtype=torch.long)
    if cfg.task == "cls":
        stream = Stream(shards(cfg.test, "--test"), Decode(cfg, train=False), cfg.batch_size, rank, world, cfg.seed,
                        1, epochs=1, drop_last=False)
        for batch in C.progress(C.make_loader(stream, cfg.workers, False), "eval"):
            conf += C.confusion_matrix(model(batch["image"].to(device)).argmax(1), batch["label"].to(device), n)
    samples = itertools.islice(read_samples(cfg.test), rank, None, world) if cfg.task == "seg" else ()
    for s in C.progress(samples, "eval"):  # segmentation: whole images, one at a time
        try:  # an undecodable sample is skipped, as in training
            x, mask = TF.resize(C.decode_image_tensor(s), S, antialias=True), read_mask(s, n - 1, cfg.reduce_zero_label)
        except Exception:
            continue
        logits = F.interpolate(slide_logits(model, x[None].to(device), S, max(1, 2 * S // 3)), size=mask.shape,
                               mode="bilinear", align_corners=False)[0]  # (K + 1, H, W) at the label map's size
        pred = logits[1:].argmax(0) + 1 if cfg.reduce_zero_label else logits.argmax(0)
        conf += C.confusion_matrix(pred, mask.to(device), n)
    if dist.is_initialized():
        dist.all_reduce(conf := conf.to(device))
    model.train(was)
    total, acc = int(conf.sum()), 100 * conf.diag().sum().item() / max(1, int(conf.sum()))
    return ({"top1": acc, "test_images": total} if cfg.task == "cls" else
            {"miou": C.miou(conf.cpu()), "pixel_acc": acc, "test_pixels": total})


# ---- 4. Data: shards or apple/ml-vfm-kt lists; the same augmented view for teacher and student ----------------------

def shards(spec: str, flag: str = "--data") -> list[str]:
    """The shards of `spec` (a list: runs of 1,000 lines, "LIST.txt@ROOT#first"), or one line: a missing path, only
    empty (0-byte) files, a list none of whose images is found."""
    if is_list(spec):
        return [f"{spec}#{lo}" for lo in range(0, len(read_list(spec)[0]), 1000)]
    try:
        paths = C.expand_shards(spec)
    except FileNotFoundError as e:
        C.fail(f"{flag}: {e}")
    if all(os.path.isfile(p) and os.path.getsize(p) == 0 for p in paths):
        C.fail(f"{flag} {spec}: {'its' if len(paths) == 1 else f'all {len(paths)}'} shard file(s) empty (0 bytes)")
    return paths

def is_list(spec: str) -> bool:
    return spec.partition("@")[0].endswith(".txt")

@functools.lru_cache(maxsize=8)
def read_list(spec: str) -> tuple[list, list]:
    """An apple/ml-vfm-kt list, `LIST.txt[@ROOT]` -> ([(image, label or -1, label map or None)], classes). A split file
    names an image a line (ADE20K), `name,class` for EuroSAT, HAM10K, ImageNet, Places365 (labels: the classes sorted);
    a retrieved-image list (yfcc_retrieved_images_with_1200query.txt: not public, read alike, a name as often as it was
    retrieved) is a transfer set. A name is ROOT/name, else the file of that name below ROOT (default: the list's
    folder), in a folder ending with its class if several (Places365); its label map the .png of its path with /images/
    read as /annotations/ (mmsegmentation's ADE20K). Names not found are dropped."""
    path, _, root = spec.partition("@")
    lines, root, index = [line.split(",", 1) for line in C.read_lines(path)], root or os.path.dirname(path) or ".", None
    classes, entries = sorted({line[1] for line in lines if len(line) > 1}), []
    label = {c: i for i, c in enumerate(classes)}
    for name, *cls in lines:
        hits = [os.path.join(root, name)]
        if not os.path.isfile(hits[0]):
            if index is None:  # one walk of ROOT, the first time a name is not a path below it: {file name: [paths]}
                found = sorted((f, os.path.join(d, f)) for d, _, files in os.walk(root) for f in files)
                index = {f: [p for _, p in group] for f, group in itertools.groupby(found, key=lambda t: t[0])}
            hits = index.get(os.path.basename(name), [])
            if len(hits) > 1 and cls:  # Places365: one file name in several class folders
                hits = [h for h in hits if os.path.dirname(h).replace(os.sep, "_").endswith(cls[0])]
        if len(hits) == 1:
            mask = os.path.splitext(hits[0].replace(f"{os.sep}images{os.sep}", f"{os.sep}annotations{os.sep}"))[0]
            mask = mask + ".png" if os.path.isfile(mask + ".png") else None
            entries.append((hits[0], label[cls[0]] if cls else -1, mask))
    if len(entries) < len(lines):
        (C.print0 if entries else C.fail)(f"{spec}: {len(lines) - len(entries)} of its {len(lines)} images not found "
                                          f"(or ambiguous) under {root}")
    return entries, classes

class Stream(C.ShardStream):
    """C.ShardStream whose shards may be runs of a list (`shards`), read as samples (an unreadable file counted)."""

    @staticmethod
    def read_shard(path: str, skipped: dict):
        spec, _, lo = path.rpartition("#")
        if not is_list(spec):
            yield from C.iter_tar_samples(path, skipped)
            return
        for i, (image, label, mask) in enumerate(read_list(spec)[0][int(lo):int(lo) + 1000], int(lo)):
            try:
                s = {"__key__": f"{os.path.splitext(os.path.basename(image))[0]}-{i}", "jpg": open(image, "rb").read(),
                     **({"seg.png": open(mask, "rb").read()} if mask else {})}
            except OSError:
                skipped["unreadable_file"] = skipped.get("unreadable_file", 0) + 1
                continue
            yield {**s, "json": json.dumps({"label": label})} if label >= 0 else s

def read_samples(spec: str, flag: str = "--data"):
    """Every sample of shards or a list, in order."""
    return (s for p in shards(spec, flag) for s in Stream.read_shard(p, {}))

def check_data(cfg: TrainConfig):
    """--data and --test before any work, one line if unusable: shards, or lists of --num-classes classes (or none)."""
    for spec, flag in ((cfg.data, "--data"), (cfg.test, "--test")):
        if spec and shards(spec, flag) and is_list(spec) and len(read_list(spec)[1]) not in (0, cfg.num_classes):
            C.fail(f"{flag} {spec} names {len(read_list(spec)[1])} classes, not the --num-classes {cfg.num_classes}")

class Decode:
    """Sample -> {"image": uint8 (3, S, S), "label" (cls), "mask" (S, S) (seg)}. Train: OpenCLIP's random resized crop
    and flip seeded by (seed, epoch, key), the mask alike; eval: OpenCLIP's; labels=False: the image only."""

    def __init__(self, cfg, train: bool, labels: bool = True):
        self.size, self.task, self.K, self.seed = cfg.image_size or 224, cfg.task, cfg.num_classes, cfg.seed
        self.train, self.labels, self.scale, self.reduce = train, labels, (cfg.crop_scale, 1.0), cfg.reduce_zero_label

    def __call__(self, sample: dict) -> dict:
        out, S = {}, self.size
        if self.labels and (self.task == "cls" or "json" in sample):  # no label for classification: KeyError
            if not 0 <= (label := int(json.loads(sample["json"])["label"])) < self.K:
                raise ValueError("a class outside the task")
            out["label"] = torch.tensor(label)
        if self.train:
            img, rng = C.decode_image_tensor(sample), C.sample_rng(self.seed, sample)
            box = C.random_resized_crop_box(*C.image_wh(img), rng, self.scale)
            flip, x = rng.random() < 0.5, C.image_to_uint8(img, S, box)
        else:
            box, flip, x = None, False, C.eval_transform(C.decode_image(sample), S)
        out["image"] = x.flip(-1) if flip else x
        if self.labels and self.task == "seg" and self.train:  # the mask through the image's crop and resize, nearest
            m = read_mask(sample, self.K, self.reduce, S, box)
            out["mask"] = m.flip(-1) if flip else m
        return out


# ---- 5. Retrieval of the transfer set (Sec. 5 "retrieval-augmented transfer"; spec 3) --------------------------------
# Queries (the labelled images) and the pool are embedded by the same frozen encoder and L2-normalised. Each rank
# streams its share of the pool, keeping a running (Q, k) top-k per query, merged batch by batch (exact: the k best of
# a union are among the k best of each part), then the ranks' lists alike. A pool sample is named by (shard, position),
# so the pool is never held in memory; a second pass copies the chosen samples into new shards.

def merge_topk(scores, ids, new_scores, new_ids, k: int):
    """The k largest of [scores | new_scores] per row, with their ids. (Q, a), (Q, b) -> (Q, min(k, a + b))."""
    s, i = torch.cat([scores, new_scores], dim=1), torch.cat([ids, new_ids], dim=1)
    top = s.topk(min(k, s.shape[1]), dim=1)
    return top.values, i.gather(1, top.indices)

@torch.no_grad()
def nearest_neighbours(queries: torch.Tensor, chunks, k: int):
    """Exact cosine top-k of each query over a stream of (embeddings (n, D), ids (n,)) chunks, with the
    running best kept between chunks. queries (Q, D) and embeddings L2-normalised -> (Q, k) scores, ids."""
    Q = len(queries)
    scores = torch.empty(Q, 0, device=queries.device)
    ids = torch.empty(Q, 0, dtype=torch.long, device=queries.device)
    for emb, idx in chunks:
        sim = queries @ emb.to(queries.dtype).T  # (Q, n)
        scores, ids = merge_topk(scores, ids, sim, idx.to(ids.device).expand(Q, -1), k)
    return scores, ids

class PoolImages(torch.utils.data.IterableDataset):
    """This (rank, worker)'s shards of the pool, in order: {"image" (or nothing), "id": shard << 32 | pos,
    "key"}. An undecodable image gives id -1 (counted, dropped). Keys in `exclude` are skipped."""

    def __init__(self, paths, size: int, rank: int, world: int, exclude=(), images: bool = True):
        self.paths, self.size, self.rank, self.world = paths, size, rank, world
        self.exclude, self.images = set(exclude), images

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        wid, nw = (info.id, info.num_workers) if info else (0, 1)
        consumer, consumers = self.rank * nw + wid, self.world * nw
        for si in range(consumer, len(self.paths), consumers):
            for pos, s in enumerate(Stream.read_shard(self.paths[si], {})):
                if s["__key__"] in self.exclude:
                    continue
                out = {"id": si << 32 | pos, "key": s["__key__"]}
                if self.images:
                    try:  # OpenCLIP's eval transform
                        out["image"] = C.eval_transform(C.decode_image(s), self.size)
                    except Exception:
                        out["image"], out["id"] = torch.zeros(3, self.size, self.size, dtype=torch.uint8), -1
                yield out

def embed_chunks(encoder, loader, device, stats: dict):
    """(normalised embeddings, ids) of the pool a batch at a time; undecodable images counted in stats."""
    for batch in loader:
        keep = (idx := batch["id"]) >= 0
        stats["unreadable"] = stats.get("unreadable", 0) + int((~keep).sum())
        if keep.any():
            yield F.normalize(encoder(batch["image"][keep].to(device))[0].float(), dim=-1), idx[keep]

def random_chunks(loader, seed: int):
    """The random-subset baseline as a top-k: scores hashed from (seed, id), the `random_size` highest uniform."""
    for batch in loader:
        u = torch.tensor([zlib.crc32(f"{seed}/{int(i)}".encode()) / 2**32 for i in batch["id"]])
        yield u[:, None], batch["id"]  # (n, 1) "embeddings" against the one query [1]

def until_stopped(items, stop: C.StopSignal, what: str):
    """`items` until a stop signal (SIGTERM, Ctrl-C), then one line and exit 0 (a pass that keeps nothing)."""
    for x in items:
        if stop.requested:
            C.print0(f"{what}: stopped by a signal; nothing is kept, run it again")
            raise SystemExit(0)
        yield x

def retrieve(cfg: RetrieveConfig) -> dict:
    """Retrieve the transfer set: the pool images nearest to the labelled queries (or a random subset).
    Each query's `per_query` nearest (cosine, --encoder), their union as shards; --transfer-size N: N // Q, repeated."""
    rank, local_rank, world, device = C.setup_distributed(cfg.device)
    if not cfg.pool or not (cfg.random_size or cfg.queries and cfg.encoder):
        C.fail("retrieve needs --pool (unlabelled shards) and --queries and --encoder, or --random-size N")
    if os.path.exists(os.path.join(cfg.out, "retrieval.json")):
        C.fail(f"{cfg.out} holds a finished transfer set (retrieval.json); choose another --out")
    pool, size, q_keys, queries = shards(cfg.pool, "--pool"), cfg.image_size or 224, set(), None
    if cfg.queries:  # when the pool holds the labelled images too (the demo), they are not retrieved again
        q_keys = {s["__key__"] for s in read_samples(cfg.queries, "--queries")}
        q_keys or C.fail(f"--queries {cfg.queries}: no sample in its shards")
    C.document_run(cfg.out, cfg, [__file__, C.__file__])
    t0, stop, k, stats = time.time(), C.StopSignal(), cfg.random_size or cfg.per_query, {}
    images = PoolImages(pool, size, rank, world, q_keys, images=not cfg.random_size)
    loader = torch.utils.data.DataLoader(images, 4096 if cfg.random_size else cfg.batch_size, num_workers=cfg.workers,
                                         worker_init_fn=C.ignore_stop_signals)  # workers leave signals to this process
    batches = until_stopped(loader, stop, "retrieve")
    if cfg.random_size:
        scores, ids = nearest_neighbours(torch.ones(1, 1), random_chunks(batches, cfg.seed), k)
    else:
        encoder = load_foundation(cfg.encoder, cfg.act, "--encoder").to(device).eval().requires_grad_(False)
        # the queries are few (the labelled set): every rank embeds all of them, eval transform like the pool
        qs = torch.utils.data.DataLoader(PoolImages(shards(cfg.queries), size, 0, 1), batch_size=cfg.batch_size)
        queries = torch.cat([F.normalize(encoder(b["image"][b["id"] >= 0].to(device))[0].float(), dim=-1)
                             for b in qs])  # (Q, E)
        len(queries) or C.fail(f"--queries {cfg.queries}: no image in its shards decodes")
        k = max(1, cfg.transfer_size // len(queries)) if cfg.transfer_size else k
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            chunks = embed_chunks(encoder, batches, device, stats)
            scores, ids = nearest_neighbours(queries, C.progress(chunks, "retrieve"), k)
    # ---- merge the ranks' lists (each padded to k columns) ----------------------------------------------
    if world > 1:
        pad = k - scores.shape[1]
        scores = F.pad(scores.float(), (0, pad), value=-math.inf).to(device)
        ids = F.pad(ids, (0, pad), value=-1).to(device)
        all_s, all_i = [torch.empty_like(scores) for _ in range(world)], [torch.empty_like(ids) for _ in range(world)]
        dist.all_gather(all_s, scores)
        dist.all_gather(all_i, ids)
        scores, ids = merge_topk(scores[:, :0], ids[:, :0], torch.cat(all_s, 1), torch.cat(all_i, 1), k)
    # Balanced retrieval: every query contributes its k neighbours. The union keeps an image near several queries once
    # (smaller than Q x k); the size rule keeps it as often as retrieved, as the released lists do: their lengths are
    # Q x k with k = 152,400 // Q (ADE20K: 1,200 x 127, 2,401 x 63, 4,802 x 31, 9,605 x 15, 19,210 x 7 images).
    chosen, counts = torch.unique(ids[ids >= 0].cpu(), return_counts=True)
    if not len(chosen):
        C.fail(f"--pool {cfg.pool}: no usable image in its {len(pool)} shard(s) ({stats.get('unreadable', 0)} "
               "undecodable; an unreadable tar counts none)")
    # ---- second pass: the chosen samples, all members, into OUT/transfer-RRR-JJJJJ.tar (rank r: si = r mod world)
    by_shard = {}
    for uid, n in zip(chosen.tolist(), counts.tolist()):
        by_shard.setdefault(uid >> 32, {})[uid & 0xFFFFFFFF] = n if cfg.transfer_size else 1
    copies = ({**s, "__key__": f"{s['__key__']}_{c}" if c else s["__key__"]}  # a repeat: key_1, key_2, ...
              for si in until_stopped(sorted(by_shard), stop, "retrieve") if si % world == rank
              for pos, s in enumerate(Stream.read_shard(pool[si], {})) if pos in by_shard[si]
              for c in range(by_shard[si][pos]))
    written, j = 0, 0
    while part := list(itertools.islice(copies, cfg.shard_size)):
        written, j = written + C.write_shard(os.path.join(cfg.out, f"transfer-{rank:03d}-{j:05d}.tar"), part), j + 1
    total = torch.tensor([written], device=device)
    if world > 1:
        dist.all_reduce(total)
    info = {"queries": 0 if queries is None else len(queries), "per_query": 0 if cfg.random_size else k,
            "random_size": cfg.random_size, "pool_shards": len(pool), "neighbours": int((ids >= 0).sum()),
            "transfer_set": int(total), "seconds": round(time.time() - t0, 1), **stats}
    if rank == 0:
        json.dump(info, open(os.path.join(cfg.out, "retrieval.json"), "w"))  # also marks the set finished
        C.print0(json.dumps(info))
    C.finish_run(cfg.out, extra=f"transfer set {cfg.out}/transfer-*.tar, {cfg.out}/retrieval.json")
    C.cleanup_distributed()
    return info


# ---- 6. The three steps: fine-tune the VFM (teacher), distil (distill), fine-tune the small model (finetune) ---------
DEFAULTS = {"teacher": (150, 1e-3), "distill": (400, 2e-3), "finetune": (150, 2e-3)}  # (steps, lr): the CPU demo's

def load_teacher(path: str, cfg: Config) -> TaskModel:
    """The fine-tuned VFM of a `teacher` run, frozen (the architecture is rebuilt from its --foundation)."""
    ck = read_checkpoint(path, "--teacher")
    if ck.get("kind") != "teacher":
        C.fail(f"--teacher {path} is not a checkpoint of `transfer.py teacher` (kind {ck.get('kind')!r})")
    if (ck["task"], ck["num_classes"]) != (cfg.task, cfg.num_classes):
        C.fail(f"--teacher {path} is a {ck['task']} model of {ck['num_classes']} classes, not --task {cfg.task} "
               f"--num-classes {cfg.num_classes}")
    model = TaskModel(load_foundation(ck["foundation"], ck["act"], "--teacher's VFM"), ck["task"], ck["num_classes"])
    C.load_state_dict_checked(model, ck["model"], f"teacher {path}")
    return model.eval().requires_grad_(False)

def init_student(model: TaskModel, cfg: Config):
    """--init for finetune: a distill run (the backbone; the head too after task KD), or a mobileclip.py
    checkpoint whose image tower is this MCi (CLIP pre-training). `imagenet[=FILE]`: build_backbone's."""
    if not cfg.init or imagenet_weights(cfg.init):
        return
    ck = read_checkpoint(cfg.init, "--init")
    if ck.get("kind") == "distill":
        if ck["student"] != cfg.student:
            C.fail(f"--init {cfg.init} distilled a '{ck['student']}', not --student {cfg.student}")
        task = ck["kd"] == "task"  # step 3 fine-tunes the distilled model, head included; else the backbone
        C.load_state_dict_checked(model if task else model.backbone, {k[0 if task else 9:]: v for k, v in
                                  ck["model"].items() if task or k.startswith("backbone.")}, f"--init {cfg.init}")
    elif "model_name" in ck and "vocab_size" in ck:  # CLIP pre-training of the same MCi (mobileclip.py)
        import mobileclip as MC
        image = MC.MOBILECLIP_MODELS.get(ck["model_name"], {}).get("image")
        if image != cfg.student:
            C.fail(f"--init {cfg.init}: its image tower is '{image or ck['model_name']}', not --student {cfg.student}")
        sd = {"mci." + k[7:]: v for k, v in ck["model"].items()
              if k.startswith("visual.") and not k.startswith("visual.head.")}  # visual.X -> mci.X, no projection
        C.load_state_dict_checked(model.backbone, sd, f"--init {cfg.init} (CLIP image tower)")
    else:
        C.fail(f"--init {cfg.init}: not a distill run, a mobileclip.py checkpoint or imagenet[=FILE]")

def setup_stage(cfg: Config, stage: str, device):
    """(trained module, frozen teacher or None, backbone lr multiplier, checkpoint metadata)."""
    meta = {"kind": stage, "task": cfg.task, "num_classes": cfg.num_classes, "image_size": cfg.image_size or 224}
    if stage == "teacher":
        net = TaskModel(load_foundation(cfg.foundation, cfg.act), cfg.task, cfg.num_classes)
        return net, None, cfg.backbone_lr_mult, {**meta, "foundation": os.path.abspath(cfg.foundation), "act": cfg.act}
    meta.update(student=cfg.student)
    if stage == "finetune":
        net = TaskModel(build_backbone(cfg.student, imagenet_weights(cfg.init)), cfg.task, cfg.num_classes)
        init_student(net, cfg)
        return net, None, 1.0, {**meta, "init": cfg.init}
    if cfg.kd == "task":
        teacher = load_teacher(cfg.teacher, cfg)
        return TaskModel(build_backbone(cfg.student), cfg.task, cfg.num_classes), teacher, 1.0, {**meta, "kd": "task"}
    if cfg.kd != "features":
        C.fail(f"--kd must be task or features, not '{cfg.kd}'")
    vfm = load_foundation(cfg.foundation, cfg.act).eval().requires_grad_(False)
    return FeatureDistiller(build_backbone(cfg.student), vfm.dims, cfg.task), vfm, 1.0, {**meta, "kd": "features"}

def make_optimizer(net: nn.Module, cfg: Config, backbone_mult: float):
    """AdamW with groups by (lr multiplier, decay): the backbone at `backbone_mult`, the rest at 1; no decay
    on norms, biases and embeddings. Each group's lr = lr_at(step) x its "mult"."""
    groups = {}
    for name, p in net.named_parameters():
        if p.requires_grad:
            mult = backbone_mult if name.startswith("backbone.") else 1.0
            decay = cfg.weight_decay if p.ndim >= 2 and not any(n in name for n in C.NO_DECAY_NAMES) else 0.0
            groups.setdefault((mult, decay), []).append(p)
    return torch.optim.AdamW([{"params": ps, "mult": m, "weight_decay": d} for (m, d), ps in groups.items()],
                             lr=0.0, betas=(0.9, 0.999), fused=next(net.parameters()).is_cuda)

def train(cfg: TrainConfig, stage: str) -> dict:
    """One step of the recipe: a flat loop over shards (DDP under torchrun, bf16 on GPU), resumable at any
    step with its data position, SIGTERM-safe; the final checkpoint holds the test metrics."""
    rank, local_rank, world, device = C.setup_distributed(cfg.device)
    torch.manual_seed(cfg.seed)
    if not cfg.data:
        C.fail(f"{stage} needs --data: " + ("the transfer set" if stage == "distill" else "the labelled target shards"))
    if cfg.task not in ("cls", "seg") or cfg.num_classes < 1:
        C.fail(f"--task must be cls or seg, not '{cfg.task}'" if cfg.num_classes > 0 else
               f"--num-classes {cfg.num_classes}: must be >= 1")
    check_data(cfg)  # a bad path: one line before any work
    C.document_run(cfg.out, cfg, [__file__, C.__file__])
    ck = C.load_checkpoint(cfg.resume, cfg.out)  # weights, optimizer, RNG and the data position, loaded below
    if ck is not None and (ck.get("kind"), ck.get("student")) != (stage, None if stage == "teacher" else cfg.student):
        C.fail(f"{cfg.resume or cfg.out} holds a different run ({ck.get('kind')}); use a new --out or --resume ''")
    steps, peak_lr = cfg.steps or DEFAULTS[stage][0], cfg.lr or DEFAULTS[stage][1]
    if ck is not None and ck.get("final") and ck["step"] == steps:  # finished (the demo reuses its stages)
        C.print0(f"{stage}: {cfg.out} is finished (step {steps}); its metrics: {json.dumps(ck['metrics'])}")
        return ck["metrics"]
    net, teacher, backbone_mult, meta = setup_stage(cfg, stage, device)
    net, teacher = net.to(device), teacher.to(device) if teacher is not None else None
    opt = make_optimizer(net, cfg, backbone_mult)
    C.print0(f"{stage}: {sum(p.numel() for p in net.parameters()) / 1e6:.2f}M trained parameters, {steps} steps "
             f"of {cfg.batch_size * world}, peak lr {peak_lr:g}")
    log, start, data_pos = C.RunLog(cfg.out), 0, {}
    if ck is not None:
        C.load_state_dict_checked(net, ck["model"], f"checkpoint in {cfg.out}")
        opt.load_state_dict(ck["optimizer"])
        C.set_rng_state(ck["rng"])
        start = ck["step"]
        if len(ck["data"]) == world and len(ck["data"].get(rank, {})) == max(1, cfg.workers):
            data_pos = ck["data"][rank]
        C.print0(f"resumed at step {start}")
    stream = Stream(shards(cfg.data), Decode(cfg, train=True, labels=stage != "distill"), cfg.batch_size,
                    rank, world, cfg.seed, cfg.shuffle_buffer, data_pos, start)
    batches = iter(C.make_loader(stream, cfg.workers, device.type == "cuda"))
    position = C.DataPosition()
    position.pos = {int(w): p for w, p in data_pos.items()}
    # segmentation leaves the pooled branch (the ViT's projection, MCi's conv_exp) without gradients
    ddp = DDP(net, device_ids=[local_rank] if device.type == "cuda" else None,
              find_unused_parameters=cfg.task == "seg") if world > 1 else net
    bf16 = cfg.precision == "bf16" or (cfg.precision == "auto" and device.type == "cuda")
    stop, nonfinite = C.StopSignal(), torch.zeros((), dtype=torch.bool, device=device)
    t0, seen, metrics, path = time.time(), 0, {}, None
    for step in C.progress(range(start, steps + 1), stage):
        last_step = step == steps
        stopping = stop.requested if world == 1 else (step % cfg.log_every == 0 and stop.agreed(device))
        # ---- evaluate, checkpoint -----------------------------------------------------------------
        if last_step and cfg.test and isinstance(net, TaskModel):  # a distilled student: before step 3
            metrics = evaluate(net, cfg, device)
            log.log(step, **metrics)
        if (last_step or stopping or step % cfg.ckpt_every == 0) and step > start:
            if nonfinite.item():
                C.fail(f"non-finite loss before step {step}; the last good checkpoint in {cfg.out} is kept")
            state = {**meta, "model": net.state_dict(), "optimizer": opt.state_dict(), "step": step,
                     "final": last_step, "rng": C.rng_state(), "data": position.state(), "metrics": metrics,
                     "config": dataclasses.asdict(cfg)}
            C.save_checkpoint(path := os.path.join(cfg.out, f"ckpt-{step}.pt"), state)
            C.prune_checkpoints(cfg.out, cfg.keep_ckpts, written=path)
        if stopping:  # SIGTERM: saved above; stop the whole program (the demo too), resume with --resume auto
            C.print0(f"stopped by a signal at step {step}: {path or 'no step taken'}; --resume auto continues")
            batches.close()  # shuts the workers down: they ignore the signal (C.ignore_stop_signals)
            C.cleanup_distributed()
            raise SystemExit(0)
        if last_step:
            break
        # ---- one step: the same augmented view for teacher and student --------------------------------
        batch = next(batches)
        position.update(batch)
        x = batch["image"].to(device, non_blocking=True)
        lr = C.lr_at(step, peak_lr, cfg.warmup, steps)
        # Step 1 (spec 3): a linear probe first (a random head's gradients would disturb the VFM's features),
        # then the whole VFM at backbone_lr_mult x the head's lr. Steps 2 and 3 train everything at 1x.
        probing = stage == "teacher" and step < cfg.probe_steps  # the backbone frozen: the linear-probe warm-up
        for g in opt.param_groups:
            g["lr"] = lr * g["mult"] * (g["mult"] == 1.0 or not probing)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            if stage == "distill":  # step 2: no labels; the teacher's outputs on this very view are the target
                with torch.no_grad():
                    target = teacher(x)  # (B, K) or (B, K + 1, h, w); task-agnostic: (pooled, maps) of the VFM
                out = ddp(x)
                loss = (kd_loss(out, target, cfg.temperature) if cfg.kd == "task"
                        else feature_kd_loss(out[0], target[0], out[1], target[1][0] if out[1] is not None else None))
            else:
                # steps 1 and 3: the few labels, the same subset for the VFM and the small model (spec 6)
                y = batch["label" if cfg.task == "cls" else "mask"].to(device, non_blocking=True)
                loss = task_loss(ddp(x), y)
        loss.backward()
        gnorm = torch.nn.utils.clip_grad_norm_(net.parameters(), cfg.grad_clip or float("inf"))
        opt.step()
        opt.zero_grad(set_to_none=True)
        nonfinite |= ~torch.isfinite(loss.detach())
        seen += len(x)
        # ---- log (the only host sync) -------------------------------------------------------------------
        if (step + 1) % cfg.log_every == 0:
            if nonfinite.item():
                C.fail(f"non-finite loss at step {step}; the last good checkpoint in {cfg.out} is kept")
            log.log(step + 1, loss=loss.item(), lr=lr, grad_norm=gnorm.item(),
                    samples_per_s=seen * world / (time.time() - t0), skipped=sum(position.skip_totals().values()))
            t0, seen = time.time(), 0
    C.finish_run(cfg.out, path)
    C.cleanup_distributed()
    return metrics


# ---- 7. The no-argument run: the whole comparison on the synthetic world ---------------------------------------------

def write_labelled(train_shards: str, out: str, K: int, shots: int) -> str:
    """The first `shots` training images of each of the classes 0..K-1 (shard order), as one shard."""
    path = os.path.join(out, "labelled-00000.tar")
    if C.get_rank() == 0 and not os.path.exists(path):
        os.makedirs(out, exist_ok=True)
        got, picked = {}, []
        for s in read_samples(train_shards):
            if (y := json.loads(s["json"])["label"]) < K and got.get(y, 0) < shots:
                got[y] = got.get(y, 0) + 1
                picked.append(s)
            if len(picked) == K * shots:
                break
        C.write_shard(path, picked)
    C.barrier()
    return out

def render_offdomain(rng: np.random.Generator, size: int) -> Image.Image:
    """One off-domain pool image (--pool-offdomain), a web image unrelated to the task sharing only low-level statistics
    with it: a smooth colour field (a 4 x 4 grid around one tone, bicubic; a third with stripes), 2-6 clutter objects
    (ellipses, strokes, irregular polygons), the world's sensor noise. Neither its backgrounds alone nor its shapes."""
    low = np.clip(rng.uniform(30, 225, 3) + rng.normal(0, 45, (4, 4, 3)), 0, 255).astype(np.uint8)  # one tone +-
    img = np.asarray(Image.fromarray(low).resize((size, size), Image.BICUBIC), np.float32)
    if rng.random() < 1 / 3:
        a, yy, xx = rng.uniform(0, math.pi), *np.mgrid[0:size, 0:size] / size
        on = np.sin(2 * math.pi * (xx * math.cos(a) + yy * math.sin(a)) / rng.uniform(0.08, 0.3)) > 0
        img = np.where(on[..., None], 0.6 * img + 0.4 * rng.uniform(0, 255, 3), img)
    draw = ImageDraw.Draw(canvas := Image.fromarray(img.astype(np.uint8), "RGB"))
    for _ in range(int(rng.integers(2, 7))):
        colour, (cx, cy) = tuple(int(v) for v in rng.integers(0, 256, 3)), rng.uniform(0, size, 2)
        r, kind = size * rng.uniform(0.06, 0.3), rng.integers(3)
        if kind == 0:  # an ellipse at least 1.6:1, so it is rarely a circle of the world
            ry = r / rng.uniform(1.6, 3.0)
            draw.ellipse([cx - r, cy - ry, cx + r, cy + ry], fill=colour)
        elif kind == 1:  # a stroke: a thick polyline of 2-4 random points
            pts = rng.uniform(0, size, (int(rng.integers(2, 5)), 2))
            draw.line(pts.ravel().tolist(), fill=colour, width=int(rng.integers(2, max(3, size // 10))))
        else:  # an irregular polygon: 5-9 vertices at random radii, unlike the world's regular shapes
            n = int(rng.integers(5, 10))
            ang, rad = np.sort(rng.uniform(0, 2 * math.pi, n)), r * rng.uniform(0.3, 1.0, n)
            draw.polygon(np.stack([cx + rad * np.cos(ang), cy + rad * np.sin(ang)], 1).ravel().tolist(), fill=colour)
    img = np.asarray(canvas, np.float32) + rng.standard_normal((size, size, 3), dtype=np.float32) * 4.0
    return Image.fromarray(np.clip(img + 0.5, 0, 255).astype(np.uint8), "RGB")

def write_offdomain(out: str, n: int, size: int, shard_size: int = 5000) -> list[str]:
    """n off-domain images as pool shards (label len(SYNTH_SHAPES): off-task), image i seeded by i alone; kept once."""
    paths = [os.path.join(out, f"offdomain-{j:05d}.tar") for j in range(-(-n // shard_size))]
    if C.get_rank() == 0:
        os.makedirs(out, exist_ok=True)
        for j, path in enumerate(paths):
            if not os.path.exists(path):
                C.write_shard(path, ({"__key__": f"offdomain{i:07d}", "json": {"label": len(C.SYNTH_SHAPES)},
                                      "jpg": render_offdomain(np.random.default_rng([7, i]), size)}
                                     for i in range(j * shard_size, min(n, (j + 1) * shard_size))))
    C.barrier()
    return paths

def demo(cfg: Config):
    """The whole comparison on the synthetic world (the default command): every transfer recipe against labels only.
    Task: `demo_classes` shapes, `shots` labels each; pool: `pool_shards` shards + off-domain images; stages reused."""
    if not (0 <= cfg.pool_offdomain < 1 and 1 <= cfg.demo_classes <= len(C.SYNTH_SHAPES)):
        C.fail(f"--pool-offdomain must be in [0, 1), not {cfg.pool_offdomain}" if cfg.pool_offdomain >= 1 else
               f"--demo-classes {cfg.demo_classes}: must be between 1 and {len(C.SYNTH_SHAPES)}")
    C.setup_distributed(cfg.device)
    C.document_run(cfg.out, cfg, [__file__, C.__file__])  # each stage claims its own sub-directory
    cache = cfg.cache_dir or os.path.join(os.path.expanduser("~"), ".cache", "effclip")
    world = C.synthetic_world(cache, cfg.synthetic_train, cfg.synthetic_val, cfg.image_size or 64)
    K, out = cfg.demo_classes, cfg.out
    base = dataclasses.replace(cfg, num_classes=K, image_size=cfg.image_size or 64, test=cfg.test or world["val"],
                               init="", resume="auto")  # a stage continues its own run in its sub-directory
    sub = lambda name, **kw: dataclasses.replace(base, out=os.path.join(out, name), **kw)
    foundation = cfg.foundation or os.path.join(out, "clip")
    if not cfg.foundation and not (C.latest_checkpoint(foundation) or "").endswith(f"ckpt-{cfg.clip_steps}.pt"):
        import mobileclip as MC
        MC.main(["--model", "tiny", "--out", foundation, "--steps", str(cfg.clip_steps), "--cache-dir", cache,
                 "--synthetic-train", str(cfg.synthetic_train), "--synthetic-val", str(cfg.synthetic_val),
                 "--workers", str(cfg.workers), "--resume", "auto"])
    labelled = write_labelled(world["train"], os.path.join(out, "labelled"), K, cfg.shots)
    pool = shards(world["train"])[:cfg.pool_shards or None]
    if cfg.pool_offdomain:  # the task's domain a minority of the pool, as in a web-scale pool (see the docstring)
        n_world = sum(1 for _ in read_samples("::".join(pool)))
        n_off = round(n_world * cfg.pool_offdomain / (1 - cfg.pool_offdomain))
        pool += write_offdomain(os.path.join(out, f"offdomain-{n_off}"), n_off, base.image_size)
    pool = "::".join(pool)
    sets = {}
    for name, kw in (("retrieved", dict(encoder=foundation)), ("random", {})):
        c = sub(name, pool=pool, queries=labelled, **kw,
                random_size=sets["retrieved"]["transfer_set"] if name == "random" else 0)
        done = os.path.join(c.out, "retrieval.json")
        sets[name] = json.load(open(done)) if os.path.exists(done) else retrieve(c)
        labels = [json.loads(s["json"])["label"] for s in read_samples(c.out)]
        sets[name]["in_task_pct"] = 100 * sum(y < K for y in labels) / max(1, len(labels))  # the retrieval's precision
    teacher = sub("teacher", foundation=foundation, data=labelled)
    results = {"VFM teacher (fine-tuned tiny CLIP ViT)": train(teacher, "teacher")}
    arms = [("labels only (mci_tiny from scratch)", None, None),
            ("task-oriented KD, retrieved transfer set", "retrieved", "task"),
            ("task-oriented KD, random transfer set", "random", "task"),
            ("task-agnostic feature KD, retrieved transfer set", "retrieved", "features")]
    if cfg.init:  # a mobileclip.py mobileclip_tiny run: the CLIP pre-training baseline
        arms.append(("CLIP pre-training (mobileclip_tiny) + fine-tune", "clip", None))
    for name, tset, kd in arms:
        init = sub(f"kd_{kd}_{tset}").out if tset in sets else cfg.init if tset == "clip" else ""
        if tset in sets:
            m = train(sub(f"kd_{kd}_{tset}", data=sub(tset).out, kd=kd, teacher=teacher.out, foundation=foundation),
                          "distill")
            if kd == "task":  # the distilled student itself (steps 1-2): step 3 on the few labels can undo part of it
                results[f"{name}, before step 3"] = m
        results[name] = train(sub(f"ft_{tset or 'scratch'}_{kd or 'none'}", data=labelled, init=init), "finetune")
    summary = {"sets": sets, "results": results, "labelled": K * cfg.shots, "classes": K}
    if C.get_rank() == 0:
        json.dump(summary, open(os.path.join(out, "results.json"), "w"), indent=1)
        metric = "top1" if cfg.task == "cls" else "miou"
        C.print0("\ntransfer sets: " + ", ".join(f"{n} {s['transfer_set']} images ({s['in_task_pct']:.1f}% of the "
                                                 "task's classes)" for n, s in sets.items()))
        for name, m in results.items():
            C.print0(f"{name:52s} {metric} {m.get(metric, float('nan')):6.1f}")
    C.finish_run(out, extra=f"results {os.path.join(out, 'results.json')}, each stage in its sub-directory")
    C.cleanup_distributed()
    return summary

def teacher_stage(cfg: TeacherConfig) -> dict:
    """Step 1: fine-tune the VFM (--foundation) with a task head on the few labels (--data)."""
    return train(cfg, "teacher")

def distill_stage(cfg: DistillConfig) -> dict:
    """Step 2: distil the teacher (--teacher) or the VFM's features into the small --student on the transfer set."""
    return train(cfg, "distill")

def finetune_stage(cfg: FinetuneConfig) -> dict:
    """Step 3: fine-tune the small --student on the labels (--data), from --init: a distill run, CLIP or ImageNet."""
    return train(cfg, "finetune")

def main(argv=None):
    return C.run_command(__doc__, {"demo": (demo, Config), "retrieve": (retrieve, RetrieveConfig),
                                   "teacher": (teacher_stage, TeacherConfig), "distill": (distill_stage, DistillConfig),
                                   "finetune": (finetune_stage, FinetuneConfig)}, argv, default="demo")

if __name__ == "__main__":
    main()
