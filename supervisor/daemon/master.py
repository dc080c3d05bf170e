"""The master: one loop, one queue, and the only mutable state of the daemon.

`run()` is the table of contents: open the sockets, start the first generations, then take events
one at a time and dispatch them. The state is a record per program (`program.ProgramRuntime`), the
reload in progress (`reload.Reload`) and the requests waiting behind it; the records decide
(`reload.Commit`, `restart.Restart`, ...) and the master applies, in its loop, through the module of
each concept: `reload` (begin, commit, switch, roll back), `workers` (ready, ended, restarts, scale,
recycling), `handover` (upgrade in place). A reload (shared/DESIGN.md):
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

from supervisor import __version__
from supervisor.config import tls
from supervisor.config.schema import Config, MigrateMode, Program
from supervisor.daemon import events as ev
from supervisor.daemon import handover, metrics, output, status, workers
from supervisor.daemon.endpoints import Endpoints
from supervisor.daemon.output import Output
from supervisor.daemon.watcher import Watcher
from supervisor.errors import EXIT_FAILED, EXIT_OK, ConfigError, ControlError, SupervisorError
from supervisor.model import reload as reloading
from supervisor.model.generation import Generation, GenerationState, Spawner
from supervisor.model.plan import plan_reload, plan_start
from supervisor.model.program import ProgramRuntime, names, serving
from supervisor.model.reload import Reload, ReloadKind, Switch
from supervisor.process import preload, reexec
from supervisor.process.worker import Spawner as ProcessSpawner
from supervisor.process.worker import Worker
from supervisor.protocol import requests
from supervisor.protocol.reply import Replies, Reply
from supervisor.system import fdstore, listeners, logs, migrate, orphans, reaper, watched_files
from supervisor.system.fdstore import Adopted, FdStore
from supervisor.system.systemd import Notifier
from supervisor.system.watched_files import Files

log = structlog.get_logger()



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
        self.templates: preload.Templates | None = None  # preload templates, by program and generation
        self.migration = migrate.MigrateStatus(config.migrate, False, "not checked yet")
        self.programs: dict[str, ProgramRuntime] = {p.name: ProgramRuntime(p.name) for p in config.programs}
        self.output = Output()  # the last stderr lines of each program, and `tail -f` followers
        self.watcher = Watcher(self.post, self.later, self.output.record)
        self.reload: Reload | None = None
        self.switch: Switch | None = None  # a committed reload whose old listeners wait SWITCH_DRAIN
        self.waiting: collections.deque[ev.ControlRequest] = collections.deque()  # behind the reload
        self.stop_waiters: list[tuple[Generation, Reply]] = []
        self.shutdown_replies: list[Reply] = []
        self.stopping = False
        self.exit_code = EXIT_OK
        self.started, self.started_at = time.monotonic(), time.time()
        self.upgraded: dict[str, Any] | None = None  # the last upgrade: when, from which version
        self.upgrade: tuple[reexec.Check, Reply, asyncio.TimerHandle] | None = None  # new code being checked
        self.reload_ids = itertools.count(1)
        self.endpoints = Endpoints(config.control, self.post)
        self.systemd = Notifier()
        self.fdstore = FdStore(self.systemd)
        self.adopted: list[Adopted] = []  # listeners a previous master left in the fd store, until shut
        self.orphans = orphans.Orphans(lambda: self.post(ev.ChildrenChanged()))
        self.files = Files(config.watch)
        self.tally = metrics.Tally()  # reloads and restarts, for /metrics
        self.metrics = metrics.MetricsServer(self.post)

    # -- the loop ---------------------------------------------------------------------------------

    async def run(self, bundles: dict[str, tls.Bundle] | None = None, adopted: dict[str, Any] | None = None) -> int:
        """Serve until shut down: a config that passed its preflight (`bundles`: its checked certificates),
        or the state a master handed over before its exec (`adopted`)."""
        loop = asyncio.get_running_loop()
        try:
            if adopted is None:
                self.enable_migration(self.config.migrate)
                await self.endpoints.open()
                await self.metrics.open(self.config.metrics)
            else:
                await self.endpoints.adopt(adopted["endpoints"])
        except (OSError, SupervisorError) as exc:
            log.error("migrate_unavailable" if isinstance(exc, migrate.MigrateError) else "startup_failed",
                      error=str(exc))
            self.endpoints.close()
            return EXIT_FAILED
        if adopted is not None:
            try:  # the exec closed the old endpoint; the workers serve on whatever happens to it
                await self.metrics.open(self.config.metrics)
            except SupervisorError as exc:
                log.error("metrics_unavailable", error=str(exc))
        reaper.become_subreaper()  # descendants that leave a worker's session stay ours to reap and kill
        if self._spawner is None:
            self._spawner = self.templates = preload.Templates(ProcessSpawner(self.endpoints.notify_path), self.post)
        for signum in ev.HANDLED_SIGNALS:
            loop.add_signal_handler(signum, self.post, ev.SignalReceived(signum))
        self.orphans.open(loop)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, ev.HANDLED_SIGNALS)  # blocked across an upgrade's exec
        log.info("supervisord_started", pid=os.getpid(), config=self.config.path, control=self.config.control.socket,
                 version=__version__, upgraded_from=adopted["version"] if adopted else None)
        if adopted is None:
            self.adopt_stored_listeners()
            reloading.begin(self, ReloadKind.STARTUP, self.config, Reply(origin="startup"), bundles)
        else:
            await handover.adopt(self, adopted)
        self.post(ev.RecycleCheck())
        self.post(ev.ChildrenChanged())  # orphans a previous master (an upgrade) left unreaped
        self.later(watched_files.INTERVAL, ev.FilesCheck())
        if self.systemd.watchdog_interval:
            self.post(ev.WatchdogDue())
        try:
            while not self.done():
                self.handle(await self.queue.get())
        finally:
            for signum in ev.HANDLED_SIGNALS:
                loop.remove_signal_handler(signum)
            self.orphans.close(loop)
            self.orphans.stop(self.own_children())
            self.output.close("supervisord stopped")
            for reply in self.shutdown_replies:
                reply.finish(True, "supervisord stopped")
            self.metrics.close()
            self.endpoints.close()
            self.systemd.close()
        log.info("supervisord_stopped", exit_code=self.exit_code)
        return self.exit_code

    @property
    def spawner(self) -> Spawner:
        assert self._spawner is not None, "run() makes the spawner once the notify socket exists"
        return self._spawner

    def done(self) -> bool:
        """Shutting down, and no worker left to wait for."""
        return self.stopping and not self.watcher.workers and not self.watcher.pending

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
                    reloading.roll_back(self, reason)
                else:
                    self.refuse(event, reason)

    def dispatch(self, event: ev.Event) -> None:
        match event:
            case ev.SignalReceived():
                self.on_signal(event.signum)
            case ev.ControlRequest():
                self.on_request(event)
            case ev.NotifyReceived():
                found = self.watcher.notified(event)
                if found is None and self.watcher.pending and self.templates:
                    # A preload worker's READY=1 may be read before its template's "forked" message,
                    # sent before the worker could run: read those, then look again.
                    for t in list(self.templates.running.values()):
                        preload.message(self, t)
                    found = self.watcher.notified(event)
                if found:
                    workers.worker_ready(self, *found)
            case ev.ReadinessCheck():
                if found := self.watcher.checked(event.worker):
                    workers.worker_ready(self, *found)
            case ev.ReadyTimeout():
                if self.reload is not None and self.reload.id == event.reload_id:
                    reloading.apply(self, self.reload.timed_out(event.generation))
            case ev.WorkerExited():
                workers.worker_exited(self, event.worker)
            case ev.WorkerOutput():
                self.watcher.output(event.worker)
            case ev.WorkerReadyTimeout():
                workers.ready_timeout(self, event.worker)
            case ev.StopDue():
                for w in event.workers:
                    w.stop(event.signum)
            case ev.GracefulTimeout():
                self.on_graceful_timeout(event.workers)
            case ev.ManageWorkers():
                workers.manage(self)
            case ev.RecycleCheck():
                workers.recycle_check(self)
            case ev.RollDue():
                reloading.roll_due(self, event.reload_id, event.program)
            case ev.SwitchDue():
                if self.switch is not None:
                    reloading.finish_switch(self)
            case ev.TemplateMessage():
                preload.message(self, event.template)
            case ev.TemplateExited():
                preload.exited(self, event.template)
            case ev.TemplateOutput():
                preload.output(self, event.template)
            case ev.UpgradeChecked():
                handover.checked(self, event.timed_out)
            case ev.ChildrenChanged():
                self.check_children()
            case ev.FilesCheck():
                self.check_files()
            case ev.Scrape():
                metrics.answer_scrape(self, event)
            case ev.WatchdogDue():
                # Sent from the loop itself: a master stuck in a handler misses its pings and systemd restarts it.
                self.systemd.watchdog()
                self.later(self.systemd.watchdog_interval or 1.0, ev.WatchdogDue())

    def own_children(self) -> set[int]:
        """The children the master started: its workers, preload templates, and the upgrade check."""
        templates = {t.process.pid for t in self.templates.running.values()} if self.templates else set()
        return set(self.watcher.workers) | templates | ({self.upgrade[0].proc.pid} if self.upgrade else set())

    def check_children(self) -> None:
        """Orphans (orphans.py). A worker a template forked is the master's child before its pid is
        known (the template's answer is on its way): while forks are pending, unknown children wait
        for the next check. One forked from a template carries the template's LISTEN_PID: a live
        template counts as the owner a live worker is."""
        templates = list(self.templates.running.values()) if self.templates else []
        owners = {pid for pid, (w, _) in self.watcher.workers.items() if w.alive}
        self.orphans.check(self.own_children(), owners | {t.process.pid for t in templates if t.alive},
                           hold=any(t.pending for t in templates))

    def check_files(self) -> None:
        """`watch:`: a file changed and then stayed quiet for a look: reload, as `supervisorctl reload` would."""
        self.check_children()  # also what a check held back while a template was forking
        self.files.follow(self.config.watch)
        if (changed := self.files.check()) and not self.stopping:
            log.info("watch_changed", paths=changed)
            self.on_request(ev.ControlRequest(requests.Reload(), Reply(origin="watch")))
        self.later(watched_files.INTERVAL, ev.FilesCheck())

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
            request = requests.Reload() if signum == signal.SIGHUP else requests.Upgrade()
            self.on_request(ev.ControlRequest(request, Reply(origin=name)))
        elif signum == signal.SIGUSR1:
            logs.reopen()  # workers need nothing: their stderr comes through the master
        elif signum in (signal.SIGTTIN, signal.SIGTTOU):
            for record, gen in serving(self.programs):
                count = max(1, len(gen.active_slots()) + (1 if signum == signal.SIGTTIN else -1))
                self.on_request(ev.ControlRequest(requests.Scale(record.name, count), Reply(origin=record.name)))
        else:  # QUIT, or a second TERM/INT: no more waiting
            self.shutdown(Reply(origin=name), fast=signum == signal.SIGQUIT or self.stopping)

    def on_request(self, event: ev.ControlRequest) -> None:
        request, reply = event.request, event.reply
        try:
            if isinstance(request, requests.Status):
                reply.finish(True, "status", status.snapshot(self))
            elif isinstance(request, requests.Tail):
                self.tail(request, reply)
            elif isinstance(request, requests.Shutdown):
                self.shutdown(reply)
            elif self.stopping:
                reply.finish(False, "supervisord is shutting down")
            elif self.reload is not None or self.upgrade is not None or self.switch is not None:
                # Also `scale`: the generation it would change is being replaced.
                reply.progress(f"waiting for the {self.reload.label if self.reload else 'upgrade'} in progress")
                self.waiting.append(event)
            elif isinstance(request, requests.Upgrade):
                handover.begin(self, reply)
            elif isinstance(request, requests.Scale):
                workers.scale(self, request.program, request.workers, reply)
            elif isinstance(request, requests.Stop):
                self.stop_program(request.program, reply)
            elif isinstance(request, requests.Start):
                plan = plan_start(self.config, request.program, names(self.programs, running=True),
                                  names(self.programs, fatal=True))
                # A start is a new generation: its files are checked (and copied) anew, as at a reload.
                bundles = reloading.check(self.config, reply, only=request.program)
                reloading.begin(self, ReloadKind.START, self.config, reply, bundles, plan)
            elif isinstance(request, requests.Reload):
                self.systemd.reloading()  # before anything can fail: each RELOADING=1 gets its READY=1
                config, bundles = reloading.load_new_config(self.config, reply, request.programs)
                plan = plan_reload(config, names(self.programs, running=True), names(self.programs, by_hand=True),
                                   request.programs)
                if moved := self.metrics.move(config.metrics):
                    reply.progress(moved)
                reloading.begin(self, ReloadKind.RELOAD, config, reply, bundles, plan)
        except (ConfigError, ControlError, migrate.MigrateError) as exc:
            self.refuse(event, str(exc))

    def tail(self, request: requests.Tail, reply: Reply) -> None:
        """`tail [-n N] [-f] PROGRAM`: its last stderr lines; with -f the reply stays open for new ones."""
        if request.program not in self.programs and request.program not in {p.name for p in self.config.programs}:
            raise ControlError(f"no program named {request.program!r}")
        if not 0 <= request.lines <= output.LINES:
            raise ControlError(f"lines must be 0..{output.LINES}, got {request.lines}")
        self.output.tail(request.program, request.lines, reply)
        if request.follow and not self.stopping:
            self.output.follow(request.program, reply)
        else:
            reply.finish(True, "")

    def refuse(self, event: ev.ControlRequest, reason: str) -> None:
        """Answer a request that changed nothing."""
        event.reply.finish(False, reason)
        if isinstance(event.request, requests.Reload):
            self.tally.reloaded("refused")
        if isinstance(event.request, requests.Reload) and not self.stopping:
            # It sent RELOADING=1 first; Type=notify-reload waits for READY=1 after it (systemd.service(5)).
            self.systemd.ready(f"{status.describe(self.programs)}; last reload failed: {reason}")
        self.next_request()

    def next_request(self) -> None:
        """The reload slot is free: the requests that waited for it go back on the queue, in order.

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
        while self.waiting and self.reload is None and self.upgrade is None and self.switch is None:
            self.post(self.waiting.popleft())

    # -- reloads: begin, then apply what the reload decides --------------------------------------------

    # -- retiring, stopping ---------------------------------------------------------------------------

    def retire(self, gen: Generation) -> int:
        """Shut every listener of `gen` at once; its workers' stop signals follow after stop_delay."""
        closed = gen.retire()
        self.generation_over(gen)
        # Those that left it before (scaled down, recycled, rolled out) were given their stop already.
        self.stop_later(gen.program, [w for w in gen.live_workers if w not in gen.leaving])
        log.info("generation_retiring", program=gen.program.name, gen=gen.number, listeners_closed=closed,
                 workers=len(gen.live_workers))
        self.forget_if_finished(gen)
        return closed

    def generation_over(self, gen: Generation) -> None:
        """`gen` starts no more workers: its preload template, if any, exits."""
        if self.templates is not None:
            self.templates.retire(self, gen.program.name, gen.number)

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
                reloading.roll_back(self, "supervisord is shutting down")
            if self.switch is not None:
                reloading.finish_switch(self)
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
                    self.generation_over(gen)
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
