"""CatLIP: CLIP-level Visual Recognition Accuracy with 2.7x Faster Pre-training on Web-scale Image-Text Data
(arXiv 2404.15653, Mehta et al., Apple).

CatLIP turns image-text pre-training into multi-label classification: the nouns of every caption become the labels of
its image, the frequent ones form a fixed vocabulary V, and an image-only ViT with one linear head is trained with
binary cross-entropy on the multi-hot targets. No text tower, no contrastive loss, no all-gather of embeddings.
Transfer Init starts a downstream classifier from the head rows of its label words.

What is here: the caption -> noun-lemma pipeline and the vocabulary (one streaming pass, counts merged over workers
and ranks); pre-training with the paper's BCE and the released configs' recipe (AdamW (0.9, 0.999), wd 0.2 except on
1-D parameters, warm-up from 1e-6 + cosine to lr/100, EMA 0.0005 without warm-up, random resized crop + flip);
fine-tuning and linear probing on an ImageFolder, with or without Transfer Init; a comparison on the synthetic world;
CoreNet's ViT (*_corenet), whose released checkpoints (vit_base.pt, vit_large.pt, vit_huge.pt, the ImageNet fine-tuned
ones) load strictly, trained with RangeAugment (learned ranges, PSNR loss) and the variable-batch sampler of
apple/corenet's projects/catlip configs (--no-multi-scale: one size): pretraining/vit_{base,large,huge}.yaml use
variable_batch_sampler at crop 224 with 25 scales in 128-320 px made divisible by check_scale 16 (128, 144, ..., 320)
and 1024/512/256 images a GPU at 224, scaled to keep the pixels (B/16: 3136 at 128 px, 501 at 320); the fine-tuning
configs the same with check_scale 32. On the stream a step's samples come in stream order (CoreNet draws indices within
shards). Stand-ins: the plain ViT (`tiny`, vit_b16, ...) keeps one size (its positions do not resize) and a fixed
jitter for RangeAugment. Left out: high-resolution fine-tuning, detection/segmentation transfers. Step timing: bench.py.

Noun extraction without NLTK/WordNet (spec 6): the released code keeps a token's WordNet lemma iff it heads its own
first noun synset; here a stop list and rule-based singularisation (extract_nouns). Lost: (1) Apple's label space
(synset offsets), unless --vocab is a label -> lemma table; (2) WordNet's validity filter (frequent adjectives, verbs
and misspellings enter V); (3) exact lemmas ("niches" -> "nich"); (4) path similarity in Transfer Init; (5) multi-word
synsets. The published datacomp_1_2B_vocab.pkl (read without running pickle code) has no lemmas, so pre-training on
it needs a table `label<TAB>lemma[,...]` (`n2084071<TAB>dog`), written elsewhere with NLTK as
    for k in list(vocab)[:24320]: print(k, wn.synset_from_pos_and_offset("n", int(k[1:])).name()[:-5], sep="\t")
ImageNet class folders named by wnid (n02084071) match those labels directly in Transfer Init.

Paper -> code:
  Eq. 1, nouns of a caption (POS tag + WordNet lemma)  -> extract_nouns (stop list + singularize)
  vocabulary V, synsets with count > V_tau (Sec. 3.1)  -> build_vocab, save_vocab / load_vocab
  multi-hot targets, empty targets kept (spec 4.1)     -> CatLIPDecode (label ids), multi_hot
  BCE summed over classes / batch size (Sec. 3.1)      -> multilabel_bce (fast), multilabel_bce_reference
  ViT-B/L/H/16, linear head on the CLS token (Sec. 3)  -> CoreNetViT (released layout), ViTClassifier, MODELS
  recipe (Table 6, configs): AdamW, cosine, EMA        -> make_optimizer, lr_at, EMA
  RangeAugment, variable batches (configs)             -> RangeAugment, image_batch_pairs, MultiScaleStream
  Transfer Init (Sec. 4.2, App. B); Table 7            -> match_classes, transfer_init; finetune (--linear-probe)

Commands:
  python catlip.py vocab --data 'shards/{00000..09999}.tar' --min-count 500 --out vocab.json --workers 8
  torchrun --nproc_per_node=8 catlip.py --data 'shards/{00000..09999}.tar' --vocab vocab.json --model vit_b16_corenet \\
      --batch-size 1024 --steps 200000 --warmup 10000 --lr 1e-3 --min-lr 1e-5 --out runs/catlip
  torchrun --nproc_per_node=8 catlip.py finetune --init vit_base.pt --vocab datacomp_1_2B_vocab.pkl --transfer-init \\
      --data imagenet/train --val-data imagenet/val --epochs 10 --lr 3e-5 --min-lr 3e-6 --warmup 500  # or runs/catlip
  python catlip.py finetune --init runs/catlip --data imagenet/train --val-data imagenet/val --linear-probe \\
      --transfer-init --epochs 30 --lr 3e-5 --min-lr 1e-6 --weight-decay 0 --label-smoothing 0
  python catlip.py --crop-scale 0.9 --ema-warmup --decay-all  # tiny pre-training on the synthetic world, CPU
  python catlip.py compare --init runs/catlip --crop-scale 0.9 --ema-warmup --decay-all  # vs from scratch

Result (2-core CPU, synthetic world, the two commands above; one run, a hint): the head rows of the shape names,
untrained on labels, reach 23.6% top-1 (chance 10%); fine-tuned on 500 labelled images, 16.5% from scratch, 21.4%
from the CatLIP backbone with a random head, 22.3% with Transfer Init (README, CatLIP section).
"""
from __future__ import annotations
import collections
import copy
import dataclasses
import itertools
import json
import math
import os
import random
import re
import time
import unicodedata
import urllib.parse
from dataclasses import dataclass
import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image
from torch.nn.parallel import DistributedDataParallel as DDP
import common as C

@dataclass
class VocabConfig:
    data: str = ""  # caption shards (directory, glob, brace pattern); empty = the synthetic world
    out: str = "vocab.json"  # where the vocabulary is written
    min_count: int = 0  # keep lemmas seen at least this often (paper: 500); 0 = auto, 100 * captions / 3M, >= 5
    max_size: int = 0  # keep at most this many, most frequent first (paper: 24320); 0 = no cap
    caption_key: str = "txt"  # suffix of the caption member in the shards
    workers: int = 2  # DataLoader worker processes per rank
    cache_dir: str = ""  # where the synthetic world is generated (default ~/.cache/effclip)
    synthetic_train: int = 40000  # synthetic training images (the same world as the pre-training default)
    synthetic_val: int = 1000  # synthetic held-out images
    image_size: int = 64  # image size of the synthetic world

@dataclass
class Shared:  # the flags of pre-training and fine-tuning alike
    model: str = "tiny"  # a name from MODELS (fine-tuning with --init: the checkpoint's)
    image_size: int = 0  # training resolution; 0 = the model's (fine-tuning: the checkpoint's)
    pool: str = "cls"  # cls | mean: the feature the head reads (the paper: the CLS token)
    grad_clip: float = 1.0  # global gradient-norm clip; 0 = off
    ema_momentum: float = 0.0005  # EMA of the weights: ema += m * (w - ema) (paper: 0.0005)
    ema_warmup: bool = False  # m_t = max(m, (1 + t)^-0.75) for short runs (timm's); off as CoreNet's EMA (configs)
    decay_all: bool = False  # decay biases and norms too; off: the configs' no_decay_bn_filter_bias (1-D params)
    warmup_init_lr: float = 1e-6  # the linear warm-up starts here (configs: warmup_init_lr 1e-6)
    range_augment: bool = True  # CoreNet models: RangeAugment + its PSNR loss, as every CatLIP config
    multi_scale: bool = True  # CoreNet models: the configs' variable-batch sampler (128-320 px at 224, same pixels)
    crop_scale: float = 0.08  # smallest area fraction of the random resized crop (torchvision's default)
    flip: bool = True  # random horizontal flip
    seed: int = 0  # model init, data order, augmentation
    workers: int = 2  # DataLoader worker processes per rank
    device: str = "auto"  # auto | cuda | cpu
    precision: str = "auto"  # auto (bf16 autocast on GPU, fp32 on CPU) | bf16 | fp32
    eval_every: int = 0  # steps between evaluations; 0 = at the end only
    ckpt_every: int = 500  # steps between checkpoints
    keep_ckpts: int = 2  # newest checkpoints kept in --out
    resume: str = ""  # 'auto' = the latest checkpoint in --out (fresh if none), or a checkpoint path
    overwrite: bool = False  # start over in an --out holding another run's checkpoints (moved to OUT/previous-N/)
    classnames: str = ""  # file with one class name per line, in folder order (default: folder names)
    cache_dir: str = ""  # where the synthetic world is generated (default ~/.cache/effclip)
    synthetic_train: int = 40000  # synthetic training images
    synthetic_val: int = 1000  # synthetic held-out images (the evaluation set)

