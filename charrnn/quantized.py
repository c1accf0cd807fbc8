"""Generation's int8 step, for CPUs: the fused LSTM step of `stepper.py` with int8 weights and
hidden states, int32 GEMMs and each layer's gate math in one native pass (`native.py`,
`csrc/lstm_int8.c`). The GEMMs run on the kernel's own AMX code where the CPU has AMX (Intel
Sapphire Rapids and later; weights packed once, about 3x faster at 64 rows), else through
`torch._int_mm` (oneDNN: VNNI where the CPU has it).

Quantisation needs no calibration data:
- weights, per output column and symmetric: W[:, j] ~ Wq[:, j] * s[j], s[j] = max|W[:, j]| / 127;
- hidden states: h = o * tanh(c) lies in (-1, 1), so one fixed scale: hq = round(127 h);
- so the int32 sum hq @ Wq[:, j] times s[j] / 127 is h @ W[:, j].
Cell states, layer 0's table of input projections, biases and logits stay fp32. Integer GEMMs are
exact, so a row's text does not depend on which rows share its batch.
"""

from __future__ import annotations

import ctypes
import threading
from types import SimpleNamespace

import torch

from charrnn import native
from charrnn.errors import CharrnnError
from charrnn.model import CharRNN
from charrnn.sampling import RowControls, sample_next
from charrnn.stepper import Stepper


def amx_available() -> bool:
    """Whether the int8 step runs on the kernel's AMX code (this CPU and compiler have AMX, and
    Linux grants it), and so on threads of its own rather than torch's; False where the kernel
    cannot be built."""
    try:
        return bool(native.kernel().amx_init())
    except native.NativeBuildError:
        return False


