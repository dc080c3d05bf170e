"""Preloading (`preload:`): the master's side of the per-generation template that forks workers.

A program with `preload` gets one template process per generation (`preload_child.py`, started
by the spawn chain, as the program's user, in its cwd, with its umask and env), which imports the
listed modules once. Every worker of that generation, also a crash restart, a `scale` or a recycled
one, is forked from it: a reload starts a new template, so new code is loaded per generation.

The master never blocks on it: a fork is a message with the worker's listeners and stderr; the
worker record exists at once, with its listeners and stderr, and gets its pid and pidfd when the
template's answer comes through the loop (`forked`). Until then it is "not forked yet": a stop or a
kill is remembered and done as soon as it is. The template's death fails the workers it had not
forked yet (a reload's generation rolls back with its traceback); the next spawn of a serving
generation starts a new template.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import itertools
import json
import os
import signal
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import structlog

from supervisor.config import schema
from supervisor.config.schema import LogLimit, OutputMode, Program
from supervisor.errors import SpawnError
from supervisor.process import worker
from supervisor.process.worker import Worker
from supervisor.system import accounts, listeners, readiness
from supervisor.system.listeners import Listener

log = structlog.get_logger()

SCRIPT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "preload_child.py")
MAX_MESSAGE = 65536
EXIT_NOT_FORKED = 255 << 8  # the wait status of a worker whose template ended before forking it


@dataclass(eq=False)
class Template:
    """One template process: a generation's imported code, ready to fork its workers."""

    program: str
    generation: int
    process: Worker  # its pid, pidfd and stderr, watched like a worker's (it is not one: no slot)
    control: socket.socket  # the master's end of the protocol socket
    pending: dict[int, Worker] = field(default_factory=dict)  # fork id -> the worker being forked
    ready_ms: int | None = None  # how long its imports took, once it said so
    log_limit: LogLimit = field(default_factory=LogLimit)  # its program's: its output counts with its workers'
    retiring: bool = False  # its generation forks no more: closed once nothing is pending
    # Fork requests the socket had no room for (a template still importing holds ~160 in its socket
    # buffer): sent as it answers. Each: the message, the worker's pipe write ends (stderr, and stdout
    # with `stdout: log`), its listeners.
    outbox: list[tuple[bytes, list[int], list[int]]] = field(default_factory=list)

    @property
    def alive(self) -> bool:
        return self.process.alive

    @property
    def key(self) -> tuple[str, int]:
        return self.program, self.generation


@dataclass(frozen=True)
class Forked:
    """The template forked `worker`: its pid and pidfd are set; the master watches it now."""

    worker: Worker


@dataclass(frozen=True)
class NotForked:
    """The template could not fork `worker`, or ended first: it ends as a worker that exited unready."""

    worker: Worker


Answer = Forked | NotForked
# What wakes the master for a template (its socket, its pidfd, its stderr), with the template's key.
Wake = Callable[[str, str, int], None]
# Where a template's output lines go: (program, generation, pid, lines, the program's log_limit).
Record = Callable[[str, int, int, list[str], LogLimit], None]