@dataclass
class Config(Shared):
    data: str = ""  # tar shards of image + caption; empty = the synthetic world
    vocab: str = ""  # vocab.json of `catlip.py vocab`, a word list or label<TAB>lemmas; empty = build one in --out
    min_count: int = 0  # when building the vocabulary here: as `vocab --min-count`
    out: str = "runs/catlip"  # run directory: config.json, log.jsonl, vocab.json, checkpoints, code copies
    steps: int = 800  # optimizer steps (paper: 200k)
    batch_size: int = 128  # per process (paper: global 65,536)
    lr: float = 2e-3  # peak learning rate (paper: 1e-3 B/16, 6e-4 L/16, 4e-4 H/16)
    min_lr: float = 2e-5  # the cosine ends here (paper: peak / 100)
    weight_decay: float = 0.2  # AdamW decoupled weight decay (paper: 0.2)
    warmup: int = 100  # linear warm-up steps (paper: 10k)
    beta2: float = 0.999  # AdamW beta2 (paper: 0.999; CLIP uses 0.98)
    jitter: float = 0.2  # brightness and contrast factors in 1 +- jitter (stand-in for RangeAugment)
    noise: float = 0.03  # Gaussian noise std up to this fraction of the range (stand-in for RangeAugment)
    max_labels: int = 32  # labels kept per caption (first occurrences)
    shuffle_buffer: int = 2000  # samples in each worker's shuffle buffer
    compile: bool = False  # torch.compile the model
    fused: bool = True  # fused attention (SDPA); --no-fused runs the explicit-softmax reference
    grad_checkpointing: bool = False  # recompute blocks in backward (the paper uses it for L and H)
    log_every: int = 50  # steps between log lines (the only host syncs of the loop)
    eval: bool = True  # evaluate at the end: the head rows of the class names on --zeroshot-data
    zeroshot_data: str = ""  # ImageFolder for that evaluation; default: the synthetic held-out set
    caption_key: str = "txt"  # suffix of the caption member in the shards
    max_skip_frac: float = 0.5  # stop if more than this fraction of the samples read is unusable

@dataclass
class FinetuneConfig(Shared):
    init: str = ""  # pre-training checkpoint, or its run directory (the latest); empty = from scratch
    init_weights: str = "ema"  # ema | model: which weights of --init (the released checkpoints are the EMA)
    transfer_init: bool = False  # initialise the classifier rows from the pre-trained head (Transfer Init)
    linear_probe: bool = False  # train the head alone, backbone frozen
    data: str = ""  # ImageFolder to train on; empty = a labelled subset of the synthetic world
    val_data: str = ""  # ImageFolder for top-1; empty = --val-frac of --data (synthetic: its held-out set)
    val_frac: float = 0.1  # held-out fraction of --data when there is no --val-data
    out: str = "runs/catlip_ft"  # run directory
    epochs: int = 10  # passes over --data (paper: 10 FT, 30 LP)
    batch_size: int = 64  # per process
    lr: float = 1e-3  # peak learning rate (paper: 3e-5)
    min_lr: float = 1e-5  # the cosine ends here (paper: 3e-6 FT, 1e-6 LP)
    weight_decay: float = 0.05  # AdamW weight decay (paper: 0.05 FT, 0 LP)
    warmup: int = 20  # warm-up steps (paper: 500)
    label_smoothing: float = 0.1  # cross-entropy label smoothing (paper: 0.1)
    log_every: int = 20  # steps between log lines
    synthetic_labelled: int = 500  # labelled synthetic training images: the low-data regime of Fig. 5/7
    vocab: str = ""  # --init a CoreNet checkpoint: its synset pickle (datacomp_1_2B_vocab.pkl), for Transfer Init

# ViT-B/L/H/16 as in the paper (Table 2); `tiny` is the CPU model of the smoke runs.
MODELS = {
    "tiny": dict(image_size=64, patch=8, width=128, layers=4, heads=4),
    "vit_b16": dict(image_size=224, patch=16, width=768, layers=12, heads=12),
    "vit_l16": dict(image_size=224, patch=16, width=1024, layers=24, heads=16),
    "vit_h16": dict(image_size=224, patch=16, width=1280, layers=32, heads=20),
    # CoreNet's ViT (conv stem, stride 16, CoreNet's names): the layout of the released CatLIP checkpoints
    "tiny_corenet": dict(arch="corenet", image_size=64, patch=16, width=128, layers=2, heads=2),
    "vit_b16_corenet": dict(arch="corenet", image_size=224, patch=16, width=768, layers=12, heads=12),
    "vit_l16_corenet": dict(arch="corenet", image_size=224, patch=16, width=1024, layers=24, heads=16),
    "vit_h16_corenet": dict(arch="corenet", image_size=224, patch=16, width=1280, layers=32, heads=20),
}

# ==== 1. Captions -> noun lemmas (Eq. 1; spec 4.1 and 6) ====================================================
# A heuristic stand-in for "tokens that head their own WordNet noun synset": drop function words, pronouns, auxiliaries,
# frequent verbs and adjectives, number words and web junk (3+ letters: shorter tokens are dropped anyway). The
# vocabulary's frequency threshold removes most of what gets through.
STOP_WORDS = frozenset("""
about above across after again against all almost along already also although always among and another any anyone
anything are around away back became because become been before being below between both but can cannot could did does
doing done down during each either else enough even ever every everything few for from further get gets getting got
had has have having her here hers herself him himself his how however into its itself just least less like made make
makes making many may maybe might mine more most much must myself near need never next nor not now off often once one
only onto other others our ours ourselves out over own per perhaps please quite rather really same several shall she
should since some someone something sometimes still such than that the their theirs them themselves then there these
they this those though through thus too toward towards under until upon very was were what whatever when where whether
which while who whom whose why will with within without would yet you your yours yourself isn aren wasn weren don
doesn didn won wouldn couldn shouldn hasn haven hadn ain let lets two three four five six seven eight nine ten eleven
twelve twenty thirty forty fifty hundred thousand million billion first second third fourth fifth last half new old
good great best better big small large little long short high low full free top nice beautiful pretty cute young real
true sure different various available easy hard possible whole open close closed dark light bright happy latest main
special single double take takes taking took taken give gives giving gave given come comes coming came goes going went
gone see sees seeing saw seen look looks looking looked use uses using used find found show shows showing shown know
known think say says said tell want wants keep kept put set sets setting run runs running stand standing sit sitting
hold holding holds stock vector illustration isolated royalty http https www com org net html htm jpg jpeg png gif
webp img image_ thumb thumbnail amp nbsp quot via click view download sale buy shop online inc llc ltd
""".split())

# Irregular plurals (and -oes / -ves / -ses plurals the rules below get wrong) -> singular.
IRREGULAR = dict(pair.split(":") for pair in """
men:man women:woman children:child people:person mice:mouse geese:goose feet:foot teeth:tooth oxen:ox lice:louse
knives:knife wives:wife lives:life leaves:leaf wolves:wolf halves:half shelves:shelf calves:calf loaves:loaf
thieves:thief scarves:scarf elves:elf cacti:cactus fungi:fungus nuclei:nucleus criteria:criterion potatoes:potato
phenomena:phenomenon tomatoes:tomato heroes:hero echoes:echo volcanoes:volcano mosquitoes:mosquito buses:bus gases:gas
lenses:lens analyses:analysis crises:crisis dice:die indices:index matrices:matrix vertices:vertex""".split())
# Words that end in -s but are not plurals (or have no singular in common use).
INVARIANT = frozenset("series species news clothes jeans pants shorts scissors trousers sunglasses "
                      "mathematics physics economics politics athletics gymnastics aerobics headquarters "
                      "means christmas lens gas bias atlas canvas chaos".split())
_TAG = re.compile(r"<.*?>")
_CLITIC = re.compile(r"'(s|re|ll|ve|d|m)\b|n't\b")
_WORD = re.compile(r"[a-z]+")

def clean_caption(text: str) -> str:
    """The released caption_preprocessing minus ftfy: URL-unquote, strip <tags>, NFKD without accents, lower-case."""
    text = _TAG.sub(" ", urllib.parse.unquote_plus(text))
    text = "".join(c for c in unicodedata.normalize("NFKD", text) if not unicodedata.combining(c))
    return _CLITIC.sub(" ", text.lower().replace("\u2019", "'"))

def singularize(word: str) -> str:
    """Rule-based stand-in (a heuristic) for WordNet's noun lemma: the irregular table, then -ies -> -y,
    -sses/-ches/-shes/-xes/-zzes drop -es, else a final -s goes unless the word ends in -ss, -us or -is."""
    if word in IRREGULAR or word in INVARIANT or len(word) <= 3 or not word.endswith("s"):
        return IRREGULAR.get(word, word)
    if word.endswith("ies"):  # ponies -> pony, but ties -> tie
        return word[:-3] + "y" if len(word) > 4 else word[:-1]
    if word.endswith(("sses", "ches", "shes", "xes", "zzes")):
        return word[:-2]
    return word if word.endswith(("ss", "us", "is")) else word[:-1]

def caption_lemmas(text: str) -> list[str]:
    """Every token of a caption, singularised, in order (no filter: a given vocabulary is the filter)."""
    return [singularize(w) for w in _WORD.findall(clean_caption(text))]

def extract_nouns(text: str) -> list[str]:
    """The noun proxy of Eq. 1: distinct lemmas of length > 2 that are not stop words, in caption order."""
    words = (singularize(w) for w in _WORD.findall(clean_caption(text)) if len(w) > 2 and w not in STOP_WORDS)
    return list(dict.fromkeys(w for w in words if len(w) > 2 and w not in STOP_WORDS))

# ==== 2. The vocabulary V (Sec. 3.1, spec 4.2): one streaming pass over the captions ========================
class NounCounts(torch.utils.data.IterableDataset):
    """Counts inside each DataLoader worker, handing the main process one partial Counter per `every` captions
    (little inter-process traffic); also its stream's decode, which reads the caption, never the image."""
    def __init__(self, shards, caption_key: str, rank: int, world: int, every: int = 20000):
        self.caption_key, self.every = caption_key, every
        self.stream = C.ShardStream(shards, self, 512, rank, world, shuffle_buffer=1, epochs=1, drop_last=False)
    def __call__(self, sample: dict) -> dict:
        return {"nouns": extract_nouns(C.decode_caption(sample, self.caption_key))}
    def __iter__(self):
        counts, n, skipped, worker = collections.Counter(), 0, {}, 0
        for batch in self.stream:
            counts.update(itertools.chain.from_iterable(batch["nouns"]))
            n, skipped, worker = n + len(batch["nouns"]), batch["__skipped__"], batch["__worker__"]
            if n >= self.every:  # a plain dict: DataLoader's default_convert rebuilds a Counter with .update()
                yield {"counts": dict(counts), "n": n, "skipped": skipped, "worker": worker}
                counts, n = collections.Counter(), 0
        yield {"counts": dict(counts), "n": n, "skipped": skipped, "worker": worker}

