"""Real servers under the supervisor, reloaded as fast as they start while 64 new connections are in flight.

Each server runs as 2 workers with the settings docs/servers.md, "Tested servers", recommends for it; the
assertion is the product's promise: not one failed connection, and the last generation serves. A
graceful stop at the end must leave no process behind (gunicorn's workers are its arbiter's children).
"""

from __future__ import annotations

import contextlib
import re
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil
import pytest
import yaml

from supervisor.config.schema import Program
from tests.harness import BIN, DEMO, PYTHON, Supervisor, program, running, supervisor, wait_for
from tests.load import Clients, Tally

pytestmark = pytest.mark.usefixtures("netns")
ROOT = Path(__file__).resolve().parents[2]  # the workers' cwd: `tests.apps...` imports from here
RELOADING = 20.0  # seconds of reloads per server
MIN_RELOADS = 8  # a slow server (hypercorn starts in 2-3 s on a busy machine) gets up to twice the time for these
PAUSE = 0.2  # seconds between one reload's end and the next one's start
CONCURRENCY = 64
UVICORN_WORKER = "supervisor.servers.uvicorn_worker.UvicornWorker"  # uvicorn-worker's class with the stop contract


@dataclass(frozen=True)
class Server:
    command: list[str]
    settings: dict[str, Any]  # ready, settle, stop_signal, stop_delay: what makes its reloads lossless
    cwd: Path | None = ROOT  # where it imports the app from (`tests.apps...`)


def gunicorn(worker_class: str, app: str) -> list[str]:
    # One gunicorn worker per supervised worker: the supervisor's workers are gunicorn arbiters, each with
    # its own listener. No --bind: gunicorn takes fd 3 from LISTEN_FDS, and `--bind fd://3` as well would
    # make it open fd 3 twice (EBADF, it closes the first copy). No control socket: every arbiter would
    # share the default path $HOME/.gunicorn/gunicorn.ctl.
    return [str(BIN / "gunicorn"), "--workers", "1", "--worker-class", worker_class, "--graceful-timeout", "5",
            "--no-control-socket", app]


SERVERS = {
    "demo": Server(DEMO, {"ready": "notify", "stop_signal": "TERM", "stop_delay": 0.5}, cwd=None),
    # The runners: every inherited listener, READY=1, and the stop contract (test_keepalive.py)
    "uvicorn": Server([PYTHON, "-m", "supervisor.servers.uvicorn", "--no-access-log", "tests.apps.asgi:app"],
                      {"ready": "notify", "stop_signal": "TERM", "stop_delay": 0.5}),
    "hypercorn": Server([PYTHON, "-m", "supervisor.servers.hypercorn", "tests.apps.asgi:app"],
                        {"ready": "notify", "stop_signal": "TERM", "stop_delay": 0.5}),
    # A sync worker serves each connection it accepts to the end before the next accept(): nothing to read
    # after the shut, and during a delay its accept() fails (EINVAL), it dies and its arbiter forks another.
    # TERM is gunicorn's graceful stop (INT and QUIT its fast one); its arbiter sends READY=1 before it forks
    # a worker, and sync workers wait in select(), so `settle` longer than the worker's boot.
    "gunicorn sync": Server(gunicorn("sync", "tests.apps.wsgi:app"),
                            {"ready": "settle", "settle": 1.0, "stop_signal": "TERM", "stop_delay": 0}),
    # uvicorn inside, with the uvicorn runner's protocol class (the arbiter passes TERM on within milliseconds)
    "gunicorn uvicorn-worker": Server(gunicorn(UVICORN_WORKER, "tests.apps.asgi:app"),
                                      {"ready": "accepting", "settle": 0.2, "stop_signal": "TERM",
                                       "stop_delay": 0.5}),
}


def serving_pids(workers: list[dict[str, Any]]) -> dict[int, set[int]]:
    """Each worker's pid -> the pids that may answer for it (itself and, for gunicorn, its workers)."""
    found = {}
    for w in workers:
        try:
            found[w["pid"]] = {w["pid"], *(p.pid for p in psutil.Process(w["pid"]).children(recursive=True))}
        except psutil.NoSuchProcess:
            found[w["pid"]] = {w["pid"]}
    return found


