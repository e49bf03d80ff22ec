"""samclip.py on the CPU: SAM ViT-B parameter counts and the official key layout (built without weights),
fused attention against its reference, the RLE decoder against hand-made masks, focal and dice losses against
naive versions, prompts and pre/post-processing, and a tiny SAM -> stage I -> stage II pipeline that learns."""

import json
import math
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import common as C
import samclip as S

# ---- the official sam_vit_b_01ec64.pth layout (spec 2.1): name -> shape --------------------------------


def _block(i, rel):
    p = f"image_encoder.blocks.{i}."
    return {p + "norm1.weight": (768,), p + "norm1.bias": (768,), p + "attn.rel_pos_h": (rel, 64),
            p + "attn.rel_pos_w": (rel, 64), p + "attn.qkv.weight": (2304, 768), p + "attn.qkv.bias": (2304,),
            p + "attn.proj.weight": (768, 768), p + "attn.proj.bias": (768,), p + "norm2.weight": (768,),
            p + "norm2.bias": (768,), p + "mlp.lin1.weight": (3072, 768), p + "mlp.lin1.bias": (3072,),
            p + "mlp.lin2.weight": (768, 3072), p + "mlp.lin2.bias": (768,)}


def _attn(p, inner):
    return {f"{p}.{n}_proj.weight": (inner, 256) for n in "qkv"} | {f"{p}.{n}_proj.bias": (inner,) for n in "qkv"} | \
        {f"{p}.out_proj.weight": (256, inner), f"{p}.out_proj.bias": (256,)}


def official_vit_b_keys() -> dict:
    keys = {"image_encoder.pos_embed": (1, 64, 64, 768), "image_encoder.patch_embed.proj.weight": (768, 3, 16, 16),
            "image_encoder.patch_embed.proj.bias": (768,), "image_encoder.neck.0.weight": (256, 768, 1, 1),
            "image_encoder.neck.1.weight": (256,), "image_encoder.neck.1.bias": (256,),
            "image_encoder.neck.2.weight": (256, 256, 3, 3), "image_encoder.neck.3.weight": (256,),
            "image_encoder.neck.3.bias": (256,)}
    for i in range(12):
        keys |= _block(i, 127 if i in (2, 5, 8, 11) else 27)
    pe = "prompt_encoder."
    keys |= {pe + "pe_layer.positional_encoding_gaussian_matrix": (2, 128), pe + "not_a_point_embed.weight": (1, 256),
             pe + "no_mask_embed.weight": (1, 256), pe + "mask_downscaling.0.weight": (4, 1, 2, 2),
             pe + "mask_downscaling.0.bias": (4,), pe + "mask_downscaling.1.weight": (4,),
             pe + "mask_downscaling.1.bias": (4,), pe + "mask_downscaling.3.weight": (16, 4, 2, 2),
             pe + "mask_downscaling.3.bias": (16,), pe + "mask_downscaling.4.weight": (16,),
             pe + "mask_downscaling.4.bias": (16,), pe + "mask_downscaling.6.weight": (256, 16, 1, 1),
             pe + "mask_downscaling.6.bias": (256,)}
    keys |= {f"{pe}point_embeddings.{i}.weight": (1, 256) for i in range(4)}
    md = "mask_decoder."
    for i in range(2):
        p = f"{md}transformer.layers.{i}."
        keys |= _attn(p + "self_attn", 256) | _attn(p + "cross_attn_token_to_image", 128) | \
            _attn(p + "cross_attn_image_to_token", 128)
        keys |= {f"{p}norm{j}.{w}": (256,) for j in range(1, 5) for w in ("weight", "bias")}
        keys |= {p + "mlp.lin1.weight": (2048, 256), p + "mlp.lin1.bias": (2048,), p + "mlp.lin2.weight": (256, 2048),
                 p + "mlp.lin2.bias": (256,)}
    keys |= _attn(md + "transformer.final_attn_token_to_image", 128)
    keys |= {md + "transformer.norm_final_attn.weight": (256,), md + "transformer.norm_final_attn.bias": (256,),
             md + "iou_token.weight": (1, 256), md + "mask_tokens.weight": (4, 256),
             md + "output_upscaling.0.weight": (256, 64, 2, 2), md + "output_upscaling.0.bias": (64,),
             md + "output_upscaling.1.weight": (64,), md + "output_upscaling.1.bias": (64,),
             md + "output_upscaling.3.weight": (64, 32, 2, 2), md + "output_upscaling.3.bias": (32,)}
    for i in range(4):
        for j, (o, n) in enumerate(((256, 256), (256, 256), (32, 256))):
            keys |= {f"{md}output_hypernetworks_mlps.{i}.layers.{j}.weight": (o, n),
                     f"{md}output_hypernetworks_mlps.{i}.layers.{j}.bias": (o,)}
    for j, (o, n) in enumerate(((256, 256), (256, 256), (4, 256))):
        keys |= {f"{md}iou_prediction_head.layers.{j}.weight": (o, n), f"{md}iou_prediction_head.layers.{j}.bias": (o,)}
    return keys


@pytest.fixture(scope="module")
def vit_b():
    with torch.device("meta"):  # shapes only: no memory, no init time
        return S.build_sam("vit_b")


def count(m):
    return sum(p.numel() for p in m.parameters())


