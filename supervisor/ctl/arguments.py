"""supervisorctl's command line read by argparse: every form, `--help`, and every usage error in argparse's words.

main.py reads the plain forms itself (`main.quick_args`) and comes here for the rest: argparse's import
and the parser it builds (a dozen subcommands) are a sixth of the command's start.
"""

from __future__ import annotations

import argparse
import math
import os
import sys

from supervisor import install
from supervisor.config.locate import DEFAULT_PATH, ENV
from supervisor.ctl import table

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (supervisorctl's start: bench footprint)
if TYPE_CHECKING:
    from typing import Any

EPILOG = """commands:
  status [PROGRAM] [--json]
                      programs and their workers in one table (state, generation, pid, uptime, RSS,
                      CPU, restarts, listen addresses), the last reload, the migration mode; PROGRAM:
                      that program only
  reload [PROGRAM ...] [--json]
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
    install.add_version_option(parser)
    parser.add_argument("--timeout", type=_seconds, default=600.0, metavar="SECONDS",
                        help="how long to wait for the answer (default 600); then exit 3")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    status = sub.add_parser("status", epilog="states:\n" + table.states_help(),
                            formatter_class=argparse.RawDescriptionHelpFormatter,
                            description="Programs and their workers in one table; --json: every field "
                                        "(docs/status.md).")
    status.add_argument("program", nargs="?", default="", metavar="PROGRAM", help="only this program")
    status.add_argument("--json", action="store_true", help="the daemon's answer as JSON")
    answer_as_json = ("the final answer as JSON (generations, listeners closed, connections migrated, phases "
                      "in ms); progress lines go to stderr")
    reload = sub.add_parser("reload")
    reload.add_argument("programs", nargs="*", metavar="PROGRAM")
    for name in ("start", "restart"):
        sub.add_parser(name).add_argument("program")
    for command in (reload, sub.choices["start"], sub.choices["restart"]):
        command.add_argument("--json", action="store_true", help=answer_as_json)
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


