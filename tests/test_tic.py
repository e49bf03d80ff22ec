"""tic.py: replay-buffer composition of every strategy at every step (planned counts and the samples the
stream really yields), summary metrics of a hand-made matrix, warm start = weights only with a fresh
optimizer and schedule, LwF against its reference, splitting shards by year, and the tiny sequence end to end:
it learns, an interrupted sequence resumes at its step and batch and ends where an uninterrupted one does."""
import json
import math
import os
import shutil

import pytest
import torch

import common as C
import tic


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: see conftest.py


# ---- replay buffers -------------------------------------------------------------------------------

def test_replay_counts_every_strategy_every_step():
    """Seven equal steps of D = 100 (TiC-DataComp's shape), buffer 2D: counts kept per old step."""
    sizes = [100] * 7
    for t in range(7):
        assert tic.replay_counts("cumulative-all", sizes, t) == [100] * t
        assert tic.replay_counts("restart", sizes, t) == [100] * t
        for s in ("sequential", "lwf", "patching"):
            assert tic.replay_counts(s, sizes, t) == [0] * t
    equal = [tic.replay_counts("cumulative-equal", sizes, t) for t in range(7)]
    assert equal == [[], [100], [100, 100], [66] * 3, [50] * 4, [40] * 5, [33] * 6]  # last: D/3 each (spec)
    exp = [tic.replay_counts("cumulative-exp", sizes, t) for t in range(7)]
    assert exp[:4] == [[], [100], [100, 100], [50, 50, 100]]
    assert exp[6] == [6, 6, 12, 25, 50, 100]  # 200 x (1/32, 1/32, 1/16, 1/8, 1/4, 1/2), oldest first
    for t in range(1, 7):
        assert sum(equal[t]) <= 200 and sum(exp[t]) <= 200


def test_replay_counts_spec_examples_and_unequal_sizes():
    """The spec's examples with a buffer of D; YFCC's 4 steps with 2D (all fits until step 3, then 2/3);
    a small old step is kept whole and its leftover share goes to the others."""
    D = [120] * 4
    assert tic.replay_counts("cumulative-exp", D, 2, 1.0) == [60, 60]  # step 3: D/2, D/2
    assert tic.replay_counts("cumulative-exp", D, 3, 1.0) == [30, 30, 60]  # step 4: D/4, D/4, D/2
    assert tic.replay_counts("cumulative-equal", D, 3, 1.0) == [40, 40, 40]  # step 4: D/3 each
    assert tic.replay_counts("cumulative-equal", D, 2) == [120, 120]
    assert tic.replay_counts("cumulative-equal", D, 3) == [80, 80, 80]
    assert tic.replay_counts("cumulative-exp", [10, 100, 100, 100], 3) == [10, 90, 100]
    with pytest.raises(SystemExit):
        tic.replay_counts("bogus", D, 2)