def test_vit_b_parameter_counts(vit_b):
    enc = vit_b.image_encoder
    assert count(vit_b) == 93_735_472
    assert (count(enc), count(vit_b.prompt_encoder), count(vit_b.mask_decoder)) == (89_670_912, 6_220, 4_058_340)
    assert count(vit_b.mask_decoder.transformer) == 3_291_264
    assert (count(enc.blocks[0]), count(enc.blocks[2]), count(enc.blocks)) == (7_091_328, 7_104_128, 85_147_136)
    assert (count(enc.patch_embed), enc.pos_embed.numel(), count(enc.neck)) == (590_592, 3_145_728, 787_456)
    assert vit_b.prompt_encoder.pe_layer.positional_encoding_gaussian_matrix.numel() == 256  # a buffer


def test_vit_b_state_dict_is_the_official_layout(vit_b):
    sd = {k: tuple(v.shape) for k, v in vit_b.state_dict().items()}
    official = official_vit_b_keys()
    assert len(official) == 314
    assert sorted(set(official) - set(sd)) == [] and sorted(set(sd) - set(official)) == []  # no pixel_mean/std
    assert {k: v for k, v in sd.items() if official[k] != v} == {}


def test_clip_head_is_three_copies_of_the_last_block(vit_b):
    m = S.build_sam("tiny").add_clip_head(32)
    last = m.image_encoder.blocks[-1].state_dict()
    for blk in m.clip_head.blocks:
        assert all(torch.equal(v, last[k]) for k, v in blk.state_dict().items())
    with torch.device("meta"):
        head = S.build_sam("vit_b").add_clip_head(768).clip_head
    assert count(head.blocks) == 21_312_384  # ~25% of ViT-B, as the paper says


def test_load_sam_strict_and_predict_prompts(tmp_path):
    """An official-style flat state dict loads strictly (a missing key fails in one line); points, a box and
    a mask prompt go through SAM's resize-longest-side / pad / crop pipeline to the original size."""
    torch.manual_seed(0)
    sd = S.build_sam("tiny").state_dict()
    torch.save(sd, tmp_path / "sam_tiny.pth")
    sam = S.load_sam(str(tmp_path / "sam_tiny.pth"))
    assert all(torch.equal(v, sam.state_dict()[k]) for k, v in sd.items())
    img = Image.fromarray(np.random.default_rng(0).integers(0, 255, (30, 50, 3), dtype=np.uint8))
    masks, iou, low = S.predict_masks(sam, img, [[10, 12], [40, 5]], [1, 0])
    assert masks.shape == (3, 30, 50) and masks.dtype == torch.bool and iou.shape == (3,) and low.shape == (1, 3, 32, 32)
    masks, iou, _ = S.predict_masks(sam, img, box=[5, 5, 30, 25], mask_input=low[:, :1], multimask=False)
    assert masks.shape == (1, 30, 50)
    bad = dict(sd)
    bad.pop("mask_decoder.iou_token.weight")
    torch.save(bad, tmp_path / "bad.pth")
    with pytest.raises(SystemExit):
        S.load_sam(str(tmp_path / "bad.pth"))


def test_prompt_tokens_match_the_official_forward():
    """Training prompts as token pairs (pad=False: points and boxes 2 tokens each, mixed in one batch) equal
    PromptEncoder.forward's own padding and box corners."""
    torch.manual_seed(0)
    pe = S.build_sam("tiny").prompt_encoder
    for e in [*pe.point_embeddings, pe.not_a_point_embed]:
        torch.nn.init.normal_(e.weight)
    pts = torch.tensor([[[10.0, 20.0]]])
    sparse, _ = pe((pts, torch.tensor([[1]])))
    tok = pe.embed_points(torch.tensor([[[10.0, 20.0], [0, 0]]]), torch.tensor([[1, -1]]))
    torch.testing.assert_close(sparse, tok)
    assert torch.equal(tok[0, 1], pe.not_a_point_embed.weight[0])
    box = torch.tensor([[3.0, 4.0, 30.0, 40.0]])
    torch.testing.assert_close(pe(boxes=box)[0], pe.embed_points(box.view(1, 2, 2), torch.tensor([[2, 3]])))


def test_fused_attention_matches_reference():
    torch.manual_seed(0)
    m = S.build_sam("tiny").double()
    for p in m.parameters():  # non-zero relative position tables
        torch.nn.init.normal_(p, std=0.2) if p.ndim == 2 else None
    x = torch.randn(2, 3, 48, 48, dtype=torch.float64)  # 6 x 6 grid: windows padded, tables resampled
    fused = m.image_encoder(x)
    for mod in m.modules():
        if isinstance(mod, (S.EncoderAttention, S.DecoderAttention)):
            mod.fused = False
    torch.testing.assert_close(fused, m.image_encoder(x))


def test_window_partition_round_trip_and_rel_pos_lookup():
    x = torch.randn(2, 9, 7, 5)
    w, padded = S.window_partition(x, 4)
    assert w.shape == (2 * 3 * 2, 4, 4, 5) and padded == (12, 8)
    assert torch.equal(S.window_unpartition(w, 4, padded, (9, 7)), x)
    table = torch.arange(7.0)[:, None].expand(7, 2)  # 2S - 1 rows for S = 4: row = offset + 3
    r = S.rel_pos_lookup(4, 4, table)
    assert torch.equal(r[..., 0], torch.arange(4.0)[:, None] - torch.arange(4.0)[None] + 3)


