"""CLIP meets Model Zoo Experts: Pseudo-Supervision for Visual Enhancement (CLIPTeX; arXiv 2310.14108, Salehi et al.,
Apple). The method: run task experts from model zoos once over an image-text set, store their hard pseudo-labels, then
continue CLIP training with the contrastive loss plus task losses through light heads on the image backbone. The
enhanced CLIP's dense features improve (segmentation, depth, ...) while its zero-shot classification is kept.

What is here: `label`, the offline pass (segmentation as uint8 PNG class maps, 255 where the expert is unsure;
depth as 16-bit PNG; normals as 8-bit RGB PNG; detections as JSON; one label shard per data shard, same keys
and order) with the experts: the synthetic world's renderer (its shards carry the ground truth), torchvision's
segmentation and detection models with a weights file, any TorchScript or state-dict depth / normals model (see
`load_user_expert`), normals from depth; `train`, CLIPTeX on a mobileclip.py CLIP (MCi or ViT) with a light head
per task, and CLIP-FT (`--baseline`: contrastive only, the same data, crops and steps); `probe`, zero-shot and
dense.py's frozen linear probes (mIoU, depth RMSE); `compare`, the comparison on the synthetic world. Not here:
the paper's own experts (Mask2Former, DPT, NLL-AngMF, ViTDet; bring them as TorchScript), PSPNet / SSD / Mask
R-CNN probes, flips (captions name left and right), batched expert inference (one image at a time).

Design choices where the spec is silent (spec 2, 3, 7; nothing below the abstract level is public):
  heads       per backbone level a 1x1 conv to --head-width, upsampled to stride 4 and summed, GELU, 1x1 conv
              (MCi: its four stage outputs; ViT: the last block's patch tokens)
  seg         cross-entropy, ignore 255 (the synthetic expert is unsure next to a different object class)
  depth       relative inverse depth in [0, 1] (1 = near, as DPT/MiDaS and the synthetic world), sigmoid output,
              scale-invariant log loss per image (lambda 0.85)
  normals     L2-normalised 3-channel output, 1 - cosine over valid pixels; x right, y down, z toward the camera;
              from depth: the depth map as a height field of the image's width, invalid across jumps
  det         CenterNet-style: a class heatmap at stride 4 (Gaussian peaks, penalty-reduced focal loss) and box
              sizes at the centres (L1, x0.1); boxes from the mask's connected regions in the synthetic world
  recipe      L = L_CLIP + sum_t w_t L_t, w_t = 1; the base CLIP's recipe at 1/10 of its lr (2e-4), heads at 2e-3

Paper -> code:
  experts -> hard pseudo-labels, offline (Sec. 3)  -> label, SyntheticExpert, TorchvisionExpert, load_user_expert
  stored formats (spec 4)                          -> encode_seg/depth/normals/boxes, decode_*
  light task heads on the backbone (Sec. 3)        -> dense_features, DenseHead, CLIPTeX
  L = L_CLIP + sum_t w_t L_t (Sec. 3)              -> seg/depth/normals/det_loss (+ naive *_reference), train
  CLIP-FT baseline (spec 6)                        -> train --baseline
  zero-shot kept, dense probes improve (Sec. 4)    -> mobileclip.evaluate, probe (dense.py), compare

Commands:
  torchrun --nproc_per_node=8 cliptex.py label --data 'cc3m/{00000..00331}.tar' --experts seg,det,depth,normals \\
      --seg-expert torchvision:deeplabv3_resnet101 --seg-weights deeplabv3_resnet101_coco-586e9e4e.pth \\
      --det-expert torchvision:fasterrcnn_resnet50_fpn --det-weights fasterrcnn_resnet50_fpn_coco-258fb6c6.pth \\
      --depth-expert dpt_hybrid.torchscript.pt --out cc3m_labels/
  torchrun --nproc_per_node=8 cliptex.py train --init runs/b16/ckpt-100000.pt --data 'cc3m/{00000..00331}.tar' \\
      --labels cc3m_labels/ --seg-classes 21 --det-classes 91 --steps 20000 --out runs/cliptex
  torchrun --nproc_per_node=8 cliptex.py train ... --baseline --out runs/clipft      # CLIP-FT, the same data
  python cliptex.py probe --init runs/cliptex/ckpt-20000.pt --data ADE/ --val-data ADE_val/ --zeroshot-data imagenet/val
  python cliptex.py compare --init runs/mobileclip/ckpt-800.pt      # the synthetic world, CPU
Result (synthetic world, 2-core CPU; README.md, "CLIPTeX"): from a mobileclip_tiny base (zero-shot 21.6%), 200 steps
of batch 64 on 5,000 pseudo-labelled images: zero-shot 29.1% (CLIPTeX) vs 27.5% (CLIP-FT), dense.py's frozen linear
probes mIoU 25.8 vs 24.3 (base 22.4), depth RMSE 0.1169 vs 0.1190 (base 0.1202): kept, and better dense features.
"""
from __future__ import annotations

import dataclasses
import io
import json
import math
import os
import time
import zipfile
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision
from PIL import Image
from torch.nn.parallel import DistributedDataParallel as DDP

import common as C
import mobileclip as M

# One dataclass per command (its --help lists only its own flags); `compare` runs them all, its Config holds them all.
@dataclass
class Shared:
    data: str = ""  # image-text tar shards (directory, glob, brace pattern); empty = the synthetic world
    out: str = "runs/cliptex"  # label: the label shards; train/probe/compare: the run directory
    model: str = "mobileclip_tiny"  # used when --init is not a checkpoint of this repository
    device: str = "auto"  # auto | cuda | cpu
    cache_dir: str = ""  # where the synthetic world is generated (default ~/.cache/effclip)
    synthetic_train: int = 40000  # synthetic training images
    synthetic_val: int = 1000  # synthetic held-out images

@dataclass
class LabelConfig(Shared):
    experts: str = "seg,det,depth,normals"  # tasks to pseudo-label
    seg_expert: str = "synthetic"  # synthetic (the shards' seg.png) | torchvision:<name>, e.g. deeplabv3_resnet50
    seg_weights: str = ""  # torchvision segmentation weights file (.pth state dict)
    seg_threshold: float = 0.5  # pixels whose top softmax probability is below this are stored as 255 (ignore)
    det_expert: str = "synthetic"  # synthetic (boxes of the mask's connected regions) | torchvision:<name>
    det_weights: str = ""  # torchvision detection weights file (.pth state dict)
    det_threshold: float = 0.5  # detections below this score are not stored
    depth_expert: str = "synthetic"  # synthetic (the shards' depth.png) | FILE (TorchScript) | module:Class
    depth_weights: str = ""  # state dict for a module:Class depth expert
    normals_expert: str = "depth"  # depth (derived from the depth labels) | FILE (TorchScript) | module:Class
    normals_weights: str = ""  # state dict for a module:Class normals expert
    min_box_area: int = 4  # synthetic detections: connected regions smaller than this (pixels) are dropped
    depth_jump: float = 0.05  # normals from depth: a depth step above this between neighbours is a discontinuity

@dataclass
class ClipConfig(Shared):  # train and probe: the CLIP and its zero-shot evaluation
    init: str = ""  # the CLIP: a mobileclip.py (or cliptex.py) checkpoint, or OpenAI/OpenCLIP + --bpe
    bpe: str = ""  # tokenizer merges; default: bpe.txt beside the --init checkpoint (or one trained on the captions)
    seed: int = 0  # data order, crops, head init
    workers: int = 2  # DataLoader workers per rank
    eval: bool = True  # zero-shot evaluation (train: at the start and the end)
    zeroshot_data: str = ""  # ImageFolder for zero-shot top-1; default: the synthetic held-out set
    classnames: str = ""  # one class name per line, in folder order (default: the folder names)
    templates: str = ""  # prompt templates with '{}' (default: common.DEFAULT_TEMPLATES)

