"""A generation: one start of a program under one config snapshot, its workers and their listeners.

Lifecycle: `STARTING -> SERVING -> RETIRING -> RETIRED`, or `STARTING -> ROLLED_BACK`.
Invariants:
- a generation only retires once its successor is SERVING, so the group always has listeners
  with live workers behind them (except on stop/shutdown, where that is the point);
- every listener of a generation is shut before its worker is told to stop (`stop_delay` later),
  so the kernel moves its queue to the remaining members instead of resetting it.
"""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field

import structlog

from supervisor import listeners, worker
from supervisor.config import Program
from supervisor.listeners import Listener
from supervisor.worker import Worker, WorkerState

log = structlog.get_logger()


class GenerationState(enum.Enum):
    STARTING = "starting"
    SERVING = "serving"
    RETIRING = "retiring"
    RETIRED = "retired"
    ROLLED_BACK = "rolled_back"


@dataclass(eq=False)
class Generation:
    """The workers of one program started together; replaced as a whole on reload."""

    program: Program
    number: int
    cwd: str
    notify_socket: str
    workers: list[Worker] = field(default_factory=list)
    state: GenerationState = GenerationState.STARTING
    started: float = field(default_factory=time.monotonic)
    ready_at: float | None = None
    size: int = 0  # workers wanted: the config's count, changed by scaling

    def __post_init__(self) -> None:
        self.size = self.size or self.program.workers

    @property
    def name(self) -> str:
        return f"{self.program.name}#{self.number}"

    def start(self) -> None:
        """Open every listener and spawn every worker; on error, undo what was done and raise."""
        try:
            for index in range(self.size):
                self.workers.append(self.spawn(index))
        except BaseException:
            self.rollback()
            raise

    def spawn(self, index: int, restarts: int = 0) -> Worker:
        """Start worker `index` on fresh listeners (they join the existing reuseport groups)."""
        socks: list[Listener] = []
        try:
            for n, listen in enumerate(self.program.listen):
                socks.append(listeners.open_listener(listen, f"{self.program.name}.{n}", self.program.backlog))
            proc = worker.spawn(self.program, self.number, index, socks, self.notify_socket, self.cwd)
        except BaseException:
            for sock in socks:
                listeners.close(sock)
            raise
        proc.restarts = restarts
        return proc

    @property
    def live_workers(self) -> list[Worker]:
        return [w for w in self.workers if w.alive]

    def active_slots(self) -> set[int]:
        """Worker indexes with a worker that is not on its way out."""
        return {w.index for w in self.workers if w.alive and w.state is not WorkerState.RETIRING}

    def all_ready(self) -> bool:
        return bool(self.workers) and all(w.state is WorkerState.READY for w in self.workers)

    def mark_serving(self) -> None:
        self.state = GenerationState.SERVING
        self.ready_at = time.monotonic()

    def queued(self) -> int:
        """Connections waiting in this generation's accept queues (what a shut would migrate)."""
        total = 0
        for w in self.workers:
            for listener in w.listeners:
                if not listener.shut:
                    try:
                        total += listener.queued()
                    except OSError:
                        pass
        return total

    def retire(self) -> int:
        """Shut every listener at once and mark every worker retiring; returns the listeners shut.

        The master sends the stop signals afterwards (after `stop_delay`), so a worker that exits
        quickly never closes a listener that could still have received migrations.
        """
        self.state = GenerationState.RETIRING
        return self.shut_all()

    def shut_all(self) -> int:
        count = 0
        for w in self.workers:
            for listener in w.listeners:
                if not listener.shut:
                    listeners.shut(listener)
                    count += 1
        for w in self.workers:
            w.retire()
        return count

    def kill(self) -> None:
        for w in self.workers:
            w.kill()

    def rollback(self) -> list[Worker]:
        """Shut the listeners first (their queues migrate back to the serving generation).

        Workers not ready yet are killed; ready ones may hold accepted connections, so they are
        returned to be stopped as retiring workers are.
        """
        self.state = GenerationState.ROLLED_BACK
        starting = [w for w in self.workers if w.state is WorkerState.STARTING]
        self.shut_all()
        for w in starting:
            w.kill()
        return [w for w in self.workers if w.alive and w not in starting]

    def finished(self) -> bool:
        return not self.live_workers
