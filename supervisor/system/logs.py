"""Logging: structlog, a console renderer on a terminal and JSON lines otherwise (journald, files)."""

from __future__ import annotations

import logging
import sys
from typing import TextIO, cast

import structlog


class _Output:
    """Where log lines go: stderr, or a file that SIGUSR1 reopens (after logrotate moved it)."""

    def __init__(self) -> None:
        self.path: str | None = None
        self.file: TextIO = sys.stderr

    def open(self, path: str | None) -> None:
        self.path = path
        self.reopen()

    def reopen(self) -> None:
        if self.path is None:
            return
        old, self.file = self.file, open(self.path, "a", buffering=1)  # noqa: SIM115 (kept open)
        if old is not sys.stderr:
            old.close()

    def write(self, text: str) -> int:
        return self.file.write(text)

    def flush(self) -> None:
        self.file.flush()


_output = _Output()


def reopen() -> None:
    """SIGUSR1: reopen the log file, if there is one."""
    _output.reopen()


def configure(level: str = "info", json: bool | None = None, path: str | None = None) -> None:
    """Log events as `event key=value ...`; JSON when not on a TTY unless told otherwise."""
    _output.open(path)
    if json is None:
        json = path is not None or not sys.stderr.isatty()
    renderer: structlog.typing.Processor = (
        structlog.processors.JSONRenderer() if json else
        structlog.dev.ConsoleRenderer(colors=path is None and sys.stderr.isatty())
    )
    structlog.configure(
        processors=[
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(logging.getLevelNamesMapping()[level.upper()]),
        logger_factory=structlog.PrintLoggerFactory(file=cast(TextIO, _output)),  # it only writes and flushes
        cache_logger_on_first_use=True,
    )
