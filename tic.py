"""TiC-CLIP: Continual Training of CLIP Models (arXiv 2310.16226, Garg et al., Apple, ICLR 2024).

Web data keeps arriving. TiC-CLIP asks how to keep a CLIP model current when a new time step of image-text data lands
and the compute per step is fixed: train from scratch on everything again, or warm-start from the last model and
replay some old data? The paper's answer: warm start + replay (Cumulative) matches retraining from scratch at ~2.5x
less compute. This file is the benchmark protocol, on any time-stamped shards and on the built-in synthetic world,
whose shapes, colours, textures, drawing style and caption words drift with the year.

What is here: splitting time-stamped shards into the benchmark's time steps (`split`: TiC-DataComp, TiC-YFCC,
TiC-RedCaps or your own year ranges, train / val / held-out eval per step); continual training under a fixed
iteration budget per step with every strategy of the paper's Table 2 (restart, sequential, cumulative-all,
cumulative-exp, cumulative-equal, LwF, patching) and the Oracle; warm start = weights only, fresh AdamW and
fresh schedule; every step's model kept, an interrupted sequence resumes at the step and the batch it was on;
the train-step x eval-step matrix of retrieval R@1 and zero-shot top-1, the paper's summary metrics (in-domain,
backward and forward transfer, static tasks), written to log.jsonl, matrix.csv and matrix.png; `compare`,
which runs several strategies and tabulates them. DDP, bf16 autocast and --compile as in mobileclip.py.
Left out: the DataComp 28/38-task static suite (give any ImageFolder with --static-data instead), the
monthly split, UID-file (.npy) filtering of the released TiC-DataComp pools (use `split` on shards that
carry a year), and the TiC-DataCompNet 1000-class sets (zero-shot per step uses --classnames and a json label).

Paper -> code:
  Fig. 1 protocol A: new data + replay buffer        -> replay_counts, BufferFilter, step_sources
  Sec. 3 / Table 2 strategies, buffer size 2D        -> STRATEGIES, replay_counts (--buffer-factor)
  fixed compute C per step (iterations x batch)      -> --budget-steps, train_time_step
  warm start: weights only, new AdamW and schedule   -> warm_start, fresh_optimizer (--warm-warmup)
  LwF (Li & Hoiem): KL of similarity distributions   -> lwf_loss (reference: lwf_loss_reference)
  Patching (Ilharco et al. 2022): weight interpolation -> interpolate, choose_alpha
  Oracle: scratch on all data with T x C             -> --strategy oracle
  dynamic tasks: retrieval / classification per step -> evaluate_model, --eval-max
  Sec. 2.3 metrics (CLEAR): ID, backward, forward    -> summary_metrics
  TiC-DataComp / YFCC / RedCaps time steps           -> BENCHMARKS, split_shards

Commands:
  python tic.py                                   # sequential on the synthetic world (4 steps, 32 px), CPU
  python tic.py compare --strategies restart,sequential,cumulative-all,cumulative-exp,cumulative-equal,lwf,patching,oracle
  python tic.py split --data 'raw/{00000..09999}.tar' --benchmark datacomp --time-field year --out tic_shards/
  torchrun --nproc_per_node=8 tic.py --data tic_shards/ --strategy cumulative-all --model vit_b32 \\
      --bpe bpe_simple_vocab_16e6.txt.gz --batch-size 512 --budget-steps 4500 --lr 5e-4 --warmup 500 \\
      --out runs/tic-cumulative --compile       # tic_medium: global batch 4096, 4500 iterations per step
  torchrun --nproc_per_node=8 tic.py ... --out runs/tic-cumulative   # after a stop: resumes step and batch

Result on the synthetic world: 4 steps (2014-16, 2017-18, 2019-20, 2021-23) of 4,000 training images, C = 150
steps x batch 128, `tiny` (0.45M parameters, 32 px), lr 2e-3, 2D buffer; 2-core CPU shared with other jobs
(load ~14), torch 2.13 CPU; `python tic.py compare --strategies restart,sequential,cumulative-all,cumulative-exp,
cumulative-equal,lwf,patching,oracle`. Last model, mean over the 4 eval steps of retrieval R@1 (500 pairs per
step) / zero-shot top-1 / static top-1 (all-years set), and compute in units of C:
  restart 2.8 / 19.3 / 20.0 (4C)   sequential 4.6 / 22.3 / 22.8 (4C)   cumulative-all 4.6 / 25.1 / 25.2 (4C)
  cumulative-exp 5.1 / 23.8 / 23.4 (4C)   cumulative-equal 4.8 / 23.9 / 25.4 (4C)   lwf 4.4 / 21.1 / 22.2 (5C)
  patching 4.5 / 22.3 / 22.4 (4.2C)   oracle 7.6 / 30.0 / 32.0 (4C in one schedule, for the last step only)
At equal compute warm start beats restart on every number, and replay (cumulative) beats sequential on the
zero-shot and static tasks (the paper's findings). The Oracle's single long schedule stays ahead: at this
tiny, under-trained scale four short cosine cycles lose to one long one. Retrieval differences below ~1 point
are noise (500 pairs). 3-6 min of training per strategy; matrices and timings: README.
"""
from __future__ import annotations

import copy
import dataclasses
import glob
import json
import math
import os
import re
import time
import zlib
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP

import common as C


@dataclass
class Config:
    data: str = ""  # train: a folder written by `tic.py split` (empty = the synthetic world); split: raw shards
    out: str = "runs/tic"  # run directory (compare: one sub-folder per strategy; split: the output folder)
    overwrite: bool = False  # start over in an --out that holds another run or split (moved to OUT/previous-N/)
    benchmark: str = "synthetic"  # time steps: datacomp | yfcc | redcaps | synthetic (see BENCHMARKS)
    years: str = ""  # your own time steps, e.g. '2014-2016,2017,2018-2019' (overrides --benchmark)
    label_field: str = "label"  # json field with a class index (zero-shot per step, where present)
    shard_size: int = 1000  # split / synthetic: samples per written shard
    seed: int = 0  # model init, data order, buffer selection (split: the held-out selection)


@dataclass
class SplitConfig(Config):
    time_field: str = "year"  # json field with the timestamp: a year, or a date string starting with it
    eval_frac: float = 0.01  # held-out eval share per step (spec: 1%)
    val_frac: float = 0.005  # validation share per step (patching's coefficient)


