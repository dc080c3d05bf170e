"""A private network namespace for the calling thread, and everything it starts afterwards.

unshare(CLONE_NEWNET) moves only the calling thread; processes and threads it creates afterwards
inherit the namespace, and setns() brings the thread back. The namespace (with its sysctls, such as
net.ipv4.tcp_migrate_req) disappears with the last process in it: the host's is never touched.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import subprocess
from collections.abc import Iterator

CLONE_NEWNET = 0x40000000
_libc = ctypes.CDLL(None, use_errno=True)


class NamespaceUnavailable(RuntimeError):
    pass


@contextlib.contextmanager
def private_netns() -> Iterator[None]:
    home = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
    try:
        if _libc.unshare(CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise NamespaceUnavailable(f"unshare(CLONE_NEWNET): {os.strerror(err)} (needs root or CAP_SYS_ADMIN)")
        try:
            subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
            yield
        finally:
            if _libc.setns(home, CLONE_NEWNET) != 0:
                raise OSError(ctypes.get_errno(), "setns back to the original network namespace failed")
    finally:
        os.close(home)


@contextlib.contextmanager
def netns_of(pid: int) -> Iterator[None]:
    """This thread (and what it starts meanwhile) in the network namespace of `pid` for the block, then
    back: a container's (podman, nspawn), for a load client or a request from the test."""
    home = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
    target = os.open(f"/proc/{pid}/ns/net", os.O_RDONLY | os.O_CLOEXEC)
    try:
        if _libc.setns(target, CLONE_NEWNET) != 0:
            raise OSError(ctypes.get_errno(), f"setns into the network namespace of {pid}")
        try:
            yield
        finally:
            if _libc.setns(home, CLONE_NEWNET) != 0:
                raise OSError(ctypes.get_errno(), "setns back to the original network namespace failed")
    finally:
        os.close(target)
        os.close(home)


def migrate_sysctl() -> str:
    with open("/proc/sys/net/ipv4/tcp_migrate_req") as f:
        return f.read().strip()
