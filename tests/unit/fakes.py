"""A master without processes: a fake spawner, a clock the test drives, replies that keep what they heard.

The master's decisions run exactly as in supervisord; only the edges are replaced: workers are
records whose exit the test chooses, their listeners real but unbound sockets (so "shut" is the
real call, which the kernel answers ENOTCONN), and timers fire when the test moves the clock.
"""

from __future__ import annotations

import heapq
import itertools
import signal
import socket
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from supervisor.config import schema
from supervisor.config.schema import Program
from supervisor.daemon.events import ControlRequest, NotifyReceived, RecycleCheck, WorkerExited
from supervisor.daemon.master import Master
from supervisor.errors import SpawnError
from supervisor.model.program import ProgramRuntime
from supervisor.model.reload import ReloadKind
from supervisor.process.worker import Pipe, Worker, WorkerState
from supervisor.protocol import requests
from supervisor.protocol.reply import Reply
from supervisor.system.listeners import Listener

FIRST_PID = 5_000_000  # above the kernel's pid_max: psutil finds no such process


class FakeWorker(Worker):
    def __init__(self, *args: Any, clock: FakeClock, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.clock = clock
        self.signals: list[tuple[float, str, bool]] = []  # (when, signal, were all listeners shut)

    def signal(self, signum: int) -> None:
        if self.alive:
            self.signals.append((self.clock.time(), signal.Signals(signum).name,
                                 all(s.shut for s in self.listeners)))

    def kill(self) -> None:
        if self.alive:
            self.shut()
            self.signal(signal.SIGKILL)

    def reap(self) -> bool:
        if self.status is None:
            return False
        self.state = WorkerState.EXITED if self.state is WorkerState.RETIRING else WorkerState.FAILED
        self.release()
        return True

    def read_stderr(self) -> list[str]:
        return []

    def rss(self) -> int | None:
        return 10 << 20


class FakeSpawner:
    def __init__(self, clock: FakeClock) -> None:
        self.clock = clock
        self.pids = itertools.count(FIRST_PID)
        self.spawned: list[FakeWorker] = []
        self.fail_next = 0  # how many of the next spawns fail as an exec would

    def listen(self, program: Program, backlog: int | None = None) -> list[Listener]:
        return [Listener(listen, f"{program.name}.{n}", socket.socket(listen.family, socket.SOCK_STREAM))
                for n, listen in enumerate(program.listen)]

    def spawn(self, program: Program, generation: int, index: int, shared: list[Listener] | None = None) -> Worker:
        if self.fail_next:
            self.fail_next -= 1
            raise SpawnError(f"{program.name}: cannot start worker {index}: [Errno 2] No such file")
        listeners = list(shared) if shared is not None else self.listen(program)
        w = FakeWorker(program=program.name, generation=generation, index=index, pid=next(self.pids), pidfd=-1,
                       stderr=Pipe("stderr"), listeners=listeners, started=self.clock.time(), clock=self.clock)
        self.spawned.append(w)
        return w


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0
        self.timers: list[tuple[float, int, FakeTimer]] = []
        self.order = itertools.count()

    def time(self) -> float:
        return self.now

    def call_later(self, delay: float, callback: Callable[..., Any], *args: Any) -> Any:
        timer = FakeTimer(lambda: callback(*args))
        heapq.heappush(self.timers, (self.now + delay, next(self.order), timer))
        return timer

    def advance(self, seconds: float, after_each: Callable[[], None]) -> None:
        """Move time on, firing each timer due on the way (and what it causes) in order."""
        end = self.now + seconds
        while self.timers and self.timers[0][0] <= end:
            due, _, timer = heapq.heappop(self.timers)
            self.now = max(self.now, due)
            if not timer.cancelled:
                timer.callback()
                after_each()
        self.now = end


class FakeTimer:
    def __init__(self, callback: Callable[[], None]) -> None:
        self.callback = callback
        self.cancelled = False

    def cancel(self) -> None:
        self.cancelled = True


class HeardReply(Reply):
    """A reply that keeps every progress line and its final answer."""

    def __init__(self) -> None:
        super().__init__(origin="test")
        self.lines: list[str] = []
        self.answer: dict[str, Any] | None = None

    def _send(self, message: dict[str, Any]) -> None:
        if "progress" in message:
            self.lines.append(message["progress"])
        else:
            self.answer = message

    @property
    def ok(self) -> bool | None:
        return None if self.answer is None else self.answer["ok"]


def program(**settings: Any) -> dict[str, Any]:
    return {"command": ["true"], "workers": 2, "listen": ["127.0.0.1:8000"], "ready_timeout": 10,
            "graceful_timeout": 5, "stop_delay": 0.5, **settings}


class Scenario:
    """A Master with fake processes and time: start, make workers ready or exit, advance, ask."""

    def __init__(self, folder: Path, programs: dict[str, dict[str, Any]], **top: Any) -> None:
        self.path = folder / "supervisor.yaml"
        self.top = top  # more top-level keys of the config (migrate:)
        self.write(programs)
        self.clock = FakeClock()
        self.spawner = FakeSpawner(self.clock)
        self.master = Master(schema.load(self.path), spawner=self.spawner, clock=self.clock)

    def write(self, programs: dict[str, dict[str, Any]]) -> None:
        self.path.write_text(yaml.safe_dump({"programs": programs, **self.top}))

    def drain(self) -> None:
        while not self.master.queue.empty():
            self.master.handle(self.master.queue.get_nowait())

    def start(self, ready: bool = True) -> HeardReply:
        reply = HeardReply()
        self.master.reloads.begin(ReloadKind.STARTUP, self.master.config, reply, {})
        self.drain()
        if ready:
            self.ready(*self.starting())
        return reply

    def ask(self, request: requests.Request) -> HeardReply:
        reply = HeardReply()
        self.master.post(ControlRequest(request, reply))
        self.drain()
        return reply

    def ready(self, *workers: Worker) -> None:
        for w in workers:
            self.master.post(NotifyReceived(w.pid, {"READY": "1"}))
        self.drain()

    def exit(self, w: Worker, status: int = 3 << 8) -> None:
        w.status = status
        self.master.post(WorkerExited(self.master.watcher.key(w)))
        self.drain()

    def advance(self, seconds: float) -> None:
        self.drain()
        self.clock.advance(seconds, self.drain)

    def recycle_check(self) -> None:
        self.master.post(RecycleCheck())
        self.drain()

    def starting(self) -> list[FakeWorker]:
        return [w for w in self.spawner.spawned if w.state is WorkerState.STARTING and w.alive]

    def serving(self, name: str = "web") -> list[FakeWorker]:
        gen = self.record(name).serving
        return [] if gen is None else [w for w in gen.workers if isinstance(w, FakeWorker) and w.alive
                                       and w.state is WorkerState.READY]

    def record(self, name: str = "web") -> ProgramRuntime:
        return self.master.programs[name]

    def state(self, name: str = "web") -> str:
        return self.record(name).state.value
