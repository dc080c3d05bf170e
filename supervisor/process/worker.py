"""One worker process: spawn it with its listeners as fds 3.., watch it through a pidfd, signal it.

A worker is `STARTING -> READY -> RETIRING -> EXITED`; a worker that ends while STARTING or READY
(unasked) ends FAILED. Transitions are methods here; the master decides when to call them.
"""

from __future__ import annotations

import collections
import enum
import errno
import os
import signal
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import psutil
import structlog

from supervisor.config.schema import OutputMode, Program
from supervisor.errors import SpawnError
from supervisor.system import accounts, listeners, procstat, readiness
from supervisor.system.listeners import Listener

log = structlog.get_logger()

STDERR_TAIL = 20  # stderr lines kept for the rollback report
# Bytes read from one of a worker's pipes (stdout, stderr) per wake-up of the master: each line is
# a log call (~25 us), so 1 KiB (at most 512 lines) keeps a worker that floods its output with
# newlines from holding the loop; it then waits on its pipe (64 KiB) at the master's pace.
PIPE_READ = 1024
PIPE_AT_EXIT = 1 << 20  # what is read at once from the pipe of a worker that has exited
MAX_LINE = 65536  # bytes of one output line; a longer one is cut and its rest skipped
CUT_MARK = b" [cut: line longer than 64 KiB]"
STREAMS = ("stdout", "stderr")
# A pipe that had more than PIPE_READ waiting is read again only after this many times as long as
# the look took (daemon/watcher.py, where the measurements are; preload templates the same).
OUTPUT_PACE = 3

# LISTEN_PID must be the worker's own pid, which posix_spawn cannot know in advance: a one-line
# shell sets it and execs, so the pid is the shell's and stays the worker's (as systemd does in
# its child after fork). "$1" is the working directory. Then setpriv (util-linux) sets the
# parent-death signal, so a worker dies with the master, and drops to the program's user and
# group; the prctl survives its exec (it is cleared only for set-user-ID programs).
_TRAMPOLINE = 'cd -- "$1" || exit 126; shift; {umask}LISTEN_PID=$$; export LISTEN_PID; exec "$@"'
_SHELL = "/bin/sh"
SETPRIV = "/usr/bin/setpriv"

# The master handles or ignores these; a worker starts with every one of them at its default.
_RESET_SIGNALS = (
    signal.SIGPIPE, signal.SIGXFSZ, signal.SIGHUP, signal.SIGTERM, signal.SIGINT, signal.SIGQUIT,
    signal.SIGUSR1, signal.SIGUSR2, signal.SIGTTIN, signal.SIGTTOU, signal.SIGCHLD,
)
# Variables that belong to the master's own supervisor (systemd), never to a worker.
_MASTER_ONLY_ENV = ("LISTEN_FDS", "LISTEN_PID", "LISTEN_FDNAMES", "NOTIFY_SOCKET", "WATCHDOG_USEC",
                    "WATCHDOG_PID", "MAINPID", "FDSTORE", "SUPERVISOR_FDSTORE")


class WorkerState(enum.Enum):
    STARTING = "starting"
    READY = "ready"
    RETIRING = "retiring"
    EXITED = "exited"
    FAILED = "failed"


