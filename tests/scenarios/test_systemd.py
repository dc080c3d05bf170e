"""Running under systemd: the unit file verifies, its example config fits it, and supervisord speaks
sd_notify in the right order (a stand-in listens; test_real_systemd.py runs the unit under systemd)."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
from pathlib import Path

import pytest

from supervisor.config import schema
from supervisor.system import fdstore
from tests.harness import BIN, PYTHON, Supervisor, program, wait_for

ROOT = Path(__file__).resolve().parents[2]
UNIT = ROOT / "systemd" / "reuseport-supervisor.service"
CONFIG = ROOT / "config" / "systemd.yaml"


def verify(unit_text: str, folder: Path) -> subprocess.CompletedProcess[str]:
    if shutil.which("systemd-analyze") is None:
        if os.environ.get("CI") == "true":
            pytest.fail("systemd-analyze is missing (make test installs Debian's systemd package)")
        pytest.skip("systemd-analyze is missing")
    unit = folder / UNIT.name
    unit.write_text(unit_text.replace("/opt/reuseport-supervisor/bin/", f"{BIN}/")
                    .replace("/etc/reuseport-supervisor/supervisor.yaml", str(CONFIG)))
    return subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True, text=True)


def test_unit_file_verifies(tmp_path: Path) -> None:
    """`systemd-analyze verify` accepts the shipped unit without a single warning."""
    result = verify(UNIT.read_text(), tmp_path)
    assert result.returncode == 0 and UNIT.name not in result.stderr, result.stderr


def test_verify_catches_a_broken_unit(tmp_path: Path) -> None:
    """Control: a misspelt key is reported, so the test above can fail."""
    result = verify(UNIT.read_text().replace("KillMode=", "KilMode="), tmp_path)
    assert "Unknown key" in result.stderr


def directives(unit_text: str) -> dict[str, list[str]]:
    """The unit's KEY=VALUE lines (comments left out), every value of a key in order."""
    found: dict[str, list[str]] = {}
    for line in unit_text.splitlines():
        if "=" in line and not line.startswith(("#", ";")):
            key, value = line.split("=", 1)
            found.setdefault(key, []).append(value)
    return found


def test_the_example_config_fits_the_unit() -> None:
    """config/systemd.yaml, read by supervisord's own parser: the file the unit names, the control
    socket in its RuntimeDirectory=, the venv's interpreter for the workers, and not as root."""
    unit = directives(UNIT.read_text())
    config = schema.load(CONFIG)
    start = unit["ExecStart"][0].split()
    assert start[1:] == ["-c", "/etc/reuseport-supervisor/supervisor.yaml"]
    assert unit["ExecReload"][0].split()[1:] == [*start[1:], "reload"]
    venv = Path(start[0]).parent
    assert Path(config.control.socket).parent == Path("/run") / unit["RuntimeDirectory"][0]
    for prog in config.programs:
        assert Path(prog.command[0]).parent == venv, prog.command
        assert prog.user not in (None, "root", "0"), prog.name
        assert prog.graceful_timeout < float(unit["TimeoutStopSec"][0])
    listeners = sum(p.workers * len(p.listen) for p in config.programs)
    assert 2 * listeners <= int(unit["FileDescriptorStoreMax"][0])  # a reload holds two generations


def test_the_unit_announces_its_store_to_systemd_older_than_254() -> None:
    """SUPERVISOR_FDSTORE says what FileDescriptorStoreMax= says, for systemd 249-253 (no $FDSTORE)."""
    unit = directives(UNIT.read_text())
    assert unit["Environment"] == [f"{fdstore.STORE_ENV}={unit['FileDescriptorStoreMax'][0]}"]


class NotifyListener:
    """A unix datagram socket standing in for systemd's NOTIFY_SOCKET."""

    def __init__(self, path: Path) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.settimeout(0.1)
        self.messages: list[dict[str, str]] = []

    def drain(self) -> list[dict[str, str]]:
        while True:
            try:
                data = self.sock.recv(4096)
            except TimeoutError:
                return self.messages
            self.messages.append(dict(line.split("=", 1) for line in data.decode().splitlines()))

    def kinds(self) -> list[str]:
        """The state messages in order (READY, RELOADING, STOPPING), watchdog pings left out."""
        return [next(k for k in ("READY", "RELOADING", "STOPPING") if k in m) for m in self.drain()
                if not m.keys().isdisjoint({"READY", "RELOADING", "STOPPING"})]


