"""Soak the Serve app: does a replica's memory or log grow with the requests it has served?

Waves of requests at 32 concurrent clients, a third each: `/generate`, `/generate/stream` read to
the end, and `/generate/stream` abandoned after its first 16 bytes (a browser closed, a client
timeout), which Serve cancels. After each wave: the statuses and the replica's RSS. At the end:
how many tracebacks and "exception was never retrieved" messages the replica's log holds.

    RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 python bench/serve_soak.py --run runs/demo
"""

import argparse
import asyncio
import json
import subprocess
import sys
import time
from pathlib import Path

import aiohttp
import requests
from argtypes import at_least  # bench/, first on sys.path when a script runs
from local_serve import serve_app

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


async def one(s: aiohttp.ClientSession, url: str, i: int) -> int:
    body = {"prompt": "alice was", "max_chars": 200, "temperature": 0.8, "seed": i}
    try:
        if i % 3 == 0:
            async with s.post(url + "/generate", json=body) as r:
                await r.read()
                return r.status
        abandon = i % 3 == 2
        async with s.post(url + "/generate/stream",
                          json={**body, "max_chars": 1000 if abandon else 200}) as r:
            if abandon:  # the connection closes with the block
                await r.content.read(16)
            else:
                async for _ in r.content.iter_chunked(64):
                    pass
            return r.status
    except (aiohttp.ClientError, asyncio.TimeoutError):
        return -1


async def wave(url: str, n: int, concurrency: int) -> dict:
    sem, statuses = asyncio.Semaphore(concurrency), {}
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as s:
        async def run(i):
            async with sem:
                st = await one(s, url, i)
                statuses[str(st)] = statuses.get(str(st), 0) + 1
        await asyncio.gather(*(run(i) for i in range(n)))
    return statuses


def replica_rss_mb(app: str) -> float | None:
    out = subprocess.run(["ps", "-eo", "rss,args"], capture_output=True, text=True).stdout
    rows = [line.split(None, 1) for line in out.splitlines() if f"ServeReplica:{app}:" in line]
    return round(int(rows[0][0]) / 1024, 1) if rows else None


def log_counts(logs: Path) -> dict:
    text = "".join(p.read_text(errors="replace") for p in logs.rglob("*")
                   if p.is_file() and p.suffix in (".err", ".out", ".log"))
    return {"tracebacks": text.count("Traceback (most recent call last)"),
            "never_retrieved": text.count("exception was never retrieved")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", required=True, help="a run directory with winner.json")
    ap.add_argument("--waves", type=at_least(1), default=10)
    ap.add_argument("--requests", type=at_least(1), default=1500, help="requests per wave")
    ap.add_argument("--concurrency", type=at_least(1), default=32)
    ap.add_argument("--out", default=str(ROOT / "bench/results/serve_soak.json"))
    args = ap.parse_args()
    import ray
    with serve_app({"checkpoint": str(Path(args.run).resolve() / "winner.json")}, "soak") as url:
        result = {"run": args.run, "rss_start_mb": replica_rss_mb("soak"), "waves": []}
        for w in range(args.waves):
            t = time.monotonic()
            statuses = asyncio.run(wave(url, args.requests, args.concurrency))
            time.sleep(2)  # cancelled rows leave the batch
            result["waves"].append({"statuses": statuses,
                                    "seconds": round(time.monotonic() - t, 1),
                                    "rss_mb": replica_rss_mb("soak")})
            print(f"wave {w}: {result['waves'][-1]}", flush=True)
        result["stats"] = requests.get(url + "/stats", timeout=5).json()
        result["log"] = log_counts(Path(ray._private.worker._global_node.get_logs_dir_path()))
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(json.dumps({k: v for k, v in result.items() if k != "waves"}, indent=2))


if __name__ == "__main__":
    main()
