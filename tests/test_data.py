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
