"""bench.py: the FLOP counter's convention, the peak lookup, and a one-step run of a case on the CPU
(speed itself is measured by running bench.py, never asserted in a test)."""
import json

import torch

import bench


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
