"""catlip.py on the CPU: noun extraction, the multi-hot BCE against its naive form, Transfer Init, the
vocabulary pass, and a tiny pre-train -> fine-tune that learns on the synthetic world."""
import collections
import json
import os

import pytest
import torch
import torch.nn.functional as F

import catlip as L
import common as C


@pytest.mark.parametrize("caption,nouns", [
    ("Two dogs catching frisbees in the park!", ["dog", "catching", "frisbee", "park"]),  # numbers, plurals
    ("Women and children with knives, leaves &amp; wolves", ["woman", "child", "knife", "leaf", "wolf"]),
    ("<b>Buses</b> near churches+boxes", ["bus", "church", "box"]),  # HTML tags, '+' is a space
    ("A puppy%27s toys: mice, geese and feet", ["puppy", "toy", "mouse", "goose", "foot"]),  # URL-quoted 's
    ("The cat is on the sofa. http://www.example.com/img.jpg", ["cat", "sofa", "example"]),  # web junk
    ("Café with glasses, series of ponies; a bus's dresses", ["cafe", "glass", "series", "pony", "bus", "dress"]),
    ("two green crosses... and CROSSES, on a striped white background",
     ["green", "cross", "striped", "white", "background"]),  # punctuation, case, duplicates collapse
    ("", []),
])
def test_extract_nouns(caption, nouns):
    assert L.extract_nouns(caption) == nouns


def test_singularize_rules():
    cases = {"ponies": "pony", "ties": "tie", "glasses": "glass", "dishes": "dish", "foxes": "fox",
             "buzzes": "buzz", "cats": "cat", "bus": "bus", "cactus": "cactus", "tennis": "tennis",
             "species": "species", "news": "news", "people": "person", "teeth": "tooth", "potatoes": "potato",
             "houses": "house", "dog": "dog"}
    assert {w: L.singularize(w) for w in cases} == cases


def test_vocab_file_formats(tmp_path):
    ours = tmp_path / "vocab.json"
    L.save_vocab(str(ours), L.select_vocab(collections.Counter(dog=9, cat=9, sofa=3, park=6), 100, min_count=5))
    v = L.load_vocab(str(ours))
    assert v.labels == ["cat", "dog", "park"] and v.lemmas == {"cat": 0, "dog": 1, "park": 2}
    tsv = tmp_path / "synsets.tsv"  # the published synset vocabulary, through a label -> lemma table
    tsv.write_text("n2084071\tdog,doggy\nn2121808\tcat\nn7881800\thot dog\n")
    v = L.load_vocab(str(tsv))
    assert v.labels == ["n2084071", "n2121808", "n7881800"]
    assert L.caption_labels("Two Doggies and a cat; dogs!", v, 8) == [0, 1]
    # wnid folders, a multi-word lemma, a synonym, no match
    assert L.match_classes(["n02084071", "hot dog", "doggy", "zebra"], v) == [[0], [2], [0], []]


