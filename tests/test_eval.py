"""The shared evaluation pieces of common.py: one mIoU (mmsegmentation's IoUMetric), its confusion matrix with
ignore pixels and ADE20K's reduce-zero-label, the 80 OpenAI templates, and the restricted unpickler."""
import gzip
import os
import pickle

import numpy as np
import pytest
import torch

import common as C


def brute_miou(preds, labels, K, ignore=255, reduce_zero=False):
    """Per class, by Python sets of pixel positions over the whole set; mean over classes with a non-empty union."""
    inter, union = [0] * K, [0] * K
    for p, l in zip(preds, labels):
        for y, x in np.ndindex(*l.shape):
            g = int(l[y, x])
            if reduce_zero:
                g = ignore if g == 0 else g - 1
                g = ignore if g == ignore - 1 else g
            if g == ignore:
                continue
            q = int(p[y, x])
            for c in range(K):
                a, b = g == c, q == c
                inter[c] += a and b
                union[c] += a or b
    ious = [100 * i / u for i, u in zip(inter, union) if u > 0]
    return sum(ious) / len(ious)


@pytest.mark.parametrize("reduce_zero", [False, True])
def test_miou_equals_brute_force(reduce_zero):
    g = torch.Generator().manual_seed(0)
    K = 6
    preds, labels = [], []
    for _ in range(3):
        l = torch.randint(0, K + (1 if reduce_zero else 0), (9, 11), generator=g)
        l[torch.rand(l.shape, generator=g) < 0.2] = 255  # ignore pixels
        l[l == 4] = 3  # class 4 (3 after the reduction) absent from the ground truth
        p = torch.randint(0, K, (9, 11), generator=g)
        p[p == 5] = 0  # class 5 never predicted
        preds.append(p), labels.append(l)
    conf = sum(C.confusion_matrix(p, l, K, reduce_zero_label=reduce_zero) for p, l in zip(preds, labels))
    assert conf.sum() == sum(((l != 255) & ((l != 0) if reduce_zero else True)).sum().item() for l in labels)
    assert C.miou(conf) == pytest.approx(brute_miou(preds, labels, K, reduce_zero=reduce_zero), rel=1e-9)


def test_miou_leaves_out_classes_neither_present_nor_predicted():
    conf = torch.tensor([[5, 0, 0], [0, 0, 0], [1, 0, 4]])
    m, per = C.miou(conf, per_class=True)
    assert torch.isnan(per[1]) and m == pytest.approx((5 / 6 + 4 / 5) / 2 * 100)
    assert C.miou(torch.tensor([[3, 2], [0, 0]])) == pytest.approx((60 + 0) / 2)  # predicted but absent: 0


def test_openai_templates():
    t = C.OPENAI_IMAGENET_TEMPLATES
    assert len(t) == 80 == len(set(t)) and all(s.count("{}") == 1 for s in t)
    assert t[0] == "a bad photo of a {}." and t[-1] == "a tattoo of the {}." and "itap of a {}." in t
    assert C.templates_arg("openai") is t and len(C.templates_arg("default")) == 7


def test_safe_unpickle_reads_data_and_refuses_code(tmp_path):
    data = {"n01440764": 12, "words": ["a", "b"], "t": (1, 2.5, None, True), "s": {1, 2}, "b": b"\x00"}
    for proto in (2, 4, 5):
        assert C.safe_unpickle(pickle.dumps(data, protocol=proto)) == data
    path = tmp_path / "v.pkl.gz"
    path.write_bytes(gzip.compress(pickle.dumps(data)))
    assert C.safe_unpickle(str(path)) == data
    arr = {"2014": np.arange(5, dtype=np.int64), "x": np.float32(2.0)}
    out = C.safe_unpickle(pickle.dumps(arr), numpy=True)
    assert (out["2014"] == arr["2014"]).all() and out["x"] == 2.0
    with pytest.raises(ValueError, match="refused global numpy"):
        C.safe_unpickle(pickle.dumps(arr))  # numpy only when asked

    class Evil:
        def __reduce__(self):
            return (os.system, ("touch " + str(tmp_path / "pwned"),))
    with pytest.raises(ValueError, match="refused global (posix|os|nt).system") as e:
        C.safe_unpickle(pickle.dumps({"k": Evil()}))
    assert "\n" not in str(e.value) and not (tmp_path / "pwned").exists()


