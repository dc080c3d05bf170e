"""One benchmark scenario, run in the private network namespace of the process that runs it.

`unshare -n python -m bench.scenario SPEC-JSON` brings loopback up, runs the scenario the spec names
and prints its result as one JSON object on the last line of stdout. `python -m bench` runs each
scenario that way, so every one starts from a fresh namespace (its own sysctls, ports and counters).
"""

from __future__ import annotations

import json
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from functools import partial
from pathlib import Path
from typing import Any

import psutil

from bench import kernel, latency, peers, preload, systems
from bench.footprint import footprint
from tests import harness
from tests.harness import wait_for
from tests.load import KINDS, Clients
from tests.servicemanager import ServiceManager

# The systems of the reload comparison: name -> (server class, settings, net.ipv4.tcp_migrate_req)
SYSTEMS: dict[str, tuple[type[systems.Server], dict[str, Any], int]] = {
    "supervisor migrate=on": (systems.Supervisor, {"migrate": "require"}, 1),
    "supervisor migrate=off": (systems.Supervisor, {"migrate": "off"}, 0),
    # The stalled mode resumes the old workers only after the reload returned: a drain cannot finish
    # there and ends at drain_timeout, what the frozen workers held counted as dropped.
    "supervisor migrate=drain": (systems.Supervisor, {"migrate": "drain", "program": {"drain_timeout": 1}}, 0),
    "nginx reuseport migrate=1": (systems.Nginx, {"reuseport": True}, 1),
    "nginx reuseport migrate=0": (systems.Nginx, {"reuseport": True}, 0),
    "nginx shared listener": (systems.Nginx, {"reuseport": False}, 0),
    "gunicorn --reuse-port migrate=0": (systems.Gunicorn, {}, 0),
    "gunicorn --reuse-port migrate=1": (systems.Gunicorn, {}, 1),
}

UVICORN = {"command": [systems.PYTHON, "-m", "uvicorn", "--fd", "3", "--no-access-log", "tests.apps.asgi:app"],
           "cwd": str(systems.ROOT), "ready": "accepting", "settle": 0.2}
# The keep-alive part: the reload part's reloads under kept connections sending request after request (what
# every proxy and browser does): what each server's stop loses of them. name -> as SYSTEMS
KEEPALIVE: dict[str, tuple[type[systems.Server], dict[str, Any], int]] = {
    "supervisor + demo": (systems.Supervisor, {"migrate": "require"}, 1),
    "supervisor + demo --close-idle-at-stop": (systems.Supervisor, {"migrate": "require", "program": {
        "command": [systems.PYTHON, "-m", "supervisor.demo", "--close-idle-at-stop"]}}, 1),
    "supervisor + uvicorn runner": (systems.Supervisor, {"migrate": "require", "program": {
        "command": [systems.PYTHON, "-m", "supervisor.servers.uvicorn", "--no-access-log", "tests.apps.asgi:app"],
        "cwd": str(systems.ROOT), "ready": "notify"}}, 1),
    "supervisor + stock uvicorn --fd 3": (systems.Supervisor, {"migrate": "require", "program": UVICORN}, 1),
    "nginx reuseport HUP": (systems.Nginx, {"reuseport": True}, 1),
    "gunicorn --reuse-port HUP": (systems.Gunicorn, {}, 1),
}

# The accept-queue part: supervisor migrate=on, one accept queue per worker or one per generation that its
# workers share, with the demo and with stock uvicorn; name -> program settings
LAYOUTS: dict[str, dict[str, Any]] = {
    f"{server} {layout}": {**settings, "accept_queue": layout}
    for server, settings in (("demo", {}), ("uvicorn", UVICORN)) for layout in ("per-worker", "shared")}

# The stop_delay comparison: supervisor migrate=on with these program settings
STOP_DELAYS: dict[str, dict[str, Any]] = {
    "uvicorn stop_delay=0": {**UVICORN, "stop_delay": 0},
    "uvicorn stop_delay=0.5": {**UVICORN, "stop_delay": 0.5},
    "demo stop_delay=0": {"stop_delay": 0},
    "demo stop_delay=0.5": {"stop_delay": 0.5},
}
# The upgrade part: supervisor migrate=on, the demo, upgraded in place or, for comparison, restarted, or left
# alone under the same load (what fails anyway on this machine)
UPGRADES = {"supervisor upgrade": "upgrade", "supervisor restart (TERM + start)": "restart",
            "supervisor no command (baseline)": "none"}