def select_vocab(counts: collections.Counter, captions: int, min_count: int = 0, max_size: int = 0) -> dict:
    """Lemmas seen at least `min_count` times, most frequent first (ties alphabetical). min_count 0 is
    the spec's small-data rule V_tau = 100 * N / 3M (the paper's 100 on CC3M), at least 5."""
    tau = min_count or max(5, round(100 * captions / 3e6))
    keep = sorted((w for w, c in counts.items() if c >= tau), key=lambda w: (-counts[w], w))
    keep = keep[:max_size] if max_size else keep
    return {"min_count": tau, "captions": captions, "counts": {w: counts[w] for w in keep}}

def build_vocab(shards: str, caption_key: str, workers: int, rank: int, world: int, min_count: int,
                max_size: int, out: str) -> dict:
    """Count the lemmas (captions holding each) over all workers and ranks, select V and (rank 0) write it."""
    loader = C.Loader(NounCounts(C.expand_shards(shards), caption_key, rank, world), batch_size=None,
                      num_workers=workers, worker_init_fn=C.ignore_stop_signals)  # Loader: a DataError is one line
    C.kill_workers_at_exit()  # they ignore SIGTERM/SIGINT: an exit while they run must not wait for them
    counts, n, skipped = collections.Counter(), 0, {}
    bar = C.progress(None, "counting nouns", unit=" captions", total=None)
    for part in loader:
        counts.update(part["counts"])
        n, skipped[part["worker"]] = n + part["n"], part["skipped"]
        bar.update(part["n"])
    bar.close()
    skipped = list(skipped.values())  # the workers' skip counts by reason
    if world > 1 and torch.distributed.is_initialized():  # merge the ranks' counts (all_gather keeps the Counters)
        torch.distributed.all_gather_object(every := [None] * world, (counts, n, skipped))
        counts, n = sum((c for c, _, _ in every), collections.Counter()), sum(k for _, k, _ in every)
        skipped = [s for _, _, ss in every for s in ss]
    skipped = dict(sum(map(collections.Counter, skipped), collections.Counter()))
    if n == 0:
        C.fail(f"no readable captions in {shards} (skipped: {skipped})")
    vocab = select_vocab(counts, n, min_count, max_size)
    if rank == 0:
        save_vocab(out, {**vocab, "skipped": skipped})
    C.print0(f"{n} captions ({sum(skipped.values())} skipped: {skipped}), {len(counts)} distinct lemmas, "
             f"{len(vocab['counts'])} seen >= {vocab['min_count']} times -> {out}")
    return vocab

def save_vocab(path: str, vocab: dict):
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path + ".tmp", "w") as f:
        json.dump(vocab, f, indent=0)
    os.replace(path + ".tmp", path)

Vocab = collections.namedtuple("Vocab", "labels lemmas")  # labels in head-row order (lemmas, WordNet ids); lemma -> row

def load_vocab(path: str, size: int = 0) -> Vocab:
    """vocab.json of `catlip.py vocab`, a JSON list or dict of lemmas, a text file of `lemma` or `label<TAB>lemma[,...]`
    lines (several lemmas, one row), or the released synset pickle ({"n<offset>": count}, its first `size` keys the
    head rows as CoreNet's vocab_size) read by common.safe_unpickle (no pickled code runs); it has no lemmas."""
    if not os.path.isfile(path):
        C.fail(f"vocabulary file not found: {path}")
    try:
        if path.endswith(".pkl"):
            obj = C.safe_unpickle(path)
            if not isinstance(obj, dict) or not all(isinstance(k, str) for k in obj):
                raise ValueError(f"holds a {type(obj).__name__}, not a dict of synset ids")
            labels, lemmas = list(obj)[:size or None], {}
        elif path.endswith(".json"):
            with open(path) as f:
                obj = json.load(f)
            words = list(obj.get("counts", obj)) if isinstance(obj, dict) else list(obj)
            return Vocab(words, {w: i for i, w in enumerate(words)})
        else:
            labels, lemmas = [], {}
            for line in C.read_lines(path):
                label, _, rest = line.partition("\t")
                for lemma in (rest.split(",") if rest else [label]):
                    lemmas.setdefault(lemma.strip().lower().replace(" ", "_"), len(labels))
                labels.append(label.strip())
    except (ValueError, UnicodeDecodeError) as e:
        C.fail(f"cannot read vocabulary {path}: {type(e).__name__}: {e}")
    if not labels:
        C.fail(f"vocabulary {path} is empty")
    return Vocab(labels, lemmas)

def caption_labels(caption: str, vocab: Vocab, max_labels: int) -> list[int]:
    """The head rows a caption switches on: its lemmas found in V, each once, at most max_labels."""
    return list(dict.fromkeys(vocab.lemmas[w] for w in caption_lemmas(caption) if w in vocab.lemmas))[:max_labels]

def vocab_main(cfg: VocabConfig):
    """Count the noun lemmas of the captions and write the vocabulary V (vocab.json)."""
    rank, _, world, _ = C.setup_distributed("cpu" if not torch.cuda.is_available() else "auto")
    shards = resolve_shards(cfg.data, cfg.cache_dir, cfg.synthetic_train, cfg.synthetic_val, cfg.image_size)
    t0 = time.time()
    vocab = build_vocab(shards, cfg.caption_key, cfg.workers, rank, world, cfg.min_count, cfg.max_size, cfg.out)
    top = ", ".join(f"{w} {c}" for w, c in list(vocab["counts"].items())[:20])
    C.print0(f"{time.time() - t0:.0f}s; most frequent: {top}\nresults: vocabulary {cfg.out}")
    C.cleanup_distributed()

# ==== 3. Model: an image-only ViT with one linear head (Sec. 3, spec 2) =====================================
class ViTClassifier(nn.Module):
    """common.ViT without its CLIP projection, and `head`: Linear(width, |V|) on the CLS token after the final
    LayerNorm (fp32 under autocast, the paper's layer_norm_fp32); pool='mean' averages the patch tokens instead."""
    def __init__(self, n_classes: int, image_size: int, patch: int, width: int, layers: int, heads: int,
                 pool: str = "cls", grad_checkpointing: bool = False):
        super().__init__()
        self.pool = pool
        self.visual = C.ViT(image_size, patch, width, layers, heads, width, grad_checkpointing=grad_checkpointing)
        self.visual.proj, self.head = None, nn.Linear(width, n_classes)  # no joint embedding: the head reads the CLS
        init_weights(self)
    def features(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.visual.forward_tokens(x)  # (B, 1 + N, D)
        return tokens[:, 0] if self.pool == "cls" else tokens[:, 1:].mean(dim=1)  # (B, D)
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))  # (B, n_classes) logits

def init_weights(model: nn.Module):
    """Spec 2: linear layers and the CLS token trunc-normal std 0.02, convs Kaiming normal, biases 0, norms (1, 0)."""
    for m in model.modules():
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.02)
        elif isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight)
        elif isinstance(m, (C.ViT, CoreNetViT)) and m.cls_token is not None:
            nn.init.trunc_normal_(m.cls_token, std=0.02)
        if isinstance(m, (nn.Linear, nn.Conv2d)) and m.bias is not None:
            nn.init.zeros_(m.bias)
    if isinstance(model, CoreNetViT):  # positions trunc-normal, std D^-1/2 (CoreNet's LearnablePositionalEmbedding)
        nn.init.trunc_normal_(pos := model.pos_embed["pos_embed"]["pos_embed"], std=pos.shape[-1] ** -0.5)

def model_spec(name: str) -> dict:
    return MODELS[name] if name in MODELS else C.fail(f"unknown model '{name}'; choose one of {', '.join(MODELS)}")

def build_model(name: str, n_classes: int, image_size: int = 0, pool="cls", grad_checkpointing=False) -> nn.Module:
    if pool not in ("cls", "mean"):
        C.fail(f"--pool must be cls or mean, not '{pool}'")
    spec = {**(m := model_spec(name)), "image_size": image_size or m["image_size"]}
    if spec["image_size"] % spec["patch"]:
        C.fail(f"--image-size {spec['image_size']} is not a multiple of the patch size {spec['patch']}")
    if spec.pop("arch", "clip") == "corenet":
        return CoreNetViT(n_classes, spec["width"], spec["layers"], spec["heads"], pool, grad_checkpointing)
    return ViTClassifier(n_classes, **spec, pool=pool, grad_checkpointing=grad_checkpointing)

# ==== 3b. CoreNet's ViT: the backbone of the released CatLIP checkpoints (vit_base.pt, ...) ===================
# Checked against apple/corenet's modeling/: models/classification/vit.py and config/vit.py (stem, positions, CLS,
# head, eps, B/L/H sizes), modules/flash_transformer.py and layers/flash_multi_head_attention.py (every CatLIP config's
# use_flash_attention), layers/conv_layer.py, positional_embedding.py (the 1-D resize), normalization/layer_norm.py
# (layer_norm_fp32), neural_augmentor/ (RangeAugment's parameters, which the checkpoints hold).
class LayerNormFP32(nn.LayerNorm):
    """CoreNet's layer_norm_fp32 with the eps 1e-6 its ViT sets on every LayerNorm. (CoreNet's LayerNorm also
    treats a (B, N, D) input with N == D as channel-first; no CatLIP model meets that case, so it is left out.)"""
    def __init__(self, dim: int):
        super().__init__(dim, eps=1e-6)
    def forward(self, x):
        return super().forward(x.float()).to(x.dtype)

