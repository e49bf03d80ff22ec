"""Tar shards: path patterns, exactly-once splitting over ranks and workers, resume, corrupt members."""
import io
import os
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image

import common as C


def make_shards(root, n_shards, per_shard):
    os.makedirs(root, exist_ok=True)
    img = Image.fromarray(np.full((8, 8, 3), 128, np.uint8))
    for j in range(n_shards):
        C.write_shard(os.path.join(root, f"s-{j:05d}.tar"),
                      ({"__key__": f"k{j:03d}{i:04d}", "png": img, "txt": f"caption {j} {i}"} for i in range(per_shard)))
    return sorted(f"k{j:03d}{i:04d}" for j in range(n_shards) for i in range(per_shard))


def key_decode(sample):
    C.decode_caption(sample)
    C.decode_image(sample)
    return {"key": sample["__key__"]}


def test_expand_shards(tmp_path):
    make_shards(str(tmp_path), 3, 2)
    assert len(C.expand_shards(str(tmp_path))) == 3
    assert len(C.expand_shards(str(tmp_path / "s-*.tar"))) == 3
    assert C.expand_shards(str(tmp_path / "s-{00000..00002}.tar")) == C.expand_shards(str(tmp_path))
    assert len(C.expand_shards(str(tmp_path / "s-{00000,00002}.tar"))) == 2
    with pytest.raises(FileNotFoundError, match="does not exist"):
        C.expand_shards(str(tmp_path / "s-{00000..00005}.tar"))


@pytest.mark.parametrize("n_shards", [8, 3])  # more shards than consumers, and fewer
def test_each_sample_once_per_epoch_across_ranks_and_workers(tmp_path, n_shards):
    keys = make_shards(str(tmp_path), n_shards, 5)
    seen = []
    for rank in range(2):
        stream = C.ShardStream(C.expand_shards(str(tmp_path)), key_decode, 3, rank, 2, shuffle_buffer=4,
                               epochs=1, drop_last=False)
        for batch in C.make_loader(stream, 2, False):
            seen += batch["key"]
    assert sorted(seen) == keys


def test_resume_gives_the_same_next_batches(tmp_path):
    make_shards(str(tmp_path), 4, 10)
    shards = C.expand_shards(str(tmp_path))
    full = [b["key"] for _, b in zip(range(12), C.make_loader(C.ShardStream(shards, key_decode, 4, seed=3), 2, False))]
    pos = C.DataPosition()
    for _, b in zip(range(5), C.make_loader(C.ShardStream(shards, key_decode, 4, seed=3), 2, False)):
        pos.update(b)
    resumed = C.ShardStream(shards, key_decode, 4, seed=3, start_pos=pos.state()[0], start_batch=5)
    rest = [b["key"] for _, b in zip(range(7), C.make_loader(resumed, 2, False))]
    assert rest == full[5:]
    assert len({k for b in full for k in b}) == 40  # 12 batches of 4 span more than one epoch of 40


