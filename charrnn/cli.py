"""What every entry point in `jobs/` shares: user errors as one line, Ctrl-C as a clean exit, and
SIGTERM and SIGHUP handled as Ctrl-C."""

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
    """SIGTERM (`kill`, `docker stop`, a Kubernetes pod stopping, `ray job stop`) or SIGHUP (the
    terminal or SSH session closed), raised where Ctrl-C would be: local training saves a
    checkpoint and exits, as it does on Ctrl-C, instead of losing what it trained since its last
    one (SIGHUP's default action ended the process where it stood)."""


STOP_SIGNALS = (signal.SIGTERM, signal.SIGHUP)
_stopped_by: list[int] = []  # the first stop signal received


def _handled() -> list[int]:
    """The stop signals to handle: those not ignored. `nohup` starts a process with SIGHUP
    ignored, so that it outlives its terminal; that choice is kept."""
    return [sig for sig in STOP_SIGNALS if signal.getsignal(sig) is not signal.SIG_IGN]


def _on_stop_signal(signum, frame) -> None:
    _stopped_by.append(signum)
    # Once: a second signal must not cut the save the first one started (SIGKILL still stops).
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)
    raise Terminated()


@contextlib.contextmanager
def sigterm_as_sigint() -> Iterator[None]:
    """While the block runs, deliver SIGTERM and SIGHUP to this process as SIGINT: for code whose
    own SIGINT handler stops gracefully (Ray Train's aborts its run; `ray.init` made SIGTERM a
    bare exit)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def forward(signum, frame) -> None:
        _stopped_by.append(signum)
        os.kill(os.getpid(), signal.SIGINT)

    previous = {sig: signal.signal(sig, forward) for sig in _handled()}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def run_cli(main: Callable[[], int], oom_hint: str = "smaller inputs") -> int:
    """Run `main`: status 2 and one line for a user error, 1 and one line ending in `oom_hint`
    (what to lower) when memory runs out, 130 for Ctrl-C, 143 for SIGTERM, 129 for SIGHUP, 141
    when the reader of stdout went away."""
    previous = {}
    _stopped_by.clear()  # this run's signals only (tests call run_cli many times in one process)
    if threading.current_thread() is threading.main_thread():
        previous = {sig: signal.signal(sig, _on_stop_signal) for sig in _handled()}
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
        with contextlib.suppress(OSError):  # after SIGHUP the terminal may be gone
            print(f"interrupted: {e}" if isinstance(e, Interrupted) else "interrupted",
                  file=sys.stderr)
        return 128 + _stopped_by[0] if _stopped_by else 130
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
