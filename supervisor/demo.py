"""The demo web service that supervisord runs as its worker: `python -m supervisor.demo`.

A minimal HTTP/1.1 server on uvloop, stdlib otherwise, quick to start: it starts on every reload.

Environment (systemd socket activation and sd_notify, as supervisord provides them):
  LISTEN_FDS, LISTEN_PID, LISTEN_FDNAMES, NOTIFY_SOCKET, SUPERVISOR_BACKLOG: see supervisor.servers.activation
  SUPERVISOR_GENERATION, SUPERVISOR_WORKER   reported in every answer (default 0)
  SUPERVISOR_GRACEFUL_TIMEOUT   the stop's bound (see supervisor.servers.stopping)
  SUPERVISOR_TLS_CERT, SUPERVISOR_TLS_KEY    PEM files: serve HTTPS with them (read once, at start)
Or standalone, for benchmarks: `--bind HOST:PORT` (repeatable, `[::1]:8000` for IPv6).

GET / (or POST / with a body) answers JSON {generation, worker, pid, listener} (`?delay=S`: after S
seconds, at most 60); GET /health answers "ok". SIGTERM, SIGQUIT or SIGINT: graceful stop, as the stop
contract of supervisor.servers.stopping says (`--close-idle-at-stop`: the demo's stop before that
contract, which closes idle keep-alive connections at once; for tests and comparisons only); a second
one: exit now.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import socket
import ssl
import sys
from typing import cast

import uvloop

from supervisor.servers.activation import (
    DEFAULT_BACKLOG,
    Listener,
    StartError,
    address,
    backlog_override,
    env_int,
    inherited_listeners,
    kept_backlog,
    notify,
    stderr,
)
from supervisor.servers.stopping import IDLE_CLOSE, ShutWatch, finish_within, unread, unsent

MAX_DELAY = 60.0
STOP_GRACE = 5.0  # seconds a TLS handshake in progress at the stop has to finish
LINGER = 2.0  # seconds a closing connection reads on after its FIN, for the client to close its side
HANDSHAKE_TIMEOUT = 60.0  # asyncio's ssl_handshake_timeout default
MAX_HEAD = 65536
REASONS = {200: "OK", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed", 501: "Not Implemented"}


class BadRequest(Exception):
    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


def log(message: str) -> None:
    stderr(f"demo pid={os.getpid()} {message}")


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

    def __init__(self, identity: dict[str, int], backlog: int | None, tls: ssl.SSLContext | None,
                 close_idle_at_stop: bool = False) -> None:
        self.identity, self.backlog = identity, backlog  # what answers report, SUPERVISOR_BACKLOG
        self.tls = tls
        self.close_idle_at_stop = close_idle_at_stop  # the stop before the keep-alive contract (comparisons)
        self.loop = asyncio.get_running_loop()
        self.servers: list[asyncio.Server] = []
        self.shut_watch = ShutWatch(self.loop)
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
        self.shut_watch.release()
        for server in self.servers:
            server.close()
        waiting = sum(connection.stop() for connection in list(self.connections))
        log(f"stopping: {waiting} connections in progress")
        self.loop.call_later(finish_within(), self.finish)
        self.check_done()

    def finish(self) -> None:
        """The stop's bound: drop what is left (a client that never reads, a request that never ends)."""
        if self.connections:
            log(f"closing {len(self.connections)} connections still open {finish_within():g} s after the stop")
        for connection in list(self.connections):
            connection.abort()
        self.check_done(now=True)

    def check_done(self, now: bool = False) -> None:
        if (now or (self.stopping and not self.connections)) and not self.done.done():
            self.done.set_result(None)