# The restart part: supervisor migrate=on, the demo; supervisord sent this signal and started again at once, under
# the stand-in for systemd's notify socket and fd store (tests/servicemanager.py) or plainly
RESTARTS: dict[str, tuple[str, bool]] = {
    "supervisor SIGKILL + start with fd store": ("SIGKILL", True),
    "supervisor SIGKILL + start without store": ("SIGKILL", False),
    "supervisor SIGTERM + start with fd store": ("SIGTERM", True),
    "supervisor SIGTERM + start without store": ("SIGTERM", False),
}
RESTART_SETTLE = 1.0  # seconds of serving after each restart (and its store check) before the next one
BASELINE_ROUND = 2.5  # seconds a round of the baseline lasts: about what an upgrade took under this load on 2 cores
CPU_WINDOW = 0.4  # seconds after a reload returned over which the old workers' CPU is measured (< stop_delay)

STALL_AFTER = 0.5  # seconds stalled workers stay stopped after the reload command returned
GIVEN_UP = 20.0  # peers part: seconds after which a reload whose old workers still listen counts as not done


class Sampler:
    """Every 10 ms: the accept queues of the port's listeners and the master's RSS."""

    def __init__(self, port: int, master: int | None) -> None:
        self.port = port
        self.master = psutil.Process(master) if master else None
        self.queued: list[int] = []
        self.deepest = 0  # the longest single accept queue seen
        self.rss = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> Sampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.wait(0.01):
            queues = [listener.queued for listener in kernel.listeners(self.port)]
            self.queued.append(sum(queues))
            self.deepest = max(self.deepest, *queues, 0)
            if self.master is not None:
                try:
                    self.rss = max(self.rss, self.master.memory_info().rss)
                except psutil.Error:
                    pass


@contextmanager
def running(server: systems.Server) -> Iterator[systems.Server]:
    try:
        server.start()
        yield server
    finally:
        server.stop()


def signal_all(pids: set[int], signum: signal.Signals) -> None:
    for pid in pids:
        try:
            os.kill(pid, signum)
        except ProcessLookupError:
            pass


def wait_closed(port: int, old: set[int], timeout: float = 60.0) -> float:
    """Until none of the `old` workers holds a listener on `port`; the moment that happened."""
    deadline = time.monotonic() + timeout
    while kernel.listening_pids(port, old):
        if time.monotonic() > deadline:
            raise TimeoutError(f"old workers {sorted(old)} still listen {timeout:g} s after the reload")
        time.sleep(0.002)
    return time.monotonic()


def wait_gone(pids: set[int], timeout: float) -> None:
    """Until none of `pids` runs any more, or `timeout` s (a worker kept past it is the report's to show)."""
    deadline = time.monotonic() + timeout
    while any(alive(pid) for pid in pids) and time.monotonic() < deadline:
        time.sleep(0.01)


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


class OldWorkers:
    """The CPU the old workers of one reload use after it returned: as % of a core over the first CPU_WINDOW s
    (inside a stop_delay of 0.5 s: their listeners are shut and their loops spin), and in ms until they exit."""

    def __init__(self, pids: set[int]) -> None:
        self.procs = []
        for pid in pids:
            try:
                self.procs.append(psutil.Process(pid))
            except psutil.NoSuchProcess:
                pass
        self.first = {p.pid: self.cpu(p) for p in self.procs}
        self.window: dict[int, float] = {}
        self.last = dict(self.first)
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    @staticmethod
    def cpu(proc: psutil.Process) -> float | None:
        try:
            times = proc.cpu_times()
        except psutil.Error:
            return None  # exited (the last sample stands)
        return times.user + times.system

    def _run(self) -> None:
        started = time.monotonic()
        alive = list(self.procs)
        while alive and time.monotonic() < started + 30:
            time.sleep(0.01)
            for proc in list(alive):
                now = self.cpu(proc)
                if now is None:
                    alive.remove(proc)
                    continue
                self.last[proc.pid] = now
                if time.monotonic() - started <= CPU_WINDOW:
                    self.window[proc.pid] = now

    def result(self) -> dict[str, float]:
        """Mean per old worker: `window_percent` of a core, `until_exit_ms` of CPU."""
        self._thread.join()
        pids = [pid for pid, first in self.first.items() if first is not None]
        if not pids:
            return {"window_percent": 0.0, "until_exit_ms": 0.0}
        used = [(self.window.get(pid, self.last[pid]) or 0.0) - (self.first[pid] or 0.0) for pid in pids]
        total = [(self.last[pid] or 0.0) - (self.first[pid] or 0.0) for pid in pids]
        return {"window_percent": round(100 * sum(used) / len(used) / CPU_WINDOW, 1),
                "until_exit_ms": round(1000 * sum(total) / len(total), 1)}


