"""One trainer per run: `<run>/.lock` is held while a process trains the run.

Two processes training one run at once would interleave their checkpoints and prune each other's.
- Local storage: an advisory `flock` on the file, released by the kernel when the process dies.
- S3: a lease object written with a conditional PUT (`If-None-Match: *`, which AWS S3, MinIO and
  moto honour), renewed every `RENEW_S` by a background thread. A lease not renewed for
  `STALE_S` (by the store's own clock) belongs to a process that is gone, and the next trainer
  takes it over with `If-Match` on its ETag, so two newcomers cannot both take it.
"""

from __future__ import annotations

import contextlib
import email.utils
import fcntl
import json
import os
import socket
import threading
import time
import uuid
from collections.abc import Iterator

from charrnn import runlog, s3, storage
from charrnn.errors import CharrnnError, RunLockLost, StorageError

LOCK = ".lock"
UNSUPPORTED = ("NotImplemented", "501", "InvalidArgument", "InvalidRequest")  # no conditional PUT
NOT_FOUND = ("404", "NoSuchKey", "NotFound")  # the lease object is not there
RENEW_S = 30.0
STALE_S = 120.0
GRACE_S = 10.0  # a live holder's lease is at most RENEW_S + this old (a slow PUT, 1 s timestamps)


@contextlib.contextmanager
def run_lock(uri: str, name: str) -> Iterator[str | None]:
    """Hold the run's lock; yields the S3 lease's owner id, which `lease_lost` checks before
    each save (None: a local flock, which no other process can take while this one lives)."""
    local = storage.local_path(uri)
    if local is not None:
        with _flock(local, uri, name):
            yield None
    else:
        with _s3_lease(uri, name) as owner:
            yield owner


def lease_lost(uri: str, owner: str | None) -> str | None:
    """Why this process no longer holds the S3 lease of run `uri`, else None.

    A lease left unrenewed for `STALE_S` (this process paused, or cut off from the store) is
    taken over by the next trainer of the run, which then writes checkpoints and prunes. The
    first holder checks before each save, so it never writes beside the new one. A store that
    does not answer now is not proof: the check passes, and the next save checks again.
    """
    if owner is None:
        return None
    import botocore.exceptions
    bucket, key = s3.split(storage.join(uri, LOCK))
    try:
        raw = s3.client().get_object(Bucket=bucket, Key=key)["Body"].read()
    except (botocore.exceptions.ClientError, botocore.exceptions.BotoCoreError) as e:
        if isinstance(e, botocore.exceptions.ClientError) and s3.error_code(e) in NOT_FOUND:
            return f"its lease {uri}/{LOCK} was removed"
        runlog.say(f"warning: cannot check the lease {uri}/{LOCK}: {e}")
        return None
    holder = _holder(raw)
    return None if holder == owner else f"{holder} took over its lease {uri}/{LOCK}"


def lost(name: str, why: str, stopped: str) -> RunLockLost:
    """The error of a trainer that `lease_lost` found without its lease; `stopped` says where
    the training stopped."""
    return RunLockLost(f"run {name!r}: this trainer no longer holds the run lock ({why})"
                       f"{stopped} without saving, leaving the run to that process")


def _holder(raw: bytes) -> str:
    try:
        return str(json.loads(raw)["owner"])
    except (ValueError, TypeError, KeyError):
        return "an unknown process"


