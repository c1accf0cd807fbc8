"""The fused recurrent step that generation repeats once per character.

`generate.py` (offline) and `engine.py` (Serve's continuous batch) both step their rows with it:
ids (B,) + state -> logits (B, V) + state, with no window re-run. `make_stepper` picks it, or its
int8 variant (`quantized.py`); `cpu_threads` sets the threads either runs on.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from charrnn.model import CharRNN
from charrnn.sampling import sample_next


def make_stepper(model: CharRNN, dtype: torch.dtype = torch.float32, threads: int | None = None):
    """The step for `dtype`: fp32 or bf16 (`Stepper`), or int8 (`quantized.Int8Stepper`, CPU,
    stepping with `threads` threads of its own)."""
    if dtype == torch.int8:
        from charrnn.quantized import Int8Stepper  # it builds on Stepper
        return Int8Stepper(model, threads)
    return Stepper(model, dtype)


def cpu_threads(precision: str, threads: int = 0) -> int:
    """Sets torch's CPU threads for generating in `precision` with `threads` threads (0: torch's
    count now) and returns the count to build the `Generator` with.

    fp32 and bf16: torch's intra-op threads do the work, as does int8 without AMX (through
    `torch._int_mm`). int8 with AMX: the kernel's own threads step the rows
    (`quantized.Int8Stepper`), and torch keeps one thread for its small bookkeeping ops. Its idle
    workers spin for milliseconds after each parallel op, on the cores the kernel's helpers need:
    with both at two threads, a 64-row prefill took 7.5 ms against 4.4 and a 64-row step in the
    engine 170-200 us against 147."""
    from charrnn.quantized import amx_available
    threads = threads or torch.get_num_threads()
    torch.set_num_threads(1 if precision == "int8" and amx_available() else threads)
    return threads


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

    draw = staticmethod(sample_next)  # next ids from the logits (the int8 step has its own)
    steps_prompts = False  # prompts go through the model's packed nn.LSTM call, not this step

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