def reload_under_load(spec: dict[str, Any], folder: Path) -> dict[str, Any]:
    """Reload `reloads` times, `interval` s apart, while new connections arrive; count what failed.

    With `stall` (seconds), the serving workers are stopped (SIGSTOP) that long before each reload and
    resumed STALL_AFTER s after the reload command returned: their accept queues are then full when
    their listeners close, as they are when workers are busy, which is when a reload loses connections.
    """
    cls, settings, migrate = SYSTEMS.get(spec["system"]) or KEEPALIVE.get(spec["system"]) or (
        systems.Supervisor, {"program": STOP_DELAYS.get(spec["system"]) or LAYOUTS[spec["system"]]}, 1)
    kernel.set_migrate(migrate)
    server = cls(folder, workers=spec["workers"], backlog=spec["backlog"], **settings)
    with running(server):
        cpu_before = psutil.Process(server.master_pid).cpu_times()
        net_before = kernel.netstat()
        with Sampler(server.port, server.master_pid) as sampler, ExitStack() as stack:
            most = 2 * spec["warmup"] + spec.get("steady", 0.0) + spec["reloads"] * (spec["interval"] + 60)  # a bound
            load = stack.enter_context(Clients(server.address, spec["clients"], spec["concurrency"], seconds=most,
                                               timeout=spec["timeout"], keep_alive=spec.get("keep_alive", False)))
            time.sleep(spec["warmup"] + spec.get("steady", 0.0))  # steady: load without reloads (accept_queue)
            reloads = []
            for _ in range(spec["reloads"]):
                old = kernel.listening_pids(server.port, server.worker_pids())
                if spec["stall"]:
                    signal_all(old, signal.SIGSTOP)
                    time.sleep(spec["stall"])
                started = time.monotonic()
                try:
                    reported = server.reload()
                    returned = time.monotonic()
                finally:
                    if spec["stall"]:
                        time.sleep(STALL_AFTER)
                        signal_all(old, signal.SIGCONT)
                watch = OldWorkers(old) if spec.get("old_cpu") else None
                closed = wait_closed(server.port, old)
                reloads.append({"at": started, "old": sorted(old), "command_ms": ms(returned - started),
                                "closed_ms": ms(closed - started), "watch": watch, **reported})
                time.sleep(max(0.0, started + spec["interval"] - time.monotonic()))
            time.sleep(spec["warmup"])
            tally = load.finish()
        net = {k: v - net_before[k] for k, v in kernel.netstat().items()}
        cpu = psutil.Process(server.master_pid).cpu_times()
        master_cpu = cpu.user + cpu.system - cpu_before.user - cpu_before.system
    seconds = tally.ended - tally.started
    windows = [r["at"] for r in reloads] + [float("inf")]
    for i, r in enumerate(reloads):
        failures = [f for f in tally.failures if windows[i] <= f[0] < windows[i + 1]]
        r["failed"] = dict(Counter(kind for _t, kind, _d in failures))
        r["failed_at_ms"] = [ms(at - r["at"]) for at, _kind, _d in failures[:20]]  # after the reload started
        fresh = [first for pid, (first, _last, _n) in tally.pids.items() if pid not in r["old"] and first >= r["at"]]
        r["new_serving_ms"] = ms(min(fresh) - r["at"]) if fresh else None
        if r["watch"] is not None:
            r["old_cpu"] = r["watch"].result()
    failed = Counter(kind for _t, kind, _d in tally.failures)
    before_first = sum(1 for f in tally.failures if f[0] < windows[0])
    return {
        "scenario": "reload", "system": spec["system"], "stall": spec["stall"], "workers": spec["workers"],
        "backlog": spec["backlog"], "tcp_migrate_req": migrate, "reloads": len(reloads), "seconds": round(seconds, 1),
        "connections": tally.ok + len(tally.failures), "ok": tally.ok,
        "failed": {kind: failed.get(kind, 0) for kind in KINDS},
        "failed_per_reload": [sum(r["failed"].values()) for r in reloads],
        "failed_before_first_reload": before_first,
        "failure_examples": sorted({f"{kind}: {detail}" for _t, kind, detail in tally.failures})[:5],
        "conn_per_s": round(tally.ok / seconds),
        # from connect (or the request, on a kept connection) to the whole answer, every answer of the run
        "answer_ms": {f"p{q}": tally.latency_ms(q) for q in (50, 90, 99)},
        "queue": {"mean": round(statistics.fmean(sampler.queued), 1) if sampler.queued else 0,
                  "max_total": max(sampler.queued, default=0), "max_one_listener": sampler.deepest},
        "netstat": net,
        "latency_ms": {key: summary([r[key] for r in reloads if r.get(key) is not None])
                       for key in ("new_serving_ms", "closed_ms", "command_ms")},
        "master": {"rss_mib": round(sampler.rss / 2**20, 1), "cpu_percent": round(100 * master_cpu / seconds, 1)},
        "per_reload": [{k: v for k, v in r.items() if k not in ("at", "old", "watch")} for r in reloads],
    }