@dataclass
class Recipe(Config):  # the flags of `train` and `compare`: model, budget, optimiser, evaluation, the run
    model: str = "tiny"  # a name from MODELS
    budget_steps: int = 150  # C: optimizer steps per time step, whatever the strategy (oracle: T x C)
    batch_size: int = 128  # per process (the global batch is this x world size)
    lr: float = 2e-3  # peak learning rate, the same at every step (spec 3.2)
    weight_decay: float = 0.2  # AdamW weight decay (DataComp default)
    beta2: float = 0.98  # AdamW beta2
    warmup: int = 30  # warm-up steps of the first step, restarts and the Oracle
    warm_warmup: int = 0  # warm-up steps of a warm-started step (released scripts: 0)
    grad_clip: float = 1.0  # global gradient-norm clip; 0 = off
    buffer_factor: float = 2.0  # replay buffer of cumulative-exp/equal, in units of the new step's size D
    lwf_lambda: float = 1.0  # weight of the LwF distillation term
    patch_alphas: str = "0,0.25,0.5,0.75,1"  # patching: mixing coefficients tried on the val splits
    classnames: str = ""  # file with one class name per label index (default: json 'classname' of the data)
    eval_max: int = 500  # eval pairs per step used for retrieval and zero-shot
    static_data: str = ""  # ImageFolder for the static zero-shot task (synthetic: all years)
    bpe: str = ""  # CLIP merges file; empty = a BPE trained on the first step's captions
    bpe_vocab: int = 1024  # vocabulary of a BPE trained here
    workers: int = 1  # DataLoader worker processes per rank
    shuffle_buffer: int = 2000  # samples in each worker's shuffle buffer
    device: str = "auto"  # auto | cuda | cpu
    precision: str = "auto"  # auto (bf16 autocast on GPU) | bf16 | fp32
    compile: bool = False  # torch.compile the training model
    fused: bool = True  # fused attention (SDPA); --no-fused runs the reference
    log_every: int = 50  # steps between log lines (the only host syncs of the loop)
    ckpt_every: int = 500  # steps between within-step checkpoints
    cache_dir: str = ""  # where the synthetic world is generated (default ~/.cache/effclip)
    synthetic_train: int = 4000  # synthetic training samples per time step
    synthetic_val: int = 200  # synthetic validation samples per time step
    synthetic_eval: int = 500  # synthetic held-out eval samples per time step
    synthetic_static: int = 500  # synthetic static-task images (all years)
    image_size: int = 32  # synthetic image size (the model's input size is MODELS[model])
    max_skip_frac: float = 0.5  # stop if more than this fraction of the samples read is unusable


@dataclass
class TrainConfig(Recipe):
    strategy: str = "sequential"  # restart | sequential | cumulative-all | cumulative-exp | cumulative-equal | lwf | patching | oracle


@dataclass
class CompareConfig(Recipe):
    strategies: str = "restart,sequential,cumulative-all,oracle"  # the strategies to run, comma-separated


# Named sizes. `tiny` is the CPU model of the synthetic experiment; vit_b32 is tic_medium's, vit_b16
# tic_large's and tic_xlarge's (spec 2).
MODELS = {
    "tiny": dict(image_size=32, patch=8, width=64, layers=4, heads=2, embed_dim=128,
                 text_width=64, text_layers=3, text_heads=1, context_length=32),
    "vit_b32": dict(image_size=224, patch=32, width=768, layers=12, heads=12, embed_dim=512,
                    text_width=512, text_layers=12, text_heads=8, context_length=77),
    "vit_b16": dict(image_size=224, patch=16, width=768, layers=12, heads=12, embed_dim=512,
                    text_width=512, text_layers=12, text_heads=8, context_length=77),
}

# Time steps as inclusive year ranges (spec 4.1). TiC-DataComp merges 2014-2016 into its first step; the
# YFCC groups are those of the released create_splits.py; RedCaps' first step is 2011-2017 (secondary).
# `synthetic` covers SYNTH_YEARS in 4 steps, the outline-style switch (~2019.5) inside the third.
BENCHMARKS = {
    "datacomp": "2014-2016,2017,2018,2019,2020,2021,2022",
    "yfcc": "2004-2008,2009-2010,2011-2012,2013-2014",
    "redcaps": "2011-2017,2018,2019,2020",
    "synthetic": "2014-2016,2017-2018,2019-2020,2021-2023",
}
STRATEGIES = ("restart", "sequential", "cumulative-all", "cumulative-exp", "cumulative-equal", "lwf",
              "patching", "oracle")


# ----------------------------------------------------------------------------------------------------
# 1. Time steps: time-stamped shards -> step{k}/{train,val,eval} (spec 4.1)
# ----------------------------------------------------------------------------------------------------


def parse_years(spec: str) -> list[tuple[int, int]]:
    """'2014-2016,2017' -> [(2014, 2016), (2017, 2017)]: inclusive, increasing, not overlapping."""
    out = []
    for part in spec.split(","):
        a, _, b = part.strip().partition("-")
        try:
            out.append((int(a), int(b or a)))
        except ValueError:
            C.fail(f"bad time steps '{spec}': use year ranges like '2014-2016,2017,2018'")
    if any(lo > hi for lo, hi in out) or any(out[i][1] >= out[i + 1][0] for i in range(len(out) - 1)):
        C.fail(f"time steps '{spec}' must be increasing, non-overlapping year ranges")
    return out


def step_ranges(cfg: Config) -> list[tuple[int, int]]:
    if not cfg.years and cfg.benchmark not in BENCHMARKS:
        C.fail(f"unknown --benchmark '{cfg.benchmark}'; choose one of {', '.join(BENCHMARKS)} or pass --years")
    return parse_years(cfg.years or BENCHMARKS[cfg.benchmark])


def sample_year(meta: dict, field: str) -> int | None:
    """The year of a sample's timestamp: an int/float year, or a string beginning with one ('2019-05-03')."""
    v = meta.get(field)
    try:
        return int(v) if isinstance(v, (int, float)) else int(str(v)[:4])
    except (TypeError, ValueError):
        return None


def step_of(year: int | None, ranges) -> int | None:
    return next((k for k, (lo, hi) in enumerate(ranges) if year is not None and lo <= year <= hi), None)


def unit_hash(seed: int, key: str) -> float:
    """A uniform number in [0, 1) fixed by (seed, sample key): random but reproducible selections."""
    return zlib.crc32(f"{seed}/{key}".encode()) / 2 ** 32


