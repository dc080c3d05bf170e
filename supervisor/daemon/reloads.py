"""The reload slot as the master holds it: the reload in progress, its switch, and the requests waiting.

A reload, a `start` or the startup (model/reload.py) begins here, takes the master's facts (a worker
ready, one exited, a timer) and comes back as a decision that is applied here, in the master's loop:
1. begin: the new generations start (a rolling program's first batch waits for `NextBatch`);
2. `Commit`: the new generations serve; new connections go to them at once (the steering program),
   and the old listeners are shut once no handshake is in flight on them (at most `SWITCH_DRAIN`
   later), all in one step (`finish_switch`);
3. `RollBack(reason)`: the new generations' listeners are shut (their queues move back to the old
   ones, which never stopped) and their workers stopped.
Requests that arrive meanwhile wait in line (`waiting`) and go back on the master's queue, in order,
once the slot is free; reloads that piled up become one.
"""

from __future__ import annotations

import collections
import itertools
import os
import time
from collections.abc import Callable
from typing import Any

import structlog

from supervisor.config import tls
from supervisor.config.schema import Config, Metrics, Program, Strategy
from supervisor.daemon import events as ev
from supervisor.daemon import retiring, rolls, status, workers
from supervisor.daemon.host import Host
from supervisor.errors import SupervisorError
from supervisor.model.drain import SWITCH_DRAIN, Drain, Shut, Way, way
from supervisor.model.generation import Generation
from supervisor.model.plan import ReloadPlan, plan_reload, plan_restart, plan_start
from supervisor.model.program import ProgramRuntime, ProgramState, names
from supervisor.model.reload import (
    Commit,
    Decision,
    GiveUp,
    NextBatch,
    Reload,
    ReloadKind,
    RollBack,
    Serve,
    Switch,
    SwitchBatch,
    check,
    load_new_config,
)
from supervisor.model.roll import Roll
from supervisor.process.worker import Worker, WorkerState
from supervisor.protocol import requests
from supervisor.protocol.reply import Replies, Reply
from supervisor.protocol.words import plural
from supervisor.system import listeners, memory, migrate
from supervisor.system.listeners import Listener

log = structlog.get_logger()

SPAWN_SLICE = 0.01  # seconds of spawning a reload does in one step of the loop, then it answers what waits
# Workers of a generation starting (spawned, not ready yet) at a time: enough to keep every core busy
# with interpreters starting, few enough that the master keeps a share of the CPU.
STARTING_AT_ONCE = 4 * (os.cpu_count() or 1)
# Workers forked from a `preload:` template start without an interpreter or imports (a fork and the
# server's own start): four times as many at once. At 8 per wave, 64 forked workers took 8 waves of a
# fork, a READY=1 and the master's turn each; the spawn phase was most of such a reload.
FORKED_AT_ONCE = 4 * STARTING_AT_ONCE


def at_once(program: Program) -> int:
    """How many of a generation's workers may be starting at a time."""
    return FORKED_AT_ONCE if program.preload else STARTING_AT_ONCE


def starting(gen: Generation) -> int:
    return sum(w.state is WorkerState.STARTING and w.alive for w in gen.workers)