def scaling(spec: dict[str, Any], folder: Path) -> dict[str, Any]:
    """Reload time and master memory of this supervisor with `workers` workers on `addresses` ports."""
    kernel.set_migrate(1)
    server = systems.Supervisor(folder, workers=spec["workers"], addresses=spec["addresses"], backlog=spec["backlog"])
    with running(server):
        master = psutil.Process(server.master_pid)
        rss_start = master.memory_info().rss
        times = [server.reload()["daemon_ms"] for _ in range(spec["reloads"])]
        rss_end = master.memory_info().rss
        fds = master.num_fds()
    return {"scenario": "scaling", "system": "supervisor migrate=on", "workers": spec["workers"],
            "addresses": spec["addresses"], "reloads": len(times), "reload_ms": summary(times),
            "master": {"rss_mib_start": round(rss_start / 2**20, 1), "rss_mib_end": round(rss_end / 2**20, 1),
                       "fds": fds}}


def throughput(spec: dict[str, Any], folder: Path) -> dict[str, Any]:
    """Connections per second through the demo run directly and under the supervisor, rounds alternating."""
    kernel.set_migrate(1)
    rates: dict[str, list[float]] = {"direct": [], "supervised": []}
    makers: dict[str, Callable[[], systems.Server]] = {
        "direct": lambda: systems.DirectDemo(folder / "direct", workers=spec["workers"], backlog=spec["backlog"]),
        "supervised": lambda: systems.Supervisor(folder / "supervised", workers=spec["workers"],
                                                 backlog=spec["backlog"]),
    }
    for _ in range(spec["rounds"]):
        for name, make in makers.items():
            with running(make()) as server:
                with Clients(server.address, spec["clients"], spec["concurrency"], seconds=spec["seconds"]) as load:
                    tally = load.finish(stop=False)
                rates[name].append(tally.ok / (tally.ended - tally.started))
    direct, supervised = statistics.median(rates["direct"]), statistics.median(rates["supervised"])
    return {"scenario": "throughput", "workers": spec["workers"], "rounds": spec["rounds"],
            "seconds": spec["seconds"], "direct_conn_per_s": round(direct), "supervised_conn_per_s": round(supervised),
            "ratio": round(supervised / direct, 3), "runs": {k: [round(v) for v in vs] for k, vs in rates.items()}}


def summary(values: list[float]) -> dict[str, float | None]:
    return {"p50": percentile(values, 50), "p99": percentile(values, 99), "max": max(values, default=None),
            "n": len(values)}


def ms(seconds: float) -> float:
    return round(seconds * 1000, 1)


def stop_delay(spec: dict[str, Any], folder: Path) -> dict[str, Any]:
    """One run of the stop_delay comparison: a reload run with the old workers' CPU measured."""
    result = reload_under_load({**spec, "stall": 0.0, "old_cpu": True}, folder)
    cpu = [r["old_cpu"] for r in result["per_reload"]]
    return {**result, "scenario": "stop_delay", "run": spec["run"],
            "old_cpu": {"window_percent": round(statistics.fmean(c["window_percent"] for c in cpu), 1),
                        "until_exit_ms": round(statistics.fmean(c["until_exit_ms"] for c in cpu), 1)}}


