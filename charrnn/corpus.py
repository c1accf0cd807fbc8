"""Corpus loading and cleaning: source -> bytes -> text, the way training and sampling see it.

Sources: a local path, `s3://bucket/key`, an `http(s)://` URL, or `gutenberg:<id>` (downloaded
once into the cache and reused). Project Gutenberg's licence header and footer are cut at their
START/END marker lines; CRLF and CR become LF; the text is lower-cased by default.
"""

from __future__ import annotations

import contextlib
import hashlib
import http.client
import os
import re
import urllib.error
import urllib.request
from pathlib import Path

from charrnn import urls
from charrnn.config import DataConfig
from charrnn.errors import CorpusError, StorageError
from charrnn.vocab import rare_chars

# Overridable so tests (and mirrors) can serve books from a local HTTP server.
GUTENBERG_URL = os.environ.get(
    "CHARRNN_GUTENBERG_URL", "https://www.gutenberg.org/cache/epub/{id}/pg{id}.txt")
DOWNLOAD_TIMEOUT_S = 30
PROGRESS_EVERY_S = 5.0  # a download longer than this logs how far it has got

_START = re.compile(r"^\ufeff?\*{3}\s*START OF (THE|THIS) PROJECT GUTENBERG EBOOK.*$", re.I | re.M)
_END = re.compile(r"^\ufeff?\*{3}\s*END OF (THE|THIS) PROJECT GUTENBERG EBOOK.*$", re.I | re.M)


def absolute(source: str) -> str:
    """A local corpus path made absolute (saved so in checkpoints, whose `--random-prompt` then
    finds the text from any directory); other sources and unsupported schemes as given."""
    if not source or source.startswith(("gutenberg:", "http://", "https://")):
        return source
    try:
        path = _local_path(source)
    except StorageError:
        return source  # `fetch_bytes` says what is wrong with it
    return source if path is None else str(path)


def _local_path(source: str) -> Path | None:
    """A local corpus path made absolute (None for S3; another scheme raises StorageError). Links
    are followed where they lead to a file, and only there: `<(zcat book.gz)` is /dev/fd/63, a
    link to `pipe:[...]`, a name that does not exist, and is read as /dev/fd/63."""
    from charrnn import storage
    path = storage.local_path(source)
    if path is None or path.exists():
        return path
    return Path(os.path.abspath(os.path.expanduser(source.removeprefix("file://"))))


def fetch_bytes(source: str, cache_dir: str = "~/.cache/charrnn") -> bytes:
    """Raw bytes of a corpus source, downloading (and caching) remote books."""
    if source.startswith("gutenberg:"):
        book = source.split(":", 1)[1]
        if not book.isdigit():
            raise CorpusError(f"--corpus {source}: expected gutenberg:<numeric id>, e.g. gutenberg:11")
        url = GUTENBERG_URL.format(id=book)
        return _cached_download(url, Path(cache_dir).expanduser() / "gutenberg" / f"pg{book}.txt",
                                check=_a_book)
    if source.startswith(("http://", "https://")):
        bad = urls.problem(source, credentials=f"{urls.SAVED}: download the text and pass --corpus PATH")
        if bad:
            raise CorpusError(f"--corpus {urls.redacted(source)} {bad}")
        digest = hashlib.sha256(source.encode()).hexdigest()[:16]
        return _cached_download(source, Path(cache_dir).expanduser() / "url" / f"{digest}.txt")
    from charrnn import s3, storage  # pyarrow: not needed for the download sources above
    if storage.is_s3(source):
        if not s3.split(source)[1]:
            raise CorpusError(f"--corpus {source} names a bucket; give the text's object, "
                              "s3://bucket/key")
        return storage.read_bytes(source)
    try:
        path = _local_path(source)  # `file://` is local; another scheme is refused
    except StorageError:
        raise CorpusError(f"--corpus {source}: unsupported scheme; use a local path, s3://bucket/key, "
                          "an http(s):// URL or gutenberg:<id>") from None
    if path.is_dir():
        raise CorpusError(f"--corpus {source} is a directory; give the text file inside it")
    if not path.exists():  # a pipe is read too: `--corpus <(zcat book.txt.gz)`
        raise CorpusError(f"corpus file not found: {source}")
    try:
        return path.read_bytes()
    except OSError as e:
        raise CorpusError(f"cannot read corpus {source}: {e.strerror}") from None


