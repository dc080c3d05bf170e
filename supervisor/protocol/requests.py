"""The control protocol, shared by the daemon and `supervisorctl`: JSON, one object per line.

The client sends one request, `{"command": "reload"}` (plus arguments such as "program" or
"workers"). The daemon answers with any number of `{"progress": "text"}` lines and then exactly one
final line, `{"ok": true, "message": "...", "data": {...}}` or `{"ok": false, "error": "..."}`,
(`tail` sends `{"line": "text", "stream": "stdout"}` messages before it; with `follow`, until the
client leaves),
and closes the connection.
"""

from __future__ import annotations

from dataclasses import MISSING, dataclass, fields
from typing import Any

from supervisor.errors import ControlError
from supervisor.protocol.framing import MAX_LINE, decode, encode  # noqa: F401 (requests.MAX_LINE, requests.encode: the API)


@dataclass(frozen=True)
class Status:
    program: str = ""  # only this program; "": every program


@dataclass(frozen=True)
class Reload:
    programs: tuple[str, ...] = ()  # only these programs; none: every program


@dataclass(frozen=True)
class Start:
    program: str


@dataclass(frozen=True)
class Restart:
    """A new generation of a running program with the settings the daemon runs now (the file is not read):
    zero loss, as a reload of it."""

    program: str


@dataclass(frozen=True)
class Stop:
    program: str


@dataclass(frozen=True)
class Scale:
    """`workers` workers; or, with `by` instead, that many more (fewer when negative) than the program runs
    when the request is carried out: SIGTTIN and SIGTTOU, which may wait in line behind a reload and
    must then count from what it left (ten signals, ten workers more)."""

    program: str
    workers: int | None = None
    by: int | None = None


@dataclass(frozen=True)
class Shutdown:
    pass


@dataclass(frozen=True)
class Upgrade:
    pass


@dataclass(frozen=True)
class Version:
    """The daemon's version (`supervisorctl version` prints its own beside it)."""


@dataclass(frozen=True)
class Tail:
    """The last `lines` output lines of a program's workers, of one `stream` (stdout, stderr) or both
    (""); `follow`: then every new one, until the client leaves."""

    program: str
    lines: int = 10
    follow: bool = False
    stream: str = ""


Request = Status | Reload | Start | Restart | Stop | Scale | Shutdown | Upgrade | Tail | Version
# command -> its request type; the type's fields are the arguments it takes (those with a default may be left out)
COMMANDS: dict[str, type[Request]] = {
    "status": Status, "reload": Reload, "start": Start, "restart": Restart, "stop": Stop, "scale": Scale,
    "shutdown": Shutdown, "upgrade": Upgrade, "tail": Tail, "version": Version,
}
_ARG_TYPES: dict[str, type] = {"program": str, "workers": int, "by": int, "programs": list, "lines": int,
                               "follow": bool, "stream": str}


def command_of(request: Request) -> str:
    return next(name for name, kind in COMMANDS.items() if isinstance(request, kind))


def to_message(request: Request) -> dict[str, Any]:
    """The request as the client sent it (parse_request reads it back)."""
    return {"command": command_of(request), **{f.name: getattr(request, f.name) for f in fields(request)
                                               if getattr(request, f.name) is not None}}


def parse_request(line: bytes) -> Request:
    """Validate a request line into its typed request; ControlError names what is wrong."""
    message = decode(line)
    command = message.pop("command", None)
    if not isinstance(command, str) or command not in COMMANDS:
        raise ControlError(f"unknown command {command!r}; expected one of: {', '.join(COMMANDS)}")
    kind = COMMANDS[command]
    expected = {f.name: _ARG_TYPES[f.name] for f in fields(kind)}
    for name, value in list(message.items()):
        if name not in expected:
            raise ControlError(f"{command}: unknown argument {name!r}")
        if not isinstance(value, expected[name]) or (isinstance(value, bool) and expected[name] is not bool):
            raise ControlError(f"{command}: {name} must be a {expected[name].__name__}")
        if isinstance(value, list):
            if not all(isinstance(item, str) for item in value):
                raise ControlError(f"{command}: {name} must be a list of strings")
            message[name] = tuple(value)
    missing = [f.name for f in fields(kind) if f.name not in message and f.default is MISSING]
    if kind is Scale and ("workers" in message) == ("by" in message):  # exactly one of them
        if "workers" in message:
            raise ControlError(f"{command}: workers and by exclude each other")
        missing.append("workers")
    if missing:
        raise ControlError(f"{command}: missing argument {missing[0]!r}")
    return kind(**message)
