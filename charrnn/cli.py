"""What every entry point in `jobs/` shares: user errors as one line, Ctrl-C as a clean exit, and
SIGTERM handled as Ctrl-C."""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
from collections.abc import Callable, Iterator

from charrnn import runlog
from charrnn.errors import CharrnnError, Interrupted, out_of_memory


class Terminated(KeyboardInterrupt):
    """SIGTERM (`kill`, `docker stop`, a Kubernetes pod stopping, `ray job stop`), raised where
    Ctrl-C would be: local training saves a checkpoint and exits, as it does on Ctrl-C, instead of
    losing what it trained since its last one."""


_got_sigterm = threading.Event()


def _on_sigterm(signum, frame) -> None:
    _got_sigterm.set()
    # Once: a second SIGTERM must not cut the save the first one started (SIGKILL still stops).
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    raise Terminated()


@contextlib.contextmanager
def sigterm_as_sigint() -> Iterator[None]:
    """While the block runs, deliver SIGTERM to this process as SIGINT: for code whose own SIGINT
    handler stops gracefully (Ray Train's aborts its run; `ray.init` made SIGTERM a bare exit)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def forward(signum, frame) -> None:
        _got_sigterm.set()
        os.kill(os.getpid(), signal.SIGINT)

    previous = signal.signal(signal.SIGTERM, forward)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def run_cli(main: Callable[[], int], oom_hint: str = "smaller inputs") -> int:
    """Run `main`: status 2 and one line for a user error, 1 and one line ending in `oom_hint`
    (what to lower) when memory runs out, 130 for Ctrl-C, 143 for SIGTERM, 141 when the reader of
    stdout went away."""
    previous = None
    if threading.current_thread() is threading.main_thread():
        previous = signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        return main()
    except CharrnnError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except (MemoryError, RuntimeError) as e:
        size = out_of_memory(e)
        if size is None:
            raise
        print(f"error: out of memory: could not allocate {size}; ask for less ({oom_hint})",
              file=sys.stderr)
        return 1
    except BrokenPipeError:
        # stdout's reader exited (`generate.py ... | head`): stop quietly with the status of a
        # process that SIGPIPE ended, as other command-line tools do.
        runlog.discard_stdout()
        return 141
    except (Interrupted, KeyboardInterrupt) as e:  # Interrupted: its message says what was kept
        print(f"interrupted: {e}" if isinstance(e, Interrupted) else "interrupted", file=sys.stderr)
        return 143 if _got_sigterm.is_set() else 130
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