def accept_queue(spec: dict[str, Any], folder: Path) -> dict[str, Any]:
    """One run of the accept-queue comparison: how long answers take and how many come, under a reload every
    `interval` s or (`reloads` 0) none for as long (`steady` s)."""
    return {**reload_under_load({**spec, "stall": 0.0}, folder), "scenario": "accept_queue", "run": spec["run"],
            "steady": spec.get("steady", 0.0), "clients": spec["clients"], "concurrency": spec["concurrency"]}


def keepalive(spec: dict[str, Any], folder: Path) -> dict[str, Any]:
    """The reload part's reloads under kept connections (requests back to back): what the stop loses."""
    return {**reload_under_load({**spec, "stall": 0.0, "keep_alive": True}, folder), "scenario": "keepalive"}


def upgrade_under_load(spec: dict[str, Any], folder: Path) -> dict[str, Any]:
    """`upgrades` in-place upgrades (`supervisorctl upgrade`: the same installed code, checked in a child, then
    exec'd in the master's own process), `interval` s apart, under the reload part's load; or, for comparison,
    as many plain restarts: SIGTERM to supervisord, wait for its exit, start it again until every worker is ready;
    or, as a baseline, as many rounds of BASELINE_ROUND s with no command at all. What failed, how long the
    command took, and whether the master's pid and the workers stayed."""
    how = UPGRADES[spec["system"]]
    kernel.set_migrate(1)
    server = systems.Supervisor(folder, workers=spec["workers"], backlog=spec["backlog"])
    with running(server):
        net_before = kernel.netstat()
        with ExitStack() as stack:
            most = 2 * spec["warmup"] + spec["upgrades"] * (spec["interval"] + 120)  # a bound, not the plan
            load = stack.enter_context(Clients(server.address, spec["clients"], spec["concurrency"], seconds=most,
                                               timeout=spec["timeout"]))
            time.sleep(spec["warmup"])
            first_master, first_workers = server.master_pid, server.worker_pids()
            before = master_use(first_master)
            rounds = []
            for _ in range(spec["upgrades"]):
                master, old = server.master_pid, server.worker_pids()
                started = time.monotonic()
                if how == "upgrade":
                    message = server.request("upgrade")["message"]
                    found = re.search(r" in (\d+) ms", message)
                    daemon_ms = float(found.group(1)) if found else None
                elif how == "restart":
                    server.stop()
                    server.start()
                    daemon_ms = None
                else:
                    time.sleep(BASELINE_ROUND)
                    daemon_ms = None
                returned = time.monotonic()
                assert server.sup is not None
                rounds.append({"at": started, "old": old, "command_ms": ms(returned - started), "daemon_ms": daemon_ms,
                               "master_pid_kept": server.sup.status()["pid"] == master,
                               "workers_kept": server.worker_pids() == old, **master_use(server.master_pid)})
                time.sleep(max(0.0, started + spec["interval"] - time.monotonic()))
            time.sleep(spec["warmup"])
            after = master_use(server.master_pid)
            pid_kept = server.master_pid == first_master and all(r["master_pid_kept"] for r in rounds)
            workers_kept = server.worker_pids() == first_workers and all(r["workers_kept"] for r in rounds)
            tally = load.finish()
        # Workers replaced when nothing should have replaced them: what supervisord said about it
        unexpected = [line for line in server.log.read_text(errors="replace").splitlines()
                      if '"level": "info"' not in line] if how != "restart" and not workers_kept else []
        net = {k: v - net_before[k] for k, v in kernel.netstat().items()}
    windows = [r["at"] for r in rounds] + [float("inf")]
    for i, r in enumerate(rounds):
        failures = [f for f in tally.failures if windows[i] <= f[0] < windows[i + 1]]
        r["failed"] = dict(Counter(kind for _t, kind, _d in failures))
        r["failed_at_ms"] = [ms(at - r["at"]) for at, _kind, _d in failures[:20]]
        # Between the last answer of a worker of before and the first of one started since (restarts only)
        fresh = [first for pid, (first, _last, _n) in tally.pids.items() if pid not in r["old"] and first >= r["at"]]
        last_old = max((last for pid, (_first, last, _n) in tally.pids.items() if pid in r["old"]), default=None)
        r["no_answer_ms"] = ms(min(fresh) - last_old) if fresh and last_old is not None else None
    failed = Counter(kind for _t, kind, _d in tally.failures)
    seconds = tally.ended - tally.started
    return {
        "scenario": "upgrade", "system": spec["system"], "how": how, "run": spec["run"], "workers": spec["workers"],
        "backlog": spec["backlog"], "clients": spec["clients"], "concurrency": spec["concurrency"],
        "upgrades": len(rounds), "seconds": round(seconds, 1),
        "connections": tally.ok + len(tally.failures), "ok": tally.ok,
        "failed": {kind: failed.get(kind, 0) for kind in KINDS},
        "failed_per_upgrade": [sum(r["failed"].values()) for r in rounds],
        "failed_before_first_upgrade": sum(1 for f in tally.failures if f[0] < windows[0]),
        "failure_examples": sorted({f"{kind}: {detail}" for _t, kind, detail in tally.failures})[:5],
        "conn_per_s": round(tally.ok / seconds), "netstat": net,
        "latency_ms": {key: summary([r[key] for r in rounds if r.get(key) is not None])
                       for key in ("command_ms", "daemon_ms", "no_answer_ms")},
        "master_pid_kept": pid_kept, "workers_kept": workers_kept, "log_unexpected": unexpected[-30:],
        "master": {"before": before, "after": after},
        "per_upgrade": [{k: v for k, v in r.items() if k not in ("at", "old")} for r in rounds],
    }