def split_shards(cfg: SplitConfig):
    """Cut time-stamped shards into the benchmark's time steps, each with train / val / held-out eval shards.

    Every sample of --data is read once and goes to the time step of its timestamp and, by a hash of its key,
    to train, val (--val-frac) or eval (--eval-frac; the spec's 1% test split). Writes
    OUT/step{k}/{train,val,eval}/*.tar and OUT/steps.json with the counts (the replay rules need the sizes).
    Single process; for web-scale pools run it on disjoint --data subsets into separate folders."""
    if not cfg.data:
        C.fail("split needs --data: the time-stamped tar shards to cut into time steps")
    if cfg.eval_frac + cfg.val_frac > 1:
        C.fail(f"--eval-frac {cfg.eval_frac} + --val-frac {cfg.val_frac}: their sum must be at most 1")
    ranges = step_ranges(cfg)
    try:
        src = C.expand_shards(cfg.data)
    except FileNotFoundError as e:
        C.fail(str(e))
    earlier = os.path.isdir(cfg.out) and any(re.fullmatch(r"steps\.json|step\d+", n) for n in os.listdir(cfg.out))
    take_out(cfg.out, "an earlier split (steps.json, step*/)" if earlier else None, cfg.overwrite)
    parts = ("train", "val", "eval")
    bufs = {(k, p): [] for k in range(len(ranges)) for p in parts}
    counts = {kp: 0 for kp in bufs}
    names, dropped, skipped = {}, {}, {}

    def flush(kp, final=False):
        if bufs[kp] and (final or len(bufs[kp]) >= cfg.shard_size):
            d = os.path.join(cfg.out, f"step{kp[0]}", kp[1])
            os.makedirs(d, exist_ok=True)
            C.write_shard(os.path.join(d, f"{kp[1]}-{counts[kp] // cfg.shard_size:05d}.tar"), bufs[kp])
            counts[kp] += len(bufs[kp])
            bufs[kp] = []

    for i, path in enumerate(C.progress(src, "split")):
        for s in C.iter_tar_samples(path, skipped):
            try:
                meta = json.loads(s["json"])
            except (KeyError, ValueError):
                meta = {}
            k = step_of(sample_year(meta, cfg.time_field), ranges)
            if k is None:  # no timestamp, or outside every step
                dropped["no_or_out_of_range_time"] = dropped.get("no_or_out_of_range_time", 0) + 1
                continue
            if "classname" in meta and cfg.label_field in meta:
                names[int(meta[cfg.label_field])] = meta["classname"]
            u = unit_hash(cfg.seed, s["__key__"])
            part = "eval" if u < cfg.eval_frac else "val" if u < cfg.eval_frac + cfg.val_frac else "train"
            s["__key__"] = f"{i:05d}_{s['__key__'].replace('/', '_')}"  # unique over the source shards
            bufs[(k, part)].append(s)
            flush((k, part))
    if not any(bufs.values()) and not any(counts.values()):  # nothing written: say why, in one line
        C.fail(f"no sample of --data {cfg.data} ({len(src)} shard(s)) falls in a time step; skipped: "
               + (", ".join(f"{k} {v}" for k, v in sorted({**skipped, **dropped}.items())) or "no samples in them"))
    for kp in bufs:
        flush(kp, final=True)
    classnames = [names[j] for j in range(len(names))] if names and sorted(names) == list(range(len(names))) else None
    write_steps(cfg.out, ranges, counts, classnames, cfg.time_field)
    C.print0(f"split {len(src)} shards into {len(ranges)} steps: {[counts[(k, 'train')] for k in range(len(ranges))]} "
             f"train samples; dropped {dropped}; unreadable {skipped}\nresults: {os.path.join(cfg.out, 'steps.json')}, "
             f"{os.path.join(cfg.out, 'step*')}/{{train,val,eval}}/ (train with: python tic.py --data {cfg.out})")


def write_steps(root: str, ranges, counts: dict, classnames, time_field: str):
    steps = [{"name": f"{lo}" if lo == hi else f"{lo}-{hi}", "years": [lo, hi],
              **{p: counts[(k, p)] for p in ("train", "val", "eval")}} for k, (lo, hi) in enumerate(ranges)]
    with open(os.path.join(root, "steps.json"), "w") as f:
        json.dump({"steps": steps, "classnames": classnames, "time_field": time_field}, f, indent=1)


def synthetic_steps(cfg: Recipe) -> str:
    """The synthetic world cut into time steps: per step, train / val / eval samples whose year is drawn
    uniformly in the step's range (common.synthetic_split(years=...)), each step and part with its own seed,
    and a static-task ImageFolder over all years. Generated once (rank 0) and cached by its parameters."""
    ranges = step_ranges(cfg)
    n = {"train": cfg.synthetic_train, "val": cfg.synthetic_val, "eval": cfg.synthetic_eval}
    tag = f"{C.SYNTH_VERSION}-{'_'.join(f'{a}-{b}' for a, b in ranges)}-{n['train']}-{n['val']}-{n['eval']}-" \
          f"{cfg.synthetic_static}-{cfg.image_size}px-seed{cfg.seed}"
    root = os.path.join(cfg.cache_dir or os.path.join(os.path.expanduser("~"), ".cache", "effclip"), f"tic-{tag}")
    if C.get_rank() == 0 and not os.path.exists(os.path.join(root, "steps.json")):
        t0, split_of = time.time(), {"train": "train", "val": "val", "eval": "test"}
        for k, years in enumerate(ranges):
            for part, count in n.items():
                d = os.path.join(root, f"step{k}", part)
                os.makedirs(d, exist_ok=True)
                gen = C.synthetic_split(1000 * cfg.seed + k, count, cfg.image_size, split_of[part], years=years)
                samples = ({"__key__": f"s{k}_{s['key']}", "jpg": s["image"], "txt": s["caption"],
                            "json": {"label": s["label"], "classname": C.SYNTH_SHAPES[s["label"]],
                                     "year": s["year"]}} for s in gen)
                for j in range(0, count, cfg.shard_size):
                    C.write_shard(os.path.join(d, f"{part}-{j // cfg.shard_size:05d}.tar"),
                                  (next(samples) for _ in range(min(cfg.shard_size, count - j))))
        # the static task: a fixed all-years test set, as ImageNet is one fixed test set for every step
        for s in C.synthetic_split(1000 * cfg.seed + 999, cfg.synthetic_static, cfg.image_size, "test"):
            d = os.path.join(root, "static", C.SYNTH_SHAPES[s["label"]])
            os.makedirs(d, exist_ok=True)
            s["image"].save(os.path.join(d, s["key"] + ".png"))
        write_steps(root, ranges, {(k, p): n[p] for k in range(len(ranges)) for p in n}, C.SYNTH_SHAPES, "year")
        C.print0(f"generated the synthetic TiC world in {root} ({time.time() - t0:.0f} s)")
    C.barrier()
    return root


def read_steps(root: str) -> dict:
    path = os.path.join(root, "steps.json")
    if not os.path.isfile(path):
        C.fail(f"{path} not found: --data is a folder written by `python tic.py split --data SHARDS --out {root}`")
    try:
        with open(path) as f:
            steps = json.load(f)
        assert [s["train"] for s in steps["steps"]]
    except (OSError, ValueError, KeyError, TypeError, AssertionError) as e:
        C.fail(f"{path} does not read as tic.py split's steps.json ({type(e).__name__}); split the shards again")
    return steps


def part_shards(root: str, k: int, part: str) -> list[str]:
    try:
        return C.expand_shards(os.path.join(root, f"step{k}", part))
    except FileNotFoundError as e:  # a time step without samples of this part (e.g. a tiny --eval-frac)
        C.fail(f"time step {k} has no {part} shards ({e}): split with more data or a larger --{part}-frac")


# ----------------------------------------------------------------------------------------------------
# 2. Replay buffers (Table 2, spec 3.3): which old data each strategy trains on, and in what ratio
# ----------------------------------------------------------------------------------------------------
# At step t the training data is the new step's D_t samples plus, from each old step j < t, count_j samples
# chosen at random. Everything is then sampled uniformly, i.e. old and new mix in proportion to their sizes
# (the released code concatenates the shard lists and resamples). The budget never grows with the data.


def replay_counts(strategy: str, sizes: list[int], t: int, buffer_factor: float = 2.0) -> list[int]:
    """Samples kept from each old step 0..t-1 at step t (sizes[j] = step j's training samples).
    cumulative-all, restart: everything. sequential, lwf, patching: nothing. cumulative-exp / -equal: a buffer
    of buffer_factor x D_t split 1/2, 1/4, ... from the newest step back, the two oldest equal (exp), or
    equally (equal). A step smaller than its share is kept whole and its leftover goes to the others in
    proportion to their shares (design choice; the spec's examples never hit this)."""
    if strategy in ("cumulative-all", "restart", "oracle"):
        return list(sizes[:t])
    if strategy in ("sequential", "lwf", "patching") or t == 0:
        return [0] * t
    if strategy == "cumulative-equal":
        shares = [1.0] * t
    elif strategy == "cumulative-exp":  # oldest first: 2^-(t-1), 2^-(t-1), 2^-(t-2), ..., 1/2
        shares = [2.0 ** -(t - 1)] + [2.0 ** -(t - j) for j in range(1, t)]
    else:
        C.fail(f"unknown strategy '{strategy}'; choose one of {', '.join(STRATEGIES)}")
    counts, free, budget = [0.0] * t, set(range(t)), buffer_factor * sizes[t]
    while free:  # water-filling: cap the steps that are smaller than their share, re-split the rest
        total = sum(shares[j] for j in free)
        capped = [j for j in free if budget * shares[j] / total >= sizes[j]]
        if not capped:
            for j in free:
                counts[j] = budget * shares[j] / total
            break
        for j in capped:
            counts[j] = sizes[j]
            budget -= sizes[j]
            free.discard(j)
    return [int(c) for c in counts]


