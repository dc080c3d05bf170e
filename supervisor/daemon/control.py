"""The control server in the master: a unix socket that turns requests into events.

The connection handler checks the peer's uid before reading anything, validates one request
(requests.py) and puts a ControlRequest on the master's queue; the master answers through the request's
Reply, which streams progress lines back and closes the connection. A stranger, a connection beyond
MAX_CONNECTIONS and a malformed request are answered here, in one line, and never reach the master.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import os
import socket
import struct
import time
from collections.abc import Callable

import structlog

from supervisor.daemon import accepting
from supervisor.daemon.events import ControlRequest, Event
from supervisor.errors import ControlError
from supervisor.protocol import requests
from supervisor.protocol.reply import Reply
from supervisor.system import unixsocket

log = structlog.get_logger()

REQUEST_TIMEOUT = 10  # seconds a client has to send its request line
BACKLOG = 64  # connections waiting in the control socket's queue
MAX_CONNECTIONS = 32  # connections of root and the daemon's user open at once; more are refused
MAX_FOLLOWERS = 64  # `tail -f` followers at once, counted apart: they never take a request's place
MAX_REFUSING = 64  # refused connections given REFUSAL_GRACE to send before they are closed
REFUSAL_GRACE = 0.5
REFUSAL_LOG_EVERY = 1.0  # seconds: one control_refused line at most, however many are refused
MAX_NUMBER = 1 << 31  # any integer argument (workers: the master checks its own range)


class ControlServer:
    """Listens on the control socket; only root and the daemon's own user may talk to it."""

    connections = 0  # open connections of permitted peers (counted per server once it has one)
    followers = 0  # `tail -f` connections following, not counted in `connections`
    refusing = 0  # refused connections waiting for their request before they are closed
    refused_logged = -math.inf  # when control_refused was last logged

    def __init__(self, path: str, mode: int, post: Callable[[Event], None]) -> None:
        self.path = path
        self.mode = mode
        self.post = post
        self.server: asyncio.Server | None = None

    async def start(self, adopted: socket.socket | None = None) -> None:
        """Listen on a new socket, or (after an upgrade) on the one the master had before its exec."""
        sock = adopted
        if sock is None:
            try:
                _refuse_if_in_use(self.path)
                sock = _listening_unix_socket(self.path, self.mode)
            except OSError as exc:  # the one line of startup_failed: which socket, and why
                raise ControlError(f"control socket {self.path}: {exc.strerror or exc}") from None
        self.server = await accepting.serve(self._handle, sock, requests.MAX_LINE, BACKLOG)

    def fileno(self) -> int:
        assert self.server is not None
        return int(self.server.sockets[0].fileno())

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """One connection, until it ends or the master stops: then it is closed here. A handler that
        ended cancelled made Python 3.11's asyncio print a traceback at every `shutdown` (its stream
        protocol asks the task for its exception, which a cancelled task raises)."""
        try:
            await self._connection(reader, writer)
        except asyncio.CancelledError:
            writer.close()

    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """The peer's uid first (nothing is read from a stranger), then one request."""
        try:
            refusal = _refusal(writer.get_extra_info("socket"), self.connections)
        except OSError:
            writer.close()
            return
        if refusal is not None:
            await self._refuse(reader, writer, refusal)
            return
        self.connections += 1
        try:
            await self._serve(reader, writer)
        finally:
            self.connections -= 1

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        reply = Reply(writer)
        try:
            line = await asyncio.wait_for(reader.readline(), timeout=REQUEST_TIMEOUT)
            if not line:
                writer.close()  # the client left without a word
                return
            request = parse(line)
        except TimeoutError:
            reply.finish(False, f"no request within {REQUEST_TIMEOUT} s")
            return
        except ValueError:  # readline(): no newline within the stream's limit
            reply.finish(False, f"malformed request: longer than {requests.MAX_LINE // 1024} KiB")
            return
        except ControlError as exc:
            reply.finish(False, str(exc))
            return
        except ConnectionError:
            writer.close()
            return
        if isinstance(request, requests.Tail) and request.follow:
            if self.followers >= MAX_FOLLOWERS:
                reply.finish(False, f"too many tail -f followers ({self.followers} open); stop one first")
                return
            await self._follow(reader, writer, ControlRequest(request, reply))
            return
        self.post(ControlRequest(request, reply))
        # Counted as open until the master's answer closes it (or the client leaves).
        with contextlib.suppress(OSError):
            await writer.wait_closed()

    async def _follow(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                      request: ControlRequest) -> None:
        """A follower leaves the count of connections for its own: root can always `status` and `reload`
        while log shippers and forgotten terminals follow."""
        self.connections -= 1
        self.followers += 1
        try:
            self.post(request)
            # A follower sends nothing more: its end of file is the user's Ctrl-C. Without this read its
            # connection would stay half-open, and counted, until the program writes its next line.
            with contextlib.suppress(OSError):
                while await reader.read(4096):
                    pass
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()
        finally:
            self.followers -= 1
            self.connections += 1  # _handle takes it off again

    async def _refuse(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, reason: str) -> None:
        """Answer with the reason, then wait a moment for the client's request before closing.

        Closing with its request unsent or unread would make the client's send fail (EPIPE) or its
        read (ECONNRESET) before it sees why. Only MAX_REFUSING wait at once; more are closed at
        once after their answer, so a stranger's flood cannot pile up file descriptors.
        """
        if self.refused_logged + REFUSAL_LOG_EVERY <= time.monotonic():
            self.refused_logged = time.monotonic()
            log.warning("control_refused", reason=reason)
        writer.write(requests.encode({"ok": False, "error": reason}))
        if self.refusing < MAX_REFUSING:
            self.refusing += 1
            try:
                await asyncio.wait_for(reader.readline(), timeout=REFUSAL_GRACE)
            except (TimeoutError, ValueError, ConnectionError):
                pass
            finally:
                self.refusing -= 1
        writer.close()

    def close(self) -> None:
        if self.server is not None:
            self.server.close()
            self.server = None
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass


