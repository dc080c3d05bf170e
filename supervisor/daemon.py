"""`supervisord -c FILE`: run the master in the foreground until SIGTERM/SIGINT (or `shutdown`).

Exit status: 0 after a clean shutdown, 1 when the first generation or the migration setup failed,
2 for a bad command line or config file.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import sys

import structlog
import uvloop

from supervisor import __version__, config, limits, logs, preflight, upgrade
from supervisor.errors import EXIT_FAILED, EXIT_USAGE, ConfigError

log = structlog.get_logger()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="supervisord", description="Run web workers on SO_REUSEPORT listeners; reload with zero loss.",
        epilog="Signals: HUP reload, TERM/INT graceful stop, QUIT fast stop, USR1 reopen the log file, "
               "USR2 upgrade in place (as `supervisorctl upgrade`), TTIN/TTOU one worker more/less per program. "
               "Exit status: 0 clean stop, 1 start failed, 2 bad usage or config.")
    parser.add_argument("-c", "--config", required=True, help="YAML configuration file")
    parser.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    parser.add_argument("--log-format", choices=["console", "json"], help="default: console on a TTY, else json")
    parser.add_argument("--log-file", help="append logs here instead of stderr; SIGUSR1 reopens it")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument(upgrade.CHECK_OPTION, metavar="FORMAT", help=argparse.SUPPRESS)  # `supervisorctl upgrade`
    args = parser.parse_args(argv)
    if args.upgrade_check is not None:
        return upgrade.run_check(args.upgrade_check, args.config)
    limits.raise_soft_limit()  # workers, reloads and control connections all take fds (README, Hardening)
    try:
        logs.configure(args.log_level, None if args.log_format is None else args.log_format == "json", args.log_file)
    except OSError as exc:
        print(f"supervisord: --log-file {args.log_file}: {exc.strerror}", file=sys.stderr)
        return EXIT_USAGE
    state_fd = os.environ.pop(upgrade.STATE_ENV, None)  # set by the master this process was until its exec
    if state_fd is not None:
        return uvloop.run(_adopt(int(state_fd)))
    try:
        cfg = config.load(args.config)
    except ConfigError as exc:
        print(f"supervisord: {exc}", file=sys.stderr)
        return EXIT_USAGE
    return uvloop.run(_serve(cfg))


async def _serve(cfg: config.Config) -> int:
    from supervisor.master import Master  # imports the event loop machinery only once running

    report = preflight.check(cfg)  # what can fail without side effects: before anything starts
    for warning in report.warnings:
        log.warning("preflight_warning", warning=warning)
    if report.problems:
        for problem in report.problems:
            log.error("preflight_failed", problem=problem)
        return EXIT_USAGE
    return await Master(cfg).run(report.bundles)


async def _adopt(state_fd: int) -> int:
    """After `supervisorctl upgrade`: the same pid, its workers and sockets, and the state it wrote."""
    from supervisor import handover
    from supervisor.master import Master

    try:
        state = upgrade.read_state(state_fd)
        master = Master(handover.config_of(state))
        handover.restore(master, state)
    except Exception:
        # The check step makes this unlikely. The workers are this process's children and die with it
        # (parent-death signal): stay alive, say so loudly, and let the operator decide (TERM ends all).
        log.critical("upgrade_adopt_failed", exc_info=True,
                     advice="workers still serve; restart supervisord to take control of them again")
        await _wait_for_a_stop_signal()
        return EXIT_FAILED
    return await master.run(adopted=state)


async def _wait_for_a_stop_signal() -> None:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGQUIT):
        loop.add_signal_handler(signum, stop.set)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, (signal.SIGTERM, signal.SIGINT, signal.SIGQUIT))
    await stop.wait()


if __name__ == "__main__":
    sys.exit(main())
