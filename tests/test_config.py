"""The dataclass -> CLI generator, LR schedule, parameter groups and checkpoints."""
import os
from dataclasses import dataclass

import pytest
import torch

import common as C


@dataclass
class Cfg:
    steps: int = 10  # how many steps
    lr: float = 1e-3  # learning rate
    name: str = "x"  # a name
    compile: bool = False  # compile it
    init: str | None = None  # optional path


def test_parse_config_flags_and_help(capsys):
    cfg = C.parse_config(Cfg, ["--steps", "5", "--lr", "0.5", "--compile", "--init", "a.pt"], verbose=False)
    assert cfg == Cfg(steps=5, lr=0.5, name="x", compile=True, init="a.pt")
    assert C.parse_config(Cfg, ["--no-compile"], verbose=False).compile is False
    with pytest.raises(SystemExit):
        C.parse_config(Cfg, ["--stepz", "5"], verbose=False)
    assert "unrecognized arguments: --stepz" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        C.parse_config(Cfg, ["--help"], verbose=False)
    assert "learning rate" in capsys.readouterr().out


def test_lr_schedule():
    lrs = [C.lr_at(s, 1.0, 10, 100) for s in range(101)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert lrs[55] == pytest.approx(0.5) and lrs[100] == pytest.approx(0.0)
    assert all(a >= b for a, b in zip(lrs[9:], lrs[10:]))


def test_no_weight_decay_on_norms_biases_embeddings():
    model = C.build_clip(image_size=16, patch=8, width=32, layers=1, heads=1, embed_dim=8, text_width=32,
                         text_layers=1, text_heads=1, vocab_size=50, context_length=8)
    decay, no_decay = C.param_groups(model, 0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    assert all(p.ndim >= 2 and not any(s in names[id(p)] for s in ("token_embed", "pos_embed")) for p in decay["params"])
    no = {names[id(p)] for p in no_decay["params"]}
    assert {"logit_scale", "visual.cls_token", "visual.pos_embed", "text.token_embed.weight"} <= no
    assert "visual.blocks.0.attn.qkv.weight" not in no


def test_checkpoint_atomic_and_latest(tmp_path):
    for step in (5, 20, 10):
        C.save_checkpoint(str(tmp_path / f"ckpt-{step}.pt"), {"step": step, "w": torch.ones(2)})
    assert C.latest_checkpoint(str(tmp_path)).endswith("ckpt-20.pt")
    assert C.load_checkpoint("auto", str(tmp_path))["step"] == 20
    assert not list(tmp_path.glob("*.tmp"))
    C.prune_checkpoints(str(tmp_path), 1)
    assert sorted(os.listdir(tmp_path)) == ["ckpt-20.pt"]
    assert C.load_checkpoint("auto", str(tmp_path / "empty")) is None
    with pytest.raises(SystemExit):
        C.load_checkpoint(str(tmp_path / "nope.pt"), str(tmp_path))
