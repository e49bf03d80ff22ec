"""cliptex.py: the stored pseudo-label formats round-trip exactly (through a tar shard), the synthetic expert's
ignore band, boxes and normals on hand-made inputs, each task loss against its naive loop, the dense features
against the CLIP embedding, labels cropped with the image, the expert failures as one line, resume, and the
tiny comparison: pseudo-supervised training gives better linear-probe features than CLIP-FT on the same data."""
import io
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision
from PIL import Image

import cliptex as X
import common as C
import dense
import mobileclip as M


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: see conftest.py


# ---- stored formats ---------------------------------------------------------------------------------

def test_formats_round_trip_exactly_through_a_shard(tmp_path):
    rng = np.random.default_rng(0)
    seg = rng.integers(0, 12, (17, 23)).astype(np.uint8)
    seg[3:5] = X.IGNORE
    depth = rng.random((17, 23)).astype(np.float32)
    depth[0, :5], depth[1, 0] = 0.0, 1e-7  # invalid, and a valid value below one step (stored as 1, not 0)
    n = rng.normal(size=(17, 23, 3))
    n /= np.linalg.norm(n, axis=-1, keepdims=True)
    valid = rng.random((17, 23)) > 0.2
    det = X.encode_boxes([[1.5, 2.25, 10.0, 7.125]], [3], [0.91234567], (23, 17))
    C.write_shard(str(tmp_path / "a.tar"), [{"__key__": "k0", "seg.png": X.encode_seg(seg),
                                              "depth.png": X.encode_depth(depth),
                                              "normals.png": X.encode_normals(n, valid), "det.json": det}])
    s = next(C.iter_tar_samples(str(tmp_path / "a.tar"), {}))
    assert (X.decode_seg(s["seg.png"]) == seg).all()
    d = X.decode_depth(s["depth.png"])
    q = np.round(depth * 65535)
    q[1, 0] = 1
    assert (d * 65535 == q).all() and (d[0, :5] == 0).all() and d[1, 0] > 0
    d[1, 0] = depth[1, 0]
    assert np.abs(d - depth).max() <= 0.5 / 65535 + 1e-7  # elsewhere within half a step
    n2, v2 = X.decode_normals(s["normals.png"])
    codes = np.asarray(Image.open(io.BytesIO(s["normals.png"])))  # the stored 8-bit codes, exactly
    assert (codes == np.where(valid[..., None], np.round((n + 1) * 127.5), 0)).all() and (v2 == valid).all()
    assert np.degrees(np.arccos(np.clip((n2 * n).sum(-1)[valid], -1, 1))).max() < 1.0  # 8 bits: < 1 degree
    assert json.loads(s["det.json"]) == {"boxes": [[1.5, 2.25, 10.0, 7.12]], "classes": [3], "scores": [0.9123],
                                         "size": [23, 17]}


def test_synthetic_expert_ignore_band_boxes_and_normals():
    m = np.zeros((8, 10), np.uint8)
    m[1:3, 1:4] = 2  # a 2x3 object of class 2
    m[5:7, 6:10] = 7  # class 7 touching the right edge
    m[4, 6] = 5  # class 5 touching class 7 diagonally-above
    out = X.unsure_boundaries(m)
    assert (out[1:3, 1:4] == 2).all()  # object pixels next to background stay labelled
    assert out[0, 0] == out[3, 4] == X.IGNORE and out[0, 5] == 0  # the background ring is ignored, beyond is not
    assert out[4, 6] == X.IGNORE and out[5, 6] == X.IGNORE and out[6, 9] == 7  # two classes meet: both unsure
    boxes, classes = X.connected_boxes(m, min_area=2)
    assert sorted(zip(classes, boxes)) == [(2, [1, 1, 4, 3]), (7, [6, 5, 10, 7])]  # class 5 (1 px) dropped
    ring = np.zeros((6, 6), np.uint8)
    ring[1, 1:5] = ring[4, 1:5] = ring[1:5, 1] = ring[1:5, 4] = 3
    ring[0, 5] = 3  # 8-connected to the ring's corner
    assert X.connected_boxes(ring, 1) == ([[1, 0, 6, 5]], [3])
    # a plane z = d W with d = 0.3 + 0.01 x: normal (-0.01 W, 0, 1) normalised, valid except across a jump
    H, W = 5, 8
    d = 0.3 + 0.01 * np.tile(np.arange(W, dtype=np.float32), (H, 1))
    n, valid = X.normals_from_depth(d, jump=0.05)
    expect = np.array([-0.01 * W, 0, 1]) / np.hypot(0.01 * W, 1)
    assert np.allclose(n[:, 1:-1], expect, atol=1e-5) and valid.all()
    d[:, 4:] += 0.2
    assert not X.normals_from_depth(d, 0.05)[1][:, 3:5].any() and X.normals_from_depth(d, 0.05)[1][:, :3].all()


