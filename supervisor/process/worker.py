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

from supervisor.config.schema import Program
from supervisor.errors import SpawnError
from supervisor.system import accounts, listeners, readiness
from supervisor.system.listeners import Listener

log = structlog.get_logger()

STDERR_TAIL = 20  # lines kept for the rollback report
# Bytes read from a worker's stderr per wake-up of the master: each line is a log call (~50 us), so
# 1 KiB (at most 512 lines) keeps a worker that floods its stderr with newlines from holding the
# loop; it then waits on its pipe (64 KiB) at the master's pace.
STDERR_READ = 1024
STDERR_AT_EXIT = 1 << 20  # what is read at once from the pipe of a worker that has exited
MAX_LINE = 65536  # bytes of one stderr line; a longer one is cut and its rest skipped
CUT_MARK = b" [cut: line longer than 64 KiB]"

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
class Worker:
    """A running (or finished) worker process and the master's copies of its listeners."""

    program: str
    generation: int
    index: int
    pid: int
    pidfd: int
    stderr: int  # read end of the worker's stderr pipe, -1 once closed
    listeners: list[Listener]
    started: float = field(default_factory=time.monotonic)
    state: WorkerState = WorkerState.STARTING
    ready_at: float | None = None
    status: int | None = None  # raw wait status once reaped
    stop_at: float | None = None  # retiring: when its stop signal is due (None once sent)
    kill_at: float | None = None  # retiring: when it is killed if still running (graceful_timeout)
    kept: bool = False  # its listeners stay open for the next master (fd store): never shut them
    doomed: bool = False  # preload: killed before its template forked it; killed once it has
    tail: collections.deque[str] = field(default_factory=lambda: collections.deque(maxlen=STDERR_TAIL))
    _partial: bytes = b""
    _skipping: bool = False  # a line was cut: drop what comes up to its newline

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
        """Shut this worker's listeners: with migration the kernel moves their queues to the group."""
        if self.kept:
            return
        for listener in self.listeners:
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
        self.read_stderr()
        self.release()
        return True

    def abandon(self) -> None:
        """A preload worker its template never forked: ended, its listeners and stderr closed."""
        self.state = WorkerState.FAILED
        self.read_stderr()
        self.release()

    def release(self) -> None:
        """Close the master's listener copies and process handles (the worker is gone)."""
        for listener in self.listeners:
            if self.kept:
                listener.sock.close()  # the fd store keeps it open and listening for the next master
            else:
                listeners.close(listener)
        self.listeners = []
        if self.pidfd >= 0:
            os.close(self.pidfd)
            self.pidfd = -1
        if self.stderr >= 0:
            os.close(self.stderr)
            self.stderr = -1

    def read_stderr(self) -> list[str]:
        """What the worker wrote since the last look, as complete lines; the last ones are kept.

        At most STDERR_READ bytes per call (the master's reader fires again while more waits): a
        worker that writes without pause then waits on the pipe at the master's pace, and the
        master's loop goes on.
        A line longer than MAX_LINE is cut there with CUT_MARK and the rest is skipped up to its
        newline, so what the master holds per worker is bounded whatever the worker writes.
        """
        # A worker that has exited: what is left in its pipe (its last words, for the rollback
        # report), up to STDERR_AT_EXIT; its pipe is closed right after.
        budget = STDERR_READ if self.alive else STDERR_AT_EXIT
        chunks: list[bytes] = []
        while self.stderr >= 0 and budget > 0:
            try:
                chunk = os.read(self.stderr, min(budget, 65536))
            except BlockingIOError:
                break
            except OSError as exc:
                if exc.errno == errno.EINTR:
                    continue
                break
            if not chunk:  # EOF: the worker and every child of it closed their stderr
                os.close(self.stderr)
                self.stderr = -1
                break
            chunks.append(chunk)
            budget -= len(chunk)
        data = b"".join(chunks)
        lines: list[bytes] = []
        if data:
            *complete, rest = data.split(b"\n")
            for piece in complete:  # each one ended by a newline
                if self._skipping:  # the rest of a line that was cut
                    self._skipping = False
                else:
                    line = self._partial + piece
                    lines.append(line[:MAX_LINE] + CUT_MARK if len(line) > MAX_LINE else line)
                self._partial = b""
            if not self._skipping:
                self._partial += rest
                if len(self._partial) > MAX_LINE:
                    lines.append(self._partial[:MAX_LINE] + CUT_MARK)
                    self._partial, self._skipping = b"", True
        if self.stderr < 0 and self._partial:  # the last line of a dead worker has no newline to wait for
            lines.append(self._partial)
            self._partial = b""
        text = [line.decode(errors="replace").rstrip("\r") for line in lines]
        self.tail.extend(text)
        return text

    def describe_exit(self) -> str:
        return describe_status(self.status)

    def rss(self) -> int | None:
        """Resident memory in bytes, None once it is gone."""
        if not self.forked:
            return None
        try:
            return int(psutil.Process(self.pid).memory_info().rss)
        except psutil.Error:
            return None

    def to_json(self) -> dict[str, Any]:
        """Plain data; the process and its fds are referenced by pid and fd number."""
        return {"program": self.program, "generation": self.generation, "index": self.index, "pid": self.pid,
                "pidfd": self.pidfd, "stderr": self.stderr, "listeners": [s.to_json() for s in self.listeners],
                "started": self.started, "state": self.state.value, "ready_at": self.ready_at,
                "status": self.status, "stop_at": self.stop_at, "kill_at": self.kill_at, "kept": self.kept,
                "tail": list(self.tail), "partial": self._partial.decode("latin-1"),
                "skipping": self._skipping}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Worker:
        return cls(program=data["program"], generation=data["generation"], index=data["index"], pid=data["pid"],
                   pidfd=data["pidfd"], stderr=data["stderr"],
                   listeners=[Listener.from_json(s) for s in data["listeners"]], started=data["started"],
                   state=WorkerState(data["state"]), ready_at=data["ready_at"], status=data["status"],
                   stop_at=data.get("stop_at"), kill_at=data.get("kill_at"), kept=data.get("kept", False),
                   tail=collections.deque(data["tail"], maxlen=STDERR_TAIL),
                   _partial=data["partial"].encode("latin-1"), _skipping=data.get("skipping", False))


