"""The last reset of a reload (docs/kernel.md §8): shutdown() of a listener racing a handshake that completes on it.

`python -m bench.reuseport_race [--steer] [--drain S]` (root: it runs in its own `unshare --net`
namespace, loopback only, with net.ipv4.tcp_migrate_req=1 there) prints one JSON object.

A server process keeps a generation of 2 SO_REUSEPORT listeners on 127.0.0.1:PORT and every
`--period` seconds replaces it as the supervisor does: the new listeners first, then shutdown() of
the old ones. Client processes open connections all the time (connect, GET, read to EOF). In the
kernel, tcp_v4_rcv() checks without a lock that a request's listener still listens, builds the child
socket, then inet_csk_reqsk_queue_add() finds the listener closed and inet_child_forget() resets the
connection: RST+ACK with the server's ISN+1, right after the client's final ACK; connect() itself
fails with ECONNRESET. Only Tcp OutRsts counts it: no TCPMigrateReqFailure, no ListenDrops.
Measured (kernel 6.18, 2 busy shared cores, 6-16k connections/s): 29 resets in 10,722 shutdowns.

With `--steer` the new listeners first get every new SYN (supervisor.steer, a cBPF program on the
group), the old ones are shut `--drain` seconds later, one by one, each right after a program that
holds before and after it (steer.shut_steered), then the program is detached: no reset in 6,586
shutdowns, and nothing left on the old listeners to migrate.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import select
import socket
import subprocess
import sys
import time
from multiprocessing.sharedctypes import Synchronized
from multiprocessing.synchronize import Event

from supervisor.system import migrate, steer

PORT = 8000
WIDTH = 2  # listeners per generation
ANSWER = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok"
REQUEST = b"GET / HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n"
TCP_KEYS = ("OutRsts", "EstabResets", "AttemptFails")
EXT_KEYS = ("TCPMigrateReqSuccess", "TCPMigrateReqFailure", "ListenDrops", "ListenOverflows", "TCPAbortOnClose",
            "TCPAbortOnData", "TCPAbortOnLinger", "TCPReqQFullDrop", "TCPBacklogDrop")


def tcp_mib() -> dict[str, int]:
    """The Tcp line of /proc/net/snmp (OutRsts, EstabResets, ...)."""
    with open("/proc/net/snmp") as f:
        names, values = (line.split()[1:] for line in f if line.startswith("Tcp:"))
    return dict(zip(names, map(int, values), strict=True))


def listener(order: steer.GroupOrder[socket.socket]) -> socket.socket:
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind(("127.0.0.1", PORT))
    sock.listen(1024)
    sock.setblocking(False)
    order.listening(sock)
    return sock


class Server:
    """One epoll loop: the listeners of the serving generation, their connections, the replacements."""

    def __init__(self, period: float, drain: float, steering: bool) -> None:
        self.period, self.drain, self.steering = period, drain, steering
        self.poll = select.epoll()
        self.order: steer.GroupOrder[socket.socket] = steer.GroupOrder()
        self.listeners: dict[int, socket.socket] = {}
        self.connections: dict[int, tuple[socket.socket, bytearray]] = {}
        self.serving = [self.add_listener() for _ in range(WIDTH)]
        self.accepted: list[tuple[float, int]] = []  # (wall time, client port)
        self.shutdowns: list[float] = []

    def add_listener(self) -> socket.socket:
        sock = listener(self.order)
        self.listeners[sock.fileno()] = sock
        self.poll.register(sock, select.EPOLLIN)
        return sock

    def run(self, stop: Event) -> None:
        replace_at = time.monotonic() + self.period
        retiring: list[socket.socket] = []
        shut_at = 0.0
        while not stop.is_set():
            now = time.monotonic()
            if not retiring and now >= replace_at:
                retiring, self.serving = self.serving, [self.add_listener() for _ in range(WIDTH)]
                if self.steering:
                    steer.attach(self.serving[0], self.order.indices(self.serving))
                shut_at, replace_at = now + self.drain, now + self.period
            if retiring and now >= shut_at:
                if self.steering:
                    steer.shut_steered(self.order, retiring, self.serving, lambda s: s, self.shut)
                else:
                    for sock in retiring:
                        self.shut(sock)
                if self.steering:
                    steer.detach(self.serving[0])
                for sock in retiring:
                    self.poll.unregister(sock)
                    del self.listeners[sock.fileno()]
                    sock.close()
                retiring = []
            for fd, _events in self.poll.poll(0.002):
                if fd in self.listeners:
                    self.accept(self.listeners[fd])
                else:
                    self.serve(fd)

    def shut(self, sock: socket.socket) -> None:
        self.shutdowns.append(time.time())
        sock.shutdown(socket.SHUT_RDWR)  # its queue migrates to the serving generation
        self.order.stopped(sock)

    def accept(self, sock: socket.socket) -> None:
        while True:
            try:
                conn, peer = sock.accept()
            except OSError:  # BlockingIOError, or EINVAL once shut
                return
            conn.setblocking(False)
            self.accepted.append((time.time(), peer[1]))
            self.connections[conn.fileno()] = (conn, bytearray())
            self.poll.register(conn, select.EPOLLIN)

    def serve(self, fd: int) -> None:
        conn, head = self.connections[fd]
        try:
            data = conn.recv(4096)
        except OSError:
            data = b""
        head += data
        if data and b"\r\n\r\n" not in head:
            return
        if data:
            try:
                conn.sendall(ANSWER)
            except OSError:
                pass
        self.poll.unregister(conn)
        del self.connections[fd]
        conn.close()


def serve(period: float, drain: float, steering: bool, ready: Event, stop: Event, out: str) -> None:
    server = Server(period, drain, steering)
    ready.set()
    server.run(stop)
    with open(out, "w") as f:
        json.dump({"accepted": server.accepted, "shutdowns": server.shutdowns}, f)


def client(stop: Event, count: Synchronized[int], out: str) -> None:
    """Connections one after the other; every failure as (wall time, local port, step, error)."""
    failures: list[tuple[float, int, str, str]] = []
    done = 0
    while not stop.is_set():
        sock = socket.socket()
        sock.settimeout(5)
        step, port = "connect", 0
        try:
            sock.bind(("127.0.0.1", 0))  # the port is known even when connect() fails
            port = sock.getsockname()[1]
            sock.connect(("127.0.0.1", PORT))
            step = "send"
            sock.sendall(REQUEST)
            step = "receive"
            answer = b""
            while chunk := sock.recv(4096):
                answer += chunk
            if not answer.startswith(b"HTTP/1.1 200"):
                failures.append((time.time(), port, step, f"bad answer {answer[:40]!r}"))
        except OSError as exc:
            failures.append((time.time(), port, step, repr(exc)))
        finally:
            sock.close()
            done += 1
    with count.get_lock():
        count.value += done
    with open(out, "w") as f:
        json.dump(failures, f)


def inside(args: argparse.Namespace) -> dict[str, object]:
    subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
    with open(migrate.SYSCTL, "w") as f:  # this private namespace's
        f.write("1")
    folder = f"/tmp/reuseport_race.{os.getpid()}"
    os.makedirs(folder, exist_ok=True)
    tcp, ext = tcp_mib(), migrate.tcp_ext()
    ready, stop, clients_stop = mp.Event(), mp.Event(), mp.Event()
    count: Synchronized[int] = mp.Value("q", 0)
    server = mp.Process(target=serve, args=(args.period, args.drain, args.steer, ready, stop, f"{folder}/server"))
    server.start()
    ready.wait(10)
    clients = [mp.Process(target=client, args=(clients_stop, count, f"{folder}/client{i}"))
               for i in range(args.clients)]
    for c in clients:
        c.start()
    time.sleep(args.seconds)
    clients_stop.set()
    for c in clients:
        c.join()
    time.sleep(0.2)
    stop.set()
    server.join()
    tcp_after, ext_after = tcp_mib(), migrate.tcp_ext()
    with open(f"{folder}/server") as f:
        served = json.load(f)
    failures = []
    for i in range(args.clients):
        with open(f"{folder}/client{i}") as f:
            failures += json.load(f)
    shutdowns = served["shutdowns"]
    accepted: dict[int, list[float]] = {}
    for at, port in served["accepted"]:
        accepted.setdefault(port, []).append(at)
    return {
        "steer": args.steer, "drain": args.drain, "period": args.period, "seconds": args.seconds,
        "connections": count.value, "shutdowns": len(shutdowns), "failed": len(failures),
        "failures": [{"at": at, "port": port, "step": step, "error": error,
                      "accepted": any(abs(at - when) < 1 for when in accepted.get(port, [])),
                      "from_shutdown_ms": round(min(abs(at - s) for s in shutdowns) * 1000, 3) if shutdowns else None}
                     for at, port, step, error in sorted(failures)],
        "Tcp": {key: tcp_after[key] - tcp[key] for key in TCP_KEYS},
        "TcpExt": {key: ext_after.get(key, 0) - ext.get(key, 0) for key in EXT_KEYS},
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.reuseport_race", description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--period", type=float, default=0.01, help="seconds between two replacements")
    parser.add_argument("--steer", action="store_true", help="steer new SYNs to the new listeners first")
    parser.add_argument("--drain", type=float, default=0.0, help="seconds from the new listeners to the shutdowns")
    parser.add_argument("--clients", type=int, default=4, help="client processes")
    parser.add_argument("--inside", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if not args.inside:  # a private network namespace: its own sysctl, ports and counters
        return subprocess.run(["unshare", "--net", sys.executable, "-m", "bench.reuseport_race", "--inside",
                               *(argv if argv is not None else sys.argv[1:])]).returncode
    print(json.dumps(inside(args)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