# ---- losses against their naive versions --------------------------------------------------------------

def test_task_losses_match_naive_versions():
    g = torch.Generator().manual_seed(0)
    logits, seg = torch.randn(2, 5, 3, 3, generator=g), torch.randint(0, 5, (2, 6, 6), generator=g)
    seg[0, :2] = X.IGNORE
    assert float(X.seg_loss(logits, seg)) == pytest.approx(float(X.seg_loss_reference(logits, seg)), rel=1e-5)
    assert float(X.seg_loss(logits, torch.full_like(seg, X.IGNORE))) == 0.0  # not NaN
    pred, depth = torch.randn(3, 1, 3, 3, generator=g), torch.rand(3, 6, 6, generator=g) + 0.05
    depth[0, 0], depth[2] = 0, 0  # an invalid pixel, and an image with none valid (left out of the mean)
    assert float(X.depth_loss(pred, depth)) == pytest.approx(float(X.depth_loss_reference(pred, depth)), rel=1e-5)
    # scale invariance: a constant factor on the target changes nothing at lambda = 1
    assert float(X.depth_loss(pred, depth * 0.5, 1.0)) == pytest.approx(float(X.depth_loss(pred, depth, 1.0)), abs=1e-3)
    pn, tn = torch.randn(2, 3, 3, 3, generator=g), F.normalize(torch.randn(2, 3, 6, 6, generator=g), dim=1)
    vn = torch.rand(2, 6, 6, generator=g) > 0.3
    assert float(X.normals_loss(pn, tn, vn)) == pytest.approx(float(X.normals_loss_reference(pn, tn, vn)), rel=1e-5)
    assert float(X.normals_loss(tn, tn, vn)) == pytest.approx(0.0, abs=1e-6)
    det = X.det_targets({"boxes": [[0, 0, 12, 8], [20, 16, 32, 32]], "classes": [1, 2], "size": [32, 32]},
                        (0, 0, 32, 32), (32, 32), 32, 3)
    assert det["det_heat"][1, 1, 1] == 1 and det["det_heat"][2, 6, 6] == 1 and det["det_centre"].sum() == 2
    assert det["det_size"][:, 1, 1].tolist() == [3.0, 2.0]  # (w, h) in stride-4 cells
    heat, size, centre = (torch.stack([det[k]] * 2) for k in ("det_heat", "det_size", "det_centre"))
    out = torch.randn(2, 5, 8, 8, generator=g)
    fast, ref = X.det_loss(out, heat, size, centre), X.det_loss_reference(out, heat, size, centre)
    assert float(fast) == pytest.approx(float(ref), rel=1e-5)


def test_dense_features_are_the_clip_forward():
    for name in ("mobileclip_tiny", "tiny"):
        torch.manual_seed(0)
        clip = M.build_model(M.Config(model=name), 300).eval()
        x = torch.randn(2, 3, 64, 64)
        emb, feats = X.dense_features(clip.visual, x)
        assert torch.allclose(emb, clip.visual(x), atol=1e-5), name
        assert [f.shape[1] for f in feats] == X.feature_channels(clip.visual)
        model = X.CLIPTeX(clip, ["seg", "det"], 11, 11, 16)
        _, _, _, outs = model(x, torch.randint(1, 300, (2, 32)))
        assert outs["seg"].shape == (2, 11, 16, 16) and outs["det"].shape == (2, 13, 16, 16)


# ---- labelling and data ---------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def labelled(world, tmp_path_factory):
    """Two shards (500 samples) of the test world and their pseudo-labels from the synthetic experts."""
    out = str(tmp_path_factory.mktemp("labels"))
    data = os.path.join(world["train"], "train-0000{0,1}.tar")
    X.main(["label", "--data", data, "--out", out, "--device", "cpu"])
    return data, out


