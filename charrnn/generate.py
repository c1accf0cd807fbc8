"""Batched, stateful sampling.

The tutorial re-runs a 100-character window through the network for every new character
(O(T) work per character, batch 1). Here each prompt is fed once (prompts of different lengths
in one packed batch), then every step feeds one character per row with the recurrent state
carried: O(1) work per character, all rows at once.

Each row has its own temperature / top-k / top-p / greedy settings and its own random stream
(seeded per row), so a row's text does not depend on what else shares the batch.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from charrnn.model import CharRNN
from charrnn.vocab import Vocab


@dataclass
class SampleParams:
    """How one row is decoded."""
    max_new_chars: int = 200
    """Characters generated after the prompt."""
    temperature: float = 1.0
    """Softmax temperature (> 0); ignored when `greedy`."""
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
            raise ValueError("max_new_chars must be >= 0")
        if not self.greedy and not self.temperature > 0:
            raise ValueError("temperature must be > 0 (or use greedy decoding)")
        if self.top_k < 0:
            raise ValueError("top_k must be >= 1 (or 0 to disable)")
        if not 0 < self.top_p <= 1:
            raise ValueError("top_p must be in (0, 1]")


class Stepper:
    """One recurrent step for a whole batch: ids (B,) + state -> logits (B, V) + state.

    For LSTMs the step is fused by hand: per layer one GEMM over [x, h] with the input and
    recurrent weights concatenated, then the gate math. For a single time step this is about
    twice as fast on CPU as calling nn.LSTM, and `dtype=torch.bfloat16` uses the CPU's or
    GPU's bf16 matrix units. GRUs step through the module.
    """

    def __init__(self, model: CharRNN, dtype: torch.dtype = torch.float32):
        self.model, self.dtype = model, dtype
        c = model.config
        self.fused = c.cell == "lstm"
        if not self.fused:
            return
        rnn = model.rnn
        self.w = [torch.cat([getattr(rnn, f"weight_ih_l{i}"), getattr(rnn, f"weight_hh_l{i}")],
                            1).t().contiguous().to(dtype) for i in range(c.num_layers)]
        self.b = [(getattr(rnn, f"bias_ih_l{i}") + getattr(rnn, f"bias_hh_l{i}")).to(dtype)
                  for i in range(c.num_layers)]
        self.emb = model.embed.weight.to(dtype)
        self.head_w, self.head_b = model.head.weight.t().contiguous().to(dtype), model.head.bias.to(dtype)

    def state_in(self, state):
        """nn.LSTM's (h, c), each (L, B, H) -> per-layer lists in the step dtype."""
        if not self.fused:
            return state
        h, c = state
        return [x.to(self.dtype) for x in h], [x.to(self.dtype) for x in c]

    def __call__(self, ids: torch.Tensor, state):
        if not self.fused:
            out, state = self.model(ids[:, None], state)
            return out[:, 0], state
        hs, cs = state
        x = self.emb[ids]  # (B, E)
        new_h, new_c = [], []
        for w, b, h, c in zip(self.w, self.b, hs, cs):
            i, f, g, o = torch.addmm(b, torch.cat([x, h], 1), w).chunk(4, 1)  # (B, H) each
            c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
            x = torch.sigmoid(o) * torch.tanh(c)
            new_h.append(x)
            new_c.append(c)
        return torch.addmm(self.head_b, x, self.head_w).float(), (new_h, new_c)


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
    # Nucleus: drop a character when the mass before it already reaches top_p (keeps >= 1).
    drop |= (torch.cumsum(probs, dim=-1) - probs) >= top_p[:, None]
    mask = torch.zeros_like(drop).scatter_(1, order, drop)  # back to vocabulary order
    return torch.softmax(scaled.masked_fill(mask, float("-inf")), dim=-1)


def prefill(model: CharRNN, vocab: Vocab, prompts: Sequence[str], device) -> tuple[torch.Tensor, Any]:
    """Feed the prompts once (one packed batch, any lengths): -> logits after each prompt's
    last character (B, V) and the recurrent state (nn.LSTM's format). An empty prompt starts
    from a newline, the most neutral context."""
    texts = [p if p else "\n" for p in prompts]
    lengths = torch.tensor([len(t) for t in texts])
    x = torch.zeros(len(texts), int(lengths.max()), dtype=torch.long)
    for b, t in enumerate(texts):
        x[b, : len(t)] = torch.from_numpy(vocab.encode(t).astype(np.int64))
    logits, state = model(x.to(device), lengths=lengths)  # (B, Tmax, V)
    return logits[torch.arange(len(texts)), lengths.to(device) - 1], state


class RowControls:
    """Per-row decoding settings as tensors, plus each row's own random stream."""

    def __init__(self, params: Sequence[SampleParams], device):
        self.temp = torch.tensor([p.temperature if not p.greedy else 1.0 for p in params],
                                 device=device)
        self.top_k = torch.tensor([p.top_k for p in params], device=device)
        self.top_p = torch.tensor([p.top_p for p in params], device=device)
        self.greedy = torch.tensor([p.greedy for p in params], device=device)
        # One uniform draw per row per step, from the row's own generator (inverse-CDF sampling).
        self.uniforms = [np.random.default_rng(p.seed).random(p.max_new_chars) for p in params]

    def select(self, keep: list[int]) -> RowControls:
        out = RowControls.__new__(RowControls)
        idx = torch.tensor(keep, dtype=torch.long, device=self.temp.device)
        out.temp, out.top_k = self.temp[idx], self.top_k[idx]
        out.top_p, out.greedy = self.top_p[idx], self.greedy[idx]
        out.uniforms = [self.uniforms[i] for i in keep]
        return out

    @staticmethod
    def cat(a: RowControls, b: RowControls) -> RowControls:
        out = RowControls.__new__(RowControls)
        out.temp, out.top_k = torch.cat([a.temp, b.temp]), torch.cat([a.top_k, b.top_k])
        out.top_p, out.greedy = torch.cat([a.top_p, b.top_p]), torch.cat([a.greedy, b.greedy])
        out.uniforms = a.uniforms + b.uniforms
        return out


