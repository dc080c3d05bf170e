"""The table `supervisorctl status` prints from the daemon's answer (daemon/status.py makes the data).

One grid: a row per program, then a row per worker of it, in the same columns; what does not fit a
column (certificates, the last crash) follows the grid, one line each. Programs and workers share
one vocabulary of states (STATES), which `supervisorctl --help` prints; docs/status.md maps the
JSON's lifecycle states onto it.

Imported by every `supervisorctl status`: keep its start fast (no typing, no psutil).
"""

from __future__ import annotations

from supervisor.protocol.words import plural

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (supervisorctl's start: bench footprint)
if TYPE_CHECKING:
    from collections.abc import Mapping
    from typing import Any

# The words of the STATE column, for programs and workers alike.
STATES = {
    "starting": "started, not ready yet (a program: its first generation)",
    "serving": "ready and accepting connections",
    "reloading": "a program serving while its next generation starts (reload, restart)",
    "draining": "a worker leaving (scale down, recycling): new connections go to the others",
    "stopping": "listeners shut, finishing what was accepted before it exits",
    "stopped": "a program not running (`stop`, or its first start failed)",
    "fatal": "crashed too often: no restarts until `reload` or `start` (a worker: the slot that gave up)",
}
# The lifecycle states of the JSON (model/program.py, process/worker.py) as the table says them.
WORKER_STATES = {"starting": "starting", "ready": "serving", "retiring": "stopping", "exited": "stopped",
                 "failed": "stopped", "fatal": "fatal"}
COLUMNS = ("NAME", "STATE", "GEN", "PID", "UPTIME", "RSS", "CPU", "RESTARTS", "INFO")
LEFT = {"NAME", "STATE", "INFO"}  # the others are numbers, aligned right


def states_help() -> str:
    """The vocabulary, as `--help` prints it."""
    return "\n".join(f"  {word:<11}{meaning}" for word, meaning in STATES.items())


def render(data: Mapping[str, Any]) -> str:
    """The table `supervisorctl status` prints."""
    migrate = data["migrate"]
    upgraded = data.get("upgraded")
    head = [
        f"supervisord {data.get('version', '?')} pid {data['pid']}, up {_duration(data['uptime'])} "
        f"(since {_when(data.get('started_at'))}), config {data['config']}"
        + (f"; upgraded from {upgraded['from']} at {_when(upgraded['at'])}" if upgraded else ""),
        f"migration: {migrate['mode']} ({'on' if migrate['enabled'] else 'OFF'}: {migrate['reason']})",
        _last_reload(data.get("last_reload")),
        "",
    ]
    rows: list[tuple[str, ...]] = [COLUMNS]
    notes: list[str] = []
    for program in data["programs"]:
        rows.append(_program_row(program))
        fatal = program.get("fatal")
        rows += [_worker_row(program["name"], w) for w in [*program["workers"], *(fatal["workers"] if fatal else [])]]
        notes += _notes(program)
    return "\n".join([*head, *_grid(rows), *notes])


def _grid(rows: list[tuple[str, ...]]) -> list[str]:
    """Rows padded to one width per column (the last one, INFO, is free text)."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(COLUMNS) - 1)]
    lines = []
    for row in rows:
        cells = [cell.ljust(width) if name in LEFT else cell.rjust(width)
                 for name, cell, width in zip(COLUMNS, row, widths, strict=False)]
        lines.append("  ".join([*cells, row[-1]]).rstrip())
    return lines


def _program_row(p: Mapping[str, Any]) -> tuple[str, ...]:
    gens = p["generations"]
    serving = next((g for g in gens if g["state"] == "serving"), None)
    starting = [g for g in gens if g["state"] == "starting"]
    gen = "-" if serving is None else str(serving["generation"])
    if starting:
        gen = f"{gen}>{starting[-1]['generation']}" if serving else str(starting[-1]["generation"])
    live = [w for w in p["workers"] if w.get("pid") is not None]
    rss = [w["rss"] for w in live if w.get("rss") is not None]
    cpu = [w["cpu"] for w in live if w.get("cpu") is not None]
    leaving = [w for w in p["workers"] if w["state"] == "retiring" or w.get("leaving")]
    new = [w for w in p["workers"] if serving is not None and w not in leaving  # of the generation starting
           and (w.get("generation") or 0) > serving["generation"]]
    stay = [w for w in p["workers"] if w not in leaving and w not in new]
    info = [plural(len(stay), "worker") + "".join(f" +{len(ws)} {what}" for ws, what in (
        (new, "new"), (leaving, "leaving")) if ws)]
    if p.get("listen"):
        info.append("on " + " ".join(p["listen"]))
    if fatal := p.get("fatal"):
        info.append(f"FATAL: {fatal['reason']}: no restarts until reload or start")
    if roll := p.get("roll"):
        info.append(f"rolling #{roll['from']} -> #{roll['to']}: {roll['replaced']} of {roll['of']} slots "
                    f"replaced, {roll['batch']} at a time")
    uptime = None if serving is None else serving.get("uptime")  # an older daemon (before an upgrade) does not say
    return (p["name"], p["state"], gen, "-", "-" if uptime is None else _duration(uptime),
            _memory(sum(rss)) if rss else "-", f"{sum(cpu):.2f}s" if cpu else "-", str(p.get("restarts", "-")),
            ", ".join(info))


def _worker_row(program: str, w: Mapping[str, Any]) -> tuple[str, ...]:
    """One row; "-" for what a worker does not have (no pid or RSS for a slot that gave up)."""
    def shown(key: str) -> str:
        return "-" if w.get(key) is None else str(w[key])
    state = "draining" if w.get("leaving") else WORKER_STATES.get(w["state"], w["state"])
    return (f"  {program}:{w['worker']}", state, shown("generation"), shown("pid"),
            "-" if w.get("uptime") is None else _duration(w["uptime"]),
            "-" if w.get("rss") is None else _memory(w["rss"]),
            "-" if w.get("cpu") is None else f"{w['cpu']:.2f}s", shown("restarts"),
            f"last exit: {w['last_exit']}" if w.get("last_exit") else "")


def _notes(p: Mapping[str, Any]) -> list[str]:
    notes = []
    if cert := p.get("tls"):
        notes.append(f"{p['name']}: tls {cert['subject']}, SANs {', '.join(cert['sans']) or '-'}, expires "
                     f"{_when(cert['not_after'])} ({cert['days_left']:g} days)")
    if p.get("last_exit"):
        notes.append(f"{p['name']}: last crash: {p['last_exit']}")
    return notes


def _last_reload(last: Mapping[str, Any] | None) -> str:
    """'last reload: done at 2026-12-07 12:00:01 UTC in 85 ms, 2 old listeners shut, 3 connections migrated'."""
    if not last:
        return "last reload: none since supervisord started"
    line = f"last {last['what']}: {last['result']} at {_when(last['at'])}"
    if last.get("ms") is not None:
        line += f" in {last['ms']} ms"
    if last["result"] != "done":
        return f"{line}: {last.get('reason', '')}"
    if last["way"] == "migrated":
        return f"{line}, old listeners shut, {plural(last['migrated'], 'connection')} migrated"
    if last["way"] == "drained":
        return f"{line}, old listeners drained in {last['drain_ms']} ms, {last['dropped']} dropped"
    return f"{line}, old listeners shut without migration, {plural(last['dropped'], 'connection')} reset"


def _when(iso: str | None) -> str:
    """An ISO time in UTC as '2026-12-07 12:00:01 UTC'."""
    return "?" if not iso else f"{iso[:19].replace('T', ' ')} UTC"


def _memory(size: int) -> str:
    return f"{size / 2**20:.1f}M"


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
