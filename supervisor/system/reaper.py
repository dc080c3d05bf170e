"""The master as the reaper of every descendant of its workers (PR_SET_CHILD_SUBREAPER).

A process that leaves a worker's session (`setsid`, a double fork) and outlives its parent is
reparented to the nearest subreaper instead of to PID 1, so the master sees it, can reap it, and can
kill it when the worker it came from retires.
"""

from __future__ import annotations

import ctypes
import os
import signal

PR_SET_CHILD_SUBREAPER = 36  # linux/prctl.h

# The C library the interpreter runs on, through the process's own symbols (dlopen(NULL)):
# ctypes.util.find_library("c") would run `ldconfig -p` in a child process at every start.
_libc = ctypes.CDLL(None, use_errno=True)


def become_subreaper() -> None:
    """Orphaned descendants are reparented to this process from now on (survives execve)."""
    if _libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
        errno = ctypes.get_errno()
        raise OSError(errno, f"prctl(PR_SET_CHILD_SUBREAPER): {os.strerror(errno)}")


SFD_NONBLOCK = os.O_NONBLOCK
SFD_CLOEXEC = os.O_CLOEXEC
_SIGINFO_SIZE = 128  # struct signalfd_siginfo
_libc.signalfd.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_int]


def child_signals() -> int:
    """SIGCHLD as a readable fd (signalfd) for the event loop, which must not run a Python handler for
    it (a loop may keep SIGCHLD for itself: uvloop does, and asyncio's child watchers may). SIGCHLD is
    blocked in this thread so that it queues on the fd; posix_spawn gives workers an empty mask again."""
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGCHLD})
    mask = (ctypes.c_uint64 * 16)()  # sigset_t: 1024 bits
    mask[0] = 1 << (signal.SIGCHLD - 1)
    fd = int(_libc.signalfd(-1, ctypes.byref(mask), SFD_NONBLOCK | SFD_CLOEXEC))
    if fd < 0:
        errno = ctypes.get_errno()
        raise OSError(errno, f"signalfd(SIGCHLD): {os.strerror(errno)}")
    return fd


def drain(fd: int) -> None:
    """Empty the signalfd (each read returns one pending SIGCHLD; many coalesce into one)."""
    try:
        while os.read(fd, _SIGINFO_SIZE * 16):
            pass
    except BlockingIOError:
        pass