def _refusal(sock: socket.socket | None, open_connections: int) -> str | None:
    """Why this connection is refused before anything is read from it, or None.

    SO_PEERCRED gives the uid the peer had when it connected; the socket's file mode may let others
    connect (control.mode), this check does not.
    """
    if sock is not None:
        creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
        _pid, uid, _gid = struct.unpack("3i", creds)
        if uid not in (0, os.geteuid()):
            return f"permission denied for uid {uid} (only root and the daemon's user may use this socket)"
    if open_connections >= MAX_CONNECTIONS:
        return f"too many control connections ({open_connections} open); try again when one has finished"
    return None


def parse(line: bytes) -> requests.Request:
    """requests.parse_request, with every malformed line answered in one line of our words: no codec
    names, parser internals or tracebacks (json's own messages say where the JSON breaks)."""
    try:
        text = line.decode("utf-8")
    except UnicodeDecodeError:
        raise ControlError("malformed request: not UTF-8 text") from None
    if "\x00" in text:  # json.loads would read bytes with NULs as UTF-16 or UTF-32
        raise ControlError("malformed request: a NUL byte")
    try:
        request = requests.parse_request(line)
    except RecursionError:
        raise ControlError("malformed request: nested too deeply") from None
    except ControlError:
        raise
    except ValueError:  # an integer of more digits than int() converts (sys.get_int_max_str_digits)
        raise ControlError("malformed request: a number with too many digits") from None
    for name, value in vars(request).items():
        for text in value if isinstance(value, tuple) else [value] if isinstance(value, str) else []:
            try:
                text.encode("utf-8")
            except UnicodeEncodeError:  # "\ud800": JSON allows a lone UTF-16 surrogate, no file name does
                raise ControlError(f"malformed request: {name}: an invalid UTF-16 surrogate escape") from None
        if isinstance(value, int) and not isinstance(value, bool) and not -MAX_NUMBER <= value <= MAX_NUMBER:
            raise ControlError(f"malformed request: {name}: out of range")
    return request


def _listening_unix_socket(path: str, mode: int) -> socket.socket:
    """Bind, listen and chmod under a temporary name, then rename into place.

    A client never finds the path bound but not yet listening (it would get ECONNREFUSED and
    conclude that no daemon runs) nor with looser permissions than configured. The temporary name
    is short and in the same folder: any socket name the config takes fits (config/unixpath.py).
    """
    staging = os.path.join(os.path.dirname(path), f".supervisord.{os.getpid()}.new")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old_umask = os.umask(0o177)
    try:
        try:
            os.unlink(staging)
        except FileNotFoundError:
            pass
        with unixsocket.address(staging) as where:
            sock.bind(where)
        sock.listen(BACKLOG)
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
    with unixsocket.address(path) as where, socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        try:
            probe.connect(where)
        except OSError:
            os.unlink(path)  # nobody listens: left over from a daemon that was killed
        else:
            raise ControlError(f"{path}: another supervisord is already running on this control socket")
