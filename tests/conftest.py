import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
CORPUS = ROOT.parent / "shared" / "data" / "wonderland.txt"
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # Ray stays on loopback
# Every Ray job a test starts gets a new cluster of this machine: never one a developer's
# `ray start` left on record, nor a RAY_ADDRESS of their shell (tests that want a cluster
# start one and say so: tests/services.py::ray_head).
os.environ["RAY_ADDRESS"] = "local"
TRACE = os.environ.get("CHARRNN_TEST_TRACE")  # .ci/run's: the test that was running


def pytest_runtest_logstart(nodeid, location):
    """Name each test in $CHARRNN_TEST_TRACE as it starts. A Ray driver whose cluster died ends
    its process with status 1 from C++, past every Python hook: pytest then stops mid-line with
    no summary, and this file is what says which test it was in."""
    if TRACE:
        Path(TRACE).write_text(nodeid + "\n")


def pytest_sessionfinish(session, exitstatus):
    """A run that reached its summary removes the trace: one left means pytest died mid-test."""
    if TRACE:
        Path(TRACE).unlink(missing_ok=True)


@pytest.fixture(scope="session")
def corpus_path() -> Path:
    if not CORPUS.is_file():
        pytest.skip(f"corpus not found at {CORPUS}")
    return CORPUS


@pytest.fixture
def tiny_config():
    from charrnn.config import load_config
    return load_config(str(ROOT / "configs" / "tiny.yaml"))


def run_job(script: str, *args: str, env: dict | None = None, timeout: float = 240):
    """Run a `jobs/` entry point as a user would; returns the CompletedProcess."""
    import subprocess
    return subprocess.run([sys.executable, str(ROOT / "jobs" / script), *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})})


def call_job(capfd, script: str, *args: str):
    """Run a `jobs/` entry point's `main` in this process, as `__main__` does (through `run_cli`),
    capturing file descriptors 1 and 2 so that a stray log line or traceback still shows; returns
    a CompletedProcess like `run_job`. For the error cases: no Python and torch start-up each."""
    import importlib.util
    import subprocess

    from charrnn.cli import run_cli
    spec = importlib.util.spec_from_file_location(f"jobs_{script.removesuffix('.py')}",
                                                  ROOT / "jobs" / script)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    capfd.readouterr()
    cwd = os.getcwd()
    os.chdir(ROOT)
    try:
        rc = run_cli(lambda: mod.main(list(args)))
    except SystemExit as e:  # argparse's usage errors
        rc = e.code
    finally:
        os.chdir(cwd)
    out, err = capfd.readouterr()
    return subprocess.CompletedProcess([script, *args], rc, out, err)


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory, corpus_path):
    """A tiny model trained once for the session (local mode): (storage dir, run name)."""
    storage = tmp_path_factory.mktemp("runs")
    p = run_job("train.py", "--config", "configs/tiny.yaml", "--corpus", str(corpus_path),
                "--storage", str(storage), "--name", "tiny")
    assert p.returncode == 0, p.stderr
    return storage, "tiny", p.stdout
