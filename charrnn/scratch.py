"""Local scratch directories: a checkpoint on its way to storage (staged by rank 0 before it is
stored) or from it (an S3 checkpoint downloaded to load or resume from).

The block that makes one removes it, but a process that is killed cannot: SIGKILL, the OOM
killer, and Ray Train itself, which kills the workers of an aborted or failed run, often during a
save. Each such kill left a checkpoint (weights and optimizer state) in the temporary directory
for good; the integration tests alone left one a CI run. So each scratch directory holds a file
its owner keeps locked (`flock`) while it lives. The kernel drops the lock when the owner dies,
however it dies, and making a scratch directory removes those whose lock is free. Locks, unlike
pids, mean the same from every pid namespace (containers sharing one /tmp).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

PREFIX = "charrnn-"
OWNER = ".owner"  # the file the owner holds locked


@contextlib.contextmanager
def directory(kind: str) -> Iterator[Path]:
    """A new directory `charrnn-<kind>-<random>` in the system's temporary directory for the
    block, removed after it; first, those that killed processes left are removed."""
    sweep()
    d = Path(tempfile.mkdtemp(prefix=f"{PREFIX}{kind}-"))
    try:
        # Locked before it takes its name: a sweep never finds the owner file unlocked.
        fd = os.open(d / f"{OWNER}.new", os.O_CREAT | os.O_RDWR, 0o600)
    except BaseException:
        shutil.rmtree(d, ignore_errors=True)
        raise
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        os.rename(d / f"{OWNER}.new", d / OWNER)
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)
        os.close(fd)


def sweep(root: str | None = None) -> list[Path]:
    """Remove the scratch directories whose owner is gone; -> those removed. One without an
    owner file is left alone: its owner may be between making it and locking the file (or it
    is not one of ours)."""
    removed = []
    for d in Path(root or tempfile.gettempdir()).glob(f"{PREFIX}*-*"):
        try:
            fd = os.open(d / OWNER, os.O_RDWR)
        except OSError:  # no owner file, not a directory, or another user's
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:  # held: its owner is alive
            os.close(fd)
            continue
        shutil.rmtree(d, ignore_errors=True)
        os.close(fd)
        removed.append(d)
    return removed
