"""Continuous batching for serving: one stepping loop over every active row.

A static batch makes requests that arrive while it runs wait for all of it to finish. Here a
group of rows (what `@serve.batch` gathered) joins the running batch at the next step: its
prompts are prefilled, its state is concatenated to the batch state, and from then on the LSTM
steps once per character for all rows together. A row leaves at its own length. Rows keep their
own decoding settings and random streams (`RowControls`), so a row's text does not depend on
which rows share its steps.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from charrnn.generate import RowControls, SampleParams, Stepper, prefill, sample_next
from charrnn.model import CharRNN
from charrnn.vocab import Vocab


class DONE:
    """Sentinel emitted once a group's rows have all finished. A class, not an object(): it
    pickles by reference, so it is the same object in a Serve replica as in this module."""


@dataclass
class _Group:
    emit: Callable  # from the engine thread: a list (text per row), DONE, or an exception
    chunk_steps: int | None  # None: one emit of the whole texts when the group is done
    size: int  # rows

    def __post_init__(self):
        self.finished = [False] * self.size
        self.texts: list[list[str]] = [[] for _ in range(self.size)]  # pieces kept (no chunks)


def _cat_state(a, b, fused: bool):
    if fused:  # per-layer lists of (B, H)
        return ([torch.cat([x, y]) for x, y in zip(a[0], b[0])],
                [torch.cat([x, y]) for x, y in zip(a[1], b[1])])
    return torch.cat([a, b], dim=1)  # GRU: (L, B, H)


def _select_state(s, idx: torch.Tensor, fused: bool):
    if fused:
        return [x[idx] for x in s[0]], [x[idx] for x in s[1]]
    return s[:, idx]


class Engine:
    """Steps every active row of one model in a background thread.

    Per step the work is a fixed number of tensor ops whatever the number of rows: the sampled
    ids go into a buffer, and per-row Python (decoding, handing text to groups) runs only at a
    hand-off: when rows join or leave, and every `chunk_steps` steps while a streaming group
    is active. Groups that want whole texts wake their caller once.
    """

    def __init__(self, model: CharRNN, vocab: Vocab, device="cpu", dtype=torch.float32):
        self.model, self.vocab, self.device = model, vocab, torch.device(device)
        self.stepper = Stepper(model, dtype)
        self._lock = threading.Lock()
        self._pending: list = []
        self._thread: threading.Thread | None = None
        self.max_rows = 0  # the most rows stepped together so far

    def submit(self, prompts: Sequence[str], params: Sequence[SampleParams], emit: Callable,
               chunk_steps: int | None = None) -> None:
        """Queue a group. `emit` is called from the engine thread. With `chunk_steps` it receives
        lists of text chunks (one per row: up to `chunk_steps` characters, None once the row is
        finished); without, one list of whole texts when every row is done. Then DONE; or an
        exception instead."""
        chunk = None if chunk_steps is None else max(1, chunk_steps)
        with self._lock:
            self._pending.append((list(prompts), list(params), emit, chunk))
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, daemon=True, name="engine")
                self._thread.start()

    def _run(self) -> None:
        b, new = _Batch(self), []
        try:
            with torch.inference_mode():
                while True:
                    with self._lock:
                        new, self._pending = self._pending, []
                        if not new and not b.rows:
                            self._thread = None  # idle: the next submit starts a new thread
                            return
                    if new:  # join at this step
                        b.handoff()
                        b.join(new)
                        self.max_rows = max(self.max_rows, len(b.rows))
                    b.step()
        except BaseException as e:  # fail every waiting group rather than hang it
            with self._lock:
                waiting, self._pending, self._thread = self._pending, [], None
            emits = [g.emit for g, _ in b.rows] + [emit for _, _, emit, _ in new + waiting]
            for emit in {id(f): f for f in emits}.values():
                emit(e)


class _Batch:
    """The running batch: per row its group and position, and as tensors (B, ...) the logits
    to sample from, the recurrent state, the decoding controls, characters done and wanted."""

    def __init__(self, engine: Engine):
        self.e, self.fused = engine, engine.stepper.fused
        self.rows: list[tuple[_Group, int]] = []
        self.last = self.state = self.rc = self.done = self.total = None
        self.buffer: list[torch.Tensor] = []  # ids (B,) per step since the last hand-off
        self.chunk: int | None = None  # steps between hand-offs (None: only at joins/leaves)

    def join(self, groups: list) -> None:
        """Add groups (prompts, params, emit, chunk_steps) to the batch; their prompts are
        prefilled together, in one packed batch."""
        e = self.e
        rows, prompts, params = [], [], []
        for ps, pars, emit, chunk in groups:
            g = _Group(emit, chunk, len(ps))
            rows += [(g, i) for i in range(len(ps))]
            prompts += ps
            params += pars
        n = len(rows)
        last, state = prefill(e.model, e.vocab, prompts, e.device)
        state, rc = e.stepper.state_in(state), RowControls(params, e.device)
        done = torch.zeros(n, dtype=torch.long, device=e.device)
        total = torch.tensor([p.max_new_chars for p in params], device=e.device)
        if self.rows:
            self.last, self.state = torch.cat([self.last, last]), _cat_state(self.state, state, self.fused)
            self.rc = RowControls.cat(self.rc, rc)
            self.done, self.total = torch.cat([self.done, done]), torch.cat([self.total, total])
        else:
            self.last, self.state, self.rc, self.done, self.total = last, state, rc, done, total
        self.rows += rows
        self._set_chunk()

    def _set_chunk(self) -> None:
        self.chunk = min((g.chunk_steps for g, _ in self.rows if g.chunk_steps), default=None)

    def step(self) -> None:
        ids = sample_next(self.last, self.rc, self.done)  # (B,)
        self.buffer.append(ids)
        self.done += 1
        ended = self.done >= self.total  # (B,) bool
        if bool(ended.any()):  # one sync per step; rows leave right after their last text
            self.handoff()
            ids = ids[self.leave(ended)]
        elif self.chunk and len(self.buffer) >= self.chunk:
            self.handoff()
        if self.rows:
            self.last, self.state = self.e.stepper(ids, self.state)

    def handoff(self) -> None:
        """Decode the buffered ids; streaming groups get their rows' new text now, the others
        keep it until they are done."""
        if not self.buffer:
            return
        k = len(self.buffer)
        ids = torch.stack(self.buffer, 1).cpu().numpy()  # (B, k)
        # Row b generated its steps done-k .. done-1; only those before `total` are text.
        valid = (self.total - (self.done - k)).clamp(0, k).tolist()
        self.buffer = []
        chunks: dict[int, tuple[_Group, list]] = {}
        for (g, i), row, n in zip(self.rows, ids, valid):
            text = self.e.vocab.decode(row[:n])
            if g.chunk_steps is None:
                g.texts[i].append(text)
                continue
            out = chunks.setdefault(id(g), (g, [None if f else "" for f in g.finished]))[1]
            out[i] = text
        for g, out in chunks.values():
            g.emit(out)

    def leave(self, ended: torch.Tensor) -> torch.Tensor:
        """Drop finished rows (after their last text was handed off); a group whose rows are all
        finished gets DONE. Returns the indices of the rows kept."""
        for (g, i), end in zip(self.rows, ended.tolist()):
            if end:
                g.finished[i] = True
                if all(g.finished):
                    if g.chunk_steps is None:
                        g.emit(["".join(t) for t in g.texts])
                    g.emit(DONE)
        keep = (~ended).nonzero()[:, 0]
        self.rows = [self.rows[k] for k in keep.tolist()]
        if self.rows:  # (self.last is replaced by the next step)
            self.state = _select_state(self.state, keep, self.fused)
            self.rc, self.done, self.total = self.rc.select(keep), self.done[keep], self.total[keep]
            self._set_chunk()
        return keep
