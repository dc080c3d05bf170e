"""A YAML file as supervisord reads it: bounded, never blocking, composed into nodes that keep their line.

Apart from `config` so that supervisorctl, which only needs the control socket's path
(`control_socket`), starts without importing the whole config model (README, "supervisorctl").
"""

from __future__ import annotations

import os
import stat

import yaml

from supervisor.errors import ConfigError

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (supervisorctl's start: bench footprint)
if TYPE_CHECKING:
    from typing import Any

DEFAULT_SOCKET = "./supervisor.sock"
# libyaml's parser when pyyaml was built with it: the master parses at every reload, in its loop, and
# libyaml reads a 1 MiB file about five times faster than the pure-Python one.
LOADER: Any = getattr(yaml, "CSafeLoader", yaml.SafeLoader)

MAX_FILE = 1 << 20  # bytes of a config file; larger ones are refused unread
MAX_EVENTS = 20_000  # YAML parser events (scalars, aliases, starts and ends of collections) in a file


def control_socket(path: str | os.PathLike[str]) -> str:
    """Only the control socket's path: the client must find the daemon even if the rest is wrong."""
    name = os.fspath(path)
    root = compose(read(name), name)
    node: Any = None
    for key in ("control", "socket"):
        if root is None or (key == "control" and root.tag == "tag:yaml.org,2002:null"):
            break
        where = "control" if key == "socket" else "(top level)"
        if not isinstance(root, yaml.MappingNode):
            raise ConfigError(name, root.start_mark.line + 1, where, "expected a mapping")
        root = node = next((value for k, value in root.value if k.value == key), None)
    folder = os.path.dirname(os.path.abspath(name))
    if node is None:
        socket_path = DEFAULT_SOCKET
    elif isinstance(node, yaml.ScalarNode) and node.tag == "tag:yaml.org,2002:str" and node.value:
        socket_path = node.value
    else:
        raise ConfigError(name, node.start_mark.line + 1, "control.socket", "expected a non-empty string")
    return os.path.normpath(os.path.join(folder, os.path.expanduser(socket_path)))


def read(path: str | os.PathLike[str]) -> str:
    """The file's text, read without blocking the master's loop (startup and `reload` both come here).

    A FIFO would block open() until a writer comes, a device may never end (/dev/zero): only a
    regular file is read, opened with O_NONBLOCK in case it was swapped since the stat, and at most
    MAX_FILE bytes of it.
    """
    name = os.fspath(path)
    try:
        kind = file_kind(os.stat(name).st_mode)
        if kind:
            raise ConfigError(name, 0, "", f"not a regular file ({kind})")
        fd = os.open(name, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
        try:
            info = os.fstat(fd)
            size, kind = info.st_size, file_kind(info.st_mode)
            if kind:
                raise ConfigError(name, 0, "", f"not a regular file ({kind})")
            data = _read_at_most(fd, MAX_FILE + 1)
        finally:
            os.close(fd)
    except OSError as exc:
        raise ConfigError(name, 0, "", f"cannot read: {exc.strerror or exc}") from None
    if len(data) > MAX_FILE:
        raise ConfigError(name, 0, "", f"larger than {MAX_FILE >> 20} MiB ({max(size, len(data))} bytes): not read")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raise ConfigError(name, 0, "", "cannot read: not UTF-8 text") from None


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


def compose(text: str, path: str) -> yaml.Node | None:
    try:
        # Building nodes costs ~10 times what parsing does (pyyaml resolves each scalar's tag in
        # Python): count first, and compose only a file of sane size.
        for count, event in enumerate(yaml.parse(text, Loader=LOADER)):
            if count >= MAX_EVENTS:
                line = event.start_mark.line + 1 if event.start_mark else 0
                raise ConfigError(path, line, "", f"more than {MAX_EVENTS} YAML values and collections: not read "
                                  "(a config has a few hundred)")
        return yaml.compose(text, Loader=LOADER)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        raise ConfigError(path, mark.line + 1 if mark else 0, "", f"broken YAML: {exc.problem}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(path, 0, "", f"broken YAML: {exc}") from None
