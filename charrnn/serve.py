"""Ray Serve application: the winning checkpoint served for batched, streamed generation.

    serve run charrnn.serve:build_app checkpoint=runs/alice/winner.json
    serve run serve_config.yaml

Concurrent requests are gathered by `@serve.batch` into one stateful generation batch: the
prompts are fed once, then the LSTM steps once per character for every active row. Each row has
its own length, temperature, top-k/top-p and seed, and its stream ends as soon as its own length
is reached. A replica watches the winner manifest and hot-swaps to a better checkpoint; a request
keeps the model it started with, so in-flight requests finish on it.
"""


import asyncio
import contextlib
import logging
import os
import threading
import time
from collections import Counter
from collections.abc import AsyncGenerator
from dataclasses import dataclass, field, replace

import torch
from fastapi import Request
from fastapi.responses import JSONResponse, StreamingResponse
from ray import serve
from ray.exceptions import TaskCancelledError
from ray.serve.config import BackpressureConfig

from charrnn import api, checkpoint, s3, storage
from charrnn.api import HTTPError
from charrnn.binding import bind_serve_grpc_to_node_ip
from charrnn.config import serve_config_from_args
from charrnn.engine import DONE, Engine
from charrnn.errors import CharrnnError
from charrnn.generate import Generator, pick_device
from charrnn.sampling import SampleParams

app = api.api  # the FastAPI app (routes below, request schema and errors in api.py)
log = logging.getLogger("ray.serve")
bind_serve_grpc_to_node_ip()  # in the replica, before its gRPC server starts (binding.py)
CHUNK_STEPS = 8  # characters per hand-off from the engine: streams stay smooth, the loop idle


@dataclass
class Row:
    prompt: str
    params: SampleParams
    gen: Generator
    """The model whose vocabulary and data settings prepared `prompt`: the row steps on it, even
    when a hot swap lands between parsing the request and gathering its group."""
    cancelled: threading.Event = field(default_factory=threading.Event)
    """Set when the request is cancelled (its client disconnected): the engine drops the row."""


class _Stream(StreamingResponse):
    """A stream whose client may leave. Serve then cancels the request, and `receive` raises
    TaskCancelledError in Starlette's disconnect listener; uncaught, it ended the request's task,
    and asyncio logged "exception was never retrieved" with a 40-line traceback for 1,227 of
    5,000 such clients in `bench/serve_soak.py`. The stream is over either way (its rows stop:
    `chars` below)."""

    async def __call__(self, scope, receive, send) -> None:
        with contextlib.suppress(TaskCancelledError):
            await super().__call__(scope, receive, send)


def _public(info: dict) -> dict:
    return {k: info[k] for k in ("run", "checkpoint", "val_loss", "step")}


