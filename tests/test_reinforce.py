"""reinforce.py on the CPU: exact replay of every augmentation op from the stored records, the record size,
"smooth" densification, the KL loss against torch's, the ResNets against torchvision's, tar shards with a
`cls` member, a reinforcement of the synthetic world that resumes, training that resumes exactly, and the
paper's payoff: a student trained on reinforced data beats the same student trained with ERM."""
import json
import os
import random

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision
from PIL import Image
from torchvision.models.resnet import BasicBlock, Bottleneck

import common as C
import reinforce as R


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: see conftest.py


def _image(seed, w, h):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


def _folder(root, sizes=((40, 30), (64, 48), (33, 57), (48, 48), (90, 20), (25, 70))):
    """A tiny ImageFolder of noise images of different sizes, two classes (PNG: lossless)."""
    for i, (w, h) in enumerate(sizes):
        d = os.path.join(root, "ab"[i % 2])
        os.makedirs(d, exist_ok=True)
        _image(i, w, h).save(os.path.join(d, f"{i}.png"))
    return str(root)


def _teacher(path, n_classes, model="resnet_tiny", size=32):
    """A randomly initialised classifier saved as a `reinforce.py train` checkpoint."""
    torch.manual_seed(0)
    m = R.build_model(model, n_classes, size)
    for p in m.parameters():  # make the random model's outputs depend visibly on the input
        p.data.normal_(0, 0.5)
    C.save_checkpoint(path, {"kind": "reinforce_classifier", "model": m.state_dict(), "model_name": model,
                             "num_classes": n_classes, "image_size": size})
    return path


def test_resnets_are_torchvisions_with_zero_initialised_residual_bns():
    """resnet18-101 have torchvision's keys, shapes and parameter counts (the published figures for 1000
    classes), and every block's last BN starts at zero (each block begins as the identity)."""
    counts = {"resnet18": 11_689_512, "resnet34": 21_797_672, "resnet50": 25_557_032, "resnet101": 44_549_160}
    for name, n in counts.items():
        with torch.device("meta"):  # shapes and counts without initialising 44M weights
            m, ref = R.build_model(name, 1000), torchvision.models.get_model(name)
        assert sum(p.numel() for p in m.parameters()) == n
        assert {k: v.shape for k, v in m.state_dict().items()} == {k: v.shape for k, v in ref.state_dict().items()}
    for name in ("resnet18", "resnet50"):  # BasicBlock and Bottleneck: the last BN of each block starts at zero
        m = R.build_model(name, 10)
        blocks = [b for b in m.modules() if isinstance(b, (BasicBlock, Bottleneck))]
        last = [b.bn3 if isinstance(b, Bottleneck) else b.bn2 for b in blocks]
        assert len(last) == sum(len(getattr(m, f"layer{s}")) for s in range(1, 5))
        assert all(bn.weight.abs().sum() == 0 for bn in last), name