def quantize_columns(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """w (K, N) float -> int8 (K, N) and each column's factor (N,) back to w / 127 units:
    int32 sums of a 127-scaled int8 input times the int8 matrix, times the factor, are x @ w."""
    s = w.abs().amax(0).clamp(min=1e-12) / 127  # (N,)
    return torch.round(w / s).to(torch.int8).contiguous(), (s / 127).float().contiguous()


UNITS = 64  # hidden units per block of gate columns (at 16, one vector, gcc left the loop scalar)


def gate_blocks(H: int, ub: int) -> torch.Tensor:
    """Column order (4H,) for gates in blocks of `ub` units: block k holds i, f, o, g of units
    k*ub .. k*ub + ub - 1, from the (i, f, o, g) order of `stepper.Stepper`."""
    unit = torch.arange(H).view(H // ub, 1, ub)  # (blocks, 1, ub)
    gate = torch.arange(4).view(1, 4, 1) * H  # (1, 4, 1)
    return (gate + unit).reshape(-1)


def _round_up(n: int, m: int) -> int:
    return -(-n // m) * m


def pack_amx(wq: torch.Tensor) -> torch.Tensor:
    """int8 (K, N) -> zero-padded to K' = K rounded up to 64 and N' to 32, then packed four rows
    at a time as the AMX kernel reads it: (K'/4, 4N'), packed[k][4n + r] = w[4k + r][n]."""
    K, N = wq.shape
    Kp, Np = _round_up(K, 64), _round_up(N, 32)
    w = torch.zeros(Kp, Np, dtype=torch.int8)
    w[:K, :N] = wq
    return w.view(Kp // 4, 4, Np).transpose(1, 2).contiguous().view(Kp // 4, 4 * Np)


def quantize_h(h: torch.Tensor) -> torch.Tensor:
    """Hidden states (B, H), all in (-1, 1) -> int8 (B, H) at the fixed scale 127."""
    return torch.round(h.float().clamp(-1, 1) * 127).to(torch.int8).contiguous()


class Int8Stepper:
    """One recurrent step for a batch: ids (B,) int64 + state -> logits (B, V) fp32 + state.

    State: per-layer lists of hq (B, H) int8 and c (B, H) fp32. CPU only. `threads`: threads
    of the AMX step (default: torch's intra-op count); above 32 rows its blocks of 32 rows are
    shared out between the caller and up to threads - 1 helper threads of the kernel's own, and
    a row's numbers do not depend on which thread stepped it. Each thread keeps
    its own scratch (the GEMMs' inputs and int32 sums) per batch size rounded up to 32, reused
    from step to step: fresh buffers each step ran about 20% slower, out of cache. For the AMX
    kernel it is padded (rows to 32, inputs to 64 columns, sums to 32; input padding stays 0).
    """

    fused = True
    dtype = torch.int8
    steps_prompts = True  # prompts go through this step too (generate.prefill_calls), not nn.LSTM

    def __init__(self, model: CharRNN, threads: int | None = None):
        if threads is not None and threads < 1:
            raise ValueError(f"threads must be >= 1, got {threads}")
        self.threads = threads or torch.get_num_threads()
        fp = Stepper(model)  # fp32: the table, the reordered gates, the concatenated weights
        if not fp.fused:
            raise CharrnnError("precision int8 steps LSTM models only; this checkpoint is a GRU: "
                               "use precision fp32 or bf16")
        if next(model.parameters()).device.type != "cpu":
            raise CharrnnError("precision int8 runs on CPU only; on a GPU use fp32 or bf16")
        self.lib = native.kernel()
        self.H = H = fp.H
        # Gate columns in blocks of UNITS units (the kernel's layout), where H allows it.
        self.ub = UNITS if H % UNITS == 0 else H
        cols = gate_blocks(H, self.ub)  # (4H,): the stepper's column at each kernel column
        self.table = fp.table[:, cols].float().contiguous()  # (V, 4H): layer 0's input term
        self.w, self.scale = zip(*(quantize_columns(w[:, cols]) for w in fp.w))  # (in, 4H), (4H,)
        self.b = [None] + [b[cols].float().contiguous() for b in fp.b[1:]]  # (4H,)
        self.head_w, self.head_scale = quantize_columns(fp.head_w.float())  # (H, V), (V,)
        self.head_b = fp.head_b.float().contiguous()
        self.V = self.head_w.shape[1]
        self.amx = amx_available()
        if self.amx:  # the step's constants, as the kernel's pointer arrays
            self.packed = [pack_amx(w) for w in (*self.w, self.head_w)]
            self._ptrs = [_pointers(ts) for ts in (
                self.packed, [*self.scale, self.head_scale], [self.table, *self.b[1:]])]
        self._local = threading.local()

    def state_in(self, state):
        """nn.LSTM's (h, c), each (L, B, H) -> per-layer lists: hq int8 and c fp32."""
        h, c = state
        return [quantize_h(x) for x in h], [x.float().contiguous() for x in c]

    def state_out(self, state):
        """The inverse of `state_in`: nn.LSTM's (h, c), each (L, B, H) fp32; `state_in` of it
        gives back the same int8 state."""
        h, c = state
        return torch.stack([x.float() / 127 for x in h]), torch.stack(c)

    def __call__(self, ids: torch.Tensor, state):
        H, L = self.H, len(self.w)
        hs, cs = ([x.contiguous() for x in part] for part in state)  # the kernel reads rows densely
        B = ids.shape[0]
        ids = ids.to(torch.int64).contiguous()
        new_h = [torch.empty(B, H, dtype=torch.int8) for _ in range(L)]
        new_c = [torch.empty(B, H) for _ in range(L)]
        logits = torch.empty(B, self.V)
        step = self._step_amx if self.amx else self._step_torch
        bad = step(self._scratch(B), B, ids, hs, cs, new_h, new_c, logits)
        if bad:
            raise IndexError(f"{bad} of {B} ids are outside the vocabulary (0..{self.table.shape[0] - 1})")
        return logits, (new_h, new_c)

    def draw(self, last: torch.Tensor, rc: RowControls, steps: torch.Tensor) -> torch.Tensor:
        """`sampling.sample_next`'s ids by its rule, in one native call where no row filters
        (top-k, top-p); its softmax, cumsum and search were a fifth of an int8 step's time."""
        if rc.filtered:
            return sample_next(last, rc, steps)
        # As the kernel reads them (held here while it runs): float32, bool bytes, int64 counters
        last, u, temp = (x.float().contiguous() for x in (last, rc.uniforms, rc.temp))
        greedy, steps = rc.greedy.bool().contiguous(), steps.to(torch.int64).contiguous()
        out = torch.empty(last.shape[0], dtype=torch.int64)
        self.lib.sample_rows(last.shape[0], last.shape[1], last.data_ptr(), temp.data_ptr(),
                             greedy.data_ptr(), u.data_ptr(), u.shape[1], steps.data_ptr(),
                             out.data_ptr())
        return out

    def _scratch(self, B: int) -> SimpleNamespace:
        """This thread's buffers for B rows rounded up to 32 (the AMX kernel's row blocks; the
        prefill's shrinking batches then share one set)."""
        per = self._local.__dict__.setdefault("by_rows", {})
        rows = _round_up(B, 32)
        if rows not in per:
            if len(per) > 8:  # a Serve engine's batch size wanders; keep the memory bounded
                per.clear()
            H, L, pad = self.H, len(self.w), (_round_up if self.amx else lambda n, m: n)
            s = per[rows] = SimpleNamespace(
                x0=torch.zeros(rows, pad(H, 64), dtype=torch.int8),  # layer 0's (AMX: and the head's) input
                xh=torch.zeros(rows, pad(2 * H, 64), dtype=torch.int8),  # a later layer's [x, h]
                acc=torch.empty(rows, pad(4 * H, 32), dtype=torch.int32),  # a layer's sums
                head_acc=torch.empty(rows, pad(self.V, 32), dtype=torch.int32))  # the head's
            if self.amx:
                s.states = [(ctypes.c_void_p * L)() for _ in range(4)]  # h, c in; h, c out
                s.args = native.StepArgs(
                    H=H, L=L, ub=self.ub, V=self.V, K0=s.x0.shape[1], K1=s.xh.shape[1],
                    N=s.acc.shape[1], NV=s.head_acc.shape[1], n_ids=self.table.shape[0],
                    w=ctypes.addressof(self._ptrs[0]), scale=ctypes.addressof(self._ptrs[1]),
                    base=ctypes.addressof(self._ptrs[2]), head_bias=self.head_b.data_ptr(),
                    x0=s.x0.data_ptr(), xh=s.xh.data_ptr(), acc=s.acc.data_ptr(),
                    head_acc=s.head_acc.data_ptr(), h_in=ctypes.addressof(s.states[0]),
                    c_in=ctypes.addressof(s.states[1]), h_out=ctypes.addressof(s.states[2]),
                    c_out=ctypes.addressof(s.states[3]))
        return per[rows]

    def _step_amx(self, s, B, ids, hs, cs, new_h, new_c, logits) -> int:
        """The whole step in one native call (csrc/lstm_int8.c, lstm_step_amx)."""
        a = s.args
        a.B, a.ids, a.logits = B, ids.data_ptr(), logits.data_ptr()
        a.threads = self.threads
        for ptrs, tensors in zip(s.states, (hs, cs, new_h, new_c)):
            for i, t in enumerate(tensors):
                ptrs[i] = t.data_ptr()
        return self.lib.lstm_step_amx(ctypes.byref(a))

    def _step_torch(self, s, B, ids, hs, cs, new_h, new_c, logits) -> int:
        """Per layer torch._int_mm, then the native gate pass; then the head likewise."""
        H, L = self.H, len(self.w)
        xh, acc, head_acc = s.xh[:B], s.acc[:B], s.head_acc[:B]  # contiguous prefixes
        for layer in range(L):
            if layer == 0:
                x, base, rows, stride = hs[0], self.table, ids.data_ptr(), 4 * H
            else:
                xh[:, H: 2 * H].copy_(hs[layer])  # [x, h]: x was written by the layer below
                x, base, rows, stride = xh, self.b[layer], None, 0
            torch._int_mm(x, self.w[layer], out=acc)  # (B, 4H)
            up = xh.data_ptr() if layer + 1 < L else None  # the next layer's x
            bad = self.lib.lstm_layer_int8(
                B, H, self.ub, acc.data_ptr(), acc.shape[1], self.scale[layer].data_ptr(),
                base.data_ptr(), rows, self.table.shape[0], stride, cs[layer].data_ptr(),
                new_c[layer].data_ptr(), new_h[layer].data_ptr(), H, up, xh.shape[1])
            if bad:
                return bad
        torch._int_mm(new_h[-1], self.head_w, out=head_acc)  # (B, V)
        self.lib.dequantize(B, self.V, head_acc.data_ptr(), head_acc.shape[1],
                            self.head_scale.data_ptr(), self.head_b.data_ptr(), logits.data_ptr())
        return 0


def _pointers(tensors) -> ctypes.Array:
    return (ctypes.c_void_p * len(tensors))(*(t.data_ptr() for t in tensors))