@dataclass
class TrainConfig(ClipConfig):
    labels: str = ""  # the folder `label` wrote (one label shard per data shard, same file name)
    tasks: str = "seg,depth,normals,det"  # tasks whose pseudo-labels are used
    baseline: bool = False  # CLIP-FT: contrastive loss only, on the same data, crops and steps
    w_seg: float = 1.0  # weight of the segmentation loss
    w_depth: float = 1.0  # weight of the depth loss
    w_normals: float = 1.0  # weight of the normals loss
    w_det: float = 1.0  # weight of the detection loss
    seg_classes: int = 11  # segmentation classes incl. background 0 (synthetic: 11; VOC experts: 21)
    det_classes: int = 11  # detection class ids 0..K-1 (synthetic: 1..10; torchvision COCO: 91)
    head_width: int = 64  # hidden width of each task head
    steps: int = 300  # optimizer steps
    batch_size: int = 128  # per process
    lr: float = 2e-4  # peak lr of the CLIP (1/10 of mobileclip.py's default: a continued training)
    head_lr: float = 2e-3  # peak lr of the fresh task heads
    weight_decay: float = 0.1  # decoupled weight decay on matrices
    warmup: int = 30  # linear warm-up steps, then cosine to zero
    beta2: float = 0.98  # AdamW beta2
    grad_clip: float = 1.0  # global gradient-norm clip; 0 = off
    shuffle_buffer: int = 2000  # samples in each worker's shuffle buffer
    precision: str = "auto"  # auto (bf16 autocast on GPU) | bf16 | fp32
    log_every: int = 50  # steps between log lines (the only host syncs)
    ckpt_every: int = 500  # steps between checkpoints
    keep_ckpts: int = 2  # newest checkpoints kept
    resume: str = ""  # 'auto' = the newest readable checkpoint in --out (fresh if none), or a checkpoint path
    overwrite: bool = False  # start over in an --out holding another run's checkpoints (they move to OUT/previous-N/)
    max_skip_frac: float = 0.5  # stop if more than this fraction of samples is unusable

@dataclass
class ProbeConfig(ClipConfig):
    val_data: str = ""  # held-out shards with seg.png / depth.png (default: the synthetic held-out set)
    probe_steps: int = 300  # steps of each dense.py linear probe
    probe_batch: int = 16  # batch size
    probe_lr: float = 5e-4  # backbone lr (frozen here), the head trains at 10x (dense.py's synthetic default)
    probe_images: int = 2000  # training images of each probe (0 = dense.py's default)
    probe_val_images: int = 0  # held-out images scored (0 = all)

@dataclass
class Config(LabelConfig, TrainConfig, ProbeConfig):
    base_steps: int = 800  # without --init: steps of the base CLIP trained first with mobileclip.py

IGNORE = 255  # segmentation: "the expert is unsure"
DENSE_STRIDE = 4  # the heads predict at 1/4 of the input (dense.py's finest level)
TASKS = ("seg", "depth", "normals", "det")

# ---- 1. Stored pseudo-label formats (spec 4): what `label` writes beside each sample, and how it reads back ----------

def encode_seg(classes: np.ndarray) -> bytes:
    """(H, W) class ids 0..254, 255 = ignore -> an 8-bit greyscale PNG."""
    return C.encode_member("png", Image.fromarray(classes.astype(np.uint8), "L"))

def decode_seg(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)), dtype=np.uint8)  # (H, W)

def encode_depth(depth: np.ndarray) -> bytes:
    """(H, W) relative inverse depth in [0, 1] (1 = near), 0 = invalid -> a 16-bit PNG of round(d * 65535);
    a valid value never rounds to 0."""
    q = np.round(np.clip(depth, 0, 1) * 65535).astype(np.uint16)
    q[(depth > 0) & (q == 0)] = 1
    return C.encode_member("png", Image.fromarray(q))

def decode_depth(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)), dtype=np.float32) / 65535  # (H, W), 0 = invalid

def encode_normals(normals: np.ndarray, valid: np.ndarray) -> bytes:
    """(H, W, 3) unit normals, (H, W) validity -> an RGB PNG of round((n + 1) * 127.5); (0, 0, 0) marks an
    invalid pixel (no unit vector maps there: it would need every component <= -0.996)."""
    q = np.round((np.clip(normals, -1, 1) + 1) * 127.5).astype(np.uint8)
    q[~valid] = 0
    return C.encode_member("png", Image.fromarray(q, "RGB"))

def decode_normals(data: bytes) -> tuple[np.ndarray, np.ndarray]:
    """-> (H, W, 3) unit normals (renormalised after quantisation), (H, W) validity."""
    q = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"), dtype=np.float32)
    n = q / 127.5 - 1
    return n / np.maximum(np.linalg.norm(n, axis=-1, keepdims=True), 1e-6), q.any(axis=-1)

def encode_boxes(boxes, classes, scores, size) -> dict:
    """Detections above the expert's threshold: boxes [x0, y0, x1, y1] in pixels of the stored image."""
    return {"boxes": [[round(float(v), 2) for v in b] for b in boxes], "classes": [int(c) for c in classes],
            "scores": [round(float(s), 4) for s in scores], "size": [int(size[0]), int(size[1])]}

# ---- 2. Experts (Sec. 3): image -> hard pseudo-labels. Each expert maps (PIL image, raw sample) -> members. ----------

def unsure_boundaries(mask: np.ndarray) -> np.ndarray:
    """The synthetic expert's confidence: IGNORE on the background pixels that touch an object (3x3) and on the
    object pixels that touch another object class, where the anti-aliased edge makes the class ambiguous (a
    heuristic standing in for a real expert's low softmax on boundaries; thin objects keep all their pixels)."""
    p = np.pad(mask, 1, mode="edge")
    H, W = mask.shape
    windows = np.stack([p[i:i + H, j:j + W] for i in range(3) for j in range(3)])  # (9, H, W)
    other = (windows != mask) & (windows > 0)  # (9, H, W): an object of another class in the window
    out = mask.copy()
    out[other.any(0)] = IGNORE
    return out

def connected_boxes(mask: np.ndarray, min_area: int) -> tuple[list, list]:
    """Boxes [x0, y0, x1, y1] (pixel edges) and classes of the 8-connected regions of each class > 0:
    min-label propagation, vectorised over the image (iterations ~ the largest region's diameter)."""
    H, W = mask.shape
    lab = np.where(mask > 0, np.arange(H * W).reshape(H, W), H * W)  # background never joins a region
    while True:
        new = lab.copy()
        for dy, dx in ((0, 1), (0, -1), (1, 0), (-1, 0), (1, 1), (1, -1), (-1, 1), (-1, -1)):
            src = np.full_like(lab, H * W)
            same = np.zeros_like(mask, dtype=bool)
            ys, yd = slice(max(dy, 0), H + min(dy, 0)), slice(max(-dy, 0), H + min(-dy, 0))
            xs, xd = slice(max(dx, 0), W + min(dx, 0)), slice(max(-dx, 0), W + min(-dx, 0))
            src[yd, xd], same[yd, xd] = lab[ys, xs], mask[ys, xs] == mask[yd, xd]
            new = np.where(same & (mask > 0), np.minimum(new, src), new)
        if (new == lab).all():
            break
        lab = new
    boxes, classes = [], []
    for r in np.unique(lab[mask > 0]):
        ys, xs = np.nonzero(lab == r)
        if len(ys) >= min_area:
            boxes.append([int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1])
            classes.append(int(mask[ys[0], xs[0]]))
    return boxes, classes