@dataclass(eq=False)
class Pipe:
    """The master's read end of one of a worker's output streams, and the line begun on it."""

    stream: str  # "stdout" or "stderr"
    fd: int = -1  # -1 once closed, or never a pipe (`stdout: inherit`)
    partial: bytes = b""
    skipping: bool = False  # a line was cut: drop what comes up to its newline
    full: bool = False  # the last read took its whole budget: more is probably waiting

    def read(self, budget: int) -> list[str]:
        """What was written since the last look, as complete lines: at most `budget` bytes read
        (the master's reader fires again while more waits), so a worker that writes without pause
        waits on the pipe at the master's pace and the master's loop goes on.

        A line longer than MAX_LINE is cut there with CUT_MARK and the rest is skipped up to its
        newline, so what the master holds per pipe is bounded whatever the worker writes. At EOF
        (the worker and every child of it closed the stream) the pipe is closed.
        """
        chunks: list[bytes] = []
        self.full = False
        while self.fd >= 0 and budget > 0:
            try:
                chunk = os.read(self.fd, min(budget, 65536))
            except BlockingIOError:
                break
            except OSError as exc:
                if exc.errno == errno.EINTR:
                    continue
                break
            if not chunk:
                self.close()
                break
            chunks.append(chunk)
            budget -= len(chunk)
        self.full = budget <= 0
        lines = self.split(b"".join(chunks))
        if not lines:
            return []
        # One decode for all (a newline is never part of a UTF-8 sequence, so the lines split the
        # same): a dead worker's pipe may hold 32,768 lines, read in one step of the loop.
        text = b"\n".join(lines).decode(errors="replace")
        return [line.rstrip("\r") for line in text.split("\n")] if "\r" in text else text.split("\n")

    def split(self, data: bytes) -> list[bytes]:
        """`data` after what came before: the lines it completes (cut at MAX_LINE); at EOF the last one too."""
        lines: list[bytes] = []
        if data:
            *complete, rest = data.split(b"\n")  # each of `complete` was ended by a newline
            if complete:
                if self.skipping:  # the first one is the rest of a line that was cut
                    complete = complete[1:]
                    self.skipping = False
                else:
                    complete[0] = self.partial + complete[0]
                self.partial = b""
                lines = [line if len(line) <= MAX_LINE else line[:MAX_LINE] + CUT_MARK for line in complete]
            if not self.skipping:
                self.partial += rest
                if len(self.partial) > MAX_LINE:
                    lines.append(self.partial[:MAX_LINE] + CUT_MARK)
                    self.partial, self.skipping = b"", True
        if self.fd < 0 and self.partial:  # the last line of a closed pipe has no newline to wait for
            lines.append(self.partial)
            self.partial = b""
        return lines

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def to_json(self) -> dict[str, Any]:
        return {"fd": self.fd, "partial": self.partial.decode("latin-1"), "skipping": self.skipping}

    @classmethod
    def from_json(cls, stream: str, data: Mapping[str, Any]) -> Pipe:
        return cls(stream, data["fd"], data["partial"].encode("latin-1"), data.get("skipping", False))