def test_label_writes_every_member_in_the_data_order(labelled):
    data, out = labelled
    for path in C.expand_shards(data):
        lab = list(C.iter_tar_samples(os.path.join(out, os.path.basename(path)), {}))
        keys = [s["__key__"] for s in C.iter_tar_samples(path, {})]
        assert [s["__key__"] for s in lab] == keys
        assert all(set(s) == {"__key__", "seg.png", "depth.png", "normals.png", "det.json"} for s in lab)
    s = next(C.iter_tar_samples(path, {}))
    assert (X.decode_depth(lab[0]["depth.png"]) == X.decode_depth(s["depth.png"])).all()  # the renderer's depth


def test_targets_follow_the_image_crop(labelled):
    """Labels get the image's random crop: the target mask is where the crop's colours say the object is."""
    data, out = labelled
    dec = X.LabelledDecode(C.Tokenizer(merges=[]), 64, 16, ["seg", "depth", "normals", "det"], 11, seed=3)
    stream = X.LabelledShards(C.expand_shards(data)[:1], out, dec, 8, shuffle_buffer=1, epochs=1)
    agree = []
    for b in stream:
        for img, seg, depth in zip(b["image"], b["seg"], b["depth"]):
            fg, sure = (seg > 0) & (seg != X.IGNORE), seg != X.IGNORE
            near = depth > 0.45  # objects are nearer than 0.45, the background plane farther
            agree.append(((fg == near) | ~sure).float().mean())
        assert b["normals"].shape == (8, 3, 64, 64) and b["det_heat"].shape == (8, 11, 16, 16)
        if len(agree) >= 64:
            break
    assert torch.stack(agree).mean() > 0.97


def test_experts_fail_with_one_clear_line(tmp_path, capsys, world):
    data = os.path.join(world["train"], "train-00000.tar")
    for args in (["--experts", "seg", "--seg-expert", "torchvision:deeplabv3_resnet50", "--seg-weights", "nope.pth"],
                 ["--experts", "depth", "--depth-expert", "nope.pt"], ["--experts", "colour"]):
        with pytest.raises(SystemExit):
            X.main(["label", "--data", data, "--out", str(tmp_path / "l"), *args])
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error:"), err
    with pytest.raises(SystemExit):
        X.main(["train", "--data", data, "--out", str(tmp_path / "t")])  # tasks but no --labels
    assert "--labels" in capsys.readouterr().err
    C.write_shard(str(tmp_path / "web.tar"), [{"__key__": "a", "jpg": Image.new("RGB", (8, 8)), "txt": "a cat"}])
    with pytest.raises(SystemExit):  # the synthetic experts on data without ground truth
        X.main(["label", "--data", str(tmp_path / "web.tar"), "--out", str(tmp_path / "l2")])
    assert "no sample" in capsys.readouterr().err and not [f for f in os.listdir(tmp_path / "l2") if ".tar" in f]


def test_torchscript_depth_expert(world, tmp_path):
    class Brightness(torch.nn.Module):  # a stand-in "depth model": brighter = nearer
        def forward(self, x):
            return x.mean(1, keepdim=True)
    torch.jit.script(Brightness()).save(str(tmp_path / "depth.pt"))
    X.main(["label", "--data", os.path.join(world["train"], "train-00007.tar"), "--out", str(tmp_path / "l"),
            "--experts", "depth,normals", "--depth-expert", str(tmp_path / "depth.pt")])
    s = next(C.iter_tar_samples(str(tmp_path / "l" / "train-00007.tar"), {}))
    d = X.decode_depth(s["depth.png"])
    assert set(s) == {"__key__", "depth.png", "normals.png"} and d.min() > 0 and d.max() == 1.0


