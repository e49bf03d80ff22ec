"""OpenAI/OpenCLIP weights: an independent reference in the original layout (sequence-first
nn.MultiheadAttention, QuickGELU, the original parameter names) against common.clip_from_openclip."""
from collections import OrderedDict

import pytest
import torch
import torch.nn as nn

import common as C


class RefBlock(nn.Module):
    def __init__(self, d, heads):
        super().__init__()
        self.ln_1, self.ln_2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.attn = nn.MultiheadAttention(d, heads)
        self.mlp = nn.Sequential(OrderedDict(c_fc=nn.Linear(d, 4 * d), gelu=C.QuickGELU(), c_proj=nn.Linear(4 * d, d)))

    def forward(self, x, mask=None):  # x: (N, B, D), sequence first
        y = self.ln_1(x)
        x = x + self.attn(y, y, y, need_weights=False, attn_mask=mask)[0]
        return x + self.mlp(self.ln_2(x))


class RefTransformer(nn.Module):
    def __init__(self, d, layers, heads):
        super().__init__()
        self.resblocks = nn.ModuleList(RefBlock(d, heads) for _ in range(layers))

    def forward(self, x, mask=None):
        for b in self.resblocks:
            x = b(x, mask)
        return x


class RefVisual(nn.Module):
    def __init__(self, size, patch, d, layers, heads, embed):
        super().__init__()
        self.conv1 = nn.Conv2d(3, d, patch, patch, bias=False)
        self.class_embedding = nn.Parameter(torch.randn(d))
        self.positional_embedding = nn.Parameter(torch.randn((size // patch) ** 2 + 1, d))
        self.ln_pre, self.ln_post = nn.LayerNorm(d), nn.LayerNorm(d)
        self.transformer = RefTransformer(d, layers, heads)
        self.proj = nn.Parameter(torch.randn(d, embed))

    def forward(self, x):
        x = self.conv1(x).flatten(2).permute(0, 2, 1)
        x = torch.cat([self.class_embedding.expand(x.shape[0], 1, -1), x], 1) + self.positional_embedding
        x = self.transformer(self.ln_pre(x).permute(1, 0, 2)).permute(1, 0, 2)
        return self.ln_post(x[:, 0]) @ self.proj


class RefCLIP(nn.Module):
    def __init__(self, size=32, patch=8, d=64, layers=2, td=64, tlayers=2, embed=32, vocab=300, ctx=16):
        super().__init__()
        self.visual = RefVisual(size, patch, d, layers, d // 64 or 1, embed)
        self.transformer = RefTransformer(td, tlayers, td // 64 or 1)
        self.token_embedding = nn.Embedding(vocab, td)
        self.positional_embedding = nn.Parameter(torch.randn(ctx, td))
        self.ln_final = nn.LayerNorm(td)
        self.text_projection = nn.Parameter(torch.randn(td, embed))
        self.logit_scale = nn.Parameter(torch.tensor(4.6))
        self.register_buffer("attn_mask", torch.full((ctx, ctx), float("-inf")).triu(1), persistent=False)  # OpenCLIP's

    def encode_image(self, x):
        return self.visual(x)

    def encode_text(self, ids):
        x = self.token_embedding(ids) + self.positional_embedding
        x = self.ln_final(self.transformer(x.permute(1, 0, 2), self.attn_mask).permute(1, 0, 2))
        return x[torch.arange(len(ids)), ids.argmax(-1)] @ self.text_projection


def randomised(model):
    """Random values everywhere (norm gains around 1), so any swapped or misplaced tensor shows."""
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(torch.randn(p.shape, generator=g) * (0.1 if "ln" in name else 0.05) + (1.0 if name.endswith(("ln_1.weight", "ln_2.weight", "ln_pre.weight", "ln_post.weight", "ln_final.weight")) else 0))
    return model.eval()


@pytest.mark.parametrize("d,td", [(64, 64), (128, 64)])
def test_openclip_parity(d, td):
    ref = randomised(RefCLIP(d=d, td=td))
    model = C.clip_from_openclip(ref.state_dict()).eval()
    x, ids = torch.randn(3, 3, 32, 32), torch.randint(1, 299, (3, 16))
    ids[:, 5] = 299  # the end-of-text token is the largest id
    with torch.no_grad():
        for ours, theirs in ((model.encode_image(x), ref.encode_image(x)), (model.encode_text(ids), ref.encode_text(ids))):
            assert (ours - theirs).norm() / theirs.norm() < 1e-4
    assert model.logit_scale.item() == ref.logit_scale.item()


def test_openclip_config_and_round_trip():
    ref = RefCLIP(d=128, layers=3, td=64, tlayers=2, embed=48, vocab=300, ctx=16)
    cfg = C.openclip_config(ref.state_dict())
    assert cfg == dict(image_size=32, patch=8, width=128, layers=3, heads=2, embed_dim=48, text_width=64,
                       text_layers=2, text_heads=1, vocab_size=300, context_length=16, mlp_ratio=4.0)
    sd = {k: v for k, v in ref.state_dict().items() if k != "attn_mask"}
    back = C.ours_to_openclip(C.openclip_to_ours(sd))
    assert back.keys() == sd.keys() and all(torch.equal(back[k], sd[k]) for k in sd)


def test_vit_b16_parameter_count():
    """OpenCLIP's profile lists ViT-B-16 at 86.2M (image) + 63.4M (text) parameters."""
    m = C.build_clip(**dict(image_size=224, patch=16, width=768, layers=12, heads=12, embed_dim=512,
                            text_width=512, text_layers=12, text_heads=8))
    img = sum(p.numel() for p in m.visual.parameters())
    txt = sum(p.numel() for p in m.text.parameters())
    assert round(img / 1e6, 1) == 86.2 and round(txt / 1e6, 1) == 63.4


def test_wrong_state_dict_is_one_clear_error(capsys):
    model = C.build_clip(image_size=32, patch=8, width=64, layers=2, heads=1, embed_dim=32, text_width=64,
                         text_layers=2, text_heads=1, vocab_size=300, context_length=16)
    sd = C.openclip_to_ours(RefCLIP(d=128).state_dict())
    with pytest.raises(SystemExit):
        C.load_state_dict_checked(model, sd, "checkpoint x.pt")
    assert "does not fit this model" in capsys.readouterr().err


def test_export_of_a_trained_vit_clip_loads_strictly_in_the_original_layout(tmp_path, monkeypatch):
    """`mobileclip.py export --layout openclip` of a ViT CLIP checkpoint of `train`: the file loads strictly into the
    original-layout reference (OpenCLIP's names and shapes), which computes the same embeddings."""
    import mobileclip
    shape = dict(image_size=32, patch=8, width=64, layers=2, heads=1, embed_dim=32, text_width=64, text_layers=2,
                 text_heads=1, context_length=16)
    monkeypatch.setitem(mobileclip.MODELS, "ref", shape)
    ours = randomised(C.build_clip(**shape, vocab_size=300, act="quick_gelu"))
    ckpt, out = str(tmp_path / "ckpt-3.pt"), str(tmp_path / "openclip.pt")
    torch.save({"model": ours.state_dict(), "model_name": "ref", "vocab_size": 300, "step": 3}, ckpt)
    mobileclip.main(["export", "--ckpt", ckpt, "--layout", "openclip", "--out", out])
    ref = RefCLIP()
    ref.load_state_dict(torch.load(out, weights_only=True), strict=True)
    x, ids = torch.randn(3, 3, 32, 32), torch.randint(1, 299, (3, 16))
    ids[:, 5] = 299  # the end-of-text token is the largest id
    with torch.no_grad():
        for a, b in ((ours.encode_image(x), ref.eval().encode_image(x)), (ours.encode_text(ids), ref.encode_text(ids))):
            assert (a - b).norm() / b.norm() < 1e-5
    with pytest.raises(SystemExit):  # ml-mobileclip's layout is for MobileCLIP models
        mobileclip.main(["export", "--ckpt", ckpt, "--layout", "apple", "--out", out])
