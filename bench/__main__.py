"""`python -m bench`: run the benchmark scenarios, each in a private network namespace; print and save.

Needs root (for `unshare -n`), nginx from Debian's packages, gunicorn and Granian (`make bench` sets them up).
Writes OUT/results.jsonl (one JSON object per scenario), OUT/table.md and OUT/failures.png.
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any

from bench import peers, report
from bench.latency import MODES
from bench.scenario import KEEPALIVE, LAYOUTS, RESTARTS, STOP_DELAYS, SYSTEMS, UPGRADES
from bench.systems import ROOT

QUICK_DELAYS = ("uvicorn stop_delay=0", "uvicorn stop_delay=0.5")  # the pair the comparison is about
QUICK_UPGRADES = ("supervisor upgrade", "supervisor restart (TERM + start)")  # without the baseline
# the store's pair (the plain start is what every other part does)
QUICK_KEEPALIVE = ("supervisor + demo", "supervisor + demo --close-idle-at-stop")  # the contract, and without it
QUICK_QUEUES = ("demo per-worker", "demo shared")
QUICK_RESTARTS = ("supervisor SIGKILL + start with fd store", "supervisor SIGTERM + start with fd store")
PARTS = ("reload", "keepalive", "accept_queue", "stop_delay", "upgrade", "restart-fdstore", "scaling", "throughput",
         "footprint", "preload", "latency", "peers")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "out", help="where results go")
    parser.add_argument("--only", choices=PARTS, action="append",
                        help="run only these parts (repeatable; default: all)")
    parser.add_argument("--systems", default=",".join(SYSTEMS), help="comma-separated, from: " + ", ".join(SYSTEMS))
    parser.add_argument("--reloads", type=int, default=20, help="reloads per system and mode")
    parser.add_argument("--interval", type=float, default=1.0, help="seconds from one reload to the next")
    parser.add_argument("--stall", type=float, default=0.2,
                        help="in the 'stalled' mode, seconds the old workers are stopped before each reload")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--backlog", type=int, default=128, help="listen backlog of every system")
    parser.add_argument("--clients", type=int, default=2, help="load processes")
    parser.add_argument("--concurrency", type=int, default=256, help="connections in flight per load process")
    parser.add_argument("--timeout", type=float, default=5.0,
                        help="seconds from connect() to the whole answer before a connection counts as failed")
    parser.add_argument("--keepalive-systems", default=",".join(KEEPALIVE), help="keep-alive part: from "
                        + ", ".join(KEEPALIVE))
    parser.add_argument("--keepalive-concurrency", type=int, default=64,
                        help="keep-alive part: kept connections per load process")
    parser.add_argument("--queue-systems", default=",".join(LAYOUTS), help="accept_queue part: from "
                        + ", ".join(LAYOUTS))
    parser.add_argument("--queue-runs", type=int, default=3, help="accept_queue part: runs per system and mode")
    parser.add_argument("--queue-reloads", type=int, default=10,
                        help="accept_queue part: reloads per run (--interval s apart; as long without reloads)")
    parser.add_argument("--queue-concurrency", type=int, default=64,
                        help="accept_queue part: connections in flight per load process")
    parser.add_argument("--delay-systems", default=",".join(STOP_DELAYS), help="stop_delay comparison: from "
                        + ", ".join(STOP_DELAYS))
    parser.add_argument("--delay-runs", type=int, default=3,
                        help="stop_delay comparison: runs per system")
    parser.add_argument("--delay-reloads", type=int, default=20, help="stop_delay comparison: reloads per run")
    parser.add_argument("--delay-concurrency", type=int, default=64,
                        help="stop_delay comparison: connections in flight (one load process)")
    parser.add_argument("--upgrades", type=int, default=10,
                        help="upgrade part: in-place upgrades (and restarts, to compare) per run, --interval s apart")
    parser.add_argument("--upgrade-runs", type=int, default=3, help="upgrade part: runs per system")
    parser.add_argument("--upgrade-systems", default=",".join(UPGRADES), help="upgrade part: from "
                        + ", ".join(UPGRADES))
    parser.add_argument("--restarts", type=int, default=10,
                        help="restart-fdstore part: supervisord killed (or stopped) and started again, per run")
    parser.add_argument("--restart-runs", type=int, default=3, help="restart-fdstore part: runs per system")
    parser.add_argument("--restart-systems", default=",".join(RESTARTS), help="restart-fdstore part: from "
                        + ", ".join(RESTARTS))
    parser.add_argument("--scaling-workers", default="1,2,4,16,64")
    parser.add_argument("--scaling-addresses", default="1,4,16")
    parser.add_argument("--scaling-reloads", type=int, default=10)
    parser.add_argument("--throughput-rounds", type=int, default=3)
    parser.add_argument("--throughput-seconds", type=float, default=5.0)
    parser.add_argument("--footprint-rounds", type=int, default=3, help="footprint part: masters started per mode")
    parser.add_argument("--footprint-runs", type=int, default=30,
                        help="footprint part: `supervisorctl status` and `python -c pass` runs, interleaved")
    parser.add_argument("--footprint-reload-workers", default="2,64",
                        help="footprint part: worker counts of `supervisorctl reload` against the daemon's figure")
    parser.add_argument("--footprint-reloads", type=int, default=10, help="footprint part: reloads per worker count")
    parser.add_argument("--preload-workers", default="1,2,4,16,64", help="preload part: worker counts")
    parser.add_argument("--preload-reloads", type=int, default=5, help="preload part: reloads per row")
    parser.add_argument("--memory-workers", type=int, default=4, help="preload part: workers of the memory rows")
    parser.add_argument("--memory-model", type=int, default=64, help="preload part: MiB each worker loads")
    parser.add_argument("--latency-workers", default="2,64", help="latency part: worker counts")
    parser.add_argument("--latency-reloads", type=int, default=9, help="latency part: reloads per row")
    parser.add_argument("--latency-ctl", type=int, default=5,
                        help="latency part: of those, how many more through `supervisorctl reload`")
    parser.add_argument("--peers-systems", default=",".join(peers.PEERS), help="peers part: from "
                        + ", ".join(peers.PEERS))
    parser.add_argument("--peers-loads", default=",".join(peers.LOADS), help="peers part: from "
                        + ", ".join(peers.LOADS))
    parser.add_argument("--peers-runs", type=int, default=3, help="peers part: runs per system and load")
    parser.add_argument("--peers-reloads", type=int, default=10, help="peers part: reloads per run")
    parser.add_argument("--peers-quiet", type=float, default=5.0,
                        help="peers part: seconds of load without a reload before the first one")
    parser.add_argument("--peers-clients", type=int, default=2, help="peers part: load processes")
    parser.add_argument("--peers-concurrency", type=int, default=128,
                        help="peers part: new connections in flight per load process")
    parser.add_argument("--peers-keepalive-concurrency", type=int, default=32,
                        help="peers part: kept connections per load process")
    parser.add_argument("--quick", action="store_true",
                        help="a few seconds per part, to check that the benchmark works (figures mean little)")
    args = parser.parse_args(argv)
    args.command = shlex.join(["python", "-m", "bench", *(sys.argv[1:] if argv is None else argv)])  # in the tables
    if args.quick:
        args.reloads, args.interval, args.concurrency, args.clients = 2, 0.5, 32, 1
        args.scaling_workers, args.scaling_addresses, args.scaling_reloads = "1,2", "2", 2
        args.throughput_rounds, args.throughput_seconds = 1, 1.0
        args.footprint_rounds, args.footprint_runs, args.footprint_reloads = 1, 3, 2
        args.footprint_reload_workers = "2"
        args.preload_workers, args.preload_reloads, args.memory_workers, args.memory_model = "2", 1, 2, 8
        args.latency_workers, args.latency_reloads, args.latency_ctl = "2", 2, 1
        args.delay_runs, args.delay_reloads, args.delay_systems = 1, 2, ",".join(QUICK_DELAYS)
        args.upgrade_runs, args.upgrades, args.upgrade_systems = 1, 2, ",".join(QUICK_UPGRADES)
        args.restart_runs, args.restarts, args.restart_systems = 1, 1, ",".join(QUICK_RESTARTS)
        args.keepalive_systems = ",".join(QUICK_KEEPALIVE)
        args.queue_runs, args.queue_reloads, args.queue_systems = 1, 2, ",".join(QUICK_QUEUES)
        args.peers_runs, args.peers_reloads, args.peers_quiet = 1, 2, 0.5  # and peers.QUICK's systems
    unknown = (set(args.systems.split(",")) - set(SYSTEMS) | set(args.delay_systems.split(",")) - set(STOP_DELAYS)
               | set(args.keepalive_systems.split(",")) - set(KEEPALIVE)
               | set(args.queue_systems.split(",")) - set(LAYOUTS)
               | set(args.upgrade_systems.split(",")) - set(UPGRADES)
               | set(args.restart_systems.split(",")) - set(RESTARTS)
               | set(args.peers_systems.split(",")) - set(peers.PEERS))
    if unknown:
        parser.error(f"unknown systems: {', '.join(sorted(unknown))}")
    if set(args.peers_loads.split(",")) - set(peers.LOADS):
        parser.error(f"--peers-loads: from {', '.join(peers.LOADS)}")
    return args


def specs(args: argparse.Namespace) -> list[dict[str, Any]]:
    parts = args.only or PARTS
    load = {"clients": args.clients, "concurrency": args.concurrency, "backlog": args.backlog}
    reload_load = {**load, "timeout": args.timeout}
    out: list[dict[str, Any]] = []
    if "reload" in parts:
        out += [{"scenario": "reload", "system": system, "stall": stall, "workers": args.workers,
                 "reloads": args.reloads, "interval": args.interval + stall, "warmup": min(1.0, args.interval),
                 **reload_load}
                for system in args.systems.split(",") for stall in (0.0, args.stall)]
    if "keepalive" in parts:  # the reloads under kept connections: what each server's stop loses of them
        out += [{"scenario": "keepalive", "system": system, "stall": 0.0, "workers": args.workers,
                 "reloads": args.reloads, "interval": args.interval, "warmup": min(1.0, args.interval),
                 **reload_load, "clients": 1, "concurrency": args.keepalive_concurrency}
                for system in args.keepalive_systems.split(",")]
    if "accept_queue" in parts:  # one queue per worker or one shared, with and without reloads, run by run in turn
        out += [{"scenario": "accept_queue", "system": system, "run": run, "workers": args.workers,
                 "reloads": args.queue_reloads if reloading else 0,
                 "steady": 0.0 if reloading else args.queue_reloads * args.interval, "interval": args.interval,
                 "warmup": 1.0, **reload_load, "concurrency": args.queue_concurrency}
                for run in range(1, args.queue_runs + 1) for reloading in (False, True)
                for system in args.queue_systems.split(",")]
    if "stop_delay" in parts:  # uvicorn and the demo, stop_delay 0 and 0.5 s, interleaved run by run
        out += [{"scenario": "stop_delay", "system": system, "run": run, "stall": 0.0, "workers": args.workers,
                 "reloads": args.delay_reloads, "interval": args.interval, "warmup": min(1.0, args.interval),
                 "clients": 1, "concurrency": args.delay_concurrency, "backlog": args.backlog, "timeout": args.timeout}
                for run in range(1, args.delay_runs + 1) for system in args.delay_systems.split(",")]
    if "upgrade" in parts:  # in-place upgrades against restarts, under the reload part's load, run by run in turn
        out += [{"scenario": "upgrade", "system": system, "run": run, "workers": args.workers,
                 "upgrades": args.upgrades, "interval": args.interval, "warmup": min(1.0, args.interval),
                 **reload_load}
                for run in range(1, args.upgrade_runs + 1) for system in args.upgrade_systems.split(",")]
    if "restart-fdstore" in parts:  # kill (or stop) and start, with and without the fd store, run by run in turn
        out += [{"scenario": "restart", "system": system, "run": run, "workers": args.workers,
                 "restarts": args.restarts, "warmup": min(1.0, args.interval), **reload_load}
                for run in range(1, args.restart_runs + 1) for system in args.restart_systems.split(",")]
    if "scaling" in parts:
        out += [{"scenario": "scaling", "workers": int(w), "addresses": 1, "reloads": args.scaling_reloads,
                 "backlog": args.backlog} for w in args.scaling_workers.split(",")]
        out += [{"scenario": "scaling", "workers": args.workers, "addresses": int(a), "reloads": args.scaling_reloads,
                 "backlog": args.backlog} for a in args.scaling_addresses.split(",") if int(a) != 1]
    if "preload" in parts:  # reload time spawned vs forked, then memory per strategy
        out += [{"scenario": "preload_reload", "workers": int(w), "preload": forked, "reloads": args.preload_reloads,
                 "backlog": args.backlog} for w in args.preload_workers.split(",") for forked in (False, True)]
        out += [{"scenario": "memory", "mode": mode, "workers": args.memory_workers, "model_mib": args.memory_model,
                 "reloads": max(1, args.preload_reloads // 2), "backlog": args.backlog}
                for mode in ("all-at-once", "rolling", "preload")]
    if "latency" in parts:  # nginx first, then each row of ours
        latency = {"reloads": args.latency_reloads, "ctl_reloads": args.latency_ctl, "backlog": args.backlog}
        out.append({"scenario": "reload_latency", "system": "nginx", "workers": 2, **latency})
        out += [{"scenario": "reload_latency", "system": "supervisor", "workers": int(w), "mode": mode, **latency}
                for w in args.latency_workers.split(",") for mode in latency_modes(int(w))]
    if "throughput" in parts:
        out.append({"scenario": "throughput", "workers": args.workers, "rounds": args.throughput_rounds,
                    "seconds": args.throughput_seconds, **load})
    if "footprint" in parts:
        out.append({"scenario": "footprint", "rounds": args.footprint_rounds, "runs": args.footprint_runs,
                    "reload_workers": [int(n) for n in args.footprint_reload_workers.split(",")],
                    "reloads": args.footprint_reloads})
    if "peers" in parts:  # every system under both loads, a quiet window then reloads, run by run in turn
        out += peers.specs(args)
    return out


def latency_modes(workers: int) -> tuple[str, ...]:
    """The latency part's rows: every mode at 2 workers; at more, the spare and spawned workers."""
    return MODES if workers <= 2 else ("spare", "spawned")