def restart_under_load(spec: dict[str, Any], folder: Path) -> dict[str, Any]:
    """`restarts` times, under the reload part's load: supervisord gets SIGKILL (a crash) or SIGTERM (`systemctl
    restart`), and as soon as it has exited it is started again, under the stand-in for systemd's fd store (the
    stored listeners passed back as LISTEN_FDS) or plainly; then RESTART_SETTLE s of serving. What failed, by kind,
    counted against the restart during which the connection started (a timeout started `timeout` s before it was
    counted); when answers came from the new workers; the pids; the store's contents against the serving listeners."""
    signame, with_store = RESTARTS[spec["system"]]
    kernel.set_migrate(1)
    runtime = folder / "run"  # RUNTIME_DIRECTORY=: what a killed master left there is cleared at the next start
    runtime.mkdir(parents=True, exist_ok=True)
    manager = ServiceManager(folder) if with_store else None
    server = systems.Supervisor(folder, workers=spec["workers"], backlog=spec["backlog"], manager=manager,
                                env={"RUNTIME_DIRECTORY": str(runtime)})
    try:
        with running(server):
            net_before = kernel.netstat()
            first_store = manager.stored() if manager else None
            with ExitStack() as stack:
                most = 2 * spec["warmup"] + spec["restarts"] * (RESTART_SETTLE + 120)  # a bound, not the plan
                load = stack.enter_context(Clients(server.address, spec["clients"], spec["concurrency"],
                                                   seconds=most, timeout=spec["timeout"]))
                time.sleep(spec["warmup"])
                rounds: list[dict[str, Any]] = []
                for _ in range(spec["restarts"]):
                    assert server.sup is not None and server.sup.proc is not None
                    master, old = server.master_pid, server.worker_pids()
                    old_listeners = serving_listeners(server.sup)
                    started = time.monotonic()
                    os.kill(master, getattr(signal, signame))
                    server.sup.proc.wait(timeout=60)
                    exited = time.monotonic()
                    server.start()
                    serving = time.monotonic()
                    listeners = serving_listeners(server.sup)
                    store = store_ms = None
                    if manager is not None:  # the adopted listeners go once the new generation is ready
                        try:
                            wait_for("the store to hold the serving listeners",
                                     partial(store_holds, manager, listeners), timeout=10, interval=0.005)
                            store_ms = ms(time.monotonic() - serving)
                        except AssertionError:
                            pass
                        store = manager.stored()
                    rounds.append({"at": started, "old": old, "master_pid": master,
                                   "new_master_pid": server.master_pid, "old_workers": sorted(old),
                                   "new_workers": sorted(server.worker_pids()), "old_listeners": old_listeners,
                                   "listeners": listeners, "store": store, "store_ms": store_ms,
                                   "store_ok": None if store is None else store == listeners,
                                   "exit_ms": ms(exited - started), "start_ms": ms(serving - exited),
                                   "restart_ms": ms(serving - started), "runtime_folders": len(os.listdir(runtime))})
                    time.sleep(RESTART_SETTLE)
                    rounds[-1]["old_workers_left"] = sum(1 for pid in old if alive(pid))
                time.sleep(spec["warmup"])
                tally = load.finish()
            net = {k: v - net_before[k] for k, v in kernel.netstat().items()}
            adopted = [e.get("listeners") for e in server.sup.events("fdstore_adopted")] if server.sup else []
    finally:
        if manager is not None:
            manager.close()
    windows = [r["at"] for r in rounds] + [float("inf")]

    def began(failure: tuple[float, str, str]) -> float:  # when the failed connection started, about
        return failure[0] - spec["timeout"] if failure[1] == "timeout" else failure[0]

    for i, r in enumerate(rounds):
        failures = [f for f in tally.failures if windows[i] <= began(f) < windows[i + 1]]
        r["failed"] = {kind: n for kind, n in Counter(kind for _t, kind, _d in failures).items()}
        r["failed_at_ms"] = [ms(at - r["at"]) for at, _kind, _d in failures[:20]]  # when counted, after the signal
        fresh = [first for pid, (first, _last, _n) in tally.pids.items() if pid not in r["old"] and first >= r["at"]]
        last_old = max((last for pid, (_first, last, _n) in tally.pids.items() if pid in r["old"]), default=None)
        r["new_answers_ms"] = ms(min(fresh) - r["at"]) if fresh else None  # signal to the new workers' first answer
        r["no_answer_ms"] = ms(min(fresh) - last_old) if fresh and last_old is not None else None
        r["last_old_answer_ms"] = ms(last_old - r["at"]) if last_old is not None else None
    failed = Counter(kind for _t, kind, _d in tally.failures)
    seconds = tally.ended - tally.started
    return {
        "scenario": "restart", "system": spec["system"], "signal": signame, "fd_store": with_store, "run": spec["run"],
        "workers": spec["workers"], "backlog": spec["backlog"], "clients": spec["clients"],
        "concurrency": spec["concurrency"], "timeout": spec["timeout"], "restarts": len(rounds),
        "seconds": round(seconds, 1), "connections": tally.ok + len(tally.failures), "ok": tally.ok,
        "failed": {kind: failed.get(kind, 0) for kind in KINDS},
        "failed_per_restart": [sum(r["failed"].values()) for r in rounds],
        "failed_before_first_restart": sum(1 for f in tally.failures if began(f) < windows[0]),
        "failure_examples": sorted({f"{kind}: {detail}" for _t, kind, detail in tally.failures})[:5],
        "conn_per_s": round(tally.ok / seconds), "netstat": net,
        "latency_ms": {key: summary([r[key] for r in rounds if r.get(key) is not None])
                       for key in ("exit_ms", "start_ms", "restart_ms", "new_answers_ms", "no_answer_ms", "store_ms")},
        "store_first": first_store, "store_ok": sum(1 for r in rounds if r["store_ok"]),
        "adopted": adopted,
        "per_restart": [{k: v for k, v in r.items() if k not in ("at", "old")} for r in rounds],
    }


