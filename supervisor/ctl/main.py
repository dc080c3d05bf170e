"""`supervisorctl`: talk to a running supervisord through its control socket.

Exit status (a contract): 0 done; 1 the daemon refused or rolled back the request (the reason is
printed); 2 bad command line or unreadable config (or an installation shared with another distribution);
3 no daemon answers on the control socket.
"""

from __future__ import annotations

import _socket
import argparse
import json
import math
import os
import sys
import time

# Only what a command needs: the framing (not the requests' dataclasses), the table (status, without
# psutil); pyyaml (yamlfile, not the config model) only for a -c file that socketpath cannot read alone.
# Measured: bench's footprint part.
from supervisor import install
from supervisor.config import socketpath
from supervisor.config.locate import DEFAULT_PATH, ENV, locate
from supervisor.ctl import table
from supervisor.errors import EXIT_FAILED, EXIT_OK, EXIT_UNREACHABLE, EXIT_USAGE, ConfigError, ControlError
from supervisor.protocol import framing
from supervisor.system import unixsocket

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (supervisorctl's start: bench footprint)
if TYPE_CHECKING:
    from collections.abc import Iterator
    from typing import Any, NoReturn

EPILOG = """commands:
  status [PROGRAM] [--json]
                      programs and their workers in one table (state, generation, pid, uptime, RSS,
                      CPU, restarts, listen addresses), the last reload, the migration mode; PROGRAM:
                      that program only
  reload [PROGRAM ...]
                      read the config file again and start new generations (of the named programs
                      only, if any; the others keep theirs), wait until ready, close the old listeners
  restart PROGRAM     replace a running program's workers by a new generation with the settings
                      supervisord runs now (the file is not read again), with zero loss as a reload
  start PROGRAM       start a stopped or FATAL program
  stop PROGRAM        stop a program (its workers finish what they accepted)
  scale PROGRAM N     run N workers of a running program (until the next reload)
  shutdown            stop every program and the daemon
  upgrade             run the installed code in the same process (same pid; workers and sockets kept)
  tail [-n N] [-f] PROGRAM [stdout|stderr]
                      the last N (default 10) lines the program's workers wrote, both streams in the
                      order supervisord read them, or only the one named; -f: then follow until Ctrl-C
  version             this supervisorctl's version and the running supervisord's
  help [COMMAND]      this help, or a command's

states (the STATE column, for programs and workers alike):
""" + table.states_help() + """

the config file (to find the control socket): -c FILE, else $SUPERVISOR_CONFIG, else
""" + DEFAULT_PATH + """; -s SOCKET names the control socket itself

exit status: 0 done, 1 refused or rolled back (reason printed), 2 usage or config error (or an
installation shared with another distribution), 3 no supervisord answers on the control socket"""


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = _Parser(prog="supervisorctl", epilog=EPILOG,
                     formatter_class=argparse.RawDescriptionHelpFormatter)
    where = parser.add_mutually_exclusive_group()
    where.add_argument("-c", "--config", help=f"the daemon's YAML file, to find its control socket (default: "
                                              f"${ENV}, else {DEFAULT_PATH})")
    where.add_argument("-s", "--socket", help="the control socket itself")
    parser.add_argument("--version", action=install.PrintVersion)
    parser.add_argument("--timeout", type=_seconds, default=600.0, metavar="SECONDS",
                        help="how long to wait for the answer (default 600); then exit 3")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    status = sub.add_parser("status", epilog="states:\n" + table.states_help(),
                            formatter_class=argparse.RawDescriptionHelpFormatter,
                            description="Programs and their workers in one table; --json: every field "
                                        "(docs/status.md).")
    status.add_argument("program", nargs="?", default="", metavar="PROGRAM", help="only this program")
    status.add_argument("--json", action="store_true", help="the daemon's answer as JSON")
    sub.add_parser("reload").add_argument("programs", nargs="*", metavar="PROGRAM")
    sub.add_parser("start").add_argument("program")
    sub.add_parser("restart").add_argument("program")
    sub.add_parser("stop").add_argument("program")
    scale = sub.add_parser("scale")
    scale.add_argument("program")
    scale.add_argument("workers", type=int)
    sub.add_parser("shutdown")
    sub.add_parser("upgrade")
    sub.add_parser("version")
    tail = sub.add_parser("tail")
    tail.add_argument("-n", dest="lines", type=int, default=10, metavar="N")
    tail.add_argument("-f", dest="follow", action="store_true")
    tail.add_argument("program")
    tail.add_argument("stream", nargs="?", choices=("stdout", "stderr"), help="only this stream (default: both)")
    sub.add_parser("help").add_argument("topic", nargs="?", metavar="COMMAND", help="the help of this command")
    args = parser.parse_args(argv)
    if args.command == "help":  # as in Supervisor: `help`, `help COMMAND`
        choices = sub.choices
        if args.topic is not None and args.topic not in choices:
            parser.error(f"help: no command named {args.topic!r} (one of {', '.join(choices)})")
        (choices[args.topic] if args.topic else parser).print_help()
        parser.exit()
    return args


class _Parser(argparse.ArgumentParser):
    """argparse's parser, but its help formatter, which every add_argument makes, learns the terminal's
    width here, as shutil.get_terminal_size would: argparse imports shutil for it (and bz2, lzma and zlib
    with it) at every start, for a width only `--help` uses. The subcommands' parsers are of this class too."""

    def _get_formatter(self) -> argparse.HelpFormatter:
        make: Any = self.formatter_class  # a HelpFormatter class (typeshed's protocol names only `prog`)
        formatter: argparse.HelpFormatter = make(prog=self.prog, width=_columns() - 2)
        return formatter


def _columns() -> int:
    try:
        columns = int(os.environ["COLUMNS"])
    except (KeyError, ValueError):
        columns = 0
    if columns <= 0:
        try:
            columns = os.get_terminal_size(sys.__stdout__.fileno()).columns if sys.__stdout__ else 0
        except (ValueError, OSError):
            columns = 0
    return columns or 80


def _seconds(text: str) -> float:
    """A positive, finite number of seconds (socket.settimeout refuses the rest with a traceback)."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not 0 < value < math.inf:
        raise argparse.ArgumentTypeError(f"expected a positive number of seconds, got {text!r}")
    return value


def main(argv: list[str] | None = None) -> int:
    if install.refuse_if_mixed("supervisorctl"):  # one line instead of a traceback from a replaced file
        return EXIT_USAGE
    try:
        args = parse_args(argv)
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
        for message in exchange(path, request, args.timeout, forever=args.command == "tail" and args.follow):
            if "progress" in message:
                print(message["progress"], flush=True)
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
    if args.command == "status":
        print(json.dumps(final["data"], indent=2) if args.json else table.render(final["data"]))
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
    code = main()
    try:
        sys.stdout.flush()
        sys.stderr.flush()
    except OSError:  # a closed pipe: the usual teardown says so
        sys.exit(code)
    os._exit(code)


if __name__ == "__main__":
    run()