class Spawner:
    """Starts workers for real: fresh listeners that join the reuseport groups, then the process."""

    def __init__(self, notify_socket: str, groups: listeners.Groups) -> None:
        self.notify_socket = notify_socket
        self.groups = groups

    def spawn(self, program: Program, generation: int, index: int) -> Worker:
        if program.user is not None:  # before it exists: its READY=1 must not find the socket closed
            readiness.admit(self.notify_socket, accounts.account(program.user).pw_uid)
        socks: list[Listener] = []
        try:
            for n, listen in enumerate(program.listen):
                socks.append(self.groups.open(listen, f"{program.name}.{n}", program.backlog))
            return spawn(program, generation, index, socks, self.notify_socket, program.cwd)
        except BaseException:
            for sock in socks:
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
          cwd: str, base_env: Mapping[str, str] | None = None, extra_fds: Iterable[int] = ()) -> Worker:
    """Start one worker: its listeners become fds 3.., with the socket-activation variables (then
    `extra_fds`, as a preload template's protocol socket).

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
    read_end, write_end = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
    os.set_blocking(write_end, True)
    devnull = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
    try:
        actions = _fd_actions([*(s.fileno() for s in socks), *extra_fds], devnull, write_end)
        umask = f"umask {program.umask:03o}; " if program.umask is not None else ""
        argv = [_SHELL, "-c", _TRAMPOLINE.format(umask=umask), program.name, cwd, *privileges(program), *command]
        try:
            pid = os.posix_spawn(_SHELL, argv, env, file_actions=actions, setsid=True,
                                 setsigdef=_RESET_SIGNALS, setsigmask=())
        except OSError as exc:
            raise SpawnError(f"{program.name}: cannot start worker {index}: {exc}") from None
        pidfd = os.pidfd_open(pid)
    except BaseException:
        os.close(read_end)
        raise
    finally:
        os.close(write_end)
        os.close(devnull)
    return Worker(program=program.name, generation=generation, index=index, pid=pid, pidfd=pidfd,
                  stderr=read_end, listeners=socks)


def tls_command(program: Program) -> tuple[str, ...]:
    """The command with its `{tls.cert}`/`{tls.key}` placeholders replaced."""
    if program.tls is None:
        return program.command
    return tuple(arg.replace("{tls.cert}", program.tls.cert).replace("{tls.key}", program.tls.key)
                 for arg in program.command)


def socket_env(program: Program, generation: int, index: int, socks: list[Listener]) -> dict[str, str]:
    """What tells a worker its listeners (fds 3..) and who it is; set per worker."""
    return {"LISTEN_FDS": str(len(socks)), "LISTEN_FDNAMES": ":".join(s.name for s in socks),
            "SUPERVISOR_PROGRAM": program.name, "SUPERVISOR_GENERATION": str(generation),
            "SUPERVISOR_WORKER": str(index), "SUPERVISOR_BACKLOG": str(program.backlog),
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


def _fd_actions(fds: Iterable[int], stdin: int, stderr: int) -> list[tuple[int, ...]]:
    """posix_spawn file actions that place `fds` at 3, 4, ... in the child.

    A source fd may itself sit in 3..3+n, so every source is first copied above all of them, then
    moved down; dup2 clears FD_CLOEXEC on the copies, so the parked ones are closed again.
    """
    fds = list(fds)
    park = max([*fds, stdin, stderr, 2 + len(fds)]) + 1
    actions: list[tuple[int, ...]] = [(os.POSIX_SPAWN_DUP2, stdin, 0), (os.POSIX_SPAWN_DUP2, stderr, 2)]
    actions += [(os.POSIX_SPAWN_DUP2, fd, park + i) for i, fd in enumerate(fds)]
    actions += [(os.POSIX_SPAWN_DUP2, park + i, 3 + i) for i in range(len(fds))]
    actions += [(os.POSIX_SPAWN_CLOSE, park + i) for i in range(len(fds))]
    return actions
