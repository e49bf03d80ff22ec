"""MobileCLIP: Fast Image-Text Models through Multi-Modal Reinforced Training (arXiv 2311.17049).

What is here now: the plain CLIP baseline the paper compares against and builds on -- ViT image and text
towers (common.py), the symmetric contrastive loss over the global batch (Radford et al. 2021, the
paper's L_CLIP), trained from webdataset tar shards with DDP, bf16 autocast and optional torch.compile,
evaluated zero-shot (ImageFolder) and by image-text retrieval; it loads OpenAI/OpenCLIP weights.
Not yet here (issues 3 and 4): the MCi/MCt encoders with reparameterisation and the official MobileCLIP
checkpoints, multi-modal reinforced training (L = (1 - lambda) L_CLIP + lambda L_distill) and DataCompDR.

Paper -> code:
  L_CLIP, symmetric InfoNCE over the global batch   -> common.contrastive_loss
  learned temperature, clamped at 100                -> common.CLIP.logit_scale
  zero-shot classifier from a prompt ensemble        -> common.zeroshot_classifier
  image-text retrieval recall@K                      -> common.retrieval_eval

Commands:
  python mobileclip.py                                  # tiny CLIP on the built-in synthetic world, CPU
  torchrun --nproc_per_node=8 mobileclip.py --data 'shards/{00000..00999}.tar' --model vit_b16 \\
      --bpe bpe_simple_vocab_16e6.txt.gz --batch-size 256 --steps 100000 --out runs/b16 --compile
  torchrun --nnodes=4 --nproc_per_node=8 --rdzv-backend=c10d --rdzv-endpoint=HOST:29500 mobileclip.py ...
  python mobileclip.py --eval-only --resume runs/b16/ckpt-100000.pt --zeroshot-data imagenet/val \\
      --classnames imagenet_classes.txt --bpe bpe_simple_vocab_16e6.txt.gz
  python mobileclip.py --init ViT-B-32.pt --bpe bpe_simple_vocab_16e6.txt.gz --model vit_b32 ...  # fine-tune

Result (the no-argument run): see README.md, "Results", for the zero-shot top-1 it reaches and the machine.
"""
from __future__ import annotations

import dataclasses
import os
import time
from dataclasses import dataclass

import torch
from torch.nn.parallel import DistributedDataParallel as DDP

import common as C