# ---- COCO RLE (SA-1B) ------------------------------------------------------------------------------------


def rle_encode(mask: np.ndarray) -> dict:
    """The inverse of samclip.rle_decode: a mask -> COCO compressed RLE (to write SA-1B-layout data)."""
    flat = np.asarray(mask, np.uint8).T.reshape(-1)  # column-major
    bounds = np.concatenate([[0], np.flatnonzero(flat[1:] != flat[:-1]) + 1, [flat.size]])
    counts = ([0] if flat.size and flat[0] else []) + np.diff(bounds).tolist()  # runs start with 0s
    s = []
    for i, c in enumerate(counts):
        x = c - counts[i - 2] if i > 2 else c
        while True:
            g, x = x & 0x1F, x >> 5
            more = not ((x == 0 and not g & 0x10) or (x == -1 and g & 0x10))
            s.append(chr(48 + (g | 0x20 if more else g)))
            if not more:
                break
    return {"size": [int(mask.shape[0]), int(mask.shape[1])], "counts": "".join(s)}


def test_rle_decoder_on_hand_made_masks():
    # column-major runs starting with 0s: [[0, 1, 1], [0, 1, 0]] reads 0 0 | 1 1 | 1 0 -> runs 2, 3, 1
    m = np.array([[0, 1, 1], [0, 1, 0]], np.uint8)
    assert (S.rle_decode({"size": [2, 3], "counts": [2, 3, 1]}) == m).all()
    assert S.rle_counts("231") == [2, 3, 1] and (S.rle_decode({"size": [2, 3], "counts": "231"}) == m).all()
    # 16 needs a continuation group ('`' = 48 + (16 | 0x20)) because its bit 0x10 would read as a sign
    assert S.rle_counts("0`0") == [0, 16]
    assert (S.rle_decode({"size": [4, 4], "counts": "0`0"}) == 1).all()
    # from the fourth run on, the difference to the run two before is stored, here negative: 2 - 5 = -3 -> 'M'
    assert S.rle_counts("12:1") == [1, 2, 10, 3] and S.rle_counts("151M") == [1, 5, 1, 2]
    assert rle_encode(S.rle_decode({"size": [3, 3], "counts": [1, 5, 1, 2]}))["counts"] == "151M"
    rng = np.random.default_rng(0)
    for _ in range(50):
        mask = rng.random((rng.integers(1, 12), rng.integers(1, 12))) < rng.random()
        assert (S.rle_decode(rle_encode(mask)) == mask).all()
    with pytest.raises(ValueError):
        S.rle_decode({"size": [3, 3], "counts": [2, 3]})


def test_sa1b_layout_reader(tmp_path):
    """A tar of SA-1B's layout (sa_N.jpg + sa_N.json with RLE annotations) decodes to masks and prompts."""
    h, w = 40, 60
    m1, m2 = np.zeros((h, w), np.uint8), np.zeros((h, w), np.uint8)
    m1[6:20, 10:30], m2[24:38, 40:58] = 1, 1  # 14 x 20 and 14 x 18
    meta = {"image": {"image_id": 1, "width": w, "height": h, "file_name": "sa_1.jpg"},
            "annotations": [{"id": i, "segmentation": rle_encode(m), "bbox": [0, 0, 1, 1], "area": int(m.sum())}
                            for i, m in enumerate((m1, m2))]}
    img = Image.fromarray(np.full((h, w, 3), 128, np.uint8))
    C.write_shard(str(tmp_path / "sa_000000.tar"), [{"__key__": "sa_1", "jpg": img, "json": meta}])
    sample = next(C.iter_tar_samples(str(tmp_path / "sa_000000.tar"), {}))
    out = S.sam_decode(sample, 30, 2, 0, 0.5)
    assert out["image"].shape == (3, 30, 30) and out["hw"].tolist() == [20, 30]
    assert sorted(out["masks"].flatten(1).sum(1).tolist()) == [63, 70]  # both masks, sides halved (nearest)
    for c, lab, m in zip(out["coords"], out["labels"], out["masks"]):
        if lab[0] == 1:  # a point prompt lies inside its mask
            assert m[int(c[0, 1]), int(c[0, 0])] == 1 and lab[1] == -1
        else:
            assert lab.tolist() == [2, 3]


# ---- losses ----------------------------------------------------------------------------------------------


def focal_dice_reference(logits, target, alpha=0.25, gamma=2.0, eps=1.0):
    """focal_loss and dice_loss pixel by pixel in float64 Python arithmetic: (N, H, W) -> (focal (N,), dice (N,))."""
    focal, dice = [], []
    for x_map, t_map in zip(logits.double().tolist(), target.double().tolist()):
        ps, ts = [1 / (1 + math.exp(-x)) for x in sum(x_map, [])], sum(t_map, [])
        terms = [(alpha * t + (1 - alpha) * (1 - t)) * -(t * math.log(p) + (1 - t) * math.log(1 - p))  # a_t * CE
                 * (1 - (p * t + (1 - p) * (1 - t))) ** gamma for p, t in zip(ps, ts)]  # * (1 - p_t)^gamma
        focal.append(sum(terms) / len(terms))
        dice.append(1 - (2 * sum(p * t for p, t in zip(ps, ts)) + eps) / (sum(ps) + sum(ts) + eps))
    return torch.tensor(focal, dtype=torch.float64), torch.tensor(dice, dtype=torch.float64)