def test_torchvision_experts_label_a_shard(world, tmp_path, capsys):
    """torchvision:lraspp_mobilenet_v3_large (seg) and torchvision:ssdlite320_mobilenet_v3_large (det) from state
    dicts in torchvision's layout (random weights, saved here): the label pass over three images stores exactly
    the models' hard labels (seg: the argmax, 255 where the top probability is under the threshold; det: the
    boxes scored at least the threshold, within the image); a weights file of the other model fails with one line.
    The thresholds are the medians of the models' own scores, so both sides of each are exercised."""
    torch.manual_seed(0)
    seg = torchvision.models.get_model("lraspp_mobilenet_v3_large", weights=None, weights_backbone=None).eval()
    det = torchvision.models.get_model("ssdlite320_mobilenet_v3_large", weights=None, weights_backbone=None).eval()
    with torch.no_grad():  # torchvision's init scores every class 1/91 everywhere: spread the scores
        for m in det.head.classification_head.modules():
            if isinstance(m, torch.nn.Conv2d) and m.bias is not None:
                m.bias.normal_(0, 1)
    # seg.pth as torchvision's DeepLabV3 files (an auxiliary head) and files saved from FrozenBatchNorm2d (no BN
    # step counters): the expert drops the one and keeps the model's own of the other
    torch.save({**{k: v for k, v in seg.state_dict().items() if not k.endswith("num_batches_tracked")},
                "aux_classifier.4.weight": torch.zeros(21, 10, 1, 1)}, tmp_path / "seg.pth")
    torch.save(det.state_dict(), tmp_path / "det.pth")
    samples = list(C.iter_tar_samples(os.path.join(world["train"], "train-00000.tar"), {}))[:3]
    os.makedirs(tmp_path / "data")
    C.write_shard(str(tmp_path / "data" / "a.tar"), samples)
    want_seg, want_det = [], []
    mean, std = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1), torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)
    with torch.no_grad():
        for s in samples:  # the models on each image, as the expert should run them
            x = torch.from_numpy(np.asarray(C.decode_image(s), np.float32) / 255).permute(2, 0, 1)  # (3, 32, 32)
            want_seg.append(seg(((x - mean) / std)[None])["out"][0].softmax(0).max(0))  # (prob, class), (32, 32) each
            want_det.append(det([x])[0])
    seg_thr = float(torch.cat([p.flatten() for p, _ in want_seg]).median())
    det_thr = float(torch.cat([d["scores"] for d in want_det]).median())
    X.main(["label", "--data", str(tmp_path / "data" / "a.tar"), "--out", str(tmp_path / "l"), "--experts", "seg,det",
            "--seg-expert", "torchvision:lraspp_mobilenet_v3_large", "--seg-weights", str(tmp_path / "seg.pth"),
            "--det-expert", "torchvision:ssdlite320_mobilenet_v3_large", "--det-weights", str(tmp_path / "det.pth"),
            "--seg-threshold", str(seg_thr), "--det-threshold", str(det_thr), "--device", "cpu"])
    lab = list(C.iter_tar_samples(str(tmp_path / "l" / "a.tar"), {}))
    assert [s["__key__"] for s in lab] == [s["__key__"] for s in samples]
    n_ignored, n_boxes = 0, 0
    for s, (prob, cls), d in zip(lab, want_seg, want_det):
        m = X.decode_seg(s["seg.png"])
        assert m.shape == (32, 32) and (m == np.where(prob < seg_thr, X.IGNORE, cls)).all()
        n_ignored += int((m == X.IGNORE).sum())
        boxes = json.loads(s["det.json"])
        keep = d["scores"] >= det_thr
        assert boxes["size"] == [32, 32] and boxes["classes"] == d["labels"][keep].tolist()
        b = np.array(boxes["boxes"]).reshape(-1, 4)
        assert np.allclose(b, d["boxes"][keep].numpy(), atol=0.006) and (b >= 0).all() and (b <= 32).all()
        assert all(det_thr - 1e-4 <= v <= 1 for v in boxes["scores"]) and all(0 < c < 91 for c in boxes["classes"])
        n_boxes += len(b)
    assert 0 < n_ignored < 3 * 32 * 32 and 0 < n_boxes < sum(len(d["scores"]) for d in want_det)
    capsys.readouterr()
    for weights in ("det.pth", "data/a.tar"):  # another model's weights; not a state dict at all
        with pytest.raises(SystemExit):
            X.main(["label", "--data", str(tmp_path / "data" / "a.tar"), "--out", str(tmp_path / "l2"),
                    "--experts", "seg", "--seg-expert", "torchvision:lraspp_mobilenet_v3_large",
                    "--seg-weights", str(tmp_path / weights)])
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error: --seg-weights"), err


