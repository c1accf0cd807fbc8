"""Which checkpoint a replica serves (`follow.py`), without Serve: `load` is a stand-in that
records what it was asked to load; `checkpoint.resolve` reads real directories."""

import threading
import time

import pytest

from charrnn.errors import CheckpointError
from charrnn.follow import Follower


def ckpt(root, name):
    """A directory `checkpoint.resolve` takes for a checkpoint (it holds model.pt)."""
    d = root / name
    d.mkdir(parents=True)
    (d / "model.pt").write_bytes(b"")
    return str(d)


class Loads:
    """load(uri) -> ("model", uri); fails for the URIs in `bad`, as a corrupt checkpoint does."""

    def __init__(self):
        self.calls, self.bad = [], set()

    def __call__(self, uri):
        self.calls.append(uri)
        if uri in self.bad:
            raise CheckpointError(f"{uri}: model.pt is not a checkpoint")
        return ("model", uri)


def test_a_new_checkpoint_is_swapped_in_once_and_a_broken_one_keeps_the_current(tmp_path):
    a, b, c = (ckpt(tmp_path, n) for n in "abc")
    load = Loads()
    f = Follower(a, load)
    assert (f.current, f.uri, f.source, f.error) == (("model", a), a, a, None)
    f.reconfigure({"checkpoint": a})  # the same checkpoint: nothing is loaded again
    assert load.calls == [a]
    f.reconfigure({"checkpoint": b})
    assert f.current == ("model", b) and load.calls == [a, b] and f.error is None
    load.bad.add(c)
    f.reconfigure({"checkpoint": c})  # broken: b keeps serving; the reason is kept for GET /model
    assert f.current == ("model", b) and f.error == f"{c}: model.pt is not a checkpoint"
    load.bad.clear()
    f.follow()  # the watcher's tick, c fixed (an upload that finished): swapped in, error gone
    assert f.current == ("model", c) and f.error is None


def test_a_default_that_does_not_load_fails_the_replica_at_once(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        Follower(str(tmp_path / "missing"), Loads())


def test_user_config_values_that_are_not_uris_are_named_not_followed(tmp_path, monkeypatch):
    """`user_config: {checkpoint: 5}` was followed as a URI ("5: 'int' object has no attribute
    'endswith'"); a relative path that does not load did not say where it was looked for."""
    a, b = ckpt(tmp_path, "a"), ckpt(tmp_path, "b")
    f = Follower(a, Loads())
    f.reconfigure({"checkpoint": b})
    assert (f.source, f.current, f.error) == (b, ("model", b), None)
    f.reconfigure({"checkpoint": 5, "checkpiont": "x"})
    assert f.source == b and f.current == ("model", b)
    assert f.error == (
        "user_config: unknown key 'checkpiont' ignored (its one key is 'checkpoint'); user_config: "
        f"checkpoint must be a URI (a winner.json, run or checkpoint directory), got 5; still "
        f"following {b}")
    f.reconfigure({"checkpoint": ""})  # as without the key: back to the builder's checkpoint
    assert (f.source, f.current, f.error) == (a, ("model", a), None)

    monkeypatch.chdir(tmp_path)
    f.reconfigure({"checkpoint": "runs/x"})
    assert f.current == ("model", a) and f.error == (
        f"no checkpoint at runs/x: the path does not exist (a relative path, read in the "
        f"replica's directory {tmp_path}: give an absolute path or an s3:// URI)")
    f.reconfigure({"checkpoint": str(tmp_path / "runs/x")})
    assert f.error.endswith("the path does not exist") and "relative" not in f.error


def test_the_watcher_picks_up_a_checkpoint_that_appears_later_and_stops(tmp_path):
    a = ckpt(tmp_path, "a")
    later = str(tmp_path / "later")
    load = Loads()
    f = Follower(a, load, watch_interval_s=0.02)
    try:
        f.reconfigure({"checkpoint": later})  # not there yet (still uploading)
        assert f.current == ("model", a) and "does not exist" in f.error
        ckpt(tmp_path, "later")
        deadline = time.monotonic() + 10
        while f.current != ("model", later) and time.monotonic() < deadline:
            time.sleep(0.01)
        assert f.current == ("model", later) and f.error is None
    finally:
        f.stop()
    deadline = time.monotonic() + 10
    while any(t.name == "winner-watch" for t in threading.enumerate()):
        assert time.monotonic() < deadline, "the watcher did not stop"
        time.sleep(0.01)


def test_a_watcher_tick_waiting_on_a_slow_load_follows_the_newest_source(tmp_path):
    """Reconfigures to c (a slow load) and then b while the watcher ticks: b serves, and nothing
    else is loaded. The watcher used to read `source` before waiting for the load lock, so a
    tick pre-empted between the two could swap an old source back in after a reconfigure (until
    its next tick); it now reads `source` once it holds the lock."""
    a, b, c = (ckpt(tmp_path, n) for n in "abc")
    gate, loading_c = threading.Event(), threading.Event()

    class SlowC(Loads):
        def __call__(self, uri):
            if uri == c:
                loading_c.set()
                gate.wait(10)
            return super().__call__(uri)

    load = SlowC()
    f = Follower(a, load, watch_interval_s=0.005)
    try:
        to_c = threading.Thread(target=f.reconfigure, args=({"checkpoint": c},))
        to_c.start()
        assert loading_c.wait(10)
        time.sleep(0.05)  # the watcher's tick is now waiting for the lock
        to_b = threading.Thread(target=f.reconfigure, args=({"checkpoint": b},))
        to_b.start()
        time.sleep(0.05)  # so is the reconfigure to b
        gate.set()
        to_c.join(10)
        to_b.join(10)
        time.sleep(0.1)  # many watcher ticks
        assert f.uri == b and load.calls == [a, c, b], load.calls
    finally:
        gate.set()
        f.stop()
