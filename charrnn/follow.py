"""Which checkpoint a Serve replica serves: the first load, hot swaps, the watcher, user_config.

A replica follows a *source*: a winner manifest, run or checkpoint directory URI (the builder's
`checkpoint`, or `user_config: {checkpoint: URI}` from the Serve config). Every
`watch_interval_s` it resolves the source again and, when that names another checkpoint, loads
it and swaps it in with one reference assignment: a request keeps the model it started with, so
in-flight requests finish on it. A source that cannot be loaded (missing, partial, corrupt, still
uploading) never takes the replica down: the current model keeps serving, and `error` says why
(GET /model) until a later attempt loads it.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable
from typing import Any

from charrnn import checkpoint

log = logging.getLogger("ray.serve")


class Follower:
    """Holds `current`, the model serving now, as loaded by `load(checkpoint_dir_uri)`."""

    def __init__(self, default: str, load: Callable[[str], Any], watch_interval_s: float = 0.0):
        self.default = default  # what the replica follows when user_config names nothing
        self._load = load
        self._lock = threading.Lock()
        self.uri = checkpoint.resolve(default)  # the checkpoint directory serving
        self.current = load(self.uri)
        self.source = default  # what the replica follows now
        self.load_error: str | None = None  # why `source` is not serving, while it is not
        self.config_note: str | None = None  # what the last user_config had that was ignored
        self._stop = threading.Event()
        if watch_interval_s:
            threading.Thread(target=self._watch, args=(watch_interval_s,), daemon=True,
                             name="winner-watch").start()

    def _swap_if_new(self, uri: str) -> None:
        """Load `uri`'s checkpoint when it differs from the one serving; swap atomically."""
        target = checkpoint.resolve(uri)
        if target != self.uri:
            new = self._load(target)
            self.current, self.uri = new, target  # batches already running keep their model

    def follow(self) -> None:
        """Serve `source`'s checkpoint if it is new; keep the current model if it cannot load.
        `source` is read under the lock that loads are made under, so a watcher tick that began
        before a reconfigure cannot swap the old source back in."""
        with self._lock:
            uri = self.source
            try:
                self._swap_if_new(uri)
                self.load_error = None
            except Exception as e:
                where = (f" (a relative path, read in the replica's directory {os.getcwd()}: give "
                         "an absolute path or an s3:// URI)" if "://" not in uri and not
                         os.path.isabs(os.path.expanduser(uri)) else "")
                error = f"{e}{where}" if uri in str(e) else f"{uri}: {e}{where}"
                if error != self.load_error:  # once per new reason, not at every watch interval
                    log.warning("keeping %s: %s", self.uri, error)
                self.load_error = error

    def reconfigure(self, user_config: dict | None) -> None:
        """`user_config: {checkpoint: URI}` swaps the served checkpoint; a config without that
        key returns to `default` (Serve configs declare the state wanted). A URI that cannot be
        loaded keeps the current model and is retried by the watcher (it may still be
        uploading). Other keys (a misspelled `checkpoint`) are ignored and named in `error`."""
        user_config = user_config or {}
        unknown = sorted(map(str, set(user_config) - {"checkpoint"}))
        notes = [f"user_config: unknown key {', '.join(map(repr, unknown))} ignored (its one key "
                 "is 'checkpoint')"] if unknown else []
        uri = user_config.get("checkpoint")
        if uri is None or isinstance(uri, str):
            self.source = uri or self.default
        else:  # `checkpoint: 5`, a list: not a URI; the replica keeps following what it followed
            notes.append(f"user_config: checkpoint must be a URI (a winner.json, run or "
                         f"checkpoint directory), got {uri!r}; still following {self.source}")
        self.config_note = "; ".join(notes) or None
        if self.config_note:
            log.warning(self.config_note)
        self.follow()

    @property
    def error(self) -> str | None:
        """Why the followed checkpoint is not serving, and what the last user_config had that
        was ignored; None when neither applies."""
        return "; ".join(e for e in (self.load_error, self.config_note) if e) or None

    def stop(self) -> None:
        self._stop.set()

    def _watch(self, interval_s: float) -> None:
        while not self._stop.wait(interval_s):
            self.follow()
