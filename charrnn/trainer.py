"""Driver side of training: read the corpus once, then run the per-worker function locally or
on a Ray Train worker group.

Local mode (`scaling.workers == 0`) calls `train_loop_per_worker` in this process: no Ray, no
cluster. Ray mode builds a `TorchTrainer`; the corpus ids are put once into the object store
(one shared-memory copy per node), and a Ray Data range of window indices is sharded across the
workers (`get_dataset_shard`), each mapping its indices through the epoch's permutation.
"""

from __future__ import annotations

import dataclasses
import os
import time
import uuid

import numpy as np

from charrnn import corpus, runlock, runlog, s3, storage
from charrnn.checkpoint import WINNER
from charrnn.cli import sigterm_as_sigint
from charrnn.config import Config
from charrnn.data import split_corpus
from charrnn.dist import resume_point, stopped_error
from charrnn.errors import CharrnnError, Interrupted, StorageError, out_of_memory
from charrnn.train_loop import train_loop_per_worker
from charrnn.vocab import Vocab


def run_uri(cfg: Config) -> str:
    return storage.join(cfg.run.storage, cfg.run.name)


def prepare(cfg: Config) -> tuple[Config, Vocab, np.ndarray]:
    """Corpus -> (config with model.vocab_size set, vocabulary, ids). Fails early on bad data."""
    t0 = time.monotonic()
    text = corpus.load_text(cfg.data)
    vocab = Vocab.from_text(text)
    ids = vocab.encode(text)
    split_corpus(ids, cfg.data)  # raises a CorpusError when the text is too short
    runlog.say(f"corpus {cfg.data.corpus}: {len(ids):,} characters after cleaning, vocabulary "
               f"{len(vocab)} (read in {time.monotonic() - t0:.1f} s)")
    cfg = cfg.replace(model=dataclasses.replace(cfg.model, vocab_size=len(vocab)))
    return cfg, vocab, ids


RAY_WORKING_DIR = "/runtime_resources/working_dir_files/"  # where Ray unpacks a job's files


def check_storage(uri: str) -> None:
    """Before training: storage that can be written (`storage.check_storage`: a clear error now
    rather than a hang later), and not inside a submitted job's working directory."""
    p = storage.local_path(uri)
    if p is not None and RAY_WORKING_DIR in p.as_posix():
        raise StorageError(
            f"storage {uri} ({p}) is inside the working directory that `ray job submit` "
            "uploaded: Ray deletes it after the job, and a resubmission with changed files gets "
            "another one, so the run could neither be kept nor resumed; use s3://bucket/prefix "
            "or an absolute path on storage every node shares")
    storage.check_storage(uri)


def fit(cfg: Config) -> str:
    """Train (or resume) the run named by `cfg.run`; returns the winner manifest's URI."""
    s3.configure(cfg.run.s3_endpoint_url, cfg.run.s3_region)
    check_storage(cfg.run.storage)
    # Workers must reach the same endpoint: it (not a secret) travels in the config. Credentials
    # never do; each process reads them from its own environment (Secret, IAM role, ~/.aws).
    # A local storage path becomes absolute: Ray Train workers do not run in this directory, and
    # a relative one would have them write checkpoints and `winner.json` somewhere else. So does
    # a local corpus path, which checkpoints keep for `generate.py --random-prompt`.
    local = storage.local_path(cfg.run.storage)
    cfg = cfg.replace(run=dataclasses.replace(
        cfg.run, storage=str(local) if local else cfg.run.storage,
        s3_endpoint_url=s3.endpoint(), s3_region=s3.region()),
        data=dataclasses.replace(cfg.data, corpus=corpus.absolute(cfg.data.corpus)))
    cfg, vocab, ids = prepare(cfg)
    ray_mode, uri = cfg.scaling.workers > 0, run_uri(cfg)
    with runlock.run_lock(uri, cfg.run.name) as lease:
        for line in storage.tidy_local(uri):  # no other process writes in the run now
            runlog.say(line)
        # `invocation`: Ray Train's restarts after a failure belong to this call, and share its
        # `train.max_minutes` (the checkpoints say how much of it they used).
        loop_config = {"config": cfg.to_dict(), "vocab": vocab.chars, "run_uri": uri,
                       "invocation": uuid.uuid4().hex,
                       "start_from": resume_point(uri, cfg.run.name, ray_mode), "lease": lease}
        if not ray_mode:
            runlog.say("local mode: training in this process (--workers N for Ray Train)")
            train_loop_per_worker({**loop_config, "ids": ids, "mode": "local"})
        else:
            _fit_ray(cfg, ids, loop_config)
    winner = storage.join(uri, WINNER)
    if not storage.exists(winner):
        raise CharrnnError(f"training finished without a winner manifest at {winner}")
    return winner