class BufferFilter:
    """Keeps a sample of old step j iff unit_hash(seed, key) < keep[j]: a random fraction of that step,
    without a pass over the data. With one seed for the whole sequence, a step's buffer at t+1 is a subset of
    its buffer at t, as a real buffer that can only drop samples (heuristic for web scale: the dropped
    samples are still read, then skipped)."""

    def __init__(self, keep: list[float], ranges, time_field: str, seed: int):
        self.keep, self.ranges, self.time_field, self.seed = keep, ranges, time_field, seed

    def __call__(self, sample: dict) -> bool:
        try:
            k = step_of(sample_year(json.loads(sample["json"]), self.time_field), self.ranges)
        except (KeyError, ValueError):
            return False
        return k is not None and k < len(self.keep) and unit_hash(self.seed, sample["__key__"]) < self.keep[k]


class ReplayStream(C.ShardStream):
    """common.ShardStream over new + old shards, with the replay buffer's selection applied to the raw
    samples before decoding (so a resumed stream fast-forwards over the same kept samples)."""

    def __init__(self, *args, keep=None, **kw):
        super().__init__(*args, **kw)
        self.keep = keep

    def raw_samples(self, epoch, consumer, consumers, skipped):
        for s in super().raw_samples(epoch, consumer, consumers, skipped):
            if self.keep is None or self.keep(s):
                yield s


def step_sources(strategy: str, steps: dict, root: str, t: int, buffer_factor: float, seed: int):
    """(shards, filter, counts per step 0..t) of time step t; the Oracle trains on every step at once."""
    sizes = [s["train"] for s in steps["steps"]]
    T = len(sizes)
    if strategy == "oracle":
        counts = list(sizes)
    else:
        counts = replay_counts(strategy, sizes, t, buffer_factor) + [sizes[t]] + [0] * (T - t - 1)
    shards = [p for k in range(T) if counts[k] for p in part_shards(root, k, "train")]
    keep = [counts[k] / max(1, sizes[k]) for k in range(T)]
    ranges = [tuple(s["years"]) for s in steps["steps"]]
    return shards, BufferFilter(keep, ranges, steps.get("time_field", "year"), seed), counts


# ----------------------------------------------------------------------------------------------------
# 3. LwF and Patching: the two regularised warm starts without old data (Table 2)
# ----------------------------------------------------------------------------------------------------


def lwf_loss(img, txt, t_img, t_txt, logit_scale, t_scale) -> torch.Tensor:
    """Learning without Forgetting for CLIP: KL(teacher || student) of the image->text and text->image
    similarity distributions over the global batch, the frozen previous model as teacher, each model at its
    own temperature (weight and temperature are open in the spec; design choice). Local rows against the
    gathered columns, as common.contrastive_loss; fp32; img, txt, t_img, t_txt (B, E) normalised."""
    all_img, all_txt = C.all_gather_with_grad(img), C.all_gather_with_grad(txt)  # (W*B, E)
    t_all_img, t_all_txt = C.all_gather_with_grad(t_img), C.all_gather_with_grad(t_txt)
    kl = 0.0
    for a, b, ta, tb in ((img, all_txt, t_img, t_all_txt), (txt, all_img, t_txt, t_all_img)):
        s = logit_scale.float() * a.float() @ b.float().T  # (B, W*B) student logits
        p = (t_scale.float() * ta.float() @ tb.float().T).log_softmax(dim=1)  # teacher log-probs
        kl = kl + F.kl_div(s.log_softmax(dim=1), p, log_target=True, reduction="batchmean")
    return kl / 2


def lwf_loss_reference(img, txt, t_img, t_txt, logit_scale, t_scale) -> torch.Tensor:
    """Readable one-process version: sum p_t (log p_t - log p_s) over the rows (image->text) and over the
    columns (text->image) of the full (N, N) similarity matrices, averaged."""
    s = logit_scale.float() * img.float() @ txt.float().T  # (N, N), row i = image i
    t = t_scale.float() * t_img.float() @ t_txt.float().T
    out = 0.0
    for dim in (1, 0):
        p_t = t.softmax(dim=dim)
        out = out + (p_t * (t.log_softmax(dim=dim) - s.log_softmax(dim=dim))).sum() / len(s)
    return out / 2


@torch.no_grad()
def interpolate(prev: dict, new: dict, alpha: float) -> dict:
    """Patching: theta = (1 - alpha) theta_prev + alpha theta_new (alpha = 1: the fine-tuned model)."""
    return {k: (1 - alpha) * prev[k].float() + alpha * new[k].float() if prev[k].is_floating_point() else new[k]
            for k in new}


def choose_alpha(model, prev: dict, new: dict, alphas, score) -> tuple[float, dict]:
    """The alpha whose patched model scores best on validation data, PAINT-style: the mean of the new
    step's score and the old steps' mean score, `score(model) -> (old, new)` (old None at the first step)."""
    best, scores = None, {}
    for a in alphas:
        model.load_state_dict(interpolate(prev, new, a))
        old, cur = score(model)
        scores[a] = cur if old is None else (old + cur) / 2
        best = a if best is None or scores[a] > scores[best] else best
    model.load_state_dict(interpolate(prev, new, best))
    return best, scores


# ----------------------------------------------------------------------------------------------------
# 4. Evaluation: the time matrix and its summary metrics (Sec. 2.3, spec 5.2)
# ----------------------------------------------------------------------------------------------------


class LabelledDecode(C.ImageTextDecode):
    """Eval decode: image, caption ids, and the json class index (-1 when absent)."""

    def __init__(self, *args, label_field: str = "label", **kw):
        super().__init__(*args, **kw)
        self.label_field = label_field

    def __call__(self, sample: dict) -> dict:
        out = super().__call__(sample)
        try:
            out["label"] = torch.tensor(int(json.loads(sample["json"])[self.label_field]))
        except (KeyError, ValueError, TypeError):
            out["label"] = torch.tensor(-1)
        return out


def eval_batches(shards, tokenizer, spec, cfg: Recipe, cache: dict) -> list[dict]:
    """The first --eval-max pairs of `shards`, decoded once per run and cached (every model sees the same)."""
    key = tuple(shards)
    if key not in cache:
        decode = LabelledDecode(tokenizer, spec["image_size"], spec["context_length"], train=False,
                                label_field=cfg.label_field)
        stream = C.ShardStream(shards, decode, 256, shuffle_buffer=1, epochs=1, drop_last=False)
        out, n = [], 0
        try:
            for b in stream:
                out.append({k: b[k] for k in ("image", "ids", "label")})
                n += len(b["ids"])
                if n >= cfg.eval_max:
                    break
        except C.DataError as e:  # every sample of the eval shards is unusable
            C.fail(str(e))
        cache[key] = out
    return cache[key]


