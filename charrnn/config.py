"""The typed config tree: YAML and CLI in, dataclasses out.

One `Config` flows from `jobs/train.py` to every training worker and into each checkpoint, and
Serve rebuilds the model from the `ModelConfig` stored there. Past `Config.from_dict` nothing reads
a hyperparameter from an untyped dict. Each setting has one dotted name (`model.hidden_size`),
used alike in YAML, in `--set key=value` overrides and in the docs.
"""

from __future__ import annotations

import dataclasses
import math
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from charrnn import urls
from charrnn.errors import ConfigError
from charrnn.model import ModelConfig
from charrnn.typed import check, did_you_mean, dotted_keys, from_dict, load_yaml, want, yaml_error


@dataclass
class DataConfig:
    corpus: str = "gutenberg:11"
    """Corpus source: a local path, `s3://bucket/key`, an `http(s)://` URL or `gutenberg:<id>`."""
    lowercase: bool = True
    """Lower-case the text before building the vocabulary (as the tutorial does)."""
    drop_chars: str = ""
    """Characters removed from the text before training (the tutorial's "remove punctuation")."""
    min_char_count: int = 0
    """Drop every character that occurs fewer than this many times (0 keeps all)."""
    decode_errors: str = "strict"
    """`strict`: undecodable bytes are an error naming the offset; `replace`: they become U+FFFD."""
    cache_dir: str = "~/.cache/charrnn"
    """Where `gutenberg:` and URL downloads are cached and reused."""
    seq_len: int = 100
    """Characters per training window; every position of a window is a target."""
    stride: int = 100
    """Distance between window starts; `stride == seq_len` makes each character a target once."""
    val_fraction: float = 0.1
    """The last fraction of the text held out for validation (split contiguously)."""

    def __post_init__(self):
        want(self, "data.corpus", bool(self.corpus.strip()),
             "set (a path, s3://bucket/key, an http(s):// URL or gutenberg:<id>)")
        want(self, "data.seq_len", self.seq_len >= 1, ">= 1")
        want(self, "data.stride", self.stride >= 1, ">= 1")
        want(self, "data.val_fraction", 0.0 < self.val_fraction < 0.5, "in (0, 0.5)")
        want(self, "data.min_char_count", self.min_char_count >= 0, ">= 0")
        if self.lowercase:  # the text is lower-cased first: these would drop nothing
            upper = "".join(dict.fromkeys(c for c in self.drop_chars if c.lower() != c))
            check(not upper, f"data.drop_chars has upper-case {upper!r}, which a lower-cased "
                  f"text never contains; give {upper.lower()!r} instead, or set data.lowercase=false")
        want(self, "data.decode_errors", self.decode_errors in ("strict", "replace"),
             "strict or replace")


