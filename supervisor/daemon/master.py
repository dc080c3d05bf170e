"""The master: one loop, one queue, and the only mutable state of the daemon.

`run()` is the table of contents: open the sockets, start the first generations, then take events
one at a time and `dispatch` them. The state is a record per program (model/program.py), held here
with the pieces that own a part of it: the reload slot and the requests waiting for it
(`reloads.Reloads`), the upgrade in progress (`handover.Upgrade`), the listeners a previous master
left in systemd's fd store (`fdstore.Inherited`), the reuseport groups (`listeners.Groups`). The
records decide (`Commit`, `RollBack`, `Crashed(Restart | Fatal)`, ...); the master applies, in its loop.
docs/design.md tells the whole story; what each event leads to:

| state                     | event                                   | action                                      |
|---------------------------|-----------------------------------------|---------------------------------------------|
| serving                   | reload (HUP, ctl, watch:), (re)start    | config read (reload only), checked; new gens|
| a reload in progress      | READY=1 of its last worker              | steer new connections to them (Commit)      |
| a reload in progress      | one of its workers exits, ready timeout | shut the new listeners, stop them (RollBack)|
| switching                 | SwitchDue (once migrated, drained)      | shut old listeners at once, stop old workers|
| a rolling reload          | a batch ready / its old workers gone    | switch the batch / start the next one       |
| busy (reload, upgrade)    | any request but status, tail, shutdown  | waits in line; piled-up reloads merge       |
| serving                   | a worker crashes                        | its listeners are shut; restart or FATAL    |
| serving                   | RecycleCheck, ManageWorkers             | replace workers over limits; fill slots     |
| workers leaving, draining | LeaveDue (their queues empty)           | shut their listeners, stop them             |
| serving                   | upgrade (USR2, ctl)                     | check the new code, then exec in place      |
| any                       | TERM/INT (QUIT, or twice: fast)         | roll back, shut all, stop; exit when none   |
| retiring workers          | StopDue / GracefulTimeout               | stop signal / SIGKILL                       |
| any                       | SIGCHLD (ChildrenChanged), FilesCheck   | reap and kill orphans; reload on a change   |
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
from typing import Any

import structlog

from supervisor import __version__
from supervisor.config import tls
from supervisor.config.schema import Config, MigrateMode
from supervisor.daemon import events as ev
from supervisor.daemon import handover, metrics, output, retiring, status, workers
from supervisor.daemon.endpoints import Endpoints
from supervisor.daemon.host import Clock
from supervisor.daemon.reloads import Reloads
from supervisor.daemon.stops import StopWaiters
from supervisor.daemon.tally import Tally
from supervisor.daemon.watcher import Watcher
from supervisor.errors import EXIT_FAILED, EXIT_OK, ConfigError, ControlError, SupervisorError
from supervisor.model.drain import Departures
from supervisor.model.exit import StartFailed
from supervisor.model.generation import Generation, Spawner
from supervisor.model.program import ProgramRuntime, serving
from supervisor.model.reload import Reload, ReloadKind
from supervisor.process import preload
from supervisor.process.worker import Spawner as ProcessSpawner
from supervisor.process.worker import Worker
from supervisor.protocol import requests
from supervisor.protocol.reply import Reply
from supervisor.system import logs, migrate, orphans, reaper, watched_files
from supervisor.system.fdstore import FdStore, Inherited
from supervisor.system.listeners import Groups
from supervisor.system.systemd import Notifier

log = structlog.get_logger()


class Master:
    def __init__(self, config: Config, spawner: Spawner | None = None, clock: Clock | None = None) -> None:
        self.config = config
        self.queue: asyncio.Queue[ev.Event] = asyncio.Queue()
        self.clock: Clock = clock or asyncio.get_running_loop()
        self._spawner = spawner  # made by run() once the notify socket exists, unless a test gives one
        self.templates: preload.Templates | None = None  # preload templates, by program and generation
        self.groups = Groups()
        self.migration = migrate.MigrateStatus(config.migrate, False, "not checked yet")
        self.programs: dict[str, ProgramRuntime] = {p.name: ProgramRuntime(p.name) for p in config.programs}
        self.output = output.Output(self.clock)  # what workers wrote: logged in budget, kept for `tail`
        self.watcher = Watcher(self.post, self.later, self.output.record)
        self.reloads = Reloads(self)
        self.upgrade = handover.Upgrade(self)
        self.stop_waiters = StopWaiters()
        self.shutdown_replies: list[Reply] = []
        self.stopping = False
        self.exit_code = EXIT_OK
        self.started, self.started_at = time.monotonic(), time.time()
        self.upgraded: dict[str, Any] | None = None  # the last upgrade: when, from which version
        self.endpoints = Endpoints(config.control, self.post)
        self.systemd = Notifier()
        self.fdstore = FdStore(self.systemd)
        self.inherited = Inherited(self.fdstore)  # listeners a previous master left in the fd store
        self.orphans = orphans.Orphans(lambda: self.post(ev.ChildrenChanged()))
        self.files = watched_files.Files(config.watch)
        self.tally = Tally()  # reloads, drains and restarts, for /metrics
        self.departures = Departures()  # workers leaving a generation, drained first
        self.metrics = metrics.MetricsServer(self.post)

    def restore(self, facts: handover.Restored) -> None:
        """After an upgrade's exec: the records and facts the previous code handed over."""
        self.programs, self.reloads = facts.programs, Reloads(self, first_id=facts.next_reload_id)
        self.started, self.started_at, self.upgraded = facts.started, facts.started_at, facts.upgraded
        self.migration = facts.migration

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
            if adopted is not None:
                raise  # after an upgrade's exec: the workers must outlive this (daemon/main.py)
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
            spawner = ProcessSpawner(self.endpoints.notify_path, self.groups)
            self._spawner = self.templates = preload.Templates(spawner, self.template_woke,
                                                                self.output.record_template)
        for signum in ev.HANDLED_SIGNALS:
            loop.add_signal_handler(signum, self.post, ev.SignalReceived(signum))
        self.orphans.open(loop)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, ev.HANDLED_SIGNALS)  # blocked across an upgrade's exec
        log.info("supervisord_started", pid=os.getpid(), config=self.config.path, control=self.config.control.socket,
                 listen={p.name: [str(a) for a in p.listen] for p in self.config.programs},
                 metrics=str(self.config.metrics.listen) if self.config.metrics else None,
                 version=__version__, upgraded_from=adopted["version"] if adopted else None)
        if adopted is None:
            for a in self.inherited.adopt(self.config, self.groups):
                record = self.programs[a.program]
                record.last_number = max(record.last_number, a.generation)
            self.reloads.begin(ReloadKind.STARTUP, self.config, Reply(origin="startup"), bundles)
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
                if self.reloads.owns(event.reply):
                    self.reloads.roll_back(reason)
                else:
                    self.refuse(event, reason)

    def dispatch(self, event: ev.Event) -> None:
        match event:
            case ev.SignalReceived():
                self.on_signal(event.signum)
            case ev.ControlRequest():
                self.on_request(event)
            case ev.NotifyReceived():
                self.on_notify(event)
            case ev.ReadinessCheck():
                if (w := self.watcher.find(event.worker)) and (found := self.watcher.checked(w)):
                    self.worker_ready(*found)
            case ev.ReadyTimeout():
                self.reloads.timed_out(event.reload_id, event.program, event.generation)
            case ev.SpawnDue():
                self.reloads.spawn_due(event.reload_id, event.program, event.generation)
            case ev.WorkerExited():
                if w := self.watcher.find(event.worker):
                    self.worker_exited(w)
            case ev.WorkerOutput():
                if w := self.watcher.find(event.worker):
                    self.watcher.output(w, event.stream)
            case ev.WorkerReadyTimeout():
                if w := self.watcher.find(event.worker):
                    workers.ready_timeout(self, w)
            case ev.StopDue():
                for w in self.watcher.found(event.workers):
                    w.stop(event.signum)
            case ev.GracefulTimeout():
                workers.kill_stubborn(self.watcher.found(event.workers))
            case ev.ManageWorkers():
                workers.manage(self)
            case ev.RecycleCheck():
                workers.recycle_check(self)
            case ev.LeaveDue():
                workers.departure_due(self, event.departure)
            case ev.RollDue():
                self.reloads.roll_due(event.reload_id, event.program)
            case ev.SwitchDue():
                if self.reloads.switch is not None:
                    self.reloads.finish_switch()
            case ev.TemplateWoke():
                workers.template_woke(self, event)
            case ev.UpgradeChecked():
                self.upgrade.checked(event.timed_out)
            case ev.ChildrenChanged():
                self.check_children()
            case ev.FilesCheck():
                self.check_files()
            case ev.Scrape():
                metrics.answer_scrape(self, event)
            case ev.WatchdogDue():
                # Sent from the loop itself: a master stuck in a handler misses its pings and systemd restarts it.
                self.later(self.systemd.watchdog_interval or 1.0, ev.WatchdogDue())
                self.systemd.watchdog()

    # -- signals and requests ----------------------------------------------------------------------

    def on_signal(self, signum: int) -> None:
        name = signal.Signals(signum).name
        log.info("signal", signal=name)
        if signum in (signal.SIGHUP, signal.SIGUSR2):
            request = requests.Reload() if signum == signal.SIGHUP else requests.Upgrade()
            self.on_request(ev.ControlRequest(request, Reply(origin=name)))
        elif signum == signal.SIGUSR1:
            logs.reopen()  # workers need nothing: their stderr comes through the master
        elif signum in (signal.SIGTTIN, signal.SIGTTOU):  # counted when carried out: it may wait behind a reload
            for record, _gen in serving(self.programs):
                by = 1 if signum == signal.SIGTTIN else -1
                self.on_request(ev.ControlRequest(requests.Scale(record.name, by=by), Reply(origin=record.name)))
        else:  # QUIT, or a second TERM/INT: no more waiting
            self.shutdown(Reply(origin=name), fast=signum == signal.SIGQUIT or self.stopping)

    def on_request(self, event: ev.ControlRequest) -> None:
        request, reply = event.request, event.reply
        try:
            if isinstance(request, requests.Status):
                reply.finish(True, "status", status.snapshot(self, request.program))
            elif isinstance(request, requests.Version):
                reply.finish(True, __version__, {"version": __version__})
            elif isinstance(request, requests.Tail):
                self.output.answer_tail(request, reply, {*self.programs, *(p.name for p in self.config.programs)},
                                        self.stopping)
            elif isinstance(request, requests.Shutdown):
                self.shutdown(reply)
            elif self.stopping:
                reply.finish(False, "supervisord is shutting down")
            elif self.reloads.busy or self.upgrade.busy:
                self.reloads.wait(event)  # also `scale`: the generation it would change is being replaced
            elif isinstance(request, requests.Upgrade):
                self.upgrade.begin(reply)
            elif isinstance(request, requests.Scale):
                workers.scale(self, request, reply)
            elif isinstance(request, requests.Stop):
                retiring.stop_program(self, request.program, reply)
            elif isinstance(request, requests.Start | requests.Restart):
                self.reloads.start(request, reply)
            elif isinstance(request, requests.Reload):
                self.reloads.reload(request, reply, self.metrics.move)
        except (ConfigError, ControlError, migrate.MigrateError) as exc:
            self.refuse(event, str(exc))

    def refuse(self, event: ev.ControlRequest, reason: str) -> None:
        """Answer a request that changed nothing."""
        event.reply.finish(False, reason)
        self.reloads.refused(event.request, reason)

    # -- workers and templates --------------------------------------------------------------------------

    def on_notify(self, event: ev.NotifyReceived) -> None:
        found = self.watcher.notified(event)
        if found is None and self.watcher.pending:
            workers.read_forks(self)  # its template's "forked" message may still wait: then look again
            found = self.watcher.notified(event)
        if found:
            self.worker_ready(*found)

    def worker_ready(self, w: Worker, gen: Generation) -> None:
        workers.ready(self, w, gen)
        self.reloads.worker_ready()

    def worker_exited(self, w: Worker) -> None:
        if (ended := workers.ended(self, w, starting=self.reloads.starting(self.watcher.generation_of(w)))) is None:
            return
        gen, end = ended
        if isinstance(end, StartFailed):
            self.reloads.worker_failed(gen, w)
        retiring.forget_if_finished(self, gen)
        self.reloads.worker_gone(gen)  # a rolled-out worker gone: the next batch may start
        self.check_children()  # what left the worker's session is now the master's: gone with the worker

    def template_woke(self, what: str, program: str, generation: int) -> None:
        self.post(ev.TemplateWoke(what, program, generation))

    # -- what the pieces ask of the master (host.Host) ----------------------------------------------------

    @property
    def spawner(self) -> Spawner:
        assert self._spawner is not None, "run() makes the spawner once the notify socket exists"
        return self._spawner

    @property
    def runtime_dir(self) -> str:
        return self.endpoints.runtime_dir

    @property
    def reload(self) -> Reload | None:
        return self.reloads.current

    @property
    def last_reload(self) -> dict[str, Any] | None:
        return self.reloads.last

    def use_config(self, config: Config) -> None:
        self.config = config

    def startup_failed(self) -> None:
        self.exit_code = EXIT_FAILED
        self.shutdown(Reply(origin="startup failure"))

    def enable_migration(self, mode: MigrateMode) -> None:
        """Set the sysctl as `mode` asks; raises MigrateError under `require` when it cannot."""
        self.migration = migrate.enable(mode)
        # `prefer` running without migration is the one line an operator must not miss
        # (docs/configuration.md, "migrate").
        say = log.warning if mode is MigrateMode.PREFER and not self.migration.enabled else log.info
        say("migration", mode=mode.value, enabled=self.migration.enabled, detail=self.migration.reason)

    # -- children and files ---------------------------------------------------------------------------

    def own_children(self) -> set[int]:
        """The children the master started: its workers, preload templates, and the upgrade check."""
        templates = {t.process.pid for t in self.templates.running.values()} if self.templates else set()
        return set(self.watcher.workers) | templates | self.upgrade.pids()

    def check_children(self) -> None:
        """Orphans (system/orphans.py). A worker a template forked is the master's child before its pid
        is known (the template's answer is on its way): while forks are pending, unknown children wait
        for the next check. One forked from a template carries the template's LISTEN_PID: a live
        template counts as the owner a live worker is."""
        templates = list(self.templates.running.values()) if self.templates else []
        owners = {pid for pid, (w, _) in self.watcher.workers.items() if w.alive}
        self.orphans.check(self.own_children(), owners | {t.process.pid for t in templates if t.alive},
                           hold=any(t.pending for t in templates))

    def check_files(self) -> None:
        """`watch:`: a file changed and then stayed quiet for a look: reload, as `supervisorctl reload` would.
        The next look is armed whatever happens in this one (a failure is the catch-all's to log)."""
        try:
            self.check_children()  # also what a check held back while a template was forking
            self.files.follow(self.config.watch)
            if (changed := self.files.check()) and not self.stopping:
                log.info("watch_changed", paths=changed)
                self.on_request(ev.ControlRequest(requests.Reload(), Reply(origin="watch")))
        finally:
            self.later(watched_files.INTERVAL, ev.FilesCheck())

    # -- retiring, stopping ---------------------------------------------------------------------------

    def shutdown(self, reply: Reply, fast: bool = False) -> None:
        """Stop everything: listeners shut, stop signals sent; the loop ends when no worker is left."""
        self.shutdown_replies.append(reply)
        if not self.stopping:
            log.info("shutting_down", origin=reply.origin, fast=fast)
            self.systemd.stopping()
            self.stopping = True
            if self.reloads.current is not None:
                self.reloads.roll_back("supervisord is shutting down")
            if self.reloads.switch is not None:
                self.reloads.finish_switch(force=True)
            self.upgrade.checked(timed_out=False, refuse="supervisord is shutting down")
            self.reloads.refuse_all("supervisord is shutting down")
            retiring.stop_all(self)
        if fast:
            for record in self.programs.values():
                for gen in record.retiring:
                    gen.kill()
