"""A worker that leaves descendants behind, as daemonising code does, then serves as the demo.

Before it execs the demo (same pid) it starts two processes by a double fork, each in a session of
its own (setsid), so they are no longer its children nor in its process group:
- a lingerer, which keeps the listener fds (3..) and calls listen() on them again every 50 ms: once
  the master shuts that socket at a reload, it would rejoin the reuseport group and hold connections
  that nobody accepts;
- a short one, which exits after 0.3 s: an orphan whose zombie only the master can reap.
Their pids are written to FOLDER (argv[1]) as `escaped-<worker pid>`: "LINGERER SHORT".
"""

from __future__ import annotations

import os
import socket
import sys
import time


def escape(then: str) -> int:
    """Double fork: the grandchild runs `then` in a session of its own; returns the grandchild's pid."""
    read_end, write_end = os.pipe()
    if os.fork() == 0:
        os.setsid()
        grandchild = os.fork()
        if grandchild:
            os.write(write_end, str(grandchild).encode())
            os._exit(0)
        os.close(read_end)
        os.close(write_end)
        if then == "linger":
            fds = range(3, 3 + int(os.environ.get("LISTEN_FDS", "0")))
            listeners = [socket.socket(fileno=os.dup(fd)) for fd in fds]
            while True:
                for sock in listeners:
                    try:
                        sock.listen(128)  # again: a shut socket listens anew
                    except OSError:
                        pass
                time.sleep(0.05)
        time.sleep(0.3)
        os._exit(0)
    os.close(write_end)
    pid = int(os.read(read_end, 32))
    os.close(read_end)
    os.wait()  # the intermediate
    return pid


def main() -> None:
    folder = sys.argv[1]
    pids = f"{escape('linger')} {escape('exit')}"
    with open(os.path.join(folder, f"escaped-{os.getpid()}"), "w") as f:
        f.write(pids)
    os.execvp(sys.executable, [sys.executable, "-m", "supervisor.demo"])


if __name__ == "__main__":
    main()
