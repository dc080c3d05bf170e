"""`status`: the master's state as plain data (with psutil's process facts), and as a table."""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any

import psutil

if TYPE_CHECKING:  # supervisorctl imports this module for render(): keep its start fast
    from supervisor.generation import Generation
    from supervisor.worker import Worker


def worker_facts(w: Worker, now: float) -> dict[str, Any]:
    facts: dict[str, Any] = {
        "worker": w.index, "pid": w.pid, "state": w.state.value, "generation": w.generation,
        "uptime": round(now - w.started, 1), "restarts": w.restarts, "rss": None, "cpu": None,
        "last_exit": w.previous_exit,
    }
    if w.alive:
        try:
            proc = psutil.Process(w.pid)
            with proc.oneshot():
                facts["rss"] = proc.memory_info().rss
                cpu = proc.cpu_times()
                facts["cpu"] = round(cpu.user + cpu.system, 2)
        except psutil.Error:
            pass
    return facts


def program_facts(name: str, state: str, generations: Iterable[Generation],
                  last_exit: str | None, tls: dict[str, Any] | None = None) -> dict[str, Any]:
    now = time.monotonic()
    gens = list(generations)
    return {
        "name": name,
        "state": state,
        "generations": [{"generation": g.number, "state": g.state.value} for g in gens],
        "workers": [worker_facts(w, now) for g in gens for w in g.workers if w.alive],
        "last_exit": last_exit,
        "tls": tls,
    }


def render(data: Mapping[str, Any]) -> str:
    """The table `supervisorctl status` prints."""
    migrate = data["migrate"]
    lines = [
        f"supervisord pid {data['pid']}, up {_duration(data['uptime'])}, config {data['config']}",
        f"migration: {migrate['mode']} ({'on' if migrate['enabled'] else 'OFF'}: {migrate['reason']})",
        "",
        f"{'PROGRAM':<16}{'GEN':>5}  {'WORKER':>6}  {'PID':>8}  {'STATE':<10}{'UPTIME':>9}"
        f"{'RSS':>10}{'CPU':>8}{'RESTARTS':>10}",
    ]
    for program in data["programs"]:
        gens = ", ".join(f"#{g['generation']} {g['state']}" for g in program["generations"])
        lines.append(f"{program['name']:<16}{program['state']}" + (f"  ({gens})" if gens else ""))
        for w in program["workers"]:
            rss = f"{w['rss'] / 2**20:.1f}M" if w["rss"] is not None else "-"
            cpu = f"{w['cpu']:.2f}s" if w["cpu"] is not None else "-"
            lines.append(f"{'':<16}{w['generation']:>5}  {w['worker']:>6}  {w['pid']:>8}  {w['state']:<10}"
                         f"{_duration(w['uptime']):>9}{rss:>10}{cpu:>8}{w['restarts']:>10}")
        if program.get("tls"):
            cert = program["tls"]
            lines.append(f"{'':<16}tls: {cert['subject']}, SANs {', '.join(cert['sans']) or '-'}, "
                         f"expires {cert['not_after'][:16].replace('T', ' ')} UTC ({cert['days_left']:g} days)")
        if program.get("last_exit"):
            lines.append(f"{'':<16}last exit: {program['last_exit']}")
    return "\n".join(lines)


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
