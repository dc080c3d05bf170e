"""The benchmark is not a test, but its code must not rot: a quick run of every part, checked for shape only.

`python -m bench` puts each scenario in a private network namespace of its own (`unshare --net`).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.load import KINDS, BadAnswer, answer_pid

ROOT = Path(__file__).resolve().parents[2]
# What `python -m bench --quick` promises to report (the tests do not import bench/: they read its output).
SYSTEMS = ("supervisor migrate=on", "supervisor migrate=off", "supervisor migrate=drain", "nginx reuseport migrate=1",
           "nginx reuseport migrate=0", "nginx shared listener", "gunicorn --reuse-port migrate=0",
           "gunicorn --reuse-port migrate=1")
QUICK_DELAYS = ("uvicorn stop_delay=0", "uvicorn stop_delay=0.5")
QUICK_KEEPALIVE = ("supervisor + demo", "supervisor + demo --close-idle-at-stop")
QUICK_QUEUES = ("demo per-worker", "demo shared")
QUICK_RESTARTS = ("supervisor SIGKILL + start with fd store", "supervisor SIGTERM + start with fd store")
QUICK_PEERS = (("supervisor + uvicorn runner", "keep-alive"), ("uvicorn --workers HUP", "keep-alive"),
               ("granian --workers HUP migrate=1", "new connections"), ("gunicorn HUP", "new connections"))


def test_quick_benchmark_run_reports_every_system(tmp_path: Path) -> None:
    if os.geteuid() != 0 and os.environ.get("CI") != "true":
        pytest.skip("the benchmark needs root for its network namespaces")
    run = subprocess.run([sys.executable, "-m", "bench", "--quick", "--out", str(tmp_path)], cwd=ROOT,
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, f"{run.stdout[-3000:]}\n{run.stderr[-3000:]}"
    results = [json.loads(line) for line in (tmp_path / "results.jsonl").read_text().splitlines()]
    assert not [r for r in results if "error" in r]

    reloads = [r for r in results if r["scenario"] == "reload"]
    assert sorted((r["system"], bool(r["stall"])) for r in reloads) == sorted(
        (system, stalled) for system in SYSTEMS for stalled in (False, True))
    for r in reloads:
        assert r["connections"] > 0 and set(r["failed"]) == set(KINDS), r
        assert r["reloads"] == len(r["per_reload"]) == 2
    kept = [r for r in results if r["scenario"] == "keepalive"]
    assert sorted(r["system"] for r in kept) == sorted(QUICK_KEEPALIVE)
    for r in kept:
        assert r["connections"] > 0 and set(r["failed"]) == set(KINDS) and r["reloads"] == 2, r
        assert r["latency_ms"]["closed_ms"]["n"] == 2 and r["master"]["rss_mib"] > 0
    stalled_supervisor = next(r for r in reloads if r["system"] == "supervisor migrate=on" and r["stall"])
    assert stalled_supervisor["netstat"]["TCPMigrateReqSuccess"] > 0, "the stalled workers' queues did not move"

    queues = [r for r in results if r["scenario"] == "accept_queue"]
    assert sorted((r["system"], r["reloads"]) for r in queues) == sorted(
        (system, reloads) for system in QUICK_QUEUES for reloads in (0, 2))
    for r in queues:
        assert r["ok"] > 0 and set(r["failed"]) == set(KINDS) and r["conn_per_s"] > 0, r
        assert 0 < r["answer_ms"]["p50"] <= r["answer_ms"]["p90"] <= r["answer_ms"]["p99"], r
    assert "| demo shared | every 0.5 s | 1 |" in (tmp_path / "table.md").read_text()

    delays = [r for r in results if r["scenario"] == "stop_delay"]
    assert sorted(r["system"] for r in delays) == sorted(QUICK_DELAYS)
    for r in delays:
        assert r["connections"] > 0 and len(r["per_reload"]) == 2 and r["old_cpu"]["until_exit_ms"] >= 0, r

    upgrades = {r["how"]: r for r in results if r["scenario"] == "upgrade"}
    assert sorted(upgrades) == ["restart", "upgrade"]
    for r in upgrades.values():
        assert r["connections"] > 0 and set(r["failed"]) == set(KINDS) and len(r["per_upgrade"]) == 2, r
        assert r["latency_ms"]["command_ms"]["n"] == 2 and r["master"]["after"]["fds"] > 0, r
    assert upgrades["upgrade"]["master_pid_kept"] and upgrades["upgrade"]["workers_kept"], upgrades["upgrade"]
    assert upgrades["upgrade"]["latency_ms"]["daemon_ms"]["n"] == 2, upgrades["upgrade"]
    assert not upgrades["restart"]["master_pid_kept"] and not upgrades["restart"]["workers_kept"]

    restarts = [r for r in results if r["scenario"] == "restart"]
    assert sorted(r["system"] for r in restarts) == sorted(QUICK_RESTARTS)
    for r in restarts:
        assert r["connections"] > 0 and set(r["failed"]) == set(KINDS) and len(r["per_restart"]) == 1, r
        one = r["per_restart"][0]
        assert one["new_master_pid"] != one["master_pid"] and not set(one["new_workers"]) & set(one["old_workers"]), r
        assert r["fd_store"] and one["store_ok"] and one["store"] == one["listeners"] != one["old_listeners"], r
        assert r["latency_ms"]["new_answers_ms"]["n"] == 1, r

    assert {r["workers"] for r in results if r["scenario"] == "scaling"} == {1, 2}
    forked = [r for r in results if r["scenario"] == "preload_reload"]
    assert sorted((r["workers"], r["preload"]) for r in forked) == [(2, False), (2, True)]
    assert all(r["reload_ms"]["median"] > 0 for r in forked), forked
    memory = {r["mode"]: r for r in results if r["scenario"] == "memory"}
    assert sorted(memory) == ["all-at-once", "preload", "rolling"]
    assert all(r["peak_pss_mib"] >= r["steady_pss_mib"] > 0 for r in memory.values()), memory
    latency = [r for r in results if r["scenario"] == "reload_latency"]
    assert sorted((r["system"], r["mode"]) for r in latency) == [
        ("nginx", "-s reload"), ("supervisor", "preload"), ("supervisor", "spare"), ("supervisor", "spawned")]
    assert all(r["ctl_ms"] > 0 for r in latency), latency
    assert all(r["daemon_ms"] > 0 and set(r["phases"]) == {"config", "spawn", "ready", "switch"}
               for r in latency if r["system"] == "supervisor"), latency
    throughput = next(r for r in results if r["scenario"] == "throughput")
    assert throughput["direct_conn_per_s"] > 0 and throughput["supervised_conn_per_s"] > 0

    footprint = next(r for r in results if r["scenario"] == "footprint")
    assert footprint["master_rss_mib"]["tls"] > footprint["master_rss_mib"]["plain"] > 0, footprint
    assert footprint["ctl_ms"]["supervisorctl status"]["cpu_min"] > 0 and footprint["status_to_bare"]["wall_p50"] > 0
    assert footprint["master_rss_mib"]["plain"] > footprint["master_rss_mib"]["floor"] > 0, footprint
    reload = footprint["reload_over_daemon_ms"]["2"]
    assert reload["n"] == 2 and reload["daemon_p50"] > 0, footprint

    compared = [r for r in results if r["scenario"] == "peers"]
    assert sorted((r["system"], r["load"]) for r in compared) == sorted(QUICK_PEERS)
    for r in compared:  # every answer timed, in the quiet window or the reloading one; the new workers answered
        assert r["reloads"] == len(r["per_reload"]) == 2 and set(r["failed"]) == set(KINDS), r
        assert r["quiet"]["n"] > 0 and r["reloading"]["n"] > 0 and r["reloading"]["p99"] >= r["reloading"]["p50"] > 0, r
        # a reload the peer gave up (uvicorn: a new worker not ready within its 5 s, on a loaded machine) has none
        assert all(one["new_serving_ms"] is not None for one in r["per_reload"] if one["done"]), r

    table = (tmp_path / "table.md").read_text()
    assert all(system in table for system in (*SYSTEMS, *QUICK_DELAYS, *QUICK_RESTARTS,
                                              *(r["system"] for r in upgrades.values())))
    assert "ratio" in table and "ratio status / bare" in table and "| preload | 2 |" in table
    assert "`reload` over the daemon's figure, 2 workers" in table
    assert "Against the goals" in table and "`nginx -s reload`" in table
    assert "| supervisor + uvicorn runner | uvicorn --workers HUP |" in table, "the headline's keep-alive row"
    assert "python -m bench --quick --out" in table, "the command that produced the figures"
    assert (tmp_path / "failures.png").read_bytes().startswith(b"\x89PNG")


@pytest.mark.parametrize(("raw", "problem"), [
    (b"", "closed without an answer"),
    (b"HTTP/1.1 502 Bad Gateway\r\n\r\n", "502"),
    (b'HTTP/1.1 200 OK\r\n\r\n{"worker": 1}', "without a pid"),
])
def test_the_load_counts_a_wrong_answer_as_bad(raw: bytes, problem: str) -> None:
    with pytest.raises(BadAnswer, match=problem):
        answer_pid(raw)
    assert answer_pid(b'HTTP/1.1 200 OK\r\nContent-Length: 11\r\n\r\n{"pid": 42}') == 42
