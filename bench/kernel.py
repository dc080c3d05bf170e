"""What the kernel says about a port: listening sockets, their accept queues, their owners, counters.

Read from /proc of the calling process's network namespace, so the numbers belong to the benchmark's
private namespace alone.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass

from supervisor.system import migrate

LISTEN = "0A"  # TCP_LISTEN in /proc/net/tcp's `st` column
NETSTAT_KEYS = ("ListenOverflows", "ListenDrops", "TCPMigrateReqSuccess", "TCPMigrateReqFailure")


@dataclass(frozen=True)
class Listener:
    inode: int
    queued: int  # accept-queue length: for a listener, /proc/net/tcp's rx_queue is sk_ack_backlog


def listeners(port: int) -> list[Listener]:
    """Every listening TCP socket (IPv4 and IPv6) bound to `port` in this namespace."""
    found = []
    for path in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(path) as f:
                rows = f.read().splitlines()[1:]
        except FileNotFoundError:
            continue
        for row in rows:
            fields = row.split()
            local, state, queues, inode = fields[1], fields[3], fields[4], fields[9]
            if state == LISTEN and int(local.rsplit(":", 1)[1], 16) == port:
                found.append(Listener(int(inode), int(queues.split(":")[1], 16)))
    return found


def socket_inodes(pid: int) -> set[int]:
    """Inodes of the sockets process `pid` holds open (empty once it has exited)."""
    inodes = set()
    try:
        for fd in os.listdir(f"/proc/{pid}/fd"):
            try:
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
            if target.startswith("socket:["):
                inodes.add(int(target[8:-1]))
    except OSError:
        pass
    return inodes


def listening_pids(port: int, pids: Iterable[int]) -> set[int]:
    """Those of `pids` that hold a socket listening on `port`."""
    inodes = {listener.inode for listener in listeners(port)}
    return {pid for pid in pids if socket_inodes(pid) & inodes}


def netstat() -> dict[str, int]:
    """The TcpExt counters in NETSTAT_KEYS (zero where this kernel does not count them)."""
    table = migrate.tcp_ext()
    return {key: table.get(key, 0) for key in NETSTAT_KEYS}


def set_migrate(value: int) -> None:
    """net.ipv4.tcp_migrate_req of this (private) namespace."""
    with open(migrate.SYSCTL, "w") as f:
        f.write(str(value))
