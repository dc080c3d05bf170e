"""Unix socket paths: what fits in an address, and the names no address can reach.

An AF_UNIX address holds 107 bytes of path (sun_path[108] with its NUL, unix(7)): bind() and
connect() refuse a longer one ("AF_UNIX path too long"). A socket in a deeper folder is still
reached through the folder opened with O_PATH, as /proc/self/fd/N/NAME: the kernel follows that
link to the folder for bind() and connect() alike (system/unixsocket.py). Only a NAME too long for
that is impossible, and the config refuses it.
"""

from __future__ import annotations

import os

SUN_PATH = 107  # bytes of path an address holds
PROC_FD = "/proc/self/fd/{fd}/{name}"  # NAME in the folder open at fd
MAX_NAME = SUN_PATH - len(PROC_FD.format(fd=2**31 - 1, name=""))  # 82: whatever the fd's number


def fits(path: str) -> bool:
    return len(os.fsencode(path)) <= SUN_PATH


def problem(path: str) -> str | None:
    """Why no unix socket can be bound or reached at `path` (one line, with the limits), or None."""
    name = os.fsencode(os.path.basename(path))
    if fits(path) or len(name) <= MAX_NAME:
        return None
    return (f"a unix socket's path holds {SUN_PATH} bytes, and in a deeper folder its file name at most "
            f"{MAX_NAME}; this one is {len(os.fsencode(path))} bytes with a name of {len(name)}: "
            "choose a shorter name")
