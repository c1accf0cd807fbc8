"""The Serve client of `jobs/generate.py --serve-url`, against a stand-in server on loopback."""

import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from charrnn import client
from charrnn.errors import CharrnnError
from charrnn.sampling import SampleParams
from tests.conftest import call_job


@pytest.fixture
def server(monkeypatch, tmp_path):
    """Answers POST /generate with the statuses queued in `server.statuses` (then 200s)."""
    monkeypatch.setattr(client, "RETRY_WAITS_S", (0.0, 0.0, 0.0, None))

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers["content-length"])))
            srv.bodies.append(body)
            srv.auth.append(self.headers.get("authorization"))  # as decoded: Latin-1
            status = srv.statuses.pop(0) if srv.statuses else 422 if body["prompt"] == "bad" else 200
            data = ({"completions": [body["prompt"].upper()], "model": {"run": "r"}}
                    if status == 200 else {"error": "busy"})
            out = json.dumps(data).encode()
            self.send_response(status)
            if status != 200 and srv.retry_after:
                self.send_header("retry-after", srv.retry_after.pop(0))
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(out)))
            self.end_headers()
            self.wfile.write(out)

        def log_message(self, *args):
            pass

    srv = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    srv.statuses, srv.bodies, srv.auth, srv.retry_after = [], [], [], []
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    srv.url = f"http://127.0.0.1:{srv.server_address[1]}"
    srv.tmp = tmp_path
    yield srv
    srv.shutdown()


def test_a_busy_or_restarting_server_is_retried(server):
    server.statuses = [503, 502]
    texts, model = client.generate_remote(server.url, ["abc"], SampleParams(5, seed=1), oov="drop")
    assert texts == ["ABC"] and model == {"run": "r"}
    assert len(server.bodies) == 3 and server.bodies[-1]["oov"] == "drop"


def test_a_retry_after_is_waited_for_within_a_limit(server, monkeypatch):
    """Serve's backpressure (`max_queued_requests`) answers 503 with Retry-After; a 429 from a
    gateway's rate limit is retried the same way."""
    slept = []
    monkeypatch.setattr(client.time, "sleep", slept.append)
    monkeypatch.setattr(client, "RETRY_AFTER_MAX_S", 5.0)
    server.statuses = [503, 429, 503, 503]
    server.retry_after = ["2", "0.25", "3600", "Wed, 21 Oct 2015 07:28:00 GMT"]
    with pytest.raises(CharrnnError, match="answered 503 4 times: busy$"):
        client.generate_remote(server.url, ["abc"], SampleParams(5))
    assert slept == [2.0, 0.25, 5.0]  # the longer of the fixture's 0 s and Retry-After, capped
    server.statuses, server.retry_after = [503], ["nan"]
    assert client.generate_remote(server.url, ["abc"], SampleParams(5))[0] == ["ABC"]
    assert slept[3:] == [0.0]


def test_errors_are_one_line(server):
    server.statuses = [503] * 4  # still busy after the last retry
    with pytest.raises(CharrnnError, match="answered 503 4 times: busy$"):
        client.generate_remote(server.url, ["abc"], SampleParams(5))
    server.statuses = [422]  # a client error is not retried
    with pytest.raises(CharrnnError, match="answered 422"):
        client.generate_remote(server.url, ["abc"], SampleParams(5))
    assert len(server.bodies) == 5
    with pytest.raises(CharrnnError, match=r"cannot reach http://127.0.0.1:9 \(Connection refused\) "
                                           "after 4 attempts"):
        client.generate_remote("http://127.0.0.1:9", ["abc"], SampleParams(5))


@pytest.mark.parametrize("url", ["localhost:8000", "ftp://host", "http://[::1", "http://h:99999"])
def test_a_url_that_is_not_http_is_refused_up_front(url):
    with pytest.raises(CharrnnError, match=f"--serve-url {re.escape(url)} is not a valid URL"):
        client.generate_remote(url, ["abc"], SampleParams(5))


def test_a_server_that_is_not_charrnn_is_one_line(server, monkeypatch):
    monkeypatch.setattr(client.requests.Response, "json", lambda self: {"hello": "world"})
    with pytest.raises(CharrnnError, match="answered 200 without completions"):
        client.generate_remote(server.url, ["abc"], SampleParams(5))


