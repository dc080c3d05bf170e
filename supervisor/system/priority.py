"""The master's share of the CPU against its workers' while they start.

Every worker runs in a session of its own, and with the kernel's autogroup scheduling (on where
/proc/sys/kernel/sched_autogroup_enabled is 1, the default of Debian's kernels) each session is one
scheduling group, and the groups share the CPU equally. While a reload starts 64 workers (an
interpreter and an import each: seconds of CPU on 2 cores) the master's session got 1/65 of it, and a
`status` waited for a CPU: p95 123-126 ms, up to 390 ms, of which the master ran 31-36 ms
(tests/scenarios/test_many_workers.py on a busy 2-core machine). With its session's autogroup at
nice -10 (sched(7), /proc/self/autogroup) the same test gave p95 64-91 ms, but a fresh CI run still
saw the master wait 163 ms for a CPU; at -20 it waits 4-43 ms. The workers' sessions keep
the default weight: they compete with each other as before, and the master uses little of what it
may take.

Only a master that leads its own session does this (systemd starts a service that way, and a
container's init is one): otherwise its session is a terminal's or a test runner's, not its own.
Lowering a nice value needs CAP_SYS_NICE (root). Without autogroup (a cgroup with the cpu controller
enabled schedules by cgroup instead) the write changes nothing, harmlessly.
"""

from __future__ import annotations

import os

AUTOGROUP = "/proc/self/autogroup"
NICE = -20


def raise_master() -> str:
    """Give the master's session more CPU weight than its workers'; returns what was done, or why not."""
    if os.getsid(0) != os.getpid():
        return "not a session leader: the session is not the master's own"
    try:
        with open(AUTOGROUP, "w") as f:
            f.write(str(NICE))
    except OSError as exc:  # EPERM without CAP_SYS_NICE, ENOENT on a kernel without autogroup
        return f"{AUTOGROUP}: {exc.strerror}"
    return f"session autogroup at nice {NICE}"
