"""Pure helpers of the kernel-facing modules: notify parsing, fd placement, netstat counters."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest

from supervisor.config.schema import MigrateMode
from supervisor.errors import MigrateError
from supervisor.process import worker
from supervisor.system import fdstore, migrate, readiness, systemd


class TestNotifyParse:
    def test_fields(self) -> None:
        """sd_notify datagrams are newline-separated KEY=VALUE; other lines are ignored."""
        assert readiness.parse(b"READY=1\nSTATUS=serving: 2 listeners\ngarbage\n=x\n") == {
            "READY": "1", "STATUS": "serving: 2 listeners"}


class TestNotifier:
    def test_a_value_stays_on_its_line(self, tmp_path: Path) -> None:
        """A STATUS quoting stderr lines is sent as one line: a newline would start a new field."""
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as manager:
            manager.bind(str(tmp_path / "systemd.sock"))
            notifier = systemd.Notifier({"NOTIFY_SOCKET": str(tmp_path / "systemd.sock")})
            notifier.ready("serving web#1; last reload failed: boom; last stderr lines:\n  Traceback\n  Error")
            notifier.close()
            assert manager.recv(4096).decode().splitlines()[:2] == [
                "READY=1", "STATUS=serving web#1; last reload failed: boom; last stderr lines: Traceback Error"]


class TestStoreSize:
    @pytest.mark.parametrize(("environ", "size"), [
        ({"FDSTORE": "4096"}, 4096),                              # systemd 254+
        ({"SUPERVISOR_FDSTORE": "4096"}, 4096),                   # the unit, for systemd 249-253
        ({"FDSTORE": "16", "SUPERVISOR_FDSTORE": "4096"}, 16),    # systemd's own word wins
        ({"SUPERVISOR_FDSTORE": ""}, 0),                          # Environment=SUPERVISOR_FDSTORE= turns it off
        ({}, 0),
    ])
    def test_announced(self, environ: dict[str, str], size: int) -> None:
        assert fdstore.announced(environ) == size

    # "\u0664": an Arabic-Indic 4, which str.isdigit() accepts
    @pytest.mark.parametrize("value", ["yes", "-1", "4k", "\u0664"])
    def test_not_a_count_names_the_variable(self, value: str) -> None:
        with pytest.raises(ValueError, match=f"^SUPERVISOR_FDSTORE={value}: expected"):
            fdstore.announced({"SUPERVISOR_FDSTORE": value})

    def test_no_store_without_a_service_manager(self) -> None:
        """Set by hand, outside systemd (no NOTIFY_SOCKET): there is no store to send to."""
        store = fdstore.FdStore(systemd.Notifier({}), {"SUPERVISOR_FDSTORE": "64"})
        assert not store.enabled


class TestFdActions:
    def test_sources_inside_the_target_range_are_parked_first(self) -> None:
        """Listener fds that already sit at 3.. are copied away before being moved into place."""
        actions = worker._fd_actions([4, 3], stdin=9, stderr=10)
        dup2 = [(a[1], a[2]) for a in actions if a[0] == os.POSIX_SPAWN_DUP2]
        closes = [a[1] for a in actions if a[0] == os.POSIX_SPAWN_CLOSE]
        assert dup2[:2] == [(9, 0), (10, 2)]
        assert dup2[2:] == [(4, 11), (3, 12), (11, 3), (12, 4)]
        assert closes == [11, 12]


class TestStatusDescription:
    def test_exit_and_signal(self) -> None:
        """Wait statuses read as a person would say them."""
        assert worker.describe_status(3 << 8) == "exit status 3"
        assert worker.describe_status(9) == "killed by SIGKILL"
        assert worker.describe_status(None) == "running"


class TestMigrate:
    def test_counters_from_netstat(self, tmp_path: Path) -> None:
        """TcpExt migration counters are read by name, wherever they sit in the table."""
        netstat = tmp_path / "netstat"
        netstat.write_text("TcpExt: SyncookiesSent TCPMigrateReqSuccess TCPMigrateReqFailure\n"
                           "TcpExt: 1 37 2\nIpExt: InNoRoutes\nIpExt: 0\n")
        assert migrate.counters(str(netstat)) == migrate.Counters(37, 2)
        assert migrate.counters(str(tmp_path / "missing")) == migrate.Counters(0, 0)

    def test_modes(self, tmp_path: Path) -> None:
        """require raises when the sysctl is missing, prefer runs without it, off leaves it alone."""
        missing = str(tmp_path / "tcp_migrate_req")
        with pytest.raises(MigrateError, match=r"Linux 5\.14 or newer"):
            migrate.enable(MigrateMode.REQUIRE, missing)
        assert migrate.enable(MigrateMode.PREFER, missing).enabled is False
        present = tmp_path / "present"
        present.write_text("0\n")
        assert migrate.enable(MigrateMode.OFF, str(present)).enabled is False
        assert present.read_text() == "0\n"
        assert migrate.enable(MigrateMode.REQUIRE, str(present)).enabled is True
        assert present.read_text().strip() == "1"


class TestProcstat:
    def test_a_process_whose_name_holds_a_parenthesis_and_spaces(self, tmp_path: Path) -> None:
        """The fields are counted after the last ")" of /proc/PID/stat: a command name such as "a) 1 2"
        shifts nothing. The figures agree with psutil's (the memory within a few pages)."""
        import shutil
        import subprocess
        import time

        import psutil

        from supervisor.system import procstat

        odd = tmp_path / "a) 1 2 3"
        shutil.copy("/bin/sleep", odd)
        with subprocess.Popen([str(odd), "10"]) as child:
            try:
                time.sleep(0.3)  # past its exec and start: its memory settled
                used = procstat.usage(child.pid)
                rss = psutil.Process(child.pid).memory_info().rss
                assert used is not None and abs(used.rss - rss) <= 4 * procstat.PAGE
                assert 0 <= used.cpu < 5
            finally:
                child.kill()
        assert procstat.usage(child.pid) is None  # reaped: gone