@torch.no_grad()
def evaluate_model(model, tokenizer, steps: dict, root: str, part: str, cfg: Recipe, device, cache: dict,
                   upto: int | None = None) -> dict:
    """Per time step j (j <= upto): mean of image->text and text->image R@1 (the paper's TiC-Retrieval
    metric) and zero-shot top-1 with the class names where the samples carry labels; plus the static task."""
    model.eval()
    spec = MODELS[cfg.model]
    names = C.read_lines(cfg.classnames) if cfg.classnames else steps.get("classnames")
    clf = C.zeroshot_classifier(model, tokenizer, names, C.DEFAULT_TEMPLATES, device,
                                spec["context_length"]) if names else None
    out = {"retrieval": [], "zeroshot": []}
    for j in range(len(steps["steps"]) if upto is None else upto + 1):
        img, txt, lab = [], [], []
        for b in eval_batches(part_shards(root, j, part), tokenizer, spec, cfg, cache):
            img.append(model.encode_image(C.normalize_images(b["image"].to(device))).float())
            txt.append(model.encode_text(b["ids"].to(device)).float())
            lab.append(b["label"].to(device))
        img, txt, lab = torch.cat(img)[:cfg.eval_max], torch.cat(txt)[:cfg.eval_max], torch.cat(lab)[:cfg.eval_max]
        r = C.retrieval_eval(img, txt)
        out["retrieval"].append((r["retrieval_i2t_r1"] + r["retrieval_t2i_r1"]) / 2)
        has = lab >= 0
        ok = clf is not None and bool(has.any())
        top1 = (F.normalize(img[has], dim=-1) @ clf).argmax(dim=1) == lab[has] if ok else None
        out["zeroshot"].append(100 * top1.float().mean().item() if ok else None)
    if part == "eval" and (cfg.static_data or os.path.isdir(os.path.join(root, "static"))):
        items, snames = C.image_folder(cfg.static_data or os.path.join(root, "static"),
                                       C.read_lines(cfg.classnames) if cfg.static_data and cfg.classnames else None)
        sclf = C.zeroshot_classifier(model, tokenizer, snames, C.DEFAULT_TEMPLATES, device, spec["context_length"])
        out["static"] = C.zeroshot_eval(model, sclf, items, spec["image_size"], device)["zeroshot_top1"]
    model.train()
    return out


def summary_metrics(E: list) -> dict:
    """CLEAR-style plain averages over the train-step x eval-step matrix E[i][j] (rows that were never
    trained, e.g. the Oracle's first T-1, are None): in-domain = mean E[i][i], backward = mean over j < i,
    forward = mean over j > i, final = the last model's mean over all steps."""
    groups = {"id": [], "backward": [], "forward": []}
    for i, row in enumerate(E):
        for j, v in enumerate(row or []):
            if v is not None:
                groups["id" if i == j else "backward" if j < i else "forward"].append(v)
    mean = lambda xs: sum(xs) / len(xs) if xs else float("nan")
    last = next((r for r in reversed(E) if r), [])
    return {**{k: mean(v) for k, v in groups.items()}, "final": mean([v for v in last if v is not None])}


def write_outputs(out: str, result: dict):
    """matrix.csv (one line per train step x eval step) and matrix.png (heatmaps) from matrix.json's dict."""
    names = [s["name"] for s in result["steps"]]
    with open(os.path.join(out, "matrix.csv"), "w") as f:
        f.write("strategy,train_step,eval_step,retrieval_r1,zeroshot_top1,static_top1,compute_C\n")
        for i, row in enumerate(result["rows"]):
            for j in range(len(names)) if row else []:
                zs = row["zeroshot"][j]
                f.write(f"{result['strategy']},{names[i]},{names[j]},{row['retrieval'][j]:.2f},"
                        f"{'' if zs is None else f'{zs:.2f}'},{row.get('static', '')},{row['compute_C']:.3f}\n")
    draw_heatmaps([(result["strategy"], result)], os.path.join(out, "matrix.png"))


def _colour(v: float, lo: float, hi: float) -> tuple:
    """A viridis-like ramp (dark blue -> green -> yellow) for v in [lo, hi]."""
    stops = ((68, 1, 84), (59, 82, 139), (33, 145, 140), (94, 201, 98), (253, 231, 37))
    x = 0.0 if hi <= lo else min(1.0, max(0.0, (v - lo) / (hi - lo))) * (len(stops) - 1)
    i = min(int(x), len(stops) - 2)
    return tuple(round(a + (b - a) * (x - i)) for a, b in zip(stops[i], stops[i + 1]))


