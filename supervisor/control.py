"""The control server in the master: a unix socket that turns requests into events.

The connection handler validates one request (wire.py), puts a ControlRequest on the master's queue and
returns; the master answers through the request's Reply, which streams progress lines back. A
malformed request is answered here and never reaches the master.
"""

from __future__ import annotations

import asyncio
import os
import socket
import struct
from collections.abc import Callable

import structlog

from supervisor import wire
from supervisor.errors import ControlError
from supervisor.events import ControlRequest, Event
from supervisor.reply import Reply

log = structlog.get_logger()


class ControlServer:
    """Listens on the control socket; only root and the daemon's own user may talk to it."""

    def __init__(self, path: str, mode: int, post: Callable[[Event], None]) -> None:
        self.path = path
        self.mode = mode
        self.post = post
        self.server: asyncio.AbstractServer | None = None

    async def start(self) -> None:
        _refuse_if_in_use(self.path)
        sock = _listening_unix_socket(self.path, self.mode)
        self.server = await asyncio.start_unix_server(self._handle, sock=sock, limit=wire.MAX_LINE)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        reply = Reply(writer)
        try:
            line = await asyncio.wait_for(reader.readline(), timeout=10)
            # Refused after its request is read: closing with it unread would make the client's send
            # fail (EPIPE) or its read (ECONNRESET) before it sees why.
            _check_peer(writer.get_extra_info("socket"))
            request = wire.parse_request(line)
        except (TimeoutError, ControlError, ValueError, asyncio.LimitOverrunError) as exc:
            reply.finish(False, str(exc) or "timed out waiting for a request")
            return
        except ConnectionError:
            writer.close()
            return
        self.post(ControlRequest(request, reply))

    def close(self) -> None:
        if self.server is not None:
            self.server.close()
            self.server = None
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass


def _check_peer(sock: socket.socket | None) -> None:
    if sock is None:
        return
    creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    _pid, uid, _gid = struct.unpack("3i", creds)
    if uid not in (0, os.geteuid()):
        raise ControlError(f"permission denied for uid {uid}")


def _listening_unix_socket(path: str, mode: int) -> socket.socket:
    """Bind, listen and chmod under a temporary name, then rename into place.

    A client never finds the path bound but not yet listening (it would get ECONNREFUSED and
    conclude that no daemon runs) nor with looser permissions than configured.
    """
    staging = f"{path}.{os.getpid()}.new"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old_umask = os.umask(0o177)
    try:
        try:
            os.unlink(staging)
        except FileNotFoundError:
            pass
        sock.bind(staging)
        sock.listen(64)
        os.chmod(staging, mode)
        os.rename(staging, path)
    except OSError:
        sock.close()
        try:
            os.unlink(staging)
        except FileNotFoundError:
            pass
        raise
    finally:
        os.umask(old_umask)
    return sock


def _refuse_if_in_use(path: str) -> None:
    """Remove a stale socket file, but never take over the socket of a running daemon."""
    if not os.path.exists(path):
        return
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(path)
    except OSError:
        os.unlink(path)  # nobody listens: left over from a daemon that was killed
    else:
        raise ControlError(f"{path}: another supervisord is already running on this control socket")
    finally:
        probe.close()