# ---- training: resume and the tiny comparison -------------------------------------------------------------

def train_args(data, labels, out, steps, *extra):
    return ["train", "--data", data, "--labels", labels, "--out", out, "--steps", str(steps), "--batch-size", "16",
            "--workers", "0", "--log-every", "5", "--no-eval", "--warmup", "5", *extra]


def probe_features(ckpt, shards):
    """A least-squares linear probe on the frozen stage features, scored as dense.py scores (common.miou)."""
    ck = torch.load(ckpt, weights_only=True)
    clip = M.build_model(M.Config(model=ck["model_name"]), ck["vocab_size"]).eval()
    clip.load_state_dict(ck["model"])
    def decode(s):  # the whole image at 64 px, the ground truth at its own 32 px
        img = C.decode_image(s)
        return {"image": C.image_to_uint8(img, 64, (0, 0, *img.size)), "depth": torch.from_numpy(
                X.decode_depth(s["depth.png"])), "seg": torch.from_numpy(X.decode_seg(s["seg.png"]).astype(np.int64))}
    feats, segs, depths = [], [], []
    for b in C.ShardStream(C.expand_shards(shards), decode, 50, shuffle_buffer=1, epochs=1):
        with torch.no_grad():
            _, fs = X.dense_features(clip.visual, M.preprocess(b["image"], M.model_spec(ck["model_name"])))
        fs = torch.cat([F.interpolate(f, size=(16, 16), mode="bilinear") for f in fs], 1)  # (B, C, 16, 16)
        feats.append(fs.permute(0, 2, 3, 1).reshape(-1, fs.shape[1]))
        segs.append(F.interpolate(b["seg"][:, None].float(), size=(16, 16))[:, 0].long().flatten())
        depths.append(F.interpolate(b["depth"][:, None], size=(16, 16))[:, 0].flatten())
    x, seg, depth = torch.cat(feats), torch.cat(segs), torch.cat(depths)
    x = torch.cat([(x - x.mean(0)) / (x.std(0) + 1e-6), torch.ones(len(x), 1)], 1)
    n = len(x) * 3 // 4  # fit on 3/4 of the pixels, score on the rest (other images)
    ridge = torch.eye(x.shape[1]) * 1.0
    y = torch.cat([F.one_hot(seg, 11).float(), (seg > 0).float()[:, None], depth[:, None]], 1)
    pred = x[n:] @ torch.linalg.solve(x[:n].T @ x[:n] + ridge, x[:n].T @ y[:n])  # (M, 13)
    miou = C.miou(C.confusion_matrix(pred[:, :11].argmax(1), seg[n:], 11))
    fg_iou = C.miou(C.confusion_matrix((pred[:, 11] > 0.5).long(), (seg[n:] > 0).long(), 2), per_class=True)[1][1]
    rmse = float(dense.depth_errors(pred[:, 12][None], depth[n:][None])["rmse"].mean())
    return miou, float(fg_iou), rmse


def test_tiny_comparison_pseudo_supervision_beats_clip_ft(labelled, world, tmp_path):
    """From the same fresh CLIP, on the same samples and crops for 40 steps: the task losses fall, and the
    frozen features of CLIPTeX probe better than those of contrastive-only training (CLIP-FT): foreground IoU
    up, depth RMSE down (40 steps do not yet separate the ten shape classes: their mIoU is only kept)."""
    data, labels = labelled
    runs = {}
    for name, extra in (("clipft", ["--baseline"]), ("cliptex", [])):
        out = str(tmp_path / name)
        X.main(train_args(data, labels, out, 40, "--seed", "1", "--lr", "2e-3", "--head-lr", "1e-2", *extra))
        log = [r for r in map(json.loads, open(os.path.join(out, "log.jsonl"))) if "loss" in r]  # step records
        runs[name] = probe_features(os.path.join(out, "ckpt-40.pt"), os.path.join(world["train"], "train-00003.tar"))
        if name == "cliptex":
            assert log[-1]["seg"] < log[0]["seg"] and log[-1]["det"] < log[0]["det"]
            assert log[-1]["clip"] < log[0]["clip"] + 0.2  # the contrastive task goes on
    # (mIoU, foreground IoU, depth RMSE), measured since common.py's torchvision crop/resize path (5d9fa76): seed 1
    # (10.4, 65.5, 0.151) vs (10.6, 66.9, 0.140); seeds 0-3: foreground IoU +1.4 to +11.8, RMSE 0.0065 to 0.0115 lower
    print(runs)
    assert runs["cliptex"][1] > runs["clipft"][1]
    assert runs["cliptex"][2] < runs["clipft"][2] - 0.003
    assert runs["cliptex"][0] > runs["clipft"][0] - 1


