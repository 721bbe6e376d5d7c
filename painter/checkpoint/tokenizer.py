"""Text side of painter: the Chinese WordPiece tokenizer and its vocabulary.

This module owns
  * ``TextTokenizer`` -- BERT-style (bert-base-chinese compatible) WordPiece tokenization on the
    ``tokenizers`` library: clean + lowercase + strip accents, every CJK ideograph its own token,
    punctuation split off, no [CLS]/[SEP] added, truncation/padding to a fixed ``text_len``. As in
    EasyNLP's BertTokenizer, the special tokens [PAD], [UNK], [CLS], [SEP] and [MASK] typed into a
    text (exactly so, case included) stay single tokens; and the normalisation settings of a
    ``tokenizer_config.json`` beside ``vocab.txt`` (``do_lower_case``, ``strip_accents``,
    ``tokenize_chinese_chars``) are honoured (``TokenizerSettings``);
  * ``default_vocab()`` -- a 21128-entry vocabulary the project generates itself (no download),
    sized and laid out like bert-base-chinese's ``vocab.txt`` so its ids fit the pai-painter text
    embedding: [PAD]=0, [unused1..99]=1..99, [UNK]=100, [CLS]=101, [SEP]=102, [MASK]=103;
  * reading and writing ``vocab.txt`` files (one token per line, id = line number), locally or
    on any fsspec URL such as ``s3://``.

To reproduce a pai-painter checkpoint's text ids exactly, load that checkpoint's own
``vocab.txt`` with ``TextTokenizer.from_file``; ``default()`` is for models trained here.

``vocab_hash`` is the sha256 hex digest of ``"\\n".join(vocab).encode("utf-8")``: it depends only
on the token list and its order (not on ``text_len`` or the file's trailing newline), so it can be
stored next to a model to check that the same vocabulary is used at inference. Settings other than
the defaults are appended to the hashed text (``"\\n#settings " + JSON``), since they change the ids.
"""

from __future__ import annotations

import codecs
import collections
import dataclasses
import functools
import hashlib
import json
import posixpath
from typing import Iterable, Sequence

import numpy as np
from tokenizers import AddedToken, Tokenizer
from tokenizers.models import WordPiece
from tokenizers.normalizers import BertNormalizer
from tokenizers.pre_tokenizers import BertPreTokenizer

from painter.io.storage import Storage, as_storage

PAD_TOKEN = "[PAD]"
UNK_TOKEN = "[UNK]"
CLS_TOKEN = "[CLS]"
SEP_TOKEN = "[SEP]"
MASK_TOKEN = "[MASK]"
SPECIAL_TOKENS = (PAD_TOKEN, UNK_TOKEN, CLS_TOKEN, SEP_TOKEN, MASK_TOKEN)  # BertTokenizer's, kept whole
SETTINGS_FILE = "tokenizer_config.json"  # beside vocab.txt, as in Hugging Face / EasyNLP directories

DEFAULT_VOCAB_SIZE = 21128  # len(bert-base-chinese vocab.txt) == pai-painter text vocab size
MAX_INPUT_CHARS_PER_WORD = 100

# Punctuation common in Chinese text (besides ASCII and the fullwidth block, added separately).
_CJK_PUNCTUATION = "、。，．！？：；“”‘’（）《》【】「」『』…—～·〈〉〔〕〖〗・〃￥"
_CJK_FIRST, _CJK_LAST = 0x4E00, 0x9FFF  # CJK Unified Ideographs block
_CJK_UNICODE_1_1_LAST = 0x9FA5  # end of the original (Unicode 1.1 / GBK) ideographs
# Legacy character sets: an ideograph in none of them is taken as rare (see _ideographs).
_LEGACY_CHARSETS = ("gb2312", "big5hkscs", "cp932", "euc_kr")


