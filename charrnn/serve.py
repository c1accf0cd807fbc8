"""Ray Serve application: the winning checkpoint served for batched, streamed generation.

    serve run charrnn.serve:build_app checkpoint=runs/alice/winner.json
    serve run serve_config.yaml

Concurrent requests are gathered by `@serve.batch` into one stateful generation batch: the
prompts are fed once, then the LSTM steps once per character for every active row. Each row has
its own length, temperature, top-k/top-p and seed, and its stream ends as soon as its own length
is reached. A replica watches the winner manifest and hot-swaps to a better checkpoint; a batch
keeps the model it started with, so in-flight requests finish on it.
"""


import asyncio
import logging
import os
import secrets
import threading
import time
from collections import Counter
from collections.abc import AsyncGenerator
from dataclasses import dataclass, field, replace
from typing import Literal

import torch
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, Field, ValidationError
from ray import serve

from charrnn import checkpoint, storage
from charrnn.binding import bind_serve_grpc_to_node_ip
from charrnn.config import serve_config_from_args
from charrnn.engine import DONE, Engine
from charrnn.errors import CharrnnError
from charrnn.generate import Generator, SampleParamError, SampleParams, pick_device

log = logging.getLogger("ray.serve")
bind_serve_grpc_to_node_ip()  # in the replica, before its gRPC server starts (binding.py)
CHUNK_STEPS = 8  # characters per hand-off from the engine: streams stay smooth, the loop idle


class GenerateRequest(BaseModel):
    """Body of POST /generate and /generate/stream: `prompt` or `prompts`, and how to decode."""
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


@dataclass
class Row:
    prompt: str
    params: SampleParams
    cancelled: threading.Event = field(default_factory=threading.Event)
    """Set when the request is cancelled (its client disconnected): the engine drops the row."""


api = FastAPI(title="charrnn", description="Character-level LSTM text generation")


@api.exception_handler(HTTPError)
async def _http_error(_: Request, e: HTTPError):
    return JSONResponse({"error": e.message}, status_code=e.status,
                        headers={"WWW-Authenticate": "Bearer"} if e.status == 401 else None)


def _validation_message(e: ValidationError) -> str:
    parts = []
    for err in e.errors():
        where = ".".join(str(x) for x in err.get("loc", ()) if x != "body")
        parts.append(f"{where}: {err['msg']}" if where else err["msg"])
    return "; ".join(parts)


def _public(info: dict) -> dict:
    return {k: info[k] for k in ("run", "checkpoint", "val_loss", "step")}