def test_focal_and_dice_match_naive_versions():
    torch.manual_seed(0)
    logits = torch.randn(5, 6, 7, dtype=torch.float64) * 3
    for target in ((torch.rand(5, 6, 7) > 0.6).double(), torch.rand(5, 6, 7, dtype=torch.float64)):  # hard, soft
        focal, dice = focal_dice_reference(logits, target)
        torch.testing.assert_close(S.focal_loss(logits, target).double(), focal)
        torch.testing.assert_close(S.dice_loss(logits, target).double(), dice)
    # a confident, correct prediction costs almost nothing; the focal term down-weights it further than BCE
    t = torch.zeros(1, 4, 4)
    t[0, :2] = 1
    good = (t * 2 - 1) * 8
    assert S.dice_loss(good, t) < 0.01 and S.focal_loss(good, t) < 1e-6 < F.binary_cross_entropy_with_logits(good, t)


def test_sam_distill_loss_is_zero_only_for_the_teacher():
    torch.manual_seed(0)
    t_masks, t_iou = torch.randn(3, 4, 8, 8).sign() * 20, torch.rand(3, 4)  # a confident teacher
    same = S.sam_distill_loss(t_masks, t_iou, t_masks, t_iou)
    other = S.sam_distill_loss(-t_masks, t_iou, t_masks, t_iou)
    assert same < 0.01 < other
    torch.testing.assert_close(S.cosine_distill_loss(torch.ones(2, 3), torch.ones(2, 3) * 5), torch.tensor(0.0))


# ---- the tiny pipeline on the synthetic world: train-sam -> stage I -> stage II -> eval / segment -------


def read_log(out):
    with open(os.path.join(out, "log.jsonl")) as f:
        return [r for r in map(json.loads, f) if "step" in r]  # each run's start record has no step


@pytest.fixture(scope="module")
def clip_teacher(tmp_path_factory):
    """A random tiny ViT CLIP saved as mobileclip.py saves its runs (bpe.txt beside the checkpoint)."""
    import mobileclip
    d = tmp_path_factory.mktemp("teacher")
    C.Tokenizer(merges=C.train_bpe(["a photo of a red circle", "a blue star on a plain background"] * 20, 600)).save(
        str(d / "bpe.txt"))
    vocab = C.Tokenizer(str(d / "bpe.txt")).vocab_size
    torch.manual_seed(0)
    model = C.build_clip(**mobileclip.MODELS["tiny"], vocab_size=vocab)
    torch.save({"model_name": "tiny", "model": model.state_dict(), "vocab_size": vocab, "config": {"act": "gelu"}},
               d / "ckpt-1.pt")
    return str(d / "ckpt-1.pt")


def world_args(world):
    return ["--cache-dir", os.path.dirname(world["root"]), "--synthetic-train", "2000", "--synthetic-val", "200",
            "--synthetic-size", "32", "--workers", "0"]


@pytest.fixture(scope="module")
def tiny_sam(world, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("sam"))
    S.main(["train-sam", "--model", "micro", "--out", out, "--steps", "80", "--batch-size", "16", "--lr", "3e-3",
            "--warmup", "5", "--log-every", "10", "--box-prob", "1"] + world_args(world))
    return out


def test_train_sam_learns(tiny_sam):
    """The SAM of the tests learns the world's masks from box prompts: the IoU starts at the level of a
    mask covering everything (~0.15) and passes 0.3 in 80 steps (about 0.43; point prompts need longer)."""
    log = read_log(tiny_sam)
    assert log[0]["mask_iou"] < 0.2 and log[-1]["mask_iou"] > 0.3 and log[-1]["loss"] < 0.8 * log[0]["loss"], log