@dataclasses.dataclass(frozen=True)
class TokenizerSettings:
    """BertTokenizer's normalisation switches (``tokenizer_config.json``); the defaults are bert-base-chinese's."""
    do_lower_case: bool = True
    strip_accents: bool | None = None  # None: follow do_lower_case, exactly like BERT
    tokenize_chinese_chars: bool = True

    @classmethod
    def from_config(cls, d: dict, source: str = SETTINGS_FILE) -> "TokenizerSettings":
        values = {f.name: d[f.name] for f in dataclasses.fields(cls) if d.get(f.name) is not None}
        for name, value in values.items():
            if not isinstance(value, bool):
                raise ValueError(f"{source}: {name} must be true or false, got {value!r}")
        return cls(**values)

    @property
    def is_default(self) -> bool:
        return self == TokenizerSettings()


def _bert_normalizer(settings: TokenizerSettings = TokenizerSettings()) -> BertNormalizer:
    return BertNormalizer(clean_text=True, handle_chinese_chars=settings.tokenize_chinese_chars,
                          strip_accents=settings.strip_accents, lowercase=settings.do_lower_case)


def _in_any_legacy_charset(ch: str) -> bool:
    for name in _LEGACY_CHARSETS:
        try:
            codecs.encode(ch, name)
            return True
        except UnicodeEncodeError:
            continue
    return False


def _ideographs(budget: int) -> list[str]:
    """Ideographs of U+4E00..U+9FFF in code-point order, at most ``budget`` of them.

    The block has 20992 characters, more than fit beside BERT's 104 special slots, the
    ASCII/punctuation/fullwidth characters and the ``##`` pieces in 21128 entries. When it does
    not fit, only rare ideographs -- those in none of GB2312, Big5-HKSCS, CP932 (Japanese) or
    EUC-KR -- are dropped, in this fixed order: first the late additions U+9FA6..U+9FFF
    (Unicode 4.1 and later) from the highest code point down, then those of U+4E00..U+9FA5
    from the lowest code point up.
    """
    block = [chr(cp) for cp in range(_CJK_FIRST, _CJK_LAST + 1)]
    excess = len(block) - budget
    if excess <= 0:
        return block
    late = [c for c in reversed(block) if ord(c) > _CJK_UNICODE_1_1_LAST]
    early = [c for c in block if ord(c) <= _CJK_UNICODE_1_1_LAST]
    drop: set[str] = set()
    for ch in late + early:
        if len(drop) >= excess:
            break
        if not _in_any_legacy_charset(ch):
            drop.add(ch)
    if len(drop) < excess:
        raise ValueError(f"cannot fit the CJK block into {budget} vocab entries")
    return [c for c in block if c not in drop]


def _surviving(chars: Iterable[str], seen: set[str]) -> list[str]:
    """The characters that BertNormalizer leaves unchanged, not already in ``seen``, in order."""
    normalizer = _bert_normalizer()
    out = []
    for ch in chars:
        if ch not in seen and normalizer.normalize_str(ch) == ch:
            seen.add(ch)
            out.append(ch)
    return out


@functools.lru_cache(maxsize=1)
def _default_vocab_tuple() -> tuple[str, ...]:
    head = [PAD_TOKEN] + [f"[unused{i}]" for i in range(1, 100)]
    head += [UNK_TOKEN, CLS_TOKEN, SEP_TOKEN, MASK_TOKEN]
    seen: set[str] = set(head)
    ascii_chars = [chr(cp) for cp in range(0x21, 0x7F)]  # printable, no space; A-Z lowercased away
    fullwidth = [chr(cp) for cp in range(0xFF01, 0xFF5F)]  # ！..～; Ａ-Ｚ lowercased away
    singles = _surviving(ascii_chars, seen) + _surviving(_CJK_PUNCTUATION, seen)
    singles += _surviving(fullwidth, seen)
    continuation_chars = "abcdefghijklmnopqrstuvwxyz0123456789０１２３４５６７８９"
    pieces = [f"##{ch}" for ch in continuation_chars]
    budget = DEFAULT_VOCAB_SIZE - len(head) - len(singles) - len(pieces)
    ideographs = _ideographs(budget)
    vocab = head + singles + ideographs + pieces
    vocab += [f"[unused{i}]" for i in range(100, 100 + DEFAULT_VOCAB_SIZE - len(vocab))]
    assert len(vocab) == DEFAULT_VOCAB_SIZE and len(set(vocab)) == len(vocab)
    return tuple(vocab)


