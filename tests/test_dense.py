"""dense.py: mIoU, depth errors and the SILog loss against hand-computed values and their reference; the feature
pyramids of ViT, MCi and SAM backbones and the heads on them; backbones loaded from every checkpoint layout give
the same features as the model that was saved; label conventions per data layout; a tiny fine-tuning learns,
resumes exactly, and the alt-text vs quality-caption comparison runs end to end from two different backbones."""
import json
import math
import os
import shutil

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import common as C
import dense as D
import mobileclip as M


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: see conftest.py


@pytest.fixture(scope="module")
def tiny_world(tmp_path_factory):
    return C.synthetic_world(str(tmp_path_factory.mktemp("dense_cache")), 160, 24, 32, workers=1)


# ---- metrics and loss ------------------------------------------------------------------------------


def test_evaluate_scores_with_common_miou_and_skips_unreadable_images(tmp_path):
    """Fixed predictions (a stub model reads the class off the red channel) on an ADE20K-style folder with label 0
    ('other'), 255, a class only predicted and one in neither: evaluate's mIoU is common.miou of the summed confusion
    matrices with reduce-zero-label, and a per-class count by hand; an unreadable image is left out and counted, or
    stops the run past --max-skip-frac."""
    rng, K, S, root = np.random.default_rng(0), 7, 16, tmp_path / "ade"
    for sub in ("images/validation", "annotations/validation"):
        os.makedirs(root / sub)
    preds, labels = rng.integers(0, 6, (5, S, S)), rng.integers(0, 6, (5, S, S))  # labels: 0 = other, 1..5
    labels[:, :2] = 255
    for i, (p, y) in enumerate(zip(preds, labels)):
        Image.fromarray(np.stack([p * 40, p, p], -1).astype(np.uint8)).save(root / f"images/validation/{i}.png")
        Image.fromarray(y.astype(np.uint8)).save(root / f"annotations/validation/{i}.png")
    (root / "images/validation/9.png").write_bytes(b"not a png")
    Image.fromarray(labels[0].astype(np.uint8)).save(root / "annotations/validation/9.png")

    class Stub(torch.nn.Module):
        def forward(self, x):  # (B, 3, S, S) at x / 255 -> one-hot logits of the class drawn in red
            return F.one_hot((x[:, 0] * 255 / 40).round().long(), K).permute(0, 3, 1, 2).float()

    s = dict(crop=S, reduce_zero_label=True, depth_scale=1.0, classes=K, mean=(0.0,) * 3, std=(1.0,) * 3, bf16=False)
    items = D.index_folder(str(root), "seg", "val")
    cpu = torch.device("cpu")
    r = D.evaluate(Stub(), items, "seg", D.SegConfig(batch_size=2, workers=0), s, cpu)
    conf = sum(C.confusion_matrix(torch.from_numpy(p), torch.from_numpy(y), K, reduce_zero_label=True)
               for p, y in zip(preds, labels))
    y, p = labels.flatten() - 1, preds.flatten()
    p, y = p[(y >= 0) & (y < 250)], y[(y >= 0) & (y < 250)]  # other (0) and 255 ignored
    by_hand = [((p == k) & (y == k)).sum() / ((p == k) | (y == k)).sum() for k in range(K)
               if ((p == k) | (y == k)).any()]
    assert len(by_hand) == 6 and r["skipped"] == 1  # class 5 predicted only (IoU 0), class 6 in neither
    assert r["miou"] == pytest.approx(C.miou(conf)) and r["miou"] == pytest.approx(100 * np.mean(by_hand))
    with pytest.raises(SystemExit):  # 1 of 6 unreadable
        D.evaluate(Stub(), items, "seg", D.SegConfig(batch_size=2, workers=0, max_skip_frac=0.1), s, cpu)


def test_depth_errors_hand_computed_per_image():
    pred = torch.tensor([[[2.0, 1.0], [1.0, 4.0]], [[1.0, 1.0], [1.0, 1.0]]])
    target = torch.tensor([[[1.0, 0.0], [1.0, 2.0]], [[2.0, 2.0], [0.0, 0.0]]])  # 0 = invalid
    e = D.depth_errors(pred, target)
    # image 0: valid pairs (2, 1), (1, 1), (4, 2); image 1: (1, 2), (1, 2)
    assert e["rmse"].tolist() == pytest.approx([math.sqrt(5 / 3), 1.0])
    assert e["absrel"].tolist() == pytest.approx([2 / 3, 0.5])
    assert e["delta1"].tolist() == pytest.approx([1 / 3, 0.0])
    assert D.depth_errors(pred[:, None], target[:, None])["rmse"].tolist() == pytest.approx(e["rmse"].tolist())


