"""The HTTP API of the Serve app: the request body, its checks, the shape of every error, and
no traceback in the replica's log for a client that leaves mid-stream.

Pure FastAPI/pydantic: `serve.py` mounts `api` on its deployment and turns a checked request
into engine rows. Every 4xx is `{"error": "<one line>"}`.
"""

import asyncio
import logging
import os
import secrets
from typing import Literal

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.exceptions import HTTPException

from charrnn.config import ServeConfig
from charrnn.sampling import SampleParamError, SampleParams


class GenerateRequest(BaseModel):
    """Body of POST /generate and /generate/stream: `prompt` or `prompts`, and how to decode.

    Strict, like the config tree: an unknown field (`max_char`) or a value of another type
    (`"max_chars": true` or `"20"`) is a 422, never silently a default or a coerced value."""
    model_config = ConfigDict(extra="forbid", strict=True)
    prompt: str | None = Field(None, description="one prompt")
    prompts: list[str] | None = Field(None, description="several prompts, generated together")
    max_chars: int = Field(200, ge=0, description="characters to generate per prompt")
    temperature: float = Field(1.0, description="> 0 unless greedy; below 1e-5 it decodes greedily")
    top_k: int | None = Field(None, ge=1, description="sample among the k likeliest")
    top_p: float = Field(1.0, gt=0, le=1, description="nucleus sampling mass")
    greedy: bool = Field(False, description="argmax decoding")
    seed: int | None = Field(None, ge=0, description="prompt i uses seed + i")
    oov: Literal["error", "drop", "replace"] = Field("error", description="unknown characters")


class HTTPError(Exception):
    def __init__(self, status: int, message: str):
        self.status, self.message = status, message


api = FastAPI(title="charrnn", description="Character-level LSTM text generation")
BODY = {"requestBody": {"required": True, "content": {
    "application/json": {"schema": GenerateRequest.model_json_schema()}}}}  # for /docs


@api.exception_handler(HTTPError)
async def _http_error(_: Request, e: HTTPError):
    return JSONResponse({"error": e.message}, status_code=e.status,
                        headers={"WWW-Authenticate": "Bearer"} if e.status == 401 else None)


@api.exception_handler(HTTPException)
async def _routing_error(_: Request, e: HTTPException):
    """Unknown paths and methods (404, 405) answer in the same `{"error": ...}` shape."""
    return JSONResponse({"error": str(e.detail)}, status_code=e.status_code, headers=e.headers)


def _validation_message(e: ValidationError) -> str:
    parts = []
    for err in e.errors():
        where = ".".join(str(x) for x in err.get("loc", ()) if x != "body")
        parts.append(f"{where}: {err['msg']}" if where else err["msg"])
    return "; ".join(parts)


def api_token(env: str) -> bytes | None:
    """The bearer token `/generate*` needs, from the variable `env`; None leaves them open (unset,
    or set to blanks, which is logged). Surrounding whitespace is not part of it: a Secret made
    from a file (`echo token > f`) ends in a newline that no client sends."""
    token = os.environ.get(env, "").strip()
    if not token and env in os.environ:
        logging.getLogger("ray.serve").warning("%s is set but blank: /generate* needs no token", env)
    return token.encode() if token else None


def check_token(authorization: str, token: bytes | None) -> None:
    """401 unless the `Authorization` header is `Bearer <token>` (the scheme in any case, RFC 7235).
    Compared as bytes in constant time: header values arrive decoded as Latin-1, and
    `secrets.compare_digest` refuses non-ASCII text (a 500 for `Bearer é`)."""
    if token is None:
        return
    scheme, _, given = authorization.strip().partition(" ")
    if not (scheme.lower() == "bearer" and secrets.compare_digest(
            given.strip().encode("latin-1", "replace"), token)):
        raise HTTPError(401, "missing or wrong bearer token")


def check_size(nbytes: int, cfg: ServeConfig) -> None:
    """413 for a body above `max_body_bytes`: its Content-Length (before reading it) or its
    length (a body sent without one)."""
    if nbytes > cfg.max_body_bytes:
        raise HTTPError(413, f"request body larger than {cfg.max_body_bytes} bytes")


async def read_body(request: Request, cfg: ServeConfig) -> bytes:
    """The request body, read no further than `max_body_bytes` (413 beyond). `request.body()`
    held a body sent without Content-Length (chunked) whole before its size was checked: 2 GB
    of it took a replica from 0.4 to 5.7 GB of memory."""
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        check_size(size, cfg)
        chunks.append(chunk)
    return b"".join(chunks)


def parse(body: bytes, cfg: ServeConfig) -> tuple[GenerateRequest, list[str], SampleParams]:
    """A request body -> the request, its prompts and its decoding settings, within the
    deployment's limits; else an `HTTPError` (400 for malformed JSON, 413, 422)."""
    check_size(len(body), cfg)
    if not body.strip():  # `curl -X POST` without -d: was "EOF while parsing a value at line 1"
        raise HTTPError(400, 'empty request body: send a JSON object, e.g. {"prompt": "alice"}')
    try:
        req = GenerateRequest.model_validate_json(body)
    except ValidationError as e:
        malformed = any(err["type"] == "json_invalid" for err in e.errors())
        raise HTTPError(400 if malformed else 422,
                        ("malformed JSON: " if malformed else "") + _validation_message(e)) from None
    if (req.prompt is None) == (req.prompts is None):
        raise HTTPError(422, "give exactly one of 'prompt' or 'prompts'")
    prompts = [req.prompt] if req.prompt is not None else req.prompts
    if not prompts or any(p == "" for p in prompts):
        raise HTTPError(422, "prompts must be non-empty strings")
    if len(prompts) > cfg.max_prompts:
        raise HTTPError(422, f"{len(prompts)} prompts; at most {cfg.max_prompts} per request")
    if any(len(p) > cfg.max_prompt_chars for p in prompts):
        raise HTTPError(422, f"a prompt is longer than {cfg.max_prompt_chars} characters")
    if req.max_chars > cfg.max_chars_limit:
        raise HTTPError(422, f"max_chars {req.max_chars} is above the limit {cfg.max_chars_limit}")
    try:
        params = SampleParams(max_new_chars=req.max_chars, temperature=req.temperature,
                              top_k=req.top_k or 0, top_p=req.top_p, greedy=req.greedy,
                              seed=req.seed)
    except SampleParamError as e:  # named as in the request body
        raise HTTPError(422, e.message({"max_new_chars": "max_chars", "greedy": "greedy: true"})) from None
    return req, prompts, params


def quiet_abandoned_streams(loop: asyncio.AbstractEventLoop) -> None:
    """When a streaming client goes away, @serve.batch ends its stream by setting
    StopAsyncIteration on a future that nobody awaits any more, and asyncio then logged "Future
    exception was never retrieved" with a traceback for every disconnected client. That one,
    harmless, is dropped here; everything else still goes to the loop's handler."""
    previous = loop.get_exception_handler()
    if getattr(previous, "quiets_streams", False):
        return

    def handler(loop, context):
        if (isinstance(context.get("exception"), StopAsyncIteration)
                and "never retrieved" in context.get("message", "")):
            return
        if previous is not None:
            previous(loop, context)
        else:
            loop.default_exception_handler(context)
    handler.quiets_streams = True
    loop.set_exception_handler(handler)
