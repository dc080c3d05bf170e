"""A reload, a `start` or the startup: new generations waiting to become ready, and what to do next.

The reload owns its generations, its timers and its reply. Readiness, worker exits and timeouts go
to it and come back as a decision the master applies: `Pending` (still waiting), `Commit` (every
new worker is ready: shut the old listeners) or `RollBack(reason)`.
"""

from __future__ import annotations

import asyncio
import enum
import time
from dataclasses import dataclass, field

from supervisor import tls
from supervisor.config import Config
from supervisor.generation import Generation
from supervisor.plan import ReloadPlan
from supervisor.reply import Reply
from supervisor.worker import Worker, WorkerState


class ReloadKind(enum.Enum):
    STARTUP = "startup"  # the first generations; failing ends supervisord
    RELOAD = "reload"  # supervisorctl reload, SIGHUP; systemd hears RELOADING=1 ... READY=1
    START = "start"  # supervisorctl start NAME


@dataclass(frozen=True)
class Pending:
    pass


@dataclass(frozen=True)
class Commit:
    pass


@dataclass(frozen=True)
class RollBack:
    reason: str


Decision = Pending | Commit | RollBack


@dataclass(eq=False)
class Reload:
    id: int
    kind: ReloadKind
    config: Config
    plan: ReloadPlan
    reply: Reply
    bundles: dict[str, tls.Bundle]  # program -> the certificate and key its new generation is given
    generations: list[Generation] = field(default_factory=list)
    timers: list[asyncio.Handle] = field(default_factory=list)
    started: float = field(default_factory=time.monotonic)

    @property
    def label(self) -> str:
        """For replies and logs: "reload" or "start web"."""
        if self.kind is ReloadKind.START:
            return f"start {' '.join(p.name for p in self.plan.start)}"
        return "reload"

    def worker_ready(self) -> Decision:
        return Commit() if all(g.all_ready() for g in self.generations) else Pending()

    def worker_exited(self, gen: Generation, w: Worker) -> Decision:
        if gen not in self.generations:
            return Pending()
        return RollBack(f"{w.program}: generation {gen.number} worker {w.index} (pid {w.pid}) "
                        f"{w.describe_exit()} before it was ready" + stderr_tail(w))

    def timed_out(self, gen: Generation) -> Decision:
        """`gen` has had `ready_timeout` seconds since it started."""
        if gen not in self.generations or gen.all_ready():
            return Pending()
        workers = gen.workers
        ready = sum(w.state is WorkerState.READY for w in workers)
        quoted = next((w for w in workers if w.state is not WorkerState.READY and w.tail), None)
        return RollBack(f"{gen.program.name}: generation {gen.number} not ready within "
                        f"{gen.program.ready_timeout:g} s ({ready} of {len(workers)} workers ready)"
                        + (stderr_tail(quoted, f" of worker {quoted.index} (pid {quoted.pid})") if quoted else ""))

    def cancel_timers(self) -> None:
        for timer in self.timers:
            timer.cancel()
        self.timers.clear()


def stderr_tail(w: Worker, whose: str = "") -> str:
    """The worker's last stderr lines, for the reason of a rollback."""
    tail = "".join(f"\n  {line}" for line in list(w.tail)[-10:])
    return f"; last stderr lines{whose}:{tail}" if tail else ""
