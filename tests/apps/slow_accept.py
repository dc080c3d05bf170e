"""A worker that keeps its accept queue from emptying: it accepts one connection every PAUSE seconds.

It serves its inherited listeners (LISTEN_FDS, fds 3..) one connection at a time, answers each GET
with JSON naming its pid and generation and closes it, then pauses (argv[1], default 0.005 s). At
~150 connections a second per worker, 64 clients in flight keep a queue waiting in every listener:
what a reload without migration must drain, or lose. Sends READY=1 first. TERM ends it at once when
idle, else once the connection in hand is answered, as a graceful server does: a worker that leaves
its generation alone (a rolling batch, a scale-down) shares its listener with its siblings, so it
may be serving when its stop signal comes. Stdlib only: run it with `python -S -I`.
"""

from __future__ import annotations

import json
import os
import select
import signal
import socket
import sys
import time

LISTEN_FDS_START = 3


def main() -> None:
    pause = float(sys.argv[1]) if len(sys.argv) > 1 else 0.005
    state = {"busy": False, "stopping": False}

    def stop(*_: object) -> None:
        state["stopping"] = True
        if not state["busy"]:
            sys.exit(0)

    signal.signal(signal.SIGTERM, stop)
    count = int(os.environ.get("LISTEN_FDS", "0"))
    listeners = [socket.socket(fileno=fd) for fd in range(LISTEN_FDS_START, LISTEN_FDS_START + count)]
    for listener in listeners:
        listener.setblocking(False)  # a sibling sharing the listener may take the connection first
    body = json.dumps({"pid": os.getpid(), "generation": int(os.environ.get("SUPERVISOR_GENERATION", "0"))}).encode()
    answer = (b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nConnection: close\r\n"
              b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
    socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM).sendto(b"READY=1", os.environ["NOTIFY_SOCKET"])
    while True:
        readable, _, _ = select.select(listeners, [], [])
        for listener in readable:
            state["busy"] = True  # from here a stop signal waits for the answer
            try:
                conn, _ = listener.accept()
            except BlockingIOError:  # a sibling took it
                conn = None
            except OSError:  # shut by the master: nothing more comes on it
                listeners.remove(listener)
                conn = None
            if conn is None:
                state["busy"] = False
                if state["stopping"]:
                    sys.exit(0)
                continue
            with conn:
                conn.settimeout(5)
                try:
                    request = b""
                    while b"\r\n\r\n" not in request:
                        chunk = conn.recv(4096)
                        if not chunk:
                            break
                        request += chunk
                    conn.sendall(answer)
                except OSError:
                    pass
            state["busy"] = False
            if state["stopping"]:
                sys.exit(0)
            time.sleep(pause)
        if not listeners:
            signal.pause()


if __name__ == "__main__":
    main()
