"""Character vocabulary: sorted characters <-> integer ids."""

from __future__ import annotations

from collections import Counter
from types import SimpleNamespace

import numpy as np

from charrnn.errors import VocabError

# What to do with prompt characters the model never saw.
OOV_POLICIES = ("error", "drop", "replace")


class Vocab:
    def __init__(self, chars: str):
        if len(set(chars)) != len(chars) or list(chars) != sorted(chars):
            raise VocabError("vocabulary must be sorted, distinct characters")
        if not chars:
            raise VocabError("vocabulary is empty")
        self.chars = chars
        self.index = {c: i for i, c in enumerate(chars)}
        # ids fit in uint8 for almost every corpus; the array holding the corpus is O(N) bytes.
        self.dtype = np.uint8 if len(chars) <= 256 else np.uint16 if len(chars) <= 65536 else np.uint32
        self._encode_tables: SimpleNamespace | None = None  # `_tables()`, built on first use

    @classmethod
    def from_text(cls, text: str) -> Vocab:
        return cls("".join(sorted(char_counts(text))))

    def __len__(self) -> int:
        return len(self.chars)

    def __eq__(self, other) -> bool:
        return isinstance(other, Vocab) and other.chars == self.chars

    @property
    def start(self) -> str:
        """The character an empty prompt starts from: a newline, the most neutral context, or a
        space, or the first character when the vocabulary has neither (`data.drop_chars`)."""
        return next((c for c in "\n " if c in self.index), self.chars[0])

    def unknown(self, text: str) -> list[str]:
        """Distinct characters of `text` outside the vocabulary, in order of first appearance."""
        return list(dict.fromkeys(c for c in text if c not in self.index))

    def clean(self, text: str, oov: str = "error", replacement: str = " ") -> str:
        """Apply the out-of-vocabulary policy: `error` (default), `drop` or `replace`."""
        if oov not in OOV_POLICIES:
            raise VocabError(f"unknown OOV policy {oov!r}; choose one of {', '.join(OOV_POLICIES)}")
        bad = self.unknown(text)
        if not bad:
            return text
        if oov == "error":
            shown = ", ".join(repr(c) for c in bad[:20]) + (" ..." if len(bad) > 20 else "")
            raise VocabError(f"characters not in the model's vocabulary: {shown} "
                             "(to accept them, set oov to 'drop' or 'replace': --oov drop, or "
                             "\"oov\": \"drop\" in a Serve request)")
        if oov == "drop":
            return "".join(c for c in text if c in self.index)
        if replacement not in self.index:
            replacement = self.chars[0]
        return "".join(c if c in self.index else replacement for c in text)

    def encode(self, text: str) -> np.ndarray:
        """text -> (N,) ids in the smallest unsigned dtype; unknown characters raise.

        A lookup table over code points, vectorised (a 1 GB corpus encodes in seconds). Latin-1
        text (most corpora) is viewed at 1 byte per character, anything else as UTF-32. The
        tables are built once per vocabulary: a Serve replica encodes every prompt, and
        rebuilding them took most of a 64-prompt group's encoding.
        """
        t = self._tables()
        if t.latin1 is not None:  # Latin-1: bytes.translate checks and maps in C, ~0.5 s per GB
            try:
                raw = text.encode("latin-1")
            except UnicodeEncodeError:
                raw = None
            if raw is None or raw.translate(None, t.known):  # bytes left = unknown chars
                self.clean(text, "error")  # raises, listing the characters
            return np.frombuffer(raw.translate(t.latin1), dtype=np.uint8)
        buf = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)
        if len(buf) and (int(buf.max()) >= t.size or not np.isin(buf, t.points).all()):
            self.clean(text, "error")
        if t.table is None:  # code points beyond the BMP (emoji): the table would be 4 MB+
            # Ids are the ranks of the sorted code points, so a binary search finds them.
            return np.searchsorted(t.points, buf).astype(self.dtype)
        return t.table[buf]

    def _tables(self) -> SimpleNamespace:
        """`encode`'s lookup tables, built on first use: `known` (the vocabulary's bytes, for
        bytes.translate to delete) and `latin1` (byte -> id) when every code point is below
        256; else `points` (the sorted code points, uint32), `size` and `table` (code point ->
        id; None beyond the BMP)."""
        if self._encode_tables is None:
            lut = {ord(c): i for c, i in self.index.items()}
            size = max(lut) + 1
            t = SimpleNamespace(size=size, latin1=None, known=None, table=None,
                                points=np.array(sorted(lut), dtype=np.uint32))
            if size <= 256:
                t.known, t.latin1 = bytes(lut), bytearray(256)
                for o, i in lut.items():
                    t.latin1[o] = i
                t.latin1 = bytes(t.latin1)
            elif size <= 1 << 16:
                t.table = np.zeros(size, dtype=self.dtype)
                for o, i in lut.items():
                    t.table[o] = i
            self._encode_tables = t
        return self._encode_tables

    def decode(self, ids) -> str:
        """ids (a sequence, numpy array or 1-D tensor) -> text."""
        if hasattr(ids, "tolist"):
            ids = ids.tolist()
        return "".join(map(self.chars.__getitem__, ids))

    def to_dict(self) -> dict:
        return {"chars": self.chars}

    @classmethod
    def from_dict(cls, d: dict) -> Vocab:
        return cls(d["chars"])


def _byte_counts(buf: np.ndarray, chunk: int = 1 << 24) -> np.ndarray:
    """(256,) occurrences of each byte value; chunked, since bincount widens to int64."""
    counts = np.zeros(256, dtype=np.int64)
    for i in range(0, len(buf), chunk):
        counts += np.bincount(buf[i:i + chunk], minlength=256)
    return counts


def char_counts(text: str) -> dict[str, int]:
    """Occurrences of each character; vectorised for Latin-1 text (1 GB in about a second)."""
    try:
        counts = _byte_counts(np.frombuffer(text.encode("latin-1"), dtype=np.uint8))
        return {chr(i): int(n) for i, n in enumerate(counts) if n}
    except UnicodeEncodeError:
        return dict(Counter(text))


def rare_chars(text: str, min_count: int) -> str:
    """Characters occurring fewer than `min_count` times (the tutorial's 'drop rare symbols')."""
    return "".join(sorted(c for c, n in char_counts(text).items() if n < min_count))
