"""Knowledge transfer (transfer.py): chunked retrieval against brute force, the KD loss against its naive
version (per image and per pixel), mIoU by hand, the retrieve command end to end, resume, a torchvision
student from an ImageNet weights file, and a tiny run of the whole comparison on the synthetic world."""
import collections
import dataclasses
import json
import math
import os
import signal
import socket
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
import torchvision

import common as C
import transfer as T


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: see conftest.py


def chunks_of(emb, size):
    for lo in range(0, len(emb), size):
        yield emb[lo:lo + size], torch.arange(lo, min(lo + size, len(emb))) * 10 + 3  # ids need not be positions


@pytest.mark.parametrize("chunk", [1, 6, 7, 53, 100])
@pytest.mark.parametrize("k", [1, 5, 7, 60])
def test_nearest_neighbours_is_exact_top_k(chunk, k):
    g = torch.Generator().manual_seed(0)
    q = F.normalize(torch.randn(9, 16, generator=g), dim=-1)
    pool = F.normalize(torch.randn(53, 16, generator=g), dim=-1)
    scores, ids = T.nearest_neighbours(q, chunks_of(pool, chunk), k)
    ref = (q @ pool.T).topk(min(k, 53), dim=1)  # brute force over the whole pool at once
    assert ids.tolist() == (ref.indices * 10 + 3).tolist()
    assert torch.allclose(scores, ref.values, atol=1e-6)  # fp32: another summation order per chunk


def test_merging_ranks_gives_the_global_top_k():
    """Two 'ranks' each keep their own top-k over half the pool; merging the two lists is exact."""
    g = torch.Generator().manual_seed(1)
    q, pool = torch.randn(4, 8, generator=g), torch.randn(40, 8, generator=g)
    a = T.nearest_neighbours(q, [(pool[:17], torch.arange(17))], 6)
    b = T.nearest_neighbours(q, [(pool[17:], torch.arange(17, 40))], 6)
    s, i = T.merge_topk(a[0][:, :0], a[1][:, :0], torch.cat([a[0], b[0]], 1), torch.cat([a[1], b[1]], 1), 6)
    assert i.tolist() == (q @ pool.T).topk(6, dim=1).indices.tolist()


@pytest.mark.parametrize("temp", [1.0, 2.0])
def test_kd_loss_matches_naive_per_image_and_per_pixel(temp):
    g = torch.Generator().manual_seed(2)
    s, t = torch.randn(5, 4, generator=g) * 3, torch.randn(5, 4, generator=g) * 3
    assert float(T.kd_loss(s, t, temp)) == pytest.approx(T.kd_loss_reference(s, t, temp), rel=1e-5)
    s, t = torch.randn(2, 3, 4, 5, generator=g), torch.randn(2, 3, 4, 5, generator=g)  # per pixel
    assert float(T.kd_loss(s, t, temp)) == pytest.approx(T.kd_loss_reference(s, t, temp), rel=1e-5)
    small = torch.randn(2, 3, 2, 2, generator=g)  # a coarser student map is resized to the teacher grid
    up = F.interpolate(small, size=(4, 5), mode="bilinear", align_corners=False)
    assert float(T.kd_loss(small, t, temp)) == pytest.approx(T.kd_loss_reference(up, t, temp), rel=1e-5)
    assert float(T.kd_loss(t, t, temp)) == pytest.approx(0.0, abs=1e-6)


def test_kd_loss_gradient_moves_student_to_teacher():
    t = torch.tensor([[2.0, 0.0, -1.0]])
    s = torch.zeros(1, 3, requires_grad=True)
    opt = torch.optim.SGD([s], lr=1.0)
    for _ in range(500):
        opt.zero_grad()
        T.kd_loss(s, t).backward()
        opt.step()
    assert torch.allclose(s.softmax(1), t.softmax(1), atol=1e-3)