def default_vocab() -> list[str]:
    """The project's own 21128-entry Chinese vocabulary (deterministic; a fresh list each call).

    Layout: [PAD], [unused1]..[unused99], [UNK], [CLS], [SEP], [MASK] (ids 0..103, as in
    bert-base-chinese); printable ASCII except A-Z and space; CJK punctuation; the fullwidth
    forms U+FF01..U+FF5E except Ａ-Ｚ; the CJK Unified Ideographs (all but the rare ones
    ``_ideographs`` drops to fit); ``##`` pieces for a-z, 0-9 and ０-９; then [unused100]...
    fillers if any room is left.
    """
    return list(_default_vocab_tuple())


def read_settings(vocab_path: str, storage: Storage | None = None) -> TokenizerSettings:
    """The ``tokenizer_config.json`` beside ``vocab_path``, or the defaults when there is none."""
    storage = as_storage(storage)
    path = posixpath.join(posixpath.dirname(str(vocab_path)), SETTINGS_FILE)
    if not storage.exists(path):
        return TokenizerSettings()
    with storage.open(path, "r", encoding="utf-8") as f:
        try:
            d = json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(d, dict):
        raise ValueError(f"{path}: expected a JSON object")
    return TokenizerSettings.from_config(d, path)


def _read_vocab(path: str, storage: Storage | None = None) -> list[str]:
    text = as_storage(storage).read_text(path)
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()  # trailing newline
    return [line[:-1] if line.endswith("\r") else line for line in lines]


def _is_tight(ch: str) -> bool:
    """True for characters written without spaces around them (CJK text and punctuation)."""
    cp = ord(ch)
    if 0xFF10 <= cp <= 0xFF19 or 0xFF21 <= cp <= 0xFF3A or 0xFF41 <= cp <= 0xFF5A:
        return False  # fullwidth digits and letters behave like words
    return cp >= 0x2E80 or 0x2000 <= cp <= 0x206F or cp == 0xB7


_NO_SPACE_BEFORE = set(".,!?;:%)]}'\"")
_NO_SPACE_AFTER = set("([{")


