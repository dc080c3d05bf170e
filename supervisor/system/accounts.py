"""The users and groups a config names, looked up in the system's account databases."""

from __future__ import annotations

import grp
import pwd

from supervisor.config.schema import Program


def account(user: str) -> pwd.struct_passwd:
    """The passwd entry of a user named or numbered in the config; KeyError if there is none."""
    return pwd.getpwuid(int(user)) if user.isdigit() else pwd.getpwnam(user)


def group_id(group: str) -> int:
    """The gid of a group named or numbered in the config; KeyError if there is none."""
    return grp.getgrgid(int(group)).gr_gid if group.isdigit() else grp.getgrnam(group).gr_gid


def run_as(program: Program) -> tuple[int, int] | None:
    """The uid and gid the program's workers run as, when it names a user (None: the master's)."""
    if program.user is None:
        return None
    user = account(program.user)
    return user.pw_uid, user.pw_gid if program.group is None else group_id(program.group)
