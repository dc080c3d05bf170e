"""The master's end of the sd_notify protocol: a datagram socket whose messages name their sender.

Workers find it in NOTIFY_SOCKET and send `READY=1` (newline-separated KEY=VALUE fields, as
systemd reads them). SO_PASSCRED makes the kernel attach the sender's pid to every datagram, so a
worker cannot speak for another, and a message from a process we did not start is ignored.
"""

from __future__ import annotations

import os
import socket
import struct
from collections.abc import Mapping
from typing import TypeVar

import psutil

from supervisor.listeners import Listener

T = TypeVar("T")
_UCRED = struct.Struct("3i")  # struct ucred: pid, uid, gid
_MAX_DATAGRAM = 4096


class NotifySocket:
    """A bound SOCK_DGRAM unix socket; `receive()` drains it without blocking."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        try:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
            if os.path.exists(path):
                os.unlink(path)
            self.sock.bind(path)
            # Workers may run as another user (issue: privileges); datagrams carry their own pid.
            os.chmod(path, 0o666)
            self.sock.setblocking(False)
        except BaseException:
            self.sock.close()
            raise

    def fileno(self) -> int:
        return self.sock.fileno()

    def receive(self) -> list[tuple[int, dict[str, str]]]:
        """Every pending (sender pid, fields) pair; datagrams without credentials are dropped."""
        out: list[tuple[int, dict[str, str]]] = []
        while True:
            try:
                data, ancdata, _flags, _addr = self.sock.recvmsg(_MAX_DATAGRAM, socket.CMSG_SPACE(_UCRED.size))
            except (BlockingIOError, InterruptedError):
                return out
            pid = next((_UCRED.unpack_from(d)[0] for level, kind, d in ancdata
                        if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS), None)
            if pid is not None:
                out.append((pid, parse(data)))

    def close(self) -> None:
        self.sock.close()
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass


def parse(data: bytes) -> dict[str, str]:
    """`READY=1\\nSTATUS=x` -> {"READY": "1", "STATUS": "x"}; lines without '=' are ignored."""
    fields = {}
    for line in data.decode(errors="replace").splitlines():
        key, sep, value = line.partition("=")
        if sep and key:
            fields[key] = value
    return fields


def polls_listeners(pid: int, socks: list[Listener]) -> bool:
    """True when the worker, or a process it started, has every one of its listeners in an epoll set.

    That is what an event-loop server (uvicorn, hypercorn, gunicorn's async workers) does once it
    accepts connections. /proc/PID/fdinfo of an epoll fd lists each watched file with its inode
    ("tfd: 7 events: 19 data: ... ino:1a2b"); a listener is matched by its socket inode, so dup'd
    fds count too. Servers that use select() or poll(), or block in accept(), are not seen: use
    `ready: settle` for them (see README, "Readiness").
    """
    wanted = {os.fstat(s.fileno()).st_ino for s in socks if not s.shut}
    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.Error:
        return False
    for proc in procs:
        wanted -= _epoll_inodes(proc.pid)
        if not wanted:
            return True
    return False


def _epoll_inodes(pid: int) -> set[int]:
    inodes: set[int] = set()
    try:
        fds = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return inodes
    for fd in fds:
        try:
            if os.readlink(f"/proc/{pid}/fd/{fd}") != "anon_inode:[eventpoll]":
                continue
            with open(f"/proc/{pid}/fdinfo/{fd}") as f:
                for line in f:
                    if line.startswith("tfd:"):
                        inodes.add(int(line.rsplit("ino:", 1)[1].split()[0], 16))
        except (OSError, IndexError, ValueError):
            continue
    return inodes


def find_worker(workers: Mapping[int, T], pid: int) -> T | None:
    """The worker that sent a message: the pid itself, or a process started by it (NotifyAccess=all)."""
    if pid in workers:
        return workers[pid]
    try:
        ancestors = psutil.Process(pid).parents()
    except psutil.Error:
        return None
    return next((workers[p.pid] for p in ancestors if p.pid in workers), None)