def draw_heatmaps(results: list, path: str, cell: int = 66):
    """One row of panels per strategy (retrieval R@1, zero-shot top-1), train step down, eval step across,
    values printed in the cells; a shared colour range per metric. Pillow only."""
    from PIL import Image, ImageDraw
    names = [s["name"] for s in results[0][1]["steps"]]
    T, left, top, gap = len(names), 110, 34, 24
    metrics = [m for m in ("retrieval", "zeroshot") if any(r and r[m][0] is not None
                                                         for _, res in results for r in res["rows"])]
    vals = {m: [v for _, res in results for r in res["rows"] if r for v in r[m] if v is not None] for m in metrics}
    pw, ph = left + T * cell + gap, top + T * cell + gap
    img = Image.new("RGB", (pw * len(metrics) + 10, ph * len(results) + 30), "white")
    d = ImageDraw.Draw(img)
    d.text((10, 6), "rows: model after train step i; columns: eval step j", fill="black")
    for r, (label, res) in enumerate(results):
        for c, m in enumerate(metrics):
            x0, y0 = c * pw + 10, r * ph + 24
            d.text((x0, y0), f"{label}: {'retrieval R@1' if m == 'retrieval' else 'zero-shot top-1'} (%)", fill="black")
            for j, n in enumerate(names):
                d.text((x0 + left + j * cell + 2, y0 + 14), n, fill="black")
            for i, row in enumerate(res["rows"]):
                d.text((x0, y0 + top + i * cell + cell // 3), f"train {names[i]}", fill="black")
                for j in range(T):
                    v = row[m][j] if row else None
                    box = (x0 + left + j * cell, y0 + top + i * cell, x0 + left + (j + 1) * cell - 2,
                           y0 + top + (i + 1) * cell - 2)
                    d.rectangle(box, fill=(235, 235, 235) if v is None else _colour(v, min(vals[m]), max(vals[m])))
                    if v is not None:
                        d.text((box[0] + 8, box[1] + cell // 3), f"{v:.1f}", fill="white" if v < (
                            min(vals[m]) + max(vals[m])) / 2 else "black")
    img.save(path)


# ----------------------------------------------------------------------------------------------------
# 5. Model, tokenizer, warm start
# ----------------------------------------------------------------------------------------------------


def make_tokenizer(cfg: Recipe, root: str):
    """--bpe, the BPE saved in --out by an earlier run, or one trained on the first step's captions and
    frozen for the whole sequence (later vocabulary falls back to byte-level pieces, as it would in time)."""
    saved = os.path.join(cfg.out, "bpe.txt")
    if cfg.bpe:
        try:
            return C.Tokenizer(cfg.bpe)
        except (FileNotFoundError, ValueError) as e:
            C.fail(str(e))
    if not os.path.exists(saved) and C.get_rank() == 0:
        captions, skipped = [], {}
        for path in part_shards(root, 0, "train"):
            for s in C.iter_tar_samples(path, skipped):
                try:
                    captions.append(C.decode_caption(s))
                except Exception:
                    pass
            if len(captions) >= 20000:
                break
        if not captions:
            C.fail(f"no readable caption in time step 0's training shards of {root} to train a BPE on "
                   f"(skipped: {skipped or 'samples without a .txt'}); pass --bpe or check the data")
        C.Tokenizer(merges=C.train_bpe(captions, cfg.bpe_vocab)).save(saved)
    C.barrier()
    return C.Tokenizer(saved)


def build_model(cfg: Recipe, vocab_size: int, seed: int):
    torch.manual_seed(seed)  # the same random init on every rank and at every restart
    return C.set_fused(C.build_clip(**MODELS[cfg.model], vocab_size=vocab_size), cfg.fused)


def warm_start(model, path: str):
    """Sec. 3.2 / open_clip --new-run: load the previous step's *weights* only. Nothing else carries over."""
    try:
        ck = C.read_checkpoint(path)
    except (ValueError, OSError) as e:
        C.fail(f"cannot read the time-step model {path} ({e}): move it away to train that step again")
    C.load_state_dict_checked(model, ck["model"], f"time-step checkpoint {path}")
    return ck


def fresh_optimizer(model, cfg: Recipe, warm: bool, total: int):
    """A new AdamW (no moments, no step count) and a new warmup + cosine schedule over this step's budget;
    warm-started steps use --warm-warmup (0 in the released scripts: warm-up helps only the first step)."""
    opt = C.make_adamw(model, cfg.lr, cfg.weight_decay, betas=(0.9, cfg.beta2))
    return opt, lambda step: C.lr_at(step, cfg.lr, cfg.warm_warmup if warm else cfg.warmup, total)


def broadcast(obj):
    """Rank 0's Python object on every rank."""
    if C.get_world_size() > 1 and dist.is_initialized():
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]
    return obj


# ----------------------------------------------------------------------------------------------------
# 6. Training one time step under the fixed budget (the loop of mobileclip.py, plus LwF)
# ----------------------------------------------------------------------------------------------------


def train_time_step(cfg: TrainConfig, model, opt, lr_fn, total: int, shards, keep, teacher, sdir: str, t: int,
                    env, log, tokenizer, stop: C.StopSignal) -> dict | None:
    """`total` optimizer steps on `shards` (filtered by `keep`), resuming from sdir's ckpt-*.pt (weights,
    optimizer, RNG, data position) if there is one. Returns {"wall_s"}, or None when `stop` was signalled
    (after saving a checkpoint at the current step)."""
    rank, local_rank, world, device = env
    spec, offset = MODELS[cfg.model], t * cfg.budget_steps  # log steps count across the whole sequence
    start, data_pos, wall = 0, {}, 0.0
    ckpt = C.load_checkpoint("auto", sdir)
    if ckpt is not None:
        if (ckpt.get("model_name"), ckpt.get("strategy")) != (cfg.model, cfg.strategy):
            C.fail(f"{sdir} holds a {ckpt.get('strategy')} run of {ckpt.get('model_name')}, not "
                   f"{cfg.strategy} of {cfg.model}: use another --out")
        C.load_state_dict_checked(model, ckpt["model"], f"checkpoint in {sdir}")
        opt.load_state_dict(ckpt["optimizer"])
        C.set_rng_state(ckpt["rng"])
        start, wall = ckpt["step"], ckpt["wall_s"]
        if len(ckpt["data"]) == world and len(ckpt["data"].get(rank, {})) == max(1, cfg.workers):
            data_pos = ckpt["data"][rank]
        C.print0(f"time step {t}: resumed at step {start} of {total}")

    # ---- data: new + replayed shards, one stream, mixed in proportion to the kept sizes -------------
    decode = C.ImageTextDecode(tokenizer, spec["image_size"], spec["context_length"], True, cfg.seed + t)
    stream = ReplayStream(shards, decode, cfg.batch_size, rank, world, cfg.seed + t, cfg.shuffle_buffer,
                          data_pos, start, keep=keep)
    batches = iter(C.make_loader(stream, cfg.workers, device.type == "cuda"))
    position = C.DataPosition()
    position.pos = {int(w): p for w, p in data_pos.items()}

    # ---- wrap: DDP, compile, precision ------------------------------------------------------------
    train_model = DDP(model, device_ids=[local_rank] if device.type == "cuda" else None) if world > 1 else model
    if cfg.compile:
        train_model = torch.compile(train_model)
    bf16 = cfg.precision == "bf16" or (cfg.precision == "auto" and device.type == "cuda")
    t0, t_log, seen = time.time(), time.time(), 0
    nonfinite = torch.zeros((), dtype=torch.bool, device=device)
    for step in C.progress(range(start, total + 1), f"time step {t}"):
        last_step = step == total
        stopping = stop.requested if world == 1 else (step % cfg.log_every == 0 and stop.agreed(device))

        # ---- checkpoint: within the step, for resuming (the step's model.pt is written by the caller) ---
        if (last_step or stopping or step % cfg.ckpt_every == 0) and step > start:
            if nonfinite.item():
                C.fail(f"non-finite loss before step {step} of time step {t}; the last good checkpoint is kept")
            C.save_checkpoint(os.path.join(sdir, f"ckpt-{step}.pt"), {
                "model": model.state_dict(), "optimizer": opt.state_dict(), "step": step, "rng": C.rng_state(),
                "data": position.state(), "model_name": cfg.model, "strategy": cfg.strategy,
                "wall_s": wall + time.time() - t0, "config": dataclasses.asdict(cfg)})
            C.prune_checkpoints(sdir, 1, written=os.path.join(sdir, f"ckpt-{step}.pt"))
        if last_step or stopping:
            break

        # ---- forward (+ the frozen previous model for LwF), backward, step ------------------------------
        batch = next(batches)
        position.update(batch)
        images = C.normalize_images(batch["image"].to(device, non_blocking=True))  # (B, 3, S, S)
        ids = batch["ids"].to(device, non_blocking=True)  # (B, L)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            img, txt, scale = train_model(images, ids)
            loss = C.contrastive_loss(img, txt, scale)
            if teacher is not None:
                with torch.no_grad():
                    t_img, t_txt, t_scale = teacher(images, ids)
                loss = loss + cfg.lwf_lambda * lwf_loss(img, txt, t_img, t_txt, scale, t_scale)
        loss.backward()
        gnorm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip or float("inf"))
        C.set_lr(opt, lr_fn(step))
        opt.step()
        opt.zero_grad(set_to_none=True)
        nonfinite |= ~torch.isfinite(loss.detach())
        seen += len(ids)

        # ---- log (the only host sync) -------------------------------------------------------------------
        if (step + 1) % cfg.log_every == 0 or step + 1 == total:
            if nonfinite.item():
                C.fail(f"non-finite loss at step {step} of time step {t}; the last good checkpoint is kept")
            skipped = position.skip_totals()
            read = seen + sum(skipped.values())
            if read and sum(skipped.values()) / read > cfg.max_skip_frac:
                C.fail(f"{sum(skipped.values())} of {read} samples unusable ({skipped}); check --data")
            log.log(offset + step + 1, time_step=t, loss=loss.item(), lr=opt.param_groups[0]["lr"],
                    grad_norm=gnorm.item(), samples_per_s=seen * world / (time.time() - t_log))
            t_log, seen = time.time(), 0
    return None if stopping and not last_step else {"wall_s": wall + time.time() - t0}


