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
