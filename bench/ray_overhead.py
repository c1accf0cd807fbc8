"""Ray overhead target: `--workers 1` through TorchTrainer reaches >= 90% of the training chars/s
of the same config in local mode, both measured in this one run (same corpus, same epochs).

This machine's speed drifts from minute to minute by more than the gap measured, so the two modes
alternate, in rounds ordered local-Ray, Ray-local, local-Ray, ... (a drift over the run falls on
both sides alike). The result is the ratio of the two modes' mean rates over all rounds, with each
round's ratio beside it.

    RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 python bench/ray_overhead.py [--rounds 3]
"""

import argparse
import json
import os
import statistics
import sys
import tempfile
from pathlib import Path

from argtypes import at_least  # bench/, first on sys.path when a script runs

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")

from charrnn.config import load_config  # noqa: E402
from charrnn.trainer import fit  # noqa: E402


def mean_rate(run: Path) -> float:
    history = json.loads((run / "metrics.json").read_text())[1:]  # skip the warm-up epoch
    return sum(m["chars_per_s"] for m in history) / len(history)


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--config", default="configs/alice.yaml")
    ap.add_argument("--corpus", default=str(ROOT.parent / "shared/data/wonderland.txt"))
    ap.add_argument("--epochs", type=at_least(2), default=4, help="at least 2: the first is a warm-up")
    ap.add_argument("--out", default=str(ROOT / "bench/results/ray_overhead.json"))
    ap.add_argument("--rounds", type=at_least(1), default=3, help="local/Ray pairs, alternating")
    args = ap.parse_args()
    import ray

    def base(store: Path) -> list[str]:
        return [f"data.corpus={args.corpus}", f"run.storage={store}", f"train.epochs={args.epochs}",
                "train.max_minutes=0", "train.threads=2", "train.sample_chars=0"]

    def rate(store: Path, name: str, mode: list[str]) -> float:
        if mode:  # Ray's cluster is up only for its run, as for a user who runs one or the other
            ray.init(address="local", num_cpus=2, include_dashboard=False)
        try:
            fit(load_config(str(ROOT / args.config), [*base(store), f"run.name={name}", *mode]))
        finally:
            if mode:
                ray.shutdown()
        return mean_rate(store / name)

    ray1 = ["scaling.workers=1", "scaling.cpus_per_worker=1.5"]
    rounds = []
    with tempfile.TemporaryDirectory(prefix="charrnn-bench-") as tmp:  # every run of every round
        for r in range(args.rounds):
            store = Path(tmp) / f"round{r}"
            order = [("local", []), ("ray1", ray1)][:: 1 if r % 2 == 0 else -1]
            got = {name: rate(store, name, mode) for name, mode in order}
            rounds.append({"first": order[0][0], "local_chars_per_s": round(got["local"]),
                           "ray_1_worker_chars_per_s": round(got["ray1"]),
                           "ratio": round(got["ray1"] / got["local"], 3)})
            print(f"round {r + 1}/{args.rounds}: {rounds[-1]}", flush=True)
    local = sum(x["local_chars_per_s"] for x in rounds) / len(rounds)
    ray_1 = sum(x["ray_1_worker_chars_per_s"] for x in rounds) / len(rounds)
    result = {"config": args.config, "epochs": args.epochs, "rounds": rounds,
              "local_chars_per_s": round(local), "ray_1_worker_chars_per_s": round(ray_1),
              "ratio": round(ray_1 / local, 3),
              "round_ratios_median": statistics.median(x["ratio"] for x in rounds)}
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
