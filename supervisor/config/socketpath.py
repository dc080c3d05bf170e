"""The control socket's path as supervisorctl finds it in the config file, without importing pyyaml.

pyyaml's import is about half of what `supervisorctl -c FILE status` costs, and the client needs one
value. Most config files are written in a small part of YAML: block mappings of plain keys, one
value per line (a plain or quoted scalar, or a one-line list or mapping of them), comments. `scan` reads a file
that keeps entirely to that part, every line of it, and finds `control.socket` there; anything else
(an anchor, a tag, a block scalar, a tab, a line it cannot place, an unreadable file) and it answers
None: then the file goes to pyyaml (`yamlfile.control_socket`), which reads it as the daemon does
and words every error, with file, line and key. The part is chosen so that every file it accepts is
valid YAML that pyyaml reads to the same socket (tests/unit/test_socketpath.py holds the two
readers against each other): a broken file is never accepted here, only refused here and reported
there.
"""

from __future__ import annotations

import os

from supervisor.config import files, unixpath
from supervisor.errors import ConfigError

DEFAULT_SOCKET = "./supervisor.sock"
# YAML parser events (scalars, aliases, starts and ends of collections) in a file: more are refused
# (yamlfile.compose); a file that may have more goes there.
MAX_EVENTS = 20_000

# The shapes below are read with str methods and character sets, not `re`: its import (with `enum`)
# was a third of supervisorctl's start.
# A plain key: what every key of the schema, program name and environment variable looks like.
_KEY_FIRST = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_")
_KEY_REST = _KEY_FIRST | frozenset(".-")
# A plain scalar, one line: no indicator first (but "-x", as in `- -m`), nothing that ends it or
# starts a comment, an anchor or a flow collection inside, not ending with ':'.
# A ':' inside a block's plain scalar is fine unless a space or the end follows (checked apart).
_PLAIN_FIRST = _KEY_FIRST | frozenset("./~+=$();<^")
_NOT_PLAIN = frozenset("#'\"[]{}&*!|>%@`\\")
# In a flow list or mapping, a ':' only where neither a space, a comma nor a bracket follows (`app:app`).
_NOT_PLAIN_IN_FLOW = _NOT_PLAIN | frozenset(",?")


class _Unsure(Exception):
    """The file leaves the part of YAML that `scan` reads: pyyaml decides."""


def control_socket(path: str | os.PathLike[str]) -> str | None:
    """The control socket's absolute path, as yamlfile.control_socket gives it (errors included), or
    None where the file leaves the part of YAML read here: then ask yamlfile."""
    name = os.fspath(path)
    try:
        text = files.read(name).decode("utf-8")
        value, line = scan(text)
    except (files.Refused, UnicodeDecodeError, _Unsure):
        return None  # yamlfile reads it again, and words what is wrong
    resolved = resolve(name, value or DEFAULT_SOCKET)
    if value is not None and (problem := unixpath.problem(resolved)) is not None:
        raise ConfigError(name, line, "control.socket", f"{resolved}: {problem}")
    return resolved


def resolve(config_file: str, socket_path: str) -> str:
    """A socket path from the config, relative to the config file's folder, `~` expanded."""
    folder = os.path.dirname(os.path.abspath(config_file))
    return os.path.normpath(os.path.join(folder, os.path.expanduser(socket_path)))


