"""Generate text from a trained checkpoint (offline), or through a running Serve endpoint.

    python jobs/generate.py --checkpoint runs/alice/winner.json --prompt "alice was" --seed 1
    python jobs/generate.py --checkpoint s3://bucket/runs/alice --prompts-file prompts.txt --format jsonl
    python jobs/generate.py --serve-url http://127.0.0.1:8000 --prompts-file prompts.txt --format jsonl
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from charrnn.cli import run_cli  # noqa: E402
from charrnn.errors import CharrnnError  # noqa: E402

# SampleParams fields -> the flags that set them (errors name what the user typed)
FLAGS = {"max_new_chars": "--max-chars", "temperature": "--temperature", "top_k": "--top-k",
         "top_p": "--top-p", "greedy": "--greedy", "seed": "--seed"}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--checkpoint", help="checkpoint dir, winner.json or run dir (local or s3://)")
    src.add_argument("--serve-url", help="base URL of a running charrnn Serve app")
    p.add_argument("--prompt", action="append", default=[], help="a prompt (repeatable)")
    p.add_argument("--prompts-file", help="one prompt per line, generated together (- reads stdin)")
    p.add_argument("--random-prompt", action="store_true",
                   help="start from a random slice of the training corpus (as the tutorial does)")
    p.add_argument("--corpus", help="corpus for --random-prompt (default: the checkpoint's)")
    p.add_argument("--max-chars", type=int, default=500,
                   help="characters to generate per prompt (default 500)")
    p.add_argument("--temperature", type=float, default=0.8,
                   help="sampling temperature (default 0.8; below 1e-5: greedy)")
    p.add_argument("--greedy", action="store_true", help="argmax decoding (the tutorial's)")
    p.add_argument("--top-k", type=int, default=0, help="sample among the k likeliest (0: off)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass in (0, 1]")
    p.add_argument("--seed", type=int, help="seed; prompt i uses seed + i (default: random)")
    p.add_argument("--oov", choices=["error", "drop", "replace"], default="error",
                   help="prompt characters outside the vocabulary: error (default), drop or "
                        "replace them with a space (the vocabulary's first character if it has none)")
    p.add_argument("--format", choices=["text", "jsonl"], default="text",
                   help="text (default: prompt + completion, '---' between prompts) or jsonl "
                        "(one object per prompt: prompt, completion, seed, run)")
    p.add_argument("--device", default="cpu", help="cpu (default), cuda, cuda:N or auto")
    p.add_argument("--precision", choices=["fp32", "bf16", "int8"], default="fp32",
                   help="per-character steps in fp32 (default), bf16 (faster where supported) or "
                        "int8 (CPU and LSTM only, the fastest there; needs a C compiler)")
    p.add_argument("--token", default=os.environ.get("CHARRNN_API_TOKEN"),
                   help="bearer token for --serve-url (default: $CHARRNN_API_TOKEN)")
    return p.parse_args(argv)


def read_prompts(args) -> list[str]:
    prompts = list(args.prompt)
    if args.prompts_file == "":  # was "give --prompt, --prompts-file or --random-prompt"
        raise CharrnnError("--prompts-file is empty: give a file, or - to read stdin")
    if args.prompts_file:
        name = "stdin" if args.prompts_file == "-" else args.prompts_file
        try:
            if args.prompts_file == "-":
                data = sys.stdin.buffer.read()
            else:
                with open(args.prompts_file, "rb") as f:
                    data = f.read()
        except OSError as e:
            raise CharrnnError(f"cannot read --prompts-file: {e.strerror}: {name}") from None
        # Decoded whole: a text-mode read named an offset within its 8 KiB chunk.
        from charrnn.corpus import BadByte, decode_utf8
        try:
            text = decode_utf8(data)
        except BadByte as e:
            raise CharrnnError(f"--prompts-file {name} is not UTF-8 text ({e.where()})") from None
        # Lines end in \n, \r\n or \r, as a text-mode read splits them.
        from_file = [line for line in re.split(r"\r\n|\r|\n", text) if line.strip()]
        if not from_file:
            raise CharrnnError(f"--prompts-file {name} has no prompts "
                               "(one per line; blank lines are skipped)")
        prompts += from_file
    return prompts


def main(argv=None) -> int:
    args = parse_args(argv)
    from charrnn.sampling import SampleParamError, SampleParams
    try:
        params = SampleParams(max_new_chars=args.max_chars, temperature=args.temperature,
                              top_k=args.top_k, top_p=args.top_p, greedy=args.greedy, seed=args.seed)
    except SampleParamError as e:
        raise CharrnnError(e.message(FLAGS)) from None
    prompts = read_prompts(args)
    if args.serve_url is not None:  # "" too: it is a bad URL, not "no --serve-url"
        if args.random_prompt or not prompts:
            raise CharrnnError("--serve-url needs --prompt or --prompts-file")
        from charrnn.client import iter_remote
        # Written as they come back, so a long batch that fails or is stopped keeps what it got.
        for i, (c, model) in enumerate(iter_remote(args.serve_url, prompts, params, args.token,
                                                   oov=args.oov)):
            write(args, i, prompts[i], c, model.get("run"))
        return 0
    from charrnn import checkpoint
    from charrnn.generate import Generator, pick_device
    from charrnn.stepper import cpu_threads
    try:
        device = pick_device(args.device)
    except ValueError as e:
        raise CharrnnError(f"--device: {e}") from None
    loaded = checkpoint.load(args.checkpoint, device)
    if args.random_prompt:
        from dataclasses import replace

        from charrnn.corpus import load_text
        from charrnn.data import random_prompt
        try:
            data = (replace(loaded.config.data, corpus=args.corpus) if args.corpus is not None
                    else loaded.config.data)
        except ValueError as e:
            raise CharrnnError(f"--corpus: {e}") from None
        try:
            text = load_text(data)
        except CharrnnError as e:
            hint = "" if args.corpus else " (the checkpoint's training corpus; --corpus names another)"
            raise CharrnnError(f"--random-prompt: {e}{hint}") from None
        prompts.append(random_prompt(text, data.seq_len, args.seed))
    if not prompts:
        raise CharrnnError("give --prompt, --prompts-file or --random-prompt")
    completions = Generator(loaded, device, args.precision, cpu_threads(args.precision)).complete(
        prompts, params, args.oov, progress=progress_line(len(prompts)))
    run = loaded.meta.get("run")
    # Written batch by batch, so a long run that is stopped keeps what it got.
    for i, (p, c) in enumerate(zip(prompts, completions)):
        write(args, i, p, c, run)
    return 0


def progress_line(n: int):
    """A `Generator.complete` progress that writes a line to stderr every 10 s (stdout carries
    the texts)."""
    import time

    from charrnn.runlog import Every, note
    started, every = time.monotonic(), Every(10.0)

    def progress(done: int, rows: int, steps: int, total: int) -> None:
        if every.due():
            rate = (done * total + rows * steps) / (time.monotonic() - started)
            if not rows:  # between batches
                where = f"{done:,} of {n:,} prompts done"
            else:
                which = f"{n:,} prompt(s)" if rows == n else f"prompts {done + 1:,}-{done + rows:,} of {n:,}"
                where = f"{steps:,} of {total:,} characters per prompt, {which}"
            note(f"  {where} ({rate:,.0f} chars/s)")
    return progress


def write(args: argparse.Namespace, i: int, prompt: str, completion: str, run: str | None) -> None:
    """Prompt i and its completion on stdout, in `--format`."""
    if args.format == "jsonl":
        seed = None if args.seed is None else args.seed + i
        out = json.dumps({"prompt": prompt, "completion": completion, "seed": seed, "run": run})
    else:
        out = ("\n---\n" if i else "") + prompt + completion
    try:
        print(out, flush=True)
    except BrokenPipeError:
        raise  # the reader left: `run_cli` ends quietly
    except OSError as e:  # `> out.txt` on a full disk
        from charrnn import runlog
        runlog.discard_stdout()
        raise CharrnnError(f"cannot write to stdout: {e.strerror}") from None


if __name__ == "__main__":
    sys.exit(run_cli(main, oom_hint="fewer prompts or a smaller --max-chars"))