@dataclass
class Config:
    data: str = ""  # tar shards: a directory, a glob or 'shards/{00000..00099}.tar'; empty = the synthetic world
    model: str = "tiny"  # a name from MODELS
    out: str = "runs/mobileclip"  # run directory: config.json, log.jsonl, checkpoints, copies of the code
    steps: int = 800  # optimizer steps
    batch_size: int = 128  # per process (the global batch is this x world size)
    lr: float = 2e-3  # peak learning rate (AdamW)
    weight_decay: float = 0.1  # decoupled weight decay, on matrices only
    warmup: int = 100  # linear warm-up steps, then cosine to zero
    beta2: float = 0.98  # AdamW beta2 (CLIP uses 0.98)
    grad_clip: float = 1.0  # global gradient-norm clip; 0 = off
    seed: int = 0  # seeds the model init, data order and augmentation
    workers: int = 2  # DataLoader worker processes per rank
    shuffle_buffer: int = 2000  # samples held by each worker's shuffle buffer
    device: str = "auto"  # auto | cuda | cpu
    precision: str = "auto"  # auto (bf16 autocast on GPU, fp32 on CPU) | bf16 | fp32
    compile: bool = False  # torch.compile the model
    fused: bool = True  # fused attention (SDPA); --no-fused runs the explicit-softmax reference
    grad_checkpointing: bool = False  # recompute blocks in backward: ~1/3 more compute, much less memory
    log_every: int = 50  # steps between log lines (the only host syncs of the loop)
    eval: bool = True  # evaluate at the end of training (and every --eval-every steps)
    eval_every: int = 0  # steps between evaluations; 0 = at the end only
    ckpt_every: int = 500  # steps between checkpoints
    keep_ckpts: int = 2  # newest checkpoints kept in --out
    resume: str = ""  # 'auto' = the latest checkpoint in --out (fresh if none), or a checkpoint path
    init: str = ""  # OpenAI/OpenCLIP ViT state dict to start from (needs --bpe and the matching --model)
    act: str = "gelu"  # MLP activation: gelu | quick_gelu (what OpenAI's own CLIP weights were trained with)
    eval_only: bool = False  # evaluate --resume / --init and exit
    zeroshot_data: str = ""  # ImageFolder for zero-shot top-1/top-5; default: the synthetic held-out set
    classnames: str = ""  # file with one class name per line, in folder order (default: folder names)
    templates: str = ""  # file of prompt templates with '{}' (default: common.DEFAULT_TEMPLATES)
    retrieval_data: str = ""  # tar shards of image-caption pairs for retrieval recall@1/5/10
    retrieval_max: int = 5000  # pairs used for retrieval
    bpe: str = ""  # CLIP merges file (bpe_simple_vocab_16e6.txt.gz); empty = train a BPE on the captions
    bpe_vocab: int = 2048  # vocabulary size of a BPE trained here
    cache_dir: str = ""  # where the synthetic world is generated (default ~/.cache/effclip)
    synthetic_train: int = 40000  # synthetic training images
    synthetic_val: int = 1000  # synthetic held-out images (zero-shot and retrieval)
    max_skip_frac: float = 0.5  # stop if more than this fraction of the samples read is unusable


# Named sizes. vit_b32/b16/l14 are the OpenAI CLIP shapes (text context 77); the BPE vocabulary sets
# vocab_size. `tiny` is the CPU model of the smoke run.
MODELS = {
    "tiny": dict(image_size=64, patch=8, width=128, layers=4, heads=4, embed_dim=128,
                 text_width=128, text_layers=3, text_heads=2, context_length=32),
    "vit_b32": dict(image_size=224, patch=32, width=768, layers=12, heads=12, embed_dim=512,
                    text_width=512, text_layers=12, text_heads=8, context_length=77),
    "vit_b16": dict(image_size=224, patch=16, width=768, layers=12, heads=12, embed_dim=512,
                    text_width=512, text_layers=12, text_heads=8, context_length=77),
    "vit_l14": dict(image_size=224, patch=14, width=1024, layers=24, heads=16, embed_dim=768,
                    text_width=768, text_layers=12, text_heads=12, context_length=77),
}


# ----------------------------------------------------------------------------------------------------
# Data and tokenizer
# ----------------------------------------------------------------------------------------------------


def resolve_data(cfg: Config) -> tuple[str, str, str]:
    """(train shards, zero-shot ImageFolder, retrieval shards): the user's, or the synthetic world's."""
    zs, ret = cfg.zeroshot_data, cfg.retrieval_data
    if cfg.data:
        try:
            C.expand_shards(cfg.data)
        except FileNotFoundError as e:
            C.fail(str(e))
        return cfg.data, zs, ret
    size = MODELS[cfg.model]["image_size"]
    cache = cfg.cache_dir or os.path.join(os.path.expanduser("~"), ".cache", "effclip")
    world = C.synthetic_world(cache, cfg.synthetic_train, cfg.synthetic_val, size, seed=0)
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
        captions, skipped = [], {}
        for path in C.expand_shards(shards):
            for s in C.iter_tar_samples(path, skipped):
                try:
                    captions.append(C.decode_caption(s))
                except Exception:
                    pass
            if len(captions) >= 50000:
                break
        C.print0(f"training a {cfg.bpe_vocab}-token BPE on {len(captions)} captions -> {saved}")
        os.makedirs(cfg.out, exist_ok=True)
        C.Tokenizer(merges=C.train_bpe(captions, cfg.bpe_vocab)).save(saved)
    C.barrier()
    return C.Tokenizer(saved)


