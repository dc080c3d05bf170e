"""The first start: each program starts on its own (one that fails is FATAL, the others serve), failures
say what to change, and an address another process listens on is refused."""

from __future__ import annotations

import os
import socket
import time
from pathlib import Path
from typing import Any

import pytest

from supervisor.errors import EXIT_FAILED, EXIT_USAGE
from tests.harness import DEMO, PYTHON, Supervisor, program, request, supervisor, wait_for
from tests.load import Clients

pytestmark = pytest.mark.usefixtures("netns")


def binder() -> dict[str, Any]:
    """A server that binds its own port, the one the config also gives it: EADDRINUSE at once."""
    return program([PYTHON, "-m", "http.server", "8101", "--bind", "127.0.0.1"], workers=1,
                   listen=["127.0.0.1:8101"])


def silent(flag: Path) -> dict[str, Any]:
    """Never sends READY=1 until `flag` exists; from then on it is the demo."""
    code = (f"import os, sys, time\nif os.path.exists({str(flag)!r}): os.execv(sys.executable, {DEMO!r})\n"
            "time.sleep(120)")
    return program([PYTHON, "-S", "-c", code], workers=1, listen=["127.0.0.1:8102"], ready_timeout=4)


def states(sup: Supervisor) -> dict[str, str]:
    try:
        return {p["name"]: p["state"] for p in sup.status()["programs"]}
    except OSError:  # not listening yet
        return {}


def fatal(sup: Supervisor, name: str) -> str:
    return str(next(p for p in sup.status()["programs"] if p["name"] == name)["fatal"]["reason"])


def test_bad_programs_are_fatal_with_a_hint_and_the_good_one_serves_under_load(tmp_path: Path) -> None:
    flag = tmp_path / "fixed"
    sup = Supervisor(tmp_path, {"web": program(), "binder": binder(), "silent": silent(flag)})
    sup.start(wait=False)
    try:
        wait_for("web serving while the others start", lambda: states(sup).get("web") == "serving")
        with Clients("127.0.0.1:8000", concurrency=64, seconds=30) as load:
            wait_for("binder and silent FATAL", lambda: set(states(sup).values()) == {"serving", "fatal"},
                     timeout=15)
            time.sleep(1)
            tally = load.finish()
        assert not tally.failures and tally.ok > 100, tally.describe()
        assert states(sup) == {"web": "serving", "binder": "fatal", "silent": "fatal"}
        assert "Address already in use" in fatal(sup, "binder")
        assert "hint: the worker tried to bind an address itself" in fatal(sup, "binder")
        assert "ready: notify waits for each worker to send READY=1" in fatal(sup, "silent")
        assert {e["program"] for e in sup.events("program_fatal")} == {"binder", "silent"}
        assert sup.proc is not None and sup.proc.poll() is None
        flag.touch()
        started = sup.ctl("start", "silent")
        assert started.returncode == 0, started.stdout + started.stderr
        assert states(sup)["silent"] == "serving" and request(("127.0.0.1", 8102))[0] == 200
        assert sup.stop() == 0
    finally:
        sup.kill()


def test_supervisord_exits_1_when_no_program_starts(tmp_path: Path) -> None:
    sup = Supervisor(tmp_path, {"binder": binder(), "silent": silent(tmp_path / "never")})
    assert sup.exit_status_of_refused_start() == EXIT_FAILED
    assert [e["program"] for e in sup.events("program_fatal")] == ["binder"]
    assert "silent: generation 1 not ready within 4 s" in sup.events("reload_failed")[0]["reason"]


def foreign_listener(port: int) -> socket.socket:
    """A plain SO_REUSEPORT listener of this (test) process: another program of the same user."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind(("127.0.0.1", port))
    sock.listen()
    return sock


def test_an_address_another_process_listens_on_is_refused_at_start(tmp_path: Path) -> None:
    with foreign_listener(8000):
        sup = Supervisor(tmp_path, {"web": program()})
        assert sup.exit_status_of_refused_start() == EXIT_USAGE
    [line] = sup.events("preflight_failed")
    assert line["problem"].startswith(f"web: 127.0.0.1:8000 is in use: pid {os.getpid()} (")
    assert "set share_listen: true" in line["problem"]


def test_a_second_supervisord_on_the_same_address_is_refused(tmp_path: Path) -> None:
    (tmp_path / "first").mkdir()
    (tmp_path / "second").mkdir()
    with supervisor(tmp_path / "first", {"web": program()}) as first:
        second = Supervisor(tmp_path / "second", {"other": program(listen=["0.0.0.0:8000"])})
        assert second.exit_status_of_refused_start() == EXIT_USAGE
        assert first.proc is not None
        holders = {first.proc.pid, *(w["pid"] for w in first.workers())}
        problem = second.events("preflight_failed")[0]["problem"]
        assert "other: 0.0.0.0:8000 is in use: pid " in problem and "listens on 127.0.0.1:8000" in problem
        assert int(problem.split("pid ")[1].split()[0]) in holders
        assert request()[0] == 200


def test_a_reload_that_adds_a_taken_address_is_refused_and_share_listen_allows_it(tmp_path: Path) -> None:
    with foreign_listener(8001) as theirs, supervisor(tmp_path, {"web": program()}) as sup:
        sup.write({"web": program(listen=["127.0.0.1:8000", "127.0.0.1:8001"])})
        refused = sup.ctl("reload")
        assert refused.returncode != 0 and f"127.0.0.1:8001 is in use: pid {os.getpid()}" in refused.stderr
        assert sup.generation() == 1 and request()[0] == 200
        sup.write({"web": program(listen=["127.0.0.1:8000", "127.0.0.1:8001"], share_listen=True)})
        sup.reload()
        assert sup.generation() == 2 and request()[0] == 200
        theirs.close()
