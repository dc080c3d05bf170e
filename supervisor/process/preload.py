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

A spare (`preload_spare`, on by default): once a generation serves, the next generation's template
is started ahead, idle, under the key (program, SPARE). A reload adopts it only when it is proven
current: started with the same program settings (`unfit`), and the files its imports read are
unchanged (it is asked `check` and answers; the forks wait for that answer, the master never
blocks). A stale spare is discarded and a fresh template started as without one; the forks asked
meanwhile go to the fresh one. A discarded template is kept under a negative generation until it
has exited, so that its wake-ups still find it.
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
SPARE = 0  # the generation a spare template is kept under until a generation adopts it (numbers start at 1)


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
    config: Program | None = None  # the settings it was started with (a spare is adopted only if they fit)
    files: int | None = None  # the files its imports read, as it stamped them once ready
    # A spare adopted by a generation, asked whether its files are unchanged: the forks wait for the answer.
    proving: Program | None = None  # what the generation wants, to start a fresh template if it is stale
    asked_at: float = 0.0

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
        self.newest: dict[str, int] = {}  # the last generation number each program started a template for
        self.ids = itertools.count(1)

    def listen(self, program: Program, backlog: int | None = None) -> list[Listener]:
        return self.spawner.listen(program, backlog)

    def spawn(self, program: Program, generation: int, index: int, shared: list[Listener] | None = None) -> Worker:
        if not program.preload:
            return self.spawner.spawn(program, generation, index, shared)
        template = self.running.get((program.name, generation))
        if template is None or not template.alive:
            # Only a new generation takes the spare: a serving one whose template died starts its own.
            new = generation > self.newest.get(program.name, 0)
            template = (new and self.adopt_spare(program, generation)) or self.start(program, generation)
            self.newest[program.name] = max(generation, self.newest.get(program.name, 0))
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
            template.outbox.append((json.dumps(fork_request(program, generation, index, socks, fork_id)).encode(),
                                    ends, [s.fileno() for s in socks]))
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
        template = Template(program.name, generation, process, mine, log_limit=program.log_limit, config=program)
        self.running[(program.name, generation)] = template
        for what, fd in (("message", mine.fileno()), ("exited", process.pidfd), ("output", process.stderr.fd)):
            self._once(fd, what, template)
        log.info("template_started", program=program.name, gen=generation, pid=process.pid,
                 preload=list(program.preload), spare=generation == SPARE)
        return template

    # -- the spare ------------------------------------------------------------------------------------

    def spare(self, name: str) -> Template | None:
        return self.running.get((name, SPARE))

    def keep_spare(self, name: str, program: Program | None) -> None:
        """The next generation of `name` gets a spare started with `program` (the serving generation's
        settings); None: it gets none (the program stopped, `preload_spare: false`, a shutdown). A spare
        that no longer fits is discarded; a failed start is logged, the next reload starts as without."""
        spare = self.spare(name)
        if spare is not None and (program is None or not spare.alive or unfit(spare.config, program)):
            self.discard(spare)
            spare = None
        if spare is None and program is not None:
            try:
                self.start(program, SPARE)
            except (OSError, SpawnError) as exc:
                log.error("template_spare_failed", program=name, error=str(exc))

    def adopt_spare(self, program: Program, generation: int) -> Template | None:
        """The program's spare becomes `generation`'s template if its settings fit; it is then asked
        whether its files are unchanged, and forks nothing before it answers (`read`)."""
        spare = self.spare(program.name)
        if spare is None or not spare.alive:
            return None
        if why := unfit(spare.config, program):
            log.info("template_spare_unfit", program=program.name, gen=generation, pid=spare.process.pid, why=why)
            self.discard(spare)
            return None
        try:
            spare.control.send(json.dumps({"check": generation}).encode())
        except OSError as exc:  # it died: its pidfd tells
            log.warning("template_unreachable", program=program.name, gen=SPARE, error=str(exc))
            self.discard(spare)
            return None
        self._key(spare, generation)
        spare.proving, spare.asked_at, spare.log_limit = program, time.monotonic(), program.log_limit
        return spare

    def discard(self, template: Template) -> None:
        """A template no generation forks from: it exits on EOF (or is killed while importing); kept
        under a negative generation until it is reaped."""
        self._key(template, -next(self.ids))
        template.retiring = True
        if template.ready_ms is None:
            template.process.kill()
        else:
            close(template)

    def _key(self, template: Template, generation: int) -> None:
        if self.running.get(template.key) is template:
            del self.running[template.key]
        template.generation = generation
        self.running[template.key] = template

    def _proven(self, template: Template, changed: list[str]) -> list[Answer]:
        """The adopted spare's answer: its files are unchanged (it forks the waiting workers), or it is
        discarded and a fresh template gets them."""
        wanted, template.proving = template.proving, None
        assert wanted is not None
        if template.retiring:  # its generation ended meanwhile (retire): what it was asked for is not needed
            return self._unasked(template)
        fields = {"program": template.program, "gen": template.generation, "pid": template.process.pid,
                  "check_ms": round((time.monotonic() - template.asked_at) * 1000, 1)}
        if not changed:
            log.info("template_spare_used", **fields, files=template.files)
            send(template)
            return []
        log.info("template_spare_stale", **fields, changed=changed)
        return self._fresh(template, wanted)

    def _unasked(self, template: Template) -> list[Answer]:
        """A retiring spare that never answered its check: the forks it was never sent fail, it exits."""
        answers: list[Answer] = [_not_forked(w, ["its generation ended before its spare template answered"])
                                 for w in template.pending.values()]
        template.pending.clear()
        close(template)
        return answers

    def _fresh(self, old: Template, program: Program) -> list[Answer]:
        """A fresh template for `old`'s generation takes over the forks `old` was asked for and never got."""
        outbox, pending, old.outbox, old.pending = old.outbox, old.pending, [], {}
        generation = old.generation
        self.discard(old)
        try:
            fresh = self.start(program, generation)
        except (OSError, SpawnError) as exc:
            for _data, ends, _fds in outbox:
                for fd in ends:
                    os.close(fd)
            failed: list[Answer] = [_not_forked(w, [f"its preload template could not start: {exc}"])
                                    for w in pending.values()]
            return failed
        fresh.outbox, fresh.pending = outbox, pending
        send(fresh)
        return []

    def retire(self, program: str, generation: int) -> list[Answer]:
        """The generation forks no more: once every fork asked for is answered, the socket is closed and
        the template exits on its EOF. One that has not finished its imports forks nothing: killed.
        Returns the answers that were waiting (its "ready" may be among them: it may have forked since)."""
        template = self.running.get((program, generation))
        if template is None or template.retiring:
            return []
        template.retiring = True
        answers = self.read(template)
        if template.proving is not None:
            template.proving = None
            answers += self._unasked(template)
        elif template.ready_ms is None:
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
                template.ready_ms, template.files = answer["ready"], answer.get("files")
                log.info("template_ready", program=template.program, gen=template.generation,
                         pid=template.process.pid, import_ms=answer["ready"], files=template.files)
                continue
            if "checked" in answer:
                if template.proving is not None:
                    answers += self._proven(template, answer["changed"])
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
        answers: list[Answer] = []
        if template.proving is not None:  # an adopted spare died before it answered: a fresh one forks
            wanted, template.proving = template.proving, None
            answers = self._unasked(template) if template.retiring else self._fresh(template, wanted)
        close(template)
        if self.running.get(template.key) is template:
            del self.running[template.key]
        self.output(template)
        say = log.info if not template.pending and process.status == 0 else log.error
        say("template_exited", program=template.program, gen=template.generation, pid=process.pid,
            status=process.describe_exit(), not_forked=len(template.pending))
        why = [f"its preload template (pid {process.pid}) {process.describe_exit()}; it wrote:", *process.tail]
        answers += [_not_forked(w, why) for w in template.pending.values()]
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
    The rest go as the template answers (`message`): each request it reads gets an answer. An adopted
    spare gets none before it has answered its check (Templates._proven)."""
    while template.proving is None and template.outbox and template.control.fileno() >= 0:
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


def fork_request(program: Program, generation: int, index: int, socks: list[Listener],
                 fork_id: int) -> dict[str, object]:
    """What a template is told to fork one worker with: its environment and the command's arguments,
    both the generation's own (its TLS copies), so that a spare started for another can fork it."""
    main = schema.python_main(worker.tls_command(program))
    assert main is not None, "config refuses preload without a Python command"
    env = worker.socket_env(program, generation, index, socks)
    if program.tls is not None:
        env.update(SUPERVISOR_TLS_CERT=program.tls.cert, SUPERVISOR_TLS_KEY=program.tls.key)
    return {"fork": fork_id, "env": env, "stdout": program.stdout is OutputMode.LOG, "args": list(main[2])}


# What a template's process is made of: a spare started with other values than these cannot serve.
TEMPLATE_SETTINGS = ("command", "preload", "env", "cwd", "user", "group", "umask", "stop_signal", "stdout")


def unfit(started: Program | None, wanted: Program) -> str | None:
    """Why a template started with `started` cannot fork `wanted`'s workers, or None if it can. The
    command's arguments and TLS paths travel with each fork; whether there is TLS at all does not
    (the template's own environment has its variables or not)."""
    if started is None:
        return "its settings are unknown"
    for name in TEMPLATE_SETTINGS:
        if getattr(started, name) != getattr(wanted, name):
            return f"{name} changed"
    if (started.tls is None) != (wanted.tls is None):
        return "tls changed"
    return None


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
