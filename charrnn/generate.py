"""Batched, stateful sampling.

The tutorial re-runs a 100-character window through the network for every new character
(O(T) work per character, batch 1). Here each prompt is fed once (prompts of different lengths
in one packed batch), then every step feeds one character per row with the recurrent state
carried: O(1) work per character, all rows at once.

Each row has its own temperature / top-k / top-p / greedy settings and its own random stream
(seeded per row), so a row's text does not depend on what else shares the batch.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from charrnn.model import CharRNN
from charrnn.vocab import Vocab


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


class Stepper:
    """One recurrent step for a whole batch: ids (B,) + state -> logits (B, V) + state.

    For LSTMs the step is fused by hand, about twice as fast on CPU as calling nn.LSTM for one
    time step:
    - layer 0's input is an embedding row, so its input projection plus biases is a table
      lookup, (V, 4H) computed once; the step multiplies only h by the recurrent weights;
    - every later layer runs one GEMM over [x, h] with input and recurrent weights concatenated;
    - the gate columns are reordered from PyTorch's (i, f, g, o) to (i, f, o, g), so one sigmoid
      covers 3H columns and one tanh the last H.
    `dtype=torch.bfloat16` uses the CPU's or GPU's bf16 matrix units. GRUs step through the
    module. State: per-layer lists of h and c, each (B, H), in `dtype`.
    """

    def __init__(self, model: CharRNN, dtype: torch.dtype = torch.float32):
        self.model, self.dtype = model, dtype
        c = model.config
        self.fused = c.cell == "lstm"
        if not self.fused:
            return
        H, rnn = c.hidden_size, model.rnn
        order = torch.cat([torch.arange(0, 2 * H), torch.arange(3 * H, 4 * H),
                           torch.arange(2 * H, 3 * H)])  # (i, f, g, o) -> (i, f, o, g)

        def param(name: str, i: int) -> torch.Tensor:
            return getattr(rnn, f"{name}_l{i}").detach()[order]

        with torch.no_grad():
            bias = [param("bias_ih", i) + param("bias_hh", i) for i in range(c.num_layers)]
            self.table = (model.embed.weight @ param("weight_ih", 0).t() + bias[0]).to(dtype)
            # GEMM right-hand sides, (in, 4H): layer 0 (H, 4H); later layers (2H, 4H)
            self.w = [param("weight_hh", 0).t().contiguous().to(dtype)] + [
                torch.cat([param("weight_ih", i), param("weight_hh", i)], 1).t().contiguous().to(dtype)
                for i in range(1, c.num_layers)]
            self.b = [None] + [b.to(dtype) for b in bias[1:]]
            self.head_w = model.head.weight.detach().t().contiguous().to(dtype)  # (H, V)
            self.head_b = model.head.bias.detach().to(dtype)
        self.H = H

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
        H, hs, cs = self.H, *state
        x = None  # the layer's input; layer 0 reads its own from the table
        new_h, new_c = [], []
        for layer, (w, b, h, c) in enumerate(zip(self.w, self.b, hs, cs)):
            if layer == 0:
                gates = torch.addmm(F.embedding(ids, self.table), h, w)  # (B, 4H)
            else:
                gates = torch.addmm(b, torch.cat([x, h], 1), w)
            ifo = torch.sigmoid(gates[:, : 3 * H])  # (B, 3H)
            c = torch.addcmul(ifo[:, H: 2 * H] * c, ifo[:, :H], torch.tanh(gates[:, 3 * H:]))
            x = ifo[:, 2 * H:] * torch.tanh(c)  # (B, H)
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
        self.top_k = torch.tensor([p.top_k for p in params], device=device)
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


def sample_ids(
    model: CharRNN,
    vocab: Vocab,
    prompts: Sequence[str],
    params: Sequence[SampleParams],
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> Iterator[torch.Tensor]:
    """Yield, per step, the new ids of every row (B,); rows shorter than the longest keep
    stepping (their extra ids are ignored by the callers).

    Prompts must already be in the vocabulary (see `Vocab.clean`).
    """
    model.eval()
    B = len(prompts)
    if B == 0:
        return
    assert len(params) == B
    device = torch.device(device)
    rc = RowControls(params, device)
    steps = max(p.max_new_chars for p in params)
    step_fn = Stepper(model, dtype)
    with torch.inference_mode():
        last, state = prefill(model, vocab, prompts, device)
        state = step_fn.state_in(state)
        t = torch.zeros(B, dtype=torch.long, device=device)
        for step in range(steps):
            ids = sample_next(last, rc, t)
            yield ids
            if step + 1 < steps:
                last, state = step_fn(ids, state)  # one step
                t += 1


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
    # Steps are packed every CHUNK_STEPS into (B, CHUNK_STEPS) arrays of the vocabulary's dtype:
    # a list of one (B,) tensor per step costs ~800 bytes a step, 1 GB for a million characters.
    chunks, pending = [], []
    for ids in sample_ids(model, vocab, prompts, params, device, dtype):
        pending.append(ids)
        if len(pending) == CHUNK_STEPS:
            chunks.append(torch.stack(pending, 1).cpu().numpy().astype(vocab.dtype))
            pending = []
    if pending:
        chunks.append(torch.stack(pending, 1).cpu().numpy().astype(vocab.dtype))
    if not chunks:
        return [""] * len(prompts)
    ids = np.concatenate(chunks, 1)  # (B, S), decoded at the end
    return [vocab.decode(row[: p.max_new_chars]) for row, p in zip(ids, params)]


CHUNK_STEPS = 1024


def pick_device(name: str) -> str:
    """`auto` (cuda when a GPU is visible, else cpu), `cpu`, `cuda` or `cuda:N`, checked here so
    that a missing GPU is one clear error rather than an assertion deep inside torch."""
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(name)
    except (RuntimeError, ValueError):
        dev = None
    if dev is None or dev.type not in ("cpu", "cuda"):
        raise ValueError(f"device must be auto, cpu, cuda or cuda:N, got {name!r}")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r}: no CUDA GPU is visible to this process; use cpu")
    if dev.type == "cuda" and (dev.index or 0) >= torch.cuda.device_count():
        raise ValueError(f"device {name!r}: this process sees {torch.cuda.device_count()} GPU(s)")
    return name


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
