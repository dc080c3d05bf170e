"""What the workers of each program write on stdout and stderr: logged within a budget, the last
lines kept for `tail`, `tail -f` followers fed (docs/logs.md).

Bounded on every side. The log: each program has a token bucket (`log_limit`: lines and bytes per
second, `burst` seconds' worth at once); a line over it is not logged, and a single
`worker_output_dropped` event per program per REPORT_INTERVAL counts what was not. Memory: at most
LINES lines and BYTES bytes per program and stream (a worker's line is already cut at
worker.MAX_LINE). Followers are control connections (control.MAX_FOLLOWERS at most), and a follower
that does not read is dropped once FOLLOWER_BUFFER bytes wait for it, so the master never queues
more for a slow `tail -f` and never waits on one.
"""

from __future__ import annotations

import collections
import itertools
from collections.abc import Iterable
from typing import TYPE_CHECKING, NamedTuple

import structlog

from supervisor.config.schema import LogLimit
from supervisor.errors import ControlError
from supervisor.protocol import requests
from supervisor.protocol.reply import Reply

if TYPE_CHECKING:
    from supervisor.daemon.host import Clock
    from supervisor.process.worker import Worker

log = structlog.get_logger()

LINES = 1000  # lines kept per program and stream
BYTES = 256 * 1024  # bytes of text kept per program and stream; a `tail` sends at most this much
FOLLOWER_BUFFER = 2 * BYTES  # bytes waiting for a follower before it is dropped as too slow (a whole tail fits)
REPORT_INTERVAL = 1.0  # seconds: at most one worker_output_dropped event per program in each
LOGGED_AT_ONCE = 512  # lines logged from one read at most: what worker.PIPE_READ bytes can hold
STREAMS = ("stdout", "stderr")


class Line(NamedTuple):
    """One line a worker wrote (a tuple: a flood makes hundreds of thousands a second)."""

    seq: int  # the order the master read it in, across the streams of a program
    stream: str
    generation: int
    worker: int
    pid: int
    text: str

    def tagged(self, program: str) -> str:
        return f"{program}#{self.generation} worker {self.worker} pid {self.pid} {self.stream}: {self.text}"

    def message(self, program: str) -> bytes:
        return requests.encode({"line": self.tagged(program), "stream": self.stream})


class Budget:
    """A token bucket: what one program's workers may still write into the log. Pure, given the time.

    Both buckets hold `burst` seconds' worth when full and refill at `lines` and `bytes` per second.
    A line needs one line token and a positive byte balance; it then takes its size, so one line
    longer than what is left (up to worker.MAX_LINE) may take the byte balance below zero, and the
    lines after it wait until it is paid back. Over any span of T seconds at most
    lines x (burst + T) lines and bytes x (burst + T) + MAX_LINE bytes are admitted.
    """

    def __init__(self, limit: LogLimit, now: float) -> None:
        self.limit = limit
        self.lines = limit.lines * limit.burst
        self.bytes = limit.bytes * limit.burst
        self.at = now
        self.dropped_lines = 0  # since the last report
        self.dropped_bytes = 0

    def admit(self, sizes: list[int], now: float) -> int:
        """How many of these lines (their sizes in bytes), written at `now`, may be logged: the first
        ones, as many as the buckets allow; the rest are counted as dropped. (Within one instant the
        buckets do not refill, so once a line is refused every later one is too.)"""
        limit = self.limit
        elapsed = max(0.0, now - self.at)
        self.at = max(self.at, now)
        self.lines = min(limit.lines * limit.burst, self.lines + elapsed * limit.lines)
        self.bytes = min(limit.bytes * limit.burst, self.bytes + elapsed * limit.bytes)
        admitted = 0
        for size in sizes:
            if self.lines < 1 or self.bytes <= 0:
                break
            self.lines -= 1
            self.bytes -= size
            admitted += 1
        if admitted < len(sizes):
            self.dropped_lines += len(sizes) - admitted
            self.dropped_bytes += sum(sizes[admitted:])
        return admitted

    def retune(self, limit: LogLimit, now: float) -> None:
        """Go on under another limit with what is left (never more than its capacity): a change back
        and forth (two generations of a reload) never fills the buckets."""
        self.admit([], now)  # refilled up to now under the limit in force until now
        self.limit = limit
        self.lines = min(self.lines, limit.lines * limit.burst)
        self.bytes = min(self.bytes, limit.bytes * limit.burst)

    def drop(self, sizes: list[int]) -> None:
        """Count these lines as dropped without asking the buckets."""
        self.dropped_lines += len(sizes)
        self.dropped_bytes += sum(sizes)

    def take_dropped(self) -> tuple[int, int]:
        """What was dropped since the last call: (lines, bytes)."""
        dropped = self.dropped_lines, self.dropped_bytes
        self.dropped_lines = self.dropped_bytes = 0
        return dropped


