"""The YAML configuration file, validated into frozen dataclasses. Pure: no sockets, no processes.

Every error is one ConfigError naming the file, the line and the dotted key:
`config/prod.yaml:14: programs.web.workers: expected an integer, got "two"`. The file is walked as
pyyaml nodes (not loaded into dicts) so that every value keeps its line, and duplicate keys, which
pyyaml would silently merge, are refused.
"""

from __future__ import annotations

import enum
import ipaddress
import math
import os
import re
import shlex
import signal
import socket
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import yaml

from supervisor.config import files, unixpath
from supervisor.config.yamlfile import DEFAULT_SOCKET, MAX_FILE, control_socket, file_kind  # noqa: F401 (schema.MAX_FILE, schema.control_socket)
from supervisor.config.yamlfile import compose as _compose
from supervisor.config.yamlfile import read as _read
from supervisor.errors import ConfigError

_STR = "tag:yaml.org,2002:str"
_INT = "tag:yaml.org,2002:int"
_FLOAT = "tag:yaml.org,2002:float"
_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*")
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_MODULE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*")
_PYTHON = re.compile(r"python[0-9.]*")
_HOSTNAME = re.compile(r"(?=.*[A-Za-z])[A-Za-z0-9-]+(\.[A-Za-z0-9-]+)*")  # a name, not an IP address
_DURATION = re.compile(r"(\d+(?:\.\d*)?|\.\d+) ?(ms|s|m|h)")
_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}
HOSTS = "/etc/hosts"  # where a name in `listen` is looked up (never DNS: see listen_addresses)
_Choice = TypeVar("_Choice", bound=enum.Enum)
# A program's command and env after YAML aliases are expanded: an alias repeated a thousand times
# costs the file a few bytes each but the master a full copy in every worker's argv or environ.
MAX_ARGUMENT = 128 * 1024 - 1  # what execve() takes for one argument or variable (MAX_ARG_STRLEN)
MAX_COMMAND_ENV = 1 << 20  # bytes of command and env together
MAX_EXPANDED = 16 << 20  # the same for every program of the file (aliases can repeat a whole program)


class MigrateMode(enum.Enum):
    REQUIRE = "require"  # set tcp_migrate_req=1 or refuse to start
    PREFER = "prefer"  # set it where possible; drain the old listeners where not
    DRAIN = "drain"  # never touch the sysctl: steer new connections away, drain, then shut
    OFF = "off"  # never touch the sysctl, never drain: what the sysctl's value gives


@dataclass(frozen=True)
class Listen:
    host: str  # an IP literal; IPv6 without brackets
    port: int
    family: socket.AddressFamily

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if self.family == socket.AF_INET6 else f"{self.host}:{self.port}"

    @property
    def sockaddr(self) -> tuple[str, int]:
        return (self.host, self.port)


@dataclass(frozen=True)
class Tls:
    """Certificate (PEM, chain allowed) and key paths handed to the workers; checked at every reload."""

    cert: str
    key: str
    warn_days: int = 30  # warn when the certificate expires within this many days


class ReadyMode(enum.Enum):
    """How the master knows a new worker serves (docs/operations.md, "Readiness")."""

    NOTIFY = "notify"  # the worker sends READY=1 (sd_notify): exact
    ACCEPTING = "accepting"  # alive for `settle` s and polling every listener (epoll, /proc fdinfo)
    SETTLE = "settle"  # alive for `settle` s: the weakest, for servers that use neither


class Strategy(enum.Enum):
    """How a reload replaces a program's workers (docs/operations.md, "Rolling reloads and preloading")."""

    ALL_AT_ONCE = "all-at-once"  # a whole new generation, then the old one retires: peak 2N workers
    ROLLING = "rolling"  # `batch` workers at a time: peak N+batch workers


