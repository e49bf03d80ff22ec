"""MobileCLIP model zoo: parameter counts and checkpoint layouts against the official code, folded against
unfused, channels_last against contiguous, fused attention against the reference, checkpoint round trips
and clear failures. CPU, no download; the big models are built on the meta device (no memory, no time).

The literals below were computed from the official implementations (apple/ml-mobileclip `mobileclip/`,
open_clip 3.3.0 + timm 1.0.31 for the OpenCLIP layouts) with random weights; outputs of our models matched
those implementations to < 1.3e-6 relative error (see the report of the drafts/mci task)."""
import hashlib
import os
import math

import pytest
import torch

import mobileclip as M

C = M.C

# name: (image train-time, image folded, text) parameters.
COUNTS = {
    "mobileclip_s0": (11_406_464, 11_356_992, 42_441_216),
    "mobileclip_s1": (21_541_120, 21_460_544, 63_428_096),
    "mobileclip_s2": (35_814_720, 35_702_480, 63_428_096),
    "mobileclip_b": (86_348_544, 86_348_544, 63_428_096),
    "mobileclip2_s0": (11_406_976, 11_357_504, 63_428_096),
    "mobileclip2_s2": (35_815_232, 35_702_992, 63_428_096),
    "mobileclip2_b": (86_349_056, 86_349_056, 63_428_096),
    "mobileclip2_s3": (125_235_648, 125_074_272, 123_650_304),
    "mobileclip2_s4": (321_784_832, 321_569_664, 123_650_304),
    "mobileclip_s3": (125_235_648, 125_074_272, 123_650_304),
    "mobileclip_s4": (321_784_832, 321_569_664, 123_650_304),
    "mobileclip2_l14": (303_966_976, 303_966_976, 123_650_304),
    "mobileclip_l14": (303_966_976, 303_966_976, 123_650_304),
}
# The spec's table (millions, 2 decimals): image train-time / folded, text.
PUBLISHED = {"mobileclip_s0": (11.41, 11.36, 42.44), "mobileclip_s1": (21.54, 21.46, 63.43),
             "mobileclip_s2": (35.81, 35.70, 63.43), "mobileclip_b": (86.35, 86.35, 63.43),
             "mobileclip2_s3": (125.24, 125.07, None), "mobileclip2_s4": (321.78, 321.57, None)}
