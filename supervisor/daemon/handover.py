"""The master's state across an in-place upgrade: written as plain data before the exec, adopted after.

`begin` (supervisorctl upgrade, SIGUSR2) starts the check of the installed code (reexec.Check);
`checked` refuses or execs; in the new process `restore` and `adopt` take everything over and
answer the waiting client. reexec.py holds the process mechanics (check child, memfd, exec).

What crosses the exec: every program record (generations, slots, workers by pid and fd numbers,
crash history, FATAL, certificates), the config in force, the master's sockets, the requests that
were waiting (their clients' connections kept open), and the deadlines still to come (stop signals,
kills after `graceful_timeout`, restarts), which are CLOCK_MONOTONIC times and so mean the same
after the exec.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import time
from dataclasses import dataclass
from typing import Any, Protocol

import structlog

from supervisor import __version__
from supervisor.config import plain
from supervisor.config.schema import Config, MigrateMode
from supervisor.daemon import events as ev
from supervisor.daemon import retiring, status
from supervisor.daemon.endpoints import Endpoints
from supervisor.daemon.events import ControlRequest
from supervisor.daemon.host import Host
from supervisor.daemon.reloads import Reloads
from supervisor.model.generation import GenerationState
from supervisor.model.program import ProgramRuntime
from supervisor.process import reexec
from supervisor.process.worker import WorkerState
from supervisor.protocol import requests
from supervisor.protocol.reply import Reply
from supervisor.system import memory, migrate

log = structlog.get_logger()



class Handing(Host, Protocol):
    """What an upgrade reads of the master, besides what every applier may (host.Host)."""

    @property
    def endpoints(self) -> Endpoints: ...
    @property
    def reloads(self) -> Reloads: ...


def dump(master: Handing, waiting: list[ControlRequest], new_version: str) -> tuple[dict[str, Any], list[int]]:
    """The state, and the fds it names (to keep open across the exec)."""
    kept = master.endpoints.kept()
    handed = []
    for event in waiting:
        fd = _client_fd(event.reply)
        kept += [fd] if fd is not None else []
        handed.append({"request": requests.to_message(event.request), "origin": event.reply.origin, "fd": fd})
    for record in master.programs.values():
        for gen in record.generations():
            kept += [listener.fileno() for listener in gen.every_listener()]
            for w in gen.live_workers:
                kept += [w.pidfd, w.stderr.fd, w.stdout.fd]
    state = {
        "format": reexec.FORMAT, "version": __version__, "to_version": new_version,
        "began": time.monotonic(), "config": plain.to_plain(master.config),
        "programs": [record.to_json() for record in master.programs.values()],
        "next_reload_id": next(master.reloads.ids), "started": master.started, "started_at": master.started_at,
        "upgraded": master.upgraded, "migration": {"mode": master.migration.mode.value,
                                                  "enabled": master.migration.enabled,
                                                  "reason": master.migration.reason},
        "endpoints": master.endpoints.to_json(), "requests": handed,
        # Each reuseport group's order as the kernel keeps it (steer.py), by listener fd.
        "orders": master.groups.orders(),
    }
    return state, [fd for fd in kept if fd >= 0]


def _client_fd(reply: Reply) -> int | None:
    """A copy of the connection of the client waiting for this answer (None: a signal asked)."""
    sock = reply.writer.get_extra_info("socket") if reply.writer is not None else None
    return os.dup(sock.fileno()) if sock is not None else None


def config_of(state: dict[str, Any]) -> Config:
    return plain.from_plain(Config, state["config"])


def programs_of(state: dict[str, Any]) -> dict[str, ProgramRuntime]:
    return {data["name"]: ProgramRuntime.from_json(data) for data in state["programs"]}


async def requests_of(state: dict[str, Any]) -> list[tuple[requests.Request, Reply]]:
    """The requests that waited, the first one the upgrade's own, with their clients' connections."""
    out = []
    for handed in state["requests"]:
        writer = None
        if handed["fd"] is not None:
            try:
                _, writer = await asyncio.open_unix_connection(sock=socket.socket(fileno=handed["fd"]))
            except OSError:
                writer = None  # the client gave up; its request is still carried out
        out.append((requests.parse_request(requests.encode(handed["request"])), Reply(writer, handed["origin"])))
    return out


def summary(state: dict[str, Any], programs: dict[str, ProgramRuntime]) -> str:
    workers = sum(len(gen.live_workers) for r in programs.values() for gen in r.generations())
    running = sum(1 for r in programs.values() if r.serving is not None)
    ms = round((time.monotonic() - state["began"]) * 1000)
    return (f"upgraded {state['version']} -> {__version__} in {ms} ms; {running} program"
            f"{'s' if running != 1 else ''}, {workers} worker{'s' if workers != 1 else ''} kept")


# -- the upgrade as the master applies it --------------------------------------------------------

class Upgrade:
    """The upgrade in progress, if any: the check of the new code, its client, its timer."""

    def __init__(self, master: Handing) -> None:
        self.master = master
        self.check: tuple[reexec.Check, Reply, asyncio.TimerHandle] | None = None

    @property
    def busy(self) -> bool:
        return self.check is not None

    def pids(self) -> set[int]:
        return {self.check[0].proc.pid} if self.check else set()

    def begin(self, reply: Reply) -> None:
        """Check the installed code in a child first: after the exec there is no way back."""
        master = self.master
        if master.templates is not None and (preloading := master.templates.names()):
            reply.finish(False, f"upgrade refused, nothing changed: {', '.join(preloading)} preload from a "
                                "template process that an upgrade cannot hand over; reload without preload: first")
            return master.reloads.next_request()
        if master.departures.pending:  # their drains are the master's timers, which an exec does not keep
            reply.finish(False, "upgrade refused, nothing changed: workers leaving a generation are being drained "
                                "(scale down, recycling); try again in a moment")
            return master.reloads.next_request()
        try:
            check = reexec.Check()
        except OSError as exc:
            reply.finish(False, f"upgrade refused, nothing changed: cannot run the new code: {exc}")
            return master.reloads.next_request()
        reply.progress(f"checking the installed code: {' '.join(reexec.command())}")
        self.check = check, reply, master.later(reexec.CHECK_TIMEOUT, ev.UpgradeChecked(timed_out=True))
        master.watcher.once(check.pidfd, ev.UpgradeChecked())

    def checked(self, timed_out: bool, refuse: str | None = None) -> None:
        """The check ended (or timed out, or a shutdown abandons it): exec, or refuse and go on."""
        if self.check is None:
            return
        master = self.master
        (check, reply, timer), self.check = self.check, None
        timer.cancel()
        asyncio.get_running_loop().remove_reader(check.pidfd)
        if timed_out:
            passed, answer = False, f"it did not finish within {reexec.CHECK_TIMEOUT:g} s"
        else:
            passed, answer = check.result()
        check.close()
        if refuse or not passed:
            log.error("upgrade_refused", reason=refuse or answer)
            reply.finish(False, refuse or f"upgrade refused, nothing changed: the new code failed its check: {answer}")
            return master.reloads.next_request()
        self._exec(ev.ControlRequest(requests.Upgrade(), reply), answer)

    def _exec(self, request: ControlRequest, new_version: str) -> None:
        """Write the state, keep its fds open, and exec the installed code in this same process."""
        master = self.master
        log.info("upgrading", version=__version__, to=new_version, pid=os.getpid())
        request.reply.progress(f"new code {new_version} checked; handing over")
        master.systemd.reloading()
        # Blocked from here into the new code's run(): a HUP or TERM in between would end the process
        # (default action) and take the workers with it. The mask survives exec; pending ones wait.
        signal.pthread_sigmask(signal.SIG_BLOCK, ev.HANDLED_SIGNALS)
        state, kept = dump(master, [request, *master.reloads.waiting], new_version)
        state_fd = reexec.write_state(state)
        try:
            reexec.exec_with(state_fd, kept)
        except OSError as exc:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, ev.HANDLED_SIGNALS)
            os.close(state_fd)
            log.error("upgrade_failed", error=str(exc))
            request.reply.finish(False, f"upgrade failed, nothing changed: exec: {exc}")
            master.systemd.ready(status.describe(master.programs))
            master.reloads.next_request()


async def adopt(master: Handing, state: dict[str, Any]) -> None:
    """The new code's first step: watch every live worker again, re-arm the deadlines, answer."""
    restored = {listener.fileno(): listener for r in master.programs.values() for gen in r.generations()
                for listener in gen.every_listener()}
    master.groups.restore(state.get("orders", {}), restored)
    now = master.clock.time()
    for record in master.programs.values():
        for gen in record.generations():
            for w in gen.live_workers:
                master.watcher.watch(w, gen)
                key = master.watcher.key(w)
                if w.stop_at is not None:
                    master.later(max(0.0, w.stop_at - now), ev.StopDue((key,), gen.program.stop_signal))
                if w.kill_at is not None:
                    master.later(max(0.0, w.kill_at - now), ev.GracefulTimeout((key,)))
                elif w.state is WorkerState.STARTING and gen.state is GenerationState.SERVING:
                    master.later(max(0.0, w.started + gen.program.ready_timeout - now), ev.WorkerReadyTimeout(key))
            if gen.state is GenerationState.SERVING and any(s.restart_at is not None for s in gen.slots.values()):
                master.post(ev.ManageWorkers())
            retiring.forget_if_finished(master, gen)
    (request, reply), *waiting = await requests_of(state)
    text = summary(state, master.programs)
    log.info("upgraded", text=text)
    reply.finish(True, text, {"from": state["version"], "to": __version__})
    master.systemd.ready(status.describe(master.programs))
    memory.freeze()
    memory.release()
    for request, reply in waiting:
        master.post(ev.ControlRequest(request, reply))


@dataclass(frozen=True)
class Restored:
    """The master's own facts as the previous code handed them over; Master.restore takes them."""

    programs: dict[str, ProgramRuntime]
    next_reload_id: int
    started: float
    started_at: float
    upgraded: dict[str, Any]
    migration: migrate.MigrateStatus


def restored(state: dict[str, Any]) -> Restored:
    migration = state["migration"]
    return Restored(programs_of(state), state["next_reload_id"], state["started"], state["started_at"],
                    {"at": time.time(), "from": state["version"], "to": __version__},
                    migrate.MigrateStatus(MigrateMode(migration["mode"]), migration["enabled"], migration["reason"]))
