"""Bind and connect unix sockets at paths of any length (config/unixpath.py says why and the limits).

No chdir(): it is the whole process's, and a relative path resolved meanwhile elsewhere in the
process (a config read, a worker's cwd) would land in the wrong folder.
"""

from __future__ import annotations

import contextlib
import errno
import os
from collections.abc import Iterator

from supervisor.config import unixpath


@contextlib.contextmanager
def address(path: str) -> Iterator[str]:
    """What bind() and connect() take for `path`: the path itself when it fits, else
    /proc/self/fd/N/NAME of its folder, open (O_PATH) while the block runs. OSError says why not."""
    if unixpath.fits(path):
        yield path
        return
    if (problem := unixpath.problem(path)) is not None:
        raise OSError(errno.ENAMETOOLONG, problem)
    folder, name = os.path.split(path)
    if not os.path.isdir("/proc/self/fd"):
        raise OSError(errno.ENAMETOOLONG, f"longer than a unix socket's {unixpath.SUN_PATH} bytes, and /proc "
                                          "is not mounted to reach it through its folder")
    fd = os.open(folder or ".", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        yield unixpath.PROC_FD.format(fd=fd, name=name)
    finally:
        os.close(fd)