class Output:
    """The master's record of what workers write: budgets, rings and followers, per program."""

    def __init__(self, clock: Clock) -> None:
        self.clock = clock
        self.rings: dict[tuple[str, str], collections.deque[Line]] = {}  # by (program, stream)
        self.sizes: dict[tuple[str, str], int] = {}
        self.followers: dict[str, list[tuple[Reply, str]]] = {}  # program -> (reply, stream or "" for both)
        self.budgets: dict[str, Budget] = {}
        self.reports: set[str] = set()  # programs whose worker_output_dropped is due
        self.seq = itertools.count()

    def record(self, w: Worker, stream: str, lines: list[str], limit: LogLimit) -> None:
        """What worker `w` wrote on `stream`: logged as `worker_stdout`/`worker_stderr` events within
        its program's budget, kept for `tail`, sent to its program's followers."""
        if not lines:
            return
        program = w.program
        event = f"worker_{stream}"
        for text in lines[:self.admit(program, lines, limit)]:
            log.info(event, program=program, gen=w.generation, worker=w.index, pid=w.pid, line=text)
        followers = self.followers.get(program)
        # The ring keeps LINES at most: the lines before those (a dead worker's pipe read at once)
        # are made only for followers.
        kept = [Line(next(self.seq), stream, w.generation, w.index, w.pid, text)
                for text in (lines if followers else lines[-LINES:])]
        self.keep(program, stream, kept[-LINES:])
        if followers:
            data = b"".join(line.message(program) for line in kept)
            self.followers[program] = [(r, s) for r, s in followers if s not in ("", stream) or send(r, data)]

    def record_template(self, program: str, generation: int, pid: int, lines: list[str], limit: LogLimit) -> None:
        """What a preload template wrote (an import's traceback): `template_stderr` events, within its
        program's budget; not kept for `tail` (a failed reload quotes them)."""
        for text in lines[:self.admit(program, lines, limit)]:
            log.info("template_stderr", program=program, gen=generation, pid=pid, line=text)

    def admit(self, program: str, lines: list[str], limit: LogLimit) -> int:
        """How many of `lines` (the first ones) the program's budget lets into the log now."""
        budget = self.budget(program, limit)
        sizes = [len(text.encode()) + 1 for text in lines]  # as the worker wrote them, with the newline
        # A dead worker's pipe is read at once (up to worker.PIPE_AT_EXIT): no more is logged in one
        # step than a read of a live one can bring (~25 us a line), the rest counts as dropped. A
        # full 64 KiB pipe of short lines then takes 26 ms, not 178 (the 10,000 of a full bucket).
        admitted = budget.admit(sizes[:LOGGED_AT_ONCE], self.clock.time())
        budget.drop(sizes[LOGGED_AT_ONCE:])
        if budget.dropped_lines and program not in self.reports:
            self.reports.add(program)
            self.clock.call_later(REPORT_INTERVAL, self.report, program)
        return admitted

    def budget(self, program: str, limit: LogLimit) -> Budget:
        """The program's buckets, under `limit` (a reload may change it; until the old generation has
        gone its workers bring the old one)."""
        budget = self.budgets.get(program)
        if budget is None:
            budget = self.budgets[program] = Budget(limit, self.clock.time())
        elif budget.limit != limit:
            budget.retune(limit, self.clock.time())
        return budget

    def report(self, program: str) -> None:
        """One event for what the program's workers wrote over the budget since the last one."""
        self.reports.discard(program)
        budget = self.budgets.get(program)
        lines, size = budget.take_dropped() if budget is not None else (0, 0)
        if lines:
            limit = budget.limit if budget is not None else LogLimit()
            log.warning("worker_output_dropped", program=program, lines=lines, bytes=size,
                        text=f"dropped {lines} lines ({size} bytes) over log_limit "
                             f"({limit.lines} lines, {limit.bytes} bytes per second); `tail` still has them")

    def keep(self, program: str, stream: str, lines: Iterable[Line]) -> None:
        key = (program, stream)
        ring = self.rings.setdefault(key, collections.deque())
        size = self.sizes.get(key, 0)
        for line in lines:
            ring.append(line)
            size += len(line.text)
            while len(ring) > LINES or size > BYTES:
                size -= len(ring.popleft().text)
        self.sizes[key] = size

    def last(self, program: str, lines: int, stream: str = "") -> list[Line]:
        """The last `lines` lines of the program (of `stream`, or of both in the order they were read),
        at most BYTES of text."""
        kept: list[Line] = []
        for name in (stream,) if stream else STREAMS:
            ring = self.rings.get((program, name), collections.deque())
            kept += itertools.islice(ring, max(0, len(ring) - lines), None)
        kept.sort(key=lambda line: line.seq)
        chosen: list[Line] = []
        size = 0
        for line in reversed(kept[max(0, len(kept) - lines):]):
            size += len(line.text)
            if size > BYTES:
                break
            chosen.append(line)
        return chosen[::-1]

    def tail(self, program: str, lines: int, reply: Reply, stream: str = "") -> None:
        """Send the last lines of the program (Output.last) in one write."""
        send(reply, b"".join(line.message(program) for line in self.last(program, lines, stream)))

    def answer_tail(self, request: requests.Tail, reply: Reply, programs: set[str], stopping: bool) -> None:
        """`tail [-n N] [-f] PROGRAM [stdout|stderr]`: its last lines; with -f the reply stays open for new ones."""
        if request.program not in programs:
            raise ControlError(f"no program named {request.program!r}")
        if not 0 <= request.lines <= LINES:
            raise ControlError(f"lines must be 0..{LINES}, got {request.lines}")
        if request.stream not in ("", *STREAMS):
            raise ControlError(f"stream must be stdout or stderr, got {request.stream!r}")
        self.tail(request.program, request.lines, reply, request.stream)
        if request.follow and not stopping:
            self.follow(request.program, reply, request.stream)
        else:
            reply.finish(True, "")

    def follow(self, program: str, reply: Reply, stream: str = "") -> None:
        """`tail -f`: the reply stays open; every new line of the program (of `stream`) goes to it."""
        self.followers.setdefault(program, []).append((reply, stream))

    def close(self, why: str) -> None:
        """Answer every follower and log what is still to be reported (supervisord is stopping)."""
        for program in list(self.reports):
            self.report(program)
        for followers in self.followers.values():
            for reply, _stream in followers:
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
