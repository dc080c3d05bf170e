"""The master: one loop, one queue, and the only mutable state of the daemon.

`run()` is the table of contents: enable migration, open the sockets, start the first generations,
then take events one at a time and dispatch them to an `on_*` method. The state is a record per
program (`program.ProgramRuntime`), the reload in progress (`reload.Reload`) and the requests
waiting behind it. Decisions come back as values (`reload.Commit`, `restart.Restart`, ...) and are
applied here. A reload (see shared/DESIGN.md, "Reload, step by step"):
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
import shutil
import signal
import tempfile
import time
from typing import Any, Protocol

import structlog

from supervisor import config as config_module
from supervisor import logs, migrate, preflight, readiness, status, tls, wire
from supervisor.config import Config, MigrateMode, Program, ReadyMode
from supervisor.control import ControlServer
from supervisor.errors import EXIT_FAILED, EXIT_OK, EXIT_USAGE, ConfigError, ControlError, SupervisorError
from supervisor.events import (
    ControlRequest,
    Event,
    GracefulTimeout,
    NotifyReceived,
    ReadinessCheck,
    ReadyTimeout,
    RecycleCheck,
    RespawnDue,
    SignalReceived,
    StopDue,
    WatchdogDue,
    WorkerExited,
    WorkerOutput,
    WorkerReadyTimeout,
)
from supervisor.generation import Generation, GenerationState, Spawner
from supervisor.notify import Notifier
from supervisor.plan import ReloadPlan, plan_reload, plan_start
from supervisor.program import ProgramRuntime
from supervisor.readiness import NotifySocket
from supervisor.reload import Commit, Decision, Reload, ReloadKind, RollBack
from supervisor.reply import Reply
from supervisor.restart import Fatal, Restart
from supervisor.worker import Spawner as ProcessSpawner
from supervisor.worker import Worker, WorkerState

log = structlog.get_logger()

HANDLED_SIGNALS = (signal.SIGHUP, signal.SIGTERM, signal.SIGINT, signal.SIGQUIT, signal.SIGUSR1,
                   signal.SIGTTIN, signal.SIGTTOU)
READINESS_POLL = 0.05  # seconds between looks at a worker with `ready: accepting`
RECYCLE_POLL = 1.0  # seconds between looks for workers over max_rss / max_age
SPAWN_RETRY = 10.0  # after a worker could not be started at all


class Clock(Protocol):
    """The event loop's clock and timers; the unit tests drive a fake one."""

    def time(self) -> float: ...
    def call_later(self, delay: float, callback: Any, *args: Any) -> asyncio.TimerHandle: ...


