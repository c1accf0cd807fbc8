"""Generation target: 64 prompts x 1,000 characters in one stateful batch is >= 1,000x faster
than the tutorial's method (argmax, re-running the 100-character window for each new
character, batch 1) on the same checkpoint, both measured in this one run.

The tutorial's method is timed on `--baseline-chars` characters (it runs ~100x more LSTM steps
per character); rates are characters per second.

    python bench/generation.py [--checkpoint runs/demo/winner.json] [--device auto]

Both methods run on `--device` (default: a GPU when one is visible); each is warmed up first,
so neither pays for kernel selection or cuDNN's set-up inside its timing. The batch is timed
with its steps in fp32, in bf16 and, on CPU, in int8 (`charrnn/quantized.py`); with
`--checkpoint`, each precision's held-out loss is scored too (`--eval-chars`), so the speed of
each comes with what it costs in quality.
"""

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from argtypes import at_least, load_checkpoint  # bench/, first on sys.path when a script runs

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from charrnn.generate import generate, pick_device  # noqa: E402
from charrnn.model import CharRNN, ModelConfig  # noqa: E402
from charrnn.sampling import SampleParams  # noqa: E402
from charrnn.stepper import cpu_threads, make_stepper  # noqa: E402
from charrnn.vocab import Vocab  # noqa: E402


def precisions(device: str) -> list[tuple[str, torch.dtype]]:
    """The step precisions timed: fp32 and bf16; int8 (`charrnn/quantized.py`) on CPU, where a C
    compiler is found to build its kernel."""
    from charrnn import native
    out = [("fp32", torch.float32), ("bf16", torch.bfloat16)]
    if device == "cpu" and native.compiler() is not None:
        out.append(("int8", torch.int8))
    return out


def held_out_losses(loaded, dtypes, max_chars: int, device: str) -> dict:
    """Next-character loss (nats/char) over the checkpoint's held-out text, teacher forced
    through each precision's step (64 streams, the state carried): what each costs in quality."""
    from charrnn.corpus import load_text
    from charrnn.errors import CharrnnError
    try:
        text = load_text(loaded.config.data)
    except CharrnnError as e:
        return {"skipped": str(e)}
    ids = torch.from_numpy(loaded.vocab.encode(text).astype(np.int64))
    held = ids[len(ids) - round(len(ids) * loaded.config.data.val_fraction):]
    streams = 64
    T = min(len(held) // streams, max(2, max_chars // streams))
    x = held[: streams * T].view(streams, T).to(device)  # (64, T)
    L, H = loaded.config.model.num_layers, loaded.config.model.hidden_size
    out = {"chars": streams * (T - 1)}
    with torch.inference_mode():
        for name, dtype in dtypes:
            step = make_stepper(loaded.model, dtype)
            state = step.state_in((torch.zeros(L, streams, H, device=device),) * 2)
            nll = torch.zeros((), device=device)
            for t in range(T - 1):
                logits, state = step(x[:, t], state)
                nll += F.cross_entropy(logits.float(), x[:, t + 1], reduction="sum")
            out[name] = round(float(nll) / (streams * (T - 1)), 4)
    return out


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


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--checkpoint", help="checkpoint URI (default: an untrained alice-sized model)")
    ap.add_argument("--prompts", type=at_least(1), default=64)
    ap.add_argument("--chars", type=at_least(1), default=1000)
    ap.add_argument("--baseline-chars", type=at_least(1), default=300)
    ap.add_argument("--device", default="auto", help="auto (cuda when visible), cpu, cuda or cuda:N")
    ap.add_argument("--eval-chars", type=at_least(128), default=40_000,
                    help="held-out characters scored per precision (with --checkpoint)")
    ap.add_argument("--out", default=str(ROOT / "bench/results/generation.json"))
    args = ap.parse_args()
    try:
        device = pick_device(args.device)
    except ValueError as e:
        ap.error(f"argument --device: {e}")
    if args.checkpoint:
        loaded = load_checkpoint(ap, args.checkpoint)
        model, vocab, window = loaded.model, loaded.vocab, loaded.config.data.seq_len
    else:  # speed does not depend on the weights: the alice.yaml architecture, 45 characters
        vocab = Vocab.from_text("\n !\"'(),-.:;?[]_abcdefghijklmnopqrstuvwxyz*0`")
        model = CharRNN(ModelConfig(vocab_size=len(vocab), hidden_size=256, num_layers=2)).eval()
        window = 100
    model = model.to(device)
    prompt = ("alice was beginning to get very tired of sitting by her sister on the bank, "
              "and of having nothing to do")[:window]
    prompts = [prompt[: window - (i % 7)] for i in range(args.prompts)]  # mixed lengths

    rates, threads = {}, torch.get_num_threads()
    for name, dtype in precisions(device):
        # Threads as jobs/generate.py sets them (int8: the kernel's own, torch's kept to one);
        # the step is built (int8: quantised, packed) before the timing, as a Generator does.
        step = make_stepper(model, dtype, cpu_threads(name, threads))
        generate(model, vocab, prompts[:2], SampleParams(20, seed=1), device, dtype, stepper=step)
        t = time.perf_counter()  # generate returns text: its device work is done when it returns
        out = generate(model, vocab, prompts, SampleParams(args.chars, temperature=0.8, seed=1),
                       device, dtype, stepper=step)
        secs = time.perf_counter() - t
        rates[name] = (secs, args.prompts * args.chars / secs)
        assert all(len(o) == args.chars for o in out)
    torch.set_num_threads(threads)

    generate_window_rerun(model, vocab, prompt, 5, window, device)  # warm-up
    t = time.perf_counter()  # each character's argmax is read on the host: no sync needed
    generate_window_rerun(model, vocab, prompt, args.baseline_chars, window, device)
    base_s = time.perf_counter() - t
    base_rate = args.baseline_chars / base_s

    result = {"prompts": args.prompts, "chars_per_prompt": args.chars,
              "tutorial_chars_measured": args.baseline_chars,
              "tutorial_chars_per_s": round(base_rate, 1),
              "tutorial_seconds_for_same_work": round(args.prompts * args.chars / base_rate, 1),
              "threads": torch.get_num_threads(),
              "device": torch.cuda.get_device_name(device) if device.startswith("cuda") else "cpu",
              "checkpoint": args.checkpoint or "untrained alice-sized model"}
    for name, (secs, rate) in rates.items():
        result[f"batched_{name}_seconds"] = round(secs, 3)
        result[f"batched_{name}_chars_per_s"] = round(rate)
        result[f"speedup_{name}"] = round(rate / base_rate, 1)
    if args.checkpoint:
        result["held_out_loss"] = held_out_losses(loaded, precisions(device), args.eval_chars, device)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
