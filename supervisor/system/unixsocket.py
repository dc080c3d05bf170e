"""Bind and connect unix sockets at paths of any length (config/unixpath.py says why and the limits).

No chdir(): it is the whole process's, and a relative path resolved meanwhile elsewhere in the
process (a config read, a worker's cwd) would land in the wrong folder.
"""

from __future__ import annotations

import errno
import os

from supervisor.config import unixpath


class address:  # lower case: used as the function it was, `with address(path) as where`
    """What bind() and connect() take for `path`: the path itself when it fits, else
    /proc/self/fd/N/NAME of its folder, open (O_PATH) while the block runs. OSError says why not.
    A class, not a contextlib.contextmanager: supervisorctl uses it, and contextlib's import (with
    collections and functools) was a tenth of its start."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.fd: int | None = None

    def __enter__(self) -> str:
        path = self.path
        if unixpath.fits(path):
            return path
        if (problem := unixpath.problem(path)) is not None:
            raise OSError(errno.ENAMETOOLONG, problem)
        folder, name = os.path.split(path)
        if not os.path.isdir("/proc/self/fd"):
            raise OSError(errno.ENAMETOOLONG, f"longer than a unix socket's {unixpath.SUN_PATH} bytes, and /proc "
                                              "is not mounted to reach it through its folder")
        self.fd = os.open(folder or ".", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        return unixpath.PROC_FD.format(fd=self.fd, name=name)

    def __exit__(self, *exc: object) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None
