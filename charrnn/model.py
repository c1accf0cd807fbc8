"""The character-level recurrent language model. Pure torch: no Ray, storage or YAML here.

Embedding -> LSTM/GRU stack (dropout between layers) -> dropout -> linear over the vocabulary.
Unlike the tutorial (ids scaled to 0..1, one target per window), every position of a window is a
target, and `forward` carries the recurrent state so generation feeds one character per step.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

# LSTM state is (h, c), each (num_layers, B, H); GRU state is h alone.
State = torch.Tensor | tuple[torch.Tensor, torch.Tensor]


@dataclass
class ModelConfig:
    cell: str = "lstm"
    """Recurrent cell: `lstm` or `gru`."""
    vocab_size: int = 0
    """Set from the corpus vocabulary when the model is built; leave 0 in configs."""
    embedding_dim: int = 64
    """Width of the learned character embedding (replaces the tutorial's ids scaled to 0..1)."""
    hidden_size: int = 256
    """Hidden units per recurrent layer."""
    num_layers: int = 2
    """Stacked recurrent layers."""
    dropout: float = 0.2
    """Dropout between recurrent layers and before the output projection."""

    def __post_init__(self):
        if self.cell not in ("lstm", "gru"):
            raise ValueError(f"model.cell must be lstm or gru, got {self.cell!r}")
        if self.vocab_size < 0:
            raise ValueError(f"model.vocab_size must be >= 0 (0: set from the corpus), got {self.vocab_size}")
        for name in ("embedding_dim", "hidden_size", "num_layers"):
            if getattr(self, name) < 1:
                raise ValueError(f"model.{name} must be >= 1, got {getattr(self, name)}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"model.dropout must be in [0, 1), got {self.dropout}")


class CharRNN(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        if config.vocab_size < 1:
            raise ValueError("model.vocab_size must be set (>= 1) before building the model")
        self.config = config
        rnn_cls = nn.LSTM if config.cell == "lstm" else nn.GRU
        self.embed = nn.Embedding(config.vocab_size, config.embedding_dim)
        self.rnn = rnn_cls(
            config.embedding_dim,
            config.hidden_size,
            num_layers=config.num_layers,
            dropout=config.dropout if config.num_layers > 1 else 0.0,
            batch_first=True,
        )
        self.drop = nn.Dropout(config.dropout)
        self.head = nn.Linear(config.hidden_size, config.vocab_size)

    def forward(
        self,
        x: torch.Tensor,
        state: State | None = None,
        lengths: torch.Tensor | None = None,
        last_only: bool = False,
    ) -> tuple[torch.Tensor, State]:
        """x: (B, T) ids -> logits (B, T, V) and the state after the last step.

        With `lengths` (B,), row b holds only its first lengths[b] ids (the rest is padding); the
        returned state is each row's state after its own last id, so prompts of different
        lengths share one batch. Logits past a row's length are zeros.

        `last_only` returns (B, 1, V): the logits after each row's last id, all that generation
        needs of a prompt (the head over every position of 20,000 prompts took 0.9 GB).
        """
        e = self.embed(x)  # (B, T, E)
        if lengths is None:
            out, state = self.rnn(e, state)  # out: (B, T, H)
        else:
            packed = pack_padded_sequence(e, lengths.cpu(), batch_first=True, enforce_sorted=False)
            out, state = self.rnn(packed, state)
            if last_only:  # a row's output after its last id is its top layer's final h
                h = state[0] if isinstance(state, tuple) else state  # (L, B, H)
                return self.head(self.drop(h[-1]))[:, None], state
            out, _ = pad_packed_sequence(out, batch_first=True, total_length=x.shape[1])
        if last_only:
            out = out[:, -1:]  # (B, 1, H)
        return self.head(self.drop(out)), state

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def flops_per_char(self) -> int:
        """Matmul FLOPs of one forward step for one character (x3 for forward + backward).

        Per layer, the gates are (in + H) x (gates*H) multiply-adds; the head is H x V.
        """
        c = self.config
        gates = 4 if c.cell == "lstm" else 3
        f = 0
        for layer in range(c.num_layers):
            inp = c.embedding_dim if layer == 0 else c.hidden_size
            f += 2 * (inp + c.hidden_size) * gates * c.hidden_size
        return f + 2 * c.hidden_size * c.vocab_size

    def summary(self) -> dict:
        return {**asdict(self.config), "params": self.num_params()}
