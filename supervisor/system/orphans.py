"""Processes the master did not start: workers' descendants that left them, reparented to the master.

The master is a subreaper (`reaper.become_subreaper`): a process that leaves a worker's session and
outlives its parent (a double fork, `setsid`, a daemon) becomes the master's child instead of PID 1's,
and so does everything a container's PID 1 inherits. Such an orphan is
- reaped as soon as it exits (the master gets SIGCHLD): no zombies;
- killed once the worker it came from is gone (exit, crash, reload, recycling): an escaped process
  that keeps a listener's fd can call listen() again on the shut socket and rejoin the reuseport
  group, where connections would wait for nobody;
- killed when the master stops, whatever it came from.
Which worker it came from is read from its environment: every worker starts with LISTEN_PID set to
its own pid, and its descendants inherit it. One whose environment does not say (it was cleared) is
kept until the master stops.

As a subreaper, only descendants of the master's own children can become its children. As PID 1 (a
container), every orphan of the namespace does, whoever started it, and anyone can write LISTEN_PID
into their environment. So there the environment alone is not enough: an orphan is killed for its
worker only if the kernel agrees that it came from there, when it is adopted (while its worker still
lives): it is still in that worker's session, or it holds a socket of the master's (a listener fd,
the threat above). Other orphans are spared (`orphan_spared`), reaped when they exit, and killed only
when the master stops.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import Callable, Collection
from dataclasses import dataclass

import psutil
import structlog

from supervisor.system import holders, reaper

log = structlog.get_logger()

MAX_ENVIRON = 256 * 1024  # bytes of an orphan's environment read to find LISTEN_PID
MAX_FDS = 4096  # fds of an orphan looked at for a socket of the master's
MAX_PID_DIGITS = 10  # pid_max is at most 2^22 (7 digits): a longer LISTEN_PID names no process
STOP_WAIT = 1.0  # seconds the master waits, when it stops, for the orphans it killed to be reaped


@dataclass
class Orphan:
    pid: int
    owner: int | None  # the pid of the worker it descends from (its LISTEN_PID); None if unknown
    command: str
    killed: bool = False
    proven: bool = True  # the kernel agrees it came from its worker (always, unless the master is PID 1)
    spared: bool = False  # said once: PID 1 leaves it alone


class Orphans:
    """The master's record of the children it did not start; `ours` are the ones it did."""

    def __init__(self, post: Callable[[], None]) -> None:
        self.known: dict[int, Orphan] = {}
        self._post = post
        self._posted = False
        self._signals = -1  # SIGCHLD as a signalfd, while the loop runs

    def open(self, loop: asyncio.AbstractEventLoop) -> None:
        self._signals = reaper.child_signals()
        loop.add_reader(self._signals, self._child_signal)

    def close(self, loop: asyncio.AbstractEventLoop) -> None:
        if self._signals >= 0:
            loop.remove_reader(self._signals)
            os.close(self._signals)
            self._signals = -1

    def _child_signal(self) -> None:
        """SIGCHLD: one check on the queue at a time, however many signals come (a flood of exits)."""
        reaper.drain(self._signals)
        if not self._posted:
            self._posted = True
            self._post()

    def check(self, ours: Collection[int], live_workers: Collection[int], hold: bool = False) -> None:
        """Reap the orphans that exited, adopt new ones, kill those whose worker is gone. Only once the
        loop runs (open()): a master driven by the unit tests' fake spawner has no processes of its own."""
        self._posted = False
        if self._signals < 0 or hold:  # hold: a child may be ours before we know its pid; look later
            return
        current = children()
        ours_now: set[int] | None = None  # the master's sockets, read once if an adoption needs them
        for pid in current - set(ours):
            if reap(pid):
                gone = self.known.pop(pid, None)
                log.info("orphan_reaped", pid=pid, owner=gone.owner if gone else None,
                         command=gone.command if gone else None)
                continue
            orphan = self.known.get(pid)
            if orphan is None:
                orphan = self.known[pid] = adopt(pid)
                if os.getpid() == 1 and orphan.owner is not None:
                    ours = holders.own_inodes() if ours_now is None else ours_now
                    ours_now, orphan.proven = ours, descends(orphan, ours)
                log.info("orphan_adopted", pid=pid, owner=orphan.owner, command=orphan.command, proven=orphan.proven)
            if orphan.owner is not None and orphan.owner not in live_workers and not orphan.proven:
                if not orphan.spared:
                    orphan.spared = True
                    log.info("orphan_spared", pid=pid, owner=orphan.owner, command=orphan.command,
                             reason="PID 1: nothing but its environment says it came from a worker")
            elif orphan.owner is not None and orphan.owner not in live_workers and not orphan.killed:
                log.warning("orphan_killed", pid=pid, owner=orphan.owner, command=orphan.command,
                            reason=f"worker (pid {orphan.owner}) it came from is gone")
                kill(orphan)
        for pid in set(self.known) - current:
            del self.known[pid]

    def stop(self, ours: Collection[int]) -> None:
        """The master stops (after close()): kill every orphan left and reap them (at most STOP_WAIT), and theirs."""
        deadline = time.monotonic() + STOP_WAIT
        while time.monotonic() < deadline:
            left = children() - set(ours)
            if not left:
                return
            for pid in left:
                if not reap(pid):
                    orphan = self.known.get(pid) or adopt(pid)
                    if not orphan.killed:
                        log.warning("orphan_killed", pid=pid, owner=orphan.owner, command=orphan.command,
                                    reason="supervisord stops")
                        kill(orphan)
                    self.known[pid] = orphan
            time.sleep(0.01)
        log.error("orphans_left", pids=sorted(children() - set(ours)))