def _acquire(client, bucket: str, key: str, put, name: str, uri: str) -> str:
    """Create the lease, or take over a stale one; the ETag it then has."""
    import botocore.exceptions
    waited = False
    for _ in range(3):  # the holder may let go between our tries
        etag = put(IfNoneMatch="*")
        if etag is not None:
            return etag
        try:  # held, or left behind by a process that died: one GET gives body, ETag and age
            lease = client.get_object(Bucket=bucket, Key=key)
            raw = lease["Body"].read()
        except botocore.exceptions.ClientError as e:
            if s3.error_code(e) in NOT_FOUND:
                continue
            raise
        holder = _holder(raw)
        now = email.utils.parsedate_to_datetime(lease["ResponseMetadata"]["HTTPHeaders"]["date"])
        age = (now - lease["LastModified"]).total_seconds()  # both by the store's clock
        if RENEW_S + GRACE_S < age < STALE_S and not waited:
            # Renewals stopped: its holder was most likely killed (OOM, a lost node or pod), and
            # the retry that follows such a failure (a RayJob's backoffLimit, a resubmission)
            # failed here for up to STALE_S. A holder that is alive renews meanwhile, and the
            # check below still refuses it.
            runlog.say(f"the lease of {holder} on {uri}/{LOCK} was last renewed {age:.0f} s ago "
                       f"(every {RENEW_S:.0f} s while it trains): waiting {STALE_S - age:.0f} s "
                       "to take it over")
            time.sleep(STALE_S - age + 1)
            waited = True
            continue
        if age < STALE_S or (etag := put(IfMatch=lease["ETag"])) is None:
            raise _busy(name, f"{holder}; its lease {uri}/{LOCK} was renewed {age:.0f} s ago")
        runlog.say(f"taking over the lease of {holder} on {uri}/{LOCK}: not renewed for {age:.0f} s")
        return etag
    raise _busy(name, f"its lease {uri}/{LOCK} keeps changing hands")


def _busy(name: str, why: str) -> CharrnnError:
    return CharrnnError(f"run {name!r} is being trained by another process now ({why}): wait for "
                        "it to finish, or use another --name")


@contextlib.contextmanager
def _flock(local, uri: str, name: str) -> Iterator[None]:
    if local.exists() and not local.is_dir():
        raise StorageError(f"run {name!r}: {uri} is a file, not a run directory; use another --name")
    try:
        local.mkdir(parents=True, exist_ok=True)
        f = open(local / LOCK, "a")
    except OSError as e:
        raise StorageError(f"cannot create {uri}/{LOCK}: {e.strerror}") from None
    with f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise _busy(name, f"it holds {uri}/{LOCK}") from None
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


@contextlib.contextmanager
def _s3_lease(uri: str, name: str) -> Iterator[str | None]:
    import botocore.exceptions
    client = s3.client()
    bucket, key = s3.split(storage.join(uri, LOCK))
    me = f"{socket.gethostname()} pid {os.getpid()} ({uuid.uuid4().hex[:8]})"
    body = json.dumps({"owner": me, "since": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})

    def put(**condition) -> str | None:
        """The new ETag, or None when the condition failed (another process holds the lease)."""
        try:
            return client.put_object(Bucket=bucket, Key=key, Body=body.encode(), **condition)["ETag"]
        except botocore.exceptions.ClientError as e:
            if s3.error_code(e) in ("PreconditionFailed", "412", "ConditionalRequestConflict"):
                return None
            raise

    try:
        etag = _acquire(client, bucket, key, put, name, uri)
    except botocore.exceptions.ClientError as e:
        code = s3.error_code(e)
        if code not in UNSUPPORTED:
            raise StorageError(f"{uri}/{LOCK}: cannot take the run lock ({code}: "
                               f"{e.response.get('Error', {}).get('Message', '')})") from None
        runlog.say(f"warning: this S3 store does not support conditional writes ({code}): "
                   "no run lock; do not train this run from two processes at once")
        yield None
        return
    stop = threading.Event()

    def renew() -> None:
        nonlocal etag
        while not stop.wait(RENEW_S):
            try:
                new = put(IfMatch=etag)
            except Exception as e:  # a flaky store: try again at the next renewal
                runlog.say(f"warning: cannot renew the lease {uri}/{LOCK}: {e}")
                continue
            if new is None:
                runlog.say(f"warning: another process took over the lease {uri}/{LOCK}; this "
                           "run stops at its next checkpoint without saving it")
                return
            etag = new

    thread = threading.Thread(target=renew, name="charrnn-run-lease", daemon=True)
    thread.start()
    try:
        yield me
    finally:
        stop.set()
        thread.join(10)
        with contextlib.suppress(Exception):  # a lease left behind goes stale in STALE_S
            if client.head_object(Bucket=bucket, Key=key)["ETag"] == etag:
                client.delete_object(Bucket=bucket, Key=key)
