"""Ray overhead target: `--workers 1` through TorchTrainer reaches >= 90% of the training chars/s
of the same config in local mode, both measured in this one run (same corpus, same epochs).

    RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 python bench/ray_overhead.py
"""

import argparse
import json
import os
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
    args = ap.parse_args()
    import ray
    with tempfile.TemporaryDirectory(prefix="charrnn-bench-") as tmp:  # the two runs
        store = Path(tmp)
        base = [f"data.corpus={args.corpus}", f"run.storage={store}", f"train.epochs={args.epochs}",
                "train.max_minutes=0", "train.threads=2", "train.sample_chars=0"]
        fit(load_config(str(ROOT / args.config), [*base, "run.name=local"]))
        ray.init(address="local", num_cpus=2, include_dashboard=False)
        fit(load_config(str(ROOT / args.config), [*base, "run.name=ray1", "scaling.workers=1",
                                                  "scaling.cpus_per_worker=1.5"]))
        ray.shutdown()
        local, ray1 = mean_rate(store / "local"), mean_rate(store / "ray1")
        result = {"config": args.config, "epochs": args.epochs, "local_chars_per_s": round(local),
                  "ray_1_worker_chars_per_s": round(ray1), "ratio": round(ray1 / local, 3)}
        Path(args.out).write_text(json.dumps(result, indent=2))
        print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
