"""Batched, stateful sampling.

The tutorial re-runs a 100-character window through the network for every new character
(O(T) work per character, batch 1). Here each prompt is fed once (prompts of different lengths
in one packed batch), then every step feeds one character per row with the recurrent state
carried: O(1) work per character, all rows at once.

Each row has its own temperature / top-k / top-p / greedy settings and its own random stream
(seeded per row), so a row's text does not depend on what else shares the batch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterator, Optional, Sequence

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
    seed: Optional[int] = None
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


def _filtered_probs(logits: torch.Tensor, temp, top_k, top_p) -> tuple[torch.Tensor, torch.Tensor]:
    """logits (B, V) -> probabilities in descending order (B, V) and the ids of that order."""
    sorted_logits, order = torch.sort(logits / temp[:, None], dim=-1, descending=True)
    V = logits.shape[-1]
    rank = torch.arange(V, device=logits.device)[None, :]
    k = torch.where(top_k > 0, top_k, torch.full_like(top_k, V))
    sorted_logits = sorted_logits.masked_fill(rank >= k[:, None], float("-inf"))
    probs = torch.softmax(sorted_logits, dim=-1)
    # Nucleus: drop a character when the mass before it already reaches top_p (keeps >= 1).
    before = torch.cumsum(probs, dim=-1) - probs
    probs = probs.masked_fill(before >= top_p[:, None], 0.0)
    return probs / probs.sum(-1, keepdim=True), order


def stream(
    model: CharRNN,
    vocab: Vocab,
    prompts: Sequence[str],
    params: Sequence[SampleParams],
    device: torch.device | str = "cpu",
) -> Iterator[list[Optional[str]]]:
    """Yield, per step, the new character of every row (None once a row is done).

    Prompts must already be in the vocabulary (see `Vocab.clean`); an empty prompt starts from
    the zero state with a newline, the most neutral context.
    """
    model.eval()
    B = len(prompts)
    if B == 0:
        return
    assert len(params) == B
    device = torch.device(device)
    texts = [p if p else "\n" for p in prompts]
    lengths = torch.tensor([len(t) for t in texts])
    x = torch.zeros(B, int(lengths.max()), dtype=torch.long)
    for b, t in enumerate(texts):
        x[b, : len(t)] = torch.from_numpy(vocab.encode(t).astype(np.int64))
    temp = torch.tensor([p.temperature if not p.greedy else 1.0 for p in params], device=device)
    top_k = torch.tensor([p.top_k for p in params], device=device)
    top_p = torch.tensor([p.top_p for p in params], device=device)
    greedy = torch.tensor([p.greedy for p in params], device=device)
    remaining = np.array([p.max_new_chars for p in params])
    # One uniform draw per row per step, from the row's own generator (inverse-CDF sampling).
    steps = int(remaining.max())
    uniforms = torch.tensor(np.stack(
        [np.random.default_rng(p.seed).random(steps) for p in params]), dtype=torch.float32,
        device=device) if steps else None  # (B, steps)

    with torch.inference_mode():
        logits, state = model(x.to(device), lengths=lengths)  # (B, Tmax, V)
        last = logits[torch.arange(B), lengths.to(device) - 1]  # (B, V): after each prompt's end
        for step in range(steps):
            probs, order = _filtered_probs(last.float(), temp, top_k, top_p)
            cdf = torch.cumsum(probs, dim=-1)
            u = uniforms[:, step:step + 1] * cdf[:, -1:]
            pick = torch.searchsorted(cdf, u).clamp_(max=cdf.shape[-1] - 1)  # (B, 1)
            sampled = order.gather(1, pick)[:, 0]
            nxt = torch.where(greedy, last.argmax(-1), sampled)  # (B,)
            ids = nxt.tolist()
            yield [vocab.chars[i] if remaining[b] > step else None for b, i in enumerate(ids)]
            if step + 1 < steps:
                out, state = model(nxt[:, None], state)  # (B, 1, V): one step, state carried
                last = out[:, 0]


def generate(
    model: CharRNN,
    vocab: Vocab,
    prompts: Sequence[str],
    params: SampleParams | Sequence[SampleParams],
    device: torch.device | str = "cpu",
    on_step: Optional[Callable[[int], None]] = None,
) -> list[str]:
    """Completions (without their prompts) for a batch of prompts."""
    if isinstance(params, SampleParams):
        params = [params] * len(prompts)
    out: list[list[str]] = [[] for _ in prompts]
    for i, chars in enumerate(stream(model, vocab, prompts, params, device)):
        for b, c in enumerate(chars):
            if c is not None:
                out[b].append(c)
        if on_step:
            on_step(i)
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

    def __init__(self, loaded, device: str = "cpu"):
        self.loaded = loaded
        self.model = loaded.model.to(device).eval()
        self.vocab = loaded.vocab
        self.device = device

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
                        self.device)
