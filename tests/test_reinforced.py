"""Multi-modal reinforced training (mobileclip.py): augmentation replay, the distillation loss against its
reference in one and two processes, the DataCompDR sample reader, and the reinforce -> train round trip."""
import gzip
import io
import json
import os
import random

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from PIL import Image

import common as C
import mobileclip

SMALL = ["--synthetic-train", "300", "--synthetic-val", "60", "--workers", "0", "--bpe-vocab", "300"]


def _image(seed=0, size=48):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (size, size + 8, 3), dtype=np.uint8))


def test_rand_augment_magnitudes_are_the_published_ones():
    """At magnitude 9 of 31 and a 224 crop, the values DataCompDR stores (spec 4.5)."""
    want = {"ShearX": 0.09, "ShearY": 0.09, "TranslateX": 30.453, "TranslateY": 30.453, "Rotate": 9.0,
            "Brightness": 0.27, "Color": 0.27, "Contrast": 0.27, "Sharpness": 0.27, "Posterize": 7.0,
            "Solarize": 178.5, "Identity": 0.0, "AutoContrast": 0.0, "Equalize": 0.0}
    seen = {}
    for k, m in C.rand_augment_params(random.Random(0), 224, num_ops=400):
        seen.setdefault(C.RAND_AUGMENT_OPS[k], set()).add(round(m, 3))
    assert set(seen) == set(want)
    for name, values in seen.items():
        assert {abs(v) for v in values} == {want[name]}, name


def test_rand_augment_ops_act_like_torchvision():
    img = _image()
    x = np.asarray(img).astype(int)
    out = np.asarray(C.apply_rand_augment(img, [[3, 5.7]])).astype(int)  # TranslateX by int(5.7) = 5 px right
    assert (out[:, 5:] == x[:, :-5]).all() and (out[:, :5] == 0).all()
    out = np.asarray(C.apply_rand_augment(img, [[4, -3.2]])).astype(int)  # TranslateY by -3 px: up
    assert (out[:-3] == x[3:]).all() and (out[-3:] == 0).all()
    out = np.asarray(C.apply_rand_augment(img, [[1, 0.09]])).astype(int)  # ShearX about the corner (0, 0)
    assert (out[0] == x[0]).all() and not (out[-1] == x[-1]).all()
    assert (np.asarray(C.apply_rand_augment(img, [[11, 178.5]])) == np.where(x >= 178.5, 255 - x, x)).all()
    assert (np.asarray(C.apply_rand_augment(img, [[10, 7.0]])) == (x & 0xFE)).all()  # Posterize to 7 bits
    assert (np.asarray(C.apply_rand_augment(img, [[0, 0.0]])) == x).all()


def test_replay_is_bit_identical_and_deterministic():
    img = _image(1)
    params = [mobileclip.draw_augmentation(random.Random(i), *img.size, 224, 0.08) for i in range(20)]
    stored = json.loads(json.dumps({"param_aug": params}))["param_aug"]  # through the JSON of paug.json
    for p, q in zip(params, stored):
        a = mobileclip.replay_augmentation(img, p, 32)
        assert a.dtype == torch.uint8 and a.shape == (3, 32, 32)
        assert torch.equal(a, mobileclip.replay_augmentation(img.copy(), q, 32))
    # a mix-up pair id in front and a skipped RandAugment (null) are understood
    box = params[0][0]
    plain = img.crop((box[1], box[0], box[1] + box[3], box[0] + box[2])).resize((32, 32), Image.BICUBIC)
    assert torch.equal(mobileclip.replay_augmentation(img, [7, box, None], 32),
                       torch.from_numpy(np.asarray(plain).copy()).permute(2, 0, 1))