class Templates:
    """The master's spawner: a program with `preload` forks from its generation's template, the
    others start as before (`worker.Spawner`)."""

    def __init__(self, spawner: worker.Spawner, wake: Wake, record: Record) -> None:
        self.spawner = spawner
        self.wake = wake  # (what, program, generation): "message", "exited" or "output"
        self.record = record  # its output: logged within the program's budget (daemon/output.py)
        self.running: dict[tuple[str, int], Template] = {}
        self.ids = itertools.count(1)

    def listen(self, program: Program) -> list[Listener]:
        return self.spawner.listen(program)

    def spawn(self, program: Program, generation: int, index: int, shared: list[Listener] | None = None) -> Worker:
        if not program.preload:
            return self.spawner.spawn(program, generation, index, shared)
        template = self.running.get((program.name, generation))
        if template is None or not template.alive:
            template = self.start(program, generation)
        socks: list[Listener] = list(shared) if shared is not None else []
        stderr, stdout = worker.Pipe("stderr"), worker.Pipe("stdout")
        ends: list[int] = []
        try:
            if shared is None:
                socks = self.spawner.listen(program)
            stderr.fd, _ = worker.pipe_to_master(ends)
            # `stdout: inherit`: the worker keeps the template's fd 1, supervisord's own stdout.
            piped = program.stdout is OutputMode.LOG
            if piped:
                stdout.fd, _ = worker.pipe_to_master(ends)
            fork_id = next(self.ids)
            env = worker.socket_env(program, generation, index, socks)
            template.outbox.append((json.dumps({"fork": fork_id, "env": env, "stdout": piped}).encode(), ends,
                                    [s.fileno() for s in socks]))
            send(template)
        except BaseException as exc:
            for sock in socks:
                if not sock.shared:
                    listeners.close(sock)
            stderr.close()
            stdout.close()
            if not any(ends is entry[1] for entry in template.outbox):
                for fd in ends:
                    os.close(fd)
            if isinstance(exc, OSError):
                raise SpawnError(f"{program.name}: cannot ask the preload template for worker {index}: {exc}") from None
            raise
        w = Worker(program=program.name, generation=generation, index=index, pid=0, pidfd=-1, stderr=stderr,
                   stdout=stdout, listeners=socks)
        template.pending[fork_id] = w
        return w

    def start(self, program: Program, generation: int) -> Template:
        """Start the generation's template: the spawn chain (session, user, cwd, umask, env,
        parent-death signal) runs it, with the protocol socket at fd 3."""
        main = schema.python_main(worker.tls_command(program))
        assert main is not None, "config refuses preload without a Python command"
        spec = {"preload": list(program.preload), "main": [main[0], main[1], list(main[2])],
                "master": os.getpid(), "pdeathsig": int(program.stop_signal)}
        runner = dataclasses.replace(program, command=(program.command[0], SCRIPT, json.dumps(spec)))
        if program.user is not None:
            readiness.admit(self.spawner.notify_socket, accounts.account(program.user).pw_uid)
        mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            # Its own output (an import's traceback or prints) in one pipe, logged as template_stderr.
            process = worker.spawn(runner, generation, -1, [], self.spawner.notify_socket, program.cwd,
                                   extra_fds=[theirs.fileno()], stdout_to_stderr=True)
        except BaseException:
            mine.close()
            raise
        finally:
            theirs.close()
        mine.setblocking(False)
        template = Template(program.name, generation, process, mine, log_limit=program.log_limit)
        self.running[(program.name, generation)] = template
        for what, fd in (("message", mine.fileno()), ("exited", process.pidfd), ("output", process.stderr.fd)):
            self._once(fd, what, template)
        log.info("template_started", program=program.name, gen=generation, pid=process.pid,
                 preload=list(program.preload))
        return template

    def retire(self, program: str, generation: int) -> list[Answer]:
        """The generation forks no more: once every fork asked for is answered, the socket is closed and
        the template exits on its EOF. One that has not finished its imports forks nothing: killed.
        Returns the answers that were waiting (its "ready" may be among them: it may have forked since)."""
        template = self.running.get((program, generation))
        if template is None or template.retiring:
            return []
        template.retiring = True
        answers = self.read(template)
        if template.ready_ms is None:
            template.process.kill()  # still importing (or stuck there); its pending workers fail when it is reaped
        elif not template.pending:
            close(template)
        return answers

    def find(self, program: str, generation: int) -> Template | None:
        return self.running.get((program, generation))

    def read(self, template: Template) -> list[Answer]:
        """Every answer waiting on the template's socket (never blocks: the socket is non-blocking)."""
        answers: list[Answer] = []
        while template.control.fileno() >= 0:
            try:
                data, fds, _flags, _address = socket.recv_fds(template.control, MAX_MESSAGE, 1)
            except (BlockingIOError, InterruptedError):
                send(template)  # it has read some requests: room for more
                self._once(template.control.fileno(), "message", template)  # for the next ones
                return answers
            except OSError as exc:
                log.error("template_socket_failed", program=template.program, gen=template.generation,
                          error=str(exc))
                close(template)
                return answers
            if not data:
                close(template)  # it exited; its pidfd tells how
                return answers
            answer = json.loads(data)
            if "ready" in answer:
                template.ready_ms = answer["ready"]
                log.info("template_ready", program=template.program, gen=template.generation,
                         pid=template.process.pid, import_ms=answer["ready"])
                continue
            w = template.pending.pop(answer.get("forked") or answer.get("failed"), None)
            if w is None:  # not expected: a worker nobody watches must not serve
                for fd in fds:
                    with contextlib.suppress(OSError):
                        signal.pidfd_send_signal(fd, signal.SIGKILL)
                    os.close(fd)
                continue
            if "forked" in answer and fds:
                w.pid, w.pidfd = answer["pid"], fds[0]
                log.debug("worker_forked", program=w.program, gen=w.generation, worker=w.index, pid=w.pid)
                answers.append(Forked(w))
            else:
                answers.append(_not_forked(w, [f"its preload template could not fork it: "
                                               f"{answer.get('error', 'no pidfd')}"]))
            if template.retiring and not template.pending:
                close(template)
                return answers
        return answers

    def ended(self, template: Template) -> list[Answer] | None:
        """The template's pidfd woke: reaped, with the workers it had not forked as NotForked (with its
        last stderr lines); None while it still runs (a spurious wake-up)."""
        process = template.process
        if not process.reap():
            self._once(process.pidfd, "exited", template)
            return None
        close(template)
        if self.running.get(template.key) is template:
            del self.running[template.key]
        self.output(template)
        say = log.info if not template.pending and process.status == 0 else log.error
        say("template_exited", program=template.program, gen=template.generation, pid=process.pid,
            status=process.describe_exit(), not_forked=len(template.pending))
        why = [f"its preload template (pid {process.pid}) {process.describe_exit()}; it wrote:", *process.tail]
        answers: list[Answer] = [_not_forked(w, why) for w in template.pending.values()]
        template.pending.clear()
        return answers

    def output(self, template: Template) -> None:
        """Log what the template wrote (an import's traceback) and keep its last lines for the reply;
        paced as a worker's pipe is (watcher.Watcher.output)."""
        started = time.monotonic()
        process = template.process
        lines = [line for _stream, words in process.last_words for line in words] + process.read_stderr()
        process.last_words.clear()
        self.record(template.program, template.generation, process.pid, lines, template.log_limit)
        if not process.alive or process.stderr.fd < 0:  # at EOF read_stderr closed it: its pidfd says the rest
            return
        if process.stderr.full:
            asyncio.get_running_loop().call_later(worker.OUTPUT_PACE * (time.monotonic() - started), self.wake,
                                                  "output", template.program, template.generation)
        else:
            self._once(process.stderr.fd, "output", template)

    def _once(self, fd: int, what: str, template: Template) -> None:
        """Wake the master once when `fd` becomes readable (level-triggered: re-armed after handling)."""
        loop = asyncio.get_running_loop()

        def fire() -> None:
            loop.remove_reader(fd)
            self.wake(what, template.program, template.generation)
        loop.add_reader(fd, fire)

    def names(self) -> list[str]:
        return sorted({t.program for t in self.running.values() if t.alive})


