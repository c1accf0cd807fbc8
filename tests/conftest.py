import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
CORPUS = ROOT.parent / "shared" / "data" / "wonderland.txt"
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # Ray stays on loopback


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


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory, corpus_path):
    """A tiny model trained once for the session (local mode): (storage dir, run name)."""
    storage = tmp_path_factory.mktemp("runs")
    p = run_job("train.py", "--config", "configs/tiny.yaml", "--corpus", str(corpus_path),
                "--storage", str(storage), "--name", "tiny")
    assert p.returncode == 0, p.stderr
    return storage, "tiny", p.stdout
