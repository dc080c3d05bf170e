"""The framing of the control protocol: one JSON object per line.

Apart from requests.py, whose request types are dataclasses, so that supervisorctl sends and reads
lines without importing `dataclasses` (and `inspect` with it): its start is most of its cost. For the
same reason the JSON is read and written by `_json`, the C half of the json module, set up as
json.loads and json.dumps set it up: json's Python half imports `re` (and `enum` with it), which was
a third of supervisorctl's start. Where `_json` is missing or differs (another Python), json does it.
"""

from __future__ import annotations

from supervisor.errors import ControlError

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (supervisorctl's start: bench footprint)
if TYPE_CHECKING:
    from collections.abc import Callable
    from typing import Any

MAX_LINE = 64 * 1024
WHITESPACE = " \t\n\r"  # what JSON allows around a value


class _Settings:
    """What json.loads gives its scanner (json.decoder.JSONDecoder's defaults)."""

    strict = True
    object_hook = object_pairs_hook = None
    parse_float, parse_int = float, int
    parse_constant = {"-Infinity": float("-inf"), "Infinity": float("inf"), "NaN": float("nan")}.__getitem__


def _unserializable(value: object) -> object:
    raise TypeError(f"Object of type {type(value).__name__} is not JSON serializable")


def _c_codec() -> tuple[Callable[[str, int], tuple[Any, int]], Callable[[], Callable[[Any, int], Any]]] | None:
    """The scanner of `_json`, and a maker of its encoder; None where this Python has none it can make."""
    try:
        import _json

        def encoder() -> Callable[[Any, int], Any]:
            # As json.dumps(separators=(",", ":")): circular references checked (in a dict of its own for
            # each message, as json.dumps does: one left over from a failed encode would see a cycle in
            # a later object that took a freed one's id), ASCII out, NaN allowed.
            return _json.make_encoder({}, _unserializable, _json.encode_basestring_ascii, None, ":", ",",
                                      False, False, True)

        scanner = _json.make_scanner(_Settings())  # type: ignore[arg-type]  # typeshed: the context's type is the scanner's
        encoder()
    except (ImportError, AttributeError, TypeError):
        return None
    return scanner, encoder


_C = _c_codec()


def encode(message: dict[str, Any]) -> bytes:
    if _C is None:
        import json

        return json.dumps(message, separators=(",", ":")).encode() + b"\n"
    return "".join(_C[1]()(message, 0)).encode() + b"\n"


def decode(line: bytes) -> dict[str, Any]:
    """One message. ControlError for anything but a JSON object in UTF-8; ValueError for a number of
    more digits than int() converts, RecursionError for nesting deeper than Python's limit (the
    daemon words both: daemon/control.py)."""
    try:
        message = _loads(line.decode("utf-8"))
    except StopIteration as stop:  # nothing the scanner could read as a value there
        raise ControlError(f"malformed message: expecting a value at char {stop.value}") from None
    except ValueError as exc:  # json's JSONDecodeError, a UnicodeDecodeError: both ValueErrors
        if type(exc) is ValueError:
            raise  # int()'s limit on digits
        raise ControlError(f"malformed message: {exc}") from None
    if not isinstance(message, dict):
        raise ControlError("malformed message: expected a JSON object")
    return message


def _loads(text: str) -> Any:
    if _C is None:
        import json

        try:
            return json.loads(text)
        except json.JSONDecodeError as exc:
            raise ControlError(f"malformed message: {exc}") from None
    start = len(text) - len(text.lstrip(WHITESPACE))
    value, end = _C[0](text, start)
    if text[end:].strip(WHITESPACE):
        raise ControlError(f"malformed message: extra data after the value, which ends at char {end}")
    return value
