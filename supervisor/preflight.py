"""Checks against the system before a config is used: everything that can fail without side effects.

Returns problems as lines; acting on them (refuse the start or the reload) is the master's job.
"""

from __future__ import annotations

import os
import shutil

from supervisor.config import Config, Program


def program_cwd(config: Config, program: Program) -> str:
    """A worker runs in its `cwd`, or else in the folder of the config file."""
    return program.cwd or os.path.dirname(config.path)


def check(config: Config) -> list[str]:
    problems = []
    for program in config.programs:
        cwd = program_cwd(config, program)
        if not os.path.isdir(cwd):
            problems.append(f"{program.name}: cwd {cwd} is not a directory")
            continue
        command = program.command[0]
        path = dict(program.env).get("PATH", os.environ.get("PATH", os.defpath))
        if "/" in command:
            found = os.path.join(cwd, command)
            if not (os.path.isfile(found) and os.access(found, os.X_OK)):
                problems.append(f"{program.name}: command {command} is not an executable file")
        elif shutil.which(command, path=path) is None:
            problems.append(f"{program.name}: command {command!r} not found in PATH")
    return problems
