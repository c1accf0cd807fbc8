"""Serve targets, against the real HTTP app on loopback:
- batching gain: 64 concurrent clients x 200 characters get >= 20x the characters/s of the same
  64 requests sent one at a time (p50 / p99 latency reported for both); after a warm-up, three
  rounds each time both back to back, and the round with the median gain is reported;
- the engine alone, without HTTP (same threads as the replica): one 200-character row after
  another against one 64-row group, the gain the stepping loop itself allows; and a stream
  running while the largest request (64 prompts of 4,000 characters) joins: the time it took
  to join, and the longest pause in the stream meanwhile;
- the floor under that gain on this machine: 64 concurrent requests that cost the model (almost)
  nothing, GET /healthz and 1-character completions. Their time is HTTP + Serve overhead, so
  sequential time / floor time bounds the gain that any engine could reach here;
- reliability: 0 failed requests out of 2,000 at 32 concurrent clients, while the winner
  manifest moves to another checkpoint mid-run (hot swap): the answers per serving checkpoint
  show that the swap landed while requests were running;
- a flood: `--flood` requests (2,000) at once against the one replica, more than it takes
  (`max_ongoing_requests` 256) plus its queue (`max_queued_requests` 512): how many are shed
  (503 + Retry-After), how fast a refusal comes back, and the latency of those served.

`--direct-ingress` runs the same against Serve's direct ingress (RAY_SERVE_ENABLE_DIRECT_INGRESS,
Ray 2.60; README, "Direct ingress"): the clients talk to the replica's own HTTP server on
127.0.0.1, without the proxy hop and the proxy round trip that fetches each request body.

    RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 python bench/serve_load.py --run runs/demo \
        [--precision int8] [--direct-ingress]

Results go to bench/results/serve_load[_PRECISION][_direct][_throughput].json (fp32: no
precision suffix).
"""

import argparse
import asyncio
import json
import os
import shutil
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import aiohttp
import requests
from argtypes import at_least, non_negative  # bench/, first on sys.path when a script runs
from local_serve import serve_app

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")

from charrnn.config import ServeConfig  # noqa: E402


def serve_cpu_s() -> dict:
    """CPU seconds used so far by Serve's processes on this machine, by kind (the HTTP proxy,
    the replicas) and by this process (the client)."""
    import psutil
    out = {"proxy": 0.0, "replica": 0.0, "client": 0.0}
    for p in psutil.process_iter(["pid", "cmdline"]):
        cmd = " ".join(p.info["cmdline"] or [])
        kind = ("client" if p.info["pid"] == os.getpid() else "proxy" if
                cmd.startswith("ray::ProxyActor") else "replica" if
                cmd.startswith("ray::ServeReplica") else None)
        if kind:
            try:
                t = p.cpu_times()
            except psutil.Error:
                continue
            out[kind] += t.user + t.system
    return out


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
    from charrnn.generate import Generator
    from charrnn.sampling import SampleParams
    from charrnn.stepper import cpu_threads
    threads = torch.get_num_threads()
    # as the replica sets them (a replica with num_cpus=1 runs one thread)
    gen = Generator(checkpoint.load(str(uri)), precision=args.precision,
                    threads=cpu_threads(args.precision, args.threads or 1))
    engine = Engine(gen.model, gen.vocab, dtype=gen.dtype, stepper=gen.stepper)

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
    # A stream running while Serve's largest request (64 prompts x 4,000 characters) joins:
    # how long that request took to join, and the longest pause between the stream's characters.
    stamps, joined, stop, ended = [], threading.Event(), threading.Event(), threading.Event()
    engine.submit(["alice "], [SampleParams(100_000, temperature=0.8, seed=0)],
                  lambda x: ended.set() if x is DONE else stamps.append(time.perf_counter()),
                  chunk_steps=1, cancelled=[stop])
    time.sleep(0.5)
    text = ("alice was beginning to get very tired of sitting by her sister on the bank, " * 60)
    t = time.perf_counter()
    engine.submit([text[i: i + 4000] for i in range(64)],
                  [SampleParams(1, seed=i) for i in range(64)],
                  lambda x: joined.set() if x is DONE else None)
    joined.wait()
    join_s, during = time.perf_counter() - t, [s for s in stamps if s >= t]
    stop.set()
    ended.wait()
    torch.set_num_threads(threads)
    return {"engine_alone_sequential_s": round(seq, 3), "engine_alone_batched_s": round(batched, 3),
            "engine_alone_gain": round(seq / batched, 1),
            "long_join_s": round(join_s, 2),
            "long_join_stream_chars": len(during),
            "long_join_stream_max_pause_s": round(max(b - a for a, b in zip([t] + during, during)), 3)}


