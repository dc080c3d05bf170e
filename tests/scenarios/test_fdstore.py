"""systemd's fd store (with a small stand-in for systemd, tests/servicemanager.py): a crash or a
restart of supervisord loses no connection, because its listeners wait in the store."""

from __future__ import annotations

import os
import signal
import socket
import time
from pathlib import Path
from typing import Any

import pytest

from tests.harness import Supervisor, listening_inodes, program, request, running, wait_for
from tests.load import Clients
from tests.servicemanager import ServiceManager

pytestmark = pytest.mark.usefixtures("netns")


def service(tmp_path: Path, announces: bool = True, **settings: Any) -> tuple[ServiceManager, Supervisor]:
    manager = ServiceManager(tmp_path, announces)
    sup = Supervisor(tmp_path, {"web": program(graceful_timeout=5, **settings)})
    sup.env = {"RUNTIME_DIRECTORY": str(tmp_path / "run")}
    (tmp_path / "run").mkdir()
    return manager, sup


def serving_listeners(sup: Supervisor, shared: bool = False) -> list[str]:
    """The store names of the serving generation's listeners (one address: n is 0); with one shared
    queue, the generation's one listener."""
    return sorted({f"web.{w['generation']}.{'shared' if shared else w['worker']}.0" for w in sup.workers()
                   if w["state"] == "ready"})


@pytest.mark.parametrize(("how", "accept_queue"), [("SIGKILL", "per-worker"), ("SIGTERM", "per-worker"),
                                                   ("SIGKILL", "shared")])
def test_a_crash_or_a_restart_under_load_loses_no_connection(tmp_path: Path, how: str, accept_queue: str) -> None:
    """64 connections in flight; supervisord killed (or stopped) and started again by the manager."""
    manager, sup = service(tmp_path, accept_queue=accept_queue)
    shared = accept_queue == "shared"
    stored = ["web.1.shared.0"] if shared else ["web.1.0.0", "web.1.1.0"]
    try:
        manager.start(sup)
        assert manager.stored() == serving_listeners(sup, shared) == stored
        assert [len(manager.store[name]) for name in stored] == [1] * len(stored)  # sent once
        with Clients("127.0.0.1:8000", concurrency=64, seconds=60, timeout=10) as load:
            time.sleep(1.0)  # the load runs before the crash (Clients has no live count to wait on)
            assert sup.proc is not None
            old_workers = [w["pid"] for w in sup.workers()]
            sup.proc.send_signal(getattr(signal, how))
            sup.proc.wait(timeout=30)
            manager.start(sup)
            assert sup.generation() == 2  # numbering goes on from the adopted generation
            time.sleep(1.5)  # the load runs on against the new master
            tally = load.finish()
        assert tally.ok > 500 and not tally.failures, tally.failed()
        wait_for("the store to hold the serving listeners only",
                 lambda: manager.stored() == serving_listeners(sup, shared), timeout=10)
        # Their stop signal came as the parent-death signal (or from the stopping master): they finish and exit.
        wait_for("the old workers to exit", lambda: not [pid for pid in old_workers if running(pid)], timeout=15)
        adopted = sup.events("fdstore_adopted")[-1]
        assert sorted(adopted["listeners"]) == stored
    finally:
        sup.kill()
        manager.close()


def test_the_only_worker_replaced_then_a_master_crash_keeps_one_shared_listener(tmp_path: Path) -> None:
    """`accept_queue: shared`, one worker, SIGKILLed: its replacement is watched with no sibling, and
    the generation's listener goes to the store again, which keeps it once (as systemd does); the same
    kernel socket listens all along. A master SIGKILL then hands that one listener back, and the next
    master serves."""
    manager, sup = service(tmp_path, workers=1)
    try:
        manager.start(sup)
        listening = listening_inodes()
        [worker] = sup.workers()
        os.kill(worker["pid"], signal.SIGKILL)
        wait_for("the replacement", lambda: [w["restarts"] for w in sup.workers() if w["state"] == "ready"] == [1])
        sends = [m for m in manager.messages if m.get("FDSTORE") == "1" and m.get("FDNAME") == "web.1.shared.0"]
        assert len(sends) == 2 and len(manager.store["web.1.shared.0"]) == 1
        assert listening_inodes() == listening
        assert sup.proc is not None
        sup.proc.kill()
        sup.proc.wait(timeout=30)
        manager.start(sup)
        assert sorted(sup.events("fdstore_adopted")[-1]["listeners"]) == ["web.1.shared.0"]
        assert request()[0] == 200
        wait_for("the store to hold the serving listener only",
                 lambda: manager.stored() == serving_listeners(sup, shared=True) == ["web.2.shared.0"], timeout=10)
    finally:
        sup.kill()
        manager.close()


