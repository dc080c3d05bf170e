"""`status`: the master's state as plain data (with psutil's process facts), and as a table."""

from __future__ import annotations

import time
from collections.abc import Mapping

from supervisor import __version__

# supervisorctl imports this module for render(): keep its start fast (psutil and datetime are
# imported where the master calls them; typing not at all).
TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (supervisorctl's start: bench footprint)
if TYPE_CHECKING:
    from typing import Any

    from supervisor.daemon.master import Master
    from supervisor.model.generation import Generation
    from supervisor.model.program import ProgramRuntime
    from supervisor.model.roll import Roll
    from supervisor.process.worker import Worker


def snapshot(master: Master) -> dict[str, Any]:
    """What `status` answers: a view of the master's records and nothing else."""
    import psutil

    starting: dict[str, list[Generation]] = {}
    for gen in master.reload.generations if master.reload else []:
        starting.setdefault(gen.program.name, []).append(gen)
    names = [p.name for p in master.config.programs]
    names += [name for name, r in master.programs.items() if name not in names and r.generations()]
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
                        "reason": master.migration.reason},
            "reloading": master.reload is not None,
            "programs": [program_facts(master.programs[name], starting.get(name, []),
                                       master.reload.rolls.get(name) if master.reload else None) for name in names],
        }


def describe(programs: Mapping[str, ProgramRuntime]) -> str:
    """One line for `systemctl status`: what serves now."""
    serving = ", ".join(f"{name}#{r.serving.number} ({len(r.serving.live_workers)} workers)"
                        for name, r in programs.items() if r.serving)
    return f"serving {serving}" if serving else "no program running"


def program_facts(record: ProgramRuntime, starting: list[Generation], roll: Roll | None = None) -> dict[str, Any]:
    now = time.monotonic()
    gens = sorted([*record.generations(), *starting], key=lambda g: g.number)
    cert = record.certificate
    return {
        "name": record.name,
        "state": record.state.value,
        "generations": [{"generation": g.number, "state": g.state.value} for g in gens],
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
        "uptime": round(now - w.started, 1), "restarts": slot.restarts if slot else None, "rss": None,
        "cpu": None, "last_exit": slot.last_exit if slot and w is slot.worker else None,
    }
    if w.alive and w.forked:
        import psutil

        try:
            proc = psutil.Process(w.pid)
            with proc.oneshot():
                facts["rss"] = proc.memory_info().rss
                cpu = proc.cpu_times()
                facts["cpu"] = round(cpu.user + cpu.system, 2)
        except psutil.Error:
            pass
    return facts


def fatal_facts(reason: str, serving: Generation | None) -> dict[str, Any]:
    """A FATAL program: why, and a row (state "fatal") for each worker slot left empty, from the
    worker that last crashed in it. Its other workers serve on and keep their own state."""
    empty = [slot for index, slot in sorted(serving.slots.items()) if not slot.active] if serving else []
    workers = [{"worker": slot.index, "pid": None, "state": "fatal",
                "generation": serving.number if serving else None,
                "restarts": slot.restarts, "last_exit": slot.last_exit} for slot in empty]
    return {"reason": reason, "workers": workers}


def render(data: Mapping[str, Any]) -> str:
    """The table `supervisorctl status` prints."""
    migrate = data["migrate"]
    upgraded = data.get("upgraded")
    lines = [
        f"supervisord {data.get('version', '?')} pid {data['pid']}, up {_duration(data['uptime'])} "
        f"(since {str(data.get('started_at', '?'))[:19].replace('T', ' ')} UTC), config {data['config']}"
        + (f"; upgraded from {upgraded['from']} at {upgraded['at'][:19].replace('T', ' ')} UTC" if upgraded else ""),
        f"migration: {migrate['mode']} ({'on' if migrate['enabled'] else 'OFF'}: {migrate['reason']})",
        "",
        f"{'PROGRAM':<16}{'GEN':>5}  {'WORKER':>6}  {'PID':>8}  {'STATE':<10}{'UPTIME':>9}"
        f"{'RSS':>10}{'CPU':>8}{'RESTARTS':>10}  LAST EXIT",
    ]
    for program in data["programs"]:
        gens = ", ".join(f"#{g['generation']} {g['state']}" for g in program["generations"])
        fatal = program.get("fatal")
        state = f"FATAL ({fatal['reason']}: no restarts until reload or start)" if fatal else program["state"]
        if roll := program.get("roll"):
            state += (f" (rolling #{roll['from']} -> #{roll['to']}: {roll['replaced']} of {roll['of']} slots "
                      f"replaced, {roll['batch']} at a time)")
        lines.append(f"{program['name']:<16}{state}" + (f"  ({gens})" if gens else ""))
        for w in [*program["workers"], *(fatal["workers"] if fatal else [])]:
            lines.append(_worker_line(w))
        if program.get("tls"):
            cert = program["tls"]
            lines.append(f"{'':<16}tls: {cert['subject']}, SANs {', '.join(cert['sans']) or '-'}, "
                         f"expires {cert['not_after'][:16].replace('T', ' ')} UTC ({cert['days_left']:g} days)")
        if program.get("last_exit"):
            lines.append(f"{'':<16}last exit: {program['last_exit']}")
    return "\n".join(lines)


def _worker_line(w: Mapping[str, Any]) -> str:
    """One row; "-" for what a worker does not have (no pid or RSS for a slot that gave up)."""
    def shown(key: str, form: str = "{}") -> str:
        return "-" if w.get(key) is None else form.format(w[key])
    uptime = "-" if w.get("uptime") is None else _duration(w["uptime"])
    rss = "-" if w.get("rss") is None else f"{w['rss'] / 2**20:.1f}M"
    return (f"{'':<16}{shown('generation'):>5}  {w['worker']:>6}  {shown('pid'):>8}  {w['state']:<10}"
            f"{uptime:>9}{rss:>10}{shown('cpu', '{:.2f}s'):>8}{shown('restarts'):>10}  {shown('last_exit')}")


def _utc(timestamp: float) -> str:
    import datetime

    return datetime.datetime.fromtimestamp(timestamp, datetime.UTC).isoformat()


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
