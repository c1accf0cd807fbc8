"""The distributed rules, in one place: who writes, who reports, how shards and DDP work.

The training loop (`train_loop.py`) talks only to a `Backend`:
- `LocalBackend`: one process, no Ray; its shard is the whole epoch, and a small keeper copies
  checkpoints into the run directory and keeps the best K (Ray's local mode keeps nothing).
- `RayBackend`: a Ray Train worker. Its shard comes from Ray Data (`get_dataset_shard`), the
  model is wrapped in DDP (gloo on CPU, NCCL on GPU), sums are all-reduced, and checkpoints go
  through `ray.train.report`, which uploads them and keeps the best K (`CheckpointConfig`).
Rules: every rank calls `report` at the same points; only rank 0 passes a checkpoint and
writes run files (winner manifest, metrics, plot); metrics are all-reduced before reporting.
A run may move from local mode to Ray Train (its first Ray attempt starts from the local run's
latest checkpoint), never back: `resume_point`.
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from charrnn import runlog, storage
from charrnn.checkpoint import CHECKPOINT_NAME, WINNER, missing_files, read_winner, saved_config
from charrnn.data import local_index_batches
from charrnn.errors import CharrnnError, CheckpointError, RunLockLost, StorageError, TrainingDiverged
from charrnn.generate import pick_device

KEEPER_INDEX = "checkpoints.json"  # the local keeper's record of a run's checkpoints
RAY_SNAPSHOT = "checkpoint_manager_snapshot.json"  # Ray Train's (tests pin it to Ray's name)
STOPPED = "stopped.json"  # rank 0's note of the error that ended a Ray run (`Backend.stop`)
# Local mode's waits before storing a checkpoint in S3 again: an object store restarting (a MinIO
# pod rescheduled) or a network blip of under a minute no longer ends a run.
UPLOAD_RETRY_WAITS_S = (5.0, 15.0, 30.0)


def resume_point(run_uri: str, run_name: str, ray_mode: bool) -> str | None:
    """Check that a run is continued in a mode that keeps what it saved; for a Ray run, the URI
    of the checkpoint a first Ray attempt starts from (the local run's latest), else None.

    Each mode keeps its own record (`KEEPER_INDEX`, `RAY_SNAPSHOT`) and names checkpoints by step.
    Ray Train resumes from its record alone: started over a local run, it would retrain from step
    0 and overwrite and prune the local run's checkpoints. The local keeper would do the same to
    a Ray run. So local -> Ray hands over the latest checkpoint, and Ray -> local is refused. A
    Ray run with a winner but no snapshot yet (stopped before Ray recorded its first checkpoint)
    hands over its winner the same way, and is refused to local mode too.
    """
    has = {f: storage.exists(storage.join(run_uri, f)) for f in (RAY_SNAPSHOT, KEEPER_INDEX, WINNER)}
    # Only Ray runs have a winner without the keeper's index (none yet in Ray's snapshot)...
    ray_run = has[RAY_SNAPSHOT] or (has[WINNER] and not has[KEEPER_INDEX])
    if not ray_mode:
        if ray_run and not has[RAY_SNAPSHOT] and _winner_workers(run_uri) == 0:
            # ...or a local run whose index was removed: retraining would overwrite checkpoints
            # no index lists any more, so it is refused too, in the right words.
            raise CharrnnError(
                f"run {run_name!r} has a {WINNER} but no {KEEPER_INDEX} (local mode's index of its "
                "checkpoints): restore that file, continue with --workers N (Ray Train starts "
                "from the winner), or start a new run with another --name")
        if ray_run:
            raise CharrnnError(
                f"run {run_name!r} was trained by Ray Train workers: continue it with --workers N "
                "(N >= 1), or start a new run with another --name")
        return None
    entries = keeper_entries(run_uri)
    if entries:
        return storage.join(run_uri, entries[-1]["name"])
    if has[WINNER] and not has[RAY_SNAPSHOT]:
        # A Ray run stopped (Ctrl-C, a lost driver) after rank 0 published a checkpoint but before
        # Ray Train's controller recorded one in its snapshot: Ray would start over and retrain.
        return read_winner(storage.join(run_uri, WINNER))["checkpoint_uri"]
    return None


def _winner_workers(run_uri: str) -> int | None:
    """`scaling.workers` of the winner's checkpoint (0: local mode); None when unreadable."""
    try:
        return saved_config(read_winner(storage.join(run_uri, WINNER))["checkpoint_uri"]).scaling.workers
    except CharrnnError:
        return None


def keeper_entries(run_uri: str) -> list[dict]:
    """The local keeper's index of a run, without entries whose checkpoint is not complete in
    storage (a directory someone removed, say, after its file was damaged): resuming then starts
    from the latest checkpoint that is there, and the next save rewrites the index."""
    index = storage.join(run_uri, KEEPER_INDEX)
    if not storage.exists(index):
        return []
    try:
        entries = json.loads(storage.read_text(index))
    except ValueError:
        entries = None
    # Entries as the keeper writes them, and only those: one is resumed from, and may be pruned
    # (deleted), so a name must be one of this run's checkpoint directories.
    if not (isinstance(entries, list) and all(
            isinstance(e, dict) and isinstance(e.get("name"), str)
            and CHECKPOINT_NAME.fullmatch(e["name"]) and isinstance(e.get("val_loss"), (int, float))
            for e in entries)):
        raise CharrnnError(f"{index}: not a checkpoint index; it is written by charrnn, "
                           "restore it or start a new run with another --name")
    complete = []
    for e in entries:
        ckpt = storage.join(run_uri, e["name"])
        missing = missing_files(ckpt)
        if missing:
            runlog.say(f"warning: skipping {ckpt} listed in {KEEPER_INDEX}: missing "
                       f"{', '.join(missing)}")
        else:
            complete.append(e)
    return complete


def stopped_error(run_uri: str) -> CharrnnError | None:
    """The driver's side of `RayBackend.stop`: the error that ended the run, once (the note is
    deleted, so a later attempt of the run starts clean)."""
    uri = storage.join(run_uri, STOPPED)
    if not storage.exists(uri):
        return None
    note = json.loads(storage.read_text(uri))
    storage.delete_file(uri)
    kind = {c.__name__: c for c in (TrainingDiverged, CheckpointError)}.get(note.get("kind"))
    return (kind or CharrnnError)(note["error"])


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The bare model under a DDP wrapper (what checkpoints store)."""
    return model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model


class Backend:
    rank: int = 0
    world: int = 1
    device: torch.device = torch.device("cpu")
    run_uri: str = ""
    lease: str | None = None  # the driver's S3 lease owner id (`runlock.lease_lost`)

    @property
    def is_writer(self) -> bool:
        """Rank 0 alone writes checkpoints and run files."""
        return self.rank == 0

    def index_batches(self, num_windows: int, batch_size: int) -> Iterator[np.ndarray]:
        raise NotImplementedError

    def wrap(self, model: torch.nn.Module) -> torch.nn.Module:
        return model.to(self.device)

    def all_reduce_sum(self, values: list[float]) -> list[float]:
        return values

    def report(self, metrics: dict, checkpoint_dir: Path | None, name: str) -> None:
        raise NotImplementedError

    def resume_checkpoint(self) -> contextlib.AbstractContextManager[Path | None]:
        """A context holding a local directory with the checkpoint to resume from (None for a
        fresh run); a downloaded copy is removed when the context exits."""
        raise NotImplementedError

    def stop(self, error: CharrnnError) -> None:
        """End the run on an error that every rank reached at the same point (a diverged loss)."""
        raise error


class LocalBackend(Backend):
    """Single process. Checkpoints: `<run>/<name>/`, indexed in `<run>/checkpoints.json`."""

    def __init__(self, run_uri: str, keep: int, device: str | None = None,
                 lease: str | None = None):
        self.run_uri, self.lease = run_uri, lease
        self.keep = keep
        self.device = torch.device(device or pick_device("auto"))
        self.entries: list[dict] = keeper_entries(run_uri)

    def index_batches(self, num_windows: int, batch_size: int) -> Iterator[np.ndarray]:
        return local_index_batches(num_windows, batch_size)

    def report(self, metrics: dict, checkpoint_dir: Path | None, name: str) -> None:
        if checkpoint_dir is None:
            return
        self._upload(checkpoint_dir, name)
        # A checkpoint saved again under its name (an evaluation redone after Ctrl-C) replaces
        # its entry: two entries of one directory could get it deleted while it is still kept.
        self.entries = [e for e in self.entries if e["name"] != name]
        self.entries.append({"name": name, "val_loss": metrics["val_loss"], "step": metrics["step"]})
        # Keep the best K by validation loss, and always the latest (to resume from).
        best = sorted(self.entries, key=lambda e: e["val_loss"])[: self.keep]
        kept = [e for e in self.entries if e in best or e is self.entries[-1]]
        storage.write_text(storage.join(self.run_uri, KEEPER_INDEX), json.dumps(kept, indent=1))
        for e in self.entries:
            if e not in kept:
                storage.delete_dir(storage.join(self.run_uri, e["name"]))
        self.entries = kept

    def _upload(self, checkpoint_dir: Path, name: str) -> None:
        """Store the checkpoint; to S3, tried again after each of `UPLOAD_RETRY_WAITS_S` (an
        upload cut short leaves nothing: `storage.upload_dir`). A local disk that is full stays
        full: its error is raised at once."""
        uri = storage.join(self.run_uri, name)
        waits = () if storage.local_path(uri) is not None else UPLOAD_RETRY_WAITS_S
        for attempt, wait in enumerate([*waits, None], 1):
            try:
                storage.upload_dir(checkpoint_dir, uri)
                return
            except StorageError as e:
                if wait is None:
                    raise
                runlog.say(f"warning: cannot store {name} ({e}); trying again in {wait:.0f} s "
                           f"(attempt {attempt + 1} of {len(waits) + 1})")
                time.sleep(wait)

    @contextlib.contextmanager
    def resume_checkpoint(self) -> Iterator[Path | None]:
        if not self.entries:
            yield None
            return
        with storage.local_copy(storage.join(self.run_uri, self.entries[-1]["name"]),
                                kind="resume") as d:
            yield d


def quiet_report_lines() -> None:
    """WARNING for the two Ray Train loggers that write at each `report`: rank 0's "Checkpoint
    successfully created" and each rank's "Reporting training result" of every metric. Not
    `RunConfig.logging_config`: it would also hide the INFO line with which Ray Train logs a
    failure and its traceback before a restart, and it misses the second logger (named by its
    file path)."""
    with contextlib.suppress(ImportError):  # private modules: a later Ray may move them
        from ray.train.v2._internal.execution import context as reports
        from ray.train.v2._internal.execution import storage as checkpoints
        logging.getLogger(reports.__file__).setLevel(logging.WARNING)
        logging.getLogger(checkpoints.__name__).setLevel(logging.WARNING)


class RayBackend(Backend):
    """Inside a Ray Train worker (`TorchTrainer` has set up the process group)."""

    def __init__(self, run_uri: str, start_from: str | None = None, lease: str | None = None,
                 report_lines: bool = False):
        import ray.train
        import ray.train.torch
        if not report_lines:  # `run.ray_report_lines`
            quiet_report_lines()
        ctx = ray.train.get_context()
        self.rank, self.world = ctx.get_world_rank(), ctx.get_world_size()
        self.device = ray.train.torch.get_device()
        self.run_uri, self.lease = run_uri, lease
        self.start_from = start_from  # a local run's latest checkpoint (`resume_point`)

    def index_batches(self, num_windows: int, batch_size: int) -> Iterator[np.ndarray]:
        import ray.train
        shard = ray.train.get_dataset_shard("train")
        for batch in shard.iter_batches(batch_size=batch_size, batch_format="numpy"):
            yield batch["id"]

    def wrap(self, model: torch.nn.Module) -> torch.nn.Module:
        model = model.to(self.device)
        if self.world == 1:
            return model
        ids = [self.device.index] if self.device.type == "cuda" else None
        return torch.nn.parallel.DistributedDataParallel(model, device_ids=ids)

    def all_reduce_sum(self, values: list[float]) -> list[float]:
        if self.world == 1:
            return values
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        torch.distributed.all_reduce(t)
        return t.tolist()

    def report(self, metrics: dict, checkpoint_dir: Path | None, name: str) -> None:
        import ray.train
        ckpt = (ray.train.Checkpoint.from_directory(str(checkpoint_dir))
                if checkpoint_dir is not None and self.is_writer else None)
        # Every rank reports; the upload (rank 0) finishes before this returns (SYNC mode).
        ray.train.report(metrics, checkpoint=ckpt, checkpoint_dir_name=name)

    def stop(self, error: CharrnnError) -> None:
        """Note the error (rank 0) and return, on every rank. Raised, it would be a worker
        failure, which Ray Train retries `max_failures` times from the last checkpoint, diverging
        again each time. The driver raises it from the note (`stopped_error`); a note cannot go
        in a last report's metrics, since `Result.metrics` are those of the last checkpoint.
        A lost run lock leaves no note: the run directory is another trainer's now, and the
        driver finds out from the lease itself."""
        if self.is_writer and not isinstance(error, RunLockLost):
            storage.write_text(storage.join(self.run_uri, STOPPED),
                               json.dumps({"error": str(error), "kind": type(error).__name__}))

    @contextlib.contextmanager
    def resume_checkpoint(self) -> Iterator[Path | None]:
        """Ray Train's latest checkpoint of this run; before its first, the local run's."""
        import ray.train
        ckpt = ray.train.get_checkpoint()
        if ckpt is not None:
            with ckpt.as_directory() as d:  # local: the path itself; S3: a temporary download
                yield Path(d)
        elif self.start_from is not None:
            with storage.local_copy(self.start_from, kind="resume") as d:
                yield d
        else:
            yield None