def test_the_four_scripts_give_the_same_miou_on_the_same_predictions(tmp_path, monkeypatch):
    """Issue 26: one mIoU. The same fixed predictions and label maps (255 pixels predicted as a class, class 4 only
    predicted, class 5 neither present nor predicted), drawn in the image's red channel as 40 x class, go through
    each script's own scoring: samclip.seg_eval (its dense logits stubbed), dense.evaluate on an image folder (a
    stub model reads the class off the pixel), transfer.evaluate on whole images of a shard (the same stub,
    uint8 input) and cliptex.probe, whose mIoU is dense.py's (dense.finetune stubbed to evaluate only, after
    dense.main has parsed cliptex's argv). All four equal common.miou and the brute force."""
    import torch.nn.functional as F
    from PIL import Image
    import cliptex
    import dense
    import samclip
    import transfer
    rng, K, H, W = np.random.default_rng(0), 6, 12, 16
    preds = [rng.integers(0, 5, (H, W)) for _ in range(3)]  # classes 0..4 predicted
    labels = [rng.integers(0, 4, (H, W)) for _ in range(3)]  # classes 0..3 present: 4 only predicted, 5 neither
    for y in labels:
        y[rng.random((H, W)) < 0.15] = 255
    images = [Image.fromarray(np.stack([40 * p, p, p], -1).astype(np.uint8)) for p in preds]
    conf = sum(C.confusion_matrix(torch.from_numpy(p), torch.from_numpy(y), K) for p, y in zip(preds, labels))
    ref = brute_miou(preds, labels, K)
    assert C.miou(conf) == pytest.approx(ref, rel=1e-12) and 0 < ref < 100

    def one_hot(red):  # (..., h, w) red channel in 0..255 -> (..., K, h, w) logits of the class drawn
        return F.one_hot((red / 40).round().long(), K).movedim(-1, -3).float()

    class Stub(torch.nn.Module):
        def __init__(self, scale):
            super().__init__()
            self.scale = scale  # 255 where the script normalises to [0, 1] first (dense), 1 on uint8 (transfer)

        def forward(self, x):
            return one_hot(x[:, 0].float() * self.scale)

    found = {}
    # samclip: zero-shot segmentation without a background rule (every label a class)
    monkeypatch.setattr(samclip, "dense_logits", lambda model, img, size, classifier: one_hot(
        torch.from_numpy(np.asarray(img)[..., 0].astype(np.float32))))
    found["samclip"] = samclip.seg_eval(type("M", (), {"patch": 4})(), list(zip(images, labels)), list("abcdef"),
                                        None, 16, "cpu", has_bg=False)["miou"]
    # dense: a folder of images and label PNGs, no reduce-zero-label, the crop = the short side (no resize)
    root = tmp_path / "ade"
    for sub in ("images/validation", "annotations/validation"):
        os.makedirs(root / sub)
    for i, (img, y) in enumerate(zip(images, labels)):
        img.save(root / f"images/validation/{i}.png")
        Image.fromarray(y.astype(np.uint8)).save(root / f"annotations/validation/{i}.png")
    items = dense.index_folder(str(root), "seg", "val")
    s = dict(crop=H, reduce_zero_label=False, depth_scale=1.0, classes=K, mean=(0.0,) * 3, std=(1.0,) * 3, bf16=False)
    cpu = torch.device("cpu")
    found["dense"] = dense.evaluate(Stub(255), items, "seg", dense.SegConfig(batch_size=2, workers=0), s, cpu)["miou"]
    # transfer: whole images of a shard, label 0 a class (background), 1..5 the task's 5 classes
    C.write_shard(str(tmp_path / "t.tar"), [{"__key__": f"k{i}", "png": img, "seg.png": Image.fromarray(y.astype(
        np.uint8))} for i, (img, y) in enumerate(zip(images, labels))])
    cfg = transfer.Config(task="seg", num_classes=K - 1, image_size=H, test=str(tmp_path / "t.tar"), workers=0)
    found["transfer"] = transfer.evaluate(Stub(1), cfg, cpu)["miou"]
    # cliptex: probe -> dense.main(["seg", ...]) -> (dense.finetune, stubbed to score only) dense.evaluate
    calls = []

    def finetune(dcfg):
        calls.append(type(dcfg).__name__)
        if isinstance(dcfg, dense.SegConfig):
            assert dcfg.head == "linear" and dcfg.freeze_backbone
            return dense.evaluate(Stub(255), items, "seg", dcfg, s, cpu)
        return {"rmse": 0.0}
    monkeypatch.setattr(dense, "finetune", finetune)
    torch.save({"model_name": "mobileclip_tiny", "model": {}}, tmp_path / "clip.pt")
    pcfg = cliptex.ProbeConfig(init=str(tmp_path / "clip.pt"), eval=False, workers=0, out=str(tmp_path / "probe"))
    found["cliptex"] = cliptex.probe(pcfg)["seg_miou"]
    assert calls == ["SegConfig", "DepthConfig"]
    for name, m in found.items():
        assert m == pytest.approx(C.miou(conf), rel=1e-12) and m == pytest.approx(ref, rel=1e-12), name
