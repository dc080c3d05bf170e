"""The daemon's own end of sd_notify: tell the service manager (systemd) what supervisord is doing.

Messages go to $NOTIFY_SOCKET (a path, or an abstract name when it starts with '@'). Without it,
every call is a no-op. The master sends READY=1 once the first generation serves, RELOADING=1 with
MONOTONIC_USEC at the start of a reload (Type=notify-reload needs both) and READY=1 at its end,
STOPPING=1 on shutdown, STATUS= lines for `systemctl status`, and WATCHDOG=1 every half of
$WATCHDOG_USEC while the master loop turns.
"""

from __future__ import annotations

import array
import os
import socket
import time
from collections.abc import Mapping, Sequence

import structlog

log = structlog.get_logger()


class Notifier:
    """Sends sd_notify datagrams; silent (and harmless) when not started by a service manager."""

    def __init__(self, environ: Mapping[str, str] | None = None) -> None:
        env = os.environ if environ is None else environ
        path = env.get("NOTIFY_SOCKET", "")
        self.address = "\0" + path[1:] if path.startswith("@") else path
        self.watchdog_usec = _watchdog_usec(env)
        self.sock: socket.socket | None = None
        if self.address:
            self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)

    @property
    def watchdog_interval(self) -> float | None:
        """Seconds between WATCHDOG=1 pings (half the timeout, as sd_watchdog_enabled(3) advises)."""
        return self.watchdog_usec / 2e6 if self.watchdog_usec else None

    def send(self, **fields: str | int) -> None:
        """One datagram of KEY=VALUE lines; a failure is logged, never raised (the service goes on)."""
        if self.sock is None:
            return
        # One line per field: a newline in a value (a rollback reason quoting stderr) would end it.
        self.send_with_fds("\n".join(f"{key}={' '.join(str(value).split())}" for key, value in fields.items()))

    def send_with_fds(self, message: str, fds: Sequence[int] = ()) -> None:
        """One datagram, with `fds` as SCM_RIGHTS (the fd store); a failure is logged, never raised."""
        if self.sock is None:
            return
        ancillary = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))] if fds else []
        try:
            self.sock.sendmsg([message.encode()], ancillary, 0, self.address)
        except OSError as exc:
            log.warning("sd_notify_failed", socket=self.address.replace("\0", "@"), message=message.split("\n")[0],
                        error=str(exc))

    def ready(self, status: str) -> None:
        self.send(READY=1, STATUS=status, MAINPID=os.getpid())

    def reloading(self) -> None:
        self.send(RELOADING=1, MONOTONIC_USEC=time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000,
                  STATUS="reloading")

    def stopping(self) -> None:
        self.send(STOPPING=1, STATUS="stopping")

    def status(self, text: str) -> None:
        self.send(STATUS=text)

    def watchdog(self) -> None:
        self.send(WATCHDOG=1)

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None


def _watchdog_usec(env: Mapping[str, str]) -> int:
    """WATCHDOG_USEC, if it is meant for this process (WATCHDOG_PID unset or ours)."""
    pid = env.get("WATCHDOG_PID")
    if pid and pid != str(os.getpid()):
        return 0
    value = env.get("WATCHDOG_USEC", "")
    return int(value) if value.isdigit() else 0
