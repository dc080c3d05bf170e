"""A reload, a `start` or the startup: new generations waiting to become ready, and what to do next.

The reload owns its generations, its timers and its reply. Readiness, worker exits and timeouts go
to it and come back as a decision the daemon applies (daemon/reloads.py): `Pending` (still waiting),
`Commit` (every new worker is ready: shut the old listeners), `RollBack(reason)`, and for a rolling
program `SwitchBatch` / `NextBatch`. Step 1 of a reload, the config read and checked again, is here
too (`load_new_config`): it decides whether a reload may begin at all.
"""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field
from typing import Any

import structlog

from supervisor.config import schema, tls
from supervisor.config.schema import Config, ReadyMode
from supervisor.errors import ControlError, MigrateError
from supervisor.model import preflight
from supervisor.model.drain import Drain, Way
from supervisor.model.generation import Generation
from supervisor.model.plan import ReloadPlan, select
from supervisor.model.roll import Roll, Timer
from supervisor.process.worker import Worker, WorkerState
from supervisor.protocol.reply import Reply
from supervisor.protocol.words import plural
from supervisor.system import migrate
from supervisor.system.listeners import Listener

log = structlog.get_logger()


class ReloadKind(enum.Enum):
    STARTUP = "startup"  # the first generations; failing ends supervisord
    RELOAD = "reload"  # supervisorctl reload, SIGHUP; systemd hears RELOADING=1 ... READY=1
    START = "start"  # supervisorctl start NAME
    RESTART = "restart"  # supervisorctl restart NAME: the settings as they run, the file not read


@dataclass(frozen=True)
class Pending:
    pass


@dataclass(frozen=True)
class Commit:
    pass


@dataclass(frozen=True)
class RollBack:
    reason: str


@dataclass(frozen=True)
class GiveUp:
    """At startup: this program's first generation cannot become ready. It alone is FATAL with
    `reason`; the other programs go on starting (a reload, by contrast, rolls back whole)."""

    gen: Generation
    reason: str


@dataclass(frozen=True)
class Serve:
    """At startup: this program's first generation is ready; it serves now, without waiting for the
    others (there is nothing to switch from)."""

    gen: Generation


@dataclass(frozen=True)
class SwitchBatch:
    """A rolling program's batch is ready: switch its slots to the new generation."""

    roll: Roll


@dataclass(frozen=True)
class NextBatch:
    """A rolling program's last batch is switched and its old workers have exited: start the next one."""

    roll: Roll


Decision = Pending | Commit | RollBack | GiveUp | Serve | SwitchBatch | NextBatch


