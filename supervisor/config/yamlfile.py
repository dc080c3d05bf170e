"""A YAML file as supervisord reads it: bounded, never blocking, composed into nodes that keep their line.

Apart from `config` so that supervisorctl, which only needs the control socket's path
(`control_socket`), starts without importing the whole config model (docs/operations.md, "Commands");
most files it does not even read with pyyaml (socketpath.py).
"""

from __future__ import annotations

import os

import yaml

from supervisor.config import files, unixpath
from supervisor.config.files import MAX_FILE, file_kind  # noqa: F401 (yamlfile.MAX_FILE: the API)
from supervisor.config.socketpath import DEFAULT_SOCKET, MAX_EVENTS, resolve
from supervisor.errors import ConfigError

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (supervisorctl's start: bench footprint)
if TYPE_CHECKING:
    from typing import Any

# libyaml's parser when pyyaml was built with it: the master parses at every reload, in its loop, and
# libyaml reads a 1 MiB file about five times faster than the pure-Python one.
LOADER: Any = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


def control_socket(path: str | os.PathLike[str]) -> str:
    """Only the control socket's path: the client must find the daemon even if the rest is wrong."""
    name = os.fspath(path)
    root = compose(read(name), name)
    node: Any = None
    for key in ("control", "socket"):
        if root is None or (key == "control" and root.tag == "tag:yaml.org,2002:null"):
            break
        where = "control" if key == "socket" else "(top level)"
        if not isinstance(root, yaml.MappingNode):
            raise ConfigError(name, root.start_mark.line + 1, where, "expected a mapping")
        root = node = next((value for k, value in root.value if k.value == key), None)
    if node is None:
        socket_path = DEFAULT_SOCKET
    elif isinstance(node, yaml.ScalarNode) and node.tag == "tag:yaml.org,2002:str" and node.value:
        socket_path = node.value
    else:
        raise ConfigError(name, node.start_mark.line + 1, "control.socket", "expected a non-empty string")
    path = resolve(name, socket_path)
    if node is not None and (problem := unixpath.problem(path)) is not None:
        raise ConfigError(name, node.start_mark.line + 1, "control.socket", f"{path}: {problem}")
    return path


def read(path: str | os.PathLike[str]) -> str:
    """The file's text, read without blocking the master's loop (startup and `reload` both come here)."""
    name = os.fspath(path)
    try:
        data = files.read(name, MAX_FILE)
    except files.Refused as exc:
        raise ConfigError(name, 0, "", str(exc)) from None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raise ConfigError(name, 0, "", "cannot read: not UTF-8 text") from None


def compose(text: str, path: str) -> yaml.Node | None:
    try:
        # Building nodes costs ~10 times what parsing does (pyyaml resolves each scalar's tag in
        # Python): count first, and compose only a file of sane size.
        for count, event in enumerate(yaml.parse(text, Loader=LOADER)):
            if count >= MAX_EVENTS:
                line = event.start_mark.line + 1 if event.start_mark else 0
                raise ConfigError(path, line, "", f"more than {MAX_EVENTS} YAML values and collections: not read "
                                  "(a config has a few hundred)")
        return yaml.compose(text, Loader=LOADER)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        raise ConfigError(path, mark.line + 1 if mark else 0, "", f"broken YAML: {exc.problem}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(path, 0, "", f"broken YAML: {exc}") from None
