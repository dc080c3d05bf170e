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
from typing import Any

import structlog

from supervisor import config as config_module
from supervisor import migrate, preflight, tls
from supervisor.config import Config
from supervisor.errors import ControlError, MigrateError
from supervisor.generation import Generation
from supervisor.listeners import Listener
from supervisor.plan import ReloadPlan
from supervisor.reply import Reply
from supervisor.worker import Worker, WorkerState

log = structlog.get_logger()


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

    def report(self, retired: list[Generation], shut: int, migrated: int, queued: int) -> tuple[str, dict[str, Any]]:
        """The final answer of a reload that committed: a line for people, data for --json."""
        elapsed = round((time.monotonic() - self.started) * 1000)
        generations = {g.program.name: g.number for g in self.generations}
        log.info("reload_done", ms=elapsed, listeners_closed=shut, migrated=migrated, queued=queued,
                 generations=generations)
        summary = f"{self.label} done in {elapsed} ms: {shut} old listeners closed, {migrated} connections migrated"
        return summary, {"generations": generations, "retired": {g.program.name: g.number for g in retired},
                         "listeners_closed": shut, "migrated": migrated, "queued": queued, "ms": elapsed}

    def cancel_timers(self) -> None:
        for timer in self.timers:
            timer.cancel()
        self.timers.clear()


SWITCH_DRAIN = 0.02  # seconds between steering new connections away from old listeners and shutting them


@dataclass(eq=False)
class Switch:
    """A committed reload between steering new connections to its generations and shutting the old."""

    reload: Reload
    retired: list[Generation]  # the generations it replaces, listeners still open
    fresh: list[Listener]  # its generations' listeners, where new connections go
    steered: list[Listener]  # one per group with a steering program, to detach it after
    before: migrate.Counters  # the kernel's counters before any old listener was shut
    queued: int  # connections waiting in the old listeners when it committed


def check(config: Config, reply: Reply, only: str | None = None) -> dict[str, tls.Bundle]:
    """Check `config` (or its program `only`) against the system; raise the problems, say the warnings."""
    report = preflight.check(config, only)
    if report.problems:
        raise ControlError("; ".join(report.problems))
    for warning in report.warnings:
        log.warning("preflight_warning", warning=warning)
        reply.progress(f"warning: {warning}")
    return report.bundles


def load_new_config(current: Config, reply: Reply) -> tuple[Config, dict[str, tls.Bundle]]:
    """Step 1 of a reload: the config file read and checked again. Raises the user's error (ConfigError,
    ControlError, MigrateError); nothing has changed then."""
    config = config_module.load(current.path)
    bundles = check(config, reply)
    if config.control != current.control:
        reply.progress("control socket settings changed: they apply after a restart")
    if config.migrate != current.migrate:
        # Applied at the commit, once the new generations serve: a rollback leaves it as it was.
        # `require` is checked now, so a reload that could not honour it starts nothing.
        if problem := preflight.migration_problem(config.migrate):
            raise MigrateError(problem)
        reply.progress(f"migrate: {current.migrate.value} -> {config.migrate.value} once the new generation serves")
    return config, bundles


def stderr_tail(w: Worker, whose: str = "") -> str:
    """The worker's last stderr lines, for the reason of a rollback."""
    tail = "".join(f"\n  {line}" for line in list(w.tail)[-10:])
    return f"; last stderr lines{whose}:{tail}" if tail else ""
