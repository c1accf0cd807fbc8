"""Sampling: how one row's next character is drawn from the model's logits.

Each row has its own temperature / top-k / top-p / greedy settings and its own random stream
(seeded per row, drawn up front), so a row's text does not depend on what else shares the batch.
Pure torch; `generate.py` and the Serve engine step the model and call `sample_next`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F


class SampleParamError(ValueError):
    """A bad decoding setting. `field` and `alternative` are SampleParams field names, so each
    front end words the message in its own names (`--max-chars`, `max_chars`) via `message`."""

    def __init__(self, field: str, rule: str, alternative: str | None = None):
        self.field, self.rule, self.alternative = field, rule, alternative
        super().__init__(self.message())

    def message(self, names: dict[str, str] | None = None) -> str:
        name = (names or {}).get
        alt = f" (or use {name(self.alternative, self.alternative)})" if self.alternative else ""
        return f"{name(self.field, self.field)} {self.rule}{alt}"


@dataclass
class SampleParams:
    """How one row is decoded."""
    max_new_chars: int = 200
    """Characters generated after the prompt."""
    temperature: float = 1.0
    """Softmax temperature (> 0); ignored when `greedy`. Below `GREEDY_BELOW` a row is decoded
    greedily, the limit as the temperature goes to 0 (in float32, logits / 1e-38 overflow to inf
    and the softmax to NaN)."""
    top_k: int = 0
    """Sample among the k most likely characters (0: all)."""
    top_p: float = 1.0
    """Nucleus sampling: the smallest set whose probability reaches p, in (0, 1]."""
    greedy: bool = False
    """Always take the most likely character (the tutorial's argmax)."""
    seed: int | None = None
    """Seed of this row's random stream; None draws one."""

    def __post_init__(self):
        if self.max_new_chars < 0:
            raise SampleParamError("max_new_chars", "must be >= 0")
        if not self.greedy and not (math.isfinite(self.temperature) and self.temperature > 0):
            raise SampleParamError("temperature", "must be a finite number > 0", "greedy")
        if self.top_k < 0:
            raise SampleParamError("top_k", "must be >= 1 (or 0 to disable)")
        if not 0 < self.top_p <= 1:
            raise SampleParamError("top_p", "must be in (0, 1]")
        if self.seed is not None and self.seed < 0:
            raise SampleParamError("seed", "must be >= 0")


def _filtered_probs(logits: torch.Tensor, temp, top_k, top_p) -> torch.Tensor:
    """logits (B, V) -> probabilities (B, V) after temperature, top-k and top-p, in vocabulary
    order. The filters are decided on the sorted distribution, then mapped back, so every row
    samples in the same (vocabulary) order whatever filters other rows of the batch use."""
    scaled = logits / temp[:, None]
    sorted_logits, order = torch.sort(scaled, dim=-1, descending=True)
    V = logits.shape[-1]
    rank = torch.arange(V, device=logits.device)[None, :]
    k = torch.where(top_k > 0, top_k, torch.full_like(top_k, V))
    drop = rank >= k[:, None]
    probs = torch.softmax(sorted_logits.masked_fill(drop, float("-inf")), dim=-1)
    # Nucleus: drop a character when the mass before it already reaches top_p. The likeliest
    # is always kept: a top_p below float32's range (1e-320) is 0 here, and would drop them all.
    drop |= ((torch.cumsum(probs, dim=-1) - probs) >= top_p[:, None]) & (rank > 0)
    mask = torch.zeros_like(drop).scatter_(1, order, drop)  # back to vocabulary order
    return torch.softmax(scaled.masked_fill(mask, float("-inf")), dim=-1)


TOP_K_MAX = 2**31 - 1  # larger than any vocabulary
GREEDY_BELOW = 1e-5  # temperatures below this sample as argmax (as vLLM does)


class RowControls:
    """Per-row decoding settings as tensors, plus each row's own random stream.

    A row draws one uniform per step from its own seeded generator (inverse-CDF sampling), all
    drawn up front: `uniforms` (B, S), zero-padded past a row's length.
    """

    def __init__(self, params: Sequence[SampleParams], device):
        greedy = [p.greedy or p.temperature < GREEDY_BELOW for p in params]
        self.temp = torch.tensor([1.0 if g else p.temperature for p, g in zip(params, greedy)],
                                 device=device)
        # Any k >= V keeps every character; a k beyond int64 (JSON allows it) would not fit.
        self.top_k = torch.tensor([min(p.top_k, TOP_K_MAX) for p in params], device=device)
        self.top_p = torch.tensor([p.top_p for p in params], device=device)
        self.greedy = torch.tensor(greedy, device=device)
        u = np.zeros((len(params), max([1] + [p.max_new_chars for p in params])), np.float32)
        for b, p in enumerate(params):
            u[b, : p.max_new_chars] = np.random.default_rng(p.seed).random(p.max_new_chars)
        self.uniforms = torch.from_numpy(u).to(device)
        self._flags()

    def _flags(self) -> None:
        # Decided once per batch, not per step: which sampling path the batch needs.
        self.all_greedy = bool(self.greedy.all())
        self.any_greedy = bool(self.greedy.any())
        self.filtered = bool((self.top_k > 0).any() or (self.top_p < 1).any())

    def select(self, keep: torch.Tensor) -> RowControls:
        """The rows at indices `keep` (a LongTensor)."""
        out = RowControls.__new__(RowControls)
        out.temp, out.top_k = self.temp[keep], self.top_k[keep]
        out.top_p, out.greedy = self.top_p[keep], self.greedy[keep]
        out.uniforms = self.uniforms[keep]
        out._flags()
        return out

    @staticmethod
    def cat(a: RowControls, b: RowControls) -> RowControls:
        out = RowControls.__new__(RowControls)
        out.temp, out.top_k = torch.cat([a.temp, b.temp]), torch.cat([a.top_k, b.top_k])
        out.top_p, out.greedy = torch.cat([a.top_p, b.top_p]), torch.cat([a.greedy, b.greedy])
        width = max(a.uniforms.shape[1], b.uniforms.shape[1])
        out.uniforms = torch.cat([F.pad(x.uniforms, (0, width - x.uniforms.shape[1]))
                                  for x in (a, b)])
        out._flags()
        return out


def sample_next(last: torch.Tensor, rc: RowControls, steps: torch.Tensor) -> torch.Tensor:
    """Next ids (B,) from logits (B, V); row b uses draw number steps[b] (a LongTensor (B,))
    of its own stream."""
    if rc.all_greedy:
        return last.argmax(-1)
    if rc.filtered:
        probs = _filtered_probs(last.float(), rc.temp, rc.top_k, rc.top_p)
    else:  # plain temperature sampling needs no sort
        probs = torch.softmax(last.float() / rc.temp[:, None], dim=-1)
    cdf = torch.cumsum(probs, dim=-1)  # (B, V), vocabulary order
    u = rc.uniforms.gather(1, steps.clamp(max=rc.uniforms.shape[1] - 1)[:, None])  # (B, 1)
    sampled = torch.searchsorted(cdf, u * cdf[:, -1:]).clamp_(max=cdf.shape[-1] - 1)[:, 0]
    return torch.where(rc.greedy, last.argmax(-1), sampled) if rc.any_greedy else sampled