@dataclass
class TrainConfig:
    epochs: int = 20
    """Passes over the training windows."""
    batch_size: int = 64
    """Windows per optimizer step per worker."""
    lr: float = 3e-3
    """Peak AdamW learning rate."""
    min_lr_ratio: float = 0.1
    """Cosine decay ends at `lr * min_lr_ratio`."""
    warmup_steps: int = 50
    """Linear warm-up steps before the cosine decay."""
    weight_decay: float = 0.01
    """AdamW weight decay."""
    grad_clip: float = 1.0
    """Clip the global gradient norm to this (0 disables)."""
    max_minutes: float = 0.0
    """Stop (after saving a checkpoint) once this invocation has trained this long, Ray Train's
    restarts after a failure included (`budget.py`); the LR schedule then anneals by time as well
    as by steps. 0 means no limit."""
    seed: int = 1337
    """Seeds weights, window offsets, shuffling and dropout (0 <= seed < 2**32)."""
    precision: str = "auto"
    """`auto` (bf16 autocast where bf16 matmuls are native: recent GPUs, CPUs with AMX or
    AVX512-BF16; else fp32), `bf16` or `fp32`."""
    threads: int = 0
    """torch intra-op threads per worker; 0 picks the worker's CPU share."""
    log_every_steps: int = 50
    """Progress line interval in steps (0 disables; epoch lines always print)."""
    sample_chars: int = 80
    """Length of the sample printed at each evaluation."""
    eval_max_chars: int = 2_000_000
    """Validation scores at most this many held-out characters (0: all of them)."""

    def __post_init__(self):
        want(self, "train.epochs", self.epochs >= 1, ">= 1")
        want(self, "train.batch_size", self.batch_size >= 1, ">= 1")
        want(self, "train.lr", math.isfinite(self.lr) and self.lr > 0, "a finite number > 0")
        want(self, "train.min_lr_ratio", 0 <= self.min_lr_ratio <= 1, "in [0, 1]")
        want(self, "train.warmup_steps", self.warmup_steps >= 0, ">= 0")
        want(self, "train.weight_decay", math.isfinite(self.weight_decay) and self.weight_decay >= 0,
             "a finite number >= 0")
        want(self, "train.grad_clip", 0 <= self.grad_clip < math.inf,
             "a finite number >= 0 (0 disables clipping)")
        want(self, "train.max_minutes", 0 <= self.max_minutes < math.inf, "a finite number >= 0 (0: no limit)")
        # numpy's generators refuse a negative seed; torch's takes seed + rank + step below 2**64.
        want(self, "train.seed", 0 <= self.seed < 2**32, "an integer in [0, 2**32)")
        want(self, "train.precision", self.precision in ("auto", "bf16", "fp32"), "auto, bf16 or fp32")
        want(self, "train.threads", self.threads >= 0, ">= 0 (0: the worker's CPU share)")
        want(self, "train.log_every_steps", self.log_every_steps >= 0, ">= 0 (0 disables)")
        want(self, "train.sample_chars", self.sample_chars >= 0, ">= 0")
        want(self, "train.eval_max_chars", self.eval_max_chars >= 0, ">= 0 (0: all)")


@dataclass
class RunConfig:
    name: str = "charrnn"
    """Run name; re-running with the same name and storage resumes the run."""
    storage: str = "./runs"
    """Where runs live: a local directory or `s3://bucket/prefix`."""
    s3_endpoint_url: str = ""
    """S3-compatible endpoint (MinIO, Ceph); empty reads AWS_ENDPOINT_URL_S3 / AWS_ENDPOINT_URL."""
    s3_region: str = ""
    """S3 region; empty reads AWS_REGION (then us-east-1)."""
    keep_checkpoints: int = 3
    """Keep the best K checkpoints by validation loss (the latest is kept too, for resuming)."""
    checkpoint_every_steps: int = 0
    """Also evaluate and checkpoint every N steps (0: only at the end of each epoch)."""
    max_failures: int = 3
    """Worker-group restarts Ray Train may make after failures (Ray mode)."""
    ray_report_lines: bool = False
    """Print Ray Train's lines for each evaluation (Ray mode): one "Reporting training result" of
    every metric per rank and "Checkpoint successfully created". Off, each epoch's own line is
    not buried; the metrics are in the run's metrics.json and the best checkpoint in winner.json."""

    def __post_init__(self):
        # The name is one directory (or key prefix) under `run.storage`: `..` would put the run in
        # the storage's parent and `.` over the storage itself, beside the other runs. A newline
        # or tab in it split the log lines that name the run, and a NUL failed in `os.mkdir`.
        want(self, "run.name", self.name not in ("", ".", "..") and "/" not in self.name
             and self.name.isprintable(),
             "a non-empty name of printable characters without '/', other than '.' or '..'")
        want(self, "run.storage", bool(self.storage), "set (a directory or s3://bucket/prefix)")
        bad = self.s3_endpoint_url and urls.problem(
            self.s3_endpoint_url, path=False,
            credentials=urls.S3_KEYS)
        check(not bad, f"run.s3_endpoint_url {urls.redacted(self.s3_endpoint_url)} {bad}")
        want(self, "run.keep_checkpoints", self.keep_checkpoints >= 1, ">= 1")
        want(self, "run.checkpoint_every_steps", self.checkpoint_every_steps >= 0, ">= 0 (0: per epoch)")
        want(self, "run.max_failures", self.max_failures >= -1, ">= -1 (-1: unlimited)")


