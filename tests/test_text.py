"""Tests for painter.checkpoint.tokenizer: the default vocab, the WordPiece tokenizer, vocab files."""

import hashlib
import pickle

import numpy as np
import pytest

from painter.checkpoint.tokenizer import PAD_TOKEN, UNK_TOKEN, TextTokenizer, default_vocab

CAPTION = "蓝色背景上的一个大的红色圆形"


@pytest.fixture(scope="module")
def tok():
    return TextTokenizer.default()


def small_vocab(pad_first=True):
    base = [UNK_TOKEN, "红", "色", "圆", "形", "蓝", "的", "a", "b", "c", "abc", "##b", "##c"]
    base += ["##d", "d", "t", "恤", "，", "。", "shirt", "##s", "s", "h", "i", "r", "x", "y", "z"]
    vocab = [PAD_TOKEN] + base if pad_first else base[:5] + [PAD_TOKEN] + base[5:]
    assert len(vocab) == 29
    return vocab


# --- default vocab -----------------------------------------------------------------------------


def test_default_vocab_layout():
    v = default_vocab()
    assert len(v) == 21128
    assert len(set(v)) == len(v)
    assert v[0] == "[PAD]" and v[100] == "[UNK]"
    assert v[101:104] == ["[CLS]", "[SEP]", "[MASK]"]
    assert v[1:100] == [f"[unused{i}]" for i in range(1, 100)]
    for ch in ("红", "圆", "形", "，", "。", "a", "0", "##a", "##9", "一", "龙", "龟", "鹤"):
        assert ch in v, ch
    assert not any(c in v for c in "ABCZ")  # uppercase never survives lowercasing


def test_default_vocab_deterministic_and_copied():
    a = default_vocab()
    a[0] = "mutated"
    b = default_vocab()
    assert b[0] == "[PAD]"
    assert b == default_vocab()
    assert TextTokenizer.default().vocab_hash == TextTokenizer.default().vocab_hash


def test_default_vocab_common_cjk_all_present():
    v = set(default_vocab())
    # every ideograph found in a common legacy charset (GB2312 simplified, Big5-HKSCS
    # traditional, CP932 Japanese, EUC-KR) is in the vocab; only rare ones were dropped to fit
    missing = []
    for cp in range(0x4E00, 0xA000):
        ch = chr(cp)
        for charset in ("gb2312", "big5hkscs", "cp932", "euc_kr"):
            try:
                ch.encode(charset)
            except UnicodeEncodeError:
                continue
            if ch not in v:
                missing.append(ch)
            break
    assert missing == []
    n_cjk = sum(1 for t in v if len(t) == 1 and 0x4E00 <= ord(t) <= 0x9FFF)
    assert n_cjk > 20800


def test_default_vocab_hash_pinned():
    # Changing the default vocab silently would scramble the text ids of every model trained on
    # it; if this fails on purpose, bump the pin and say so in the changelog.
    expected = "f70ccc58ec498219626ee211c0f81dbeb8e53ab140927e73f8672f2df739829b"
    assert TextTokenizer.default().vocab_hash == expected


# --- encoding ----------------------------------------------------------------------------------


def test_caption_one_id_per_char_and_roundtrip(tok):
    ids = tok.encode(CAPTION)
    vocab = tok.vocab
    assert len(ids) == 32 == tok.text_len
    expected = [vocab.index(ch) for ch in CAPTION]
    assert ids[: len(CAPTION)] == expected
    assert ids[len(CAPTION):] == [tok.pad_id] * (32 - len(CAPTION))
    assert tok.pad_id == 0 and tok.unk_id == 100
    assert tok.unk_id not in ids
    assert tok.text_from_ids(ids) == CAPTION
    assert tok.text_from_ids(np.asarray(ids, dtype=np.int32)) == CAPTION


def test_lowercasing(tok):
    assert tok.encode("T恤") == tok.encode("t恤")
    assert tok.encode("HELLO World") == tok.encode("hello world")
    assert tok.encode("T恤")[0] != tok.unk_id


def test_wordpieces_default_vocab(tok):
    assert tok.tokenize("hello") == ["h", "##e", "##l", "##l", "##o"]
    assert tok.tokenize("iPhone15。") == ["i", "##p", "##h", "##o", "##n", "##e", "##1", "##5", "。"]
    assert tok.text_from_ids(tok.encode("我喜欢iPhone15，")) == "我喜欢iphone15，"


def test_wordpieces_custom_vocab():
    t = TextTokenizer(small_vocab(), text_len=8)
    v = t.vocab
    # whole word in vocab wins over pieces; otherwise greedy longest-match pieces
    assert t.tokenize("abc") == ["abc"]
    assert t.tokenize("abcd") == ["abc", "##d"]
    assert t.tokenize("shirts") == ["shirt", "##s"]
    assert t.encode("abcd")[:2] == [v.index("abc"), v.index("##d")]
    assert t.text_from_ids(t.encode("abcd T恤")) == "abcd t恤"


def test_unknown_characters(tok):
    ids = tok.encode("红😀")
    assert ids[:2] == [tok.vocab.index("红"), tok.unk_id]
    assert tok.encode("𠀀")[0] == tok.unk_id  # CJK Extension B: outside the vocab
    assert tok.encode("红𠀀色")[:3] == [tok.vocab.index("红"), tok.unk_id, tok.vocab.index("色")]
    assert "[UNK]" in tok.text_from_ids(ids)


def test_no_cls_sep(tok):
    ids = tok.encode("红")
    assert 101 not in ids and 102 not in ids
    assert ids[1:] == [tok.pad_id] * 31


