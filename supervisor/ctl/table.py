"""The table `supervisorctl status` prints from the daemon's answer (daemon/status.py makes the data).

Imported by every `supervisorctl status`: keep its start fast (no typing, no psutil).
"""

from __future__ import annotations

from collections.abc import Mapping

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (supervisorctl's start: bench footprint)
if TYPE_CHECKING:
    from typing import Any


def render(data: Mapping[str, Any]) -> str:
    """The table `supervisorctl status` prints."""
    migrate = data["migrate"]
    upgraded = data.get("upgraded")
    lines = [
        f"supervisord {data.get('version', '?')} pid {data['pid']}, up {_duration(data['uptime'])} "
        f"(since {str(data.get('started_at', '?'))[:19].replace('T', ' ')} UTC), config {data['config']}"
        + (f"; upgraded from {upgraded['from']} at {upgraded['at'][:19].replace('T', ' ')} UTC" if upgraded else ""),
        f"migration: {migrate['mode']} ({'on' if migrate['enabled'] else 'OFF'}: {migrate['reason']})",
        *([_last_reload(data["last_reload"])] if data.get("last_reload") else []),
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


def _last_reload(last: Mapping[str, Any]) -> str:
    """'last reload: done at 12:00:01 UTC in 85 ms, old listeners drained in 40 ms, 0 dropped'."""
    line = f"last {last['what']}: {last['result']} at {last['at'][11:19]} UTC in {last['ms']} ms"
    if last["result"] != "done":
        return f"{line}: {last.get('reason', '')}"
    if last["way"] == "migrated":
        return f"{line}, old listeners shut, {last['migrated']} connections migrated"
    if last["way"] == "drained":
        return f"{line}, old listeners drained in {last['drain_ms']} ms, {last['dropped']} dropped"
    return f"{line}, old listeners shut without migration, {last['dropped']} connections reset"


def _worker_line(w: Mapping[str, Any]) -> str:
    """One row; "-" for what a worker does not have (no pid or RSS for a slot that gave up)."""
    def shown(key: str, form: str = "{}") -> str:
        return "-" if w.get(key) is None else form.format(w[key])
    uptime = "-" if w.get("uptime") is None else _duration(w["uptime"])
    rss = "-" if w.get("rss") is None else f"{w['rss'] / 2**20:.1f}M"
    return (f"{'':<16}{shown('generation'):>5}  {w['worker']:>6}  {shown('pid'):>8}  {w['state']:<10}"
            f"{uptime:>9}{rss:>10}{shown('cpu', '{:.2f}s'):>8}{shown('restarts'):>10}  {shown('last_exit')}")


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
