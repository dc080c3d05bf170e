"""A worker that says READY=1, then crashes, sleeps or forks, as a test asks (argv[1]).

`crash-worker-K`: worker K says READY=1 and exits 3 a second later; the others are the demo.

`hang-on-restart FOLDER`: the first start of each worker index is the demo; every later start (a
restart after a crash) writes to stderr and hangs without ever sending READY=1.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time


def main() -> None:
    action = sys.argv[1]
    if action == "hang-on-restart":
        marker = os.path.join(sys.argv[2], f"worker{os.environ['SUPERVISOR_WORKER']}.started")
        if not os.path.exists(marker):
            open(marker, "w").close()
            os.execvp(sys.executable, [sys.executable, "-m", "supervisor.demo"])
        print(f"worker {os.environ['SUPERVISOR_WORKER']} restarted: loading forever", file=sys.stderr, flush=True)
        time.sleep(60)
        sys.exit(1)
    crasher = action.startswith("crash-worker-")
    if crasher and os.environ.get("SUPERVISOR_WORKER") != action.removeprefix("crash-worker-"):
        os.execvp(sys.executable, [sys.executable, "-m", "supervisor.demo"])
    if action == "fork":
        # Children of its own, as a worker with a helper process has: one stays in its session.
        child = subprocess.Popen(["sleep", "1000"])
        with open(sys.argv[2], "w") as f:
            f.write(str(child.pid))
    socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM).sendto(b"READY=1", os.environ["NOTIFY_SOCKET"])
    if crasher:
        time.sleep(1.0)  # after its siblings are ready, even on a loaded machine: a crash, not a failed start
        print(f"worker {os.environ['SUPERVISOR_WORKER']} gives up", file=sys.stderr)
        sys.exit(3)
    if action == "fork":
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))  # exits, leaving its child behind
    signal.pause()


if __name__ == "__main__":
    main()
