"""The master: one loop, one queue, and the only mutable state of the daemon.

`run()` is the table of contents: open the sockets, start the first generations, then take events
one at a time and dispatch them. The state is a record per program (`program.ProgramRuntime`), the
reload in progress (`reload.Reload`) and the requests waiting behind it; the records decide
(`reload.Commit`, `restart.Restart`, ...) and the master applies. A reload (shared/DESIGN.md):
1. load and check the new config; any error is the reply and nothing changes;
2. start a new generation of every program: new listeners join the same reuseport groups;
3. wait until every new worker is ready, or one exits, or `ready_timeout` passes;
4. ready: shut every old listener at once (the kernel moves their queues to the new ones), send the
   old workers their stop signal `stop_delay` later, kill those still running after `graceful_timeout`;
5. not ready: shut the new listeners (their queues move back) and stop the new workers; the old
   generation never stopped serving.
"""

from __future__ import annotations

import asyncio
import collections
import itertools
import os
import signal
import time
from typing import Any, Protocol

import structlog

from supervisor import __version__, fdstore, handover, limits, listeners, logs, migrate, status, tls, upgrade, wire
from supervisor import events as ev
from supervisor import reload as reload_module
from supervisor.config import Config, MigrateMode, Program
from supervisor.endpoints import Endpoints
from supervisor.errors import EXIT_FAILED, EXIT_OK, ConfigError, ControlError, SupervisorError
from supervisor.fdstore import Adopted, FdStore
from supervisor.generation import Generation, GenerationState, Spawner
from supervisor.notify import Notifier
from supervisor.plan import ReloadPlan, plan_reload, plan_start
from supervisor.program import ProgramRuntime, names, serving
from supervisor.reload import SWITCH_DRAIN, Commit, Reload, ReloadKind, RollBack, Switch
from supervisor.reply import Replies, Reply
from supervisor.restart import Fatal, Restart
from supervisor.slot import SPAWN_RETRY
from supervisor.watch import Watcher
from supervisor.worker import Spawner as ProcessSpawner
from supervisor.worker import Worker, WorkerState

log = structlog.get_logger()

RECYCLE_POLL = 1.0  # seconds between looks for workers over max_rss / max_age
TIMER_SLACK = 0.005  # seconds a timer may fire early (see manage_workers)


class Clock(Protocol):
    """The event loop's clock and timers; the unit tests drive a fake one."""

    def time(self) -> float: ...
    def call_later(self, delay: float, callback: Any, *args: Any) -> asyncio.TimerHandle: ...