@serve.deployment(
    name="CharRNN",
    # Large enough that a replica holds a full batch plus the next one filling up.
    max_ongoing_requests=256,
    autoscaling_config={"min_replicas": 1, "max_replicas": 4, "target_ongoing_requests": 96,
                        "upscale_delay_s": 10, "downscale_delay_s": 120},
    ray_actor_options={"num_cpus": 1},
    health_check_period_s=10,
)
@serve.ingress(api)
class CharRNNServer:
    def __init__(self, config: dict):
        self.cfg = serve_config_from_args(config)
        if self.cfg.threads:
            torch.set_num_threads(self.cfg.threads)
        self.token = os.environ.get(self.cfg.api_token_env) or None
        self.device = pick_device(self.cfg.device)
        self.batch_sizes: Counter = Counter()
        self._lock = threading.Lock()
        self.current = self._load(self.cfg.checkpoint)
        self.source = self.cfg.checkpoint  # what the replica follows (builder arg or user_config)
        self.source_error: str | None = None  # why `source` is not serving, while it is not
        for gather in (self._batch, self._batch_stream):
            gather.set_max_batch_size(self.cfg.max_batch_size)
            gather.set_batch_wait_timeout_s(self.cfg.batch_wait_timeout_s)
        self._stop = threading.Event()
        if self.cfg.watch_interval_s:
            threading.Thread(target=self._watch, daemon=True, name="winner-watch").start()

    # ----- model loading and hot swap -------------------------------------------------------
    def _load(self, uri: str) -> Generator:
        loaded = checkpoint.load(uri, self.device)
        g = Generator(loaded, self.device, self.cfg.precision)
        g.engine = Engine(g.model, g.vocab, self.device, g.dtype)
        m = loaded.meta
        g.info = {"run": m.get("run"), "checkpoint": loaded.uri, "step": m.get("step"),
                  "val_loss": (m.get("metrics") or {}).get("val_loss"), "loaded_at": time.time()}
        log.info("serving %s (val_loss %s)", loaded.uri, g.info["val_loss"])
        return g

    def _swap_if_new(self, uri: str) -> bool:
        """Load `uri`'s checkpoint when it differs from the one serving; swap atomically."""
        with self._lock:
            target = checkpoint.resolve(uri)
            if target == self.current.info["checkpoint"]:
                return False
            new = self._load(target)
            self.current = new  # one reference assignment: batches already running keep theirs
            return True

    def _watch(self) -> None:
        while not self._stop.wait(self.cfg.watch_interval_s):
            self._follow(self.source)

    def _follow(self, uri: str) -> None:
        """Serve `uri`'s checkpoint if it is new. One that cannot be loaded (missing, partial,
        corrupt) leaves the current model serving; the reason shows in GET /model."""
        try:
            self._swap_if_new(uri)
            self.source_error = None
        except Exception as e:
            self.source_error = f"{uri}: {e}"
            log.warning("keeping %s: %s", self.current.info["checkpoint"], self.source_error)

    def reconfigure(self, user_config: dict) -> None:
        """`user_config: {checkpoint: URI}` in the Serve config swaps the served checkpoint. A URI
        that cannot be loaded does not take the application down: the replica keeps its model,
        says why in GET /model, and the watcher retries the URI (it may still be uploading)."""
        uri = (user_config or {}).get("checkpoint")
        if uri:
            self.source = uri
            self._follow(uri)

    def check_health(self) -> None:
        if self.current is None:
            raise RuntimeError("no model loaded")

    # ----- batching ---------------------------------------------------------------------------
    # Two gatherers, one per response kind; groups from both join the same engine batch.
    @serve.batch(max_batch_size=64, batch_wait_timeout_s=0.005, max_concurrent_batches=64)
    async def _batch(self, rows: list[Row]) -> list[tuple[str, dict]]:
        """One gathered group of whole-text requests -> (completion, model info) per row.

        The group joins the model's continuous-batching engine (`engine.py`): its rows step
        together with every other active row, in the engine's thread, which wakes this event
        loop once, with the texts, when the group is done.
        """
        gen = self.current  # the model this group starts with and finishes on
        queue = self._submit(gen, rows, chunk_steps=None)
        texts = await queue.get()
        if isinstance(texts, BaseException):
            raise texts
        return [(t, gen.info) for t in texts]

    @serve.batch(max_batch_size=64, batch_wait_timeout_s=0.005, max_concurrent_batches=64)
    async def _batch_stream(self, rows: list[Row]) -> AsyncGenerator[list, None]:
        """One gathered group of streaming requests; yields text chunks (or StopIteration once a
        row is done), every CHUNK_STEPS characters."""
        queue = self._submit(self.current, rows, chunk_steps=CHUNK_STEPS)
        while (chars := await queue.get()) is not DONE:
            if isinstance(chars, BaseException):
                raise chars
            yield [StopIteration if c is None else c for c in chars]

    def _submit(self, gen: Generator, rows: list[Row], chunk_steps: int | None) -> asyncio.Queue:
        self.batch_sizes[len(rows)] += 1
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        gen.engine.submit([r.prompt for r in rows], [r.params for r in rows],
                          lambda item: loop.call_soon_threadsafe(queue.put_nowait, item),
                          chunk_steps=chunk_steps, cancelled=[r.cancelled for r in rows])
        return queue

    # ----- request handling -------------------------------------------------------------------
    def _auth(self, request: Request) -> None:
        if self.token is None:
            return
        header = request.headers.get("authorization", "")
        if not (header.startswith("Bearer ") and secrets.compare_digest(header[7:], self.token)):
            raise HTTPError(401, "missing or wrong bearer token")

    async def _parse(self, request: Request) -> tuple[list[Row], GenerateRequest]:
        self._auth(request)
        limit = self.cfg.max_body_bytes
        if int(request.headers.get("content-length") or 0) > limit:
            raise HTTPError(413, f"request body larger than {limit} bytes")
        body = await request.body()
        if len(body) > limit:
            raise HTTPError(413, f"request body larger than {limit} bytes")
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
        if len(prompts) > self.cfg.max_prompts:
            raise HTTPError(422, f"{len(prompts)} prompts; at most {self.cfg.max_prompts} per request")
        if any(len(p) > self.cfg.max_prompt_chars for p in prompts):
            raise HTTPError(422, f"a prompt is longer than {self.cfg.max_prompt_chars} characters")
        if req.max_chars > self.cfg.max_chars_limit:
            raise HTTPError(422, f"max_chars {req.max_chars} is above the limit "
                                 f"{self.cfg.max_chars_limit}")
        if not req.greedy and req.temperature <= 0:
            raise HTTPError(422, "temperature must be > 0 (or set greedy: true)")
        try:
            params = SampleParams(max_new_chars=req.max_chars, temperature=req.temperature,
                                  top_k=req.top_k or 0, top_p=req.top_p, greedy=req.greedy,
                                  seed=req.seed)
            gen = self.current
            clean = gen.prepare(prompts, req.oov)
        except SampleParamError as e:  # named as in the request body
            raise HTTPError(422, e.message({"max_new_chars": "max_chars"})) from None
        except (ValueError, CharrnnError) as e:
            raise HTTPError(422, str(e)) from None
        return [Row(p, rp) for p, rp in zip(clean, Generator.row_params(params, len(clean)))], req

    @api.post("/generate", openapi_extra={"requestBody": {"required": True, "content": {
        "application/json": {"schema": GenerateRequest.model_json_schema()}}}})
    async def generate(self, request: Request) -> JSONResponse:
        """Complete one prompt or a list of prompts; returns completions and the serving model."""
        rows, _ = await self._parse(request)
        try:
            results = await asyncio.gather(*(self._batch(r) for r in rows))
        except asyncio.CancelledError:  # the client went away (Serve cancels its request)
            for r in rows:
                r.cancelled.set()  # @serve.batch runs a started batch to its end; the engine stops
            raise
        return JSONResponse({"completions": [text for text, _ in results],
                             "model": _public(results[0][1])})

    @api.post("/generate/stream", openapi_extra={"requestBody": {"required": True, "content": {
        "application/json": {"schema": GenerateRequest.model_json_schema()}}}})
    async def generate_stream(self, request: Request) -> StreamingResponse:
        """Stream one prompt's characters (text/plain) as they are generated."""
        rows, _ = await self._parse(request)
        if len(rows) != 1:
            raise HTTPError(422, "/generate/stream takes a single 'prompt'")
        info = self.current.info

        async def chars():
            try:
                async for c in self._batch_stream(rows[0]):
                    yield c
            finally:  # done, or the client went away mid-stream: the row stops either way
                rows[0].cancelled.set()

        return StreamingResponse(chars(), media_type="text/plain; charset=utf-8",
                                 headers={"X-Charrnn-Checkpoint": info["checkpoint"]})

    @api.get("/healthz")
    async def healthz(self) -> dict:
        return {"status": "ok"}

    @api.get("/model")
    async def model(self) -> dict:
        """Which checkpoint is serving."""
        return {**_public(self.current.info), "source": self.source,
                "source_error": self.source_error,
                "params": self.current.model.num_params()}

    @api.get("/stats")
    async def stats(self) -> dict:
        """Groups gathered by @serve.batch so far, by size, the most rows stepped together and
        the rows stepping now (of the model serving now)."""
        return {"batch_sizes": {str(k): v for k, v in sorted(self.batch_sizes.items())},
                "max_rows_stepped": self.current.engine.max_rows,
                "active_rows": self.current.engine.active_rows}


def build_app(args: dict) -> serve.Application:
    """App builder: `serve run charrnn.serve:build_app checkpoint=URI [key=value ...]`.

    Keys are the `ServeConfig` fields; the checkpoint is checked here, so a wrong URI fails at
    deploy time with a clear message rather than in a crash-looping replica.
    """
    cfg = serve_config_from_args(args)
    storage.configure()
    local = storage.local_path(cfg.checkpoint)
    if local is not None:  # replicas need not share this process's working directory
        cfg = replace(cfg, checkpoint=str(local))
    checkpoint.resolve(cfg.checkpoint)
    return CharRNNServer.bind({k: getattr(cfg, k) for k in cfg.__dataclass_fields__})