def scan(text: str) -> tuple[str | None, int]:
    """`control.socket` of a config in the part of YAML read here, and its line (None, 0: not set).
    _Unsure where the file leaves that part."""
    if not text.isascii() or not text.replace("\n", "").isprintable():
        raise _Unsure  # tabs, CR, control characters, anything pyyaml's reader may refuse or fold
    stack: list[tuple[int, str, tuple[str, ...]]] = []  # open blocks: indent, "map" or "seq", keys above
    opener: tuple[int, tuple[str, ...]] | None = None  # the last key with nothing after it: indent, its path
    control: str | None = None  # what `control:` holds: "map", "seq", "null" (nothing under it), "value"
    socket: tuple[str, int] | None = None  # the first `socket:` of control's mapping, and its line
    events = 4  # stream and document, start and end
    for number, raw in enumerate(text.split("\n"), start=1):
        content = raw.strip(" ")
        if not content or content.startswith("#"):
            continue
        indent = len(raw) - len(raw.lstrip(" "))
        item = content == "-" or content.startswith("- ")
        if opener is not None:
            at, keys = opener
            if indent > at or (indent == at and item):  # the opener's block (a list may sit at its key's indent)
                stack.append((indent, "seq" if item else "map", keys))
                if keys == ("control",):
                    control = stack[-1][1]
            opener = None
        while stack and (stack[-1][0] > indent or (stack[-1][0] == indent and stack[-1][1] == "seq" and not item
                                                   and len(stack) > 1 and stack[-2][0] == indent)):
            stack.pop()
        if not stack:
            if indent or item:
                raise _Unsure  # the document is not a mapping at column 0
            stack.append((0, "map", ()))
        level, kind, keys = stack[-1]
        if level != indent or kind != ("seq" if item else "map"):
            raise _Unsure  # a continuation line, or indentation pyyaml would refuse
        if item:
            events += 1 + _value(content[1:].strip(" "))
            continue
        keyed = _key(content)
        if keyed is None:
            raise _Unsure
        key, rest = keyed[0], _uncomment(keyed[1])
        path = (*keys, key)
        if rest:
            events += 1 + _value(rest)
        else:
            events += 3  # the key, and its block's start and end (or a null)
            opener = (indent, path)
        if path == ("control",):
            if control is not None:
                raise _Unsure  # twice: pyyaml takes the first, this reader does not follow
            control = "value" if rest else "null"
        elif path == ("control", "socket") and socket is None:
            socket = (_unquoted(rest), number)
        if events >= MAX_EVENTS:
            raise _Unsure
    if control is None:
        return None, 0
    if control != "map":
        raise _Unsure  # a flow mapping, a list, a null: pyyaml reads it, or words the error
    return socket if socket is not None else (None, 0)


def _value(text: str) -> int:
    """The events of a value on one line (a scalar, or a flow list or mapping of scalars); _Unsure otherwise."""
    text = _uncomment(text)
    if text.startswith(("[", "{")):
        if not text.endswith("]" if text[0] == "[" else "}"):
            raise _Unsure
        inner = text[1:-1].strip(" ")
        items = [item.strip(" ") for item in inner.split(",")] if inner else []
        for item in items:
            if text[0] == "{":
                key, colon, item = item.partition(": ")
                if not colon or _key(key + ":") is None:
                    raise _Unsure
                item = item.strip(" ")
            if not (_quoted(item) or (_plain(item, flow=True) and not item.endswith((" ", ":")))):
                raise _Unsure
        return 2 + len(items) * (2 if text[0] == "{" else 1)
    if not (_quoted(text) or (_plain(text) and ": " not in text and not text.endswith(":"))):
        raise _Unsure
    return 1


def _key(content: str) -> tuple[str, str] | None:
    """A line `KEY:` or `KEY: VALUE` with a plain key: the key and the value (after its spaces); None
    for any other line."""
    key, colon, after = content.partition(":")
    if not colon or not key or key[0] not in _KEY_FIRST or not _KEY_REST.issuperset(key):
        return None
    if after and after[0] != " ":
        return None
    return key, after.lstrip(" ")


def _plain(text: str, flow: bool = False) -> bool:
    """A plain scalar of one line, in a block (`flow` False) or inside a flow list or mapping."""
    if not text or not (text[0] in _PLAIN_FIRST or (text[0] == "-" and text[1:2] not in ("", " "))):
        return False
    refused = _NOT_PLAIN_IN_FLOW if flow else _NOT_PLAIN
    for at in range(1, len(text)):
        ch = text[at]
        if flow and ch == ":":
            if text[at + 1:at + 2] in ("", " "):
                return False
        elif ch in refused:
            return False
    return True


def _quoted(text: str) -> bool:
    """A single-quoted scalar without a quote inside, or a double-quoted one without a quote or a backslash."""
    if len(text) < 2 or text[0] not in "'\"" or text[-1] != text[0]:
        return False
    inner = text[1:-1]
    return text[0] not in inner and (text[0] == "'" or "\\" not in inner)


def _uncomment(text: str) -> str:
    """The value without its comment (" #" outside quotes) and trailing spaces."""
    quote = ""
    for i, ch in enumerate(text):
        if quote:
            quote = "" if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch == "#" and (i == 0 or text[i - 1] == " "):
            return text[:i].rstrip(" ")
    return text.rstrip(" ")


def _unquoted(value: str) -> str:
    """A socket's string: a quoted one's content; a plain one only where no tag but str can resolve it
    (a path with a '/'; `8000`, `yes`, `null` would not be strings)."""
    if not value:
        raise _Unsure  # a null or a block under it: pyyaml's error
    _value(value)
    if value.startswith(("'", '"')) and len(value) > 2:
        return value[1:-1]
    if not value.startswith(("'", '"', "[", "{")) and "/" in value:
        return value
    raise _Unsure  # a flow collection, an empty string, a plain scalar that may not be a string: pyyaml's error