def _teachers(n=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    B, K, D, E = 6, n, 5, 4
    img, txt = (F.normalize(torch.randn(B, E, generator=g), dim=-1) for _ in range(2))
    t_img = F.normalize(torch.randn(B, K, D, generator=g), dim=-1).flatten(1)  # (B, K*D), each slice norm 1
    t_txt = F.normalize(torch.randn(B, K, D, generator=g), dim=-1).flatten(1)
    return img, txt, t_img, t_txt


def test_distill_loss_matches_reference_and_is_kl_plus_entropy():
    img, txt, t_img, t_txt = _teachers()
    img.requires_grad_(True)
    scale, scales = torch.tensor(12.0), [30.0, 20.0]
    fast = mobileclip.distill_loss(img, txt, t_img, t_txt, scale, scales)
    ref = mobileclip.distill_loss_reference(img, txt, t_img, t_txt, scale, scales)
    torch.testing.assert_close(fast, ref)
    g1, = torch.autograd.grad(fast, img)
    g2, = torch.autograd.grad(mobileclip.distill_loss_reference(img, txt, t_img, t_txt, scale, scales), img)
    torch.testing.assert_close(g1, g2)
    # a student that reproduces the single teacher's similarities exactly reaches the teacher's entropy
    t1, t2 = t_img[:, :5], t_txt[:, :5]
    p = (10 * t1 @ t2.T)
    entropy = -((p.softmax(1) * p.log_softmax(1)).sum(1).mean() + (p.T.softmax(1) * p.T.log_softmax(1)).sum(1).mean()) / 2
    torch.testing.assert_close(mobileclip.distill_loss(t1, t2, t1, t2, torch.tensor(10.0), [10.0]), entropy)


def _worker(rank, world, port, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    img, txt, t_img, t_txt = _teachers()
    img.requires_grad_(True)
    B = len(img) // world
    rows = slice(rank * B, (rank + 1) * B)
    loss = mobileclip.distill_loss(img[rows], txt[rows], t_img[rows], t_txt[rows], torch.tensor(12.0), [30.0, 20.0])
    loss.backward()
    grad = img.grad.clone()
    dist.all_reduce(grad)  # what DDP does to parameter gradients, up to the 1/world it applies
    total = loss.detach().clone()
    dist.all_reduce(total)
    torch.save({"loss": total / world, "grad": grad / world}, f"{out}/rank{rank}.pt")
    dist.barrier()
    dist.destroy_process_group()


def test_distill_loss_two_gloo_processes_equal_one(tmp_path, free_port):
    mp.spawn(_worker, args=(2, free_port, str(tmp_path)), nprocs=2, join=True)
    img, txt, t_img, t_txt = _teachers()
    img.requires_grad_(True)
    loss = mobileclip.distill_loss_reference(img, txt, t_img, t_txt, torch.tensor(12.0), [30.0, 20.0])
    loss.backward()
    for rank in range(2):
        got = torch.load(tmp_path / f"rank{rank}.pt")
        torch.testing.assert_close(got["loss"], loss.detach(), atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(got["grad"], img.grad, atol=1e-6, rtol=1e-5)


class _Tok:
    def __call__(self, texts, ctx):
        return torch.tensor([[len(t)] + [0] * (ctx - 1) for t in texts])


def _dr_sample(fmt):
    """A published-layout sample: npz (v1: text_emb = [GT, syn...]) or pth.gz with RayGen's per-key rows."""
    buf = io.BytesIO()
    _image(2).save(buf, format="PNG")
    img_emb, text_emb = np.arange(3 * 4, dtype=np.float32).reshape(3, 4), np.ones((6, 4), np.float32)
    s = {"__key__": "0001", "png": buf.getvalue(), "txt": b"a cat",
         "syn.json": json.dumps({"syn_text": ["s" * (c + 1) for c in range(5)]}).encode()}
    params = [mobileclip.draw_augmentation(random.Random(i), 56, 48, 224, 0.08) for i in range(3)]
    if fmt == "npz":
        text_emb[1:] += np.arange(5, dtype=np.float32)[:, None]
        z = io.BytesIO()
        np.savez(z, image_emb=img_emb, text_emb=text_emb)
        s.update({"npz": z.getvalue(), "paug.json": json.dumps({"param_aug": params}).encode()})
    else:  # RayGen bf16: text_emb holds the GT only, syn_text_emb the synthetic rows; paug as a JSON string
        d = {"image_emb": torch.from_numpy(img_emb).bfloat16(), "text_emb": torch.ones(1, 4).bfloat16(),
             "syn_text_emb": (torch.ones(5, 4) + torch.arange(5.0)[:, None]).bfloat16()}
        z = io.BytesIO()
        torch.save(d, z)
        s.update({"pth.gz": gzip.compress(z.getvalue()),
                  "paug.json": json.dumps({"param_aug": json.dumps(params)}).encode()})
    return s, params


@pytest.mark.parametrize("fmt", ["npz", "pth.gz"])
def test_datacompdr_sample_reader(fmt):
    s, params = _dr_sample(fmt)
    dec = mobileclip.DRDecode(_Tok(), 16, 4, 0, "^syn_text.*$", 1)
    out = dec(s)
    a = [i for i, p in enumerate(params)
         if torch.equal(out["image"], mobileclip.replay_augmentation(C.decode_image(s), p, 16))]
    assert len(a) >= 1 and torch.equal(out["img_emb"], torch.arange(4.0) + 4 * a[0])  # the same augmentation
    c = int(out["syn_ids"][0]) - 1  # _Tok encodes the length: synthetic caption c is c + 1 letters long
    assert out["ids"][0] == len("a cat") and torch.all(out["txt_emb"] == 1)  # the GT caption and its row
    assert torch.all(out["syn_emb"] == 1 + c)  # the row of the synthetic caption drawn (row c holds 1 + c)
    with pytest.raises(ValueError):  # embeddings of 2 teachers declared, 1 expected
        dec({**s, "json": json.dumps({"teachers": 2}).encode()})


def test_student_replay_is_bicubic_whatever_the_eval_filter():
    """`train`'s reader replays the stored view as OpenCLIP's training transform resizes (bicubic), also for a model
    whose eval transform is bilinear (MobileCLIP v1, the tiny one here)."""
    cfg = mobileclip.Config(reinforced=True, model="mobileclip_tiny")
    spec = mobileclip.model_spec(cfg.model)
    assert spec["interpolation"] == "bilinear"
    s, params = _dr_sample("npz")
    out = mobileclip.make_decode(cfg, _Tok(), spec, 1)(s)
    a = int(out["img_emb"][0]) // 4  # image_emb row a holds 4a .. 4a + 3
    img, size = C.decode_image(s), spec["image_size"]
    assert out["image"].shape == (3, size, size)
    assert torch.equal(out["image"], mobileclip.replay_augmentation(img, params[a], size, Image.BICUBIC))
    assert not torch.equal(out["image"], mobileclip.replay_augmentation(img, params[a], size, Image.BILINEAR))


def test_mix_synthetic_mode():
    """--mix-synthetic (the official `--dataset-reinforcement-mix-synthetic`): one caption per sample, the synthetic
    one w.p. --synthetic-prob, drawn per sample, with the teachers' embedding of the caption taken; no second pair.
    The loss is then the one pair's."""
    s, _ = _dr_sample("npz")
    samples = [{**s, "__key__": f"{k:04d}", "txt": b"a ground truth"} for k in range(200)]
    got = {}
    for prob in (0.0, 0.5, 1.0):
        dec = mobileclip.DRDecode(_Tok(), 16, 4, 0, "^syn_text.*$", 1, mix=prob)
        outs = [dec(x) for x in samples]
        assert all("syn_ids" not in o and "syn_emb" not in o for o in outs)
        syn = [int(o["ids"][0]) != len("a ground truth") for o in outs]
        for o, is_syn in zip(outs, syn):  # the caption's own embedding: GT 1, synthetic c (c + 1 letters) 1 + c
            assert torch.all(o["txt_emb"] == (int(o["ids"][0]) if is_syn else 1))
        got[prob] = sum(syn) / len(syn)
    assert got[0.0] == 0 and got[1.0] == 1 and 0.4 < got[0.5] < 0.6, got
    pair = mobileclip.DRDecode(_Tok(), 16, 4, 0, "^syn_text.*$", 1)(samples[0])  # the draws of pair mode are kept
    mixed = mobileclip.DRDecode(_Tok(), 16, 4, 0, "^syn_text.*$", 1, mix=0.0)(samples[0])
    assert torch.equal(pair["image"], mixed["image"]) and torch.equal(pair["ids"], mixed["ids"])
    img, txt, t_img, t_txt = _teachers()
    batch, scale = {"img_emb": t_img, "txt_emb": t_txt}, torch.tensor(12.0)
    one = mobileclip.reinforced_loss(img, txt, None, batch, scale, 0.5, [30.0, 20.0])
    expect = 0.5 * C.contrastive_loss(img, txt, scale) + 0.5 * mobileclip.distill_loss(img, txt, t_img, t_txt, scale,
                                                                                       [30.0, 20.0])
    torch.testing.assert_close(one, expect)


def test_reinforce_then_train_round_trip(tmp_path, monkeypatch):
    cache, teacher, dr, student = (str(tmp_path / d) for d in ("cache", "teacher", "dr", "student"))
    mobileclip.main(["--out", teacher, "--steps", "4", "--batch-size", "16", "--cache-dir", cache, *SMALL])
    ckpt = f"{teacher}/ckpt-4.pt"
    mobileclip.main(["reinforce", "--teachers", f"{ckpt},{ckpt}", "--num-augs", "3", "--num-captions", "2",
                     "--out", dr, "--cache-dir", cache, "--batch-size", "64", *SMALL])
    shards = C.expand_shards(dr)
    assert len(shards) == 1 and os.path.isfile(f"{dr}/eval.json")
    mtime = os.path.getmtime(shards[0])  # a second run resumes: finished shards are not redone
    mobileclip.main(["reinforce", "--teachers", f"{ckpt},{ckpt}", "--out", dr, "--cache-dir", cache, *SMALL])
    assert os.path.getmtime(shards[0]) == mtime

    # the stored embeddings are the teacher's embeddings of the replayed views and of the captions
    s = next(C.iter_tar_samples(shards[0], {}))
    model, tok, spec = mobileclip.load_teacher(ckpt, "", "cpu")
    params, syn = json.loads(s["paug.json"])["param_aug"], json.loads(s["syn.json"])["syn_text"]
    emb = mobileclip.read_embeddings(s)
    assert emb["image_emb"].shape == (3, 2 * 128) and emb["text_emb"].shape == (3, 2 * 128) and len(syn) == 2
    views = torch.stack([mobileclip.replay_augmentation(C.decode_image(s), p, spec["image_size"]) for p in params])
    with torch.no_grad():
        z = model.encode_image(mobileclip.preprocess(views, spec), normalize=True)
        t = model.encode_text(tok([C.decode_caption(s), *syn], spec["context_length"]), normalize=True)
    torch.testing.assert_close(torch.from_numpy(emb["image_emb"]), torch.cat([z, z], 1), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(torch.from_numpy(emb["text_emb"]), torch.cat([t, t], 1), atol=1e-5, rtol=1e-4)
    # DataCompDR's scale by default, whatever model trains later: translations in pixels of a 224-px view (the
    # teacher and the students here are 64 px), +-150/331 * 224 * 9/30 = 30.45 px at magnitude 9 of 31 (spec 4.5)
    ops = [op for x in C.iter_tar_samples(shards[0], {}) for p in json.loads(x["paug.json"])["param_aug"] for op in p[1]]
    shifts = {round(abs(m), 2) for k, m in ops if C.RAND_AUGMENT_OPS[k] in ("TranslateX", "TranslateY")}
    assert spec["image_size"] == 64 and shifts == {30.45}, shifts
    scene = json.loads(s["json"])["scene"]  # the world's captioner names every attribute
    assert all(scene[a] in c for c in syn for a in ("shape", "colour", "size", "texture", "background"))

    # --alt-noise: the web-like alt-text is what is stored (and embedded) as the sample's ground truth
    noisy = str(tmp_path / "dr_noisy")
    mobileclip.main(["reinforce", "--teachers", ckpt, "--num-augs", "1", "--num-captions", "1", "--alt-noise", "0.5",
                     "--out", noisy, "--cache-dir", cache, *SMALL])
    clean = {s["__key__"]: s for s in C.iter_tar_samples(shards[0], {})}
    wrong = 0
    for s in C.iter_tar_samples(C.expand_shards(noisy)[0], {}):
        expect = mobileclip.unrelated_alt_text(clean[s["__key__"]], 0.5) or C.decode_caption(clean[s["__key__"]])
        wrong += expect != C.decode_caption(clean[s["__key__"]])
        assert C.decode_caption(s) == expect and json.loads(s["json"])["scene"]["shape"] in json.loads(
            s["syn.json"])["syn_text"][0]  # the captioner's caption stays correct
    assert 0.35 < wrong / len(clean) < 0.65

    mobileclip.main(["--reinforced", "--data", dr, "--teacher-scales", "20,20", "--lambda-kd", "0.5",
                     "--out", student, "--steps", "30", "--batch-size", "32", "--log-every", "5", "--lr", "3e-3",
                     "--warmup", "5", *SMALL])
    log = [json.loads(line) for line in open(f"{student}/log.jsonl")]
    losses = [r["loss"] for r in log if "loss" in r]
    assert os.path.isfile(f"{student}/ckpt-30.pt") and losses[-1] < losses[0]
    assert any("zeroshot_top1" in r for r in log)  # evaluated on the world's held-out set (eval.json)

    # --mix-synthetic: one caption per image through the text tower (B, not 2B, texts) and one loss pair
    calls, loss = [], mobileclip.reinforced_loss
    monkeypatch.setattr(mobileclip, "reinforced_loss", lambda img, txt, syn, *a: calls.append(
        (len(img), len(txt), syn)) or loss(img, txt, syn, *a))
    mobileclip.main(["--reinforced", "--mix-synthetic", "--data", dr, "--teacher-scales", "20,20", "--out",
                     f"{student}_mix", "--bpe", f"{student}/bpe.txt", "--steps", "2", "--batch-size", "8", "--no-eval",
                     *SMALL])
    assert calls == [(8, 8, None)] * 2 and os.path.isfile(f"{student}_mix/ckpt-2.pt")


def test_reinforced_without_data_is_one_clear_line(tmp_path, capsys):
    with pytest.raises(SystemExit):
        mobileclip.main(["--reinforced", "--out", str(tmp_path)])
    assert "--reinforced needs --data" in capsys.readouterr().err
