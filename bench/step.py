"""Where a generation step's time goes, and the ceiling that puts on the generation target.

Generation repeats one step per character (`charrnn/stepper.py`: a table lookup, one GEMM per
layer, the gate math, the head) and one draw (`charrnn/sampling.py`). This times, for `--rows`
rows and for one row, in fp32, bf16 and int8 (`charrnn/quantized.py`):
- the whole step and the draw, as `generate.py` runs them;
- each GEMM of the step alone (layer 0: `h @ W_hh` added to the looked-up input projection;
  later layers: `[x, h] @ [W_ih; W_hh]`; the head), whose sum no step built on them can beat;
- the rest of the step (the whole step less its GEMMs alone): gate math, table lookup,
  concatenation, Python, and what the GEMMs lose inside the step, where their weights and the
  gates share the caches.
It also times the tutorial's method (argmax, re-running the 100-character window per character,
batch 1) on the same checkpoint, and divides: the step's own ratio, and the GEMMs-alone ceiling.
Each timing is the median of `--rounds` rounds, the rounds of all timings interleaved, so a
drift of this machine's speed falls on all of them alike.

    python bench/step.py --checkpoint runs/demo/winner.json [--threads 1]
"""

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from argtypes import at_least, load_checkpoint  # bench/, first on sys.path when a script runs
from generation import generate_window_rerun, precisions

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from charrnn.sampling import RowControls, SampleParams  # noqa: E402
from charrnn.stepper import make_stepper  # noqa: E402


def step_timings(model, vocab_size: int, rows: int, dtype: torch.dtype) -> dict:
    """Callables, by name, each one part of a step for `rows` rows (random ids and state)."""
    st = make_stepper(model, dtype)
    if not st.fused:
        raise SystemExit("bench/step.py: the checkpoint is a GRU; only the fused LSTM step is timed")
    H, L = st.H, len(st.w)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab_size, (rows,), generator=g)
    state = st.state_in((torch.rand(L, rows, H, generator=g) * 2 - 1, torch.randn(L, rows, H, generator=g)))
    h = state[0]
    xh = torch.cat([h[0], h[0]], 1)  # (rows, 2H): a later layer's [x, h]
    last, _ = st(ids, state)  # (rows, V)
    rc = RowControls([SampleParams(1000, temperature=0.8, seed=i) for i in range(rows)], "cpu")
    drawn = torch.zeros(rows, dtype=torch.long)
    parts = {"step": lambda: st(ids, state), "draw": lambda: st.draw(last, rc, drawn)}
    if dtype == torch.int8 and st.amx:  # the step's own AMX GEMMs, on its padded scratch
        sc = st._scratch(rows)
        for name, x, w, out in [("gemm_layer0", sc.x0, st.packed[0], sc.acc),
                                *((f"gemm_layer{i}", sc.xh, st.packed[i], sc.acc) for i in range(1, L)),
                                ("gemm_head", sc.x0, st.packed[L], sc.head_acc)]:
            parts[name] = (lambda x=x, w=w, out=out: st.lib.amx_gemm(
                x.shape[0], out.shape[1], x.shape[1], x.data_ptr(), w.data_ptr(), out.data_ptr()))
        return parts
    if dtype == torch.int8:  # torch._int_mm into a reused buffer, as the step does without AMX
        acc = torch.empty(rows, 4 * H, dtype=torch.int32)
        head = torch.empty(rows, last.shape[1], dtype=torch.int32)
        parts["gemm_layer0"] = lambda: torch._int_mm(h[0], st.w[0], out=acc)
        for layer in range(1, L):
            parts[f"gemm_layer{layer}"] = (lambda w=st.w[layer]: torch._int_mm(xh, w, out=acc))
        parts["gemm_head"] = lambda: torch._int_mm(h[0], st.head_w, out=head)
        return parts
    looked_up = F.embedding(ids, st.table)  # (rows, 4H)
    parts["gemm_layer0"] = lambda: torch.addmm(looked_up, h[0], st.w[0])
    for layer in range(1, L):
        parts[f"gemm_layer{layer}"] = (lambda w=st.w[layer], b=st.b[layer]: torch.addmm(b, xh, w))
    parts["gemm_head"] = lambda: torch.addmm(st.head_b, h[0], st.head_w)
    return parts