def normals_from_depth(depth: np.ndarray, jump: float) -> tuple[np.ndarray, np.ndarray]:
    """Surface normals of the depth map read as a height field z = d * W (1 = near, so z points toward the
    camera; x right, y down): n = normalise(-dz/dx, -dz/dy, 1) by central differences. Pixels next to a step
    above `jump` (an occlusion edge, where the derivative is meaningless) or without depth are invalid."""
    H, W = depth.shape
    z = np.pad(depth * W, 1, mode="edge")
    dx, dy = (z[1:-1, 2:] - z[1:-1, :-2]) / 2, (z[2:, 1:-1] - z[:-2, 1:-1]) / 2
    n = np.stack([-dx, -dy, np.ones_like(dx)], axis=-1)
    n /= np.linalg.norm(n, axis=-1, keepdims=True)
    p = np.pad(depth, 1, mode="edge")
    steps = [np.abs(p[1 + i:1 + i + H, 1 + j:1 + j + W] - depth) for i, j in ((0, 1), (0, -1), (1, 0), (-1, 0))]
    valid = (np.max(steps, axis=0) <= jump) & (depth > 0)
    return n.astype(np.float32), valid

class SyntheticExpert:
    """The synthetic world's renderer as the expert (its shards carry the ground truth: seg.png, 0 = background,
    1..10 shapes; depth.png, 16-bit, 1 = near): hard labels with the boundaries marked unsure, normals from
    depth, boxes from connected regions."""

    def __init__(self, task: str, cfg: Config):
        self.task, self.cfg = task, cfg

    def __call__(self, img: Image.Image, sample: dict) -> dict:
        need = "seg.png" if self.task in ("seg", "det") else "depth.png"
        if need not in sample:
            raise KeyError(f"the synthetic {self.task} expert needs {need} in the shards (not the synthetic world?)")
        if self.task == "seg":
            return {"seg": unsure_boundaries(decode_seg(sample["seg.png"]))}
        if self.task == "det":
            boxes, classes = connected_boxes(decode_seg(sample["seg.png"]), self.cfg.min_box_area)
            return {"det": (boxes, classes, [1.0] * len(boxes))}
        depth = decode_depth(sample["depth.png"])
        return {"depth": depth} if self.task == "depth" else {"normals": normals_from_depth(depth, self.cfg.depth_jump)}

class TorchvisionExpert:
    """torchvision's segmentation (DeepLabV3, FCN, LR-ASPP: 21 VOC classes) or detection (Faster/Mask R-CNN,
    RetinaNet, FCOS, SSD: COCO ids) model, built without downloading and loaded strictly from the user's weights
    file (torchvision's .pth). An auxiliary training head in the file is dropped; BN step counters missing from it
    (files saved from FrozenBatchNorm2d) are taken from the model: inference never reads them."""

    def __init__(self, task: str, name: str, weights: str, threshold: float, device):
        kind = torchvision.models.segmentation if task == "seg" else torchvision.models.detection
        if name not in (zoo := torchvision.models.list_models(module=kind)):
            C.fail(f"torchvision has no {task} model '{name}'; choose one of {', '.join(zoo)}")
        if not os.path.isfile(weights):
            C.fail(f"--{task}-expert torchvision:{name} needs --{task}-weights FILE (a .pth); got '{weights}'")
        model = torchvision.models.get_model(name, weights=None, weights_backbone=None,
                                             num_classes=21 if task == "seg" else 91)
        sd = read_weights(weights, f"--{task}-weights")
        sd = {**{k: v for k, v in model.state_dict().items() if k.endswith("num_batches_tracked")},
              **{k: v for k, v in sd.items() if not k.startswith("aux_classifier.")}}
        C.load_state_dict_checked(model, sd, f"--{task}-weights {weights} (torchvision:{name})")
        self.task, self.threshold, self.device = task, threshold, device
        self.model = model.to(device).eval()

    @torch.no_grad()
    def __call__(self, img: Image.Image, sample: dict) -> dict:
        x = torch.from_numpy(np.asarray(img, np.float32) / 255).permute(2, 0, 1).to(self.device)  # (3, H, W)
        if self.task == "seg":  # ImageNet normalisation, as the transforms of torchvision's weights
            x = torchvision.transforms.functional.normalize(x, [0.485, 0.456, 0.406], [0.229, 0.224, 0.225])
            prob, cls = self.model(x[None])["out"].float().softmax(1)[0].max(0)  # (H, W) each
            cls[prob < self.threshold] = IGNORE  # hard label only where the expert is confident
            return {"seg": cls.byte().cpu().numpy()}
        out = self.model([x])[0]  # detection models normalise and resize inside; boxes in the image's pixels
        keep = out["scores"] >= self.threshold
        return {"det": (out["boxes"][keep].tolist(), out["labels"][keep].tolist(), out["scores"][keep].tolist())}

def load_user_expert(spec: str, weights: str, task: str, device):
    """A depth or normals expert: a TorchScript file, or `module:Class` (importable, built with no arguments)
    with a state-dict file in --<task>-weights. Interface: forward(x) with x (1, 3, H, W) float RGB in [0, 1]
    (normalise inside the model) returns depth as (1, 1, h, w) / (1, h, w) / (h, w) relative INVERSE depth
    (larger = nearer, as DPT/MiDaS), or normals as (1, 3, h, w) with x right, y down, z toward the camera."""
    if os.path.isfile(spec):
        try:
            return torch.jit.load(spec, map_location=device).eval()
        except Exception as e:
            C.fail(f"--{task}-expert {spec} is not a TorchScript file ({type(e).__name__}); for a state dict use "
                   f"--{task}-expert module:Class --{task}-weights {spec}")
    if ":" not in spec:
        C.fail(f"--{task}-expert '{spec}': not a file, and not module:Class")
    import importlib
    mod, cls = spec.split(":", 1)
    try:
        model = getattr(importlib.import_module(mod), cls)()
    except Exception as e:
        C.fail(f"--{task}-expert {spec}: cannot build it ({type(e).__name__}: {str(e)[:120]})")
    if not os.path.isfile(weights):
        C.fail(f"--{task}-expert {spec} needs --{task}-weights FILE; got '{weights}'")
    C.load_state_dict_checked(model, read_weights(weights, f"--{task}-weights"), f"--{task}-weights {weights}")
    return model.to(device).eval()

def read_weights(path: str, flag: str) -> dict:
    """A state-dict file (weights only: no pickled code runs), unwrapped; one line if it does not read."""
    try:
        return C.unwrap_state_dict(C.read_checkpoint(path))
    except (ValueError, OSError) as e:
        C.fail(f"{flag} {path}: not a state-dict file ({e})")

class UserExpert:
    """Runs a depth / normals model from load_user_expert at the image's stored resolution."""

    def __init__(self, task: str, model, device):
        self.task, self.model, self.device = task, model, device

    @torch.no_grad()
    def __call__(self, img: Image.Image, sample: dict) -> dict:
        x = torch.from_numpy(np.asarray(img, np.float32) / 255).permute(2, 0, 1)[None].to(self.device)
        y = self.model(x).float()
        y = y.reshape(1, -1, *y.shape[-2:])  # (1, c, h, w)
        y = F.interpolate(y, size=x.shape[-2:], mode="bilinear", align_corners=False)[0]
        if self.task == "depth":  # relative: min-max over the image to (0, 1], 1 = near
            d = (y[0] - y[0].min()) / (y[0].max() - y[0].min()).clamp(min=1e-6)
            return {"depth": d.clamp(min=1 / 65535).cpu().numpy()}
        n = F.normalize(y, dim=0).permute(1, 2, 0).cpu().numpy()
        return {"normals": (n, np.isfinite(n).all(-1))}