@dataclass
class ScalingConfig:
    workers: int = 0
    """Ray Train workers; 0 trains in this process (local mode)."""
    gpus_per_worker: float | None = None
    """GPUs per worker; unset means 1 when the cluster has GPUs, else 0."""
    cpus_per_worker: float = 0.8
    """CPUs reserved per worker: below 1 on small machines, so Ray Data keeps CPU to run on."""

    def __post_init__(self):
        want(self, "scaling.workers", self.workers >= 0, ">= 0 (0: local mode)")
        want(self, "scaling.gpus_per_worker",
             self.gpus_per_worker is None or 0 <= self.gpus_per_worker < math.inf,
             "a finite number >= 0, or unset")
        want(self, "scaling.cpus_per_worker", 0 < self.cpus_per_worker < math.inf, "a finite number > 0")


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    run: RunConfig = field(default_factory=RunConfig)
    scaling: ScalingConfig = field(default_factory=ScalingConfig)

    def __post_init__(self):
        # Validation reads whole `seq_len` chunks: fewer characters would score none.
        want(self.train, "train.eval_max_chars", self.train.eval_max_chars == 0 or
             self.train.eval_max_chars >= self.data.seq_len,
             f"0 (all) or at least data.seq_len ({self.data.seq_len})")
        # Ray Train tags its metrics with the run name, and Ray's tags are ASCII: 'élan' failed
        # inside Ray's controller, with a traceback, after the cluster had started.
        want(self.run, "run.name", self.scaling.workers == 0 or self.run.name.isascii(),
             "ASCII to train with Ray Train workers (--workers N), which tag their metrics with it")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> Config:
        return from_dict(cls, d)

    def replace(self, **sections) -> Config:
        """A copy with whole sections swapped (e.g. `model=...` after the vocabulary is known)."""
        return dataclasses.replace(self, **sections)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


def apply_override(d: dict, assignment: str) -> None:
    """Apply one `dotted.key=value` override to the nested dict `d` (value parsed as YAML)."""
    if "=" not in assignment:
        raise ConfigError(f"--set expects key=value, got {assignment!r}")
    key, raw = assignment.split("=", 1)
    parts = key.strip().split(".")
    node: Any = Config()
    for p in parts:  # validate the path against the schema, not the (possibly partial) dict
        if not dataclasses.is_dataclass(node) or p not in {f.name for f in dataclasses.fields(node)}:
            raise ConfigError(f"--set: unknown config key {key!r}"
                              + did_you_mean(key.strip(), dotted_keys(Config())))
        node = getattr(node, p)
    if dataclasses.is_dataclass(node):
        raise ConfigError(f"--set: {key!r} is a section; set one of its fields")
    if isinstance(node, str):
        # Text settings take the text after `=` as it is: `data.drop_chars=123`, `=[{`, `= `
        # and `=ab #` mean those characters (YAML would read a number, fail, strip, or comment).
        value: Any = raw
    else:
        try:
            value = load_yaml(raw) if raw.strip() else ""
        except yaml.YAMLError as e:
            raise ConfigError(f"--set {key}: cannot parse value {raw!r}: {yaml_error(e)}") from None
    cursor = d
    for p in parts[:-1]:
        cursor = cursor.setdefault(p, {})
    cursor[parts[-1]] = value


def load_config(path: str | None = None, overrides: tuple[str, ...] | list[str] = ()) -> Config:
    """Read a YAML config (or the defaults when `path` is None) and apply `--set` overrides."""
    d: dict = {}
    if path == "":  # `--config ""` trained with the code's defaults, as if no file were named
        raise ConfigError("the config path is empty: give a YAML file (e.g. configs/alice.yaml)")
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file not found: {path}" + (" (a directory)" if p.is_dir() else ""))
        try:
            d = load_yaml(p.read_text(encoding="utf-8")) or {}
        except UnicodeDecodeError as e:
            raise ConfigError(f"{path}: not UTF-8 text (byte offset {e.start})") from None
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: invalid YAML: {yaml_error(e)}") from None
        if not isinstance(d, dict):
            raise ConfigError(f"{path}: top level must be a mapping of sections")
    for o in overrides:
        apply_override(d, o)
    return Config.from_dict(d)


