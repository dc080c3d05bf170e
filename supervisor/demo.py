"""The demo web service that supervisord runs as its worker: `python -m supervisor.demo`.

A minimal HTTP/1.1 server on uvloop, stdlib otherwise, quick to start: it starts on every reload.

Environment (systemd socket activation and sd_notify, as supervisord provides them):
  LISTEN_FDS=n            listening sockets at fds 3 .. 3+n-1
  LISTEN_PID              if set, must be this process's pid
  LISTEN_FDNAMES          optional, colon-separated names for those fds
  NOTIFY_SOCKET           gets `READY=1` once every listener is served ('@' starts an abstract name)
  SUPERVISOR_GENERATION, SUPERVISOR_WORKER   reported in every answer (default 0)
  SUPERVISOR_BACKLOG      accept-queue length to keep (default: the one the listener already has)
  SUPERVISOR_TLS_CERT, SUPERVISOR_TLS_KEY    PEM files: serve HTTPS with them (read once, at start)
Or standalone, for benchmarks: `--bind HOST:PORT` (repeatable, `[::1]:8000` for IPv6).

GET / answers JSON {generation, worker, pid, listener} (`?delay=S`: after S seconds, at most 60);
GET /health answers "ok". SIGTERM, SIGQUIT or SIGINT: graceful stop; a second one: exit now.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import socket
import ssl
import struct
import sys
from typing import cast

import uvloop

DEFAULT_BACKLOG = 1024
MAX_DELAY = 60.0
STOP_GRACE = 5.0  # seconds a connection accepted before the stop has to send its request
HANDSHAKE_TIMEOUT = 60.0  # asyncio's ssl_handshake_timeout default
MAX_HEAD = 65536
REASONS = {200: "OK", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed", 501: "Not Implemented"}
Listener = tuple[str, socket.socket]  # (name or address, listening socket)


class StartError(Exception):
    """Bad arguments or environment: one line on stderr, exit status 2."""


class BadRequest(Exception):
    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


def log(message: str) -> None:
    try:
        print(f"demo pid={os.getpid()} {message}", file=sys.stderr, flush=True)
    except OSError:
        # stderr is a pipe to supervisord; when it died (its parent-death signal is how we learn it),
        # nobody reads it: the stop must go on, not end in BrokenPipeError.
        pass


def notify(message: str) -> None:
    """Send one sd_notify datagram to NOTIFY_SOCKET, if there is one."""
    path = os.environ.get("NOTIFY_SOCKET")
    if not path:
        return
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.sendto(message.encode(), "\0" + path[1:] if path.startswith("@") else path)
    except OSError as exc:
        log(f"cannot notify {path}: {exc}")


def env_int(name: str, default: int) -> int:
    value = os.environ.get(name) or str(default)
    if not value.isdigit():
        raise StartError(f"{name}={value!r}: expected a non-negative integer")
    return int(value)


def address(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"[{host}]:{port}" if sock.family == socket.AF_INET6 else f"{host}:{port}"


def inherited_listeners() -> list[Listener]:
    """The listening sockets passed by socket activation, named by LISTEN_FDNAMES or their address."""
    pid = os.environ.get("LISTEN_PID")
    if pid is not None and pid != str(os.getpid()):
        raise StartError(f"LISTEN_PID={pid} but this is pid {os.getpid()}: the listening fds are not for us")
    names = os.environ.get("LISTEN_FDNAMES", "").split(":")
    listeners = []
    for index in range(env_int("LISTEN_FDS", 0)):
        fd = 3 + index
        try:
            sock = socket.socket(fileno=fd)
        except OSError as exc:
            raise StartError(f"fd {fd} from LISTEN_FDS: {exc.strerror}") from exc
        # A listener shut down by the supervisor (it gave up on us) would rejoin its reuseport group
        # if we called listen() on it: never do that, the connections routed to it would wait in vain.
        if sock.type != socket.SOCK_STREAM or not sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN):
            raise StartError(f"fd {fd} from LISTEN_FDS is not a listening stream socket")
        listeners.append((names[index] if index < len(names) and names[index] else address(sock), sock))
    return listeners


def bound_listeners(binds: list[str], backlog: int) -> list[Listener]:
    """Standalone mode: our own SO_REUSEPORT listeners for HOST:PORT or [IPV6]:PORT."""
    listeners = []
    for spec in binds:
        host, _, port = spec.rpartition(":")
        if not host or not port.isdigit():
            raise StartError(f"--bind {spec}: expected HOST:PORT or [IPV6]:PORT")
        family = socket.AF_INET6 if host.startswith("[") else socket.AF_INET
        try:
            sock = socket.create_server((host.strip("[]"), int(port)), family=family, backlog=backlog,
                                        reuse_port=True)
        except OSError as exc:
            raise StartError(f"--bind {spec}: {exc.strerror}") from exc
        listeners.append((address(sock), sock))
    return listeners


def kept_backlog(sock: socket.socket, override: int | None) -> int:
    """The backlog to give create_server(), which calls listen() again (asyncio's default: 100).

    listen() on a listening socket replaces its backlog, and the supervisor chose one for the whole
    reuseport group: migration does not check the target's backlog, so a smaller one here would drop
    connections after a reload. For a listener, tcp_get_info() (net/ipv4/tcp.c) reports the accept
    queue's length in tcpi_unacked (offset 24) and its limit in tcpi_sacked (offset 28).
    """
    if override is not None:
        return override
    try:
        return int(struct.unpack_from("I", sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 104), 28)[0])
    except OSError:  # not TCP
        return DEFAULT_BACKLOG


def parse_head(head: bytes) -> tuple[str, str, bool, int]:
    """(method, target, keep_alive, content_length) of a request head, without its blank line."""
    request_line, *lines = head.decode("latin-1").split("\r\n")
    parts = request_line.split(" ")
    if len(parts) != 3 or parts[2] not in ("HTTP/1.0", "HTTP/1.1") or not parts[1].startswith("/"):
        raise BadRequest(f"bad request line {request_line[:80]!r}")
    headers: dict[str, str] = {}
    for line in lines:
        name, colon, value = line.partition(":")
        if not colon or not name or name != name.strip():
            raise BadRequest(f"bad header line {line[:80]!r}")
        name, value = name.lower(), value.strip()
        if name in headers and (name == "content-length" and headers[name] != value):
            raise BadRequest("conflicting Content-Length")
        headers[name] = f"{headers[name]}, {value}" if name in headers and name != "content-length" else value
    if "transfer-encoding" in headers:
        raise BadRequest("Transfer-Encoding is not supported", 501)
    length = headers.get("content-length", "0")
    if not length.isdigit():
        raise BadRequest(f"bad Content-Length {length[:20]!r}")
    tokens = {token.strip() for token in headers.get("connection", "").lower().split(",")}
    keep_alive = "keep-alive" in tokens if parts[2] == "HTTP/1.0" else "close" not in tokens
    return parts[0], parts[1], keep_alive, int(length)


def parse_delay(query: str) -> float:
    value = dict(field.partition("=")[::2] for field in query.split("&")).get("delay", "0")
    try:
        delay = float(value)
    except ValueError:
        delay = -1.0
    if not delay >= 0:  # also NaN
        raise BadRequest(f"bad delay {value[:20]!r}")
    return min(delay, MAX_DELAY)


class Demo:
    """The service: its servers, its open connections, and whether it is stopping."""

    def __init__(self, identity: dict[str, int], backlog: int | None, tls: ssl.SSLContext | None) -> None:
        self.identity, self.backlog = identity, backlog  # what answers report, SUPERVISOR_BACKLOG
        self.tls = tls
        self.loop = asyncio.get_running_loop()
        self.servers: list[asyncio.Server] = []
        self.connections: set[Connection] = set()
        self.stopping = False
        self.done = self.loop.create_future()

    def stop(self) -> None:
        if self.stopping:
            log("second stop signal: exiting now")
            self.check_done(now=True)
            return
        self.stopping = True
        # First stop accepting: the supervisor has shut our listeners down already (their queues moved
        # to the new generation), and a shut-down listener polls HUP forever: the loop would spin.
        for server in self.servers:
            server.close()
        waiting = sum(connection.stop() for connection in list(self.connections))
        log(f"stopping: {waiting} connections in progress")
        self.check_done()

    def check_done(self, now: bool = False) -> None:
        if (now or (self.stopping and not self.connections)) and not self.done.done():
            self.done.set_result(None)


class Connection(asyncio.Protocol):
    """One HTTP/1.1 connection: requests in order, a delayed answer holds the ones behind it."""

    transport: asyncio.Transport

    def __init__(self, demo: Demo, answer: bytes) -> None:
        self.demo, self.answer = demo, answer
        self.buffer = bytearray()
        self.request: tuple[str, str] | None = None  # (method, target) whose body is being read
        self.body_left = 0
        self.keep_alive = True
        self.answered = 0
        self.pending: asyncio.TimerHandle | None = None  # a delayed answer
        self.grace: asyncio.TimerHandle | None = None  # stopping: the deadline for a request to arrive
        self.made = False  # connection_made() was called: over TLS, once the handshake is done
        # Counted from the accept, not from connection_made: over TLS that comes after the handshake,
        # and a stop in between must not exit under a client that is still shaking hands. A handshake
        # that fails never calls connection_lost: the timer forgets it (asyncio gives up after 60 s).
        demo.connections.add(self)
        self.handshake = demo.loop.call_later(HANDSHAKE_TIMEOUT, self.connection_lost, None) if demo.tls else None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        self.made = True
        self.demo.connections.add(self)  # again: a handshake just past the timer's deadline was dropped
        if self.handshake is not None:
            self.handshake.cancel()
        if self.demo.stopping:  # accepted, or its handshake done, after the stop
            self.stop()

    def connection_lost(self, exc: Exception | None) -> None:
        for timer in (self.pending, self.grace, self.handshake):
            if timer is not None:
                timer.cancel()
        self.demo.connections.discard(self)
        self.demo.check_done()

    def stop(self) -> bool:
        """The service stops: close if idle, else finish the request. True if still in progress."""
        if not self.made:  # TLS handshake in progress: as long as a client that has yet to ask
            if self.handshake is not None:
                self.handshake.cancel()
            self.handshake = self.demo.loop.call_later(STOP_GRACE, self.connection_lost, None)
            return True
        if self.pending is not None:
            return True  # its answer will say Connection: close
        if self.answered and not self.buffer and self.request is None:
            # Idle keep-alive. A request sent at this very instant is lost, as with any keep-alive close:
            # HTTP clients retry idempotent requests on a reused connection that closes.
            self.transport.close()
            return False
        # Accepted before the stop: its client is waiting for an answer, give it time to ask.
        self.grace = self.demo.loop.call_later(STOP_GRACE, self.transport.close)
        return True

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        self.process()

    def process(self) -> None:
        while self.pending is None and not self.transport.is_closing():
            if self.request is None:
                end = self.buffer.find(b"\r\n\r\n")
                if end < 0:
                    if len(self.buffer) > MAX_HEAD:
                        self.reply(400, b"request head too large\n", close=True)
                    return
                head = bytes(self.buffer[:end])
                del self.buffer[: end + 4]
                try:
                    method, target, self.keep_alive, self.body_left = parse_head(head)
                except BadRequest as exc:
                    self.reply(exc.status, f"{exc}\n".encode(), close=True)
                    return
                self.request = (method, target)
            discard = min(len(self.buffer), self.body_left)
            del self.buffer[:discard]
            self.body_left -= discard
            if self.body_left:
                return
            method, target = self.request
            self.request = None
            self.handle(method, target)

    def handle(self, method: str, target: str) -> None:
        if self.grace is not None:
            self.grace.cancel()
        path, _, query = target.partition("?")
        if path not in ("/", "/health"):
            self.reply(404, b"not found\n")
        elif method != "GET":
            self.reply(405, b"method not allowed\n", extra="Allow: GET\r\n")
        elif path == "/health":
            self.reply(200, b"ok", "text/plain")
        else:
            try:
                delay = parse_delay(query)
            except BadRequest as exc:
                self.reply(400, f"{exc}\n".encode(), close=True)
                return
            if delay:
                self.pending = self.demo.loop.call_later(delay, self.delayed)
            else:
                self.reply(200, self.answer, "application/json")

    def delayed(self) -> None:
        self.pending = None
        self.reply(200, self.answer, "application/json")
        self.process()  # requests pipelined behind it

    def reply(self, status: int, body: bytes, content_type: str = "text/plain", close: bool = False,
              extra: str = "") -> None:
        close = close or not self.keep_alive or self.demo.stopping
        head = (f"HTTP/1.1 {status} {REASONS[status]}\r\nContent-Type: {content_type}\r\nContent-Length: "
                f"{len(body)}\r\nConnection: {'close' if close else 'keep-alive'}\r\n{extra}\r\n")
        self.transport.write(head.encode() + body)
        self.answered += 1
        if close:
            self.transport.close()


def tls_context() -> ssl.SSLContext | None:
    """HTTPS when the supervisor hands us a certificate: loaded once, at start (a reload rotates it)."""
    cert, key = os.environ.get("SUPERVISOR_TLS_CERT"), os.environ.get("SUPERVISOR_TLS_KEY")
    if not cert or not key:
        return None
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        context.load_cert_chain(cert, key)
    except (OSError, ssl.SSLError) as exc:
        raise StartError(f"cannot load SUPERVISOR_TLS_CERT={cert} and SUPERVISOR_TLS_KEY={key}: {exc}") from None
    return context


async def start_server(demo: Demo, name: str, sock: socket.socket) -> asyncio.Server:
    """Serve one listener: the one place that builds a server."""
    answer = json.dumps({**demo.identity, "pid": os.getpid(), "listener": name}).encode()
    backlog = kept_backlog(sock, demo.backlog)  # read before create_server() calls listen() again
    return await demo.loop.create_server(lambda: Connection(demo, answer), sock=sock, backlog=backlog,
                                         ssl=demo.tls)


async def serve(listeners: list[Listener], identity: dict[str, int], backlog: int | None,
                tls: ssl.SSLContext | None) -> None:
    demo = Demo(identity, backlog, tls)
    for signum in (signal.SIGTERM, signal.SIGQUIT, signal.SIGINT):
        demo.loop.add_signal_handler(signum, demo.stop)
    for name, sock in listeners:
        if demo.stopping:  # never listen() once told to stop
            sock.close()
        else:
            demo.servers.append(await start_server(demo, name, sock))
    if not demo.stopping:
        log(f"generation={identity['generation']} worker={identity['worker']} "
            f"serving {' '.join(name for name, _ in listeners)}")
        notify(f"READY=1\nSTATUS=serving {len(listeners)} listeners")
    await demo.done


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m supervisor.demo", description=__doc__.splitlines()[0])
    parser.add_argument("--bind", action="append", default=[], metavar="HOST:PORT", help="repeatable")
    parser.add_argument("--backlog", type=int, default=DEFAULT_BACKLOG, help="with --bind")
    args = parser.parse_args(argv)
    try:
        identity = {name: env_int(f"SUPERVISOR_{name.upper()}", 0) for name in ("generation", "worker")}
        backlog = env_int("SUPERVISOR_BACKLOG", 0) if os.environ.get("SUPERVISOR_BACKLOG") else None
        if args.bind and env_int("LISTEN_FDS", 0):
            raise StartError("both --bind and LISTEN_FDS given: use one source of listeners")
        listeners = bound_listeners(args.bind, args.backlog) if args.bind else inherited_listeners()
        if not listeners:
            raise StartError("no listeners: run under supervisord (LISTEN_FDS) or give --bind HOST:PORT")
        tls = tls_context()
    except StartError as exc:
        print(f"demo: {exc}", file=sys.stderr)
        return 2
    uvloop.run(serve(listeners, identity, backlog, tls))
    return 0


if __name__ == "__main__":
    sys.exit(main())
