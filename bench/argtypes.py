"""argparse types for the bench scripts: a count or amount outside its range is a one-line usage
error (`--baseline-chars 0` was a ZeroDivisionError after the whole batched run); so is a
`--checkpoint` that cannot be loaded (`load_checkpoint`)."""

import argparse
import math


def at_least(low: int):
    """An integer >= low."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be at least {low}, got {value}")
        return value
    return parse


def _number(text: str, zero_ok: bool) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not math.isfinite(value) or value < 0 or (value == 0 and not zero_ok):
        raise argparse.ArgumentTypeError(f"must be a number {'>=' if zero_ok else 'above'} 0, "
                                         f"got {text}")
    return value


def positive(text: str) -> float:
    """A finite number > 0."""
    return _number(text, zero_ok=False)


def non_negative(text: str) -> float:
    """A finite number >= 0."""
    return _number(text, zero_ok=True)


def load_checkpoint(ap: argparse.ArgumentParser, uri: str):
    """`charrnn.checkpoint.load(uri)`, or a one-line usage error naming `--checkpoint` (as
    jobs/generate.py gives) instead of a traceback."""
    from charrnn import checkpoint  # the scripts put the repository on sys.path before parsing
    from charrnn.errors import CharrnnError
    try:
        return checkpoint.load(uri)
    except CharrnnError as e:
        ap.error(f"argument --checkpoint: {e}")