@dataclass(eq=False)
class Reload:
    id: int
    kind: ReloadKind
    config: Config
    plan: ReloadPlan
    reply: Reply
    bundles: dict[str, tls.Bundle]  # program -> the certificate and key its new generation is given
    generations: list[Generation] = field(default_factory=list)
    rolls: dict[str, Roll] = field(default_factory=dict)  # program -> its roll (strategy: rolling)
    timers: list[Timer] = field(default_factory=list)
    # Draining (no migration): the serving listeners that new connections are steered to while the new
    # generations start, so that a rollback has nothing in the new listeners to lose; one per group.
    held: list[Listener] = field(default_factory=list)
    started: float = field(default_factory=time.monotonic)
    # When its steps ended (monotonic): "asked" (the request came, before the config was read),
    # "spawned" (every new worker asked for), "ready" (the Commit), for the report's `phases`.
    marks: dict[str, float] = field(default_factory=dict)
    served: list[Generation] = field(default_factory=list)  # startup: those that serve already (Serve)
    together: set[str] = field(default_factory=set)  # startup: programs that serve only at the Commit

    @property
    def since(self) -> float:
        """When its time counts from: the request came (before the config was read), else its start."""
        return self.marks.get("asked", self.started)

    @property
    def label(self) -> str:
        """For replies and logs: "reload", "start web" or "restart web"."""
        if self.kind in (ReloadKind.START, ReloadKind.RESTART):
            return f"{self.kind.value} {' '.join(p.name for p in self.plan.start)}"
        return "reload"

    def worker_ready(self) -> Decision:
        for roll in self.rolls.values():
            if roll.batch_ready():
                return SwitchBatch(roll)
            if roll.next_due():
                return NextBatch(roll)
        done = all(g.all_ready() for g in self.generations) and all(r.done for r in self.rolls.values())
        if done:
            return Commit()
        if self.kind is ReloadKind.STARTUP:
            ready = [g for g in self.generations if g.all_ready() and g.program.name not in self.together]
            if ready:
                return Serve(ready[0])
        return Pending()

    def worker_exited(self, gen: Generation, w: Worker) -> Decision:
        if gen not in self.generations:
            return Pending()
        how = f"(pid {w.pid}) {w.describe_exit()}" if w.forked else "was not forked"  # preload
        return self.failed(gen, f"{w.program}: generation {gen.number} worker {w.index} {how} before it was ready"
                           + stderr_tail(w, lines=20 if not w.forked else 10) + hint(w))

    def generation(self, program: str, number: int) -> Generation | None:
        return next((g for g in self.generations if g.program.name == program and g.number == number), None)

    def timed_out(self, program: str, number: int) -> Decision:
        """Generation `number` of `program` has had `ready_timeout` seconds since it (or its batch) started."""
        gen = self.generation(program, number)
        if gen is None or gen.all_ready():
            return Pending()
        workers = gen.workers
        ready = sum(w.state is WorkerState.READY for w in workers)
        quoted = next((w for w in workers if w.state is not WorkerState.READY and w.tail), None)
        return self.failed(gen, f"{gen.program.name}: generation {gen.number} not ready within "
                           f"{gen.program.ready_timeout:g} s ({ready} of {plural(len(workers), 'worker')} ready; "
                           f"{WAITED_FOR[gen.program.ready]})"
                           + (stderr_tail(quoted, f" of worker {quoted.index} (pid {quoted.pid})") if quoted else ""))

    def failed(self, gen: Generation, reason: str) -> Decision:
        """A new generation cannot become ready: at startup, while another program may still start,
        that program alone gives up; anywhere else the whole reload rolls back."""
        if self.kind is ReloadKind.STARTUP and (len(self.generations) > 1 or self.served):
            return GiveUp(gen, reason)
        return RollBack(reason)

    def report(self, retired: list[Generation], shut: int, migrated: int, queued: int, drain: Drain,
               dropped: int) -> tuple[str, dict[str, Any]]:
        """The final answer of a reload that committed: a line for people, data for --json. `drain`: how
        the old listeners ended (drain.Way); `dropped`: what they still held when shut without migration."""
        now = time.monotonic()
        elapsed = round((now - self.since) * 1000)
        generations = {g.program.name: g.number for g in [*self.served, *self.generations]}
        phases = self.phases(now)
        log.info("reload_done", ms=elapsed, listeners_closed=shut, migrated=migrated, queued=queued,
                 generations=generations, way=drain.way.value, drain_ms=drain.ms, dropped=dropped, phases=phases)
        summary = f"{self.label} done in {elapsed} ms: {plural(shut, 'old listener')} closed, "
        if not retired and not shut:  # a start, or a reload of programs that were not running
            summary = f"{self.label} done in {elapsed} ms: " + ", ".join(
                f"{name}#{number} serving" for name, number in generations.items())
        elif drain.way is Way.MIGRATED:
            summary += f"{plural(migrated, 'connection')} migrated"
        elif drain.way is Way.DRAINED and not shut:
            summary += "none left to drain"
        elif drain.way is Way.DRAINED:
            summary += (f"drained in {drain.ms} ms (up to {plural(drain.waiting, 'connection')} waited), "
                        f"{dropped} dropped")
            if dropped:
                summary += " (drain_timeout passed: their workers did not accept them)"
        else:
            summary += f"{plural(dropped, 'connection')} reset (migrate: off and the sysctl at 0)"
        return summary, {"generations": generations, "retired": {g.program.name: g.number for g in retired},
                         "listeners_closed": shut, "migrated": migrated, "queued": queued, "ms": elapsed,
                         "way": drain.way.value, "drain_ms": drain.ms, "dropped": dropped, "phases": phases}

    def phases(self, now: float) -> dict[str, float]:
        """Where its time went, in ms: `config` (read and checked: the first part of `ms`), `spawn` (the new
        workers asked for), `ready` (until the last was ready), `switch` (old listeners shut, the answer)."""
        marks = {"started": self.started, **self.marks, "done": now}
        steps = (("config", "asked", "started"), ("spawn", "started", "spawned"), ("ready", "spawned", "ready"),
                 ("switch", "ready", "done"))
        return {name: round((marks[end] - marks[begin]) * 1000, 1) for name, begin, end in steps
                if begin in marks and end in marks}

    def cancel_timers(self) -> None:
        for timer in self.timers:
            timer.cancel()
        self.timers.clear()


