"""Worker processes as facts for the master: this one is ready, this one has ended, it wrote this.

The watcher knows the live workers by pid (a READY=1 names its sender by pid), reads and re-arms
their file descriptors (pidfd, stdout and stderr pipes) and looks for readiness as the program's
`ready` mode says (docs/operations.md, "Readiness"). What a ready or ended worker means is the master's to decide.

Events name a worker by the number the watcher gave it (`key`), not by the record: an event that
arrives after its worker was reaped and forgotten finds nothing and is dropped.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

import structlog

from supervisor.config.schema import LogLimit, ReadyMode
from supervisor.daemon.events import Event, NotifyReceived, ReadinessCheck, WorkerExited, WorkerOutput
from supervisor.model.generation import Generation
from supervisor.process.worker import OUTPUT_PACE, Worker, WorkerState
from supervisor.system import readiness

log = structlog.get_logger()

READINESS_POLL = 0.05  # seconds between looks at a worker with `ready: accepting`
Found = tuple[Worker, Generation]


class Watcher:
    def __init__(self, post: Callable[[Event], None], later: Callable[[float, Event], object],
                 sink: Callable[[Worker, str, list[str], LogLimit], Any] | None = None) -> None:
        self.post = post
        self.later = later
        self.sink = sink  # given what each worker writes (output.Output: the log, `tail`)
        self.workers: dict[int, Found] = {}  # live workers by pid
        self.pending: dict[Worker, Generation] = {}  # preload: workers their template has not forked yet
        self.keys: dict[Worker, int] = {}  # the number events carry for each watched worker
        self.by_key: dict[int, Worker] = {}
        self.next_key = 1

    def key(self, w: Worker) -> int:
        """The number that names `w` in events, given at its first look."""
        if (key := self.keys.get(w)) is None:
            key = self.keys[w] = self.next_key
            self.by_key[key] = w
            self.next_key += 1
        return key

    def find(self, key: int) -> Worker | None:
        """The worker an event names, while it is watched (None once reaped and forgotten)."""
        return self.by_key.get(key)

    def found(self, keys: tuple[int, ...]) -> list[Worker]:
        return [w for key in keys if (w := self.by_key.get(key)) is not None]

    def forget(self, w: Worker) -> None:
        if (key := self.keys.pop(w, None)) is not None:
            del self.by_key[key]

    def watch(self, w: Worker, gen: Generation) -> None:
        for pipe in (w.stdout, w.stderr):
            self.once(pipe.fd, WorkerOutput(self.key(w), pipe.stream))
        if not w.forked:
            self.pending[w] = gen
            return
        self.workers[w.pid] = (w, gen)
        self.once(w.pidfd, WorkerExited(self.key(w)))
        if gen.program.ready is not ReadyMode.NOTIFY:
            self.later(gen.program.settle, ReadinessCheck(self.key(w)))

    def forked(self, w: Worker) -> None:
        """A preload worker has its pid and pidfd now: watched as a spawned one."""
        gen = self.pending.pop(w)
        self.workers[w.pid] = (w, gen)
        self.once(w.pidfd, WorkerExited(self.key(w)))
        if gen.program.ready is not ReadyMode.NOTIFY:
            self.later(gen.program.settle, ReadinessCheck(self.key(w)))

    def watching(self, w: Worker) -> bool:
        return w in self.pending or self.workers.get(w.pid, (None,))[0] is w

    def generation_of(self, w: Worker) -> Generation | None:
        if w in self.pending:
            return self.pending[w]
        return self.workers[w.pid][1] if self.watching(w) else None

    def notified(self, event: NotifyReceived) -> Found | None:
        """The worker a READY=1 makes ready: its sender, or the worker that started the sender (NotifyAccess=all)."""
        found = readiness.find_worker(self.workers, event.pid)
        if found is None:
            log.debug("notify_ignored", pid=event.pid, fields=event.fields)
            return None
        ready = event.fields.get("READY") == "1" and found[1].program.ready is ReadyMode.NOTIFY
        return found if ready and found[0].state is WorkerState.STARTING else None

    def checked(self, w: Worker) -> Found | None:
        """`ready: accepting`/`settle`: alive for `settle` seconds, and (accepting) polling its listeners."""
        gen = self.generation_of(w)
        if gen is None or w.state is not WorkerState.STARTING:
            return None
        if gen.program.ready is ReadyMode.SETTLE or readiness.polls_listeners(w.pid, w.listeners):
            return w, gen
        self.later(READINESS_POLL, ReadinessCheck(self.key(w)))
        return None

    def output(self, w: Worker, stream: str) -> None:
        """Pass on what the worker wrote on `stream` since the last look, then wait for more.

        A pipe that still had more than a read takes is looked at again only after three times as
        long as this look took: a worker writing without pause gets at most a quarter of the
        master's time (it waits on its pipe meanwhile), and the master stays a mostly idle process
        that the scheduler wakes at once for a `status`. Measured on 2 busy cores with a reload
        under load in the middle (tests/scenarios/test_output.py): `status` took a median of 36 ms
        and up to 225 ms when the pipe was read again at once; 5-6 ms and up to 83-102 ms with a
        pause as long as the look; 2-8 ms and mostly up to 26-88 ms with three times as long
        (docs/logs.md)."""
        started = time.monotonic()
        pipe = w.stdout if stream == "stdout" else w.stderr
        self.sink_lines(w, stream, w.read(pipe))
        if pipe.full:
            self.later(OUTPUT_PACE * (time.monotonic() - started), WorkerOutput(self.key(w), stream))
        else:
            self.once(pipe.fd, WorkerOutput(self.key(w), stream))

    def sink_lines(self, w: Worker, stream: str, lines: list[str]) -> None:
        if self.sink is not None and lines:
            gen = self.generation_of(w)
            self.sink(w, stream, lines, gen.program.log_limit if gen is not None else LogLimit())

    def exited(self, w: Worker) -> Generation | None:
        """Reap the worker: its generation once it has ended, None for a spurious wake-up."""
        for pipe in (w.stdout, w.stderr):
            if pipe.fd >= 0:
                asyncio.get_running_loop().remove_reader(pipe.fd)
        if w in self.pending:  # its template never forked it
            w.abandon()
        elif not w.reap():
            for pipe in (w.stdout, w.stderr):
                self.once(pipe.fd, WorkerOutput(self.key(w), pipe.stream))
            self.once(w.pidfd, WorkerExited(self.key(w)))
            return None
        for stream, lines in w.last_words:  # what was left in its pipes
            self.sink_lines(w, stream, lines)
        w.last_words.clear()
        self.forget(w)
        if w in self.pending:
            return self.pending.pop(w)
        return self.workers.pop(w.pid)[1]

    def once(self, fd: int, event: Event) -> None:
        """Post `event` once when `fd` becomes readable."""
        if fd < 0:
            return  # no such handle (closed, or a worker of the unit tests' fake spawner)
        loop = asyncio.get_running_loop()

        # Level-triggered readers fire until the condition is handled; post once, re-arm after.
        def fire() -> None:
            loop.remove_reader(fd)
            self.post(event)
        loop.add_reader(fd, fire)
