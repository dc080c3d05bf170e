"""Where the answer to one request goes: progress lines, then one final answer, over the control socket.

A Reply without a writer (a signal, the startup) only logs. Kept apart from control.py so that the
events and the master can name it without importing the server.
"""

from __future__ import annotations

import asyncio
from typing import Any

import structlog

from supervisor.protocol import requests

log = structlog.get_logger()


class Reply:
    """Where the master sends progress and the final answer of one request."""

    def __init__(self, writer: asyncio.StreamWriter | None = None, origin: str = "control") -> None:
        self.writer = writer
        self.origin = origin  # "control", "SIGHUP", "startup": for the logs
        self.done = False

    def progress(self, text: str) -> None:
        log.info("progress", origin=self.origin, text=text)
        self._send({"progress": text})

    def finish(self, ok: bool, text: str, data: dict[str, Any] | None = None) -> None:
        if self.done:
            return
        self.done = True
        if ok:
            self._send({"ok": True, "message": text, "data": data or {}})
        else:
            log.warning("request_failed", origin=self.origin, error=text)
            self._send({"ok": False, "error": text})
        if self.writer is not None:
            self.writer.close()

    def _send(self, message: dict[str, Any]) -> None:
        if self.writer is not None and not self.writer.is_closing():
            self.writer.write(requests.encode(message))


class Replies(Reply):
    """One answer for several callers: reloads that waited behind a running one are merged into one."""

    def __init__(self, replies: list[Reply]) -> None:
        super().__init__(origin="+".join(dict.fromkeys(r.origin for r in replies)))
        self.replies = replies

    def progress(self, text: str) -> None:
        log.info("progress", origin=self.origin, text=text)
        for reply in self.replies:
            reply._send({"progress": text})

    def finish(self, ok: bool, text: str, data: dict[str, Any] | None = None) -> None:
        if not self.done:
            self.done = True
            for reply in self.replies:
                reply.finish(ok, text, data)
