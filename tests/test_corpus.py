import http.server
import threading

import pytest

from charrnn import corpus
from charrnn.config import DataConfig
from charrnn.errors import CorpusError

BOOK = ("\ufeffThe Project Gutenberg eBook of Test\r\nlicence blah\r\n"
        "*** START OF {w} PROJECT GUTENBERG EBOOK TEST ***\r\n"
        "Alice Was\r\nHere.\rDone\r\n"
        "*** END OF {w} PROJECT GUTENBERG EBOOK TEST ***\r\nmore licence\r\n")


@pytest.mark.parametrize("word", ["THE", "THIS"])
def test_gutenberg_markers_bom_and_line_endings(tmp_path, word):
    p = tmp_path / "book.txt"
    p.write_bytes(BOOK.format(w=word).encode("utf-8"))
    text = corpus.load_text(DataConfig(corpus=str(p)))
    assert text == "alice was\nhere.\ndone\n"
    text = corpus.load_text(DataConfig(corpus=str(p), lowercase=False))
    assert text == "Alice Was\nHere.\nDone\n"


def test_drop_chars_and_rare_chars(tmp_path):
    p = tmp_path / "t.txt"
    p.write_text("aaaa\nbbbb, c!\n")
    assert corpus.load_text(DataConfig(corpus=str(p), drop_chars=",!")) == "aaaa\nbbbb c\n"
    assert corpus.load_text(DataConfig(corpus=str(p), min_char_count=2)) == "aaaa\nbbbb\n"
    # Prompts get the same cleaning: a model trained without punctuation takes it in prompts.
    opts = DataConfig(drop_chars=",!")
    assert corpus.normalize_prompt("Hello,\r\nAlice!", opts) == "hello\nalice"
    assert corpus.normalize_prompt("Hello, Alice!", DataConfig(lowercase=False)) == "Hello, Alice!"


def test_real_corpus_facts(corpus_path):
    text = corpus.load_text(DataConfig(corpus=str(corpus_path)))
    assert len(text) == 144_427 - 1 + 1 and "\r" not in text  # CRLF -> LF, as its README says
    assert len(set(text)) == 45


def test_missing_file(tmp_path):
    with pytest.raises(CorpusError, match="corpus file not found"):
        corpus.load_text(DataConfig(corpus=str(tmp_path / "nope.txt")))
    with pytest.raises(CorpusError, match="is a directory"):
        corpus.load_text(DataConfig(corpus=str(tmp_path)))
    with pytest.raises(CorpusError, match="unsupported scheme; use a local path, s3://"):
        corpus.load_text(DataConfig(corpus="gs://bucket/book.txt"))
    (tmp_path / "book.txt").write_text("hello there\n")
    assert corpus.fetch_bytes(f"file://{tmp_path}/book.txt") == b"hello there\n"


def test_empty_after_cleaning(tmp_path):
    p = tmp_path / "t.txt"
    p.write_text("!!!\n")
    with pytest.raises(CorpusError, match=r"empty after cleaning \(it had only whitespace left after "
                                          r"data.drop_chars='!'\)$"):
        corpus.load_text(DataConfig(corpus=str(p), drop_chars="!"))
    p.write_text("ab\n")  # each character rarer than 5: the settings that emptied it are named
    with pytest.raises(CorpusError, match=r"after data.min_char_count=5\)$"):
        corpus.load_text(DataConfig(corpus=str(p), min_char_count=5))
    p.write_text("\r\n \n")
    with pytest.raises(CorpusError, match=r"^the corpus is empty after cleaning$"):
        corpus.load_text(DataConfig(corpus=str(p)))


def test_undecodable_bytes_name_the_offset(tmp_path):
    p = tmp_path / "t.txt"
    p.write_bytes(b"hello \xff world")
    with pytest.raises(CorpusError, match=r"0xff \(byte offset 6, line 1\).*decode_errors=replace"):
        corpus.load_text(DataConfig(corpus=str(p)))
    p.write_bytes(b"\xef\xbb\xbfline one\r\nhello \xff world")  # was "offset 16": the BOM left out
    with pytest.raises(CorpusError, match=r"0xff \(byte offset 19, line 2\)"):
        corpus.load_text(DataConfig(corpus=str(p)))
    text = corpus.load_text(DataConfig(corpus=str(p), decode_errors="replace"))
    assert text == "line one\nhello \ufffd world\n"