def build_experts(cfg: Config, device) -> dict:
    """{task: expert} for --experts. Normals from depth (spec 4) are the string "depth": label_sample derives
    them from the depth expert's map, built under "_depth" when depth itself is not stored."""
    tasks = [t for t in cfg.experts.split(",") if t]
    if bad := [t for t in tasks if t not in TASKS]:
        C.fail(f"unknown expert task(s) {bad}; choose from {', '.join(TASKS)}")

    def make(t):
        spec = getattr(cfg, f"{t}_expert")
        if spec == "synthetic":
            return SyntheticExpert(t, cfg)
        if t in ("seg", "det"):
            if not spec.startswith("torchvision:"):
                C.fail(f"--{t}-expert '{spec}': use synthetic or torchvision:<name>")
            return TorchvisionExpert(t, spec.split(":", 1)[1], getattr(cfg, f"{t}_weights"),
                                     getattr(cfg, f"{t}_threshold"), device)
        return UserExpert(t, load_user_expert(spec, getattr(cfg, f"{t}_weights"), t, device), device)
    experts = {t: "depth" if t == "normals" and cfg.normals_expert == "depth" else make(t) for t in tasks}
    if experts.get("normals") == "depth" and "depth" not in experts:
        experts["_depth"] = make("depth")
    return experts

def label_sample(sample: dict, experts: dict, cfg: Config) -> dict:
    """One image through every expert -> the members stored beside it: seg.png, depth.png, normals.png,
    det.json (exactly those of --experts)."""
    img, y = C.decode_image(sample), {}
    for task, expert in experts.items():
        if expert != "depth":
            y.update(expert(img, sample))
    if experts.get("normals") == "depth":  # the expert's depth map by finite differences
        y["normals"] = normals_from_depth(y.pop("depth") if "_depth" in experts else y["depth"], cfg.depth_jump)
    out = {"__key__": sample["__key__"]}
    if "seg" in y:
        out["seg.png"] = encode_seg(y["seg"])
    if "depth" in y:
        out["depth.png"] = encode_depth(y["depth"])
    if "normals" in y:
        out["normals.png"] = encode_normals(*y["normals"])
    if "det" in y:
        out["det.json"] = encode_boxes(*y["det"], img.size)
    return out

def label(cfg: LabelConfig):
    """Pseudo-label the data offline with the task experts (Sec. 3): one label shard per data shard.
    Shards split over ranks, each label shard under --out with its data shard's file name, samples in the same order (a
    sample whose image does not decode is left out and counted). Finished label shards are kept: a rerun continues."""
    rank, _, world, device = C.setup_distributed(cfg.device)
    shards = resolve_shards(cfg)
    if len({os.path.basename(p) for p in shards}) != len(shards):
        C.fail("two data shards share a file name; label each folder into its own --out")
    C.document_run(cfg.out, cfg, [__file__, C.__file__])
    experts = build_experts(cfg, device)
    t0, n_done, skipped, stop = time.time(), 0, {}, C.StopSignal()
    todo = [p for p in shards[rank::world] if not os.path.exists(os.path.join(cfg.out, os.path.basename(p)))]
    for path in C.progress(todo, "label"):
        read = []  # the samples of this shard, labelled or not

        def labelled():
            for s in C.iter_tar_samples(path, skipped):
                if stop.requested:  # the shard in progress stays unwritten (write_shard renames a finished file only)
                    print(f"rank {rank}: label stopped by a signal; finished shards are kept, a rerun continues")
                    raise SystemExit(0)
                read.append(1)
                try:
                    yield label_sample(s, experts, cfg)
                except Exception as e:  # corrupt image, missing ground truth: skip and count
                    skipped[type(e).__name__] = skipped.get(type(e).__name__, 0) + 1
                    skipped.setdefault("first", f"{type(e).__name__}: {str(e)[:150]}")
        n = C.write_shard(dst := os.path.join(cfg.out, os.path.basename(path)), labelled())
        if n == 0 and read:  # samples, none usable: a wrong expert or wrong data (an unreadable shard: counted)
            os.remove(dst)
            C.fail(f"no sample of {path} could be labelled; first problem: {skipped.get('first', 'no samples')}")
        n_done += n
    if todo and not n_done:
        C.fail(f"no sample of --data could be labelled; skipped: {json.dumps(skipped)}")
    print(f"rank {rank}: labelled {n_done} samples with {', '.join(experts)} in {time.time() - t0:.0f} s"
          f"{'; skipped ' + json.dumps(skipped) if skipped else ''}", flush=True)
    C.finish_run(cfg.out, extra=f"label shards {cfg.out}/*.tar")
    C.cleanup_distributed()

def resolve_shards(cfg: Shared) -> list[str]:
    """--data's shards, or the synthetic world's (made on first use); one line if missing or all empty (0 bytes)."""
    try:
        shards = C.expand_shards(cfg.data or synthetic(cfg)["train"])
    except FileNotFoundError as e:
        C.fail(f"--data: {e}")
    if all(os.path.isfile(p) and os.path.getsize(p) == 0 for p in shards):
        C.fail(f"--data {cfg.data}: {'its' if len(shards) == 1 else f'all {len(shards)}'} shard file(s) empty")
    return shards

def synthetic(cfg: Config) -> dict:
    cache = cfg.cache_dir or os.path.join(os.path.expanduser("~"), ".cache", "effclip")
    return C.synthetic_world(cache, cfg.synthetic_train, cfg.synthetic_val, M.model_spec(cfg.model)["image_size"], 0)

# ---- 3. Training data: image-text samples joined with their pseudo-labels, one crop for both -------------------------

class LabelledShards(C.ShardStream):
    """common.ShardStream over data shards, each read in step with the label shard of the same name (the data's
    keys in order, minus those the experts could not read, so one forward pass matches them). Partition and
    shuffle are ShardStream's; only the shard reader is replaced."""

    def __init__(self, shards: list[str], label_dir: str, decode, batch_size: int, **kw):
        super().__init__(shards, decode, batch_size, **kw)
        self.label_dir = label_dir

    def read_shard(self, path: str, skipped: dict):
        labels = C.iter_tar_samples(os.path.join(self.label_dir, os.path.basename(path)), skipped)
        pending = next(labels, None)
        for s in C.iter_tar_samples(path, skipped):
            if pending is not None and pending["__key__"] == s["__key__"]:
                s.update({k: v for k, v in pending.items() if k != "__key__"})
                pending = next(labels, None)
            yield s  # a sample the experts skipped has no label members: decode rejects it if a task needs them

def crop_label(arr: np.ndarray, box, image_size, size: int, resample) -> np.ndarray:
    """Apply the image's crop box (in image pixels) to a label map of any resolution, resize to size x size."""
    H, W = arr.shape[:2]
    sx, sy = W / image_size[0], H / image_size[1]  # the expert may have stored another resolution
    b = (box[0] * sx, box[1] * sy, box[2] * sx, box[3] * sy)
    return np.asarray(Image.fromarray(arr).resize((size, size), resample, box=b))

class LabelledDecode:
    """Sample -> {image, ids, caption} as common.ImageTextDecode (the same crop from the same seed), plus each task's
    targets cropped with the same box (spec 6: nearest for class ids, bilinear for depth / normals): seg (S, S); depth
    (S, S), 0 = invalid; normals (3, S, S), normals_valid (S, S); det_heat (K, S/4, S/4), det_size (2, S/4, S/4)
    in stride-4 cells, det_centre (S/4, S/4). A task's missing label raises (the sample is skipped, counted)."""

    def __init__(self, tokenizer, size: int, context_length: int, tasks, det_classes: int, seed: int,
                 resample=Image.BICUBIC):
        self.text = C.ImageTextDecode(tokenizer, size, context_length, True, seed, resample=resample)
        self.size, self.tasks, self.K, self.seed = size, tasks, det_classes, seed

    def __call__(self, sample: dict) -> dict:
        caption, img = C.decode_caption(sample), C.decode_image(sample)
        box = C.random_resized_crop_box(*img.size, C.sample_rng(self.seed, sample), self.text.scale)
        S = self.size
        out = {"image": C.image_to_uint8(img, S, box, self.text.resample),
               "ids": self.text.tokenizer([caption], self.text.context_length)[0], "caption": caption}
        crop = lambda a, resample: crop_label(a, box, img.size, S, resample)  # noqa: E731
        if "seg" in self.tasks:
            out["seg"] = torch.from_numpy(crop(decode_seg(sample["seg.png"]), Image.NEAREST).astype(np.int64))
        if "depth" in self.tasks:  # bilinear; invalid wherever an invalid pixel took part
            d = decode_depth(sample["depth.png"])
            ok = crop((d > 0).astype(np.float32), Image.BILINEAR) > 0.999
            out["depth"] = torch.from_numpy(np.where(ok, crop(d, Image.BILINEAR), 0).astype(np.float32))
        if "normals" in self.tasks:  # bilinear per component, renormalised; the same validity rule
            n, valid = decode_normals(sample["normals.png"])
            n = np.stack([crop(n[..., c], Image.BILINEAR) for c in range(3)])  # (3, S, S)
            norm = np.linalg.norm(n, axis=0)
            out["normals"] = torch.from_numpy(n / np.maximum(norm, 1e-6))
            ok = crop(valid.astype(np.float32), Image.BILINEAR) > 0.999
            out["normals_valid"] = torch.from_numpy(ok & (norm > 0.5))
        if "det" in self.tasks:
            out.update(det_targets(json.loads(sample["det.json"]), box, img.size, S, self.K))
        return out

