"""The peers part: this supervisor beside the servers people choose instead of it, under both kinds of load.

Each system serves the same app as its counterpart under us where it can (the demo beside nginx, uvicorn beside
uvicorn's own `--workers` and Granian, gunicorn beside gunicorn), 2 workers, started and reloaded the way its
users do. One run: the load starts, serves `quiet` s without a reload, then `reloads` reloads `interval` s apart.
Per run: failed requests per reload, how long the reload took (the command; until a new worker answered; until
the old listeners were gone), answers per second and the answers' p50/p99 in the quiet window and in the
reloading one. Two kinds of load: a new connection per request, and kept connections sending request after
request. The runs of one setting are repeated (`--peers-runs`) and the report takes their medians.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable
from typing import Any

from bench import systems
from tests.harness import BIN, PYTHON

# The recipes of docs/servers.md, as the benchmark runs them
UVICORN_RUNNER = {"command": [PYTHON, "-m", "supervisor.servers.uvicorn", "--no-access-log", "tests.apps.asgi:app"],
                  "cwd": str(systems.ROOT), "ready": "notify"}
GUNICORN_SYNC = {"command": [str(BIN / "gunicorn"), "--workers", "1", "--graceful-timeout", "5",
                             "--no-control-socket", "tests.apps.wsgi:app"],
                 "cwd": str(systems.ROOT), "ready": "settle", "settle": 1.0, "stop_delay": 0}

# name -> (server class, settings, net.ipv4.tcp_migrate_req). The peers run with the sysctl as their users have
# it: 0 (the kernel's default) unless the server relies on it (Granian) or the row says otherwise.
PEERS: dict[str, tuple[type[systems.Server], dict[str, Any], int]] = {
    "supervisor + demo": (systems.Supervisor, {"migrate": "require"}, 1),
    "nginx reuseport -s reload": (systems.Nginx, {"reuseport": True}, 0),
    "supervisor + uvicorn runner": (systems.Supervisor, {"migrate": "require", "program": UVICORN_RUNNER}, 1),
    "uvicorn --workers HUP": (systems.Uvicorn, {}, 0),
    "granian --workers HUP migrate=1": (systems.Granian, {}, 1),
    "supervisor + gunicorn sync": (systems.Supervisor, {"migrate": "require", "program": GUNICORN_SYNC}, 1),
    "gunicorn HUP": (systems.Gunicorn, {"reuse_port": False}, 0),
    "gunicorn --reuse-port HUP migrate=0": (systems.Gunicorn, {"reuse_port": True}, 0),
    "gunicorn --reuse-port HUP migrate=1": (systems.Gunicorn, {"reuse_port": True}, 1),
}
# Reloaded by a signal to their master: the "command" is a kill() that returns at once
SIGNALLED = (systems.Uvicorn, systems.Granian, systems.Gunicorn)
LOADS = ("new connections", "keep-alive")
# `--quick`: each kind of server once, the two loads shared out between them (a headline row for keep-alive)
QUICK = (("supervisor + uvicorn runner", "keep-alive"), ("uvicorn --workers HUP", "keep-alive"),
         ("granian --workers HUP migrate=1", "new connections"), ("gunicorn HUP", "new connections"))
# The headline's pairs: this supervisor, and the peer it is read against
PAIRS = (
    ("supervisor + demo", "nginx reuseport -s reload"),
    ("supervisor + uvicorn runner", "uvicorn --workers HUP"),
    ("supervisor + uvicorn runner", "granian --workers HUP migrate=1"),
    ("supervisor + gunicorn sync", "gunicorn HUP"),
    ("supervisor + gunicorn sync", "gunicorn --reuse-port HUP migrate=0"),
    ("supervisor + gunicorn sync", "gunicorn --reuse-port HUP migrate=1"),
)


def median(values: list[float]) -> float | None:
    return round(statistics.median(values), 1) if values else None


def specs(args: Any) -> list[dict[str, Any]]:
    """The part's runs: every system under every load, run by run in turn (so a disturbance hits all alike)."""
    runs = [(system, load) for load in args.peers_loads.split(",") for system in args.peers_systems.split(",")]
    return [{"scenario": "peers", "system": system, "load": load, "run": run, "workers": args.workers,
             "backlog": args.backlog, "reloads": args.peers_reloads, "interval": args.interval,
             "quiet": args.peers_quiet, "warmup": min(1.0, args.interval), "timeout": args.timeout,
             "clients": args.peers_clients,
             "concurrency": args.peers_keepalive_concurrency if load == "keep-alive" else args.peers_concurrency}
            for run in range(1, args.peers_runs + 1) for system, load in (QUICK if args.quick else runs)]


