"""`watch:` files whose new content means a reload: the config, certificates, a mounted Kubernetes Secret.

Looked at once a second from the master's loop (ev.FilesCheck), without a thread: a stat() of each
path, and a hash of its content when the stat changed (a `touch` is not a change). Paths are followed
through symlinks, so the swap of a Secret's `..data` link is a change of every file behind it.
A change starts a reload once the files have been quiet for a whole check (an operator who copies a
certificate and then its key gets one reload, not two). A refused reload is not retried until the
next change: what was seen stays seen.

Nothing here may block the loop: only a regular file is opened (O_NONBLOCK: a FIFO swapped in after
the stat cannot hang it), and only up to MAX_HASHED bytes; a larger file is compared by its stat.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterable

from supervisor.config import files
from supervisor.system import openssl

INTERVAL = 1.0  # seconds between two looks
MAX_WAIT = 5  # looks a reload waits for files that keep changing before it starts anyway
MAX_HASHED = 4 << 20  # bytes of a file whose content is hashed

Fingerprint = tuple[object, ...]


class Files:
    def __init__(self, paths: Iterable[str] = ()) -> None:
        self.seen: dict[str, tuple[Fingerprint, Fingerprint]] = {}  # path -> (stat, content)
        self.changed: set[str] = set()  # since the last reload it started
        self.waited = 0  # looks that saw more changes since the first of `changed`
        self.follow(paths)

    def follow(self, paths: Iterable[str]) -> None:
        """Watch these paths from now on (a reload may change the list); new ones as they are now."""
        wanted = list(dict.fromkeys(paths))
        self.seen = {path: self.seen.get(path) or look(path) for path in wanted}
        self.changed &= set(wanted)

    def check(self) -> list[str] | None:
        """Look once: the paths changed since the last reload that is due now, or None."""
        new = set()
        for path, (stat_before, content_before) in self.seen.items():
            info = stat_of(path)
            if fingerprint(info) == stat_before:
                continue
            self.seen[path] = (fingerprint(info), content_now := content_of(path, info))
            if content_now != content_before:
                new.add(path)
        if new:
            self.changed |= new
            self.waited += 1
            if self.waited < MAX_WAIT:
                return None  # still changing, perhaps: wait for a quiet look
        due, self.changed, self.waited = sorted(self.changed), set(), 0
        return due or None


def look(path: str) -> tuple[Fingerprint, Fingerprint]:
    info = stat_of(path)
    return fingerprint(info), content_of(path, info)


def stat_of(path: str) -> os.stat_result | None:
    try:
        return os.stat(path)  # follows symlinks: a swapped ..data link changes the inode
    except OSError:
        return None


def fingerprint(info: os.stat_result | None) -> Fingerprint:
    if info is None:
        return ("missing",)
    return (info.st_dev, info.st_ino, info.st_mode, info.st_size, info.st_mtime_ns, info.st_ctime_ns)


def content_of(path: str, info: os.stat_result | None) -> Fingerprint:
    """A hash of the content of a regular file of sane size (read by config/files.py's rules); what
    stat says of anything else."""
    if info is None or not stat.S_ISREG(info.st_mode) or info.st_size > MAX_HASHED:
        return fingerprint(info)
    try:
        return ("sha256", openssl.sha256(files.read(path, MAX_HASHED)))
    except files.Refused as exc:
        return ("unreadable", str(exc))
