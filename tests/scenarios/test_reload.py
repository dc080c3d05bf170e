"""The reload guarantees, each in a private network namespace with real processes and the real kernel."""

from __future__ import annotations

import os
import signal
import socket
import time
from pathlib import Path
from typing import Any

import pytest

from tests.harness import (
    PYTHON,
    Supervisor,
    collect,
    kernel_counters,
    listening_inodes,
    open_requests,
    program,
    request,
    supervisor,
    wait_for,
)
from tests.load import Clients, Tally

pytestmark = pytest.mark.usefixtures("netns")

QUEUED = 200
APPS = Path(__file__).resolve().parents[1] / "apps"


def stop_workers(pids: list[int]) -> None:
    for pid in pids:
        os.kill(pid, signal.SIGSTOP)


def queued_reload(tmp_path: Path, migrate: str, host: str = "127.0.0.1",
                  accept_queue: str = "per-worker") -> tuple[dict[str, int], dict[int, int], int]:
    """Old workers frozen, 200 requests queued in their listeners, then a reload."""
    listen = f"[{host}]:8000" if ":" in host else f"{host}:8000"
    settings = program(graceful_timeout=1, listen=[listen], accept_queue=accept_queue)
    with supervisor(tmp_path, {"web": settings}, migrate=migrate) as sup:
        old = sup.workers()
        stop_workers([w["pid"] for w in old])
        socks = open_requests(QUEUED, (host, 8000))
        reload = sup.ctl("reload")
        outcomes, generations = collect(socks)
        return dict(outcomes), dict(generations), reload.returncode


@pytest.mark.parametrize(("host", "accept_queue"), [("127.0.0.1", "per-worker"), ("::1", "per-worker"),
                                                    ("127.0.0.1", "shared")])
def test_queued_connections_migrate_to_the_new_generation(tmp_path: Path, host: str, accept_queue: str) -> None:
    """Every request queued behind frozen old workers is answered by the new generation (IPv4 and IPv6;
    per-worker queues, and the one queue the old workers shared)."""
    outcomes, generations, code = queued_reload(tmp_path, "require", host, accept_queue)
    assert code == 0
    assert outcomes == {"ok": QUEUED}
    assert generations == {2: QUEUED}


@pytest.mark.parametrize("accept_queue", ["per-worker", "shared"])
def test_without_migration_the_same_reload_loses_connections(tmp_path: Path, accept_queue: str) -> None:
    """Control: with migrate off, the kernel resets what waited in the old listeners."""
    outcomes, _generations, code = queued_reload(tmp_path, "off", accept_queue=accept_queue)
    assert code == 0
    assert outcomes.get("ok", 0) < QUEUED, outcomes
    assert outcomes.get("reset", 0) > 0, outcomes


@pytest.mark.parametrize(("accept_queue", "load"), [
    ("per-worker", {"concurrency": 16}),
    ("shared", {"concurrency": 64}),
    ("shared", {"concurrency": 64, "keep_alive": True, "method": "POST"}),
], ids=["per-worker", "shared", "shared-keep-alive"])
def test_reload_under_load_fails_no_connection(tmp_path: Path, accept_queue: str, load: dict[str, Any]) -> None:
    """New connections all the time (or 64 kept ones), a reload every 0.5 s for ~10 s: zero failures,
    every generation serves. With one shared queue the group holds one listener per generation."""
    before = kernel_counters()
    seconds = 10 if accept_queue == "per-worker" else 6
    with supervisor(tmp_path, {"web": program(accept_queue=accept_queue)}) as sup, \
            Clients("127.0.0.1:8000", **load) as clients:
        deadline = time.monotonic() + seconds
        reloads = 0
        while time.monotonic() < deadline:
            time.sleep(0.5)  # pacing: the load runs between reloads
            assert sup.reload().returncode == 0
            reloads += 1
            if accept_queue == "shared":  # the old generation's one listener is shut, the new one's listens
                assert len(listening_inodes()) == 1
        time.sleep(1.0 if accept_queue == "per-worker" else 1.5)  # answers from the last generation (past stop_delay)
        tally = clients.finish()
    kernel = {key: value - before[key] for key, value in kernel_counters().items()}  # what the kernel saw, if it fails
    assert not tally.failures, (tally.describe(), kernel)
    assert tally.ok > 1000, tally.describe()
    served = set(tally.generations)
    assert len(served) >= reloads * 0.8, (reloads, tally.generations)  # nearly every generation got traffic
    assert reloads + 1 in served


