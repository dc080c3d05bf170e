"""Every file the master reads (the config, certificates and keys, watched files) is read here, by one
set of rules: it never blocks the master's loop and never grows it without bound.

A FIFO would block open() until a writer comes, a device may never end (/dev/zero), a swapped file
may be a sparse 10 GB one: only a regular file is read, opened with O_NONBLOCK in case it was
swapped since the stat, and at most `limit` bytes of it. A refusal is one line naming the file.
"""

from __future__ import annotations

import os
import stat

MAX_FILE = 1 << 20  # bytes of a config, certificate or key file; larger ones are refused unread


class Refused(Exception):
    """Why a file is not read: `str()` is the reason, without the path (the caller names file and key)."""


def read(path: str | os.PathLike[str], limit: int = MAX_FILE) -> bytes:
    name = os.fspath(path)
    try:
        kind = file_kind(os.stat(name).st_mode)
        if kind:
            raise Refused(f"not a regular file ({kind})")
        fd = os.open(name, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
        try:
            info = os.fstat(fd)
            size, kind = info.st_size, file_kind(info.st_mode)
            if kind:
                raise Refused(f"not a regular file ({kind})")
            data = _read_at_most(fd, limit + 1)
        finally:
            os.close(fd)
    except OSError as exc:
        raise Refused(f"cannot read: {exc.strerror or exc}") from None
    if len(data) > limit:
        raise Refused(f"larger than {_size(limit)} ({max(size, len(data))} bytes): not read")
    return data


def file_kind(mode: int) -> str | None:
    """What a file that is not a regular one is, for the error; None for a regular file."""
    if stat.S_ISREG(mode):
        return None
    kinds = ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket"),
             (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"))
    return next((text for test, text in kinds if test(mode)), "not a file")


def _read_at_most(fd: int, limit: int) -> bytes:
    chunks: list[bytes] = []
    size = 0
    while size < limit:
        chunk = os.read(fd, min(65536, limit - size))
        if not chunk:
            break
        chunks.append(chunk)
        size += len(chunk)
    return b"".join(chunks)


def _size(limit: int) -> str:
    return f"{limit >> 20} MiB" if limit % (1 << 20) == 0 else f"{limit} bytes"