def _worker_errors(e: Exception) -> list[tuple[int, BaseException]]:
    """(rank, exception) of each failed worker of a `WorkerGroupError`, by rank. Ray 2.60 wraps a
    worker's exception in `UserExceptionWithTraceback`; this unwraps it."""
    return [(rank, getattr(err, "_base_exc", err))
            for rank, err in sorted(getattr(e, "worker_failures", {}).items())]


def _charrnn_failure(e: Exception) -> str | None:
    """`rank N: message` of the first worker whose failure is a CharrnnError, else None (a bug:
    its traceback stays)."""
    return next((f"rank {rank}: {base}" for rank, base in _worker_errors(e)
                 if isinstance(base, CharrnnError)), None)


def _oom_failure(e: Exception) -> BaseException | None:
    """The first worker's failure that is running out of memory (`errors.out_of_memory`)."""
    return next((base for _, base in _worker_errors(e) if out_of_memory(base) is not None), None)


def connect_ray() -> bool:
    """`ray.init` on RAY_ADDRESS (set by `ray job submit`, or by hand), else on the cluster the
    last `ray start` of this machine recorded, else a new cluster of this machine (also what
    RAY_ADDRESS=local asks for, Ray's own word, whatever is on record). An address with no
    cluster behind it is one line, where Ray would retry for minutes. -> True for a new
    cluster: it is this machine alone and nothing will join it later (the others may grow)."""
    import socket

    import ray
    address = os.environ.get("RAY_ADDRESS", "")
    recorded, record = ("", "") if address else last_ray_start()
    if address:
        where, fix = f"RAY_ADDRESS={address}", ("start one (`ray start --head`), fix the address, "
                                                "or unset RAY_ADDRESS to train on this machine alone")
    else:
        where = (f"{recorded}, which the last `ray start` on this machine recorded in {record}"
                 if recorded else "a new cluster of this machine")
        fix = ("start that cluster again, or run `ray stop` (it clears the record) or set "
               "RAY_ADDRESS=local to train on this machine alone")
    host, sep, port = (address or recorded).removeprefix("ray://").rpartition(":")
    hint = ""
    if sep and host and port.isdigit():
        try:
            socket.create_connection((host.strip("[]"), int(port)), timeout=10).close()
        except OSError as e:
            raise CharrnnError(f"no Ray cluster answers at {where} ({e.strerror or e}): {fix}"
                               ) from None
        hint = ("; the address answers, so check the token: a cluster with token authentication "
                "needs RAY_AUTH_MODE=token and its token in RAY_AUTH_TOKEN or ~/.ray/auth_token")
    try:
        ray.init(log_to_driver=True)
    except ConnectionError as e:  # no cluster for RAY_ADDRESS=auto, a refused token
        raise CharrnnError(f"cannot connect to a Ray cluster ({where}): "
                           f"{str(e).splitlines()[0]}{hint}") from None
    return address == "local" or not (address or recorded)


def last_ray_start() -> tuple[str, str]:
    """(address, file) of the cluster the last `ray start` on this machine recorded, which a
    plain `ray.init()` joins; ("", "") if none. The file is Ray's own: <RAY_TMPDIR, TMPDIR or
    /tmp>/ray/ray_current_cluster, written by `ray start` and removed by `ray stop`; a head that
    died without `ray stop` leaves it behind."""
    try:
        from ray._common.utils import get_ray_address_file
        path = get_ray_address_file(None)
        with open(path) as f:
            return f.read().strip(), path
    except (ImportError, OSError):
        return "", ""


def check_resources(workers: int, cpus: float, gpus: float, have: dict, fixed: bool) -> None:
    """Compare what the worker group needs with what the Ray cluster has now. Ray Train would
    wait for missing resources forever (an autoscaler may add nodes), retrying its worker group
    start every minute: on a cluster that cannot grow (`fixed`) that is an error, said now."""
    need = {"CPU": workers * cpus, "GPU": workers * gpus}
    short = [k for k, v in need.items() if v > have.get(k, 0.0) + 1e-9]
    if not short:
        return
    per_worker = f"{cpus:g} CPU" + (f" + {gpus:g} GPU" if gpus else "")
    msg = (f"{workers} worker{'s' if workers != 1 else ''} x {per_worker} need{'s' if workers == 1 else ''} "
           + " and ".join(f"{need[k]:g} {k}" for k in short) + "; the Ray cluster has "
           + " and ".join(f"{have.get(k, 0.0):g} {k}" for k in short))
    if fixed:
        raise CharrnnError(f"{msg}: lower --workers, scaling.cpus_per_worker or "
                           "scaling.gpus_per_worker")
    print(f"waiting for resources: {msg} now; Ray Train retries until nodes join "
          "(an autoscaler, `ray start --address`)", flush=True)