def test_stage1_stage2_stage3_pipeline(world, tiny_sam, clip_teacher, tmp_path, monkeypatch):
    """Stage I moves the pooled CLIP head towards the teacher with the backbone untouched; stage II trains
    both losses from it and keeps the SAM head near the frozen SAM's; stage III trains the CLIP head alone;
    `eval` reads every benchmark layout and `segment --refine` runs both heads from one backbone pass."""
    s1, s2, s3 = str(tmp_path / "s1"), str(tmp_path / "s2"), str(tmp_path / "s3")
    common = ["--teacher-clip", clip_teacher, "--init-sam", tiny_sam, "--clip-sizes", "32", "--batch-clip", "16",
              "--log-every", "5", "--eval-max", "20", "--warmup", "3"] + world_args(world)
    S.main(["--stage", "1", "--out", s1, "--steps", "10", "--lr", "3e-3", "--no-eval"] + common)
    log = read_log(s1)
    losses = [r["l_clip"] for r in log if "l_clip" in r]
    assert losses[-1] < 0.7 * losses[0], losses
    ck = torch.load(os.path.join(s1, "ckpt-10.pt"), weights_only=True)
    sam = S.load_sam(tiny_sam)
    assert all(torch.equal(v, ck["model"][k]) for k, v in sam.state_dict().items())  # frozen in stage I
    S.main(["--stage", "2", "--init", s1, "--out", s2, "--steps", "4", "--batch-sam", "4"] + common + ["--log-every", "2"])
    log = read_log(s2)
    assert all(np.isfinite(r["l_sam"]) for r in log if "l_sam" in r)
    final = log[-1]
    assert abs(final["sam_head_iou"] - final["sam_teacher_iou"]) < 10 and 0 <= final["seg_miou"] <= 100
    assert final["seg_chance_miou"] < 20
    assert 0 <= final["seg_calibrated_miou"] <= 100 and 0 <= final["seg_objects_miou"] <= 100
    # stage III: the CLIP head alone from stage II, at --init's sizes and SAM's; backbone and SAM head frozen
    S.main(["--stage", "3", "--init", s2, "--out", s3, "--steps", "3", "--no-eval"] + common[:2] + common[6:])
    ck2, ck3 = (torch.load(C.latest_checkpoint(d), weights_only=True) for d in (s2, s3))
    assert ck3["stage"] == 3 and ck3["clip_sizes"] == [32]
    changed = {k for k, v in ck3["model"].items() if not torch.equal(v, ck2["model"][k])}
    assert changed and all(k.startswith("clip_head.") for k in changed)
    # the benchmarks' readers end to end: an ADE20K-layout folder, an ImageFolder, a COCO instances JSON
    root = write_seg_folder(tmp_path / "ade", "ade", n=2)
    (tmp_path / "names.txt").write_text("circle\nstar\nsquare\n")
    res = S.main(["eval", "--init", s3, "--dataset", "ade", "--data", str(root), "--classnames", str(tmp_path / "names.txt"),
                  "--zeroshot-data", str(write_image_folder(tmp_path / "zs")), "--coco-instances",
                  str(write_coco(tmp_path / "coco")), "--coco-images", str(tmp_path / "coco"), "--templates", "default"])
    assert 0 <= res["miou"] <= 100 and 0 <= res["zeroshot_top1"] <= 100 and 0 <= res["coco_box_miou"] <= 100, res
    # App. C from one backbone pass, the 80 OpenAI templates by default
    img, calls, n_templates = str(tmp_path / "x.png"), [], []
    Image.fromarray(np.zeros((32, 40, 3), np.uint8)).save(img)
    forward_tokens, classifier = S.ImageEncoderViT.forward_tokens, C.zeroshot_classifier
    monkeypatch.setattr(S.ImageEncoderViT, "forward_tokens", lambda self, x: calls.append(x.shape) or forward_tokens(self, x))
    monkeypatch.setattr(C, "zeroshot_classifier", lambda *a: n_templates.append(len(a[3])) or classifier(*a))
    S.main(["segment", "--init", s3, "--image", img, "--classes", "circle,star", "--out", str(tmp_path / "seg.png"),
            "--refine"])
    assert calls == [(1, 3, 32, 32)] and n_templates == [80]
    assert Image.open(tmp_path / "seg.png").size == (40, 32)
    assert set(json.load(open(tmp_path / "seg.json"))["classes"]) == {"background", "circle", "star"}


@pytest.fixture(scope="module")
def bad_files(tmp_path_factory):
    d = tmp_path_factory.mktemp("bad")
    (d / "garbage").write_bytes(b"not a checkpoint" * 10)
    (d / "empty").write_bytes(b"")
    (d / "empty.tar").write_bytes(b"")
    torch.save(S.build_sam("micro").state_dict(), d / "sam.pth")
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(d / "x.png")
    return d


@pytest.mark.parametrize("args,message", [
    (["--stage", "4"], "--stage must be 1, 2 or 3"),
    (["--templates", "{garbage}"], "every template needs exactly one '{}'"),
    (["--stage", "1", "--teacher-clip", "/nonexistent.pt"], "teacher checkpoint not found"),
    (["--stage", "1", "--teacher-clip", "{empty}"], "empty file (0 bytes)"),  # mobileclip.load_teacher's line
    (["--stage", "1", "--teacher-clip", "{teacher}", "--init-sam", "{empty}"], "empty file (0 bytes)"),
    (["--stage", "1", "--teacher-clip", "{teacher}", "--init-sam", "{garbage}"], "cannot read checkpoint"),
    (["--stage", "2", "--teacher-clip", "{teacher}", "--init-sam", "{sam}", "--init", "{garbage}"],
     "cannot read checkpoint"),
    (["--resume", "{empty}"], "empty file (0 bytes)"),
    (["--batch-clip", "0"], "--batch-clip 0: must be >= 1"),
    (["--steps", "-5"], "--steps -5: must be >= 0"),
    (["--lr", "-1"], "--lr -1.0: must be >= 0"),
    (["--workers", "-1"], "--workers -1: must be >= 0"),
    (["--crop-scale", "1.5"], "--crop-scale 1.5: must be between 0 and 1"),
    (["train-sam", "--batch-size", "0"], "--batch-size 0: must be >= 1"),
    (["train-sam", "--steps", "-5"], "--steps -5: must be >= 0"),
    (["train-sam", "--box-prob", "2"], "--box-prob 2.0: must be between 0 and 1"),
    (["train-sam", "--resume", "{empty}"], "empty file (0 bytes)"),
    (["train-sam", "--data", "/nonexistent/shards"], "data path does not exist"),
    (["train-sam", "--data", "{empty}.tar", "--model", "micro", "--workers", "0"],
     "no usable sample in a whole pass of data consumer 1 of 1 over 1 shard(s)"),
    (["train-sam", "--data", "{empty}.tar", "--model", "micro", "--workers", "0"], "skipped: broken_tar:ReadError 1"),
    (["train-sam", "--data", "{empty}.tar", "--model", "micro", "--workers", "1"], "skipped: broken_tar:ReadError 1"),
    (["predict", "--init", "/nonexistent.pth", "--image", "{image}", "--point", "1,1"], "checkpoint not found"),
    (["predict", "--init", "{empty}", "--image", "{image}", "--point", "1,1"], "empty file (0 bytes)"),
    (["predict", "--init", "{sam}", "--image", "{garbage}", "--point", "1,1"], "cannot read image"),
    (["predict", "--init", "{sam}", "--image", "{image}", "--mask-input", "{empty}"], "cannot read --mask-input"),
    (["segment", "--classes", "cat", "--init", "", "--image", "{image}"], "needs --init"),
    (["segment", "--classes", "cat", "--init", "{empty}", "--image", "{image}"], "empty file (0 bytes)"),
    (["segment", "--classes", "cat", "--init", "{sam}", "--image", "{image}", "--refine-threshold", "2"],
     "--refine-threshold 2.0: must be between 0 and 1"),
    (["eval", "--init", "{garbage}"], "cannot read checkpoint"),
    (["eval", "--init", "{sam}", "--size", "-1"], "--size -1: must be >= 0"),
    (["eval", "--init", "{sam}", "--dataset", "kitti", "--data", "x"], "--dataset is one of voc, context"),
    (["eval", "--init", "{sam}", "--dataset", "ade", "--data", "x"], "--dataset ade needs --classnames"),
])
def test_bad_input_is_one_clear_line(tmp_path, capsys, clip_teacher, bad_files, args, message):
    """Before any work, one line and a non-zero exit: no traceback, no checkpoint in --out."""
    args = [a.format(empty=bad_files / "empty", garbage=bad_files / "garbage", sam=bad_files / "sam.pth",
                     image=bad_files / "x.png", teacher=clip_teacher) for a in args]
    with pytest.raises(SystemExit) as e:
        S.main(args + (["--out", str(tmp_path / "r")] if args[0] == "train-sam" or args[0].startswith("-") else []))
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code != 0 and err and message in err[-1] and err[-1].startswith("error:"), err
    assert not any("Traceback" in line for line in err) and not C.checkpoints(str(tmp_path / "r"))


