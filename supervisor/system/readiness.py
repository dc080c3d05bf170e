"""The master's end of the sd_notify protocol: a datagram socket whose messages name their sender.

Workers find it in NOTIFY_SOCKET and send `READY=1` (newline-separated KEY=VALUE fields, as
systemd reads them). SO_PASSCRED makes the kernel attach the sender's pid to every datagram, so a
worker cannot speak for another, and a message from a process we did not start is ignored.
"""

from __future__ import annotations

import errno
import os
import socket
import struct
import time
from collections.abc import Callable, Mapping
from typing import TypeVar

import psutil
import structlog

from supervisor.system.listeners import Listener

log = structlog.get_logger()
T = TypeVar("T")
_UCRED = struct.Struct("3i")  # struct ucred: pid, uid, gid
_MAX_DATAGRAM = 4096
MAX_PER_WAKEUP = 64  # datagrams taken per call of receive(): a flood waits in the kernel, not in the loop
WALKS_PER_SECOND = 20  # parent walks for senders that are neither a worker nor in a worker's session

# POSIX ACL as the kernel reads it from the system.posix_acl_access attribute (acl(5),
# include/uapi/linux/posix_acl_xattr.h): a version, then (tag, permissions, id) entries sorted by tag.
_ACL_XATTR = "system.posix_acl_access"
_ACL_HEADER = struct.Struct("<I")
_ACL_ENTRY = struct.Struct("<HHI")
_ACL_USER_OBJ, _ACL_USER, _ACL_GROUP_OBJ, _ACL_MASK, _ACL_OTHER = 0x01, 0x02, 0x04, 0x10, 0x20
_ACL_NO_ID = 0xFFFFFFFF
_RW = 0o6


class NotifySocket:
    """A bound SOCK_DGRAM unix socket; `receive()` takes what is pending without blocking.

    Mode 0600: only root and the master's user may send, until `admit()` lets a worker's user in.
    """

    def __init__(self, path: str) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        try:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
            if os.path.exists(path):
                os.unlink(path)
            self.sock.bind(path)
            os.chmod(path, 0o600)  # its path shows in /proc/net/unix: the mode is what keeps others out
            self.sock.setblocking(False)
        except BaseException:
            self.sock.close()
            raise

    @classmethod
    def adopt(cls, path: str, fd: int) -> NotifySocket:
        """The socket a master had before its exec (upgrade), still bound at `path` with its mode."""
        notify = cls.__new__(cls)
        notify.path, notify.sock = path, socket.socket(fileno=fd)
        notify.sock.setblocking(False)
        return notify

    def fileno(self) -> int:
        return self.sock.fileno()

    def receive(self) -> list[tuple[int, dict[str, str]]]:
        """Up to MAX_PER_WAKEUP pending (sender pid, fields) pairs; the loop's reader fires again for
        the rest. Datagrams without the sender's pid are dropped."""
        out: list[tuple[int, dict[str, str]]] = []
        for _ in range(MAX_PER_WAKEUP):
            try:
                data, ancdata, _flags, _addr = self.sock.recvmsg(_MAX_DATAGRAM, socket.CMSG_SPACE(_UCRED.size))
            except (BlockingIOError, InterruptedError):
                break
            creds = next((_UCRED.unpack_from(d) for level, kind, d in ancdata
                          if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS), None)
            if creds is None or creds[0] <= 0:  # no pid: a sender in another pid namespace
                continue
            out.append((creds[0], parse(data)))
        return out

    def close(self) -> None:
        self.sock.close()
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass


def admit(path: str, uid: int) -> None:
    """Let `uid` (a worker's user) send to the notify socket at `path`: one ACL entry more.

    Called before each worker of another user is spawned, so that its READY=1 cannot arrive before
    it may. Root and the socket's owner (the master) need no entry. Where the file system has no
    POSIX ACLs the socket becomes 0666 (the old behaviour: unknown pids are still dropped cheaply).
    """
    if uid in (0, os.geteuid()):
        return
    users = _acl_users(path)
    if uid in users:
        return
    users.add(uid)
    entries = [(_ACL_USER_OBJ, _RW, _ACL_NO_ID), *((_ACL_USER, _RW, u) for u in sorted(users)),
               (_ACL_GROUP_OBJ, 0, _ACL_NO_ID), (_ACL_MASK, _RW, _ACL_NO_ID), (_ACL_OTHER, 0, _ACL_NO_ID)]
    try:
        # Also sets the mode's group bits to the mask: 0660, the group itself having no entry.
        os.setxattr(path, _ACL_XATTR, _ACL_HEADER.pack(2) + b"".join(_ACL_ENTRY.pack(*e) for e in entries))
    except OSError as exc:
        if exc.errno != errno.EOPNOTSUPP:
            raise
        log.warning("notify_socket_open_to_all", path=path, reason="no POSIX ACLs on this file system")
        os.chmod(path, 0o666)


def _acl_users(path: str) -> set[int]:
    """The uids named in the access ACL of `path` (none when it has no ACL)."""
    try:
        data = os.getxattr(path, _ACL_XATTR)
    except OSError as exc:
        if exc.errno in (errno.ENODATA, errno.EOPNOTSUPP):
            return set()
        raise
    return {uid for tag, _perm, uid in _ACL_ENTRY.iter_unpack(data[_ACL_HEADER.size:]) if tag == _ACL_USER}


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
    `ready: settle` for them (see docs/operations.md, "Readiness").
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


class WalkBudget:
    """A token bucket for parent walks: `rate` a second, as many at once."""

    def __init__(self, rate: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.rate = rate
        self.clock = clock
        self.tokens = rate
        self.last = clock()

    def take(self) -> bool:
        now = self.clock()
        self.tokens = min(self.rate, self.tokens + (now - self.last) * self.rate)
        self.last = now
        if self.tokens < 1:
            return False
        self.tokens -= 1
        return True


_walks = WalkBudget(WALKS_PER_SECOND)


def find_worker(workers: Mapping[int, T], pid: int, walks: WalkBudget | None = None) -> T | None:
    """The worker that sent a message: the pid itself, or a process started by it (NotifyAccess=all).

    Cheap for every sender: a worker leads its own session (setsid at spawn), so its descendants
    are found by getsid(). Only a sender outside every worker's session (one that left it with
    setsid, or a stranger) costs a walk of its parents, and those walks are rationed (`walks`), so a
    flood of datagrams from unknown pids is dropped for the price of a dict lookup and a syscall.
    """
    if pid in workers:
        return workers[pid]
    try:
        session = os.getsid(pid)
    except OSError:
        return None  # gone already
    if session in workers:
        return workers[session]
    if not (walks or _walks).take():
        return None
    try:
        ancestors = psutil.Process(pid).parents()
    except psutil.Error:
        return None
    return next((workers[p.pid] for p in ancestors if p.pid in workers), None)
