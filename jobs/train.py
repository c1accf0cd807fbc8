"""Train a character-level LSTM: parse, build the config, run, report the winner.

    python jobs/train.py --config configs/alice.yaml --corpus PATH --storage ./runs --name RUN
    ray job submit -- python jobs/train.py --workers 2 --storage s3://bucket/prefix ...
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# Only light imports here: torch loads inside main(), under run_cli, so a Ctrl-C while it
# loads exits cleanly too (status 130), not with an import traceback.
from charrnn.cli import run_cli  # noqa: E402

DEFAULT_CONFIG = os.path.join(os.path.dirname(__file__), "..", "configs", "alice.yaml")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--config", default=DEFAULT_CONFIG, help="YAML config (default: configs/alice.yaml)")
    p.add_argument("--corpus", help="data.corpus: path, s3://, http(s):// or gutenberg:<id>")
    p.add_argument("--storage", help="run.storage: local directory or s3://bucket/prefix")
    p.add_argument("--name", help="run.name: re-running the same name resumes the run")
    p.add_argument("--epochs", type=int, help="train.epochs")
    p.add_argument("--max-minutes", type=float, help="train.max_minutes: stop (saved) after this")
    p.add_argument("--workers", type=int, help="scaling.workers: Ray Train workers (0: local mode)")
    p.add_argument("--gpus-per-worker", type=float, help="scaling.gpus_per_worker (default: auto)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="dotted config override, e.g. --set model.hidden_size=256 (repeatable)")
    return p.parse_args(argv)


FLAG_KEYS = {"corpus": "data.corpus", "storage": "run.storage", "name": "run.name",
             "epochs": "train.epochs", "max_minutes": "train.max_minutes",
             "workers": "scaling.workers", "gpus_per_worker": "scaling.gpus_per_worker"}


def main(argv=None) -> int:
    args = parse_args(argv)
    from charrnn.config import load_config
    flags = [f"{key}={getattr(args, attr)}" for attr, key in FLAG_KEYS.items()
             if getattr(args, attr) is not None]
    cfg = load_config(args.config, [*flags, *args.overrides])
    from charrnn import runlog
    from charrnn.trainer import fit
    winner = fit(cfg)
    runlog.say(f"winner: {winner}")  # as the run's other lines: a closed stdout does not fail it
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main, oom_hint="a smaller model.hidden_size, model.num_layers or "
                              "train.batch_size"))
