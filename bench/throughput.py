"""Throughput target: training FLOP/s >= 60% of this machine's measured fp32 matmul FLOP/s.

Both figures come from one run: a square fp32 matmul, then real training steps of the model in
configs/alice.yaml (the Trainer's own step: forward, backward, clip, AdamW) on real batches.
Training FLOPs count the matmuls of the LSTM gates and the output head, x3 for backward.

    python bench/throughput.py [--config configs/alice.yaml] [--steps 30]
"""

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch
from argtypes import at_least  # bench/, first on sys.path when a script runs

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from charrnn.config import load_config  # noqa: E402
from charrnn.dist import LocalBackend  # noqa: E402
from charrnn.train_loop import Trainer  # noqa: E402
from charrnn.trainer import prepare  # noqa: E402


def matmul_flops(n: int, device: str, dtype=torch.float32, reps: int = 20) -> float:
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    sync()
    t = time.perf_counter()
    for _ in range(reps):
        a @ b
    sync()
    return 2 * n ** 3 * reps / (time.perf_counter() - t)


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--config", default="configs/alice.yaml")
    ap.add_argument("--corpus", default=str(ROOT.parent / "shared/data/wonderland.txt"))
    ap.add_argument("--steps", type=at_least(1), default=30)
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    ap.add_argument("--out", default=str(ROOT / "bench/results/throughput.json"))
    args = ap.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    cfg = load_config(str(ROOT / args.config), [f"data.corpus={args.corpus}", *args.overrides])
    cfg, vocab, ids = prepare(cfg)
    with tempfile.TemporaryDirectory(prefix="charrnn-bench-") as tmp:  # nothing is saved
        trainer = Trainer(cfg, vocab, ids, LocalBackend(tmp, 1, device))
        # The machine's best fp32 rate: the largest of several sizes, each after a warm-up.
        peak = max(matmul_flops(n, device) for n in (1024, 2048, 4096))
        import numpy as np

        from charrnn.data import EpochPlan
        plan = EpochPlan(trainer.train, 0, 0)
        idx = np.arange(trainer.K)
        B = cfg.train.batch_size

        def batch(i):
            sel = idx[(i * B) % (trainer.K - B):][:B]
            return (torch.from_numpy(a).to(device) for a in plan.batch(sel))

        for i in range(3):
            trainer._train_step(*batch(i))
        if device == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        for i in range(args.steps):
            trainer._train_step(*batch(i))  # .item() inside syncs each step, as in training
        dt = time.perf_counter() - t
        chars_per_s = args.steps * B * cfg.data.seq_len / dt
        flops = 3 * trainer.model.flops_per_char() * chars_per_s
        result = {"device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
                  "threads": torch.get_num_threads(), "config": args.config,
                  "overrides": args.overrides, "fp32_matmul_gflops": round(peak / 1e9, 1),
                  "train_chars_per_s": round(chars_per_s), "train_gflops": round(flops / 1e9, 1),
                  "ratio": round(flops / peak, 3), "precision": trainer.cfg.train.precision,
                  "autocast": "bf16" if trainer.autocast.__class__.__name__ == "autocast" else "fp32"}
        if device == "cuda":
            result["bf16_matmul_gflops"] = round(matmul_flops(8192, device, torch.bfloat16) / 1e9, 1)
            result["mfu_vs_bf16"] = round(flops / (result["bf16_matmul_gflops"] * 1e9), 4)
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=2))
        print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
