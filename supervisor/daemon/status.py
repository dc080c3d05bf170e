"""`status`: the master's state as plain data, with psutil's process facts (`supervisorctl` prints it: ctl/table.py)."""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

import psutil

from supervisor import __version__
from supervisor.config.schema import Config
from supervisor.daemon.facts import Facts
from supervisor.errors import ControlError
from supervisor.model.generation import Generation
from supervisor.model.program import ProgramRuntime
from supervisor.model.roll import Roll
from supervisor.process.worker import Worker
from supervisor.protocol.words import plural
from supervisor.system import procstat


def snapshot(master: Facts, only: str = "") -> dict[str, Any]:
    """What `status` answers: a view of the master's records and nothing else. `only`: that program's
    record alone (ControlError for a name it does not know). docs/status.md is the schema."""
    starting: dict[str, list[Generation]] = {}
    for gen in master.reload.generations if master.reload else []:
        starting.setdefault(gen.program.name, []).append(gen)
    names = [p.name for p in master.config.programs]
    names += [name for name, r in master.programs.items() if name not in names and r.generations()]
    if only:
        if only not in names:
            raise ControlError(f"no program named {only!r}")
        names = [only]
    me = psutil.Process()
    with me.oneshot():
        cpu = me.cpu_times()
        return {
            "pid": me.pid, "config": master.config.path, "uptime": time.monotonic() - master.started,
            "version": __version__, "started_at": _utc(master.started_at),
            "upgraded": None if master.upgraded is None else {
                "at": _utc(master.upgraded["at"]), "from": master.upgraded["from"], "to": master.upgraded["to"]},
            "rss": me.memory_info().rss, "cpu": round(cpu.user + cpu.system, 2), "fds": me.num_fds(),
            "migrate": {"mode": master.migration.mode.value, "enabled": master.migration.enabled,
                        "drains": master.migration.drains, "reason": master.migration.reason},
            "reloading": master.reload is not None,
            "last_reload": None if master.last_reload is None else {
                **master.last_reload, "at": _utc(master.last_reload["at"])},
            "programs": [program_facts(master.programs[name], starting.get(name, []), _listen(master.config, name),
                                       master.reload.rolls.get(name) if master.reload else None) for name in names],
        }


def describe(programs: Mapping[str, ProgramRuntime]) -> str:
    """One line for `systemctl status`: what serves now."""
    serving = ", ".join(f"{name}#{r.serving.number} ({plural(len(r.serving.live_workers), 'worker')})"
                        for name, r in programs.items() if r.serving)
    fatal = ", ".join(name for name, r in programs.items() if r.fatal is not None)
    said = f"serving {serving}" if serving else "no program running"
    return said + (f"; FATAL: {fatal} (supervisorctl status)" if fatal else "")


def program_facts(record: ProgramRuntime, starting: list[Generation], listen: list[str],
                  roll: Roll | None = None) -> dict[str, Any]:
    now = time.monotonic()
    gens = sorted([*record.generations(), *starting], key=lambda g: g.number)
    cert = record.certificate
    return {
        "name": record.name,
        "state": record.state.value,
        "listen": [str(a) for a in record.serving.program.listen] if record.serving else listen,
        "accept_queue": record.serving.program.accept_queue.value if record.serving else None,
        "restarts": record.restarts,
        "generations": [{"generation": g.number, "state": g.state.value, "uptime": round(now - g.started, 1)}
                        for g in gens],
        "workers": [worker_facts(w, g, now) for g in gens for w in g.workers if w.alive],
        "last_exit": record.last_exit,
        "tls": cert.as_dict() if cert else None,
        "fatal": fatal_facts(record.fatal, record.serving) if record.fatal is not None else None,
        "roll": roll.facts() if roll else None,
    }


def worker_facts(w: Worker, gen: Generation, now: float) -> dict[str, Any]:
    slot = gen.slot_of(w)
    facts: dict[str, Any] = {
        "worker": w.index, "pid": w.pid if w.forked else None, "state": w.state.value, "generation": w.generation,
        "leaving": w in gen.leaving,
        "uptime": round(now - w.started, 1), "restarts": slot.restarts if slot else None, "rss": None,
        "cpu": None, "last_exit": slot.last_exit if slot and w is slot.worker else None,
    }
    if w.alive and w.forked and (used := procstat.usage(w.pid)) is not None:
        facts["rss"], facts["cpu"] = used.rss, round(used.cpu, 2)
    return facts


def fatal_facts(reason: str, serving: Generation | None) -> dict[str, Any]:
    """A FATAL program: why, and a row (state "fatal") for each worker slot left empty, from the
    worker that last crashed in it. Its other workers serve on and keep their own state."""
    empty = [slot for index, slot in sorted(serving.slots.items()) if not slot.active] if serving else []
    workers = [{"worker": slot.index, "pid": None, "state": "fatal",
                "generation": serving.number if serving else None,
                "restarts": slot.restarts, "last_exit": slot.last_exit} for slot in empty]
    return {"reason": reason, "workers": workers}


def _listen(config: Config, name: str) -> list[str]:
    """The addresses a program not serving now would listen on (none once it is gone from the config)."""
    return next(([str(a) for a in p.listen] for p in config.programs if p.name == name), [])


def _utc(timestamp: float) -> str:
    import datetime

    return datetime.datetime.fromtimestamp(timestamp, datetime.UTC).isoformat()
