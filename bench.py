"""bench.py: speed, FLOPs, MFU and memory of each script's training step, fast path against the readable
reference path, measured in one run (issue 14; anchors in shared/papers/performance.md).

    python bench.py                       # every case; on a GPU at the reference sizes, on a CPU at `tiny` sizes
    python bench.py mobileclip catlip     # some cases
    python bench.py --compile --steps 30  # add torch.compile to the fast path
    python bench.py data                  # the data loader alone: ours against OpenCLIP's, per worker (issue 27)

A case builds a model, a synthetic batch on the device and one full training step (forward, loss, backward,
optimizer). "fast" = fused attention (SDPA), the fused/distributed-form losses, bf16 autocast on GPU,
channels_last for convolutions (+ --compile); "reference" = explicit-softmax attention, the textbook losses,
fp32. Model FLOPs per sample are counted once with torch.utils.flop_counter on the forward and multiplied
by 3 (the MFU convention of performance.md: recomputation is not counted). MFU = FLOPs/sample x samples/s /
the device's dense bf16 peak, looked up by GPU name. On the GPU every timed step runs under CUDA's sync
debug mode: a host synchronisation inside the step is reported in the `syncs` column.
The `data` case times one DataLoader worker's work (one process, one thread: read tar, decode, crop to
224 px, tokenise, collate) on photo-like 512x384 JPEG shards (--images, written once under --cache):
this repository's train loader (C.ImageTextDecode: torchvision decode_jpeg + v2 resized crop, uint8 out,
normalised on the device) against OpenCLIP's train transform on the same ShardStream (PIL decode,
RandomResizedCrop(0.9-1, bicubic), ToTensor, Normalize -> float32); --rounds passes each, alternating.
Target of issue 27: ours >= 1.8x OpenCLIP per core.
Rows are printed as a table and appended as JSON lines to --out (bench.jsonl).
"""
from __future__ import annotations

import argparse
import io
import json
import os
import platform
import random
import statistics
import tempfile
import time
import warnings

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

import common as C

# Dense bf16 peaks (performance.md 2.1), matched against torch.cuda.get_device_name() in this order.
PEAK_BF16 = [("H200", 989e12), ("H100 NVL", 835e12), ("H100 PCIe", 756e12), ("H100", 989e12),
             ("A100", 312e12), ("RTX 3090", 71e12)]