class Reloads:
    def __init__(self, host: Host, first_id: int = 1) -> None:
        self.host = host
        self.current: Reload | None = None
        self.switch: Switch | None = None  # a committed reload whose old listeners wait to be shut
        self.waiting: collections.deque[ev.ControlRequest] = collections.deque()  # behind the slot
        self.ids = itertools.count(first_id)
        self.last: dict[str, Any] | None = None  # the last reload, start or startup that ended: for `status`
        self.spawning: set[tuple[str, int]] = set()  # generations of the reload with workers still to spawn
        self.due: set[tuple[str, int]] = set()  # of them, those with a SpawnDue on its way

    @property
    def busy(self) -> bool:
        return self.current is not None or self.switch is not None

    # -- what the master tells it --------------------------------------------------------------------

    def worker_ready(self) -> None:
        if (reload := self.current) is not None:
            for program, number in sorted(self.spawning - self.due):  # room for the next ones
                if (gen := reload.generation(program, number)) is not None:
                    try:
                        self.spawn_more(reload, gen)
                    except (OSError, SupervisorError) as exc:
                        return self.roll_back(f"{program}: generation {number}: {exc}")
            self.apply(reload.worker_ready())

    def worker_failed(self, gen: Generation, w: Worker) -> None:
        """A worker of a generation it starts ended before it was ready."""
        if self.current is not None:
            self.apply(self.current.worker_exited(gen, w))

    def worker_gone(self, gen: Generation) -> None:
        """A worker of another generation exited: a rolled-out one gone lets the next batch start."""
        if self.current is not None and self.current.rolls and gen not in self.current.generations:
            self.apply(self.current.worker_ready())

    def timed_out(self, reload_id: int, program: str, generation: int) -> None:
        if self.current is not None and self.current.id == reload_id:
            self.apply(self.current.timed_out(program, generation))

    def owns(self, reply: Reply) -> bool:
        return self.current is not None and self.current.reply is reply

    def starting(self, gen: Generation | None) -> bool:
        return self.current is not None and gen in self.current.generations

    # -- begin, then apply what the reload decides -------------------------------------------------

    def begin(self, kind: ReloadKind, config: Config, reply: Reply, bundles: dict[str, tls.Bundle] | None,
              plan: ReloadPlan | None = None, asked: float | None = None) -> None:
        host = self.host
        plan = plan or plan_reload(config, names(host.programs, running=True), names(host.programs, by_hand=True))
        self.current = reload = Reload(next(self.ids), kind, config, plan, reply, bundles or {})
        self.spawning, self.due = set(), set()
        if asked is not None:
            reload.marks["asked"] = asked
        # Listeners a previous master left in the fd store are shut once, at the Commit, in one step.
        reload.together = {a.program for a in host.inherited.of([p.name for p in plan.start])}
        # New connections keep going to the serving workers while the new ones start (an interpreter
        # and an app import: a second or more), rather than waiting in a queue nobody accepts from yet.
        reload.held = listeners.steer_to(self.serving_listeners(plan))
        for program in plan.start:
            record = host.programs.setdefault(program.name, ProgramRuntime(program.name))
            try:
                gen = Generation.create(program, record.next_number(), host.runtime_dir,
                                        reload.bundles.get(program.name))
            except OSError as exc:
                return self.roll_back(f"{program.name}: tls: cannot copy the certificate and key for the workers: "
                                      f"{exc}")
            record.starting()
            reload.generations.append(gen)
            old = record.serving if record.state is ProgramState.RELOADING else None
            rolling = program.strategy is Strategy.ROLLING and old is not None
            reply.progress(f"{program.name}: generation {gen.number} " + (
                f"rolling in, {plural(program.batch, 'worker')} at a time" if rolling else
                f"starting {plural(program.workers, 'worker')}"))
            try:
                if rolling:
                    assert old is not None
                    leaving = [w for g in record.retiring for w in g.workers]  # a reload just before
                    reload.rolls[program.name] = Roll.of(old, gen, leaving)
                    continue  # its batches start as the reload's decisions say (NextBatch), each timed on its own
                self.spawning.add((program.name, gen.number))
                self.spawn_more(reload, gen)
            except (OSError, SupervisorError) as exc:
                return self.roll_back(f"{program.name}: generation {gen.number}: {exc}")
            timeout = ev.ReadyTimeout(reload.id, program.name, gen.number)
            reload.timers.append(host.later(program.ready_timeout, timeout))
        if not self.spawning:
            reload.marks["spawned"] = time.monotonic()
        self.apply(reload.worker_ready())

    def spawn_more(self, reload: Reload, gen: Generation) -> None:
        """Spawn more of `gen`'s workers: for SPAWN_SLICE of the loop's time at most (64 spawned workers
        take ~100 ms of it: `status` must not wait for all), and while fewer than STARTING_AT_ONCE of
        them are starting (64 interpreters starting at once on 2 cores leave the master 1/65 of the
        CPU; each one ready makes room for the next). What is left goes on after the loop's turn
        (SpawnDue) or at the next READY=1. Each worker is watched as soon as it exists; a spawn that
        fails raises (the reload rolls back)."""
        key = (gen.program.name, gen.number)
        deadline, done, busy = time.monotonic() + SPAWN_SLICE, False, starting(gen)
        limit = at_once(gen.program)
        try:
            while not done and time.monotonic() < deadline and busy < limit:
                done = gen.start(self.host.spawner, limit=1)
                busy += 1
        finally:
            for w in gen.workers:
                workers.watch(self.host, w, gen)
        if done:
            self.spawning.discard(key)
            if not self.spawning:
                reload.marks["spawned"] = time.monotonic()
        elif busy < limit and key not in self.due:  # the slice is used up
            self.due.add(key)
            self.host.later(0, ev.SpawnDue(reload.id, *key))

    def spawn_due(self, reload_id: int, program: str, number: int) -> None:
        """The next slice of a starting generation's workers. A timer of 0 s, not a post: the loop reads
        its sockets (a `status`) before it, where a posted event would come first."""
        self.due.discard((program, number))
        reload = self.current
        if reload is None or reload.id != reload_id or (gen := reload.generation(program, number)) is None:
            return  # rolled back meanwhile
        try:
            self.spawn_more(reload, gen)
        except (OSError, SupervisorError) as exc:
            return self.roll_back(f"{program}: generation {number}: {exc}")
        self.apply(reload.worker_ready())

    def reload(self, request: requests.Reload, reply: Reply,
               move_metrics: Callable[[Metrics | None], str | None]) -> None:
        """`reload [PROGRAM...]`, SIGHUP, `watch:`: the config read and checked again (a ConfigError or
        ControlError changes nothing), then the new generations begin."""
        host, asked = self.host, time.monotonic()
        host.systemd.reloading()  # before anything can fail: each RELOADING=1 gets its READY=1
        config, bundles = load_new_config(host.config, reply, request.programs)
        plan = plan_reload(config, names(host.programs, running=True), names(host.programs, by_hand=True),
                           request.programs)
        if moved := move_metrics(config.metrics):
            reply.progress(moved)
        self.begin(ReloadKind.RELOAD, config, reply, bundles, plan, asked)

    def start(self, request: requests.Start | requests.Restart, reply: Reply) -> None:
        """`start` (a program not running, or FATAL) or `restart` (a running one, with the settings it runs):
        a new generation, ready before the serving one retires, as in a reload of that program alone."""
        host = self.host
        running = names(host.programs, running=True)
        if isinstance(request, requests.Restart):
            kind, plan = ReloadKind.RESTART, plan_restart(host.config, request.program, running)
        else:
            kind, plan = ReloadKind.START, plan_start(host.config, request.program, running,
                                                      names(host.programs, fatal=True))
        # A new generation: its files are checked (and copied) anew, as at a reload.
        self.begin(kind, host.config, reply, check(host.config, reply, only=request.program), plan)

    def serving_listeners(self, plan: ReloadPlan) -> list[Listener]:
        """The listeners of the serving generations a reload replaces all at once (not those rolling)."""
        records = [self.host.programs.get(p.name) for p in plan.start if p.strategy is not Strategy.ROLLING]
        return listeners.unique(listener for r in records if r is not None and r.serving is not None
                                for w in r.serving.workers
                                # not those draining
                                if w.alive and w.state is WorkerState.READY and w not in r.serving.leaving
                                for listener in w.listeners if not listener.shut)

    def apply(self, decision: Decision) -> None:
        if isinstance(decision, Commit):
            self.commit()
        elif isinstance(decision, RollBack):
            self.roll_back(decision.reason)
        elif isinstance(decision, GiveUp) and self.current is not None:
            self.give_up(decision.gen, decision.reason)
        elif isinstance(decision, Serve) and self.current is not None:
            self.serve(decision.gen)
        elif isinstance(decision, SwitchBatch | NextBatch) and (reload := self.current) is not None:
            try:
                if isinstance(decision, SwitchBatch):
                    rolls.steer(self.host, reload, decision.roll)
                else:
                    rolls.start_batch(self.host, reload, decision.roll)
            except (OSError, SupervisorError) as exc:
                return self.roll_back(str(exc))
            self.apply(reload.worker_ready())

    def roll_due(self, reload_id: int, program: str) -> None:
        """A batch's old listeners were steered away from: once the drain says so, shut them and stop their workers."""
        reload = self.current
        if reload is None or reload.id != reload_id or program not in reload.rolls:
            return  # rolled back meanwhile
        roll, dropped = reload.rolls[program], 0
        if roll.drain is not None:
            leaving = roll.leaving_listeners()
            queued = sum(listener.queued() for listener in leaving)
            step = roll.drain.next(self.host.clock.time(), queued, lambda: listeners.handshaking(leaving))
            if not isinstance(step, Shut):
                self.host.later(step.seconds, ev.RollDue(reload_id, program))
                return
            dropped = step.dropped if roll.drain.way is Way.DRAINED else 0
            if dropped:
                log.warning("drain_dropped", program=program, dropped=dropped, drain_ms=roll.drain.ms)
        rolls.switch(self.host, reload, roll, dropped)
        self.apply(reload.worker_ready())

    def commit(self) -> None:
        """Every new worker is ready: the new generations serve; new connections go to them at once and the
        old listeners are shut when the drain says so (finish_switch: with migration at once if no handshake
        is in flight on them, else SWITCH_DRAIN later; once their queues are empty without), all in one step."""
        host, reload = self.host, self.current
        assert reload is not None
        if reload.config.migrate != host.config.migrate:
            # Before the old listeners are shut, so that their queues migrate under the new mode.
            try:
                host.enable_migration(reload.config.migrate)
            except migrate.MigrateError as exc:  # `require` checked at begin, lost since
                return self.roll_back(str(exc))
        self.current = None
        reload.cancel_timers()
        reload.marks["ready"] = time.monotonic()
        before = migrate.counters()
        old_gens: list[Generation | None] = []
        for gen in reload.generations:
            old_gens.append(self.serving(reload, gen))
        for name in reload.plan.removed:  # gone from the config: retire without a successor
            old_gens.append(host.programs[name].stopping(by_hand=False))
        retired = [g for g in old_gens if g is not None]
        host.use_config(reload.config)
        fresh = [listener for g in reload.generations for listener in g.every_listener()]
        # Step one of the switch: every new connection to the new generations (listeners.steer_to), so
        # that no handshake is completing on an old listener when it is shut (system/steer.py: the kernel
        # resets such a connection instead of migrating it); step two shuts them once none is in flight
        # (system/handshakes.py), at most SWITCH_DRAIN later.
        # Without migration the old workers go on accepting until their queues are empty (drain.py).
        programs = [g.program.name for g in reload.generations]
        steered = listeners.steer_to(fresh) if retired or host.inherited.of(programs) else []
        drain = Drain(way(host.migration.drains, host.migration.enabled), host.clock.time(),
                      max((g.program.drain_timeout for g in retired), default=0.0))
        self.switch = Switch(reload, retired, fresh, steered, before, sum(old.queued() for old in retired), drain)
        still = any(not listener.shut for g in retired for listener in g.every_listener())
        if drain.way is Way.DRAINED and (steered or still):
            host.later(SWITCH_DRAIN, ev.SwitchDue())
        else:  # steered: at once when no handshake is in flight on the old listeners, else SWITCH_DRAIN later
            self.finish_switch(force=not steered)

    def finish_switch(self, force: bool = False) -> None:
        """Step two, once the drain says so: shut every old listener (steered away, one group at a
        time), stop the old workers. `force`: now, whatever is left (a shutdown, nothing to wait for)."""
        host, switch = self.host, self.switch
        assert switch is not None
        reload, programs = switch.reload, {g.program.name for g in switch.reload.generations}
        old = [listener for g in switch.retired for listener in g.every_listener()]
        old += [a.listener for a in host.inherited.of(programs)]  # a dead master's, if any
        queued = sum(listener.queued() for listener in old if not listener.shut)
        step = switch.drain.next(host.clock.time(), queued, lambda: listeners.handshaking(old))
        if not isinstance(step, Shut):
            if not force:
                host.later(step.seconds, ev.SwitchDue())
                return
            step = switch.drain.cut(host.clock.time(), queued)
        self.switch = None
        # Reset by the shut: what the drain left (drain_timeout), or all that waits without migration.
        dropped = queued if switch.drain.way is Way.RESET else step.dropped
        shut = listeners.shut_steered(old, switch.fresh)
        for gen in switch.retired:
            retiring.retire(host, gen)
        host.inherited.shut(programs)
        listeners.unsteer([*switch.steered, *reload.held])
        migrated = (migrate.counters() - switch.before).success
        for gen in switch.retired:
            reload.reply.progress(
                f"{gen.program.name}: generation {gen.number}: listeners closed, "
                f"{plural(len(gen.live_workers), 'old worker')} stopping "
                f"(graceful timeout {gen.program.graceful_timeout:g} s)")
        if dropped:
            log.warning("drain_dropped", dropped=dropped, drain_ms=switch.drain.ms, way=switch.drain.way.value)
        summary, data = reload.report(switch.retired, shut, migrated, switch.queued, switch.drain, dropped)
        reload.reply.finish(True, summary, data)
        if reload.kind is not ReloadKind.STARTUP:
            self.last = {"at": time.time(), "what": reload.label, "result": "done", "ms": data["ms"],
                         "way": data["way"], "drain_ms": data["drain_ms"], "dropped": dropped, "migrated": migrated}
        if old:
            host.tally.retired(switch.drain.way.value, dropped, switch.drain.ms / 1000)
        if reload.kind is ReloadKind.RELOAD:
            host.tally.reloaded("done", time.monotonic() - reload.since)
        host.systemd.ready(status.describe(host.programs))
        workers.spares(host)  # after the answer: the next generations' templates import meanwhile
        if reload.kind is ReloadKind.STARTUP:
            memory.freeze()
        memory.release()  # what the start, or the config read, freed
        self.next_request()

    def roll_back(self, reason: str) -> None:
        """Roll back the reload in progress: the serving generations were never touched."""
        host, reload = self.host, self.current
        assert reload is not None
        self.current = None
        reload.cancel_timers()
        # Before the new generations' listeners are shut: their queues then migrate to the old config's
        # workers, those put back included.
        put_back = [said for roll in reload.rolls.values() if (said := rolls.put_back(host, roll))]
        for gen in reload.generations:
            workers.stop_later(host, gen.program, gen.rollback())
            retiring.generation_over(host, gen)
            host.programs[gen.program.name].rolled_back(gen)
            retiring.forget_if_finished(host, gen)
        listeners.unsteer(reload.held)  # after the shut: nothing reached the new listeners meanwhile
        still = ", ".join(f"{name}#{r.serving.number}" for name, r in host.programs.items() if r.serving)
        log.error("reload_failed", reason=reason)
        if reload.kind is ReloadKind.RELOAD:
            host.tally.reloaded("rolled_back")
        reload.reply.finish(False, f"{reason}; rolled back" + (f", still serving: {still}" if still else "")
                            + "".join(f"; {said}" for said in put_back))
        if reload.kind is not ReloadKind.STARTUP:
            self.last = {"at": time.time(), "what": reload.label, "result": "rolled back", "reason": reason,
                         "ms": round((time.monotonic() - reload.since) * 1000)}
        if reload.kind is ReloadKind.STARTUP:
            host.startup_failed()
        elif not host.stopping:  # a shutdown rolled it back: STOPPING=1 was sent, READY=1 would undo it
            host.systemd.ready(f"{status.describe(host.programs)}; last {reload.label} failed: {reason}")
        workers.spares(host)  # a spare it adopted went with the rolled-back generation
        self.next_request()

    def serve(self, gen: Generation) -> None:
        """At startup, one program's first generation is ready: it serves now; the others go on starting."""
        reload = self.current
        assert reload is not None
        reload.generations.remove(gen)
        reload.served.append(gen)
        self.serving(reload, gen)
        log.info("program_serving", program=gen.program.name, gen=gen.number)
        self.apply(reload.worker_ready())

    def serving(self, reload: Reload, gen: Generation) -> Generation | None:
        """A new generation is ready and serves; returns the one it replaces."""
        gen.mark_serving()
        reload.reply.progress(f"{gen.program.name}: generation {gen.number} ready in "
                              f"{round(((gen.ready_at or gen.started) - gen.started) * 1000)} ms")
        bundle = reload.bundles.get(gen.program.name)
        return self.host.programs[gen.program.name].committed(gen, bundle.certificate if bundle else None)

    def give_up(self, gen: Generation, reason: str) -> None:
        """At startup, one program's first generation failed: it alone is FATAL; the others go on."""
        host, reload = self.host, self.current
        assert reload is not None
        reload.generations.remove(gen)
        workers.stop_later(host, gen.program, gen.rollback())
        retiring.generation_over(host, gen)
        host.programs[gen.program.name].start_failed(gen, reason)
        retiring.forget_if_finished(host, gen)
        log.error("program_fatal", program=gen.program.name, reason=reason)
        reload.reply.progress(f"{gen.program.name}: FATAL: {reason}")
        self.apply(reload.worker_ready())

    def refused(self, request: requests.Request, reason: str) -> None:
        """A request that changed nothing was answered: a refused reload is counted and told to systemd."""
        if isinstance(request, requests.Reload):
            self.host.tally.reloaded("refused")
            self.last = {"at": time.time(), "what": "reload", "result": "refused", "reason": reason, "ms": None}
            if not self.host.stopping:
                # It sent RELOADING=1 first; Type=notify-reload waits for READY=1 after it (systemd.service(5)).
                self.host.systemd.ready(f"{status.describe(self.host.programs)}; last reload failed: {reason}")
        self.next_request()

    # -- the line of requests waiting for the slot ----------------------------------------------------

    def wait(self, event: ev.ControlRequest) -> None:
        event.reply.progress(f"waiting for the {self.current.label if self.current else 'upgrade'} in progress")
        self.waiting.append(event)

    def next_request(self, upgrading: bool = False) -> None:
        """The slot is free: the requests that waited for it go back on the queue, in order.

        Reloads that piled up (a burst of SIGHUPs, several `reload`s) become one, at the place of the
        first: each caller gets its answer, and it reads the config as it is now.
        """
        reloads = [e for e in self.waiting if isinstance(e.request, requests.Reload)]
        if len(reloads) > 1:
            wanted = [e.request.programs for e in reloads if isinstance(e.request, requests.Reload)]
            only = () if not all(wanted) else tuple(dict.fromkeys(name for names in wanted for name in names))
            merged = ev.ControlRequest(requests.Reload(only), Replies([e.reply for e in reloads]))
            self.waiting = collections.deque(merged if e is reloads[0] else e for e in self.waiting
                                             if e is reloads[0] or e not in reloads)
        while self.waiting and not self.busy and not upgrading:
            self.host.post(self.waiting.popleft())

    def refuse_all(self, reason: str) -> None:
        """supervisord is shutting down: whatever waits is answered now."""
        for event in self.waiting:
            event.reply.finish(False, reason)
        self.waiting.clear()