class AcceptQueue(enum.Enum):
    """Whose accept queue a connection waits in (docs/configuration.md, "One queue per worker or one shared")."""

    PER_WORKER = "per-worker"  # one listener per worker and address: the kernel hashes each connection to one
    SHARED = "shared"  # one listener per generation and address, inherited by all its workers


class OutputMode(enum.Enum):
    """Where a worker's stdout goes (docs/logs.md)."""

    LOG = "log"  # a pipe to the master: logged as `worker_stdout` events, kept for `tail`
    INHERIT = "inherit"  # supervisord's own stdout, raw (as systemd's StandardOutput=inherit)


@dataclass(frozen=True)
class LogLimit:
    """`log_limit:` what one program's workers may write into supervisord's log (docs/logs.md).

    A token bucket per program: `lines` lines and `bytes` bytes per second sustained, and up to
    `burst` seconds' worth of both at once after a quiet spell. What is over it is not logged (a
    `worker_output_dropped` event counts it) but still kept for `tail`."""

    lines: int = 1000
    bytes: int = 1 << 20
    burst: float = 10.0


# Placeholders a command may contain; replaced per worker when it starts.
PLACEHOLDERS = ("{tls.cert}", "{tls.key}")


@dataclass(frozen=True)
class Program:
    name: str
    command: tuple[str, ...]
    workers: int = 1
    listen: tuple[Listen, ...] = ()
    ready_timeout: float = 10.0
    graceful_timeout: float = 30.0
    # Seconds between shutting a retiring worker's listeners and its stop signal: it reads what it
    # accepted just before (uvicorn closes connections without a parsed request at once on TERM).
    stop_delay: float = 0.5
    # Without migration: the longest a retiring listener is drained (new connections steered away,
    # its queue accepted by its worker) before it is shut anyway, counting what it still held.
    drain_timeout: float = 10.0
    backlog: int = 1024
    stop_signal: signal.Signals = signal.SIGTERM
    env: tuple[tuple[str, str], ...] = ()
    cwd: str = "."  # the config file's folder unless set
    tls: Tls | None = None
    user: str | None = None  # run workers as this user (the master stays root to bind and migrate)
    group: str | None = None
    umask: int | None = None
    ready: ReadyMode = ReadyMode.NOTIFY
    settle: float = 1.0  # seconds alive before `accepting`/`settle` readiness counts
    crash_limit: int = 5  # this many crashes of the program's workers within crash_window: FATAL
    crash_window: float = 60.0
    max_rss: int | None = None  # bytes; a worker above it is replaced (zero-loss recycling)
    max_age: float | None = None  # seconds; a worker older than this is replaced
    strategy: Strategy = Strategy.ALL_AT_ONCE
    batch: int = 1  # workers replaced at a time by a rolling reload
    preload: tuple[str, ...] = ()  # modules a per-generation template imports; workers fork from it
    accept_queue: AcceptQueue = AcceptQueue.SHARED  # docs/benchmarks.md: the lower p99 with and without reloads
    preload_spare: bool = True  # with preload: the next generation's template is started ahead, idle
    share_listen: bool = False  # another process's listener on a listen address is refused unless set
    stdout: OutputMode = OutputMode.LOG
    log_limit: LogLimit = LogLimit()


@dataclass(frozen=True)
class Control:
    socket: str
    mode: int = 0o600


@dataclass(frozen=True)
class Metrics:
    """`metrics:` the HTTP endpoint of /metrics, /healthz and /readyz (off unless set)."""

    listen: Listen


@dataclass(frozen=True)
class Config:
    path: str
    control: Control
    migrate: MigrateMode = MigrateMode.REQUIRE
    programs: tuple[Program, ...] = ()
    watch: tuple[str, ...] = ()  # files whose new content means a reload (system/watched_files.py)
    metrics: Metrics | None = None

    def program(self, name: str) -> Program:
        for program in self.programs:
            if program.name == name:
                return program
        raise KeyError(name)


