"""The master's own sockets: its runtime folder, the sd_notify socket workers report to, the control socket."""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import tempfile
from collections.abc import Callable, Mapping
from typing import Any

from supervisor.config import Control
from supervisor.control import ControlServer
from supervisor.events import Event, NotifyReceived
from supervisor.readiness import NotifySocket


class Endpoints:
    def __init__(self, control: Control, post: Callable[[Event], None]) -> None:
        self.settings = control
        self.post = post
        self.runtime_dir = ""
        self.notify: NotifySocket | None = None
        self.control: ControlServer | None = None

    async def open(self) -> None:
        """Raises OSError or SupervisorError (another daemon on the control socket); close() undoes it."""
        # Under systemd, RuntimeDirectory= gives a private folder; elsewhere a fresh one in $TMPDIR.
        self.runtime_dir = tempfile.mkdtemp(prefix="supervisord.", dir=os.environ.get("RUNTIME_DIRECTORY"))
        os.chmod(self.runtime_dir, 0o711)  # workers that dropped privileges still reach the notify socket
        self.notify = NotifySocket(os.path.join(self.runtime_dir, "notify.sock"))
        asyncio.get_running_loop().add_reader(self.notify.fileno(), self._notify_readable)
        control = ControlServer(self.settings.socket, self.settings.mode, self.post)
        await control.start()
        # Only now: close() unlinks the socket path, which may be another running daemon's.
        self.control = control

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