def sample_next(last: torch.Tensor, rc: RowControls, steps: Sequence[int]) -> torch.Tensor:
    """Next ids (B,) from logits (B, V); row b uses draw number steps[b] of its own stream."""
    if bool(rc.greedy.all()):
        return last.argmax(-1)
    if bool((rc.top_k > 0).any() or (rc.top_p < 1).any()):
        probs = _filtered_probs(last.float(), rc.temp, rc.top_k, rc.top_p)
    else:  # plain temperature sampling needs no sort
        probs = torch.softmax(last.float() / rc.temp[:, None], dim=-1)
    cdf = torch.cumsum(probs, dim=-1)  # (B, V), vocabulary order
    u = torch.tensor([[rc.uniforms[b][t] if t < len(rc.uniforms[b]) else 0.0]
                      for b, t in enumerate(steps)], dtype=cdf.dtype, device=cdf.device)
    sampled = torch.searchsorted(cdf, u * cdf[:, -1:]).clamp_(max=cdf.shape[-1] - 1)[:, 0]
    return torch.where(rc.greedy, last.argmax(-1), sampled)


def stream(
    model: CharRNN,
    vocab: Vocab,
    prompts: Sequence[str],
    params: Sequence[SampleParams],
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> Iterator[list[str | None]]:
    """Yield, per step, the new character of every row (None once a row is done).

    Prompts must already be in the vocabulary (see `Vocab.clean`).
    """
    model.eval()
    B = len(prompts)
    if B == 0:
        return
    assert len(params) == B
    device = torch.device(device)
    rc = RowControls(params, device)
    remaining = [p.max_new_chars for p in params]
    steps = max(remaining)
    step_fn = Stepper(model, dtype)
    with torch.inference_mode():
        last, state = prefill(model, vocab, prompts, device)
        state = step_fn.state_in(state)
        for step in range(steps):
            ids = sample_next(last, rc, [step] * B).tolist()
            yield [vocab.chars[i] if remaining[b] > step else None for b, i in enumerate(ids)]
            if step + 1 < steps:
                last, state = step_fn(torch.tensor(ids, device=device), state)  # one step


def generate(
    model: CharRNN,
    vocab: Vocab,
    prompts: Sequence[str],
    params: SampleParams | Sequence[SampleParams],
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> list[str]:
    """Completions (without their prompts) for a batch of prompts."""
    if isinstance(params, SampleParams):
        params = [params] * len(prompts)
    out: list[list[str]] = [[] for _ in prompts]
    for chars in stream(model, vocab, prompts, params, device, dtype):
        for b, c in enumerate(chars):
            if c is not None:
                out[b].append(c)
    return ["".join(o) for o in out]


def generate_window_rerun(model: CharRNN, vocab: Vocab, prompt: str, n: int, window: int = 100,
                          device: torch.device | str = "cpu") -> str:
    """The tutorial's method, for benchmarks: argmax, re-running the whole window per character."""
    model.eval()
    ids = list(vocab.encode(prompt)[-window:])
    out = []
    with torch.inference_mode():
        for _ in range(n):
            x = torch.tensor([ids[-window:]], dtype=torch.long, device=device)
            logits, _ = model(x)
            i = int(logits[0, -1].argmax())
            ids.append(i)
            out.append(vocab.chars[i])
    return "".join(out)


class Generator:
    """A loaded checkpoint ready to complete prompts the way it was trained to read them.

    Prompts are normalised like the corpus (case, line endings), then the OOV policy applies.
    Row i of a request seeded with `seed` uses seed + i, so a batch of prompts and the same
    prompts sent one by one give the same texts.
    """

    PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16}

    def __init__(self, loaded, device: str = "cpu", precision: str = "fp32"):
        if precision not in self.PRECISIONS:
            raise ValueError(f"precision must be fp32 or bf16, got {precision!r}")
        self.loaded = loaded
        self.model = loaded.model.to(device).eval()
        self.vocab = loaded.vocab
        self.device = device
        self.dtype = self.PRECISIONS[precision]  # of the per-character steps (bf16: faster)

    def prepare(self, prompts: Sequence[str], oov: str = "error") -> list[str]:
        from charrnn.corpus import normalize_prompt
        return [self.vocab.clean(normalize_prompt(p, self.loaded.config.data), oov) for p in prompts]

    @staticmethod
    def row_params(params: SampleParams, n: int) -> list[SampleParams]:
        from dataclasses import replace
        return [replace(params, seed=None if params.seed is None else params.seed + i)
                for i in range(n)]

    def complete(self, prompts: Sequence[str], params: SampleParams, oov: str = "error") -> list[str]:
        clean = self.prepare(prompts, oov)
        return generate(self.model, self.vocab, clean, self.row_params(params, len(clean)),
                        self.device, dtype=self.dtype)
