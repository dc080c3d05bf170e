"""`supervisorctl`: talk to a running supervisord through its control socket.

Exit status (a contract): 0 done; 1 the daemon refused or rolled back the request (the reason is
printed); 2 bad command line or unreadable config (or an installation shared with another distribution);
3 no daemon answers on the control socket; 141 the output's pipe was closed (as a shell reports SIGPIPE).
"""

from __future__ import annotations

import _socket
import os
import sys
import time

# Only what a command needs: the framing (not the requests' dataclasses); argparse (arguments.py) only
# for a command line quick_args does not read; the table (status, without psutil) only for status;
# pyyaml (yamlfile, not the config model) only for a -c file that socketpath cannot read alone.
# Measured: bench's footprint part.
from supervisor import install
from supervisor.config import socketpath
from supervisor.config.locate import locate
from supervisor.errors import EXIT_FAILED, EXIT_OK, EXIT_UNREACHABLE, EXIT_USAGE, ConfigError, ControlError
from supervisor.protocol import framing
from supervisor.system import unixsocket

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (supervisorctl's start: bench footprint)
if TYPE_CHECKING:
    from collections.abc import Iterator
    from typing import Any, NoReturn

# The plain forms quick_args reads: each command with how many PROGRAM words it takes (fewest, most; None: any).
QUICK_COMMANDS = {"status": (0, 1), "reload": (0, None), "start": (1, 1), "restart": (1, 1), "stop": (1, 1),
                  "shutdown": (0, 0), "upgrade": (0, 0), "version": (0, 0)}
EXIT_SIGPIPE = 128 + 13  # what a shell reports for a command that a closed pipe ended (SIGPIPE)
QUICK_OPTIONS = {"-c": "config", "--config": "config", "-s": "socket", "--socket": "socket", "--timeout": "timeout"}
INFINITY = float("inf")  # math.inf, without math's import (a shared library: supervisorctl's start)


class Args:
    """A command line read by quick_args, as argparse.Namespace holds one (types.SimpleNamespace would cost
    supervisorctl's start the `types` module)."""

    def __init__(self, **values: Any) -> None:
        self.__dict__.update(values)


def quick_args(argv: list[str]) -> Args | None:
    """The command line in its plain forms, `[-c FILE | -s SOCKET] [--timeout SECONDS] COMMAND
    [PROGRAM...]`, read without argparse: what arguments.parse_args gives for it. None for anything
    else (help, --json, tail, scale, an option after the command, a word that starts with '-', an
    option twice, a bad number): parse_args reads it, and words any error (tests/unit/test_arguments.py
    holds the two against each other)."""
    found: dict[str, Any] = {"config": None, "socket": None, "version": None, "timeout": 600.0}
    given: set[str] = set()
    at = 0
    while at < len(argv) and argv[at] in QUICK_OPTIONS:
        key = QUICK_OPTIONS[argv[at]]
        if key in given or at + 1 == len(argv) or argv[at + 1][:1] in ("-", ""):
            return None
        given.add(key)
        found[key] = argv[at + 1]
        at += 2
    if {"config", "socket"} <= given or at == len(argv) or argv[at] not in QUICK_COMMANDS:
        return None
    command, words = argv[at], argv[at + 1:]
    fewest, most = QUICK_COMMANDS[command]
    if any(word[:1] in ("-", "") for word in words) or len(words) < fewest or (most is not None and len(words) > most):
        return None
    if "timeout" in given:
        try:
            found["timeout"] = float(found["timeout"])
        except ValueError:
            return None
        if not 0 < found["timeout"] < INFINITY:
            return None
    found["command"] = command
    if command in ("status", "reload", "start", "restart"):
        found["json"] = False  # the plain form: --json goes to argparse
    if command == "status":
        found["program"] = words[0] if words else ""
    elif command == "reload":
        found["programs"] = words
    elif fewest:
        found["program"] = words[0]
    return Args(**found)


def main(argv: list[str] | None = None) -> int:
    if install.refuse_if_mixed("supervisorctl"):  # one line instead of a traceback from a replaced file
        return EXIT_USAGE
    args: Any = quick_args(sys.argv[1:] if argv is None else argv)
    if args is None:
        from supervisor.ctl import arguments

        try:
            args = arguments.parse_args(argv)
        except SystemExit as exc:
            return EXIT_USAGE if exc.code else EXIT_OK
    try:
        path = args.socket or _control_socket(locate(args.config))
    except ConfigError as exc:
        print(f"supervisorctl: {exc}", file=sys.stderr)
        return EXIT_USAGE
    request: dict[str, Any] = {"command": args.command}
    if args.command in ("start", "restart", "stop", "scale", "tail") or (args.command == "status" and args.program):
        request["program"] = args.program
    if args.command == "scale":
        request["workers"] = args.workers
    if args.command == "reload" and args.programs:
        request["programs"] = args.programs
    if args.command == "tail":
        request.update(lines=args.lines, follow=args.follow)
        if args.stream:
            request["stream"] = args.stream
    if args.command == "version":
        print(f"supervisorctl (reuseport-supervisor) {install.version()}", flush=True)  # whether a daemon answers
    try:
        final = None
        # tail -f waits for lines as long as the user wants: --timeout bounds only the connect.
        as_json = getattr(args, "json", False)
        for message in exchange(path, request, args.timeout, forever=args.command == "tail" and args.follow):
            if "progress" in message:
                print(message["progress"], flush=True, file=sys.stderr if as_json else sys.stdout)
            elif "line" in message:
                print(message["line"], flush=True)
            else:
                final = message
    except KeyboardInterrupt:  # the end of `tail -f`
        return EXIT_OK
    except TimeoutError:
        # Connected (or stuck connecting) but no answer in time: the daemon may still be at work.
        print(f"supervisorctl: no answer from supervisord at {path} within {args.timeout:g} s "
              f"(the {args.command} may still be in progress; see `status`)", file=sys.stderr)
        return EXIT_UNREACHABLE
    except PermissionError:
        # The socket's mode (or a folder's) keeps this user out: a refusal, not a daemon that is gone.
        print(f"supervisorctl: permission denied on {path} (only root and the user supervisord runs as may "
              "use it)", file=sys.stderr)
        return EXIT_FAILED
    except OSError as exc:
        print(f"supervisorctl: cannot reach supervisord at {path}: {exc.strerror or exc}", file=sys.stderr)
        return EXIT_UNREACHABLE
    except ControlError as exc:
        print(f"supervisorctl: {exc}", file=sys.stderr)
        return EXIT_FAILED
    if final is None:
        print("supervisorctl: the daemon closed the connection without an answer", file=sys.stderr)
        return EXIT_FAILED
    if not final.get("ok"):
        print(f"supervisorctl: {args.command} failed: {final.get('error')}", file=sys.stderr)
        return EXIT_FAILED
    if as_json:
        import json

        print(json.dumps(final.get("data"), indent=2))
    elif args.command == "status":
        from supervisor.ctl import table

        print(table.render(final["data"]))
    elif args.command == "version":
        print(f"supervisord (reuseport-supervisor) {final['data']['version']}")
    elif args.command != "tail":
        print(final.get("message", "ok"))
    return EXIT_OK


def _control_socket(config: str) -> str:
    """The control socket the config file names: read without pyyaml where socketpath can (pyyaml's
    import is about half of this command's start), else by the daemon's reader."""
    if (quick := socketpath.control_socket(config)) is not None:
        return quick
    from supervisor.config import yamlfile

    return yamlfile.control_socket(config)


def exchange(path: str, request: dict[str, Any], timeout: float, forever: bool = False) -> Iterator[dict[str, Any]]:
    """Send one request; yield every message of the answer until the daemon closes (`forever`: no
    time limit once connected)."""
    # _socket: the C type socket.socket wraps. socket.py's own import (its enums, selectors) is a tenth
    # of this command's start, for nothing a unix stream with a timeout needs.
    sock = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM)
    try:
        sock.settimeout(timeout)
        _connect(sock, path, time.monotonic() + timeout)
        sock.sendall(framing.encode(request))
        if forever:
            sock.settimeout(None)
        buffer = b""
        while True:
            chunk = sock.recv(65536)
            *lines, buffer = (buffer + chunk).split(b"\n")
            if not chunk and buffer:
                lines.append(buffer)  # the last line, without its newline
            for line in lines:
                message = framing.decode(line)
                yield message
                if "ok" in message:
                    return
            if not chunk:
                return
    finally:
        sock.close()


def _connect(sock: _socket.socket, path: str, deadline: float) -> None:
    """connect(), waiting while the daemon's accept queue is full: a unix socket with a timeout
    fails at once then (EAGAIN), which is a busy daemon, not an absent one."""
    with unixsocket.address(path) as where:  # a path too long for an address: through its folder
        while True:
            try:
                sock.connect(where)
                return
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    raise TimeoutError from None
                time.sleep(0.01)


def run() -> NoReturn:
    """The `supervisorctl` command: main(), then the process ends without the interpreter's teardown,
    its output flushed. The teardown (every module freed) was about 8 ms of CPU, a fifth of the
    command; right after a reload, with the old workers stopping on every core, it stretched the
    command's end by hundreds of milliseconds after the answer had arrived."""
    try:
        code = main()
    except BrokenPipeError:  # `supervisorctl status | head`: the reader is gone, nothing is left to say
        os._exit(EXIT_SIGPIPE)
    try:
        sys.stdout.flush()
        sys.stderr.flush()
    except BrokenPipeError:
        os._exit(EXIT_SIGPIPE)
    except OSError:  # another failed write (a full disk): the usual teardown says so
        sys.exit(code)
    os._exit(code)


if __name__ == "__main__":
    run()
