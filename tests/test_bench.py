"""bench.py: the FLOP counter's convention, the peak lookup, a one-step run of a case on the CPU, and the
data case's two loaders (speed itself is measured by running bench.py, never asserted in a test)."""
import json

import torch

import bench
import common as C


def test_forward_flops_counts_two_per_multiply_add():
    lin = torch.nn.Linear(16, 8, bias=False)
    assert bench.forward_flops(lambda: lin(torch.randn(3, 16))) == 2 * 3 * 16 * 8


def test_peak_lookup():
    assert bench.peak_flops(torch.device("cpu")) is None
    names = [k for k, _ in bench.PEAK_BF16]
    assert names.index("H100 NVL") < names.index("H100")  # the specific name is matched first


def test_one_case_runs_and_writes_a_row(tmp_path, capsys):
    torch.set_num_threads(1)
    out = tmp_path / "bench.jsonl"
    bench.main(["fastfill", "--steps", "1", "--warmup", "1", "--batch", "8", "--out", str(out)])
    rows = [json.loads(line) for line in open(out)]
    assert [r["path"] for r in rows] == ["fast", "reference"]
    assert all(r["samples_per_s"] > 0 and r["gflops_per_sample"] > 0 for r in rows)
    assert rows[0]["gflops_per_sample"] == rows[1]["gflops_per_sample"]
    assert "fastfill" in capsys.readouterr().out


def test_data_case_runs_both_loaders_and_writes_rows(tmp_path, capsys):
    out = tmp_path / "bench.jsonl"
    bench.main(["data", "--images", "6", "--rounds", "1", "--batch", "4", "--cache", str(tmp_path),
                "--out", str(out)])
    rows = [json.loads(line) for line in open(out)]
    assert [r["path"] for r in rows] == ["ours", "openclip"]
    assert all(r["images"] == 6 and r["images_per_s"] > 0 and r["images_per_cpu_s"] > 0 for r in rows)
    assert rows[0]["ours_over_openclip"] == rows[0]["images_per_s"] / rows[1]["images_per_s"]
    assert "ours/OpenCLIP" in capsys.readouterr().out


def test_both_loaders_crop_the_same_samples_to_the_same_shape(tmp_path):
    shards = bench.jpeg_shards(str(tmp_path), 4)
    first = next(C.iter_tar_samples(shards[0], {}))
    assert C.decode_image_tensor(first).shape == (3, 384, 512)
    assert len(first["jpg"]) > 30_000  # photo-sized, not a flat image that JPEG squeezes to a few KB
    tok = C.Tokenizer(merges=C.train_bpe([bench.bench_caption(0, i) for i in range(4)], 600))
    ours, openclip = (next(iter(make())) for make in bench.data_streams(shards, tok, 4).values())
    assert ours["image"].shape == openclip["image"].shape == (4, 3, 224, 224)
    assert ours["image"].dtype == torch.uint8 and openclip["image"].dtype == torch.float32
    assert ours["caption"] == openclip["caption"] and torch.equal(ours["ids"], openclip["ids"])  # same samples
    # OpenCLIP's images come normalised (CLIP mean/std); ours are normalised on the device. The crops differ
    # (each draws its own 90-100% box) but overlap by >= 80%, so per-image channel means agree closely.
    assert openclip["image"].min() < 0
    assert torch.allclose(C.normalize_images(ours["image"]).mean((2, 3)), openclip["image"].mean((2, 3)), atol=0.15)
