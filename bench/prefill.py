"""Prefill: reading Serve's largest request (64 prompts of 4,000 characters) in the small model
calls that `charrnn/generate.py` makes (`PREFILL_CHUNK` characters a row, `PREFILL_POSITIONS`
positions a call) against one call for all of them (as before session 18, for prompts of up to
4,096 characters). Each variant runs in its own process, so its peak RSS growth is its own. The
prompts are distinct passages of the book, each checked to be whole (passages cut short past the
book's end once made a prefill look twice as fast as it is).

    python bench/prefill.py --checkpoint runs/demo/winner.json [--corpus ../shared/data/wonderland.txt]
"""

import argparse
import dataclasses
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

from argtypes import at_least  # bench/, first on sys.path when a script runs

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

# (name, characters a row per call, positions per call); None: generate.py's own settings
VARIANTS = (("small calls (generate.py)", None, None), ("one call", 1 << 20, 1 << 30))


def measure(args) -> dict:
    """One variant in this process: the best of `--repeats` prefills of the prompts, and the peak
    RSS growth; and, for context, of the first prompt alone and of 100 characters of each."""
    import torch

    from charrnn import checkpoint, corpus, generate

    torch.set_num_threads(args.threads)
    if args.chunk:
        generate.PREFILL_CHUNK, generate.PREFILL_POSITIONS = args.chunk, args.positions
    loaded = checkpoint.load(args.checkpoint)
    model, vocab = loaded.model.eval(), loaded.vocab
    # The corpus cleaned as the model's was trained (`load_text`), then to its vocabulary.
    data = dataclasses.replace(loaded.config.data, corpus=args.corpus)
    text = vocab.clean(corpus.load_text(data), oov="drop")
    step = (len(text) - args.chars) // args.prompts
    prompts = [text[i * step: i * step + args.chars] for i in range(args.prompts)]
    if step <= 0 or any(len(p) != args.chars for p in prompts):
        sys.exit(f"error: {args.corpus} has {len(text):,} characters in the model's vocabulary, "
                 f"too few for {args.prompts} distinct prompts of {args.chars:,}")

    def timings(batch: list[str]) -> list[float]:  # seconds of each of `--repeats` prefills
        times = []
        with torch.inference_mode():
            for _ in range(args.repeats):
                t = time.perf_counter()
                generate.prefill(model, vocab, batch, "cpu")
                times.append(time.perf_counter() - t)
        return times

    # The small shapes first (they warm up too), so the peak RSS growth is the large one's.
    short = timings([p[:100] for p in prompts])  # 64 prompts of 100 characters
    one = timings(prompts[:1])  # one long prompt
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    times = timings(prompts)
    return {"seconds": round(min(times), 3), "all_seconds": [round(t, 3) for t in times],
            "peak_rss_growth_mb": (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss0) // 1024,
            "one_prompt_seconds": round(min(one), 3),
            f"{len(prompts)}_prompts_of_{min(100, args.chars)}_seconds": round(min(short), 3),
            "chunk": generate.PREFILL_CHUNK, "positions": generate.PREFILL_POSITIONS}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", required=True, help="checkpoint URI (a winner.json, run or checkpoint dir)")
    ap.add_argument("--corpus", default=str(ROOT.parent / "shared/data/wonderland.txt"))
    ap.add_argument("--prompts", type=at_least(1), default=64)
    ap.add_argument("--chars", type=at_least(1), default=4000)
    ap.add_argument("--threads", type=at_least(1), default=1, help="torch threads (a Serve replica: 1)")
    ap.add_argument("--repeats", type=at_least(1), default=3)
    ap.add_argument("--out", default=str(ROOT / "bench/results/prefill.json"))
    ap.add_argument("--chunk", type=int, default=0, help=argparse.SUPPRESS)  # a variant's process
    ap.add_argument("--positions", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--variant", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.variant:
        from charrnn.errors import CharrnnError
        try:
            print(json.dumps(measure(args)))
        except (CharrnnError, OSError) as e:  # a bad --checkpoint or --corpus: one line
            sys.exit(f"error: {e}")
        return
    result = {"prompts": args.prompts, "chars": args.chars, "threads": args.threads,
              "checkpoint": args.checkpoint, "variants": {}}
    for name, chunk, positions in VARIANTS:
        cmd = [sys.executable, __file__, "--variant", "--checkpoint", args.checkpoint,
               "--corpus", args.corpus, "--prompts", str(args.prompts), "--chars", str(args.chars),
               "--threads", str(args.threads), "--repeats", str(args.repeats)]
        if chunk:
            cmd += ["--chunk", str(chunk), "--positions", str(positions)]
        p = subprocess.run(cmd, stdout=subprocess.PIPE, text=True)  # its errors go to stderr
        if p.returncode:
            sys.exit(p.returncode)
        result["variants"][name] = json.loads(p.stdout.strip().splitlines()[-1])
        print(name, result["variants"][name], flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
