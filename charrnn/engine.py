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
from dataclasses import dataclass, field

import torch

from charrnn.generate import RowControls, SampleParams, Stepper, prefill, sample_next
from charrnn.model import CharRNN
from charrnn.vocab import Vocab


class DONE:
    """Sentinel emitted once a group's rows have all finished. A class, not an object(): it
    pickles by reference, so it is the same object in a Serve replica as in this module."""


@dataclass
class _Group:
    emit: Callable  # from the engine thread: a list (text chunk or None per row), DONE, or an error
    chunk_steps: int
    buf: list = field(default_factory=list)  # text generated since the last emit, per row
    finished: list = field(default_factory=list)
    live: int = 0
    steps: int = 0

    def flush(self, force: bool) -> None:
        """Hand out the buffered text every `chunk_steps` steps (fewer event-loop wake-ups than
        one per character), and at once when a row ends; a finished row reads None after."""
        self.steps += 1
        if force or self.steps % self.chunk_steps == 0:
            self.emit([b if b else (None if f else "") for b, f in zip(self.buf, self.finished)])
            self.buf = [""] * len(self.buf)


@dataclass
class _Row:
    group: _Group
    index: int  # position in its group
    total: int  # characters to generate
    done: int = 0


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
    """Steps every active row of one model in a background thread."""

    def __init__(self, model: CharRNN, vocab: Vocab, device="cpu", dtype=torch.float32):
        self.model, self.vocab, self.device = model, vocab, torch.device(device)
        self.stepper = Stepper(model, dtype)
        self._lock = threading.Lock()
        self._pending: list = []
        self._thread: threading.Thread | None = None
        self.max_rows = 0  # the most rows stepped together so far

    def submit(self, prompts: Sequence[str], params: Sequence[SampleParams], emit: Callable,
               chunk_steps: int = 1) -> None:
        """Queue a group. `emit` receives lists of text chunks (one per row: up to `chunk_steps`
        characters, None once the row is finished), then DONE, or an exception."""
        with self._lock:
            self._pending.append((list(prompts), list(params), emit, max(1, chunk_steps)))
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, daemon=True, name="engine")
                self._thread.start()

    def _run(self) -> None:
        rows: list[_Row] = []
        last = state = rc = None
        fused = self.stepper.fused
        try:
            with torch.inference_mode():
                while True:
                    with self._lock:
                        new, self._pending = self._pending, []
                        if not new and not rows:
                            self._thread = None  # idle: the next submit starts a new thread
                            return
                    for prompts, params, emit, chunk in new:  # join at this step
                        n = len(prompts)
                        g = _Group(emit, chunk, [""] * n, [False] * n, n)
                        l2, s2 = prefill(self.model, self.vocab, prompts, self.device)
                        s2, rc2 = self.stepper.state_in(s2), RowControls(params, self.device)
                        if rows:
                            last, state = torch.cat([last, l2]), _cat_state(state, s2, fused)
                            rc = RowControls.cat(rc, rc2)
                        else:
                            last, state, rc = l2, s2, rc2
                        rows += [_Row(g, i, p.max_new_chars) for i, p in enumerate(params)]
                    self.max_rows = max(self.max_rows, len(rows))
                    ids = sample_next(last, rc, [r.done for r in rows]).tolist()
                    groups: dict[int, _Group] = {}
                    ended: set[int] = set()
                    for r, i in zip(rows, ids):
                        if r.done < r.total:
                            r.group.buf[r.index] += self.vocab.chars[i]
                        r.done += 1
                        groups[id(r.group)] = r.group
                        if r.done >= r.total:
                            ended.add(id(r.group))
                    for key, g in groups.items():
                        g.flush(force=key in ended)
                    keep = [k for k, r in enumerate(rows) if r.done < r.total]
                    for r in rows:
                        if r.done >= r.total:
                            r.group.finished[r.index] = True
                            r.group.live -= 1
                            if r.group.live == 0:
                                r.group.emit(DONE)
                    rows = [rows[k] for k in keep]
                    if rows:
                        idx = torch.tensor(keep, dtype=torch.long, device=self.device)
                        nxt = torch.tensor([ids[k] for k in keep], device=self.device)
                        last, state = self.stepper(nxt, _select_state(state, idx, fused))
                        rc = rc.select(keep)
        except BaseException as e:  # fail every waiting group rather than hang it
            with self._lock:
                waiting, self._pending, self._thread = self._pending, [], None
            for g in {id(r.group): r.group for r in rows}.values():
                g.emit(e)
            for _, _, emit, _ in waiting:
                emit(e)
