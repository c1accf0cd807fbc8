"""What every entry point in `jobs/` shares: user errors as one line, Ctrl-C as a clean exit."""

from __future__ import annotations

import sys
from collections.abc import Callable

from charrnn.errors import CharrnnError, Interrupted


def run_cli(main: Callable[[], int]) -> int:
    try:
        return main()
    except CharrnnError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except Interrupted as e:
        print(f"interrupted: {e}", file=sys.stderr)
        return 130
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