@dataclass(eq=False)
class Worker:
    """A running (or finished) worker process and the master's copies of its listeners."""

    program: str
    generation: int
    index: int
    pid: int
    pidfd: int
    stderr: Pipe  # read end of the worker's stderr pipe
    listeners: list[Listener]
    stdout: Pipe = field(default_factory=lambda: Pipe("stdout"))  # closed (-1) with `stdout: inherit`
    started: float = field(default_factory=time.monotonic)
    state: WorkerState = WorkerState.STARTING
    ready_at: float | None = None
    status: int | None = None  # raw wait status once reaped
    stop_at: float | None = None  # retiring: when its stop signal is due (None once sent)
    kill_at: float | None = None  # retiring: when it is killed if still running (graceful_timeout)
    kept: bool = False  # its listeners stay open for the next master (fd store): never shut them
    doomed: bool = False  # preload: killed before its template forked it; killed once it has
    tail: collections.deque[str] = field(default_factory=lambda: collections.deque(maxlen=STDERR_TAIL))
    # Lines read from its pipes when it was reaped, for the watcher to log (a pipe is closed then).
    last_words: list[tuple[str, list[str]]] = field(default_factory=list)

    @property
    def alive(self) -> bool:
        return self.status is None

    def mark_ready(self) -> None:
        if self.state is WorkerState.STARTING:
            self.state = WorkerState.READY
            self.ready_at = time.monotonic()
            log.debug("worker_ready", program=self.program, gen=self.generation, worker=self.index,
                      pid=self.pid, ms=round((self.ready_at - self.started) * 1000))

    def shut(self) -> None:
        """Shut this worker's own listeners: with migration the kernel moves their queues to the group.
        Those it shares with its generation stay open for its siblings (their queue is theirs too)."""
        if self.kept:
            return
        for listener in self.listeners:
            if not listener.shared:
                listeners.shut(listener)

    def retire(self) -> None:
        """Shut the listeners and mark the worker on its way out; its stop signal comes with stop()."""
        self.shut()
        if self.alive:
            self.state = WorkerState.RETIRING

    def stop(self, signum: int) -> None:
        """Send the stop signal. Every signal goes out after the shut: a worker that exits at once
        must not close a listener that could still receive migrated connections."""
        self.shut()
        self.stop_at = None
        self.signal(signum)

    @property
    def forked(self) -> bool:
        """It has a process: spawned, or (preload) forked by its template; pid 0 until then."""
        return self.pid != 0

    def signal(self, signum: int) -> None:
        """Send a signal to the worker; a worker that is already gone is not an error."""
        if not self.alive:
            return
        if not self.forked:  # its listeners are shut already (stop, kill): it will not serve
            self.doomed = True
            return
        try:
            signal.pidfd_send_signal(self.pidfd, signum)
        except ProcessLookupError:
            pass

    def kill(self) -> None:
        """SIGKILL the worker and its whole process tree, also children that left its session."""
        if not self.alive:
            return
        self.shut()
        if not self.forked:  # never pid 0 to psutil or killpg: that is the master's own group
            self.doomed = True
            return
        try:
            tree = psutil.Process(self.pid).children(recursive=True)
        except psutil.Error:
            tree = []
        self.signal(signal.SIGKILL)
        kill_group(self.pid)
        for child in tree:
            try:
                child.kill()
            except psutil.Error:
                pass

    def reap(self) -> bool:
        """Collect the exit status if the process has ended; True once it has."""
        if not self.alive:
            return True
        try:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
        except ChildProcessError:
            pid, status = self.pid, 255 << 8
        if pid == 0:
            return False
        self.status = status
        self.state = WorkerState.EXITED if self.state is WorkerState.RETIRING else WorkerState.FAILED
        kill_group(self.pid)  # what it started in its session and left behind goes with it
        self.read_last_words()
        self.release()
        return True

    def abandon(self) -> None:
        """A preload worker its template never forked: ended, its listeners and pipes closed."""
        self.state = WorkerState.FAILED
        self.read_last_words()
        self.release()

    def read_last_words(self) -> None:
        """What is left in its pipes once it has ended (the rollback report quotes stderr's), kept in
        `last_words` until the watcher logs it."""
        for pipe in (self.stdout, self.stderr):
            if lines := self.read(pipe):
                self.last_words.append((pipe.stream, lines))

    def release(self) -> None:
        """Close the master's copies of its own listeners and its process handles (the worker is gone);
        the shared ones are its generation's to close."""
        for listener in self.listeners:
            if listener.shared:
                continue
            if self.kept:
                listener.sock.close()  # the fd store keeps it open and listening for the next master
            else:
                listeners.close(listener)
        self.listeners = []
        if self.pidfd >= 0:
            os.close(self.pidfd)
            self.pidfd = -1
        self.stderr.close()
        self.stdout.close()

    def read_stderr(self) -> list[str]:
        return self.read(self.stderr)

    def read(self, pipe: Pipe) -> list[str]:
        """What the worker wrote on `pipe` since the last look, as complete lines (Pipe.read); at most
        PIPE_READ bytes while it runs, what is left (up to PIPE_AT_EXIT) once it has exited. The last
        stderr lines are kept for the rollback report."""
        lines = pipe.read(PIPE_READ if self.alive else PIPE_AT_EXIT)
        if pipe is self.stderr:
            self.tail.extend(lines)
        return lines

    def describe_exit(self) -> str:
        return describe_status(self.status)

    def rss(self) -> int | None:
        """Resident memory in bytes, None once it is gone."""
        used = procstat.usage(self.pid) if self.forked else None
        return used.rss if used else None

    def to_json(self) -> dict[str, Any]:
        """Plain data; the process and its fds are referenced by pid and fd number."""
        return {"program": self.program, "generation": self.generation, "index": self.index, "pid": self.pid,
                "pidfd": self.pidfd, "stderr": self.stderr.to_json(), "stdout": self.stdout.to_json(),
                # The shared ones are written once, by the generation, which hands them back to each worker.
                "listeners": [s.to_json() for s in self.listeners if not s.shared],
                "started": self.started, "state": self.state.value, "ready_at": self.ready_at,
                "status": self.status, "stop_at": self.stop_at, "kill_at": self.kill_at, "kept": self.kept,
                "tail": list(self.tail)}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Worker:
        stderr = data["stderr"]
        if isinstance(stderr, int):  # written by a version that captured stderr only
            stderr = {"fd": stderr, "partial": data["partial"], "skipping": data.get("skipping", False)}
        stdout = data.get("stdout", {"fd": -1, "partial": ""})
        return cls(program=data["program"], generation=data["generation"], index=data["index"], pid=data["pid"],
                   pidfd=data["pidfd"], stderr=Pipe.from_json("stderr", stderr),
                   stdout=Pipe.from_json("stdout", stdout),
                   listeners=[Listener.from_json(s) for s in data["listeners"]], started=data["started"],
                   state=WorkerState(data["state"]), ready_at=data["ready_at"], status=data["status"],
                   stop_at=data.get("stop_at"), kill_at=data.get("kill_at"), kept=data.get("kept", False),
                   tail=collections.deque(data["tail"], maxlen=STDERR_TAIL))