def build_model(cfg: Config, vocab_size: int) -> C.CLIP:
    m = C.build_clip(**MODELS[cfg.model], vocab_size=vocab_size, act=cfg.act, grad_checkpointing=cfg.grad_checkpointing)
    return C.set_fused(m, cfg.fused)


def load_init(model: C.CLIP, cfg: Config):
    """--init: OpenAI/OpenCLIP weights (a state dict, or OpenAI's TorchScript archive) into `model`."""
    if not os.path.isfile(cfg.init):
        C.fail(f"--init file not found: {cfg.init}")
    try:
        sd = torch.load(cfg.init, map_location="cpu", weights_only=True)
    except Exception:  # OpenAI distributes TorchScript archives
        sd = torch.jit.load(cfg.init, map_location="cpu").state_dict()
    shape = C.openclip_config(sd)
    fits = [n for n, s in MODELS.items() if all(shape[k] == v for k, v in s.items())]
    if cfg.model not in fits:
        C.fail(f"--init {cfg.init} is patch {shape['patch']}, width {shape['width']}: use --model "
               f"{' or '.join(fits) or '(none of MODELS; add its shape to MODELS)'}")
    C.load_state_dict_checked(model, {k: v.float() for k, v in C.openclip_to_ours(sd).items()}, f"--init {cfg.init}")


# ----------------------------------------------------------------------------------------------------
# Evaluation
# ----------------------------------------------------------------------------------------------------


@torch.no_grad()
def evaluate(model, tokenizer, cfg: Config, zs_dir: str, ret_shards: str, device) -> dict:
    """Zero-shot top-1/top-5 on an ImageFolder and retrieval recall@1/5/10 on caption shards."""
    model.eval()
    spec, metrics = MODELS[cfg.model], {}
    if zs_dir:
        items, names = C.image_folder(zs_dir, C.read_lines(cfg.classnames) if cfg.classnames else None)
        templates = C.read_lines(cfg.templates) if cfg.templates else C.DEFAULT_TEMPLATES
        clf = C.zeroshot_classifier(model, tokenizer, names, templates, device, spec["context_length"])
        metrics.update(C.zeroshot_eval(model, clf, items, spec["image_size"], device))
    if ret_shards:
        decode = C.ImageTextDecode(tokenizer, spec["image_size"], spec["context_length"], train=False)
        stream = C.ShardStream(C.expand_shards(ret_shards), decode, 256, shuffle_buffer=1, epochs=1, drop_last=False)
        img, txt, n = [], [], 0
        for b in C.progress(stream, "retrieval"):
            img.append(model.encode_image(C.normalize_images(b["image"].to(device))).float())
            txt.append(model.encode_text(b["ids"].to(device)).float())
            n += len(b["ids"])
            if n >= cfg.retrieval_max:
                break
        metrics.update(C.retrieval_eval(torch.cat(img)[:cfg.retrieval_max], torch.cat(txt)[:cfg.retrieval_max]))
    model.train()
    return metrics


# ----------------------------------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------------------------------


