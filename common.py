"""What two or more of the ten paper scripts share, in sections: 1. Config and CLI, 2. Distributed, 3. Attention and
models, 4. Tokenizer, 5. Data (tar shards, the synthetic world), 6. Losses, 7. Optimisation, 8. Checkpoints,
9. Evaluation, 10. Logging. Contract (DESIGN.md): imports nothing from the scripts, runs nothing at import, reads no
global config; every function takes explicit arguments, so any of them can be copied out alone.
"""
from __future__ import annotations

import argparse, atexit, collections, concurrent.futures, contextlib, dataclasses, functools, glob, gzip, heapq, html
import inspect, io, json, math, multiprocessing, os, pickle, random, re, shutil, signal, socket, subprocess, sys
import tarfile, tempfile, time, typing, unicodedata, warnings, zlib

import numpy as np, torch, torch.distributed as dist, torch.nn as nn, torch.nn.functional as F
import torchvision, torchvision.transforms.v2.functional as TF
from PIL import Image, ImageDraw
from torchvision.io import ImageReadMode, decode_jpeg
from torchvision.transforms import InterpolationMode

# ==== 1. Config and CLI ===============================================================================
class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Defaults shown after each flag's help; the description's line breaks kept."""

class _Parser(argparse.ArgumentParser):
    def error(self, message):  # a bad flag: one line (the error and where to look), not usage + error
        fail(f"{message} (see {self.prog} --help)")

def first_paragraph(doc: str | None) -> str:
    """A docstring's first paragraph (up to the first blank line), for --help."""
    return inspect.cleandoc(doc or "").split("\n\n")[0].strip()

# Range checks by field name: (pattern, low, high), the first match applies; a field's default always passes.
RANGES = [(r".*_(frac|prob|p)|alt_noise|pool_offdomain|(aug_|crop_)?min_scale|crop_scale|(ema_)?momentum|beta2"
           r"|label_smoothing|.*_threshold", 0, 1),
          (r"(.*_)?batch(_size)?(_.*)?|(log|ckpt)_every|shuffle_buffer|masks_per_image|num_(augs|captions|samples)"
           r"|topk|points|chunk|per_query|shots|(shard|part)_size", 1, None),
          (r"temperature", 1e-6, None),
          (r"(.*_)?(steps|epochs|every|workers|images|ckpts|max|warmup(_epochs)?|size|dim|classes|labels|synthetic_.*"
           r"|mix_pool|calib_samples)|(.*_)?lr(_.*)?|grad_clip|lambda_.*|.*_lambda|.*_weight|w_.*|weight_decay"
           r"|.*_hidden|min_count", 0, None)]

def check_ranges(cfg) -> None:
    """One line for the first numeric field that is not finite or out of its range (RANGES)."""
    for f in dataclasses.fields(cfg):
        v, flag = getattr(cfg, f.name), "--" + f.name.replace("_", "-")
        if isinstance(v, bool) or not isinstance(v, (int, float)) or v == f.default:
            continue
        if not math.isfinite(v):
            fail(f"{flag} {v}: must be a finite number")
        lo, hi = next(((lo, hi) for pattern, lo, hi in RANGES if re.fullmatch(pattern, f.name)), (-math.inf, None))
        if v < lo or (hi is not None and v > hi):
            fail(f"{flag} {v}: must be " + (f"between {lo} and {hi}" if hi is not None else f">= {lo}"))

def parse_config(cls, argv: list[str] | None = None, verbose: bool = True, prog: str | None = None,
                 description: str | None = None):
    """CLI of dataclass `cls`: `foo_bar` -> `--foo-bar` (bool `--x/--no-x`), help from its `# comment`, range checks."""
    hints, helps = typing.get_type_hints(cls), {}
    for klass in reversed(cls.__mro__):  # a subclass's comment wins over its parent's
        with contextlib.suppress(OSError, TypeError):  # classes without source (builtins): no comments
            helps.update(re.findall(r"^\s+(\w+)\s*:[^=\n]*=[^#\n]*#\s*(.+?)\s*$", inspect.getsource(klass), re.M))
    doc = description if description is not None else first_paragraph(sys.modules[cls.__module__].__doc__)
    parser = _Parser(prog=prog, description=doc, formatter_class=_HelpFormatter)
    for f in dataclasses.fields(cls):
        typ, flag = hints[f.name], "--" + f.name.replace("_", "-")
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        text = helps.get(f.name, " ").replace("%", "%%")  # argparse formats help with %
        if typing.get_origin(typ) in (typing.Union, getattr(__import__("types"), "UnionType", ())):
            typ = next(a for a in typing.get_args(typ) if a is not type(None))  # `str | None` -> str
        kind = {"action": argparse.BooleanOptionalAction} if hints[f.name] is bool else {"type": typ}
        parser.add_argument(flag, dest=f.name, default=default, help=text, **kind)
    cfg = cls(**vars(parser.parse_args(argv)))
    check_ranges(cfg)
    if verbose:
        print0(json.dumps(dataclasses.asdict(cfg)))
    return cfg

def run_command(module_doc: str, commands: dict, argv: list[str] | None = None, default: str | None = None):
    """`SCRIPT COMMAND [flags]`, commands = {name: (function, ConfigClass)}; with `default`, flags alone run it."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if {"-h", "--help"} & set(argv) and hasattr(signal, "SIGPIPE"):  # `SCRIPT --help | head`: no traceback
        signal.signal(signal.SIGPIPE, signal.SIG_DFL)
    script = os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else "script"
    if argv and argv[0] in commands:
        name, argv = argv[0], argv[1:]
    elif default and not (argv and argv[0] in ("-h", "--help")) and not (argv and not argv[0].startswith("-")):
        name = default
    else:
        width = max(map(len, commands))
        lines = [f"usage: {script} {{{','.join(commands)}}} [flags]   ({script} COMMAND --help: its flags)", "",
                 first_paragraph(module_doc), "", "commands:"]
        lines += [f"  {n:<{width}}  {(fn.__doc__ or '').strip().splitlines()[0] if fn.__doc__ else ''}"
                  for n, (fn, _) in commands.items()]
        asked = bool(argv) and argv[0] in ("-h", "--help")
        print("\n".join(lines), file=sys.stdout if asked else sys.stderr)
        if not asked:
            fail(f"unknown command '{argv[0]}'" if argv else "a command is needed")
        raise SystemExit(0)
    fn, cls = commands[name]
    return fn(parse_config(cls, argv, prog=f"{script} {name}", description=first_paragraph(fn.__doc__)))

def fail(msg: str):
    """Stop with one clear line instead of a traceback from deep inside (bad path, unknown model, ...)."""
    print(f"error: {msg}", file=sys.stderr, flush=True)
    raise SystemExit(2)

# ==== 2. Distributed ==================================================================================
def get_rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else int(os.environ.get("RANK", 0))

def get_world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else int(os.getenv("WORLD_SIZE", 1))

def print0(*args, **kwargs):
    if get_rank() == 0:
        print(*args, **kwargs, flush=True)

def setup_distributed(device: str = "auto") -> tuple[int, int, int, torch.device]:
    """torchrun's RANK/LOCAL_RANK/WORLD_SIZE (or plain `python`), NCCL/gloo -> (rank, local_rank, world, device)."""
    rank, local_rank, world = (int(os.getenv(k, v)) for k, v in (("RANK", 0), ("LOCAL_RANK", 0), ("WORLD_SIZE", 1)))
    device = ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device
    if device == "cuda":
        if not torch.cuda.is_available():
            fail("--device cuda was asked for but CUDA is not available")
        torch.cuda.set_device(local_rank)
    try:
        dev = torch.device("cuda", local_rank) if device == "cuda" else torch.device(device)
    except RuntimeError:
        fail(f"--device {device}: not a device torch knows (auto, cpu, cuda, mps, ...)")
    if world > 1 and not dist.is_initialized():
        cuda = dev.type == "cuda"
        dist.init_process_group("nccl" if cuda else "gloo", **({"device_id": dev} if cuda else {}))
    return rank, local_rank, world, dev

def barrier():
    if dist.is_available() and dist.is_initialized():
        dist.barrier()

def cleanup_distributed():
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()

def all_gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """`x` (B, ...) of every rank -> (W*B, ...), rank order; each rank's slice gets its gradient from all ranks."""
    if get_world_size() == 1 or not dist.is_initialized():
        return x
    import torch.distributed.nn.functional as dnnf
    return torch.cat(dnnf.all_gather(x.contiguous()), dim=0)

# ==== 3. Attention and transformer blocks, ViT, text transformer, CLIP ================================
def attention(q, k, v, mask=None, causal: bool = False):
    """Fused path, torch's SDPA: q, k, v (B, H, N, Dh) -> (B, H, N, Dh); bool `mask` (True = may attend)."""
    if causal and mask is not None:  # SDPA takes one or the other: fold the triangle into the mask
        mask, causal = mask & torch.ones(q.shape[-2], q.shape[-2], dtype=torch.bool, device=q.device).tril(), False
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal)

def attention_reference(q, k, v, mask=None, causal: bool = False):
    """Readable path, the oracle for `attention`: softmax(q k^T / sqrt(Dh)) v with the scores in fp32."""
    Dh, n = q.shape[-1], q.shape[-2]
    scores = (q.float() @ k.float().transpose(-2, -1)) * Dh**-0.5  # (B, H, N, N)
    if causal:
        scores = scores.masked_fill(~torch.ones(n, n, dtype=torch.bool, device=q.device).tril(), float("-inf"))
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    return (scores.softmax(dim=-1) @ v.float()).to(q.dtype)

class Attention(nn.Module):
    """Self-attention, one fused QKV projection: rows [q; k; v], head-major (torch's `in_proj_weight` layout)."""
    def __init__(self, dim: int, heads: int, bias: bool = True):
        super().__init__()
        assert dim % heads == 0, f"width {dim} is not divisible by {heads} heads"
        self.heads, self.fused = heads, True  # fused=False switches to attention_reference (tests, bench)
        self.qkv, self.proj = nn.Linear(dim, 3 * dim, bias=bias), nn.Linear(dim, dim, bias=bias)
    def forward(self, x, mask=None, causal: bool = False):
        B, N, D = x.shape
        q, k, v = self.qkv(x).view(B, N, 3, self.heads, D // self.heads).permute(2, 0, 3, 1, 4)  # 3x (B,H,N,Dh)
        o = (attention if self.fused else attention_reference)(q, k, v, mask, causal)
        return self.proj(o.transpose(1, 2).reshape(B, N, D))  # (B, N, D)

class QuickGELU(nn.Module):
    def forward(self, x):  # the activation the OpenAI CLIP weights were trained with
        return x * torch.sigmoid(1.702 * x)

class MLP(nn.Module):
    def __init__(self, dim: int, hidden: int, act: str = "gelu"):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(dim, hidden), nn.Linear(hidden, dim)
        self.act = QuickGELU() if act == "quick_gelu" else nn.GELU()
    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))

class Block(nn.Module):
    """Pre-norm transformer block: x + attn(ln(x)), then x + mlp(ln(x))."""
    def __init__(self, dim: int, heads: int, mlp_ratio: float = 4.0, act: str = "gelu"):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn, self.mlp = Attention(dim, heads), MLP(dim, int(dim * mlp_ratio), act)
    def forward(self, x, mask=None, causal: bool = False):
        x = x + self.attn(self.norm1(x), mask, causal)
        return x + self.mlp(self.norm2(x))

def run_blocks(blocks, x, checkpointing: bool, causal: bool = False):
    """x through the blocks; with `checkpointing` each block's activations are recomputed in backward."""
    for blk in blocks:
        x = torch.utils.checkpoint.checkpoint(blk, x, None, causal, use_reentrant=False) if checkpointing \
            else blk(x, None, causal)
    return x