def fake_steps(root, n=200, T=3):
    """T steps of n text-only samples each (no image: the stream test decodes json only)."""
    ranges = [(2014 + 2 * k, 2015 + 2 * k) for k in range(T)]
    for k, (y0, _) in enumerate(ranges):
        os.makedirs(os.path.join(root, f"step{k}", "train"))
        for s in range(2):
            C.write_shard(os.path.join(root, f"step{k}", "train", f"train-{s:05d}.tar"),
                          ({"__key__": f"k{k}_{i:05d}", "txt": "x", "json": {"year": y0 + i % 2}}
                           for i in range(s * n // 2, (s + 1) * n // 2)))
    tic.write_steps(root, ranges, {f"step{k}/train": n for k in range(T)}, None, "year")
    return tic.read_steps(root)


def stream_counts(root, steps, strategy, t, seed=0):
    shards, keep, counts = tic.step_sources(strategy, steps, root, t, 2.0 if strategy != "cumulative-exp" else 0.5, seed)
    decode = lambda s: {"step": torch.tensor(int(s["__key__"][1]))}
    stream = tic.ReplayStream(shards, decode, 1, epochs=1, drop_last=False, keep=keep)
    got, keys = [0] * len(counts), set()
    for b in stream:
        got[int(b["step"][0])] += 1
    for s in stream.raw_samples(0, 0, 1, {}):
        keys.add(s["__key__"])
    return got, counts, keys


def test_stream_yields_the_planned_buffer(tmp_path):
    """One epoch of the mixed stream holds all of the new step and ~count_j random samples of old step j
    (hash selection: binomial, checked within 4 sigma); later buffers are subsets of earlier ones."""
    root = str(tmp_path / "d")
    steps = fake_steps(root)
    got, counts, _ = stream_counts(root, steps, "sequential", 2)
    assert got == counts == [0, 0, 200]
    got, counts, _ = stream_counts(root, steps, "cumulative-all", 2)
    assert got == counts == [200, 200, 200]
    got, counts, _ = stream_counts(root, steps, "oracle", 0)
    assert got == counts == [200, 200, 200]
    got, counts, keys2 = stream_counts(root, steps, "cumulative-exp", 2)  # buffer 0.5 D = 100: 50 + 50
    assert counts == [50, 50, 200] and got[2] == 200
    for j in (0, 1):
        p = counts[j] / 200
        assert abs(got[j] - counts[j]) <= 4 * math.sqrt(200 * p * (1 - p)), (got, counts)
    _, counts1, keys1 = stream_counts(root, steps, "cumulative-exp", 1)  # step 0 alone had 100 at t = 1
    assert counts1 == [100, 200, 0]
    old0 = lambda keys: {k for k in keys if k.startswith("k0_")}
    assert old0(keys2) <= old0(keys1) and len(old0(keys2)) < len(old0(keys1))


# ---- metrics ----------------------------------------------------------------------------------------

def test_summary_metrics_hand_made_matrix():
    E = [[10.0, 2.0, 3.0],
         [8.0, 20.0, 6.0],
         [7.0, 12.0, 30.0]]
    m = tic.summary_metrics(E)
    assert m["id"] == pytest.approx(20.0)  # (10 + 20 + 30) / 3
    assert m["backward"] == pytest.approx(9.0)  # (8 + 7 + 12) / 3
    assert m["forward"] == pytest.approx(11 / 3)  # (2 + 3 + 6) / 3
    assert m["final"] == pytest.approx(49 / 3)
    oracle = tic.summary_metrics([None, None, [7.0, 12.0, 30.0]])  # only the last row exists
    assert oracle["id"] == 30.0 and oracle["backward"] == 9.5 and math.isnan(oracle["forward"])


# ---- warm start, LwF, patching ------------------------------------------------------------------------

def tiny_model(seed):
    return tic.build_model(tic.TrainConfig(), 300, seed)


def test_warm_start_loads_weights_and_resets_optimizer_and_schedule(tmp_path):
    cfg = tic.TrainConfig(lr=1e-3, warmup=10, warm_warmup=0)
    a = tiny_model(0)
    opt, lr_fn = tic.fresh_optimizer(a, cfg, warm=False, total=50)
    assert lr_fn(0) == pytest.approx(1e-4)  # first step: warm-up from lr / warmup
    x, ids = torch.randn(8, 3, 32, 32), torch.randint(1, 299, (8, 32))
    for step in range(3):
        C.set_lr(opt, lr_fn(step))
        C.contrastive_loss(*a(x, ids)).backward()
        opt.step()
        opt.zero_grad()
    assert len(opt.state) > 0
    path = str(tmp_path / "model.pt")
    C.save_checkpoint(path, {"model": a.state_dict(), "optimizer": opt.state_dict()})
    b = tiny_model(1)
    assert not torch.equal(b.logit_scale, a.logit_scale) or not all(
        torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    tic.warm_start(b, path)
    for (n, p), q in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(p, q), n
    opt_b, lr_b = tic.fresh_optimizer(b, cfg, warm=True, total=50)
    assert len(opt_b.state) == 0  # no moments, no step count: nothing of the old optimizer
    assert lr_b(0) == pytest.approx(1e-3) and lr_b(49) < 1e-5  # a fresh cosine over this step, no warm-up


def test_lwf_loss_matches_reference_and_vanishes_for_the_teacher():
    g = torch.Generator().manual_seed(0)
    emb = lambda: torch.nn.functional.normalize(torch.randn(16, 8, generator=g), dim=-1)
    img, txt, t_img, t_txt = emb().requires_grad_(), emb().requires_grad_(), emb(), emb()
    scale, t_scale = torch.tensor(20.0), torch.tensor(30.0)
    a = tic.lwf_loss(img, txt, t_img, t_txt, scale, t_scale)
    b = tic.lwf_loss_reference(img, txt, t_img, t_txt, scale, t_scale)
    torch.testing.assert_close(a, b)
    ga = torch.autograd.grad(a, (img, txt))
    gb = torch.autograd.grad(b, (img, txt))
    for x, y in zip(ga, gb):
        torch.testing.assert_close(x, y)
    assert a.item() > 0.01
    same = tic.lwf_loss(t_img, t_txt, t_img, t_txt, t_scale, t_scale)
    assert abs(same.item()) < 1e-5


def _lwf_data():
    g = torch.Generator().manual_seed(1)
    return torch.randn(8, 6, generator=g), torch.randn(8, 5, generator=g), torch.randn(8, 4, generator=g), \
        torch.randn(8, 4, generator=g)


class Towers(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.img, self.txt = torch.nn.Linear(6, 4), torch.nn.Linear(5, 4)
        self.logit_scale = torch.nn.Parameter(torch.tensor(2.0))

    def forward(self, x, t):
        F = torch.nn.functional
        return F.normalize(self.img(x), dim=-1), F.normalize(self.txt(t), dim=-1), self.logit_scale.exp()


def _lwf_worker(rank, world, port, out):
    import torch.distributed as dist
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.manual_seed(0)
    model = torch.nn.parallel.DistributedDataParallel(Towers())
    x, t, ti, tt = (v[rank * 4:(rank + 1) * 4] for v in _lwf_data())
    F = torch.nn.functional
    loss = tic.lwf_loss(*model(x, t)[:2], F.normalize(ti, dim=-1), F.normalize(tt, dim=-1),
                        model.module.logit_scale.exp(), torch.tensor(5.0))
    loss.backward()  # DDP averages the gradients over ranks
    mean = loss.detach().clone()
    dist.all_reduce(mean)
    torch.save({"loss": mean / world, "grads": {n: p.grad for n, p in model.module.named_parameters()}},
               f"{out}/rank{rank}.pt")
    dist.barrier()
    del model, loss  # DDP's reducer must go before its process group, or exit can abort (std::terminate)
    import gc
    gc.collect()
    dist.destroy_process_group()


def test_lwf_loss_two_gloo_processes_match_the_reference(tmp_path, free_port):
    """Local rows against the gathered batch on 2 ranks = the full-matrix reference on one process."""
    import torch.multiprocessing as mp
    mp.start_processes(_lwf_worker, args=(2, free_port, str(tmp_path)), nprocs=2, join=True,
                       start_method="fork")  # fork: the workers need not import torch again
    torch.manual_seed(0)
    model = Towers()
    x, t, ti, tt = _lwf_data()
    F = torch.nn.functional
    loss = tic.lwf_loss_reference(*model(x, t)[:2], F.normalize(ti, dim=-1), F.normalize(tt, dim=-1),
                                  model.logit_scale.exp(), torch.tensor(5.0))
    loss.backward()
    for rank in range(2):
        got = torch.load(tmp_path / f"rank{rank}.pt")
        torch.testing.assert_close(got["loss"], loss.detach(), atol=1e-6, rtol=1e-5)
        for n, p in model.named_parameters():
            torch.testing.assert_close(got["grads"][n], p.grad, atol=1e-6, rtol=1e-5)


def test_patching_interpolates_and_picks_the_best_alpha():
    a, b = tiny_model(0), tiny_model(1)
    sa = {k: v.clone() for k, v in a.state_dict().items()}
    sb = {k: v.clone() for k, v in b.state_dict().items()}
    for k in sa:
        torch.testing.assert_close(tic.interpolate(sa, sb, 0.0)[k], sa[k].float())
        torch.testing.assert_close(tic.interpolate(sa, sb, 1.0)[k], sb[k].float())
    key = next(k for k in sa if not torch.equal(sa[k], sb[k]))
    target = 0.25 * sa[key] + 0.75 * sb[key]
    score = lambda m: (None, -(m.state_dict()[key] - target).norm().item())  # best at alpha = 0.75
    alpha, scores = tic.choose_alpha(a, sa, sb, [0.0, 0.25, 0.5, 0.75, 1.0], score)
    assert alpha == 0.75 and len(scores) == 5
    torch.testing.assert_close(a.state_dict()[key], target)  # the model is left patched with the best alpha


# ---- splitting time-stamped shards ----------------------------------------------------------------------

def test_split_by_year_into_steps(tmp_path):
    """Years as ints and as date strings; samples outside every step are dropped; held-out shares by hash."""
    from PIL import Image
    raw = tmp_path / "raw"
    raw.mkdir()
    img = Image.new("RGB", (8, 8), "red")
    years = [2012, 2014, 2015, 2016, 2017, 2018, 2030]
    for s in range(2):
        C.write_shard(str(raw / f"{s}.tar"), (
            {"__key__": f"{i:04d}", "jpg": img, "txt": f"caption {i}",
             "json": {"t": (f"{years[i % 7]}-05-01" if i % 2 else years[i % 7]), "label": i % 3,
                      "classname": "abc"[i % 3]}} for i in range(s * 350, (s + 1) * 350)))
    out = str(tmp_path / "split")
    tic.main(["split", "--data", str(raw), "--years", "2014-2015,2016,2017-2018", "--time-field", "t",
              "--eval-frac", "0.1", "--val-frac", "0.1", "--shard-size", "64", "--out", out])
    steps = tic.read_steps(out)
    assert [s["name"] for s in steps["steps"]] == ["2014-2015", "2016", "2017-2018"]
    assert steps["classnames"] == ["a", "b", "c"]
    totals = [s["train"] + s["val"] + s["eval"] for s in steps["steps"]]
    assert totals == [200, 100, 200]  # 700 samples, 1/7 each year; 2012 and 2030 dropped
    for k, s in enumerate(steps["steps"]):
        assert 0 < s["eval"] < 0.25 * totals[k] and 0 < s["val"] < 0.25 * totals[k]
        seen = set()
        for p in tic.part_shards(out, f"step{k}/train"):
            for smp in C.iter_tar_samples(p, {}):
                seen.add(tic.sample_year(json.loads(smp["json"]), "t"))
        assert seen and all(s["years"][0] <= y <= s["years"][1] for y in seen)
    with pytest.raises(SystemExit):
        tic.parse_years("2016,2015")


def test_split_from_released_uid_files(tmp_path, capsys):
    """TiC-DataComp as released, files written here in its layout: {year}.npy (u8,u8) training UIDs, the
    year2uids retrieval pickle and the year -> synset -> UIDs DataCompNet pickle. Shards carry the UID in their json."""
    import pickle
    import numpy as np
    uid = lambda i: f"{i * 7919:016x}{i:016x}"  # 128-bit hex; the halves differ
    years = {i: 2014 + i % 10 for i in range(100)}  # 2014..2023
    ret = {2015: [uid(1)], 2017: [uid(3), uid(13)], 2022: [uid(8)]}
    net = {2017: {"n02": [uid(23)], "n01": [uid(33), uid(3)]}}  # uid(3) is in both evaluation sets
    held = {u for us in ret.values() for u in us} | {u for by in net.values() for us in by.values() for u in us}
    d = tmp_path / "uids"
    d.mkdir()
    for y in range(2014, 2024):
        np.save(d / f"{y}.npy", np.sort(np.array([(int(uid(i)[:16], 16), int(uid(i)[16:], 16)) for i in years
                                                  if years[i] == y and uid(i) not in held and i != 99], "u8,u8")))
    (d / tic.UID_PICKLES[0]).write_bytes(pickle.dumps(ret))
    (d / tic.UID_PICKLES[1]).write_bytes(pickle.dumps(net))
    raw = tmp_path / "raw"
    raw.mkdir()
    C.write_shard(str(raw / "0.tar"), ({"__key__": f"{i:04d}", "txt": f"c{i}", "json": {"uid": uid(i)}}
                                       for i in range(100)))
    out = tmp_path / "split"
    tic.main(["split", "--data", str(raw), "--uids", str(d), "--val-frac", "0", "--out", str(out)])
    steps = tic.read_steps(str(out))
    assert [s["name"] for s in steps["steps"]] == ["2014-2016", "2017", "2018", "2019", "2020", "2021", "2022"]
    # 30 of 2014-16 less 1 held out (uid 1); 10 a year after, less the held-out ones; 2023 (i % 10 == 9) dropped
    assert [s["train"] for s in steps["steps"]] == [29, 6, 10, 10, 10, 10, 9]
    assert [(t["name"], t["step"], t["classification"]) for t in steps["tasks"]] == [
        ("2015", 0, None), ("2017", 1, "tasks/datacompnet/2017"), ("2022", 6, None)]
    read = lambda part: {json.loads(s["json"])["uid"]: json.loads(s["json"])
                         for p in tic.part_shards(str(out), part) for s in C.iter_tar_samples(p, {})}
    assert set(read("tasks/retrieval/2017")) == {uid(3), uid(13)}
    assert {u: m["label"] for u, m in read("tasks/datacompnet/2017").items()} == {uid(3): 0, uid(33): 0, uid(23): 1}
    assert {m["year"] for m in read("step0/train").values()} == {2014, 2015, 2016}
    (d / tic.UID_PICKLES[0]).write_bytes(pickle.dumps({2015: [uid(1)], 2016: os.system}))  # code in a pickle
    with pytest.raises(SystemExit):
        tic.main(["split", "--data", str(raw), "--uids", str(d), "--out", str(tmp_path / "bad")])
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "refused global" in err[0] and "not TiC-DataComp's released UID files" in err[0]


def test_full_set_recall_in_chunks_equals_the_brute_force_matrix():
    """recall_at_1 over blocks of queries = the full N x N matrix (common.retrieval_eval), ties included."""
    g = torch.Generator().manual_seed(0)
    img = torch.randn(53, 8, generator=g)
    txt = img + 0.9 * torch.randn(53, 8, generator=g)
    txt[7], img[20] = txt[5], img[21]  # ties: two texts equal, two images equal
    ref = C.retrieval_eval(img, txt)
    want = (ref["retrieval_i2t_r1"] + ref["retrieval_t2i_r1"]) / 2
    assert 10 < want < 90
    for chunk in (1, 5, 53, 4096):
        assert tic.recall_at_1(img, txt, chunk) == pytest.approx(want, abs=1e-4)  # one hit = 0.94


def test_compute_ratio_at_equal_accuracy_on_known_curves():
    """Retraining from scratch at 1, 2, 3, 4 C per step (cumulative 1, 3, 6, 10 C) against a warm start at C."""
    scratch = [(1.0, 10.0), (3.0, 20.0), (6.0, 30.0), (10.0, 40.0)]
    warm = [(1.0, 15.0), (2.0, 25.0), (3.0, 35.0), (4.0, 38.0)]
    assert tic.compute_to_reach(scratch, 38.0) == pytest.approx(9.2)  # 6 + 4 x (38 - 30) / 10
    assert tic.compute_ratio(scratch, warm) == pytest.approx(9.2 / 4)  # both reach 38
    assert tic.compute_ratio(scratch, [(1.0, 45.0), (2.0, 50.0)]) == pytest.approx(10.0)  # warm is past 40 at 1 C
    assert tic.compute_to_reach(scratch, 41.0) is None
    res = {"rows": [None, {"compute_C": 2.0, "retrieval": [10.0, None, 30.0], "static": 5.0}]}
    assert tic.compute_curve(res, "retrieval") == [(2.0, 20.0)] and tic.compute_curve(res, "static") == [(2.0, 5.0)]


# ---- the tiny sequence, end to end ------------------------------------------------------------------------

def tiny_cfg(tmp_path, **kw):
    base = dict(cache_dir=str(tmp_path / "cache"), years="2014-2016,2017-2019", synthetic_train=600, synthetic_val=40,
                synthetic_eval=100, synthetic_static=100, shard_size=200, budget_steps=60, batch_size=48, lr=2e-3,
                warmup=10, grad_clip=1.0, workers=0, log_every=20, ckpt_every=1000, shuffle_buffer=500, bpe_vocab=600,
                out=str(tmp_path / "run"))
    base.update(kw)
    return [f"--{k.replace('_', '-')}={v}" for k, v in base.items()]


@pytest.fixture(scope="module")
def sequential_run(tmp_path_factory):
    tmp, n = tmp_path_factory.mktemp("tic"), torch.get_num_threads()
    torch.set_num_threads(1)
    tic.main(tiny_cfg(tmp, strategy="cumulative-all"))
    torch.set_num_threads(n)
    return tmp


def test_tiny_sequence_learns_and_writes_its_outputs(sequential_run):
    out = sequential_run / "run"
    res = json.load(open(out / "matrix.json"))
    for f in ("matrix.csv", "matrix.png", "log.jsonl", "step0/model.pt", "step1/model.pt", "bpe.txt"):
        assert (out / f).exists(), f
    assert not list((out / "step0").glob("ckpt-*.pt"))  # resume files go once the step is done
    s = res["summary"]
    # 100 eval pairs per step: chance R@1 is 1% (an untrained model gets ~1); 60 steps of batch 48 reach ~4
    assert s["retrieval_id"] > 2.5, s
    assert res["rows"][1]["counts"] == [600, 600] and s["compute_C"] == pytest.approx(2.0)
    log = [json.loads(l) for l in open(out / "log.jsonl")]
    losses = [r["loss"] for r in log if "loss" in r and r["time_step"] == 0]
    assert losses[-1] < losses[0] - 0.25, losses  # log(48) = 3.87 at chance
    assert log[-1]["retrieval_id"] == pytest.approx(s["retrieval_id"], abs=1e-4)
    lines = open(out / "matrix.csv").read().splitlines()
    assert len(lines) == 1 + 2 * 2 and lines[1].startswith("cumulative-all,2014-2016,2014-2016,")


def test_interrupted_sequence_resumes_at_step_and_batch(sequential_run, tmp_path, monkeypatch):
    """The fixture's run as if stopped after time step 0 (its step 1 and row 1 removed); stop inside time step 1 (as
    SIGTERM would), run again: step 0 is not retrained, step 1 resumes at its checkpoint, and the final matrix
    equals the uninterrupted run's."""
    ref = json.load(open(sequential_run / "run" / "matrix.json"))
    out = tmp_path / "run"
    shutil.copytree(sequential_run / "cache", tmp_path / "cache")
    shutil.copytree(sequential_run / "run", out, ignore=shutil.ignore_patterns("step1"))
    tic.save_json(str(out / "matrix.json"), dict(ref, rows=[ref["rows"][0], None], summary=None))
    calls = {"n": 0}

    class StopAt25(C.StopSignal):  # the flag the loop reads turns on at step 25 of time step 1
        @property
        def requested(self):  # read once after time step 0 (done earlier), then once per step
            calls["n"] += 1
            return calls["n"] > 1 + 25

        @requested.setter
        def requested(self, v):
            pass

    monkeypatch.setattr(C, "StopSignal", StopAt25)
    tic.main(tiny_cfg(tmp_path, strategy="cumulative-all"))
    assert (out / "step0" / "model.pt").exists() and not (out / "step1" / "model.pt").exists()
    assert [p.name for p in (out / "step1").glob("ckpt-*.pt")] == ["ckpt-25.pt"]
    monkeypatch.undo()
    mtime = os.path.getmtime(out / "step0" / "model.pt")
    tic.main(tiny_cfg(tmp_path, strategy="cumulative-all"))
    assert os.path.getmtime(out / "step0" / "model.pt") == mtime
    res = json.load(open(out / "matrix.json"))
    assert res["rows"][1]["retrieval"] == ref["rows"][1]["retrieval"]
    assert res["rows"][1]["zeroshot"] == ref["rows"][1]["zeroshot"]


@pytest.fixture(scope="module")
def small_world(tmp_path_factory):
    return tmp_path_factory.mktemp("tic_small_world")  # one synthetic world for the runs below, generated once


@pytest.mark.parametrize("strategy", ["lwf", "patching", "cumulative-exp", "oracle", "oracle-cumulative"])
def test_other_strategies_run(tmp_path, strategy, small_world):
    """Each strategy's own path (teacher, alpha search, buffer, T x C from scratch, (t+1) x C from scratch at
    every step) runs and is accounted."""
    tic.main(tiny_cfg(tmp_path, strategy=strategy, budget_steps=4, synthetic_train=200, synthetic_eval=40,
                      cache_dir=small_world))
    res = json.load(open(tmp_path / "run" / "matrix.json"))
    if strategy == "oracle":
        assert res["rows"][0] is None and res["rows"][1]["counts"] == [200, 200]
        assert res["summary"]["compute_C"] == pytest.approx(2.0)
    if strategy == "lwf":  # a teacher forward per sample at steps 1.., counted as 1/3
        assert res["rows"][1]["compute_C"] == pytest.approx(4 / 3)
    if strategy == "patching":
        assert res["rows"][1]["alpha"] in (0.0, 0.25, 0.5, 0.75, 1.0) and res["rows"][1]["compute_C"] > 1
    if strategy == "cumulative-exp":
        assert res["rows"][1]["counts"] == [200, 200]  # 2D buffer: the one old step fits whole
    if strategy == "oracle-cumulative":  # the cumulative-compute oracle: step t trains (t+1) C on all data so far
        assert [r["compute_C"] for r in res["rows"]] == [1.0, 2.0] and res["summary"]["compute_C"] == 3.0
        assert [r["counts"] for r in res["rows"]] == [[200, 0], [200, 200]]
        log = [json.loads(line) for line in open(tmp_path / "run" / "log.jsonl")]
        ends = [max(r["step"] for r in log if r.get("time_step") == t and "loss" in r) for t in (0, 1)]
        assert ends == [4, 4 + 8]  # 4 optimizer steps, then 8 more (logged on the sequence's step axis)


def test_bad_input_is_one_clear_line(tmp_path):
    with pytest.raises(SystemExit):
        tic.main(["--strategy", "bogus", "--out", str(tmp_path / "x")])
    with pytest.raises(SystemExit):
        tic.main(["--data", str(tmp_path), "--out", str(tmp_path / "y")])  # no steps.json
    with pytest.raises(SystemExit):
        tic.main(["--benchmark", "nope", "--out", str(tmp_path / "z")])


# ---- the command line and runs that survive a cluster (issue 28) ------------------------------------------

@pytest.mark.parametrize("argv,own,other", [(["--help"], "split ", None), (["split", "--help"], "--eval-frac", "--lr"),
                                            (["train", "--help"], "--budget-steps", "--eval-frac"),
                                            (["compare", "--help"], "--strategies", "--strategy STRATEGY")])
def test_help_lists_commands_and_each_commands_own_flags(argv, own, other, capsys):
    with pytest.raises(SystemExit) as e:
        tic.main(argv)
    out = capsys.readouterr().out
    assert e.value.code == 0 and own in out and "Traceback" not in out
    assert other is None or other not in out
    if argv == ["--help"]:
        assert all(f"  {c} " in out for c in ("train", "split", "compare"))
    else:  # the description: the command's docstring, its first paragraph
        assert tic.main.__globals__[{"split": "split_shards", "train": "run"}.get(argv[0], argv[0])].__doc__.split(
            "\n")[0] in out


@pytest.mark.parametrize("argv,message", [
    (["--batch-size", "0"], "--batch-size 0: must be >= 1"),
    (["--budget-steps", "-5"], "--budget-steps -5: must be >= 0"),
    (["--budget-steps", "0"], "--budget-steps 0: must be >= 1"),
    (["--lr", "-1"], "--lr -1.0: must be >= 0"),
    (["--workers", "-1"], "--workers -1: must be >= 0"),
    (["--max-skip-frac", "1.5"], "--max-skip-frac 1.5: must be between 0 and 1"),
    (["--patch-alphas", "0,x"], "--patch-alphas '0,x': must be numbers between 0 and 1"),
    (["--strategy", "bogus"], "unknown strategy 'bogus'"),
    (["--model", "vit_huge"], "unknown model 'vit_huge'"),
    (["--classnames", "{tmp}/none.txt"], "--classnames {tmp}/none.txt: not found"),
    (["--data", "{tmp}/empty.tar"], "{tmp}/empty.tar/steps.json not found"),
    (["compare", "--strategies", "restart,bogus"], "unknown strategy 'bogus'"),
    (["split", "--data", "{tmp}/empty.tar"], "falls in a time step; skipped: broken_tar:ReadError 1"),
    (["split", "--data", "{tmp}/empty.tar", "--eval-frac", "0.6", "--val-frac", "0.6"], "their sum must be at most 1"),
    (["split", "--eval-frac", "1.5"], "--eval-frac 1.5: must be between 0 and 1"),
    (["split", "--data", "{tmp}/nowhere"], "data path does not exist: {tmp}/nowhere"),
])
def test_bad_input_is_one_line_before_any_work(tmp_path, capsys, argv, message):
    open(tmp_path / "empty.tar", "wb").close()  # zero bytes
    with pytest.raises(SystemExit) as e:
        tic.main([a.format(tmp=tmp_path) for a in argv] + ["--out", str(tmp_path / "out"),
                                                            "--cache-dir", str(tmp_path / "cache")][:2 if "split" in argv else 4])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code != 0 and len(err) == 1 and err[0] == "error: " + err[0][7:] and message.format(tmp=tmp_path) in err[0]
    assert not (tmp_path / "cache").exists() and not list(tmp_path.glob("out/**/*.pt"))  # nothing generated or trained


def test_shards_without_a_usable_sample_stop_a_run_with_a_worker_in_one_line(tmp_path):
    """A split folder whose shards are all broken, through the command line with a DataLoader worker: one line
    naming the skip counts, exit 2, and the process ends (its worker, which ignores SIGTERM, does not hold it)."""
    import subprocess
    import sys
    for part in ("train", "eval"):
        os.makedirs(tmp_path / "split" / "step0" / part)
        open(tmp_path / "split" / "step0" / part / f"{part}-00000.tar", "wb").close()
    tic.write_steps(str(tmp_path / "split"), [(2014, 2015)], {f"step0/{p}": 10 for p in ("train", "val", "eval")}, None, "y")
    C.Tokenizer(merges=[]).save(str(tmp_path / "bpe.txt"))
    done = subprocess.run([sys.executable, "tic.py", "--data", str(tmp_path / "split"), "--bpe", str(tmp_path / "bpe.txt"),
                           "--workers", "1", "--out", str(tmp_path / "run")], timeout=120, capture_output=True,
                          text=True, cwd=os.path.dirname(os.path.abspath(tic.__file__)),
                          env=dict(os.environ, OMP_NUM_THREADS="1"))
    shard = tmp_path / "split" / "step0" / "train" / "train-00000.tar"
    assert done.returncode == 2 and done.stderr.strip().splitlines() == [
        f"error: no usable sample in a whole pass of data consumer 1 of 1 over 1 shard(s) ({shard}); "
        "skipped: broken_tar:ReadError 1"], done.stderr


def test_a_second_run_into_an_out_holding_another_run_stops_or_starts_over(sequential_run, tmp_path, capsys):
    """Other settings into the fixture's --out: one line naming them, nothing touched; with --overwrite the earlier
    files move to OUT/previous-1/ and the new run starts clean."""
    out = tmp_path / "run"
    shutil.copytree(sequential_run / "run", out, ignore=shutil.ignore_patterns("step1"))
    with pytest.raises(SystemExit) as e:
        tic.main(tiny_cfg(sequential_run, strategy="cumulative-all", lr=1e-3, out=out))
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code != 0 and len(err) == 1 and "holds a run with other settings (--lr 0.002)" in err[0]
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in (sequential_run / "run").iterdir()
                                                           if p.name != "step1")  # nothing moved or written
    tic.main(tiny_cfg(sequential_run, strategy="sequential", budget_steps=2, out=out) + ["--overwrite"])
    assert (out / "previous-1" / "step0" / "model.pt").exists() and (out / "previous-1" / "matrix.json").exists()
    assert json.load(open(out / "matrix.json"))["strategy"] == "sequential"
    starts = [json.loads(line) for line in open(out / "log.jsonl") if '"event": "start"' in line]
    assert len(starts) == 1 and starts[0]["config"]["strategy"] == "sequential"  # the log starts over too


def test_a_live_runs_out_is_refused_at_once(tmp_path, capsys):
    import socket
    import subprocess
    out = str(tmp_path / "run")
    holder = subprocess.Popen(["sleep", "60"])  # a live process named as the lock's holder (common.claim_out's format)
    os.makedirs(out)
    with open(os.path.join(out, "run.lock"), "w") as f:
        json.dump({"pid": holder.pid, "host": socket.gethostname(), "started": "now"}, f)
    try:
        with pytest.raises(SystemExit):
            tic.main(tiny_cfg(tmp_path))
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and f"in use by another run (pid {holder.pid}" in err[0]
        assert not (tmp_path / "cache").exists()  # stopped before generating the data
    finally:
        holder.kill()
        holder.wait()


def test_sigterm_to_the_process_group_saves_and_resumes_to_the_same_losses(sequential_run, tmp_path):
    """kill -TERM -PGID with a DataLoader worker: the worker ignores it, the main process saves a checkpoint at
    the current step, shuts its worker down and exits 0; the same command then logs the losses of the run that
    never stopped (the fixture's time step 0: same data, --workers 0, same samples in the same order)."""
    import signal
    import subprocess
    import sys
    import time
    world, data = next((sequential_run / "cache").iterdir()), tmp_path / "data"  # the fixture's time step 0 as --data
    for part in ("step0", "static"):
        shutil.copytree(world / part, data / part)
    tic.write_steps(str(data), [(2014, 2016)], {"step0/train": 600, "step0/val": 40, "step0/eval": 100}, C.SYNTH_SHAPES,
                    "year")
    cmd = [sys.executable, "tic.py"] + tiny_cfg(tmp_path, strategy="cumulative-all", years="2014-2016", workers=1,
                                                log_every=5, data=data)
    env, cwd = dict(os.environ, OMP_NUM_THREADS="1"), os.path.dirname(os.path.abspath(tic.__file__))
    proc = subprocess.Popen(cmd, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                            start_new_session=True)
    log, deadline = tmp_path / "run" / "log.jsonl", time.time() + 120
    while time.time() < deadline and not (log.exists() and '"loss"' in log.read_text()):
        time.sleep(0.1)
    os.killpg(proc.pid, signal.SIGTERM)  # the whole group: the main process and its DataLoader worker
    output = proc.communicate(timeout=60)[0]
    assert proc.returncode == 0 and "stopped in time step 0" in output and "Traceback" not in output, output
    with pytest.raises(ProcessLookupError):  # the worker is gone too
        os.killpg(proc.pid, 0)
    logged = max(json.loads(line).get("step", 0) for line in open(log))
    ckpts = [p.name for p in (tmp_path / "run" / "step0").glob("ckpt-*.pt")]
    assert len(ckpts) == 1 and logged <= int(ckpts[0][5:-3]) < 20, (ckpts, logged)
    done = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, env=env)
    assert done.returncode == 0 and "results: run directory" in done.stdout, done.stdout + done.stderr
    records = lambda p: [json.loads(line) for line in open(p / "run" / "log.jsonl")]
    ref = {r["step"]: r["loss"] for r in records(sequential_run) if "loss" in r and r["time_step"] == 0}
    got = {r["step"]: r["loss"] for r in records(tmp_path) if "loss" in r and r["step"] in ref}
    assert got == ref and len(ref) == 3, (got, ref)
    assert len([r for r in records(tmp_path) if r.get("event") == "start"]) == 2  # each invocation marks its start