@pytest.mark.usefixtures("netns")
def test_sd_notify_sequence(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """READY after the first generation, RELOADING+MONOTONIC_USEC then READY per reload, STOPPING last."""
    systemd = NotifyListener(tmp_path / "systemd.sock")
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "systemd.sock"))
    monkeypatch.setenv("WATCHDOG_USEC", "200000")
    sup = Supervisor(tmp_path, {"web": program()})
    sup.start()
    try:
        wait_for("READY=1", lambda: "READY" in systemd.kinds())
        ready = next(m for m in systemd.messages if "READY" in m)
        assert ready["MAINPID"] == str(sup.proc.pid)  # type: ignore[union-attr]
        assert ready["STATUS"] == "serving web#1 (2 workers)"
        sup.proc.send_signal(signal.SIGHUP)  # type: ignore[union-attr]
        wait_for("the SIGHUP reload", lambda: systemd.kinds().count("READY") == 2)
        sup.write({"web": program([PYTHON, "-c", "raise SystemExit(3)"])})
        assert sup.ctl("reload").returncode == 1
        wait_for("READY after the failed reload", lambda: systemd.kinds().count("READY") == 3)
        assert "last reload failed" in [m for m in systemd.messages if "READY" in m][-1]["STATUS"]
    finally:
        assert sup.stop() == 0
    assert systemd.kinds() == ["READY", "RELOADING", "READY", "RELOADING", "READY", "STOPPING"]
    reloading = [m for m in systemd.messages if "RELOADING" in m]
    assert all(int(m["MONOTONIC_USEC"]) > 0 for m in reloading)
    assert int(reloading[1]["MONOTONIC_USEC"]) > int(reloading[0]["MONOTONIC_USEC"])
    assert sum("WATCHDOG" in m for m in systemd.messages) >= 3


def notify_supervisor(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[NotifyListener, Supervisor]:
    """A supervisord serving web#1 under a stand-in for systemd, READY=1 received."""
    systemd = NotifyListener(tmp_path / "systemd.sock")
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "systemd.sock"))
    sup = Supervisor(tmp_path, {"web": program()}).start()
    wait_for("READY=1", lambda: "READY" in systemd.kinds())
    return systemd, sup


@pytest.mark.usefixtures("netns")
def test_sigterm_during_a_reload_sends_no_ready_after_stopping(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """SIGTERM rolls the reload in progress back: STOPPING=1 is the last state message, no READY=1 after."""
    systemd, sup = notify_supervisor(tmp_path, monkeypatch)
    try:
        sup.write({"web": program([PYTHON, "-c", "import time; time.sleep(60)"])})  # never ready
        sup.proc.send_signal(signal.SIGHUP)  # type: ignore[union-attr]
        wait_for("the reload to start", lambda: sup.status()["reloading"])
    finally:
        assert sup.stop() == 0
    assert systemd.kinds() == ["READY", "RELOADING", "STOPPING"]


@pytest.mark.usefixtures("netns")
def test_sighup_with_a_bad_config_ends_with_ready(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Type=notify-reload waits for READY=1 after RELOADING=1: a refused config sends it, the error in STATUS."""
    systemd, sup = notify_supervisor(tmp_path, monkeypatch)
    try:
        sup.config.write_text(sup.config.read_text().replace("workers: 2", "workers: two"))
        sup.proc.send_signal(signal.SIGHUP)  # type: ignore[union-attr]
        wait_for("READY after the refused reload", lambda: systemd.kinds().count("READY") == 2)
        status = [m for m in systemd.messages if "READY" in m][-1]["STATUS"]
        assert status.startswith("serving web#1 (2 workers); last reload failed: ") and "programs.web.workers" in status
    finally:
        assert sup.stop() == 0
    assert systemd.kinds() == ["READY", "RELOADING", "READY", "STOPPING"]
