"""How a worker stops without losing a request on a kept connection: the timing rule of the stop contract.

After supervisord has shut a worker's listeners (their queues moved to the new generation) and sent its
stop signal, the worker still holds established connections, and a keep-alive client may send its next
request on one at any instant. HTTP/1.1 gives a server no way to say "close now" to an idle client:
whenever a server closes an idle kept connection, a request sent at that instant gets EOF or a reset,
and a client cannot safely send a POST again. The only close that cannot race is the one after an answer
that said `Connection: close`. So a stopping worker:

- answers every request it has read, pipelined ones included; the last answer it has a request for says
  `Connection: close`, then it closes that connection;
- closes a connection with nothing in progress only once it has been quiet for `IDLE_CLOSE` seconds
  (counted from its last byte in or out, or its accept), and never while bytes of a request wait
  unread in its socket: a client that sent nothing for that long is in the state of any keep-alive
  timeout, and clients that reuse connections promptly get their next answer with `Connection: close`
  instead. A client library's pool that leaves some of its connections idle about that long and then
  sends on them meets the same race as at any keep-alive timeout (measured with httpx, see
  docs/servers.md, "The stop contract");
- closes whatever is left (a client that never reads, a request that never ends) `finish_within()`
  after the stop signal, before supervisord's `graceful_timeout` kills it.

supervisord tells each worker its program's `graceful_timeout` in SUPERVISOR_GRACEFUL_TIMEOUT.

Before the stop signal, the shut itself: supervisord shuts a retiring worker's listeners `stop_delay`
before it signals the worker, and an event loop that still watches a shut listener spins on it
(`ShutWatch`).
"""

from __future__ import annotations

import asyncio
import fcntl
import os
import struct
import termios

IDLE_CLOSE = 1.0  # seconds a connection with nothing in progress must be quiet before a stopping worker closes it
GRACEFUL_TIMEOUT = 30.0  # supervisord's default, for a worker started without SUPERVISOR_GRACEFUL_TIMEOUT
FINISH_SHARE = 0.9  # the share of graceful_timeout a worker takes before it closes what is left
FINISH_MARGIN = 0.5  # seconds, at least, between that close and supervisord's SIGKILL: the exit itself takes time


def graceful_timeout() -> float:
    """The program's graceful_timeout, as supervisord passes it (its default when run by hand)."""
    value = os.environ.get("SUPERVISOR_GRACEFUL_TIMEOUT", "")
    try:
        seconds = float(value)
    except ValueError:
        return GRACEFUL_TIMEOUT
    return seconds if seconds >= 0 else GRACEFUL_TIMEOUT  # also NaN


def finish_within(graceful: float | None = None) -> float:
    """Seconds after the stop signal at which a worker closes every connection it still holds and exits."""
    graceful = graceful_timeout() if graceful is None else graceful
    return max(0.0, min(FINISH_SHARE * graceful, graceful - FINISH_MARGIN))


def unread(transport: asyncio.BaseTransport) -> int:
    """Bytes the client sent that the loop has not read yet (FIONREAD): a request may be there already,
    and closing now would answer it with a reset."""
    sock = transport.get_extra_info("socket")
    if sock is None:
        return 0
    try:
        return int(struct.unpack("i", fcntl.ioctl(sock.fileno(), termios.FIONREAD, b"\0" * 4))[0])
    except OSError:
        return 0


def unsent(transport: asyncio.BaseTransport) -> int:
    """Bytes of answers the client has yet to take: in the transport's buffer, and in the kernel's send
    queue (SIOCOUTQ, which is TIOCOUTQ's number: not sent yet, or not acknowledged). A connection with
    answers in flight is not quiet: closing it could reset them away."""
    queued = transport.get_write_buffer_size() if isinstance(transport, asyncio.WriteTransport) else 0
    sock = transport.get_extra_info("socket")
    if sock is not None:
        try:
            queued += struct.unpack("i", fcntl.ioctl(sock.fileno(), termios.TIOCOUTQ, b"\0" * 4))[0]
        except OSError:
            pass
    return queued


class ShutWatch:
    """Closes a server (it stops accepting; its connections go on) the moment supervisord shuts its listener.

    A listener shut from outside polls POLLOUT|POLLHUP for ever, and a loop still watching it spins,
    uvloop at about 0.8 CPU, until the stop signal comes `stop_delay` later (docs/kernel.md §5): 64
    retiring workers took both cores of the test machine for that long. A listening socket is never
    writable otherwise, so a writer callback on a duplicate of its fd (the loop watches the original
    already, for reading) fires exactly at the shut. `release()` at the stop: the duplicates go, so a
    stopping worker holds no listener.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.watches: dict[int, asyncio.AbstractServer] = {}  # duplicate fd -> the server of its listener

    def add(self, server: asyncio.AbstractServer) -> None:
        for sock in getattr(server, "sockets", None) or ():
            watch = os.dup(sock.fileno())
            self.watches[watch] = server
            self.loop.add_writer(watch, self._shut, watch)

    def release(self) -> None:
        for watch in list(self.watches):
            self._drop(watch)

    def _shut(self, watch: int) -> None:
        self._drop(watch).close()

    def _drop(self, watch: int) -> asyncio.AbstractServer:
        self.loop.remove_writer(watch)
        os.close(watch)
        return self.watches.pop(watch)