def window_index_array(num_windows: int, workers: int) -> np.ndarray:
    """0..K-1, padded (wrapping around) to a multiple of `workers`.

    Ray Train splits datasets with `streaming_split(equal=True)`, which drops the remainder; the
    padding makes the equal shares cover every window (a few padded ones are seen twice), and
    equal shares give every DDP rank the same number of steps.
    """
    padded = -(-num_windows // workers) * workers
    return np.arange(padded, dtype=np.int64) % num_windows


def window_dataset(num_windows: int, workers: int):
    """A Ray Dataset of window indices (8 bytes each: O(N / stride)).

    The blocks are Arrow tables put into the object store directly: the dataset has no read or
    map operator, so no Ray Data task ever waits for CPU that the training workers hold (on
    small machines such a task starves and the job hangs).
    """
    import pyarrow as pa
    import ray.data
    arr = window_index_array(num_windows, workers)
    blocks = np.array_split(arr, max(1, min(len(arr) // 512, 8 * workers)))
    dataset = ray.data.from_arrow([pa.table({"id": b}) for b in blocks])
    # Ray Data's "Starting execution" and "Execution plan" lines, each epoch, would bury the
    # epoch's own line; its "execution finished" line stays.
    dataset.context.print_on_execution_start = False
    return dataset


def _fit_ray(cfg: Config, ids: np.ndarray, loop_config: dict) -> None:
    import ray
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from charrnn.binding import NodeBoundTorchConfig

    local_cluster = connect_ray() if not ray.is_initialized() else False
    sc, have = cfg.scaling, ray.cluster_resources()
    gpus = sc.gpus_per_worker
    if gpus is None:
        gpus = 1.0 if have.get("GPU", 0) > 0 else 0.0
    check_resources(sc.workers, sc.cpus_per_worker, gpus, have, local_cluster)
    train_split, _ = split_corpus(ids, cfg.data)
    dataset = window_dataset(train_split.num_windows, sc.workers)
    if storage.is_s3(cfg.run.storage):
        fs, storage_path = storage.resolve(cfg.run.storage)
    else:
        fs, storage_path = None, cfg.run.storage  # made absolute by `fit`
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={**loop_config, "ids": ray.put(ids), "mode": "ray"},
        torch_config=NodeBoundTorchConfig(),  # rank 0's rendezvous store on its node address
        scaling_config=ScalingConfig(
            num_workers=sc.workers, use_gpu=gpus > 0,
            resources_per_worker={"CPU": sc.cpus_per_worker, **({"GPU": gpus} if gpus else {})}),
        run_config=RunConfig(
            name=cfg.run.name, storage_path=storage_path, storage_filesystem=fs,
            checkpoint_config=CheckpointConfig(
                num_to_keep=cfg.run.keep_checkpoints, checkpoint_score_attribute="val_loss",
                checkpoint_score_order="min"),
            failure_config=FailureConfig(max_failures=cfg.run.max_failures)),
        datasets={"train": dataset},
    )
    stopped_error(loop_config["run_uri"])  # a note left by an earlier attempt is old news
    try:
        with sigterm_as_sigint():  # `ray job stop`, a pod stopping: aborted as on Ctrl-C
            trainer.fit()  # Train V2 raises on failure after `max_failures` restarts
    except ray.train.WorkerGroupError as e:
        # Ray Train gave up after `run.max_failures` restarts. It has logged each worker's
        # traceback; a user's or the environment's error (storage, say) ends as one line.
        failure = _charrnn_failure(e)
        if failure is None:
            oom = _oom_failure(e)
            if oom is not None:  # the CLI's one line; Ray has logged where it happened
                raise oom from None
            raise
        raise CharrnnError(f"Ray Train stopped the run after {cfg.run.max_failures} restart(s); "
                           f"{failure}") from None
    except (KeyboardInterrupt, SystemExit):
        # Ctrl-C: Ray Train's own SIGINT handler aborts the run, and its `ray.get` then raises
        # SystemExit(1) here, silently. What the run reported is kept.
        raise Interrupted("Ray Train stopped the run; its reported checkpoints are kept, and the "
                          "same command resumes from the latest") from None
    error = stopped_error(loop_config["run_uri"])
    if error:  # every worker stopped on it (`Backend.stop`): a diverged loss, a wrong checkpoint
        raise error
    lost = runlock.lease_lost(loop_config["run_uri"], loop_config["lease"])
    if lost:  # the workers stopped without saving (`Trainer._evaluate`), and left no note
        raise runlock.lost(cfg.run.name, lost, "; its workers stopped")