class ColourModel(torch.nn.Module):
    """A stand-in segmenter exact per pixel: class = red // 60, as one-hot logits (B, 4, h, w)."""

    def forward(self, x):
        return F.one_hot((x[:, 0].long() // 60).clamp(max=3), 4).permute(0, 3, 1, 2).float()


def test_segmentation_is_scored_on_whole_images_ignoring_255(tmp_path):
    """mIoU as mmsegmentation scores it: every pixel of a whole 32 x 56 image (windows of 32 every 21 px, averaged:
    exact for a per-pixel model), IGNORE pixels never scored (here the model calls them class 2, the label 255: were
    they background, class 2 and background would lose IoU), reduce-zero-label leaving label 0 out (ADE20K)."""
    import numpy as np
    from PIL import Image
    g = np.random.default_rng(0)
    cls = np.zeros((32, 56), np.uint8)
    cls[4:20, 5:30], cls[10:30, 35:50], cls[22:, 2:12] = 1, 2, 3
    label = cls.copy()
    label[12:16, 38:44] = 255  # ignored pixels (predicted as class 2)
    red = (60 * cls + 5 + g.integers(0, 20, cls.shape)).astype(np.uint8)
    img = Image.fromarray(np.stack([red, red // 2, red // 3], -1))
    C.write_shard(str(tmp_path / "t.tar"), [{"__key__": f"k{i}", "png": img, "seg.png": Image.fromarray(label)}
                                          for i in range(2)])
    x = torch.from_numpy(np.array(img)).permute(2, 0, 1)[None]
    torch.testing.assert_close(T.slide_logits(ColourModel(), x, 32, 21), ColourModel()(x))
    cfg = T.Config(task="seg", num_classes=3, image_size=32, test=str(tmp_path / "t.tar"), workers=0)
    m = T.evaluate(ColourModel(), cfg, torch.device("cpu"))
    assert m["test_pixels"] == 2 * (32 * 56 - 24) and m["miou"] == 100.0 and m["pixel_acc"] == 100.0
    m = T.evaluate(ColourModel(), dataclasses.replace(cfg, reduce_zero_label=True), torch.device("cpu"))
    assert m["test_pixels"] == 2 * int(((label > 0) & (label < 255)).sum()) and m["miou"] == 100.0
    png = lambda a: {"seg.png": C.encode_member("seg.png", Image.fromarray(np.asarray(a, np.uint8)))}
    assert (T.read_mask(png(label), 3) == 255).sum() == 24  # 255 stays 255, never background
    assert T.read_mask(png([[0, 4, 255, 2]]), 3).tolist() == [[0, 0, 255, 2]]  # a class outside the task: background
    assert T.read_mask(png([[0, 4, 255, 2]]), 3, True).tolist() == [[255, 255, 255, 2]]
    assert T.task_loss(torch.randn(1, 4, 2, 2), torch.full((1, 2, 2), 255)).item() == 0.0


def micro_vfm(path):
    """A randomly initialised micro CLIP ViT (32 px, 4 x 4 patches) saved in the OpenCLIP layout: the VFM
    and retrieval encoder of the tests."""
    torch.manual_seed(0)
    clip = C.build_clip(image_size=32, patch=8, width=64, layers=2, heads=1, embed_dim=32, text_width=64,
                        text_layers=1, text_heads=1, vocab_size=64, context_length=8)
    torch.save(C.ours_to_openclip(clip.state_dict()), path)
    return path


def test_retrieve_writes_the_union_of_the_brute_force_neighbours(world, tmp_path):
    enc = micro_vfm(str(tmp_path / "clip.pt"))
    labelled = T.write_labelled(world["train"], str(tmp_path / "labelled"), 3, 2)  # 6 queries
    pool = C.expand_shards(world["train"])[:1]  # 250 images
    cfg = T.Config(queries=labelled, pool="::".join(pool), encoder=enc, per_query=4, image_size=32, workers=0,
                   batch_size=64, out=str(tmp_path / "set"), shard_size=7)
    info = T.retrieve(cfg)
    # brute force: every pool image embedded at once, the queries excluded from the pool
    vfm = T.load_foundation(enc).eval()
    q_keys = {s["__key__"] for s in C.iter_tar_samples(os.path.join(labelled, "labelled-00000.tar"), {})}
    embed = lambda paths: [(s["__key__"], s) for p in paths for s in C.iter_tar_samples(p, {})]
    items = [(k, s) for k, s in embed(pool) if k not in q_keys]
    to_x = lambda ss: torch.stack([C.eval_transform(C.decode_image(s), 32) for s in ss])  # OpenCLIP's eval crop
    with torch.no_grad():
        e = F.normalize(vfm(to_x([s for _, s in items]))[0], dim=-1)
        q = F.normalize(vfm(to_x([s for _, s in embed([os.path.join(labelled, "labelled-00000.tar")])]))[0], dim=-1)
    want = {items[i][0] for i in (q @ e.T).topk(4, dim=1).indices.flatten().tolist()}
    got = [s["__key__"] for p in C.expand_shards(cfg.out) for s in C.iter_tar_samples(p, {})]
    assert sorted(got) == sorted(want) and len(got) == len(set(got)) == info["transfer_set"]
    assert info["neighbours"] == 24 and len(C.expand_shards(cfg.out)) == -(-len(want) // 7)
    # the paper's size rule: N = 27 for Q = 6 queries gives k = 4 each, every neighbour as often as retrieved
    rule = T.retrieve(dataclasses.replace(cfg, transfer_size=27, per_query=1, out=str(tmp_path / "rule")))
    top4 = collections.Counter(items[i][0] for i in (q @ e.T).topk(4, dim=1).indices.flatten().tolist())
    got = [s["__key__"] for p in C.expand_shards(str(tmp_path / "rule")) for s in C.iter_tar_samples(p, {})]
    assert rule["per_query"] == 4 and rule["transfer_set"] == len(got) == 24 and max(top4.values()) > 1
    assert collections.Counter(k if k in top4 else k.rsplit("_", 1)[0] for k in got) == top4 and len(set(got)) == 24
    rnd = T.retrieve(T.Config(pool="::".join(pool), random_size=50, queries=labelled, workers=0,
                              out=str(tmp_path / "rnd"), image_size=32))
    keys = [s["__key__"] for p in C.expand_shards(str(tmp_path / "rnd")) for s in C.iter_tar_samples(p, {})]
    assert rnd["transfer_set"] == len(set(keys)) == 50 and not set(keys) & q_keys


def test_bad_input_fails_with_one_line(tmp_path, capsys):
    for name, weights in (("mci_huge", None), ("mci_tiny", "DEFAULT"),  # no ImageNet weights for MCi
                          ("torchvision:mobilenet_v9", None), ("torchvision:resnet18", None),  # no `.features`
                          ("torchvision:mobilenet_v3_small", str(tmp_path / "missing.pth"))):
        with pytest.raises(SystemExit):
            T.build_backbone(name, weights)
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error:"), (name, err)
    (tmp_path / "x.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(SystemExit):
        T.load_foundation(str(tmp_path / "x.pt"))
    with pytest.raises(SystemExit):
        T.main(["distill", "--data", str(tmp_path), "--out", str(tmp_path / "o")])  # no .tar shards


def test_student_outputs_and_clip_init(tmp_path):
    import mobileclip as MC
    for task, shape in (("cls", (2, 4)), ("seg", (2, 5, 8, 8))):  # seg: K + 1 channels at stride 8 of 64 px
        m = T.TaskModel(T.build_backbone("mci_tiny"), task, 4)
        assert tuple(m(torch.zeros(2, 3, 64, 64, dtype=torch.uint8)).shape) == shape
    clip = MC.create_model("mobileclip_tiny", vocab_size=64)
    path = str(tmp_path / "ckpt-1.pt")
    torch.save({"model": clip.state_dict(), "model_name": "mobileclip_tiny", "vocab_size": 64}, path)
    m = T.TaskModel(T.build_backbone("mci_tiny"), "cls", 4)
    T.init_student(m, T.Config(init=path, student="mci_tiny"))
    for k, v in clip.visual.state_dict().items():
        if not k.startswith("head."):
            assert torch.equal(m.backbone.mci.state_dict()[k], v), k


def test_tiny_comparison_runs_and_learns(world, tmp_path):
    """The whole demo at toy size (teacher, three distillations, four fine-tunes) on a pool half off-domain:
    every arm reports, the teacher fine-tuned from the VFM beats chance, the pool holds the off-domain shard."""
    enc = micro_vfm(str(tmp_path / "clip.pt"))
    s = T.demo(T.Config(foundation=enc, out=str(tmp_path / "demo"), cache_dir=os.path.dirname(world["root"]),
                        synthetic_train=2000, synthetic_val=200, image_size=32, demo_classes=3, shots=4,
                        pool_shards=2, pool_offdomain=0.5, per_query=10, steps=16, batch_size=16, workers=0,
                        probe_steps=6, warmup=3, log_every=8))
    assert len(s["results"]) == 7 and all("top1" in m for m in s["results"].values())
    assert s["sets"]["random"]["pool_shards"] == 3  # 2 x 250 world images + one shard of 500 off-domain images
    assert s["sets"]["random"]["transfer_set"] == s["sets"]["retrieved"]["transfer_set"] > 40
    assert s["results"]["VFM teacher (fine-tuned tiny CLIP ViT)"]["top1"] > 100 / 3
    log = [json.loads(l) for l in open(tmp_path / "demo" / "kd_task_retrieved" / "log.jsonl")]
    losses = [r["loss"] for r in log if "loss" in r]
    assert losses[-1] < losses[0]


def test_offdomain_pool_shards(tmp_path):
    """Off-domain pool images: n samples in ceil(n / shard_size) shards, counted off-task, the size asked for,
    the same pixels whoever renders them (seeded by index), and a fraction outside [0, 1) refused."""
    paths = T.write_offdomain(str(tmp_path / "a"), 7, 32, shard_size=3)
    again = T.write_offdomain(str(tmp_path / "b"), 7, 32, shard_size=3)
    samples = [s for p in paths for s in C.iter_tar_samples(p, {})]
    assert len(paths) == 3 and len(samples) == 7 and len({s["__key__"] for s in samples}) == 7
    assert all(json.loads(s["json"])["label"] == 10 for s in samples)  # "none of the world's shapes": off-task
    assert all(C.decode_image(s).size == (32, 32) for s in samples)
    assert [s["jpg"] for p in again for s in C.iter_tar_samples(p, {})] == [s["jpg"] for s in samples]
    with pytest.raises(SystemExit):
        T.demo(T.Config(pool_offdomain=1.0, out=str(tmp_path / "demo")))


def test_resume_continues_exactly(world, tmp_path, capsys):
    """A run resumed from its step-3 checkpoint ends with the weights of the uninterrupted run."""
    labelled = T.write_labelled(world["train"], str(tmp_path / "labelled"), 3, 4)
    cfg = T.Config(data=labelled, num_classes=3, image_size=32, steps=6, batch_size=4, ckpt_every=3, keep_ckpts=5,
                   warmup=2, workers=0, log_every=2, out=str(tmp_path / "ft"))
    T.train(cfg, "finetune")
    full = torch.load(tmp_path / "ft" / "ckpt-6.pt", weights_only=True)["model"]
    os.remove(tmp_path / "ft" / "ckpt-6.pt")
    capsys.readouterr()
    T.train(cfg, "finetune")  # --resume auto: from ckpt-3
    assert "resumed at step 3" in capsys.readouterr().out
    resumed = torch.load(tmp_path / "ft" / "ckpt-6.pt", weights_only=True)["model"]
    assert all(torch.equal(full[k], resumed[k]) for k in full)


def test_ml_vfm_kt_lists_drive_a_tiny_run(world, tmp_path):
    """apple/ml-vfm-kt lists in the released format drive teacher -> per-pixel distill -> finetune: ADE20K-style split
    files (one name a line) over mmsegmentation's images/ + annotations/ folders, a retrieved-image list with repeats
    over a flat pool folder; a classification split (`name,class`) gives sorted-class labels and finds a name shared
    by two class folders (Places365) by its class; names not found are dropped."""
    ade, yfcc = tmp_path / "ADEChallengeData2016", tmp_path / "yfcc"
    samples = [s for s in C.iter_tar_samples(C.expand_shards(world["train"])[0], {})][:14]
    names = []
    for i, s in enumerate(samples[:10]):
        split = "training" if i < 6 else "validation"
        name = f"ADE_{'train' if i < 6 else 'val'}_{i:08d}"
        for sub, ext, key in (("images", "jpg", "jpg"), ("annotations", "png", "seg.png")):
            os.makedirs(ade / sub / split, exist_ok=True)
            (ade / sub / split / f"{name}.{ext}").write_bytes(s[key])
        names.append(f"{name}.jpg")
    os.makedirs(yfcc)
    for i, s in enumerate(samples[10:]):
        (yfcc / f"{i:06d}.jpg").write_bytes(s["jpg"])
    lists = tmp_path / "datasplits"
    os.makedirs(lists)
    (lists / "train_6img.txt").write_text("\n".join(names[:6]) + "\n")
    (lists / "test.txt").write_text("\n".join(names[6:]) + "\n")
    (lists / "yfcc_retrieved_images_with_6query.txt").write_text("".join(f"{i % 4:06d}.jpg\n" for i in range(12)))
    data, test = f"{lists}/train_6img.txt@{ade}", f"{lists}/test.txt@{ade}"
    retrieved = f"{lists}/yfcc_retrieved_images_with_6query.txt@{yfcc}"
    assert len(T.read_list(retrieved)[0]) == 12 and len({s["__key__"] for s in T.read_samples(retrieved)}) == 12
    assert all(m is not None for _, _, m in T.read_list(data)[0])  # the label maps found
    kw = dict(task="seg", num_classes=3, image_size=32, steps=2, batch_size=4, warmup=1, workers=0, test=test,
              log_every=1)
    m = T.train(T.Config(foundation=micro_vfm(str(tmp_path / "clip.pt")), data=data, out=str(tmp_path / "t"),
                         probe_steps=1, **kw), "teacher")
    assert 0 <= m["miou"] <= 100 and m["test_pixels"] == 4 * 32 * 32  # the four whole test images
    T.train(T.Config(teacher=str(tmp_path / "t"), data=retrieved, out=str(tmp_path / "kd"), **kw), "distill")
    m = T.train(T.Config(init=str(tmp_path / "kd"), data=data, out=str(tmp_path / "ft"), **kw), "finetune")
    assert "miou" in m
    for run in ("t", "kd", "ft"):
        losses = [r["loss"] for r in map(json.loads, open(tmp_path / run / "log.jsonl")) if "loss" in r]
        assert len(losses) == 2 and all(math.isfinite(l) for l in losses), run
    for d in ("a/airfield", "b/beach", "b/bar"):  # Places365: the same file name in two class folders
        os.makedirs(tmp_path / "places" / d)
        (tmp_path / "places" / d / "001.jpg").write_bytes(samples[0]["jpg"])
    (tmp_path / "places" / "p.txt").write_text("001.jpg,beach\n001.jpg,airfield\nnope.jpg,bar\n")
    entries, classes = T.read_list(str(tmp_path / "places" / "p.txt"))
    assert classes == ["airfield", "bar", "beach"] and [(os.path.relpath(p, tmp_path / "places"), y) for p, y, _ in
                                                        entries] == [("b/beach/001.jpg", 2), ("a/airfield/001.jpg", 0)]
    assert [json.loads(s["json"])["label"] for s in T.read_samples(str(tmp_path / "places" / "p.txt"))] == [2, 0]


def test_torchvision_student_from_an_imagenet_file(world, tmp_path, capsys):
    """--student torchvision:mobilenet_v3_small --init imagenet=FILE: a state dict in torchvision's layout (random
    weights, saved here) is loaded strictly and the student starts from exactly its `features`; a fine-tune from it
    and a per-pixel feature distillation into the student (its stride-16/32 maps) run; a file of another layout
    fails with one line."""
    torch.manual_seed(0)
    ref = torchvision.models.mobilenet_v3_small()  # weights=None: nothing is downloaded
    path = str(tmp_path / "mobilenet_v3_small.pth")
    torch.save({k: v for k, v in ref.state_dict().items() if "num_batches_tracked" not in k}, path)  # as old files
    kw = dict(student="torchvision:mobilenet_v3_small", num_classes=3, image_size=32, steps=2, batch_size=4,
              warmup=1, workers=0, log_every=1)
    cfg = T.Config(init=f"imagenet={path}", **kw)
    net = T.setup_stage(cfg, "finetune", torch.device("cpu"))[0]  # the path `finetune` builds its model on
    want, got = ref.features.state_dict(), net.backbone.features.state_dict()
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    fresh = T.build_backbone("torchvision:mobilenet_v3_small").features.state_dict()
    assert not torch.equal(fresh["0.0.weight"], want["0.0.weight"])  # without --init: not the file's weights
    labelled = T.write_labelled(world["train"], str(tmp_path / "labelled"), 3, 2)
    T.train(T.Config(init=cfg.init, data=labelled, out=str(tmp_path / "ft"), **kw), "finetune")
    assert torch.load(tmp_path / "ft" / "ckpt-2.pt", weights_only=True)["init"] == cfg.init
    T.train(T.Config(task="seg", kd="features", foundation=micro_vfm(str(tmp_path / "clip.pt")), data=labelled,
                     out=str(tmp_path / "kdf"), **kw), "distill")
    for run in ("ft", "kdf"):
        losses = [r["loss"] for r in map(json.loads, open(tmp_path / run / "log.jsonl")) if "loss" in r]
        assert len(losses) == 2 and all(math.isfinite(l) for l in losses), run
    torch.save({k: v for k, v in ref.state_dict().items() if not k.startswith("classifier.3.")}, path)
    capsys.readouterr()
    with pytest.raises(SystemExit):
        T.build_backbone("torchvision:mobilenet_v3_small", path)
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "does not fit" in err[0], err


# ---- issue 28: --help, one-line errors, one run per --out, SIGTERM ---------------------------------------------------

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OWN_FLAG = {"demo": ("--pool-offdomain", "--nothing"), "retrieve": ("--per-query", "--num-classes"),
            "teacher": ("--probe-steps", "--student"), "distill": ("--kd", "--init"), "finetune": ("--init", "--kd")}


def test_help_lists_the_commands_and_each_commands_own_flags(capsys):
    with pytest.raises(SystemExit) as e:  # in-process; the SIGTERM test runs the script itself
        T.main(["--help"])
    out = capsys.readouterr()
    assert e.value.code == 0 and "Traceback" not in out.err
    assert all(f"  {name} " in out.out for name in OWN_FLAG) and "Knowledge Transfer" in out.out
    for name, (own, other) in OWN_FLAG.items():
        with pytest.raises(SystemExit) as e:
            T.main([name, "--help"])
        text = capsys.readouterr().out
        assert e.value.code == 0 and own in text and other not in text, name
        assert text.count("--batch-size") == 2  # a shared flag once (usage line and its entry)


BAD = [(["finetune", "--batch-size", "0"], "--batch-size 0: must be >= 1"),
       (["finetune", "--data", "{lab}", "--steps", "-5"], "--steps -5: must be >= 0"),
       (["teacher", "--lr", "-1"], "--lr -1.0: must be >= 0"),
       (["distill", "--workers", "-1"], "--workers -1: must be >= 0"),
       (["demo", "--pool-offdomain", "1.5"], "--pool-offdomain 1.5: must be between 0 and 1"),
       (["finetune", "--data", "{lab}", "--num-classes", "0"], "--num-classes 0: must be >= 1"),
       (["finetune", "--data", "{tar}"], "empty"),
       (["retrieve", "--pool", "{tar}", "--random-size", "5"], "--pool"),
       (["retrieve", "--pool", "{lab}", "--queries", "{tar}", "--encoder", "{pt}"], "--queries"),
       (["finetune", "--data", "{lab}", "--test", "{tmp}/nope"], "--test"),
       (["finetune", "--data", "{lab}", "--resume", "{pt}"], "empty file (0 bytes)"),
       (["finetune", "--data", "{lab}", "--init", "{pt}"], "--init {pt}: cannot read it (empty file"),
       (["finetune", "--data", "{lab}", "--init", "imagenet={pt}", "--student", "torchvision:mobilenet_v3_small"],
        "--init imagenet={pt}: cannot read it"),
       (["distill", "--data", "{lab}", "--teacher", "{pt}"], "--teacher {pt}: cannot read it"),
       (["distill", "--data", "{lab}", "--teacher", "{tmp}"], "--teacher {tmp}: no ckpt-*.pt"),
       (["teacher", "--data", "{lab}", "--foundation", "{pt}"], "--foundation {pt}: cannot read it"),
       (["finetune", "--data", "{bad}", "--num-classes", "3"], "no usable sample in a whole pass")]  # every image bad


@pytest.mark.parametrize("argv,msg", BAD, ids=[" ".join(a[:3]) for a, _ in BAD])
def test_bad_input_gets_one_line_before_any_work(argv, msg, world, tmp_path, capsys):
    paths = dict(lab=T.write_labelled(world["train"], str(tmp_path / "labelled"), 3, 2), tar=str(tmp_path / "x.tar"),
                 pt=str(tmp_path / "x.pt"), tmp=str(tmp_path))
    open(paths["tar"], "wb").close()  # zero bytes
    open(paths["pt"], "wb").close()
    C.write_shard(paths.setdefault("bad", str(tmp_path / "bad.tar")),
                  [{"__key__": f"k{i}", "jpg": b"not an image", "json": {"label": 0}} for i in range(5)])
    out = str(tmp_path / "run")
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        T.main([argv[0], "--out", out, "--image-size", "32", "--workers", "0"] + [a.format(**paths) for a in argv[1:]])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code != 0 and len(err) == 1 and err[0].startswith("error: ") and msg.format(**paths) in err[0], err
    assert not os.path.exists(out) or not C.checkpoints(out)


def test_imagenet_download_failure_is_one_line(monkeypatch, capsys):
    import urllib.error
    def offline(*args, **kwargs):
        raise urllib.error.URLError("no network")
    monkeypatch.setattr(torchvision.models._api, "load_state_dict_from_url", offline)  # nothing is downloaded
    with pytest.raises(SystemExit):
        T.build_backbone("torchvision:mobilenet_v3_small", "DEFAULT")
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "could not fetch the mobilenet_v3_small weights" in err[0] and "imagenet=FILE" in err[0]


def test_one_run_per_out(world, tmp_path, capsys):
    """A live run's --out is refused naming the holder; a fresh run (--resume '') into another run's checkpoints
    stops with one line, or with --overwrite moves them to OUT/previous-1/; the log marks each run's start."""
    lab = T.write_labelled(world["train"], str(tmp_path / "labelled"), 3, 2)
    out = str(tmp_path / "ft")
    args = ["finetune", "--data", lab, "--num-classes", "3", "--image-size", "32", "--steps", "2", "--batch-size", "4",
            "--warmup", "1", "--workers", "0", "--out", out]
    T.main(args)
    capsys.readouterr()
    with pytest.raises(SystemExit):
        T.main(args + ["--resume", ""])
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "holds another run's checkpoints (ckpt-2.pt" in err[0], err
    T.main(args + ["--resume", "", "--overwrite"])
    assert os.listdir(os.path.join(out, "previous-1")) and C.checkpoints(out) == [os.path.join(out, "ckpt-2.pt")]
    starts = [r for r in map(json.loads, open(os.path.join(out, "log.jsonl"))) if r.get("event") == "start"]
    assert len(starts) == 1 and starts[0]["config"]["overwrite"]
    holder = subprocess.Popen(["sleep", "60"])  # a live process holding the lock, as common.claim_out writes it
    os.makedirs(tmp_path / "held")
    (tmp_path / "held" / "run.lock").write_text(json.dumps({"pid": holder.pid, "host": socket.gethostname(),
                                                             "started": "now"}))
    try:
        with pytest.raises(SystemExit):
            T.main(args[:-1] + [str(tmp_path / "held")])
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and f"pid {holder.pid}" in err[0] and "in use by another run" in err[0], err
    finally:
        holder.kill()
        holder.wait()


def test_sigterm_to_the_process_group_saves_and_resume_logs_the_same_losses(world, tmp_path):
    """kill -TERM -PGID of a run with a DataLoader worker: the worker ignores the signal, the main process saves a
    checkpoint at the current step and exits 0; --resume auto (the default) then logs the losses of a run never
    stopped, step for step."""
    lab = T.write_labelled(world["train"], str(tmp_path / "labelled"), 3, 4)
    args = ["finetune", "--data", lab, "--num-classes", "3", "--image-size", "32", "--steps", "12", "--batch-size", "4",
            "--warmup", "2", "--log-every", "1", "--ckpt-every", "100", "--workers", "1"]
    run = subprocess.Popen([sys.executable, os.path.join(ROOT, "transfer.py"), *args, "--out", str(tmp_path / "a")],
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
                           env={**os.environ, "OMP_NUM_THREADS": "1"})
    for line in run.stdout:
        if line.startswith("step 2 "):
            os.killpg(run.pid, signal.SIGTERM)
            break
    out, err = run.communicate(timeout=120)
    saved = C.checkpoints(str(tmp_path / "a"))
    assert run.returncode == 0 and "Traceback" not in err and len(saved) == 1, err
    stopped = torch.load(saved[0], weights_only=True)["step"]
    assert 2 <= stopped < 12 and f"stopped by a signal at step {stopped}" in out
    T.main(args + ["--out", str(tmp_path / "a")])  # resumes
    T.main(args + ["--out", str(tmp_path / "b")])  # never stopped
    loss = lambda d: {r["step"]: r["loss"] for r in map(json.loads, open(tmp_path / d / "log.jsonl")) if "loss" in r}
    a, b = loss("a"), loss("b")
    assert sorted(a) == sorted(b) == list(range(1, 13))
    assert all(a[s] == pytest.approx(b[s], rel=1e-5) for s in b), (a, b)