@serve.deployment(
    name="CharRNN",
    # Large enough that a replica holds a full batch plus the next one filling up.
    max_ongoing_requests=256,
    # Beyond every replica's 256, a bounded queue: a flood gets 503s with Retry-After
    # (`jobs/generate.py --serve-url` waits and retries) instead of latency growing without end.
    max_queued_requests=512,
    backpressure_config=BackpressureConfig(status_code=503, retry_after_s=1),
    autoscaling_config={"min_replicas": 1, "max_replicas": 4, "target_ongoing_requests": 96,
                        "upscale_delay_s": 10, "downscale_delay_s": 120},
    ray_actor_options={"num_cpus": 1},
    health_check_period_s=10,
)
@serve.ingress(app)
class CharRNNServer:
    def __init__(self, config: dict):
        self.cfg = serve_config_from_args(config)
        if self.cfg.threads:
            torch.set_num_threads(self.cfg.threads)
        self.token = api.api_token(self.cfg.api_token_env)
        self.device = pick_device(self.cfg.device)
        self.batch_sizes: Counter = Counter()
        self._lock = threading.Lock()
        self.current = self._load(self.cfg.checkpoint)
        self.source = self.cfg.checkpoint  # what the replica follows (builder arg or user_config)
        self.load_error: str | None = None  # why `source` is not serving, while it is not
        self.config_note: str | None = None  # what the last user_config had that was ignored
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
            self.load_error = None
        except Exception as e:
            where = (f" (a relative path, read in the replica's directory {os.getcwd()}: give an "
                     "absolute path or an s3:// URI)" if "://" not in uri and not
                     os.path.isabs(os.path.expanduser(uri)) else "")
            error = f"{e}{where}" if uri in str(e) else f"{uri}: {e}{where}"
            if error != self.load_error:  # once per new reason, not at every watch interval
                log.warning("keeping %s: %s", self.current.info["checkpoint"], error)
            self.load_error = error

    @property
    def source_error(self) -> str | None:
        """What GET /model reports: why the followed checkpoint is not serving, and what the last
        user_config had that was ignored; None when neither applies."""
        return "; ".join(e for e in (self.load_error, self.config_note) if e) or None

    def reconfigure(self, user_config: dict) -> None:
        """`user_config: {checkpoint: URI}` in the Serve config swaps the served checkpoint; a
        config without that key returns to the builder's `checkpoint` (Serve configs declare the
        state wanted). A URI that cannot be loaded does not take the application down: the replica
        keeps its model, says why in GET /model, and the watcher retries the URI (it may still be
        uploading). Other keys (a misspelled `checkpoint`) are ignored and named there too."""
        user_config = user_config or {}
        unknown = sorted(map(str, set(user_config) - {"checkpoint"}))
        notes = [f"user_config: unknown key {', '.join(map(repr, unknown))} ignored (its one key "
                 "is 'checkpoint')"] if unknown else []
        uri = user_config.get("checkpoint")
        if uri is None or isinstance(uri, str):
            self.source = uri or self.cfg.checkpoint
        else:  # `checkpoint: 5`, a list: not a URI; the replica keeps following what it followed
            notes.append(f"user_config: checkpoint must be a URI (a winner.json, run or "
                         f"checkpoint directory), got {uri!r}; still following {self.source}")
        self.config_note = "; ".join(notes) or None
        if self.config_note:
            log.warning(self.config_note)
        self._follow(self.source)

    def check_health(self) -> None:
        if self.current is None:
            raise RuntimeError("no model loaded")

    # ----- batching ---------------------------------------------------------------------------
    # Two gatherers, one per response kind; groups from both join the same engine batch.
    @serve.batch(max_batch_size=64, batch_wait_timeout_s=0.005, max_concurrent_batches=64)
    async def _batch(self, rows: list[Row]) -> list[tuple[str, dict]]:
        """One gathered group of whole-text requests -> (completion, model info) per row.

        The group joins its model's continuous-batching engine (`engine.py`): its rows step
        together with every other active row, in the engine's thread, which wakes this event
        loop once, with the texts, when the group is done.
        """
        queue, parts = self._submit(rows, chunk_steps=None)
        texts: list = [None] * len(rows)
        for _ in parts:
            while (item := await queue.get())[1] is DONE:
                pass
            idx, got = item
            if isinstance(got, BaseException):
                raise got
            for i, t in zip(idx, got):
                texts[i] = t
        return [(t, r.gen.info) for t, r in zip(texts, rows)]

    @serve.batch(max_batch_size=64, batch_wait_timeout_s=0.005, max_concurrent_batches=64)
    async def _batch_stream(self, rows: list[Row]) -> AsyncGenerator[list, None]:
        """One gathered group of streaming requests; yields text chunks (or StopIteration once a
        row is done), every CHUNK_STEPS characters."""
        queue, parts = self._submit(rows, chunk_steps=CHUNK_STEPS)
        live = len(parts)
        while live:
            idx, chars = await queue.get()
            if chars is DONE:  # that part's streams end now, not when the last part ends
                live -= 1
                if live:
                    yield [StopIteration if i in idx else "" for i in range(len(rows))]
                continue
            if isinstance(chars, BaseException):
                raise chars
            out: list = [""] * len(rows)  # rows of another part: nothing new (skipped in chars())
            for i, c in zip(idx, chars):
                out[i] = StopIteration if c is None else c
            yield out

    def _submit(self, rows: list[Row], chunk_steps: int | None):
        """Queue each row on its model's engine: one part per model (one, unless a hot swap
        landed while the group gathered). Returns the queue, which receives (row indices, item)
        for every item a part's engine emits, and the parts' row indices."""
        self.batch_sizes[len(rows)] += 1
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        parts: dict[int, list[int]] = {}
        for i, r in enumerate(rows):
            parts.setdefault(id(r.gen), []).append(i)
        for idx in parts.values():
            part = [rows[i] for i in idx]
            part[0].gen.engine.submit(
                [r.prompt for r in part], [r.params for r in part],
                lambda item, idx=idx: loop.call_soon_threadsafe(queue.put_nowait, (idx, item)),
                chunk_steps=chunk_steps, cancelled=[r.cancelled for r in part])
        return queue, list(parts.values())

    # ----- request handling -------------------------------------------------------------------
    async def _parse(self, request: Request) -> list[Row]:
        api.check_token(request.headers.get("authorization", ""), self.token)
        api.check_size(int(request.headers.get("content-length") or 0), self.cfg)
        req, prompts, params = api.parse(await api.read_body(request, self.cfg), self.cfg)
        gen = self.current  # read once: the request is prepared for, and runs on, this model
        try:
            clean = gen.prepare(prompts, req.oov)
        except (ValueError, CharrnnError) as e:  # characters outside the vocabulary
            raise HTTPError(422, str(e)) from None
        return [Row(p, rp, gen) for p, rp in zip(clean, Generator.row_params(params, len(clean)))]

    @app.post("/generate", openapi_extra=api.BODY)
    async def generate(self, request: Request) -> JSONResponse:
        """Complete one prompt or a list of prompts; returns completions and the serving model."""
        rows = await self._parse(request)
        try:
            results = await asyncio.gather(*(self._batch(r) for r in rows))
        except asyncio.CancelledError:  # the client went away (Serve cancels its request)
            for r in rows:
                r.cancelled.set()  # @serve.batch runs a started batch to its end; the engine stops
            raise
        return JSONResponse({"completions": [text for text, _ in results],
                             "model": _public(results[0][1])})

    @app.post("/generate/stream", openapi_extra=api.BODY)
    async def generate_stream(self, request: Request) -> _Stream:
        """Stream one prompt's characters (text/plain) as they are generated."""
        rows = await self._parse(request)
        if len(rows) != 1:
            raise HTTPError(422, "/generate/stream takes a single 'prompt'")
        api.quiet_abandoned_streams(asyncio.get_running_loop())
        info = rows[0].gen.info

        async def chars():
            try:
                async for c in self._batch_stream(rows[0]):
                    if c:
                        yield c
            finally:  # done, or the client went away mid-stream: the row stops either way
                rows[0].cancelled.set()

        return _Stream(chars(), media_type="text/plain; charset=utf-8",
                                 headers={"X-Charrnn-Checkpoint": info["checkpoint"]})

    @app.get("/healthz")
    async def healthz(self) -> dict:
        return {"status": "ok"}

    @app.get("/model")
    async def model(self) -> dict:
        """Which checkpoint is serving."""
        return {**_public(self.current.info), "source": self.source,
                "source_error": self.source_error,
                "params": self.current.model.num_params()}

    @app.get("/stats")
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
    s3.configure()
    local = storage.local_path(cfg.checkpoint)
    if local is not None:  # replicas need not share this process's working directory
        cfg = replace(cfg, checkpoint=str(local))
    checkpoint.resolve(cfg.checkpoint)
    return CharRNNServer.bind({k: getattr(cfg, k) for k in cfg.__dataclass_fields__})