class Spawner:
    """Starts workers for real: fresh listeners that join the reuseport groups, then the process."""

    def __init__(self, notify_socket: str, groups: listeners.Groups) -> None:
        self.notify_socket = notify_socket
        self.groups = groups

    def listen(self, program: Program, backlog: int | None = None) -> list[Listener]:
        """One fresh listener per listen address of the program, each a new member of its group, with the
        program's backlog or `backlog` (a generation's shared listener: generation.shared_backlog)."""
        socks: list[Listener] = []
        try:
            for n, listen in enumerate(program.listen):
                socks.append(self.groups.open(listen, f"{program.name}.{n}", backlog or program.backlog))
        except BaseException:
            for sock in socks:
                listeners.close(sock)
            raise
        return socks

    def spawn(self, program: Program, generation: int, index: int, shared: list[Listener] | None = None) -> Worker:
        """A worker on `shared` (its generation's listeners), or on fresh listeners of its own."""
        if program.user is not None:  # before it exists: its READY=1 must not find the socket closed
            readiness.admit(self.notify_socket, accounts.account(program.user).pw_uid)
        socks = shared if shared is not None else self.listen(program)
        try:
            return spawn(program, generation, index, socks, self.notify_socket, program.cwd)
        except BaseException:
            for sock in socks:
                if not sock.shared:
                    listeners.close(sock)
            raise


def kill_group(pgid: int) -> None:
    """SIGKILL a worker's process group (it leads its own session: setsid at spawn)."""
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def describe_status(status: int | None) -> str:
    """'exit status 3', 'killed by SIGKILL' or 'running'."""
    if status is None:
        return "running"
    if os.WIFSIGNALED(status):
        return f"killed by {signal.Signals(os.WTERMSIG(status)).name}"
    return f"exit status {os.waitstatus_to_exitcode(status)}"


def spawn(program: Program, generation: int, index: int, socks: list[Listener], notify_socket: str,
          cwd: str, base_env: Mapping[str, str] | None = None, extra_fds: Iterable[int] = (),
          stdout_to_stderr: bool = False) -> Worker:
    """Start one worker: its listeners become fds 3.., with the socket-activation variables (then
    `extra_fds`, as a preload template's protocol socket). Its stderr, and its stdout unless the
    program says `stdout: inherit`, are pipes to the master (`stdout_to_stderr`: one pipe for both,
    as a preload template's own output is).

    posix_spawn (vfork+exec in glibc) instead of fork: the master runs an event loop, and nothing
    but exec may happen in its child (a fork inside a running event loop is unsafe).
    """
    env = {k: v for k, v in (os.environ if base_env is None else base_env).items()
           if k not in _MASTER_ONLY_ENV}
    env.update(program.env)
    if program.user is not None:
        user = accounts.account(program.user)
        env.update(USER=user.pw_name, LOGNAME=user.pw_name, HOME=user.pw_dir)
    command = tls_command(program)
    if program.tls is not None:
        env.update(SUPERVISOR_TLS_CERT=program.tls.cert, SUPERVISOR_TLS_KEY=program.tls.key)
    env.update(NOTIFY_SOCKET=notify_socket, **socket_env(program, generation, index, socks))
    stderr, stdout = Pipe("stderr"), Pipe("stdout")
    write_ends: list[int] = []
    devnull = -1
    try:
        stderr.fd, write_err = pipe_to_master(write_ends)
        write_out = 1  # inherited: supervisord's own stdout
        if program.stdout is OutputMode.LOG and stdout_to_stderr:
            write_out = write_err
        elif program.stdout is OutputMode.LOG:
            stdout.fd, write_out = pipe_to_master(write_ends)
        devnull = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
        actions = _fd_actions([*(s.fileno() for s in socks), *extra_fds], devnull, write_err, write_out)
        umask = f"umask {program.umask:03o}; " if program.umask is not None else ""
        argv = [_SHELL, "-c", _TRAMPOLINE.format(umask=umask), program.name, cwd, *privileges(program), *command]
        try:
            pid = os.posix_spawn(_SHELL, argv, env, file_actions=actions, setsid=True,
                                 setsigdef=_RESET_SIGNALS, setsigmask=())
        except OSError as exc:
            raise SpawnError(f"{program.name}: cannot start worker {index}: {exc}") from None
        pidfd = os.pidfd_open(pid)
    except BaseException:
        stderr.close()
        stdout.close()
        raise
    finally:
        for fd in write_ends:
            os.close(fd)
        if devnull >= 0:
            os.close(devnull)
    return Worker(program=program.name, generation=generation, index=index, pid=pid, pidfd=pidfd,
                  stderr=stderr, stdout=stdout, listeners=list(socks))


