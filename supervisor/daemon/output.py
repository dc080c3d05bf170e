"""What the workers of each program wrote to stderr: the last lines kept, and `tail -f` followers fed.

Bounded on every side: at most LINES lines and BYTES bytes per program (a worker's line is already
cut at worker.MAX_LINE), followers are control connections (control.MAX_CONNECTIONS at most), and a
follower that does not read is dropped once FOLLOWER_BUFFER bytes wait for it, so the master never
queues more for a slow `tail -f` and never waits on one.
"""

from __future__ import annotations

import collections
from dataclasses import dataclass
from typing import TYPE_CHECKING

import structlog

from supervisor.errors import ControlError
from supervisor.protocol import requests
from supervisor.protocol.reply import Reply

if TYPE_CHECKING:
    from supervisor.process.worker import Worker

log = structlog.get_logger()

LINES = 1000  # lines kept per program
BYTES = 256 * 1024  # bytes of text kept per program
FOLLOWER_BUFFER = 2 * BYTES  # bytes waiting for a follower before it is dropped as too slow (a whole tail fits)


@dataclass(frozen=True)
class Line:
    generation: int
    worker: int
    pid: int
    text: str

    def tagged(self, program: str) -> str:
        return f"{program}#{self.generation} worker {self.worker} pid {self.pid}: {self.text}"


class Output:
    def __init__(self) -> None:
        self.rings: dict[str, collections.deque[Line]] = {}
        self.sizes: dict[str, int] = {}
        self.followers: dict[str, list[Reply]] = {}

    def record(self, w: Worker, lines: list[str]) -> None:
        """Keep `lines` of worker `w`, and send them to its program's followers."""
        if not lines:
            return
        program, generation, worker, pid = w.program, w.generation, w.index, w.pid
        ring = self.rings.setdefault(program, collections.deque())
        for text in lines:
            line = Line(generation, worker, pid, text)
            ring.append(line)
            self.sizes[program] = self.sizes.get(program, 0) + len(text)
            while len(ring) > LINES or self.sizes[program] > BYTES:
                self.sizes[program] -= len(ring.popleft().text)
        followers = self.followers.get(program)
        if followers:
            data = b"".join(requests.encode({"line": Line(generation, worker, pid, t).tagged(program)}) for t in lines)
            self.followers[program] = [r for r in followers if send(r, data)]

    def tail(self, program: str, lines: int, reply: Reply) -> None:
        """Send the last `lines` lines of the program (at most BYTES of text) in one write."""
        ring = self.rings.get(program, collections.deque())
        kept = list(ring)[max(0, len(ring) - lines):]
        send(reply, b"".join(requests.encode({"line": line.tagged(program)}) for line in kept))

    def answer_tail(self, request: requests.Tail, reply: Reply, programs: set[str], stopping: bool) -> None:
        """`tail [-n N] [-f] PROGRAM`: its last stderr lines; with -f the reply stays open for new ones."""
        if request.program not in programs:
            raise ControlError(f"no program named {request.program!r}")
        if not 0 <= request.lines <= LINES:
            raise ControlError(f"lines must be 0..{LINES}, got {request.lines}")
        self.tail(request.program, request.lines, reply)
        if request.follow and not stopping:
            self.follow(request.program, reply)
        else:
            reply.finish(True, "")

    def follow(self, program: str, reply: Reply) -> None:
        """`tail -f`: the reply stays open; every new line of the program goes to it."""
        self.followers.setdefault(program, []).append(reply)

    def close(self, why: str) -> None:
        """Answer every follower (supervisord is stopping)."""
        for replies in self.followers.values():
            for reply in replies:
                reply.finish(True, why)
        self.followers.clear()


def send(reply: Reply, data: bytes) -> bool:
    """Write to a follower without waiting; False (and the connection closed) when it is gone or too slow."""
    writer = reply.writer
    if writer is None or writer.is_closing():
        return False
    if writer.transport.get_write_buffer_size() + len(data) > FOLLOWER_BUFFER:
        log.warning("tail_follower_dropped", reason="not reading", buffered=writer.transport.get_write_buffer_size())
        reply.done = True
        writer.transport.abort()
        return False
    writer.write(data)
    return True