def median_us(timings: dict, calls: int, rounds: int) -> dict:
    """Microseconds per call of each callable (same keys): the median of `rounds` interleaved
    rounds."""
    for fn in timings.values():  # warm-up: allocator, kernel selection
        for _ in range(20):
            fn()
    per = {name: [] for name in timings}
    for _ in range(rounds):
        for name, fn in timings.items():
            t = time.perf_counter()
            for _ in range(calls):
                fn()
            per[name].append((time.perf_counter() - t) / calls * 1e6)
    return {name: statistics.median(v) for name, v in per.items()}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", required=True, help="checkpoint URI (a winner.json, run or checkpoint)")
    ap.add_argument("--rows", type=at_least(1), default=64, help="rows stepped together (default 64)")
    ap.add_argument("--threads", type=at_least(0), default=0,
                    help="torch threads (0: torch's default; a Serve replica uses 1)")
    ap.add_argument("--calls", type=at_least(1), default=300, help="calls per round of each timing")
    ap.add_argument("--rounds", type=at_least(1), default=7)
    ap.add_argument("--baseline-chars", type=at_least(1), default=200)
    ap.add_argument("--out", default=str(ROOT / "bench/results/step.json"))
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    loaded = load_checkpoint(ap, args.checkpoint)
    model, vocab, window = loaded.model.eval(), loaded.vocab, loaded.config.data.seq_len

    dtypes = dict(precisions("cpu"))  # int8 where a C compiler builds its kernel
    with torch.inference_mode():
        timings = {}
        for dname, dtype in dtypes.items():
            for rows in dict.fromkeys((args.rows, 1)):
                for part, fn in step_timings(model, len(vocab), rows, dtype).items():
                    timings[(dname, rows, part)] = fn
        us = median_us(timings, args.calls, args.rounds)  # by (precision, rows, part)
    prompt = "alice was beginning to get very tired of sitting by her sister on the bank"
    generate_window_rerun(model, vocab, prompt, 5, window)  # warm-up
    t = time.perf_counter()
    generate_window_rerun(model, vocab, prompt, args.baseline_chars, window)
    tutorial = args.baseline_chars / (time.perf_counter() - t)

    result = {"checkpoint": args.checkpoint, "rows": args.rows, "threads": torch.get_num_threads(),
              "tutorial_chars_per_s": round(tutorial, 1)}
    rate = {}  # (precision, rows) -> characters/s of the step and the draw
    for dname in dtypes:
        for rows in dict.fromkeys((args.rows, 1)):
            part = {k[2]: v for k, v in us.items() if k[:2] == (dname, rows)}
            gemms = sum(v for k, v in part.items() if k.startswith("gemm"))
            rate[dname, rows] = rows / (part["step"] + part["draw"]) * 1e6
            result[f"{dname}_{rows}_rows"] = {
                **{f"{k}_us": round(v, 1) for k, v in part.items()},
                "gemms_alone_us": round(gemms, 1),
                "rest_of_step_us": round(part["step"] - gemms, 1),
                "chars_per_s": round(rate[dname, rows]),
                "ratio_to_tutorial": round(rate[dname, rows] / tutorial, 1),
                "gemms_alone_ceiling_ratio": round(rows / gemms * 1e6 / tutorial, 1)}
    for dname in dtypes:  # what batching a step gains per row, the bound on Serve's engine gain
        if args.rows > 1:
            result[f"{dname}_batching_gain"] = round(rate[dname, args.rows] / rate[dname, 1], 1)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