# ---- issue 28: --help, one-line errors, one run per --out, SIGTERM ---------------------------------------------------

OWN_FLAG = {"label": ("--experts", "--steps"), "train": ("--tasks", "--experts"), "probe": ("--probe-steps", "--tasks"),
            "compare": ("--base-steps", "--nothing")}


def test_help_lists_the_commands_and_each_commands_own_flags(capsys):
    with pytest.raises(SystemExit) as e:
        X.main(["--help"])
    out = capsys.readouterr().out
    assert e.value.code == 0 and "CLIPTeX" in out and all(f"  {name} " in out for name in OWN_FLAG)
    for name, (own, other) in OWN_FLAG.items():
        with pytest.raises(SystemExit) as e:
            X.main([name, "--help"])
        text = capsys.readouterr().out
        assert e.value.code == 0 and own in text and other not in text, name
        assert text.count("--device") == 2  # a shared flag once (usage line and its entry)
    with pytest.raises(SystemExit) as e:  # no command: the list, and one line saying a command is needed
        X.main([])
    assert e.value.code != 0 and capsys.readouterr().err.strip().splitlines()[-1] == "error: a command is needed"


BAD = [(["train", "--batch-size", "0"], "--batch-size 0: must be >= 1"),
       (["train", "--steps", "-5"], "--steps -5: must be >= 0"),
       (["train", "--lr", "-1"], "--lr -1.0: must be >= 0"),
       (["train", "--workers", "-1"], "--workers -1: must be >= 0"),
       (["train", "--max-skip-frac", "1.5"], "--max-skip-frac 1.5: must be between 0 and 1"),
       (["label", "--seg-threshold", "2"], "--seg-threshold 2.0: must be between 0 and 1"),
       (["train", "--seg-classes", "0", "--labels", "{tmp}"], "--seg-classes 0: must be >= 1"),
       (["train", "--head-width", "0", "--labels", "{tmp}"], "--head-width 0: must be >= 1"),
       (["label", "--data", "{tar}"], "--data {tar}: its shard file(s) empty"),
       (["train", "--baseline", "--data", "{tar}"], "--data {tar}: its shard file(s) empty"),
       (["train", "--baseline", "--data", "{shard}", "--resume", "{pt}"], "empty file (0 bytes)"),
       (["train", "--baseline", "--data", "{shard}", "--init", "{pt}"], "--init {pt}: cannot read it (empty file"),
       (["train", "--baseline", "--data", "{shard}", "--init", "{txt}"], "--init {txt}: cannot read it"),
       (["probe", "--init", "{pt}"], "--init {pt}: cannot read it"),
       (["label", "--data", "{shard}", "--experts", "depth", "--depth-expert", "torch.nn:Identity", "--depth-weights",
         "{pt}"], "--depth-weights {pt}: not a state-dict file (empty file"),
       (["label", "--data", "{shard}", "--experts", "seg", "--seg-expert", "torchvision:lraspp_mobilenet_v3_large",
         "--seg-weights", "{pt}"], "--seg-weights {pt}: not a state-dict file (empty file"),
       (["train", "--baseline", "--data", "{bad}", "--workers", "0"], "no usable sample in a whole pass"),
       (["label", "--data", "{bad}"], "no sample of {bad} could be labelled")]  # every image bad