def pooled(results: list[dict[str, Any]], system: str, load: str) -> dict[str, Any] | None:
    """The medians over one system's runs under one load."""
    runs = [r for r in results if r["system"] == system and r["load"] == load]
    if not runs:
        return None

    def med(values: list[float | None]) -> float | None:
        return median([v for v in values if v is not None])

    return {"runs": len(runs),
            "failed_per_reload": med([sum(r["failed_per_reload"]) / max(1, r["reloads"]) for r in runs]),
            "failed_max": max(max(r["failed_per_reload"], default=0) for r in runs),
            "failed_quiet": sum(r["failed_quiet"] for r in runs),
            "not_done": sum(r.get("not_done", 0) for r in runs), "reloads": sum(r["reloads"] for r in runs),
            **{key: med([r["reload_ms"][key] for r in runs]) for key in ("command_ms", "new_serving_ms", "closed_ms")},
            **{f"{when}_{key}": med([r[when][key] for r in runs])
               for when in ("quiet", "reloading") for key in ("per_s", "p50", "p99")}}


# The headline's columns: (title, key, the goal for our figure against the peer's where there is one)
COLUMNS = (
    ("failed per reload", "failed_per_reload", "0"),
    ("reload command returned, ms", "command_ms", "near nginx's (≤ 6x with preload:, idle)"),
    ("new generation serving, ms", "new_serving_ms", ""),
    ("old listeners gone, ms", "closed_ms", ""),
    ("answers/s reloading", "reloading_per_s", ""),
    ("answers/s quiet", "quiet_per_s", ""),
    ("p50 ms reloading", "reloading_p50", ""),
    ("p99 ms reloading", "reloading_p99", "at par (≤ 1x)"),
    ("p50 ms quiet", "quiet_p50", ""),
    ("p99 ms quiet", "quiet_p99", "at par (≤ 1x)"),
)


def cell(ours: float | None, theirs: float | None, ratio: bool = True) -> str:
    if ours is None or theirs is None:
        return "-"
    return f"{ours:g} / {theirs:g}" + (f" ({ours / theirs:.2f}x)" if ratio and theirs else "")


def tables(results: list[dict[str, Any]], table: Callable[[list[str], list[list[Any]]], str],
           command: str) -> str:
    """Every system's medians, then the headline: each figure of ours beside its peer's, and the goal."""
    mine = [r for r in results if r["scenario"] == "peers" and "error" not in r]
    if not mine:
        return ""
    first = mine[0]
    out = [f"\nPeers ({first['workers']} workers each, backlog {first['backlog']}; medians of "
           f"{max(r['run'] for r in mine)} runs; `{command}`). Reload times in ms (command returned; a new "
           "worker's first answer; the old listeners gone); answers per second and their p50/p99 latency in ms "
           "without a reload (quiet) and while reloading:\n\n"]
    for load in LOADS:
        rows = []
        for system in PEERS:
            p = pooled(mine, system, load)
            if p is None:
                continue
            rows.append([system, PEERS[system][2], p["runs"], f"{p['failed_per_reload']:g} ({p['failed_max']})",
                         p["failed_quiet"], f"{p['not_done']}/{p['reloads']}", p["command_ms"], p["new_serving_ms"],
                         p["closed_ms"],
                         p["quiet_per_s"], p["reloading_per_s"], f"{p['quiet_p50']:g} / {p['quiet_p99']:g}"
                         if p["quiet_p99"] is not None else "-",
                         f"{p['reloading_p50']:g} / {p['reloading_p99']:g}" if p["reloading_p99"] is not None
                         else "-"])
        if rows:
            load_of = next(r for r in mine if r["load"] == load)
            out.append(f"{load} ({load_of['clients']} x {load_of['concurrency']} in flight, a reload every "
                       f"{load_of['interval']:g} s or as soon as the last one is done):\n\n")
            out.append(table(["system", "tcp_migrate_req", "runs", "failed per reload (max)", "failed quiet",
                              "reloads given up", "command", "new serving", "old gone", "answers/s quiet",
                              "answers/s reloading",
                              "p50 / p99 quiet", "p50 / p99 reloading"], rows))
            out.append("\n")
    out.append("Headline: ours / the peer's (ratio), medians; the last row is the goal for our figure:\n\n")
    for load in LOADS:
        rows = []
        for ours, theirs in PAIRS:
            a, b = pooled(mine, ours, load), pooled(mine, theirs, load)
            if a is None or b is None:
                continue
            signalled = issubclass(PEERS[theirs][0], SIGNALLED)  # kill() returns at once: no time to compare
            rows.append([ours, theirs, *(f"{a[key]:g} / a signal" if key == "command_ms" and signalled
                                         else cell(a[key], b[key], key != "failed_per_reload")
                                         for _title, key, _goal in COLUMNS)])
        if rows:
            rows.append(["goal", "", *(goal for _title, _key, goal in COLUMNS)])
            out.append(f"{load}:\n\n")
            out.append(table(["us", "peer", *(title for title, _key, _goal in COLUMNS)], rows))
            out.append("\n")
    return "".join(out)