# (layout, number of keys, sha256 of the sorted "name:shape" lines, first 16 hex digits).
LAYOUTS = {
    "mobileclip_s0": ("apple", 893, "dc8ea112cb042be8"), "mobileclip_s1": ("apple", 1585, "b6c698300372f614"),
    "mobileclip_s2": ("apple", 1721, "c7e086da5bdb11f7"), "mobileclip_b": ("apple", 313, "af281cbfe0f5d5d1"),
    "mobileclip2_s0": ("openclip", 934, "56dece991bb54b87"), "mobileclip2_s2": ("openclip", 1722, "b10e2d8c85b41efb"),
    "mobileclip2_b": ("openclip", 314, "90ff6686b52384be"), "mobileclip2_s3": ("openclip", 1681, "1ae677165efc257e"),
    "mobileclip2_s4": ("openclip", 1715, "3d19f21f60f20b2f"), "mobileclip2_l14": ("openclip", 447, "b06b1684a1bcc41a"),
    "mobileclip_s1@openclip": ("openclip", 1586, "03d1426f13d51f3d"),  # OpenCLIP's MobileCLIP-S1
}
# A few keys of the released v1 files with their shapes, readable when a hash fails.
KEYS = {
    "mobileclip_s0": {"image_encoder.model.patch_embed.0.rbr_conv.0.conv.weight": (64, 3, 3, 3),
                      "image_encoder.model.patch_embed.1.rbr_scale.conv.weight": (64, 1, 1, 1),
                      "image_encoder.model.network.2.0.token_mixer.mixer.rbr_conv.0.conv.weight": (128, 1, 3, 3),
                      "image_encoder.model.network.5.proj.0.lkb_origin.conv.weight": (512, 1, 7, 7),
                      "image_encoder.model.network.5.proj.0.se.fc1.weight": (128, 512, 1, 1),
                      "image_encoder.model.network.6.pe.weight": (512, 1, 7, 7),
                      "image_encoder.model.network.7.1.token_mixer.qkv.weight": (1536, 512),
                      "image_encoder.model.network.7.1.layer_scale_2": (512, 1, 1),
                      "image_encoder.model.conv_exp.se.reduce.weight": (64, 1024, 1, 1),
                      "image_encoder.model.head.proj": (1024, 512),
                      "text_encoder.positional_embedding.pos_embed.pos_embed": (1, 1, 77, 512),
                      "text_encoder.transformer.0.token_mixer.mixer.rbr_conv.0.conv.weight": (512, 1, 1, 11),
                      "text_encoder.transformer.5.convffn.fc1.weight": (2048, 512, 1, 1),
                      "text_encoder.transformer.4.pre_norm_mha.1.qkv_proj.weight": (1536, 512),
                      "text_encoder.projection_layer": (512, 512), "logit_scale": ()},
    "mobileclip_s1": {"image_encoder.model.network.4.19.convffn.fc2.weight": (256, 768, 1, 1),
                      "image_encoder.model.network.7.3.norm.running_var": (512,),
                      "text_encoder.transformer.11.pre_norm_ffn.4.weight": (512, 2048)},
    "mobileclip_s2": {"image_encoder.model.network.5.proj.0.small_conv.conv.weight": (640, 1, 3, 3),
                      "image_encoder.model.network.7.3.token_mixer.proj.weight": (640, 640),
                      "image_encoder.model.head.proj": (1280, 512)},
    "mobileclip_b": {"image_encoder.model.patch_emb.0.block.conv.weight": (192, 3, 4, 4),
                     "image_encoder.model.patch_emb.2.block.conv.bias": (768,),
                     "image_encoder.model.cls_token": (1, 1, 768),
                     "image_encoder.model.pos_embed.pos_embed.pos_embed": (1, 1, 196, 768),
                     "image_encoder.model.transformer.11.pre_norm_mha.1.out_proj.weight": (768, 768),
                     "image_encoder.model.classifier.proj": (768, 512),
                     "text_encoder.embedding_layer.weight": (49408, 512)},
}

# Outputs of apple/ml-mobileclip's own classes (FastViT + GlobalPool2D, TextTransformer, VisionTransformer)
# and of timm's FastVit ("five_stage", MCi3/4's recipe) at toy sizes with `seeded_weights` and the inputs
# of the test: per row the first 4 values and the norm.
GOLDEN = {
    "image": [
        [63.707611, 48.539856, 89.317673, -77.319878, 2137.4104],
        [-8.102453, 56.033691, -3.13172, 7.110116, 1282.2937],
        [56.583897, -204.493851, -49.940865, 133.74118, 1062.38147],
    ],
    "mct": [
        [-0.912482, 0.219705, 0.554281, 1.060221, 11.22028],
        [-1.147791, -0.386421, 0.50543, 0.448363, 10.686],
        [-2.023877, -1.121516, -0.670398, -1.538423, 12.30249],
    ],
    "causal_base": [
        [-0.328181, 0.257226, 1.949876, -1.063556, 4.58877],
        [1.501898, -0.146999, -0.644822, -0.158494, 3.16576],
        [-0.298736, 0.14306, 1.13435, 0.503989, 5.27036],
    ],
    "vit": [
        [-1.624364, -0.476421, 0.810015, 0.573169, 3.51654],
    ],
    "five_stage": [
        [13.555315, 75.155045, 31.003756, -19.931152, 270.90701],
        [25.656475, 56.963902, 10.831062, -17.619972, 229.75317],
    ],
}


