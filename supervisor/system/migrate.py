"""net.ipv4.tcp_migrate_req: enable it per the configured mode, and read the kernel's counters.

With the sysctl at 1 (Linux 5.14+), closing or shutting down a member of a reuseport group moves its
accept queue and half-open handshakes to another member instead of resetting them. The value is
read when a listener closes and again when each in-flight handshake migrates, up to a minute later,
so it is set once at start and never cleared (docs/kernel.md §1). It is per network namespace.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from supervisor.config.schema import MigrateMode
from supervisor.errors import MigrateError

SYSCTL = "/proc/sys/net/ipv4/tcp_migrate_req"
NETSTAT = "/proc/net/netstat"


@dataclass(frozen=True)
class MigrateStatus:
    """What the master could do about migration, for logs and `status`."""

    mode: MigrateMode
    enabled: bool
    reason: str  # one line a person can act on

    @property
    def drains(self) -> bool:
        """Retiring listeners are drained before they are shut (model/drain.py): `drain`, or `prefer`
        where the sysctl could not be set."""
        return self.mode is MigrateMode.DRAIN or (self.mode is MigrateMode.PREFER and not self.enabled)


def enable(mode: MigrateMode, sysctl: str = SYSCTL) -> MigrateStatus:
    """Set the sysctl to 1 unless mode is off; raise MigrateError under `require` when it cannot."""
    if mode is MigrateMode.OFF:
        return MigrateStatus(mode, read_sysctl(sysctl) == "1", "migrate: off (sysctl left as it is)")
    if mode is MigrateMode.DRAIN:
        return MigrateStatus(mode, read_sysctl(sysctl) == "1", "migrate: drain (sysctl left as it is): old "
                             "listeners are drained, then shut")
    problem = _try_enable(sysctl)
    if problem is None:
        return MigrateStatus(mode, True, f"{sysctl_name(sysctl)} = 1")
    if mode is MigrateMode.REQUIRE:
        raise MigrateError(f"migrate: require, but {problem}")
    return MigrateStatus(mode, False, f"migrate: prefer, draining old listeners instead of migrating: {problem}")


def sysctl_name(sysctl: str) -> str:
    return sysctl.removeprefix("/proc/sys/").replace("/", ".")


def absent(sysctl: str) -> str | None:
    """Why the kernel cannot migrate at all, if it has no such sysctl."""
    if os.path.exists(sysctl):
        return None
    return f"this kernel has no {sysctl_name(sysctl)} (Linux 5.14 or newer is needed)"


def _try_enable(sysctl: str) -> str | None:
    name = sysctl_name(sysctl)
    if problem := absent(sysctl):
        return problem
    if read_sysctl(sysctl) == "1":
        return None
    try:
        with open(sysctl, "w") as f:
            f.write("1\n")
    except OSError as exc:
        hint = "read-only /proc/sys?" if exc.errno == 30 else "needs root or CAP_NET_ADMIN"
        return f"cannot set {name}=1: {exc.strerror} ({hint})"
    if read_sysctl(sysctl) != "1":
        return f"{name} did not keep the value 1"
    return None


def read_sysctl(path: str) -> str | None:
    """The sysctl's value, or None where it cannot be read."""
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return None


@dataclass(frozen=True)
class Counters:
    """TcpExt migration counters of this network namespace (55d444b310c6, Linux 5.14)."""

    success: int = 0
    failure: int = 0

    def __sub__(self, other: Counters) -> Counters:
        return Counters(self.success - other.success, self.failure - other.failure)


def tcp_ext(path: str = NETSTAT) -> dict[str, int]:
    """The TcpExt counters of this network namespace (empty where they cannot be read)."""
    try:
        with open(path) as f:
            lines = f.read().splitlines()
    except OSError:
        return {}
    for names, values in zip(lines[::2], lines[1::2], strict=False):
        if names.startswith("TcpExt:"):
            return {name: int(value) for name, value in zip(names.split()[1:], values.split()[1:], strict=False)}
    return {}


def counters(path: str = NETSTAT) -> Counters:
    """Read TCPMigrateReqSuccess/Failure; zeros where the kernel does not count them."""
    table = tcp_ext(path)
    return Counters(table.get("TCPMigrateReqSuccess", 0), table.get("TCPMigrateReqFailure", 0))