def test_truncation_flag(tok):
    long = ("红色圆形" * 13)[:50]
    assert len(long) == 50
    ids, trunc = tok.encode_batch([long, CAPTION, "红" * 32, "红" * 33])
    assert ids.shape == (4, 32) and ids.dtype == np.int32
    assert trunc.dtype == np.bool_
    assert trunc.tolist() == [True, False, False, True]
    assert ids[0].tolist() == [tok.vocab.index(c) for c in long[:32]]
    assert tok.pad_id not in ids[0].tolist()
    assert tok.encode(long) == ids[0].tolist()


def test_encode_batch_matches_encode(tok):
    texts = [CAPTION, "", "T恤 Hello, world!", "😀😀", "一只猫" * 20, "abc123 ２０２３年"]
    ids, trunc = tok.encode_batch(texts)
    assert ids.tolist() == [tok.encode(t) for t in texts]
    assert ids[1].tolist() == [tok.pad_id] * 32
    assert trunc.tolist() == [False, False, False, False, True, False]
    empty_ids, empty_trunc = tok.encode_batch([])
    assert empty_ids.shape == (0, 32) and empty_trunc.shape == (0,)


# --- custom vocabs, files, hashes --------------------------------------------------------------


def test_small_vocab_pads_with_own_pad_id():
    t = TextTokenizer(small_vocab(pad_first=True), text_len=6)
    assert t.vocab_size == 29 and t.pad_id == 0 and t.unk_id == 1
    assert t.encode("红色") == [t.vocab.index("红"), t.vocab.index("色"), 0, 0, 0, 0]

    t2 = TextTokenizer(small_vocab(pad_first=False), text_len=6)
    assert t2.pad_id == 5 and t2.vocab[5] == PAD_TOKEN and t2.unk_id == 0
    ids = t2.encode("红色")
    assert ids == [t2.vocab.index("红"), t2.vocab.index("色"), 5, 5, 5, 5]
    assert t2.encode("蛋")[0] == t2.unk_id == 0  # not in this vocab
    assert t2.text_from_ids(ids) == "红色"
    ids_b, trunc = t2.encode_batch(["红色圆形蓝的红", "红"])
    assert ids_b[1].tolist() == [t2.vocab.index("红"), 5, 5, 5, 5, 5]
    assert trunc.tolist() == [True, False]


def test_invalid_vocabs_rejected():
    with pytest.raises(ValueError, match="PAD"):
        TextTokenizer([UNK_TOKEN, "a"])
    with pytest.raises(ValueError, match="UNK"):
        TextTokenizer([PAD_TOKEN, "a"])
    with pytest.raises(ValueError, match="duplicate"):
        TextTokenizer([PAD_TOKEN, UNK_TOKEN, "a", "a"])
    with pytest.raises(ValueError):
        TextTokenizer([PAD_TOKEN, UNK_TOKEN], text_len=0)


def test_save_from_file_roundtrip(tmp_path, tok):
    path = tmp_path / "vocab.txt"
    tok.save(str(path))
    lines = path.read_text(encoding="utf-8").split("\n")
    assert lines[0] == "[PAD]" and lines[100] == "[UNK]" and lines[-1] == ""
    assert len(lines) == 21129
    loaded = TextTokenizer.from_file(str(path))
    assert loaded.vocab == tok.vocab
    assert loaded.vocab_hash == tok.vocab_hash
    texts = [CAPTION, "T恤 hello", "😀" + "红" * 40]
    assert np.array_equal(loaded.encode_batch(texts)[0], tok.encode_batch(texts)[0])
    assert TextTokenizer.from_file(str(path), text_len=8).encode(CAPTION) == tok.encode(CAPTION)[:8]


def test_from_file_bert_style_and_crlf(tmp_path):
    path = tmp_path / "vocab.txt"
    path.write_bytes("[PAD]\r\n[UNK]\r\n红\r\n色\r\n".encode("utf-8"))
    t = TextTokenizer.from_file(str(path), text_len=4)
    assert t.vocab == ["[PAD]", "[UNK]", "红", "色"]
    assert t.encode("红色蓝") == [2, 3, 1, 0]


def test_vocab_hash_definition_and_sensitivity(tmp_path):
    v = small_vocab()
    t = TextTokenizer(v)
    assert t.vocab_hash == hashlib.sha256("\n".join(v).encode("utf-8")).hexdigest()
    assert TextTokenizer(v, text_len=7).vocab_hash == t.vocab_hash  # independent of text_len
    swapped = v[:2] + [v[3], v[2]] + v[4:]
    assert TextTokenizer(swapped).vocab_hash != t.vocab_hash  # order matters
    assert TextTokenizer(v + ["新"]).vocab_hash != t.vocab_hash
    assert TextTokenizer.default().vocab_hash != t.vocab_hash
    path = tmp_path / "small.txt"
    t.save(str(path))
    assert TextTokenizer.from_file(str(path)).vocab_hash == t.vocab_hash


def test_fsspec_memory_url():
    t = TextTokenizer(small_vocab(pad_first=False), text_len=5)
    t.save("memory://painter-test/vocab.txt")
    loaded = TextTokenizer.from_file("memory://painter-test/vocab.txt", text_len=5)
    assert loaded.vocab_hash == t.vocab_hash and loaded.pad_id == 5
    assert loaded.encode("红色") == t.encode("红色")


def test_pickle_roundtrip(tok):
    clone = pickle.loads(pickle.dumps(TextTokenizer.default(text_len=16)))
    assert clone.text_len == 16 and clone.vocab_hash == tok.vocab_hash
    assert clone.encode(CAPTION) == tok.encode(CAPTION)[:16]


def test_text_from_ids_rejects_out_of_range(tok):
    with pytest.raises(ValueError):
        tok.text_from_ids([tok.vocab_size])
