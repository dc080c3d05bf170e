"""A worker that writes down what it was given and how it was asked to stop (argv[1]: a folder).

At start it writes FOLDER/PID.json (environment, working directory, uid, gid, supplementary groups)
and sends READY=1; on TERM, INT, QUIT, HUP or USR1 it writes the signal's name to FOLDER/PID.signal
and exits 0. Stdlib only: run it with `python -S -I`, it starts fast.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import sys
from types import FrameType

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGQUIT, signal.SIGHUP, signal.SIGUSR1)


def write(path: str, text: str) -> None:
    """Whole or not at all: the test polls for the file and must never read half of it."""
    with open(f"{path}.tmp", "w") as f:
        f.write(text)
    os.rename(f"{path}.tmp", path)


def main() -> None:
    folder = sys.argv[1]

    def stopped(signum: int, _frame: FrameType | None) -> None:
        write(os.path.join(folder, f"{os.getpid()}.signal"), signal.Signals(signum).name)
        sys.exit(0)

    for signum in STOP_SIGNALS:  # before READY=1: a stop signal can come any time after it
        signal.signal(signum, stopped)
    facts = {"environ": dict(os.environ), "cwd": os.getcwd(), "uid": os.getuid(), "gid": os.getgid(),
             "groups": sorted(os.getgroups())}
    write(os.path.join(folder, f"{os.getpid()}.json"), json.dumps(facts))
    socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM).sendto(b"READY=1", os.environ["NOTIFY_SOCKET"])
    while True:
        signal.pause()


if __name__ == "__main__":
    main()
