"""The master's safety net, without processes: a handler that fails is logged and the loop goes on."""

from __future__ import annotations

import asyncio

from structlog.testing import capture_logs

from supervisor.config import schema
from supervisor.daemon.events import GracefulTimeout
from supervisor.daemon.master import Master

MINIMAL = "programs:\n  web:\n    command: [app]\n    listen: ['127.0.0.1:8000']\n"


def test_a_failing_handler_is_logged_not_raised() -> None:
    """A malformed event makes its handler fail: one handler_failed line, and handle() returns."""
    async def handle_a_bad_event() -> None:
        master = Master(schema.parse(MINIMAL, "/etc/s/conf.yaml"))
        master.handle(GracefulTimeout(([],)))  # type: ignore[arg-type]  # a list is no key: TypeError

    with capture_logs() as logs:
        asyncio.run(handle_a_bad_event())
    assert [(e["event"], e["handling"], e["log_level"]) for e in logs] == [
        ("handler_failed", "GracefulTimeout", "error")]
