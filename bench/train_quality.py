"""Quality target: configs/alice.yaml reaches <= 1.40 nats/char held-out loss within 5 minutes,
trained through jobs/train.py (local mode).

    python bench/train_quality.py --corpus ../shared/data/wonderland.txt
"""

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from argtypes import positive  # bench/, first on sys.path when a script runs

ROOT = Path(__file__).resolve().parent.parent


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--corpus", default=str(ROOT.parent / "shared/data/wonderland.txt"))
    ap.add_argument("--config", default="configs/alice.yaml")
    ap.add_argument("--minutes", type=positive, default=5.0)
    ap.add_argument("--target", type=positive, default=1.40)
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    ap.add_argument("--out", default=str(ROOT / "bench/results/train_quality.json"))
    args = ap.parse_args()
    storage = tempfile.mkdtemp(prefix="charrnn-bench-")
    t0 = time.monotonic()
    subprocess.run([sys.executable, "jobs/train.py", "--config", args.config, "--corpus",
                    args.corpus, "--storage", storage, "--name", "quality", "--max-minutes",
                    str(args.minutes), *[a for o in args.overrides for a in ("--set", o)]],
                   cwd=ROOT, check=True)
    wall = time.monotonic() - t0
    history = json.loads((Path(storage) / "quality/metrics.json").read_text())
    best = min(history, key=lambda m: m["val_loss"])
    hit = next((m for m in history if m["val_loss"] <= args.target), None)
    result = {
        "config": args.config, "max_minutes": args.minutes, "target_nats": args.target,
        "best_val_loss": round(best["val_loss"], 4), "best_val_bpc": round(best["val_bpc"], 4),
        "best_at_s": round(best["elapsed_s"], 1), "best_epoch": round(best["epoch"], 2),
        "target_reached_at_s": round(hit["elapsed_s"], 1) if hit else None,
        "final_train_loss": round(history[-1]["train_loss"], 4),
        "mean_chars_per_s": round(sum(m["chars_per_s"] for m in history) / len(history)),
        "wall_s_including_startup": round(wall, 1), "run": storage,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))
    return 0 if hit else 1


if __name__ == "__main__":
    sys.exit(main())