async def load(url: str, run: Path, args) -> dict:
    """The HTTP measurements, from one asyncio client (aiohttp) with a keep-alive connection per
    concurrent client: a load generator that costs the 2 shared cores little (64 threads of
    `requests` took about 3 ms of CPU per request here, as much as a model step)."""
    session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=args.clients),
                                    timeout=aiohttp.ClientTimeout(total=120))

    async def one(i, chars=args.chars):
        t = time.perf_counter()
        async with session.post(url + "/generate", json={
                "prompt": "alice ", "max_chars": chars, "seed": i, "temperature": 0.8}) as r:
            await r.read()
            return r.status, time.perf_counter() - t

    async def healthz(_):
        async with session.get(url + "/healthz") as r:
            await r.read()
            return r.status, 0.0

    async def burst(fn, n=args.clients):  # the clients fire at once -> (wall time, results)
        t = time.perf_counter()
        out = await asyncio.gather(*(fn(i) for i in range(n)))
        return time.perf_counter() - t, out

    async with session:
        await burst(healthz)  # open the keep-alive connections before timing
        await burst(one)  # warm-up: the first 64-row batch of a fresh replica is slower
        rounds = []  # each round: the 64 requests one at a time, then all at once
        for _ in range(args.rounds):
            t = time.perf_counter()
            seq = [await one(i) for i in range(args.clients)]
            rounds.append((time.perf_counter() - t, seq, *await burst(one)))
        # the round with the median gain (one at a time and concurrent timed back to back)
        seq_s, seq, con_s, con = sorted(rounds, key=lambda r: r[0] / r[2])[len(rounds) // 2]
        healthz_s = min([(await burst(healthz))[0] for _ in range(3)])
        cpu = serve_cpu_s()
        one_char_s = min([(await burst(lambda i: one(i, 1)))[0] for _ in range(3)])
        # CPU per request that asks the model (almost) nothing: what HTTP and Serve cost
        cpu = {k: round(1000 * (v - cpu[k]) / (3 * args.clients), 2)
               for k, v in serve_cpu_s().items()}
        async with session.get(url + "/stats") as r:
            batch_sizes = (await r.json())["batch_sizes"]
        total_chars = args.clients * args.chars
        result = {
            "clients": args.clients, "chars": args.chars, "precision": args.precision,
            "direct_ingress": args.direct_ingress, "throughput_optimized": args.throughput_optimized,
            "batch_wait_timeout_s": args.batch_wait, "threads": args.threads,
            "sequential_chars_per_s": round(total_chars / seq_s),
            "concurrent_chars_per_s": round(total_chars / con_s),
            "batching_gain": round(seq_s / con_s, 1),
            "batching_gain_per_round": [round(r[0] / r[2], 1) for r in rounds],
            "sequential_p50_s": round(pct([d for _, d in seq], 0.5), 3),
            "sequential_p99_s": round(pct([d for _, d in seq], 0.99), 3),
            "concurrent_p50_s": round(pct([d for _, d in con], 0.5), 3),
            "concurrent_p99_s": round(pct([d for _, d in con], 0.99), 3),
            "batch_sizes": batch_sizes,
            "floor_concurrent_healthz_s": round(healthz_s, 3),
            "floor_concurrent_1_char_s": round(one_char_s, 3),
            "gain_bound_from_floor": round(seq_s / one_char_s, 1),
            "floor_cpu_ms_per_request": cpu,
        }
        result.update(await reliability(session, url, run, args))
    if args.flood:
        result.update(await flood(url, args))
    return result


async def flood(url: str, args) -> dict:
    """`args.flood` requests at once, each on its own connection: past the replica's
    `max_ongoing_requests` and `max_queued_requests`, Serve answers 503 at once."""
    timeout = aiohttp.ClientTimeout(total=600)
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0),
                                     timeout=timeout) as session:
        async def one(i):
            t = time.perf_counter()
            try:
                async with session.post(url + "/generate", json={
                        "prompt": "alice ", "max_chars": args.chars, "seed": i}) as r:
                    await r.read()
                    return r.status, r.headers.get("Retry-After"), time.perf_counter() - t
            except (aiohttp.ClientError, asyncio.TimeoutError):
                return -1, None, time.perf_counter() - t

        t = time.perf_counter()
        out = await asyncio.gather(*(one(i) for i in range(args.flood)))
        seconds = time.perf_counter() - t
    ok = [d for code, _, d in out if code == 200]
    shed = [d for code, _, d in out if code == 503]
    return {
        "flood_requests": args.flood, "flood_seconds": round(seconds, 1),
        "flood_ok": len(ok), "flood_shed_503": len(shed),
        "flood_other": sorted({code for code, _, _ in out} - {200, 503}),
        "flood_retry_after": sorted({ra for code, ra, _ in out if code == 503}),
        "flood_shed_p50_s": round(pct(shed, 0.5), 3) if shed else None,
        "flood_shed_p99_s": round(pct(shed, 0.99), 3) if shed else None,
        "flood_ok_p50_s": round(pct(ok, 0.5), 3) if ok else None,
        "flood_ok_p99_s": round(pct(ok, 0.99), 3) if ok else None,
    }


