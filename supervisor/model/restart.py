"""When to restart a crashed worker, and when a program has crashed too often (FATAL). Pure.

Backoff doubles with each crash of the same worker in a row (0.1, 0.2, 0.4 ... 30 s) and starts
over (at 0 s) for a worker that ran STABLE_AFTER seconds. A program whose workers crashed `crash_limit` times
within `crash_window` seconds is FATAL: no more restarts until a reload or `start`, while its
healthy workers keep serving.
"""

from __future__ import annotations

import collections
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

FIRST_DELAY = 0.1
MAX_DELAY = 30.0
STABLE_AFTER = 10.0


@dataclass(frozen=True)
class Restart:
    """Start the slot's worker again `after` seconds from now."""

    after: float
    restarts: int  # consecutive restarts of this worker, the new one included
    crashes: int  # crashes of the program within the window


@dataclass(frozen=True)
class Fatal:
    """The program crashed too often: no more restarts."""

    why: str
    crashes: int


Decision = Restart | Fatal


@dataclass
class CrashHistory:
    """Crash times of one program's workers (monotonic seconds)."""

    limit: int
    window: float
    times: collections.deque[float] = field(default_factory=collections.deque)

    def record(self, now: float, ran: float, restarts: int) -> Decision:
        """A worker crashed at `now` after running `ran` seconds, having been restarted `restarts` times."""
        self.times.append(now)
        while self.times and self.times[0] <= now - self.window:
            self.times.popleft()
        consecutive = 0 if ran >= STABLE_AFTER else restarts + 1
        if len(self.times) >= self.limit:
            return Fatal(f"{len(self.times)} crashes within {self.window:g} s", len(self.times))
        delay = 0.0 if consecutive == 0 else min(FIRST_DELAY * 2 ** (consecutive - 1), MAX_DELAY)
        return Restart(delay, consecutive, len(self.times))

    def to_json(self) -> dict[str, Any]:
        return {"limit": self.limit, "window": self.window, "times": list(self.times)}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> CrashHistory:
        return cls(data["limit"], data["window"], collections.deque(data["times"]))