def run(spec: dict[str, Any]) -> dict[str, Any]:
    """One scenario in a fresh network namespace: its JSON result, or what went wrong."""
    command = ["unshare", "--net", sys.executable, "-m", "bench.scenario", json.dumps(spec)]
    proc = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, timeout=1800)
    lines = proc.stdout.strip().splitlines()
    if proc.returncode != 0 or not lines:
        tail = " | ".join(proc.stderr.strip().splitlines()[-3:])
        return {**spec, "error": f"exit status {proc.returncode}: {tail}"}
    result: dict[str, Any] = json.loads(lines[-1])
    return result


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    results = []
    with open(args.out / "results.jsonl", "w") as jsonl:
        for spec in specs(args):
            print(f"bench: {report.describe(spec)} ...", file=sys.stderr, flush=True)
            result = run(spec)
            results.append(result)
            line = json.dumps(result)
            jsonl.write(line + "\n")
            jsonl.flush()
            print(line, flush=True)
    table = report.tables(results, args)
    (args.out / "table.md").write_text(table)
    print(table)
    if any(r["scenario"] == "reload" and "error" not in r for r in results):
        report.chart(results, args.out / "failures.png")
        print(f"chart: {args.out / 'failures.png'}")
    errors = [r for r in results if "error" in r]
    for r in errors:
        print(f"bench: {report.describe(r)} failed: {r['error']}", file=sys.stderr)
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
