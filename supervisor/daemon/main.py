"""`supervisord [-c FILE]`: run the master in the foreground until SIGTERM/SIGINT (or `shutdown`).

Exit status: 0 after a clean shutdown, 1 when the first generation or the migration setup failed,
2 for a bad command line or config file, or an installation shared with another distribution.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import socket
import sys
from typing import TYPE_CHECKING

import structlog

from supervisor import install
from supervisor.config import locate, schema
from supervisor.errors import EXIT_FAILED, EXIT_USAGE, ConfigError
from supervisor.model import preflight
from supervisor.process import reexec
from supervisor.protocol import framing
from supervisor.system import fdstore, limits, logs, priority

if TYPE_CHECKING:
    from supervisor.daemon.master import Master

log = structlog.get_logger()


def main(argv: list[str] | None = None) -> int:
    if install.refuse_if_mixed("supervisord"):  # before anything imports what another install replaced
        return EXIT_USAGE
    parser = argparse.ArgumentParser(
        prog="supervisord", description="Run web workers on SO_REUSEPORT listeners; reload with zero loss.",
        epilog="Signals: HUP reload, TERM/INT graceful stop, QUIT fast stop, USR1 reopen the log file, "
               "USR2 upgrade in place (as `supervisorctl upgrade`), TTIN/TTOU one worker more/less per program. "
               "Exit status: 0 clean stop, 1 start failed, 2 bad usage or config (or a mixed installation).")
    parser.add_argument("-c", "--config", help=f"YAML configuration file (default: ${locate.ENV}, else "
                                               f"{locate.DEFAULT_PATH})")
    parser.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    parser.add_argument("--log-format", choices=["console", "json"], help="default: console on a TTY, else json")
    parser.add_argument("--log-file", help="append logs here instead of stderr; SIGUSR1 reopens it")
    install.add_version_option(parser)
    parser.add_argument(reexec.CHECK_OPTION, metavar="FORMAT", help=argparse.SUPPRESS)  # `supervisorctl upgrade`
    args = parser.parse_args(argv)
    try:
        # Not after an upgrade's exec (the state names the config): a file gone meanwhile must not end
        # the process its workers are children of.
        if reexec.STATE_ENV not in os.environ:
            args.config = locate.locate(args.config)
    except ConfigError as exc:
        print(f"supervisord: {exc}", file=sys.stderr)
        return EXIT_USAGE
    if args.upgrade_check is not None:
        return _check_upgrade(args.upgrade_check, args.config)
    limits.raise_soft_limit()  # workers, reloads and control connections all take fds (docs/operations.md, Hardening)
    try:
        logs.configure(args.log_level, None if args.log_format is None else args.log_format == "json", args.log_file)
    except OSError as exc:
        print(f"supervisord: --log-file {args.log_file}: {exc.strerror}", file=sys.stderr)
        return EXIT_USAGE
    state_fd = os.environ.pop(reexec.STATE_ENV, None)  # set by the master this process was until its exec
    if state_fd is not None:
        return asyncio.run(_adopt(int(state_fd)))
    try:
        cfg = schema.load(args.config)
    except ConfigError as exc:
        print(f"supervisord: {exc}", file=sys.stderr)
        return EXIT_USAGE
    try:
        fdstore.announced(os.environ)  # a typo in the unit must not turn the store off unseen
    except ValueError as exc:
        print(f"supervisord: {exc}", file=sys.stderr)
        return EXIT_USAGE
    return asyncio.run(_serve(cfg))


def _check_upgrade(state_format: str, config_path: str) -> int:
    """`--upgrade-check`, run by the master about to exec this code: import everything the daemon runs,
    load the config, and say whether this code reads the state format; print the version and exit 0,
    or say why not and exit 1."""
    from supervisor import __version__

    try:
        from supervisor.daemon import master  # noqa: F401  # and with it every module the daemon runs

        schema.load(config_path)
        if not state_format.isdigit() or int(state_format) not in reexec.READABLE:
            print(f"this version reads state formats {', '.join(map(str, reexec.READABLE))}, "
                  f"not {state_format}", file=sys.stderr)
            return 1
    except Exception as exc:
        print(f"{type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    print(__version__)
    return 0


async def _serve(cfg: schema.Config) -> int:
    from supervisor.daemon.master import Master  # imports the event loop machinery only once running

    report = preflight.check(cfg)  # what can fail without side effects: before anything starts
    for warning in report.warnings:
        log.warning("preflight_warning", warning=warning)
    if report.problems:
        for problem in report.problems:
            log.error("preflight_failed", problem=problem)
        return EXIT_USAGE
    log.info("master_priority", result=priority.raise_master())  # kept across an upgrade's exec
    return await Master(cfg).run(report.bundles)


async def _adopt(state_fd: int) -> int:
    """After `supervisorctl upgrade`: the same pid, its workers and sockets, and the state it wrote."""
    from supervisor.daemon import handover
    from supervisor.daemon.master import Master

    state: dict[str, object] = {}
    master: Master | None = None
    try:
        state = reexec.read_state(state_fd)
        master = Master(handover.config_of(state))
        master.restore(handover.restored(state))
        return await master.run(adopted=state)
    except Exception as exc:
        # The check step makes this unlikely (it imports the new code, it does not adopt). The workers
        # are this process's children and die with it (parent-death signal): stay alive, say so
        # loudly, to the client that asked and to every later one, and let the operator decide (TERM
        # ends all).
        log.critical("upgrade_adopt_failed", exc_info=True,
                     advice="workers still serve; restart supervisord to take control of them again")
        reason = f"upgrade failed while the new code took over the state: {type(exc).__name__}: {exc}"
        _answer_upgrade(state, f"{reason}; the workers serve on, but supervisord takes no more requests: restart it")
        await _refuse_requests(master, state, f"{reason}; the workers serve on, but supervisord takes no requests "
                                              "until it is restarted")
        await _wait_for_a_stop_signal()
        return EXIT_FAILED


def _answer_upgrade(state: dict[str, object], error: str) -> None:
    """Tell the clients waiting for the upgrade, and those whose requests waited behind it (their
    connections crossed the exec), that it failed."""
    handed = state.get("requests")
    for request in handed if isinstance(handed, list) else []:
        fd = request.get("fd") if isinstance(request, dict) else None
        if isinstance(fd, int):
            try:
                os.write(fd, framing.encode({"ok": False, "error": error}))
            except OSError:
                pass  # it gave up, or the new code had answered it already


async def _refuse_requests(master: Master | None, state: dict[str, object], error: str) -> None:
    """Answer every later control request at once with `error`: nobody takes them any more, and a
    client (`status`, `systemctl reload`) would otherwise wait for its timeout."""
    from supervisor.daemon.control import ControlServer
    from supervisor.daemon.events import ControlRequest, Event

    def refuse(event: Event) -> None:
        if isinstance(event, ControlRequest):
            event.reply.finish(False, error)

    if master is not None and master.endpoints.control is not None:  # it serves the socket already
        master.endpoints.control.post = refuse
        return
    endpoints = state.get("endpoints")
    fd = endpoints.get("control_fd") if isinstance(endpoints, dict) else None
    if isinstance(fd, int):  # the failure came before the new code took its control socket over
        try:
            await ControlServer("", 0, refuse).start(socket.socket(fileno=fd))
        except OSError:
            pass  # not a socket after all: the clients wait for their timeout


async def _wait_for_a_stop_signal() -> None:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGQUIT):
        loop.add_signal_handler(signum, stop.set)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, (signal.SIGTERM, signal.SIGINT, signal.SIGQUIT))
    await stop.wait()


if __name__ == "__main__":
    sys.exit(main())
