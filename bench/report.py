"""The benchmark's readable output: markdown tables and a PNG chart of failed connections per reload."""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
from pathlib import Path
from typing import Any

from bench import latency, peers, preload
from bench.scenario import BASELINE_ROUND, CPU_WINDOW, RESTART_SETTLE, summary
from tests.load import KINDS


def describe(spec: dict[str, Any]) -> str:
    if spec["scenario"] == "reload":
        return f"reload: {spec['system']}, {mode(spec)}"
    if spec["scenario"] == "keepalive":
        return f"keep-alive: {spec['system']}"
    if spec["scenario"] == "accept_queue":
        reloads = "reloads" if spec["reloads"] else "no reload"
        return f"accept queue: {spec['system']}, {reloads}, run {spec['run']}"
    if spec["scenario"] in ("stop_delay", "upgrade", "restart"):
        return f"{spec['scenario']}: {spec['system']}, run {spec['run']}"
    if spec["scenario"] == "scaling":
        return f"scaling: {spec['workers']} workers, {spec['addresses']} addresses"
    if spec["scenario"] == "footprint":
        return "footprint: master RSS, supervisorctl status, supervisorctl reload over the daemon's figure"
    if spec["scenario"] == "preload_reload":
        return f"preload: {spec['workers']} workers, {'forked from a template' if spec['preload'] else 'spawned'}"
    if spec["scenario"] == "memory":
        return f"memory: {spec['mode']}, {spec['workers']} workers"
    if spec["scenario"] == "reload_latency":
        return f"latency: {spec['system']}, {spec['workers']} workers, {spec.get('mode', '-s reload')}"
    if spec["scenario"] == "peers":
        return f"peers: {spec['system']}, {spec['load']}, run {spec['run']}"
    return f"throughput: {spec['workers']} workers"


def mode(result: dict[str, Any]) -> str:
    return f"stalled {result['stall']:g} s" if result["stall"] else "steady"