def main(argv=None):
    cfg = C.parse_config(Config, argv)
    rank, local_rank, world, device = C.setup_distributed(cfg.device)
    if cfg.model not in MODELS:
        C.fail(f"unknown model '{cfg.model}'; choose one of {', '.join(MODELS)}")
    torch.manual_seed(cfg.seed)  # same init on every rank (DDP also broadcasts it)
    C.document_run(cfg.out, cfg, [__file__, C.__file__])
    shards, zs_dir, ret_shards = resolve_data(cfg)
    tokenizer = make_tokenizer(cfg, shards)
    model = build_model(cfg, tokenizer.vocab_size).to(device)
    C.print0(f"model {cfg.model}: image {sum(p.numel() for p in model.visual.parameters()) / 1e6:.2f}M"
             f" + text {sum(p.numel() for p in model.text.parameters()) / 1e6:.2f}M parameters")
    opt = C.make_adamw(model, cfg.lr, cfg.weight_decay, betas=(0.9, cfg.beta2))
    log = C.RunLog(cfg.out)

    # ---- start: fresh, from public weights, or resumed -------------------------------------------
    start, data_pos = 0, {}
    if cfg.init:
        if not cfg.bpe:
            C.fail("--init needs --bpe bpe_simple_vocab_16e6.txt.gz, the tokenizer the weights were trained with")
        load_init(model, cfg)
    ckpt = C.load_checkpoint(cfg.resume, cfg.out)
    if ckpt is not None:
        if ckpt.get("model_name") != cfg.model:
            C.fail(f"checkpoint {cfg.resume} is of model '{ckpt.get('model_name')}', not --model {cfg.model}")
        C.load_state_dict_checked(model, ckpt["model"], f"checkpoint {cfg.resume}")
        if not cfg.eval_only:
            opt.load_state_dict(ckpt["optimizer"])
            C.set_rng_state(ckpt["rng"])
            start = ckpt["step"]
            if len(ckpt["data"]) == world and len(ckpt["data"].get(rank, {})) == max(1, cfg.workers):
                data_pos = ckpt["data"][rank]
            else:
                C.print0("warning: world size or --workers changed; the data stream restarts at its beginning")
        C.print0(f"resumed from step {ckpt['step']} of {cfg.resume}")
    if cfg.eval_only:
        log.log(ckpt["step"] if ckpt else 0, **evaluate(model, tokenizer, cfg, zs_dir, ret_shards, device))
        return C.cleanup_distributed()

    # ---- data -----------------------------------------------------------------------------------
    spec = MODELS[cfg.model]
    decode = C.ImageTextDecode(tokenizer, spec["image_size"], spec["context_length"], True, cfg.seed)
    stream = C.ShardStream(C.expand_shards(shards), decode, cfg.batch_size, rank, world, cfg.seed,
                           cfg.shuffle_buffer, data_pos, start)
    batches = iter(C.make_loader(stream, cfg.workers, device.type == "cuda"))
    position = C.DataPosition()
    position.pos = {int(w): p for w, p in data_pos.items()}  # workers with no new batch keep their place

    # ---- wrap: DDP, compile, precision --------------------------------------------------------------
    train_model = DDP(model, device_ids=[local_rank] if device.type == "cuda" else None) if world > 1 else model
    if cfg.compile:
        train_model = torch.compile(train_model)
    bf16 = cfg.precision == "bf16" or (cfg.precision == "auto" and device.type == "cuda")
    stop = C.StopSignal()
    nonfinite = torch.zeros((), dtype=torch.bool, device=device)  # any NaN/inf loss since the last check
    t0, t_data, seen = time.time(), 0.0, 0
    for step in range(start, cfg.steps + 1):
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
            C.save_checkpoint(os.path.join(cfg.out, f"ckpt-{step}.pt"), state)
            C.prune_checkpoints(cfg.out, cfg.keep_ckpts)
        if last_step or stopping:
            break

        # ---- forward, backward, step --------------------------------------------------------------
        td = time.time()
        batch = next(batches)
        t_data += time.time() - td
        position.update(batch)
        images = C.normalize_images(batch["image"].to(device, non_blocking=True))  # (B, 3, S, S) float
        ids = batch["ids"].to(device, non_blocking=True)  # (B, L)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            img, txt, scale = train_model(images, ids)
            loss = C.contrastive_loss(img, txt, scale)
        loss.backward()
        gnorm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip or float("inf"))
        C.set_lr(opt, C.lr_at(step, cfg.lr, cfg.warmup, cfg.steps))
        opt.step()
        opt.zero_grad(set_to_none=True)
        nonfinite |= ~torch.isfinite(loss.detach())
        seen += len(ids)

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
    C.cleanup_distributed()


if __name__ == "__main__":
    main()
