"""TiC-CLIP: Continual Training of CLIP Models (arXiv 2310.16226, Garg et al., Apple, ICLR 2024).

New web image-text data lands every time step and the compute per step is fixed: retrain a CLIP model from scratch
on everything, or warm-start from the last model and replay old data? The paper: warm start + replay (Cumulative)
matches retraining from scratch at ~2.5x less compute. The benchmark protocol on TiC-DataComp as released, on any
time-stamped shards, and on the built-in synthetic world (shapes, colours, style and words drift with the year).

In: `split` (TiC-DataComp from its released UID files: 7 steps, yearly retrieval and DataCompNet tasks 2014-2022; or
by timestamp: TiC-YFCC, TiC-RedCaps, your own years); Table 2's strategies, the Oracle, oracle-cumulative (scratch at
every step with (t+1) x C); warm start = weights only, fresh AdamW and schedule; resume at the step and batch; the
train-step x eval-task matrix (full-set retrieval R@1, zero-shot top-1), ID / backward / forward, a static task;
`compare` with accuracy against cumulative compute. DDP, bf16, --compile. Defaults as the released configs: AdamW
(0.9, 0.98, 1e-6, wd 0.2), cosine, no gradient clipping, warm-up only from random init (scripts: --warmup 0 on warm
starts). Out: the DataComp static suite (give --static-data), monthly tasks, restricted-ImageNet groups.

Paper -> code:
  Fig. 1 protocol A: new data + replay buffer        -> replay_counts, buffer_filter, step_sources
  Sec. 3 / Table 2 strategies, buffer size 2D        -> STRATEGIES, replay_counts (--buffer-factor)
  fixed compute C per step; Oracle T x C; (t+1) x C  -> --budget-steps, step_budget
  warm start: weights only, new AdamW and schedule   -> warm_start, fresh_optimizer (--warm-warmup)
  LwF (Li & Hoiem) / Patching (Ilharco et al. 2022)  -> lwf_loss (+ reference), interpolate, choose_alpha
  TiC-DataComp UIDs; YFCC / RedCaps time steps       -> ReleasedUIDs, route_by_uid, BENCHMARKS, split_shards
  dynamic tasks: retrieval R@1 / DataCompNet top-1   -> evaluate_model, embed, recall_at_1 (full set, chunked)
  Sec. 2.3 metrics (CLEAR): ID, backward, forward    -> step_columns, summary_metrics
  Fig. 1 right: accuracy vs compute, the 2.5x        -> compute_curve, compute_ratio, compute_table

Commands:
  python tic.py                                   # sequential on the synthetic world (4 steps, 32 px), CPU
  python tic.py compare --strategies cumulative-all,restart,oracle-cumulative   # the compute table below
  python tic.py split --data 'datacomp/{00000000..00001287}.tar' --uids tic_uids/ --out tic_datacomp/
      # tic_uids/: {2014..2023}.npy and the two *year2uids.pkl of the ml-tic-clip README
  torchrun --nproc_per_node=8 tic.py --data tic_datacomp/ --strategy cumulative-all --model vit_b32 \\
      --bpe bpe_simple_vocab_16e6.txt.gz --batch-size 512 --budget-steps 4500 --lr 5e-4 --warmup 500 \\
      --classnames imagenet_classnames.txt --out runs/tic-cumulative --compile   # tic_medium; same command resumes

Result (2-core shared CPU, torch 2.14.1; `compare --strategies cumulative-all,oracle-cumulative --budget-steps 100
--batch-size 64`, seed 0, a hint): cumulative-all (4 C) reaches oracle-cumulative's equal static top-1 at 2.1x less
compute, equal retrieval at 1.9x (last: 18.6 / 2.8% vs 22.0 / 3.8% at 10 C); at C = 60 x 64 (seeds 0-2) all stay
near chance and no saving shows (ratios 0.3-1.0). Tables: README.
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import glob
import itertools
import json
import math
import os
import re
import time
import zlib
from dataclasses import dataclass

import numpy as np
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
    eval_frac: float = 0.01  # held-out eval share per step (spec: 1%; with --uids the released lists are the eval)
    val_frac: float = 0.005  # validation share per step (patching's coefficient)
    uids: str = ""  # TiC-DataComp as released: folder of {year}.npy UIDs + the year2uids eval pickles (ReleasedUIDs)

@dataclass
class Recipe(Config):  # the flags of `train` and `compare`: model, budget, optimiser, evaluation, the run
    model: str = "tiny"  # a name from MODELS
    budget_steps: int = 150  # C: optimizer steps per time step, whatever the strategy (oracle: T x C)
    batch_size: int = 128  # per process (the global batch is this x world size)
    lr: float = 2e-3  # peak learning rate, the same at every step (spec 3.2)
    weight_decay: float = 0.2  # AdamW weight decay (DataComp default)
    beta2: float = 0.98  # AdamW beta2
    warmup: int = 17  # warm-up steps of the first step, restarts and the Oracles (tic_medium: 500 of 4500)
    warm_warmup: int = 0  # warm-up steps of a warm-started step (released scripts: 0)
    grad_clip: float = 0.0  # global gradient-norm clip; 0 = off (released params: grad_clip_norm None)
    buffer_factor: float = 2.0  # replay buffer of cumulative-exp/equal, in units of the new step's size D
    lwf_lambda: float = 1.0  # weight of the LwF distillation term
    patch_alphas: str = "0,0.25,0.5,0.75,1"  # patching: mixing coefficients tried on the val splits
    classnames: str = ""  # file with one class name per label index (default: json 'classname' of the data)
    eval_chunk: int = 4096  # query rows per similarity block in full-set recall (bounds memory)
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
    strategy: str = "sequential"  # one of STRATEGIES

@dataclass
class CompareConfig(Recipe):
    strategies: str = "restart,sequential,cumulative-all,oracle"  # the strategies to run, comma-separated


# Named sizes. `tiny` is the CPU model of the synthetic experiment; vit_b32 is tic_medium's, vit_b16
# tic_large's and tic_xlarge's (spec 2).
_VIT_B = dict(image_size=224, width=768, layers=12, heads=12, embed_dim=512, text_width=512, text_layers=12,
              text_heads=8, context_length=77)
MODELS = {"tiny": dict(image_size=32, patch=8, width=64, layers=4, heads=2, embed_dim=128, text_width=64,
                       text_layers=3, text_heads=1, context_length=32),
          "vit_b32": dict(_VIT_B, patch=32), "vit_b16": dict(_VIT_B, patch=16)}

# Time steps as inclusive year ranges (spec 4.1). TiC-DataComp merges 2014-2016 into its first step; the
# YFCC groups are those of the released create_splits.py; RedCaps' first step is 2011-2017 (secondary).
# `synthetic` covers SYNTH_YEARS in 4 steps, the outline-style switch (~2019.5) inside the third.
BENCHMARKS = {"datacomp": "2014-2016,2017,2018,2019,2020,2021,2022", "yfcc": "2004-2008,2009-2010,2011-2012,2013-2014",
              "redcaps": "2011-2017,2018,2019,2020", "synthetic": "2014-2016,2017-2018,2019-2020,2021-2023"}
STRATEGIES = ("restart", "sequential", "cumulative-all", "cumulative-exp", "cumulative-equal", "lwf",
              "patching", "oracle", "oracle-cumulative")
SCRATCH = ("restart", "oracle", "oracle-cumulative")  # random init at every step they train

# ==== 1. Time steps: time-stamped shards -> step{k}/{train,val,eval} (spec 4.1) =============================
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

UID_PICKLES = ("tic-datacomp_retrieval_evals_year2uids.pkl", "tic-datacompnet_year2uids.pkl")

def uid_pair(uid: str) -> tuple[int, int]:
    """A 128-bit hex UID as the two uint64 halves of the released .npy files (dtype 'u8,u8'); both halves count."""
    return int(uid[:16], 16), int(uid[16:32], 16)

class ReleasedUIDs:
    """TiC-DataComp's released UID files, named as the ml-tic-clip README downloads them: {year}.npy, the year's
    training UIDs (yearly_noeval), sorted unique (u8, u8) pairs, memory-mapped (no pickle) and bisected; UID_PICKLES
    {year: [hex UID]} (retrieval) and {year: {synset: [hex UID]}} (DataCompNet, optional); dataset_class_info.json
    (optional): BREEDS' [[id, synset, name]], the released synset -> class map (else: rank of the sorted synsets,
    ImageNet's order where all 1000 occur). Pickles go through common.safe_unpickle(numpy=True): no code runs."""

    def __init__(self, folder: str):
        path = lambda n: os.path.join(folder, n)
        try:
            self.train = {int(os.path.basename(p)[:-4]): np.load(p, mmap_mode="r", allow_pickle=False)
                          for p in sorted(glob.glob(path("[0-9][0-9][0-9][0-9].npy")))}
            assert self.train and all(len(a.dtype.names or ()) == 2 for a in self.train.values()), "no (u8,u8) year"
            ret = C.safe_unpickle(path(UID_PICKLES[0]), numpy=True)
            net = C.safe_unpickle(path(UID_PICKLES[1]), numpy=True) if os.path.exists(path(UID_PICKLES[1])) else {}
            self.retrieval = {uid_pair(u): int(y) for y, us in ret.items() for u in us}  # UID -> year
            info = json.load(open(path("dataset_class_info.json"))) if os.path.exists(path("dataset_class_info.json")) \
                else [(i, s, None) for i, s in enumerate(sorted({s for by in net.values() for s in by}))]
            cls = {s: int(i) for i, s, _ in info}
            self.classes = {uid_pair(u): (int(y), cls[s]) for y, by in net.items() for s, us in by.items() for u in us}
            self.classnames = [n.split(",")[0].strip() for _, _, n in sorted(info)] if info and info[0][2] else None
        except (AssertionError, OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            C.fail(f"--uids {folder}: not TiC-DataComp's released UID files ({type(e).__name__}: {e}); "
                   f"expected {{year}}.npy and {UID_PICKLES[0]}")

    def train_year(self, uid: tuple[int, int]) -> int | None:
        for year, a in self.train.items():  # bisection in each year's sorted pairs
            i = int(np.searchsorted(a, q := np.array([uid], dtype=a.dtype))[0])
            if i < len(a) and a[i] == q[0]:
                return year
        return None

def route_by_time(meta: dict, key: str, ranges, cfg: SplitConfig):
    """The step of the sample's timestamp (--time-field); train, val (--val-frac) or held-out eval (--eval-frac, the
    spec's 1% test split) by a hash of its key."""
    k = step_of(sample_year(meta, cfg.time_field), ranges)
    if k is None:
        return [], "no_or_out_of_range_time"
    u = unit_hash(cfg.seed, key)
    return [(f"step{k}/" + ("eval" if u < cfg.eval_frac else "val" if u < cfg.eval_frac + cfg.val_frac else "train"),
             meta)], None

def route_by_uid(meta: dict, key: str, ranges, cfg: SplitConfig, uids: ReleasedUIDs):
    """An eval UID goes to its yearly retrieval and/or DataCompNet task (class id in --label-field), any other to its
    training year's step (val by hash); the year goes into the json (--time-field) for the replay buffer."""
    uid = str(meta.get("uid") or key)
    if not re.fullmatch(r"[0-9a-fA-F]{32}", uid):
        return [], "no_uid"
    u, out = uid_pair(uid), []
    if u in uids.retrieval:
        out.append((f"tasks/retrieval/{uids.retrieval[u]}", dict(meta, **{cfg.time_field: uids.retrieval[u]})))
    if u in uids.classes:
        year, c = uids.classes[u]
        out.append((f"tasks/datacompnet/{year}", dict(meta, **{cfg.time_field: year, cfg.label_field: c})))
    if out:
        return out, None
    year = uids.train_year(u)
    k = step_of(year, ranges)
    if k is None:
        return [], "uid_not_in_a_step" if year else "uid_not_released"
    part = "val" if unit_hash(cfg.seed, uid) < cfg.val_frac else "train"
    return [(f"step{k}/{part}", dict(meta, **{cfg.time_field: year}))], None

def split_shards(cfg: SplitConfig):
    """Cut time-stamped shards into time steps: OUT/step{k}/{train,val,eval}/ and OUT/steps.json (route_by_time).
    With --uids (route_by_uid): TiC-DataComp's 7 steps from the yearly UID files and the released evaluation UIDs
    as the yearly tasks OUT/tasks/{retrieval,datacompnet}/{year}/. Single process; for web-scale pools run it on
    disjoint --data subsets into separate folders."""
    if not cfg.data:
        C.fail("split needs --data: the time-stamped tar shards to cut into time steps")
    if cfg.eval_frac + cfg.val_frac > 1:
        C.fail(f"--eval-frac {cfg.eval_frac} + --val-frac {cfg.val_frac}: their sum must be at most 1")
    if cfg.uids and not cfg.years:
        cfg.benchmark = "datacomp"
    ranges = step_ranges(cfg)
    try:
        src = C.expand_shards(cfg.data)
    except FileNotFoundError as e:
        C.fail(str(e))
    uids = ReleasedUIDs(cfg.uids) if cfg.uids else None
    earlier = os.path.isdir(cfg.out) and any(re.fullmatch(r"steps\.json|step\d+|tasks", n) for n in os.listdir(cfg.out))
    take_out(cfg.out, "an earlier split (steps.json, step*/)" if earlier else None, cfg.overwrite)
    bufs, counts, names, dropped, skipped = {}, {}, {}, {}, {}
    def flush(d, final=False):  # d: the output folder, relative to --out
        if bufs.get(d) and (final or len(bufs[d]) >= cfg.shard_size):
            os.makedirs(os.path.join(cfg.out, d), exist_ok=True)
            C.write_shard(os.path.join(cfg.out, d, f"{counts.get(d, 0) // cfg.shard_size:05d}.tar"), bufs[d])
            counts[d] = counts.get(d, 0) + len(bufs.pop(d))
    for i, path in enumerate(C.progress(src, "split")):
        for s in C.iter_tar_samples(path, skipped):
            try:
                meta = json.loads(s["json"])
            except (KeyError, ValueError):
                meta = {}
            dests, why = route_by_uid(meta, s["__key__"], ranges, cfg, uids) if uids else \
                route_by_time(meta, s["__key__"], ranges, cfg)
            dropped[why] = dropped.get(why, 0) + (why is not None)
            if "classname" in meta and cfg.label_field in meta:
                names[int(meta[cfg.label_field])] = meta["classname"]
            key = f"{i:05d}_{s['__key__'].replace('/', '_')}"  # unique over the source shards
            for d, m in dests:
                bufs.setdefault(d, []).append(dict(s, __key__=key, json=m if m is not meta else s["json"]))
                flush(d)
    dropped.pop(None, None)
    if not bufs and not counts:  # nothing written: say why, in one line
        C.fail(f"no sample of --data {cfg.data} ({len(src)} shard(s)) falls in a time step; skipped: "
               + (", ".join(f"{k} {v}" for k, v in sorted({**skipped, **dropped}.items())) or "no samples in them"))
    for d in list(bufs):
        flush(d, final=True)
    classnames = uids.classnames if uids else \
        [names[j] for j in range(len(names))] if names and sorted(names) == list(range(len(names))) else None
    steps = write_steps(cfg.out, ranges, counts, classnames, cfg.time_field)
    C.print0(f"split {len(src)} shards into {len(ranges)} steps: {[s['train'] for s in steps['steps']]} train samples,"
             f" eval tasks {[t['name'] for t in steps['tasks']]}; dropped {dropped}; unreadable {skipped}\nresults: "
             f"{os.path.join(cfg.out, 'steps.json')} (train with: python tic.py --data {cfg.out})")

def step_tasks(steps: list) -> list:
    return [{"name": s["name"], "step": k, "retrieval": f"step{k}/eval", "classification": f"step{k}/eval"}
            for k, s in enumerate(steps)]

def write_steps(root: str, ranges, counts: dict, classnames, time_field: str) -> dict:
    """steps.json from the sample counts per folder ({"step0/train": n, "tasks/retrieval/2014": n, ...}): the steps,
    the eval tasks (a --uids split's yearly ones in a step, else each step's eval part), class names, year field."""
    steps = [{"name": f"{lo}" if lo == hi else f"{lo}-{hi}", "years": [lo, hi], **{
        p: counts.get(f"step{k}/{p}", 0) for p in ("train", "val", "eval")}} for k, (lo, hi) in enumerate(ranges)]
    years = sorted({int(d.split("/")[2]) for d in counts if d.startswith("tasks/")})
    tasks = [{"name": str(y), "step": step_of(y, ranges), **{k: d if d in counts else None for k, d in (
        ("retrieval", f"tasks/retrieval/{y}"), ("classification", f"tasks/datacompnet/{y}"))}}
        for y in years if step_of(y, ranges) is not None]
    out = {"steps": steps, "tasks": tasks or step_tasks(steps), "classnames": classnames, "time_field": time_field}
    with open(os.path.join(root, "steps.json"), "w") as f:
        json.dump(out, f, indent=1)
    return out

def synthetic_steps(cfg: Recipe) -> str:
    """The synthetic world in time steps: train / val / eval samples with years drawn uniformly in each step's range
    (own seed per step and part), a static all-years ImageFolder; generated once (rank 0), cached by parameters."""
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
                samples = ({"__key__": f"s{k}_{s['key']}", "jpg": s["image"], "txt": s["caption"], "json": {
                    "label": s["label"], "classname": C.SYNTH_SHAPES[s["label"]], "year": s["year"]}} for s in gen)
                for j in range(0, count, cfg.shard_size):
                    C.write_shard(os.path.join(d, f"{j // cfg.shard_size:05d}.tar"),
                                  itertools.islice(samples, cfg.shard_size))
        # the static task: a fixed all-years test set, as ImageNet is one fixed test set for every step
        for s in C.synthetic_split(1000 * cfg.seed + 999, cfg.synthetic_static, cfg.image_size, "test"):
            d = os.path.join(root, "static", C.SYNTH_SHAPES[s["label"]])
            os.makedirs(d, exist_ok=True)
            s["image"].save(os.path.join(d, s["key"] + ".png"))
        write_steps(root, ranges, {f"step{k}/{p}": n[p] for k in range(len(ranges)) for p in n}, C.SYNTH_SHAPES, "year")
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
        steps.setdefault("tasks", step_tasks(steps["steps"]))  # written before the yearly tasks existed
        assert [s["train"] for s in steps["steps"]] and all(t["step"] is not None for t in steps["tasks"])
    except (OSError, ValueError, KeyError, TypeError, AssertionError) as e:
        C.fail(f"{path} does not read as tic.py split's steps.json ({type(e).__name__}); split the shards again")
    return steps

def part_shards(root: str, part: str) -> list[str]:
    """The shards of one part of the split, e.g. 'step0/train' or 'tasks/retrieval/2014'."""
    try:
        return C.expand_shards(os.path.join(root, part))
    except FileNotFoundError as e:  # e.g. a time step without eval samples (a tiny --eval-frac)
        C.fail(f"{part} of {root} has no shards ({e}): split with more data or a larger --eval-frac / --val-frac")

# ==== 2. Replay buffers (Table 2, spec 3.3): which old data each strategy trains on, and in what ratio ======
# At step t the training data is the new step's D_t samples plus, from each old step j < t, count_j samples
# chosen at random. Everything is then sampled uniformly, i.e. old and new mix in proportion to their sizes
# (the released code concatenates the shard lists and resamples). The budget never grows with the data.

def replay_counts(strategy: str, sizes: list[int], t: int, buffer_factor: float = 2.0) -> list[int]:
    """Samples kept from each old step 0..t-1 at step t (sizes[j] = step j's training samples). cumulative-all and
    the scratch strategies: everything. sequential, lwf, patching: nothing. cumulative-exp / -equal: a buffer of
    buffer_factor x D_t split 1/2, 1/4, ... from the newest step back, the two oldest equal (exp), or equally; a step
    smaller than its share is kept whole, its leftover shared by the rest (design choice; the spec is silent)."""
    if strategy in ("cumulative-all",) + SCRATCH:
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

def buffer_filter(keep: list[float], ranges, time_field: str, seed: int):
    """Keeps a sample of old step j iff unit_hash(seed, key) < keep[j]: a random fraction of that step, with no
    pass over the data. With one seed for the whole sequence, a step's buffer at t+1 is a subset of its buffer at
    t, as a real buffer can only drop samples (heuristic for web scale: dropped samples are read, then skipped)."""
    def kept(sample: dict) -> bool:
        try:
            k = step_of(sample_year(json.loads(sample["json"]), time_field), ranges)
        except (KeyError, ValueError):
            return False
        return k is not None and k < len(keep) and unit_hash(seed, sample["__key__"]) < keep[k]
    return kept

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
    counts = list(sizes) if strategy == "oracle" else \
        replay_counts(strategy, sizes, t, buffer_factor) + [sizes[t]] + [0] * (T - t - 1)
    shards = [p for k in range(T) if counts[k] for p in part_shards(root, f"step{k}/train")]
    keep = [counts[k] / max(1, sizes[k]) for k in range(T)]
    ranges = [tuple(s["years"]) for s in steps["steps"]]
    return shards, buffer_filter(keep, ranges, steps.get("time_field", "year"), seed), counts

# ==== 3. LwF and Patching: the two regularised warm starts without old data (Table 2) =======================
def lwf_loss(img, txt, t_img, t_txt, logit_scale, t_scale) -> torch.Tensor:
    """Learning without Forgetting for CLIP: KL(teacher || student) of the image->text and text->image similarity
    distributions over the global batch, the frozen previous model as teacher at its own temperature (weight and
    temperature open in the spec: design choice). Local rows against gathered columns; fp32; (B, E) normalised."""
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
    return sum((t.softmax(d) * (t.log_softmax(d) - s.log_softmax(d))).sum() / len(s) for d in (1, 0)) / 2

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

# ==== 4. Evaluation: the time matrix and its summary metrics (Sec. 2.3, spec 5.2) ===========================
def embed(model, shards, tokenizer, cfg: Recipe, device):
    """(N, E) image and text embeddings and (N,) json labels (-1 where absent) of every pair in `shards` (the whole
    set, as the paper evaluates; no cap), batch by batch: nothing but the embeddings is kept."""
    spec = MODELS[cfg.model]
    base = C.ImageTextDecode(tokenizer, spec["image_size"], spec["context_length"], train=False)
    def decode(s):
        try:
            label = int(json.loads(s["json"])[cfg.label_field])
        except (KeyError, ValueError, TypeError):
            label = -1
        return dict(base(s), label=torch.tensor(label))
    img, txt, lab = [], [], []
    try:
        for b in C.ShardStream(shards, decode, 256, shuffle_buffer=1, epochs=1, drop_last=False):
            img.append(model.encode_image(C.normalize_images(b["image"].to(device))).float())
            txt.append(model.encode_text(b["ids"].to(device)).float())
            lab.append(b["label"].to(device))
    except C.DataError as e:  # every sample of the eval shards is unusable
        C.fail(str(e))
    return torch.cat(img), torch.cat(txt), torch.cat(lab)

@torch.no_grad()
def recall_at_1(img: torch.Tensor, txt: torch.Tensor, chunk: int = 4096) -> float:
    """TiC-DataComp-Retrieval's mean_recall@1 (%): the mean of image->text and text->image R@1 over every pair of
    the task (the released eval: clip_benchmark's zeroshot_retrieval on the whole yearly set); img[i] pairs txt[i].
    Blocks of `chunk` queries against all N candidates: O(chunk x N) memory. A tie with the true match is a hit,
    as in common.retrieval_eval (the full-matrix reference of the test)."""
    img, txt = F.normalize(img.float(), dim=-1), F.normalize(txt.float(), dim=-1)
    hits = 0
    for q, c in ((img, txt), (txt, img)):
        for s in range(0, len(q), chunk):
            sim = q[s:s + chunk] @ c.T  # (b, N)
            true = sim.diagonal(offset=s)[:, None]  # (b, 1): query s+i against its own pair
            hits += int(((sim > true).sum(dim=1) == 0).sum())
    return 100 * hits / (2 * len(img))

@torch.no_grad()
def evaluate_model(model, tokenizer, steps: dict, root: str, part: str, cfg: Recipe, device,
                   upto: int | None = None) -> dict:
    """Full-set retrieval R@1 and zero-shot top-1 (labels and names present) of every eval task, one column each (a
    --uids split's yearly tasks, else one per step; part 'val': the steps' val sets 0..upto), and the static task."""
    model.eval()
    spec = MODELS[cfg.model]
    names = C.read_lines(cfg.classnames) if cfg.classnames else steps.get("classnames")
    net = any("datacompnet" in (t["classification"] or "") for t in steps["tasks"])  # ImageNet names: its 80 prompts
    clf = C.zeroshot_classifier(model, tokenizer, names, C.OPENAI_IMAGENET_TEMPLATES if net else C.DEFAULT_TEMPLATES,
                                device, spec["context_length"]) if names else None
    tasks = steps["tasks"] if part == "eval" else [dict(retrieval=f"step{k}/val", classification=f"step{k}/val")
                                                   for k in range(upto + 1)]
    out = {"retrieval": [], "zeroshot": []}
    for task in tasks:
        r = z = None
        if task["retrieval"]:
            img, txt, lab = embed(model, part_shards(root, task["retrieval"]), tokenizer, cfg, device)
            r = recall_at_1(img, txt, cfg.eval_chunk)
        if task["classification"] and clf is not None:
            if task["classification"] != task["retrieval"]:
                img, _, lab = embed(model, part_shards(root, task["classification"]), tokenizer, cfg, device)
            has = lab >= 0
            z = 100 * ((F.normalize(img[has], dim=-1) @ clf).argmax(1) == lab[has]).float().mean().item() \
                if has.any() else None
        out["retrieval"].append(r)
        out["zeroshot"].append(z)
    if part == "eval" and (cfg.static_data or os.path.isdir(os.path.join(root, "static"))):
        items, snames = C.image_folder(cfg.static_data or os.path.join(root, "static"),
                                       C.read_lines(cfg.classnames) if cfg.static_data and cfg.classnames else None)
        sclf = C.zeroshot_classifier(model, tokenizer, snames, C.DEFAULT_TEMPLATES, device, spec["context_length"])
        out["static"] = C.zeroshot_eval(model, sclf, items, spec["image_size"], device)["zeroshot_top1"]
    model.train()
    return out

def step_columns(values: list, tasks: list, T: int) -> list:
    """Per-task values -> per-step values: the mean of the tasks of each step (None where it has none), e.g.
    TiC-DataComp's 2014, 2015 and 2016 tasks -> its first step (spec 5.2: T = 7; the mean is a design choice)."""
    cols = [[v for v, t in zip(values, tasks) if t["step"] == k and v is not None] for k in range(T)]
    return [sum(c) / len(c) if c else None for c in cols]

def summary_metrics(E: list) -> dict:
    """The paper's dynamic-task metrics (Sec. 2.3, spec 5.2: CLEAR's, Lin et al. 2021; plain means of accuracies, not
    Lopez-Paz differences) over E[i][j], train step i x eval step j (step_columns; untrained rows None): in-domain =
    mean E[i][i], backward = mean over j < i, forward = mean over j > i; final = the last model's mean."""
    groups = {"id": [], "backward": [], "forward": []}
    for i, row in enumerate(E):
        for j, v in enumerate(row or []):
            if v is not None:
                groups["id" if i == j else "backward" if j < i else "forward"].append(v)
    mean = lambda xs: sum(xs) / len(xs) if xs else float("nan")
    last = next((r for r in reversed(E) if r), [])
    return {**{k: mean(v) for k, v in groups.items()}, "final": mean([v for v in last if v is not None])}

def write_outputs(out: str, result: dict):
    """matrix.csv (one line per train step x eval task) and matrix.png (heatmaps) from matrix.json's dict."""
    fmt = lambda v: "" if v is None else f"{v:.2f}"
    with open(os.path.join(out, "matrix.csv"), "w") as f:
        f.write("strategy,train_step,eval_task,retrieval_r1,zeroshot_top1,static_top1,compute_C\n")
        for step, row in zip(result["steps"], result["rows"]):
            for j, task in enumerate(result["tasks"] if row else []):
                f.write(f"{result['strategy']},{step['name']},{task['name']},{fmt(row['retrieval'][j])},"
                        f"{fmt(row['zeroshot'][j])},{row.get('static', '')},{row['compute_C']:.3f}\n")
    draw_heatmaps([(result["strategy"], result)], os.path.join(out, "matrix.png"))

def draw_heatmaps(results: list, path: str, cell: int = 66):
    """One row of panels per strategy (retrieval R@1, zero-shot top-1; train step down, eval task across), values in
    the cells, a shared colour range per metric (dark blue -> yellow). Pillow only."""
    from PIL import Image, ImageDraw
    rows, cols = [s["name"] for s in results[0][1]["steps"]], [t["name"] for t in results[0][1]["tasks"]]
    vals = {m: [v for _, res in results for r in res["rows"] if r for v in r[m] if v is not None]
            for m in ("retrieval", "zeroshot")}
    metrics, pw, ph = [m for m in vals if vals[m]], 134 + len(cols) * cell, 58 + len(rows) * cell
    img = Image.new("RGB", (pw * len(metrics) + 10, ph * len(results) + 30), "white")
    d = ImageDraw.Draw(img)
    d.text((10, 6), "rows: model after train step i; columns: eval task j", fill="black")
    for (r, (label, res)), (c, m) in [(a, b) for a in enumerate(results) for b in enumerate(metrics)]:
        x0, y0 = c * pw + 120, r * ph + 58  # the top-left cell of this panel
        d.text((x0 - 110, y0 - 34), f"{label}: {'retrieval R@1' if m == 'retrieval' else 'zero-shot top-1'} (%)",
               fill="black")
        for j, n in enumerate(cols):
            d.text((x0 + j * cell + 2, y0 - 20), n, fill="black")
        for i, row in enumerate(res["rows"]):
            d.text((x0 - 110, y0 + i * cell + cell // 3), f"train {rows[i]}", fill="black")
            for j, v in enumerate(row[m] if row else [None] * len(cols)):
                x = None if v is None else (v - min(vals[m])) / max(1e-9, max(vals[m]) - min(vals[m]))
                box = (x0 + j * cell, y0 + i * cell, x0 + (j + 1) * cell - 2, y0 + (i + 1) * cell - 2)
                d.rectangle(box, fill=(235, 235, 235) if x is None else tuple(
                    round(a + (b - a) * x) for a, b in zip((68, 1, 84), (253, 231, 37))))
                if x is not None:
                    d.text((box[0] + 8, box[1] + cell // 3), f"{v:.1f}", fill="white" if x < 0.5 else "black")
    img.save(path)

# ==== 5. Model, tokenizer, warm start =======================================================================
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
        for path in part_shards(root, "step0/train"):
            for s in C.iter_tar_samples(path, skipped):
                with contextlib.suppress(Exception):  # a sample without a readable caption: not used
                    captions.append(C.decode_caption(s))
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
    box = [obj]
    if C.get_world_size() > 1 and dist.is_initialized():
        dist.broadcast_object_list(box, src=0)
    return box[0]

# ==== 6. Training one time step under the fixed budget (the loop of mobileclip.py, plus LwF) ================
def train_time_step(cfg: TrainConfig, model, opt, lr_fn, total: int, offset: int, shards, keep, teacher, sdir: str,
                    t: int, env, log, tokenizer, stop: C.StopSignal) -> dict | None:
    """`total` optimizer steps on `shards` (filtered by `keep`), resuming from sdir's ckpt-*.pt (weights, optimizer,
    RNG, data position). Returns {"wall_s"}, or None when `stop` was signalled (a checkpoint saved at the step)."""
    rank, local_rank, world, device = env
    spec = MODELS[cfg.model]  # log steps count across the whole sequence, from `offset`
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

# ==== 7. The sequence: every time step, its model kept, its row of the matrix ===============================
def step_budget(strategy: str, t: int, T: int, budget: int) -> tuple[int, int]:
    """(steps of time step t, steps before it): C (Sec. 3); the Oracle T x C at its one step (released script: 7x);
    oracle-cumulative (t+1) x C, the retrain-from-scratch baseline of Fig. 1 right (the 2.5x), T(T+1)/2 x C in all."""
    grow = strategy == "oracle-cumulative"
    return budget * (T if strategy == "oracle" else t + 1 if grow else 1), \
        budget * (0 if strategy == "oracle" else t * (t + 1) // 2 if grow else t)

def fit_time_step(cfg: TrainConfig, model, init_sd, tokenizer, steps, root, t, prev, sdir, env, log, stop):
    """Protocol A + B of Fig. 1 for step t: initialise (random or warm start), assemble the data (new +
    buffer), train its budget (step_budget), patch, and keep the step's model in sdir/model.pt."""
    T, world = len(steps["steps"]), env[2]
    restart = cfg.strategy in SCRATCH or prev is None
    if restart:
        model.load_state_dict(init_sd)
    else:
        warm_start(model, prev)
    teacher = copy.deepcopy(model).eval().requires_grad_(False) if cfg.strategy == "lwf" and not restart else None
    patch = cfg.strategy == "patching" and not restart
    prev_sd = {k: v.detach().clone() for k, v in model.state_dict().items()} if patch else None
    total, offset = step_budget(cfg.strategy, t, T, cfg.budget_steps)
    shards, keep, counts = step_sources(cfg.strategy, steps, root, t, cfg.buffer_factor, cfg.seed)
    C.print0(f"time step {t} ({steps['steps'][t]['name']}): {cfg.strategy}, "
             f"{'random init' if restart else 'warm start'}, {total} steps, training samples per step {counts}")
    opt, lr_fn = fresh_optimizer(model, cfg, not restart, total)
    done = train_time_step(cfg, model, opt, lr_fn, total, offset, shards, keep, teacher, sdir, t, env, log, tokenizer,
                           stop)
    if done is None:
        return None
    n = total * cfg.batch_size * world
    stats = {"train_samples": n, "teacher_samples": n if teacher is not None else 0, "counts": counts,
             "wall_s": done["wall_s"], "alpha": None, "patch_eval_samples": 0}
    if patch:
        alphas = parse_alphas(cfg.patch_alphas)
        new_sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
        def score(m):  # validation retrieval of the old steps (mean) and of the new one
            r = evaluate_model(m, tokenizer, steps, root, "val", cfg, env[3], upto=t)["retrieval"]
            return (sum(r[:t]) / t if t else None), r[t]
        alpha, scores = choose_alpha(model, prev_sd, new_sd, alphas, score) if env[0] == 0 else (None, None)
        alpha = broadcast(alpha)
        model.load_state_dict(interpolate(prev_sd, new_sd, alpha))
        stats.update(alpha=alpha, alpha_scores=scores,
                     patch_eval_samples=len(alphas) * sum(s["val"] for s in steps["steps"][:t + 1]))
    C.save_checkpoint(os.path.join(sdir, "model.pt"), {"model": model.state_dict(), "model_name": cfg.model,
                                                       "strategy": cfg.strategy, "time_step": t, "compute": stats})
    C.barrier()
    for p in C.checkpoints(sdir) if env[0] == 0 else []:  # the step is done: its resume files can go
        os.remove(p)
    return stats

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
    """Claim --out (common.claim_out: one live run per directory) and never mix two runs' files: where `other` names
    an earlier, different run's files, stop with one line, or with --overwrite move them to OUT/previous-N/."""
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
    for flag, low in (("budget_steps", 1), ("eval_chunk", 1), ("buffer_factor", 0),
                      ("synthetic_train", 1), ("synthetic_val", 1), ("synthetic_eval", 1), ("image_size", 8)):
        if getattr(cfg, flag) < low:
            C.fail(f"--{flag.replace('_', '-')} {getattr(cfg, flag)}: must be >= {low}")

def run(cfg: TrainConfig, stop: C.StopSignal | None = None) -> dict | None:
    """Train one strategy over the time steps, then score every step's model on every eval task.
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
    result = result or {"strategy": cfg.strategy, "steps": steps["steps"], "tasks": steps["tasks"], "rows": [None] * T}
    tokenizer = make_tokenizer(cfg, root)
    model = build_model(cfg, tokenizer.vocab_size, cfg.seed).to(env[3])
    init_sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
    log, prev = C.RunLog(cfg.out), None
    C_samples = cfg.budget_steps * cfg.batch_size * env[2]
    for t in [T - 1] if cfg.strategy == "oracle" else range(T):
        sdir = os.path.join(cfg.out, f"step{t}")
        final = os.path.join(sdir, "model.pt")
        if os.path.isfile(final):  # done earlier: its weights are the next step's warm start
            stats = warm_start(model, final)["compute"]
        else:
            stats = fit_time_step(cfg, model, init_sd, tokenizer, steps, root, t, prev, sdir, env, log, stop)
            if stats is None:
                C.print0(f"stopped in time step {t}, checkpoint in {sdir}; run the same command again to resume")
                return None
        if result["rows"][t] is None and rank == 0:  # ---- this model on every eval task ----
            row = evaluate_model(model, tokenizer, steps, root, "eval", cfg, env[3])
            # compute in units of C; a forward-only pass (LwF's teacher, patching's val) = 1/3 of a training step's
            row.update(compute_C=(stats["train_samples"] + (stats["teacher_samples"] + stats["patch_eval_samples"]) / 3)
                       / C_samples, train_wall_s=stats["wall_s"], alpha=stats["alpha"], counts=stats["counts"])
            result["rows"][t] = row
            save_json(mpath, result)
            log.log(sum(step_budget(cfg.strategy, t, T, cfg.budget_steps)), time_step=t,
                    **{f"retrieval_{n['name']}": v for n, v in zip(steps["tasks"], row["retrieval"])},
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
        log.log(sum(step_budget(cfg.strategy, T - 1, T, cfg.budget_steps)), **result["summary"])
        C.finish_run(cfg.out, final, f"matrix {mpath} (.csv, .png)")
    return broadcast(result)

def summarize(result: dict) -> dict:
    """The paper's summary numbers of one run: ID / backward / forward / final for retrieval and zero-shot (the
    task columns folded into steps, step_columns), the static task of the last model, the total compute in C."""
    out, T = {}, len(result["rows"])
    for m in ("retrieval", "zeroshot"):
        E = [step_columns(r[m], result["tasks"], T) if r else None for r in result["rows"]]
        if any(v is not None for r in E if r for v in r):
            out.update({f"{m}_{k}": v for k, v in summary_metrics(E).items()})
    last = next(r for r in reversed(result["rows"]) if r)
    out["static"] = last.get("static")
    out["compute_C"] = sum(r["compute_C"] for r in result["rows"] if r)
    out["train_wall_s"] = sum(r["train_wall_s"] for r in result["rows"] if r)
    return out

def compute_curve(result: dict, metric: str) -> list[tuple[float, float]]:
    """(cumulative compute in C, accuracy) after each trained step: static top-1 (the paper's axis: ImageNet and
    its shifts) or the mean retrieval R@1 over all tasks."""
    out, spent = [], 0.0
    for r in (r for r in result["rows"] if r):
        vals = [v for v in r["retrieval"] if v is not None]
        spent += r["compute_C"]
        out.append((spent, r.get("static") if metric == "static" else sum(vals) / len(vals) if vals else None))
    return out

def compute_to_reach(curve, acc: float) -> float | None:
    """The cumulative compute at which a curve first reaches `acc`, linear between its points; None if never."""
    for k, (x, y) in enumerate(curve):
        if y is not None and y >= acc:
            x0, y0 = curve[k - 1] if k else (x, y)
            return x if y0 is None or y0 >= acc else x0 + (x - x0) * (acc - y0) / (y - y0)
    return None

def compute_ratio(ref, cur) -> float | None:
    """Fig. 1 (right): compute of `ref` / compute of `cur` to reach the same accuracy, the lower of their last
    accuracies (the best both reach): > 1 where `cur` gets there with less compute (the paper's 2.5x)."""
    if not ref or not cur or None in (ref[-1][1], cur[-1][1]):
        return None
    a, b = (compute_to_reach(c, min(ref[-1][1], cur[-1][1])) for c in (ref, cur))
    return a / b if a and b else None

def compute_table(results: list, ref: str = "oracle-cumulative") -> str:
    """Markdown: per strategy, accuracy against cumulative compute per step, and compute_ratio against `ref`."""
    curves = {s: {m: compute_curve(r, m) for m in ("static", "retrieval")} for s, r in results}
    f = lambda v, d=1: "" if v is None else f"{v:.{d}f}"
    out = ["| strategy | cumulative compute (C) after each step | static top-1 | retrieval R@1 (all tasks) | "
           f"compute ratio vs {ref} at equal static / retrieval |", "|---|---|---|---|---|"]
    for s, c in curves.items():
        accs = [", ".join(f(y) for _, y in c[m]) for m in c]
        ratios = " / ".join(f(compute_ratio(curves[ref][m], c[m]), 2) if ref in curves and s != ref else "" for m in c)
        out.append(f"| {s} | {', '.join(f(x) for x, _ in c['static'])} | {accs[0]} | {accs[1]} | {ratios} |")
    return "\n".join(out) + "\n"

def compare(cfg: CompareConfig):
    """Run several strategies on the same data and tokenizer and tabulate them side by side.
    One sub-folder of --out per strategy (each a `train` run: a stopped compare resumes with the same command),
    then summary.md (+ accuracy against cumulative compute, compute_table), summary.csv, matrices.png in --out."""
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
        f.write("\n" + compute_table(results))
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
