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
    with the same weights, EMA and data position at step 8."""
    import subprocess
    import sys
    cache, a, b = os.path.dirname(world["root"]), str(tmp_path / "a"), str(tmp_path / "b")
    args = ["--cache-dir", cache, "--image-size", "32", "--steps", "8", "--ckpt-every", "100", "--keep-ckpts", "5",
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
    ("finetune", "--transfer-init", "--max-labels"), ("compare", "--linear-probe", "--vocab")])
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
