"""mobileclip.py end to end on the CPU: it learns, resumes exactly, and fails clearly on bad input."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import common as C
import mobileclip

ROOT = os.path.dirname(os.path.abspath(mobileclip.__file__))
SMALL = ["--synthetic-train", "4000", "--synthetic-val", "300", "--workers", "2", "--log-every", "10",
         "--retrieval-max", "300", "--model", "tiny"]


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return str(tmp_path_factory.mktemp("cache"))


def read_log(out):
    with open(os.path.join(out, "log.jsonl")) as f:
        return [json.loads(line) for line in f]


@pytest.mark.parametrize("model,steps", [("mobileclip_tiny", 300)])
def test_tiny_clip_learns(cache, tmp_path, model, steps):
    """A short run of the main job's model must learn to match held-out images and captions above chance. (The
    world's alt-text names only some attributes, so one caption fits many images and short runs reach R@10 of
    12-20% here; zero-shot classification by shape needs the longer default run: README, "Results".) The plain
    ViT CLIP (`tiny`, common.py's towers) is shown to learn by tests/test_tic.py and tests/test_subclone.py."""
    out = str(tmp_path / "run")
    mobileclip.main(["--cache-dir", cache, "--out", out, "--steps", str(steps), "--batch-size", "64",
                     "--warmup", "20"] + SMALL + ["--model", model])  # the last --model wins
    log = read_log(out)
    final = log[-1]
    assert final["step"] == steps
    assert 0 <= final["zeroshot_top1"] <= 100 and final["zeroshot_top5"] >= final["zeroshot_top1"]
    # seeds 0 / 1 / 2 (--seed): R@10 i2t 11.7 / 19.3 / 9.0, t2i 15.0 / 20.3 / 11.0; loss drop 1.12 / 1.46 / 1.25
    assert final["retrieval_i2t_r10"] > 2 * 10 / 3, final  # 2x chance (10 of 300 candidates: 3.3%)
    assert final["retrieval_t2i_r10"] > 2 * 10 / 3, final
    losses = [r["loss"] for r in log if "loss" in r]
    assert losses[-1] < losses[0] - 0.6
    assert {"config.json", "mobileclip.py", "common.py", "bpe.txt", f"ckpt-{steps}.pt"} <= set(os.listdir(out))


@pytest.mark.parametrize("args,message", [
    (["--model", "vit_huge"], "unknown model 'vit_huge'"),
    (["--data", "/nonexistent/shards"], "data path does not exist"),
    (["--bpe", "/nonexistent/bpe.txt.gz"], "/nonexistent/bpe.txt.gz"),
    (["--batch-size", "0"], "--batch-size 0: must be >= 1"),
    (["--steps", "-5"], "--steps -5: must be >= 0"),
    (["--lr", "nan"], "--lr nan: must be a finite number"),
    (["--workers", "-1"], "--workers -1: must be >= 0"),
    (["--synthetic-prob", "1.5"], "--synthetic-prob 1.5: must be between 0 and 1"),
    (["--lambda-kd", "2"], "--lambda-kd 2.0: must be between 0 and 1"),
    (["--teacher-scales", "100,x"], "--teacher-scales 100,x: comma-separated numbers > 0"),
    (["--mix-synthetic"], "--mix-synthetic needs --reinforced"),
    (["--templates", "BPE"], "every template needs exactly one '{}'"),
    (["--resume", "EMPTY"], "cannot read checkpoint EMPTY: empty file (0 bytes)"),
    (["--resume", "JUNK"], "cannot read checkpoint JUNK: "),
    (["--data", "EMPTY.tar"], "no caption in --data to train a BPE on (skipped: {'broken_tar:ReadError': 1})"),
    (["--data", "EMPTY.tar", "--bpe", "BPE", "--workers", "2"], "no usable sample in a whole pass"),
    (["--init", "EMPTY", "--bpe", "BPE"], "cannot read --init EMPTY: empty file (0 bytes)"),
    (["--init", "JUNK", "--bpe", "BPE", "--model", "mobileclip_tiny"], "cannot read --init JUNK: "),
    (["--init", "BPE", "--bpe", "BPE"], "cannot read --init BPE: "),  # a text file, not TorchScript
    (["reinforce", "--teachers", "EMPTY"], "cannot read teacher checkpoint EMPTY: empty file (0 bytes)"),
    (["reinforce", "--teachers", "JUNK", "--num-augs", "0"], "--num-augs 0: must be >= 1"),
    (["export", "--ckpt", "EMPTY", "--out", "x.pt"], "cannot read checkpoint EMPTY: empty file (0 bytes)"),
    (["export", "--ckpt", "JUNK", "--layout", "onnx", "--out", "x.pt"], "--layout openclip|apple"),
])
def test_bad_input_is_one_clear_line(tmp_path, capsys, args, message):
    """Each bad input: one line, a non-zero exit, no traceback, and no work done (no checkpoint, no step)."""
    files = {"EMPTY": tmp_path / "empty.pt", "JUNK": tmp_path / "junk.pt", "EMPTY.tar": tmp_path / "empty.tar",
             "BPE": tmp_path / "bpe.txt", "x.pt": tmp_path / "x.pt"}
    files["EMPTY"].write_bytes(b"")
    files["EMPTY.tar"].write_bytes(b"")
    files["JUNK"].write_bytes(b"not a checkpoint\n" * 10)
    C.Tokenizer(merges=C.train_bpe(["a photo of a red circle"] * 20, 600)).save(str(files["BPE"]))
    args = [str(files.get(a, a)) for a in args]
    for name in files:  # the placeholders in the message are followed by ':'
        message = message.replace(f" {name}:", f" {files[name]}:")
    out = str(tmp_path / "r")
    command = {"reinforce": ["reinforce", "--out", out], "export": ["export"]}.get(args[0], ["--out", out, "--steps", "1"])
    with pytest.raises(SystemExit) as e:
        mobileclip.main(command + args[1 if args[0] in ("reinforce", "export") else 0:])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code != 0 and err and err[-1].startswith("error:") and "Traceback" not in "\n".join(err)
    assert message in err[-1], err[-1]
    assert not C.checkpoints(out) and steps_logged(out) == {}


@pytest.mark.parametrize("command,own,other", [([], "--teachers", "--layout"), (["train"], "--lambda-kd", "--teachers"),
                                               (["reinforce"], "--num-augs", "--steps"), (["export"], "--layout", "--data")])
def test_help_lists_commands_and_each_commands_own_flags(capsys, command, own, other):
    """`--help`: the commands, one line each; `COMMAND --help`: its own flags only, shared ones once."""
    with pytest.raises(SystemExit) as e:
        mobileclip.main(command + ["--help"])
    out = capsys.readouterr().out
    assert e.value.code == 0 and "Traceback" not in out
    if not command:
        assert [line.split()[0] for line in out.split("commands:")[1].strip().splitlines()] == ["train", "reinforce",
                                                                                                  "export"]
        assert "MobileCLIP2 models (arXiv 2508.20691)." in out  # the docstring's whole first paragraph
        return
    flags = [line.split()[0] for line in out.split("options:")[1].splitlines() if line.startswith("  --")]
    assert own in flags and other not in flags and flags.count("--out") == 1 and len(flags) == len(set(flags))
    assert C.first_paragraph(getattr(mobileclip, command[0]).__doc__) in out


def test_a_second_run_into_a_used_out_stops(tmp_path, capsys):
    """A fresh run into an --out that holds another run's checkpoints stops with one line (--overwrite starts over,
    the earlier files moved aside); each run marks its start in log.jsonl."""
    shard, bpe, out = str(tmp_path / "data.tar"), str(tmp_path / "bpe.txt"), str(tmp_path / "r")
    C.write_shard(shard, [{"__key__": "a", "txt": "a red circle", "png": C.Image.new("RGB", (8, 8))}])
    C.Tokenizer(merges=C.train_bpe(["a photo of a red circle"] * 20, 600)).save(bpe)
    args = ["--out", out, "--data", shard, "--bpe", bpe, "--model", "tiny", "--steps", "0", "--no-eval"]
    os.makedirs(out)
    torch.save({"step": 5}, os.path.join(out, "ckpt-5.pt"))
    with pytest.raises(SystemExit) as e:
        mobileclip.main(args)
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code != 0 and len(err) == 1 and "holds another run's checkpoints (ckpt-5.pt" in err[0]
    mobileclip.main(args + ["--overwrite"])
    assert os.listdir(os.path.join(out, "previous-1")) == ["ckpt-5.pt"] and not C.checkpoints(out)
    assert [r.get("event") for r in read_log(out)] == ["start"]


def test_checkpoint_of_another_model_is_refused(cache, tmp_path, capsys):
    out = str(tmp_path / "r")
    os.makedirs(out)
    torch.save({"model": {}, "model_name": "vit_b16", "step": 3}, os.path.join(out, "ckpt-3.pt"))
    with pytest.raises(SystemExit):
        mobileclip.main(["--cache-dir", cache, "--out", out, "--resume", "auto", "--steps", "5"] + SMALL)
    assert "is of model 'vit_b16', not --model tiny" in capsys.readouterr().err


def steps_logged(out):
    """{step: loss} of the training records in OUT/log.jsonl (start records and evaluations have no loss)."""
    if not os.path.exists(os.path.join(out, "log.jsonl")):
        return {}
    return {r["step"]: r["loss"] for r in read_log(out) if "loss" in r}


@pytest.mark.usefixtures("one_thread")  # the same arithmetic in this process and in the child (OMP_NUM_THREADS=1)
def test_stop_signal_to_the_group_saves_and_resume_matches(tmp_path, signal_script):
    """A scheduler's SIGTERM to the whole process group (a DataLoader worker included) after step 6: the run saves a
    checkpoint at the step it reached and exits 0; --resume auto then logs the losses of a run that never stopped and
    ends with the same weights and data position."""
    bpe = str(tmp_path / "bpe.txt")
    C.Tokenizer(merges=C.train_bpe(["a photo of a red circle", "a blue star on a plain background"] * 20, 600)).save(bpe)
    args = ["--cache-dir", str(tmp_path / "cache"), "--steps", "12", "--batch-size", "8", "--ckpt-every", "1000",
            "--bpe", bpe, "--no-eval", "--synthetic-train", "300", "--synthetic-val", "60", "--workers", "1",
            "--log-every", "1", "--model", "tiny", "--shuffle-buffer", "100"]
    ref, out = str(tmp_path / "ref"), str(tmp_path / "run")
    mobileclip.main(args + ["--out", ref])
    proc = subprocess.Popen([sys.executable, signal_script("mobileclip", 6), *args, "--out", out], cwd=ROOT,
                            stdout=open(out + ".txt", "w"), stderr=subprocess.STDOUT, start_new_session=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.wait(timeout=600) == 0, open(out + ".txt").read()
    assert C.checkpoints(out) == [os.path.join(out, "ckpt-6.pt")] and max(steps_logged(out)) == 6
    mobileclip.main(args + ["--out", out, "--resume", "auto"])
    got, expect = steps_logged(out), steps_logged(ref)
    assert sorted(got) == list(range(1, 13)) and got == expect, (got, expect)
    wa, wb = (torch.load(os.path.join(d, "ckpt-12.pt"), weights_only=True) for d in (ref, out))
    assert wa["data"] == wb["data"] and all(torch.equal(wa["model"][k], wb["model"][k]) for k in wa["model"])


def test_init_from_openclip_layout_and_eval_only(cache, tmp_path):
    """--init takes an OpenCLIP-layout state dict (here: exported from a tiny model) and --eval-only runs."""
    bpe = str(tmp_path / "bpe.txt")
    C.Tokenizer(merges=C.train_bpe(["a photo of a red circle", "a blue star on a plain background"] * 20, 600)).save(bpe)
    vocab = C.Tokenizer(bpe).vocab_size
    model = C.build_clip(**mobileclip.MODELS["tiny"], vocab_size=vocab)
    torch.save(C.ours_to_openclip(model.state_dict()), tmp_path / "init.pt")
    out = str(tmp_path / "r")
    mobileclip.main(["--cache-dir", cache, "--out", out, "--init", str(tmp_path / "init.pt"), "--bpe", bpe,
                     "--eval-only"] + SMALL)
    assert "zeroshot_top1" in read_log(out)[-1]


def test_zeroshot_as_openclip_with_the_80_templates(tmp_path, monkeypatch):
    """`--eval-only --zeroshot-data DIR --classnames FILE --templates openai` (the README's ImageNet command) on a tiny
    ImageFolder: the classifier is, per class, the renormalised mean of the 80 OpenAI prompts' normalised text
    embeddings (brute force: one prompt at a time), the images are OpenCLIP's eval transform of the files (shorter
    side to the model's size with its filter, centre crop; written out here with PIL), and no synthetic world is made."""
    rng, root, names = np.random.default_rng(0), tmp_path / "val", ["tench", "great white shark"]
    for folder in ("n01440764", "n01484850"):
        os.makedirs(root / folder)
        for i, (w, h) in enumerate([(90, 70), (64, 101)]):
            Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(root / folder / f"{i}.png")
    (tmp_path / "classes.txt").write_text("\n".join(names) + "\n")
    bpe = str(tmp_path / "bpe.txt")
    C.Tokenizer(merges=C.train_bpe([t.format(n) for t in C.OPENAI_IMAGENET_TEMPLATES for n in names], 600)).save(bpe)
    tok = C.Tokenizer(bpe)
    init = str(tmp_path / "tiny.pt")  # random weights in ml-mobileclip's layout
    torch.save(mobileclip.export_state_dict(mobileclip.create_model("mobileclip_tiny", vocab_size=tok.vocab_size),
                                            "apple"), init)
    seen, classifier, images = {}, C.zeroshot_classifier, C.eval_images
    monkeypatch.setattr(C, "zeroshot_classifier", lambda m, t, n, templates, *a: seen.setdefault(
        "clf", (templates, classifier(m, t, n, templates, *a)))[1])
    monkeypatch.setattr(C, "eval_images", lambda *a: seen.setdefault("x", images(*a)))
    mobileclip.main(["--eval-only", "--model", "mobileclip_tiny", "--init", init, "--bpe", bpe, "--zeroshot-data",
                     str(root), "--classnames", str(tmp_path / "classes.txt"), "--templates", "openai", "--out",
                     str(tmp_path / "r"), "--cache-dir", str(tmp_path / "cache")])
    assert not os.path.exists(tmp_path / "cache") and seen["clf"][0] == C.OPENAI_IMAGENET_TEMPLATES
    model, spec = mobileclip.create_model("mobileclip_tiny", init, tok.vocab_size).eval(), mobileclip.MOBILECLIP_MODELS[
        "mobileclip_tiny"]
    S, pixels = spec["image_size"], []
    with torch.no_grad():
        prompts = [[t.format(n) for t in C.OPENAI_IMAGENET_TEMPLATES] for n in names]  # (classes, 80)
        clf = torch.stack([F.normalize(F.normalize(model.encode_text(tok(p, 32)), dim=-1).mean(0), dim=0)
                           for p in prompts], dim=1)  # (E, classes)
        torch.testing.assert_close(seen["clf"][1], clf, atol=2e-5, rtol=1e-4)
        for folder in sorted(os.listdir(root)):
            for f in sorted(os.listdir(root / folder)):
                img = Image.open(root / folder / f).convert("RGB")
                w, h = img.size  # torchvision's Resize(S) of a PIL image, then CenterCrop(S)
                w, h = (S, int(S * h / w)) if w <= h else (int(S * w / h), S)
                top, left = int(round((h - S) / 2)), int(round((w - S) / 2))
                img = img.resize((w, h), Image.BILINEAR).crop((left, top, left + S, top + S))
                pixels.append(torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1))
        assert spec["interpolation"] == "bilinear" and torch.equal(seen["x"], torch.stack(pixels))
        pred = (F.normalize(model.encode_image(seen["x"].float() / 255), dim=-1) @ clf).argmax(1)
    top1 = 100 * (pred == torch.arange(2).repeat_interleave(2)).float().mean().item()
    assert read_log(str(tmp_path / "r"))[-1]["zeroshot_top1"] == pytest.approx(top1)