def reload_with_a_busy_old_worker(tmp_path: Path, migrate: str, accept_queue: str) -> Tally:
    """Before each reload one old worker freezes (a long GC, a CPU-bound request): its queue fills (with
    one shared queue its sibling accepts what waits there)."""
    settings = program(graceful_timeout=1, accept_queue=accept_queue)
    with supervisor(tmp_path, {"web": settings}, migrate=migrate) as sup, \
            Clients("127.0.0.1:8000", concurrency=16) as load:
        time.sleep(0.3)  # the clients import
        for _ in range(8):
            time.sleep(0.3)  # pacing: the load runs between reloads
            # A serving worker: the last generation's retiring ones may still be finishing (stop_delay).
            busy = next(w["pid"] for w in sup.workers() if w["state"] == "ready")
            stop_workers([busy])
            time.sleep(0.2)  # the clients that hash to it now wait in its accept queue
            sup.reload()
            os.kill(busy, signal.SIGCONT)  # it recovers and finishes what it had accepted
        return load.finish()


@pytest.mark.parametrize(("migrate", "accept_queue", "loses"), [
    ("require", "per-worker", False), ("off", "per-worker", True), ("require", "shared", False)])
def test_busy_old_worker_under_load(tmp_path: Path, migrate: str, accept_queue: str, loses: bool) -> None:
    """With migration the frozen worker's queue moves to the new generation; without, it is reset."""
    tally = reload_with_a_busy_old_worker(tmp_path, migrate, accept_queue)
    assert tally.connections > 500
    if loses:
        assert tally.failed()["reset"] >= 8, tally.describe()  # at least one per reload
    else:
        assert not tally.failures, tally.describe()


def failing_reload(tmp_path: Path, bad: dict[str, object],
                   accept_queue: str = "per-worker") -> tuple[int, str, Tally, int]:
    with supervisor(tmp_path, {"web": program(accept_queue=accept_queue)}) as sup, \
            Clients("127.0.0.1:8000", concurrency=8) as load:
        time.sleep(0.5)  # the clients import and get answers
        serving = listening_inodes()
        sup.write({"web": {**program(accept_queue=accept_queue), **bad}})
        result = sup.ctl("reload")
        gen_after = sup.generation()
        assert listening_inodes() == serving  # the new listeners are shut, the serving ones still listen
        time.sleep(0.5)  # keep loading briefly after the rollback
        code, body = request()
        assert code == 200 and body["generation"] == 1
        tally = load.finish()
    assert tally.ok > 50, tally.describe()
    return result.returncode, result.stdout + result.stderr, tally, gen_after


def test_generation_that_exits_at_start_is_rolled_back(tmp_path: Path) -> None:
    """Reload exits 1 with the worker's exit status and stderr; generation 1 serves on, nothing fails."""
    crash = [PYTHON, "-c", "import sys; print('cannot load app: boom', file=sys.stderr); sys.exit(3)"]
    code, output, load, gen = failing_reload(tmp_path, {"command": crash})
    assert code == 1, output
    assert "exit status 3" in output and "cannot load app: boom" in output, output
    assert "rolled back" in output and "web#1" in output
    assert gen == 1
    assert not load.failures, load.describe()


@pytest.mark.parametrize("accept_queue", ["per-worker", "shared"])
def test_generation_not_ready_in_time_is_rolled_back(tmp_path: Path, accept_queue: str) -> None:
    """A worker that never sends READY=1 holds its listener: its queue must move back on rollback.

    The reason quotes what the worker last wrote to stderr, as for a worker that exits.
    """
    silent = [PYTHON, "-c", "import sys, time; print('still loading the model', file=sys.stderr); time.sleep(60)"]
    code, output, load, gen = failing_reload(tmp_path, {"command": silent, "ready_timeout": 1}, accept_queue)
    assert code == 1, output
    assert "not ready within 1 s" in output, output
    assert "last stderr lines of worker 0 (pid " in output and "still loading the model" in output, output
    assert gen == 1
    assert not load.failures, load.describe()


def test_bad_config_at_reload_changes_nothing(tmp_path: Path) -> None:
    """A wrong key is refused with file, line and key; the serving generation keeps serving."""
    with supervisor(tmp_path, {"web": program()}) as sup:
        sup.config.write_text(sup.config.read_text().replace("workers: 2", "workers: two"))
        result = sup.ctl("reload")
        assert result.returncode == 1
        assert f"{sup.config}:" in result.stderr and "programs.web.workers" in result.stderr, result.stderr
        assert sup.generation() == 1
        assert request()[0] == 200


