"""Serve targets, against the real HTTP app on loopback:
- batching gain: 64 concurrent clients x 200 characters get >= 20x the characters/s of the same
  64 requests sent one at a time (p50 / p99 latency reported for both);
- the engine alone, without HTTP (same threads as the replica): one 200-character row after
  another against one 64-row group, the gain the stepping loop itself allows;
- the floor under that gain on this machine: 64 concurrent requests that cost the model (almost)
  nothing, GET /healthz and 1-character completions. Their time is HTTP + Serve overhead, so
  sequential time / floor time bounds the gain that any engine could reach here;
- reliability: 0 failed requests out of 2,000 at 32 concurrent clients, while the winner
  manifest moves to another checkpoint mid-run (hot swap).

    RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 python bench/serve_load.py --run runs/demo
"""

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import requests

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")

from charrnn.config import ServeConfig  # noqa: E402


def pct(xs, q):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


def engine_gain(uri, args) -> dict:
    """The continuous-batching engine on its own, in this process: 64 single-row requests one
    after another vs one group of 64 rows (each row `args.chars` characters)."""
    import threading

    import torch

    from charrnn import checkpoint
    from charrnn.engine import DONE, Engine
    from charrnn.generate import Generator, SampleParams
    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads or 1)  # a replica with num_cpus=1 runs one thread
    gen = Generator(checkpoint.load(str(uri)), precision=args.precision)
    engine = Engine(gen.model, gen.vocab, dtype=gen.dtype)

    def run(rows):
        done = threading.Event()
        engine.submit(["alice "] * rows, [SampleParams(args.chars, temperature=0.8, seed=i)
                                          for i in range(rows)],
                      lambda x: done.set() if x is DONE else None)
        done.wait()

    run(2)  # warm-up
    t = time.perf_counter()
    for _ in range(args.clients):
        run(1)
    seq = time.perf_counter() - t
    t = time.perf_counter()
    run(args.clients)
    batched = time.perf_counter() - t
    torch.set_num_threads(threads)
    return {"engine_alone_sequential_s": round(seq, 3), "engine_alone_batched_s": round(batched, 3),
            "engine_alone_gain": round(seq / batched, 1)}


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--run", required=True, help="a run directory with >= 2 checkpoints")
    ap.add_argument("--chars", type=int, default=200)
    ap.add_argument("--clients", type=int, default=64)
    ap.add_argument("--total", type=int, default=2000)
    ap.add_argument("--concurrency", type=int, default=32)
    ap.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    ap.add_argument("--batch-wait", type=float, default=ServeConfig.batch_wait_timeout_s,
                    help="batch_wait_timeout_s (default: the ServeConfig default)")
    ap.add_argument("--threads", type=int, default=0, help="torch threads in the replica")
    ap.add_argument("--out", default=str(ROOT / "bench/results/serve_load.json"))
    args = ap.parse_args()
    run = Path(tempfile.mkdtemp(prefix="charrnn-serve-")) / "run"
    shutil.copytree(args.run, run)
    engine_alone = engine_gain(run / "winner.json", args)
    import ray
    from ray import serve

    from charrnn.serve import build_app
    from tests.services import free_port, wait_for
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(build_app({"checkpoint": str(run / "winner.json"), "watch_interval_s": 1,
                         "max_batch_size": 64, "batch_wait_timeout_s": args.batch_wait,
                         "precision": args.precision, "threads": args.threads}),
              name="bench", route_prefix="/", blocking=False)
    url = f"http://127.0.0.1:{port}"
    wait_for(lambda: requests.get(url + "/healthz", timeout=1).ok, 120, "serve")
    session = requests.Session()  # keep-alive connections, one per concurrent client
    session.mount("http://", requests.adapters.HTTPAdapter(pool_connections=1, pool_maxsize=args.clients))

    def one(i, chars=args.chars):
        t = time.perf_counter()
        r = session.post(url + "/generate", json={"prompt": "alice ", "max_chars": chars,
                                                  "seed": i, "temperature": 0.8}, timeout=120)
        return r.status_code, time.perf_counter() - t

    def burst(fn):  # the clients fire at once -> (wall time of the whole burst, results)
        t = time.perf_counter()
        with ThreadPoolExecutor(args.clients) as pool:
            out = list(pool.map(fn, range(args.clients)))
        return time.perf_counter() - t, out

    one(0, 10)
    t = time.perf_counter()
    seq = [one(i) for i in range(args.clients)]
    seq_s = time.perf_counter() - t
    con_s, con = burst(one)
    healthz_s = min(burst(lambda i: session.get(url + "/healthz", timeout=60))[0] for _ in range(3))
    one_char_s = min(burst(lambda i: one(i, 1))[0] for _ in range(3))
    total_chars = args.clients * args.chars
    result = {
        "clients": args.clients, "chars": args.chars, "precision": args.precision,
        "batch_wait_timeout_s": args.batch_wait, "threads": args.threads,
        "sequential_chars_per_s": round(total_chars / seq_s),
        "concurrent_chars_per_s": round(total_chars / con_s),
        "batching_gain": round(seq_s / con_s, 1),
        "sequential_p50_s": round(pct([d for _, d in seq], 0.5), 3),
        "sequential_p99_s": round(pct([d for _, d in seq], 0.99), 3),
        "concurrent_p50_s": round(pct([d for _, d in con], 0.5), 3),
        "concurrent_p99_s": round(pct([d for _, d in con], 0.99), 3),
        "batch_sizes": requests.get(url + "/stats").json()["batch_sizes"],
        "floor_concurrent_healthz_s": round(healthz_s, 3),
        "floor_concurrent_1_char_s": round(one_char_s, 3),
        "gain_bound_from_floor": round(seq_s / one_char_s, 1),
        **engine_alone,
    }
    # Reliability with a hot swap half-way: point winner.json at another kept checkpoint.
    manifest = json.loads((run / "winner.json").read_text())
    other = sorted(p.name for p in run.glob("checkpoint_*") if p.name != manifest["checkpoint"])[0]
    before = requests.get(url + "/model").json()["checkpoint"]
    statuses, latencies = [], []

    def rel(i):
        if i == args.total // 2:
            (run / "winner.json").write_text(json.dumps({**manifest, "checkpoint": other}))
        try:
            code, dt = one(i, 50)
        except requests.RequestException:
            code, dt = -1, 0.0
        statuses.append(code)
        latencies.append(dt)

    t = time.perf_counter()
    with ThreadPoolExecutor(args.concurrency) as pool:
        list(pool.map(rel, range(args.total)))
    after = requests.get(url + "/model").json()["checkpoint"]
    result.update({
        "reliability_requests": args.total, "reliability_concurrency": args.concurrency,
        "failed": sum(1 for s in statuses if s != 200), "reliability_seconds":
        round(time.perf_counter() - t, 1), "reliability_p50_s": round(pct(latencies, 0.5), 3),
        "reliability_p99_s": round(pct(latencies, 0.99), 3),
        "hot_swap": f"{Path(before).name} -> {Path(after).name}",
    })
    serve.shutdown()
    ray.shutdown()
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
