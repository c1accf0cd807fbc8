"""Data pipeline target: iterating a worker's shard alone (Ray Data shard -> window gather ->
tensors) is >= 10x faster than the training loop consumes it. Both rates are measured inside
one Ray Train worker in this run, in windows per second.

    RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 python bench/data_pipeline.py
"""

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")


def probe(config):
    import ray.train
    import torch

    from charrnn.config import Config
    from charrnn.data import EpochPlan, split_corpus
    from charrnn.dist import RayBackend
    from charrnn.train_loop import Trainer
    from charrnn.vocab import Vocab
    cfg = Config.from_dict(config["config"])
    ids = ray.get(config["ids"])
    b = RayBackend(config["run_uri"])
    train, _ = split_corpus(ids, cfg.data)
    B = cfg.train.batch_size
    rates = {}
    for epoch in range(2):  # data alone: shard iteration + gather + tensor conversion
        plan = EpochPlan(train, 0, epoch)
        t, n = time.perf_counter(), 0
        for idx in b.index_batches(train.num_windows, B):
            x, y = (torch.from_numpy(a) for a in plan.batch(idx))
            n += len(idx)
        rates["data_windows_per_s"] = n / (time.perf_counter() - t)
    trainer = Trainer(cfg, Vocab(config["vocab"]), ids, b)
    plan = EpochPlan(train, 0, 0)
    t, n = time.perf_counter(), 0
    for i, idx in enumerate(b.index_batches(train.num_windows, B)):
        if i < 10:
            trainer._train_step(*(torch.from_numpy(a) for a in plan.batch(idx)))
            n += len(idx)
            elapsed = time.perf_counter() - t
    rates["train_windows_per_s"] = n / elapsed
    Path(config["out"]).write_text(json.dumps(rates))
    ray.train.report(rates)


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--config", default="configs/alice.yaml")
    ap.add_argument("--corpus", default=str(ROOT.parent / "shared/data/wonderland.txt"))
    ap.add_argument("--out", default=str(ROOT / "bench/results/data_pipeline.json"))
    args = ap.parse_args()
    import ray
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from charrnn.config import load_config
    from charrnn.data import split_corpus
    from charrnn.trainer import prepare, window_dataset
    cfg, vocab, ids = prepare(load_config(str(ROOT / args.config), [f"data.corpus={args.corpus}"]))
    ray.init(address="local", num_cpus=2, include_dashboard=False)
    K = split_corpus(ids, cfg.data)[0].num_windows
    with tempfile.TemporaryDirectory(prefix="charrnn-bench-") as tmp:
        probe_out = str(Path(tmp) / "probe.json")
        TorchTrainer(
            probe, train_loop_config={"config": cfg.to_dict(), "vocab": vocab.chars,
                                      "ids": ray.put(ids), "run_uri": "", "out": probe_out},
            scaling_config=ScalingConfig(num_workers=1, resources_per_worker={"CPU": 1.5}),
            run_config=RunConfig(name="data", storage_path=tmp),
            datasets={"train": window_dataset(K, 1)}).fit()
        ray.shutdown()
        m = json.loads(Path(probe_out).read_text())
        out = {"config": args.config, "data_windows_per_s": round(m["data_windows_per_s"]),
               "train_windows_per_s": round(m["train_windows_per_s"], 1),
               "ratio": round(m["data_windows_per_s"] / m["train_windows_per_s"], 1)}
        Path(args.out).write_text(json.dumps(out, indent=2))
        print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
