"""The master as the reaper of every descendant of its workers (PR_SET_CHILD_SUBREAPER).

A process that leaves a worker's session (`setsid`, a double fork) and outlives its parent is
reparented to the nearest subreaper instead of to PID 1, so the master sees it, can reap it, and can
kill it when the worker it came from retires.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os

PR_SET_CHILD_SUBREAPER = 36  # linux/prctl.h

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)


def become_subreaper() -> None:
    """Orphaned descendants are reparented to this process from now on (survives execve)."""
    if _libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
        errno = ctypes.get_errno()
        raise OSError(errno, f"prctl(PR_SET_CHILD_SUBREAPER): {os.strerror(errno)}")