class TextTokenizer:
    """BERT-style Chinese WordPiece tokenizer producing fixed-length id sequences.

    ``encode`` returns exactly ``text_len`` ids: no [CLS]/[SEP], truncated to ``text_len``,
    padded with the vocabulary's own [PAD] id. The vocabulary must contain [PAD] and [UNK] and
    no duplicates. Pickles as (vocab, text_len, settings), so it can be shipped to Ray workers.
    """

    def __init__(self, vocab: Sequence[str], text_len: int = 32, settings: TokenizerSettings | None = None):
        vocab = list(vocab)
        if text_len < 1:
            raise ValueError(f"text_len must be >= 1, got {text_len}")
        index = {tok: i for i, tok in enumerate(vocab)}
        if len(index) != len(vocab):
            dupes = sorted(t for t, n in collections.Counter(vocab).items() if n > 1)[:5]
            raise ValueError(f"vocab has duplicate tokens, e.g. {dupes}")
        for required in (PAD_TOKEN, UNK_TOKEN):
            if required not in index:
                raise ValueError(f"vocab must contain {required}")
        self._vocab = vocab
        self._text_len = int(text_len)
        self._settings = settings or TokenizerSettings()
        self._pad_id = index[PAD_TOKEN]
        self._unk_id = index[UNK_TOKEN]
        hashed = "\n".join(vocab)
        if not self._settings.is_default:
            hashed += "\n#settings " + json.dumps(dataclasses.asdict(self._settings), sort_keys=True)
        self._hash = hashlib.sha256(hashed.encode("utf-8")).hexdigest()
        self._tokenizer = Tokenizer(
            WordPiece(index, unk_token=UNK_TOKEN, max_input_chars_per_word=MAX_INPUT_CHARS_PER_WORD)
        )
        self._tokenizer.normalizer = _bert_normalizer(self._settings)
        self._tokenizer.pre_tokenizer = BertPreTokenizer()
        self._tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False)
                                            for t in SPECIAL_TOKENS if t in index])

    @classmethod
    def from_file(cls, path: str, text_len: int = 32, storage: Storage | None = None) -> "TextTokenizer":
        """Load a BERT ``vocab.txt`` (one token per line, id = line number; fsspec path/URL, read through
        ``storage``), with the settings of a ``tokenizer_config.json`` beside it."""
        return cls(_read_vocab(str(path), storage), text_len=text_len, settings=read_settings(str(path), storage))

    @classmethod
    def default(cls, text_len: int = 32) -> "TextTokenizer":
        """A tokenizer over ``default_vocab()``."""
        return cls(_default_vocab_tuple(), text_len=text_len)

    def save(self, path: str, storage: Storage | None = None) -> None:
        """Write the vocabulary as ``vocab.txt`` (one token per line, trailing newline), and settings
        other than the defaults as ``tokenizer_config.json`` beside it (a stale one is removed)."""
        storage = as_storage(storage)
        storage.write_text(str(path), "\n".join(self._vocab) + "\n")
        settings_path = posixpath.join(posixpath.dirname(str(path)), SETTINGS_FILE)
        if not self._settings.is_default:
            storage.write_text(settings_path, json.dumps(dataclasses.asdict(self._settings)))
            return
        storage.remove(settings_path)

    def __reduce__(self):
        return (type(self), (self._vocab, self._text_len, self._settings))

    def __repr__(self) -> str:
        return (
            f"TextTokenizer(vocab_size={self.vocab_size}, text_len={self.text_len}, "
            f"vocab_hash={self.vocab_hash[:12]}...)"
        )

    @property
    def text_len(self) -> int:
        return self._text_len

    @property
    def vocab_size(self) -> int:
        return len(self._vocab)

    @property
    def pad_id(self) -> int:
        return self._pad_id

    @property
    def unk_id(self) -> int:
        return self._unk_id

    @property
    def settings(self) -> TokenizerSettings:
        return self._settings

    @property
    def vocab(self) -> list[str]:
        return list(self._vocab)

    @property
    def vocab_hash(self) -> str:
        """sha256 hex of ``"\\n".join(vocab)`` in UTF-8."""
        return self._hash

    def tokenize(self, text: str) -> list[str]:
        """The WordPiece tokens of ``text``, untruncated (for inspection and debugging)."""
        return self._tokenizer.encode(text, add_special_tokens=False).tokens

    def encode(self, text: str) -> list[int]:
        """Exactly ``text_len`` ids: truncated, then padded with ``pad_id``."""
        ids, _ = self.encode_batch([text])
        return ids[0].tolist()

    def encode_batch(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """Ids int32 (B, text_len) and is_truncated bool (B,): more than text_len tokens."""
        texts = [t if isinstance(t, str) else str(t) for t in texts]
        ids = np.full((len(texts), self._text_len), self._pad_id, dtype=np.int32)
        truncated = np.zeros(len(texts), dtype=bool)
        if not texts:
            return ids, truncated
        for row, enc in enumerate(self._tokenizer.encode_batch(texts, add_special_tokens=False)):
            seq = enc.ids
            n = min(len(seq), self._text_len)
            ids[row, :n] = seq[:n]
            truncated[row] = len(seq) > self._text_len
        return ids, truncated

    def text_from_ids(self, ids: Iterable[int]) -> str:
        """Decode ids to text: [PAD] dropped, CJK joined without spaces, ``##`` pieces merged."""
        out: list[str] = []
        prev = ""
        for i in np.asarray(list(ids), dtype=np.int64).ravel().tolist():
            if not 0 <= i < len(self._vocab):
                raise ValueError(f"id {i} out of range for vocab_size {len(self._vocab)}")
            if i == self._pad_id:
                continue
            tok = self._vocab[i]
            if tok.startswith("##") and len(tok) > 2 and out:
                out.append(tok[2:])
            else:
                if out and not self._joins_tight(prev, tok):
                    out.append(" ")
                out.append(tok)
            prev = tok
        return "".join(out)

    @staticmethod
    def _joins_tight(prev: str, tok: str) -> bool:
        if prev.startswith("[") and prev.endswith("]") and len(prev) > 2:
            return False  # keep [UNK] etc. readable
        if _is_tight(prev[-1]) or _is_tight(tok[0]):
            return True
        return tok in _NO_SPACE_BEFORE or prev in _NO_SPACE_AFTER