def peak_flops(device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((p for key, p in PEAK_BF16 if key in name), None)


def forward_flops(fn) -> float:
    """FLOPs of one call of `fn` (a forward pass), 2 per multiply-add, counted by torch's flop counter."""
    from torch.utils.flop_counter import FlopCounterMode
    counter = FlopCounterMode(display=False)
    with counter:  # (not under no_grad: the counter's module tracker needs autograd)
        fn()
    return float(counter.get_total_flops())


def time_step(step, device, steps: int, warmup: int) -> dict:
    """Samples/s, peak memory and host syncs of `step` (a closure returning the batch size)."""
    cuda = device.type == "cuda"
    for _ in range(warmup):
        step()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        if cuda:
            torch.cuda.set_sync_debug_mode("warn")
        t0, n = time.perf_counter(), 0
        for _ in range(steps):
            n += step()
        if cuda:
            torch.cuda.set_sync_debug_mode("default")
            torch.cuda.synchronize()
        dt = time.perf_counter() - t0
    syncs = sum("synchroniz" in str(w.message) for w in caught) if cuda else None
    mem = torch.cuda.max_memory_allocated() / 2**30 if cuda else None
    return {"samples_per_s": n / dt, "step_ms": 1000 * dt / steps, "peak_mem_gib": mem, "syncs": syncs}


def train_step(model, loss_fn, opt, device, bf16: bool):
    """One optimizer step of `loss_fn(model)` under optional bf16 autocast."""
    def step():
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            loss, n = loss_fn(model)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return n
    return step


# ----------------------------------------------------------------------------------------------------
# Cases: each returns {path: (model, loss_fn, forward_fn)} for "fast" and "reference"
# ----------------------------------------------------------------------------------------------------


def clip_case(device, gpu: bool, batch: int | None):
    """mobileclip.py's plain CLIP step: ViT-B/16 at 224 px, batch 256 (GPU) / `tiny` (CPU)."""
    import mobileclip as M
    name, B = ("vit_b16", batch or 256) if gpu else ("tiny", batch or 64)
    spec = M.MODELS[name]
    x = torch.randn(B, 3, spec["image_size"], spec["image_size"], device=device)
    ids = torch.randint(1, 49000, (B, spec["context_length"]), device=device)
    out = {}
    for path, fused, loss in (("fast", True, C.contrastive_loss), ("reference", False, C.contrastive_loss_reference)):
        torch.manual_seed(0)
        model = C.set_fused(C.build_clip(**spec, vocab_size=49408), fused).to(device)
        out[path] = (model, lambda m, loss=loss: (loss(*m(x, ids)), B), lambda m=model: m(x[:1], ids[:1]))
    return name, out


def reinforced_case(device, gpu: bool, batch: int | None):
    """mobileclip.py's reinforced step against its plain step on the same MobileCLIP model (target: <= 1.1x;
    stored teacher embeddings, no teacher forward)."""
    import mobileclip as M
    name, B, K, D = ("mobileclip_s0", batch or 256, 2, 768) if gpu else ("mobileclip_tiny", batch or 64, 1, 128)
    spec = M.model_spec(name)
    x = torch.randn(B, 3, spec["image_size"], spec["image_size"], device=device).contiguous(
        memory_format=torch.channels_last)
    ids = torch.randint(1, 49000, (2 * B, spec["context_length"]), device=device)
    teach = {k: F.normalize(torch.randn(B, K, D, device=device), dim=-1).flatten(1)
             for k in ("img_emb", "txt_emb", "syn_emb")}

    def plain(m):
        return C.contrastive_loss(*m(x, ids[:B])), B

    def reinforced(m):  # GT and synthetic captions in one (2B, L) text forward, as in mobileclip.main
        img, txt, scale = m(x, ids)
        gt, syn = txt.chunk(2)
        return M.reinforced_loss(img, gt, syn, teach, scale, 0.5, [100.0] * K), B

    out = {}
    for path, fn in (("plain", plain), ("reinforced", reinforced)):
        torch.manual_seed(0)
        model = M.create_model(name, vocab_size=49408).to(device, memory_format=torch.channels_last)
        # model FLOPs per sample: one image and one caption, or two captions for the reinforced step
        texts = ids[[0, B]] if path == "reinforced" else ids[:1]
        out[path] = (model, fn, lambda m=model, t=texts: m(x[:1], t), f"{name}, {len(texts)} caption(s)")
    return name, out


def catlip_case(device, gpu: bool, batch: int | None):
    """catlip.py's step (multi-hot BCE over a 24,320-word vocabulary, image tower only) against the CLIP step
    on the same ViT: the paper's claim is 2.7x less time per sample."""
    import catlip as CL
    import mobileclip as M
    name, B, V = ("vit_b16", batch or 256, 24320) if gpu else ("tiny", batch or 64, 2000)
    spec = CL.MODELS[name]
    x = torch.randn(B, 3, spec["image_size"], spec["image_size"], device=device)
    labels = torch.stack([torch.randperm(V)[:8] for _ in range(B)]).to(device)  # 8 distinct labels per image
    dense = torch.zeros(B, V, device=device).scatter_(1, labels, 1.0)
    ids = torch.randint(1, 49000, (B, M.MODELS[name]["context_length"]), device=device)
    out = {}
    for path, fused in (("fast", True), ("reference", False)):
        torch.manual_seed(0)
        model = C.set_fused(CL.build_model(name, V), fused).to(device)
        loss = ((lambda m: (CL.multilabel_bce(m(x), labels), B)) if fused else
                (lambda m: (CL.multilabel_bce_reference(m(x).float(), dense), B)))
        out[path] = (model, loss, lambda m=model: m(x[:1]))
    torch.manual_seed(0)
    clip = C.build_clip(**M.MODELS[name], vocab_size=49408).to(device)
    out["clip (same ViT)"] = (clip, lambda m: (C.contrastive_loss(*m(x, ids)), B), lambda m=clip: m(x[:1], ids[:1]),
                              f"{name} + text tower")
    return name, out


def fastfill_case(device, gpu: bool, batch: int | None):
    """fastfill.py's backbone step: ResNet-50 with a 128-d embedding at 224 px (GPU) / resnet_tiny at 32 px."""
    import fastfill as FF
    name, B, S = ("resnet50", batch or 256, 224) if gpu else ("resnet_tiny", batch or 128, 32)
    x = torch.randn(B, 3, S, S, device=device)
    y = torch.randint(0, 1000, (B,), device=device)
    out = {}
    for path, mf in (("fast", torch.channels_last), ("reference", torch.contiguous_format)):
        torch.manual_seed(0)
        model = FF.build_model(name, 1000, 128).to(device, memory_format=mf)
        xx = x.contiguous(memory_format=mf)
        out[path] = (model, lambda m, xx=xx: (F.cross_entropy(m(xx)[0].float(), y, label_smoothing=0.1), B),
                     lambda m=model, xx=xx: m(xx[:1]))
    return name, out


CASES = {"mobileclip": clip_case, "reinforced": reinforced_case, "catlip": catlip_case, "fastfill": fastfill_case}


# ----------------------------------------------------------------------------------------------------
# Data: one DataLoader worker's images/s, this repository's train loader against OpenCLIP's train transform
# ----------------------------------------------------------------------------------------------------

_WORDS = ("a photo of the old red wooden house near quiet lake with tall green trees under cloudy blue sky "
          "two dogs playing on sandy beach at sunset close up view small yellow flower in garden after rain "
          "city street crowded people walking bicycle parked beside stone wall bright morning light over "
          "mountains snow covered peaks reflected water white cat sleeping sofa vintage car road").split()


def photo_like(rng: np.random.Generator, h: int = 384, w: int = 512, alpha: float = 1.4) -> Image.Image:
    """A colour random field with a 1/f^alpha amplitude spectrum, smooth and detailed at every scale as
    photographs are (their spectra fall roughly as 1/f). alpha 1.4 is a heuristic, tuned so that a 512x384 JPEG
    at quality 90 is ~50-75 KB, a photograph's size: a flat render would compress to a few KB and flatter the
    decoder. Three fields mixed through a random colour matrix, mostly one shared field."""
    fy, fx = np.fft.fftfreq(h)[:, None], np.fft.rfftfreq(w)[None, :]
    f = np.sqrt(fx ** 2 + fy ** 2)
    f[0, 0] = 1.0
    spec = (rng.standard_normal((3, h, w // 2 + 1)) + 1j * rng.standard_normal((3, h, w // 2 + 1))) / f ** alpha
    x = np.fft.irfft2(spec, s=(h, w))  # (3, H, W)
    mix = 0.6 + rng.normal(0, 0.25, (3, 3))
    mix[:, 1:] *= 0.5  # the first field is shared by R, G, B (luminance-like), as in photographs
    x = np.einsum("ij,jhw->hwi", mix, x)  # (H, W, 3)
    lo, hi = np.percentile(x, (1, 99))
    return Image.fromarray(np.clip((x - lo) / (hi - lo) * 215 + 20, 0, 255).astype(np.uint8))


def bench_caption(seed: int, i: int) -> str:
    """Alt-text-like caption of image i: 6-20 words of a small vocabulary."""
    rng = random.Random(f"{seed}/{i}")
    return " ".join(rng.choice(_WORDS) for _ in range(rng.randint(6, 20)))


def jpeg_shards(root: str, n: int, shard_size: int = 250, seed: int = 0) -> list[str]:
    """`n` photo-like 512x384 JPEGs (quality 90) with alt-text-like captions in tar shards of `shard_size`
    under `root`, written once (deterministic in `seed`) and reused. Returns the shard paths."""
    d = os.path.join(root, f"jpeg512x384-q90-v1-n{n}-seed{seed}")  # bump v1 when the images or captions change
    os.makedirs(d, exist_ok=True)
    paths = []
    for s, lo in enumerate(range(0, n, shard_size)):
        paths.append(path := os.path.join(d, f"{s:05d}.tar"))
        if os.path.exists(path):
            continue
        samples = []
        for i in range(lo, min(n, lo + shard_size)):
            buf = io.BytesIO()
            photo_like(np.random.default_rng([seed, i])).save(buf, format="JPEG", quality=90)
            samples.append({"__key__": f"{i:08d}", "jpg": buf.getvalue(), "txt": bench_caption(seed, i)})
        C.write_shard(path, samples)
    return paths


def _convert_to_rgb(img):  # OpenCLIP's own step of its train transform (a copy for an RGB image)
    return img.convert("RGB")


def openclip_train_transform(size: int):
    """OpenCLIP's `image_transform(size, is_train=True)` with the default AugmentationCfg (open_clip/transform.py),
    built from the same torchvision v1 transforms on PIL images: RandomResizedCrop(scale 0.9-1, bicubic),
    convert to RGB, ToTensor, Normalize(CLIP mean/std) -> float32 (3, size, size)."""
    from torchvision import transforms as T
    return T.Compose([T.RandomResizedCrop(size, scale=(0.9, 1.0), interpolation=T.InterpolationMode.BICUBIC),
                      _convert_to_rgb, T.ToTensor(), T.Normalize(C.CLIP_MEAN, C.CLIP_STD)])


class OpenCLIPDecode:
    """Sample -> {"image": float32 (3, S, S), normalised; "ids"; "caption"}, as OpenCLIP's webdataset pipeline
    does it: PIL decode (`wds.decode("pilrgb")`: open, convert to RGB), then its train transform. Caption and
    tokenisation are C.ImageTextDecode's, so only the image path differs from ours."""

    def __init__(self, tokenizer, image_size: int, context_length: int):
        self.tokenizer, self.context_length = tokenizer, context_length
        self.transform = openclip_train_transform(image_size)

    def __call__(self, sample: dict) -> dict:
        caption = C.decode_caption(sample)
        img = Image.open(io.BytesIO(sample["jpg"])).convert("RGB")
        return {"image": self.transform(img), "ids": self.tokenizer([caption], self.context_length)[0],
                "caption": caption}


def data_streams(shards: list[str], tokenizer, batch: int, size: int = 224) -> dict:
    """{loader: () -> one pass over `shards`}: one DataLoader worker's work (read tar, decode, crop, tokenise,
    collate) with ours (torchvision decode_jpeg + v2 resized_crop on uint8) or OpenCLIP's transform."""
    decodes = {"ours": C.ImageTextDecode(tokenizer, size, 77), "openclip": OpenCLIPDecode(tokenizer, size, 77)}
    return {name: (lambda d=d: C.ShardStream(shards, d, batch, epochs=1, drop_last=False))
            for name, d in decodes.items()}


def images_per_s(stream, limit: int | None = None) -> tuple[float, float]:
    """(images per wall-clock second, images per CPU second of this process) of one pass over `stream`. On a
    shared machine the two differ: wall time also counts the time the process waited for a core."""
    t0, c0, n = time.perf_counter(), time.process_time(), 0
    for b in stream:
        n += len(b["ids"])
        if limit and n >= limit:
            break
    return n / (time.perf_counter() - t0), n / (time.process_time() - c0)


def data_rates(root: str, images: int, rounds: int, batch: int) -> list[dict]:
    """Images/s of one worker (one process, one thread) for ours and OpenCLIP's loader on the same JPEG shards,
    `rounds` timed passes each, alternating (AB BA AB ...) so that drifting machine load hits both alike; the
    median with its min-max spread, and ours/OpenCLIP of the medians (and within each round)."""
    shards = jpeg_shards(root, images)
    tok = C.Tokenizer(merges=C.train_bpe([bench_caption(0, i) for i in range(500)], 1024))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # what a DataLoader worker runs with
    try:
        streams = data_streams(shards, tok, batch)
        for make in streams.values():  # untimed: lazy imports, tokenizer cache, shard files into the page cache
            images_per_s(make(), limit=2 * batch)
        load0, rates = os.getloadavg()[0], {name: [] for name in streams}
        for r in range(rounds):
            for name in (streams if r % 2 == 0 else reversed(list(streams))):
                rates[name].append(images_per_s(streams[name]()))
        load1 = os.getloadavg()[0]
    finally:
        torch.set_num_threads(threads)
    kb = sum(os.path.getsize(p) for p in shards) / images / 1024
    wall = {name: [w for w, _ in v] for name, v in rates.items()}
    cpu = {name: [c for _, c in v] for name, v in rates.items()}
    med, med_cpu = ({k: statistics.median(v) for k, v in d.items()} for d in (wall, cpu))
    return [{"case": "data", "path": name, "device": f"{cpu_name()}, 1 thread", "images": images, "batch": batch,
             "source": f"512x384 JPEG q90, {kb:.0f} KB", "images_per_s": med[name], "ms_per_image": 1000 / med[name],
             "rounds_images_per_s": wall[name], "images_per_cpu_s": med_cpu[name], "rounds_images_per_cpu_s": cpu[name],
             "ours_over_openclip": med["ours"] / med["openclip"],
             "ours_over_openclip_rounds": [a / b for a, b in zip(wall["ours"], wall["openclip"])],
             "ours_over_openclip_cpu": med_cpu["ours"] / med_cpu["openclip"],
             "loadavg_1min": [load0, load1]} for name in rates]


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or "CPU"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("cases", nargs="*", help=f"some of {', '.join(CASES)}, data (default: all)")
    ap.add_argument("--steps", type=int, default=0, help="timed steps (default: 20 on GPU, 5 on CPU)")
    ap.add_argument("--warmup", type=int, default=0, help="untimed steps first (default: 5 on GPU, 2 on CPU)")
    ap.add_argument("--batch", type=int, default=0, help="batch size (default: each case's reference)")
    ap.add_argument("--compile", action="store_true", help="torch.compile the fast path's model")
    ap.add_argument("--reference-sizes", action="store_true",
                    help="the GPU reference models (ViT-B/16, S0, ResNet-50) even on a CPU (use a small --batch)")
    ap.add_argument("--images", type=int, default=1000, help="data: 512x384 JPEGs in the benchmark shards")
    ap.add_argument("--rounds", type=int, default=3, help="data: timed passes per loader, alternating")
    ap.add_argument("--cache", default="", help="data: where the shards are written once (default: a temp dir)")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--out", default="bench.jsonl")
    args = ap.parse_args(argv)
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if args.device == "auto" else args.device))
    gpu = device.type == "cuda"
    steps, warmup = args.steps or (20 if gpu else 5), args.warmup or (5 if gpu else 2)
    peak = peak_flops(device)
    hw = torch.cuda.get_device_name(device) if gpu else f"CPU ({torch.get_num_threads()} threads)"
    print(f"device: {hw}; dense bf16 peak: {peak / 1e12:.0f} TFLOP/s" if peak else f"device: {hw}; MFU: n/a")
    rows = []
    for case in args.cases or [*CASES, "data"]:
        if case == "data":
            root = args.cache or os.path.join(tempfile.gettempdir(), "effclip-bench")
            rows += data_rates(root, args.images, args.rounds, args.batch or 128)
            continue
        if case not in CASES:
            C.fail(f"unknown case '{case}'; choose from {', '.join(CASES)}, data")
        model_name, paths = CASES[case](device, gpu or args.reference_sizes, args.batch or None)
        for path, (model, loss_fn, fwd, *label) in paths.items():
            flops = 3 * forward_flops(fwd)  # per sample: the forward ran on one sample
            fast = path != "reference"
            opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=gpu)
            m = torch.compile(model) if args.compile and fast else model
            r = time_step(train_step(m, loss_fn, opt, device, bf16=gpu and fast), device, steps, warmup)
            rows.append({"case": case, "model": label[0] if label else model_name, "path": path, "device": hw,
                         "gflops_per_sample": flops / 1e9,
                         "mfu": flops * r["samples_per_s"] / peak if peak else None, **r})
            del model, m, opt
            if gpu:
                torch.cuda.empty_cache()
        base = [r for r in rows if r["case"] == case]
        for r in base[1:]:  # ratio of the first path's speed to each other's
            r["first_path_speedup"] = base[0]["samples_per_s"] / r["samples_per_s"]
        # Model FLOPs do not depend on the path; the counter sees every op of the explicit reference
        # attention but may miss a fused kernel's, so the largest count stands for all paths of a model.
        for r in base:
            same = [o["gflops_per_sample"] for o in base if o["model"] == r["model"]]
            r["gflops_per_sample"] = max(same)
            r["mfu"] = r["gflops_per_sample"] * 1e9 * r["samples_per_s"] / peak if peak else None
    print_table(rows)
    with open(args.out, "a") as f:
        for r in rows:
            f.write(json.dumps({**r, "compile": args.compile, "torch": torch.__version__}) + "\n")


def print_table(rows):
    fmt = lambda v, spec: "-" if v is None else format(v, spec)
    steps, data = [r for r in rows if r["case"] != "data"], [r for r in rows if r["case"] == "data"]
    if steps:
        print(f"{'case':11s} {'path':20s} {'model':30s} {'samples/s':>10s} {'GFLOP/smp':>10s} {'MFU':>6s} "
              f"{'mem GiB':>8s} {'syncs':>5s} {'first/this':>10s}")
    for r in steps:
        print(f"{r['case']:11s} {r['path']:20s} {r['model']:30s} {r['samples_per_s']:10.1f} "
              f"{r['gflops_per_sample']:10.2f} {fmt(r['mfu'] and 100 * r['mfu'], '5.1f'):>6s} "
              f"{fmt(r['peak_mem_gib'], '8.2f'):>8s} {fmt(r['syncs'], 'd'):>5s} "
              f"{fmt(r.get('first_path_speedup'), '10.2f'):>10s}")
    if data:
        r = data[0]
        print(f"\ndata: one worker ({r['device']}), {r['images']} x {r['source']} -> 224 px, batch {r['batch']}, "
              f"median of {len(r['rounds_images_per_s'])} rounds; load average (1 min) {r['loadavg_1min'][0]:.2f} "
              f"-> {r['loadavg_1min'][1]:.2f}")
        print(f"{'loader':10s} {'images/s/worker':>16s} {'spread':>10s} {'ms/image':>9s} {'images/CPU-s':>13s} "
              f"{'spread':>10s}")
    for r in data:
        spread = lambda v: f"{min(v):.0f}-{max(v):.0f}"
        print(f"{r['path']:10s} {r['images_per_s']:16.0f} {spread(r['rounds_images_per_s']):>10s} "
              f"{r['ms_per_image']:9.2f} {r['images_per_cpu_s']:13.0f} {spread(r['rounds_images_per_cpu_s']):>10s}")
    if data:
        paired = r["ours_over_openclip_rounds"]
        print(f"ours/OpenCLIP: {r['ours_over_openclip']:.2f}x per worker (rounds {min(paired):.2f}-{max(paired):.2f}), "
              f"{r['ours_over_openclip_cpu']:.2f}x per CPU second (issue 27 target: >= 1.8x)")


if __name__ == "__main__":
    main()