@dataclass
class ServeConfig:
    """Arguments of the Serve app builder (`charrnn.serve:build_app`)."""
    checkpoint: str = ""
    """A winner.json, run directory or checkpoint directory (local or s3://) to serve."""
    watch_interval_s: float = 10.0
    """How often replicas re-read a winner manifest and hot-swap to a new best (0: never)."""
    max_batch_size: int = 64
    """Rows (prompts) stepped together in one generation batch."""
    batch_wait_timeout_s: float = 0.005
    """How long `@serve.batch` gathers requests into one group. Short: a group joins the running
    engine batch at its next step anyway (continuous batching), so a longer wait only adds
    latency; gathering saves one prefill per request."""
    max_chars_limit: int = 2000
    """Largest `max_chars` a request may ask for."""
    max_prompts: int = 64
    """Most prompts in one request."""
    max_prompt_chars: int = 4000
    """Longest prompt accepted."""
    max_body_bytes: int = 262144
    """Largest request body accepted (413 above)."""
    api_token_env: str = "CHARRNN_API_TOKEN"
    """Environment variable holding the bearer token required on /generate* (unset: open)."""
    device: str = "auto"
    """`auto` (cuda when the replica has a GPU), `cpu` or `cuda`."""
    precision: str = "fp32"
    """Per-character steps in `fp32` (the offline CLI's texts, whatever shares the batch), `bf16`
    (faster with many rows on bf16-capable CPUs and GPUs, but a row's text can then depend on the
    batch it shares: bf16 rounding of the state magnifies the last-bit differences that a lone
    row's matmul kernel and the packed prefill make) or `int8` (CPU, LSTM; the fastest on CPU and
    batch-independent; builds a C kernel at load, so the replica needs a C compiler)."""
    threads: int = 0
    """CPU threads per replica; 0 keeps Ray's default (the replica's `num_cpus`). fp32/bf16:
    torch's intra-op threads. int8: the native step's own threads, which share out the rows of
    a batch above 32 (`stepper.cpu_threads`)."""

    def __post_init__(self):
        check(bool(self.checkpoint), "serve: `checkpoint` (a winner.json, run or checkpoint URI) is required")
        # inf would make the watcher thread die (OverflowError) and a lone request wait forever
        want(self, "serve.watch_interval_s", 0 <= self.watch_interval_s < math.inf,
             "a finite number >= 0 (0: never)")
        want(self, "serve.max_batch_size", self.max_batch_size >= 1, ">= 1")
        want(self, "serve.batch_wait_timeout_s", 0 <= self.batch_wait_timeout_s < math.inf,
             "a finite number >= 0")
        want(self, "serve.max_chars_limit", self.max_chars_limit >= 1, ">= 1")
        want(self, "serve.max_prompts", self.max_prompts >= 1, ">= 1")
        want(self, "serve.max_prompt_chars", self.max_prompt_chars >= 1, ">= 1")
        want(self, "serve.max_body_bytes", self.max_body_bytes >= 1024, ">= 1024")
        want(self, "serve.device", self.device in ("auto", "cpu", "cuda"), "auto, cpu or cuda")
        want(self, "serve.precision", self.precision in ("fp32", "bf16", "int8"), "fp32, bf16 or int8")
        want(self, "serve.threads", self.threads >= 0, ">= 0 (0: the replica's num_cpus)")


def serve_config_from_args(args: dict) -> ServeConfig:
    """Serve passes builder args from YAML (typed) or `key=value` on the CLI (strings)."""
    typed = {}
    hints = typing.get_type_hints(ServeConfig)
    for k, v in (args or {}).items():
        if isinstance(v, str) and k in hints and hints[k] is not str:
            try:
                v = load_yaml(v)
            except yaml.YAMLError:
                pass
        typed[k] = v
    return from_dict(ServeConfig, typed, "serve.")