@pytest.fixture(autouse=True)
def one_thread():
    """Toy-sized convs gain nothing from intra-op threads, and on a busy 2-core machine the threads' spin
    waits make them 100x slower: run this file on one thread."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def meta_model(name):
    with torch.device("meta"):
        return M.create_model(name)


def count(module):
    return sum(p.numel() for p in module.parameters())


def layout_hash(sd):
    lines = "\n".join(f"{k}:{tuple(v.shape)}" for k, v in sorted(sd.items()))
    return hashlib.sha256(lines.encode()).hexdigest()[:16]


def randomise_(model, seed=0):
    """Non-trivial BN statistics and layer scales (at init the branches are ~1e-5 of the residual, so a
    wrong fold would go unnoticed)."""
    g = torch.Generator().manual_seed(seed)
    sd = model.state_dict()
    for k, v in sd.items():
        if not v.is_floating_point() or k == "logit_scale":
            continue
        u = torch.rand(v.shape, generator=g)
        if k.endswith("running_var"):
            v.copy_(0.5 + 1.5 * u)
        elif k.endswith("running_mean") or (v.dim() == 1 and k.endswith("bias")):
            v.copy_(0.2 * (u - 0.5))
        elif "layer_scale" in k:
            v.copy_(0.3 * (u - 0.5))
        elif v.dim() == 1:  # norm scales
            v.copy_(0.8 + 0.4 * u)
    model.load_state_dict(sd)
    return model.eval()


def tiny_inputs(size=64, L=32, vocab=2048, B=3):
    g = torch.Generator().manual_seed(1)
    images = torch.rand(B, 3, size, size, generator=g)
    images[1] = images[1] ** 4  # dark, and a bright square: inputs whose embeddings differ clearly
    images[2, :, size // 4: size // 2, size // 4: size // 2] = 1
    ids = torch.randint(1, vocab - 1, (B, L), generator=g)
    for i, n in enumerate([4, 9, L - 1][:B]):  # EOT (the largest id) then padding
        ids[i, n], ids[i, n + 1:] = vocab - 1, 0
    return images, ids


def seeded_weights(shapes, seed=0):
    """Deterministic weights for a {name: shape} dict, in sorted-name order, so the official code (in the
    generator of GOLDEN) and this repository get the same tensors under the same (Apple) names."""
    g, out = torch.Generator().manual_seed(seed), {}
    for k in sorted(shapes):
        shape, u = shapes[k], torch.rand(shapes[k], generator=g) - 0.5  # uniform(-0.5, 0.5), std 0.29
        if k.endswith("num_batches_tracked"):
            out[k] = torch.zeros(shape, dtype=torch.long)
        elif k.endswith("running_var"):
            out[k] = 0.35 + 0.3 * u
        elif "layer_scale" in k:
            out[k] = 0.6 * u
        elif len(shape) == 1 and k.endswith("weight"):  # norm scales
            out[k] = 1 + 0.4 * u
        elif len(shape) <= 1 or "pos_embed" in k or "cls_token" in k or "embedding_layer" in k:
            out[k] = 0.4 * u
        else:  # unit-variance activations: x @ P has fan-in shape[0]; Linear and conv weights shape[1:]
            fan_in = shape[0] if k.endswith(("proj", "projection_layer")) else math.prod(shape[1:])
            out[k] = 3.46 * u * fan_in**-0.5
    return out


def five_stage_mci():
    """An MCi3-shaped encoder at toy size: LayerNorm2d attention in the last two stages, no stem scale branch."""
    return M.MCi(depths=(1, 1, 1, 1, 1), widths=(8, 16, 32, 64, 128), mlp_ratio=4.0, se=(0,) * 5,
                 attn=(0, 0, 0, 1, 1), embed_dim=32, attn_norm="ln", stem_scale=False, head_bias=True)


def rel(a, b):
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("name", sorted(COUNTS))
def test_parameter_counts(name):
    m = meta_model(name)
    folded = M.reparameterize(m)
    assert (count(m.visual), count(folded.visual), count(m.text)) == COUNTS[name]
    if name in PUBLISHED:
        got = (count(m.visual), count(folded.visual), count(m.text))
        assert all(p is None or round(x / 1e6, 2) == p for x, p in zip(got, PUBLISHED[name]))


def test_every_model_is_counted():
    assert set(M.MOBILECLIP_MODELS) == set(COUNTS) | {"mobileclip_tiny"}
    assert 3e5 < count(M.create_model("mobileclip_tiny", vocab_size=2048)) < 2e6


@pytest.mark.parametrize("name", sorted(LAYOUTS))
def test_checkpoint_layout(name):
    layout, n, digest = LAYOUTS[name]
    sd = M.export_state_dict(meta_model(name.split("@")[0]), layout)
    for k, shape in KEYS.get(name, {}).items():
        assert tuple(sd[k].shape) == shape, k
    assert (len(sd), layout_hash(sd)) == (n, digest)


def test_reparameterize_agrees():
    model = randomise_(M.create_model("mobileclip_tiny", vocab_size=2048))
    images, ids = tiny_inputs()
    folded = M.reparameterize(model)
    names = [k for k in folded.state_dict() if "rbr_" in k or "lkb_origin" in k or ".pe." in k or "small_conv" in k]
    assert not names, names[:3]  # every train-time branch is gone
    assert "rbr_conv" in "".join(model.state_dict())  # and the original is untouched
    with torch.no_grad():
        assert rel(folded.encode_image(images), model.encode_image(images)) < 1e-5
        assert rel(folded.encode_text(ids), model.encode_text(ids)) < 1e-5
        # a folded model saves and loads back (into a freshly built and folded model) with the same outputs
        again = M.reparameterize(M.create_model("mobileclip_tiny", vocab_size=2048))
        again.load_state_dict(folded.state_dict(), strict=True)
        assert torch.equal(again.encode_image(images), folded.encode_image(images))
        mci = randomise_(five_stage_mci())
        x = torch.rand(2, 3, 128, 128, generator=torch.Generator().manual_seed(2))
        assert rel(M.reparameterize(mci)(x), mci(x)) < 1e-5


def test_channels_last_and_reference_attention():
    model = randomise_(M.create_model("mobileclip_tiny", vocab_size=2048))
    mci = randomise_(five_stage_mci())
    images, ids = tiny_inputs()
    x = torch.rand(2, 3, 128, 128, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ref_img, ref_txt, ref_mci = model.encode_image(images), model.encode_text(ids), mci(x)
        C.set_fused(model, False), C.set_fused(mci, False)
        assert rel(model.encode_image(images), ref_img) < 1e-5 and rel(model.encode_text(ids), ref_txt) < 1e-5
        assert rel(mci(x), ref_mci) < 1e-5
        C.set_fused(model, True), C.set_fused(mci, True)
        cl = lambda t: t.contiguous(memory_format=torch.channels_last)
        model, mci = model.to(memory_format=torch.channels_last), mci.to(memory_format=torch.channels_last)
        assert rel(model.encode_image(cl(images)), ref_img) < 1e-5
        assert rel(mci(cl(x)), ref_mci) < 1e-5
        assert rel(M.reparameterize(model).encode_image(cl(images)), ref_img) < 1e-5


def test_text_attention_masks():
    """Causal (MobileCLIP-B): what follows EOT cannot change the embedding. Bidirectional (the others): it
    does, since there is no padding mask (as in the released weights)."""
    ids = torch.tensor([[5, 7, 99, 0, 0, 0]])
    later = ids.clone()
    later[0, 4] = 11
    for causal in (True, False):
        torch.manual_seed(0)
        text = M.TextEncoder(vocab_size=100, context_length=8, width=32, heads=2, layers=2, embed_dim=16, causal=causal)
        with torch.no_grad():
            same = torch.allclose(text(ids), text(later), atol=1e-6)
        assert same == causal
    assert M.MOBILECLIP_MODELS["mobileclip_b"]["causal"] and not M.MOBILECLIP_MODELS["mobileclip_s2"]["causal"]


@pytest.mark.parametrize("layout", ["apple", "openclip", "ours"])
def test_checkpoint_round_trip(layout, tmp_path, monkeypatch):
    """Export in a released layout (or ours), load it with create_model(pretrained=...): same outputs. The
    OpenCLIP case uses a tiny model with the base text tower and a biased head (as in MobileCLIP2)."""
    name = "mobileclip_tiny"
    if layout == "openclip":
        name = "tiny_openclip"
        monkeypatch.setitem(M.MOBILECLIP_MODELS, name, dict(M.MOBILECLIP_MODELS["mobileclip_tiny"], text="base",
                                                             text_layers=2, timm_tower=True, layout="openclip"))
    model = randomise_(M.create_model(name, vocab_size=2048))
    path = str(tmp_path / "ckpt.pt")
    torch.save(M.export_state_dict(model, layout), path)
    loaded = M.create_model(name, pretrained=path, vocab_size=2048).eval()
    images, ids = tiny_inputs()
    with torch.no_grad():
        assert torch.equal(loaded.encode_image(images), model.encode_image(images))
        assert torch.equal(loaded.encode_text(ids), model.encode_text(ids))


def test_bad_checkpoints_fail_clearly(tmp_path, capsys):
    path = str(tmp_path / "tiny.pt")
    torch.save(M.export_state_dict(M.create_model("mobileclip_tiny", vocab_size=2048), "apple"), path)
    with pytest.raises(SystemExit):
        M.create_model("mobileclip_s0", pretrained=path)  # a file of another model
    assert "does not fit" in capsys.readouterr().err
    torch.save({"conv1.weight": torch.zeros(1)}, path)
    with pytest.raises(SystemExit):
        M.create_model("mobileclip_tiny", pretrained=path, vocab_size=2048)
    assert "neither" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        M.create_model("mobileclip_tiny", pretrained=str(tmp_path / "missing.pt"))
    with pytest.raises(SystemExit):
        M.create_model("mobileclip_s9")


def load_seeded(module, seed=0, timm=False):
    """`seeded_weights` drawn under the names of the official module: Apple's (the apple layout only renames
    `qkv`/`proj` of the transformer layers, whatever the tower) or timm's (`timm=True`, an MCi)."""
    own = module.state_dict()
    theirs = module.timm_name if timm else lambda k: M.layout_name(None, "text." + k, "apple")[len("text_encoder."):]
    names = {theirs(k): k for k in own}
    flip = lambda a, v: v.t() if timm and a == "head.fc.weight" else v  # timm's Linear holds (E, C)
    w = seeded_weights({a: tuple(flip(a, own[k]).shape) for a, k in names.items()}, seed)
    module.load_state_dict({names[a]: flip(a, v) for a, v in w.items()})
    return module.eval()