async def reliability(session, url: str, run: Path, args) -> dict:
    """`args.total` requests, `args.concurrency` at a time; half-way, winner.json is pointed at
    another kept checkpoint, so the replica hot-swaps while requests are in flight. Each answer
    names the checkpoint that served it: both must appear, or the swap did not land mid-run."""
    manifest = json.loads((run / "winner.json").read_text())
    other = sorted(p.name for p in run.glob("checkpoint_*") if p.name != manifest["checkpoint"])[0]
    async with session.get(url + "/model") as r:
        before = (await r.json())["checkpoint"]
    gate = asyncio.Semaphore(args.concurrency)

    async def rel(i):
        async with gate:
            if i == args.total // 2:
                (run / "winner.json").write_text(json.dumps({**manifest, "checkpoint": other}))
            t = time.perf_counter()
            try:
                async with session.post(url + "/generate", json={
                        "prompt": "alice ", "max_chars": 50, "seed": i, "temperature": 0.8}) as r:
                    served = (await r.json())["model"]["checkpoint"] if r.status == 200 else None
                    return r.status, time.perf_counter() - t, served
            except (aiohttp.ClientError, asyncio.TimeoutError):
                return -1, 0.0, None

    t = time.perf_counter()
    out = await asyncio.gather(*(rel(i) for i in range(args.total)))
    seconds = time.perf_counter() - t
    async with session.get(url + "/model") as r:
        after = (await r.json())["checkpoint"]
    latencies = [d for _, d, _ in out]
    served = Counter(Path(c).name for _, _, c in out if c)
    return {
        "reliability_requests": args.total, "reliability_concurrency": args.concurrency,
        "failed": sum(1 for code, _, _ in out if code != 200),
        "reliability_seconds": round(seconds, 1),
        "reliability_p50_s": round(pct(latencies, 0.5), 3),
        "reliability_p99_s": round(pct(latencies, 0.99), 3),
        "hot_swap": f"{Path(before).name} -> {Path(after).name}",
        "served_by": dict(served),  # answers per checkpoint: both, when the swap lands mid-run
        "swapped_mid_run": len(served) == 2 and Path(after).name in served,
    }


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--run", required=True, help="a run directory with >= 2 checkpoints")
    ap.add_argument("--chars", type=at_least(1), default=200)
    ap.add_argument("--clients", type=at_least(1), default=64)
    ap.add_argument("--total", type=at_least(1), default=2000)
    ap.add_argument("--concurrency", type=at_least(1), default=32)
    ap.add_argument("--flood", type=at_least(0), default=2000,
                    help="requests sent at once to see load shedding (0: skip)")
    ap.add_argument("--rounds", type=at_least(1), default=3,
                    help="sequential + concurrent rounds (median kept)")
    ap.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "int8"])
    ap.add_argument("--batch-wait", type=non_negative, default=ServeConfig.batch_wait_timeout_s,
                    help="batch_wait_timeout_s (default: the ServeConfig default)")
    ap.add_argument("--threads", type=at_least(0), default=0,
                    help="CPU threads in the replica (ServeConfig.threads)")
    ap.add_argument("--direct-ingress", action="store_true",
                    help="clients talk to the replica's own HTTP server (no proxy)")
    ap.add_argument("--throughput-optimized", action="store_true",
                    help="with --direct-ingress: Ray's RAY_SERVE_THROUGHPUT_OPTIMIZED switch too")
    ap.add_argument("--out", help="result JSON (default bench/results/serve_load[_PRECISION][_direct]"
                    "[_throughput].json)")
    args = ap.parse_args()
    if args.throughput_optimized and not args.direct_ingress:
        ap.error("--throughput-optimized goes with --direct-ingress (it turns direct ingress on)")
    suffix = ("" if args.precision == "fp32" else f"_{args.precision}") + (
        "_direct" if args.direct_ingress else "") + ("_throughput" if args.throughput_optimized else "")
    args.out = args.out or str(ROOT / "bench/results" / f"serve_load{suffix}.json")
    # A copy of the run: the hot swap rewrites its winner.json; removed at the end.
    with tempfile.TemporaryDirectory(prefix="charrnn-serve-") as tmp:
        run = Path(tmp) / "run"
        shutil.copytree(args.run, run)
        engine_alone = engine_gain(run / "winner.json", args)
        from tests.services import free_port, wait_for
        if args.direct_ingress:  # read by Serve's processes at start: set before the cluster starts
            replica_port = free_port()
            if args.throughput_optimized:
                os.environ["RAY_SERVE_THROUGHPUT_OPTIMIZED"] = "1"
            os.environ.update({"RAY_SERVE_ENABLE_DIRECT_INGRESS": "1",
                               "RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT": str(replica_port),
                               "RAY_SERVE_DIRECT_INGRESS_MAX_HTTP_PORT": str(replica_port + 1)})
        # The winner is re-read every 0.2 s: the swap lands while the reliability run goes on,
        # even when the replica answers its 2,000 requests in a second or two.
        app = {"checkpoint": str(run / "winner.json"), "watch_interval_s": 0.2,
               "max_batch_size": 64, "batch_wait_timeout_s": args.batch_wait,
               "precision": args.precision, "threads": args.threads}
        with serve_app(app, "bench") as url:
            if args.direct_ingress:  # one replica: the first port of the range
                url = f"http://127.0.0.1:{replica_port}"
                wait_for(lambda: requests.get(url + "/healthz", timeout=1).ok, 60,
                         "direct ingress")
            result = asyncio.run(load(url, run, args))
        result.update(engine_alone)
        Path(args.out).write_text(json.dumps(result, indent=2))
        print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