class CoreNetAttention(C.Attention):
    """FlashMultiHeadSelfAttention: common.Attention's computation and QKV layout (B, N, 3, H, Dh), other names."""
    qkv = property(lambda self: self.qkv_proj)
    proj = property(lambda self: self.out_proj_attn)
    def __init__(self, dim: int, heads: int):
        nn.Module.__init__(self)
        self.heads, self.fused = heads, True
        self.qkv_proj, self.out_proj_attn = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)

class CoreNetBlock(nn.Module):
    """FlashTransformerEncoder: pre-norm attention and GELU MLP (4x), indices as CoreNet's nn.Sequentials."""
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.pre_norm_mha = nn.Sequential(LayerNormFP32(dim), CoreNetAttention(dim, heads), nn.Dropout(0.0))
        self.pre_norm_ffn = nn.Sequential(LayerNormFP32(dim), nn.Linear(dim, 4 * dim), nn.GELU(), nn.Dropout(0.0),
                                          nn.Linear(4 * dim, dim), nn.Dropout(0.0))
    def forward(self, x, mask=None, causal: bool = False):  # common.run_blocks' signature
        x = x + self.pre_norm_mha(x)
        return x + self.pre_norm_ffn(x)

def conv_layer(cin: int, cout: int, k: int, norm_act: bool) -> nn.Sequential:
    """CoreNet's ConvLayer2d: block.conv (kernel = stride = k, padding (k-1)//2), then BatchNorm + GELU or a bias."""
    layers = [("conv", nn.Conv2d(cin, cout, k, k, padding=(k - 1) // 2, bias=not norm_act))]
    layers += [("norm", nn.BatchNorm2d(cout)), ("act", nn.GELU())] if norm_act else []
    return nn.Sequential(collections.OrderedDict(block=nn.Sequential(collections.OrderedDict(layers))))

# RangeAugment (CoreNet's DistributionNeuralAugmentor): name -> (raw low, raw high, low bounds, high bounds);
# a magnitude is drawn uniformly between sigmoid-bounded low and high (neural_aug_utils.UniformSampler, Clip).
RANGES = {"brightness": (0.5, 1.5, (0.1, 0.9), (1.1, 10.0)), "contrast": (0.5, 1.5, (0.1, 0.9), (1.1, 10.0)),
          "noise": (0.0, 0.1, (0.0, 5e-5), (1e-4, 1.0))}

class RangeAugment(nn.Module):
    """Learned brightness, contrast and noise ranges on [0, 1] images: each op, in random order, on a random half
    of the batch, then a clip to [0, 1]. The ranges learn from the task loss and `range_augment_loss`."""
    def __init__(self):
        super().__init__()
        for name, (lo, hi, _, _) in RANGES.items():
            setattr(self, name, nn.ParameterDict({"_low": nn.Parameter(torch.tensor(lo)),
                                                  "_high": nn.Parameter(torch.tensor(hi))}))
    def forward(self, x: torch.Tensor, gen: torch.Generator | None = None) -> torch.Tensor:
        B, dev = x.shape[0], x.device
        for k in torch.randperm(3, generator=gen, device=dev).tolist():
            name, p = list(RANGES)[k], getattr(self, list(RANGES)[k])
            (a, b), (c, d) = RANGES[name][2:]
            lo, hi = torch.sigmoid(p["_low"]) * (b - a) + a, torch.sigmoid(p["_high"]) * (d - c) + c
            ids = torch.randperm(B, generator=gen, device=dev)[:max(1, B // 2)]
            m, xa = lo + torch.rand(len(ids), 1, 1, 1, generator=gen, device=dev) * (hi - lo), x[ids]  # m (b,1,1,1)
            xa = (xa + torch.randn(xa.shape, generator=gen, device=dev) * m if name == "noise" else  # contrast: blend
                  xa * m + (1 - m) * xa.mean(dim=(2, 3), keepdim=True) if name == "contrast" else xa * m)  # with mean
            x = x.index_copy(0, ids, xa.to(x.dtype))
        return x.clamp(0, 1)

def range_augment_loss(x: torch.Tensor, xa: torch.Tensor, step: int, total: int, db=(40.0, 20.0), alpha=100.0):
    """RangeAugment's PSNR loss (loss_fn/neural_augmentation.py): smooth-L1 between each image's MSE (0-255 scale)
    and a target MSE that follows a cosine from 40 dB to 20 dB over the run, times alpha / 255^2."""
    start, end = (10 ** ((20 * math.log10(255) - d) / 10) for d in db)
    target = end + 0.5 * (start - end) * (1 + math.cos(math.pi * min(step, total) / (total + 1)))
    mse = (((xa.float() - x.float()) * 255) ** 2).mean(dim=(1, 2, 3))  # (B,)
    return F.smooth_l1_loss(mse, torch.full_like(mse, target)) * alpha / 65025

class CoreNetViT(nn.Module):
    """CoreNet's ViT: a 3-conv stem (stride 4, 2, 2; BatchNorm + GELU), learned positions for 14x14 patches resized
    to any grid, a CLS token without position, pre-norm blocks with no norm before them, a final fp32 LayerNorm,
    `classifier` on the CLS token (pool 'mean': no CLS token, the mean of all tokens). Input: RGB in [0, 1], no
    mean/std. forward(x, gen) in training also applies RangeAugment and returns (logits, augmented x)."""
    def __init__(self, n_classes: int, width: int, layers: int, heads: int, pool="cls", grad_checkpointing=False):
        super().__init__()
        self.grad_checkpointing, stem = grad_checkpointing, max(32, width // 4)
        self.neural_augmentor = RangeAugment()
        self.patch_emb = nn.Sequential(conv_layer(3, stem, 4, True), conv_layer(stem, stem, 2, True),
                                       conv_layer(stem, width, 2, False))
        self.transformer = nn.Sequential(*(CoreNetBlock(width, heads) for _ in range(layers)))
        self.post_transformer_norm = LayerNormFP32(width)
        self.classifier = nn.Linear(width, n_classes)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, width)) if pool == "cls" else None
        table = nn.Parameter(torch.zeros(1, 1, (224 // 16) ** 2, width))  # (1, 1, 196, D) whatever the image size
        self.pos_embed = nn.ModuleDict({"pos_embed": nn.ParameterDict({"pos_embed": table})})
        init_weights(self)
    head = property(lambda self: self.classifier)
    def features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_emb(x).flatten(2).transpose(1, 2)  # (B, N, D)
        pos = self.pos_embed["pos_embed"]["pos_embed"]  # (1, 1, 196, D)
        if x.shape[1] != pos.shape[2]:  # resized as a 1-D sequence (bilinear over (N, D)), not as a 2-D grid
            pos = F.interpolate(pos, size=(x.shape[1], pos.shape[3]), mode="bilinear")
        x = x + pos.reshape(1, x.shape[1], -1).to(x.dtype)
        if self.cls_token is not None:  # the class token gets no position (DeiT III)
            x = torch.cat([self.cls_token.to(x.dtype).expand(x.shape[0], -1, -1), x], dim=1)  # (B, 1 + N, D)
        x = self.post_transformer_norm(C.run_blocks(self.transformer, x, self.grad_checkpointing and self.training))
        return x[:, 0] if self.cls_token is not None else x.mean(dim=1)  # (B, D)
    def forward(self, x: torch.Tensor, gen: torch.Generator | None = None):
        if gen is None or not self.training:
            return self.classifier(self.features(x))  # (B, n_classes)
        xa = self.neural_augmentor(x, gen)
        return self.classifier(self.features(xa)), xa

def model_input(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Images in [0, 255] -> what the model reads: [0, 1] for CoreNet's ViT, CLIP mean/std for the other."""
    return x.float() / 255 if isinstance(model, CoreNetViT) else C.normalize_images(x)

def load_backbone(model: nn.Module, sd: dict, what: str):
    """Strict load of all but the head, which keeps its own weights (CoreNet's resume_exclude_scopes)."""
    head = "classifier." if isinstance(model, CoreNetViT) else "head."
    own = {k: v for k, v in model.state_dict().items() if k.startswith(head)}
    C.load_state_dict_checked(model, {**{k: v for k, v in sd.items() if not k.startswith(head)}, **own}, what)

def load_corenet(path: str) -> CoreNetViT:
    """A CoreNet ViT checkpoint (pre-trained or fine-tuned, any head) by path, loaded strictly."""
    init = load_pretrained(path)
    if init.get("kind_of_file") != "corenet":
        C.fail(f"{path} is not a CoreNet ViT state dict (no classifier.weight)")
    model = build_model(init["model_name"], init["model"]["classifier.weight"].shape[0], pool=init["pool"])
    C.load_state_dict_checked(model, init["model"], path)
    return model.eval()

# ==== 4. The loss: binary cross-entropy over V, summed over classes, averaged over the batch (Sec. 3.1) =====
def multilabel_bce(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """L = (1/B) sum_b sum_c BCEWithLogits(z_bc, y_bc) without the (B, |V|) target. logits (B, C); labels (B, K)
    distinct rows padded with -1 (all padding: an all-negative target, kept). BCEWithLogits(z, y) = softplus(z) - y z
    exactly, so L = (sum of softplus over all logits - sum of the logits at the positives) / B. Summed over classes
    as the paper's `batch_mean` (a mean over 24k classes would shrink the gradient 24k-fold); under DDP the average
    of the ranks' gradients is exactly the global-batch loss's, with no communication of logits."""
    z = logits.float()  # reductions in fp32 under bf16 autocast
    pos = z.gather(1, labels.clamp(min=0)) * (labels >= 0)  # (B, K): z at the positives, 0 at padding
    return (F.softplus(z).sum() - pos.sum()) / z.shape[0]

def multi_hot(labels: torch.Tensor, n_classes: int) -> torch.Tensor:
    """(B, K) padded ids -> (B, C) float 0/1; padding goes to an extra column that is cut off."""
    y = torch.zeros(labels.shape[0], n_classes + 1, device=labels.device)  # (B, C + 1)
    return y.scatter_(1, labels.masked_fill(labels < 0, n_classes), 1.0)[:, :n_classes]

def multilabel_bce_reference(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """The textbook formula on the dense multi-hot target, the oracle for `multilabel_bce`:
    -(1/B) sum_bc [y log sigmoid(z) + (1 - y) log(1 - sigmoid(z))]."""
    p = torch.sigmoid(logits)
    return -(targets * torch.log(p) + (1 - targets) * torch.log(1 - p)).sum() / logits.shape[0]

# ==== 5. Data and augmentation (spec 3.2) ===================================================================
def crop_flip(img, size: int, rng: random.Random, scale: float, flip: bool) -> torch.Tensor:
    """Random resized crop (area `scale`..1, bilinear) to a uint8 (3, size, size), then a horizontal flip at p 0.5."""
    x = C.image_to_uint8(img, size, C.random_resized_crop_box(*C.image_wh(img), rng, (scale, 1.0)), Image.BILINEAR)
    return x.flip(-1) if flip and rng.random() < 0.5 else x

class CatLIPDecode:
    """Training sample -> {"image": uint8 (3, S, S), "labels": (K,) head rows padded with -1, from the caption on the
    fly}: crop_flip seeded by (seed, epoch, key)."""
    def __init__(self, vocab: Vocab, size: int, max_labels: int, seed=0, scale=0.08, flip=True, caption_key="txt"):
        self.vocab, self.size, self.max_labels, self.seed = vocab, size, max_labels, seed
        self.scale, self.flip, self.caption_key = scale, flip, caption_key
    def __call__(self, sample: dict) -> dict:
        rows = caption_labels(C.decode_caption(sample, self.caption_key), self.vocab, self.max_labels)
        x = crop_flip(C.decode_image_tensor(sample), self.size, C.sample_rng(self.seed, sample), self.scale, self.flip)
        labels = torch.full((self.max_labels,), -1, dtype=torch.long)
        labels[:len(rows)] = torch.tensor(rows, dtype=torch.long)
        return {"image": x, "labels": labels}

def jitter(x: torch.Tensor, strength: float, noise: float, gen: torch.Generator) -> torch.Tensor:
    """The plain ViT's stand-in for RangeAugment (spec 3.1): per image of a float (B, 3, H, W) in [0, 255], contrast
    and brightness factors in 1 +- strength and Gaussian noise of std up to noise * 255, fixed, not learned."""
    u = torch.rand(x.shape[0], 3, 1, 1, 1, device=x.device, generator=gen).unbind(1)  # three (B, 1, 1, 1) draws
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    x = (x - mean) * (1 + strength * (2 * u[0] - 1)) + mean  # contrast around the image mean
    x = x * (1 + strength * (2 * u[1] - 1))  # brightness
    x = x + torch.randn(x.shape, device=x.device, generator=gen) * (noise * 255 * u[2])
    return x.clamp(0, 255)

def image_batch_pairs(size: int, batch: int, div: int = 32, n: int = 25, lo: float = 0, hi: float = 0) -> list:
    """CoreNet's variable-batch pairs (data/sampler/utils.py, square crops): n sizes linspace(lo, hi) and the base size
    made divisible by `div` (check_scale), each with the batch that keeps size^2 * batch pixels: sorted (size, batch).
    lo, hi: the configs' 128 and 320 at 224, in proportion at other base sizes."""
    lo, hi = lo or size * 4 / 7, hi or size * 10 / 7
    def divisible(v):  # the nearest multiple of div, >= div, never more than 10% below v
        r = max(div, int(v + div / 2) // div * div)
        return r + div if r < 0.9 * v else r
    sizes = {divisible(v) for v in [*np.linspace(lo, hi, n), size]}
    return sorted({(s, max(1, int(round(size * size * batch / (s * s), 2)))) for s in sizes})

def draw_scale(pairs: list, seed: int, step: int) -> tuple[int, int]:
    """A step's (size, batch), uniform as CoreNet's; seeded by (seed, step): every rank, worker and resume agree."""
    return random.Random(seed * 1_000_003 + step).choice(pairs)

class VariableBatches(torch.utils.data.Sampler):
    """CoreNet's variable_batch_sampler (fine-tuning) for keys (epoch, index, size): step s takes draw_scale's batch
    * world next items of per-epoch permutations, rank r every world-th, until `samples` items are used (`total`)."""
    def __init__(self, n: int, pairs: list, samples: int, start: int, seed: int, rank: int, world: int):
        self.n, self.start, self.seed, self.rank, self.world, self.draws, used = n, start, seed, rank, world, [], 0
        while used < samples:  # (size, global batch, items before this step)
            size, b = draw_scale(pairs, seed, len(self.draws))
            self.draws.append((size, b * world, used))
            used += b * world
        self.total = len(self.draws)  # steps, as StepBatches.total
    def __len__(self):
        return self.total - self.start
    def __iter__(self):
        epoch, perm = -1, None
        for size, count, first in self.draws[self.start:]:
            keys = []
            for j in range(first, first + count):
                if j // self.n != epoch:  # a new epoch: its permutation, seeded by (seed, epoch)
                    epoch = j // self.n
                    perm = torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed * 100_003 + epoch))
                keys.append((epoch, int(perm[j % self.n]), size))
            yield keys[self.rank::self.world]

class MultiScaleStream(C.ShardStream):
    """The variable-batch sampler on a shard stream (pre-training): step s gets draw_scale's count of samples at its
    size. The DataLoader takes batches from its workers in turn, so worker w of nw fills steps start + w, start + w
    + nw, ...; the stream ends a batch at `batch_size`, which follows the step."""
    def __init__(self, pairs: list, *args, **kw):
        super().__init__(*args, **kw)
        self.pairs, self.step, self.left = pairs, None, 0
        self.inner, self.decode = self.decode, self.scaled
    def scaled(self, sample: dict) -> dict:
        if self.left == 0:  # the first sample of this worker's next batch: its step, size and count
            info = torch.utils.data.get_worker_info()
            w, nw = (info.id, info.num_workers) if info else (0, 1)
            self.step = self.start_batch + w if self.step is None else self.step + nw
            self.inner.size, self.batch_size = draw_scale(self.pairs, self.seed, self.step)
            self.left = self.batch_size
        out = self.inner(sample)  # raises on a bad sample: skipped by the stream, not counted here
        self.left -= 1
        return out

def resolve_shards(data: str, cache_dir: str, n_train: int, n_val: int, size: int) -> str:
    """--data, checked (a missing path is one line), or the synthetic world's training shards."""
    try:
        return (C.expand_shards(data) and data) if data else synthetic(cache_dir, n_train, n_val, size)["train"]
    except FileNotFoundError as e:
        C.fail(str(e))

def synthetic(cache_dir: str, n_train: int, n_val: int, size: int) -> dict:
    return C.synthetic_world(cache_dir or os.path.expanduser("~/.cache/effclip"), n_train, n_val, size, seed=0)

# ==== 6. Optimiser and EMA (spec 3.2) =======================================================================
def make_optimizer(model: nn.Module, lr: float, weight_decay: float, beta2: float, decay_all: bool = False):
    """AdamW (0.9, beta2, eps 1e-8); as the configs' no_decay_bn_filter_bias (CoreNet's parameter_list), 1-D
    parameters (biases, norms) are not decayed, the rest are (CLS token, positions). decay_all: every parameter."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if decay_all or p.ndim != 1], "weight_decay": weight_decay},
              {"params": [p for p in params if not decay_all and p.ndim == 1], "weight_decay": 0.0}]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr, (0.9, beta2), 1e-8, fused=params[0].is_cuda)

def lr_at(step: int, lr: float, warmup: int, total: int, min_lr: float, warmup_init: float) -> float:
    """CoreNet's iteration-based cosine (optims/scheduler/cosine.py): linear from `warmup_init` (the configs'
    warmup_init_lr) to lr over `warmup` steps, then min_lr + (lr - min_lr)(1 + cos(pi t / (total - warmup + 1)))/2."""
    if step < warmup:
        return warmup_init + step * (lr - warmup_init) / warmup
    return min_lr + 0.5 * (lr - min_lr) * (1 + math.cos(math.pi * (step - warmup) / (total - warmup + 1)))

class EMA:
    """ema <- ema + m (w - ema) over the whole state dict as CoreNet's EMA (weights and BatchNorm statistics; integer
    buffers copied), m = 0.0005 without warm-up. warmup=True, a heuristic from timm's ModelEmaV3 for short CPU runs:
    m_t = max(m, (1 + t)^-0.75)."""
    def __init__(self, model: nn.Module, momentum: float, warmup: bool = False):
        self.module = copy.deepcopy(model).eval().requires_grad_(False)
        self.momentum, self.warmup = momentum, warmup
    @torch.no_grad()
    def update(self, model: nn.Module, step: int):
        m = max(self.momentum, (1 + step) ** -0.75) if self.warmup else self.momentum
        pairs = list(zip(self.module.state_dict().values(), model.state_dict().values()))
        torch._foreach_lerp_([e for e, w in pairs if e.is_floating_point()],
                             [w for e, w in pairs if e.is_floating_point()], m)
        for e, w in pairs:
            if not e.is_floating_point():
                e.copy_(w)

# ==== 7. Transfer Init (Sec. 4.2, App. B) ===================================================================
def match_classes(classnames: list[str], vocab: Vocab) -> list[list[int]]:
    """Per class name, the head rows whose mean starts its classifier row ([] = none): a WordNet id that is a label
    of V; else the whole name as one lemma (hot_dog); else each word of it that is a lemma (exact lemmas only)."""
    label_row, out = {l: i for i, l in enumerate(vocab.labels)}, []
    for name in classnames:
        key = name.strip().lower()
        wnid = f"n{int(key[1:])}" if re.fullmatch(r"n\d+", key) else None  # wnids are zero-padded offsets
        whole = label_row[wnid] if wnid in label_row else vocab.lemmas.get(singularize(key.replace(" ", "_")))
        out.append([whole] if whole is not None else  # else its words' rows, each once, in order
                   list(dict.fromkeys(vocab.lemmas[w] for w in caption_lemmas(key) if w in vocab.lemmas)))
    return out

@torch.no_grad()
def transfer_init(head: nn.Linear, weight: torch.Tensor, bias: torch.Tensor, matches: list[list[int]]) -> int:
    """Copy (or average) the pre-trained head rows into the new head, weight and bias; classes with no
    match keep their random initialisation. Returns how many classes matched."""
    for k, rows in enumerate(matches):
        if rows:
            head.weight[k] = weight[rows].mean(dim=0).to(head.weight)
            head.bias[k] = bias[rows].mean().to(head.bias)
    return sum(bool(r) for r in matches)

# ==== 8. Evaluation on an ImageFolder =======================================================================
@torch.no_grad()
def folder_logits(model: ViTClassifier, items, size: int, device, batch_size: int = 256):
    """(N, classes) logits and (N,) labels of an ImageFolder, resize + centre crop."""
    model.eval()
    out, ys = [], []
    for i in C.progress(range(0, len(items), batch_size), "eval"):
        chunk = items[i:i + batch_size]
        x = model_input(model, C.eval_images([p for p, _ in chunk], size, Image.BILINEAR).to(device))
        out.append(model(x).float())
        ys += [y for _, y in chunk]
    model.train()
    return torch.cat(out), torch.tensor(ys, device=device)

def head_zeroshot(model: ViTClassifier, vocab: Vocab, items, classnames, size: int, device) -> dict:
    """Pre-training's own check: an ImageFolder classified by the head rows Transfer Init would copy for its names."""
    matches = match_classes(classnames, vocab)
    logits, y = folder_logits(model, items, size, device)
    scores = torch.stack([logits[:, r].mean(dim=1) if r else torch.full_like(logits[:, 0], -float("inf"))
                          for r in matches], dim=1)  # (N, classes)
    return {"head_top1": 100 * (scores.argmax(1) == y).float().mean().item(),
            "classes_matched": sum(bool(r) for r in matches)}

# ==== 9. Pre-training =======================================================================================
def make_vocab(cfg: Config, shards: str, rank: int, world: int) -> Vocab:
    """Without --vocab: the vocab.json of an earlier run in --out, or one counted now (rank 0 writes it)."""
    saved = os.path.join(cfg.out, "vocab.json")
    if not os.path.exists(saved):
        build_vocab(shards, cfg.caption_key, cfg.workers, rank, world, cfg.min_count, 0, saved)
    C.barrier()
    return load_vocab(saved)

def restore(ckpt: dict, model, ema, opt, what: str, steps: int) -> int:
    """Load weights, EMA, optimizer and RNG of a checkpoint; returns its step (one line if past `steps`)."""
    if ckpt["step"] > steps:
        C.fail(f"checkpoint {what} is at step {ckpt['step']}, past this run's {steps} steps")
    C.load_state_dict_checked(model, ckpt["model"], f"checkpoint {what}")
    ema.module.load_state_dict(ckpt["ema"])
    opt.load_state_dict(ckpt["optimizer"])
    C.set_rng_state(ckpt["rng"])
    return ckpt["step"]

def save(cfg, step: int, kind: str, model, ema, opt, **extra):
    """Write OUT/ckpt-{step}.pt, a plain dict (loads with weights_only=True): weights, EMA, optimizer, step, RNG,
    config and `extra`, what a resume or a fine-tune needs; keep the newest --keep-ckpts."""
    state = {"kind": kind, "model": model.state_dict(), "ema": ema.module.state_dict(), "optimizer": opt.state_dict(),
             "step": step, "rng": C.rng_state(), "config": dataclasses.asdict(cfg), **extra}
    C.save_checkpoint(path := os.path.join(cfg.out, f"ckpt-{step}.pt"), state)
    C.prune_checkpoints(cfg.out, cfg.keep_ckpts, written=path)

def pretrain(cfg: Config):
    """Pre-train an image-only ViT with the multi-label BCE on the nouns of the captions (the default command)."""
    rank, local_rank, world, device = C.setup_distributed(cfg.device)
    size = cfg.image_size or model_spec(cfg.model)["image_size"]
    if not (0 <= cfg.jitter < 1 and 0 <= cfg.noise <= 1):
        C.fail(f"--jitter {cfg.jitter} must be in [0, 1) and --noise {cfg.noise} in [0, 1]")
    ckpt = C.load_checkpoint(cfg.resume, cfg.out)  # before any work: an unreadable file is one line
    given = load_vocab(cfg.vocab) if cfg.vocab else None
    if ckpt is not None and (ckpt.get("kind") != "catlip" or ckpt.get("model_name") != cfg.model):
        C.fail(f"checkpoint {cfg.resume} is of model '{ckpt.get('model_name')}' ({ckpt.get('kind')}), "
               f"not a CatLIP --model {cfg.model}")
    torch.manual_seed(cfg.seed)  # same init on every rank (DDP also broadcasts it)
    stale = cfg.overwrite and not cfg.resume and C.checkpoints(cfg.out)  # claim_out moves them to previous-N
    C.document_run(cfg.out, cfg, [__file__, C.__file__])
    if stale and rank == 0 and os.path.exists(v := os.path.join(cfg.out, "vocab.json")):  # and their vocabulary
        n = sum(d.startswith("previous-") for d in os.listdir(cfg.out))  # the newest previous-N is claim_out's
        os.replace(v, os.path.join(cfg.out, f"previous-{n}", "vocab.json"))
    shards = resolve_shards(cfg.data, cfg.cache_dir, cfg.synthetic_train, cfg.synthetic_val, size)
    zs_dir = cfg.zeroshot_data or ("" if cfg.data else synthetic(cfg.cache_dir, cfg.synthetic_train,
                                                                   cfg.synthetic_val, size)["val_folder"])
    vocab = given or make_vocab(cfg, shards, rank, world)
    if not vocab.lemmas:
        C.fail(f"--vocab {cfg.vocab} has no lemmas, so no caption has labels: give a label<TAB>lemmas table")
    model = build_model(cfg.model, len(vocab.labels), size, cfg.pool, cfg.grad_checkpointing)
    model = C.set_fused(model, cfg.fused).to(device)
    corenet = isinstance(model, CoreNetViT)  # else the fixed jitter stands in for RangeAugment, at one size
    C.print0(f"model {cfg.model} at {size}px: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters "
             f"({model.head.weight.numel() / 1e6:.2f}M in the {len(vocab.labels)}-way head)")
    opt = make_optimizer(model, cfg.lr, cfg.weight_decay, cfg.beta2, cfg.decay_all)
    ema, log = EMA(model, cfg.ema_momentum, cfg.ema_warmup), C.RunLog(cfg.out)
    # ---- resume -------------------------------------------------------------------------------------
    start, data_pos = 0, {}
    if ckpt is not None:
        if ckpt["labels"] != vocab.labels:
            C.fail(f"checkpoint {cfg.resume} was trained on another vocabulary ({len(ckpt['labels'])} labels)")
        start = restore(ckpt, model, ema, opt, cfg.resume, cfg.steps)
        if len(ckpt["data"]) == world and len(ckpt["data"].get(rank, {})) == max(1, cfg.workers):
            data_pos = ckpt["data"][rank]
        else:
            C.print0("warning: world size or --workers changed; the data stream restarts at its beginning")
        C.print0(f"resumed from step {start} of {cfg.resume}")
    # ---- data: one (size, batch) a step, the configs' variable batches (check_scale 16) or one pair ----
    decode = CatLIPDecode(vocab, size, cfg.max_labels, cfg.seed, cfg.crop_scale, cfg.flip, cfg.caption_key)
    multi = cfg.multi_scale and corenet
    pairs = image_batch_pairs(size, cfg.batch_size, div=16) if multi else [(size, cfg.batch_size)]
    C.print0(f"variable batches (size, batch): {pairs}" if multi else f"batches of {cfg.batch_size} at {size}px")
    stream = MultiScaleStream(pairs, C.expand_shards(shards), decode, cfg.batch_size, rank, world, cfg.seed,
                              cfg.shuffle_buffer, data_pos, start)
    batches = iter(C.make_loader(stream, cfg.workers, device.type == "cuda"))
    position = C.DataPosition()
    position.pos = {int(w): p for w, p in data_pos.items()}
    zs = C.image_folder(zs_dir, C.read_lines(cfg.classnames) if cfg.classnames else None) if zs_dir else None
    # ---- wrap: DDP, compile, precision ----------------------------------------------------------------
    train_model = DDP(model, device_ids=[local_rank] if device.type == "cuda" else None) if world > 1 else model
    train_model = torch.compile(train_model) if cfg.compile else train_model
    bf16 = cfg.precision == "bf16" or (cfg.precision == "auto" and device.type == "cuda")
    gen, stop = torch.Generator(device), C.StopSignal()  # gen: augmentation draws, re-seeded by step for a resume
    range_aug = cfg.range_augment and corenet
    nonfinite = torch.zeros((), dtype=torch.bool, device=device)
    n_pos = torch.zeros((), device=device)  # positive labels since the last log line
    t0, t_data, seen, stopping = time.time(), 0.0, 0, False
    for step in C.progress(range(start, cfg.steps + 1), "train", initial=start, total=cfg.steps + 1):
        last_step = step == cfg.steps
        stopping = stop.requested if world == 1 else (step % cfg.log_every == 0 and stop.agreed(device))
        # ---- evaluate: the head rows of the class names, raw and EMA weights ------------------------
        if zs and cfg.eval and (last_step or (cfg.eval_every and step % cfg.eval_every == 0 and step > start)):
            if rank == 0:
                raw, avg = (head_zeroshot(m, vocab, *zs, size, device) for m in (model, ema.module))
                log.log(step, head_top1=raw["head_top1"], ema_head_top1=avg["head_top1"],
                        classes_matched=raw["classes_matched"])
            C.barrier()
        # ---- checkpoint (never one with a non-finite loss behind it) ------------------------------
        if (last_step or stopping or step % cfg.ckpt_every == 0) and step > start:
            if nonfinite.item():
                C.fail(f"non-finite loss before step {step}; the last good checkpoint in {cfg.out} is kept")
            save(cfg, step, "catlip", model, ema, opt, data=position.state(), model_name=cfg.model, image_size=size,
                 pool=cfg.pool, labels=list(vocab.labels), lemmas=dict(vocab.lemmas))  # state(): on every rank
        if last_step or stopping:
            break
        # ---- forward, backward, step ----------------------------------------------------------------
        td = time.time()
        batch = next(batches)
        t_data += time.time() - td
        position.update(batch)
        labels = batch["labels"].to(device, non_blocking=True)  # (B, K) head rows, -1 padded
        x = batch["image"].to(device, non_blocking=True).float()  # (B, 3, S, S) in [0, 255], S and B by step
        gen.manual_seed(cfg.seed * 1_000_003 + step)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            if range_aug:  # inside the model's forward (CoreNet's neural_augmentor), so that DDP syncs its ranges
                logits, xa = train_model(x / 255, gen)  # (B, |V|), (B, 3, S, S)
            else:  # (B, |V|)
                logits = train_model(C.normalize_images(jitter(x, cfg.jitter, cfg.noise, gen)))
        loss = multilabel_bce(logits, labels)  # + RangeAugment's loss: the configs' composite_loss, weights 1 and 1
        loss = loss + range_augment_loss(x / 255, xa, step, cfg.steps) if range_aug else loss
        gnorm = optimize(loss, model, opt, ema, step, cfg, cfg.steps)
        nonfinite |= ~torch.isfinite(loss.detach())
        n_pos += (labels >= 0).sum()
        seen += len(labels)
        # ---- log (the only host sync) ---------------------------------------------------------------
        if (step + 1) % cfg.log_every == 0:
            if nonfinite.item():
                C.fail(f"non-finite loss at step {step}; the last good checkpoint in {cfg.out} is kept")
            dt, skipped = time.time() - t0, sum(position.skip_totals().values())
            if skipped and skipped / (seen + skipped) > cfg.max_skip_frac:
                C.fail(f"{skipped} of {seen + skipped} samples unusable ({position.skip_totals()}); check --data")
            log.log(step + 1, loss=loss.item(), lr=opt.param_groups[0]["lr"], grad_norm=gnorm.item(),
                    labels_per_image=n_pos.item() / seen, samples_per_s=seen * world / dt,
                    data_frac=t_data / dt, skipped=skipped)
            t0, t_data, seen = time.time(), 0.0, 0
            n_pos.zero_()
    finish(cfg.out, stopping and not last_step, step)

def optimize(loss, model: nn.Module, opt, ema: EMA, step: int, cfg, steps: int) -> torch.Tensor:
    """backward, clip the trained parameters' gradient norm (returned), the step's lr, step, zero_grad, EMA."""
    loss.backward()
    trained = [p for group in opt.param_groups for p in group["params"]]
    gnorm = torch.nn.utils.clip_grad_norm_(trained, cfg.grad_clip or math.inf)
    C.set_lr(opt, lr_at(step, cfg.lr, cfg.warmup, steps, cfg.min_lr, cfg.warmup_init_lr))
    opt.step()
    opt.zero_grad(set_to_none=True)
    ema.update(model, step)
    return gnorm

def finish(out: str, stopped: bool, step: int):
    """The run's last lines: where it stopped (a signal) and where its results are."""
    if stopped:
        C.print0(f"stopped by a signal at step {step}: --resume auto continues from {C.latest_checkpoint(out)}")
    C.finish_run(out, C.latest_checkpoint(out))
    C.cleanup_distributed()

# ==== 10. Fine-tuning and linear probing on an ImageFolder (Table 7, Sec. 4.2) ==============================
class FolderImages(torch.utils.data.Dataset):
    """ImageFolder read by key (epoch, index[, size]): crop_flip seeded by (seed, epoch, index), the same whatever the
    workers or a resume; an unreadable image is label -1, which the loss ignores."""
    def __init__(self, items, size: int, seed: int, scale: float, flip: bool):
        self.items, self.size, self.seed, self.scale, self.flip = items, size, seed, scale, flip
    def __getitem__(self, key):
        epoch, i, size = (*key, self.size)[:3]
        path, label = self.items[i]
        try:
            img = C.bytes_to_tensor(open(path, "rb").read())
        except Exception:
            return torch.zeros(3, size, size, dtype=torch.uint8), -1
        rng = C.sample_rng(self.seed, {"__epoch__": epoch, "__key__": i})  # seeded as the shard samples
        return crop_flip(img, size, rng, self.scale, self.flip), label

def labelled_synthetic_folder(world: dict, n: int) -> str:
    """The first n training images of the synthetic world as an ImageFolder by class (rank 0 writes it once): the
    labelled downstream set of the low-data regime, whose captions pre-training saw but not its labels."""
    root = os.path.join(world["root"], f"labelled-{n}")
    if C.get_rank() == 0 and not os.path.exists(os.path.join(root, "DONE")):
        for name in world["classnames"]:
            os.makedirs(os.path.join(root, name), exist_ok=True)
        for s in itertools.islice((s for p in C.expand_shards(world["train"]) for s in C.iter_tar_samples(p, {})), n):
            open(os.path.join(root, json.loads(s["json"])["classname"], os.path.basename(s["__key__"]) + ".jpg"),
                 "wb").write(s["jpg"])
        open(os.path.join(root, "DONE"), "w").write(str(n))
    C.barrier()
    return root

def finetune_data(cfg: FinetuneConfig, size: int):
    """(train items, val items, class names) from --data/--val-data, or the synthetic world."""
    names = C.read_lines(cfg.classnames) if cfg.classnames else None
    if not cfg.data:
        world = synthetic(cfg.cache_dir, cfg.synthetic_train, cfg.synthetic_val, size)
        train, classnames = C.image_folder(labelled_synthetic_folder(world, cfg.synthetic_labelled), names)
        return train, C.image_folder(world["val_folder"], names)[0], classnames
    train, classnames = C.image_folder(cfg.data, names)
    if cfg.val_data:
        val, val_names = C.image_folder(cfg.val_data, names)
        if len(val_names) != len(classnames):
            C.fail(f"--val-data has {len(val_names)} class folders, --data {len(classnames)}")
        return train, val, classnames
    order = list(range(len(train)))
    random.Random(cfg.seed).shuffle(order)  # held out: the first val_frac of a seeded shuffle, folder order kept
    held = set(order[:int(round(cfg.val_frac * len(train)))])
    return [t for i, t in enumerate(train) if i not in held], [t for i, t in enumerate(train) if i in held], classnames

def load_pretrained(path: str, vocab: str = "") -> dict:
    """A CatLIP pre-training checkpoint: a run's (a file, or its run directory: the newest that reads), or a
    CoreNet ViT state dict (the released vit_base.pt, ...), whose head rows are the first keys of `vocab`."""
    if not os.path.exists(path):  # before load_checkpoint, which reads "auto" as "look in the directory"
        C.fail(f"checkpoint not found: {path}")
    ckpt = C.load_checkpoint("auto", path) if os.path.isdir(path) else C.load_checkpoint(path, "")
    if ckpt is None:
        C.fail(f"no ckpt-*.pt in {path}")
    if "classifier.weight" in ckpt and "kind" not in ckpt:  # CoreNet's layout: a bare state dict (EMA weights)
        rows, width = ckpt["classifier.weight"].shape  # the model: CoreNet's ViT of this width and depth
        shape = (width, len({k.split(".")[1] for k in ckpt if k.startswith("transformer.")}))
        names = [k for k, v in MODELS.items() if v.get("arch") == "corenet" and (v["width"], v["layers"]) == shape]
        if not names:
            C.fail(f"{path}: a CoreNet ViT of width {width} and {shape[1]} layers is none of {', '.join(MODELS)}")
        labels = load_vocab(vocab, rows).labels if vocab else []
        if vocab and len(labels) != rows:
            C.fail(f"--vocab {vocab} has {len(labels)} labels, the head of {path} {rows} rows")
        return {"kind": "catlip", "kind_of_file": "corenet", "model_name": names[0], "image_size": 224, "lemmas": {},
                "labels": labels, "pool": "cls" if "cls_token" in ckpt else "mean", "ema": ckpt, "model": ckpt}
    if ckpt.get("kind") != "catlip":
        C.fail(f"--init {path} is not a CatLIP pre-training checkpoint (kind {ckpt.get('kind')!r})")
    return ckpt

def finetune(cfg: FinetuneConfig):
    """Fine-tune or linear-probe a classifier on an ImageFolder, from scratch or from CatLIP (Transfer Init)."""
    rank, local_rank, world, device = C.setup_distributed(cfg.device)
    if cfg.init_weights not in ("ema", "model"):
        C.fail(f"--init-weights must be ema or model, not '{cfg.init_weights}'")
    if cfg.transfer_init and not cfg.init:
        C.fail("--transfer-init needs --init, a CatLIP pre-training checkpoint")
    init = load_pretrained(cfg.init, cfg.vocab) if cfg.init else None
    if cfg.transfer_init and not init["labels"]:
        C.fail(f"--transfer-init from the CoreNet checkpoint {cfg.init} needs --vocab, its synset pickle")
    ckpt = C.load_checkpoint(cfg.resume, cfg.out)  # before any work: an unreadable file is one line
    name = init["model_name"] if init else cfg.model
    spec = model_spec(name)  # an unknown model is one line, before any work
    size = cfg.image_size or (init["image_size"] if init else spec["image_size"])
    torch.manual_seed(cfg.seed)
    C.document_run(cfg.out, cfg, [__file__, C.__file__])
    train_items, val_items, classnames = finetune_data(cfg, size)
    model = build_model(name, len(classnames), size, init["pool"] if init else cfg.pool).to(device)
    if init:  # the backbone from the pre-training; the head is new (random, or Transfer Init)
        sd, note = init[cfg.init_weights], f"backbone from {cfg.init} ({cfg.init_weights} weights), random head"
        load_backbone(model, sd, f"--init {cfg.init}")
        if cfg.transfer_init:
            matches = match_classes(classnames, Vocab(init["labels"], init["lemmas"]))
            head = "classifier." if "classifier.weight" in sd else "head."
            hit = transfer_init(model.head, sd[head + "weight"], sd[head + "bias"], matches)
            note = note.replace("random head", f"Transfer Init of {hit}/{len(classnames)} classes: ") + ", ".join(
                f"{c}<-{'+'.join(init['labels'][i] for i in r) or 'random'}" for c, r in zip(classnames[:12], matches))
    C.print0(note if init else "from scratch")
    if cfg.linear_probe:
        model.requires_grad_(False).head.requires_grad_(True)
    opt = make_optimizer(model, cfg.lr, cfg.weight_decay, 0.999, cfg.decay_all)
    ema, log = EMA(model, cfg.ema_momentum, cfg.ema_warmup), C.RunLog(cfg.out)
    # ---- data: C.StepBatches, or the configs' variable batches (check_scale 32); the step is the position ----
    gb, corenet, n = cfg.batch_size * world, isinstance(model, CoreNetViT), len(train_items)
    multi = cfg.multi_scale and corenet  # the plain ViT's positions do not resize: one size
    sampler = (VariableBatches(n, image_batch_pairs(size, cfg.batch_size), cfg.epochs * n, 0, cfg.seed, rank, world)
               if multi else C.StepBatches(n, gb, 0, cfg.epochs * max(1, n // gb), cfg.seed, rank, world))
    steps = sampler.total
    C.print0(f"{n} training images, {len(val_items)} held out, {len(classnames)} classes, {steps} steps of "
             f"{min(gb, n)}" + (f" at {size}px, or as many pixels" * multi))
    start = 0
    if ckpt is not None:
        if ckpt.get("kind") != "catlip_finetune" or ckpt.get("classnames") != classnames:
            C.fail(f"checkpoint {cfg.resume} is not a fine-tune on these {len(classnames)} classes")
        start = restore(ckpt, model, ema, opt, cfg.resume, steps)
        C.print0(f"resumed from step {start} of {cfg.resume}")
    data, sampler.start = FolderImages(train_items, size, cfg.seed, cfg.crop_scale, cfg.flip), start
    batches = iter(torch.utils.data.DataLoader(data, batch_sampler=sampler, num_workers=cfg.workers,  # workers
                   pin_memory=device.type == "cuda", worker_init_fn=C.ignore_stop_signals))  # ignore SIGTERM
    # ---- the trained part: the whole model, or the head alone on frozen features -------------------
    trained = model.head if cfg.linear_probe else model
    ddp = DDP(trained, device_ids=[local_rank] if device.type == "cuda" else None) if world > 1 else trained
    bf16 = cfg.precision == "bf16" or (cfg.precision == "auto" and device.type == "cuda")
    gen, stop = torch.Generator(device), C.StopSignal()  # gen: RangeAugment's draws, re-seeded by step
    augment = cfg.range_augment and corenet and not cfg.linear_probe
    t0, skipped, seen, stopping = time.time(), torch.zeros((), device=device), 0, False
    for step in C.progress(range(start, steps + 1), "finetune", initial=start, total=steps + 1):
        last_step = step == steps
        stopping = stop.requested if world == 1 else (step % cfg.log_every == 0 and stop.agreed(device))
        # ---- evaluate: top-1 of the raw and the EMA weights ------------------------------------------
        if last_step or (cfg.eval_every and step % cfg.eval_every == 0 and step > start):
            if rank == 0:
                raw, avg = (100 * (lg.argmax(1) == y).float().mean().item()
                            for lg, y in (folder_logits(m, val_items, size, device) for m in (model, ema.module)))
                log.log(step, top1=raw, ema_top1=avg, epoch=step / max(1, steps // max(1, cfg.epochs)))
            C.barrier()
        # ---- checkpoint ------------------------------------------------------------------------------
        if (last_step or stopping or step % cfg.ckpt_every == 0) and step > start:
            save(cfg, step, "catlip_finetune", model, ema, opt, classnames=classnames, model_name=name, image_size=size)
        if last_step or stopping:
            break
        # ---- forward, backward, step ---------------------------------------------------------------
        x, y = next(batches)
        x = model_input(model, x.to(device, non_blocking=True))  # (B, 3, S, S)
        y = y.to(device, non_blocking=True)  # (B,), -1 = unreadable image
        gen.manual_seed(cfg.seed * 1_000_003 + step)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):  # probe: head on frozen (B, D)
            logits = ddp(model.features(x).detach()) if cfg.linear_probe else ddp(x, gen) if augment else ddp(x)
        logits, xa = logits if augment else (logits, None)
        loss = F.cross_entropy(logits.float(), y, ignore_index=-1, label_smoothing=cfg.label_smoothing)
        loss = loss + range_augment_loss(x, xa, step, steps) if augment else loss
        gnorm = optimize(loss, model, opt, ema, step, cfg, steps)
        skipped, seen = skipped + (y < 0).sum(), seen + len(y)
        if (step + 1) % cfg.log_every == 0:
            if skipped.item() == seen:  # not one image has loaded: stop instead of training on nothing
                C.fail(f"none of the {seen} images read so far loads (first: {train_items[0][0]}); check --data")
            log.log(step + 1, loss=loss.item(), lr=opt.param_groups[0]["lr"], grad_norm=gnorm.item(),
                    skipped=int(skipped.item()), steps_per_s=cfg.log_every / (time.time() - t0))
            t0 = time.time()
    finish(cfg.out, stopping and not last_step, step)

# ==== 11. The claim on the synthetic world: pre-training + fine-tuning beats fine-tuning from scratch =======
VARIANTS = {"scratch": (False, False), "ft_random_head": (False, False), "ft_transfer_init": (True, False),
            "lp_random_head": (False, True), "lp_transfer_init": (True, True)}  # (transfer_init, linear_probe)

def compare(cfg: FinetuneConfig):
    """Fine-tune from scratch, from the CatLIP backbone, with Transfer Init, and linear probes: a top-1 table.

    Each variant runs in its own sub-directory of --out; --resume auto continues them, --overwrite redoes them."""
    if not cfg.init:
        C.fail("compare needs --init, a CatLIP pre-training checkpoint or run directory")
    init = load_pretrained(cfg.init)
    C.document_run(cfg.out, cfg, [__file__, C.__file__])  # the lock and start record of the comparison itself
    size, rows = cfg.image_size or init["image_size"], {}
    for name, (ti, lp) in VARIANTS.items():
        out, t0 = os.path.join(cfg.out, name), time.time()
        scratch = dict(init="", model=init["model_name"], pool=init["pool"]) if name == "scratch" else {}
        finetune(dataclasses.replace(cfg, out=out, image_size=size, resume="auto" if cfg.resume else "",
                                     transfer_init=ti, linear_probe=lp, **scratch))
        with open(os.path.join(out, "log.jsonl")) as f:
            final = [r for r in map(json.loads, f) if "top1" in r][-1]  # the start records have no top1
        rows[name] = {"top1": final["top1"], "ema_top1": final["ema_top1"], "steps": final["step"],
                      "seconds": round(time.time() - t0, 1)}
    if C.get_rank() == 0:
        with open(os.path.join(cfg.out, "compare.json"), "w") as f:
            json.dump({"init": cfg.init, "rows": rows, "config": dataclasses.asdict(cfg)}, f, indent=1)
        print("| fine-tune | top-1 | EMA top-1 | steps | seconds |\n|---|---|---|---|---|")
        for name, r in rows.items():
            print(f"| {name} | {r['top1']:.1f} | {r['ema_top1']:.1f} | {r['steps']} | {r['seconds']} |")
    C.finish_run(cfg.out, extra=f"table {os.path.join(cfg.out, 'compare.json')}; each variant in its sub-directory")

def main(argv=None):
    """`catlip.py [pretrain] [flags]`, `catlip.py vocab|finetune|compare [flags]`; COMMAND --help: its flags."""
    return C.run_command(__doc__, {"pretrain": (pretrain, Config), "vocab": (vocab_main, VocabConfig),
                                   "finetune": (finetune, FinetuneConfig), "compare": (compare, FinetuneConfig)},
                         argv, default="pretrain")

if __name__ == "__main__":
    main()