def test_matches_official_outputs():
    """The numbers of the official implementations (GOLDEN), reproduced: MCi with SE downsamples, RepCPE and
    BN attention; MCt; a causal base text tower with padding; the conv-stem ViT (padding, CLS, positions);
    the 5-stage timm MCi (LayerNorm2d attention, no stem scale branch, biased head)."""
    images, ids = tiny_inputs()
    tiny = M.create_model("mobileclip_tiny", vocab_size=2048)
    outs = {"image": (load_seeded(tiny.visual), images), "mct": (load_seeded(tiny.text), ids),
            "causal_base": (load_seeded(M.TextEncoder(2048, 32, 64, 2, 2, 16, causal=True)), ids),
            "vit": (load_seeded(M.ConvStemViT(width=128, layers=1, heads=2, embed_dim=16)),
                    torch.rand(1, 3, 224, 224, generator=torch.Generator().manual_seed(5))),
            "five_stage": (load_seeded(five_stage_mci(), timm=True),
                           torch.rand(2, 3, 128, 128, generator=torch.Generator().manual_seed(2)))}
    for name, (module, x) in outs.items():
        with torch.no_grad():
            y = module(x)
        got = torch.tensor([r[:4].tolist() + [r.norm().item()] for r in y])
        assert rel(got, torch.tensor(GOLDEN[name])) < 1e-4, name