def test_ten_kills_leave_the_store_and_the_runtime_folder_clean(tmp_path: Path) -> None:
    manager, sup = service(tmp_path)
    try:
        for cycle in range(10):
            manager.start(sup)
            wait_for("the store to hold the serving listeners only",
                     lambda: manager.stored() == serving_listeners(sup, shared=True), timeout=10)
            assert len(os.listdir(tmp_path / "run")) == 1  # the live master's folder, nothing a dead one left
            assert sup.proc is not None
            if cycle < 9:
                sup.proc.kill()
                sup.proc.wait()
        assert sup.generation() == 10
    finally:
        sup.kill()
        manager.close()


def test_unknown_and_unusable_fds_are_closed_and_the_start_is_clean(tmp_path: Path) -> None:
    """A UDP socket, a listener on an address the config does not have, and a listener of a program
    that is gone: all dropped (and removed from the store), the program starts as usual."""
    manager, sup = service(tmp_path)
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    other = socket.create_server(("127.0.0.1", 9000))
    gone = socket.create_server(("127.0.0.1", 8001))
    try:
        manager.start(sup, extra={"mystery": udp.fileno(), "web.3.0.0": other.fileno(), "api.2.0.0": gone.fileno()})
        assert sup.generation() == 1 and sup.serving()
        dropped = sup.events("fdstore_adopted")[0]
        assert sorted(dropped["dropped"]) == ["api.2.0.0", "mystery", "web.3.0.0"] and dropped["listeners"] == []
        assert sup.proc is not None
        held = {os.readlink(f"/proc/{sup.proc.pid}/fd/{f}") for f in os.listdir(f"/proc/{sup.proc.pid}/fd")}
        passed = {f"socket:[{os.fstat(sock.fileno()).st_ino}]" for sock in (udp, other, gone)}
        assert not held & passed, "supervisord kept an fd it did not adopt"
        assert other.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN) == 0  # shut: it was ours, address gone
    finally:
        sup.kill()
        manager.close()
        for sock in (udp, other, gone):
            sock.close()



@pytest.mark.parametrize("unit_says", ["64", ""], ids=["SUPERVISOR_FDSTORE=64", "unset"])
def test_systemd_older_than_254_keeps_the_store_when_the_unit_says_so(tmp_path: Path, unit_says: str) -> None:
    """No $FDSTORE (systemd 249-253): the unit's SUPERVISOR_FDSTORE turns the store on, and a kill
    hands the listeners over; without it nothing is stored (the real 252: test_real_systemd.py)."""
    manager, sup = service(tmp_path, announces=False)
    sup.env["SUPERVISOR_FDSTORE"] = unit_says
    try:
        manager.start(sup)
        assert manager.stored() == (["web.1.shared.0"] if unit_says else [])  # the generation's one listener
        announced = [e["announced_by"] for e in sup.events("fdstore_enabled")]
        assert announced == (["SUPERVISOR_FDSTORE"] if unit_says else [])
        assert sup.proc is not None
        sup.proc.kill()
        sup.proc.wait(timeout=30)
        manager.start(sup)
        adopted = [sorted(e["listeners"]) for e in sup.events("fdstore_adopted")]
        assert adopted == ([["web.1.shared.0"]] if unit_says else [])
    finally:
        sup.kill()
        manager.close()


def test_a_store_size_that_is_not_a_number_refuses_the_start(tmp_path: Path) -> None:
    """A typo in the unit would turn the store off unseen: supervisord exits 2 and says which variable."""
    manager, sup = service(tmp_path, announces=False)
    sup.env["SUPERVISOR_FDSTORE"] = "4096x"
    sup.env["NOTIFY_SOCKET"] = str(manager.path)
    try:
        assert sup.exit_status_of_refused_start() == 2
        assert "supervisord: SUPERVISOR_FDSTORE=4096x: expected the unit's FileDescriptorStoreMax=, a number of fds" \
            in sup.log_text()
    finally:
        manager.close()