def test_loss_matches_naive_reference():
    torch.manual_seed(0)
    B, Cn = 6, 40
    logits = (torch.randn(B, Cn, dtype=torch.float64) * 4).requires_grad_()
    labels = torch.tensor([[3, 7, -1], [0, 39, 12], [-1, -1, -1], [5, -1, -1], [1, 2, 3], [39, -1, -1]])
    y = L.multi_hot(labels, Cn).double()
    assert y.sum().item() == 10 and y[2].sum() == 0  # an empty caption: every class negative, still trained
    fast = L.multilabel_bce(logits, labels)
    ref = L.multilabel_bce_reference(logits, y)
    torch.testing.assert_close(fast.double(), ref, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(ref, F.binary_cross_entropy_with_logits(logits, y, reduction="sum") / B)
    g_fast, = torch.autograd.grad(fast, logits)
    g_ref, = torch.autograd.grad(ref, logits)
    torch.testing.assert_close(g_fast.double(), g_ref, rtol=1e-5, atol=1e-7)
    # summed over classes, not averaged: the mean over B * C elements is |V| times smaller
    torch.testing.assert_close(ref / Cn, F.binary_cross_entropy_with_logits(logits, y))
    # DDP averages the two ranks' gradients: the mean of the per-rank losses is the global-batch loss
    halves = (L.multilabel_bce(logits[:3], labels[:3]) + L.multilabel_bce(logits[3:], labels[3:])) / 2
    torch.testing.assert_close(halves, fast)


def test_transfer_init_copies_exactly_the_matched_rows():
    torch.manual_seed(0)
    vocab = L.Vocab(["dog", "cat", "retriever", "golden", "n2084071"],
                    {"dog": 0, "cat": 1, "retriever": 2, "golden": 3, "hound": 4})
    W, b = torch.randn(5, 16), torch.randn(5)
    names = ["cats", "golden retriever", "zebra", "n02084071"]
    matches = L.match_classes(names, vocab)
    assert matches == [[1], [3, 2], [], [4]]
    head = torch.nn.Linear(16, 4)
    before = head.weight.detach().clone(), head.bias.detach().clone()
    assert L.transfer_init(head, W, b, matches) == 3
    assert torch.equal(head.weight[0], W[1]) and torch.equal(head.bias[0], b[1])
    torch.testing.assert_close(head.weight[1], (W[2] + W[3]) / 2)
    torch.testing.assert_close(head.bias[1], (b[2] + b[3]) / 2)
    assert torch.equal(head.weight[2], before[0][2]) and torch.equal(head.bias[2], before[1][2])  # random kept
    assert torch.equal(head.weight[3], W[4])


def test_vocab_command_merges_worker_counts(world, tmp_path):
    """Two DataLoader workers count their shards apart; the merged counts equal one plain count."""
    out = str(tmp_path / "vocab.json")
    L.main(["vocab", "--data", world["train"], "--out", out, "--workers", "2", "--min-count", "1"])
    expect, skipped = collections.Counter(), {}
    for shard in C.expand_shards(world["train"]):
        for s in C.iter_tar_samples(shard, skipped):
            expect.update(L.extract_nouns(s["txt"].decode()))
    got = json.load(open(out))
    assert got["captions"] == 2000 and got["counts"] == dict(expect)
    assert list(got["counts"])[0] == expect.most_common(1)[0][0]  # most frequent first
    assert set(world["classnames"]) <= set(got["counts"])  # every shape name is a label


def read_log(out):
    with open(os.path.join(out, "log.jsonl")) as f:
        return [r for r in map(json.loads, f) if "step" in r]  # each run's start record has no step


SYN = ["--synthetic-train", "2000", "--synthetic-val", "200", "--workers", "1"]


def test_tiny_pretrain_then_finetune_learns(world, tmp_path):
    """A short pre-training takes the BCE from its start (|V| ln 2, about 25 for the 36 lemmas) to the
    level of the label priors (about 13) and its checkpoint feeds a fine-tune with Transfer Init that
    copies the rows of all ten shape names and runs to the end. Learning the shapes themselves needs
    minutes of CPU; that comparison (CatLIP + fine-tune vs scratch) is the README's `compare` run."""
    cache, pre = os.path.dirname(world["root"]), str(tmp_path / "pre")
    L.main(["--cache-dir", cache, "--out", pre, "--image-size", "32", "--steps", "60", "--batch-size", "32",
            "--warmup", "6", "--log-every", "2", "--crop-scale", "0.9"] + SYN)
    log = read_log(pre)
    losses = [r["loss"] for r in log if "loss" in r]
    assert losses[0] > 20 and max(losses[-5:]) < 15, losses
    assert log[-1]["classes_matched"] == 10 and 0 <= log[-1]["head_top1"] <= 100
    ft = str(tmp_path / "ft")
    L.main(["finetune", "--cache-dir", cache, "--init", pre, "--transfer-init", "--out", ft, "--epochs", "2",
            "--synthetic-labelled", "200", "--batch-size", "32", "--log-every", "6"] + SYN)
    log = read_log(ft)
    assert log[-1]["step"] == 2 * (200 // 32) and 0 <= log[-1]["top1"] <= 100
    assert log[0]["loss"] < 2.5  # about ln 10 + smoothing: the copied rows start it sensibly


def test_sigterm_saves_and_resume_continues_exactly(world, tmp_path, signal_script):
    """SIGTERM to the whole process group (the DataLoader worker included) after step 4: the worker ignores it,
    the run saves ckpt-4.pt and exits 0; --resume auto then logs the losses of a run never stopped and ends
    with the same weights, EMA and data position at step 8. CoreNet's ViT: variable batches (32 and 48 px),
    RangeAugment and BatchNorm statistics go through the resume too."""
    import subprocess
    import sys
    cache, a, b = os.path.dirname(world["root"]), str(tmp_path / "a"), str(tmp_path / "b")
    args = ["--cache-dir", cache, "--model", "tiny_corenet", "--image-size", "32", "--steps", "8", "--ckpt-every", "100", "--keep-ckpts", "5",
            "--batch-size", "16", "--log-every", "2", "--no-eval"] + SYN
    r = subprocess.run([sys.executable, signal_script("catlip", 4), *args, "--out", b], capture_output=True, text=True,
                       start_new_session=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=300)
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr[-3000:]
    assert [os.path.basename(p) for p in C.checkpoints(b)] == ["ckpt-4.pt"]
    assert "stopped by a signal at step 4" in r.stdout and "results: run directory" in r.stdout.splitlines()[-1]
    L.main(args + ["--out", b, "--resume", "auto", "--workers", "0"])
    L.main(args + ["--out", a, "--workers", "0"])
    assert [(r["step"], r["loss"]) for r in read_log(a)] == [(r["step"], r["loss"]) for r in read_log(b)]
    starts = [r for r in map(json.loads, open(os.path.join(b, "log.jsonl"))) if r.get("event") == "start"]
    assert [s["config"]["resume"] for s in starts] == ["", "auto"]
    wa, wb = (torch.load(os.path.join(d, "ckpt-8.pt"), weights_only=True) for d in (a, b))
    assert wa["data"] == wb["data"]
    for part in ("model", "ema"):
        for k in wa[part]:
            torch.testing.assert_close(wa[part][k], wb[part][k], rtol=0, atol=1e-6)


def test_a_new_run_into_another_runs_checkpoints_stops_or_starts_over(world, tmp_path, capsys):
    """Without --resume, one line; with --overwrite the earlier checkpoints, log and vocabulary move to
    previous-1/ and the run starts clean (its own vocabulary, its own start record)."""
    out = tmp_path / "r"
    C.save_checkpoint(str(out / "ckpt-5.pt"), {"step": 5})
    (out / "vocab.json").write_text('["zzz"]')
    for cmd in ([], ["finetune"]):
        with pytest.raises(SystemExit) as e:
            L.main(cmd + ["--out", str(out)])
        err = capsys.readouterr().err.strip().splitlines()
        assert e.value.code != 0 and len(err) == 1 and "holds another run's checkpoints (ckpt-5.pt" in err[0]
    L.main(["--out", str(out), "--overwrite", "--steps", "0", "--no-eval", "--cache-dir",
            os.path.dirname(world["root"]), "--image-size", "32"] + SYN[:4] + ["--workers", "0"])
    assert sorted(os.listdir(out / "previous-1")) == ["ckpt-5.pt", "vocab.json"]
    assert "zzz" not in L.load_vocab(str(out / "vocab.json")).labels and C.checkpoints(str(out)) == []


@pytest.mark.parametrize("args,message", [
    (["--model", "vit_g14"], "unknown model 'vit_g14'"),
    (["--vocab", "/nonexistent/vocab.json"], "vocabulary file not found"),
    (["--vocab", "{empty}.json"], "cannot read vocabulary"),
    (["--data", "/nonexistent/shards"], "data path does not exist"),
    (["--data", "{empty}.tar", "--workers", "0"], "no usable sample in a whole pass"),  # names the reasons:
    (["--data", "{empty}.tar", "--workers", "0"], "skipped: broken_tar:ReadError 1"),
    (["--data", "{empty}.tar", "--workers", "1"], "skipped: broken_tar:ReadError 1"),  # from a worker
    (["--batch-size", "0"], "--batch-size 0: must be >= 1"),
    (["--steps", "-5"], "--steps -5: must be >= 0"),
    (["--lr", "-1"], "--lr -1.0: must be >= 0"),
    (["--workers", "-1"], "--workers -1: must be >= 0"),
    (["--crop-scale", "1.5"], "--crop-scale 1.5: must be between 0 and 1"),
    (["--jitter", "1.5"], "--jitter 1.5 must be in [0, 1)"),
    (["--resume", "{empty}.pt"], "empty file (0 bytes)"),
    (["--resume", "{garbage}"], "cannot read checkpoint"),
    (["finetune", "--transfer-init"], "--transfer-init needs --init"),
    (["finetune", "--init", "/nonexistent/ckpt.pt"], "checkpoint not found"),
    (["finetune", "--init", "{empty}.pt"], "empty file (0 bytes)"),
    (["finetune", "--init", "{garbage}"], "cannot read checkpoint"),
    (["finetune", "--resume", "{empty}.pt"], "empty file (0 bytes)"),
    (["finetune", "--epochs", "-5"], "--epochs -5: must be >= 0"),
    (["finetune", "--batch-size", "0"], "--batch-size 0: must be >= 1"),
    (["finetune", "--val-frac", "2"], "--val-frac 2.0: must be between 0 and 1"),
    (["vocab", "--workers", "-2"], "--workers -2: must be >= 0"),
    (["compare"], "compare needs --init"),
])
def test_bad_input_is_one_clear_line(tmp_path, capsys, args, message):
    """Before any work (nothing in --out but what the lock leaves), one line and a non-zero exit."""
    (tmp_path / "garbage").write_bytes(b"not a checkpoint" * 10)
    for ext in (".json", ".tar", ".pt"):
        (tmp_path / f"empty{ext}").write_bytes(b"")
    args = [a.format(empty=tmp_path / "empty", garbage=tmp_path / "garbage") for a in args]
    cmd = args[:1] if not args[0].startswith("-") else []
    with pytest.raises(SystemExit) as e:
        L.main(cmd + ["--out", str(tmp_path / "r")] + args[len(cmd):])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code != 0 and err and message in err[-1] and err[-1].startswith("error:"), err
    assert not any("Traceback" in line for line in err) and not C.checkpoints(str(tmp_path / "r"))


@pytest.mark.parametrize("cmd,own,other", [
    ("pretrain", "--max-labels", "--transfer-init"), ("vocab", "--max-size", "--steps"),
    ("finetune", "--transfer-init", "--max-labels"), ("compare", "--linear-probe", "--max-labels")])
def test_help_of_each_command_shows_its_own_flags(cmd, own, other, capsys):
    with pytest.raises(SystemExit) as e:
        L.main([cmd, "--help"])
    out = capsys.readouterr().out
    fn = {"pretrain": L.pretrain, "vocab": L.vocab_main, "finetune": L.finetune, "compare": L.compare}[cmd]
    assert e.value.code == 0 and own in out and other not in out and ("--overwrite" in out) == (cmd != "vocab")
    assert " ".join(fn.__doc__.split("\n\n")[0].split()) in " ".join(out.split())  # the whole first paragraph


def test_help_lists_the_commands():
    """`python catlip.py --help` (a real process: prog name, % in help texts) lists every command in a line."""
    import subprocess
    import sys
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    r = subprocess.run([sys.executable, "catlip.py", "--help"], cwd=root, capture_output=True, text=True)
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr
    for name, fn in (("pretrain", L.pretrain), ("vocab", L.vocab_main), ("finetune", L.finetune),
                     ("compare", L.compare)):
        assert f"  {name}  " in r.stdout and fn.__doc__.splitlines()[0] in r.stdout


def test_init_must_be_a_catlip_checkpoint(tmp_path, capsys):
    torch.save({"model": {}, "kind": "catlip_finetune", "step": 1}, tmp_path / "ckpt-1.pt")
    with pytest.raises(SystemExit):
        L.main(["finetune", "--init", str(tmp_path), "--out", str(tmp_path / "r")])
    assert "is not a CatLIP pre-training checkpoint" in capsys.readouterr().err


# ---- CoreNet's ViT: the layout of the released CatLIP checkpoints ------------------------------------------
def corenet_state_dict(width=64, layers=2, classes=7, stem=32, seed=0):
    """Random weights under CoreNet's names and shapes, written from its vit.py / flash_transformer.py /
    conv_layer.py / positional_embedding.py / neural_aug.py (not from catlip.py's modules)."""
    g = torch.Generator().manual_seed(seed)
    r = lambda *s, scale=0.2: torch.randn(*s, generator=g) * scale  # noqa: E731
    sd = {"cls_token": r(1, 1, width), "pos_embed.pos_embed.pos_embed": r(1, 1, 196, width),
          "post_transformer_norm.weight": 1 + r(width), "post_transformer_norm.bias": r(width),
          "classifier.weight": r(classes, width), "classifier.bias": r(classes)}
    for i, (cin, cout, k) in enumerate([(3, stem, 4), (stem, stem, 2), (stem, width, 2)]):
        p = f"patch_emb.{i}.block."
        sd[p + "conv.weight"] = r(cout, cin, k, k, scale=0.5)
        if i < 2:
            sd.update({p + "norm.weight": 1 + r(cout), p + "norm.bias": r(cout), p + "norm.running_mean": r(cout),
                       p + "norm.running_var": 0.5 + torch.rand(cout, generator=g),
                       p + "norm.num_batches_tracked": torch.tensor(7)})
        else:
            sd[p + "conv.bias"] = r(cout)
    for i in range(layers):
        p = f"transformer.{i}."
        for n in ("pre_norm_mha.0", "pre_norm_ffn.0"):
            sd[f"{p}{n}.weight"], sd[f"{p}{n}.bias"] = 1 + r(width), r(width)
        for n, (o, c) in {"pre_norm_mha.1.qkv_proj": (3 * width, width), "pre_norm_mha.1.out_proj_attn": (width, width),
                          "pre_norm_ffn.1": (4 * width, width), "pre_norm_ffn.4": (width, 4 * width)}.items():
            sd[f"{p}{n}.weight"], sd[f"{p}{n}.bias"] = r(o, c, scale=c ** -0.5), r(o)
    for n, (lo, hi) in {"brightness": (0.5, 1.5), "contrast": (0.5, 1.5), "noise": (0.0, 0.1)}.items():
        sd[f"neural_augmentor.{n}._low"], sd[f"neural_augmentor.{n}._high"] = torch.tensor(lo), torch.tensor(hi)
    return sd


def corenet_forward(sd, x, heads):
    """A plain transcription of CoreNet's VisionTransformer.forward in eval mode (neural augmentor off) on a
    state dict: conv stem, 1-D bilinear resize of the 196 positions, CLS token without position, pre-norm
    flash blocks (LayerNorm eps 1e-6), final norm, classifier on the CLS token."""
    for i, k in enumerate((4, 2, 2)):
        p = f"patch_emb.{i}.block."
        x = F.conv2d(x, sd[p + "conv.weight"], sd.get(p + "conv.bias"), stride=k, padding=int((k - 1) / 2))
        if i < 2:
            x = F.gelu(F.batch_norm(x, sd[p + "norm.running_mean"], sd[p + "norm.running_var"],
                                    sd[p + "norm.weight"], sd[p + "norm.bias"], False, 0.1, 1e-5))
    B, D = x.shape[:2]
    x = x.flatten(2).transpose(1, 2)
    n, pos = x.shape[1], sd["pos_embed.pos_embed.pos_embed"]
    if n != pos.shape[2]:
        pos = F.interpolate(pos, size=(n, D), mode="bilinear")
    x = torch.cat([sd["cls_token"].expand(B, -1, -1), x + pos.reshape(1, n, D)], dim=1)
    ln = lambda t, p: F.layer_norm(t, (D,), sd[p + ".weight"], sd[p + ".bias"], 1e-6)  # noqa: E731
    lin = lambda t, p: F.linear(t, sd[p + ".weight"], sd[p + ".bias"])  # noqa: E731
    i = 0
    while f"transformer.{i}.pre_norm_mha.0.weight" in sd:
        p, N = f"transformer.{i}.", x.shape[1]
        qkv = lin(ln(x, p + "pre_norm_mha.0"), p + "pre_norm_mha.1.qkv_proj").reshape(B, N, 3, heads, D // heads)
        q, k, v = qkv.transpose(1, 3).unbind(2)  # (B, H, N, Dh) each
        a = ((q @ k.transpose(-2, -1)) / (D // heads) ** 0.5).softmax(-1) @ v
        x = x + lin(a.transpose(1, 2).reshape(B, N, D), p + "pre_norm_mha.1.out_proj_attn")
        x = x + lin(F.gelu(lin(ln(x, p + "pre_norm_ffn.0"), p + "pre_norm_ffn.1")), p + "pre_norm_ffn.4")
        i += 1
    return lin(ln(x, "post_transformer_norm")[:, 0], "classifier")


@pytest.fixture(scope="module")
def corenet_ckpt(tmp_path_factory):
    sd = corenet_state_dict(width=128, layers=2, classes=6)  # the shapes of MODELS["tiny_corenet"]
    path = tmp_path_factory.mktemp("corenet") / "vit_tiny.pt"
    torch.save(sd, path)
    return sd, str(path)


def test_corenet_vit_loads_strictly_and_matches_the_transcription(corenet_ckpt, tmp_path, capsys):
    sd, path = corenet_ckpt
    model = L.load_corenet(path)  # strict: every key, shape and buffer of CoreNet's layout, nothing else
    assert isinstance(model, L.CoreNetViT) and set(model.state_dict()) == set(sd)
    torch.manual_seed(0)
    with torch.no_grad():
        for S in (64, 48):  # 4x4 patches (the 196 positions resized), and 3x3
            x = torch.rand(2, 3, S, S)
            ref = corenet_forward(sd, x, heads=2)
            torch.testing.assert_close(model(x), ref, rtol=1e-5, atol=1e-5 * ref.abs().max().item())
            torch.testing.assert_close(C.set_fused(model, False)(x), ref, rtol=1e-5, atol=1e-5 * ref.abs().max().item())
            C.set_fused(model, True)
    bad = {k: v for k, v in sd.items() if k != "cls_token"}  # a mean-pool model is another layout: not this one
    torch.save({**bad, "transformer.0.pre_norm_mha.1.out_proj.weight": sd["classifier.weight"]}, tmp_path / "x.pt")
    with pytest.raises(SystemExit):
        L.load_corenet(str(tmp_path / "x.pt"))
    assert "does not fit this model" in capsys.readouterr().err


def corenet_params(D, layers, classes):
    """CoreNet ViT parameters by formula: stem (two bias-free convs with BatchNorm, one with bias), 196
    positions + CLS, blocks (2 LN, qkv, out, 4x MLP), final LN, classifier, RangeAugment's 6 scalars."""
    s = max(32, D // 4)
    stem = 3 * s * 16 + 2 * s + s * s * 4 + 2 * s + s * D * 4 + D
    block = 4 * D + (3 * D * D + 3 * D) + (D * D + D) + (4 * D * D + 4 * D) + (4 * D * D + D)
    return stem + 197 * D + layers * block + 2 * D + D * classes + classes + 6


def test_corenet_parameter_counts_are_the_published_ones():
    """The paper's Table 2 (with the 24,320-way head): 105M, 329M, 663M; built on the meta device."""
    for name, (D, layers, published) in {"vit_b16_corenet": (768, 12, 105), "vit_l16_corenet": (1024, 24, 329),
                                         "vit_h16_corenet": (1280, 32, 663)}.items():
        with torch.device("meta"):
            n = sum(p.numel() for p in L.build_model(name, 24320).parameters())
        assert n == corenet_params(D, layers, 24320) and round(n / 1e6) == published, (name, n)


def test_released_vocabulary_pickle_loads_and_code_is_refused(tmp_path, capsys):
    import pickle
    vocab = {"n5928118": 52418327, "n13333833": 46393897, "n2084071": 700, "n9999": 3}  # most frequent first
    (tmp_path / "vocab.pkl").write_bytes(pickle.dumps(vocab, protocol=4))
    v = L.load_vocab(str(tmp_path / "vocab.pkl"), 3)
    assert v.labels == ["n5928118", "n13333833", "n2084071"] and v.lemmas == {}
    assert L.match_classes(["n02084071", "dog"], v) == [[2], []]

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {tmp_path / 'ran'}",))
    (tmp_path / "evil.pkl").write_bytes(pickle.dumps({"n1": Evil()}))
    with pytest.raises(SystemExit) as e:
        L.load_vocab(str(tmp_path / "evil.pkl"))
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code != 0 and len(err) == 1 and "refused global" in err[0] and "system" in err[0], err
    assert not (tmp_path / "ran").exists()


def test_optimizer_groups_lr_and_ema_follow_the_configs():
    torch.manual_seed(0)
    model = L.build_model("tiny_corenet", 5)
    opt = L.make_optimizer(model, 1e-3, 0.2, 0.999)  # no_decay_bn_filter_bias: true
    names = {id(p): n for n, p in model.named_parameters()}
    decay, no_decay = ({names[id(p)] for p in g["params"]} for g in opt.param_groups)
    assert [g["weight_decay"] for g in opt.param_groups] == [0.2, 0.0]
    assert decay == {n for n, p in model.named_parameters() if p.ndim != 1}  # matrices, CLS, positions, aug scalars
    assert {"cls_token", "pos_embed.pos_embed.pos_embed", "neural_augmentor.noise._high",
            "transformer.0.pre_norm_mha.1.qkv_proj.weight", "patch_emb.0.block.conv.weight"} <= decay
    assert {"classifier.bias", "post_transformer_norm.weight", "patch_emb.0.block.norm.weight",
            "transformer.1.pre_norm_ffn.0.bias", "patch_emb.2.block.conv.bias"} <= no_decay
    assert len(decay | no_decay) == len(names) and not decay & no_decay
    assert len(L.make_optimizer(model, 1e-3, 0.2, 0.999, decay_all=True).param_groups) == 1
    # warm-up from warmup_init_lr, CoreNet's cosine (period total - warmup + 1)
    assert L.lr_at(0, 1e-3, 10, 100, 1e-5, 1e-6) == 1e-6
    assert abs(L.lr_at(5, 1e-3, 10, 100, 1e-5, 1e-6) - 5.005e-4) < 1e-12
    import math
    end = 1e-5 + 0.5 * (1e-3 - 1e-5) * (1 + math.cos(math.pi * 90 / 91))  # never quite min_lr, as CoreNet's
    assert L.lr_at(10, 1e-3, 10, 100, 1e-5, 1e-6) == 1e-3 and L.lr_at(100, 1e-3, 10, 100, 1e-5, 1e-6) == end
    # EMA: no warm-up, the whole state dict (BatchNorm statistics too)
    ema = L.EMA(model, 0.0005)
    before = {k: v.clone() for k, v in ema.module.state_dict().items()}
    with torch.no_grad():
        for t in model.state_dict().values():
            t.add_(1)
    ema.update(model, 0)
    for k, v in ema.module.state_dict().items():
        expect = before[k] + 1 if not v.is_floating_point() else before[k] + 0.0005
        torch.testing.assert_close(v, expect.to(v.dtype))


def corenet_pairs(batch, div):
    """A transcription of corenet/data/sampler/utils.py's image_batch_pairs at the configs' vbs values (224 px,
    25 scales in 128-320) and make_divisible."""
    import numpy as np

    def make_divisible(v, d):
        new = max(d, int(v + d / 2) // d * d)
        return new + d if new < 0.9 * v else new
    vals = set(np.linspace(128, 320, 25))
    vals.add(224)
    dims = sorted(make_divisible(v, div) for v in vals)
    return sorted({(h, max(1, int(round(224 * 224 * batch / (h * h), 2)))) for h in dims})


def test_variable_batch_pairs_and_sampler_are_corenets():
    """image_batch_pairs against CoreNet's (fine-tune configs: batch 512, check_scale 32; pre-training ViT-B:
    batch 1024 a GPU, check_scale 16); the sampler covers each item once per epoch."""
    expect = corenet_pairs(512, 32)
    assert L.image_batch_pairs(224, 512) == expect and [s for s, _ in expect] == list(range(128, 321, 32))
    assert (224, 512) in expect and (128, 1568) in expect
    expect = corenet_pairs(1024, 16)
    assert L.image_batch_pairs(224, 1024, div=16) == expect and [s for s, _ in expect] == list(range(128, 321, 16))
    assert (224, 1024) in expect and (320, 501) in expect
    pairs = L.image_batch_pairs(32, 8, lo=16, hi=48, n=5, div=16)  # (16, 32), (32, 8), (48, 3)
    a = L.VariableBatches(50, pairs, 100, 0, seed=1, rank=0, world=1)
    batches = list(a)
    assert len(batches) == a.total and all(len({s for _, _, s in b}) == 1 for b in batches)
    assert all(len(b) == dict(pairs)[b[0][2]] for b in batches) and len({b[0][2] for b in batches}) == 3
    flat = [(e, i) for b in batches for e, i, _ in b]
    assert sorted(i for e, i in flat if e == 0) == list(range(50))  # epoch 0: every item once
    assert list(L.VariableBatches(50, pairs, 100, 3, seed=1, rank=0, world=1)) == batches[3:]  # a resume
    two = [list(L.VariableBatches(50, pairs, 100, 0, seed=1, rank=r, world=2)) for r in (0, 1)]
    assert [len(x) + len(y) for x, y in zip(*two)] == [2 * dict(pairs)[b[0][2]] for b in two[0]]


def test_pretraining_stream_yields_the_variable_batches(world):
    """MultiScaleStream (pre-training): the batch of step s has the size and count that draw_scale gives s, with
    two DataLoader workers (taking steps in turn) as with none; resumed at step 3 from the workers' positions, it
    yields the batches an uninterrupted stream yields."""
    import itertools
    names = world["classnames"]
    decode = L.CatLIPDecode(L.Vocab(names, {c: i for i, c in enumerate(names)}), 32, 4)
    pairs = L.image_batch_pairs(32, 8, lo=16, hi=48, n=5, div=16)  # (16, 32), (32, 8), (48, 3)

    def batches(workers, n=8, start=0, pos=None):
        stream = L.MultiScaleStream(pairs, C.expand_shards(world["train"]), decode, 8, 0, 1, 0, 50, pos, start)
        return list(itertools.islice(C.make_loader(stream, workers, False), n))
    none, two = batches(0), batches(2)
    for step, (a, b) in enumerate(zip(none, two)):
        size, count = L.draw_scale(pairs, 0, step)
        assert a["image"].shape == b["image"].shape == (count, 3, size, size)
        assert a["labels"].shape == (count, 4)
    assert {b["image"].shape[-1] for b in none} == {16, 32, 48}  # seed 0: every size within 8 steps
    position = C.DataPosition()
    for b in two[:3]:
        position.update(b)
    again = batches(2, 5, 3, position.pos)
    assert all(torch.equal(a["image"], b["image"]) and a["__pos__"] == b["__pos__"] for a, b in zip(again, two[3:]))


def test_finetune_from_a_corenet_checkpoint_with_transfer_init(corenet_ckpt, tmp_path, capsys):
    """`finetune --init vit_base.pt --vocab datacomp_1_2B_vocab.pkl --transfer-init` on a CoreNet-layout
    checkpoint: wnid class folders take their head rows; multi-scale batches, RangeAugment; the EMA
    checkpoint keeps CoreNet's layout."""
    import pickle
    from PIL import Image
    sd, path = corenet_ckpt
    (tmp_path / "v.pkl").write_bytes(pickle.dumps({f"n{i}": 100 - i for i in (7, 2084071, 5, 3, 1, 9, 11)}))
    for c, wnid in enumerate(("n02084071", "n00000003", "n00000042")):  # rows 1, 3, none
        os.makedirs(tmp_path / "data" / wnid)
        for j in range(4):
            Image.new("RGB", (40, 32), (60 * c, 40 * j, 90)).save(tmp_path / "data" / wnid / f"{j}.png")
    L.main(["finetune", "--init", path, "--vocab", str(tmp_path / "v.pkl"), "--transfer-init", "--multi-scale",
            "--data", str(tmp_path / "data"), "--val-frac", "0.25", "--image-size", "64", "--epochs", "1",
            "--batch-size", "4", "--workers", "0", "--log-every", "1", "--out", str(tmp_path / "ft")])
    out = capsys.readouterr().out
    assert "Transfer Init of 2/3 classes" in out and "n02084071<-n2084071" in out and "n00000042<-random" in out
    ck = torch.load(C.latest_checkpoint(str(tmp_path / "ft")), weights_only=True)
    assert set(ck["ema"]) == set(sd) and ck["model_name"] == "tiny_corenet" and ck["step"] >= 1
    log = read_log(str(tmp_path / "ft"))
    assert 0 <= log[-1]["top1"] <= 100 and all(r["loss"] == r["loss"] for r in log if "loss" in r)