def parse_listen(text: str) -> Listen:
    """"127.0.0.1:8000" or "[::1]:8000"; ValueError says what is wrong."""
    host, sep, port = text.rpartition(":")
    bracketed = host.startswith("[") and host.endswith("]")
    try:
        ip = ipaddress.ip_address(host[1:-1] if bracketed else host)
    except ValueError:
        ip = None
    if not sep or ip is None or (ip.version == 6) != bracketed:
        raise ValueError(f'expected "HOST:PORT" or "[IPV6]:PORT" with an IP address, got "{text}"')
    if not port.isdigit() or not 1 <= int(port) <= 65535:
        raise ValueError(f"port must be 1..65535 (every worker binds the same port), got {port!r}")
    family = socket.AF_INET6 if ip.version == 6 else socket.AF_INET
    return Listen(str(ip), int(port), family)


def listen_addresses(text: str, lookup: Callable[[str], tuple[str, ...]]) -> tuple[Listen, ...]:
    """What one `listen` entry names: an IP address ("127.0.0.1:8000", "[::1]:8000"); ":8000" or
    "*:8000", every IPv4 address (nginx's `listen 8000`); or a name ("localhost:8000"), each address
    `lookup` gives it, in its order (nginx binds every address a name resolves to). ValueError says
    what is wrong."""
    host, sep, port = text.rpartition(":")
    if sep and host in ("", "*"):
        return (parse_listen(f"0.0.0.0:{port}"),)
    if not sep or not _HOSTNAME.fullmatch(host):
        return (parse_listen(text),)
    found = lookup(host)
    if not found:
        raise ValueError(f'"{host}" has no address in {HOSTS} (names are looked up there only, never in DNS); '
                         "add it there or write the IP address")
    return tuple(parse_listen(f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}") for ip in found)


def hosts_file(name: str) -> tuple[str, ...]:
    """The addresses HOSTS gives `name`, in its order; `localhost` without an entry there has
    127.0.0.1 and ::1 (RFC 6761). Not the resolver: the master reads its config in its loop, at
    every reload, and a DNS query there would stall it for the resolver's timeouts. Read by the rules
    of every file the master reads (files.py); ValueError when it cannot be (a missing file is empty)."""
    try:
        text = files.read(HOSTS).decode("utf-8", "replace") if os.path.lexists(HOSTS) else ""
    except files.Refused as exc:
        raise ValueError(f"{HOSTS}, where names are looked up: {exc}; write the IP address") from None
    found = []
    for line in text.splitlines():
        fields = line.partition("#")[0].split()
        if len(fields) >= 2 and name.lower() in (alias.lower() for alias in fields[1:]):
            try:
                found.append(str(ipaddress.ip_address(fields[0])))
            except ValueError:
                continue
    if not found and name.lower() == "localhost":
        found = ["127.0.0.1", "::1"]
    return tuple(dict.fromkeys(found))


def python_main(command: tuple[str, ...]) -> tuple[str, str, tuple[str, ...]] | None:
    """What a `python -m MODULE ARGS` or `python SCRIPT.py ARGS` command runs as __main__:
    ("module" | "script", the module or script, its arguments); None for any other command."""
    if len(command) < 2 or not _PYTHON.fullmatch(os.path.basename(command[0])):
        return None
    if command[1] == "-m" and len(command) >= 3 and _MODULE.fullmatch(command[2]):
        return "module", command[2], command[3:]
    if command[1].endswith(".py"):
        return "script", command[1], command[2:]
    return None


def load(path: str | os.PathLike[str]) -> Config:
    """Read and validate a config file."""
    return parse(_read(path), os.fspath(path))


def parse(text: str, path: str) -> Config:
    """Validate config text; `path` names it in errors and anchors relative paths."""
    return _Reader(path).config(_compose(text, path))


Fields = dict[str, tuple[yaml.Node, yaml.Node]]  # key -> (key node, value node)


class _Reader:
    """Turns nodes into values; every method raises ConfigError at the node that is wrong."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.folder = os.path.dirname(os.path.abspath(path))
        self.expanded = 0  # bytes of command and env of the programs read so far (aliases expanded)
        self.names: dict[str, tuple[str, ...]] = {}  # names in `listen` looked up so far (hosts_file)

    def fail(self, node: yaml.Node | None, key: str, problem: str) -> ConfigError:
        return ConfigError(self.path, node.start_mark.line + 1 if node is not None else 0, key, problem)

    def config(self, root: yaml.Node | None) -> Config:
        fields = self.mapping(root, "", allowed=("control", "metrics", "migrate", "programs", "watch"),
                              optional=True)
        control = Control(socket=self.resolve(DEFAULT_SOCKET))
        if "control" in fields:
            control = self.control(fields["control"][1])
        migrate = MigrateMode.REQUIRE
        if "migrate" in fields:
            migrate = self.choice(fields["migrate"][1], "migrate", MigrateMode)
        if "programs" not in fields:
            raise self.fail(root, "programs", "required (a mapping of program name to settings)")
        programs_node = fields["programs"][1]
        programs = tuple(self.program(name, key_node, node)
                         for name, (key_node, node) in self.mapping(programs_node, "programs").items())
        if not programs:
            raise self.fail(programs_node, "programs", "at least one program is required")
        self.check_shared_addresses(programs, programs_node)
        metrics = self.metrics(fields["metrics"][1]) if "metrics" in fields else None
        if metrics is not None and (owner := next((p.name for p in programs if metrics.listen in p.listen), None)):
            raise self.fail(fields["metrics"][1], "metrics.listen", f"{metrics.listen} is used by program {owner}")
        watch = self.watch(fields["watch"][1]) if "watch" in fields else ()
        return Config(path=os.path.abspath(self.path), control=control, migrate=migrate, programs=programs,
                      metrics=metrics, watch=watch)

    def watch(self, node: yaml.Node) -> tuple[str, ...]:
        """Files to watch: each must be there now, and a regular file once symlinks are followed."""
        items = [node] if isinstance(node, yaml.ScalarNode) else self.sequence(node, "watch")
        paths = []
        for i, item in enumerate(items):
            key = f"watch[{i}]" if isinstance(node, yaml.SequenceNode) else "watch"
            path = self.path_value(item, key)
            try:
                kind = file_kind(os.stat(path).st_mode)
            except OSError as exc:
                raise self.fail(item, key, f"{path}: {exc.strerror}") from None
            if kind:
                raise self.fail(item, key, f"{path}: not a regular file ({kind})")
            paths.append(path)
        return tuple(dict.fromkeys(paths))

    def control(self, node: yaml.Node) -> Control:
        fields = self.mapping(node, "control", allowed=("socket", "mode"), optional=True)
        sock = self.path_value(fields["socket"][1], "control.socket") if "socket" in fields else \
            self.resolve(DEFAULT_SOCKET)
        if "socket" in fields and (problem := unixpath.problem(sock)) is not None:
            raise self.fail(fields["socket"][1], "control.socket", f"{sock}: {problem}")
        mode = self.octal(fields["mode"][1], "control.mode", 0o777) if "mode" in fields else 0o600
        return Control(socket=sock, mode=mode)

    def metrics(self, node: yaml.Node) -> Metrics:
        fields = self.mapping(node, "metrics", allowed=("listen",))
        if "listen" not in fields:
            raise self.fail(node, "metrics.listen", 'required (an address such as "127.0.0.1:9150")')
        return Metrics(listen=self.address(fields["listen"][1], "metrics.listen"))

    def program(self, name: str, key_node: yaml.Node, node: yaml.Node) -> Program:
        key = f"programs.{name}"
        if not _NAME.fullmatch(name):
            raise self.fail(key_node, key, "program names use letters, digits, '_', '.', '-'")
        readers: dict[str, Callable[[yaml.Node, str], Any]] = {
            "command": self.command, "workers": lambda n, k: self.integer(n, k, 1, 4096),
            "listen": self.listen, "ready_timeout": lambda n, k: self.number(n, k, positive=True),
            "graceful_timeout": lambda n, k: self.number(n, k, positive=False),
            "stop_delay": lambda n, k: self.number(n, k, positive=False),
            "drain_timeout": lambda n, k: self.number(n, k, positive=False),
            "backlog": lambda n, k: self.integer(n, k, 1, 65535), "stop_signal": self.signal,
            "env": self.env, "cwd": self.path_value, "tls": self.tls,
            "user": self.string, "group": self.string, "umask": lambda n, k: self.octal(n, k, 0o777),
            "ready": lambda n, k: self.choice(n, k, ReadyMode),
            "settle": lambda n, k: self.number(n, k, positive=False),
            "crash_limit": lambda n, k: self.integer(n, k, 1, 1000),
            "crash_window": lambda n, k: self.number(n, k, positive=True),
            "max_rss": self.size, "max_age": lambda n, k: self.number(n, k, positive=True),
            "strategy": lambda n, k: self.choice(n, k, Strategy), "batch": lambda n, k: self.integer(n, k, 1, 4096),
            "preload": self.modules, "preload_spare": self.boolean, "share_listen": self.boolean,
            "accept_queue": lambda n, k: self.choice(n, k, AcceptQueue),
            "stdout": lambda n, k: self.choice(n, k, OutputMode),
            "log_limit": self.log_limit,
        }
        fields = self.mapping(node, key, allowed=tuple(sorted(readers)))
        for required in ("command", "listen"):
            if required not in fields:
                raise self.fail(node, f"{key}.{required}", "required")
        values = {name: readers[name](value, f"{key}.{name}") for name, (_k, value) in fields.items()}
        self.bounded(key, fields, values["command"], values.get("env", ()))
        if "tls" not in values:
            for placeholder in PLACEHOLDERS:
                if any(placeholder in arg for arg in values["command"]):
                    raise self.fail(fields["command"][1], f"{key}.command",
                                    f"uses {placeholder} but {key}.tls is not set")
        if values.get("preload") and python_main(values["command"]) is None:
            raise self.fail(fields["preload"][1], f"{key}.preload",
                            "needs a command that runs Python: `python -m MODULE ...` or `python SCRIPT.py ...`")
        values.setdefault("cwd", self.folder)  # a worker runs in the config file's folder by default
        return Program(name=name, **values)

    def bounded(self, key: str, fields: Fields, command: tuple[str, ...], env: tuple[tuple[str, str], ...]) -> None:
        """Refuse a command or env that YAML aliases blow up: what the worker's execve() would get."""
        sizes: dict[str, int] = {}  # an alias repeats one string object: encode it once

        def size(text: str) -> int:
            if text not in sizes:
                sizes[text] = len(text.encode("utf-8", "surrogatepass"))
            return sizes[text]

        total = 0
        for i, arg in enumerate(command):
            if size(arg) > MAX_ARGUMENT:
                raise self.fail(fields["command"][1], f"{key}.command[{i}]",
                                f"{size(arg)} bytes; execve() takes at most {MAX_ARGUMENT} per argument")
            total += size(arg) + 1
        where = "command"
        for name, value in env:
            if size(value) > MAX_ARGUMENT:
                raise self.fail(fields["env"][1], f"{key}.env.{name}",
                                f"{size(value)} bytes; execve() takes at most {MAX_ARGUMENT} per variable")
            if total <= MAX_COMMAND_ENV:
                where = "env"
            total += len(name) + size(value) + 2
        self.expanded += total
        if total > MAX_COMMAND_ENV or self.expanded > MAX_EXPANDED:
            whose = "" if total > MAX_COMMAND_ENV else f" (every program so far: {self.expanded})"
            raise self.fail(fields[where][1], f"{key}.{where}",
                            f"command and env expand to {total} bytes{whose} with YAML aliases; "
                            f"at most {MAX_COMMAND_ENV} per program and {MAX_EXPANDED} in all")

    def tls(self, node: yaml.Node, key: str) -> Tls:
        fields = self.mapping(node, key, allowed=("cert", "key", "warn_days"))
        for required in ("cert", "key"):
            if required not in fields:
                raise self.fail(node, f"{key}.{required}", "required (a PEM file)")
        warn_days = self.integer(fields["warn_days"][1], f"{key}.warn_days", 0, 3650) if "warn_days" in fields else 30
        return Tls(cert=self.path_value(fields["cert"][1], f"{key}.cert"),
                   key=self.path_value(fields["key"][1], f"{key}.key"), warn_days=warn_days)

    def log_limit(self, node: yaml.Node, key: str) -> LogLimit:
        fields = self.mapping(node, key, allowed=("bytes", "burst", "lines"))
        values: dict[str, Any] = {}
        if "lines" in fields:
            values["lines"] = self.integer(fields["lines"][1], f"{key}.lines", 1, 1_000_000)
        if "bytes" in fields:
            values["bytes"] = self.size(fields["bytes"][1], f"{key}.bytes", least=1024)
        if "burst" in fields:
            values["burst"] = self.number(fields["burst"][1], f"{key}.burst", positive=True)
        return LogLimit(**values)

    # -- value readers ------------------------------------------------------------------------

    def mapping(self, node: yaml.Node | None, key: str, allowed: tuple[str, ...] | None = None,
                optional: bool = False) -> Fields:
        if node is None or (optional and node.tag == "tag:yaml.org,2002:null"):
            return {}
        if not isinstance(node, yaml.MappingNode):
            raise self.fail(node, key or "(top level)", f"expected a mapping, got {_show(node)}")
        fields: Fields = {}
        for key_node, value in node.value:
            sub = f"{key}.{key_node.value}" if key else str(key_node.value)
            if key_node.tag != _STR:
                raise self.fail(key_node, sub, "keys must be strings")
            if key_node.value in fields:
                raise self.fail(key_node, sub, "duplicate key")
            if allowed is not None and key_node.value not in allowed:
                raise self.fail(key_node, sub, f"unknown key; expected one of: {', '.join(allowed)}")
            fields[key_node.value] = (key_node, value)
        return fields

    def string(self, node: yaml.Node, key: str) -> str:
        if not isinstance(node, yaml.ScalarNode) or node.tag != _STR or not node.value:
            raise self.fail(node, key, f"expected a non-empty string, got {_show(node)}")
        return str(node.value)

    def integer(self, node: yaml.Node, key: str, low: int, high: int) -> int:
        value = _construct(node) if isinstance(node, yaml.ScalarNode) and node.tag == _INT else None
        if value is None:
            raise self.fail(node, key, f"expected an integer, got {_show(node)}")
        if not low <= value <= high:
            raise self.fail(node, key, f"expected an integer from {low} to {high}, got {value}")
        return int(value)

    def number(self, node: yaml.Node, key: str, positive: bool) -> float:
        """Seconds: a number, or a duration as nginx and Go write them: "500ms", "30s", "2m", "1h"."""
        value: float | None = None
        if isinstance(node, yaml.ScalarNode) and node.tag in (_INT, _FLOAT):
            value = _construct(node)
        elif isinstance(node, yaml.ScalarNode) and node.tag == _STR and (match := _DURATION.fullmatch(node.value)):
            value = float(match[1]) * _UNITS[match[2]]
        if value is None or not _finite(value):
            raise self.fail(node, key, f'expected a number of seconds, got {_show(node)} (or a duration: "500ms", '
                                       '"30s", "2m", "1h")')
        if not (value > 0 if positive else value >= 0) or value > 86400:
            raise self.fail(node, key, f"expected {'more than' if positive else 'at least'} 0 seconds "
                                       f"(and at most a day), got {node.value}")
        return float(value)

    def boolean(self, node: yaml.Node, key: str) -> bool:
        if not isinstance(node, yaml.ScalarNode) or node.tag != "tag:yaml.org,2002:bool":
            raise self.fail(node, key, f"expected true or false, got {_show(node)}")
        return bool(yaml.SafeLoader("").construct_yaml_bool(node))

    def choice(self, node: yaml.Node, key: str, kind: type[_Choice]) -> _Choice:
        values = [m.value for m in kind]
        if not isinstance(node, yaml.ScalarNode) or node.value not in values:
            raise self.fail(node, key, f"expected one of {' | '.join(values)}, got {_show(node)}")
        return kind(node.value)

    def octal(self, node: yaml.Node, key: str, high: int) -> int:
        text = str(node.value) if isinstance(node, yaml.ScalarNode) else ""
        try:
            # YAML 1.1 reads 0600 as the integer 384 already; a string "0600" or "0o600" is octal.
            value = int(text) if node.tag == _INT and not text.startswith("0") else int(text, 8)
        except ValueError:
            value = -1
        if node.tag not in (_INT, _STR) or not 0 <= value <= high:
            raise self.fail(node, key, f'expected octal permission bits such as "0600", got {_show(node)}')
        return value

    def size(self, node: yaml.Node, key: str, least: int = 1 << 20) -> int:
        text = str(node.value).strip().upper() if isinstance(node, yaml.ScalarNode) else ""
        match = re.fullmatch(r"(\d+(?:\.\d+)?)\s*([KMG]?)I?B?", text)
        if not match or node.tag not in (_INT, _STR, _FLOAT):
            raise self.fail(node, key, f'expected a size such as "512M" or bytes, got {_show(node)}')
        value = int(float(match[1]) * 1024 ** " KMG".index(match[2] or " "))
        if value < least:
            shown = f"{least >> 20}M" if least >= 1 << 20 else f"{least >> 10}K"
            raise self.fail(node, key, f"expected at least {shown}, got {node.value}")
        return value

    def command(self, node: yaml.Node, key: str) -> tuple[str, ...]:
        if isinstance(node, yaml.ScalarNode) and node.tag == _STR:
            if len(node.value) > MAX_COMMAND_ENV:  # before shlex, which takes a second per MiB
                raise self.fail(node, key, f"{len(node.value)} characters; at most {MAX_COMMAND_ENV}")
            try:
                argv = shlex.split(node.value)
            except ValueError as exc:
                raise self.fail(node, key, f"cannot split the command: {exc}") from None
        else:
            argv = [self.string(item, f"{key}[{i}]") for i, item in enumerate(self.sequence(node, key))]
        if not argv:
            raise self.fail(node, key, "expected a non-empty command")
        return tuple(argv)

    def modules(self, node: yaml.Node, key: str) -> tuple[str, ...]:
        items = [node] if isinstance(node, yaml.ScalarNode) else self.sequence(node, key)
        names = tuple(self.string(item, f"{key}[{i}]") for i, item in enumerate(items))
        for i, name in enumerate(names):
            if not _MODULE.fullmatch(name):
                raise self.fail(items[i], f"{key}[{i}]", f'expected a module name such as "myapp.models", got "{name}"')
        return names

    def sequence(self, node: yaml.Node, key: str) -> list[yaml.Node]:
        if not isinstance(node, yaml.SequenceNode):
            raise self.fail(node, key, f"expected a list, got {_show(node)}")
        return list(node.value)

    def listen(self, node: yaml.Node, key: str) -> tuple[Listen, ...]:
        items = [node] if isinstance(node, yaml.ScalarNode) else self.sequence(node, key)
        if not items:
            raise self.fail(node, key, "expected at least one address")
        seen: dict[Listen, int] = {}
        for i, item in enumerate(items):
            sub = f"{key}[{i}]"
            for address in self.addresses(item, sub):  # a name may have several: each its own group
                if address in seen:
                    raise self.fail(item, sub, f"{address} is listed twice")
                seen[address] = i
        return tuple(seen)

    def addresses(self, node: yaml.Node, key: str) -> tuple[Listen, ...]:
        try:
            return listen_addresses(self.string(node, key), self.lookup)
        except ValueError as exc:
            raise self.fail(node, key, str(exc)) from None

    def lookup(self, name: str) -> tuple[str, ...]:
        if name not in self.names:
            self.names[name] = hosts_file(name)
        return self.names[name]

    def address(self, node: yaml.Node, key: str) -> Listen:
        """One address only (metrics): a name that has several is refused."""
        found = self.addresses(node, key)
        if len(found) > 1:
            raise self.fail(node, key, f"{node.value} names {len(found)} addresses ({', '.join(map(str, found))}); "
                                       "this key takes one: write it")
        return found[0]

    def signal(self, node: yaml.Node, key: str) -> signal.Signals:
        text = str(node.value).upper() if isinstance(node, yaml.ScalarNode) else ""
        try:
            return signal.Signals(int(text)) if text.isdigit() else signal.Signals["SIG" + text.removeprefix("SIG")]
        except (KeyError, ValueError):
            raise self.fail(node, key, f"expected a signal name such as TERM or QUIT, got {_show(node)}") from None

    def env(self, node: yaml.Node, key: str) -> tuple[tuple[str, str], ...]:
        pairs = []
        for name, (key_node, value) in self.mapping(node, key).items():
            if not _ENV_NAME.fullmatch(name):
                raise self.fail(key_node, f"{key}.{name}", "not a valid environment variable name")
            if not isinstance(value, yaml.ScalarNode) or value.tag not in (_STR, _INT, _FLOAT):
                raise self.fail(value, f"{key}.{name}", f"expected a string or number, got {_show(value)}")
            pairs.append((name, str(value.value)))
        return tuple(sorted(pairs))

    def path_value(self, node: yaml.Node, key: str) -> str:
        return self.resolve(self.string(node, key))

    def resolve(self, path: str) -> str:
        return os.path.normpath(os.path.join(self.folder, os.path.expanduser(path)))

    def check_shared_addresses(self, programs: tuple[Program, ...], node: yaml.Node) -> None:
        owner: dict[Listen, str] = {}
        for program in programs:
            for address in program.listen:
                if address in owner:
                    # One reuseport group would spread one program's connections over the other's workers.
                    raise self.fail(node, f"programs.{program.name}.listen",
                                    f"{address} is already used by program {owner[address]}")
                owner[address] = program.name


def _construct(node: yaml.ScalarNode) -> int | float | None:
    """An int or float scalar as YAML 1.1 reads it (0x10, 1:30 = 90, 1_000, .inf, .nan); None where
    pyyaml's resolver tagged text that its own constructor cannot read (0x_)."""
    loader = yaml.SafeLoader("")
    try:
        value = loader.construct_yaml_int(node) if node.tag == _INT else loader.construct_yaml_float(node)
    except (ValueError, IndexError):  # IndexError: an explicitly tagged empty scalar (!!int "")
        return None
    return value if isinstance(value, int | float) else None


def _show(node: yaml.Node | None) -> str:
    """How a wrong value reads in an error: the text for scalars, the kind for the rest."""
    if isinstance(node, yaml.ScalarNode):
        if node.tag == _STR:
            return f'"{node.value}"'
        return {"tag:yaml.org,2002:null": "nothing", "tag:yaml.org,2002:bool": f"a boolean ({node.value})"}.get(
            node.tag, str(node.value))
    if isinstance(node, yaml.MappingNode):
        return "a mapping"
    return "a list" if isinstance(node, yaml.SequenceNode) else "nothing"


def _finite(value: float) -> bool:
    """A number of seconds a float can hold (a 400-digit integer cannot: OverflowError)."""
    try:
        return math.isfinite(float(value))
    except OverflowError:
        return False