def v1_openclip_model(monkeypatch, name="tiny_v1_base"):
    """A tiny v1 model that OpenCLIP can hold (base text tower; OpenCLIP has no MCt) and its name in the zoo."""
    monkeypatch.setitem(M.MOBILECLIP_MODELS, name, dict(M.MOBILECLIP_MODELS["mobileclip_tiny"], text="base",
                                                        text_layers=2))
    return randomise_(M.create_model(name, vocab_size=2048)), name


@pytest.mark.parametrize("layout", ["apple", "openclip"])
def test_export_command_round_trip(layout, tmp_path, monkeypatch, capsys):
    """`mobileclip.py export` writes a checkpoint of `train` in a released layout (atomically); loaded back strictly
    (create_model(pretrained=)), the model computes the same embeddings."""
    model, name = v1_openclip_model(monkeypatch) if layout == "openclip" else (
        randomise_(M.create_model("mobileclip_tiny", vocab_size=2048)), "mobileclip_tiny")
    ckpt, out = str(tmp_path / "ckpt-7.pt"), str(tmp_path / "exported.pt")
    torch.save({"model": model.state_dict(), "model_name": name, "vocab_size": 2048, "step": 7}, ckpt)
    M.main(["export", "--ckpt", ckpt, "--layout", layout, "--out", out])
    assert capsys.readouterr().out.strip().splitlines()[-1].endswith(out) and not os.path.exists(out + ".tmp")
    prefixes = ("image_encoder.", "text_encoder.") if layout == "apple" else ("visual.trunk.", "text.")
    assert all(k.startswith(prefixes) for k in torch.load(out, weights_only=True) if k != "logit_scale")
    loaded = M.create_model(name, pretrained=out, vocab_size=2048).eval()
    images, ids = tiny_inputs()
    with torch.no_grad():
        assert torch.equal(loaded.encode_image(images), model.encode_image(images))
        assert torch.equal(loaded.encode_text(ids), model.encode_text(ids))