def _scaled(ref: dict, div: int, keep) -> dict:
    """torchvision resnet18's (key, shape), channels divided by `div`, 3x3 stem, only the keys `keep` passes."""
    shapes = {k: tuple(d // div if d >= 64 else d for d in v.shape) for k, v in ref.items() if keep(k)}
    return {**shapes, "conv1.weight": (64 // div, 3, 3, 3)}


def test_small_resnets_keep_their_keys_shapes_and_parameter_counts():
    """resnet_tiny/resnet_small checkpoints written before they were built from torchvision's pieces still
    load: resnet18's layout at 1/4 (one block per stage) and 1/2 the width with a 3x3 stem; the counts were
    measured on the old hand-written model."""
    ref = torchvision.models.resnet18(num_classes=10).state_dict()
    tiny, small = R.build_model("resnet_tiny", 10), R.build_model("resnet_small", 10)
    assert {k: tuple(v.shape) for k, v in tiny.state_dict().items()} == _scaled(ref, 4, lambda k: k.split(".")[1:2] != ["1"])
    assert {k: tuple(v.shape) for k, v in small.state_dict().items()} == _scaled(ref, 2, lambda k: True)
    assert [sum(p.numel() for p in m.parameters()) for m in (tiny, small)] == [308_826, 2_797_610]
    assert sum(p.numel() for p in R.build_model("resnet_tiny", 1000).parameters()) == 436_536
    assert isinstance(tiny.maxpool, torch.nn.Identity) and tiny(torch.zeros(2, 3, 32, 32)).shape == (2, 10)
    assert all(b.bn2.weight.abs().sum() == 0 for b in small.modules() if isinstance(b, BasicBlock))


def test_any_torchvision_classifier_by_name_and_unknown_names_fail():
    m = R.build_model("squeezenet1_0", 7)
    assert m(torch.zeros(1, 3, 64, 64)).shape == (1, 7)
    with pytest.raises(SystemExit):
        R.build_model("resnet_huge", 10)


def test_torchvision_style_weights_load_strictly_as_a_teacher(tmp_path):
    m = R.build_model("resnet18", 2)
    torch.save(m.state_dict(), tmp_path / "r18.pth")
    (t, size), = R.load_teachers(f"resnet18={tmp_path / 'r18.pth'}", 2, torch.device("cpu"))
    assert size == 0 and not t.training
    torch.save({k: v for k, v in m.state_dict().items() if k != "fc.bias"}, tmp_path / "bad.pth")
    with pytest.raises(SystemExit):
        R.load_teachers(f"resnet18={tmp_path / 'bad.pth'}", 2, torch.device("cpu"))


def test_rand_augment_values_are_common_draws():
    """The op index and sign stored per op give back exactly the magnitude common.rand_augment_params drew,
    and those are the values records decoded to when reinforce.py kept its own table (up to torchvision's
    float32 rounding): stored reinforcements replay with the same augmentation strengths."""
    for size in (32, 224):
        for k, m in C.rand_augment_params(random.Random(size), size, R.RA_OPS * 250, R.RA_MAGNITUDE, R.RA_BINS):
            assert C.rand_augment_magnitude(k, m < 0, size, R.RA_MAGNITUDE, R.RA_BINS) == m
    before = {"ShearX": 0.09, "ShearY": 0.09, "TranslateX": 150 / 331 * 0.3 * 32, "TranslateY": 150 / 331 * 0.3 * 32,
              "Rotate": 9.0, "Brightness": 0.27, "Color": 0.27, "Contrast": 0.27, "Sharpness": 0.27,
              "Posterize": 7.0, "Solarize": 178.5}  # magnitude 9 of 31 bins, 32 px
    for k, name in enumerate(C.RAND_AUGMENT_OPS):
        for negative in (False, True):
            m = before.get(name, 0.0) * (-1 if negative and name not in ("Posterize", "Solarize") else 1)
            assert C.rand_augment_magnitude(k, negative, 32, R.RA_MAGNITUDE, R.RA_BINS) == pytest.approx(m, abs=1e-6)


def test_record_size_per_augmentation():
    """Bytes per stored augmentation at k = 10, 224 px (paper, gzip'd pickles: RRC 65, +M* 90, +RA/RE 73,
    +M*+R* 104)."""
    sizes = {v: R.record_dtype(v, 10, 224, 1000).itemsize for v in R.VARIANTS if v != "erm"}
    assert sizes == {"cropflip": 49, "mixing": 67, "randaug": 55, "randaug_mixing": 79}
    assert R.record_dtype("randaug", 10, 384, 1000).itemsize == 59  # erase box in int16 above 255 px
    assert R.record_dtype("randaug", 5, 224, 1000).itemsize == 35  # ImageNet+ "Small": k = 5


def test_ops_do_what_they_say():
    img, partner = _image(0, 50, 40), _image(1, 30, 60)
    base = {"box": (5, 7, 20, 30), "flip": False, "ra": None, "erase": None}
    x = R.apply_view(img, base, 16)
    ref = torch.from_numpy(np.array(img.resize((16, 16), Image.BILINEAR, box=(7, 5, 37, 25)))).permute(2, 0, 1)
    assert torch.equal(x, ref)
    assert torch.equal(R.apply_view(img, {**base, "flip": True}, 16), x.flip(-1))
    erased = R.apply_view(img, {**base, "erase": (2, 3, 4, 5)}, 16)
    assert (erased[:, 2:6, 3:8] == 0).all() and torch.equal(erased[:, 6:], x[:, 6:])
    v2 = {"box": (0, 0, 60, 30), "flip": True, "ra": [(5, True), (11, False)], "erase": None}
    x2 = R.apply_view(partner, v2, 16)
    s = {"view": base, "id2": 3, "view2": v2, "mixup": 100, "cutmix": None}
    mixed = R.apply_sample(img, s, 16, partner)
    assert torch.equal(mixed, (100 / 510 * x.float() + (1 - 100 / 510) * x2.float()).round().to(torch.uint8))
    cut = R.apply_sample(img, {**s, "mixup": None, "cutmix": (1, 2, 6, 9)}, 16, partner)
    assert torch.equal(cut[:, 1:7, 2:11], x2[:, 1:7, 2:11]) and torch.equal(cut[:, 7:], x[:, 7:])


def test_encode_decode_is_lossless_for_every_variant():
    img, partner = _image(0, 70, 50), _image(1, 30, 40)
    for variant in R.VARIANTS:
        dt = R.record_dtype(variant, 3, 32, 10)
        rng = random.Random(variant)
        for _ in range(100):
            s = R.draw_sample(rng, img.size, 32, variant, 0.08, [(5, partner.size)])
            assert R.decode_sample(R.encode_sample(s, dt)) == s


def test_replay_from_disk_is_bit_exact_for_every_op(tmp_path):
    """Reinforce a small ImageFolder (+M*+R*), then replay every stored sample as training does: the pixels
    equal the views the teacher saw, bit for bit, and the teacher on them gives the stored top-k."""
    root, ckpt = _folder(tmp_path / "imgs"), _teacher(str(tmp_path / "t.pt"), 2)
    out = str(tmp_path / "rf")
    argv = ["--data", root, "--teachers", ckpt, "--num-samples", "40", "--topk", "2", "--variant", "randaug_mixing",
            "--image-size", "24", "--workers", "0", "--part-size", "4", "--batch-size", "64", "--out", out]
    R.main(["reinforce"] + argv)
    cfg = C.parse_config(R.ReinforceConfig, argv, verbose=False)
    data = R.load_data(cfg)
    store = R.Reinforced(out, data)
    dt = R.record_dtype("randaug_mixing", 2, 24, 2)
    assert store.parts[0].dtype == dt and store.parts[0].shape == (4, 40) and store.parts[1].shape == (2, 40)
    train = R.TrainImages(data, 24, 0, store, 1.0, "randaug", 0.08, 0.0)
    teachers = R.load_teachers(ckpt, 2, torch.device("cpu"))  # a 32 px model: views are resized for it
    seen = set()
    for g in range(len(data)):
        _, idx, recs, views, owner = R.ReinforceViews(data, [(0, [g])], cfg, 24, dt)[0]  # the generator's views
        replayed = torch.stack([store.replay(data, g, n)[0] for _, n in owner])
        assert torch.equal(replayed, views)
        probs = R.teacher_probs(teachers, replayed, 1.0, False)
        stored = torch.from_numpy(np.stack([store.record(g, n)["prob"] for _, n in owner]).astype(np.float32))
        torch.testing.assert_close(probs.topk(2).values, stored, atol=2e-3, rtol=0)
        for _, n in owner:
            s = R.decode_sample(store.record(g, n))
            for v in filter(None, (s["view"], s["view2"])):
                seen |= {("flip", v["flip"]), ("erase", v["erase"] is not None)} | {("ra", k) for k, _ in v["ra"]}
            seen |= {("mixup", s["mixup"] is not None), ("cutmix", s["cutmix"] is not None)}
    every_op = ({(op, b) for op in ("flip", "erase", "mixup", "cutmix") for b in (True, False)}
                | {("ra", k) for k in range(len(C.RAND_AUGMENT_OPS))})
    assert seen == every_op, every_op - seen


def test_densify_sums_to_one_and_keeps_the_topk():
    torch.manual_seed(0)
    for _ in range(20):
        p = F.softmax(torch.randn(100) * 3, dim=0)
        top = p.topk(10)
        prob, cls = top.values.half().numpy(), top.indices.numpy().astype(np.int16)
        t = R.densify(prob, cls, 100)
        torch.testing.assert_close(t.sum(), torch.tensor(1.0))
        torch.testing.assert_close(t[top.indices], torch.from_numpy(prob.astype(np.float32)))
        assert set(t.topk(10).indices.tolist()) == set(top.indices.tolist())
        rest = np.setdiff1d(np.arange(100), top.indices.numpy())
        assert torch.allclose(t[rest], t[rest[0]]) and (t[rest] <= t[top.indices].min()).all()
    t = R.densify(np.array([0.7, 0.31], np.float16), np.array([4, 1], np.int16), 5)  # fp16 mass past 1
    assert t.sum().item() == pytest.approx(1.0) and t[[0, 2, 3]].sum() == 0 and t[4] > t[1] > 0


def test_kl_loss_matches_torch_and_is_cross_entropy_for_one_hot():
    torch.manual_seed(0)
    logits = (torch.randn(8, 20, dtype=torch.float64) * 3).requires_grad_()
    target = F.softmax(torch.randn(8, 20, dtype=torch.float64) * 2, dim=1)
    target[0] = 0
    target[0, 3] = 1  # zeros in the target: 0 log 0 = 0
    fast, ref = R.kl_loss(logits, target), R.kl_loss_reference(logits, target)
    torch.testing.assert_close(fast.double(), ref)
    torch.testing.assert_close(*(torch.autograd.grad(v, logits)[0].double() for v in (fast, ref)))
    y = torch.randint(0, 20, (8,))
    torch.testing.assert_close(R.kl_loss(logits, F.one_hot(y, 20).float()), F.cross_entropy(logits.float(), y))
    assert R.kl_loss(logits, torch.zeros(8, 20)).item() == 0  # an unreadable image adds nothing


def test_plain_targets_are_distributions_mixed_like_the_pixels(world):
    cfg = C.parse_config(R.TrainConfig, ["--data", world["train"] + "/train-00000.tar"], verbose=False)
    data = R.load_data(cfg)
    assert len(data) == 250 and data.classnames == sorted(C.SYNTH_SHAPES)
    ds = R.TrainImages(data, 32, 0, None, 0.0, "randaug_mixing", 0.08, 0.1)
    ts = torch.stack([ds[(0, i)][1] for i in range(40)])
    torch.testing.assert_close(ts.sum(1), torch.ones(40))
    assert (ts.min(1).values >= 0.01 - 1e-6).all()  # label smoothing 0.1 over 10 classes
    assert ((ts > 0.05).sum(1) == 2).any() and ((ts > 0.05).sum(1) == 1).any()  # some mixed, some not


def test_tar_shards_with_a_cls_member(tmp_path):
    imgs = [_image(i, 20 + i, 30) for i in range(5)]
    C.write_shard(str(tmp_path / "a.tar"), [{"__key__": f"k{i}", "png": im, "cls": str(i % 3)}
                                            for i, im in enumerate(imgs)])
    data = R.load_data(C.parse_config(R.TrainConfig, ["--data", str(tmp_path)], verbose=False))
    assert data.labels == [0, 1, 2, 0, 1] and data.num_classes == 3
    assert all(np.array_equal(np.asarray(data.load(i)), np.asarray(im)) for i, im in enumerate(imgs))
    with pytest.raises(SystemExit):  # a head too small for the labels: refused, not trained on zero targets
        R.main(["train", "--data", str(tmp_path), "--num-classes", "2", "--out", str(tmp_path / "run")])


def _colour_world(root, n, seed):
    """An ImageFolder where the class is the dominant colour channel of noisy images of random sizes:
    a world small models learn in a few dozen steps."""
    rng = np.random.default_rng(seed)
    for i in range(n):
        c, w, h = i % 3, int(rng.integers(24, 48)), int(rng.integers(24, 48))
        x = rng.integers(0, 150, (h, w, 3))
        x[..., c] += 100
        os.makedirs(os.path.join(root, "rgb"[c]), exist_ok=True)
        Image.fromarray(x.astype(np.uint8)).save(os.path.join(root, "rgb"[c], f"{i}.png"))
    return str(root)


# Colours of the four classes' patches (red, green, blue, yellow).
PATCH_RGB = np.array([(220, 40, 40), (40, 170, 60), (40, 80, 220), (240, 220, 40)], dtype=np.float64)


def _patch_world(root, n, seed):
    """An ImageFolder where the class is the colour of one small square on a noisy, randomly tinted background
    with two squares of random colours beside it. About a fifth of the crops (scale >= 0.08) miss the square:
    ERM's one-hot label is then noise, while a trained teacher gives it about chance (measured: 0.23 of 1)."""
    rng = np.random.default_rng(seed)
    for i in range(n):
        c, w, h = i % 4, int(rng.integers(24, 40)), int(rng.integers(24, 40))
        x = rng.normal(128, 60, (h, w, 3)) + rng.normal(0, 30, 3)
        for s, colour in [(int(rng.integers(3, 7)), rng.uniform(0, 255, 3)) for _ in range(2)] + [
                (int(rng.integers(5, 10)), PATCH_RGB[c] + rng.normal(0, 15, 3))]:
            t, l = int(rng.integers(0, h - s)), int(rng.integers(0, w - s))
            x[t:t + s, l:l + s] = colour
        os.makedirs(os.path.join(root, "rgby"[c]), exist_ok=True)
        Image.fromarray(np.clip(x, 0, 255).astype(np.uint8)).save(os.path.join(root, "rgby"[c], f"{i}.png"))
    return str(root)


def _reinforced_vs_erm(root, seed, variant="cropflip", epochs=60, n_val=300, n_teach=1000):
    """Teacher on 1,000 images, reinforcement of 80 others, student and ERM (ml-dr's erm.yaml) on those 80: logs
    by run."""
    teach, train = _patch_world(root / "teach", n_teach, 3 * seed + 1), _patch_world(root / "train", 80, 3 * seed + 2)
    common = ["--val-data", _patch_world(root / "val", n_val, 3 * seed + 3), "--workers", "0", "--image-size", "16",
              "--batch-size", "16", "--lr", "0.05", "--warmup-epochs", "1", "--seed", str(seed)]
    R.main(["train"] + common + ["--data", teach, "--epochs", "10", "--aug", "cropflip", "--out", str(root / "teacher")])
    R.main(["reinforce", "--data", train, "--workers", "0", "--teachers", str(root / "teacher"), "--num-samples", "60",
            "--topk", "3", "--variant", variant, "--seed", str(seed), "--out", str(root / "rf")])
    for run, extra in (("student", ["--reinforced", str(root / "rf")]), ("erm", [])):
        R.main(["train"] + common + ["--data", train, "--epochs", str(epochs), "--out", str(root / run)] + extra)
    return {run: [json.loads(line) for line in open(root / run / "log.jsonl")] for run in ("teacher", "student", "erm")}


def test_reinforced_student_beats_erm(tmp_path):
    """The paper's payoff in miniature, against ml-dr's ERM (erm.yaml: RandAugment + erasing, no flip, MixUp or
    CutMix per batch, label smoothing 0.1): same model, data (80 images) and epochs (60), the student trained on
    the reinforced data (ImageNet+'s RRC variant: crop + flip) beats it. The teacher is the same model trained on
    1,000 other images of the world. Measured margins, seeds 0-2: +14.3, +25.3, +32.3 points (mean 24.0, sd 9.0);
    the threshold is half the smallest. Labels read for the wrong images, or a densification that drops the stored
    probabilities, fail it; a replay that raises fails the skipped-samples check."""
    logs = _reinforced_vs_erm(tmp_path, 0)
    top1 = {run: log[-1]["top1"] for run, log in logs.items()}
    assert all(r.get("skipped", 0) == 0 for r in logs["student"])  # every stored sample replayed
    assert top1["teacher"] > 80, top1  # chance: 25%
    assert top1["student"] > top1["erm"] + 7, top1


def test_synthetic_world_reinforce_resumes_and_trains(world, tmp_path):
    """On the synthetic world's shards: labels follow the val ImageFolder's class order, an interrupted
    reinforcement finishes only its missing parts (same bytes), training reads it, another order is refused."""
    shards = "::".join(f"{world['train']}/train-{i:05d}.tar" for i in range(2))  # 500 images
    small = ["--data", shards, "--workers", "0"]
    data = R.load_data(C.parse_config(R.TrainConfig, small, verbose=False))
    names = [json.loads(s["json"])["classname"] for s in C.iter_tar_samples(shards.split("::")[0], {})]
    assert [data.classnames[y] for y in data.labels[:250]] == names
    assert data.classnames == C.image_folder(world["val_folder"])[1]
    out = str(tmp_path / "rf")
    argv = small + ["--teachers", _teacher(str(tmp_path / "t.pt"), 10), "--num-samples", "3", "--topk", "3",
                    "--part-size", "200", "--out", out]
    R.main(["reinforce"] + argv)
    meta = json.load(open(os.path.join(out, "meta.json")))
    assert meta["num_images"] == 500 and meta["record_bytes"] == 8 + 1 + 2 + 4 + 3 * 2 + 3 * 2
    before = {p: open(os.path.join(out, p), "rb").read() for p in sorted(os.listdir(out)) if p.endswith(".npy")}
    assert len(before) == 3
    os.remove(os.path.join(out, "part-00001.npy"))  # an interrupted run: part 1 missing
    mtime = os.path.getmtime(os.path.join(out, "part-00000.npy"))
    R.main(["reinforce"] + argv)
    assert {p: open(os.path.join(out, p), "rb").read() for p in before} == before
    assert os.path.getmtime(os.path.join(out, "part-00000.npy")) == mtime  # finished parts are skipped
    R.main(["train"] + small + ["--val-data", world["val_folder"], "--reinforced", out, "--epochs", "1",
                                "--batch-size", "50", "--out", str(tmp_path / "student")])
    assert "top1" in [json.loads(line) for line in open(tmp_path / "student" / "log.jsonl")][-1]
    other = R.Data(data.items[::-1], data.labels[::-1], data.classnames)
    with pytest.raises(SystemExit):  # another order of the images: refused, not silently mislabelled
        R.Reinforced(out, other)


def test_training_resumes_exactly(tmp_path):
    """Stopping after step 4 and resuming from its checkpoint ends with the weights of a run that never stopped."""
    data = _colour_world(tmp_path / "train", 48, 0)
    argv = ["--data", data, "--workers", "0", "--image-size", "16", "--batch-size", "8", "--epochs", "2",
            "--ckpt-every", "4", "--keep-ckpts", "5"]  # --aug erm: MixUp or CutMix per batch, drawn by step
    R.main(["train"] + argv + ["--out", str(tmp_path / "a")])
    R.main(["train"] + argv + ["--out", str(tmp_path / "b"), "--resume", str(tmp_path / "a" / "ckpt-4.pt")])
    a, b = (torch.load(tmp_path / d / "ckpt-12.pt", weights_only=True)["model"] for d in "ab")
    assert all(torch.equal(a[k], b[k]) for k in a)


def _reinforce_rank(rank, world, port, argv):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    R.main(["reinforce", *argv])


def test_two_ranks_write_the_same_reinforcement_as_one(tmp_path, free_port):
    """Under torchrun the parts are shared out over the ranks (gloo here); the files equal a 1-process run's."""
    import torch.multiprocessing as mp
    root, ckpt = _folder(tmp_path / "imgs"), _teacher(str(tmp_path / "t.pt"), 2)
    argv = ["--data", root, "--teachers", ckpt, "--num-samples", "6", "--topk", "2", "--variant", "randaug_mixing",
            "--workers", "0", "--part-size", "2"]
    R.main(["reinforce"] + argv + ["--out", str(tmp_path / "one")])
    mp.start_processes(_reinforce_rank, args=(2, free_port, argv + ["--out", str(tmp_path / "two")]), nprocs=2,
                       join=True, start_method="fork")  # fork: the ranks need not import torch again
    for p in ("part-00000.npy", "part-00001.npy", "part-00002.npy"):
        assert (tmp_path / "one" / p).read_bytes() == (tmp_path / "two" / p).read_bytes(), p


# ---- runs that survive a cluster, inputs that get one clear line, --help (issue 28) ----------------------


def test_help_lists_the_commands_and_each_commands_own_flags(capsys):
    with pytest.raises(SystemExit) as e:  # in-process (tests/test_cli.py runs every script's --help as a command)
        R.main(["--help"])
    r = capsys.readouterr()
    assert e.value.code in (0, None) and not r.err, r.err
    assert "arXiv 2303.08983" in r.out and "  reinforce  Reinforce a dataset" in r.out
    assert "  train      Train a classifier" in r.out
    for cmd, own, other in (("train", "--reinforce-p", "--num-samples"), ("reinforce", "--num-samples", "--epochs")):
        with pytest.raises(SystemExit) as e:
            R.main([cmd, "--help"])
        out = capsys.readouterr().out
        assert e.value.code == 0 and own in out and other not in out, cmd
        assert out.count("--data DATA ") == 1 and "Traceback" not in out  # a shared flag once


def _bad(path, name, data=b""):
    os.makedirs(path, exist_ok=True)
    open(os.path.join(path, name), "wb").write(data)
    return os.path.join(path, name)


@pytest.mark.parametrize("case", ["batch-size", "epochs", "workers", "reinforce-p", "resume", "tar", "teacher-file",
                                  "teacher-run", "num-samples", "synthetic-size", "all-bad-train", "all-bad-reinforce",
                                  "other-run"])
def test_bad_input_gets_one_line_before_any_work(case, tmp_path, capsys):
    folder, out = _colour_world(tmp_path / "data", 6, 0), str(tmp_path / "out")
    junk = str(tmp_path / "junk")
    for c in "ab":
        _bad(os.path.join(junk, c), "x.png", b"not an image at all")
        _bad(os.path.join(junk, c), "y.jpg", b"\xff\xd8\xff\xe0 cut")
    train = ["train", "--data", folder, "--workers", "0", "--image-size", "16", "--batch-size", "2", "--out", out]
    rf = ["reinforce", "--data", folder, "--workers", "0", "--num-samples", "2", "--topk", "2", "--out", out]
    argv, msg = {
        "batch-size": (train + ["--batch-size", "0"], "--batch-size 0: must be >= 1"),
        "epochs": (train + ["--epochs", "-5"], "--epochs -5: must be >= 0"),
        "workers": (rf + ["--workers", "-1"], "--workers -1: must be >= 0"),
        "reinforce-p": (train + ["--reinforce-p", "1.5"], "--reinforce-p 1.5: must be between 0 and 1"),
        "resume": (train + ["--resume", _bad(tmp_path, "empty.pt")], "cannot read checkpoint"),
        "tar": (["train", "--data", _bad(tmp_path, "empty.tar"), "--out", out],
                "no samples with an image and a label (cls or json) in"),
        "teacher-file": (rf + ["--teachers", "resnet18=" + _bad(tmp_path, "w.pth", b"junk")], "cannot read"),
        "teacher-run": (rf + ["--teachers", _bad(tmp_path, "t.pt")], "cannot read checkpoint"),
        "num-samples": (rf + ["--num-samples", "0"], "--num-samples 0: must be >= 1"),
        "synthetic-size": (rf + ["--synthetic-size", "4"], "--synthetic-size 4: must be >= 8"),
        "all-bad-train": (train + ["--data", junk], "no readable image in epoch 1: all 4 failed to load; reasons in"),
        "all-bad-reinforce": (rf + ["--data", junk, "--teachers", _teacher(str(tmp_path / "good.pt"), 2)],
                              "no readable image in --data: all 4 failed to load; reasons in"),
        "other-run": (train, "holds another run's checkpoints (ckpt-7.pt"),
    }[case]
    if case == "other-run":
        C.save_checkpoint(os.path.join(out, "ckpt-7.pt"), {"step": 7})
    with pytest.raises(SystemExit) as e:
        R.main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code != 0 and len(err) == 1 and err[0].startswith("error: ") and msg in err[0], err
    if case == "tar":
        assert "skipped shards: empty shard 1" in err[0]
    if case.startswith("all-bad"):
        assert "reasons in the first 4 tried: OSError 2, UnidentifiedImageError 2" in err[0]
    assert [os.path.basename(p) for p in C.checkpoints(out)] == (["ckpt-7.pt"] if case == "other-run" else [])


def test_a_cut_off_shard_keeps_its_whole_samples(tmp_path, capsys):
    C.write_shard(str(tmp_path / "a.tar"), [{"__key__": f"k{i}", "png": _image(i, 20, 20), "cls": str(i % 2)}
                                            for i in range(6)])
    raw = open(tmp_path / "a.tar", "rb").read()
    open(tmp_path / "a.tar", "wb").write(raw[:len(raw) // 2])
    data = R.load_data(C.parse_config(R.TrainConfig, ["--data", str(tmp_path)], verbose=False))
    assert 0 < len(data) < 6 and all(data.load(i).size == (20, 20) for i in range(len(data)))


def test_sigterm_to_the_process_group_saves_and_resume_logs_the_same_losses(tmp_path, signal_script):
    """SIGTERM to every process of the job (a DataLoader worker included) at step 6: the worker ignores it, the
    run saves ckpt-6.pt and exits 0; --resume auto then logs the losses of a run never stopped."""
    import subprocess
    import sys
    argv = ["train", "--data", _colour_world(tmp_path / "data", 24, 0), "--image-size", "16", "--batch-size", "4",
            "--epochs", "3", "--log-every", "2", "--workers", "1"]
    stopped = str(tmp_path / "stopped")
    r = subprocess.run([sys.executable, signal_script("reinforce", 6), *argv, "--out", stopped], capture_output=True, text=True,
                       start_new_session=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-2000:]
    assert [os.path.basename(p) for p in C.checkpoints(stopped)] == ["ckpt-6.pt"]
    assert "stopped by a signal at step 6" in r.stdout and "Traceback" not in r.stderr
    R.main(argv + ["--out", stopped, "--resume", "auto", "--workers", "0"])
    R.main(argv + ["--out", str(tmp_path / "straight"), "--workers", "0"])
    losses = {d: [(rec["step"], rec["loss"]) for rec in map(json.loads, open(tmp_path / d / "log.jsonl")) if "loss" in rec]
              for d in ("stopped", "straight")}
    assert losses["stopped"] == losses["straight"] and len(losses["straight"]) == 9
    starts = [rec for rec in map(json.loads, open(tmp_path / "stopped" / "log.jsonl")) if rec.get("event") == "start"]
    assert len(starts) == 2 and starts[1]["config"]["resume"] == "auto"


# ---- ml-dr's released layout, its recipe and its ERM baseline (issue 24) ------------------------------------


class _MLDRReplay:
    """A transcription of apple/ml-dr's replay for the test: dr/transforms.py's Compose.decompress and
    Compose.reapply with its ops (torchvision's transforms, the stored parameters fed to their get_params as
    ml-dr's subclasses do), in TRANSFORMATION_TO_NAME's order, and dr/data.py's partner loading."""
    ORDER = ["uint8", "resize", "center_crop", "random_crop", "random_resized_crop", "random_horizontal_flip",
             "rand_augment", "to_tensor", "random_erase", "normalize", "mixup", "cutmix"]
    NO_PARAM = ["uint8", "center_crop", "to_tensor", "normalize"]

    def __init__(self, config):
        import torchvision.transforms as T
        cfg = {k: {a: b for a, b in v.items() if a != "enable"} for k, v in config.items() if v.get("enable", True)}
        self.names = [n for n in self.ORDER if n in cfg]
        self.t = {"resize": T.Resize(**cfg.get("resize", {"size": 1})), "center_crop": T.CenterCrop(**cfg.get("center_crop", {"size": 1})),
                  "random_crop": T.RandomCrop(**cfg.get("random_crop", {"size": 1})),
                  "random_resized_crop": T.RandomResizedCrop(**cfg.get("random_resized_crop", {"size": 1})),
                  "rand_augment": T.RandAugment(), "normalize": T.Normalize(**cfg.get("normalize", {"mean": 0, "std": 1}))}

    def decompress(self, pc):
        params = {}
        no_pair = None
        if "mixup" in self.names or "cutmix" in self.names:
            no_pair = pc[0]
            if no_pair is not None:
                params["id2"] = no_pair
            pc = pc[1:]
        for p, name in zip(pc, [n for n in self.names if n not in self.NO_PARAM]):
            if p is None:
                pass
            elif name == "mixup":
                params[name] = p
            elif name == "cutmix":
                params[name] = (p[0], tuple(p[1:]))
            elif no_pair is not None and len(p) > 1:
                params[name] = (p[0], p[1])
            else:
                params[name] = (p,)
        for name in self.names:
            if name in self.NO_PARAM:
                params[name] = ((), ())
        return params

    def op(self, name, img, p):
        from torchvision.transforms import functional as TF
        from torchvision.transforms.autoaugment import _apply_op
        t = self.t.get(name)
        if name in ("random_crop", "random_resized_crop"):
            stored = (p[0], p[1], *t.size) if name == "random_crop" else p
            t.get_params = lambda *a, **k: stored
            return t(img)
        if name in ("resize", "center_crop", "normalize"):
            return t(img)
        if name == "random_horizontal_flip":
            return TF.hflip(img) if p else img
        if name == "rand_augment":
            for op_index, magnitude in p:
                img = _apply_op(img, C.RAND_AUGMENT_OPS[op_index], magnitude, interpolation=t.interpolation, fill=t.fill)
            return img
        if name == "to_tensor":
            return TF.to_tensor(img) if not isinstance(img, torch.Tensor) else img
        if name == "random_erase":
            x, y, h, w = p
            if x != -1:
                img[:, x:x + h, y:y + w] = 0
            return img
        return img  # uint8 on a PIL image

    def reapply(self, img, params, img2=None):
        for name in self.names:
            if name not in params:
                continue
            if name == "mixup":
                lam = params[name]
                img = lam * img + (1 - lam) * img2
            elif name == "cutmix":
                (x1, y1, x2, y2) = params[name][1]
                img = img.detach().clone()
                img[:, x1:x2, y1:y2] = img2[:, x1:x2, y1:y2]
            else:
                if params[name][0] is not None:
                    img = self.op(name, img, params[name][0])
                if img2 is not None and params[name][1] is not None:
                    img2 = self.op(name, img2, params[name][1])
        return img


def _mldr_records(images, config, ns, rng):
    """ml-dr records as its reinforce.py compresses them (dr/transforms.Compose.compress): torchvision's own
    get_params draws, RandAugment (op index, signed magnitude) pairs covering every op, MixUp's lambda and
    CutMix's box as numpy scalars, the top-k as Python lists."""
    import torchvision.transforms as T
    names, out = [n for n in _MLDRReplay.ORDER if n in config], []
    size = (config.get("random_resized_crop") or config["random_crop"])["size"]
    space = T.RandAugment()._augmentation_space(31, (size, size))
    for i, img in enumerate(images):
        samples = []
        for n in range(ns):
            mixed = "mixup" in names and n % 4 != 0
            j = int(rng.integers(len(images))) if mixed else None

            def view(im, n):
                p = {"resize": config.get("resize", {}).get("size"), "random_horizontal_flip": bool(rng.integers(2)),
                     "random_erase": [int(v) for v in T.RandomErasing.get_params(torch.zeros(3, size, size), (0.02, 0.33), (0.3, 3.3))[:4]] if rng.random() < 0.4 else None}
                if "random_resized_crop" in names:
                    p["random_resized_crop"] = T.RandomResizedCrop.get_params(im, [0.08, 1.0], [3 / 4, 4 / 3])
                if "random_crop" in names:
                    pad = 2 * config["random_crop"]["padding"]
                    p["random_crop"] = (int(rng.integers(size + pad - size + 1)), int(rng.integers(pad + 1)))
                ops = [(n * 2 + k) % 14 for k in range(2)]  # every op index over the samples
                p["rand_augment"] = [(k, float(space[C.RAND_AUGMENT_OPS[k]][0][9]) * (-1.0 if rng.random() < 0.5 and space[C.RAND_AUGMENT_OPS[k]][1] else 1.0) if space[C.RAND_AUGMENT_OPS[k]][0].ndim else 0.0) for k in ops] if rng.random() < 0.9 else None
                return p

            p1, p2 = view(img, n), view(images[j], n) if mixed else None
            mixup = np.random.default_rng(n).beta(1.0, 1.0) / 2.0 if mixed and n % 4 != 3 else None
            cutmix = None
            if mixed and n % 4 != 2:
                cut = int(size * np.sqrt(1 - np.random.default_rng(n).beta(1.0, 1.0)))
                cx, cy = np.int64(rng.integers(size)), np.int64(rng.integers(size))
                cutmix = [np.float64(0.3), np.clip(cx - cut // 2, 0, size), np.clip(cy - cut // 2, 0, size),
                          np.clip(cx + cut // 2, 0, size), np.clip(cy + cut // 2, 0, size)]
            rec = [j if mixed else None] if "mixup" in names else []
            for name in names:
                if name in _MLDRReplay.NO_PARAM or name in ("mixup", "cutmix"):
                    continue
                rec.append([p1[name], p2[name]] if mixed else p1[name])
            rec += [mixup, cutmix] if "mixup" in names else []
            prob = np.float32(np.random.default_rng(n).uniform(0.5, 1.0))  # top-1 of 2 classes
            samples.append({"params": rec, "prob": ([float(prob)], [n % 2])})
        out.append((i, samples))
    return out


MLDR_IMAGENET = {"uint8": {"enable": True}, "random_resized_crop": {"enable": True, "size": 24},
                 "random_horizontal_flip": {"enable": True, "p": 0.5}, "rand_augment": {"enable": True, "p": 1.0},
                 "to_tensor": {"enable": True}, "normalize": {"mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]},
                 "random_erase": {"enable": True, "p": 0.25}, "mixup": {"enable": True, "alpha": 1.0, "div_by": 2.0, "p": 0.5},
                 "cutmix": {"enable": True, "alpha": 1.0, "p": 0.5}, "auto_augment": {"enable": False}}
MLDR_CIFAR = {"uint8": {"enable": True}, "resize": {"size": 20}, "random_crop": {"size": 20, "padding": 3},
              "random_horizontal_flip": {"enable": True, "p": 0.5}, "rand_augment": {"enable": True, "p": 1.0},
              "to_tensor": {"enable": True}, "normalize": {"mean": [0.507, 0.487, 0.441], "std": [0.267, 0.256, 0.276]},
              "random_erase": {"enable": True, "p": 0.25}}


def _write_mldr(root, config, records):
    os.makedirs(root, exist_ok=True)
    torch.save({"num_classes": 2, "reinforce": {"num_samples": len(records[0][1]), "topk": 2,
                                                "image_augmentation": config}}, os.path.join(root, "config.pth.tar"))
    for i, rec in records:
        torch.save((i, rec), os.path.join(root, f"{i}.pth.tar"), pickle_protocol=4)
    return str(root)


@pytest.mark.parametrize("config", ["imagenet", "cifar"])
def test_mldr_records_replay_bit_identically_to_ml_drs_own_replay(config, tmp_path):
    """Records written in ml-dr's released layout (config.pth.tar, {index}.pth.tar by torch.save, numpy scalars
    for the mixing draws) read without torch's pickle and replay, op by op, to the very tensor ml-dr's replay
    (transcribed above) gives on the same image and parameters: RandomResizedCrop or Resize + padded
    RandomCrop, flip, every RandAugment op, erasing, Normalize, MixUp, CutMix, both on one sample."""
    config = {"imagenet": MLDR_IMAGENET, "cifar": MLDR_CIFAR}[config]
    root = _folder(tmp_path / "imgs")
    data = R.load_data(C.parse_config(R.TrainConfig, ["--data", root], verbose=False))
    images = [data.load(i) for i in range(len(data))]
    records = _mldr_records(images, config, 16, np.random.default_rng(0))
    store = R.MLDRStore(_write_mldr(tmp_path / "rf", config, records), data)
    ref = _MLDRReplay(config)
    assert store.ns == 16 and store.size == (24 if config is MLDR_IMAGENET else 20)
    seen = set()
    for i, samples in records:
        for n, s in enumerate(samples):
            params = ref.decompress(s["params"])
            img2 = images[params["id2"]] if "mixup" in params or "cutmix" in params else None
            want = ref.reapply(images[i], params, img2)
            x, t = store.replay(data, i, n)
            assert x.dtype == torch.float32 and torch.equal(x, want), (i, n)
            torch.testing.assert_close(t[s["prob"][1]], torch.tensor(s["prob"][0]))
            seen |= {k for k in ("mixup", "cutmix") if k in params} | {k for k, _ in params.get("rand_augment", ((),))[0] or ()}
            seen |= {"erase"} if params.get("random_erase", (None,))[0] is not None else set()
    assert seen >= set(range(14)) | {"erase"} | ({"mixup", "cutmix"} if config is MLDR_IMAGENET else set()), seen


def test_mldr_layout_trains_and_counts_bad_records(tmp_path, capsys):
    """`train --reinforced` reads ml-dr's layout directly; a record that does not read (junk bytes) and one whose
    pickle would run code (refused, the code never runs) are counted and skipped, with one line of counts."""
    root = _folder(tmp_path / "imgs")
    data = R.load_data(C.parse_config(R.TrainConfig, ["--data", root], verbose=False))
    rf = _write_mldr(tmp_path / "rf", MLDR_IMAGENET, _mldr_records([data.load(i) for i in range(len(data))],
                                                                  MLDR_IMAGENET, 4, np.random.default_rng(1)))
    marker = tmp_path / "ran"

    class Evil:
        def __reduce__(self):
            return os.system, (f"touch {marker}",)

    torch.save((1, [{"params": Evil(), "prob": ([1.0], [0])}]), os.path.join(rf, "1.pth.tar"))
    open(os.path.join(rf, "4.pth.tar"), "wb").write(b"junk")
    out = str(tmp_path / "run")
    R.main(["train", "--data", root, "--reinforced", rf, "--reinforce-p", "1", "--epochs", "2", "--batch-size", "3",
            "--workers", "0", "--log-every", "1", "--out", out, "--val-data", root])
    log = [json.loads(line) for line in open(os.path.join(out, "log.jsonl"))]
    assert not marker.exists()
    assert [r["bad_records"] for r in log if "loss" in r][-1] == 4  # images 1 and 4, both epochs
    assert "skipped 4 stored records that failed to read or replay and 0 unreadable images" \
        in capsys.readouterr().out
    assert "top1" in log[-1]
    with pytest.raises(SystemExit):  # records for other images than --data's: one line
        R.MLDRStore(rf, R.Data(data.items[:4], data.labels[:4], data.classnames))


def test_optimizer_is_ml_drs_sgd_nesterov_with_decay_on_every_parameter():
    """ml-dr's train.get_optimizer with its ImageNet configs: SGD, Nesterov, one group with weight decay on every
    parameter (no_decay_bn_filter_bias off); --no-decay-all: 1-D parameters (biases, norms) in a group without."""
    m = R.build_model("resnet_tiny", 3)
    opt = R.make_optimizer(m, "sgd", 0.4, 1e-4, 0.9)
    (g,) = opt.param_groups
    assert g["nesterov"] and g["momentum"] == 0.9 and g["weight_decay"] == 1e-4
    assert len(g["params"]) == len(list(m.parameters()))
    decay, rest = R.make_optimizer(m, "sgd", 0.4, 1e-4, 0.9, nesterov=False, decay_all=False).param_groups
    assert {id(p) for p in rest["params"]} == {id(p) for n, p in m.named_parameters() if p.ndim == 1}
    assert rest["weight_decay"] == 0 and not decay["nesterov"] and len(decay["params"]) + len(rest["params"]) == len(g["params"])
    cfg = C.parse_config(R.TrainConfig, [], verbose=False)
    assert (cfg.nesterov, cfg.decay_all, cfg.weight_decay, cfg.warmup_epochs, cfg.aug) == (True, True, 1e-4, 5.0, "erm")


def test_erm_mixes_each_batch_with_mixup_or_cutmix_and_never_flips():
    """ml-dr's erm.yaml: per batch one of MixUp (lambda ~ Beta(0.2, 0.2)) or CutMix (Beta(1, 1), a spatial box),
    each half the time, partners a permutation of the batch, targets mixed as the pixels; the view has no flip."""
    B, n = 6, 6
    x = torch.arange(B, dtype=torch.float32).view(B, 1, 1, 1).expand(B, 3, 8, 8)  # image b is all b
    t = torch.eye(n)[:B]
    kinds, lams = [], []
    for seed in range(300):
        xm, tm = R.batch_mix(x, t, random.Random(seed))
        torch.testing.assert_close(tm.sum(1), torch.ones(B))
        torch.testing.assert_close(xm.mean((1, 2, 3)), tm @ torch.arange(n, dtype=torch.float32))  # pixels = labels
        partner = tm.clone()
        partner[range(B), range(B)] = 0
        perm = torch.where(partner.sum(1) > 0, partner.argmax(1), torch.arange(B))
        assert sorted(perm.tolist()) == list(range(B))  # the partners are a permutation of the batch
        values = [torch.unique(xm[b]).numel() for b in range(B)]
        if all(v == 1 for v in values) and not torch.equal(xm, x):
            kinds.append("mixup")
            lams.append(tm[0, 0].item())
        else:
            kinds.append("cutmix")
            b = int((partner.sum(1) > 0).nonzero()[0]) if partner.sum() else 0
            rows, cols = (xm[b, 0] != b).any(1), (xm[b, 0] != b).any(0)
            assert (xm[b, 0][rows][:, cols] != b).all()  # one rectangle
    assert 120 < kinds.count("mixup") < 180
    lams = np.array([max(v, 1 - v) for v in lams])
    assert (lams > 0.9).mean() > 0.4  # Beta(0.2, 0.2) is U-shaped (Beta(1, 1) would give 0.2)
    rng = random.Random(0)
    assert not any(R.draw_sample(rng, (40, 30), 16, "erm", 0.08)["view"]["flip"] for _ in range(100))
    assert any(R.draw_sample(rng, (40, 30), 16, "randaug", 0.08)["view"]["flip"] for _ in range(100))