def _a_book(url: str, data: bytes) -> None:
    """A Project Gutenberg download must be a text, not a web page: a proxy's login page or a
    mirror's error page, answered with 200, was cached and trained on as the book."""
    head = data[:512].lstrip(b"\xef\xbb\xbf \t\r\n").lower()
    if head.startswith((b"<!doctype html", b"<html", b"<?xml", b"<head")):
        raise CorpusError(f"{url} answered with a web page, not the book's text (it begins "
                          f"{data[:40].decode('utf-8', 'replace')!r}); if a proxy or mirror is "
                          "in the way, download the text and pass --corpus PATH")


def _cached_download(url: str, cache: Path, check=None) -> bytes:
    """`url`'s body, from the cache when it is there; a body `check` refuses is not cached."""
    from charrnn import runlog
    if cache.is_file():
        data = cache.read_bytes()
        try:
            if check is not None:
                check(url, data)
            return data
        except CorpusError:  # an older version cached a web page as the book: fetch it again
            runlog.say(f"{cache} holds a web page, not the book's text; downloading it again")
    runlog.say(f"downloading {url} (cached as {cache})")
    try:
        with urllib.request.urlopen(url, timeout=DOWNLOAD_TIMEOUT_S) as r:
            data = _read(r)
    except urllib.error.HTTPError as e:  # the server answered: being offline is not the cause
        hint = (" (is the book id right?)" if cache.parent.name == "gutenberg" else "")
        raise CorpusError(f"cannot download {url}: HTTP {e.code} {e.reason}{hint}; pass --corpus "
                          "PATH to use a local copy of the text") from None
    except (urllib.error.URLError, OSError, http.client.HTTPException) as e:
        # HTTPException: a server that closed early (it was a traceback, or a short text trained on)
        way = ("run again to retry, or" if isinstance(e, http.client.HTTPException)
               else "if this machine is offline,")
        raise CorpusError(f"cannot download {url} ({getattr(e, 'reason', e)}); {way} pass "
                          "--corpus PATH to a local copy of the text") from None
    if check is not None:
        check(url, data)
    tmp = cache.with_suffix(f".tmp{os.getpid()}")
    try:
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_bytes(data)
        tmp.replace(cache)  # atomic: a half-written download is never reused
    except OSError as e:  # a read-only or full cache costs the reuse, not the run
        with contextlib.suppress(OSError):
            tmp.unlink()
        runlog.say(f"warning: cannot cache the download in {cache.parent} ({e.strerror}); "
                   "set data.cache_dir to reuse it")
    return data


class _Cut(http.client.HTTPException):
    def __str__(self) -> str:
        got, total = self.args
        return f"the connection closed after {got:,} of {total:,} bytes"


def _read(r) -> bytes:
    """The response body in 1 MiB reads, with a progress line every PROGRESS_EVERY_S."""
    from charrnn import runlog
    total = int(r.headers.get("Content-Length") or 0)
    chunks, got, every = [], 0, runlog.Every(PROGRESS_EVERY_S)
    while True:
        try:
            chunk = r.read(1 << 20)
        except http.client.IncompleteRead as e:
            raise _Cut(got + len(e.partial), total) from None
        if not chunk:
            if got < total:  # `read(n)` ends quietly where the server closed early
                raise _Cut(got, total)
            break
        chunks.append(chunk)
        got += len(chunk)
        if every.due():
            runlog.say(f"  downloaded {got / 2**20:,.1f} MiB"
                       + (f" of {total / 2**20:,.1f} MiB" if total else ""))
    return b"".join(chunks)