@contextlib.contextmanager
def no_orphans(sup: Supervisor) -> Iterator[None]:
    """Kill what supervisord's workers started and left: its SIGKILL kills each worker (parent-death signal)
    but not a worker's children (gunicorn's workers, uvicorn-worker's never notice their arbiter is gone)."""
    assert sup.proc is not None
    tree: list[psutil.Process] = []
    try:
        yield
    finally:
        try:
            tree = psutil.Process(sup.proc.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            pass
        sup.kill()
        for proc in tree:
            try:
                proc.kill()
            except psutil.NoSuchProcess:
                pass



def describe(tally: Tally, reloads: int) -> str:
    examples = sorted({f"{kind}: {detail}" for _at, kind, detail in tally.failures})[:5]
    return f"{tally.connections} connections, {reloads} reloads, failed {tally.failed()} {examples}"


@pytest.mark.parametrize("name", SERVERS)
def test_reloads_under_load_fail_no_connection(tmp_path: Path, name: str) -> None:
    server = SERVERS[name]
    settings = program(server.command, graceful_timeout=10, **server.settings)
    if server.cwd:
        settings["cwd"] = str(server.cwd)
    with supervisor(tmp_path, {"web": settings}) as sup, no_orphans(sup), \
            Clients("127.0.0.1:8000", concurrency=CONCURRENCY, seconds=RELOADING + 60) as load:
        reloads = 0
        deadline = time.monotonic() + RELOADING
        while time.monotonic() < deadline or (reloads < MIN_RELOADS and time.monotonic() < deadline + RELOADING):
            time.sleep(PAUSE)  # pacing: the load runs between reloads
            sup.reload()
            reloads += 1
        last_reload = time.monotonic()
        generation = sup.generation()
        last = [w for w in sup.workers() if w["generation"] == generation]
        time.sleep(1.0)  # the load reaches every worker of the last generation (checked from the tally below)
        answering = serving_pids(last)
        tally = load.finish()
        assert sup.proc is not None
        tree = psutil.Process(sup.proc.pid).children(recursive=True)
        assert sup.stop() == 0  # gracefully: the servers' own stop, gunicorn's arbiters stopping their workers
        wait_for("every process of the tree to exit", lambda: not [p for p in tree if running(p.pid)], timeout=10)
    print(f"\n{name}: {describe(tally, reloads)}")
    assert not tally.failures, describe(tally, reloads)
    assert reloads >= MIN_RELOADS and tally.connections > 20 * reloads, describe(tally, reloads)
    assert len(last) == 2 and generation == reloads + 1
    silent = [pid for pid, pids in answering.items() if not any(tally.pids.get(p, [0, 0])[1] > last_reload
                                                                for p in pids)]
    assert not silent, f"workers of the last generation never answered: {silent}"


def recipes() -> dict[str, dict[str, Any]]:
    """The `programs:` entries of docs/servers.md's recipes, made runnable here: the app is the tests' (WSGI for
    gunicorn's sync workers), the servers this venv's, one worker each (a listener's backlog is per listener)."""
    text = (ROOT / "docs" / "servers.md").read_text()
    section = text[text.index("### Recipes"):text.index("### Measured")]
    found: dict[str, dict[str, Any]] = {}
    for block in re.findall(r"^```yaml\n(.*?)^```", section, re.S | re.M):
        for name, settings in yaml.safe_load(block)["programs"].items():
            command = settings["command"]
            wsgi = command[0] == "gunicorn" and "--worker-class" not in command
            app = "tests.apps.wsgi:app" if wsgi else "tests.apps.asgi:app"
            settings["command"] = [PYTHON if word == "python" else str(BIN / word) if i == 0 else
                                   app if word == "app:app" else word for i, word in enumerate(command)]
            found[name] = {**settings, "workers": 1, "cwd": str(ROOT), "ready_timeout": 60}
    return found


def test_every_recipe_keeps_the_programs_backlog(tmp_path: Path) -> None:
    """A server that calls listen() again on fd 3 sets its own backlog (stock hypercorn: 100): every recipe in
    docs/servers.md must leave each listener with the program's backlog, as the kernel reports it (Send-Q)."""
    programs = recipes()
    assert {"asgi-uvicorn", "asgi-hypercorn", "wsgi-gunicorn", "stock-uvicorn", "stock-hypercorn"} <= set(programs)
    with supervisor(tmp_path, programs) as sup, no_orphans(sup):
        listening = subprocess.run(["ss", "-Hltn"], capture_output=True, text=True, check=True).stdout
    backlogs: dict[str, set[int]] = {}
    for line in listening.splitlines():  # State Recv-Q Send-Q Local:Port Peer:Port; Send-Q: the backlog
        fields = line.split()
        backlogs.setdefault(fields[3], set()).add(int(fields[2]))
    expected = {settings["listen"]: {settings.get("backlog", Program.backlog)}
                for settings in programs.values()}
    assert {address: backlogs.get(address) for address in expected} == expected


def cpu_seconds(pid: int) -> float:
    """Time the process's main thread has run on a CPU (/proc/PID/schedstat, ns)."""
    return int(Path(f"/proc/{pid}/schedstat").read_text().split()[0]) / 1e9


@pytest.mark.parametrize("name", ["demo", "uvicorn"])
def test_old_workers_do_not_spin_between_the_shut_and_their_stop_signal(tmp_path: Path, name: str) -> None:
    """During `stop_delay` a retiring worker's listeners are shut and it has no stop signal yet: the runners
    stop watching the dead listeners at once (stopping.close_when_shut). uvloop would spin on them at about
    0.8 CPU (docs/kernel.md §5)."""
    server = SERVERS[name]
    settings = program(server.command, **{**server.settings, "stop_delay": 3.0})
    if server.cwd:
        settings["cwd"] = str(server.cwd)
    with supervisor(tmp_path, {"web": settings}) as sup:
        old = [w["pid"] for w in sup.workers()]
        sup.reload()
        assert all(running(pid) for pid in old)  # the stop signal is 3 s away
        before, started = {pid: cpu_seconds(pid) for pid in old}, time.monotonic()
        time.sleep(1.0)
        used, elapsed = {pid: cpu_seconds(pid) - before[pid] for pid in old}, time.monotonic() - started
        assert all(running(pid) for pid in old)
    assert max(used.values()) < 0.1 * elapsed, f"CPU-s in {elapsed:.2f} s: {used}"
