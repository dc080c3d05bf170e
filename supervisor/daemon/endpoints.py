"""The master's own sockets: its runtime folder, the sd_notify socket workers report to, the control socket."""

from __future__ import annotations

import asyncio
import errno
import os
import shutil
import socket
import stat
import tempfile
from collections.abc import Callable, Mapping
from typing import Any

import structlog

from supervisor.config import unixpath
from supervisor.config.schema import Control
from supervisor.daemon.control import ControlServer
from supervisor.daemon.events import Event, NotifyReceived
from supervisor.system import openssl
from supervisor.system.readiness import NotifySocket

log = structlog.get_logger()

NOTIFY_SOCKET = "notify.sock"  # in the runtime folder


class Endpoints:
    def __init__(self, control: Control, post: Callable[[Event], None]) -> None:
        self.settings = control
        self.post = post
        self.runtime_dir = ""
        self.notify: NotifySocket | None = None
        self.control: ControlServer | None = None

    async def open(self) -> None:
        """Raises OSError or SupervisorError (another daemon on the control socket); close() undoes it."""
        control = ControlServer(self.settings.socket, self.settings.mode, self.post)
        await control.start()  # first: it refuses when another daemon answers there
        # Only now: close() unlinks the socket path, which may be another running daemon's.
        self.control = control
        self.runtime_dir = runtime_folder(self.settings.socket)
        clear_stale(self.runtime_dir)  # a killed master's: its notify socket and TLS key copies
        os.mkdir(self.runtime_dir, 0o711)
        os.chmod(self.runtime_dir, 0o711)  # workers that dropped privileges still reach the notify socket
        self.notify = NotifySocket(os.path.join(self.runtime_dir, NOTIFY_SOCKET))
        asyncio.get_running_loop().add_reader(self.notify.fileno(), self._notify_readable)

    def kept(self) -> list[int]:
        """The fds an upgrade keeps open across its exec: the notify socket and the control listener."""
        assert self.notify is not None and self.control is not None
        return [self.notify.fileno(), self.control.fileno()]

    def to_json(self) -> dict[str, Any]:
        assert self.notify is not None and self.control is not None
        return {"runtime_dir": self.runtime_dir, "notify_path": self.notify.path, "notify_fd": self.notify.fileno(),
                "control_fd": self.control.fileno()}

    async def adopt(self, data: Mapping[str, Any]) -> None:
        """After an upgrade: the same sockets, open since before the exec."""
        self.runtime_dir = data["runtime_dir"]
        self.notify = NotifySocket.adopt(data["notify_path"], data["notify_fd"])
        asyncio.get_running_loop().add_reader(self.notify.fileno(), self._notify_readable)
        control = ControlServer(self.settings.socket, self.settings.mode, self.post)
        await control.start(socket.socket(fileno=data["control_fd"]))
        self.control = control

    @property
    def notify_path(self) -> str:
        assert self.notify is not None
        return self.notify.path

    def _notify_readable(self) -> None:
        assert self.notify is not None
        for pid, fields in self.notify.receive():
            self.post(NotifyReceived(pid, fields))

    def close(self) -> None:
        if self.control is not None:
            self.control.close()
        if self.notify is not None:
            asyncio.get_running_loop().remove_reader(self.notify.fileno())
            self.notify.close()
            self.notify = None
        if self.runtime_dir:
            shutil.rmtree(self.runtime_dir, ignore_errors=True)


def runtime_folder(control_socket: str) -> str:
    """The master's private folder: under systemd in RuntimeDirectory=, else in $TMPDIR; named after
    its control socket (one daemon per socket), so that the next start finds what a killed one left.

    Workers reach its notify socket by path (NOTIFY_SOCKET, the sd_notify protocol), which must fit
    in an address: where that folder is too deep for it, in /tmp. Not an abstract socket: any local
    user can send to one, and a flood filling its queue would make the workers' READY=1 fail.
    """
    digest = openssl.sha256(os.path.abspath(control_socket).encode())[:16]
    name = f"supervisord.{digest}"
    base = os.environ.get("RUNTIME_DIRECTORY") or tempfile.gettempdir()
    if not unixpath.fits(os.path.join(base, name, NOTIFY_SOCKET)):
        base = "/tmp"
    return os.path.join(base, name)


def clear_stale(path: str) -> None:
    """Remove what a dead master left at `path` (no live one: its control socket did not answer).

    Nothing there is followed: a symlink or a file is unlinked, a folder that is not ours refuses the
    start, and rmtree does not follow symlinks inside.
    """
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if stat.S_ISDIR(st.st_mode):
        if st.st_uid != os.geteuid():
            raise OSError(errno.EPERM, f"{path} belongs to uid {st.st_uid}, not to supervisord: remove it by hand")
        shutil.rmtree(path)
    else:
        os.unlink(path)
    log.info("runtime_folder_cleared", path=path)