def test_the_token_is_sent_as_utf_8_without_surrounding_whitespace(server):
    """A token with a character outside Latin-1 raised UnicodeEncodeError from a worker thread
    (a traceback), and one read from a file with its newline was "no answer from URL: Invalid
    leading whitespace..." though the server was never asked. The server strips and compares
    UTF-8 bytes the same way (`api.api_token`, `api.check_token`)."""
    for token in ("s3cret", "s3cret\n", " tök€n "):
        client.generate_remote(server.url, ["abc"], SampleParams(5), token=token)
    assert server.auth == ["Bearer s3cret", "Bearer s3cret",
                           "Bearer " + "tök€n".encode().decode("latin-1")]
    client.generate_remote(server.url, ["abc"], SampleParams(5), token=" ")
    assert server.auth[-1] is None


def test_a_long_batch_is_written_as_it_comes_back(server, monkeypatch, capfd):
    """`--serve-url` with a prompts file printed nothing until every prompt was back: a 422 or a
    Ctrl-C at prompt 2,000 lost the 1,999 completions before it. Now each is written in order
    as it arrives, an error names its prompt, and progress goes to stderr."""
    monkeypatch.setattr(client, "PROGRESS_EVERY_S", 0.0)
    got = list(client.iter_remote(server.url, ["a", "b", "c"], SampleParams(5, seed=1)))
    assert [c for c, _ in got] == ["A", "B", "C"]
    assert "  1 of 3 prompts done" in capfd.readouterr().err
    prompts = [f"p{i}" for i in range(40)] + ["bad"] + ["q"] * 40
    with pytest.raises(CharrnnError, match=r"answered 422 to prompt 41 of 81: busy"):
        for i, (c, _) in enumerate(client.iter_remote(server.url, prompts, SampleParams(5))):
            assert c == prompts[i].upper()
    assert i == 39  # the 40 before it came out

    prompts_file = server.tmp / "prompts.txt"
    prompts_file.write_text("one\ntwo\nbad\nfour\n")
    p = call_job(capfd, "generate.py", "--serve-url", server.url, "--prompts-file",
                 str(prompts_file), "--format", "jsonl", "--seed", "7")
    assert p.returncode == 2 and "answered 422 to prompt 3 of 4" in p.stderr
    assert [json.loads(line) for line in p.stdout.splitlines()] == [
        {"prompt": "one", "completion": "ONE", "seed": 7, "run": "r"},
        {"prompt": "two", "completion": "TWO", "seed": 8, "run": "r"}]


def test_leaving_early_waits_for_no_request_in_flight(tmp_path):
    """With a ThreadPoolExecutor, Ctrl-C against a server that had stopped answering waited out
    each request's timeout (300 s; its workers are joined at exit), and a second Ctrl-C aborted
    the process in C++. Now the requests in flight are left to daemon threads."""
    import signal
    import subprocess
    import sys
    import time
    from http.server import ThreadingHTTPServer

    from tests.conftest import ROOT
    never = threading.Event()
    hits = []

    class Stuck(BaseHTTPRequestHandler):
        def do_POST(self):
            hits.append(1)
            never.wait(60)

        def log_message(self, *args):
            pass

    def stuck_on(item):
        if item == 1:
            never.wait(60)
        raise CharrnnError(f"item {item}")

    t0 = time.monotonic()
    with pytest.raises(CharrnnError, match="item 0"):
        list(client.ordered_map(stuck_on, [0, 1], 2))
    assert time.monotonic() - t0 < 5

    srv = ThreadingHTTPServer(("127.0.0.1", 0), Stuck)
    srv.daemon_threads = True
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("alice\n" * 100)
    p = subprocess.Popen([sys.executable, str(ROOT / "jobs" / "generate.py"), "--serve-url",
                          f"http://127.0.0.1:{srv.server_address[1]}", "--prompts-file",
                          str(prompts)], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True)
    try:
        deadline = time.monotonic() + 60
        while len(hits) < 32 and time.monotonic() < deadline:  # every client thread is waiting
            time.sleep(0.05)
        p.send_signal(signal.SIGINT)
        _, err = p.communicate(timeout=20)
        assert (p.returncode, err) == (130, "interrupted\n")
    finally:
        p.kill()
        never.set()
        srv.shutdown()


def test_progress_goes_to_stderr_and_a_closed_stderr_stops_nothing(server, monkeypatch, capsys):
    monkeypatch.setattr(client, "PROGRESS_EVERY_S", 0.0)
    texts, _ = client.generate_remote(server.url, ["a", "b", "c"], SampleParams(5), concurrency=1)
    err = capsys.readouterr().err
    assert texts == ["A", "B", "C"] and "  1 of 3 prompts done (" in err and "3 of 3" not in err

    class Closed:
        def write(self, _):
            raise BrokenPipeError(32, "Broken pipe")
        flush = write
    monkeypatch.setattr("sys.stderr", Closed())
    assert client.generate_remote(server.url, ["a", "b"], SampleParams(5))[0] == ["A", "B"]