def test_silog_matches_reference_and_is_scale_invariant():
    g = torch.Generator().manual_seed(0)
    pred = torch.rand(3, 8, 8, generator=g) + 0.1
    target = (torch.rand(3, 8, 8, generator=g) + 0.1) * (torch.rand(3, 8, 8, generator=g) > 0.3)
    torch.testing.assert_close(D.silog_loss(pred, target), D.silog_loss_reference(pred, target), rtol=1e-5, atol=1e-5)
    assert D.silog_loss(pred, target) > 1.0
    # with lambda = 1 the loss is the std of the log ratio: a global scale costs nothing
    assert D.silog_loss(2.5 * target.clamp_min(0.1), target, lambda_=1.0) < 1e-3
    assert D.silog_loss(pred, torch.zeros_like(pred)).isfinite()  # no valid pixel: no NaN


# ---- backbones, pyramids, heads --------------------------------------------------------------------


@pytest.mark.parametrize("name,size,strides,channels", [
    ("tiny", 64, [2, 4, 8, 16], [128] * 4),  # the ViT adapter: deconvs x4, x2, as is, max-pool
    ("tiny", 96, [2, 4, 8, 16], [128] * 4),  # another size: positions interpolated
    ("mobileclip_tiny", 64, [4, 8, 16, 32], [32, 64, 128, 256]),  # MCi's stage outputs
    ("sam_micro", 32, [1, 2, 4, 8], [64] * 4),  # SAM's windowed ViT through the same adapter
])
def test_pyramid_shapes_and_heads(name, size, strides, channels):
    torch.manual_seed(0)
    pyr, info = D.build_backbone(name)
    assert pyr.strides == strides and pyr.channels == channels
    feats = pyr(torch.randn(2, 3, size, size))
    assert [tuple(f.shape) for f in feats] == [(2, c, size // s, size // s) for c, s in zip(channels, strides)]
    seg = D.DenseModel(pyr, D.UperNet(pyr.channels, 16, 11))
    assert seg(torch.randn(2, 3, size, size)).shape == (2, 11, size // strides[0], size // strides[0])
    depth = D.DenseModel(pyr, D.DeconvDepthHead(pyr.channels, 8), max_depth=10.0)
    out = depth(torch.randn(2, 3, size, size))
    assert out.shape == (2, 1, 8 * size // strides[-1], 8 * size // strides[-1])
    assert 0 < out.min() and out.max() < 10.0


def test_vit_b16_adapter_strides_and_linear_probe_without_adapter():
    pyr, _ = D.build_backbone("vit_b16")
    assert pyr.strides == [4, 8, 16, 32] and pyr.taps == [2, 5, 8, 11]
    pyr, _ = D.build_backbone("tiny")
    pyr.drop_adapter()
    feats = pyr(torch.randn(1, 3, 64, 64))
    assert [tuple(f.shape) for f in feats] == [(1, 128, 8, 8)] * 4 and pyr.strides == [8] * 4


def _run_checkpoint(path, model, name):
    torch.save({"model": model.state_dict(), "model_name": name, "config": {"act": "gelu"}, "step": 2}, path)


def test_load_backbone_from_every_layout(tmp_path):
    """A saved model's features survive each layout's loader: mobileclip.py runs (ViT and MCi; a run directory),
    OpenAI/OpenCLIP files, MAE/timm files, catlip.py runs."""
    torch.manual_seed(0)
    x = torch.randn(2, 3, 64, 64)
    clip = C.build_clip(**M.MODELS["tiny"], vocab_size=64).eval()
    with torch.no_grad():
        for p in clip.parameters():  # trained-like: non-zero biases, uneven norms
            p.add_(torch.randn_like(p) * 0.05)
        ref = clip.visual.forward_tokens(x)[:, 1:]  # (B, N, D) after ln_post
    run = tmp_path / "run"
    run.mkdir()
    _run_checkpoint(run / "ckpt-2.pt", clip, "tiny")

    def last_tokens(pyr, norm):
        with torch.no_grad():
            t = pyr.eval().tapped(x)[-1].flatten(2).transpose(1, 2)  # (B, N, D) before ln_post
            return norm(t)

    pyr, info, name = D.load_backbone("", str(run))
    assert name == "tiny" and info["mean"] == C.CLIP_MEAN
    torch.testing.assert_close(last_tokens(pyr, clip.visual.norm), ref, rtol=1e-5, atol=1e-5)
    torch.save(C.ours_to_openclip(clip.state_dict()), tmp_path / "openclip.pt")
    pyr, _, _ = D.load_backbone("vit_tiny", str(tmp_path / "openclip.pt"))
    assert isinstance(pyr.encoder.blocks[0].mlp.act, C.QuickGELU)  # OpenAI's activation; these weights used GELU
    for blk in pyr.encoder.blocks:
        blk.mlp.act = torch.nn.GELU()
    torch.testing.assert_close(last_tokens(pyr, clip.visual.norm), ref, rtol=1e-5, atol=1e-5)
    # MAE / timm: (1, N, D) tokens, a patch-embedding bias (zero here), decoder tensors to ignore
    v = clip.visual
    timm = {"patch_embed.proj.weight": v.patch_embed.weight, "patch_embed.proj.bias": torch.zeros(128),
            "cls_token": v.cls_token.reshape(1, 1, -1), "pos_embed": v.pos_embed[None], "decoder_embed.weight":
            torch.zeros(4, 4), **{k: t for k, t in v.state_dict().items() if k.startswith(("blocks.", "norm_pre."))}}
    torch.save({"model": timm}, tmp_path / "mae.pth")
    pyr, info, _ = D.load_backbone("vit_tiny", str(tmp_path / "mae.pth"))
    assert info["mean"] == D.IMAGENET_MEAN
    torch.testing.assert_close(last_tokens(pyr, clip.visual.norm), ref, rtol=1e-3, atol=1e-3)  # LN eps 1e-6
    # catlip.py: the ViT without its projection, plus a classification head
    cat = {k: t for k, t in clip.state_dict().items() if k.startswith("visual.") and k != "visual.proj"}
    torch.save({"kind": "catlip", "model": {**cat, "head.weight": torch.zeros(5, 128)}, "model_name": "tiny"},
               tmp_path / "catlip.pt")
    pyr, _, _ = D.load_backbone("tiny", str(tmp_path / "catlip.pt"))
    torch.testing.assert_close(last_tokens(pyr, clip.visual.norm), ref, rtol=1e-5, atol=1e-5)


def test_load_mci_run_gives_the_stage_outputs(tmp_path):
    torch.manual_seed(0)
    model = M.create_model("mobileclip_tiny", vocab_size=64)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    model.eval()
    _run_checkpoint(tmp_path / "ckpt-2.pt", model, "mobileclip_tiny")
    x = torch.randn(2, 3, 64, 64)
    pyr, info, name = D.load_backbone("mobileclip_tiny", str(tmp_path / "ckpt-2.pt"))
    assert name == "mobileclip_tiny" and info["mean"] == (0.0, 0.0, 0.0)  # MobileCLIP v1: [0, 1] input
    with torch.no_grad():
        h = model.visual.patch_embed(x)
        for m in model.visual.network:
            h = m(h)  # the last stage's output, which conv_exp and the head would read
        torch.testing.assert_close(pyr.eval()(x)[-1], h)
    with pytest.raises(SystemExit):  # a run of another model: one clear line
        D.load_backbone("tiny", str(tmp_path / "ckpt-2.pt"))


# ---- data conventions --------------------------------------------------------------------------------


def test_label_conventions_folder_vs_world(tmp_path, tiny_world):
    """ADE20K folders: 0 = 'other' is ignored and 1..150 shift to 0..149; the world's shards: 0 = background is a
    class (11 classes), depth PNG / 65535 with a head range of 1."""
    for split in ("training", "validation"):
        os.makedirs(tmp_path / "ade" / "images" / split)
        os.makedirs(tmp_path / "ade" / "annotations" / split)
        Image.new("RGB", (40, 30), (9, 9, 9)).save(tmp_path / "ade" / "images" / split / "a.jpg")
        Image.fromarray(np.array([[0, 1, 150]] * 30, np.uint8).repeat(40 // 3 + 1, 1)[:, :40]).save(
            tmp_path / "ade" / "annotations" / split / "a.png")
    cfg = D.Config(data=str(tmp_path / "ade"))
    data = D.resolve_data(cfg, "seg", 64)
    s = D.settings(cfg, "seg", dict(mean=C.CLIP_MEAN, std=C.CLIP_STD, image_size=64), data, 768)
    assert (s["reduce_zero_label"], s["classes"], s["crop"], s["channels"]) == (True, 150, 512, 512)
    item = D.DenseData(data["val"], "seg", 16, False, 0, (1, 1), True, 1.0)[0]
    assert set(item["target"].unique().tolist()) == {255, 0, 149} and item["image"].shape == (3, 16, 21)
    cfg = D.Config(data=tiny_world["train"], val_data=tiny_world["val"])
    for task in ("seg", "depth"):
        data = D.resolve_data(cfg, task, 32)
        s = D.settings(cfg, task, dict(mean=C.CLIP_MEAN, std=C.CLIP_STD, image_size=32), data, 128)
        assert len(data["train"]) == 160 and len(data["val"]) == 24
        assert (s["reduce_zero_label"], s["classes"], s["crop"], s["depth_scale"]) == (False, 11, 32, 65535.0)
    assert s["max_depth"] == 1.0
    seg = D.DenseData(D.index_shards(tiny_world["val"], "seg"), "seg", 32, True, 0, (0.5, 2.0), False, 1.0)
    y = torch.stack([seg[(0, i)]["target"] for i in range(24)])
    assert y.shape == (24, 32, 32) and (y == 0).any() and ((y > 0) & (y <= 10)).any()  # background and shapes
    dep = D.DenseData(D.index_shards(tiny_world["val"], "depth"), "depth", 32, False, 0, (1, 1), False, 65535.0)
    d = dep[0]["target"]
    assert d.dtype == torch.float32 and 0 < d.min() and d.max() <= 1.0


# ---- fine-tuning runs --------------------------------------------------------------------------------


def _args(task, world, out, *extra):
    return [task, "--data", world["train"], "--val-data", world["val"], "--out", str(out), "--workers", "0",
            "--batch-size", "8", "--log-every", "10", "--crop", "32", *extra]


def test_tiny_finetuning_learns_both_tasks(tmp_path, tiny_world):
    """From scratch, 60 steps on 16 images, scored on the same 16 (a fit, the test that image and target stay
    aligned through scale, crop and flip): segmentation beats predicting background everywhere (whose pixel
    accuracy is the background fraction, ~85%), depth beats the best constant (the std of the depth)."""
    val = D.DenseData(D.index_shards(tiny_world["train"], "seg")[:16], "seg", 32, False, 0, (1, 1), False, 1.0)
    y = torch.stack([val[i]["target"] for i in range(16)])
    background = 100 * (y == 0).float().mean().item()
    all_background_miou = background / len(y.unique())  # IoU_bg = the fraction, 0 for every present shape
    fit = ["--val-data", tiny_world["train"], "--train-images", "16", "--val-images", "16", "--model", "tiny",
           "--steps", "60", "--lr", "1e-3"]
    r = D.main(_args("seg", tiny_world, tmp_path / "seg", *fit))
    assert set(r) == {"miou", "pixel_acc"}
    assert r["pixel_acc"] > background + 2 and r["miou"] > 1.5 * all_background_miou, (r, background)
    dval = D.DenseData(D.index_shards(tiny_world["train"], "depth")[:16], "depth", 32, False, 0, (1, 1), False, 65535.0)
    t = torch.stack([dval[i]["target"] for i in range(16)])
    r = D.main(_args("depth", tiny_world, tmp_path / "depth", *fit))
    assert set(r) == {"rmse", "absrel", "delta1"}
    assert r["rmse"] < 0.8 * t[t > 0].std().item(), r
    logged = [json.loads(line) for line in open(tmp_path / "depth" / "log.jsonl")]
    assert logged[-1]["rmse"] == pytest.approx(r["rmse"], rel=1e-4)


def test_resume_replays_the_same_steps(tmp_path, tiny_world):
    extra = ["--model", "tiny", "--steps", "6", "--ckpt-every", "3", "--val-images", "2", "--lr", "1e-3"]
    D.main(_args("seg", tiny_world, tmp_path / "a", *extra))
    os.makedirs(tmp_path / "b")
    shutil.copy(tmp_path / "a" / "ckpt-3.pt", tmp_path / "b" / "ckpt-3.pt")
    D.main(_args("seg", tiny_world, tmp_path / "b", *extra, "--resume", "auto"))
    a = torch.load(tmp_path / "a" / "ckpt-6.pt", weights_only=True)["model"]
    b = torch.load(tmp_path / "b" / "ckpt-6.pt", weights_only=True)["model"]
    for k in a:
        torch.testing.assert_close(a[k], b[k], msg=k)
    with pytest.raises(SystemExit):  # a segmentation checkpoint is not a depth run
        D.main(_args("depth", tiny_world, tmp_path / "b", *extra, "--resume", "auto"))


def test_mae_preset_sets_the_mmseg_protocol_and_runs_on_tiny_with_the_aux_head(tmp_path, tiny_world, capsys):
    """--preset mae: the values of mmseg's MAE-B UperNet ADE20K config (flags given on the command line win) and a
    line saying so; BEiT's taps, poly lr, layer decay 0.65 with the new layers at the base lr, and the auxiliary FCN
    head trained beside UperNet, end to end on the tiny ViT."""
    cfg = D.apply_preset(D.SegConfig(preset="mae", channels=32), world=1)
    out = capsys.readouterr().out
    assert (cfg.head, cfg.taps, cfg.aux_weight, cfg.crop, cfg.steps, cfg.batch_size, cfg.lr, cfg.head_lr) == (
        "upernet", "beit", 0.4, 512, 160_000, 16, 1e-4, 1e-4)
    assert (cfg.weight_decay, cfg.layer_decay, cfg.schedule, cfg.min_lr_ratio, cfg.warmup, cfg.grad_clip) == (
        0.05, 0.65, "poly", 0.0, 1500, 0.0) and cfg.channels == 32
    assert out.startswith("--preset mae sets --head upernet --taps beit --aux-weight 0.4 --crop 512 --steps 160000")
    assert out.strip().endswith('--batch-size 16; kept from the command line: {"channels": 32}')
    assert D.apply_preset(D.SegConfig(preset="paper", lr=2e-4), world=8).__dict__ == {
        **cfg.__dict__, "preset": "paper", "channels": 768, "batch_size": 2, "lr": 2e-4, "head_lr": 2e-4}
    assert D.tap_blocks(12, "beit") == [3, 5, 7, 11] and D.tap_blocks(24, "beit") == [7, 11, 15, 23]
    assert D.tap_blocks(12, "quarters") == [2, 5, 8, 11] and D.tap_blocks(4, "beit") == [0, 1, 2, 3]
    poly = [D.lr_scale(t, 10, 100, 0.0, "poly") for t in (0, 9, 50, 100)]  # linear from step 0, the warm-up on it
    assert poly == pytest.approx([0.1 * 1.0, 0.91, 0.5, 0.0])
    r = D.main(_args("seg", tiny_world, tmp_path, "--preset", "mae", "--model", "tiny", "--channels", "16",
                     "--steps", "3", "--val-images", "4"))
    assert set(r) == {"miou", "pixel_acc"} and "kept from the command line" in capsys.readouterr().out
    ck = torch.load(tmp_path / "ckpt-3.pt", weights_only=True)
    assert ck["model"]["aux.net.2.weight"].shape == (11, 256, 1, 1) and ck["config"]["taps"] == "beit"
    peaks = sorted({g["peak_lr"] for g in ck["optimizer"]["param_groups"]})  # 4 blocks: patch 0.65^5 .. heads 1
    assert peaks == pytest.approx(sorted(1e-4 * 0.65 ** k for k in range(6)))


def test_unreadable_images_are_replaced_counted_and_stop_past_max_skip_frac(tmp_path, tiny_world, capsys):
    """A quarter of the shard's images broken: training replaces them (the log counts them), evaluation leaves them
    out (counted); with --max-skip-frac 0.1 the run stops with one line."""
    good = list(C.iter_tar_samples(C.expand_shards(tiny_world["val"])[0], {}))[:9]
    bad = [{**g, "__key__": g["__key__"] + "x", "jpg": b"not a jpeg"} for g in good[:3]]
    samples = [s for i, g in enumerate(good) for s in [g] + [bad[i // 3]] * (i % 3 == 0)]  # 3 of 12 broken
    C.write_shard(str(tmp_path / "mixed.tar"), samples)
    mixed = {"train": str(tmp_path / "mixed.tar"), "val": str(tmp_path / "mixed.tar")}
    r = D.main(_args("seg", mixed, tmp_path / "a", "--model", "tiny", "--steps", "3", "--log-every", "1"))
    logged = [json.loads(line) for line in open(tmp_path / "a" / "log.jsonl") if '"loss"' in line]
    assert r["skipped"] == 3 and len(logged) == 3 and logged[-1]["skipped"] > 0
    capsys.readouterr()
    with pytest.raises(SystemExit):
        D.main(_args("seg", mixed, tmp_path / "b", "--model", "tiny", "--steps", "3", "--log-every", "1",
                     "--max-skip-frac", "0.1"))
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "training images read were unreadable (--max-skip-frac 0.1)" in err[0], err


def test_compare_runs_both_arms_from_different_backbones(tmp_path, tiny_world):
    """The comparison end to end in miniature (2 pre-training steps per caption source): both arms report all
    four figures, and they differ, so each fine-tuning really started from its own pre-training."""
    r = D.main(["compare", "--data", tiny_world["train"], "--val-data", tiny_world["val"], "--out", str(tmp_path),
                "--pretrain-steps", "2", "--pretrain-batch", "16", "--steps", "2", "--batch-size", "8",
                "--workers", "0", "--val-images", "4"])
    assert set(r) == {"alt", "synthetic"}
    for source in r:
        assert {"miou", "rmse", "absrel", "delta1"} <= set(r[source])
        assert all(math.isfinite(v) for v in r[source].values())
    assert r["alt"]["rmse"] != r["synthetic"]["rmse"]
    pre = torch.load(tmp_path / "pre_synthetic" / "ckpt-2.pt", weights_only=True)
    assert pre["config"]["caption_source"] == "synthetic"


def test_bad_input_is_one_line(tmp_path):
    with pytest.raises(SystemExit):
        D.main(["segment"])
    with pytest.raises(SystemExit):
        D.main(["seg", "--model", "resnet50", "--data", str(tmp_path), "--out", str(tmp_path / "o")])
    with pytest.raises(SystemExit):
        D.main(["seg", "--init", str(tmp_path / "missing.pt"), "--out", str(tmp_path / "o")])


@pytest.mark.parametrize("argv,own,other", [(["--help"], "  compare ", None), (["seg", "--help"], "--classes", "--max-depth"),
                                            (["depth", "--help"], "--max-depth", "--reduce-zero-label"),
                                            (["compare", "--help"], "--pretrain-steps", "--resume")])
def test_help_lists_commands_and_each_commands_own_flags(argv, own, other, capsys):
    with pytest.raises(SystemExit) as e:
        D.main(argv)
    out = capsys.readouterr().out
    assert e.value.code == 0 and own in out and (other is None or other not in out) and "Traceback" not in out
    if argv == ["--help"]:
        assert "  seg      Fine-tune a backbone" in out and "  depth    Fine-tune a backbone" in out


def _bad_files(tmp_path):
    torch.save(torch.zeros(3), tmp_path / "tensor.pt")
    torch.save({"a": 1}, tmp_path / "dict.pt")
    (tmp_path / "garbage.pt").write_text("not a checkpoint")
    for f in ("empty.pt", "empty.tar"):
        open(tmp_path / f, "wb").close()  # zero bytes
    C.write_shard(str(tmp_path / "bad.tar"), ({"__key__": f"k{i}", "jpg": b"not a jpeg", "seg.png": b"no",
                                               "depth.png": b"no"} for i in range(8)))


@pytest.mark.parametrize("argv,message", [
    (["seg", "--batch-size", "0"], "--batch-size 0: must be >= 1"),
    (["seg", "--steps", "-5"], "--steps -5: must be >= 0"),
    (["depth", "--epochs", "-1"], "--epochs -1.0: must be >= 0"),
    (["seg", "--lr", "-1"], "--lr -1.0: must be >= 0"),
    (["seg", "--workers", "-1"], "--workers -1: must be >= 0"),
    (["seg", "--min-lr-ratio", "2"], "--min-lr-ratio 2.0: must be in [0, 1]"),
    (["seg", "--crop", "-3"], "--crop -3: must be in [0, inf]"),
    (["depth", "--head", "foo"], "--head must be auto, upernet, deconv, linear, not 'foo'"),
    (["seg", "--reduce-zero-label", "maybe"], "--reduce-zero-label must be auto, on, off, not 'maybe'"),
    (["seg", "--resume", "{tmp}/empty.pt", *"--model tiny --data {w}/train --val-data {w}/val".split()],
     "cannot read checkpoint {tmp}/empty.pt: empty file (0 bytes)"),
    (["seg", "--init", "{tmp}/empty.pt"], "cannot read --init {tmp}/empty.pt: empty file (0 bytes)"),
    (["seg", "--init", "{tmp}/garbage.pt"], "cannot read --init {tmp}/garbage.pt: UnpicklingError"),
    (["seg", "--init", "{tmp}/tensor.pt"], "cannot read --init {tmp}/tensor.pt: holds a Tensor, not a checkpoint dict"),
    (["seg", "--init", "{tmp}/dict.pt"], "--init {tmp}/dict.pt: not a checkpoint this script knows"),
    (["seg", "--data", "{tmp}/empty.tar", "--val-data", "{w}/val"],
     "no sample with an image and a seg.png in {tmp}/empty.tar (1 of 1 unreadable)"),
    (["depth", *"--model tiny --crop 32 --steps 3 --workers 0 --data {tmp}/bad.tar --val-data {w}/val".split()],
     "cannot read sample "),
    (["compare", "--pretrain-steps", "0"], "--pretrain-steps 0: must be >= 1"),
    (["seg", "--preset", "beit"], "--preset must be mae, paper, not 'beit'"),
    (["seg", *"--taps 1,2 --model tiny --data {w}/train --val-data {w}/val".split()],
     "--taps 1,2: quarters, beit or four block indices in 0..3"),
])
def test_bad_input_is_one_line_before_any_work(tmp_path, tiny_world, capsys, argv, message):
    _bad_files(tmp_path)
    w = os.path.dirname(tiny_world["train"])
    with pytest.raises(SystemExit) as e:
        D.main([a.format(tmp=tmp_path, w=w) for a in argv] + ["--out", str(tmp_path / "out")])
    err = [line for line in capsys.readouterr().err.strip().splitlines() if "warn" not in line.lower()]
    assert e.value.code != 0 and len(err) == 1 and err[0].startswith("error: ")
    assert message.format(tmp=tmp_path, w=w) in err[0] and not list(tmp_path.glob("out/ckpt-*.pt"))


def test_unreadable_images_stop_a_run_with_workers_in_one_line(tmp_path, tiny_world, capsys):
    """A shard whose every image is bad, read by 2 DataLoader workers: one line naming a sample (no worker
    traceback), a non-zero exit, and no worker left behind (they ignore SIGTERM)."""
    import multiprocessing
    _bad_files(tmp_path)
    with pytest.raises(SystemExit) as e:
        D.main(["seg", "--model", "tiny", "--crop", "32", "--steps", "3", "--workers", "2", "--data",
                str(tmp_path / "bad.tar"), "--val-data", tiny_world["val"], "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1 and not multiprocessing.active_children(), err
    assert err[0].startswith("error: cannot read sample ") and f"of {tmp_path}/bad.tar: UnidentifiedImageError" in err[0]


def test_a_new_run_into_another_runs_checkpoints_stops_or_starts_over(tmp_path, tiny_world, capsys):
    extra = ["--model", "tiny", "--steps", "2", "--val-images", "2"]
    D.main(_args("seg", tiny_world, tmp_path / "a", *extra))
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:  # no --resume: the earlier run's checkpoints are not this run's
        D.main(_args("seg", tiny_world, tmp_path / "a", *extra, "--lr", "1e-3"))
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code != 0 and len(err) == 1 and "holds another run's checkpoints (ckpt-2.pt" in err[0]
    D.main(_args("seg", tiny_world, tmp_path / "a", *extra, "--lr", "1e-3", "--overwrite"))
    assert sorted(os.listdir(tmp_path / "a" / "previous-1")) == ["ckpt-2.pt", "config.json", "log.jsonl"]
    assert json.load(open(tmp_path / "a" / "config.json"))["lr"] == 1e-3


def test_sigterm_to_the_process_group_saves_and_resume_logs_the_same_losses(tmp_path, tiny_world, signal_script):
    """SIGTERM to the process group (a DataLoader worker included) after step 3: the worker ignores it, the main
    process saves a checkpoint at the current step and exits 0, the worker is gone; --resume auto then logs the
    losses of a run that never stopped."""
    import subprocess
    import sys
    extra = ["--model", "tiny", "--steps", "8", "--val-images", "2", "--log-every", "1", "--ckpt-every", "1000"]
    argv = _args("seg", tiny_world, tmp_path / "r", *extra, "--workers", "1")
    proc = subprocess.Popen([sys.executable, signal_script("dense", 3), *argv], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True,
                            env=dict(os.environ, OMP_NUM_THREADS="1"))
    output = proc.communicate(timeout=300)[0]
    assert proc.returncode == 0 and "stopped at step 3" in output and "Traceback" not in output, output
    with pytest.raises(ProcessLookupError):  # the worker is gone too
        os.killpg(proc.pid, 0)
    assert [p.name for p in (tmp_path / "r").glob("ckpt-*.pt")] == ["ckpt-3.pt"]
    D.main(_args("seg", tiny_world, tmp_path / "r", *extra, "--resume", "auto"))
    D.main(_args("seg", tiny_world, tmp_path / "ref", *extra))
    losses = lambda d: {r["step"]: r["loss"] for r in map(json.loads, open(d / "log.jsonl")) if "loss" in r}
    assert losses(tmp_path / "r") == losses(tmp_path / "ref") and len(losses(tmp_path / "ref")) == 8


def test_caption_source_replaces_alt_text():
    """mobileclip.py --caption-source: `synthetic` always takes a quality caption (syn.json's, or the world's
    accurate captioner from the json scene), `mix` with probability p, the same draw for the same (seed, epoch,
    key); a sample without synthetic captions raises (counted and skipped by the stream)."""
    scene = {"shape": "star", "count": 1, "size": "large", "colour": "red", "outlined": False,
             "position": "at the top left", "texture": "striped", "background": "blue",
             "distractors": [["green", "ring"]]}
    samples = [{"__key__": f"k{i}", "txt": b"a star", "json": json.dumps({"scene": scene}).encode()}
               for i in range(400)]
    read = lambda s: s["txt"].decode()
    syn = M.CaptionSource(read, "synthetic", 0.0, "^syn_text.*$", seed=0)
    for c in map(syn, samples[:20]):
        assert all(w in c for w in ("large red star", "top left", "striped blue", "small green ring"))
    mix = M.CaptionSource(read, "mix", 0.25, "^syn_text.*$", seed=0)
    replaced = [mix(s) != "a star" for s in samples]
    assert 0.18 < sum(replaced) / len(replaced) < 0.32
    assert [mix(s) for s in samples[:30]] == [mix(s) for s in samples[:30]]  # deterministic per key
    syn_json = json.dumps({"syn_text": ["one", "two"], "other": ["no"]}).encode()
    with_syn = {"__key__": "x", "txt": b"alt", "syn.json": syn_json}
    assert {syn(with_syn) for _ in range(3)} <= {"one", "two"}
    with pytest.raises(KeyError):
        syn({"__key__": "y", "txt": b"alt only"})
    with pytest.raises(SystemExit):
        M.CaptionSource(read, "coca", 0.5, "^syn_text.*$", seed=0)


def test_alt_noise_replaces_a_fixed_fraction_with_unrelated_alt_text():
    """mobileclip.py --alt-noise q: a fraction ~q of the samples, fixed by the key alone (not the epoch, the
    seed or the worker), gets the alt-text of another random picture, which never names the sample's shape;
    q = 0 leaves the alt-text; a caption the captioner wrote (--caption-source synthetic) is never noisy."""
    scene = {"shape": "star", "count": 1, "size": "large", "colour": "red", "outlined": False,
             "position": "at the top left", "texture": "striped", "background": "blue", "distractors": []}
    meta = json.dumps({"scene": scene}).encode()
    samples = [{"__key__": f"train{i:07d}", "txt": b"a star", "json": meta} for i in range(1000)]
    read = lambda s: s["txt"].decode()
    noisy = M.CaptionSource(read, "alt", 0.0, "^syn_text.*$", seed=0, noise=0.5)
    out = [noisy(s) for s in samples]
    wrong = [c for c in out if c != "a star"]
    assert 0.46 < len(wrong) / len(out) < 0.54
    assert not any("star" in c for c in wrong)
    assert len(set(wrong)) > len(wrong) // 3  # many different pictures, not one fixed wrong caption
    assert any(s in c for c in wrong for s in C.SYNTH_SHAPES)  # the world's alt-text style
    # every epoch, another seed, another worker order: the same samples, the same wrong captions
    later = [{**s, "__epoch__": 3, "__worker__": 1} for s in reversed(samples)]
    again = M.CaptionSource(read, "alt", 0.0, "^syn_text.*$", seed=7, noise=0.5)
    assert [again(s) for s in later][::-1] == out
    more = M.CaptionSource(read, "alt", 0.0, "^syn_text.*$", seed=0, noise=0.75)
    assert all(more(s) == c for s, c in zip(samples, out) if c != "a star")  # nested in q
    clean = M.CaptionSource(read, "alt", 0.0, "^syn_text.*$", seed=0, noise=0.0)
    assert all(clean(s) == "a star" for s in samples[:300])
    syn = M.CaptionSource(read, "synthetic", 0.0, "^syn_text.*$", seed=0, noise=1.0)
    assert all("large red star" in syn(s) for s in samples[:50])
    mix = M.CaptionSource(read, "mix", 0.5, "^syn_text.*$", seed=0, noise=1.0)
    mixed = [mix(s) for s in samples[:400]]
    assert 0.4 < sum("large red star" in c for c in mixed) / 400 < 0.6
    assert all("large red star" in c or "star" not in c for c in mixed)  # the alt-text kept is all wrong
    with pytest.raises(SystemExit):
        M.CaptionSource(read, "alt", 0.0, "^syn_text.*$", seed=0, noise=1.5)
    with pytest.raises(SystemExit):
        M.resolve_data(M.Config(data="shards/x.tar", alt_noise=0.5))
