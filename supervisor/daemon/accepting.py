"""How the master's endpoints take connections: a few per turn of its loop, and the metrics
endpoint's refusals before anything is made for them.

asyncio's own loop takes up to `backlog` connections from a listener's queue in one callback, and
gives listen() that same number. A flood that filled the queue was then taken whole in one turn of
the master's loop: with 1,024 metrics connections it held the loop for 0.3 s, so `status` waited;
with 1,100 of a stranger's control connections the master held 471 fds at once. So the control
socket's server is started with ACCEPT_BATCH (`serve`), and listen() then gives the kernel the
listener's own backlog again. The metrics endpoint, which refuses most of a flood by its peer's
address, takes its connections itself (`Acceptor`).
"""

from __future__ import annotations

import asyncio
import errno
import socket
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, Generic, TypeVar

ACCEPT_BATCH = 16  # connections taken from a listener's queue per turn of the loop
PAUSE_AFTER_EMFILE = 1.0  # seconds an Acceptor out of fds leaves its queue alone

T = TypeVar("T")

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


async def serve(handler: Handler, sock: socket.socket, limit: int, backlog: int) -> asyncio.Server:
    """Serve `sock` (listening already, unix or TCP) with `handler`, `limit` bytes per line read,
    `backlog` connections waiting in the kernel's queue."""
    start = asyncio.start_unix_server if sock.family == socket.AF_UNIX else asyncio.start_server
    server = await start(handler, sock=sock, limit=limit, backlog=ACCEPT_BATCH)
    sock.listen(backlog)  # start() gave listen() ACCEPT_BATCH
    return server


class Acceptor(Generic[T]):
    """Takes connections from a listening socket itself, ACCEPT_BATCH per turn of the loop, and asks
    `admit(peer)` before anything is made for one. A refused connection then costs an accept() and a
    close(); behind asyncio's server it cost a transport, a stream and a task first, which under a
    neighbour's flood of 5,000 connections a second took the master's loop 50 to 70 ms of CPU while
    a `status` waited (tests/scenarios/test_attacks.py). `handle(conn, admitted)` serves the rest, in
    a task of its own; it owns `conn` (closes it)."""

    def __init__(self, sock: socket.socket, admit: Callable[[Any], T | None],
                 handle: Callable[[socket.socket, T], Coroutine[Any, Any, None]]) -> None:
        self.sock, self.admit, self.handle = sock, admit, handle
        self.loop = asyncio.get_running_loop()
        self.tasks: set[asyncio.Task[None]] = set()
        sock.setblocking(False)
        self.loop.add_reader(sock.fileno(), self._accept)

    def _accept(self) -> None:
        for _ in range(ACCEPT_BATCH):
            try:
                conn, peer = self.sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    # Out of fds or memory: what waits stays in the kernel's queue until then (as asyncio does).
                    self.loop.remove_reader(self.sock.fileno())
                    self.loop.call_later(PAUSE_AFTER_EMFILE, self._resume)
                    return
                continue  # ECONNABORTED and the like: that one is gone
            admitted = self.admit(peer)
            if admitted is None:
                conn.close()
                continue
            conn.setblocking(False)
            task = self.loop.create_task(self.handle(conn, admitted))
            self.tasks.add(task)
            task.add_done_callback(self.tasks.discard)

    def _resume(self) -> None:
        if self.sock.fileno() >= 0:
            self.loop.add_reader(self.sock.fileno(), self._accept)

    def close(self) -> None:
        """Take no more connections (those served go on)."""
        if self.sock.fileno() >= 0:
            self.loop.remove_reader(self.sock.fileno())
            self.sock.close()
