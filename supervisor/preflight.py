"""Checks against the system before a config is used: everything that can fail without side effects.

The result lists problems (refuse the start or the reload), warnings (say them, go on) and what was
learnt on the way (the certificates, for `status`). Acting on it is the master's job.
"""

from __future__ import annotations

import grp
import os
import pwd
import shutil
from dataclasses import dataclass, field

from supervisor import tls, worker
from supervisor.config import Config, Program


@dataclass
class Preflight:
    problems: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    certificates: dict[str, tls.Certificate] = field(default_factory=dict)  # program -> its certificate


def program_cwd(config: Config, program: Program) -> str:
    """A worker runs in its `cwd`, or else in the folder of the config file."""
    return program.cwd or os.path.dirname(config.path)


def check(config: Config) -> Preflight:
    report = Preflight()
    for program in config.programs:
        for problem in (_command_problem(config, program), _account_problem(program)):
            if problem:
                report.problems.append(f"{program.name}: {problem}")
        if program.tls is not None:
            try:
                cert = tls.inspect(program.tls.cert, program.tls.key)
            except tls.TlsError as exc:
                report.problems.append(f"{program.name}: tls: {exc}")
                continue
            report.certificates[program.name] = cert
            if cert.days_left() < program.tls.warn_days:
                report.warnings.append(f"{program.name}: tls: {program.tls.cert} expires in "
                                       f"{cert.days_left():.1f} days ({cert.not_after:%Y-%m-%d %H:%M} UTC)")
    return report


def _account_problem(program: Program) -> str | None:
    if not os.path.exists(worker.SETPRIV):
        return f"{worker.SETPRIV} is missing (Debian package util-linux): it starts every worker"
    try:
        if program.user is not None:
            pwd.getpwuid(int(program.user)) if program.user.isdigit() else pwd.getpwnam(program.user)
    except KeyError:
        return f"user {program.user!r} does not exist"
    try:
        if program.group is not None:
            grp.getgrgid(int(program.group)) if program.group.isdigit() else grp.getgrnam(program.group)
    except KeyError:
        return f"group {program.group!r} does not exist"
    return None


def _command_problem(config: Config, program: Program) -> str | None:
    cwd = program_cwd(config, program)
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
