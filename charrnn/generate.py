"""Batched, stateful generation.

The tutorial re-runs a 100-character window through the network for every new character
(O(T) work per character, batch 1). Here each prompt is fed once (prompts of different lengths
in one packed batch), then every step feeds one character per row with the recurrent state
carried: O(1) work per character, all rows at once. The step itself is `stepper.py`; how each
row draws its next character is `sampling.py`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np
import torch

from charrnn.model import CharRNN
from charrnn.sampling import RowControls, SampleParams
from charrnn.stepper import make_stepper
from charrnn.vocab import Vocab

# A prefill feeds prompts in model calls of at most PREFILL_CHUNK characters a row (state
# carried) and PREFILL_POSITIONS rows x characters. Serve's engine steps its running rows between
# two calls, so a long prompt joining pauses their streams for one call (0.17 s here, one
# thread), not for its whole prefill (5 s); and a call's (B, T, 4H) gates stay small: 64 prompts
# of 4,000 characters (alice model) grew the peak RSS by 17 MB, against 875 MB in one call, in
# about the same time (5.0 s and 5.1 s, one thread; `bench/prefill.py`).
PREFILL_CHUNK = 128
PREFILL_POSITIONS = 8192


def prefill(model: CharRNN, vocab: Vocab, prompts: Sequence[str], device,
            stepper=None) -> tuple[torch.Tensor, Any]:
    """Feed the prompts once (one packed batch, any lengths): -> logits after each prompt's
    last character (B, V) and the recurrent state (nn.LSTM's format). An empty prompt starts
    from `vocab.start` (a newline where the vocabulary has one). A `stepper` whose
    `steps_prompts` is set (int8) feeds them through itself instead of the model."""
    calls = prefill_calls(model, vocab, prompts, device, stepper)
    while True:
        try:
            next(calls)
        except StopIteration as done:
            return done.value


def prefill_calls(model: CharRNN, vocab: Vocab, prompts: Sequence[str], device,
                  stepper=None) -> Iterator[None]:
    """`prefill` one model call at a time: each `next()` makes one call; the one that makes the
    last raises StopIteration with (last, state) as its value.

    Prompts go through in passes of PREFILL_CHUNK characters, the state carried, the rows whose
    prompts have ended left out; a pass feeds its rows in groups of at most PREFILL_POSITIONS
    rows x characters. The prompts are encoded before the first call (a VocabError then)."""
    texts = [p or vocab.start for p in prompts]
    lengths = torch.tensor([len(t) for t in texts])
    ids = [torch.from_numpy(vocab.encode(t).astype(np.int64)) for t in texts]
    last, state, first = None, None, True
    for start in range(0, int(lengths.max()), PREFILL_CHUNK):
        active = (lengths > start).nonzero()[:, 0]  # prompts not yet fed to their end
        counts = (lengths[active] - start).clamp(max=PREFILL_CHUNK)  # characters in this pass
        per = max(1, PREFILL_POSITIONS // int(counts.max()))  # rows per group
        for g in range(0, len(active), per):
            if not first:  # the caller's turn between two calls
                yield
            first = False
            rows, n = active[g: g + per], counts[g: g + per]  # (R,), (R,)
            x = torch.zeros(len(rows), int(n.max()), dtype=torch.long)
            for r, (b, k) in enumerate(zip(rows.tolist(), n.tolist())):
                x[r, :k] = ids[b][start: start + k]
            if stepper is not None and stepper.steps_prompts:
                if state is None:  # nn.LSTM's start: zeros (L, R, H)
                    c = model.config
                    zeros = torch.zeros(c.num_layers, len(rows), c.hidden_size)
                    start = (zeros, zeros)
                else:
                    start = _rows(state, rows)
                logits, part = step_prompts(stepper, x, start, n)
            else:
                logits, part = model(x.to(device), _rows(state, rows), lengths=n, last_only=True)
            if state is None:  # the first group: room for every row (zeros: nn.LSTM's start)
                last = logits.new_zeros(len(texts), logits.shape[-1])  # (B, V)
                state = _each(lambda s: s.new_zeros(s.shape[0], len(texts), s.shape[2]), part)
            last[rows.to(device)] = logits[:, 0]
            state = _put_rows(state, rows, part)
    return last, state


def step_prompts(stepper, x: torch.Tensor, state, lengths: torch.Tensor) -> tuple[torch.Tensor, Any]:
    """One prefill call through `stepper`, a position at a time: x (R, T) ids, row r fed its
    first lengths[r] of them, from `state` (nn.LSTM's format, (L, R, H) each) -> the logits after
    each row's last id (R, 1, V) and the state after it (nn.LSTM's format), as the model's call.

    Rows go longest first, so the rows still feeding at position t are a prefix of the batch,
    stepped through views with no masking."""
    R, T = x.shape
    order = torch.argsort(lengths, descending=True, stable=True)
    x, n = x[order], lengths[order]
    h, c = stepper.state_in(_rows(state, order))  # per-layer (R, H); written below in place
    feeding = (n[None, :] > torch.arange(T)[:, None]).sum(1).tolist()  # rows still feeding, per t
    last = None
    for t, k in enumerate(feeding):
        logits, (h_k, c_k) = stepper(x[:k, t], ([a[:k] for a in h], [a[:k] for a in c]))
        for a, b in zip(h + c, h_k + c_k):
            a[:k] = b
        if last is None:
            last = logits.new_empty(R, logits.shape[1])
        ended = feeding[t + 1] if t + 1 < T else 0  # rows ended..k-1 fed their last id at t
        last[ended:k] = logits[ended:k]
    back = torch.argsort(order)
    h, c = stepper.state_out((h, c))  # (L, R, H) each
    return last[back][:, None], (h[:, back], c[:, back])


def _each(fn, state, *more):
    """`fn` over each tensor of a state: nn.LSTM's (h, c) or nn.GRU's h, each (L, B, H); with
    `more` states of the same kind, over the matching tensors of all of them."""
    if isinstance(state, tuple):
        return tuple(fn(*tensors) for tensors in zip(state, *more))
    return fn(state, *more)


def _rows(state, rows: torch.Tensor):
    """The state of batch rows `rows`."""
    if state is None:
        return None
    return _each(lambda s: s[:, rows.to(s.device)], state)


def _put_rows(state, rows: torch.Tensor, part):
    """`state` with batch rows `rows` replaced by `part` (the same kind of state, R rows)."""
    return _each(lambda s, p: s.index_copy(1, rows.to(s.device), p), state, part)


def sample_ids(
    model: CharRNN,
    vocab: Vocab,
    prompts: Sequence[str],
    params: Sequence[SampleParams],
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    stepper=None,
) -> Iterator[torch.Tensor]:
    """Yield, per step, the new ids of every row (B,); rows shorter than the longest keep
    stepping (their extra ids are ignored by the callers). `stepper`: one already built for
    `model` (`make_stepper`; its precision, not `dtype`, is used), else one is built here.

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
    step_fn = stepper if stepper is not None else make_stepper(model, dtype)
    with torch.inference_mode():
        last, state = prefill(model, vocab, prompts, device, step_fn)
        state = step_fn.state_in(state)
        t = torch.zeros(B, dtype=torch.long, device=device)
        for step in range(steps):
            ids = step_fn.draw(last, rc, t)
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
    progress: Callable[[int, int], None] | None = None,
    stepper=None,
) -> list[str]:
    """Completions (without their prompts) for a batch of prompts. `progress(steps, total)` is
    called every CHUNK_STEPS steps (characters per prompt) when given; `stepper` as in
    `sample_ids`."""
    if isinstance(params, SampleParams):
        params = [params] * len(prompts)
    # Steps are packed every CHUNK_STEPS into (B, CHUNK_STEPS) arrays of the vocabulary's dtype:
    # a list of one (B,) tensor per step costs ~800 bytes a step, 1 GB for a million characters.
    chunks, pending = [], []

    def pack() -> None:
        chunks.append(torch.stack(pending, 1).cpu().numpy().astype(vocab.dtype))  # (B, <= CHUNK)
        pending.clear()

    total = max([0] + [p.max_new_chars for p in params])
    for step, ids in enumerate(sample_ids(model, vocab, prompts, params, device, dtype,
                                                  stepper), 1):
        pending.append(ids)
        if len(pending) == CHUNK_STEPS:
            pack()
            if progress is not None:
                progress(step, total)
    if pending:
        pack()
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

    PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16, "int8": torch.int8}

    def __init__(self, loaded, device: str = "cpu", precision: str = "fp32",
                 threads: int | None = None):
        """`threads`: the int8 step's own threads (`stepper.cpu_threads`; default torch's count)."""
        if precision not in self.PRECISIONS:
            raise ValueError(f"precision must be fp32, bf16 or int8, got {precision!r}")
        self.loaded = loaded
        self.model = loaded.model.to(device).eval()
        self.vocab = loaded.vocab
        self.device = device
        self.dtype = self.PRECISIONS[precision]  # of the per-character steps (bf16, int8: faster)
        # Built once (int8: quantised and packed) for every `complete` call and Serve's engine;
        # a GRU, a GPU or no C compiler for int8 is one error now, not later.
        self.stepper = make_stepper(self.model, self.dtype, threads)

    def prepare(self, prompts: Sequence[str], oov: str = "error") -> list[str]:
        from charrnn.corpus import normalize_prompt
        return [self.vocab.clean(normalize_prompt(p, self.loaded.config.data), oov) for p in prompts]

    @staticmethod
    def row_params(params: SampleParams, n: int) -> list[SampleParams]:
        from dataclasses import replace
        return [replace(params, seed=None if params.seed is None else params.seed + i)
                for i in range(n)]

    def complete(self, prompts: Sequence[str], params: SampleParams, oov: str = "error",
                 progress: Callable[[int, int, int, int], None] | None = None) -> Iterator[str]:
        """Completions in prompt order, yielded batch by batch as each finishes. Every prompt is
        checked first, so a bad one fails before any work.

        Rows step in batches of at most ROWS_PER_BATCH, of near-equal sizes (a lone row beside
        full batches would take the one-row kernel, which rounds differently). `progress(done,
        rows, steps, total)`: `done` prompts finished before this batch of `rows`, which is
        `steps` of `total` characters in; called every CHUNK_STEPS steps and after each batch.
        """
        clean = self.prepare(prompts, oov)
        rows = self.row_params(params, len(clean))
        n = len(clean)
        batches = max(1, -(-n // ROWS_PER_BATCH))
        bounds = [round(i * n / batches) for i in range(batches + 1)]
        for a, b in zip(bounds, bounds[1:]):
            def step_progress(steps: int, total: int, a=a, b=b) -> None:
                progress(a, b - a, steps, total)
            texts = generate(self.model, self.vocab, clean[a:b], rows[a:b], self.device,
                             dtype=self.dtype, progress=step_progress if progress else None,
                             stepper=self.stepper)
            if progress is not None:
                progress(b, 0, 0, params.max_new_chars)
            yield from texts


# Rows stepped together offline. The 3-minute alice model on 2 cores (fp32, 100 characters each):
# 41,000 chars/s at 64 rows, 53,000-55,000 from 256 to 4,096, then 47,000 at 8,192 and 36,000 at
# 32,768 rows, whose state and logits no longer stay in cache; one batch of 200,000 prompts held
# 5 GB and printed nothing for 8 minutes.
ROWS_PER_BATCH = 2048