class Master:
    def __init__(self, config: Config, spawner: Spawner | None = None, clock: Clock | None = None) -> None:
        self.config = config
        self.queue: asyncio.Queue[Event] = asyncio.Queue()
        self.clock: Clock = clock or asyncio.get_running_loop()
        self.spawner = spawner
        self.migration = migrate.MigrateStatus(config.migrate, False, "not checked yet")
        self.programs: dict[str, ProgramRuntime] = {p.name: ProgramRuntime(p.name) for p in config.programs}
        self.workers: dict[int, tuple[Worker, Generation]] = {}  # live workers by pid
        self.reload: Reload | None = None
        self.waiting: collections.deque[ControlRequest] = collections.deque()  # behind the reload
        self.stop_waiters: list[tuple[Generation, Reply]] = []
        self.shutdown_replies: list[Reply] = []
        self.stopping = False
        self.exit_code = EXIT_OK
        self.started = time.monotonic()
        self.reload_ids = itertools.count(1)
        self.runtime_dir = ""
        self.notify: NotifySocket | None = None
        self.control: ControlServer | None = None
        self.systemd = Notifier()

    # -- the loop ---------------------------------------------------------------------------------

    async def run(self) -> int:
        """Serve until shut down; returns the daemon's exit status."""
        report = preflight.check(self.config)
        for warning in report.warnings:
            log.warning("preflight_warning", warning=warning)
        if report.problems:
            for problem in report.problems:
                log.error("preflight_failed", problem=problem)
            return EXIT_USAGE
        try:
            self.enable_migration(self.config.migrate)
        except SupervisorError as exc:
            log.error("migrate_unavailable", error=str(exc))
            return EXIT_FAILED
        loop = asyncio.get_running_loop()
        try:
            self.open_sockets(loop)
            await self.control_server().start()
        except (OSError, SupervisorError) as exc:
            log.error("startup_failed", error=str(exc))
            self.close_sockets(loop)
            return EXIT_FAILED
        for signum in HANDLED_SIGNALS:
            loop.add_signal_handler(signum, self.post, SignalReceived(signum))
        log.info("supervisord_started", pid=os.getpid(), config=self.config.path,
                 control=self.config.control.socket)
        self.begin(ReloadKind.STARTUP, self.config, Reply(origin="startup"), report.bundles)
        if self.systemd.watchdog_interval:
            self.post(WatchdogDue())
        self.post(RecycleCheck())
        try:
            while not self.done():
                self.handle(await self.queue.get())
        finally:
            for signum in HANDLED_SIGNALS:
                loop.remove_signal_handler(signum)
            for reply in self.shutdown_replies:
                reply.finish(True, "supervisord stopped")
            self.close_sockets(loop)
            self.systemd.close()
        log.info("supervisord_stopped", exit_code=self.exit_code)
        return self.exit_code

    def done(self) -> bool:
        return self.stopping and not self.workers

    def post(self, event: Event) -> None:
        self.queue.put_nowait(event)

    def later(self, delay: float, event: Event) -> asyncio.TimerHandle:
        return self.clock.call_later(delay, self.post, event)

    def handle(self, event: Event) -> None:
        """The one catch-all: a bug in a handler must not take the serving workers down with the master."""
        try:
            self.dispatch(event)
        except Exception as exc:
            # Not `event=`: that is structlog's first argument, and the TypeError would end the loop.
            log.exception("handler_failed", handling=type(event).__name__)
            if isinstance(event, ControlRequest):
                # Still answer (the client would wait forever) and free the reload slot (every later
                # request would wait in line behind it).
                reason = f"internal error: {type(exc).__name__}: {exc} (details in the supervisord log)"
                if self.reload is not None and self.reload.reply is event.reply:
                    self.roll_back(reason)
                else:
                    self.refuse(event, reason)

    def dispatch(self, event: Event) -> None:
        match event:
            case SignalReceived():
                self.on_signal(event.signum)
            case ControlRequest():
                self.on_request(event)
            case WorkerExited():
                self.on_worker_exited(event.worker)
            case WorkerOutput():
                self.on_worker_output(event.worker)
            case NotifyReceived():
                self.on_notify(event)
            case ReadinessCheck():
                self.on_readiness_check(event.worker)
            case ReadyTimeout():
                if self.reload is not None and self.reload.id == event.reload_id:
                    self.apply(self.reload.timed_out(event.generation))
            case WorkerReadyTimeout():
                self.on_worker_ready_timeout(event.worker)
            case StopDue():
                for w in event.workers:
                    w.stop(event.signum)
            case GracefulTimeout():
                self.on_graceful_timeout(event.workers)
            case RespawnDue():
                self.on_respawn_due(event.generation, event.index)
            case RecycleCheck():
                self.on_recycle_check()
            case WatchdogDue():
                self.on_watchdog_due()

    def enable_migration(self, mode: MigrateMode) -> None:
        """Set the sysctl as `mode` asks; raises MigrateError under `require` when it cannot."""
        self.migration = migrate.enable(mode)
        # `prefer` running without migration is the one line an operator must not miss (README).
        say = log.warning if mode is MigrateMode.PREFER and not self.migration.enabled else log.info
        say("migration", mode=mode.value, enabled=self.migration.enabled, detail=self.migration.reason)

    # -- sockets of the master itself -----------------------------------------------------------------

    def open_sockets(self, loop: asyncio.AbstractEventLoop) -> None:
        # Under systemd, RuntimeDirectory= gives a private folder; elsewhere a fresh one in $TMPDIR.
        self.runtime_dir = tempfile.mkdtemp(prefix="supervisord.", dir=os.environ.get("RUNTIME_DIRECTORY"))
        os.chmod(self.runtime_dir, 0o711)  # workers that dropped privileges still reach the notify socket
        self.notify = notify = NotifySocket(os.path.join(self.runtime_dir, "notify.sock"))
        self.spawner = self.spawner or ProcessSpawner(notify.path)
        loop.add_reader(notify.fileno(), self.on_notify_readable)

    def on_notify_readable(self) -> None:
        assert self.notify is not None
        for pid, fields in self.notify.receive():
            self.post(NotifyReceived(pid, fields))

    def control_server(self) -> ControlServer:
        self.control = ControlServer(self.config.control.socket, self.config.control.mode, self.post)
        return self.control

    def close_sockets(self, loop: asyncio.AbstractEventLoop) -> None:
        if self.control is not None:
            self.control.close()
        if self.notify is not None:
            loop.remove_reader(self.notify.fileno())
            self.notify.close()
            self.notify = None
        if self.runtime_dir:
            shutil.rmtree(self.runtime_dir, ignore_errors=True)

    # -- signals and requests ----------------------------------------------------------------------

    def on_signal(self, signum: int) -> None:
        name = signal.Signals(signum).name
        log.info("signal", signal=name)
        if signum == signal.SIGHUP:
            self.on_request(ControlRequest(wire.Reload(), Reply(origin="SIGHUP")))
        elif signum == signal.SIGUSR1:
            logs.reopen()  # workers need nothing: their stderr comes through the master
        elif signum in (signal.SIGTTIN, signal.SIGTTOU):
            step = 1 if signum == signal.SIGTTIN else -1
            for record in self.programs.values():
                if record.serving is not None:
                    count = max(1, len(record.serving.active_slots()) + step)
                    self.on_request(ControlRequest(wire.Scale(record.name, count), Reply(origin=record.name)))
        else:  # QUIT, or a second TERM/INT: no more waiting
            self.shutdown(Reply(origin=name), fast=signum == signal.SIGQUIT or self.stopping)

    def on_request(self, event: ControlRequest) -> None:
        reply = event.reply
        match event.request:
            case wire.Status():
                reply.finish(True, "status", status.snapshot(self))
            case wire.Shutdown():
                self.shutdown(reply)
            case _ if self.stopping:
                reply.finish(False, "supervisord is shutting down")
            case wire.Scale(program=name, workers=count):
                try:
                    self.scale(name, count, reply)
                except ControlError as exc:
                    reply.finish(False, str(exc))
            case _ if self.reload is not None:
                reply.progress(f"waiting for the {self.reload.label} in progress")
                self.waiting.append(event)
            case wire.Stop(program=name):
                try:
                    self.stop_program(name, reply)
                except ControlError as exc:
                    self.refuse(event, str(exc))
            case wire.Reload() | wire.Start():
                try:
                    self.begin_request(event)
                except (ConfigError, ControlError, migrate.MigrateError) as exc:
                    self.refuse(event, str(exc))

    def refuse(self, event: ControlRequest, reason: str) -> None:
        """Answer a request that changed nothing."""
        event.reply.finish(False, reason)
        if isinstance(event.request, wire.Reload) and not self.stopping:
            # It sent RELOADING=1 first; Type=notify-reload waits for READY=1 after it (systemd.service(5)).
            self.systemd.ready(f"{self.describe()}; last reload failed: {reason}")
        self.next_request()

    def next_request(self) -> None:
        """The reload slot is free: the requests that waited for it go back on the queue, in order."""
        while self.waiting and self.reload is None:
            self.post(self.waiting.popleft())

    def begin_request(self, event: ControlRequest) -> None:
        """`reload` or `start NAME`: raises the user's error before anything changes."""
        if isinstance(event.request, wire.Start):
            name = event.request.program
            plan = plan_start(self.config, name, self.running_names(), self.fatal_names())
            # A start is a new generation: its files are checked (and copied) anew, as at a reload.
            bundles = self.preflight(self.config, event.reply, only=name)
            self.begin(ReloadKind.START, self.config, event.reply, bundles, plan)
            return
        self.systemd.reloading()  # before anything can fail: each RELOADING=1 gets its READY=1
        config = config_module.load(self.config.path)
        bundles = self.preflight(config, event.reply)
        if config.control != self.config.control:
            event.reply.progress("control socket settings changed: they apply after a restart")
        if config.migrate != self.config.migrate:
            # Applied by commit() once the new generations serve: a rollback leaves it as it was.
            # `require` is checked now, so a reload that could not honour it starts nothing.
            if problem := preflight.migration_problem(config.migrate):
                raise migrate.MigrateError(problem)
            event.reply.progress(f"migrate: {self.config.migrate.value} -> {config.migrate.value} "
                                 "once the new generation serves")
        self.begin(ReloadKind.RELOAD, config, event.reply, bundles)

    def preflight(self, config: Config, reply: Reply, only: str | None = None) -> dict[str, tls.Bundle]:
        """Check `config` (or its program `only`) against the system; raise the problems, say the warnings."""
        report = preflight.check(config, only)
        if report.problems:
            raise ControlError("; ".join(report.problems))
        for warning in report.warnings:
            log.warning("preflight_warning", warning=warning)
            reply.progress(f"warning: {warning}")
        return report.bundles

    # -- reloads: begin, then apply what the reload decides --------------------------------------------

    def begin(self, kind: ReloadKind, config: Config, reply: Reply, bundles: dict[str, tls.Bundle],
              plan: ReloadPlan | None = None) -> None:
        plan = plan or plan_reload(config, self.running_names(), self.stopped_names())
        self.reload = reload = Reload(next(self.reload_ids), kind, config, plan, reply, bundles)
        for program in plan.start:
            record = self.programs.setdefault(program.name, ProgramRuntime(program.name))
            try:
                gen = Generation.create(program, record.next_number(), self.runtime_dir, bundles.get(program.name))
            except OSError as exc:
                self.roll_back(f"{program.name}: tls: cannot copy the certificate and key for the workers: {exc}")
                return
            record.starting()
            reload.generations.append(gen)
            reply.progress(f"{program.name}: generation {gen.number} starting "
                           f"{program.workers} worker{'s' if program.workers != 1 else ''}")
            try:
                gen.start(self.spawner_or_fail())
            except (OSError, SupervisorError) as exc:
                self.watch_all(gen)
                self.roll_back(f"{program.name}: generation {gen.number}: {exc}")
                return
            self.watch_all(gen)
            reload.timers.append(self.later(program.ready_timeout, ReadyTimeout(reload.id, gen)))
        self.apply(reload.worker_ready())

    def apply(self, decision: Decision) -> None:
        match decision:
            case Commit():
                self.commit()
            case RollBack(reason=reason):
                self.roll_back(reason)

    def commit(self) -> None:
        """Every new worker is ready: the new generations serve, the old ones retire at once."""
        reload = self.reload
        assert reload is not None
        if reload.config.migrate != self.config.migrate:
            # Before the old listeners are shut, so that their queues migrate under the new mode.
            try:
                self.enable_migration(reload.config.migrate)
            except migrate.MigrateError as exc:  # `require` checked at begin, lost since
                self.roll_back(str(exc))
                return
        self.reload = None
        reload.cancel_timers()
        before = migrate.counters()
        old_gens: list[Generation] = []
        for gen in reload.generations:
            gen.mark_serving()
            reload.reply.progress(f"{gen.program.name}: generation {gen.number} ready in "
                                  f"{_ms(gen.ready_at, gen.started)} ms")
            bundle = reload.bundles.get(gen.program.name)
            old = self.programs[gen.program.name].committed(gen, bundle.certificate if bundle else None)
            old_gens += [old] if old else []
        for name in reload.plan.removed:  # gone from the config: retire without a successor
            if (record := self.programs.get(name)) and (old := record.stopping(by_hand=False)):
                old_gens.append(old)
        queued = sum(old.queued() for old in old_gens)
        shut = sum(self.retire(old) for old in old_gens)
        migrated = (migrate.counters() - before).success
        for old in old_gens:
            reload.reply.progress(
                f"{old.program.name}: generation {old.number}: listeners closed, {len(old.live_workers)} old "
                f"workers stopping (graceful timeout {old.program.graceful_timeout:g} s)")
        self.config = reload.config
        elapsed = _ms(time.monotonic(), reload.started)
        log.info("reload_done", ms=elapsed, listeners_closed=shut, migrated=migrated, queued=queued,
                 generations={g.program.name: g.number for g in reload.generations})
        reload.reply.finish(True, f"{reload.label} done in {elapsed} ms: {shut} old listeners closed, "
                                  f"{migrated} connections migrated", {
            "generations": {g.program.name: g.number for g in reload.generations},
            "retired": {g.program.name: g.number for g in old_gens},
            "listeners_closed": shut, "migrated": migrated, "queued": queued, "ms": elapsed,
        })
        self.systemd.ready(self.describe())
        self.next_request()

    def roll_back(self, reason: str) -> None:
        """Roll back the reload in progress: the serving generations were never touched."""
        reload = self.reload
        assert reload is not None
        self.reload = None
        reload.cancel_timers()
        for gen in reload.generations:
            for w in gen.workers:
                if w.alive and w.pid not in self.workers:
                    self.watch(w, gen)  # spawned before an error: reap it after the rollback
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
            self.systemd.ready(f"{self.describe()}; last {reload.label} failed: {reason}")
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
        if program.stop_delay:
            self.later(program.stop_delay, StopDue(tuple(workers), program.stop_signal))
        else:
            for w in workers:
                w.stop(program.stop_signal)
        self.later(program.stop_delay + program.graceful_timeout, GracefulTimeout(tuple(workers)))

    def record(self, name: str) -> ProgramRuntime:
        """The runtime of a running program, or the ControlError a user should see."""
        record = self.programs.get(name)
        if record is not None and record.serving is not None:
            return record
        if name in {p.name for p in self.config.programs}:
            raise ControlError(f"{name} is not running")
        raise ControlError(f"no program named {name!r}")

    def stop_program(self, name: str, reply: Reply) -> None:
        gen = self.record(name).stopping(by_hand=True)
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
            for event in self.waiting:
                event.reply.finish(False, "supervisord is shutting down")
            self.waiting.clear()
            for record in self.programs.values():
                if record.running and (gen := record.stopping(by_hand=False)):
                    self.retire(gen)
        if fast:
            for record in self.programs.values():
                for gen in record.retiring:
                    gen.kill()

    def on_graceful_timeout(self, workers: tuple[Worker, ...]) -> None:
        stubborn = [w for w in workers if w.alive]
        if stubborn:
            log.warning("graceful_timeout", program=stubborn[0].program, gen=stubborn[0].generation,
                        killing=[w.pid for w in stubborn])
            for w in stubborn:
                w.kill()

    # -- workers: output, exits, readiness ----------------------------------------------------------

    def watch_all(self, gen: Generation) -> None:
        for w in gen.workers:
            self.watch(w, gen)

    def watch(self, w: Worker, gen: Generation) -> None:
        """Turn the worker's exit (pidfd readable) and its stderr output into events."""
        self.workers[w.pid] = (w, gen)
        self.watch_once(w.pidfd, WorkerExited(w))
        self.watch_once(w.stderr, WorkerOutput(w))
        if gen.program.ready is not ReadyMode.NOTIFY:
            self.later(gen.program.settle, ReadinessCheck(w))
        if gen.state is GenerationState.SERVING:  # a restart, scale-up or recycle: no reload times it
            self.later(gen.program.ready_timeout, WorkerReadyTimeout(w))

    def watch_once(self, fd: int, event: Event) -> None:
        if fd < 0:
            return  # no such handle (closed, or a worker of the unit tests' fake spawner)
        loop = asyncio.get_running_loop()

        # Level-triggered readers fire until the condition is handled; post once, re-arm after.
        def fire() -> None:
            loop.remove_reader(fd)
            self.post(event)
        loop.add_reader(fd, fire)

    def on_worker_output(self, w: Worker) -> None:
        for line in w.read_stderr():
            log.info("worker_stderr", program=w.program, gen=w.generation, worker=w.index, pid=w.pid, line=line)
        self.watch_once(w.stderr, WorkerOutput(w))

    def on_worker_exited(self, w: Worker) -> None:
        if w.stderr >= 0:
            asyncio.get_running_loop().remove_reader(w.stderr)
        was = w.state
        if not w.reap():
            self.watch_once(w.pidfd, WorkerExited(w))  # spurious wake-up
            return
        self.on_worker_output(w)
        _, gen = self.workers.pop(w.pid)
        record = self.programs[gen.program.name]
        fields = {"program": w.program, "gen": w.generation, "worker": w.index, "pid": w.pid,
                  "status": w.describe_exit()}
        slot = gen.slot_of(w)
        if self.reload is not None and gen in self.reload.generations:
            log.error("worker_failed_to_start", **fields)
            self.apply(self.reload.worker_exited(gen, w))
        elif gen.state is GenerationState.SERVING and slot and was is not WorkerState.RETIRING:
            # Its listeners were shut when reaped: their queues moved to its siblings.
            record.last_exit = f"worker {w.index} (pid {w.pid}) {w.describe_exit()}"
            if w is slot.replacement:  # a recycling replacement failed; the old worker serves on
                log.error("worker_recycle_failed", **fields)
                slot.replacement_failed(self.clock.time())
            else:
                log.error("worker_crashed", **fields, was=was.value)
                decision = slot.crashed(w, self.clock.time(), record.crash_history(gen.program))
                self.restart_or_fatal(record, gen, decision, w.index)
        else:
            log.info("worker_exited", **fields)
        gen.worker_gone(w)
        self.forget_if_finished(gen)

    def restart_or_fatal(self, record: ProgramRuntime, gen: Generation, decision: Restart | Fatal,
                         index: int) -> None:
        match decision:
            case Fatal(why=why, crashes=crashes):
                record.went_fatal(why)
                log.error("program_fatal", program=record.name, crashes=crashes, window=gen.program.crash_window,
                          serving=len(gen.live_workers))
            case Restart(after=after, restarts=restarts):
                log.info("worker_respawn_scheduled", program=record.name, worker=index, delay=after,
                         restarts=restarts)
                self.later(after, RespawnDue(gen, index))

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

    def on_notify(self, event: NotifyReceived) -> None:
        found = readiness.find_worker(self.workers, event.pid)
        if found is None:
            log.debug("notify_ignored", pid=event.pid, fields=event.fields)
            return
        w, gen = found
        if event.fields.get("READY") == "1" and gen.program.ready is ReadyMode.NOTIFY:
            self.worker_ready(w, gen)

    def on_readiness_check(self, w: Worker) -> None:
        """`ready: accepting`/`settle`: alive for `settle` seconds, and (accepting) polling its listeners."""
        found = self.workers.get(w.pid)
        if found is None or w.state is not WorkerState.STARTING:
            return
        gen = found[1]
        if gen.program.ready is ReadyMode.SETTLE or readiness.polls_listeners(w.pid, w.listeners):
            self.worker_ready(w, gen)
        else:
            self.later(READINESS_POLL, ReadinessCheck(w))

    def worker_ready(self, w: Worker, gen: Generation) -> None:
        if w.state is not WorkerState.STARTING:
            return
        w.mark_ready()
        slot = gen.slot_of(w)
        if gen.state is GenerationState.SERVING and slot is not None:
            if w is slot.replacement:
                old = slot.replacement_ready()
                log.info("worker_recycled", program=w.program, gen=w.generation, worker=w.index, pid=w.pid,
                         old_pid=old.pid if old else None)
                if old is not None:
                    self.stop_later(gen.program, gen.leave([old]))
            else:
                log.info("worker_started", program=w.program, gen=w.generation, worker=w.index, pid=w.pid)
        if self.reload is not None:
            self.apply(self.reload.worker_ready())

    def on_worker_ready_timeout(self, w: Worker) -> None:
        if w.alive and w.state is WorkerState.STARTING:
            found = self.workers.get(w.pid)
            log.error("worker_not_ready", program=w.program, gen=w.generation, worker=w.index, pid=w.pid,
                      timeout=found[1].program.ready_timeout if found else 0)
            w.kill()  # shuts its listeners first

    # -- slots of a serving generation: restart, scale, recycle ------------------------------------

    def on_respawn_due(self, gen: Generation, index: int) -> None:
        slot = gen.slots.get(index)
        record = self.programs[gen.program.name]
        if gen.state is GenerationState.SERVING and not self.stopping and record.fatal is None \
                and slot is not None and slot.worker is None:
            slot.worker = self.spawn_into(gen, index, retry=True)

    def spawn_into(self, gen: Generation, index: int, retry: bool) -> Worker | None:
        """Start one more worker in a serving generation (restart, scale up, recycle) on fresh listeners."""
        try:
            w = gen.spawn(self.spawner_or_fail(), index)
        except (OSError, SupervisorError) as exc:
            log.error("spawn_failed", program=gen.program.name, worker=index, error=str(exc))
            if retry:
                self.later(SPAWN_RETRY, RespawnDue(gen, index))
            return None
        self.watch(w, gen)
        return w

    def scale(self, name: str, count: int, reply: Reply) -> None:
        """`scale NAME N`, TTIN, TTOU: more workers on fresh listeners, or retire the highest indexes."""
        gen = self.record(name).serving
        assert gen is not None
        if not 1 <= count <= 4096:
            raise ControlError(f"workers must be 1..4096, got {count}")
        started = gen.scale_up(count)
        for index in started:
            gen.slots[index].worker = self.spawn_into(gen, index, retry=True)
        leaving = gen.leave(gen.scale_down(count))
        self.stop_later(gen.program, leaving)
        log.info("program_scaled", program=name, workers=count, started=len(started), retiring=len(leaving))
        reply.finish(True, f"{name}: {count} workers ({len(started)} started, {len(leaving)} retiring)")

    def on_recycle_check(self) -> None:
        """Replace workers over max_rss or max_age: the new one listens first, the old one retires once it is ready."""
        now = self.clock.time()
        for record in self.programs.values():
            gen = record.serving
            if gen is None or (gen.program.max_rss is None and gen.program.max_age is None):
                continue
            for slot in [s for s in gen.slots.values() if s.wants_recycling(now)]:
                assert slot.worker is not None
                if reason := slot.recycle_reason(gen.program.max_rss, gen.program.max_age, now):
                    log.info("worker_recycling", program=record.name, gen=gen.number, worker=slot.index,
                             pid=slot.worker.pid, reason=reason)
                    slot.replacement = self.spawn_into(gen, slot.index, retry=False)
        self.later(RECYCLE_POLL, RecycleCheck())

    def on_watchdog_due(self) -> None:
        # Sent from the loop itself: a master stuck in a handler misses its pings and systemd restarts it.
        self.systemd.watchdog()
        assert self.systemd.watchdog_interval
        self.later(self.systemd.watchdog_interval, WatchdogDue())

    # -- views of the records ---------------------------------------------------------------------------

    def running_names(self) -> list[str]:
        return [name for name, r in self.programs.items() if r.serving is not None]

    def stopped_names(self) -> list[str]:
        return [name for name, r in self.programs.items() if r.stopped_by_hand]

    def fatal_names(self) -> list[str]:
        return [name for name, r in self.programs.items() if r.fatal is not None]

    def spawner_or_fail(self) -> Spawner:
        assert self.spawner is not None, "open_sockets() makes the spawner"
        return self.spawner

    def describe(self) -> str:
        """One line for `systemctl status`: what serves now."""
        serving = ", ".join(f"{name}#{r.serving.number} ({len(r.serving.live_workers)} workers)"
                            for name, r in self.programs.items() if r.serving)
        return f"serving {serving}" if serving else "no program running"


def _ms(end: float | None, start: float) -> int:
    return round(((end or start) - start) * 1000)
