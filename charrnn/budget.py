"""`train.max_minutes`: the training time one invocation of `jobs/train.py` may spend.

The budget belongs to the invocation, not to an attempt: when Ray Train restarts the worker group
after a failure, the new attempt resumes from a checkpoint that says how much of the budget the
invocation had used (`used_s`), and goes on from there. The LR schedule's time progress
(`optim.lr_factor`) reads the same clock, so a restart does not send the LR back up. Ranks agree
on the time (an all-reduced mean), so they agree on the LR and on when to stop.
"""

from __future__ import annotations

import time
from collections.abc import Callable


class TimeBudget:
    def __init__(self, max_minutes: float):
        self.limit_s = max_minutes * 60  # 0: no limit
        self.before_s = 0.0  # used by this invocation's earlier attempts (restored)
        self.synced_s = 0.0  # used so far, averaged over ranks: drives the LR and the stop
        self.t0 = time.monotonic()

    def start(self) -> None:
        """This attempt starts training now."""
        self.t0 = time.monotonic()

    def restore(self, used_s: float) -> None:
        """Resuming within the same invocation: its earlier attempts used `used_s`."""
        self.before_s = self.synced_s = used_s

    def attempt_s(self) -> float:
        """This attempt's training time on this rank."""
        return time.monotonic() - self.t0

    def used_s(self) -> float:
        """The invocation's training time on this rank (what a checkpoint records)."""
        return self.before_s + self.attempt_s()

    def sync(self, all_reduce_sum: Callable[[list[float]], list[float]], world: int) -> bool:
        """All ranks: agree on the time used; True once it is over the limit."""
        self.synced_s = self.before_s + all_reduce_sum([self.attempt_s()])[0] / world
        return bool(self.limit_s) and self.synced_s > self.limit_s

    def progress(self) -> float:
        """Share of the limit used (0 without a limit); the same on every rank."""
        return self.synced_s / self.limit_s if self.limit_s else 0.0

    def left_s(self) -> float | None:
        """Seconds left of the limit on this rank's clock; None without a limit."""
        return max(0.0, self.limit_s - self.used_s()) if self.limit_s else None