def test_a_new_run_into_another_runs_checkpoints_stops_with_one_line(tmp_path, capsys):
    C.save_checkpoint(str(tmp_path / "ckpt-5.pt"), {"step": 5})
    for cmd in ([], ["train-sam"]):
        with pytest.raises(SystemExit) as e:
            S.main(cmd + ["--out", str(tmp_path)])
        err = capsys.readouterr().err.strip().splitlines()
        assert e.value.code != 0 and len(err) == 1 and "holds another run's checkpoints (ckpt-5.pt" in err[0]


COMMANDS = {"merge": ("--lambda-sam", "--batch-size"), "train-sam": ("--batch-size", "--lambda-sam"),
            "predict": ("--neg-point", "--classes"), "segment": ("--classes", "--dataset"), "eval": ("--dataset", "--neg-point")}


@pytest.mark.parametrize("cmd", COMMANDS)
def test_help_of_each_command_shows_its_own_flags(cmd, capsys):
    own, other = COMMANDS[cmd]
    with pytest.raises(SystemExit) as e:
        S.main([cmd, "--help"])
    out = capsys.readouterr().out
    fn = {"merge": S.merge, "train-sam": S.train_sam, "predict": S.predict_main, "segment": S.segment_main,
          "eval": S.eval_main}[cmd]
    assert e.value.code == 0 and own in out and other not in out and ("--overwrite" in out) == (cmd in ("merge",
                                                                                                    "train-sam"))
    assert " ".join(fn.__doc__.split("\n\n")[0].split()) in " ".join(out.split())  # the whole first paragraph


def test_help_lists_the_commands(capsys):
    """`samclip.py --help` exits 0 and lists every command with its line (tests/test_cli.py runs it as a process)."""
    with pytest.raises(SystemExit) as e:
        S.main(["--help"])
    out = capsys.readouterr().out
    assert e.value.code == 0 and all(f"  {name}  " in out for name in COMMANDS)
    assert S.predict_main.__doc__.splitlines()[0] in out


