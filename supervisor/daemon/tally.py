"""What only the master sees and /metrics counts: reloads by result and way, drains (restarts: model/program.py)."""

from __future__ import annotations

from dataclasses import dataclass, field

RESULTS = ("done", "rolled_back", "refused")  # supervisor_reloads_total{result}
WAYS = ("migrated", "drained", "reset")  # supervisor_reload_retirements_total{way}
BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)  # seconds, supervisor_reload_duration_seconds


@dataclass
class Tally:
    """What only the master sees and /metrics counts; kept (a few integers) with or without `metrics:`."""

    reloads: dict[str, int] = field(default_factory=lambda: dict.fromkeys(RESULTS, 0))
    buckets: list[int] = field(default_factory=lambda: [0] * len(BUCKETS))  # reloads done within each bound
    seconds: float = 0.0  # the sum of their durations
    retirements: dict[str, int] = field(default_factory=lambda: dict.fromkeys(WAYS, 0))  # reloads by way
    dropped: int = 0  # connections still queued in drained listeners when drain_timeout passed
    drain_seconds: float = 0.0  # the sum of the drains' durations

    def reloaded(self, result: str, seconds: float | None = None) -> None:
        self.reloads[result] += 1
        if seconds is not None:
            self.seconds += seconds
            for i, bound in enumerate(BUCKETS):
                if seconds <= bound:
                    self.buckets[i] += 1

    def retired(self, way: str, dropped: int, drain_seconds: float, reload: bool = True) -> None:
        """Old listeners were shut: migrated, drained or reset (model/drain.py), by a reload (counted by
        way) or as workers left a generation (scale down, recycling: their drain only)."""
        if reload:
            self.retirements[way] += 1
        self.dropped += dropped
        if way == "drained":
            self.drain_seconds += drain_seconds
