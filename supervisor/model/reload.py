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
from typing import TYPE_CHECKING, Any

import structlog

from supervisor.config import schema as config_module
from supervisor.config import tls
from supervisor.config.schema import Config, Strategy
from supervisor.daemon import events as ev
from supervisor.daemon import status, workers
from supervisor.errors import EXIT_FAILED, ControlError, MigrateError, SupervisorError
from supervisor.model import preflight
from supervisor.model import roll as rolling
from supervisor.model.generation import Generation
from supervisor.model.plan import ReloadPlan, plan_reload, select
from supervisor.model.program import ProgramRuntime, ProgramState, names
from supervisor.process.worker import Worker, WorkerState
from supervisor.protocol.reply import Reply
from supervisor.system import listeners, migrate
from supervisor.system.listeners import Listener

if TYPE_CHECKING:
    from supervisor.daemon.master import Master

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


@dataclass(frozen=True)
class SwitchBatch:
    """A rolling program's batch is ready: switch its slots to the new generation."""

    roll: rolling.Roll


@dataclass(frozen=True)
class NextBatch:
    """A rolling program's last batch is switched and its old workers have exited: start the next one."""

    roll: rolling.Roll


Decision = Pending | Commit | RollBack | SwitchBatch | NextBatch


@dataclass(eq=False)
class Reload:
    id: int
    kind: ReloadKind
    config: Config
    plan: ReloadPlan
    reply: Reply
    bundles: dict[str, tls.Bundle]  # program -> the certificate and key its new generation is given
    generations: list[Generation] = field(default_factory=list)
    rolls: dict[str, rolling.Roll] = field(default_factory=dict)  # program -> its roll (strategy: rolling)
    timers: list[asyncio.Handle] = field(default_factory=list)
    started: float = field(default_factory=time.monotonic)

    @property
    def label(self) -> str:
        """For replies and logs: "reload" or "start web"."""
        if self.kind is ReloadKind.START:
            return f"start {' '.join(p.name for p in self.plan.start)}"
        return "reload"

    def worker_ready(self) -> Decision:
        for roll in self.rolls.values():
            if roll.batch_ready():
                return SwitchBatch(roll)
            if roll.next_due():
                return NextBatch(roll)
        done = all(g.all_ready() for g in self.generations) and all(r.done for r in self.rolls.values())
        return Commit() if done else Pending()

    def worker_exited(self, gen: Generation, w: Worker) -> Decision:
        if gen not in self.generations:
            return Pending()
        how = f"(pid {w.pid}) {w.describe_exit()}" if w.forked else "was not forked"  # preload
        return RollBack(f"{w.program}: generation {gen.number} worker {w.index} {how} before it was ready"
                        + stderr_tail(w, lines=20 if not w.forked else 10))

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


def load_new_config(current: Config, reply: Reply, only: tuple[str, ...] = ()) -> tuple[Config, dict[str, tls.Bundle]]:
    """Step 1 of a reload: the config file read and checked again. Raises the user's error (ConfigError,
    ControlError, MigrateError); nothing has changed then. `only`: the reload of these programs, which
    takes only their settings from the file (plan.select)."""
    config = config_module.load(current.path)
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


def stderr_tail(w: Worker, whose: str = "", lines: int = 10) -> str:
    """The worker's last stderr lines, for the reason of a rollback."""
    tail = "".join(f"\n  {line}" for line in list(w.tail)[-lines:])
    return f"; last stderr lines{whose}:{tail}" if tail else ""


# -- as the master applies it ----------------------------------------------------------------------

def begin(master: Master, kind: ReloadKind, config: Config, reply: Reply, bundles: dict[str, tls.Bundle] | None,
          plan: ReloadPlan | None = None) -> None:
    plan = plan or plan_reload(config, names(master.programs, running=True), names(master.programs, by_hand=True))
    master.reload = reload = Reload(next(master.reload_ids), kind, config, plan, reply, bundles or {})
    for program in plan.start:
        record = master.programs.setdefault(program.name, ProgramRuntime(program.name))
        try:
            gen = Generation.create(program, record.next_number(), master.endpoints.runtime_dir,
                                    reload.bundles.get(program.name))
        except OSError as exc:
            return roll_back(master, f"{program.name}: tls: cannot copy the certificate and key for the workers: "
                                  f"{exc}")
        record.starting()
        reload.generations.append(gen)
        old = record.serving if record.state is ProgramState.RELOADING else None
        rolls = program.strategy is Strategy.ROLLING and old is not None
        reply.progress(f"{program.name}: generation {gen.number} " + (
            f"rolling in, {program.batch} worker{'s' if program.batch != 1 else ''} at a time" if rolls else
            f"starting {program.workers} worker{'s' if program.workers != 1 else ''}"))
        try:
            if rolls:
                assert old is not None
                reload.rolls[program.name] = rolling.Roll.of(old, gen)
                continue  # its batches start as the reload's decisions say (NextBatch), each timed on its own
            gen.start(master.spawner)
        except (OSError, SupervisorError) as exc:
            return roll_back(master, f"{program.name}: generation {gen.number}: {exc}")
        finally:
            for w in gen.workers:
                workers.watch_worker(master, w, gen)
        reload.timers.append(master.later(program.ready_timeout, ev.ReadyTimeout(reload.id, gen)))
    apply(master, reload.worker_ready())


