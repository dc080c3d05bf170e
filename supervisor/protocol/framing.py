"""The framing of the control protocol: one JSON object per line.

Apart from requests.py, whose request types are dataclasses, so that supervisorctl sends and reads
lines without importing `dataclasses` (and `inspect` with it): its start is most of its cost.
"""

from __future__ import annotations

import json

from supervisor.errors import ControlError

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (supervisorctl's start: bench footprint)
if TYPE_CHECKING:
    from typing import Any

MAX_LINE = 64 * 1024


def encode(message: dict[str, Any]) -> bytes:
    return json.dumps(message, separators=(",", ":")).encode() + b"\n"


def decode(line: bytes) -> dict[str, Any]:
    try:
        message = json.loads(line)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ControlError(f"malformed message: {exc}") from None
    if not isinstance(message, dict):
        raise ControlError("malformed message: expected a JSON object")
    return message
