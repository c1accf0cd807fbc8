"""Windowed next-character data: the corpus held once as ids, windows made on the fly.

The tutorial materialises 144,327 windows x 100 ints (O(N x T) memory) with one target each.
Here the corpus is one (N,) uint8 array, a window is just its start offset, and a batch is
gathered when needed: x = ids[s:s+T], y = ids[s+1:s+T+1], so every position is a target.

Train and validation split contiguously (the last `val_fraction` is validation) and no window
crosses the boundary. Each epoch shifts all training window starts by a random offset in
[0, stride) and visits the windows in a random order, both derived from (seed, epoch) alone,
so any worker, or a resumed run, recomputes them without shared state.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np

from charrnn.config import DataConfig
from charrnn.errors import CorpusError


@dataclass
class Split:
    """One contiguous part of the corpus and how windows tile it."""
    ids: np.ndarray  # (N,) uint8/uint16, a view of the whole corpus array: no copy
    seq_len: int
    stride: int

    @property
    def max_offset(self) -> int:
        # Largest per-epoch shift that still leaves room for the target of the last position.
        return max(0, min(self.stride - 1, len(self.ids) - self.seq_len - 1))

    @property
    def num_windows(self) -> int:
        """Windows per epoch; the same for every epoch offset."""
        return (len(self.ids) - self.seq_len - 1 - self.max_offset) // self.stride + 1

    def starts(self, window_index: np.ndarray, offset: int = 0) -> np.ndarray:
        return offset + window_index.astype(np.int64) * self.stride

    def gather(self, starts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Window starts (B,) -> inputs x (B, T) and targets y (B, T), int64."""
        idx = starts[:, None] + np.arange(self.seq_len + 1)[None, :]  # (B, T+1)
        w = self.ids[idx].astype(np.int64)
        return w[:, :-1], w[:, 1:]


def split_corpus(ids: np.ndarray, cfg: DataConfig) -> tuple[Split, Split]:
    """Contiguous train/validation split; validation windows are fixed and non-overlapping."""
    n = len(ids)
    n_val = int(round(n * cfg.val_fraction))
    need = cfg.seq_len + 1
    if n - n_val < need or n_val < need:
        raise CorpusError(
            f"the corpus has {n:,} characters after cleaning, too short for one "
            f"{cfg.seq_len}-character window in both training and validation (needs at least "
            f"{int(np.ceil(need / min(cfg.val_fraction, 1 - cfg.val_fraction))):,}); "
            "use a longer text or a smaller data.seq_len")
    train = Split(ids[: n - n_val], cfg.seq_len, cfg.stride)
    val = Split(ids[n - n_val:], cfg.seq_len, cfg.seq_len)
    return train, val


class EpochPlan:
    """The window order and offset of one training epoch, derived from (seed, epoch).

    Shards hand out window *indices* 0..K-1 (a Ray Data range, or a local range); `starts` maps
    them through this epoch's permutation and offset, so the visited windows are shuffled even
    when a shard's indices arrive in order.
    """

    def __init__(self, split: Split, seed: int, epoch: int):
        rng = np.random.default_rng([seed, epoch])
        self.offset = int(rng.integers(0, split.max_offset + 1))
        # (K,): O(N / stride) memory, on every worker. `rng.permutation(K)` shuffles an int64
        # arange in place; shuffling an int32 one takes the same draws, so it is the same order
        # (a run resumed mid-epoch by this code goes on where an earlier version stopped) in half
        # the memory: 36 MB, not 72, for a 1 GB corpus at stride 100.
        k = split.num_windows
        self.perm = np.arange(k, dtype=np.int32 if k < 2**31 else np.int64)
        rng.shuffle(self.perm)
        self.split = split

    def starts(self, window_index: np.ndarray) -> np.ndarray:
        return self.split.starts(self.perm[window_index], self.offset)

    def batch(self, window_index: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return self.split.gather(self.starts(window_index))


def local_index_batches(num_windows: int, batch_size: int, rank: int = 0, world: int = 1):
    """The local-mode shard: this rank's share of 0..K-1 in batches (equal shares per rank)."""
    per_rank = num_windows // world
    mine = np.arange(rank * per_rank, (rank + 1) * per_rank)
    for i in range(0, len(mine), batch_size):
        yield mine[i:i + batch_size]


VAL_STREAMS = 16


def val_chunks(val: Split, rank: int = 0, world: int = 1, streams: int = VAL_STREAMS,
               max_chars: int = 0):
    """The held-out text as `streams` contiguous streams read in `seq_len` chunks, so a caller
    that carries the recurrent state across chunks scores every character with its whole
    preceding context (as generation sees it), not from a cold state at each window start.

    `max_chars` > 0 scores only the start of the held-out text (for very large corpora).
    Yields (x, y), each (S, T) for this rank's streams (every world-th). Every chunk of a rank
    has the same S, so the state carries over; the ragged tail of each stream is dropped.
    Needs `min(len(val.ids) - 1, max_chars or inf) >= seq_len` (`split_corpus` and `Config`
    make sure of it).
    """
    n = len(val.ids) - 1
    if max_chars:
        n = min(n, max_chars)  # the first `max_chars` held-out characters
    # One stream per rank at least, but never shorter than one chunk: a held-out text of fewer
    # chunks than ranks leaves the last ranks without a stream (their sums are zero).
    streams = min(max(world, streams), n // val.seq_len)
    length = n // streams // val.seq_len * val.seq_len  # per stream, whole chunks
    mine = np.arange(streams)[rank::world] * (n // streams)  # (S,) stream starts
    if not len(mine):
        return
    for t in range(0, length, val.seq_len):
        yield val.gather(mine + t)


def val_signature(val: Split, max_chars: int = 0) -> str:
    """A digest of the held-out text that validation scores (`val_chunks` with `max_chars`):
    validation losses are comparable, and a best checkpoint meaningful, only on the same text."""
    n = len(val.ids) if not max_chars else min(len(val.ids), max_chars + 1)
    # The array's own buffer: `.tobytes()` copied it (100 MB at `eval_max_chars: 0` on 1 GB).
    return hashlib.sha256(np.ascontiguousarray(val.ids[:n])).hexdigest()[:16]


def random_prompt(text: str, length: int, seed: int | None) -> str:
    """A random `length`-character slice of the corpus, as the tutorial seeds its generator."""
    rng = np.random.default_rng(seed)
    if len(text) <= length:
        return text
    start = int(rng.integers(0, len(text) - length))
    return text[start:start + length]
