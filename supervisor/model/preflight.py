"""Checks against the system before a config is used: everything that can fail without side effects.

The result lists problems (refuse the start or the reload), warnings (say them, go on) and what was
learnt on the way (the certificates as checked, which the workers get). Acting on it is the master's job.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass, field

from supervisor.config import tls
from supervisor.config.schema import Config, MigrateMode, Program
from supervisor.process import worker
from supervisor.system import accounts, holders, limits, migrate


@dataclass
class Preflight:
    problems: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    bundles: dict[str, tls.Bundle] = field(default_factory=dict)  # program -> its certificate and key


def check(config: Config, only: str | None = None) -> Preflight:
    """Check every program of `config`, or the one named `only` (`supervisorctl start`)."""
    report = Preflight()
    if fds := limits.problem(config, limits.soft_limit()):  # the whole config runs, whatever `only` starts
        report.problems.append(fds)
    sockets, ours = holders.listening(), holders.own_inodes()
    for program in config.programs:
        if only is not None and program.name != only:
            continue
        for problem in (_command_problem(program), _account_problem(program)):
            if problem:
                report.problems.append(f"{program.name}: {problem}")
        if not program.share_listen:
            report.problems += [f"{program.name}: {p}" for p in _foreign(program, sockets, ours)]
        if program.tls is not None:
            try:
                bundle = tls.load(program.tls.cert, program.tls.key)
            except tls.TlsError as exc:
                report.problems.append(f"{program.name}: tls: {exc}")
                continue
            report.bundles[program.name] = bundle
            cert = bundle.certificate
            if cert.days_left() < program.tls.warn_days:
                report.warnings.append(f"{program.name}: tls: {program.tls.cert} expires in "
                                       f"{cert.days_left():.1f} days ({cert.not_after:%Y-%m-%d %H:%M} UTC)")
    return report


def _foreign(program: Program, sockets: list[holders.Socket], ours: set[int]) -> list[str]:
    """Its addresses that another process listens on. One we listen on already (a reload, the fd store,
    an upgrade) is not looked at again: a reload changes nothing there."""
    fresh = [listen for listen in program.listen
             if not any(s.inode in ours and holders.overlaps(listen, s) and str(s) == str(listen) for s in sockets)]
    return holders.problems(fresh, sockets, ours)


def migration_problem(mode: MigrateMode, sysctl: str = migrate.SYSCTL) -> str | None:
    """Why `mode` could not be applied, found without changing the sysctl (a reload may roll back).

    Only `require` can fail; a reload that switches to it is refused here, before anything starts,
    and the sysctl is set once the new generation is ready.
    """
    if mode is not MigrateMode.REQUIRE or migrate.read_sysctl(sysctl) == "1":
        return None
    if problem := migrate.absent(sysctl):
        return f"migrate: require, but {problem}"
    name = migrate.sysctl_name(sysctl)
    # access(2) asks the sysctl's own permission hook (CAP_NET_ADMIN over the namespace) and the mount.
    if os.access(sysctl, os.W_OK):
        return None
    why = "read-only /proc/sys" if os.statvfs(sysctl).f_flag & os.ST_RDONLY else "needs root or CAP_NET_ADMIN"
    return f"migrate: require, but cannot set {name}=1 ({why})"


def _account_problem(program: Program) -> str | None:
    if not os.path.exists(worker.SETPRIV):
        return f"{worker.SETPRIV} is missing (Debian package util-linux): it starts every worker"
    try:
        if program.user is not None:
            accounts.account(program.user)
    except KeyError:
        return f"user {program.user!r} does not exist"
    try:
        if program.group is not None:
            accounts.group_id(program.group)
    except KeyError:
        return f"group {program.group!r} does not exist"
    return None


def _command_problem(program: Program) -> str | None:
    cwd = program.cwd
    if not os.path.isdir(cwd):
        return f"cwd {cwd} is not a directory"
    command = program.command[0]
    path = dict(program.env).get("PATH", os.environ.get("PATH", os.defpath))
    if "/" in command:
        found = os.path.join(cwd, command)
        if not (os.path.isfile(found) and os.access(found, os.X_OK)):
            return f"command {command} is not an executable file"
    elif shutil.which(command, path=path) is None:
        return f"command {command!r} not found in PATH"
    return None