class Connection(asyncio.Protocol):
    """One HTTP/1.1 connection: requests in order, a delayed answer holds the ones behind it.

    Its stop follows supervisor.servers.stopping: every request read is answered, the last one with
    `Connection: close`; with nothing in progress it is closed once quiet for IDLE_CLOSE seconds.
    """

    transport: asyncio.Transport

    def __init__(self, demo: Demo, answer: bytes) -> None:
        self.demo, self.answer = demo, answer
        self.buffer = bytearray()
        self.request: tuple[str, str] | None = None  # (method, target) whose body is being read
        self.body_left = 0
        self.keep_alive = True
        self.answered = 0
        self.pending: asyncio.TimerHandle | None = None  # a delayed answer
        self.grace: asyncio.TimerHandle | None = None  # stopping: when a quiet connection is closed
        self.lingering: asyncio.TimerHandle | None = None  # closing: our FIN is sent, the client's is awaited
        self.active = demo.loop.time()  # its last byte in or out, or its accept
        self.made = False  # connection_made() was called: over TLS, once the handshake is done
        # Counted from the accept, not from connection_made: over TLS that comes after the handshake,
        # and a stop in between must not exit under a client that is still shaking hands. A handshake
        # that fails never calls connection_lost: the timer forgets it (asyncio gives up after 60 s).
        demo.connections.add(self)
        self.handshake = demo.loop.call_later(HANDSHAKE_TIMEOUT, self.connection_lost, None) if demo.tls else None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        self.made = True
        self.active = self.demo.loop.time()
        self.demo.connections.add(self)  # again: a handshake just past the timer's deadline was dropped
        if self.handshake is not None:
            self.handshake.cancel()
        if self.demo.stopping:  # accepted, or its handshake done, after the stop
            self.stop()

    def connection_lost(self, exc: Exception | None) -> None:
        for timer in (self.pending, self.grace, self.handshake, self.lingering):
            if timer is not None:
                timer.cancel()
        self.demo.connections.discard(self)
        self.demo.check_done()

    def abort(self) -> None:
        if self.made:
            self.transport.abort()
        self.connection_lost(None)

    def idle(self) -> bool:
        """Nothing in progress: no request partly read, none waiting for its answer, no answer unsent."""
        return self.pending is None and self.request is None and not self.buffer and (
            not self.made or not (unsent(self.transport) or unread(self.transport)))

    def stop(self) -> bool:
        """The service stops: finish what is in progress, close once quiet. True if still open."""
        if not self.made:  # TLS handshake in progress: as long as a client that has yet to ask
            if self.handshake is not None:
                self.handshake.cancel()
            self.handshake = self.demo.loop.call_later(STOP_GRACE, self.connection_lost, None)
            return True
        if self.demo.close_idle_at_stop:
            return self.stop_closing_idle()
        if self.idle():
            self.close_when_quiet()
        return True  # in progress: its last answer says Connection: close

    def stop_closing_idle(self) -> bool:
        """The stop before the keep-alive contract: a request sent to an idle connection at this instant is lost."""
        if self.pending is not None:
            return True
        if self.answered and not self.buffer and self.request is None:  # not idle(): it looks at the socket
            self.transport.close()
            return False
        self.grace = self.demo.loop.call_later(STOP_GRACE, self.transport.close)
        return True

    def close_when_quiet(self) -> None:
        """Close once nothing came or went for IDLE_CLOSE s: a client still using it gets an answer first."""
        if self.grace is not None:
            self.grace.cancel()
        self.grace = self.demo.loop.call_at(self.active + IDLE_CLOSE, self.quiet)

    def quiet(self) -> None:
        self.grace = None
        if self.closing():
            return
        if self.idle():
            self.close()
        elif self.pending is None and self.request is None and not self.buffer:  # answers on their way, or a request
            self.grace = self.demo.loop.call_later(IDLE_CLOSE, self.quiet)

    def closing(self) -> bool:
        return self.lingering is not None or self.transport.is_closing()

    def close(self) -> None:
        """FIN, then read on (and drop) until the client closes too, LINGER s at most: a close() with
        request bytes arriving would answer them with a reset, which can destroy our last answer."""
        if self.demo.close_idle_at_stop or not self.transport.can_write_eof():  # TLS has no half-close
            self.transport.close()
            return
        self.transport.write_eof()
        self.lingering = self.demo.loop.call_later(LINGER, self.transport.close)

    def data_received(self, data: bytes) -> None:
        if self.lingering is not None:
            return
        self.active = self.demo.loop.time()
        if self.grace is not None:
            self.grace.cancel()
            self.grace = None
        self.buffer += data
        self.process()
        if self.demo.stopping and not self.demo.close_idle_at_stop and self.idle():
            self.close_when_quiet()  # what came was not a whole request (or nothing but a close followed)

    def process(self) -> None:
        while self.pending is None and not self.closing():
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
        path, _, query = target.partition("?")
        if path not in ("/", "/health"):
            self.reply(404, b"not found\n")
        elif method != "GET" and not (method == "POST" and path == "/"):
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
        # Stopping, the last answer says close: the last one the demo has a request for (pipelined requests
        # already read are answered too), or with --close-idle-at-stop the first one after the stop.
        last = not self.buffer or self.demo.close_idle_at_stop
        close = close or not self.keep_alive or (self.demo.stopping and last)
        head = (f"HTTP/1.1 {status} {REASONS[status]}\r\nContent-Type: {content_type}\r\nContent-Length: "
                f"{len(body)}\r\nConnection: {'close' if close else 'keep-alive'}\r\n{extra}\r\n")
        self.transport.write(head.encode() + body)
        self.answered += 1
        self.active = self.demo.loop.time()
        if close and self.keep_alive:  # our decision: the client may be sending more
            self.close()
        elif close:
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
    server = await demo.loop.create_server(lambda: Connection(demo, answer), sock=sock, backlog=backlog,
                                           ssl=demo.tls)
    demo.shut_watch.add(server)  # from the shut to the stop signal (stop_delay), no spinning
    return server


async def serve(listeners: list[Listener], identity: dict[str, int], backlog: int | None,
                tls: ssl.SSLContext | None, close_idle_at_stop: bool = False) -> None:
    demo = Demo(identity, backlog, tls, close_idle_at_stop)
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
        notify(f"READY=1\nSTATUS=serving {len(listeners)} listeners", log)
    await demo.done


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m supervisor.demo", description=__doc__.splitlines()[0])
    parser.add_argument("--bind", action="append", default=[], metavar="HOST:PORT", help="repeatable")
    parser.add_argument("--backlog", type=int, default=DEFAULT_BACKLOG, help="with --bind")
    parser.add_argument("--close-idle-at-stop", action="store_true",
                        help="the stop before the keep-alive contract: close idle connections at once "
                             "(loses requests sent at that instant; for tests and comparisons only)")
    args = parser.parse_args(argv)
    try:
        identity = {name: env_int(f"SUPERVISOR_{name.upper()}", 0) for name in ("generation", "worker")}
        backlog = backlog_override()
        if args.bind and env_int("LISTEN_FDS", 0):
            raise StartError("both --bind and LISTEN_FDS given: use one source of listeners")
        listeners = bound_listeners(args.bind, args.backlog) if args.bind else inherited_listeners()
        if not listeners:
            raise StartError("no listeners: run under supervisord (LISTEN_FDS) or give --bind HOST:PORT")
        tls = tls_context()
    except StartError as exc:
        print(f"demo: {exc}", file=sys.stderr)
        return 2
    uvloop.run(serve(listeners, identity, backlog, tls, args.close_idle_at_stop))
    return 0


if __name__ == "__main__":
    sys.exit(main())
