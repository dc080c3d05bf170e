"""Exceptions, one per audience, and the exit codes of the command-line tools.

Factored out of the concept modules so that any of them can raise without import loops.
"""

from __future__ import annotations

# Exit codes: a documented contract of `supervisord` and `supervisorctl` (docs/operations.md, "Commands", and --help).
EXIT_OK = 0
EXIT_FAILED = 1  # the daemon refused or rolled back the request (reason printed)
EXIT_USAGE = 2  # bad command line or configuration file
EXIT_UNREACHABLE = 3  # no daemon answers on the control socket


class SupervisorError(Exception):
    """Base of every error this package raises on purpose."""


class ConfigError(SupervisorError):
    """The configuration file is wrong: the user fixes the file.

    Renders as ``path:line: key: problem``, the line being 1-based; ``line`` is 0 when unknown.
    """

    def __init__(self, path: str, line: int, key: str, problem: str) -> None:
        self.path = path
        self.line = line
        self.key = key
        self.problem = problem
        super().__init__(str(self))

    def __str__(self) -> str:
        where = f"{self.path}:{self.line}" if self.line else self.path
        return f"{where}: {self.key}: {self.problem}" if self.key else f"{where}: {self.problem}"


class PreflightError(SupervisorError):
    """The configuration is valid but cannot work on this system (command missing, sysctl refused)."""


class MigrateError(PreflightError):
    """`migrate: require` and the kernel socket migration cannot be enabled."""


class ControlError(SupervisorError):
    """A control request is malformed or cannot be served: the client fixes its request."""


class SpawnError(SupervisorError):
    """A worker could not be started (the exec itself failed)."""