def table(header: list[str], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join("" if cell is None else str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def p50_p99(summary: dict[str, Any]) -> str:
    return f"{summary['p50']:g} / {summary['p99']:g}" if summary.get("n") else "-"


def tables(results: list[dict[str, Any]], args: argparse.Namespace) -> str:
    ok = [r for r in results if "error" not in r]
    reloads = [r for r in ok if r["scenario"] == "reload"]
    scaling = [r for r in ok if r["scenario"] == "scaling"]
    throughput = [r for r in ok if r["scenario"] == "throughput"]
    out = [f"Run {datetime.date.today()} on {os.cpu_count()} cores, Linux {platform.release()}; "
           f"{args.workers} workers, backlog {args.backlog}, load {args.clients} x {args.concurrency} "
           f"connections in flight, client timeout {args.timeout:g} s, {args.reloads} reloads per row.\n"]
    if reloads:
        out.append("\nFailed connections during reloads (new connection per request; 'stalled': the old workers "
                   "are stopped before each reload, so their accept queues are full when they are replaced):\n\n")
        out.append(table(
            ["system", "mode", "connections", "failed", *KINDS, "per reload (max)", "deepest queue", "ListenOverflows",
             "migrated"],
            [[r["system"], mode(r), r["connections"], sum(r["failed"].values()), *(r["failed"][k] for k in KINDS),
              f"{sum(r['failed_per_reload']) / max(1, r['reloads']):.1f} ({max(r['failed_per_reload'], default=0)})",
              f"{r['queue']['max_one_listener']}/{r['backlog']}", r["netstat"]["ListenOverflows"],
              r["netstat"]["TCPMigrateReqSuccess"]] for r in reloads]))
        steady = [r for r in reloads if not r["stall"]]
        out.append("\nReload latency in ms, p50 / p99, and the master's cost (steady mode, under load):\n\n")
        out.append(table(
            ["system", "command returned", "new generation serving", "old listeners closed", "master RSS MiB",
             "master CPU %"],
            [[r["system"], p50_p99(r["latency_ms"]["command_ms"]), p50_p99(r["latency_ms"]["new_serving_ms"]),
              p50_p99(r["latency_ms"]["closed_ms"]), r["master"]["rss_mib"], r["master"]["cpu_percent"]]
             for r in steady]))
    kept = [r for r in ok if r["scenario"] == "keepalive"]
    if kept:
        out.append(f"\nKeep-alive: the same reloads under {args.keepalive_concurrency} kept connections sending "
                   "request after request (what proxies and browsers do); a request without an answer failed:\n\n")
        out.append(table(
            ["system", "requests", "failed", *KINDS, "per reload (max)", "reloads"],
            [[r["system"], r["connections"], sum(r["failed"].values()), *(r["failed"][k] for k in KINDS),
              f"{sum(r['failed_per_reload']) / max(1, r['reloads']):.1f} ({max(r['failed_per_reload'], default=0)})",
              r["reloads"]] for r in kept]))
    queues = [r for r in ok if r["scenario"] == "accept_queue"]
    if queues:
        out.append(queue_table(queues, args))
    delays = [r for r in ok if r["scenario"] == "stop_delay"]
    if delays:
        out.append(f"\nstop_delay: old workers get their stop signal 0 or 0.5 s after their listeners are shut "
                   f"({delays[0]['workers']} workers, {args.delay_concurrency} connections in flight, a reload "
                   f"every {args.interval:g} s; CPU of an old worker in the first {CPU_WINDOW:g} s after the "
                   f"reload, and until it exited):\n\n")
        rows = []
        for system in dict.fromkeys(r["system"] for r in delays):
            runs = [r for r in delays if r["system"] == system]
            per_reload = [n for r in runs for n in r["failed_per_reload"]]
            failed = {k: sum(r["failed"][k] for r in runs) for k in KINDS}
            rows.append([system, len(runs), sum(r["connections"] for r in runs), len(per_reload),
                         sum(failed.values()), *failed.values(), f"{sum(per_reload) / max(1, len(per_reload)):.2f}",
                         sum(1 for n in per_reload if n), "/".join(str(sum(r["failed"].values())) for r in runs),
                         round(sum(r["old_cpu"]["window_percent"] for r in runs) / len(runs), 1),
                         round(sum(r["old_cpu"]["until_exit_ms"] for r in runs) / len(runs))])
        out.append(table(["system", "runs", "connections", "reloads", "failed", *KINDS, "per reload",
                          "reloads with a failure", "failed per run", "old worker CPU % of a core",
                          "old worker CPU ms until exit"], rows))
    upgrades = [r for r in ok if r["scenario"] == "upgrade"]
    if upgrades:
        out.append(upgrade_table(upgrades, args))
    restarts = [r for r in ok if r["scenario"] == "restart"]
    if restarts:
        out.append(restart_table(restarts))
    if scaling:
        out.append("\nThis supervisor as it grows: reload (command to old listeners closed) and master memory:\n\n")
        out.append(table(
            ["workers", "addresses", "reload ms p50 / p99", "master RSS MiB at start", "after reloads",
             "master fds"],
            [[r["workers"], r["addresses"], p50_p99(r["reload_ms"]), r["master"]["rss_mib_start"],
              r["master"]["rss_mib_end"], r["master"]["fds"]] for r in scaling]))
    out.append(preload.tables(ok, table))
    out.append(latency.tables(ok, table))
    for r in throughput:
        out.append(f"\nConnections per second through the demo app, median of {r['rounds']} runs of "
                   f"{r['seconds']:g} s: directly {r['direct_conn_per_s']}, under the supervisor "
                   f"{r['supervised_conn_per_s']}, ratio {r['ratio']}.\n")
    for r in ok:
        if r["scenario"] == "footprint":
            out.append(footprint_table(r))
    out.append(peers.tables(ok, table, args.command))
    for r in results:
        if "error" in r:
            out.append(f"\nFAILED {describe(r)}: {r['error']}\n")
    return "".join(out)


def queue_table(queues: list[dict[str, Any]], args: argparse.Namespace) -> str:
    """One accept queue per worker against one per generation: medians over the runs of each row."""
    rows = []
    for reloading in (False, True):
        for system in dict.fromkeys(r["system"] for r in queues):
            runs = [r for r in queues if r["system"] == system and bool(r["reloads"]) == reloading]
            if not runs:
                continue

            def median(key: str, runs: list[dict[str, Any]] = runs) -> float:
                return statistics.median(r["answer_ms"][key] for r in runs)

            rows.append([system, f"every {args.interval:g} s" if reloading else "none", len(runs),
                         sum(r["ok"] for r in runs), sum(sum(r["failed"].values()) for r in runs),
                         statistics.median(r["conn_per_s"] for r in runs), median("p50"), median("p90"),
                         median("p99"), " / ".join(f"{r['answer_ms']['p99']:g}" for r in runs)])
    first = queues[0]
    return (f"\nOne accept queue per worker (`accept_queue: per-worker`) or one per generation (`shared`), "
            f"{first['workers']} workers, load {first['clients']} x {first['concurrency']} new connections in "
            f"flight, runs of about {round(first['seconds'])} s; medians over the runs; latency from connect to the "
            f"whole answer, in ms:\n\n"
            + table(["system", "reloads", "runs", "answered", "failed", "conn/s", "p50", "p90", "p99",
                     "p99 per run"], rows))


def footprint_table(r: dict[str, Any]) -> str:
    rss, ms, ratio, goals, commands = r["master_rss_mib"], r["ctl_ms"], r["status_to_bare"], r["goals"], r["commands"]
    keys = ("wall_min", "wall_p50", "cpu_min", "cpu_p50")
    mib = goals["master_rss_mib"]
    rows = [["master RSS, plain (MiB)", rss["plain"], f"<= {mib:g}", commands["master"]],
            ["master RSS, `tls:` program", rss["tls"], "-", "the same, with a certificate (cryptography loaded)"],
            ["master RSS, `metrics:` scraped", rss["metrics"], "-", "the same, after one scrape (prometheus_client)"],
            ["floor: the dependencies alone", rss["floor"], "-", commands["floor"]],
            ["`status` / `python -c pass`, wall p50", ratio["wall_p50"], f"<= {goals['status_to_bare']:g}",
             f"{commands['supervisorctl status']} against {commands['python -c pass']}"],
            ["`status` / `python -c pass`, CPU p50", ratio["cpu_p50"], f"<= {goals['status_to_bare']:g}", "the same"]]
    rows += [[f"`reload` over the daemon's figure, {n} workers (ms, min / p50 / max)",
              f"{o['over_min']:g} / {o['over_p50']:g} / {o['over_max']:g}",
              f"<= {goals['reload_over_daemon_ms']:g}",
              f"{commands['reload']}: wall p50 {o['wall_p50']:g}, daemon p50 {o['daemon_p50']:g}, {o['n']} reloads"]
             for n, o in r["reload_over_daemon_ms"].items()]
    return (f"\nFootprint, each figure beside its goal (RSS: median of {r['rounds']} masters):\n\n"
            + table(["figure", "measured", "goal", "command"], rows)
            + f"\n`supervisorctl status` against the same interpreter's bare start, {r['runs']} runs each, interleaved "
            f"(ms; CPU = user + system of the process):\n\n"
            + table(["command", "wall min", "wall p50", "CPU min", "CPU p50"],
                    [[name, *(v[k] for k in keys)] for name, v in ms.items()]
                    + [["ratio status / bare", *(ratio[k] for k in keys)],
                       ["ratio -s status / bare", *(r["socket_status_to_bare"][k] for k in keys)]]))


def pool(results: list[dict[str, Any]], system: str, what: str) -> tuple[
        list[dict[str, Any]], list[int], dict[str, int], list[dict[str, Any]]]:
    """One system's runs pooled: the runs, failures per command, failures per kind, every command's figures
    (`what`: "upgrade" or "restart", the suffix of the per-command keys)."""
    runs = [r for r in results if r["system"] == system]
    per = [n for r in runs for n in r[f"failed_per_{what}"]]
    failed = {k: sum(r["failed"][k] for r in runs) for k in KINDS}
    return runs, per, failed, [u for r in runs for u in r[f"per_{what}"]]


def upgrade_table(upgrades: list[dict[str, Any]], args: argparse.Namespace) -> str:
    """`supervisorctl upgrade` against a restart of supervisord, run by run pooled per system."""
    rows = []
    for system in dict.fromkeys(r["system"] for r in upgrades):
        runs, per, failed, rounds = pool(upgrades, system, "upgrade")

        def pooled(key: str, rounds: list[dict[str, Any]] = rounds) -> str:
            return p50_p99(summary([u[key] for u in rounds if u.get(key) is not None]))

        def before_after(key: str, runs: list[dict[str, Any]] = runs) -> str:
            return ", ".join(f"{r['master']['before'][key]:g} → {r['master']['after'][key]:g}" for r in runs)

        connections = sum(r["connections"] for r in runs)
        rows.append([system, len(runs), connections, len(per), sum(failed.values()), *failed.values(),
                     f"{sum(per) / max(1, len(per)):.1f} ({max(per, default=0)})",
                     f"{100_000 * sum(failed.values()) / max(1, connections):.1f}",
                     pooled("command_ms") if runs[0]["how"] != "none" else "-", pooled("daemon_ms"),
                     pooled("no_answer_ms") if runs[0]["how"] == "restart" else "-",
                     f"{sum(r['master_pid_kept'] for r in runs)}/{len(runs)}",
                     f"{sum(r['workers_kept'] for r in runs)}/{len(runs)}",
                     before_after("rss_mib"), before_after("fds")])
    return (f"\nIn-place upgrade (`supervisorctl upgrade`, the same code re-exec'd) against a restart (SIGTERM, "
            f"wait for the exit, start, until every worker is ready) and against no command at all (rounds of "
            f"{BASELINE_ROUND:g} s), {upgrades[0]['workers']} workers, load "
            f"{upgrades[0]['clients']} x {upgrades[0]['concurrency']} connections in flight, one every "
            f"{args.interval:g} s or when the last one is done; times in ms, p50 / p99 over all runs; master "
            f"RSS MiB and fds before the first and after the last, per run:\n\n"
            + table(["system", "runs", "connections", "commands", "failed", *KINDS, "per command (max)",
                     "failed per 100k connections", "command to answer", "exec to answer (daemon)",
                     "no answer (restart)", "master pid kept (runs)", "worker pids kept (runs)", "master RSS MiB",
                     "master fds"], rows))


def restart_table(restarts: list[dict[str, Any]]) -> str:
    """supervisord killed or stopped and started again at once, with and without the fd store, runs pooled."""
    rows = []
    for system in dict.fromkeys(r["system"] for r in restarts):
        runs, per, failed, rounds = pool(restarts, system, "restart")

        def pooled(key: str, rounds: list[dict[str, Any]] = rounds) -> str:
            return p50_p99(summary([u[key] for u in rounds if u.get(key) is not None]))

        store = (f"{sum(1 for u in rounds if u['store_ok'])}/{len(rounds)}" if runs[0]["fd_store"] else "-")
        rows.append([system, len(runs), sum(r["connections"] for r in runs), len(per), sum(failed.values()),
                     *failed.values(), f"{sum(per) / max(1, len(per)):.1f} ({max(per, default=0)})",
                     sum(1 for n in per if n), pooled("exit_ms"), pooled("restart_ms"), pooled("new_answers_ms"),
                     pooled("no_answer_ms"), store,
                     f"{sum(1 for u in rounds if u['new_master_pid'] != u['master_pid'])}/{len(rounds)}",
                     f"{sum(1 for u in rounds if not set(u['new_workers']) & set(u['old_workers']))}/{len(rounds)}",
                     max((u["old_workers_left"] for u in rounds), default=0)])
    first = restarts[0]
    return (f"\nsupervisord killed (SIGKILL) or stopped (SIGTERM, a `systemctl restart`) and started again as soon as "
            f"it exited, with systemd's fd store (the stand-in of tests/servicemanager.py) and without; "
            f"{first['workers']} workers, load {first['clients']} x {first['concurrency']} connections in flight, "
            f"client timeout {first['timeout']:g} s, {RESTART_SETTLE:g} s of serving after each restart; failures "
            f"counted against the restart during which the connection started; times in ms from the signal ('no "
            f"answer': from the old workers' last answer to the new ones' first), p50 / p99 over all runs:\n\n"
            + table(["system", "runs", "connections", "restarts", "failed", *KINDS, "per restart (max)",
                     "restarts with a failure", "signal to exit", "signal to every worker ready",
                     "signal to a new worker's first answer", "no answer", "store = serving listeners",
                     "new master pid", "all workers new", "old workers left after 1 s (max)"], rows))


def chart(results: list[dict[str, Any]], path: Path) -> None:
    """Grouped bars: mean failed connections per reload, per system, steady and stalled."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    reloads = [r for r in results if r["scenario"] == "reload" and "error" not in r]
    systems = list(dict.fromkeys(r["system"] for r in reloads))
    fig, ax = plt.subplots(figsize=(12, 5))
    width = 0.4
    for offset, (label, stalled) in enumerate((("steady", False), ("stalled old workers", True))):
        values = []
        for system in systems:
            found = [r for r in reloads if r["system"] == system and bool(r["stall"]) == stalled]
            values.append(sum(found[0]["failed_per_reload"]) / max(1, found[0]["reloads"]) if found else 0)
        bars = ax.bar([i + (offset - 0.5) * width for i in range(len(systems))], values, width, label=label)
        ax.bar_label(bars, fmt="%.1f", fontsize=8)
    ax.set_xticks(range(len(systems)), ["\n".join(s.rsplit(" ", 1)) for s in systems], fontsize=8)
    ax.set_ylabel("failed connections per reload (mean)")
    ax.set_title("Failed connections per reload, new connections under load")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