def det_targets(det: dict, box, image_size, size: int, K: int) -> dict:
    """CenterNet-style targets on the stride-4 grid of the crop: per class a heatmap of Gaussian peaks at the
    box centres (sigma = sqrt(w h) / 6 cells, at least 0.5; exactly 1 at the centre cell), and the box
    size (w, h) in cells at each centre."""
    g = size // DENSE_STRIDE
    heat, wh, centre = np.zeros((K, g, g), np.float32), np.zeros((2, g, g), np.float32), np.zeros((g, g), bool)
    f = image_size[0] / det["size"][0]  # the expert's pixels -> the image's (1 unless it ran at another size)
    sx, sy = f * size / (box[2] - box[0]), f * size / (box[3] - box[1])  # -> crop pixels
    ys, xs = np.mgrid[0:g, 0:g].astype(np.float32)
    for (x0, y0, x1, y1), k in zip(det["boxes"], det["classes"]):
        x0, x1 = np.clip([(x0 - box[0] / f) * sx, (x1 - box[0] / f) * sx], 0, size) / DENSE_STRIDE  # in cells
        y0, y1 = np.clip([(y0 - box[1] / f) * sy, (y1 - box[1] / f) * sy], 0, size) / DENSE_STRIDE
        if not 0 <= k < K or x1 - x0 < 0.5 or y1 - y0 < 0.5:  # outside the crop, or another label space
            continue
        cx, cy = min(int((x0 + x1) / 2), g - 1), min(int((y0 + y1) / 2), g - 1)
        sigma = max(0.5, math.sqrt((x1 - x0) * (y1 - y0)) / 6)
        heat[k] = np.maximum(heat[k], np.exp(-((xs - cx) ** 2 + (ys - cy) ** 2) / (2 * sigma ** 2)))
        heat[k, cy, cx], wh[:, cy, cx], centre[cy, cx] = 1.0, (x1 - x0, y1 - y0), True
    return {"det_heat": torch.from_numpy(heat), "det_size": torch.from_numpy(wh),
            "det_centre": torch.from_numpy(centre)}

# ---- 4. Light heads on the image backbone (Sec. 3, spec 2) -----------------------------------------------------------