def test_sigterm_saves_and_resume_logs_the_same_losses(world, tmp_path, signal_script):
    """train-sam with a DataLoader worker, SIGTERM to the whole process group after step 4: the worker ignores
    it, the run saves ckpt-4.pt and exits 0; --resume auto then logs the losses of a run never stopped."""
    import subprocess
    import sys
    args = ["train-sam", "--model", "micro", "--steps", "8", "--batch-size", "4", "--log-every", "2", "--warmup", "2",
            "--ckpt-every", "100"] + world_args(world)[:-2]
    stopped, straight = str(tmp_path / "stopped"), str(tmp_path / "straight")
    r = subprocess.run([sys.executable, signal_script("samclip", 4), *args, "--workers", "1", "--out", stopped],
                       capture_output=True, text=True, start_new_session=True, timeout=300,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr[-3000:]
    assert [os.path.basename(p) for p in C.checkpoints(stopped)] == ["ckpt-4.pt"]
    assert "stopped by a signal at step 4" in r.stdout.splitlines()[-1]
    S.main(args + ["--workers", "0", "--out", stopped, "--resume", "auto"])
    S.main(args + ["--workers", "0", "--out", straight])
    assert [(r["step"], r["loss"]) for r in read_log(stopped)] == [(r["step"], r["loss"]) for r in read_log(straight)]
    assert len(read_log(straight)) == 4


@pytest.mark.skipif(not __import__("importlib").util.find_spec("segment_anything"),
                    reason="segment_anything (the official implementation) is not installed")
def test_parity_with_official_segment_anything():
    """Same random weights in the official vit_b and ours: image embeddings and masks agree (fp32, 1e-4)."""
    from segment_anything import SamPredictor, sam_model_registry
    torch.manual_seed(0)
    official = sam_model_registry["vit_b"]().eval()
    for p in official.parameters():
        torch.nn.init.normal_(p, std=0.02) if p.ndim >= 1 else None
    ours = S.build_sam("vit_b").eval()
    ours.load_state_dict(official.state_dict(), strict=True)
    img = np.random.default_rng(0).integers(0, 255, (300, 400, 3), dtype=np.uint8)
    pred = SamPredictor(official)
    pred.set_image(img)
    masks, iou, low = pred.predict(np.array([[120, 80]]), np.array([1]), box=np.array([50, 40, 250, 200]),
                                   return_logits=True)
    m2, i2, l2 = S.predict_masks(ours, Image.fromarray(img), [[120, 80]], [1], box=[50, 40, 250, 200])
    x = ours.preprocess(torch.from_numpy(np.asarray(S.resize_longest(Image.fromarray(img), 1024))).permute(2, 0, 1)[None])
    torch.testing.assert_close(ours.image_encoder(x), pred.features, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(l2[0], torch.from_numpy(low), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(i2, torch.from_numpy(iou), rtol=1e-4, atol=1e-4)


def test_predict_command_and_mask_prompt_round_trip(tmp_path, capsys):
    """`predict` with a point writes a mask of the image's size and low-res logits that feed --mask-input."""
    torch.manual_seed(0)
    torch.save(S.build_sam("micro").state_dict(), tmp_path / "sam.pth")
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (24, 40, 3), dtype=np.uint8)).save(tmp_path / "x.png")
    base = ["predict", "--init", str(tmp_path / "sam.pth"), "--image", str(tmp_path / "x.png")]
    S.main(base + ["--point", "10,12", "--neg-point", "30,5", "--out", str(tmp_path / "m.png")])
    assert Image.open(tmp_path / "m.png").size == (40, 24)
    assert torch.load(tmp_path / "m_logits.pt", weights_only=True).shape == (1, 1, 32, 32)
    S.main(base + ["--box", "2,2,30,20", "--mask-input", str(tmp_path / "m_logits.pt"), "--no-multimask",
                   "--out", str(tmp_path / "m2.png")])
    assert "mask 0 of 1" in capsys.readouterr().out


# ---- the benchmarks' layouts, written by the tests ---------------------------------------------------------

def write_seg_folder(root, name, n=1, label=None):
    """A DATASETS folder with n 8 x 8 images and their label PNGs (palette for VOC/Context, grey otherwise)."""
    img_dir, ann_dir, lst, suffix = S.DATASETS[name][:4]
    split = S.DATASETS[name][6][0]
    for d in (img_dir, ann_dir):
        (root / d.format(split)).mkdir(parents=True, exist_ok=True)
    label = np.arange(64, dtype=np.uint8).reshape(8, 8) % 3 if label is None else label
    ids = [f"im{i}" for i in range(n)]
    for i in ids:
        Image.fromarray(np.full((8, 8, 3), 90, np.uint8)).save(root / img_dir.format(split) / f"{i}.jpg")
        png = Image.fromarray(label, "P" if name.startswith(("voc", "context")) else "L")
        if png.mode == "P":
            png.putpalette([0, 0, 0] * 256)
        png.save(root / ann_dir.format(split) / (i + suffix))
    if lst:
        (root / lst.format(split)).parent.mkdir(parents=True, exist_ok=True)
        (root / lst.format(split)).write_text("\n".join(ids) + "\n")
    return root


def write_image_folder(root):
    for k, c in enumerate(("circle", "star")):
        (root / c).mkdir(parents=True)
        Image.fromarray(np.full((20, 24, 3), 60 * k, np.uint8)).save(root / c / "a.png")
    return root


def uncompressed_rle(m):
    """COCO's uncompressed RLE counts (iscrowd annotations): column-major runs, starting with 0s."""
    flat = np.r_[-1, m.T.reshape(-1).astype(int), -1]
    return [int(c) for c in np.diff(np.flatnonzero(np.diff(flat)))]


def write_coco(root):
    """A COCO instances JSON over one 30 x 40 image: a polygon, an uncompressed RLE, a compressed RLE, a crowd."""
    root.mkdir(parents=True)
    Image.fromarray(np.full((30, 40, 3), 128, np.uint8)).save(root / "a.jpg")
    m = np.zeros((30, 40), np.uint8)
    m[5:15, 20:35] = 1
    segs = ([[2, 3, 12, 3, 12, 15, 2, 15]], {"size": [30, 40], "counts": uncompressed_rle(m)}, rle_encode(m), rle_encode(m))
    anns = [{"id": i, "image_id": 7, "iscrowd": int(i == 3), "bbox": [2, 3, 10, 12] if i == 0 else [20, 5, 15, 10],
             "segmentation": s} for i, s in enumerate(segs)]
    with open(root / "instances.json", "w") as f:
        json.dump({"images": [{"id": 7, "file_name": "a.jpg", "height": 30, "width": 40}], "annotations": anns}, f)
    return root / "instances.json"


@pytest.mark.parametrize("name", S.DATASETS)
def test_benchmark_readers_and_scoring(tmp_path, name):
    """Each layout as mmsegmentation prepares it reads back its label map; a perfect prediction scores 100
    through C.confusion_matrix / C.miou with the dataset's reduce_zero_label, whatever 255 holds."""
    label = (np.arange(64, dtype=np.uint8).reshape(8, 8) % 3)
    label[0] = 255
    root = write_seg_folder(tmp_path, name, 2, label)
    pairs = list(S.seg_pairs(name, str(root), S.DATASETS[name][6][0]))
    assert len(pairs) == 2 and pairs[0][0].size == (8, 8) and (pairs[0][1] == label).all()
    reduce = S.DATASETS[name][4]
    y = torch.from_numpy(label.astype(np.int64))
    pred = torch.where(y == 255, 1, y - 1 if reduce else y)
    conf = C.confusion_matrix(pred, y, 3, reduce_zero_label=reduce)
    assert conf.sum() == ((y != 255) & ((y != 0) | (not reduce))).sum() and C.miou(conf) == 100.0
    with pytest.raises(SystemExit):
        list(S.seg_pairs(name, str(tmp_path / "missing"), "val"))


def test_seg_eval_scores_with_the_shared_miou(monkeypatch):
    """seg_eval's mIoU is C.miou of the summed C.confusion_matrix of the same predictions (issue 26: one
    mIoU in every script), with background scored, or not scored (reduce-zero-label) without a rule."""
    rng = np.random.default_rng(0)
    labels = [rng.integers(0, 4, (6, 7)).astype(np.uint8) for _ in range(3)]
    labels[0][0, :3] = 255
    preds = [torch.from_numpy(rng.integers(0, 4, (6, 7))) for _ in range(3)]
    model = type("M", (), {"patch": 4})()
    for bg_threshold, reduce in ((0.5, False), (0.0, True)):
        it = iter(preds)
        monkeypatch.setattr(S, "segment_image", lambda *a, **k: next(it))
        res = S.seg_eval(model, [(None, y) for y in labels], ["a", "b", "c"], None, 8, "cpu", True,
                         bg_threshold=bg_threshold)
        K = 4 if not reduce else 3
        ref = sum(C.confusion_matrix(p, torch.from_numpy(y.astype(np.int64)), K, reduce_zero_label=reduce)
                  for p, y in zip(preds, labels))
        assert res["miou"] == C.miou(ref)


def test_background_rule_is_groupvits_threshold(monkeypatch):
    """Background where the best softmax probability (100 x cosine) is below the threshold, but never at the
    image's most confident pixel; without a rule, plain argmax over the classes."""
    logits = torch.tensor([[[0.30, 0.30, 0.25]], [[0.29, 0.27, 0.24]]])  # (K=2, 1, 3)
    monkeypatch.setattr(S, "dense_logits", lambda *a: logits)
    p = (100 * logits).softmax(0).max(0).values  # 0.73, 0.95, 0.73
    assert S.segment_image(None, None, 8, None, bg_threshold=0.9).tolist() == [[0, 1, 0]]
    assert S.segment_image(None, None, 8, None, bg_threshold=0.5).tolist() == [[1, 1, 1]] and p.min() > 0.5
    assert S.segment_image(None, None, 8, None, bg_threshold=1.5).tolist() == [[0, 1, 0]]  # the top pixel stays
    assert S.segment_image(None, None, 8, None).tolist() == [[0, 0, 0]]


def test_coco_masks_polygon_and_rle():
    """COCO's three mask encodings decode in numpy / PIL: a polygon fills its box, the uncompressed and the
    compressed RLE of one mask agree with it."""
    m = np.zeros((30, 40), np.uint8)
    m[5:15, 20:35] = 1
    runs = uncompressed_rle(m)
    assert (S.coco_mask({"size": [30, 40], "counts": runs}, 30, 40) == m).all()
    assert (S.coco_mask(rle_encode(m), 30, 40) == m).all()
    poly = S.coco_mask([[20, 5, 34, 5, 34, 14, 20, 14]], 30, 40)
    assert (poly == m.astype(bool)).all()


def test_clip_head_order_and_flag(tmp_path):
    """The paper's order by default (blocks, max-pool, LN, MLP); --no-pool-first pools after the MLP; the
    order is saved with the weights and restored on load."""
    torch.manual_seed(0)
    assert S.Config().pool_first and not C.parse_config(S.Config, ["--no-pool-first"], verbose=False).pool_first
    x = torch.randn(2, 3, 3, 64)
    m = S.build_sam("micro").add_clip_head(16)
    h = m.clip_head
    torch.testing.assert_close(h(x), h.mlp(h.norm(h.tokens(x).amax(dim=(1, 2)))))
    assert not torch.allclose(h(x), h.dense(x).amax(dim=(1, 2)))
    last = S.build_sam("micro").add_clip_head(16, pool_first=False)
    torch.testing.assert_close(last.clip_head(x), last.clip_head.dense(x).amax(dim=(1, 2)))
    C.save_checkpoint(str(tmp_path / "ckpt-1.pt"), {"kind": "samclip", "model": last.state_dict(), "model_name": "micro"})
    assert not S.load_sam(str(tmp_path / "ckpt-1.pt"), True).clip_head.pool_first_