def send(template: Template) -> None:
    """Send the waiting fork requests until the socket is full (never blocks: it is non-blocking).
    The rest go as the template answers (`message`): each request it reads gets an answer."""
    while template.outbox and template.control.fileno() >= 0:
        data, ends, fds = template.outbox[0]
        try:
            socket.send_fds(template.control, [data], [*ends, *fds])
        except BlockingIOError:
            return
        except OSError as exc:  # EPIPE: it died; its pidfd tells, and its workers fail then (`exited`)
            log.warning("template_unreachable", program=template.program, gen=template.generation, error=str(exc))
            return
        template.outbox.pop(0)
        for fd in ends:  # the worker's copies travelled with the message
            os.close(fd)


def close(template: Template) -> None:
    for _data, ends, _fds in template.outbox:  # their workers fail as not forked when it is reaped
        for fd in ends:
            os.close(fd)
    template.outbox.clear()
    if template.control.fileno() >= 0:
        asyncio.get_running_loop().remove_reader(template.control.fileno())
        template.control.close()


def _not_forked(w: Worker, why: list[str]) -> NotForked:
    log.error("worker_not_forked", program=w.program, gen=w.generation, worker=w.index, why=why[0])
    w.tail.extend(why)
    w.status = EXIT_NOT_FORKED
    return NotForked(w)
