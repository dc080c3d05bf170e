"""Upgrading the master in place: check the new code in a child, hand the state over, exec.

Steps (as tableflip names them, without a second process): `Check` runs the installed code with
the master's own command line in a check mode (it imports everything, loads the config, and says
whether it can read this state format); then the master writes its records to a memfd, marks every
fd that must survive as inheritable, and `execve()`s that command line. The pid stays, so the
workers stay its children and systemd's MAINPID does not change; exec of a single-threaded process
does not fire the workers' parent-death signal. The new code finds the state through `STATE_ENV`.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from collections.abc import Iterable
from typing import Any, NoReturn

FORMAT = 1  # of the state written here; bump it when a record changes in a way old readers would misread
READABLE = (1,)  # the state formats this code can adopt
STATE_ENV = "SUPERVISOR_UPGRADE_STATE"  # the memfd holding the state, in the new process
CHECK_OPTION = "--upgrade-check"
CHECK_TIMEOUT = 60.0  # seconds the new code gets to import and load the config
MAX_ANSWER = 4096  # bytes of the check's output quoted in a refusal


def command() -> list[str]:
    """The command line the master was started with, run by the same interpreter."""
    return [sys.executable, *sys.orig_argv[1:]]


class Check:
    """The new code, run as `<the master's command line> --upgrade-check FORMAT`; its output goes to a
    file (a pipe could fill up and stall it)."""

    def __init__(self, argv: list[str] | None = None) -> None:
        self.output = tempfile.TemporaryFile()  # noqa: SIM115  # closed by close()
        argv = [*(argv or command()), CHECK_OPTION, str(FORMAT)]
        # No preexec_fn: subprocess uses vfork+exec, nothing runs in the child before the exec.
        self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=self.output, stderr=self.output,
                                     close_fds=True)
        self.pidfd = os.pidfd_open(self.proc.pid)

    def result(self) -> tuple[bool, str]:
        """(passed, the new version or why not); call once its pidfd is readable."""
        code = self.proc.wait()
        self.output.seek(0)
        text = self.output.read(MAX_ANSWER).decode(errors="replace").strip()
        lines = text.splitlines()
        if code == 0 and lines:
            return True, lines[-1]
        return False, " / ".join(lines[-5:]) or f"exit status {code}"

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        os.close(self.pidfd)
        self.output.close()


def write_state(state: dict[str, Any]) -> int:
    """The state in an anonymous memory file, inheritable (no MFD_CLOEXEC); returns its fd."""
    fd = os.memfd_create("supervisor-state", 0)
    data = json.dumps(state, separators=(",", ":")).encode()
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]
    os.lseek(fd, 0, os.SEEK_SET)
    return fd


def read_state(fd: int) -> dict[str, Any]:
    with os.fdopen(fd, "rb") as f:
        state = json.loads(f.read())
    if not isinstance(state, dict) or state.get("format") not in READABLE:
        raise ValueError(f"upgrade state format {state.get('format') if isinstance(state, dict) else '?'} "
                         f"is not one of {READABLE}")
    return state


def exec_with(state_fd: int, keep: Iterable[int]) -> NoReturn:
    """Replace this process with the installed code, keeping `keep` and the state open; raises OSError."""
    kept = [state_fd, *keep]
    for fd in kept:
        os.set_inheritable(fd, True)
    try:
        os.execve(sys.executable, command(), {**os.environ, STATE_ENV: str(state_fd)})
    except OSError:
        for fd in kept:
            os.set_inheritable(fd, False)
        raise
