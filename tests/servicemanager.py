"""What systemd does with a service's notify socket and fd store, small enough to read in a test.

It receives sd_notify datagrams, keeps the fds sent with `FDSTORE=1` under their `FDNAME=`, drops
them on `FDSTOREREMOVE=1`, and starts the service with the stored fds at 3.. and `LISTEN_FDS`,
`LISTEN_FDNAMES`, `LISTEN_PID` (the service's own pid, set by a one-line shell that then execs it).
"""

from __future__ import annotations

import array
import fcntl
import os
import socket
import sys
import threading
from pathlib import Path

from tests.harness import Supervisor

_MAX_FDS = 16


class ServiceManager:
    """`announces`: sets $FDSTORE, as systemd 254+ does; False plays 249-253, which keep the store
    just the same but set no $FDSTORE."""

    def __init__(self, folder: Path, announces: bool = True) -> None:
        self.announces = announces
        self.path = folder / "systemd-notify.sock"
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(self.path))
        self.sock.settimeout(0.1)
        self.store: dict[str, list[int]] = {}
        self.messages: list[dict[str, str]] = []
        self.lock = threading.Lock()
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._receive, daemon=True)
        self.thread.start()

    def _receive(self) -> None:
        while not self.stopped.is_set():
            try:
                data, ancdata, _flags, _addr = self.sock.recvmsg(4096, socket.CMSG_SPACE(_MAX_FDS * 4))
            except TimeoutError:
                continue
            except OSError:
                return
            fds: list[int] = []
            for level, kind, payload in ancdata:
                if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                    fds += array.array("i", payload[: len(payload) - len(payload) % 4]).tolist()
            fields = dict(line.split("=", 1) for line in data.decode().splitlines() if "=" in line)
            with self.lock:
                self.messages.append(fields)
                name = fields.get("FDNAME", "")
                if fields.get("FDSTORE") == "1" and name:
                    # A socket the store holds already (under any name) is not kept twice: systemd
                    # closes such a copy (its fd store documentation: the store deduplicates).
                    held = {_identity(fd) for fds_of in self.store.values() for fd in fds_of}
                    kept = [fd for fd in fds if _identity(fd) not in held]
                    self.store.setdefault(name, []).extend(kept)
                    fds = [fd for fd in fds if fd not in kept]
                elif fields.get("FDSTOREREMOVE") == "1":
                    fds += self.store.pop(name, [])
            for fd in fds:  # not kept: closed, as systemd does
                os.close(fd)

    def stored(self) -> list[str]:
        with self.lock:
            return sorted(self.store)

    def start(self, sup: Supervisor, extra: dict[str, int] | None = None, timeout: float = 20) -> Supervisor:
        """Start supervisord as a `Type=notify` service with `FileDescriptorStoreMax=`; `extra`: more
        named fds to pass along (as if left in the store by something else); `timeout`: for every
        program to serve (Supervisor.start's)."""
        with self.lock:
            named = [(name, fd) for name, fds in self.store.items() for fd in fds] + list((extra or {}).items())
        count = len(named)
        # Copies above 3+count first, so that placing them at 3.. never overwrites one not yet placed.
        parked = [fcntl.fcntl(fd, fcntl.F_DUPFD, 3 + count + 8) for _, fd in named]
        # A trampoline as systemd's own child does it: fds placed at 3.., LISTEN_PID its own pid, exec.
        trampoline = (
            "import os, sys\n"
            "parked = [int(fd) for fd in sys.argv[1].split(',') if fd]\n"
            "for i, fd in enumerate(parked):\n"
            "    os.dup2(fd, 3 + i)\n"
            "    os.close(fd)\n"
            "os.environ.update(LISTEN_PID=str(os.getpid()), LISTEN_FDS=str(len(parked)), LISTEN_FDNAMES=sys.argv[2])\n"
            "os.execv(sys.argv[3], sys.argv[3:])\n")
        sup.prefix = [sys.executable, "-S", "-c", trampoline, ",".join(map(str, parked)),
                      ":".join(name for name, _ in named)]
        sup.pass_fds = tuple(parked)
        sup.env = {**sup.env, "NOTIFY_SOCKET": str(self.path), **({"FDSTORE": "64"} if self.announces else {})}
        try:
            return sup.start(timeout=timeout)
        finally:
            for fd in parked:
                os.close(fd)

    def close(self) -> None:
        self.stopped.set()
        self.thread.join(timeout=2)
        self.sock.close()
        with self.lock:
            for fds in self.store.values():
                for fd in fds:
                    os.close(fd)
            self.store.clear()


def _identity(fd: int) -> tuple[int, int]:
    """What makes two fds the same open socket: its inode."""
    st = os.fstat(fd)
    return st.st_dev, st.st_ino
