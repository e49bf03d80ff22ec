"""Tests for the CLIP BPE tokenizer. No download, no network: most tests train a
small vocabulary on the fly; parity with the real CLIP vocabulary is checked
only when CLIP_BPE_PATH points at bpe_simple_vocab_16e6.txt.gz."""
import gzip
import os

import pytest
import torch

from common import Tokenizer, train_bpe

CORPUS = [
    "A photo of a dog playing in the park.",
    "Two cats sleeping on a red sofa, next to a window.",
    "It's a sunny day at the beach; people are swimming!",
    "A man riding a bicycle down a busy city street.",
    "Close-up of a bowl of fruit: apples, bananas and grapes.",
    "The 3 children are playing football on the grass.",
    "A café in Paris with crème brûlée on the menu.",
    "Snow-covered mountains under a clear blue sky.",
    "Fish &amp; chips served with a slice of lemon.",
    "An old red car parked outside a small house.",
] * 20

# Ids from the original CLIP tokenizer (open_clip SimpleTokenizer, standard vocab).
CLIP_EXPECTED = [
    ("a photo of a cat.", [320, 1125, 539, 320, 2368, 269]),
    ("It's a DOG's life, isn't it?", [585, 568, 320, 1929, 568, 970, 267, 2923, 713, 585, 286]),
    ("3.14 and 1,000 and 2nd", [274, 269, 272, 275, 537, 272, 267, 271, 271, 271, 537, 273, 1764]),
    ("Crème brûlée à la café", [1075, 12138, 614, 711, 127, 119, 75, 13489, 21259, 1210, 15304]),
    ("東京タワー 한국어", [48338, 21078, 105, 34941, 2429, 107, 30391, 15197, 250, 31871, 255, 31625, 368]),
    ("😀👍🏽 ❤️", [12832, 43722, 1752]),
    ("fish &amp; chips &lt;3", [2759, 261, 8855, 283, 274]),
    ("don’t “quote” ﬁne ＡＢＣ", [847, 713, 257, 4020, 257, 3797, 5334]),
    ("hello    world\n\tnew line", [3306, 1002, 686, 1148]),
    ("", []),
    ("x²+½ Ⅻ", [343, 41175, 266, 33613, 158, 227, 375]),
    ("<start_of_text> <end_of_text>", [49406, 49407]),
]


@pytest.fixture(scope="module")
def small():
    return Tokenizer(merges=train_bpe(CORPUS, vocab_size=700))


def test_small_vocab_layout(small):
    assert len(small.merges) <= 700 - 514
    assert small.vocab_size == 512 + len(small.merges) + 2
    assert (small.sot_token, small.eot_token) == (small.vocab_size - 2, small.vocab_size - 1)
    # The learned merges make frequent words shorter than their byte count.
    assert len(small.encode("a photo of a dog")) < len("a photo of a dog")


def test_call_shapes_and_padding(small):
    texts = ["a photo of a dog", "", "two cats on a sofa."]
    out = small(texts)
    assert out.dtype == torch.long and out.shape == (3, 77)
    for row, text in zip(out.tolist(), texts):
        ids = small.encode(text)
        assert row[0] == small.sot_token
        assert row[1:1 + len(ids)] == ids
        assert row[1 + len(ids)] == small.eot_token
        assert all(v == 0 for v in row[2 + len(ids):])
    assert small("a single string").shape == (1, 77)
    assert small(texts, context_length=16).shape == (3, 16)


def test_truncation_keeps_eot_last(small):
    long_text = " ".join(CORPUS[:10])
    ids = small.encode(long_text)
    assert len(ids) > 77
    row = small(long_text)[0].tolist()
    assert row[0] == small.sot_token and row[-1] == small.eot_token
    assert row[1:76] == ids[:75]


def test_decode_round_trip(small):
    for text in ["a photo of a dog", "two cats sleeping on a red sofa", "zebra quokka"]:
        assert small.decode(small.encode(text)) == text
    # Punctuation becomes its own word; cleaning lower-cases and unescapes HTML.
    assert small.decode(small.encode("Fish &amp; Chips, please!")) == "fish & chips , please !"
    # A padded row from __call__ decodes to the same text.
    assert small.decode(small(["a café in paris"])[0]) == "a café in paris"


def test_unseen_bytes_still_encode(small):
    text = "東京 😀 ñandú"
    ids = small.encode(text)
    assert all(0 <= i < small.vocab_size for i in ids)
    assert small.decode(ids) == text


def test_save_load_round_trip(small, tmp_path):
    path = tmp_path / "merges.txt"
    small.save(path)
    again = Tokenizer(str(path))
    assert again.merges == small.merges and again.vocab_size == small.vocab_size
    assert torch.equal(again(CORPUS[:10]), small(CORPUS[:10]))


def test_gzipped_merges_file(small, tmp_path):
    path = tmp_path / "merges.txt.gz"
    lines = ["#version: 0.2"] + [f"{a} {b}" for a, b in small.merges]
    path.write_bytes(gzip.compress(("\n".join(lines) + "\n").encode("utf-8")))
    assert Tokenizer(path).encode(CORPUS[0]) == small.encode(CORPUS[0])


def test_missing_file_is_a_clear_error(tmp_path):
    missing = tmp_path / "nope.txt.gz"
    with pytest.raises(FileNotFoundError, match="nope.txt.gz"):
        Tokenizer(str(missing))


def test_malformed_file_is_a_clear_error(tmp_path):
    bad = tmp_path / "bad.txt"
    bad.write_text("#version: 0.2\na b\nthis line has three\n", encoding="utf-8")
    with pytest.raises(ValueError, match="bad.txt"):
        Tokenizer(str(bad))
    empty = tmp_path / "empty.txt"
    empty.write_text("", encoding="utf-8")
    with pytest.raises(ValueError, match="empty.txt"):
        Tokenizer(str(empty))
    with pytest.raises(ValueError):
        Tokenizer()


CLIP_BPE_PATH = os.environ.get("CLIP_BPE_PATH")


@pytest.mark.skipif(not CLIP_BPE_PATH, reason="set CLIP_BPE_PATH to bpe_simple_vocab_16e6.txt.gz")
def test_matches_original_clip_ids():
    tok = Tokenizer(CLIP_BPE_PATH)
    assert (tok.vocab_size, tok.sot_token, tok.eot_token) == (49408, 49406, 49407)
    for text, expected in CLIP_EXPECTED:
        assert tok.encode(text) == expected, text
    row = tok("a photo of a cat.")[0].tolist()
    assert row[:8] == [49406, 320, 1125, 539, 320, 2368, 269, 49407] and not any(row[8:])