def apply(master: Master, decision: Decision) -> None:
    if isinstance(decision, Commit):
        commit(master)
    elif isinstance(decision, RollBack):
        roll_back(master, decision.reason)
    elif isinstance(decision, SwitchBatch | NextBatch) and (reload := master.reload) is not None:
        try:
            if isinstance(decision, SwitchBatch):
                rolling.steer(master, reload, decision.roll, SWITCH_DRAIN)
            else:
                rolling.start_batch(master, reload, decision.roll)
        except (OSError, SupervisorError) as exc:
            return roll_back(master, str(exc))
        apply(master, reload.worker_ready())


def roll_due(master: Master, reload_id: int, program: str) -> None:
    """A batch's old listeners were steered away from SWITCH_DRAIN ago: shut them and stop their workers."""
    reload = master.reload
    if reload is None or reload.id != reload_id or program not in reload.rolls:
        return  # rolled back meanwhile
    rolling.switch(master, reload, reload.rolls[program])
    apply(master, reload.worker_ready())


def commit(master: Master) -> None:
    """Every new worker is ready: the new generations serve; new connections go to them at once and the
    old listeners are shut SWITCH_DRAIN later (finish_switch), all of them in one step."""
    reload = master.reload
    assert reload is not None
    if reload.config.migrate != master.config.migrate:
        # Before the old listeners are shut, so that their queues migrate under the new mode.
        try:
            master.enable_migration(reload.config.migrate)
        except migrate.MigrateError as exc:  # `require` checked at begin, lost since
            return roll_back(master, str(exc))
    master.reload = None
    reload.cancel_timers()
    before = migrate.counters()
    old_gens: list[Generation | None] = []
    for gen in reload.generations:
        gen.mark_serving()
        reload.reply.progress(f"{gen.program.name}: generation {gen.number} ready in "
                              f"{round(((gen.ready_at or gen.started) - gen.started) * 1000)} ms")
        bundle = reload.bundles.get(gen.program.name)
        old_gens.append(master.programs[gen.program.name].committed(gen, bundle.certificate if bundle else None))
    for name in reload.plan.removed:  # gone from the config: retire without a successor
        old_gens.append(master.programs[name].stopping(by_hand=False))
    retired = [g for g in old_gens if g is not None]
    master.config = reload.config
    fresh = [listener for g in reload.generations for w in g.workers for listener in w.listeners]
    # Step one of the switch: every new connection to the new generations (listeners.steer_to), so
    # that no handshake is completing on an old listener when it is shut (steer.py: the kernel
    # resets such a connection instead of migrating it); step two, after SWITCH_DRAIN, shuts them.
    steered = listeners.steer_to(fresh) if retired or master.adopted else []
    master.switch = Switch(reload, retired, fresh, steered, before, sum(old.queued() for old in retired))
    if steered:
        master.later(SWITCH_DRAIN, ev.SwitchDue())
    else:
        finish_switch(master)


def finish_switch(master: Master) -> None:
    """Step two: shut every old listener (steered away, one group at a time), stop the old workers."""
    switch, master.switch = master.switch, None
    assert switch is not None
    reload, programs = switch.reload, {g.program.name for g in switch.reload.generations}
    old = [listener for g in switch.retired for w in g.workers for listener in w.listeners]
    old += [a.listener for a in master.adopted if a.program in programs]  # a dead master's, if any
    shut = listeners.shut_steered(old, switch.fresh)
    for gen in switch.retired:
        master.retire(gen)
    master.shut_adopted(programs)
    listeners.unsteer(switch.steered)
    migrated = (migrate.counters() - switch.before).success
    for gen in switch.retired:
        reload.reply.progress(
            f"{gen.program.name}: generation {gen.number}: listeners closed, {len(gen.live_workers)} old "
            f"workers stopping (graceful timeout {gen.program.graceful_timeout:g} s)")
    reload.reply.finish(True, *reload.report(switch.retired, shut, migrated, switch.queued))
    if reload.kind is ReloadKind.RELOAD:
        master.tally.reloaded("done", time.monotonic() - reload.started)
    master.systemd.ready(status.describe(master.programs))
    master.next_request()


def roll_back(master: Master, reason: str) -> None:
    """Roll back the reload in progress: the serving generations were never touched."""
    reload = master.reload
    assert reload is not None
    master.reload = None
    reload.cancel_timers()
    # Before the new generations' listeners are shut: their queues then migrate to the old config's
    # workers, those put back included.
    put_back = [said for roll in reload.rolls.values() if (said := rolling.put_back(master, roll))]
    for gen in reload.generations:
        master.stop_later(gen.program, gen.rollback())
        master.generation_over(gen)
        master.programs[gen.program.name].rolled_back(gen)
        master.forget_if_finished(gen)
    still = ", ".join(f"{name}#{r.serving.number}" for name, r in master.programs.items() if r.serving)
    log.error("reload_failed", reason=reason)
    if reload.kind is ReloadKind.RELOAD:
        master.tally.reloaded("rolled_back")
    reload.reply.finish(False, f"{reason}; rolled back" + (f", still serving: {still}" if still else "")
                        + "".join(f"; {said}" for said in put_back))
    if reload.kind is ReloadKind.STARTUP:
        master.exit_code = EXIT_FAILED
        master.shutdown(Reply(origin="startup failure"))
    elif not master.stopping:  # a shutdown rolled it back: STOPPING=1 was sent, READY=1 would undo it
        master.systemd.ready(f"{status.describe(master.programs)}; last {reload.label} failed: {reason}")
    master.next_request()