def write_corrupt_shard(path):
    good = io.BytesIO()
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(good, format="JPEG")
    good = good.getvalue()
    members = [("a.jpg", good), ("a.txt", b"fine"),                # good
               ("b.jpg", good[: len(good) // 2]), ("b.txt", b"x"),   # truncated JPEG
               ("c.jpg", b"garbage bytes"), ("c.txt", b"x"),         # not an image
               ("d.jpg", good),                                      # no caption
               ("e.jpg", good), ("e.txt", b"   "),                   # empty caption
               ("f.jpg", good), ("f.txt", b"\xff\xfe\xfa"),          # invalid UTF-8
               ("g.txt", b"no image"),                               # no image
               ("h.jpg", good), ("h.txt", b"fine too")]              # good
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def test_corrupt_members_are_skipped_and_counted(tmp_path):
    write_corrupt_shard(str(tmp_path / "bad.tar"))
    decode = C.ImageTextDecode(lambda texts, n: torch.zeros(len(texts), n, dtype=torch.long), 8, 4)
    stream = C.ShardStream([str(tmp_path / "bad.tar")], decode, 1, epochs=1, drop_last=False, shuffle_buffer=1)
    batches = list(stream)
    assert sorted(c for b in batches for c in b["caption"]) == ["fine", "fine too"]
    skipped = batches[-1]["__skipped__"]
    assert sum(skipped.values()) == 6  # b..g
    assert {"KeyError", "UnicodeDecodeError", "ValueError"} <= set(skipped)


def test_tar_cut_mid_member_ends_the_shard_and_is_counted(tmp_path):
    write_corrupt_shard(str(tmp_path / "bad.tar"))
    data = open(tmp_path / "bad.tar", "rb").read()
    with open(tmp_path / "cut.tar", "wb") as f:
        f.write(data[: len(data) // 2])
    skipped = {}
    keys = [s["__key__"] for s in C.iter_tar_samples(str(tmp_path / "cut.tar"), skipped)]
    assert keys[:3] == ["a", "b", "c"] and "h" not in keys
    assert skipped == {"broken_tar:ReadError": 1}


# ---- torchvision at the core: transforms, decode, shard sources, ImageFolder --------------------------------


def photo(w, h, seed=0):
    """A smooth random image (JPEG-compresses like a photo) of size w x h."""
    rng = np.random.default_rng(seed)
    return Image.fromarray((rng.random((9, 12, 3)) * 255).astype(np.uint8)).resize((w, h), Image.BICUBIC)


@pytest.mark.parametrize("wh", [(513, 385), (97, 301), (224, 224), (301, 97), (640, 223)])
def test_eval_transform_is_openclips(wh):
    """OpenCLIP's eval transform is torchvision's Resize(size, bicubic) + CenterCrop(size) on the PIL image."""
    import torchvision.transforms as T
    img = photo(*wh, seed=wh[0])
    ref = torch.from_numpy(np.array(T.Compose([T.Resize(224, T.InterpolationMode.BICUBIC), T.CenterCrop(224)])(img)))
    ref = ref.permute(2, 0, 1).int()
    assert (C.eval_transform(img, 224).int() - ref).abs().max() <= 1  # PIL path: OpenCLIP's pixels
    tensor = torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1)
    assert (C.eval_transform(tensor, 224).int() - ref).abs().max() <= 3  # the tensor resize, for reference
    path = f"/tmp/effclip-eval-{wh[0]}x{wh[1]}.png"
    img.save(path)
    assert torch.equal(C.eval_images([path], 224)[0], C.eval_transform(img, 224))


class TorchDraws:
    """random.Random's uniform/randint answered from torch's global generator, in the calls that torchvision's
    RandomResizedCrop.get_params makes, so that both draw the same numbers."""

    def uniform(self, a, b):
        return torch.empty(1).uniform_(a, b).item()

    def randint(self, a, b):
        return torch.randint(a, b + 1, size=(1,)).item()


@pytest.mark.parametrize("wh,scale", [((512, 384), (0.9, 1.0)), ((512, 384), (0.08, 1.0)), ((1000, 90), (0.9, 1.0)),
                                      ((90, 1000), (0.5, 1.0)), ((37, 41), (1.0, 1.0))])
def test_random_resized_crop_box_is_torchvisions(wh, scale):
    """Same draws, same boxes as torchvision's RandomResizedCrop, its fallback included (a very wide or tall
    image, or scale 1: the whole image cut to the nearest allowed aspect ratio, centred)."""
    import torchvision.transforms as T
    w, h = wh
    img = Image.new("RGB", (w, h))
    fallbacks = 0
    for seed in range(300):
        torch.manual_seed(seed)
        top, left, ch, cw = T.RandomResizedCrop.get_params(img, scale, (3 / 4, 4 / 3))
        torch.manual_seed(seed)
        got = C.random_resized_crop_box(w, h, TorchDraws(), scale)
        # torchvision's log-ratio bounds are float32 tensors; ours are float64: identical in all these draws
        assert got == (left, top, left + cw, top + ch), seed
        fallbacks += (cw, ch) in {(w, h), (min(w, round(h * 4 / 3)), min(h, round(w * 4 / 3)))}
    if wh in {(1000, 90), (90, 1000)}:
        assert fallbacks > 0


def test_decode_image_tensor_matches_pil_and_falls_back():
    buf = io.BytesIO()
    photo(512, 384).save(buf, format="JPEG", quality=90)
    jpg = buf.getvalue()
    ours, pil = C.decode_image_tensor({"jpg": jpg}), C.decode_image({"jpg": jpg})
    assert ours.shape == (3, 384, 512) and ours.dtype == torch.uint8
    assert (ours.int() - torch.from_numpy(np.array(pil)).permute(2, 0, 1).int()).abs().float().mean() < 1.0
    png = io.BytesIO()
    Image.fromarray(np.arange(48, dtype=np.uint8).reshape(4, 12), "L").save(png, format="PNG")  # grey PNG: PIL
    x = C.decode_image_tensor({"png": png.getvalue()})
    assert x.shape == (3, 4, 12) and (x[0] == x[2]).all()
    for bad in (jpg[: len(jpg) // 2], b"\xff\xd8\xff not a jpeg", b"garbage"):
        with pytest.raises(Exception):
            C.decode_image_tensor({"jpg": bad})


def test_train_decode_is_the_crop_of_the_box():
    """ImageTextDecode(train) = decode_jpeg + the sample's RandomResizedCrop box + antialiased bicubic resize,
    within a few grey levels of PIL's resize of the same box; the crop is fixed by (seed, epoch, key)."""
    buf = io.BytesIO()
    photo(512, 384, seed=3).save(buf, format="JPEG", quality=90)
    sample = {"__key__": "k", "jpg": buf.getvalue(), "txt": b"a photo"}
    decode = C.ImageTextDecode(lambda texts, n: torch.zeros(len(texts), n, dtype=torch.long), 224, 4, seed=5)
    x = decode(dict(sample))["image"]
    assert torch.equal(x, decode(dict(sample))["image"])
    box = C.random_resized_crop_box(512, 384, C.sample_rng(5, sample), (0.9, 1.0))
    ref = C.image_to_uint8(C.decode_image(sample), 224, box)  # PIL's resize
    assert (x.int() - ref.int()).abs().float().mean() < 1.0


def test_pipe_and_brace_sources_on_real_tars(tmp_path, capsys):
    keys = make_shards(str(tmp_path), 3, 4)
    spec = f"pipe:cat {tmp_path}/s-{{00000..00002}}.tar"
    srcs = C.expand_shards(spec + f"::pipe:cat {tmp_path}/missing.tar")
    assert srcs[:3] == [f"pipe:cat {tmp_path}/s-{i:05d}.tar" for i in range(3)] and len(srcs) == 4
    stream = C.ShardStream(srcs, key_decode, 5, epochs=1, drop_last=False)
    batches = list(stream)
    assert sorted(k for b in batches for k in b["key"]) == keys  # streamed through the pipes, all once
    assert batches[-1]["__skipped__"] == {"pipe_failed": 1}  # the failing command: counted, skipped
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "pipe:cat" in err and "missing.tar" in err and "exit status 1" in err


def test_every_shard_failing_stops_with_one_line(tmp_path, capsys):
    stream = C.ShardStream(["pipe:exit 3", "pipe:false"], key_decode, 2)
    with pytest.raises(SystemExit):
        next(iter(C.make_loader(stream, 1, False)))  # from a worker process: one line, no traceback
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: no usable sample") and "pipe_failed 2" in err[-1]
    write_corrupt_shard(str(tmp_path / "bad.tar"))  # samples, but none usable: stops too (no endless loop)
    with pytest.raises(C.DataError, match="skipped: .*KeyError"):
        next(iter(C.ShardStream([str(tmp_path / "bad.tar")], lambda s: C.decode_image(s) and {}[0], 2)))


def test_http_source(tmp_path):
    """An http:// shard streams through urllib (a server on the loopback address, serving tmp_path)."""
    import functools
    import http.server
    import threading
    keys = make_shards(str(tmp_path), 2, 3)
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(tmp_path))
    handler.log_message = lambda *a: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_port}/s-{{00000..00001}}.tar"
        skipped = {}
        got = [s["__key__"] for src in C.expand_shards(url) for s in C.iter_tar_samples(src, skipped)]
        assert sorted(got) == keys and skipped == {}
        list(C.iter_tar_samples(url.replace("{00000..00001}", "00009"), skipped))  # 404: counted
        assert skipped == {"broken_tar:HTTPError": 1}
    finally:
        server.shutdown()


def test_image_folder_is_torchvisions(tmp_path):
    from torchvision.datasets import ImageFolder
    img = Image.new("RGB", (4, 4))
    for rel in ["b_cls/x.jpg", "b_cls/deep/er/y.PNG", "a_cls/z.bmp", "a_cls/w.webp", "a_cls/v.tif", "a_cls/n.txt",
                "c cls/u.ppm", "c cls/.hidden/t.jpeg"]:
        os.makedirs(os.path.dirname(tmp_path / rel), exist_ok=True)
        if rel.endswith(".txt"):
            open(tmp_path / rel, "w").write("not an image")
        else:
            img.save(tmp_path / rel, format={"jpg": "JPEG", "jpeg": "JPEG", "tif": "TIFF"}.get(
                rel.rsplit(".", 1)[1].lower(), rel.rsplit(".", 1)[1].upper()))
    items, names = C.image_folder(str(tmp_path))
    ref = ImageFolder(str(tmp_path))
    assert items == ref.samples and len(items) == 7
    assert names == ["a cls", "b cls", "c cls"] and [n.replace(" ", "_") for n in names[:2]] == ref.classes[:2]


def test_a_data_stop_with_live_workers_exits(tmp_path):
    """Workers ignore SIGTERM, which is also how multiprocessing ends daemon processes at exit: a run that stops
    with one line while two workers are alive must still exit (it hung before common.kill_workers_at_exit)."""
    import subprocess
    import sys
    make_shards(str(tmp_path), 2, 3)
    code = ("import sys; import common as C\n"
            "def bad(s): raise ValueError('bad')\n"
            "for b in C.make_loader(C.ShardStream(sys.argv[1:], bad, 2), 2, False): pass\n")
    shards = [str(p) for p in sorted(tmp_path.glob("*.tar"))]
    r = subprocess.run([sys.executable, "-c", code, *shards], capture_output=True, text=True, timeout=300,
                       cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert r.returncode == 2 and r.stderr.strip().startswith("error: no usable sample") and "ValueError 3" in r.stderr
