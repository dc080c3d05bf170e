"""File descriptors: how many a config needs, and the master's limit.

Each worker costs the master one copy of each of its listeners, a pidfd and its output pipes, and a
reload holds two generations of every program until the old one has gone. A config or a `scale`
that cannot fit in RLIMIT_NOFILE is refused with the numbers, before anything starts: otherwise a
reload fails halfway with EMFILE, or `scale` starts fewer workers than it says.
"""

from __future__ import annotations

import resource
from collections.abc import Iterable, Mapping

from supervisor.config.schema import Config, OutputMode, Program

GENERATIONS = 2  # the serving generation and the one that replaces it, during a reload
# The master's own: stdio, log file, event loop, signal wake-up, notify and control sockets, control
# connections (control.MAX_CONNECTIONS + MAX_REFUSING), the metrics endpoint and its clients
# (metrics.MAX_CLIENTS), what a spawn opens for a moment (/dev/null, a pipe, a new worker's
# listeners), certificates read at a reload; rounded up.
MASTER_FDS = 160
NR_OPEN = "/proc/sys/fs/nr_open"  # the kernel's ceiling for RLIMIT_NOFILE


def per_worker(program: Program) -> int:
    """The master's fds for one worker: a listener copy per address, its pidfd, its stderr pipe and
    (`stdout: log`) its stdout pipe."""
    return len(program.listen) + 2 + (program.stdout is OutputMode.LOG)


def needed(programs: Iterable[Program], workers: Mapping[str, int] | None = None) -> int:
    """The fds the master needs to run `programs` and reload them once; `workers` overrides counts."""
    counts = workers or {}
    return MASTER_FDS + GENERATIONS * sum(per_worker(p) * counts.get(p.name, p.workers) for p in programs)


def problem(config: Config, limit: int, workers: Mapping[str, int] | None = None) -> str | None:
    """Why `config` (with `workers` for some programs) does not fit in `limit` open files, or None."""
    need = needed(config.programs, workers)
    if need <= limit:
        return None
    counts = workers or {}
    parts = " + ".join(f"{counts.get(p.name, p.workers)} x {per_worker(p)} ({p.name})" for p in config.programs)
    return (f"needs {need} file descriptors ({GENERATIONS} generations x [{parts}] + {MASTER_FDS} for the master), "
            f"but the limit (RLIMIT_NOFILE) is {limit}")


def scale_problem(config: Config, name: str, count: int, running: Mapping[str, int] | None = None,
                  limit: int | None = None) -> str | None:
    """Why `scale NAME COUNT` does not fit, or None. `running`: the programs' worker counts now (they
    may differ from the config's after an earlier scale); the next reload must fit too."""
    why = problem(config, soft_limit() if limit is None else limit, {**(running or {}), name: count})
    return f"scale {name} {count}: {why}" if why else None


def soft_limit() -> int:
    soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    return soft if soft != resource.RLIM_INFINITY else _nr_open()


def raise_soft_limit() -> tuple[int, int]:
    """Raise the soft RLIMIT_NOFILE to the hard one (systemd's default soft limit is 1024);
    returns (soft, hard) as they are now. An unlimited hard limit stops at the kernel's nr_open."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = _nr_open() if hard == resource.RLIM_INFINITY else hard
    if soft == resource.RLIM_INFINITY or soft >= target:
        return soft, hard
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    except (OSError, ValueError):
        return soft, hard
    return target, hard


def _nr_open() -> int:
    try:
        with open(NR_OPEN) as f:
            return int(f.read())
    except (OSError, ValueError):
        return 1 << 20
