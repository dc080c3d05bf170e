"""The master's state across an in-place upgrade: written as plain data before the exec, adopted after.

What crosses the exec: every program record (generations, slots, workers by pid and fd numbers,
crash history, FATAL, certificates), the config in force, the master's sockets, the requests that
were waiting (their clients' connections kept open), and the deadlines still to come (stop signals,
kills after `graceful_timeout`, restarts), which are CLOCK_MONOTONIC times and so mean the same
after the exec.
"""

from __future__ import annotations

import os
import socket
import time
from typing import TYPE_CHECKING, Any

from supervisor import __version__, plain, upgrade, wire
from supervisor.config import Config
from supervisor.generation import GenerationState
from supervisor.program import ProgramRuntime
from supervisor.reply import Reply
from supervisor.worker import WorkerState

if TYPE_CHECKING:
    from supervisor.events import ControlRequest
    from supervisor.master import Master


def dump(master: Master, requests: list[ControlRequest], new_version: str) -> tuple[dict[str, Any], list[int]]:
    """The state, and the fds it names (to keep open across the exec)."""
    kept = master.endpoints.kept()
    handed = []
    for event in requests:
        fd = _client_fd(event.reply)
        kept += [fd] if fd is not None else []
        handed.append({"request": wire.to_message(event.request), "origin": event.reply.origin, "fd": fd})
    for record in master.programs.values():
        for gen in record.generations():
            for w in gen.live_workers:
                kept += [w.pidfd, w.stderr, *(listener.fileno() for listener in w.listeners)]
    state = {
        "format": upgrade.FORMAT, "version": __version__, "to_version": new_version,
        "began": time.monotonic(), "config": plain.to_plain(master.config),
        "programs": [record.to_json() for record in master.programs.values()],
        "next_reload_id": next(master.reload_ids), "started": master.started, "started_at": master.started_at,
        "upgraded": master.upgraded, "migration": {"mode": master.migration.mode.value,
                                                  "enabled": master.migration.enabled,
                                                  "reason": master.migration.reason},
        "endpoints": master.endpoints.to_json(), "requests": handed,
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


async def requests_of(state: dict[str, Any]) -> list[tuple[wire.Request, Reply]]:
    """The requests that waited, the first one the upgrade's own, with their clients' connections."""
    import asyncio

    out = []
    for handed in state["requests"]:
        writer = None
        if handed["fd"] is not None:
            try:
                _, writer = await asyncio.open_unix_connection(sock=socket.socket(fileno=handed["fd"]))
            except OSError:
                writer = None  # the client gave up; its request is still carried out
        out.append((wire.parse_request(wire.encode(handed["request"])), Reply(writer, handed["origin"])))
    return out


def summary(state: dict[str, Any], programs: dict[str, ProgramRuntime]) -> str:
    workers = sum(len(gen.live_workers) for r in programs.values() for gen in r.generations())
    running = sum(1 for r in programs.values() if r.serving is not None)
    ms = round((time.monotonic() - state["began"]) * 1000)
    return (f"upgraded {state['version']} -> {__version__} in {ms} ms; {running} program"
            f"{'s' if running != 1 else ''}, {workers} worker{'s' if workers != 1 else ''} kept")


def starting_in_serving(programs: dict[str, ProgramRuntime]) -> list[tuple[Any, Any]]:
    """Workers started outside a reload (restart, scale, recycle) that were not ready yet: their
    ready timeout goes on."""
    return [(w, gen) for r in programs.values() for gen in r.generations()
            if gen.state is GenerationState.SERVING for w in gen.live_workers if w.state is WorkerState.STARTING]
