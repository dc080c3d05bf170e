"""A process's resident memory and CPU time, from /proc/PID/statm and /proc/PID/stat.

`status` asks this for every worker, the metrics scrape and the `max_rss` check too. psutil's
`Process` reads three files and builds an object for each process: 8.6-8.9 ms of CPU for 95
processes against 3.3-3.8 ms here (measured side by side, twice, on a busy machine). A `status` of
128 workers costs the master 10.8 ms of CPU with this, against 17.0 ms with psutil (quiet machine,
medians of 5 rounds of 40 requests; docs/benchmarks.md). The worker is the master's child and not yet reaped while it
is alive, so its pid cannot name another process meanwhile.
"""

from __future__ import annotations

import os
from typing import NamedTuple

TICKS = os.sysconf("SC_CLK_TCK")
PAGE = os.sysconf("SC_PAGE_SIZE")
# Fields of /proc/PID/stat counted after the ")" that closes the command name (which may hold spaces),
# starting at field 3 (state): proc_pid_stat(5) numbers them 14 (utime) and 15 (stime). Its rss field
# (24) is not used: it read 27 pages short of statm's for the same idle process, and statm's resident
# pages are what ps, top and psutil show.
UTIME, STIME = 14 - 3, 15 - 3


class Usage(NamedTuple):
    rss: int  # bytes
    cpu: float  # seconds of user and system time


def usage(pid: int) -> Usage | None:
    """What process `pid` uses now; None once it is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
        with open(f"/proc/{pid}/statm", "rb") as f:
            resident = int(f.read().split()[1])
        fields = stat[stat.rindex(b")") + 2:].split()
        return Usage(resident * PAGE, (int(fields[UTIME]) + int(fields[STIME])) / TICKS)
    except (OSError, IndexError, ValueError):  # gone meanwhile: a read comes back empty or fails
        return None