class Master:
    def __init__(self, config: Config, spawner: Spawner | None = None, clock: Clock | None = None) -> None:
        self.config = config
        self.queue: asyncio.Queue[ev.Event] = asyncio.Queue()
        self.clock: Clock = clock or asyncio.get_running_loop()
        self._spawner = spawner  # made by run() once the notify socket exists, unless a test gives one
        self.migration = migrate.MigrateStatus(config.migrate, False, "not checked yet")
        self.programs: dict[str, ProgramRuntime] = {p.name: ProgramRuntime(p.name) for p in config.programs}
        self.watcher = Watcher(self.post, self.later)
        self.reload: Reload | None = None
        self.switch: Switch | None = None  # a committed reload whose old listeners wait SWITCH_DRAIN
        self.waiting: collections.deque[ev.ControlRequest] = collections.deque()  # behind the reload
        self.stop_waiters: list[tuple[Generation, Reply]] = []
        self.shutdown_replies: list[Reply] = []
        self.stopping = False
        self.exit_code = EXIT_OK
        self.started, self.started_at = time.monotonic(), time.time()
        self.upgraded: dict[str, Any] | None = None  # the last upgrade: when, from which version
        self.upgrade: tuple[upgrade.Check, Reply, asyncio.TimerHandle] | None = None  # new code being checked
        self.reload_ids = itertools.count(1)
        self.endpoints = Endpoints(config.control, self.post)
        self.systemd = Notifier()
        self.fdstore = FdStore()
        self.adopted: list[Adopted] = []  # listeners a previous master left in the fd store, until shut

    # -- the loop ---------------------------------------------------------------------------------

    async def run(self, bundles: dict[str, tls.Bundle] | None = None, adopted: dict[str, Any] | None = None) -> int:
        """Serve until shut down: a config that passed its preflight (`bundles`: its checked certificates),
        or the state a master handed over before its exec (`adopted`)."""
        loop = asyncio.get_running_loop()
        try:
            if adopted is None:
                self.enable_migration(self.config.migrate)
                await self.endpoints.open()
            else:
                await self.endpoints.adopt(adopted["endpoints"])
        except (OSError, SupervisorError) as exc:
            log.error("migrate_unavailable" if isinstance(exc, migrate.MigrateError) else "startup_failed",
                      error=str(exc))
            self.endpoints.close()
            return EXIT_FAILED
        self._spawner = self._spawner or ProcessSpawner(self.endpoints.notify_path)
        for signum in ev.HANDLED_SIGNALS:
            loop.add_signal_handler(signum, self.post, ev.SignalReceived(signum))
        signal.pthread_sigmask(signal.SIG_UNBLOCK, ev.HANDLED_SIGNALS)  # blocked across an upgrade's exec
        log.info("supervisord_started", pid=os.getpid(), config=self.config.path, control=self.config.control.socket,
                 version=__version__, upgraded_from=adopted["version"] if adopted else None)
        if adopted is None:
            self.adopt_stored_listeners()
            self.begin(ReloadKind.STARTUP, self.config, Reply(origin="startup"), bundles)
        else:
            await handover.adopt(self, adopted)
        self.post(ev.RecycleCheck())
        if self.systemd.watchdog_interval:
            self.post(ev.WatchdogDue())
        try:
            while not self.done():
                self.handle(await self.queue.get())
        finally:
            for signum in ev.HANDLED_SIGNALS:
                loop.remove_signal_handler(signum)
            for reply in self.shutdown_replies:
                reply.finish(True, "supervisord stopped")
            self.endpoints.close()
            self.systemd.close()
            self.fdstore.close()
        log.info("supervisord_stopped", exit_code=self.exit_code)
        return self.exit_code

    @property
    def spawner(self) -> Spawner:
        assert self._spawner is not None, "run() makes the spawner once the notify socket exists"
        return self._spawner

    def done(self) -> bool:
        """Shutting down, and no worker left to wait for."""
        return self.stopping and not self.watcher.workers

    def post(self, event: ev.Event) -> None:
        self.queue.put_nowait(event)

    def later(self, delay: float, event: ev.Event) -> asyncio.TimerHandle:
        return self.clock.call_later(delay, self.post, event)

    def handle(self, event: ev.Event) -> None:
        """The one catch-all: a bug in a handler must not take the serving workers down with the master."""
        try:
            self.dispatch(event)
        except Exception as exc:
            # Not `event=`: that is structlog's first argument, and the TypeError would end the loop.
            log.exception("handler_failed", handling=type(event).__name__)
            if isinstance(event, ev.ControlRequest):
                # Still answer (the client would wait forever) and free the reload slot (every later
                # request would wait in line behind it).
                reason = f"internal error: {type(exc).__name__}: {exc} (details in the supervisord log)"
                if self.reload is not None and self.reload.reply is event.reply:
                    self.roll_back(reason)
                else:
                    self.refuse(event, reason)

    def dispatch(self, event: ev.Event) -> None:
        match event:
            case ev.SignalReceived():
                self.on_signal(event.signum)
            case ev.ControlRequest():
                self.on_request(event)
            case ev.NotifyReceived():
                if found := self.watcher.notified(event):
                    self.worker_ready(*found)
            case ev.ReadinessCheck():
                if found := self.watcher.checked(event.worker):
                    self.worker_ready(*found)
            case ev.ReadyTimeout():
                if self.reload is not None and self.reload.id == event.reload_id:
                    self.apply(self.reload.timed_out(event.generation))
            case ev.WorkerExited():
                self.on_worker_exited(event.worker)
            case ev.WorkerOutput():
                self.watcher.output(event.worker)
            case ev.WorkerReadyTimeout():
                self.on_worker_ready_timeout(event.worker)
            case ev.StopDue():
                for w in event.workers:
                    w.stop(event.signum)
            case ev.GracefulTimeout():
                self.on_graceful_timeout(event.workers)
            case ev.ManageWorkers():
                self.manage_workers()
            case ev.RecycleCheck():
                self.on_recycle_check()
            case ev.SwitchDue():
                if self.switch is not None:
                    self.finish_switch()
            case ev.UpgradeChecked():
                handover.checked(self, event.timed_out)
            case ev.WatchdogDue():
                # Sent from the loop itself: a master stuck in a handler misses its pings and systemd restarts it.
                self.systemd.watchdog()
                self.later(self.systemd.watchdog_interval or 1.0, ev.WatchdogDue())

    def enable_migration(self, mode: MigrateMode) -> None:
        """Set the sysctl as `mode` asks; raises MigrateError under `require` when it cannot."""
        self.migration = migrate.enable(mode)
        # `prefer` running without migration is the one line an operator must not miss (README).
        say = log.warning if mode is MigrateMode.PREFER and not self.migration.enabled else log.info
        say("migration", mode=mode.value, enabled=self.migration.enabled, detail=self.migration.reason)

    # -- signals and requests ----------------------------------------------------------------------

    def on_signal(self, signum: int) -> None:
        name = signal.Signals(signum).name
        log.info("signal", signal=name)
        if signum in (signal.SIGHUP, signal.SIGUSR2):
            request = wire.Reload() if signum == signal.SIGHUP else wire.Upgrade()
            self.on_request(ev.ControlRequest(request, Reply(origin=name)))
        elif signum == signal.SIGUSR1:
            logs.reopen()  # workers need nothing: their stderr comes through the master
        elif signum in (signal.SIGTTIN, signal.SIGTTOU):
            for record, gen in serving(self.programs):
                count = max(1, len(gen.active_slots()) + (1 if signum == signal.SIGTTIN else -1))
                self.on_request(ev.ControlRequest(wire.Scale(record.name, count), Reply(origin=record.name)))
        else:  # QUIT, or a second TERM/INT: no more waiting
            self.shutdown(Reply(origin=name), fast=signum == signal.SIGQUIT or self.stopping)

    def on_request(self, event: ev.ControlRequest) -> None:
        request, reply = event.request, event.reply
        try:
            if isinstance(request, wire.Status):
                reply.finish(True, "status", status.snapshot(self))
            elif isinstance(request, wire.Shutdown):
                self.shutdown(reply)
            elif self.stopping:
                reply.finish(False, "supervisord is shutting down")
            elif self.reload is not None or self.upgrade is not None or self.switch is not None:
                # Also `scale`: the generation it would change is being replaced.
                reply.progress(f"waiting for the {self.reload.label if self.reload else 'upgrade'} in progress")
                self.waiting.append(event)
            elif isinstance(request, wire.Upgrade):
                handover.begin(self, reply)
            elif isinstance(request, wire.Scale):
                self.scale(request.program, request.workers, reply)
            elif isinstance(request, wire.Stop):
                self.stop_program(request.program, reply)
            elif isinstance(request, wire.Start):
                plan = plan_start(self.config, request.program, names(self.programs, running=True),
                                  names(self.programs, fatal=True))
                # A start is a new generation: its files are checked (and copied) anew, as at a reload.
                bundles = reload_module.check(self.config, reply, only=request.program)
                self.begin(ReloadKind.START, self.config, reply, bundles, plan)
            elif isinstance(request, wire.Reload):
                self.systemd.reloading()  # before anything can fail: each RELOADING=1 gets its READY=1
                config, bundles = reload_module.load_new_config(self.config, reply)
                self.begin(ReloadKind.RELOAD, config, reply, bundles)
        except (ConfigError, ControlError, migrate.MigrateError) as exc:
            self.refuse(event, str(exc))

    def refuse(self, event: ev.ControlRequest, reason: str) -> None:
        """Answer a request that changed nothing."""
        event.reply.finish(False, reason)
        if isinstance(event.request, wire.Reload) and not self.stopping:
            # It sent RELOADING=1 first; Type=notify-reload waits for READY=1 after it (systemd.service(5)).
            self.systemd.ready(f"{status.describe(self.programs)}; last reload failed: {reason}")
        self.next_request()

    def next_request(self) -> None:
        """The reload slot is free: the requests that waited for it go back on the queue, in order.

        Reloads that piled up (a burst of SIGHUPs, several `reload`s) become one, at the place of the
        first: each caller gets its answer, and it reads the config as it is now.
        """
        reloads = [e for e in self.waiting if isinstance(e.request, wire.Reload)]
        if len(reloads) > 1:
            merged = ev.ControlRequest(wire.Reload(), Replies([e.reply for e in reloads]))
            self.waiting = collections.deque(merged if e is reloads[0] else e for e in self.waiting
                                             if e is reloads[0] or e not in reloads)
        while self.waiting and self.reload is None and self.upgrade is None and self.switch is None:
            self.post(self.waiting.popleft())

    # -- reloads: begin, then apply what the reload decides --------------------------------------------

    def begin(self, kind: ReloadKind, config: Config, reply: Reply, bundles: dict[str, tls.Bundle] | None,
              plan: ReloadPlan | None = None) -> None:
        plan = plan or plan_reload(config, names(self.programs, running=True), names(self.programs, by_hand=True))
        self.reload = reload = Reload(next(self.reload_ids), kind, config, plan, reply, bundles or {})
        for program in plan.start:
            record = self.programs.setdefault(program.name, ProgramRuntime(program.name))
            try:
                gen = Generation.create(program, record.next_number(), self.endpoints.runtime_dir,
                                        reload.bundles.get(program.name))
            except OSError as exc:
                return self.roll_back(f"{program.name}: tls: cannot copy the certificate and key for the workers: "
                                      f"{exc}")
            record.starting()
            reload.generations.append(gen)
            reply.progress(f"{program.name}: generation {gen.number} starting "
                           f"{program.workers} worker{'s' if program.workers != 1 else ''}")
            try:
                gen.start(self.spawner)
            except (OSError, SupervisorError) as exc:
                return self.roll_back(f"{program.name}: generation {gen.number}: {exc}")
            finally:
                for w in gen.workers:
                    self.watch(w, gen)
            reload.timers.append(self.later(program.ready_timeout, ev.ReadyTimeout(reload.id, gen)))
        self.apply(reload.worker_ready())

    def apply(self, decision: Commit | RollBack | object) -> None:
        if isinstance(decision, Commit):
            self.commit()
        elif isinstance(decision, RollBack):
            self.roll_back(decision.reason)

    def commit(self) -> None:
        """Every new worker is ready: the new generations serve, the old ones retire at once."""
        reload = self.reload
        assert reload is not None
        if reload.config.migrate != self.config.migrate:
            # Before the old listeners are shut, so that their queues migrate under the new mode.
            try:
                self.enable_migration(reload.config.migrate)
            except migrate.MigrateError as exc:  # `require` checked at begin, lost since
                return self.roll_back(str(exc))
        self.reload = None
        reload.cancel_timers()
        before = migrate.counters()
        old_gens: list[Generation | None] = []
        for gen in reload.generations:
            gen.mark_serving()
            reload.reply.progress(f"{gen.program.name}: generation {gen.number} ready in "
                                  f"{round(((gen.ready_at or gen.started) - gen.started) * 1000)} ms")
            bundle = reload.bundles.get(gen.program.name)
            old_gens.append(self.programs[gen.program.name].committed(gen, bundle.certificate if bundle else None))
        for name in reload.plan.removed:  # gone from the config: retire without a successor
            old_gens.append(self.programs[name].stopping(by_hand=False))
        retired = [g for g in old_gens if g is not None]
        self.config = reload.config
        fresh = [listener for g in reload.generations for w in g.workers for listener in w.listeners]
        # Step one of the switch: every new connection to the new generations (listeners.steer_to), so
        # that no handshake is completing on an old listener when it is shut (steer.py: the kernel
        # resets such a connection instead of migrating it); step two, after SWITCH_DRAIN, shuts them.
        steered = listeners.steer_to(fresh) if retired or self.adopted else []
        self.switch = Switch(reload, retired, fresh, steered, before, sum(old.queued() for old in retired))
        if steered:
            self.later(SWITCH_DRAIN, ev.SwitchDue())
        else:
            self.finish_switch()

    def finish_switch(self) -> None:
        """Step two: shut every old listener (steered away, one group at a time), stop the old workers."""
        switch, self.switch = self.switch, None
        assert switch is not None
        reload, programs = switch.reload, {g.program.name for g in switch.reload.generations}
        old = [listener for g in switch.retired for w in g.workers for listener in w.listeners]
        old += [a.listener for a in self.adopted if a.program in programs]  # a dead master's, if any
        shut = listeners.shut_steered(old, switch.fresh)
        for gen in switch.retired:
            self.retire(gen)
        self.shut_adopted(programs)
        listeners.unsteer(switch.steered)
        migrated = (migrate.counters() - switch.before).success
        for gen in switch.retired:
            reload.reply.progress(
                f"{gen.program.name}: generation {gen.number}: listeners closed, {len(gen.live_workers)} old "
                f"workers stopping (graceful timeout {gen.program.graceful_timeout:g} s)")
        reload.reply.finish(True, *reload.report(switch.retired, shut, migrated, switch.queued))
        self.systemd.ready(status.describe(self.programs))
        self.next_request()

    def roll_back(self, reason: str) -> None:
        """Roll back the reload in progress: the serving generations were never touched."""
        reload = self.reload
        assert reload is not None
        self.reload = None
        reload.cancel_timers()
        for gen in reload.generations:
            self.stop_later(gen.program, gen.rollback())
            self.programs[gen.program.name].rolled_back(gen)
            self.forget_if_finished(gen)
        still = ", ".join(f"{name}#{r.serving.number}" for name, r in self.programs.items() if r.serving)
        log.error("reload_failed", reason=reason)
        reload.reply.finish(False, f"{reason}; rolled back" + (f", still serving: {still}" if still else ""))
        if reload.kind is ReloadKind.STARTUP:
            self.exit_code = EXIT_FAILED
            self.shutdown(Reply(origin="startup failure"))
        elif not self.stopping:  # a shutdown rolled it back: STOPPING=1 was sent, READY=1 would undo it
            self.systemd.ready(f"{status.describe(self.programs)}; last {reload.label} failed: {reason}")
        self.next_request()

    # -- retiring, stopping ---------------------------------------------------------------------------

    def retire(self, gen: Generation) -> int:
        """Shut every listener of `gen` at once; its workers' stop signals follow after stop_delay."""
        closed = gen.retire()
        self.stop_later(gen.program, gen.live_workers)
        log.info("generation_retiring", program=gen.program.name, gen=gen.number, listeners_closed=closed,
                 workers=len(gen.live_workers))
        self.forget_if_finished(gen)
        return closed

    def stop_later(self, program: Program, workers: list[Worker]) -> None:
        """Workers whose listeners are shut: the stop signal after `stop_delay`, SIGKILL `graceful_timeout` later.

        The delay lets a server read the requests of connections it accepted just before the shut
        (uvicorn closes those unread when it stops); nothing new reaches it, its queue has migrated.
        """
        if not workers:
            return
        now = self.clock.time()
        for w in workers:  # the deadlines an upgrade hands over
            w.stop_at, w.kill_at = now + program.stop_delay, now + program.stop_delay + program.graceful_timeout
        if program.stop_delay:
            self.later(program.stop_delay, ev.StopDue(tuple(workers), program.stop_signal))
        else:
            for w in workers:
                w.stop(program.stop_signal)
        self.later(program.stop_delay + program.graceful_timeout, ev.GracefulTimeout(tuple(workers)))

    def running(self, name: str) -> ProgramRuntime:
        """The runtime of a running program, or the ControlError a user should see."""
        record = self.programs.get(name)
        if record is not None and record.serving is not None:
            return record
        if name in {p.name for p in self.config.programs}:
            raise ControlError(f"{name} is not running")
        raise ControlError(f"no program named {name!r}")

    def stop_program(self, name: str, reply: Reply) -> None:
        gen = self.running(name).stopping(by_hand=True)
        assert gen is not None
        reply.progress(f"{name}: stopping generation {gen.number} ({len(gen.live_workers)} workers)")
        self.stop_waiters.append((gen, reply))
        self.retire(gen)

    def shutdown(self, reply: Reply, fast: bool = False) -> None:
        """Stop everything: listeners shut, stop signals sent; the loop ends when no worker is left."""
        self.shutdown_replies.append(reply)
        if not self.stopping:
            log.info("shutting_down", origin=reply.origin, fast=fast)
            self.systemd.stopping()
            self.stopping = True
            if self.reload is not None:
                self.roll_back("supervisord is shutting down")
            if self.switch is not None:
                self.finish_switch()
            if self.upgrade is not None:
                handover.checked(self, timed_out=False, refuse="supervisord is shutting down")
            for event in self.waiting:
                event.reply.finish(False, "supervisord is shutting down")
            self.waiting.clear()
            for record in [r for r in self.programs.values() if r.running]:
                if (gen := record.stopping(by_hand=False)) and self.fdstore.enabled:
                    # Under systemd's fd store a stop is a restart to be: the listeners stay open
                    # there, unshut, and their queues wait for the next start (fdstore.py).
                    self.stop_later(gen.program, gen.hand_over())
                    self.forget_if_finished(gen)
                elif gen:
                    self.retire(gen)
        if fast:
            for record in self.programs.values():
                for gen in record.retiring:
                    gen.kill()

    def adopt_stored_listeners(self) -> None:
        """Listeners a master that died or stopped left in systemd's fd store: a generation without
        workers, whose queues the first new generation takes over (shut_adopted)."""
        self.adopted, dropped = fdstore.inherited(self.config)
        self.fdstore.remove(dropped)
        for a in self.adopted:
            listeners.unknown(a.listener.listen)  # their order in the group is the dead master's
        for listener in self.adopted:
            record = self.programs[listener.program]
            record.last_number = max(record.last_number, listener.generation)
        if self.adopted or dropped:
            log.info("fdstore_adopted", listeners=[a.name for a in self.adopted], dropped=dropped)

    def shut_adopted(self, programs: set[str]) -> int:
        """The programs' new generations serve: shut what was adopted (queues migrate), forget it."""
        done = [a for a in self.adopted if a.program in programs]
        for a in done:
            listeners.close(a.listener)
        self.fdstore.remove([a.name for a in done])
        self.adopted = [a for a in self.adopted if a.program not in programs]
        return len(done)

    def on_graceful_timeout(self, workers: tuple[Worker, ...]) -> None:
        stubborn = [w for w in workers if w.alive]
        if stubborn:
            log.warning("graceful_timeout", program=stubborn[0].program, gen=stubborn[0].generation,
                        killing=[w.pid for w in stubborn])
            for w in stubborn:
                w.kill()

    def forget_if_finished(self, gen: Generation) -> None:
        """A retiring or rolled-back generation stays in `status` until its last worker has exited."""
        if gen.state in (GenerationState.SERVING, GenerationState.STARTING) or not gen.finished():
            return
        gen.finish()
        self.programs[gen.program.name].generation_finished(gen)
        log.info("generation_finished", program=gen.program.name, gen=gen.number, state=gen.state.value)
        for waiter in [(g, r) for g, r in self.stop_waiters if g is gen]:
            self.stop_waiters.remove(waiter)
            waiter[1].finish(True, f"{gen.program.name} stopped")

    # -- workers: ready, ended; the slots of serving generations ----------------------------------------

    def watch(self, w: Worker, gen: Generation) -> None:
        if not self.watcher.watching(w) and w.alive:
            self.watcher.watch(w, gen)
            self.fdstore.keep([(fdstore.name(w.program, w.generation, w.index, n), listener.fileno())
                               for n, listener in enumerate(w.listeners)])
            if gen.state is GenerationState.SERVING:  # a restart, scale-up or recycle: no reload times it
                self.later(gen.program.ready_timeout, ev.WorkerReadyTimeout(w))

    def worker_ready(self, w: Worker, gen: Generation) -> None:
        w.mark_ready()
        slot = gen.slot_of(w)
        if gen.state is GenerationState.SERVING and slot is not None:
            if w is slot.replacement:
                old = slot.replacement_ready()
                log.info("worker_recycled", program=w.program, gen=w.generation, worker=w.index, pid=w.pid,
                         old_pid=old.pid if old else None)
                self.stop_later(gen.program, gen.leave([old] if old else []))
            else:
                log.info("worker_started", program=w.program, gen=w.generation, worker=w.index, pid=w.pid)
        if self.reload is not None:
            self.apply(self.reload.worker_ready())

    def on_worker_exited(self, w: Worker) -> None:
        was = w.state
        stored = [] if w.kept else [fdstore.name(w.program, w.generation, w.index, n) for n in range(len(w.listeners))]
        gen = self.watcher.exited(w)
        if gen is None:
            return  # a spurious wake-up: still running
        self.fdstore.remove(stored)
        record, slot, now = self.programs[gen.program.name], gen.slot_of(w), self.clock.time()
        fields = {"program": w.program, "gen": w.generation, "worker": w.index, "pid": w.pid,
                  "status": w.describe_exit()}
        if self.reload is not None and gen in self.reload.generations:
            log.error("worker_failed_to_start", **fields)
            self.apply(self.reload.worker_exited(gen, w))
        elif gen.state is GenerationState.SERVING and slot and was is not WorkerState.RETIRING:
            # Its listeners were shut when reaped: their queues moved to its siblings.
            record.last_exit = f"worker {w.index} (pid {w.pid}) {w.describe_exit()}"
            if w is slot.replacement:  # a recycling replacement failed; the old worker serves on
                log.error("worker_recycle_failed", **fields)
                slot.replacement_failed(now)
            else:
                log.error("worker_crashed", **fields, was=was.value)
                match slot.crashed(w, now, record.crash_history(gen.program)):
                    case Fatal(why=why, crashes=crashes):
                        record.went_fatal(why)
                        log.error("program_fatal", program=record.name, crashes=crashes,
                                  window=gen.program.crash_window, serving=len(gen.live_workers))
                    case Restart(after=after, restarts=restarts):
                        log.info("worker_respawn_scheduled", program=record.name, worker=w.index, delay=after,
                                 restarts=restarts)
                        self.later(after, ev.ManageWorkers())
        else:
            log.info("worker_exited", **fields)
        gen.worker_gone(w)
        self.forget_if_finished(gen)

    def on_worker_ready_timeout(self, w: Worker) -> None:
        gen = self.watcher.generation_of(w)
        if gen is not None and w.state is WorkerState.STARTING:
            log.error("worker_not_ready", program=w.program, gen=w.generation, worker=w.index, pid=w.pid,
                      timeout=gen.program.ready_timeout)
            w.kill()  # shuts its listeners first; its exit is a crash

    def manage_workers(self) -> None:
        """Reconcile, as gunicorn's arbiter does: each empty slot whose time has come gets a worker."""
        # uvloop may run a timer a little before its time (loop.time() just short of the deadline):
        # without this slack, a restart due "now" would wait for a wake-up that never comes.
        now = self.clock.time() + TIMER_SLACK
        for record, gen in serving(self.programs):
            if record.fatal is None and not self.stopping:
                for slot in gen.due(now):
                    slot.filled(self.spawn(gen, slot.index), now)
                    if slot.worker is None:
                        self.later(SPAWN_RETRY, ev.ManageWorkers())

    def spawn(self, gen: Generation, index: int) -> Worker | None:
        """One more worker in a serving generation (restart, scale up, recycle), on fresh listeners."""
        try:
            w = gen.spawn(self.spawner, index)
        except (OSError, SupervisorError) as exc:
            log.error("spawn_failed", program=gen.program.name, worker=index, error=str(exc))
            return None
        self.watch(w, gen)
        return w

    def scale(self, name: str, count: int, reply: Reply) -> None:
        """`scale NAME N`, TTIN, TTOU: more workers on fresh listeners, or retire the highest indexes."""
        gen = self.running(name).serving
        assert gen is not None
        if not 1 <= count <= 4096:
            raise ControlError(f"workers must be 1..4096, got {count}")
        running = {r.name: len(g.active_slots()) for r, g in serving(self.programs)}
        if problem := limits.scale_problem(self.config, name, count, running):
            raise ControlError(problem)
        leaving = gen.leave(gen.scale(count, self.clock.time()))
        due = gen.due(self.clock.time())
        self.manage_workers()
        started = sum(slot.worker is not None for slot in due)  # what really started, not what was tried
        failed = f", {len(due) - started} could not start (retried in {SPAWN_RETRY:g} s)" if started < len(due) else ""
        self.stop_later(gen.program, leaving)
        log.info("program_scaled", program=name, workers=count, started=started, retiring=len(leaving))
        reply.finish(True, f"{name}: {count} workers ({started} started, {len(leaving)} retiring{failed})")

    def on_recycle_check(self) -> None:
        """Replace workers over max_rss or max_age: the new one listens first, the old one retires once it is ready."""
        now = self.clock.time()
        for record, gen in serving(self.programs):
            for slot, reason in gen.recycling(now):
                log.info("worker_recycling", program=record.name, gen=gen.number, worker=slot.index,
                         pid=slot.worker.pid if slot.worker else None, reason=reason)
                slot.replacement = self.spawn(gen, slot.index)
        self.later(RECYCLE_POLL, ev.RecycleCheck())
