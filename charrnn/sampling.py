"""Sampling: how one row's next character is drawn from the model's logits.

Each row has its own temperature / top-k / top-p / greedy settings and its own random stream
(seeded per row, drawn up front), so a row's text does not depend on what else shares the batch.
Pure torch; `generate.py` and the Serve engine step the model and call `sample_next`.
"""

from __future__ import annotations

import math
import secrets
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


_GAMMA = np.uint64(0x9E3779B97F4A7C15)  # SplitMix64's increment: 2^64 / the golden ratio, odd


def _mix64(z: np.ndarray) -> np.ndarray:
    """SplitMix64's output function (Steele, Lea and Flood, 2014) on uint64 arrays (wrapping)."""
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def _key(seed: int | None) -> int:
    """A 64-bit key for a seed: the seed itself below 2^64, larger ones folded 64 bits at a
    time; None draws one from the OS."""
    if seed is None:
        return secrets.randbits(64)
    key = seed & (2**64 - 1)
    while seed >> 64:
        seed >>= 64
        key = int(_mix64(np.array([key ^ (seed & (2**64 - 1))], np.uint64))[0])
    return key


def uniforms(seeds: Sequence[int | None], n: int) -> np.ndarray:
    """(len(seeds), n) float32 uniforms in [0, 1), 24 random bits each: row b is SplitMix64's
    stream from the mixed key of seeds[b] (the t-th draw is mix(key + t * GAMMA)). Counter-based,
    so a whole batch is a few array operations: a generator object per row (numpy's
    default_rng) cost about 17 us a row, a millisecond for a group of 64 requests."""
    keys = _mix64(np.array([_key(s) for s in seeds], np.uint64))  # (B,)
    state = keys[:, None] + _GAMMA * np.arange(1, n + 1, dtype=np.uint64)[None, :]  # (B, n)
    return (_mix64(state) >> np.uint64(40)).astype(np.float32) * np.float32(2.0**-24)


class RowControls:
    """Per-row decoding settings as tensors, plus each row's own random stream.

    A row draws one uniform per step from its own seeded stream (inverse-CDF sampling), all
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
        lengths = [p.max_new_chars for p in params]
        u = np.zeros((len(params), max([1] + lengths)), np.float32)
        for n in set(lengths) - {0}:  # rows of one length together (usually all of them)
            rows = [b for b, m in enumerate(lengths) if m == n]
            u[rows, :n] = uniforms([params[b].seed for b in rows], n)
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