def peers_run(spec: dict[str, Any], folder: Path) -> dict[str, Any]:
    """The peers part (bench/peers.py): one run of one system under one kind of load, a quiet window and then
    the reloads; each answer's latency from the load, split by window."""
    cls, settings, migrate = peers.PEERS[spec["system"]]
    kernel.set_migrate(migrate)
    server = cls(folder, workers=spec["workers"], backlog=spec["backlog"], **settings)
    most = 2 * spec["warmup"] + spec["quiet"] + spec["reloads"] * (spec["interval"] + 60)  # a bound, not the plan
    with running(server), Clients(server.address, spec["clients"], spec["concurrency"], seconds=most,
                                  timeout=spec["timeout"], keep_alive=spec["load"] == "keep-alive",
                                  latency=True) as load:
        time.sleep(spec["warmup"])
        quiet = (time.monotonic(), time.monotonic() + spec["quiet"])
        time.sleep(spec["quiet"])
        reloads: list[dict[str, Any]] = []
        for _ in range(spec["reloads"]):
            old = kernel.listening_pids(server.port, server.worker_pids())
            started = time.monotonic()
            reported = server.reload()
            returned = time.monotonic()
            try:  # a peer may give its reload up and keep the old workers (uvicorn: a new one not ready in 5 s)
                closed: float | None = wait_closed(server.port, old, timeout=GIVEN_UP)
            except TimeoutError:
                closed = None
            reloads.append({"at": started, "old": old, "command_ms": ms(returned - started), "done": closed is not None,
                            "closed_ms": ms(closed - started) if closed is not None else None, **reported})
            time.sleep(max(0.0, started + spec["interval"] - time.monotonic()))
        reloading = (reloads[0]["at"], time.monotonic()) if reloads else (quiet[1], quiet[1])
        if reloads and reloads[-1]["done"]:  # kept connections move to the new workers as the old ones stop
            wait_gone(reloads[-1]["old"], timeout=GIVEN_UP)
        time.sleep(spec["warmup"])
        tally = load.finish()
    ends = [r["at"] for r in reloads[1:]] + [float("inf")]  # a failure counts against the reload it followed
    for r, end in zip(reloads, ends, strict=True):
        r["failed"] = sum(1 for at, _kind, _detail in tally.failures if r["at"] <= at < end)
        fresh = [first for pid, (first, _last, _n) in tally.pids.items() if pid not in r["old"] and first >= r["at"]]
        r["new_serving_ms"] = ms(min(fresh) - r["at"]) if fresh else None
    failed = Counter(kind for _t, kind, _d in tally.failures)
    latencies = tally.latencies or []
    return {
        "scenario": "peers", "system": spec["system"], "load": spec["load"], "run": spec["run"],
        "workers": spec["workers"], "backlog": spec["backlog"], "clients": spec["clients"],
        "concurrency": spec["concurrency"], "interval": spec["interval"], "tcp_migrate_req": migrate,
        "reloads": len(reloads),
        "requests": tally.ok + len(tally.failures), "failed": {kind: failed.get(kind, 0) for kind in KINDS},
        "failed_quiet": sum(1 for at, _kind, _detail in tally.failures if quiet[0] <= at < quiet[1]),
        "failed_per_reload": [r["failed"] for r in reloads],
        "not_done": sum(1 for r in reloads if not r["done"]),
        "failure_examples": sorted({f"{kind}: {detail}" for _t, kind, detail in tally.failures})[:5],
        "quiet": window(latencies, *quiet), "reloading": window(latencies, *reloading),
        "reload_ms": {key: peers.median([r[key] for r in reloads if r.get(key) is not None])
                      for key in ("command_ms", "new_serving_ms", "closed_ms")},
        "per_reload": [{k: v for k, v in r.items() if k not in ("at", "old")} for r in reloads],
    }