def test_a_program_whose_first_start_failed_starts_at_the_next_reload(tmp_path: Path) -> None:
    """A reload that adds a program that cannot start changes nothing, and does not mark it stopped:
    once the config is fixed, the next reload starts it."""
    failing = {**program([PYTHON, "-c", "raise SystemExit(1)"]), "listen": ["127.0.0.1:8001"]}
    with supervisor(tmp_path, {"web": program()}) as sup:
        sup.write({"web": program(), "api": failing})
        assert sup.ctl("reload").returncode == 1
        states = {p["name"]: p["state"] for p in sup.status()["programs"]}
        assert states == {"web": "serving"} and sup.generation() == 1, states  # the config in force has no api
        sup.write({"web": program(), "api": {**program(), "listen": ["127.0.0.1:8001"]}})
        sup.reload()
        assert {p["name"]: p["state"] for p in sup.status()["programs"]} == {"web": "serving", "api": "serving"}
        assert request(("127.0.0.1", 8001))[0] == 200


def test_unreadable_number_is_one_line_at_start_and_at_reload(tmp_path: Path) -> None:
    """`.inf` (YAML's infinity) names file, line and key: supervisord exits 2; a reload is refused at
    once (it used to leave supervisorctl waiting) and generation 1 serves on."""
    (tmp_path / "bad").mkdir()
    bad = Supervisor(tmp_path / "bad", {"web": program(ready_timeout=float("inf"))})
    assert bad.exit_status_of_refused_start() == 2
    assert "programs.web.ready_timeout: expected a number of seconds, got .inf" in bad.log_text()
    assert "Traceback" not in bad.log_text()
    with supervisor(tmp_path, {"web": program()}) as sup:
        sup.config.write_text(sup.config.read_text().replace("ready_timeout: 10", "ready_timeout: .inf"))
        started = time.monotonic()
        result = sup.ctl("reload", timeout=20)
        assert result.returncode == 1 and time.monotonic() - started < 5, result
        assert f"{sup.config}:" in result.stderr and "programs.web.ready_timeout" in result.stderr, result.stderr
        assert sup.generation() == 1 and request()[0] == 200


def test_an_unforeseen_error_still_answers_and_rolls_back(tmp_path: Path) -> None:
    """An error the master does not expect (posix_spawn refuses a NUL byte in env) is still the reply
    of `reload`, which is rolled back; generation 1 serves on and the next reload works."""
    with supervisor(tmp_path, {"web": program()}) as sup:
        sup.write({"web": program(env={"BROKEN": "a\0b"})})
        result = sup.ctl("reload", timeout=20)
        assert result.returncode == 1, result
        assert "internal error: ValueError: embedded null byte" in result.stderr, result.stderr
        assert "rolled back, still serving: web#1" in result.stderr, result.stderr
        assert request()[1]["generation"] == 1
        sup.write({"web": program()})
        assert "reload done" in sup.reload().stdout
        assert request()[1]["generation"] == 3


def test_reload_onto_an_address_in_use_is_refused(tmp_path: Path) -> None:
    """A new address that another process holds without SO_REUSEPORT: the reload is refused before
    anything starts, naming it and its holder; generation 1 serves on, no connection fails."""
    with socket.create_server(("127.0.0.1", 8001)):
        code, output, load, gen = failing_reload(tmp_path, {"listen": ["127.0.0.1:8000", "127.0.0.1:8001"]})
    assert code == 1, output
    assert f"web: 127.0.0.1:8001 is in use: pid {os.getpid()} (" in output, output
    assert gen == 1
    assert not load.failures, load.describe()


@pytest.mark.parametrize("stop_signal", [None, "QUIT", "INT"])
def test_retiring_workers_get_the_program_stop_signal(tmp_path: Path, stop_signal: str | None) -> None:
    """On reload, and on the daemon's own graceful stop, old workers receive `stop_signal` (default TERM)."""
    out = tmp_path / "out"
    out.mkdir()
    recorder = [PYTHON, "-S", "-I", str(APPS / "recorder.py"), str(out)]
    settings = program(recorder, **({"stop_signal": stop_signal} if stop_signal else {}))
    expected = f"SIG{stop_signal or 'TERM'}"

    def received(pids: list[int]) -> list[str]:
        files = [out / f"{pid}.signal" for pid in pids]
        wait_for("every worker to record its stop signal", lambda: all(f.exists() for f in files))
        return [f.read_text() for f in files]

    with supervisor(tmp_path, {"web": settings}) as sup:
        first = [w["pid"] for w in sup.workers()]
        sup.reload()
        assert received(first) == [expected] * 2
        second = [w["pid"] for w in sup.workers() if w["state"] == "ready"]  # not those still retiring
        assert sup.stop() == 0
    assert received(second) == [expected] * 2