def test_unreachable_url_names_the_way_out(tmp_path):
    cfg = DataConfig(corpus="http://127.0.0.1:9/book.txt", cache_dir=str(tmp_path))
    with pytest.raises(CorpusError, match="--corpus PATH"):
        corpus.load_text(cfg)
    with pytest.raises(CorpusError, match="numeric id"):
        corpus.load_text(DataConfig(corpus="gutenberg:abc", cache_dir=str(tmp_path)))


@pytest.mark.parametrize("url, match", [
    # each was a traceback (ValueError, or http.client.InvalidURL with "run again to retry"), or a
    # DNS lookup of "user:pass@host"; none is sent anywhere now
    ("http://[::1/book.txt", r"is not a valid URL \(Invalid IPv6 URL\); expected http\(s\)://HOST"),
    ("http://127.0.0.1:99999/book.txt", r"is not a valid URL \(Port out of range 0-65535\)"),
    ("http:///book.txt", r"is not a valid URL; expected"),
    ("http://127.0.0.1:9/my book.txt", r"contains a space or a control character"),
    ("https://reader:s3cret@127.0.0.1:9/book.txt",
     r"^--corpus https://\*\*\*@127.0.0.1:9/book.txt carries a user name or password; it would be "
     r"logged and saved in checkpoints: download the text and pass --corpus PATH$"),
])
def test_a_malformed_url_is_one_line_before_any_request(tmp_path, monkeypatch, url, match):
    def no_request(*args, **kwargs):
        raise AssertionError("no request may be made")
    monkeypatch.setattr(corpus.urllib.request, "urlopen", no_request)
    with pytest.raises(CorpusError, match=match):
        corpus.load_text(DataConfig(corpus=url, cache_dir=str(tmp_path)))


def test_a_malformed_s3_endpoint_names_where_it_was_set(monkeypatch):
    """A ValueError or botocore traceback before; pyarrow took `host:9000` as https."""
    from charrnn import s3
    from charrnn.errors import StorageError
    monkeypatch.setattr(s3, "_settings", {"endpoint_url": "", "region": ""})
    monkeypatch.setenv("AWS_ENDPOINT_URL", "127.0.0.1:9000")
    monkeypatch.delenv("AWS_ENDPOINT_URL_S3", raising=False)
    with pytest.raises(StorageError, match=r"the S3 endpoint AWS_ENDPOINT_URL=127.0.0.1:9000 is "
                                           r"not a valid URL; expected http\(s\)://HOST\[:PORT\]$"):
        s3.filesystem()
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", "http://127.0.0.1:9000/minio")
    with pytest.raises(StorageError, match="AWS_ENDPOINT_URL_S3=http://127.0.0.1:9000/minio has a path"):
        s3.client()
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", "http://127.0.0.1:9000/")
    assert s3.endpoint() == "http://127.0.0.1:9000/"
    assert s3.filesystem().region == "us-east-1"


@pytest.fixture
def http_server(tmp_path):
    """A local stand-in for Project Gutenberg, counting requests."""
    root = tmp_path / "www"
    (root / "cache/epub/11").mkdir(parents=True)
    (root / "cache/epub/11/pg11.txt").write_bytes(BOOK.format(w="THE").encode())
    hits = []

    class H(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *a, **k):
            super().__init__(*a, directory=str(root), **k)

        def log_message(self, *a):
            hits.append(a)

    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), H)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{srv.server_address[1]}", hits
    srv.shutdown()


