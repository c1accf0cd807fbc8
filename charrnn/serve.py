"""Ray Serve application: the winning checkpoint served for batched, streamed generation.

    serve run charrnn.serve:build_app checkpoint=runs/alice/winner.json
    serve run serve_config.yaml

Concurrent requests are gathered by `@serve.batch` into one stateful generation batch: the
prompts are fed once, then the LSTM steps once per character for every active row. Each row has
its own length, temperature, top-k/top-p and seed, and its stream ends as soon as its own length
is reached. A replica watches the winner manifest and hot-swaps to a better checkpoint
(`follow.py`); a request keeps the model it started with, so in-flight requests finish on it.
"""


import asyncio
import contextlib
import logging
import threading
import time
from collections import Counter
from collections.abc import AsyncGenerator
from dataclasses import dataclass, field, replace

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
from charrnn.follow import Follower
from charrnn.generate import Generator, pick_device
from charrnn.sampling import SampleParams
from charrnn.stepper import cpu_threads

app = api.api  # the FastAPI app (routes below, request schema and errors in api.py)
log = logging.getLogger("ray.serve")
bind_serve_grpc_to_node_ip()  # in the replica, before its gRPC server starts (binding.py)
CHUNK_STEPS = 8  # characters per hand-off from the engine: streams stay smooth, the loop idle


class _GroupsNeedNotFill(logging.Filter):
    """Drops Serve's warning that `max_batch_size` x `max_concurrent_batches` (64 x 64) exceeds
    `max_ongoing_requests` (256), logged by each replica at its first request. Its advice (raise
    the latter to 4,096) assumes every gathered group fills to 64 rows. Here a group is only
    how requests join the running engine batch: many small groups in flight is the design, and
    `max_ongoing_requests` is the bound on a replica's rows, behind which a flood gets 503s."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno != logging.WARNING or "`max_concurrent_batches`" not in record.getMessage()


log.addFilter(_GroupsNeedNotFill())  # `log` is the logger `ray.serve.batching` warns on


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
        self.threads = cpu_threads(self.cfg.precision, self.cfg.threads)
        self.token = api.api_token(self.cfg.api_token_env)
        self.device = pick_device(self.cfg.device)
        self.batch_sizes: Counter = Counter()
        # The builder's checkpoint, or user_config's, watched for a better winner.
        self.models = Follower(self.cfg.checkpoint, self._load, self.cfg.watch_interval_s)
        for gather in (self._batch, self._batch_stream):
            gather.set_max_batch_size(self.cfg.max_batch_size)
            gather.set_batch_wait_timeout_s(self.cfg.batch_wait_timeout_s)

    # ----- model loading (hot swaps: follow.py) -------------------------------------------
    def _load(self, uri: str) -> Generator:
        loaded = checkpoint.load(uri, self.device)
        g = Generator(loaded, self.device, self.cfg.precision, self.threads)
        g.engine = Engine(g.model, g.vocab, self.device, g.dtype, g.stepper)
        m = loaded.meta
        g.info = {"run": m.get("run"), "checkpoint": loaded.uri, "step": m.get("step"),
                  "val_loss": (m.get("metrics") or {}).get("val_loss"), "loaded_at": time.time()}
        log.info("serving %s (val_loss %s)", loaded.uri, g.info["val_loss"])
        return g

    @property
    def current(self) -> Generator:
        """The model serving now; read once per request, which then runs on it."""
        return self.models.current

    def reconfigure(self, user_config: dict) -> None:
        """`user_config: {checkpoint: URI}` in the Serve config swaps the served checkpoint
        (`Follower.reconfigure`)."""
        self.models.reconfigure(user_config)

    def __del__(self) -> None:  # Serve calls it when it shuts a replica down
        if hasattr(self, "models"):
            self.models.stop()

    def check_health(self) -> None:
        """Serve restarts a replica whose check fails. One without a model never starts
        (`__init__` raises) and a failed step fails its requests, so what is left to catch is a
        stepping loop stuck in a step or prefill call, whose requests would wait forever."""
        engine = self.current.engine
        if (stalled := engine.stalled_s()) > engine.stall_limit_s:
            raise RuntimeError(f"the generation engine has made no progress for {stalled:.0f} s "
                               f"(more than {engine.stall_limit_s:g} s) with requests waiting")

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
        return {**_public(self.current.info), "source": self.models.source,
                "source_error": self.models.error,
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
