"""Runs that survive a cluster (issue 28), the shared pieces: resume past an unreadable checkpoint, one run per
--out (lock, another run's checkpoints, --overwrite), pruning, the start record, range checks, --help."""
import dataclasses
import json
import os
import subprocess
import sys

import pytest
import torch

import common as C


def write_ckpts(d, steps):
    for s in steps:
        C.save_checkpoint(str(d / f"ckpt-{s}.pt"), {"step": s})


def test_resume_auto_skips_unreadable_checkpoints_and_keeps_them(tmp_path, capsys):
    write_ckpts(tmp_path, (4, 6, 8))
    open(tmp_path / "ckpt-8.pt", "wb").write(open(tmp_path / "ckpt-8.pt", "rb").read()[:100])  # cut short
    open(tmp_path / "ckpt-9.pt", "wb").close()  # zero bytes
    assert C.load_checkpoint("auto", str(tmp_path))["step"] == 6
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and "ckpt-9.pt" in err[0] and "empty" in err[0] and "ckpt-8.pt" in err[1]
    assert sorted(os.listdir(tmp_path)) == ["ckpt-4.pt", "ckpt-6.pt", "ckpt-8.pt", "ckpt-9.pt"]  # nothing deleted
    for bad in ("ckpt-4.pt", "ckpt-6.pt"):
        open(tmp_path / bad, "wb").close()
    with pytest.raises(SystemExit):
        C.load_checkpoint("auto", str(tmp_path))
    assert "none of the 4 checkpoints" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # an explicit file that does not read: one line
        C.load_checkpoint(str(tmp_path / "ckpt-9.pt"), "")
    assert capsys.readouterr().err.strip().splitlines()[-1].startswith("error: cannot read checkpoint")


def test_prune_never_deletes_the_checkpoint_just_written(tmp_path):
    write_ckpts(tmp_path, (500, 800, 6))
    C.prune_checkpoints(str(tmp_path), 2, written=str(tmp_path / "ckpt-6.pt"))
    assert sorted(os.listdir(tmp_path)) == ["ckpt-500.pt", "ckpt-6.pt", "ckpt-800.pt"]


def test_a_live_runs_directory_is_refused_and_a_dead_ones_lock_taken_over(tmp_path, capsys):
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; sys.path.insert(0, '.'); import common as C; "
                               f"C.claim_out({str(tmp_path)!r}); print('held', flush=True); time.sleep(60)"],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(SystemExit):
            C.claim_out(str(tmp_path))
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and f"pid {holder.pid}" in err and "in use by another run" in err
    finally:
        holder.kill()
        holder.wait()
    C.claim_out(str(tmp_path))  # the holder is gone (killed: its lock stayed): taken over with a note
    assert "taking over the lock" in capsys.readouterr().out
    assert json.load(open(tmp_path / "run.lock"))["pid"] == os.getpid()


def test_a_new_run_into_another_runs_checkpoints_stops_or_starts_over(tmp_path, capsys):
    write_ckpts(tmp_path, (500, 800))
    open(tmp_path / "log.jsonl", "w").write('{"step": 800}\n')
    with pytest.raises(SystemExit):
        C.claim_out(str(tmp_path / ""), resume="")
    assert "holds another run's checkpoints (ckpt-800.pt" in capsys.readouterr().err
    C.claim_out(str(tmp_path), resume="auto")  # continuing it is fine
    C.claim_out(str(tmp_path), overwrite=True)  # starting over moves the earlier run aside, deletes nothing
    assert sorted(os.listdir(tmp_path / "previous-1")) == ["ckpt-500.pt", "ckpt-800.pt", "log.jsonl"]
    assert C.checkpoints(str(tmp_path)) == [] and not (tmp_path / "log.jsonl").exists()


@dataclasses.dataclass
class Cfg:
    steps: int = 10  # steps (100% of them)
    batch_size: int = 4  # images per step
    lr: float = 0.1  # learning rate
    workers: int = 2  # loader processes
    max_skip_frac: float = 0.5  # fraction of bad samples tolerated
    bg_threshold: float = -1.0  # -1: the recipe's value (a sentinel default passes)
    resume: str = ""  # auto


def test_start_record_in_the_log(tmp_path):
    C.document_run(str(tmp_path), Cfg(), [])
    C.document_run(str(tmp_path), Cfg(resume="auto"), [])  # the same process may claim twice
    recs = [json.loads(line) for line in open(tmp_path / "log.jsonl")]
    assert [r["event"] for r in recs] == ["start", "start"] and recs[1]["config"]["resume"] == "auto"
    assert recs[0]["versions"]["torch"] == torch.__version__ and "torchvision" in recs[0]["versions"]


@pytest.mark.parametrize("argv,msg", [(["--batch-size", "0"], "--batch-size 0: must be >= 1"),
                                      (["--steps", "-5"], "--steps -5: must be >= 0"),
                                      (["--lr", "-1"], "--lr -1.0: must be >= 0"),
                                      (["--lr", "nan"], "--lr nan: must be a finite number"),
                                      (["--workers", "-1"], "--workers -1: must be >= 0"),
                                      (["--max-skip-frac", "1.5"], "--max-skip-frac 1.5: must be between 0 and 1")])
def test_out_of_range_flags_get_one_line(argv, msg, capsys):
    with pytest.raises(SystemExit) as e:
        C.parse_config(Cfg, argv, verbose=False)
    assert e.value.code != 0 and capsys.readouterr().err.strip() == f"error: {msg}"
    assert C.parse_config(Cfg, [], verbose=False) == Cfg()


def test_help_lists_commands_and_a_commands_own_flags(capsys):
    def train(cfg):
        """Train the model.

        More about training."""
        return cfg

    @dataclasses.dataclass
    class Other:
        topk: int = 3  # how many (50% of them)

    def other(cfg):
        """Other things."""
    commands = {"train": (train, Cfg), "other": (other, Other)}
    with pytest.raises(SystemExit) as e:
        C.run_command("Title line.\n\nMore.", commands, ["--help"])
    out = capsys.readouterr().out
    assert e.value.code == 0 and "Title line." in out and "More." not in out
    assert "  train  Train the model." in out and "  other  Other things." in out
    with pytest.raises(SystemExit) as e:
        C.run_command("Title.", commands, ["other", "--help"])
    out = capsys.readouterr().out
    assert e.value.code == 0 and "--topk" in out and "--steps" not in out and "50% of them" in out
    assert C.run_command("Title.", commands, ["train", "--steps", "3"]).steps == 3
    with pytest.raises(SystemExit) as e:
        C.run_command("Title.", commands, ["nope"])
    assert e.value.code != 0 and "error: unknown command 'nope'" in capsys.readouterr().err