# ----------------------------------------------------------------------------------------------------
# 7. The sequence: every time step, its model kept, its row of the matrix
# ----------------------------------------------------------------------------------------------------


def fit_time_step(cfg: TrainConfig, model, init_sd, tokenizer, steps, root, t, prev, sdir, env, log, cache, stop):
    """Protocol A + B of Fig. 1 for step t: initialise (random or warm start), assemble the data (new +
    buffer), train C steps (T x C for the Oracle), patch, and keep the step's model in sdir/model.pt."""
    T, world = len(steps["steps"]), env[2]
    restart = cfg.strategy in ("restart", "oracle") or prev is None
    if restart:
        model.load_state_dict(init_sd)
    else:
        warm_start(model, prev)
    teacher = copy.deepcopy(model).eval().requires_grad_(False) if cfg.strategy == "lwf" and not restart else None
    patch = cfg.strategy == "patching" and not restart
    prev_sd = {k: v.detach().clone() for k, v in model.state_dict().items()} if patch else None
    total = cfg.budget_steps * (T if cfg.strategy == "oracle" else 1)
    shards, keep, counts = step_sources(cfg.strategy, steps, root, t, cfg.buffer_factor, cfg.seed)
    C.print0(f"time step {t} ({steps['steps'][t]['name']}): {cfg.strategy}, {'random init' if restart else 'warm start'}"
             f", {total} steps, training samples per step {counts}")
    opt, lr_fn = fresh_optimizer(model, cfg, not restart, total)
    done = train_time_step(cfg, model, opt, lr_fn, total, shards, keep, teacher, sdir, t, env, log, tokenizer, stop)
    if done is None:
        return None
    n = total * cfg.batch_size * world
    stats = {"train_samples": n, "teacher_samples": n if teacher is not None else 0, "counts": counts,
             "wall_s": done["wall_s"], "alpha": None, "patch_eval_samples": 0}
    if patch:
        alphas = parse_alphas(cfg.patch_alphas)
        new_sd = {k: v.detach().clone() for k, v in model.state_dict().items()}

        def score(m):  # validation retrieval of the old steps (mean) and of the new one
            r = evaluate_model(m, tokenizer, steps, root, "val", cfg, env[3], cache, upto=t)["retrieval"]
            return (sum(r[:t]) / t if t else None), r[t]
        alpha, scores = choose_alpha(model, prev_sd, new_sd, alphas, score) if env[0] == 0 else (None, None)
        alpha = broadcast(alpha)
        model.load_state_dict(interpolate(prev_sd, new_sd, alpha))
        stats.update(alpha=alpha, alpha_scores=scores,
                     patch_eval_samples=len(alphas) * sum(min(cfg.eval_max, s["val"]) for s in steps["steps"][:t + 1]))
    C.save_checkpoint(os.path.join(sdir, "model.pt"), {"model": model.state_dict(), "model_name": cfg.model,
                                                       "strategy": cfg.strategy, "time_step": t, "compute": stats})
    C.barrier()
    for p in C.checkpoints(sdir) if env[0] == 0 else []:  # the step is done: its resume files can go
        os.remove(p)
    return stats


def compute_units(stats: dict, C_samples: int) -> float:
    """Compute of one step in units of C (the budget's training samples). A forward-only pass of a sample
    (LwF's teacher, patching's validation) is counted as 1/3 of a training step's forward + backward."""
    return (stats["train_samples"] + (stats["teacher_samples"] + stats["patch_eval_samples"]) / 3) / C_samples


RUN_FLAGS = ("out", "overwrite", "workers", "device", "precision", "compile", "fused", "log_every",  # flags that
             "ckpt_every", "cache_dir", "strategies")  # may change between the invocations of one run (not the results)


def earlier_run(cfg: Config) -> str | None:
    """An earlier run in --out whose config.json differs in a flag that changes the results, or None (none, or the
    same run, which continues). "" = one that trained nothing (bad input): its files are moved aside unasked."""
    try:
        with open(os.path.join(cfg.out, "config.json")) as f:
            old = json.load(f)
    except (OSError, ValueError):
        return None
    diff = [k for k, v in dataclasses.asdict(cfg).items() if k not in RUN_FLAGS and k in old and old[k] != v]
    work = [p for p in glob.glob(os.path.join(cfg.out, "**", "*.pt"), recursive=True)
            if not os.path.relpath(p, cfg.out).startswith("previous-")]  # models and checkpoints, of any step
    return None if not diff else "" if not work else "a run with other settings (" + ", ".join(
        "--{} {}".format(k.replace("_", "-"), json.dumps(old[k])) for k in diff) + ")"


def take_out(out: str, other: str | None, overwrite: bool):
    """Claim --out (common.claim_out: one live run per directory, one line naming the holder) and never mix two
    runs' files: where `other` names what an earlier, different run left there, stop with one line, or with
    --overwrite move its files to OUT/previous-N/ (nothing is deleted) and start clean."""
    C.claim_out(out, resume="auto")
    if other is not None and C.get_rank() == 0:
        if not overwrite and other:
            C.fail(f"{out} holds {other}: run the same command to continue it, --overwrite to start over (its files "
                   f"move to {out}/previous-N/), or another --out")
        keep = os.path.join(out, f"previous-{1 + sum(n.startswith('previous-') for n in os.listdir(out))}")
        os.makedirs(keep)
        for n in os.listdir(out):
            if n != "run.lock" and not n.startswith("previous-"):
                os.replace(os.path.join(out, n), os.path.join(keep, n))
        C.print0(f"the earlier files of {out} ({other or 'an attempt that trained nothing'}) moved to {keep}")
    C.barrier()


def save_json(path: str, obj):
    with open(path + ".tmp", "w") as f:  # a temporary name, then rename: never half a file
        json.dump(obj, f)
    os.replace(path + ".tmp", path)


def parse_alphas(spec: str) -> list[float]:
    alphas = [float(a) if re.fullmatch(r"\s*(\d+\.?\d*|\.\d+)\s*", a) else -1.0 for a in spec.split(",")]
    if not all(0 <= a <= 1 for a in alphas):
        C.fail(f"--patch-alphas '{spec}': must be numbers between 0 and 1, comma-separated (e.g. 0,0.5,1)")
    return alphas


def check_flags(cfg: Recipe, strategies: list[str]):
    """The checks of this script's own flags (common.check_ranges did the generic ones): one line, no work done."""
    if cfg.model not in MODELS:
        C.fail(f"unknown model '{cfg.model}'; choose one of {', '.join(MODELS)}")
    if set(strategies) - set(STRATEGIES):
        C.fail(f"unknown strategy '{min(set(strategies) - set(STRATEGIES))}'; choose one of {', '.join(STRATEGIES)}")
    parse_alphas(cfg.patch_alphas)
    for flag, path in (("bpe", cfg.bpe), ("classnames", cfg.classnames), ("static-data", cfg.static_data)):
        if path and not os.path.exists(path):  # read late in the run: their absence now, before any work
            C.fail(f"--{flag} {path}: not found")
    for flag, low in (("budget_steps", 1), ("eval_max", 1), ("buffer_factor", 0), ("synthetic_train", 1),
                      ("synthetic_val", 1), ("synthetic_eval", 1), ("image_size", 8)):
        if getattr(cfg, flag) < low:
            C.fail(f"--{flag.replace('_', '-')} {getattr(cfg, flag)}: must be >= {low}")


