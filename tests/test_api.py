"""The HTTP request checks of the Serve app, without Serve (tests/test_serve.py sends them)."""
import asyncio
import gc
import json
import re

import pytest

from charrnn import api
from charrnn.api import HTTPError, parse
from charrnn.config import ServeConfig

CFG = ServeConfig(checkpoint="x", max_chars_limit=500, max_prompts=8, max_body_bytes=4096)


def test_a_good_body_gives_prompts_and_decoding_settings():
    req, prompts, params = parse(json.dumps({"prompts": ["a", "b"], "max_chars": 7, "top_k": 3,
                                             "temperature": 1, "seed": 4}).encode(), CFG)
    assert prompts == ["a", "b"] and req.oov == "error"
    assert (params.max_new_chars, params.top_k, params.temperature, params.seed) == (7, 3, 1.0, 4)


@pytest.mark.parametrize("body,status,match", [
    (b"{not json", 400, "malformed JSON"),
    (b"", 400, r'^empty request body: send a JSON object, e.g. \{"prompt": "alice"\}$'),
    (b" \r\n", 400, "^empty request body"),
    (b'{"prompt": "a", "max_char": 20}', 422, "max_char: Extra inputs are not permitted"),
    (b'{"prompt": "a", "max_chars": true}', 422, "max_chars: Input should be a valid integer"),
    (b'{"prompt": "a", "max_chars": 20.0}', 422, "max_chars: Input should be a valid integer"),
    (b'{"prompt": "a", "max_chars": "20"}', 422, "max_chars: Input should be a valid integer"),
    (b'{"prompt": "a", "greedy": "yes"}', 422, "greedy: Input should be a valid boolean"),
    (b'{"prompts": ["a", 1]}', 422, "prompts.1: Input should be a valid string"),
    (b'{"prompt": "a", "temperature": 0}', 422,
     r"^temperature must be a finite number > 0 \(or use greedy: true\)$"),
    (b'{"prompt": "a", "max_chars": 501}', 422, "above the limit 500"),
    (json.dumps({"prompt": "a" * 5000}).encode(), 413, "larger than 4096"),
])
def test_bad_bodies_are_one_line_errors(body, status, match):
    with pytest.raises(HTTPError) as e:
        parse(body, CFG)
    assert e.value.status == status
    assert e.value.message == e.value.message.strip() and re.search(match, e.value.message)


def test_the_bearer_token_check(monkeypatch, caplog):
    """`Bearer é` (any non-ASCII header) was a 500: `secrets.compare_digest` refuses non-ASCII
    text. A token read from a Secret file kept its trailing newline and matched no client."""
    from charrnn.api import api_token, check_token
    monkeypatch.setenv("T", "s3cret\n")
    token = api_token("T")
    assert token == b"s3cret"
    check_token("Bearer s3cret", token)
    check_token("bearer  s3cret ", token)  # the scheme in any case (RFC 7235)
    for header in ("", "Bearer", "Bearer nope", "Basic s3cret", "Bearer é", "Bearer s3crét",
                   "s3cret"):
        with pytest.raises(HTTPError) as e:
            check_token(header, token)
        assert (e.value.status, e.value.message) == (401, "missing or wrong bearer token")
    monkeypatch.setenv("T", "tökén")  # a UTF-8 token: clients send its bytes, read as Latin-1
    check_token("Bearer " + "tökén".encode().decode("latin-1"), api_token("T"))
    check_token("anything", None)  # no token: open
    monkeypatch.delenv("T")
    assert api_token("T") is None and not caplog.records
    monkeypatch.setenv("T", " ")
    assert api_token("T") is None and "T is set but blank" in caplog.text


def test_a_body_without_content_length_is_read_no_further_than_the_limit():
    """`request.body()` held a chunked body whole before checking its size (2 GB of it took a
    replica from 0.4 to 5.7 GB); an endless one would never be answered."""

    from starlette.requests import Request

    from charrnn.api import read_body
    sent = []

    async def receive():  # an endless chunked body, 64 KiB a message
        sent.append(1)
        return {"type": "http.request", "body": b" " * 65536, "more_body": True}

    request = Request({"type": "http", "method": "POST", "headers": []}, receive)
    with pytest.raises(HTTPError) as e:
        asyncio.run(read_body(request, CFG))
    assert (e.value.status, e.value.message) == (413, "request body larger than 4096 bytes")
    assert len(sent) == 1

    bodies = iter([b'{"prompt": ', b'"a"}'])

    async def two_parts():
        body = next(bodies)
        return {"type": "http.request", "body": body, "more_body": body != b'"a"}'}

    request = Request({"type": "http", "method": "POST", "headers": []}, two_parts)
    assert parse(asyncio.run(read_body(request, CFG)), CFG)[1] == ["a"]


def test_an_abandoned_stream_logs_no_traceback():
    """@serve.batch ends a disconnected client's stream by setting StopAsyncIteration on a future
    nobody awaits; asyncio logged "Future exception was never retrieved" with a traceback in the
    replica for every such client. Other unretrieved exceptions are still logged."""
    seen = []
    loop = asyncio.new_event_loop()
    loop.set_exception_handler(lambda loop, context: seen.append(context["exception"]))
    api.quiet_abandoned_streams(loop)
    api.quiet_abandoned_streams(loop)  # once per loop: the second call wraps nothing
    for exc in (StopAsyncIteration, ValueError("real")):
        fut = loop.create_future()
        fut.set_exception(exc)
        del fut
        gc.collect()
    loop.close()
    assert [str(e) for e in seen] == ["real"]


def test_a_stream_whose_client_left_ends_quietly():
    """Serve cancels the request of a client that left, and the disconnect listener's `receive`
    raised TaskCancelledError out of the response: asyncio then logged "exception was never
    retrieved" with a traceback for 1,227 of 5,000 such clients (`bench/serve_soak.py`)."""
    from ray.exceptions import TaskCancelledError
    from starlette.responses import StreamingResponse

    from charrnn.serve import _Stream
    closed, sent = [], []

    async def chars():
        try:
            while True:
                yield "abc"
                await asyncio.sleep(0.01)
        finally:  # the rows stop
            closed.append(True)

    async def send(message):
        sent.append(message["type"])

    async def receive():
        await asyncio.sleep(0.05)
        raise TaskCancelledError()

    scope = {"type": "http", "asgi": {"spec_version": "2.3"}}  # as Serve's proxy passes it
    asyncio.run(_Stream(chars())(scope, receive, send))
    assert closed == [True] and sent[0] == "http.response.start" and "http.response.body" in sent
    with pytest.raises(TaskCancelledError):  # what Starlette's own response lets out
        asyncio.run(StreamingResponse(chars())(scope, receive, send))
