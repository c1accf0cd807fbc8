"""Scale target: on a synthetic 1 GB corpus, peak RSS per training worker stays <= 1.5 GB beyond
the model, and the first training step comes within 60 s of the job's start.

Builds the corpus (Alice repeated, with a counter line so it is not a plain repeat), then runs
`jobs/train.py --workers 2` for a short while, sampling the RSS of every Ray Train worker, and
what of it is shared with other processes (the corpus in the object store, the libraries).

    RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 python bench/scale.py [--gb 1.0]
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil
from argtypes import at_least, positive  # bench/, first on sys.path when a script runs

ROOT = Path(__file__).resolve().parent.parent
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")


def make_corpus(path: Path, size: int, seed_text: str) -> None:
    with open(path, "w") as f:
        written, i = 0, 0
        while written < size:
            chunk = f"chapter {i}\n{seed_text}"
            f.write(chunk)
            written += len(chunk)
            i += 1


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--gb", type=positive, default=1.0)
    ap.add_argument("--workers", type=at_least(1), default=2)
    ap.add_argument("--seconds", type=positive, default=90)
    ap.add_argument("--out", default=str(ROOT / "bench/results/scale.json"))
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="charrnn-scale-") as d:  # the corpus (GBs) and run
        tmp = Path(d)
        corpus = tmp / "big.txt"
        seed = (ROOT.parent / "shared/data/wonderland.txt").read_text().replace("\r\n", "\n")
        make_corpus(corpus, int(args.gb * 1e9), seed)
        peak = {}
        stop = threading.Event()

        def is_worker(cmdline) -> bool:
            return " ".join(cmdline or []).startswith("ray::RayTrainWorker")

        def sample():
            while not stop.is_set():
                for p in psutil.process_iter(["cmdline", "memory_info", "ppid"]):
                    if not is_worker(p.info["cmdline"]) or not p.info["memory_info"]:
                        continue
                    try:  # a child a worker forks keeps its title until it execs: not a worker
                        if is_worker(psutil.Process(p.info["ppid"]).cmdline()):
                            continue
                    except psutil.Error:
                        continue
                    mem = p.info["memory_info"]  # at its peak RSS: how much of it is shared
                    peak[p.pid] = max(peak.get(p.pid, (0, 0)), (mem.rss, mem.shared))
                time.sleep(0.5)

        threading.Thread(target=sample, daemon=True).start()
        t0 = time.monotonic()
        proc = subprocess.Popen(
            [sys.executable, "jobs/train.py", "--config", "configs/alice.yaml", "--corpus", str(corpus),
             "--storage", str(tmp / "runs"), "--name", "scale", "--workers", str(args.workers),
             "--max-minutes", str(args.seconds / 60), "--set", "train.log_every_steps=1",
             "--set", "train.eval_max_chars=200000"],
            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            env={**os.environ, "PYTHONUNBUFFERED": "1"})
        first_step = None
        lines = []
        for line in proc.stdout:
            lines.append(line)
            if first_step is None and " step 1/" in line:
                first_step = time.monotonic() - t0
        proc.wait()
        stop.set()
        winner = tmp / "runs/scale/winner.json"  # it names the model the run trained
        params = json.loads(winner.read_text())["model"]["params"] if winner.is_file() else None
        model_mb = round(params * 4 * 4 / 1e6, 1) if params else None  # weights, grads, 2 moments
        result = {"corpus_bytes": corpus.stat().st_size, "workers": args.workers,
                  "first_step_s": round(first_step, 1) if first_step else None,
                  "peak_rss_per_worker_mb": sorted(round(rss / 1e6) for rss, _ in peak.values()),
                  # of it, pages shared with other processes: the corpus in the object store
                  # (mapped by every worker) and the libraries' code
                  "shared_at_peak_mb": sorted(round(shared / 1e6) for _, shared in peak.values()),
                  "model_state_mb": model_mb, "exit_code": proc.returncode}
        Path(args.out).write_text(json.dumps(result, indent=2))
        print("".join(lines[-5:]))
        print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
