import os
import signal
import subprocess
import sys
import tempfile

import pytest

from charrnn import scratch


@pytest.fixture
def tmpdir_(tmp_path, monkeypatch):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    return tmp_path


def test_a_scratch_directory_lives_for_its_block(tmpdir_):
    with scratch.directory("save") as d:
        assert d.parent == tmpdir_ and d.name.startswith("charrnn-save-")
        (d / "checkpoint_00000001").mkdir()
        assert scratch.sweep() == []  # its owner (this process) holds the lock
    assert not d.exists()
    with pytest.raises(RuntimeError), scratch.directory("save") as d:
        raise RuntimeError
    assert not d.exists()


def test_what_a_killed_process_left_is_removed_by_the_next_one(tmpdir_):
    """Ray Train kills the workers of an aborted run, often during a save: each kill left a
    checkpoint in /tmp for good (one a CI run, from the Ray Ctrl-C test)."""
    code = ("import sys, time\nfrom charrnn import scratch\n"
            "with scratch.directory('save') as d:\n"
            "    (d / 'model.pt').write_bytes(b'x' * 1000)\n"
            "    print(d, flush=True)\n    time.sleep(60)\n")
    child = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True,
                             env={**os.environ, "TMPDIR": str(tmpdir_)})
    try:
        left = child.stdout.readline().strip()
        other = tmpdir_ / "charrnn-bench-x1"  # not a scratch directory: no owner file
        other.mkdir()
        assert scratch.sweep() == []  # alive: kept
        child.send_signal(signal.SIGKILL)
        child.wait(10)
    finally:
        child.kill()
    assert os.path.isdir(left)
    with scratch.directory("resume") as d:
        assert not os.path.exists(left) and d.exists()
    assert other.exists() and sorted(p.name for p in tmpdir_.iterdir()) == ["charrnn-bench-x1"]