def dense_features(visual: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """The image tower's embedding (as visual(x)) and its dense features from the same forward pass:
    MCi -> its stage outputs (B, C_s, H/2^(s+2), W/2^(s+2)); a ViT -> the patch tokens (B, D, H/p, W/p)."""
    if isinstance(visual, M.MCi):
        x, feats = visual.patch_embed(x), []  # (B, C0, H/4, W/4)
        for m in visual.network:
            x = m(x)
            if isinstance(m, nn.Sequential):  # a stage (downsamplers and RepCPE are not Sequential)
                feats.append(x)
        return visual.head(visual.conv_exp(x)), feats
    if isinstance(visual, C.ViT):
        B, _, H, W = x.shape
        tokens = visual.forward_tokens(x)  # (B, 1 + N, D)
        emb = tokens[:, 0] @ visual.proj + getattr(visual, "proj_bias", 0)  # ClipViT adds a bias
        grid = tokens[:, 1:].transpose(1, 2).reshape(B, -1, H // visual.patch, W // visual.patch)  # (B, D, h, w)
        return emb, [grid]
    C.fail(f"cliptex.py attaches heads to MCi and ViT towers, not {type(visual).__name__}")

def feature_channels(visual: nn.Module) -> list[int]:
    if isinstance(visual, M.MCi):
        return [m[-1].convffn.fc2.out_channels for m in visual.network if isinstance(m, nn.Sequential)]
    return [visual.patch_embed.out_channels]

class DenseHead(nn.Module):
    """A light head: per level a 1x1 conv to `width`, upsampled to stride 4 and summed (an FPN without the
    top-down path), GELU, 1x1 conv to the task's channels."""

    def __init__(self, channels: list[int], width: int, out: int):
        super().__init__()
        self.lateral = nn.ModuleList(nn.Conv2d(c, width, 1) for c in channels)
        self.out = nn.Conv2d(width, out, 1)

    def forward(self, feats: list[torch.Tensor], grid: tuple[int, int]) -> torch.Tensor:
        x = sum(F.interpolate(l(f), size=grid, mode="bilinear", align_corners=False) if f.shape[-2:] != grid
                else l(f) for l, f in zip(self.lateral, feats))  # (B, width, H/4, W/4)
        return self.out(F.gelu(x))  # (B, out, H/4, W/4)

class CLIPTeX(nn.Module):
    """A CLIP and one DenseHead per task: forward -> (image emb, text emb, scale, {task: raw head output})."""

    def __init__(self, clip: C.CLIP, tasks: list[str], seg_classes: int, det_classes: int, width: int):
        super().__init__()
        self.clip, chans = clip, feature_channels(clip.visual)
        outs = {"seg": seg_classes, "depth": 1, "normals": 3, "det": det_classes + 2}  # det: heatmap + (w, h)
        self.heads = nn.ModuleDict({t: DenseHead(chans, width, outs[t]) for t in tasks})
        if "det" in self.heads:  # CenterNet's prior: sigmoid(-2.19) = 0.1 on the heatmap at the start
            nn.init.constant_(self.heads["det"].out.bias[:det_classes], -2.19)

    def forward(self, images, ids):
        emb, feats = dense_features(self.clip.visual, images)
        grid = (images.shape[-2] // DENSE_STRIDE, images.shape[-1] // DENSE_STRIDE)
        outs = {t: h(feats, grid) for t, h in self.heads.items()}
        return (F.normalize(emb, dim=-1), self.clip.encode_text(ids, True),
                self.clip.logit_scale.exp().clamp(max=100.0), outs)

# ---- 5. Task losses (spec 2): batched, masked sums in fp32, no host sync; a naive loop version beside each -----------

def upsample(x: torch.Tensor, size) -> torch.Tensor:
    return F.interpolate(x.float(), size=size, mode="bilinear", align_corners=False)

def seg_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Cross-entropy over the pixels the expert was sure of: logits (B, K, h, w) at any stride, target (B, S, S)
    with IGNORE; mean over valid pixels (0 when there are none, where F.cross_entropy would give NaN)."""
    ce = F.cross_entropy(upsample(logits, target.shape[-2:]), target, ignore_index=IGNORE, reduction="sum")
    return ce / (target != IGNORE).sum().clamp(min=1)

def seg_loss_reference(logits, target) -> torch.Tensor:
    up, total, n = upsample(logits, target.shape[-2:]), 0.0, 0
    for b, i, j in zip(*torch.nonzero(target != IGNORE, as_tuple=True)):
        total = total - up[b, :, i, j].log_softmax(0)[target[b, i, j]]
        n += 1
    return total / n if n else torch.zeros(())

def depth_loss(pred: torch.Tensor, target: torch.Tensor, lambda_: float = 0.85) -> torch.Tensor:
    """Scale-invariant log loss (Eigen et al. 2014, lambda 0.85 as BTS/AdaBins) per image over target > 0:
    g = log sigmoid(pred) - log target, L = sqrt(mean g^2 - lambda (mean g)^2), averaged over the images that
    have valid pixels. pred (B, 1, h, w) raw, target (B, S, S) relative inverse depth."""
    valid = target > 0
    g = (F.logsigmoid(upsample(pred, target.shape[-2:])[:, 0]) - target.clamp(min=1e-6).log()) * valid
    n = valid.flatten(1).sum(1)  # (B,)
    m1, m2 = g.flatten(1).sum(1) / n.clamp(min=1), (g ** 2).flatten(1).sum(1) / n.clamp(min=1)
    per_image = (m2 - lambda_ * m1 ** 2).clamp(min=1e-8).sqrt()
    return (per_image * (n > 0)).sum() / (n > 0).sum().clamp(min=1)

def depth_loss_reference(pred, target, lambda_: float = 0.85) -> torch.Tensor:
    up, losses = upsample(pred, target.shape[-2:])[:, 0].sigmoid(), []
    for b in range(len(target)):
        v = target[b] > 0
        if v.any():
            g = up[b][v].log() - target[b][v].log()
            losses.append(torch.sqrt((g ** 2).mean() - lambda_ * g.mean() ** 2))
    return torch.stack(losses).mean() if losses else torch.zeros(())

def normals_loss(pred: torch.Tensor, target: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """1 - cosine between the L2-normalised prediction and the target normal, mean over valid pixels.
    pred (B, 3, h, w), target (B, 3, S, S) unit, valid (B, S, S)."""
    cos = (F.normalize(upsample(pred, target.shape[-2:]), dim=1) * target.float()).sum(1)  # (B, S, S)
    return ((1 - cos) * valid).sum() / valid.sum().clamp(min=1)

def normals_loss_reference(pred, target, valid) -> torch.Tensor:
    up, total, n = upsample(pred, target.shape[-2:]), 0.0, 0
    for b, i, j in zip(*torch.nonzero(valid, as_tuple=True)):
        total = total + 1 - F.cosine_similarity(up[b, :, i, j], target[b, :, i, j].float(), dim=0)
        n += 1
    return total / n if n else torch.zeros(())

def det_loss(out: torch.Tensor, heat: torch.Tensor, size: torch.Tensor, centre: torch.Tensor,
             alpha: float = 2.0, beta: float = 4.0, w_size: float = 0.1) -> torch.Tensor:
    """CenterNet's objective (Zhou et al. 2019) on the stride-4 grid. out (B, K + 2, g, g): K heatmap logits
    and (w, h) in cells. Penalty-reduced focal loss: -(1-p)^a log p at centres (heat == 1), -(1-y)^b p^a
    log(1-p) elsewhere, summed and divided by the number of centres; plus w_size x L1 of the size at the
    centres / the number of centres. The offset head of CenterNet is left out."""
    K = heat.shape[1]
    logit, wh = out[:, :K].float(), out[:, K:].float()
    p, pos = logit.sigmoid(), heat == 1
    log_p, log_1p = F.logsigmoid(logit), F.logsigmoid(-logit)
    focal = torch.where(pos, (1 - p) ** alpha * log_p, (1 - heat) ** beta * p ** alpha * log_1p)
    n = pos.sum().clamp(min=1)
    l1 = ((wh - size).abs().sum(1) * centre).sum() / centre.sum().clamp(min=1)
    return -focal.sum() / n + w_size * l1

def det_loss_reference(out, heat, size, centre, alpha=2.0, beta=4.0, w_size=0.1) -> torch.Tensor:
    K, total, npos, l1, ncent = heat.shape[1], 0.0, 0, 0.0, 0
    for b, k, i, j in np.ndindex(*heat.shape):
        p, y = torch.sigmoid(out[b, k, i, j].float()), heat[b, k, i, j]
        if y == 1:
            total, npos = total - (1 - p) ** alpha * torch.log(p), npos + 1
        else:
            total = total - (1 - y) ** beta * p ** alpha * torch.log(1 - p)
    for b, i, j in zip(*torch.nonzero(centre, as_tuple=True)):
        l1, ncent = l1 + (out[b, K:, i, j].float() - size[b, :, i, j]).abs().sum(), ncent + 1
    return total / max(npos, 1) + w_size * l1 / max(ncent, 1)

def task_losses(outs: dict, batch: dict) -> dict:
    """{task: loss} for the heads present."""
    fns = {"seg": lambda o: seg_loss(o, batch["seg"]), "depth": lambda o: depth_loss(o, batch["depth"]),
           "normals": lambda o: normals_loss(o, batch["normals"], batch["normals_valid"]),
           "det": lambda o: det_loss(o, batch["det_heat"], batch["det_size"], batch["det_centre"])}
    return {t: fns[t](o) for t, o in outs.items()}

# ---- 6. Training: L = L_CLIP + sum_t w_t L_t (Sec. 3), or the CLIP-FT baseline (--baseline) --------------------------

def read_init(cfg: ClipConfig) -> tuple[dict | None, str]:
    """(the --init checkpoint or None, the model name); a file that does not read stops with one line."""
    if cfg.init and not os.path.isfile(cfg.init):
        C.fail(f"--init file not found: {cfg.init}")
    try:
        ck = C.read_checkpoint(cfg.init) if cfg.init else None
    except ValueError as e:  # OpenAI's TorchScript archive (a zip holding constants.pkl): mobileclip.load_init reads it
        names = zipfile.ZipFile(cfg.init).namelist() if zipfile.is_zipfile(cfg.init) else []
        if not any(n.endswith("constants.pkl") for n in names):
            C.fail(f"--init {cfg.init}: cannot read it ({e})")
        ck = None
    ours = isinstance(ck, dict) and "model_name" in ck and "model" in ck
    return (ck, ck["model_name"]) if ours else (None, cfg.model)

def load_clip(cfg: Config, ck: dict | None, name: str, shards: list[str]):
    """The CLIP to continue and its tokenizer: a mobileclip.py / cliptex.py checkpoint (tokenizer: --bpe or
    the bpe.txt beside it), OpenAI/OpenCLIP or ml-mobileclip weights (--bpe), or a fresh model (no --init; a
    BPE trained on the captions). The tokenizer is saved as OUT/bpe.txt, where dense.py and samclip.py look."""
    mcfg = M.Config(model=name, out=cfg.out, bpe=cfg.bpe, init=cfg.init,
                    act=(ck or {}).get("config", {}).get("act", "gelu"))
    if ck is not None:
        bpe = cfg.bpe or os.path.join(os.path.dirname(cfg.init), "bpe.txt")
        if not os.path.isfile(bpe):
            C.fail(f"--init {cfg.init}: no bpe.txt beside it; give --bpe")
        tok = C.Tokenizer(bpe)
        if tok.vocab_size != ck["vocab_size"]:
            C.fail(f"--bpe {bpe} has {tok.vocab_size} tokens, the checkpoint's text tower {ck['vocab_size']}")
        clip = M.build_model(mcfg, ck["vocab_size"])
        M.fit_head_bias(clip, ck["model"])  # a run from a v1 MobileCLIP whose timm head learned a bias
        C.load_state_dict_checked(clip, ck["model"], f"--init {cfg.init}")
    elif cfg.init:
        if not cfg.bpe:
            C.fail("--init of OpenAI/OpenCLIP/ml-mobileclip weights needs --bpe (the CLIP merges file)")
        tok = C.Tokenizer(cfg.bpe)
        clip = M.build_model(mcfg, tok.vocab_size)
        M.load_pretrained(clip, cfg.init, name) if name in M.MOBILECLIP_MODELS else M.load_init(clip, mcfg)
    else:
        tok = M.make_tokenizer(mcfg, "::".join(shards))
        clip = M.build_model(mcfg, tok.vocab_size)
    if C.get_rank() == 0 and not os.path.exists(os.path.join(cfg.out, "bpe.txt")):
        os.makedirs(cfg.out, exist_ok=True)
        tok.save(os.path.join(cfg.out, "bpe.txt"))
    return clip, tok

def make_optimizer(model: CLIPTeX, cfg: Config) -> torch.optim.Optimizer:
    """AdamW: the CLIP at --lr, the fresh heads at --head-lr (their groups carry lr_mult)."""
    groups = C.param_groups(model.clip, cfg.weight_decay)
    groups += [dict(g, lr_mult=cfg.head_lr / cfg.lr) for g in C.param_groups(model.heads, cfg.weight_decay)]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=cfg.lr, betas=(0.9, cfg.beta2), eps=1e-6,
                             fused=next(model.parameters()).is_cuda)

def parse_tasks(cfg: TrainConfig) -> list[str]:
    """--tasks, checked; a task needs --labels, a folder (its shards are checked against the data's in train)."""
    tasks = [] if cfg.baseline else [t for t in cfg.tasks.split(",") if t]
    if bad := [t for t in tasks if t not in TASKS]:
        C.fail(f"unknown task(s) {bad}; choose from {', '.join(TASKS)}")
    if tasks and not cfg.labels:
        C.fail("train needs --labels (the folder `cliptex.py label` wrote), or --baseline for contrastive only")
    if cfg.labels and not os.path.isdir(cfg.labels):
        C.fail(f"--labels folder not found: {cfg.labels}")
    if small := [k for k in ("seg_classes", "det_classes", "head_width") if getattr(cfg, k) < 1]:
        C.fail(f"--{small[0].replace('_', '-')} {getattr(cfg, small[0])}: must be >= 1")
    return tasks

def zeroshot(clip, tok, cfg: Config, name: str, zs_dir: str, device) -> dict:
    """Zero-shot top-1/top-5 with mobileclip.py's evaluation (prompt ensemble, the model's preprocessing)."""
    mcfg = M.Config(model=name, classnames=cfg.classnames, templates=cfg.templates)
    return M.evaluate(clip, tok, mcfg, zs_dir, "", device) if zs_dir else {}

def train(cfg: TrainConfig):
    """Continue a CLIP with L_CLIP + the task losses on the stored pseudo-labels (CLIPTeX), or CLIP-FT (--baseline).
    A mobileclip.py checkpoint (the CLIP) plus the heads every --ckpt-every steps, resumable with its data position."""
    rank, local_rank, world, device = C.setup_distributed(cfg.device)
    tasks = parse_tasks(cfg)
    weights = {t: getattr(cfg, f"w_{t}") for t in tasks}
    ck, name = read_init(cfg)
    cfg = dataclasses.replace(cfg, model=name)
    shards = resolve_shards(cfg)
    if missing := [p for p in shards if cfg.labels and not os.path.isfile(f"{cfg.labels}/{os.path.basename(p)}")]:
        C.fail(f"{len(missing)} of {len(shards)} data shards have no label shard in {cfg.labels}, e.g. "
               f"{os.path.basename(missing[0])}; run `cliptex.py label` on them")
    C.document_run(cfg.out, cfg, [__file__, C.__file__, M.__file__])
    state = C.load_checkpoint(cfg.resume, cfg.out)  # before any model is built: a file that does not read is one line
    if state is not None and (state.get("model_name"), state.get("tasks")) != (name, tasks):
        C.fail(f"checkpoint {cfg.resume} is of {state.get('model_name')} with tasks {state.get('tasks')}, "
               f"not {name} with {tasks}")
    zs_dir = cfg.zeroshot_data or ("" if cfg.data else synthetic(cfg)["val_folder"])
    torch.manual_seed(cfg.seed)  # the heads' init, the same on every rank
    clip, tok = load_clip(cfg, ck, name, shards)
    del ck
    spec = M.model_spec(name)
    model = CLIPTeX(clip, tasks, cfg.seg_classes, cfg.det_classes, cfg.head_width).to(device)
    if name in M.MOBILECLIP_MODELS:
        model = model.to(memory_format=torch.channels_last)
    C.print0(f"model {name}: CLIP {sum(p.numel() for p in clip.parameters()) / 1e6:.2f}M + heads "
             f"{sum(p.numel() for p in model.heads.parameters()) / 1e6:.3f}M; tasks {tasks or 'none (CLIP-FT)'}")
    opt = make_optimizer(model, cfg)
    log = C.RunLog(cfg.out)

    # ---- resume ------------------------------------------------------------------------------------
    start, data_pos = 0, {}
    if state is not None:
        C.load_state_dict_checked(clip, state["model"], f"checkpoint {cfg.resume}")
        C.load_state_dict_checked(model.heads, state["heads"], f"checkpoint {cfg.resume} (heads)")
        opt.load_state_dict(state["optimizer"])
        C.set_rng_state(state["rng"])
        start = state["step"]
        if len(state["data"]) == world and len(state["data"].get(rank, {})) == max(1, cfg.workers):
            data_pos = state["data"][rank]
        else:
            C.print0("warning: world size or --workers changed; the data stream restarts at its beginning")
        C.print0(f"resumed from step {start}")

    # ---- data: the same samples and crops with or without tasks (the baseline differs only in the loss)
    decode = LabelledDecode(tok, spec["image_size"], spec["context_length"], tasks, cfg.det_classes, cfg.seed,
                            M.RESAMPLE[spec["interpolation"]])
    kw = dict(rank=rank, world=world, seed=cfg.seed, shuffle_buffer=cfg.shuffle_buffer, start_pos=data_pos,
              start_batch=start)
    stream = (LabelledShards(shards, cfg.labels, decode, cfg.batch_size, **kw) if cfg.labels
              else C.ShardStream(shards, decode, cfg.batch_size, **kw))
    batches = iter(C.make_loader(stream, cfg.workers, device.type == "cuda"))
    position = C.DataPosition()
    position.pos = {int(w): p for w, p in data_pos.items()}

    train_model = DDP(model, device_ids=[local_rank] if device.type == "cuda" else None) if world > 1 else model
    bf16 = cfg.precision == "bf16" or (cfg.precision == "auto" and device.type == "cuda")
    stop = C.StopSignal()
    nonfinite = torch.zeros((), dtype=torch.bool, device=device)
    t0, seen, path = time.time(), 0, None
    for step in C.progress(range(start, cfg.steps + 1), "train"):
        last_step = step == cfg.steps
        stopping = stop.requested if world == 1 else (step % cfg.log_every == 0 and stop.agreed(device))

        # ---- zero-shot: the starting point and the end (spec 6: confirm it is kept) -------------------
        if cfg.eval and (last_step or step == 0):
            if rank == 0:
                log.log(step, **zeroshot(clip, tok, cfg, name, zs_dir, device))
            C.barrier()

        # ---- checkpoint: a mobileclip.py checkpoint (dense.py and mobileclip.py read it) + the heads ----
        if (last_step or stopping or step % cfg.ckpt_every == 0) and step > start:
            if nonfinite.item():
                C.fail(f"non-finite loss before step {step}; the last good checkpoint in {cfg.out} is kept")
            C.save_checkpoint(path := os.path.join(cfg.out, f"ckpt-{step}.pt"), {
                "model": clip.state_dict(), "heads": model.heads.state_dict(), "tasks": tasks,
                "optimizer": opt.state_dict(), "step": step, "rng": C.rng_state(), "data": position.state(),
                "model_name": name, "config": dataclasses.asdict(cfg), "vocab_size": tok.vocab_size})
            C.prune_checkpoints(cfg.out, cfg.keep_ckpts, written=path)
        if stopping:  # SIGTERM: saved above; stop the whole program (compare too), continue with --resume auto
            C.print0(f"stopped by a signal at step {step}: {path or 'no step taken'}; --resume auto continues")
            batches.close()  # shuts the workers down: they ignore the signal (C.ignore_stop_signals)
            C.cleanup_distributed()
            raise SystemExit(0)
        if last_step:
            break

        # ---- forward, backward, step --------------------------------------------------------------
        batch = next(batches)
        position.update(batch)
        images = M.preprocess(batch["image"].to(device, non_blocking=True), spec)  # (B, 3, S, S)
        ids = batch["ids"].to(device, non_blocking=True)
        targets = {k: v.to(device, non_blocking=True) for k, v in batch.items()
                   if torch.is_tensor(v) and k not in ("image", "ids")}
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            img, txt, scale, outs = train_model(images, ids)
            l_clip = C.contrastive_loss(img, txt, scale)
            l_tasks = task_losses(outs, targets)
            loss = l_clip + sum(weights[t] * l for t, l in l_tasks.items())
        loss.backward()
        gnorm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip or float("inf"))
        lr = C.lr_at(step, cfg.lr, cfg.warmup, cfg.steps)
        for g in opt.param_groups:
            g["lr"] = lr * g.get("lr_mult", 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        nonfinite |= ~torch.isfinite(loss.detach())
        seen += len(images)

        # ---- log (the only host sync) ---------------------------------------------------------------
        if (step + 1) % cfg.log_every == 0 or step + 1 == cfg.steps:
            if nonfinite.item():
                C.fail(f"non-finite loss at step {step}; the last good checkpoint in {cfg.out} is kept")
            skipped = position.skip_totals()
            read = seen + sum(skipped.values())
            if read and sum(skipped.values()) / read > cfg.max_skip_frac:
                C.fail(f"{sum(skipped.values())} of {read} samples unusable ({skipped}); check --data and --labels")
            log.log(step + 1, loss=loss.item(), clip=l_clip.item(), **{t: l.item() for t, l in l_tasks.items()},
                    lr=lr, grad_norm=gnorm.item(), samples_per_s=seen * world / (time.time() - t0),
                    skipped=sum(skipped.values()))
            t0, seen = time.time(), 0
    C.finish_run(cfg.out, path)
    C.cleanup_distributed()

# ---- 7. Evaluation: dense.py's frozen linear probes, and the comparison on the synthetic world -----------------------

def probe(cfg: ProbeConfig) -> dict:
    """Score a CLIP (--init): zero-shot top-1 and dense.py's frozen linear probes of its backbone (seg, depth).
    Probes: BN + 1x1 conv on every level; mIoU (common.miou, as dense.py scores), depth RMSE / AbsRel / delta1. No
    --data: the synthetic world's truth."""
    import dense
    ck, name = read_init(cfg)
    if ck is None:
        C.fail("probe needs --init: a checkpoint of cliptex.py or mobileclip.py")
    if cfg.data and not cfg.val_data:
        C.fail("probe with --data needs --val-data (held-out shards with seg.png / depth.png)")
    C.document_run(cfg.out, cfg, [__file__, C.__file__])
    metrics = {}
    if cfg.eval:
        device = C.setup_distributed(cfg.device)[3]
        clip, tok = load_clip(dataclasses.replace(cfg, out=os.path.dirname(cfg.init)), ck, name, [])
        zs = cfg.zeroshot_data or ("" if cfg.data else synthetic(dataclasses.replace(cfg, model=name))["val_folder"])
        metrics.update(zeroshot(clip.to(device), tok, cfg, name, zs, device))
    flags = {"--steps": cfg.probe_steps, "--batch-size": cfg.probe_batch, "--lr": cfg.probe_lr, "--seed": cfg.seed,
             "--train-images": cfg.probe_images, "--val-images": cfg.probe_val_images, "--workers": cfg.workers,
             "--data": cfg.data, "--val-data": cfg.val_data, "--cache-dir": cfg.cache_dir}
    for task in ("seg", "depth"):
        argv = [task, "--init", cfg.init, "--head", "linear", "--freeze-backbone", "--resume", "auto",
                "--out", os.path.join(cfg.out, f"probe_{task}")]
        r = dense.main(argv + [str(x) for k, v in flags.items() if v != "" for x in (k, v)])
        metrics.update({f"{task}_{k}": v for k, v in r.items() if isinstance(v, (int, float))})
    C.print0(json.dumps(metrics))
    if C.get_rank() == 0:
        json.dump(metrics, open(os.path.join(cfg.out, "probe.json"), "w"), indent=1)
    C.finish_run(cfg.out, extra=f"metrics {os.path.join(cfg.out, 'probe.json')}, the probes in {cfg.out}/probe_*")
    return metrics

def compare(cfg: Config) -> dict:
    """The comparison on the synthetic world: a base CLIP, then CLIPTeX and CLIP-FT from it, all three probed.
    The base: --init, or mobileclip.py for --base-steps; the expert pass over the first training shard, CLIPTeX and
    CLIP-FT on it, zero-shot top-1 and dense.py's linear probes (fit on the last shard, scored on the held-out set)
    -> OUT/compare.json and a table. Finished steps are reused: an interrupted compare continues."""
    if cfg.data:
        C.fail("compare runs on the synthetic world; on your data run label, train (twice) and probe")
    C.document_run(cfg.out, cfg, [__file__, C.__file__])  # each step claims its own sub-directory
    init = cfg.init
    if not init:
        base = os.path.join(cfg.out, "base")
        M.main(["--out", base, "--steps", str(cfg.base_steps), "--model", cfg.model, "--resume", "auto",
                "--synthetic-train", str(cfg.synthetic_train), "--synthetic-val", str(cfg.synthetic_val),
                "--batch-size", str(cfg.batch_size), "--workers", str(cfg.workers)]
               + (["--cache-dir", cfg.cache_dir] if cfg.cache_dir else []))
        init = C.latest_checkpoint(base)
    world = synthetic(dataclasses.replace(cfg, model=read_init(dataclasses.replace(cfg, init=init))[1]))
    shards = C.expand_shards(world["train"])
    data, labels = shards[0], os.path.join(cfg.out, "labels")
    label(dataclasses.replace(cfg, data=data, out=labels))
    rows = {"base": init}
    for run, baseline in (("clipft", True), ("cliptex", False)):
        run_cfg = dataclasses.replace(cfg, init=init, data=data, labels=labels, baseline=baseline, resume="auto",
                                      out=os.path.join(cfg.out, run), zeroshot_data=world["val_folder"])
        if not os.path.exists(os.path.join(run_cfg.out, f"ckpt-{cfg.steps}.pt")):
            train(run_cfg)
        rows[run] = os.path.join(run_cfg.out, f"ckpt-{cfg.steps}.pt")
    results = {run: probe(dataclasses.replace(cfg, init=ckpt, out=os.path.join(cfg.out, "probe_" + run),
                                              data=shards[-1], val_data=world["val"],
                                              zeroshot_data=world["val_folder"])) for run, ckpt in rows.items()}
    C.print0("| run | zero-shot top-1 | seg mIoU (linear probe) | depth RMSE (linear probe) |\n|---|---|---|---|")
    for run, r in results.items():
        C.print0(f"| {run} | {r.get('zeroshot_top1', float('nan')):.1f} | {r.get('seg_miou', float('nan')):.2f} | "
                 f"{r.get('depth_rmse', float('nan')):.4f} |")
    if C.get_rank() == 0:
        open(os.path.join(cfg.out, "compare.json"), "w").write(json.dumps(results, indent=1))
    C.finish_run(cfg.out, extra=f"table {os.path.join(cfg.out, 'compare.json')}, each run in its sub-directory")
    return results

def main(argv=None):
    return C.run_command(__doc__, {"label": (label, LabelConfig), "train": (train, TrainConfig),
                                   "probe": (probe, ProbeConfig), "compare": (compare, Config)}, argv)

if __name__ == "__main__":
    main()