def test_gutenberg_download_is_cached(tmp_path, http_server, monkeypatch):
    base, hits = http_server
    monkeypatch.setattr(corpus, "GUTENBERG_URL", base + "/cache/epub/{id}/pg{id}.txt")
    cfg = DataConfig(corpus="gutenberg:11", cache_dir=str(tmp_path / "cache"))
    assert corpus.load_text(cfg) == "alice was\nhere.\ndone\n"
    assert corpus.load_text(cfg) == "alice was\nhere.\ndone\n"
    assert len(hits) == 1  # the second load reused the cache
    assert (tmp_path / "cache/gutenberg/pg11.txt").is_file()
    with pytest.raises(CorpusError, match=r"cannot download .*/pg12.txt: HTTP 404 File not found "
                                          r"\(is the book id right\?\); pass --corpus PATH") as e:
        corpus.load_text(DataConfig(corpus="gutenberg:12", cache_dir=str(tmp_path / "cache")))
    assert "offline" not in str(e.value)  # the server answered: it was not a network failure
    assert not (tmp_path / "cache/gutenberg/pg12.txt").exists()
    url_cfg = DataConfig(corpus=base + "/cache/epub/11/pg11.txt", cache_dir=str(tmp_path / "c2"))
    assert corpus.load_text(url_cfg) == "alice was\nhere.\ndone\n"
    # A web page answered with 200 (a proxy's login page, a mirror's error page) was cached and
    # trained on as the book.
    page = tmp_path / "www/cache/epub/13/pg13.txt"
    page.parent.mkdir(parents=True)
    page.write_bytes(b"\r\n<!DOCTYPE html>\n<html><body>Please sign in</body></html>\n")
    with pytest.raises(CorpusError, match=r"^http://.*/pg13.txt answered with a web page, not the "
                                          r"book's text \(it begins '\\r\\n<!DOCTYPE html>.*'\); "
                                          r"if a proxy or mirror is in the way, download the text "
                                          r"and pass --corpus PATH$"):
        corpus.load_text(DataConfig(corpus="gutenberg:13", cache_dir=str(tmp_path / "cache")))
    assert not (tmp_path / "cache/gutenberg/pg13.txt").exists()
    # A web page that an older version cached is fetched again, and replaced by the book.
    stale = tmp_path / "cache/gutenberg/pg11.txt"
    stale.write_bytes(page.read_bytes())
    before = len(hits)
    assert corpus.load_text(cfg) == "alice was\nhere.\ndone\n"
    assert len(hits) == before + 1 and stale.read_bytes() == BOOK.format(w="THE").encode()


def test_a_cache_that_cannot_be_written_costs_only_the_reuse(tmp_path, http_server, capsys):
    base, hits = http_server
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    cfg = DataConfig(corpus=base + "/cache/epub/11/pg11.txt", cache_dir=str(blocker / "cache"))
    assert corpus.load_text(cfg) == "alice was\nhere.\ndone\n"
    out = capsys.readouterr().out
    assert "downloading " + base in out and "warning: cannot cache the download" in out
    assert blocker.read_text() == "not a directory"


def test_a_download_cut_short_is_one_line_and_not_cached(tmp_path, capsys, monkeypatch):
    """A server that closes before its Content-Length: `read()` raised IncompleteRead (a
    traceback); reading in chunks would have returned the short text, cached and trained on."""
    import socket
    srv = socket.create_server(("127.0.0.1", 0))

    def serve():
        for _ in range(2):
            c, _ = srv.accept()
            c.recv(65536)
            c.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 100000\r\n\r\n" + b"alice was here\n" * 100)
            c.close()

    threading.Thread(target=serve, daemon=True).start()
    url = f"http://127.0.0.1:{srv.getsockname()[1]}/book.txt"
    cfg = DataConfig(corpus=url, cache_dir=str(tmp_path / "cache"))
    with pytest.raises(CorpusError, match=r"cannot download .*/book.txt \(the connection closed "
                                          r"after 1,500 of 100,000 bytes\); run again to retry, "
                                          r"or pass --corpus PATH"):
        corpus.load_text(cfg)
    assert not (tmp_path / "cache").exists() or not list((tmp_path / "cache").rglob("*.txt"))
    monkeypatch.setattr(corpus, "PROGRESS_EVERY_S", 0.0)  # and long downloads say how far they got
    with pytest.raises(CorpusError):
        corpus.load_text(cfg)
    assert "  downloaded 0.0 MiB of 0.1 MiB" in capsys.readouterr().out
    srv.close()


def test_a_pipe_is_read_and_dev_null_is_empty_not_missing(tmp_path):
    """`--corpus <(zcat book.txt.gz)` (a pipe) and `/dev/null` said "corpus file not found"."""
    import os
    fifo = tmp_path / "book.fifo"
    os.mkfifo(fifo)

    def write():
        with open(fifo, "wb") as f:
            f.write(b"Alice was here.\r\n")

    threading.Thread(target=write, daemon=True).start()
    assert corpus.load_text(DataConfig(corpus=str(fifo))) == "alice was here.\n"
    r, w = os.pipe()  # as bash's <(...) gives it: /dev/fd/N, a link to a name that is no file
    os.write(w, b"Alice, again.\n")
    os.close(w)
    try:
        assert corpus.absolute(f"/dev/fd/{r}") == f"/dev/fd/{r}"
        assert corpus.load_text(DataConfig(corpus=f"/dev/fd/{r}")) == "alice, again.\n"
    finally:
        os.close(r)
    with pytest.raises(CorpusError, match="empty"):
        corpus.load_text(DataConfig(corpus="/dev/null"))