def test_export_loads_in_open_clip(tmp_path):
    """A MobileCLIP-S1 with random weights, exported, loads strictly into open_clip's MobileCLIP-S1 and computes the
    same embeddings (open_clip has no config for the toy shapes above; skipped where it is not installed, as here)."""
    open_clip = pytest.importorskip("open_clip")
    model = randomise_(M.create_model("mobileclip_s1"))
    ckpt, out = str(tmp_path / "ckpt-1.pt"), str(tmp_path / "s1.pt")
    torch.save({"model": model.state_dict(), "model_name": "mobileclip_s1", "vocab_size": 49408, "step": 1}, ckpt)
    M.main(["export", "--ckpt", ckpt, "--layout", "openclip", "--out", out])
    theirs = open_clip.create_model("MobileCLIP-S1", pretrained=out).eval()
    images, ids = tiny_inputs(size=256, L=77, vocab=49408, B=2)
    with torch.no_grad():
        assert rel(theirs.encode_image(images), model.encode_image(images)) < 1e-4
        assert rel(theirs.encode_text(ids), model.encode_text(ids)) < 1e-4


def test_openclip_v1_head_with_a_learned_bias_loads(tmp_path, monkeypatch, capsys):
    """A v1 MCi trained in OpenCLIP (timm's head.fc has a bias) whose bias is not zero: the file loads strictly, the
    head keeps the bias (x @ proj + b, equal to the reference), and the model saves, resumes and exports with it
    (openclip layout; ml-mobileclip's layout cannot hold it: one line)."""
    model, name = v1_openclip_model(monkeypatch)
    sd = M.export_state_dict(model, "openclip")
    bias = torch.randn(sd["visual.trunk.head.fc.bias"].shape, generator=torch.Generator().manual_seed(3))
    sd["visual.trunk.head.fc.bias"] = bias
    path = str(tmp_path / "openclip_v1.pt")
    torch.save(sd, path)
    loaded = M.create_model(name, pretrained=path, vocab_size=2048).eval()
    images, ids = tiny_inputs()
    with torch.no_grad():
        assert torch.equal(loaded.encode_image(images), model.encode_image(images) + bias)
        assert torch.equal(loaded.encode_text(ids), model.encode_text(ids))
    ckpt = str(tmp_path / "ckpt-1.pt")  # a checkpoint of `train` started from it: exported and read again
    torch.save({"model": loaded.state_dict(), "model_name": name, "vocab_size": 2048, "step": 1}, ckpt)
    M.main(["export", "--ckpt", ckpt, "--layout", "openclip", "--out", str(tmp_path / "again.pt")])
    assert torch.equal(torch.load(tmp_path / "again.pt", weights_only=True)["visual.trunk.head.fc.bias"], bias)
    again = M.create_model(name, pretrained=str(tmp_path / "again.pt"), vocab_size=2048).eval()
    with torch.no_grad():
        assert torch.equal(again.encode_image(images), loaded.encode_image(images))
    with pytest.raises(SystemExit):
        M.main(["export", "--ckpt", ckpt, "--layout", "apple", "--out", str(tmp_path / "apple.pt")])
    assert "use --layout openclip" in capsys.readouterr().err
    sd["visual.trunk.head.fc.bias"] = torch.zeros_like(bias)  # the zero bias of timm's conversion: no parameter
    torch.save(sd, path)
    assert M.create_model(name, pretrained=path, vocab_size=2048).visual.head.bias is None
