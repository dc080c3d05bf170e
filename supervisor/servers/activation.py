"""What a worker inherits from supervisord (systemd's socket activation and sd_notify protocols).

  LISTEN_FDS=n            listening sockets at fds 3 .. 3+n-1
  LISTEN_PID              if set, must be this process's pid
  LISTEN_FDNAMES          optional, colon-separated names for those fds
  NOTIFY_SOCKET           gets `READY=1` once every listener is served ('@' starts an abstract name)
  SUPERVISOR_BACKLOG      the accept-queue length a server that calls listen() again must keep
"""

from __future__ import annotations

import os
import socket
import struct
import sys
from collections.abc import Callable

DEFAULT_BACKLOG = 1024
Listener = tuple[str, socket.socket]  # (name or address, listening socket)


class StartError(Exception):
    """Bad arguments or environment: one line on stderr, exit status 2."""


def stderr(message: str) -> None:
    try:
        print(message, file=sys.stderr, flush=True)
    except OSError:
        # stderr is a pipe to supervisord; when it died (its parent-death signal is how we learn it),
        # nobody reads it: the stop must go on, not end in BrokenPipeError.
        pass


def notify(message: str, log: Callable[[str], None] = stderr) -> None:
    """Send one sd_notify datagram to NOTIFY_SOCKET, if there is one."""
    path = os.environ.get("NOTIFY_SOCKET")
    if not path:
        return
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.sendto(message.encode(), "\0" + path[1:] if path.startswith("@") else path)
    except OSError as exc:
        log(f"cannot notify {path}: {exc}")


def env_int(name: str, default: int) -> int:
    value = os.environ.get(name) or str(default)
    if not value.isdigit():
        raise StartError(f"{name}={value!r}: expected a non-negative integer")
    return int(value)


def address(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"[{host}]:{port}" if sock.family == socket.AF_INET6 else f"{host}:{port}"


def inherited_listeners() -> list[Listener]:
    """The listening sockets passed by socket activation, named by LISTEN_FDNAMES or their address."""
    pid = os.environ.get("LISTEN_PID")
    if pid is not None and pid != str(os.getpid()):
        raise StartError(f"LISTEN_PID={pid} but this is pid {os.getpid()}: the listening fds are not for us")
    names = os.environ.get("LISTEN_FDNAMES", "").split(":")
    listeners = []
    for index in range(env_int("LISTEN_FDS", 0)):
        fd = 3 + index
        try:
            sock = socket.socket(fileno=fd)
        except OSError as exc:
            raise StartError(f"fd {fd} from LISTEN_FDS: {exc.strerror}") from exc
        # A listener shut down by the supervisor (it gave up on us) would rejoin its reuseport group
        # if we called listen() on it: never do that, the connections routed to it would wait in vain.
        if sock.type != socket.SOCK_STREAM or not sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN):
            raise StartError(f"fd {fd} from LISTEN_FDS is not a listening stream socket")
        listeners.append((names[index] if index < len(names) and names[index] else address(sock), sock))
    return listeners


def kept_backlog(sock: socket.socket, override: int | None = None) -> int:
    """The backlog to give a server that calls listen() again (asyncio's default: 100).

    listen() on a listening socket replaces its backlog, and the supervisor chose one for the whole
    reuseport group: migration does not check the target's backlog, so a smaller one here would drop
    connections after a reload. For a listener, tcp_get_info() (net/ipv4/tcp.c) reports the accept
    queue's length in tcpi_unacked (offset 24) and its limit in tcpi_sacked (offset 28).
    """
    if override is not None:
        return override
    try:
        return int(struct.unpack_from("I", sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 104), 28)[0])
    except OSError:  # not TCP
        return DEFAULT_BACKLOG


def backlog_override() -> int | None:
    """SUPERVISOR_BACKLOG, if supervisord set it."""
    return env_int("SUPERVISOR_BACKLOG", 0) if os.environ.get("SUPERVISOR_BACKLOG") else None
