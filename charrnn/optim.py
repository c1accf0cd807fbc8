"""What a training step's numbers are made of: the optimizer, the learning-rate schedule and the
matmul precision. Pure torch, the same on every worker."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable

import torch

from charrnn.config import TrainConfig


def native_bf16(device: torch.device) -> bool:
    """Whether bf16 matmuls run natively: recent GPUs, or CPUs with AMX tiles (Sapphire Rapids
    and later) or AVX512-BF16 dot products (AMD Zen 4 and later, Cooper Lake), where bf16
    autocast trains faster at the same loss per step (`configs/alice.yaml` on 2 cores: about 2x
    with AMX, 1.3x on Zen 4; BENCHMARKS.md)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return any(bool(getattr(torch.cpu, probe, lambda: False)())
               for probe in ("_is_amx_tile_supported", "_is_avx512_bf16_supported"))


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """The forward passes' context: bf16 autocast for `bf16` (and `auto` where it is native)."""
    if precision == "bf16" or (precision == "auto" and native_bf16(device)):
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def lr_factor(step: int, total: int, cfg: TrainConfig, time_progress: float = 0.0) -> float:
    """Linear warm-up, then cosine decay to `min_lr_ratio`.

    Progress is the larger of steps done / total and, under `train.max_minutes`, time used /
    time allowed: a time-limited run anneals fully before it stops instead of being cut off
    at a high learning rate.
    """
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    progress = min(1.0, max(time_progress,
                            (step - cfg.warmup_steps) / max(1, total - cfg.warmup_steps)))
    return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def build(model: torch.nn.Module, t: TrainConfig, total_steps: int,
          time_progress: Callable[[], float]
          ) -> tuple[torch.optim.AdamW, torch.optim.lr_scheduler.LambdaLR]:
    """AdamW and its schedule (`lr_factor`, stepped once per optimizer step); `time_progress`
    gives the share of `train.max_minutes` used so far."""
    opt = torch.optim.AdamW(model.parameters(), lr=t.lr, weight_decay=t.weight_decay,
                            betas=(0.9, 0.99))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: lr_factor(s, total_steps, t, time_progress()))
    return opt, sched