def run(cfg: TrainConfig, stop: C.StopSignal | None = None) -> dict | None:
    """Train one strategy over the time steps, then score every step's model on every time step's eval set.

    The same command continues a stopped run (SIGTERM / Ctrl-C save a checkpoint) at its time step and batch.
    Writes OUT/step{t}/model.pt, matrix.json, matrix.csv, matrix.png and log.jsonl."""
    stop = stop or C.StopSignal()  # from here on SIGTERM / SIGINT save at the current step and exit 0
    env = C.setup_distributed(cfg.device)
    rank = env[0]
    check_flags(cfg, [cfg.strategy])
    take_out(cfg.out, earlier_run(cfg), cfg.overwrite)
    root = cfg.data or synthetic_steps(cfg)
    steps = read_steps(root)
    C.document_run(cfg.out, cfg, [__file__, C.__file__])
    T, t_start = len(steps["steps"]), time.time()
    mpath = os.path.join(cfg.out, "matrix.json")
    result = json.load(open(mpath)) if os.path.isfile(mpath) else None  # written atomically (save_json)
    result = result or {"strategy": cfg.strategy, "steps": steps["steps"], "rows": [None] * T}
    tokenizer = make_tokenizer(cfg, root)
    model = build_model(cfg, tokenizer.vocab_size, cfg.seed).to(env[3])
    init_sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
    log, cache, prev = C.RunLog(cfg.out), {}, None
    C_samples = cfg.budget_steps * cfg.batch_size * env[2]
    for t in [T - 1] if cfg.strategy == "oracle" else range(T):
        sdir = os.path.join(cfg.out, f"step{t}")
        final = os.path.join(sdir, "model.pt")
        if os.path.isfile(final):  # done earlier: its weights are the next step's warm start
            stats = warm_start(model, final)["compute"]
        else:
            stats = fit_time_step(cfg, model, init_sd, tokenizer, steps, root, t, prev, sdir, env, log, cache, stop)
            if stats is None:
                C.print0(f"stopped in time step {t}, checkpoint in {sdir}; run the same command again to resume")
                return None
        if result["rows"][t] is None and rank == 0:  # ---- this model on every time step's eval set ----
            row = evaluate_model(model, tokenizer, steps, root, "eval", cfg, env[3], cache)
            row.update(compute_C=compute_units(stats, C_samples), train_wall_s=stats["wall_s"], alpha=stats["alpha"],
                       counts=stats["counts"])
            result["rows"][t] = row
            save_json(mpath, result)
            log.log((t + 1) * cfg.budget_steps, time_step=t, **{f"retrieval_{n['name']}": v for n, v in
                                                                zip(steps["steps"], row["retrieval"])},
                    static=row.get("static"), compute_C=row["compute_C"], alpha=stats["alpha"])
        C.barrier()
        prev = final
        if t < T - 1 and stop.agreed(env[3]):  # a signal during the evaluation: the next step starts on resume
            C.print0(f"stopped after time step {t} (its model is {final}); run the same command again to resume")
            return None
    if rank == 0:
        result["summary"] = summarize(result)
        result["wall_s"] = result.get("wall_s", 0.0) + time.time() - t_start  # over all invocations
        save_json(mpath, result)
        write_outputs(cfg.out, result)
        log.log(T * cfg.budget_steps, **{k: v for k, v in result["summary"].items()})
        C.finish_run(cfg.out, final, f"matrix {mpath} (.csv, .png)")
    return broadcast(result)


def summarize(result: dict) -> dict:
    """The paper's summary numbers of one run: ID / backward / forward / final for retrieval and zero-shot,
    the static task of the last model, and the total compute in units of C."""
    out = {}
    for m in ("retrieval", "zeroshot"):
        E = [r[m] if r else None for r in result["rows"]]
        if any(r and r[0] is not None for r in E):
            out.update({f"{m}_{k}": v for k, v in summary_metrics(E).items()})
    last = next(r for r in reversed(result["rows"]) if r)
    out["static"] = last.get("static")
    out["compute_C"] = sum(r["compute_C"] for r in result["rows"] if r)
    out["train_wall_s"] = sum(r["train_wall_s"] for r in result["rows"] if r)
    return out


def compare(cfg: CompareConfig):
    """Run several strategies on the same data and tokenizer and tabulate them side by side.

    One sub-folder of --out per strategy (each a `train` run: a stopped compare resumes with the same command),
    then summary.md, summary.csv and matrices.png in --out."""
    stop = C.StopSignal()
    names = [s.strip() for s in cfg.strategies.split(",") if s.strip()]
    check_flags(cfg, names)
    C.setup_distributed(cfg.device)
    take_out(cfg.out, earlier_run(cfg), cfg.overwrite)
    root = cfg.data or synthetic_steps(cfg)
    C.document_run(cfg.out, cfg, [__file__, C.__file__])
    bpe = cfg.bpe or (make_tokenizer(cfg, root) and os.path.join(cfg.out, "bpe.txt"))
    results, shared = [], {f.name: getattr(cfg, f.name) for f in dataclasses.fields(Recipe)}
    for s in names:
        r = run(TrainConfig(**dict(shared, out=os.path.join(cfg.out, s), data=root, bpe=bpe), strategy=s), stop)
        if r is None:
            return
        results.append((s, r))
    if C.get_rank() != 0:
        return
    keys = ("retrieval_id", "retrieval_backward", "retrieval_forward", "retrieval_final", "zeroshot_id",
            "zeroshot_backward", "zeroshot_forward", "static", "compute_C", "train_wall_s")
    fmt = lambda v: "" if v is None else f"{v:.1f}" if isinstance(v, float) and not math.isnan(v) else str(v)
    with open(os.path.join(cfg.out, "summary.csv"), "w") as f:
        f.write("strategy," + ",".join(keys) + "\n")
        f.writelines(f"{s}," + ",".join(fmt(r['summary'].get(k)) for k in keys) + "\n" for s, r in results)
    with open(os.path.join(cfg.out, "summary.md"), "w") as f:
        f.write("| strategy | " + " | ".join(keys) + " |\n|" + "---|" * (len(keys) + 1) + "\n")
        f.writelines(f"| {s} | " + " | ".join(fmt(r['summary'].get(k)) for k in keys) + " |\n" for s, r in results)
    draw_heatmaps(results, os.path.join(cfg.out, "matrices.png"))
    C.print0(open(os.path.join(cfg.out, "summary.md")).read())
    C.finish_run(cfg.out, None, "summary " + ", ".join(os.path.join(cfg.out, f) for f in
                                                      ("summary.md", "summary.csv", "matrices.png")))


def main(argv=None):
    commands = {"train": (run, TrainConfig), "split": (split_shards, SplitConfig), "compare": (compare, CompareConfig)}
    C.run_command(__doc__, commands, argv, default="train")
    C.cleanup_distributed()


if __name__ == "__main__":
    main()