def window(latencies: list[tuple[float, float]], start: float, end: float) -> dict[str, float | None]:
    """The answers that came between `start` and `end`: per second, and their p50/p99 in ms."""
    took = [t for at, t in latencies if start <= at < end]
    return {"per_s": round(len(took) / (end - start)) if end > start else None,
            "p50": percentile(took, 50), "p99": percentile(took, 99), "n": len(took)}


def store_holds(manager: ServiceManager, names: list[str]) -> bool:
    return manager.stored() == names


def serving_listeners(sup: harness.Supervisor) -> list[str]:
    """The fd-store names of the serving listeners (`program.generation.worker.n`, or with one shared queue
    `program.generation.shared.n`; one address: n is 0)."""
    return sorted({f"{p['name']}.{w['generation']}.{'shared' if p['accept_queue'] == 'shared' else w['worker']}.0"
                   for p in sup.status()["programs"] for w in p["workers"] if w["state"] == "ready"})


def alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def master_use(pid: int) -> dict[str, float]:
    """The master's resident memory (MiB) and open fds now."""
    proc = psutil.Process(pid)
    return {"rss_mib": round(proc.memory_info().rss / 2**20, 1), "fds": proc.num_fds()}


SCENARIOS = {"restart": restart_under_load, "upgrade": upgrade_under_load,
             "stop_delay": stop_delay, "reload": reload_under_load, "accept_queue": accept_queue,
             "keepalive": keepalive, "scaling": scaling,
             "throughput": throughput, "footprint": footprint, "preload_reload": preload.preload_reload,
             "memory": preload.memory, "reload_latency": latency.reload_latency, "peers": peers_run}


def main(argv: list[str]) -> int:
    spec = json.loads(argv[0])
    subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
    with tempfile.TemporaryDirectory(prefix="bench-") as folder:
        result = SCENARIOS[spec["scenario"]](spec, Path(folder))
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