def children() -> set[int]:
    """The pids of this process's children, zombies included."""
    pids: set[int] = set()
    try:
        tasks = os.listdir("/proc/self/task")
        for task in tasks:
            with open(f"/proc/self/task/{task}/children", "rb") as f:
                pids.update(int(p) for p in f.read().split())
    except FileNotFoundError:  # a kernel without CONFIG_PROC_CHILDREN
        return {p.pid for p in psutil.Process().children()}
    return pids


def reap(pid: int) -> bool:
    """Collect an exited child's status; True if it had exited."""
    try:
        done, _status = os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        return True
    return done == pid


def adopt(pid: int) -> Orphan:
    """What the master knows of a new orphan: which worker it came from, and its command line."""
    owner: int | None = None
    try:
        with open(f"/proc/{pid}/environ", "rb") as f:
            environ = f.read(MAX_ENVIRON)
        for entry in environ.split(b"\0"):
            # Bounded: a crafted value (5,000 digits: int() refuses more than 4,300) is no owner at all.
            if entry.startswith(b"LISTEN_PID=") and entry[11:].isdigit() and len(entry) <= 11 + MAX_PID_DIGITS:
                owner = int(entry[11:])
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            command = f.read(200).replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        command = "?"
    return Orphan(pid=pid, owner=owner, command=command)


def descends(orphan: Orphan, sockets: set[int]) -> bool:
    """What the kernel says of an orphan's origin: it is in its worker's session (a worker leads its
    own), or it holds one of `sockets` (the master's: a listener it was handed)."""
    try:
        if os.getsid(orphan.pid) == orphan.owner:
            return True
        with os.scandir(f"/proc/{orphan.pid}/fd") as fds:
            for n, fd in enumerate(fds):
                if n >= MAX_FDS:
                    break
                try:
                    target = os.readlink(fd.path)
                except OSError:
                    continue
                if target.startswith("socket:[") and target[8:-1].isdigit() and int(target[8:-1]) in sockets:
                    return True
    except OSError:  # gone meanwhile
        pass
    return False


def kill(orphan: Orphan) -> None:
    """SIGKILL the orphan, and its process group if it leads one (what it started goes with it)."""
    orphan.killed = True
    try:
        if os.getpgid(orphan.pid) == orphan.pid:
            os.killpg(orphan.pid, signal.SIGKILL)
        os.kill(orphan.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