@pytest.mark.parametrize("argv,msg", BAD, ids=[" ".join(a[:3]) for a, _ in BAD])
def test_bad_input_gets_one_line_before_any_work(argv, msg, world, tmp_path, capsys):
    paths = dict(tar=str(tmp_path / "x.tar"), pt=str(tmp_path / "x.pt"), txt=str(tmp_path / "x.txt"), tmp=str(tmp_path),
                 shard=os.path.join(world["train"], "train-00000.tar"))
    open(paths["tar"], "wb").close()  # zero bytes
    open(paths["pt"], "wb").close()
    open(paths["txt"], "w").write("not a checkpoint\n")
    C.write_shard(paths.setdefault("bad", str(tmp_path / "bad.tar")),
                  [{"__key__": f"k{i}", "jpg": b"not an image", "txt": "a red circle"} for i in range(5)])
    out = str(tmp_path / "run")
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        X.main([argv[0], "--out", out, "--device", "cpu"] + [a.format(**paths) for a in argv[1:]])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code != 0 and len(err) == 1 and err[0].startswith("error: ") and msg.format(**paths) in err[0], err
    assert not os.path.exists(out) or not [f for f in os.listdir(out) if f.endswith((".pt", ".tar"))]


def baseline_args(shard, out, steps, *extra):
    return ["train", "--baseline", "--data", shard, "--out", out, "--steps", str(steps), "--batch-size", "8",
            "--log-every", "1", "--warmup", "2", "--no-eval", "--device", "cpu", *extra]


def test_a_new_run_into_another_runs_checkpoints_stops(world, tmp_path, capsys):
    shard, out = os.path.join(world["train"], "train-00000.tar"), str(tmp_path / "t")
    X.main(baseline_args(shard, out, 2, "--workers", "0"))
    capsys.readouterr()
    with pytest.raises(SystemExit):
        X.main(baseline_args(shard, out, 2, "--workers", "0"))  # no --resume
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "holds another run's checkpoints (ckpt-2.pt" in err[0] and "--overwrite" in err[0], err


def test_sigterm_to_the_process_group_saves_and_resume_continues_exactly(labelled, tmp_path, signal_script):
    """kill -TERM -PGID after step 2 of a run with all four task heads: it saves a checkpoint at the current step and
    exits 0; --resume auto then logs the losses of a run never stopped, step for step, and ends with its weights."""
    data, labels = labelled
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    argv = train_args(data, labels, a, 5, "--log-every", "1")
    run = subprocess.run([sys.executable, signal_script("cliptex", 2), *argv], capture_output=True, text=True,
                         start_new_session=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert run.returncode == 0 and "Traceback" not in run.stderr, run.stderr[-3000:]
    assert [os.path.basename(p) for p in C.checkpoints(a)] == ["ckpt-2.pt"]
    assert "stopped by a signal at step 2" in run.stdout
    X.main(argv + ["--resume", "auto"])
    X.main(train_args(data, labels, b, 5, "--log-every", "1"))
    loss = lambda d: {r["step"]: r["loss"] for r in map(json.loads, open(os.path.join(d, "log.jsonl"))) if "loss" in r}
    la, lb = loss(a), loss(b)
    assert sorted(la) == sorted(lb) == list(range(1, 6))
    assert all(la[s] == pytest.approx(lb[s], rel=1e-5) for s in lb), (la, lb)
    sa, sb = (torch.load(os.path.join(d, "ckpt-5.pt"), weights_only=True) for d in (a, b))
    for part in ("model", "heads"):
        for k in sa[part]:
            assert torch.allclose(sa[part][k], sb[part][k], atol=1e-6), (part, k)
    assert sb["tasks"] == ["seg", "depth", "normals", "det"] and "bpe.txt" in os.listdir(b)


def test_load_clip_fits_a_v1_head_bias(tmp_path):
    """A run continued from a v1 MobileCLIP whose timm head learned a bias: load_clip gives the head a bias
    (mobileclip.fit_head_bias) and loads the checkpoint strictly, bias included."""
    tok = C.Tokenizer(merges=[])
    tok.save(str(tmp_path / "bpe.txt"))
    clip = M.build_model(M.Config(model="mobileclip_tiny"), tok.vocab_size)
    bias = torch.randn(clip.visual.head.proj.shape[1])
    sd = {**clip.state_dict(), "visual.head.bias": bias}
    torch.save({"model": sd, "model_name": "mobileclip_tiny", "vocab_size": tok.vocab_size, "config": {}, "step": 1},
               tmp_path / "ckpt-1.pt")
    cfg = X.TrainConfig(init=str(tmp_path / "ckpt-1.pt"), out=str(tmp_path / "out"))
    ck, name = X.read_init(cfg)
    loaded, _ = X.load_clip(cfg, ck, name, [])
    assert torch.equal(loaded.visual.head.bias, bias)
