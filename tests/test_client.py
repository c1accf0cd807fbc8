"""The Serve client of `jobs/generate.py --serve-url`, against a stand-in server on loopback."""

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from charrnn import client
from charrnn.errors import CharrnnError
from charrnn.sampling import SampleParams


@pytest.fixture
def server(monkeypatch):
    """Answers POST /generate with the statuses queued in `server.statuses` (then 200s)."""
    monkeypatch.setattr(client, "RETRY_WAITS_S", (0.0, 0.0, 0.0, None))

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers["content-length"])))
            srv.bodies.append(body)
            srv.auth.append(self.headers.get("authorization"))  # as decoded: Latin-1
            status = srv.statuses.pop(0) if srv.statuses else 200
            data = ({"completions": [body["prompt"].upper()], "model": {"run": "r"}}
                    if status == 200 else {"error": "busy"})
            out = json.dumps(data).encode()
            self.send_response(status)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(out)))
            self.end_headers()
            self.wfile.write(out)

        def log_message(self, *args):
            pass

    srv = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    srv.statuses, srv.bodies, srv.auth = [], [], []
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    srv.url = f"http://127.0.0.1:{srv.server_address[1]}"
    yield srv
    srv.shutdown()


def test_a_busy_or_restarting_server_is_retried(server):
    server.statuses = [503, 502]
    texts, model = client.generate_remote(server.url, ["abc"], SampleParams(5, seed=1), oov="drop")
    assert texts == ["ABC"] and model == {"run": "r"}
    assert len(server.bodies) == 3 and server.bodies[-1]["oov"] == "drop"


def test_errors_are_one_line(server):
    server.statuses = [503] * 4  # still busy after the last retry
    with pytest.raises(CharrnnError, match="answered 503: busy"):
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
    with pytest.raises(CharrnnError, match="--serve-url must be http"):
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