class BadByte(ValueError):
    """A byte that is not UTF-8, where a person finds it: `offset` in the file (a hex editor's,
    the byte-order mark counted) and its 1-based `line`."""

    def __init__(self, data: bytes, offset: int):
        super().__init__(offset)
        self.byte, self.offset = data[offset], offset
        self.line = data.count(b"\n", 0, offset) + 1

    def where(self) -> str:
        return f"byte offset {self.offset:,}, line {self.line:,}"


def decode_utf8(data: bytes, errors: str = "strict") -> str:
    """UTF-8 bytes -> text, a leading byte-order mark (Notepad writes one) skipped; an
    undecodable byte raises `BadByte` (UnicodeDecodeError's offset would miss the mark)."""
    bom = 3 if data.startswith(b"\xef\xbb\xbf") else 0
    try:
        return data[bom:].decode("utf-8", errors=errors)
    except UnicodeDecodeError as e:
        raise BadByte(data, bom + e.start) from None


def decode(data: bytes, source: str, errors: str = "strict") -> str:
    try:
        return decode_utf8(data, errors)
    except BadByte as e:
        raise CorpusError(
            f"{source}: byte 0x{e.byte:02x} ({e.where()}) is not valid UTF-8; "
            "set data.decode_errors=replace (--set data.decode_errors=replace) to replace it") from None


MARKER_WINDOW = 1 << 20  # Gutenberg's START/END lines sit in the header and footer


def strip_gutenberg(text: str) -> str:
    """Keep what lies between the START and END marker lines, when the text has them.

    The markers are searched in the first and last megabyte only: the licence header and footer
    are a few kilobytes, and scanning a 1 GB corpus with the regex would take ~20 s.
    """
    start = _START.search(text, 0, MARKER_WINDOW)
    if start:
        text = text[start.end():]
    end = _END.search(text, max(0, len(text) - MARKER_WINDOW))
    if end:
        text = text[:end.start()]
    return text


def clean(text: str, opts: DataConfig) -> str:
    """Normalise a decoded text: strip Gutenberg boilerplate, CRLF/CR -> LF, case, dropped chars."""
    text = strip_gutenberg(text.lstrip("\ufeff"))
    if "\r" in text:  # each replace copies the whole text: only when needed
        text = text.replace("\r\n", "\n").replace("\r", "\n")
    if text.startswith("\n") or not text.endswith("\n") or text.endswith("\n\n"):
        text = text.strip("\n") + "\n"
    if opts.lowercase:
        text = text.lower()
    drop = set(opts.drop_chars)
    if opts.min_char_count:
        drop |= set(rare_chars(text, opts.min_char_count))
    if drop:
        text = text.translate({ord(c): None for c in drop})
    if not text.strip():
        why = [f"data.drop_chars={opts.drop_chars!r}"] if opts.drop_chars else []
        why += [f"data.min_char_count={opts.min_char_count}"] if opts.min_char_count else []
        raise CorpusError("the corpus is empty after cleaning"
                          + (f" (it had only whitespace left after {' and '.join(why)})" if why else ""))
    return text


def normalize_prompt(prompt: str, opts: DataConfig) -> str:
    """Apply to a prompt the line-ending, case and `drop_chars` rules the model was trained with
    (a model trained without punctuation takes "hello, alice!" as "hello alice"). Characters
    that `min_char_count` dropped are simply not in the vocabulary: the OOV policy decides."""
    prompt = prompt.replace("\r\n", "\n").replace("\r", "\n")
    if opts.lowercase:
        prompt = prompt.lower()
    return prompt.translate({ord(c): None for c in opts.drop_chars}) if opts.drop_chars else prompt


def load_text(opts: DataConfig) -> str:
    """`opts.corpus` -> cleaned text, with one-line `CorpusError`s for every user mistake."""
    raw = fetch_bytes(opts.corpus, opts.cache_dir)
    return clean(decode(raw, opts.corpus, opts.decode_errors), opts)