@dataclass(eq=False)
class Switch:
    """A committed reload between steering new connections to its generations and shutting the old."""

    reload: Reload
    retired: list[Generation]  # the generations it replaces, listeners still open
    fresh: list[Listener]  # its generations' listeners, where new connections go
    steered: list[Listener]  # one per group with a steering program, to detach it after
    before: migrate.Counters  # the kernel's counters before any old listener was shut
    queued: int  # connections waiting in the old listeners when it committed
    drain: Drain  # when the old listeners may be shut (model/drain.py)


def check(config: Config, reply: Reply, only: str | None = None) -> dict[str, tls.Bundle]:
    """Check `config` (or its program `only`) against the system; raise the problems, say the warnings."""
    report = preflight.check(config, only)
    if report.problems:
        raise ControlError("; ".join(report.problems))
    for warning in report.warnings:
        log.warning("preflight_warning", warning=warning)
        reply.progress(f"warning: {warning}")
    return report.bundles


def load_new_config(current: Config, reply: Reply, only: tuple[str, ...] = ()) -> tuple[Config, dict[str, tls.Bundle]]:
    """Step 1 of a reload: the config file read and checked again. Raises the user's error (ConfigError,
    ControlError, MigrateError); nothing has changed then. `only`: the reload of these programs, which
    takes only their settings from the file (plan.select)."""
    config = schema.load(current.path)
    if only:
        config = select(current, config, only)
        bundles: dict[str, tls.Bundle] = {}
        for name in only:
            bundles.update(check(config, reply, only=name))
        return config, bundles
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


# What a readiness timeout waited for, and what to change when the server cannot give it.
WAITED_FOR = {
    ReadyMode.NOTIFY: "ready: notify waits for each worker to send READY=1 to $NOTIFY_SOCKET; a server that "
                      "does not send it needs ready: accepting",
    ReadyMode.ACCEPTING: "ready: accepting waits for each worker to poll every listener it was given "
                         "(fds from 3, $LISTEN_FDS) and stay alive for settle s",
}
# A worker that binds its own socket instead of serving on the ones it was given fails like this.
ADDRESS_IN_USE = ("Address already in use", "[Errno 98]", "EADDRINUSE")


def hint(w: Worker) -> str:
    """What to change, where the worker's last words say what went wrong."""
    if any(marker in line for line in w.tail for marker in ADDRESS_IN_USE):
        return ("\nhint: the worker tried to bind an address itself; serve on the listening sockets it is "
                "given instead: fds 3 to 3+$LISTEN_FDS-1 (uvicorn --fd 3, gunicorn --bind fd://3, "
                "hypercorn --bind fd://3; docs/servers.md)")
    return ""


def stderr_tail(w: Worker, whose: str = "", lines: int = 10) -> str:
    """The worker's last stderr lines, for the reason of a rollback."""
    tail = "".join(f"\n  {line}" for line in list(w.tail)[-lines:])
    return f"; last stderr lines{whose}:{tail}" if tail else ""
