"""The bench scripts are not run by the tests (their figures go to BENCHMARKS.md), but each one
starts: its imports resolve and its arguments parse, and a count out of range is a usage error."""

import re
import subprocess
import sys

import pytest

from tests.conftest import ROOT

HELPERS = {"argtypes.py", "local_serve.py"}  # imported by the scripts, not run
SCRIPTS = sorted(p.name for p in (ROOT / "bench").glob("*.py") if p.name not in HELPERS)


def bench(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)


@pytest.mark.parametrize("script", SCRIPTS)
def test_every_bench_script_starts(script):
    p = bench(f"bench/{script}", "--help")
    assert p.returncode == 0 and "usage:" in p.stdout, p.stderr


@pytest.mark.parametrize("args, error", [
    (["generation.py", "--baseline-chars", "0"], "argument --baseline-chars: must be at least 1, got 0"),
    (["generation.py", "--device", "tpu"],
     "argument --device: device must be auto, cpu, cuda or cuda:N, got 'tpu'"),
    (["generation.py", "--checkpoint", "nowhere"],
     "argument --checkpoint: no checkpoint at nowhere: the path does not exist"),
    (["step.py", "--checkpoint", "nowhere"],
     "argument --checkpoint: no checkpoint at nowhere: the path does not exist"),
    (["step.py", "--checkpoint", "nowhere", "--rows", "0"], "argument --rows: must be at least 1, got 0"),
    (["ray_overhead.py", "--epochs", "1"], "argument --epochs: must be at least 2, got 1"),
    (["ray_overhead.py", "--rounds", "0"], "argument --rounds: must be at least 1, got 0"),
    (["train_quality.py", "--minutes", "nan"], "argument --minutes: must be a number above 0, got nan"),
    (["serve_load.py", "--run", "r", "--clients", "x"], "argument --clients: 'x' is not an integer"),
])
def test_a_bench_argument_out_of_range_is_a_usage_error(args, error):
    p = bench(f"bench/{args[0]}", *args[1:])
    assert p.returncode == 2 and p.stderr.strip().endswith(error), p.stderr


@pytest.mark.parametrize("script", SCRIPTS)
def test_every_bench_script_has_its_figures_in_benchmarks_md(script):
    assert f"python bench/{script}" in (ROOT / "BENCHMARKS.md").read_text()


def test_the_device_script_parses_and_runs_only_bench_scripts_that_exist():
    text = (ROOT / "bench/device.sh").read_text()
    assert subprocess.run(["bash", "-n", "bench/device.sh"], cwd=ROOT).returncode == 0
    used = set(re.findall(r"bench/(\w+\.py)", text))
    assert used == {"throughput.py", "train_quality.py", "generation.py"} and used <= set(SCRIPTS)
    assert "bash bench/device.sh" in (ROOT / "BENCHMARKS.md").read_text()
