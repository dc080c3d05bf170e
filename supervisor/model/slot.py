"""A worker slot: one worker index of a generation, the worker in it and what happened to it.

Crash restarts with backoff, FATAL and zero-loss recycling are operations on a slot; the master
applies what they decide (start a worker after a delay, retire the one that was replaced).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from supervisor.model.restart import CrashHistory, Decision, Restart
from supervisor.process.worker import Worker, WorkerState

RECYCLE_RETRY = 10.0  # after a replacement failed to get ready, leave the old worker this long
SPAWN_RETRY = 10.0  # after a worker could not be started at all


@dataclass(eq=False)
class Slot:
    index: int
    worker: Worker | None = None  # None after a crash, until the restart
    replacement: Worker | None = None  # recycling: takes over once ready, then the old one retires
    restarts: int = 0  # crash restarts of this slot (what `status` shows; the program's sum is the metric's)
    streak: int = 0  # of them, those in a row (each within STABLE_AFTER of its start): the backoff's count
    last_exit: str | None = None  # how the worker before the current one ended (a crash)
    recycle_after: float = 0.0  # after a failed replacement, no new one before this time
    restart_at: float | None = None  # an empty slot gets a worker again at this time

    def workers(self) -> list[Worker]:
        return [w for w in (self.worker, self.replacement) if w is not None]

    def holds(self, w: Worker) -> bool:
        return w is self.worker or w is self.replacement

    @property
    def active(self) -> bool:
        """A worker is in the slot and not on its way out (an empty slot waits for its restart)."""
        return self.worker is not None and self.worker.alive and self.worker.state is not WorkerState.RETIRING

    def crashed(self, w: Worker, now: float, history: CrashHistory) -> Decision:
        """The slot's worker ended unasked: restart it after a backoff, or the program is FATAL."""
        self.worker = None
        self.last_exit = w.describe_exit()
        decision = history.record(now, now - w.started, self.streak)
        if isinstance(decision, Restart):
            self.restarts += 1
            self.streak = decision.restarts
            self.restart_at = now + decision.after
        return decision

    def due(self, now: float) -> bool:
        """Empty, and its restart (or first start, after `scale`) is due."""
        return self.worker is None and self.restart_at is not None and now >= self.restart_at

    def filled(self, w: Worker | None, now: float) -> None:
        """A worker was started in the slot, or (None) could not be: then it is tried again later."""
        self.worker = w
        self.restart_at = None if w is not None else now + SPAWN_RETRY

    def wants_recycling(self, now: float) -> bool:
        w = self.worker
        return (w is not None and w.state is WorkerState.READY and self.replacement is None
                and now >= self.recycle_after)

    def recycle_reason(self, max_rss: int | None, max_age: float | None, now: float) -> str | None:
        """Why the slot's worker should be replaced now (max_age, max_rss), or None."""
        w = self.worker
        if w is None:
            return None
        if max_age is not None and now - w.started > max_age:
            return f"age {now - w.started:.0f} s > max_age {max_age:g} s"
        if max_rss is not None and (rss := w.rss()) is not None and rss > max_rss:
            return f"rss {rss >> 20} MiB > max_rss {max_rss >> 20} MiB"
        return None

    def replacement_failed(self, now: float) -> None:
        """The replacement ended before it was ready: the old worker serves on, retried later."""
        self.replacement = None
        self.recycle_after = now + RECYCLE_RETRY

    def replacement_ready(self) -> Worker | None:
        """The replacement serves: it takes the slot; returns the old worker, to be retired."""
        old, self.worker, self.replacement = self.worker, self.replacement, None
        return old

    def to_json(self) -> dict[str, Any]:
        return {"index": self.index, "worker": self.worker.to_json() if self.worker else None,
                "replacement": self.replacement.to_json() if self.replacement else None,
                "restarts": self.restarts, "streak": self.streak, "last_exit": self.last_exit,
                "recycle_after": self.recycle_after,
                "restart_at": self.restart_at}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Slot:
        def worker(key: str) -> Worker | None:
            return Worker.from_json(data[key]) if data[key] is not None else None
        # A state written before `streak` existed: its `restarts` counted the streak.
        return cls(index=data["index"], worker=worker("worker"), replacement=worker("replacement"),
                   restarts=data["restarts"], streak=data.get("streak", data["restarts"]),
                   last_exit=data["last_exit"],
                   recycle_after=data["recycle_after"],
                   restart_at=data["restart_at"])
