"""The master's asyncio servers (control socket, metrics) take a few connections per turn of its loop.

asyncio's own loop takes up to `backlog` connections from a listener's queue in one callback, and
gives listen() that same number. A flood that filled the queue was then taken whole in one turn of
the master's loop: with 1,024 metrics connections it held the loop for 0.3 s, so `status` waited;
with 1,100 of a stranger's control connections the master held 471 fds at once. So a server is
started with ACCEPT_BATCH, and listen() then gives the kernel the listener's own backlog again.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Awaitable, Callable

ACCEPT_BATCH = 16  # connections taken from a listener's queue per turn of the loop

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


async def serve(handler: Handler, sock: socket.socket, limit: int, backlog: int) -> asyncio.Server:
    """Serve `sock` (listening already, unix or TCP) with `handler`, `limit` bytes per line read,
    `backlog` connections waiting in the kernel's queue."""
    start = asyncio.start_unix_server if sock.family == socket.AF_UNIX else asyncio.start_server
    server = await start(handler, sock=sock, limit=limit, backlog=ACCEPT_BATCH)
    sock.listen(backlog)  # start() gave listen() ACCEPT_BATCH
    return server