class ViT(nn.Module):
    """CLIP's ViT: patch conv (no bias), class token, positions, ln_pre, blocks, ln_post, projection of the CLS."""
    def __init__(self, image_size=224, patch=16, width=768, layers=12, heads=12, embed_dim=512,
                 mlp_ratio=4.0, act="gelu", grad_checkpointing=False):
        super().__init__()
        self.image_size, self.patch, self.grad_checkpointing = image_size, patch, grad_checkpointing
        self.patch_embed = nn.Conv2d(3, width, patch, patch, bias=False)
        self.cls_token = nn.Parameter(torch.randn(width) * width**-0.5)
        self.pos_embed = nn.Parameter(torch.randn((image_size // patch) ** 2 + 1, width) * width**-0.5)
        self.norm_pre = nn.LayerNorm(width)
        self.blocks = nn.ModuleList(Block(width, heads, mlp_ratio, act) for _ in range(layers))
        self.norm, self.proj = nn.LayerNorm(width), nn.Parameter(torch.randn(width, embed_dim) * width**-0.5)
    def forward_tokens(self, x):
        """(B, 3, H, W) -> all tokens after ln_post, (B, 1 + N, D); dense tasks use the patch tokens."""
        x = self.patch_embed(x).flatten(2).transpose(1, 2)  # (B, N, D)
        cls = self.cls_token.to(x.dtype).expand(x.shape[0], 1, -1)
        x = torch.cat([cls, x], dim=1) + self.pos_embed.to(x.dtype)  # (B, 1 + N, D)
        return self.norm(run_blocks(self.blocks, self.norm_pre(x), self.grad_checkpointing and self.training))
    def forward(self, x):
        return self.forward_tokens(x)[:, 0] @ self.proj  # (B, E)

class TextTransformer(nn.Module):
    """CLIP's text tower, the end-of-text token (largest id) projected; causal=False: MobileCLIP-S*'s (sees padding)."""
    def __init__(self, vocab_size=49408, context_length=77, width=512, layers=12, heads=8, embed_dim=512,
                 mlp_ratio=4.0, act="gelu", causal=True, grad_checkpointing=False):
        super().__init__()
        self.context_length, self.causal, self.grad_checkpointing = context_length, causal, grad_checkpointing
        self.token_embed = nn.Embedding(vocab_size, width)
        nn.init.normal_(self.token_embed.weight, std=0.02)
        self.pos_embed = nn.Parameter(torch.randn(context_length, width) * 0.01)
        self.blocks = nn.ModuleList(Block(width, heads, mlp_ratio, act) for _ in range(layers))
        self.norm, self.proj = nn.LayerNorm(width), nn.Parameter(torch.randn(width, embed_dim) * width**-0.5)
    def forward(self, ids):
        x = self.token_embed(ids) + self.pos_embed[:ids.shape[1]]  # (B, N, D)
        x = self.norm(run_blocks(self.blocks, x, self.grad_checkpointing and self.training, causal=self.causal))
        return x[torch.arange(x.shape[0], device=x.device), ids.argmax(dim=-1)] @ self.proj  # (B, E)

class CLIP(nn.Module):
    """Two towers and a learned temperature; `logit_scale` is stored as log(1/tau) (init 1/0.07)."""
    def __init__(self, vision: nn.Module, text: nn.Module, init_logit_scale: float = math.log(1 / 0.07)):
        super().__init__()
        self.visual, self.text = vision, text
        self.logit_scale = nn.Parameter(torch.tensor(float(init_logit_scale)))
    def encode_image(self, images, normalize: bool = False):
        return F.normalize(self.visual(images), dim=-1) if normalize else self.visual(images)
    def encode_text(self, ids, normalize: bool = False):
        return F.normalize(self.text(ids), dim=-1) if normalize else self.text(ids)
    def forward(self, images, ids):
        """Normalised image and text embeddings (B, E) each, and the clamped scale exp(logit_scale) <= 100."""
        return self.encode_image(images, True), self.encode_text(ids, True), self.logit_scale.exp().clamp(max=100.0)

def build_clip(image_size=224, patch=16, width=768, layers=12, heads=12, embed_dim=512, text_width=512,
               text_layers=12, text_heads=8, vocab_size=49408, context_length=77, mlp_ratio=4.0,
               act="gelu", causal=True, grad_checkpointing=False) -> CLIP:
    vision = ViT(image_size, patch, width, layers, heads, embed_dim, mlp_ratio, act, grad_checkpointing)
    text = TextTransformer(vocab_size, context_length, text_width, text_layers, text_heads, embed_dim,
                           mlp_ratio, act, causal, grad_checkpointing)
    return CLIP(vision, text)

def set_fused(model: nn.Module, fused: bool) -> nn.Module:
    """Switch every Attention of `model` between the fused SDPA path and the explicit reference."""
    for m in model.modules():
        if isinstance(m, Attention):
            m.fused = fused
    return model

# OpenAI/OpenCLIP names -> ours: the first whole-key prefix that matches, then infixes; swapped, for export.
_OPENCLIP_PREFIXES = [
    ("visual.transformer.resblocks.", "visual.blocks."), ("transformer.resblocks.", "text.blocks."),
    ("visual.conv1.", "visual.patch_embed."), ("visual.class_embedding", "visual.cls_token"),
    ("visual.positional_embedding", "visual.pos_embed"), ("visual.ln_pre.", "visual.norm_pre."),
    ("visual.ln_post.", "visual.norm."), ("token_embedding.", "text.token_embed."),
    ("positional_embedding", "text.pos_embed"), ("ln_final.", "text.norm."), ("text_projection", "text.proj")]
_OPENCLIP_INFIXES = [(".ln_1.", ".norm1."), (".ln_2.", ".norm2."), (".attn.in_proj_weight", ".attn.qkv.weight"),
                     (".attn.in_proj_bias", ".attn.qkv.bias"), (".attn.out_proj.", ".attn.proj."),
                     (".mlp.c_fc.", ".mlp.fc1."), (".mlp.c_proj.", ".mlp.fc2.")]

def _rename(key: str, inverse: bool = False) -> str:
    old, new = next(((p[inverse], p[1 - inverse]) for p in _OPENCLIP_PREFIXES if key.startswith(p[inverse])), ("", ""))
    key = new + key[len(old):]
    for p in _OPENCLIP_INFIXES:
        key = key.replace(p[inverse], p[1 - inverse])
    return key

def unwrap_state_dict(sd: dict) -> dict:
    """The tensors of a saved file: under "state_dict"/"model" if nested, without DDP/compile prefixes."""
    for k in ("state_dict", "model"):
        if k in sd and isinstance(sd[k], dict):
            sd = sd[k]
    return {re.sub(r"^(module\.|_orig_mod\.)+", "", k): v for k, v in sd.items()}

# Head counts are not stored: OpenCLIP's heads are 64 wide but for these widths (ViT-H/14, g/14, bigG/14: 16 heads).
_HEAD_WIDTH = {1280: 80, 1408: 88, 1664: 104}

def openclip_config(sd: dict) -> dict:
    """Infer the build_clip arguments of an OpenAI/OpenCLIP ViT CLIP from its state-dict shapes."""
    sd = unwrap_state_dict(sd)
    if "visual.conv1.weight" not in sd or "text_projection" not in sd:
        raise ValueError("not an OpenAI/OpenCLIP ViT CLIP state dict (no visual.conv1.weight / text_projection)")
    width, _, patch, _ = sd["visual.conv1.weight"].shape
    grid = math.isqrt(sd["visual.positional_embedding"].shape[0] - 1)
    count = lambda p: len({k[len(p):].split(".")[0] for k in sd if k.startswith(p)})
    text_width = sd["ln_final.weight"].shape[0]
    return dict(image_size=grid * patch, patch=patch, width=width, layers=count("visual.transformer.resblocks."),
                heads=width // _HEAD_WIDTH.get(width, 64), embed_dim=sd["visual.proj"].shape[1], text_width=text_width,
                text_layers=count("transformer.resblocks."), text_heads=text_width // 64,
                vocab_size=sd["token_embedding.weight"].shape[0], context_length=sd["positional_embedding"].shape[0],
                mlp_ratio=sd["visual.transformer.resblocks.0.mlp.c_fc.weight"].shape[0] / width)

def openclip_to_ours(sd: dict) -> dict:
    """Rename an OpenAI/OpenCLIP state dict to this repository's names (tensors untouched)."""
    return {_rename(k): v for k, v in unwrap_state_dict(sd).items()
            if not k.endswith("attn_mask") and k not in ("input_resolution", "context_length", "vocab_size")}

def ours_to_openclip(sd: dict) -> dict:
    """The inverse, to export a model trained here to the OpenAI/OpenCLIP layout."""
    return {_rename(k, inverse=True): v for k, v in sd.items()}

def clip_from_openclip(sd: dict, act: str = "quick_gelu", **overrides) -> CLIP:
    """A CLIP from an OpenAI/OpenCLIP ViT state dict, loaded strictly. OpenAI's weights use QuickGELU (the default),
    most LAION/DataComp OpenCLIP weights GELU (`act="gelu"`: OpenCLIP's names without `-quickgelu`)."""
    model = build_clip(**{**openclip_config(sd), **overrides}, act=act)  # e.g. heads=... for unusual widths
    load_state_dict_checked(model, openclip_to_ours(sd), "OpenCLIP state dict")
    return model

def load_state_dict_checked(model: nn.Module, sd: dict, what: str):
    """Strict load that fails with one line naming the first mismatch (a checkpoint of another model)."""
    own = model.state_dict()
    missing, unexpected = sorted(set(own) - set(sd)), sorted(set(sd) - set(own))
    bad = [k for k in own if k in sd and tuple(sd[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or bad:
        detail = (f"shape of {bad[0]}: {tuple(sd[bad[0]].shape)} vs {tuple(own[bad[0]].shape)}" if bad else f"missing "
                  f"{len(missing)} keys (e.g. {missing[:2]}), unexpected {len(unexpected)} (e.g. {unexpected[:2]})")
        fail(f"{what} does not fit this model: {detail}")
    model.load_state_dict(sd)

# ==== 4. Tokenizer ====================================================================================
# CLIP's byte-level BPE, stdlib + torch only, the original's pipeline:
# 1. clean: ftfy.fix_text, HTML-unescape twice, collapse whitespace, lower-case. ftfy's context-free fixes only
#    (entities unless the text has '<', ANSI codes, invisible and C1 controls as cp1252, ligatures, full/half-width
#    forms, curly quotes, NFC); not mojibake ("cafÃ©"), upper-case entities ("&EACUTE;"), entities nested > 3 deep.
# 2. words: special tokens, contractions, runs of letters (\p{L}), single digits (\p{N}), runs of anything else but
#    spaces; classes from `unicodedata` (its Unicode version may lag that of the original's `regex` module).
# 3. each word's UTF-8 bytes as printable characters (GPT-2's table), '</w>' on the last, merges lowest rank first.

SOT, EOT, EOW = "<start_of_text>", "<end_of_text>", "</w>"
CLIP_NUM_MERGES = 49152 - 256 - 2   # merges used from the standard vocab file

@functools.lru_cache(maxsize=None)
def _byte_table():
    """byte -> printable char, in the order of the 256 base tokens of the vocab."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    rest = [b for b in range(256) if b not in keep]  # controls, space, soft hyphen: moved to U+0100 and up
    return {**{b: chr(b) for b in keep}, **{b: chr(256 + i) for i, b in enumerate(rest)}}

@functools.lru_cache(maxsize=None)
def _fix_table():
    """str.translate table for the ftfy fixes that do not depend on context."""
    t = {**dict.fromkeys([*range(0, 9), 0x0B, *range(0x0E, 0x20), 0x7F, *range(0x206A, 0x2070), 0xFEFF,
                          *range(0xFFF9, 0xFFFD)]), 0x0D: "\n", 0x2028: "\n", 0x2029: "\n"}
    # C1 controls almost always are cp1252 bytes (the 5 bytes undefined in cp1252 are left alone)
    t.update({b: c for b in range(0x80, 0xA0) if (c := bytes([b]).decode("cp1252", "replace")) != "\ufffd"})
    nfkc = [0x132, 0x133, 0x149, *range(0x1C4, 0x1CD), *range(0x1F1, 0x1F4), *range(0xFB00, 0xFB07)]
    nfkc += [cp for cp in [0x3000, *range(0xFF01, 0xFFEF)]     # ligatures above, full/half-width forms here
             if unicodedata.decomposition(chr(cp)).startswith(("<wide>", "<narrow>"))]
    t.update({cp: unicodedata.normalize("NFKC", chr(cp)) for cp in nfkc})
    t[0xFB05] = "ſt"                     # the long s is kept, only the ligature is split
    quotes = {**dict.fromkeys("\u2018\u2019\u201a\u201b\u02bc", "'"), **dict.fromkeys("\u201c\u201d\u201e\u201f", '"')}
    t.update({ord(q): r for q, r in quotes.items()})    # then chain, e.g. C1 0x92 -> U+2019 -> "'"
    return {cp: r and "".join(quotes.get(c, c) for c in r) for cp, r in t.items()}

_ANSI_ESCAPE = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
def clean_text(text):
    """Normalise text the way CLIP does before pre-tokenisation (see header note)."""
    text = text if "<" in text else html.unescape(text)   # ftfy keeps entities in what looks like HTML
    text = _ANSI_ESCAPE.sub("", text).translate(_fix_table())
    text = html.unescape(html.unescape(unicodedata.normalize("NFC", text))).strip()
    return re.sub(r"\s+", " ", text).strip().lower()

@functools.lru_cache(maxsize=None)
def _word_pattern():
    """Pre-tokeniser regex, with \\p{L} and \\p{N} spelled out as code point ranges."""
    cats = [unicodedata.category(chr(cp))[0] for cp in range(0x110000)]
    def ranges(cat, lo, hi):             # runs of consecutive code points, as a character class body
        sel = [cp for cp in range(lo, hi) if cats[cp] == cat]
        firsts = [c for p, c in zip([-2] + sel, sel) if c != p + 1]
        lasts = [c for c, n in zip(sel, sel[1:] + [-2]) if n != c + 1]
        return "".join("\\U%08x" % a if a == b else "\\U%08x-\\U%08x" % (a, b) for a, b in zip(firsts, lasts))
    # stdlib `re` makes a lookup table of a class's BMP part but tests astral ranges one by one: guard them.
    astral = r"(?=[^\x00-\uffff])"
    lb, la, nb, na = (ranges(c, lo, hi) for c in "LN" for lo, hi in ((0, 0x10000), (0x10000, 0x110000)))
    # U+0345 (combining, case-folds to iota) matches no branch of the original's case-insensitive regex: dropped.
    other = rf"[^\s\u0345{lb}{nb}\U00010000-\U0010ffff]|{astral}[^{la}{na}]"
    return re.compile(rf"{SOT}|{EOT}|(?i:'s|'t|'re|'ve|'m|'ll|'d)|(?:[{lb}]+|{astral}[{la}])+"
                      rf"|[{nb}]|{astral}[{na}]|(?:{other})+")

# The same rule restricted to ASCII text (already lower-cased): the common case.
_ASCII_WORD = re.compile(rf"{SOT}|{EOT}|'s|'t|'re|'ve|'m|'ll|'d|[a-z]+|[0-9]|[^\sa-z0-9]+")

def _words(text):
    """Cleaned, pre-tokenised words of `text` (before the byte mapping)."""
    return (_ASCII_WORD if (text := clean_text(text)).isascii() else _word_pattern()).findall(text)

def _symbols(word):
    """Initial BPE symbols of a word: its mapped bytes, the last one marked with '</w>'."""
    chars = "".join(map(_byte_table().__getitem__, word.encode("utf-8")))
    return list(chars[:-1]) + [chars[-1] + EOW]

def _merge(symbols, a, b):
    """Replace each adjacent (a, b), scanning left to right without overlap, by a+b."""
    out, i = [], 0
    while i < len(symbols):
        pair = symbols[i] == a and i + 1 < len(symbols) and symbols[i + 1] == b
        out.append(a + b if pair else symbols[i])
        i += 1 + pair
    return out

def _read_merges(path):
    """Parse a merges file (gzip or plain): one header line, then 'a b' lines."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"BPE merges file not found: {path}")
    try:
        with open(path, "rb") as f:
            raw = f.read()
        lines = (gzip.decompress(raw) if raw[:2] == b"\x1f\x8b" else raw).decode("utf-8").split("\n")
    except (OSError, EOFError, UnicodeDecodeError) as e:
        raise ValueError(f"cannot read BPE merges file {path}: {e}") from None
    if not lines[0].strip():
        raise ValueError(f"malformed BPE merges file {path}: empty, or no header line")
    # save() writes the merge count; the standard file, longer than what CLIP uses, is cut at CLIP_NUM_MERGES.
    declared = re.fullmatch(r"#merges: (\d+)", lines[0].strip())
    limit = int(declared.group(1)) if declared else CLIP_NUM_MERGES
    body = [ln for ln in lines[1:] if ln.strip()][:limit]
    if declared and len(body) != limit:
        raise ValueError(f"malformed BPE merges file {path}: header says {limit} merges, found {len(body)}")
    if bad := next(((n, line) for n, line in enumerate(body, start=2) if len(line.split()) != 2), None):
        raise ValueError(f"malformed BPE merges file {path}: line {bad[0]} is not 'a b': {bad[1]!r}")
    return [tuple(line.split()) for line in body]

class Tokenizer:
    """CLIP's BPE: 256 bytes, 256 bytes + '</w>', one token per merge, <start_of_text>, <end_of_text>; 77 long."""
    def __init__(self, path=None, merges=None, context_length=77):
        if (path is None) == (merges is None):
            raise ValueError("Tokenizer needs exactly one of `path` (merges file) or `merges` (list of pairs)")
        if context_length < 2:
            raise ValueError(f"context_length must be >= 2, got {context_length}")
        self.merges = _read_merges(path) if path is not None else [tuple(m) for m in merges]
        base = list(_byte_table().values())
        self.decoder = vocab = base + [s + EOW for s in base] + [a + b for a, b in self.merges] + [SOT, EOT]
        # A merge re-creating an existing string (possible in small trained vocabularies) keeps its first id.
        self.encoder = {tok: i for i, tok in reversed(list(enumerate(vocab)))}
        self.ranks = {pair: r for r, pair in reversed(list(enumerate(self.merges)))}
        self.vocab_size, self.sot_token, self.eot_token = len(vocab), len(vocab) - 2, len(vocab) - 1
        self.context_length, self._cache = context_length, {SOT: [self.sot_token], EOT: [self.eot_token]}
    def _bpe(self, symbols):
        """Merge the lowest-ranked adjacent pair (all its occurrences at once) until none is a merge."""
        ranks = self.ranks
        while len(symbols) > 1:
            pair = min(zip(symbols, symbols[1:]), key=lambda p: ranks.get(p, float("inf")))
            if pair not in ranks:
                break
            symbols = _merge(symbols, *pair)
        return symbols
    def _encode_word(self, word):
        if (ids := self._cache.get(word)) is None:
            ids = [self.encoder[s] for s in self._bpe(_symbols(word))]
            if len(self._cache) < 1_000_000:
                self._cache[word] = ids
        return ids
    def encode(self, text):
        """Token ids of `text`, without start/end tokens."""
        return [i for w in _words(text) for i in self._encode_word(w)]
    def decode(self, ids):
        """Text of `ids`, words space-separated; drops a leading sot, stops at the first eot (padding)."""
        ids = ids.tolist() if hasattr(ids, "tolist") else list(ids)
        ids = ids[1:] if ids and ids[0] == self.sot_token else ids
        ids = ids[: ids.index(self.eot_token)] if self.eot_token in ids else ids
        byte_of = {c: b for b, c in _byte_table().items()}
        raw = bytes(byte_of[c] for i in ids for c in self.decoder[i])
        return raw.decode("utf-8", errors="replace").replace(EOW, " ").strip()
    def __call__(self, texts, context_length=None):
        """(N, context_length) LongTensor: [sot] + ids + [eot], zero padded; too-long rows end in eot."""
        n, texts = context_length or self.context_length, [texts] if isinstance(texts, str) else list(texts)
        out = torch.zeros(len(texts), n, dtype=torch.long)
        for row, text in enumerate(texts):
            ids = ([self.sot_token] + self.encode(text))[: n - 1] + [self.eot_token]
            out[row, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        return out
    def save(self, path):
        """Write the merges as plain text; Tokenizer(path) reloads the same tokenizer."""
        with open(path, "w", encoding="utf-8") as f:
            f.write(f"#merges: {len(self.merges)}\n" + "".join(f"{a} {b}\n" for a, b in self.merges))

def train_bpe(texts, vocab_size=4096, min_frequency=2):
    """Up to vocab_size - 514 merges learnt on `texts` as Tokenizer splits them; stops below `min_frequency`."""
    counts = collections.Counter(w for t in texts for w in _words(t) if w not in (SOT, EOT))
    words, freqs = [_symbols(w) for w in counts], list(counts.values())  # distinct words, weighted by count
    pair_count, where = collections.defaultdict(int), collections.defaultdict(set)  # where: pair -> words with it
    for i, (w, f) in enumerate(zip(words, freqs)):
        for p in zip(w, w[1:]):
            pair_count[p] += f
            where[p].add(i)
    # Max-heap keyed by (count, pair), ties to the smallest pair; entries with a stale count are skipped.
    heap, merges = [(-c, p) for p, c in pair_count.items()], []
    heapq.heapify(heap)
    while heap and len(merges) < vocab_size - 514:
        neg, pair = heapq.heappop(heap)
        if pair_count.get(pair, 0) != -neg:
            continue
        if -neg < min_frequency:
            break
        merges.append(pair)
        delta = collections.defaultdict(int)
        for i in where.pop(pair):
            old, f = words[i], freqs[i]
            words[i] = new = _merge(old, *pair)
            if len(new) == len(old):
                continue                 # stale entry: the pair is no longer in this word
            for p in zip(old, old[1:]):
                delta[p] -= f
            for p in zip(new, new[1:]):
                delta[p] += f
                where[p].add(i)
        for p, d in delta.items():       # pairs whose count drops to 0 leave pair_count
            if d and (c := pair_count.pop(p, 0) + d) > 0:
                pair_count[p] = c
                heapq.heappush(heap, (-c, p))
    return merges

# ==== 5. Data: tar shards, image transforms, the synthetic world ======================================
IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
CLIP_MEAN, CLIP_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)

def _braces(spec: str) -> list[str]:
    """Expand `{00..99}` (zero-padded to the first bound's width) and `{a,b}` patterns, left to right."""
    if m := re.search(r"\{(\d+)\.\.(\d+)\}", spec):
        lo, hi, w = int(m.group(1)), int(m.group(2)), len(m.group(1))
        return [x for i in range(lo, hi + 1) for x in _braces(spec[:m.start()] + str(i).zfill(w) + spec[m.end():])]
    if m := re.search(r"\{([^{}]*,[^{}]*)\}", spec):
        return [x for s in m.group(1).split(",") for x in _braces(spec[:m.start()] + s + spec[m.end():])]
    return [spec]

def expand_shards(spec: str) -> list[str]:
    """Shards joined by `::`: directory, glob, file, braces (`{000..099}`, `{a,b}`), http(s) URL or `pipe:CMD`."""
    out = []
    for part in spec.split("::"):
        for p in _braces(part):
            if part.startswith(("pipe:", "http://", "https://")):
                out.append(p)
            elif os.path.isdir(p):
                out += sorted(glob.glob(os.path.join(p, "**", "*.tar"), recursive=True))
            elif any(c in p for c in "*?["):
                out += sorted(glob.glob(p, recursive=True))
            elif os.path.exists(p):
                out.append(p)
            else:
                raise FileNotFoundError(f"data path does not exist: {p}")
    if not out:
        raise FileNotFoundError(f"no .tar shards found at {spec}")
    return out

class PipeFailed(OSError):
    """A `pipe:` shard's command exited non-zero."""

@contextlib.contextmanager
def open_shard(source: str):
    """A file, http(s) URL or `pipe:CMD` as a byte stream; a failed command raises PipeFailed (its last stderr line)."""
    if not source.startswith("pipe:"):
        import urllib.request
        url = source.startswith(("http://", "https://"))
        with urllib.request.urlopen(source, timeout=120) if url else open(source, "rb") as f:
            yield f
        return
    with tempfile.TemporaryFile() as err:  # stderr to a file: a chatty command can never block on a full pipe
        proc = subprocess.Popen(source[5:], shell=True, stdout=subprocess.PIPE, stderr=err)
        reader_left = True  # the reader stopped early (a closed generator, Ctrl-C): end the command quietly
        try:
            yield proc.stdout
            reader_left = False
        except (tarfile.TarError, EOFError, OSError, zlib.error):
            reader_left = False
            raise
        finally:
            if reader_left:
                proc.kill()
            else:  # read the rest (the tar's end padding), so the exit status is the command's own
                while proc.stdout.read(1 << 20):
                    pass
            proc.stdout.close()
            if proc.wait() != 0 and not reader_left:  # replaces a tar error that the failure caused
                err.seek(0)
                last = (err.read().decode("utf-8", "replace").strip().splitlines() or [""])[-1][:200]
                raise PipeFailed(f"exit status {proc.returncode}: {last}")

def iter_tar_samples(path: str, skipped: dict):
    """A tar's samples {"__key__", suffix: bytes} (webdataset's keys); a broken tar ends, counted in `skipped`."""
    sample, key = {}, None
    try:
        with open_shard(path) as f, tarfile.open(fileobj=f, mode="r|*") as tar:  # streaming: never seeks
            for m in tar:
                d, base = os.path.split(m.name)
                if not m.isfile() or base.startswith("."):
                    continue
                k, _, suffix = base.partition(".")
                if (k := os.path.join(d, k)) != key and sample:
                    yield sample
                    sample = {}
                key = sample["__key__"] = k
                sample[suffix.lower()] = tar.extractfile(m).read()
    except (tarfile.TarError, EOFError, OSError, zlib.error) as e:  # OSError: also urllib's URLError, HTTPError
        reason = "pipe_failed" if isinstance(e, PipeFailed) else f"broken_tar:{type(e).__name__}"
        skipped[reason] = skipped.get(reason, 0) + 1
        if path.startswith(("pipe:", "http://", "https://")):  # a remote source: say which, once
            print(f"data: skipped {path} ({type(e).__name__}: {str(e)[:200]})", file=sys.stderr, flush=True)
        sample = {}  # the last sample may be incomplete
    if sample:
        yield sample

def _image_bytes(sample: dict) -> bytes:
    return sample[next((ext for ext in IMAGE_EXTS if ext in sample), "no image")]  # KeyError('no image') if none

def _pil_rgb(data: bytes) -> Image.Image:
    img = Image.open(io.BytesIO(data))
    img.load()  # force the full decode here, so a truncated file fails now, not in the crop
    return img.convert("RGB")

def decode_image(sample: dict) -> Image.Image:
    """The sample's image as RGB PIL (replays matching PIL-based official code); raises if missing or bad."""
    return _pil_rgb(_image_bytes(sample))

def bytes_to_tensor(data: bytes) -> torch.Tensor:
    """Image bytes -> uint8 (3, H, W): JPEG by `decode_jpeg` (~15% less CPU, bench.py), the rest by PIL; else raises."""
    if data[:3] == b"\xff\xd8\xff":
        try:
            with warnings.catch_warnings():  # torchvision 0.29 deprecates its decoders in favour of TorchCodec
                warnings.simplefilter("ignore", DeprecationWarning)
                return decode_jpeg(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.RGB)
        except RuntimeError:
            pass  # PIL decides: it decodes what it can and raises on the rest
    return TF.pil_to_tensor(_pil_rgb(data))  # (3, H, W)

def decode_image_tensor(sample: dict) -> torch.Tensor:
    """The sample's image as uint8 (3, H, W) (`bytes_to_tensor`, the fast training path); raises if missing or bad."""
    return bytes_to_tensor(_image_bytes(sample))

def decode_caption(sample: dict, key: str = "txt") -> str:
    """The caption as text; raises on a missing, empty or non-UTF-8 caption."""
    text = sample[key if key in sample else "no caption"].decode("utf-8").strip()  # or UnicodeDecodeError
    if not text:
        raise ValueError("empty caption")
    return text

def random_resized_crop_box(w: int, h: int, rng: random.Random, scale=(0.9, 1.0), ratio=(3 / 4, 4 / 3)):
    """torchvision's RandomResizedCrop box (left, top, right, bottom), drawn from `rng` (fixed by the sample's key)."""
    area, log_ratio = w * h, (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target, aspect = area * rng.uniform(*scale), math.exp(rng.uniform(*log_ratio))
        cw, ch = int(round(math.sqrt(target * aspect))), int(round(math.sqrt(target / aspect)))
        if 0 < cw <= w and 0 < ch <= h:
            top, left = rng.randint(0, h - ch), rng.randint(0, w - cw)
            return left, top, left + cw, top + ch
    r = min(max(w / h, min(ratio)), max(ratio))  # the nearest allowed aspect ratio
    cw, ch = (w, int(round(w / r))) if w / h < r else (int(round(h * r)), h) if w / h > r else (w, h)
    left, top = (w - cw) // 2, (h - ch) // 2
    return left, top, left + cw, top + ch

def image_wh(img) -> tuple[int, int]:
    """(width, height) of a PIL image or a (C, H, W) tensor."""
    return (img.shape[-1], img.shape[-2]) if torch.is_tensor(img) else img.size

_MODES = {Image.NEAREST: InterpolationMode.NEAREST, Image.BILINEAR: InterpolationMode.BILINEAR,
          Image.BICUBIC: InterpolationMode.BICUBIC}

def image_to_uint8(img, size: int, box, resample=Image.BICUBIC) -> torch.Tensor:
    """Crop `box`, resize -> uint8 (3, size, size): tensors by torchvision (fast), PIL images by PIL (replays)."""
    if torch.is_tensor(img):
        left, top, right, bottom = box
        return TF.resized_crop(img, top, left, bottom - top, right - left, [size, size],
                               interpolation=_MODES[resample], antialias=True)
    return TF.pil_to_tensor(img.resize((size, size), resample, box=box))  # (3, S, S)

def eval_transform(img, size: int, resample=Image.BICUBIC) -> torch.Tensor:
    """OpenCLIP's eval transform (shorter side, centre crop) -> uint8 (3, size, size); PIL in: OpenCLIP's pixels."""
    if not torch.is_tensor(img):
        img = img.convert("RGB")
    x = TF.center_crop(TF.resize(img, size, interpolation=_MODES[resample], antialias=True), [size, size])
    return x if torch.is_tensor(x) else TF.pil_to_tensor(x)

def normalize_images(x: torch.Tensor, mean=CLIP_MEAN, std=CLIP_STD) -> torch.Tensor:
    """uint8 (B, 3, H, W) on any device -> float, (x/255 - mean) / std."""
    m, s = (torch.tensor(v, device=x.device).view(1, 3, 1, 1) * 255 for v in (mean, std))
    return (x.float() - m) / s

# RandAugment (Cubuk et al. 2020) with its draws kept, so an augmentation is stored and replayed exactly (DataCompDR,
# reinforce): torchvision's ops and table, our draw (a seeded `random.Random`). An op is stored as [index into
# RAND_AUGMENT_OPS, signed magnitude] (DataCompDR's form); translations are in pixels.
RAND_AUGMENT_OPS = ("Identity", "ShearX", "ShearY", "TranslateX", "TranslateY", "Rotate", "Brightness",
                    "Color", "Contrast", "Sharpness", "Posterize", "Solarize", "AutoContrast", "Equalize")

@functools.lru_cache(maxsize=64)
def _rand_augment_space(bins: int, size: int) -> dict:
    """torchvision's table {op: (magnitudes of the `bins` bins, signed)} for a size x size image."""
    from torchvision.transforms import RandAugment
    space = RandAugment(num_magnitude_bins=bins)._augmentation_space(bins, [size, size])
    assert tuple(space) == RAND_AUGMENT_OPS, "torchvision's RandAugment ops changed order"
    return {k: (m.tolist() if m.ndim else None, signed) for k, (m, signed) in space.items()}

def rand_augment_magnitude(k: int, negative: bool, size: int, magnitude: int = 9, bins: int = 31) -> float:
    """Op k's value at `magnitude` of `bins`, negated if `negative` and signed (0 for unparametrised ops)."""
    grid, signed = _rand_augment_space(bins, size)[RAND_AUGMENT_OPS[k]]
    m = float(grid[magnitude]) if grid is not None else 0.0
    return -m if signed and negative else m

def rand_augment_params(rng: random.Random, size: int, num_ops: int = 2, magnitude: int = 9, bins: int = 31):
    """num_ops [op_index, signed magnitude] drawn as torchvision's RandAugment: op uniform, sign p = 1/2."""
    ops = []
    for _ in range(num_ops):
        k = rng.randrange(len(RAND_AUGMENT_OPS))
        negative = _rand_augment_space(bins, size)[RAND_AUGMENT_OPS[k]][1] and rng.random() < 0.5
        ops.append([k, rand_augment_magnitude(k, negative, size, magnitude, bins)])
    return ops

def apply_rand_augment(img: Image.Image, ops) -> Image.Image:
    """Apply stored [op_index, magnitude] pairs to a PIL image by torchvision's own ops (nearest, black fill)."""
    from torchvision.transforms.autoaugment import _apply_op
    for k, m in ops:
        img = _apply_op(img, RAND_AUGMENT_OPS[int(k)], float(m), InterpolationMode.NEAREST, None)
    return img

class ShardStream(torch.utils.data.IterableDataset):
    """Endless, resumable batches from tar shards for DDP and DataLoader workers: each sample goes to one (rank, worker)
    consumer per epoch (shards round-robin, or every n-th sample of fewer shards), order seeded by (seed, epoch,
    consumer). `decode(sample)` raises to reject a sample (counted by reason). A batch carries `__worker__`,
    `__skipped__`, `__pos__` = [epoch, samples read]: given back as `start_pos` (+ `start_batch`), workers resume."""
    def __init__(self, shards: list[str], decode, batch_size: int, rank: int = 0, world: int = 1,
                 seed: int = 0, shuffle_buffer: int = 2000, start_pos: dict | None = None,
                 start_batch: int = 0, epochs: int | None = None, drop_last: bool = True):
        self.shards, self.decode, self.batch_size = shards, decode, batch_size
        self.rank, self.world, self.seed, self.buffer = rank, world, seed, shuffle_buffer
        self.start_pos, self.start_batch, self.epochs, self.drop_last = start_pos or {}, start_batch, epochs, drop_last
    read_shard = staticmethod(iter_tar_samples)  # (path, skipped) -> samples; a subclass may join more members
    def raw_samples(self, epoch: int, consumer: int, consumers: int, skipped: dict):
        rng = random.Random(hash((self.seed, epoch, consumer)) & 0xFFFFFFFF)
        if len(self.shards) >= consumers:
            mine, every, offset = list(self.shards[consumer::consumers]), 1, 0
            rng.shuffle(mine)
        else:  # every consumer reads the same shard order, so "every n-th sample" partitions them
            mine, every, offset = list(self.shards), consumers, consumer
            random.Random(hash((self.seed, epoch)) & 0xFFFFFFFF).shuffle(mine)
        buf = []
        for i, s in enumerate(s for path in mine for s in self.read_shard(path, skipped)):
            if i % every != offset:
                continue
            if len(buf) < self.buffer:
                buf.append(s)
                continue
            j = rng.randrange(len(buf))
            buf[j], s = s, buf[j]
            yield s
        rng.shuffle(buf)
        yield from buf
    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        wid, nw = (info.id, info.num_workers) if info else (0, 1)
        # The DataLoader takes batches from its workers in turn from worker 0: rotate ids by the batches consumed.
        wid = (wid + self.start_batch) % nw
        consumer, consumers = self.rank * nw + wid, self.world * nw
        epoch, to_skip = self.start_pos.get(wid, (0, 0))
        skipped, batch = {}, []
        while self.epochs is None or epoch < self.epochs:
            n = good = 0  # raw samples read in this epoch, and those decoded
            for s in self.raw_samples(epoch, consumer, consumers, skipped):
                n += 1
                if n <= to_skip:  # resume: fast-forward past what was consumed, without decoding
                    continue
                s["__epoch__"] = epoch  # lets decode seed its augmentation by (epoch, key), not by worker
                try:
                    batch.append(self.decode(s))
                except Exception as e:  # corrupt image, bad caption...: skip and count, never crash
                    skipped[type(e).__name__] = skipped.get(type(e).__name__, 0) + 1
                    continue
                good += 1
                if len(batch) == self.batch_size:
                    yield collate(batch, wid, skipped, [epoch, n])
                    batch = []
            if good == 0 and (n > to_skip or n == 0):  # a whole pass without one usable sample: stop, never spin
                what = f"{len(self.shards)} shard(s) ({self.shards[0]}{', ...' if len(self.shards) > 1 else ''})"
                counts = ", ".join(f"{k} {v}" for k, v in sorted(skipped.items())) or "no samples in them"
                raise DataError(f"no usable sample in a whole pass of data consumer {consumer + 1} of "
                                f"{consumers} over {what}; skipped: {counts}")
            epoch, to_skip = epoch + 1, 0
        if batch and not self.drop_last:
            yield collate(batch, wid, skipped, [epoch, 0])

def collate(items: list[dict], worker: int = 0, skipped: dict | None = None, pos=None) -> dict:
    """Stack tensors, keep everything else as lists."""
    out = {k: torch.stack([it[k] for it in items]) if torch.is_tensor(items[0][k]) else [it[k] for it in items]
           for k in items[0]}
    out["__worker__"], out["__skipped__"], out["__pos__"] = worker, dict(skipped or {}), pos
    return out

class DataError(RuntimeError):
    """Data that cannot feed a run (every sample of a pass bad, every shard unreadable)."""

class Loader(torch.utils.data.DataLoader):
    """A DataLoader whose DataError, raised in a worker, ends the run with its one line, not a traceback."""
    def __iter__(self):
        it = super().__iter__()
        try:
            yield from it
        except DataError as e:  # re-raised from a worker with its traceback in the text: keep the message
            getattr(it, "_shutdown_workers", lambda: None)()
            fail([line for line in str(e).strip().splitlines() if line.strip()][-1].removeprefix(
                f"{DataError.__module__}.DataError: "))

@functools.cache
def kill_workers_at_exit():
    """Workers ignore SIGTERM, multiprocessing's way to end them: at exit the main process SIGKILLs them first."""
    def kill():  # torch's SIGCHLD handler would report each killed worker as an error: restore the default first
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        for p in multiprocessing.active_children():
            if p.daemon:
                p.kill()
    atexit.register(kill)

def ignore_stop_signals(worker_id: int = 0):
    """`worker_init_fn`: workers ignore SIGTERM/SIGINT (sent to the whole group); the main process saves and stops."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)

def make_loader(stream: ShardStream, num_workers: int, pin_memory: bool):
    """DataLoader over a ShardStream that batches itself; workers leave stop signals to the main process."""
    kill_workers_at_exit()
    return Loader(stream, batch_size=None, num_workers=num_workers, pin_memory=pin_memory, persistent_workers=False,
                  prefetch_factor=4 if num_workers else None, worker_init_fn=ignore_stop_signals)

class StepBatches(torch.utils.data.Sampler):
    """Keys (epoch, index) of this rank's share of each global batch, steps start..total; resumes by step alone."""
    def __init__(self, n: int, global_batch: int, start: int, total: int, seed: int, rank: int, world: int):
        self.n, self.gb, self.start, self.total, self.seed, self.rank, self.world = (
            n, global_batch, start, total, seed, rank, world)
    def __len__(self):
        return self.total - self.start
    def __iter__(self):
        per_epoch, perm = max(1, self.n // self.gb), None
        for s in range(self.start, self.total):
            epoch, j = divmod(s, per_epoch)
            if perm is None or j == 0:  # the first step, or a new epoch
                perm = torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed * 100_003 + epoch))
            yield [(epoch, int(i)) for i in perm[j * self.gb:(j + 1) * self.gb][self.rank::self.world]]

class DataPosition:
    """What the trainer consumed from each worker: the position to resume from and the skip counts."""
    def __init__(self):
        self.pos, self.skipped = {}, {}
    def update(self, batch: dict):
        self.pos[batch["__worker__"]] = batch["__pos__"]
        self.skipped[batch["__worker__"]] = batch["__skipped__"]
    def skip_totals(self) -> dict:
        return dict(sum(map(collections.Counter, self.skipped.values()), collections.Counter()))
    def state(self) -> dict:
        """{rank: {worker: [epoch, n]}} gathered from every rank (a collective: call on all ranks)."""
        mine = {int(w): list(p) for w, p in self.pos.items()}
        if get_world_size() > 1 and dist.is_initialized():
            dist.all_gather_object(every := [None] * get_world_size(), mine)
            return dict(enumerate(every))
        return {0: mine}

def write_shard(path: str, samples) -> int:
    """Samples {"__key__": key, suffix: bytes | str | dict | PIL.Image | np.ndarray} -> a tar, atomically; -> count."""
    tmp, n = path + ".tmp", 0
    with tarfile.open(tmp, "w") as tar:
        for n, s in enumerate(samples, 1):
            for suffix, value in s.items():
                if suffix != "__key__":
                    data, info = encode_member(suffix, value), tarfile.TarInfo(f"{s['__key__']}.{suffix}")
                    info.size, info.mtime = len(data), 0
                    tar.addfile(info, io.BytesIO(data))
    os.replace(tmp, path)
    return n

def encode_member(suffix: str, value) -> bytes:
    """bytes as they are, str as UTF-8, a PIL image in the format its suffix names, an array as .npy, else JSON."""
    if isinstance(value, (bytes, str)):
        return value.encode("utf-8") if isinstance(value, str) else value
    buf = io.BytesIO()
    if isinstance(value, Image.Image):
        fmt = {"jpg": "JPEG", "jpeg": "JPEG", "png": "PNG", "webp": "WEBP"}[suffix.rsplit(".", 1)[-1]]
        value.save(buf, format=fmt, **({"quality": 95} if fmt == "JPEG" else {}))
    elif isinstance(value, np.ndarray):
        np.save(buf, value)
    else:
        return json.dumps(value).encode("utf-8")  # dict / list / number -> .json
    return buf.getvalue()

def sample_rng(seed: int, sample: dict) -> random.Random:
    """Augmentation randomness fixed by (seed, epoch, key), so a resumed or re-sharded run draws the same crops."""
    return random.Random(zlib.crc32(f"{seed}/{sample.get('__epoch__', 0)}/{sample['__key__']}".encode()))

class ImageTextDecode:
    """Sample -> {image, ids, caption}: OpenCLIP's RandomResizedCrop (no flip: captions say left and right) or eval."""
    def __init__(self, tokenizer, image_size: int, context_length: int, train: bool = True, seed: int = 0,
                 scale=(0.9, 1.0), caption_key: str = "txt", resample=Image.BICUBIC):
        self.tokenizer, self.size, self.context_length, self.resample = tokenizer, image_size, context_length, resample
        self.train, self.seed, self.scale, self.caption_key = train, seed, scale, caption_key
    def __call__(self, sample: dict) -> dict:
        caption = decode_caption(sample, self.caption_key)
        if self.train:
            img = decode_image_tensor(sample)
            box = random_resized_crop_box(*image_wh(img), sample_rng(self.seed, sample), self.scale)
            image = image_to_uint8(img, self.size, box, self.resample)
        else:
            image = eval_transform(decode_image(sample), self.size, self.resample)
        return {"image": image, "ids": self.tokenizer([caption], self.context_length)[0], "caption": caption}

# The built-in synthetic world (no --data, no download), deterministic: captions (CLIP, CatLIP), masks and depth
# (SAM-CLIP, dense), a "year" drifting the distribution (TiC), a class label (retrieval, reinforce, transfer). A
# textured background, one main shape (sometimes 2-3), maybe 1-2 small distractors; the caption always names the
# main shape plainly ("a photo of a star." matches), plus colour, size, position, background and distractors.
SYNTH_SHAPES = ["circle", "square", "triangle", "star", "cross", "heart", "ring", "diamond", "arrow", "crescent"]
# Colours are ordered warm -> cool: the palette prior slides along this order from early to later years.
SYNTH_COLOURS = ["red", "orange", "yellow", "pink", "green", "cyan", "blue", "purple", "white"]
SYNTH_RGB = dict(zip(SYNTH_COLOURS, [(220, 40, 40), (245, 140, 20), (240, 220, 40), (240, 120, 180), (40, 170, 60),
                                     (40, 200, 210), (40, 80, 220), (140, 60, 200), (240, 240, 240)]))
SYNTH_TEXTURES = ["plain", "gradient", "noisy", "striped", "checkered"]  # also ordered from "early" to "late"
SYNTH_YEARS = (2014, 2023)  # inclusive
SYNTH_VERSION = "v2"  # part of the cache path: bump it whenever a change alters the generated samples
_SHAPE_TREND = (-1.0, -0.6, 0.2, 1.0, -0.2, 0.8, -0.8, 0.4, 0.6, -0.4)  # popularity with the year: -1 fades, +1 rises
_OUTLINE_SHAPES = ("star", "heart", "square")  # switch from filled to outlined drawings around 2019-2020
_POSITIONS = (("at the top left", "at the top", "at the top right"), ("on the left", "in the centre", "on the right"),
              ("at the bottom left", "at the bottom", "at the bottom right"))
# Caption phrasings with the first year each is used in: "icon" and "sticker" come later (vocabulary drift).
_TEMPLATES = ((2014, "{obj}"), (2014, "a photo of {obj}"), (2014, "an image showing {obj}"), (2014, "there {be} {obj}"),
              (2019, "{obj} {icon}"), (2020, "sticker of {obj}"))  # each followed by "{pos}{extra}{bg}"
# Like alt-text, captions drop size, colour, position, background with these probabilities; the shape word stays.
_DROP = (0.5, 0.65, 0.5, 0.7)
_SS = 4  # supersampling factor for anti-aliased shape edges

@functools.lru_cache(maxsize=None)
def _shape_geometry(name: str, outlined: bool) -> tuple:
    """((points (N, 2), fill), ...) in unit coordinates, y down; fill 0 erases (holes), in order."""
    def ngon(n, r=1.0, inner=None):  # regular polygon, or a star with `inner`
        k = 2 * n if inner else n
        a, rad = -math.pi / 2 + 2 * math.pi * np.arange(k) / k, np.where(np.arange(k) % 2 == 1, inner or r, r)
        return np.stack([rad * np.cos(a), rad * np.sin(a)], 1)
    circle, t = ngon(40), np.linspace(0, 2 * math.pi, 48, endpoint=False)
    heart_y = -(13 * np.cos(t) - 5 * np.cos(2 * t) - 2 * np.cos(3 * t) - np.cos(4 * t))
    bar = np.array([[-1, -0.3], [1, -0.3], [1, 0.3], [-1, 0.3]])  # cross: a plus sign, two crossed bars
    ops = {"circle": [(circle, 1)], "square": [(np.array([[-1, -1], [1, -1], [1, 1], [-1, 1]]) * 0.8, 1)],
           "triangle": [(ngon(3, 1.1) + [0, 0.15], 1)], "star": [(ngon(5, 1.05, inner=0.42), 1)],
           "cross": [(bar, 1), (bar[:, ::-1], 1)], "ring": [(circle, 1), (circle * 0.55, 0)],
           "heart": [(np.stack([16 * np.sin(t) ** 3, heart_y + 2.5], 1) / 16.0, 1)],
           "crescent": [(circle, 1), (circle * 0.85 + [0.45, -0.25], 0)],
           "diamond": [(np.array([[0, -1.1], [0.6, 0], [0, 1.1], [-0.6, 0]]), 1)],  # never a rotated square
           "arrow": [(np.array([[-1, -0.28], [0.1, -0.28], [0.1, -0.7], [1, 0],  # points right
                                [0.1, 0.7], [0.1, 0.28], [-1, 0.28]]), 1)]}[name]
    if outlined:  # erasing a shrunken copy leaves a thick outline
        ops.append((ops[0][0] * 0.58, 0))
    return tuple((np.asarray(p, np.float64), f) for p, f in ops)

def _drift_probs(trend: np.ndarray, u: float, strength: float) -> np.ndarray:
    """Categorical prior that tilts smoothly with u = year position in [0, 1]."""
    w = np.exp(strength * (u - 0.5) * np.asarray(trend, np.float64))
    return w / w.sum()

def _coverage(ops, centre, radius, angle, size):
    """Anti-aliased coverage (size, size) in [0, 1], drawn at _SS x and box-filtered; mask = coverage >= 0.5."""
    canvas = Image.new("L", (size * _SS, size * _SS), 0)
    c, s = math.cos(angle), math.sin(angle)
    rot = np.array([[c, -s], [s, c]]) * radius * _SS
    # PIL samples pixel j at integer coordinate j: shift by half a pixel so x maps to pixel centres.
    offset = np.asarray(centre) * _SS - 0.5
    for pts, fill in ops:
        ImageDraw.Draw(canvas).polygon((pts @ rot.T + offset).ravel().tolist(), fill=255 * fill)
    return np.asarray(canvas.reduce(_SS), dtype=np.float32) / 255.0

def _background(rng, size, texture, dark, light, xx, yy):
    """Texture field f in [0, 1] mixing two tones of the background colour."""
    a = rng.uniform(0, math.pi)
    u = xx * math.cos(a) + yy * math.sin(a)  # coordinate along a random angle
    if texture == "plain":
        f = np.full_like(xx, 0.5)
    elif texture == "gradient":
        f = (u - u.min()) / (np.ptp(u) + 1e-6)
    elif texture == "striped":
        f = (np.sin(2 * math.pi * u / rng.uniform(0.12, 0.25)) > 0).astype(np.float32)
    elif texture == "checkered":
        v, p = -xx * math.sin(a) + yy * math.cos(a), rng.uniform(0.12, 0.22)
        f = ((np.floor(u / p) + np.floor(v / p)) % 2).astype(np.float32)
    else:  # "noisy": smooth value noise, a low-res random grid upsampled
        low = Image.fromarray(rng.random((6, 6)).astype(np.float32))
        f = np.asarray(low.resize((size, size), Image.BILINEAR), np.float32)
    return dark + f[..., None] * (light - dark)

def _place(rng, size, radius, others, tries=16):
    """Of a few centres inside the image, the one least overlapping `others` (centre distance / sum of radii)."""
    best, best_score = None, -1.0
    for _ in range(tries):
        c = rng.uniform(radius * 1.05, size - radius * 1.05, 2)
        score = min([np.hypot(*(c - oc)) / (radius + r) for oc, r in others] + [9.0])
        if score > best_score:
            best, best_score = c, score
        if score > 0.9:  # good enough
            break
    return best

def render_sample(rng: np.random.Generator, size: int = 64, year: int | None = None) -> dict:
    """One sample: image, caption, label, mask, depth, year (see module notes)."""
    y0, y1 = SYNTH_YEARS
    year = int(rng.integers(y0, y1 + 1)) if year is None else int(year)
    u = (year - y0) / (y1 - y0)
    # --- year-drifted choices of class, colours, texture, style, clutter
    label = int(rng.choice(len(SYNTH_SHAPES), p=_drift_probs(_SHAPE_TREND, u, 1.6)))
    shape, colour_p = SYNTH_SHAPES[label], _drift_probs(np.linspace(-1, 1, len(SYNTH_COLOURS)), u, 1.6)
    colour = SYNTH_COLOURS[rng.choice(len(SYNTH_COLOURS), p=colour_p)]
    bg_p = colour_p * (np.arange(len(SYNTH_COLOURS)) != SYNTH_COLOURS.index(colour))
    bg_colour = SYNTH_COLOURS[rng.choice(len(SYNTH_COLOURS), p=bg_p / bg_p.sum())]  # != colour
    texture = SYNTH_TEXTURES[rng.choice(5, p=_drift_probs(np.linspace(-1, 1, 5), u, 2.0))]
    outlined = shape in _OUTLINE_SHAPES and rng.random() < 1.0 / (1.0 + math.exp(-1.2 * (year - 2019.5)))
    count = int(rng.choice([1, 2, 3], p=[0.86, 0.09, 0.05]))
    n_distract = int(rng.choice([0, 1, 2], p=[0.75 - 0.2 * u, 0.17 + 0.1 * u, 0.08 + 0.1 * u]))
    # --- background: two close tones of its colour (texture weaker than object edges), dark under bright objects
    bg, bright = np.array(SYNTH_RGB[bg_colour], np.float32), np.dot(SYNTH_RGB[colour], [0.299, 0.587, 0.114]) > 115
    dark, light = (bg * 0.28, bg * 0.42) if bright else (bg + (255 - bg) * 0.55, bg + (255 - bg) * 0.7)
    yy, xx = (np.mgrid[0:size, 0:size].astype(np.float32) + 0.5) / size
    img = _background(rng, size, texture, dark, light, xx, yy)
    ta = rng.uniform(0, 2 * math.pi)  # depth: the background is a tilted plane in [0, 0.4] (1 = near)
    depth = 0.2 + 0.28 * ((xx - 0.5) * math.cos(ta) + (yy - 0.5) * math.sin(ta))
    # --- objects back to front, distractors first (the labelled class is never hidden), main copies placed first
    objects, placed, mask = [], [], np.zeros((size, size), np.uint8)  # objects: (class, colour, centre, r, outlined)
    main_r = size * (rng.uniform(0.2, 0.38) if count == 1 else rng.uniform(0.13, 0.2))
    for _ in range(count):
        placed.append((_place(rng, size, main_r, placed), main_r))
    for _ in range(n_distract):
        k = int(rng.choice([j for j in range(len(SYNTH_SHAPES)) if j != label]))
        dcol = SYNTH_COLOURS[rng.choice([j for j, c in enumerate(SYNTH_COLOURS) if c != bg_colour])]
        r = size * rng.uniform(0.08, 0.12)
        placed.append((_place(rng, size, r, placed), r))
        objects.append((k, dcol, placed[-1][0], r, False))
    extra = "".join(f" and a small {col} {SYNTH_SHAPES[k]}" for k, col, *_ in objects)
    objects += [(label, colour, c, main_r, outlined) for c, _ in placed[:count]]
    for level, (k, col, c, r, outl) in enumerate(objects):
        ops = _shape_geometry(SYNTH_SHAPES[k], outl)
        alpha = _coverage(ops, c, r, rng.uniform(-0.5, 0.5), size)[..., None]
        tint = np.clip(np.array(SYNTH_RGB[col]) + rng.normal(0, 10, 3), 0, 255)
        img = img * (1 - alpha) + tint.astype(np.float32) * alpha
        mask[(hit := alpha[..., 0] >= 0.5)] = 1 + k
        d2 = ((xx * size - c[0]) ** 2 + (yy * size - c[1]) ** 2) / r ** 2
        depth[hit] = (0.5 + 0.1 * level + 0.06 * np.clip(1 - d2, 0, 1))[hit]  # a dome, nearer than all before
    img += rng.standard_normal(img.shape, dtype=np.float32) * 4.0  # sensor noise
    image = Image.fromarray(np.clip(img + 0.5, 0, 255).astype(np.uint8), "RGB")
    # --- caption
    size_w = "small" if main_r < 0.25 * size else "medium" if main_r < 0.31 * size else "large"
    style = ("outlined ", "hollow ")[int(rng.integers(2))] if outlined else ""
    keep = rng.random(4) >= np.array(_DROP)  # size, colour, position, background
    col_w = colour + " " if keep[1] else ""
    cx, cy = np.clip((placed[0][0] / size * 3).astype(int), 0, 2)
    where = _POSITIONS[cy][cx] if count == 1 else ""  # several copies: a count word, no single position
    if count == 1:
        obj = (size_w + " " if keep[0] else "") + col_w + style + shape
        obj = ("an " if obj[0] in "aeiou" else "a ") + obj
    else:  # a count word and the plural
        obj = f"{('two', 'three')[count - 2]} {col_w}{style}{shape}{'es' if shape.endswith('ss') else 's'}"
    pos, usable = " " + where if where and keep[2] else "", [t for y, t in _TEMPLATES if y <= year]
    caption = (usable[int(rng.integers(len(usable)))] + "{pos}{extra}{bg}").format(
        obj=obj, pos=pos, extra=extra, be=("is", "are")[count > 1], icon=("icon", "as icons")[count > 1],
        bg=f" on a {texture} {bg_colour} background" if keep[3] else "")
    caption += "." if rng.random() < 0.5 else ""
    # every attribute, dropped or not: ground truth for an accurate captioner (MobileCLIP's synthetic captions)
    scene = {"shape": shape, "count": count, "size": size_w, "colour": colour, "outlined": outlined,
             "position": where, "texture": texture, "background": bg_colour,
             "distractors": [[col, SYNTH_SHAPES[k]] for k, col, *_ in objects[:n_distract]]}
    return {"image": image, "caption": caption, "label": label, "mask": mask, "scene": scene,
            "depth": np.clip(depth, 0, 1).astype(np.float32), "year": year}

def synthetic_split(seed: int, n: int, size: int, split: str,
                    years: tuple[int, int] | None = None, start: int = 0) -> typing.Iterator[dict]:
    """n samples of a split, sample i seeded by (seed, split, i) alone; `years` (inclusive) restricts the year."""
    for i in range(start, start + n):
        rng = np.random.default_rng(np.random.SeedSequence([seed, ("train", "val", "test").index(split), i]))
        year = None if years is None else int(rng.integers(years[0], years[1] + 1))
        yield {**render_sample(rng, size, year), "key": f"{split}{i:07d}"}

def _render_shard(args) -> int:
    """Render synthetic samples [lo, hi) of `split` into one tar shard, or into an ImageFolder."""
    path, split, seed, lo, hi, size, folder = args
    def samples():
        for s in synthetic_split(seed, hi - lo, size, split, start=lo):  # sample i is seeded by i alone
            key = s["key"]
            if folder:  # zero-shot ImageFolder: class folder / key.png
                d = os.path.join(folder, SYNTH_SHAPES[s["label"]])
                os.makedirs(d, exist_ok=True)
                s["image"].save(os.path.join(d, key + ".png"))
            depth16 = Image.fromarray((s["depth"] * 65535).astype(np.uint16))  # 16-bit PNG, 1 = near
            yield {"__key__": key, "jpg": s["image"], "txt": s["caption"], "seg.png": Image.fromarray(s["mask"]),
                   "depth.png": depth16, "json": {"label": int(s["label"]), "classname": SYNTH_SHAPES[s["label"]],
                                                  "year": int(s["year"]), "scene": s["scene"]}}
    return write_shard(path, samples())

def synthetic_world(cache_dir: str, n_train: int, n_val: int, size: int, seed: int = 0,
                    shard_size: int = 5000, workers: int | None = None) -> dict:
    """The world, made once by rank 0 in `cache_dir`: paths of train, val (shards), val_folder, and classnames."""
    root = os.path.join(cache_dir, f"synthetic-{SYNTH_VERSION}-{n_train}-{n_val}-{size}px-seed{seed}")
    out = {"root": root, **{k: os.path.join(root, k) for k in ("train", "val", "val_folder")},
           "classnames": sorted(SYNTH_SHAPES)}
    done = os.path.join(root, "DONE")
    if get_rank() == 0 and not os.path.exists(done):
        os.makedirs(out["train"], exist_ok=True)
        os.makedirs(out["val"], exist_ok=True)
        jobs = [(os.path.join(out[split], f"{split}-{j:05d}.tar"), split, seed, lo, min(lo + shard_size, n),
                 size, out["val_folder"] if split == "val" else "")
                for split, n in (("train", n_train), ("val", n_val))
                for j, lo in enumerate(range(0, n, shard_size))]
        t0 = time.time()
        print0(f"generating the synthetic world ({n_train} train + {n_val} val images, {size}px) in {root}")
        with concurrent.futures.ProcessPoolExecutor(workers or os.cpu_count()) as pool:
            total = sum(progress(pool.map(_render_shard, jobs), "synthetic world", total=len(jobs)))
        open(done, "w").write(json.dumps({"samples": total, "seconds": round(time.time() - t0, 1)}))
    barrier()
    return out

# ==== 6. Losses shared by several papers ==============================================================
def contrastive_loss(img: torch.Tensor, txt: torch.Tensor, logit_scale: torch.Tensor) -> torch.Tensor:
    """CLIP's symmetric InfoNCE (open_clip's `local_loss`): this rank's B rows against the W*B gathered columns, fp32,
    no host sync. img, txt: (B, E) normalised; logit_scale: the scale itself. Rank mean = the one-process loss."""
    B = img.shape[0]
    all_img, all_txt = all_gather_with_grad(img), all_gather_with_grad(txt)  # (W*B, E)
    labels = torch.arange(B, device=img.device) + get_rank() * B
    logits_i2t = logit_scale.float() * img.float() @ all_txt.float().T  # (B, W*B)
    logits_t2i = logit_scale.float() * txt.float() @ all_img.float().T  # (B, W*B)
    return (F.cross_entropy(logits_i2t, labels) + F.cross_entropy(logits_t2i, labels)) / 2

def contrastive_loss_reference(img: torch.Tensor, txt: torch.Tensor, logit_scale: torch.Tensor) -> torch.Tensor:
    """Full-matrix version (one process): -mean log-softmax of the diagonal by rows (i -> t) and columns (t -> i)."""
    logits = logit_scale.float() * img.float() @ txt.float().T  # (N, N), row i = image i
    diag = torch.arange(len(logits), device=logits.device)
    i2t, t2i = -logits.log_softmax(dim=1)[diag, diag].mean(), -logits.log_softmax(dim=0)[diag, diag].mean()
    return (i2t + t2i) / 2

# ==== 7. Optimisation =================================================================================
NO_DECAY_NAMES = ("cls_token", "pos_embed", "token_embed", "logit_scale", "class_embedding", "positional_embedding")

def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on matrices and conv kernels only: not on norms, biases, embeddings, logit scale."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if p.ndim < 2 or any(n in name for n in NO_DECAY_NAMES) else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]

def make_adamw(model: nn.Module, lr: float, weight_decay: float, betas=(0.9, 0.98), eps: float = 1e-6):
    """AdamW over param_groups, the fused CUDA kernel when the parameters are on a GPU."""
    fused = next(model.parameters()).is_cuda
    return torch.optim.AdamW(param_groups(model, weight_decay), lr=lr, betas=betas, eps=eps, fused=fused)

def lr_at(step: int, base_lr: float, warmup: int, total: int, min_ratio: float = 0.0) -> float:
    """Linear warm-up over `warmup` steps, then cosine decay to `min_ratio * base_lr` at `total`."""
    if step < warmup:
        return base_lr * (step + 1) / warmup
    t = min(1.0, (step - warmup) / max(1, total - warmup))
    return base_lr * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * t)))

def set_lr(optimizer: torch.optim.Optimizer, lr: float):
    for g in optimizer.param_groups:
        g["lr"] = lr

# ==== 8. Checkpoints ==================================================================================
def save_checkpoint(path: str, state: dict):
    """Rank 0 writes `state` (tensors and primitives: weights_only loads it) to a temporary file, then renames it."""
    if get_rank() != 0:
        return
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    torch.save(state, path + ".tmp")
    os.replace(path + ".tmp", path)

def checkpoints(out_dir: str) -> list[str]:
    """The `ckpt-<step>.pt` files of `out_dir`, oldest step first."""
    found = [(int(m.group(1)), p) for p in glob.glob(os.path.join(out_dir, "ckpt-*.pt"))
             if (m := re.search(r"ckpt-(\d+)\.pt$", p))]
    return [p for _, p in sorted(found)]

def latest_checkpoint(out_dir: str) -> str | None:
    return (checkpoints(out_dir) or [None])[-1]

def read_checkpoint(path: str) -> dict:
    """A checkpoint file as a dict (weights_only: no pickled code runs); raises ValueError saying why not."""
    if os.path.getsize(path) == 0:
        raise ValueError("empty file (0 bytes)")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ValueError(f"{type(e).__name__}: {' '.join(str(e).split()).split('. ')[0][:200]}") from None
    if not isinstance(state, dict):
        raise ValueError(f"holds a {type(state).__name__}, not a checkpoint dict")
    return state

_SAFE_GLOBALS = {("builtins", n) for n in ("dict", "list", "tuple", "set", "frozenset", "bytearray", "complex", "slice",
                 "range")} | {("collections", "OrderedDict"), ("collections", "Counter"), ("_codecs", "encode")}
_NUMPY_GLOBALS = {(m, n) for m in ("numpy.core.multiarray", "numpy._core.multiarray")
                  for n in ("_reconstruct", "scalar")} | {("numpy", "ndarray"), ("numpy", "dtype")}

class _SafeUnpickler(pickle.Unpickler):
    """Admits containers, strings and numbers (numpy arrays if asked); refuses any other global before importing it."""
    allowed = _SAFE_GLOBALS
    def find_class(self, module, name):
        module = {"__builtin__": "builtins"}.get(module, module)  # protocol <= 2 names Python 2's module
        if (module, name) in self.allowed or (module.startswith("numpy") and name.endswith("DType")
                                              and _NUMPY_GLOBALS <= self.allowed):
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refused global {module}.{name}: only containers, strings and numbers load")

def safe_unpickle(source, numpy: bool = False):
    """A pickle (path, bytes or file; gzip detected) read without running code; ValueError (one line) if it fails."""
    what = source if isinstance(source, str) else "pickle"
    try:
        if isinstance(source, str):
            with open(source, "rb") as f:
                source = f.read()
        data = source if isinstance(source, (bytes, bytearray)) else source.read()
        u = _SafeUnpickler(io.BytesIO(gzip.decompress(data) if data[:2] == b"\x1f\x8b" else data))
        u.allowed = _SAFE_GLOBALS | (_NUMPY_GLOBALS if numpy else set())
        return u.load()
    except Exception as e:
        raise ValueError(f"{what}: {type(e).__name__}: {(str(e).strip().splitlines() or [''])[0][:200]}") from None

def load_checkpoint(path: str, out_dir: str) -> dict | None:
    """`path`: "" (fresh), "auto" (the newest checkpoint in out_dir that reads, each skipped one named) or a file."""
    if not path:
        return None
    if path == "auto":
        found = checkpoints(out_dir)
        for p in reversed(found):
            try:
                return read_checkpoint(p)
            except (ValueError, OSError) as e:
                print0(f"resume: skipping {p}, it does not read ({e})", file=sys.stderr)
        if found:
            fail(f"none of the {len(found)} checkpoints in {out_dir} reads; move them away to start over")
        return None  # nothing to resume: start fresh
    if not os.path.isfile(path):
        fail(f"checkpoint not found: {path}")
    try:
        return read_checkpoint(path)
    except (ValueError, OSError) as e:
        fail(f"cannot read checkpoint {path}: {e}")

def prune_checkpoints(out_dir: str, keep: int, written: str | None = None):
    """Delete all but the `keep` newest checkpoints (rank 0); never `written`, the one just saved."""
    if get_rank() == 0 and keep > 0:
        for p in checkpoints(out_dir)[:-keep]:
            if not (written and os.path.samefile(p, written)):
                os.remove(p)

def rng_state() -> dict:
    cuda = {"cuda": torch.cuda.get_rng_state()} if torch.cuda.is_available() else {}
    return {"torch": torch.get_rng_state(), "python": list(random.getstate()[1]), **cuda}

def set_rng_state(s: dict):
    torch.set_rng_state(s["torch"])
    random.setstate((3, tuple(s["python"]), None))
    if "cuda" in s and torch.cuda.is_available():
        torch.cuda.set_rng_state(s["cuda"])

class StopSignal:
    """SIGTERM/SIGINT (pre-emption, Ctrl-C) -> a flag the loop checks, to save a checkpoint and exit cleanly."""
    def __init__(self):
        self.requested = False
        kill_workers_at_exit()
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._handler)
    def _handler(self, signum, frame):
        self.requested = True
        print(f"rank {get_rank()}: got signal {signum}, stopping at the next step", file=sys.stderr, flush=True)
    def agreed(self, device) -> bool:
        """True on every rank if any rank was signalled (a collective: call on all ranks at once)."""
        if get_world_size() == 1 or not dist.is_initialized():
            return self.requested
        flag = torch.tensor([float(self.requested)], device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())

# ==== 9. Evaluation ===================================================================================
# A small prompt ensemble; for ImageNet-style zero-shot pass your own with --templates FILE.
DEFAULT_TEMPLATES = ("a photo of a {}.", "a picture of a {}.", "an image of a {}.", "a {} in a photo.",
                     "a close-up photo of a {}.", "a rendering of a {}.", "a drawing of a {}.")

# The 80 prompts of OpenAI's ImageNet notebook, in its order, as OpenCLIP's and ml-mobileclip's zero-shot average.
OPENAI_IMAGENET_TEMPLATES = (
    "a bad photo of a {}.", "a photo of many {}.", "a sculpture of a {}.", "a photo of the hard to see {}.",
    "a low resolution photo of the {}.", "a rendering of a {}.", "graffiti of a {}.", "a bad photo of the {}.",
    "a cropped photo of the {}.", "a tattoo of a {}.", "the embroidered {}.", "a photo of a hard to see {}.",
    "a bright photo of a {}.", "a photo of a clean {}.", "a photo of a dirty {}.", "a dark photo of the {}.",
    "a drawing of a {}.", "a photo of my {}.", "the plastic {}.", "a photo of the cool {}.",
    "a close-up photo of a {}.", "a black and white photo of the {}.", "a painting of the {}.", "a painting of a {}.",
    "a pixelated photo of the {}.", "a sculpture of the {}.", "a bright photo of the {}.", "a cropped photo of a {}.",
    "a plastic {}.", "a photo of the dirty {}.", "a jpeg corrupted photo of a {}.", "a blurry photo of the {}.",
    "a photo of the {}.", "a good photo of the {}.", "a rendering of the {}.", "a {} in a video game.",
    "a photo of one {}.", "a doodle of a {}.", "a close-up photo of the {}.", "a photo of a {}.", "the origami {}.",
    "the {} in a video game.", "a sketch of a {}.", "a doodle of the {}.", "a origami {}.",
    "a low resolution photo of a {}.", "the toy {}.", "a rendition of the {}.", "a photo of the clean {}.",
    "a photo of a large {}.", "a rendition of a {}.", "a photo of a nice {}.", "a photo of a weird {}.",
    "a blurry photo of a {}.", "a cartoon {}.", "art of a {}.", "a sketch of the {}.", "a embroidered {}.",
    "a pixelated photo of a {}.", "itap of the {}.", "a jpeg corrupted photo of the {}.", "a good photo of a {}.",
    "a plushie {}.", "a photo of the nice {}.", "a photo of the small {}.", "a photo of the weird {}.",
    "the cartoon {}.", "art of the {}.", "a drawing of the {}.", "a photo of the large {}.",
    "a black and white photo of a {}.", "the plushie {}.", "a dark photo of a {}.", "itap of a {}.",
    "graffiti of the {}.", "a toy {}.", "itap of my {}.", "a photo of a cool {}.", "a photo of a small {}.",
    "a tattoo of the {}.")

def templates_arg(spec: str) -> tuple[str, ...]:
    """--templates: "openai" (the 80 above), "default" (the 7 above) or a file, one template with one "{}" a line."""
    if spec in ("openai", "default"):
        return OPENAI_IMAGENET_TEMPLATES if spec == "openai" else DEFAULT_TEMPLATES
    found = read_lines(spec)
    if bad := [t for t in found if t.count("{}") != 1]:
        fail(f"{spec}: every template needs exactly one '{{}}' for the class name; not {bad[0]!r}")
    return tuple(found)

def read_lines(path: str) -> list[str]:
    if not os.path.isfile(path):
        fail(f"file not found: {path}")
    with open(path, encoding="utf-8") as f:
        return [line.strip() for line in f if line.strip()]

def image_folder(root: str, classnames: list[str] | None = None) -> tuple[list[tuple[str, int]], list[str]]:
    """torchvision's ImageFolder listing -> ([(path, label)], classnames): folder names ('_' as space) unless given."""
    from torchvision.datasets.folder import IMG_EXTENSIONS, find_classes, make_dataset
    if not os.path.isdir(root):
        fail(f"image folder not found: {root}")
    try:
        folders, class_to_idx = find_classes(root)
    except FileNotFoundError:
        fail(f"no class folders in {root}")
    if classnames is not None and len(classnames) != len(folders):
        fail(f"{len(classnames)} class names for {len(folders)} class folders in {root}")
    items = make_dataset(root, class_to_idx, extensions=IMG_EXTENSIONS, allow_empty=True)
    if not items:
        fail(f"no images ({', '.join(IMG_EXTENSIONS)}) in the class folders of {root}")
    return items, classnames or [d.replace("_", " ") for d in folders]

@torch.no_grad()
def zeroshot_classifier(model, tokenizer, classnames: list[str], templates, device, context_length: int):
    """(E, C) classifier: per class, the renormalised mean of its prompts' normalised text embeddings (CLIP)."""
    weights = []
    for name in classnames:
        ids = tokenizer([t.format(name) for t in templates], context_length).to(device)
        weights.append(F.normalize(F.normalize(model.encode_text(ids).float(), dim=-1).mean(dim=0), dim=0))
    return torch.stack(weights, dim=1)

def eval_images(paths: list[str], size: int, resample=Image.BICUBIC) -> torch.Tensor:
    """Image files -> uint8 (N, 3, size, size) by `eval_transform` (PIL decode and resize: OpenCLIP's pixels)."""
    return torch.stack([eval_transform(Image.open(p), size, resample) for p in paths])

@torch.no_grad()
def zeroshot_eval(model, classifier, items, image_size: int, device, batch_size: int = 256,
                  mean=CLIP_MEAN, std=CLIP_STD, resample=Image.BICUBIC, desc: str = "zero-shot") -> dict:
    """Top-1 and top-5 accuracy (%) of the zero-shot classifier on [(path, label)]."""
    correct1 = correct5 = 0
    for i in progress(range(0, len(items), batch_size), desc):
        chunk = items[i:i + batch_size]
        x = normalize_images(eval_images([p for p, _ in chunk], image_size, resample).to(device), mean, std)
        y = torch.tensor([l for _, l in chunk], device=device)
        logits = F.normalize(model.encode_image(x).float(), dim=-1) @ classifier
        top = logits.topk(min(5, logits.shape[1]), dim=1).indices
        correct1 += (top[:, 0] == y).sum().item()
        correct5 += (top == y[:, None]).any(dim=1).sum().item()
    return {"zeroshot_top1": 100 * correct1 / len(items), "zeroshot_top5": 100 * correct5 / len(items)}

@torch.no_grad()
def retrieval_eval(img_emb: torch.Tensor, txt_emb: torch.Tensor) -> dict:
    """Recall@1/5/10 (%) of image->text and text->image retrieval for paired (N, E) embeddings (i matches i)."""
    sim = F.normalize(img_emb.float(), dim=-1) @ F.normalize(txt_emb.float(), dim=-1).T  # (N, N)
    target, out = torch.arange(len(sim), device=sim.device), {}
    for name, s in (("i2t", sim), ("t2i", sim.T)):
        rank = (s > s[target, target][:, None]).sum(dim=1)  # how many beat the true match
        out.update({f"retrieval_{name}_r{k}": 100 * (rank < k).float().mean().item() for k in (1, 5, 10)})
    return out

def confusion_matrix(pred: torch.Tensor, label: torch.Tensor, num_classes: int, ignore_index: int = 255,
                     reduce_zero_label: bool = False) -> torch.Tensor:
    """(K, K) int64, rows = truth; `reduce_zero_label`: mmseg's ADE20K rule (0 ignored, others - 1). Sum, then miou."""
    label = label.long()
    if reduce_zero_label:
        label = torch.where((label == 0) | (label == ignore_index), ignore_index, label - 1)
    keep = (label != ignore_index) & (label >= 0) & (label < num_classes)
    idx = label[keep] * num_classes + pred.long()[keep].clamp(0, num_classes - 1)
    return torch.bincount(idx, minlength=num_classes * num_classes).view(num_classes, num_classes).cpu()

def miou(conf: torch.Tensor, per_class: bool = False):
    """Mean IoU (%), mmseg's IoUMetric: empty-union classes left out (NaN in the IoUs per_class=True returns)."""
    conf = conf.double()
    inter = conf.diag()
    union = conf.sum(0) + conf.sum(1) - inter
    iou = torch.where(union > 0, inter / union.clamp(min=1), torch.full_like(inter, float("nan"))) * 100
    m = iou.nanmean().item() if (union > 0).any() else float("nan")
    return (m, iou) if per_class else m

# ==== 10. Logging =====================================================================================
def progress(iterable, desc: str, **kw):
    """A tqdm bar on rank 0 when stderr is a terminal or for long loops; plain iteration otherwise."""
    from tqdm import tqdm
    return tqdm(iterable, desc=desc, disable=get_rank() != 0 or not sys.stderr.isatty(), leave=False, **kw)

class RunLog:
    """Rank 0: one console line per call, and one JSON object in OUT/log.jsonl (`step`, then metrics by name)."""
    def __init__(self, out_dir: str):
        self.path = os.path.join(out_dir, "log.jsonl")
        if get_rank() == 0:
            os.makedirs(out_dir, exist_ok=True)
    def log(self, step: int, **metrics):
        if get_rank() != 0:
            return
        rec = {"step": step, **{k: (round(v, 6) if isinstance(v, float) else v) for k, v in metrics.items()}}
        with open(self.path, "a") as f:
            f.write(json.dumps(rec) + "\n")
        print(" | ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in rec.items()), flush=True)

def finish_run(out_dir: str, checkpoint: str | None = None, extra: str = ""):
    """Rank 0: the run's last line says where its results are."""
    where = [f"run directory {out_dir}"] + ([f"final checkpoint {checkpoint}"] if checkpoint else [])
    print0("results: " + " | ".join(where + [f"log {os.path.join(out_dir, 'log.jsonl')}"] + ([extra] if extra else [])))

def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)  # signal 0: only checks that the process exists
        return True
    except PermissionError:  # someone else's live process
        return True
    except ProcessLookupError:
        return False

def claim_out(out_dir: str, resume: str = "", overwrite: bool = False):
    """One run per directory (rank 0; OUT/run.lock, a dead holder's taken over). A fresh run over another run's
    checkpoints stops with one line, or with `overwrite` moves them to OUT/previous-N/ (nothing deleted)."""
    if get_rank() != 0:
        return
    os.makedirs(out_dir, exist_ok=True)
    lock, host = os.path.join(out_dir, "run.lock"), socket.gethostname()
    me = {"pid": os.getpid(), "host": host, "started": time.strftime("%Y-%m-%d %H:%M:%S")}
    while True:
        try:
            with os.fdopen(os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY), "w") as f:
                json.dump(me, f)
            atexit.register(lambda: os.path.exists(lock) and _read_json(lock).get("pid") == me["pid"]
                            and os.remove(lock))
            break
        except FileExistsError:
            held = _read_json(lock)
            if held.get("host") == host and held.get("pid") == me["pid"]:
                break  # this process already holds it (a script that runs several stages into one directory)
            if held.get("host") == host and not _alive(int(held.get("pid", 0))):
                print0(f"note: taking over the lock of a run that is gone (pid {held.get('pid')}, "
                       f"started {held.get('started')}): {lock}")
                os.remove(lock)
                continue
            fail(f"{out_dir} is in use by another run (pid {held.get('pid')} on {held.get('host')}, started "
                 f"{held.get('started')}); choose another --out, or delete {lock} if that run is gone")
    old = checkpoints(out_dir)
    if old and not resume:
        if not overwrite:
            fail(f"{out_dir} holds another run's checkpoints ({os.path.basename(old[-1])}, {len(old)} in all): "
                 f"pass --resume auto to continue it, --overwrite to start over (its files move to "
                 f"{out_dir}/previous-N/), or another --out")
        keep = os.path.join(out_dir, f"previous-{1 + sum(d.startswith('previous-') for d in os.listdir(out_dir))}")
        os.makedirs(keep)
        for p in old + [p for f in ("log.jsonl", "config.json") if os.path.exists(p := os.path.join(out_dir, f))]:
            os.replace(p, os.path.join(keep, os.path.basename(p)))
        print0(f"--overwrite: the earlier run's checkpoints and log moved to {keep}")

def _read_json(path: str) -> dict:
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return {}

def document_run(out_dir: str, cfg, scripts: list[str]):
    """Rank 0: `claim_out`, config.json, copies of the scripts, a start record in log.jsonl, a line of versions."""
    claim_out(out_dir, getattr(cfg, "resume", ""), getattr(cfg, "overwrite", False))
    if get_rank() != 0:
        return
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(dataclasses.asdict(cfg), f, indent=1)
    for s in scripts:
        shutil.copy(s, os.path.join(out_dir, os.path.basename(s)))
    versions = {"torch": torch.__version__, "torchvision": torchvision.__version__, "python": sys.version.split()[0],
                "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
                "world": get_world_size()}
    with open(os.path.join(out_dir, "log.jsonl"), "a") as f:
        f.write(json.dumps({"event": "start", "time": time.strftime("%Y-%m-%d %H:%M:%S"), "argv": sys.argv,
                            "config": dataclasses.asdict(cfg), "versions": versions}) + "\n")
    print0(" | ".join(f"{k} {v}" for k, v in versions.items()) + f" | threads {torch.get_num_threads()}")
