"""When retiring listeners may be shut: the three ways a reload ends an old listener.

New connections are first steered to the listeners that stay (system/steer.py). Then:
- **migrated**: with `net.ipv4.tcp_migrate_req=1` the old listeners are shut `SWITCH_DRAIN` later,
  or at once when the kernel holds no handshake in flight on their ports (system/handshakes.py);
  the kernel moves whatever still waits in them to the listeners that stay.
- **drained**: without the sysctl (`migrate: drain`, or `prefer` where it cannot be set) a shut
  would reset whatever waits. The old workers, not told to stop yet, keep accepting; the listeners
  are shut once their accept queues have read empty for `DRAIN_GRACE` without a break (a handshake
  the old listener had answered before the steering completes within a round trip and lands in its
  queue: the grace covers round trips up to that long). `drain_timeout` bounds it: a worker that
  stopped accepting cannot hold a reload; what its queue still held is counted as dropped.
- **reset**: `migrate: off` with the sysctl at 0: shut as when migrated, what waits is reset.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass

from supervisor.model.generation import Generation
from supervisor.process.worker import Worker
from supervisor.system.listeners import Listener

SWITCH_DRAIN = 0.02  # seconds between steering new connections away from old listeners and shutting them
DRAIN_POLL = 0.01  # seconds between looks at the queues of listeners being drained
DRAIN_GRACE = 0.25  # seconds their queues must read empty, without a break, before they are shut
SLACK = 0.001  # a timer may fire this early (a loop's clock, float sums): due all the same


class Way(enum.Enum):
    MIGRATED = "migrated"
    DRAINED = "drained"
    RESET = "reset"


@dataclass(frozen=True)
class Wait:
    seconds: float


@dataclass(frozen=True)
class Shut:
    dropped: int  # connections still queued in the drained listeners (reset by the shut); 0 when migrating


@dataclass
class Drain:
    """One retirement's wait between the steering and the shut."""

    way: Way
    started: float
    timeout: float = 0.0  # drained: the longest wait
    empty_since: float | None = None
    waiting: int = 0  # drained: the most connections seen queued in the old listeners
    ended: float | None = None

    def next(self, now: float, queued: int, in_flight: Callable[[], bool] = lambda: True) -> Wait | Shut:
        """What to do `now`, with `queued` connections waiting in the retiring listeners. `in_flight`:
        whether a handshake may still be completing on them (asked only when it decides: a shut
        before `SWITCH_DRAIN` is safe when none is)."""
        if self.way is not Way.DRAINED:
            if now - self.started >= SWITCH_DRAIN - SLACK or not in_flight():
                return self._end(now, 0)
            return Wait(self.started + SWITCH_DRAIN - now)
        self.waiting = max(self.waiting, queued)
        if queued:
            self.empty_since = None
        elif self.empty_since is None:
            self.empty_since = now
        if self.empty_since is not None and now - self.empty_since >= DRAIN_GRACE - SLACK:
            return self._end(now, 0)
        if now - self.started >= self.timeout - SLACK:
            return self._end(now, queued)
        return Wait(DRAIN_POLL)

    def cut(self, now: float, queued: int) -> Shut:
        """Shut now, drained or not (supervisord is stopping): what still waits in drained listeners is dropped."""
        return self._end(now, queued if self.way is Way.DRAINED else 0)

    def _end(self, now: float, dropped: int) -> Shut:
        self.ended = now
        return Shut(dropped)

    @property
    def ms(self) -> int:
        return round(((self.ended or self.started) - self.started) * 1000)


def way(drains: bool, migrating: bool) -> Way:
    """How retiring listeners end under the master's migration status."""
    if drains:
        return Way.DRAINED
    return Way.MIGRATED if migrating else Way.RESET


@dataclass(eq=False)
class Departure:
    """Workers leaving a serving generation (scale down, recycled) whose listeners are drained first."""

    gen: Generation
    workers: list[Worker]
    steered: list[Listener]  # one member per group whose new connections go to the staying listeners
    drain: Drain


class Departures:
    """The departures in progress, by the number their `LeaveDue` events carry."""

    def __init__(self) -> None:
        self.pending: dict[int, Departure] = {}
        self.next_id = 1

    def add(self, departure: Departure) -> int:
        self.pending[self.next_id] = departure
        self.next_id += 1
        return self.next_id - 1
