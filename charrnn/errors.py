"""User-facing errors.

Anything a user can cause (a bad flag, a missing file, an unreachable bucket) raises
`CharrnnError` with a one-line message; the CLIs in `jobs/` print it without a traceback and
exit with status 2. Running out of memory is one line too (status 1, `out_of_memory`).
Everything else is a bug and keeps its traceback.
"""

import re


class CharrnnError(Exception):
    """An error caused by user input or the environment, with a message meant for a person."""


class ConfigError(CharrnnError):
    """A config file, `--set` override or field value is invalid."""


class CorpusError(CharrnnError):
    """The corpus cannot be read, decoded or used."""


class VocabError(CharrnnError):
    """Text holds characters outside the model's vocabulary."""


class CheckpointError(CharrnnError):
    """A checkpoint is missing, incomplete or unsafe to load."""


class StorageError(CharrnnError):
    """Storage (local or S3) is unreachable, missing or refuses access."""


class RunLockLost(CharrnnError):
    """Another process took over the run's S3 lease; this one stopped without saving again."""


class TrainingDiverged(CharrnnError):
    """The loss became NaN or infinite; nothing from that point on was saved."""


class Interrupted(Exception):
    """Ctrl-C (or SIGTERM, `cli.Terminated`) ended training; the message says what was kept and
    how to go on (exit status 130; 143 after SIGTERM, 129 after SIGHUP)."""

    def __init__(self, message: str = "checkpoint saved; run the same command again to resume"):
        super().__init__(message)


def out_of_memory(e: BaseException) -> str | None:
    """How much could not be allocated ("596.0 GiB"), when `e` is numpy's MemoryError, torch's CPU
    allocator failure or its CUDA OutOfMemoryError; None for any other error."""
    if not (isinstance(e, MemoryError) or type(e).__name__ == "OutOfMemoryError"
            or "can't allocate memory" in str(e)):
        return None
    m = re.search(r"allocate ([\d.]+) ?(bytes|[KMGT]iB)", str(e), re.IGNORECASE)
    if not m:
        return "memory"
    size, unit = float(m.group(1)), m.group(2)
    return f"{size / 2**30:.1f} GiB" if unit.lower() == "bytes" else f"{size:g} {unit}"