def pipe_to_master(write_ends: list[int]) -> tuple[int, int]:
    """A pipe from a worker to the master: (read end, write end). The master's read end is
    non-blocking; the worker's write end blocks (a worker that writes faster than the master reads
    waits) and is appended to `write_ends`, closed once the worker has its copy."""
    read_end, write_end = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
    os.set_blocking(write_end, True)
    write_ends.append(write_end)
    return read_end, write_end


def tls_command(program: Program) -> tuple[str, ...]:
    """The command with its `{tls.cert}`/`{tls.key}` placeholders replaced."""
    if program.tls is None:
        return program.command
    return tuple(arg.replace("{tls.cert}", program.tls.cert).replace("{tls.key}", program.tls.key)
                 for arg in program.command)


def backlog_of(program: Program, socks: list[Listener]) -> int:
    """The backlog a worker's listeners have, which a server that calls listen() again must keep: a
    shared listener's as the kernel holds it (generation.shared_backlog, capped by somaxconn)."""
    shared = next((sock for sock in socks if sock.shared), None)
    if shared is None:
        return program.backlog
    try:
        return listeners.tcp_queue(shared.sock)[1]
    except OSError:  # shut meanwhile: the spawn fails on it anyway
        return program.backlog


def socket_env(program: Program, generation: int, index: int, socks: list[Listener]) -> dict[str, str]:
    """What tells a worker its listeners (fds 3..) and who it is; set per worker."""
    return {"LISTEN_FDS": str(len(socks)), "LISTEN_FDNAMES": ":".join(s.name for s in socks),
            "SUPERVISOR_PROGRAM": program.name, "SUPERVISOR_GENERATION": str(generation),
            "SUPERVISOR_WORKER": str(index), "SUPERVISOR_BACKLOG": str(backlog_of(program, socks)),
            "SUPERVISOR_GRACEFUL_TIMEOUT": f"{program.graceful_timeout:g}"}


def privileges(program: Program) -> list[str]:
    """The setpriv prefix: parent-death signal always, user and group when the program names them.

    The parent-death signal is the program's stop signal: however the master dies, its workers
    finish what they accepted (systemd's KillMode=mixed and TimeoutStopSec= bound the stragglers).
    """
    argv = [SETPRIV, "--pdeathsig", program.stop_signal.name.removeprefix("SIG")]
    if program.user is not None:
        # The user's primary group unless one is named; supplementary groups from /etc/group.
        argv += [f"--reuid={program.user}", f"--regid={program.group or accounts.account(program.user).pw_gid}",
                 "--init-groups"]
    elif program.group is not None:
        argv += [f"--regid={program.group}", "--clear-groups"]
    return [*argv, "--"]


def _fd_actions(fds: Iterable[int], stdin: int, stderr: int, stdout: int = 1) -> list[tuple[int, ...]]:
    """posix_spawn file actions that place `fds` at 3, 4, ... in the child (and stdin, stdout, stderr).

    A source fd may itself sit in 3..3+n, so every source is first copied above all of them, then
    moved down; dup2 clears FD_CLOEXEC on the copies, so the parked ones are closed again.
    """
    fds = list(fds)
    park = max([*fds, stdin, stderr, stdout, 2 + len(fds)]) + 1
    actions: list[tuple[int, ...]] = [(os.POSIX_SPAWN_DUP2, stdin, 0), (os.POSIX_SPAWN_DUP2, stderr, 2)]
    if stdout != 1:  # 1: the master's own, inherited as it is
        actions.append((os.POSIX_SPAWN_DUP2, stdout, 1))
    actions += [(os.POSIX_SPAWN_DUP2, fd, park + i) for i, fd in enumerate(fds)]
    actions += [(os.POSIX_SPAWN_DUP2, park + i, 3 + i) for i in range(len(fds))]
    actions += [(os.POSIX_SPAWN_CLOSE, park + i) for i in range(len(fds))]
    return actions
