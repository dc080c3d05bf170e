"""The master: one loop, one queue, and the only mutable state of the daemon.

`run()` is the table of contents: enable migration, open the sockets, start the first generations,
then take events one at a time and dispatch them to an `on_*` method. Reloads are serialized: while
one waits for its new generations to become ready, other reload/start/stop requests wait in line.

A reload (see shared/DESIGN.md, "Reload, step by step"):
1. load and check the new config; any error is the reply and nothing changes;
2. start a new generation of every program: new listeners join the same reuseport groups;
3. wait until every new worker said READY=1, or one exits, or `ready_timeout` passes;
4. ready: shut every old listener at once (the kernel moves their queues to the new ones), send the
   old workers their stop signal, kill those still running after `graceful_timeout`;
5. not ready: shut the new listeners (their queues move back) and kill the new workers; the old
   generation never stopped serving.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import itertools
import os
import shutil
import signal
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any

import psutil
import structlog

from supervisor import config as config_module
from supervisor import logs, migrate, preflight, readiness, status, tls, worker
from supervisor.config import Config, MigrateMode, Program, ReadyMode
from supervisor.control import ControlServer, Reply
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
from supervisor.generation import Generation, GenerationState
from supervisor.notify import Notifier
from supervisor.plan import ReloadPlan, plan_reload, plan_start
from supervisor.readiness import NotifySocket
from supervisor.restart import CrashHistory
from supervisor.worker import Worker, WorkerState

log = structlog.get_logger()

HANDLED_SIGNALS = (signal.SIGHUP, signal.SIGTERM, signal.SIGINT, signal.SIGQUIT, signal.SIGUSR1,
                   signal.SIGTTIN, signal.SIGTTOU)
READINESS_POLL = 0.05  # seconds between looks at a worker with `ready: accepting`
RECYCLE_POLL = 1.0  # seconds between looks for workers over max_rss / max_age
RECYCLE_RETRY = 10.0  # after a replacement failed to get ready, leave the old worker this long


@dataclass(eq=False)
class Reload:
    """A reload (or `start`) in progress: new generations waiting to become ready."""

    id: int
    label: str  # "reload" or "start web", for replies and logs
    config: Config
    plan: ReloadPlan
    reply: Reply
    bundles: dict[str, tls.Bundle]  # program -> the certificate and key its new generation is given
    generations: list[Generation] = field(default_factory=list)
    timers: list[asyncio.TimerHandle] = field(default_factory=list)
    started: float = field(default_factory=time.monotonic)


class Master:
    def __init__(self, config: Config) -> None:
        self.config = config
        self.queue: asyncio.Queue[Event] = asyncio.Queue()
        self.loop = asyncio.get_running_loop()
        self.migration = migrate.MigrateStatus(config.migrate, False, "not checked yet")
        self.serving: dict[str, Generation] = {}  # program -> its serving generation
        self.retiring: list[Generation] = []  # old and rolled-back generations until their workers exit
        self.stopped: set[str] = set()  # programs stopped by hand; a reload leaves them stopped
        self.numbers: collections.Counter[str] = collections.Counter()  # last generation number
        self.workers: dict[int, tuple[Worker, Generation]] = {}  # live workers by pid
        self.last_exit: dict[str, str] = {}
        self.crashes: dict[str, CrashHistory] = {}
        self.fatal: dict[str, str] = {}  # crashed too often (-> why); no restarts until a reload or start
        self.exited: dict[str, dict[int, Worker]] = {}  # program -> slot -> its last crashed worker
        self.recycle_after: dict[Worker, float] = {}  # worker -> when to try replacing it again
        self.bundles: dict[str, tls.Bundle] = {}  # checked at startup, for the first generations
        self.certificates: dict[str, tls.Certificate] = {}  # program -> certificate its serving workers got
        self.reload: Reload | None = None
        self.waiting: collections.deque[ControlRequest] = collections.deque()
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
        self.bundles = report.bundles
        try:
            self.enable_migration(self.config.migrate)
        except SupervisorError as exc:
            log.error("migrate_unavailable", error=str(exc))
            return EXIT_FAILED
        try:
            self.open_sockets()
            await self.control_server().start()
        except (OSError, SupervisorError) as exc:
            log.error("startup_failed", error=str(exc))
            self.close_sockets()
            return EXIT_FAILED
        for signum in HANDLED_SIGNALS:
            self.loop.add_signal_handler(signum, self.post, SignalReceived(signum))
        log.info("supervisord_started", pid=os.getpid(), config=self.config.path,
                 control=self.config.control.socket)
        self.on_control_request(ControlRequest("reload", {}, Reply(origin="startup")))
        if self.systemd.watchdog_interval:
            self.post(WatchdogDue())
        self.post(RecycleCheck())
        try:
            while not (self.stopping and not self.workers):
                self.handle(await self.queue.get())
        finally:
            for signum in HANDLED_SIGNALS:
                self.loop.remove_signal_handler(signum)
            for reply in self.shutdown_replies:
                reply.finish(True, "supervisord stopped")
            self.close_sockets()
            self.systemd.close()
        log.info("supervisord_stopped", exit_code=self.exit_code)
        return self.exit_code

    def post(self, event: Event) -> None:
        self.queue.put_nowait(event)

    def handle(self, event: Event) -> None:
        try:
            self.dispatch(event)
        except Exception:
            # A bug in one handler must not take the serving workers down with the master.
            # Not `event=`: that is structlog's first argument, and the TypeError would end the loop.
            log.exception("handler_failed", handling=type(event).__name__)

    def dispatch(self, event: Event) -> None:
        match event:
            case SignalReceived():
                self.on_signal(event)
            case WorkerExited():
                self.on_worker_exited(event.worker)
            case WorkerOutput():
                self.on_worker_output(event.worker)
            case NotifyReceived():
                self.on_notify(event)
            case ControlRequest():
                self.on_control_request(event)
            case ReadyTimeout():
                self.on_ready_timeout(event)
            case StopDue():
                self.on_stop_due(event)
            case GracefulTimeout():
                self.on_graceful_timeout(event.workers)
            case RespawnDue():
                self.on_respawn_due(event)
            case WatchdogDue():
                self.on_watchdog_due()
            case ReadinessCheck():
                self.on_readiness_check(event.worker)
            case WorkerReadyTimeout():
                self.on_worker_ready_timeout(event.worker)
            case RecycleCheck():
                self.on_recycle_check()

    def enable_migration(self, mode: MigrateMode) -> None:
        """Set the sysctl as `mode` asks; raises MigrateError under `require` when it cannot."""
        self.migration = migrate.enable(mode)
        # `prefer` running without migration is the one line an operator must not miss (README).
        say = log.warning if mode is MigrateMode.PREFER and not self.migration.enabled else log.info
        say("migration", mode=mode.value, enabled=self.migration.enabled, detail=self.migration.reason)

    # -- sockets of the master itself -----------------------------------------------------------------

    def open_sockets(self) -> None:
        # Under systemd, RuntimeDirectory= gives a private folder; elsewhere a fresh one in $TMPDIR.
        self.runtime_dir = tempfile.mkdtemp(prefix="supervisord.", dir=os.environ.get("RUNTIME_DIRECTORY"))
        os.chmod(self.runtime_dir, 0o711)  # workers that dropped privileges still reach the notify socket
        self.notify = NotifySocket(os.path.join(self.runtime_dir, "notify.sock"))
        self.loop.add_reader(self.notify.fileno(), self.on_notify_readable)

    def control_server(self) -> ControlServer:
        self.control = ControlServer(self.config.control.socket, self.config.control.mode, self.post)
        return self.control

    def close_sockets(self) -> None:
        if self.control is not None:
            self.control.close()
        if self.notify is not None:
            self.loop.remove_reader(self.notify.fileno())
            self.notify.close()
            self.notify = None
        if self.runtime_dir:
            shutil.rmtree(self.runtime_dir, ignore_errors=True)

    def on_notify_readable(self) -> None:
        assert self.notify is not None
        for pid, fields in self.notify.receive():
            self.post(NotifyReceived(pid, fields))

    # -- signals and requests ----------------------------------------------------------------------

    def on_signal(self, event: SignalReceived) -> None:
        name = signal.Signals(event.signum).name
        log.info("signal", signal=name)
        if event.signum == signal.SIGHUP:
            self.on_control_request(ControlRequest("reload", {}, Reply(origin="SIGHUP")))
        elif event.signum == signal.SIGUSR1:
            logs.reopen()  # workers need nothing: their stderr comes through the master
        elif event.signum in (signal.SIGTTIN, signal.SIGTTOU):
            step = 1 if event.signum == signal.SIGTTIN else -1
            for name, gen in self.serving.items():
                self.on_control_request(ControlRequest(
                    "scale", {"program": name, "workers": max(1, len(gen.active_slots()) + step)}, Reply(origin=name)))
        elif event.signum == signal.SIGQUIT or self.stopping:
            self.shutdown(Reply(origin=name), fast=True)  # QUIT, or a second TERM/INT: no more waiting
        else:
            self.shutdown(Reply(origin=name))

    def on_control_request(self, request: ControlRequest) -> None:
        try:
            self.serve_request(request)
        except Exception as exc:
            # A bug, not the user's error: still answer (the client would wait forever) and free the
            # reload slot (every later request would wait in line behind it).
            log.exception("request_crashed", command=request.command, origin=request.reply.origin)
            reason = f"internal error: {type(exc).__name__}: {exc} (details in the supervisord log)"
            reload = self.reload
            if reload is not None and reload.reply is request.reply:
                for gen in reload.generations:
                    for w in gen.workers:
                        if w.pid not in self.workers:
                            self.watch(w, gen)  # spawned before the error: reap it after the rollback
                self.fail(reason)
            else:
                self.refuse(request, reason)

    def serve_request(self, request: ControlRequest) -> None:
        if request.command == "status":
            request.reply.finish(True, "status", self.snapshot())
        elif request.command == "shutdown":
            self.shutdown(request.reply)
        elif request.command == "scale" and not self.stopping:
            try:
                self.scale(request.args["program"], request.args["workers"], request.reply)
            except ControlError as exc:
                request.reply.finish(False, str(exc))
        elif self.stopping:
            request.reply.finish(False, "supervisord is shutting down")
        elif self.reload is not None:
            request.reply.progress(f"waiting for the {self.reload.label} in progress")
            self.waiting.append(request)
        else:
            try:
                self.begin(request)
            except (ConfigError, ControlError, migrate.MigrateError) as exc:
                self.refuse(request, str(exc))

    def refuse(self, request: ControlRequest, reason: str) -> None:
        """Answer a request that changed nothing."""
        request.reply.finish(False, reason)
        if request.reply.origin == "startup":
            self.exit_code = EXIT_FAILED
            self.shutdown(Reply(origin="startup failure"))
        elif request.command == "reload" and not self.stopping:
            # It sent RELOADING=1 first; Type=notify-reload waits for READY=1 after it (systemd.service(5)).
            self.systemd.ready(f"{self.describe()}; last reload failed: {reason}")
        self.after_reload()

    def begin(self, request: ControlRequest) -> None:
        """Start a reload, a `start` or a `stop`; raises the user's error before anything changes."""
        if request.command == "stop":
            self.stop_program(request.args["program"], request.reply)
            return
        if request.command == "start":
            config = self.config
            plan = plan_start(config, request.args["program"], self.serving, self.fatal)
            # A start is a new generation: its files are checked (and copied) anew, as at a reload.
            bundles = self.preflight(config, request.reply, only=request.args["program"])
        elif request.reply.origin == "startup":
            config, bundles = self.config, self.bundles  # loaded and checked by run()
            self.bundles = {}
            plan = plan_reload(config, self.serving, self.stopped)
        else:
            self.systemd.reloading()  # before anything can fail: each RELOADING=1 gets its READY=1
            config = config_module.load(self.config.path)
            bundles = self.preflight(config, request.reply)
            if config.control != self.config.control:
                request.reply.progress("control socket settings changed: they apply after a restart")
            if config.migrate != self.config.migrate:
                # Applied by maybe_commit() once the new generations serve: a rollback leaves it as it
                # was. `require` is checked now, so a reload that could not honour it starts nothing.
                problem = preflight.migration_problem(config.migrate)
                if problem:
                    raise migrate.MigrateError(problem)
                request.reply.progress(f"migrate: {self.config.migrate.value} -> {config.migrate.value} "
                                       "once the new generation serves")
            plan = plan_reload(config, self.serving, self.stopped)
        label = "reload" if request.command == "reload" else f"start {request.args['program']}"
        reload = Reload(next(self.reload_ids), label, config, plan, request.reply, bundles)
        self.reload = reload
        for program in plan.start:
            try:
                gen = self.new_generation(config, program, bundles.get(program.name))
            except OSError as exc:
                self.fail(f"{program.name}: tls: cannot copy the certificate and key for the workers: {exc}")
                return
            reload.generations.append(gen)
            request.reply.progress(f"{program.name}: generation {gen.number} starting "
                                   f"{program.workers} worker{'s' if program.workers != 1 else ''}")
            try:
                gen.start()
            except (OSError, SupervisorError) as exc:
                self.watch_all(gen)
                self.fail(f"{program.name}: generation {gen.number}: {exc}")
                return
            self.watch_all(gen)
            reload.timers.append(self.loop.call_later(program.ready_timeout, self.post, ReadyTimeout(reload.id)))
        self.maybe_commit()

    def preflight(self, config: Config, reply: Reply, only: str | None = None) -> dict[str, tls.Bundle]:
        """Check `config` (or its program `only`) against the system; raise the problems, say the warnings."""
        report = preflight.check(config, only)
        if report.problems:
            raise ControlError("; ".join(report.problems))
        for warning in report.warnings:
            log.warning("preflight_warning", warning=warning)
            reply.progress(f"warning: {warning}")
        return report.bundles

    def new_generation(self, config: Config, program: Program, bundle: tls.Bundle | None) -> Generation:
        self.numbers[program.name] += 1
        number = self.numbers[program.name]
        if bundle is not None and program.tls is not None:
            # Every worker of the generation, also one restarted, scaled up or recycled later, reads
            # these copies of the bytes just checked: new files on disk wait for the next reload.
            cert, key = bundle.install(self.tls_folder(program.name, number), worker.run_as(program))
            program = dataclasses.replace(program, tls=dataclasses.replace(program.tls, cert=cert, key=key))
        assert self.notify is not None
        return Generation(program, number, preflight.program_cwd(config, program), self.notify.path)

    def tls_folder(self, name: str, number: int) -> str:
        return os.path.join(self.runtime_dir, f"tls.{number}.{name}")  # digits first: no two alike

    def watch_all(self, gen: Generation) -> None:
        for w in gen.workers:
            self.watch(w, gen)

    def watch(self, w: Worker, gen: Generation) -> None:
        """Turn the worker's exit (pidfd readable) and its stderr output into events."""
        self.workers[w.pid] = (w, gen)
        self.watch_once(w.pidfd, WorkerExited(w))
        self.watch_once(w.stderr, WorkerOutput(w))
        if gen.program.ready is not ReadyMode.NOTIFY:
            self.loop.call_later(gen.program.settle, self.post, ReadinessCheck(w))
        if gen.state is GenerationState.SERVING:  # a restart, scale-up or recycle: no reload times it
            self.loop.call_later(gen.program.ready_timeout, self.post, WorkerReadyTimeout(w))

    def watch_once(self, fd: int, event: Event) -> None:
        # Level-triggered readers fire until the condition is handled; post once, re-arm after.
        def fire() -> None:
            self.loop.remove_reader(fd)
            self.post(event)
        self.loop.add_reader(fd, fire)

    # -- readiness and the switch -------------------------------------------------------------------

    def on_notify(self, event: NotifyReceived) -> None:
        found = self.find_worker(event.pid)
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
            self.loop.call_later(READINESS_POLL, self.post, ReadinessCheck(w))

    def worker_ready(self, w: Worker, gen: Generation) -> None:
        if w.state is not WorkerState.STARTING:
            return
        w.mark_ready()
        if gen.state is GenerationState.SERVING:
            if w.replaces is not None and w.replaces.alive:
                log.info("worker_recycled", program=w.program, gen=w.generation, worker=w.index, pid=w.pid,
                         old_pid=w.replaces.pid)
                self.retire_workers(gen, [w.replaces])
            else:
                log.info("worker_started", program=w.program, gen=w.generation, worker=w.index, pid=w.pid)
        self.maybe_commit()

    def on_worker_ready_timeout(self, w: Worker) -> None:
        if w.alive and w.state is WorkerState.STARTING:
            found = self.workers.get(w.pid)
            timeout = found[1].program.ready_timeout if found else 0
            log.error("worker_not_ready", program=w.program, gen=w.generation, worker=w.index, pid=w.pid,
                      timeout=timeout)
            w.shut()
            w.kill()

    def find_worker(self, pid: int) -> tuple[Worker, Generation] | None:
        """The worker that sent a message: the pid itself, or a process started by it (NotifyAccess=all)."""
        if pid in self.workers:
            return self.workers[pid]
        try:
            ancestors = psutil.Process(pid).parents()
        except psutil.Error:
            return None
        return next((self.workers[p.pid] for p in ancestors if p.pid in self.workers), None)

    def maybe_commit(self) -> None:
        reload = self.reload
        if reload is None or not all(g.all_ready() for g in reload.generations):
            return
        if reload.config.migrate != self.config.migrate:
            # Before the old listeners are shut, so that their queues migrate under the new mode.
            try:
                self.enable_migration(reload.config.migrate)
            except migrate.MigrateError as exc:  # `require` checked at begin(), lost since
                self.fail(str(exc))
                return
        before = migrate.counters()
        queued = 0
        for gen in reload.generations:
            gen.mark_serving()
            reload.reply.progress(f"{gen.program.name}: generation {gen.number} ready in "
                                  f"{_ms(gen.ready_at, gen.started)} ms")
        shut = 0
        old_gens = [self.serving.pop(name) for name in reload.plan.retire if name in self.serving]
        for old in old_gens:
            queued += old.queued()
            shut += self.retire(old)
        migrated = (migrate.counters() - before).success
        for old in old_gens:
            reload.reply.progress(
                f"{old.program.name}: generation {old.number}: listeners closed, "
                f"{len(old.live_workers)} old workers stopping (graceful timeout {old.program.graceful_timeout:g} s)")
        for gen in reload.generations:
            self.serving[gen.program.name] = gen
            self.stopped.discard(gen.program.name)  # only now: a failed `start` leaves it stopped
            # A fresh start: crashes of the generations before it no longer count, and the new
            # config's crash_limit/crash_window apply (schedule_respawn makes the history anew).
            self.fatal.pop(gen.program.name, None)
            self.exited.pop(gen.program.name, None)
            self.crashes.pop(gen.program.name, None)
            self.certificates.pop(gen.program.name, None)
            if gen.program.name in reload.bundles:
                self.certificates[gen.program.name] = reload.bundles[gen.program.name].certificate
        self.config = reload.config
        self.cancel(reload.timers)
        self.reload = None
        elapsed = _ms(time.monotonic(), reload.started)
        summary = (f"{reload.label} done in {elapsed} ms: {shut} old listeners closed, "
                   f"{migrated} connections migrated")
        log.info("reload_done", ms=elapsed, listeners_closed=shut, migrated=migrated, queued=queued,
                 generations={g.program.name: g.number for g in reload.generations})
        reload.reply.finish(True, summary, {
            "generations": {g.program.name: g.number for g in reload.generations},
            "retired": {g.program.name: g.number for g in old_gens},
            "listeners_closed": shut, "migrated": migrated, "queued": queued, "ms": elapsed,
        })
        self.systemd.ready(self.describe())
        self.after_reload()

    def on_ready_timeout(self, event: ReadyTimeout) -> None:
        reload = self.reload
        if reload is None or reload.id != event.reload_id:
            return
        late = [g for g in reload.generations
                if not g.all_ready() and time.monotonic() - g.started >= g.program.ready_timeout - 0.001]
        if late:
            gen = late[0]
            ready = sum(w.state is WorkerState.READY for w in gen.workers)
            waited = [w for w in gen.workers if w.state is not WorkerState.READY]
            quoted = next((w for w in waited if w.tail), None)
            self.fail(f"{gen.program.name}: generation {gen.number} not ready within "
                      f"{gen.program.ready_timeout:g} s ({ready} of {len(gen.workers)} workers ready)"
                      + (_stderr_tail(quoted, f" of worker {quoted.index} (pid {quoted.pid})") if quoted else ""))

    def fail(self, reason: str) -> None:
        """Roll back the reload in progress: the serving generations were never touched."""
        reload = self.reload
        assert reload is not None
        self.reload = None
        self.cancel(reload.timers)
        for gen in reload.generations:
            self.stop_later(gen.program, gen.rollback())
            self.track_until_finished(gen)
        still = ", ".join(f"{name}#{g.number}" for name, g in self.serving.items())
        message = f"{reason}; rolled back" + (f", still serving: {still}" if still else "")
        log.error("reload_failed", reason=reason)
        reload.reply.finish(False, message)
        if reload.reply.origin == "startup":
            self.exit_code = EXIT_FAILED
            self.shutdown(Reply(origin="startup failure"))
        elif not self.stopping:  # a shutdown rolled it back: STOPPING=1 was sent, READY=1 would undo it
            self.systemd.ready(f"{self.describe()}; last {reload.label} failed: {reason}")
        self.after_reload()

    def after_reload(self) -> None:
        """Start the next waiting request, if any."""
        while self.reload is None and self.waiting and not self.stopping:
            self.on_control_request(self.waiting.popleft())

    # -- retiring, stopping, exits -------------------------------------------------------------------

    def retire(self, gen: Generation) -> int:
        closed = gen.retire()
        self.track_until_finished(gen)
        self.stop_later(gen.program, gen.live_workers)
        log.info("generation_retiring", program=gen.program.name, gen=gen.number, listeners_closed=closed,
                 workers=len(gen.live_workers))
        return closed

    def retire_workers(self, gen: Generation, workers: list[Worker]) -> None:
        """Retire some workers of a serving generation (scale down, recycle): same as a generation's."""
        for w in workers:
            w.retire()
        self.stop_later(gen.program, workers)

    def stop_later(self, program: Program, workers: list[Worker]) -> None:
        """Workers whose listeners are shut: the stop signal after `stop_delay`, SIGKILL `graceful_timeout` later.

        The delay lets a server read the requests of connections it accepted just before the shut
        (uvicorn closes those unread when it stops); nothing new reaches it, its queue has migrated.
        """
        if not workers:
            return
        if program.stop_delay:
            self.loop.call_later(program.stop_delay, self.post, StopDue(tuple(workers), program.stop_signal))
        else:
            self.on_stop_due(StopDue(tuple(workers), program.stop_signal))
        self.loop.call_later(program.stop_delay + program.graceful_timeout, self.post,
                             GracefulTimeout(tuple(workers)))

    def on_stop_due(self, event: StopDue) -> None:
        for w in event.workers:
            w.signal(event.signum)

    def running(self, name: str) -> Generation:
        """The serving generation of a program, or the ControlError a user should see."""
        if name in self.serving:
            return self.serving[name]
        if name in {p.name for p in self.config.programs}:
            raise ControlError(f"{name} is not running")
        raise ControlError(f"no program named {name!r}")

    def stop_program(self, name: str, reply: Reply) -> None:
        gen = self.serving.pop(self.running(name).program.name)
        self.stopped.add(name)
        for facts in (self.fatal, self.exited, self.crashes):  # stopped by hand, not FATAL any more
            facts.pop(name, None)
        reply.progress(f"{name}: stopping generation {gen.number} ({len(gen.live_workers)} workers)")
        self.retire(gen)
        self.stop_waiters.append((gen, reply))
        self.check_stopped()

    def check_stopped(self) -> None:
        for gen, reply in [(g, r) for g, r in self.stop_waiters if g.finished()]:
            self.stop_waiters.remove((gen, reply))
            reply.finish(True, f"{gen.program.name} stopped")

    def shutdown(self, reply: Reply, fast: bool = False) -> None:
        """Stop everything: listeners shut, stop signals sent; the loop ends when no worker is left."""
        self.shutdown_replies.append(reply)
        if not self.stopping:
            log.info("shutting_down", origin=reply.origin, fast=fast)
            self.systemd.stopping()
            self.stopping = True
            if self.reload is not None:
                self.fail("supervisord is shutting down")
            for request in self.waiting:
                request.reply.finish(False, "supervisord is shutting down")
            self.waiting.clear()
            for name in list(self.serving):
                self.retire(self.serving.pop(name))
        if fast:
            for gen in self.retiring:
                gen.kill()

    def on_graceful_timeout(self, workers: tuple[Worker, ...]) -> None:
        stubborn = [w for w in workers if w.alive]
        if stubborn:
            log.warning("graceful_timeout", program=stubborn[0].program, gen=stubborn[0].generation,
                        killing=[w.pid for w in stubborn])
            for w in stubborn:
                w.kill()

    def on_worker_output(self, w: Worker) -> None:
        for line in w.read_stderr():
            log.info("worker_stderr", program=w.program, gen=w.generation, worker=w.index, pid=w.pid, line=line)
        if w.stderr >= 0:
            self.watch_once(w.stderr, WorkerOutput(w))

    def on_worker_exited(self, w: Worker) -> None:
        if w.stderr >= 0:
            self.loop.remove_reader(w.stderr)
        was = w.state
        if not w.reap():
            self.watch_once(w.pidfd, WorkerExited(w))  # spurious wake-up
            return
        self.on_worker_output(w)
        _, gen = self.workers.pop(w.pid)
        self.recycle_after.pop(w, None)
        fields = {"program": w.program, "gen": w.generation, "worker": w.index, "pid": w.pid,
                  "status": w.describe_exit()}
        if self.reload is not None and gen in self.reload.generations:
            log.error("worker_failed_to_start", **fields)
            self.fail(f"{w.program}: generation {gen.number} worker {w.index} (pid {w.pid}) "
                      f"{w.describe_exit()} before it was ready" + _stderr_tail(w))
        elif gen.state is GenerationState.SERVING and was is not WorkerState.RETIRING and not self.stopping:
            # Its listeners were shut when reaped: their queues moved to its siblings.
            self.last_exit[w.program] = f"worker {w.index} (pid {w.pid}) {w.describe_exit()}"
            if w.replaces is not None:  # a recycling replacement failed; the old worker serves on
                log.error("worker_recycle_failed", **fields)
                w.replaces.replaced_by = None
                self.recycle_after[w.replaces] = time.monotonic() + RECYCLE_RETRY
            else:
                log.error("worker_crashed", **fields, was=was.value)
                self.exited.setdefault(w.program, {})[w.index] = w
                self.schedule_respawn(gen, w)
        else:
            log.info("worker_exited", **fields)
        if gen.state is GenerationState.SERVING:
            gen.workers.remove(w)
        elif gen.finished():
            self.forget(gen)
        self.check_stopped()

    def track_until_finished(self, gen: Generation) -> None:
        """Keep a retiring or rolled-back generation in `status` until its last worker has exited."""
        self.retiring.append(gen)
        if gen.finished():
            self.forget(gen)

    def forget(self, gen: Generation) -> None:
        if gen in self.retiring:
            self.retiring.remove(gen)
        if gen.program.tls is not None:
            shutil.rmtree(self.tls_folder(gen.program.name, gen.number), ignore_errors=True)
        if gen.state is GenerationState.RETIRING:
            gen.state = GenerationState.RETIRED
        log.info("generation_finished", program=gen.program.name, gen=gen.number, state=gen.state.value)

    def schedule_respawn(self, gen: Generation, w: Worker) -> None:
        history = self.crashes.setdefault(w.program, CrashHistory(gen.program.crash_limit, gen.program.crash_window))
        decision = history.record(time.monotonic(), time.monotonic() - w.started, w.restarts)
        if decision.delay is None:
            self.fatal[w.program] = f"{decision.crashes} crashes within {history.window:g} s"
            log.error("program_fatal", program=w.program, crashes=decision.crashes, window=history.window,
                      serving=len(gen.live_workers))
            return
        log.info("worker_respawn_scheduled", program=w.program, worker=w.index, delay=decision.delay,
                 restarts=decision.restarts)
        self.loop.call_later(decision.delay, self.post,
                             RespawnDue(gen, w.index, decision.restarts, w.describe_exit()))

    def on_respawn_due(self, event: RespawnDue) -> None:
        gen = event.generation
        if (gen.state is not GenerationState.SERVING or self.stopping or gen.program.name in self.fatal
                or event.index >= gen.size or event.index in gen.active_slots()):
            return
        self.add_worker(gen, event.index, event.restarts, event.previous_exit)

    def add_worker(self, gen: Generation, index: int, restarts: int = 0, previous_exit: str | None = None,
                   replaces: Worker | None = None) -> Worker | None:
        """Start one more worker in a serving generation (restart, scale up, recycle) on fresh listeners."""
        try:
            w = gen.spawn(index, restarts)
        except (OSError, SupervisorError) as exc:
            log.error("spawn_failed", program=gen.program.name, worker=index, error=str(exc))
            if replaces is None:
                self.loop.call_later(RECYCLE_RETRY, self.post, RespawnDue(gen, index, restarts + 1, previous_exit))
            return None
        w.previous_exit, w.replaces = previous_exit, replaces
        if replaces is not None:
            replaces.replaced_by = w
        gen.workers.append(w)
        gen.workers.sort(key=lambda x: x.index)
        self.watch(w, gen)
        return w

    def scale(self, name: str, count: int, reply: Reply) -> None:
        """`scale NAME N`, TTIN, TTOU: more workers on fresh listeners, or retire the highest indexes."""
        gen = self.running(name)
        if not 1 <= count <= 4096:
            raise ControlError(f"workers must be 1..4096, got {count}")
        gen.size = count
        slots = gen.active_slots()
        for index in sorted(set(range(count)) - slots):
            self.add_worker(gen, index)
        extra = [w for w in gen.workers if w.alive and w.index >= count and w.state is not WorkerState.RETIRING]
        self.retire_workers(gen, extra)
        log.info("program_scaled", program=name, workers=count, started=len(set(range(count)) - slots),
                 retiring=len(extra))
        reply.finish(True, f"{name}: {count} workers ({len(set(range(count)) - slots)} started, "
                           f"{len(extra)} retiring)")

    def on_recycle_check(self) -> None:
        """Replace workers over max_rss or max_age: the new one listens first, the old one retires once it is ready."""
        now = time.monotonic()
        for gen in list(self.serving.values()):
            program = gen.program
            if program.max_rss is None and program.max_age is None:
                continue
            for w in [w for w in gen.workers if w.state is WorkerState.READY and w.replaced_by is None]:
                if self.recycle_after.get(w, 0) > now:
                    continue
                reason = recycle_reason(w, program.max_rss, program.max_age, now)
                if reason:
                    log.info("worker_recycling", program=w.program, gen=w.generation, worker=w.index, pid=w.pid,
                             reason=reason)
                    self.add_worker(gen, w.index, w.restarts, replaces=w)
        self.loop.call_later(RECYCLE_POLL, self.post, RecycleCheck())

    def on_watchdog_due(self) -> None:
        # Sent from the loop itself: a master stuck in a handler misses its pings and systemd restarts it.
        self.systemd.watchdog()
        assert self.systemd.watchdog_interval
        self.loop.call_later(self.systemd.watchdog_interval, self.post, WatchdogDue())

    def describe(self) -> str:
        """One line for `systemctl status`: what serves now."""
        serving = ", ".join(f"{name}#{g.number} ({len(g.live_workers)} workers)" for name, g in self.serving.items())
        return f"serving {serving}" if serving else "no program running"

    # -- status -----------------------------------------------------------------------------------------

    def snapshot(self) -> dict[str, Any]:
        gens: dict[str, list[Generation]] = collections.defaultdict(list)
        for gen in [*self.serving.values(), *(self.reload.generations if self.reload else []), *self.retiring]:
            gens[gen.program.name].append(gen)
        names = list(dict.fromkeys([*(p.name for p in self.config.programs), *gens]))
        programs = []
        for name in names:
            if name in self.fatal:
                state = "fatal"
            elif name in self.serving:
                state = "serving"
            elif self.reload and any(g.program.name == name for g in self.reload.generations):
                state = "starting"
            elif name in self.stopped:
                state = "stopped"
            else:
                state = "stopping" if gens[name] else "stopped"
            cert = self.certificates.get(name)
            facts = status.program_facts(name, state, sorted(gens[name], key=lambda g: g.number),
                                         self.last_exit.get(name), cert.as_dict() if cert else None)
            if name in self.fatal:
                facts["fatal"] = status.fatal_facts(self.fatal[name], self.serving.get(name),
                                                    self.exited.get(name, {}))
            programs.append(facts)
        me = psutil.Process()
        with me.oneshot():
            cpu = me.cpu_times()
            return {
                "pid": os.getpid(), "config": self.config.path, "uptime": time.monotonic() - self.started,
                "rss": me.memory_info().rss, "cpu": round(cpu.user + cpu.system, 2), "fds": me.num_fds(),
                "migrate": {"mode": self.migration.mode.value, "enabled": self.migration.enabled,
                            "reason": self.migration.reason},
                "reloading": self.reload is not None, "programs": programs,
            }

    @staticmethod
    def cancel(timers: list[asyncio.TimerHandle]) -> None:
        for timer in timers:
            timer.cancel()
        timers.clear()


def recycle_reason(w: Worker, max_rss: int | None, max_age: float | None, now: float) -> str | None:
    if max_age is not None and now - w.started > max_age:
        return f"age {now - w.started:.0f} s > max_age {max_age:g} s"
    if max_rss is not None:
        try:
            rss = psutil.Process(w.pid).memory_info().rss
        except psutil.Error:
            return None
        if rss > max_rss:
            return f"rss {rss >> 20} MiB > max_rss {max_rss >> 20} MiB"
    return None


def _stderr_tail(w: Worker, whose: str = "") -> str:
    """The worker's last stderr lines, for the reason of a rollback."""
    tail = "".join(f"\n  {line}" for line in list(w.tail)[-10:])
    return f"; last stderr lines{whose}:{tail}" if tail else ""


def _ms(end: float | None, start: float) -> int:
    return round(((end or start) - start) * 1000)
