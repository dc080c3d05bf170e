"""The one load client of the tests and the benchmark (`bench` imports it from here), on uvloop.

Two modes:
- new connections (the default): each connection sends one GET with `Connection: close` and reads the
  whole answer;
- keep-alive (`keep_alive=True`, `--keep-alive`): each of `concurrency` HTTP/1.1 connections is kept
  and sends request after request, back to back (GET, or POST with a `body`-byte body; `pipeline` requests
  written at once; `http10`: HTTP/1.0 with `Connection: keep-alive`), as a browser, a connection pool or
  a reverse proxy does. A connection is opened again only after an answer that says `Connection: close`
  or a failure. A request the server never answers counts as failed, and its detail says whether it
  was sent on a reused connection (`reused: ...`) or a new one (`new: ...`);
- httpx (`httpx=True`, `--httpx`): the same requests through a real client library's pool,
  `httpx.AsyncClient` with `concurrency` pooled connections and its defaults otherwise (no retry), as
  most service-to-service Python code uses it. Its failures say `pool: ` and httpx's exception.

`Clients` runs it in subprocesses for a bounded time and returns their merged `Tally`:

    with Clients("127.0.0.1:8000", concurrency=64, seconds=60, keep_alive=True) as load:
        ...  # reload, crash, scale
        tally = load.finish()
    assert not tally.failures

`python -m tests.load --connect 127.0.0.1:8000 --concurrency 256 --seconds 30` keeps that many
connections in flight (over TLS with `--tls-ca PEM`) until the time is up or it gets SIGTERM/SIGINT
(then it lets the requests in flight finish), and prints one JSON object: the answers per server pid
and generation, how long they took (from connect, or from the request on a kept connection, to the
whole answer; 0.1 ms buckets), the server certificates seen (TLS), and every failure with its time and kind. Times are
CLOCK_MONOTONIC, comparable between processes. Several of these processes make a load that one core
alone could not.

With `latency=True` (`--latency`) the tally also keeps, per answer, when it came and how many ms after its
request was sent (for a new connection, after connect() began): the benchmark's p50/p99.

Failure kinds: refused (ECONNREFUSED), reset (ECONNRESET, EPIPE), timeout (no complete answer within
--timeout), bad (an answer that is not `200` with a JSON body naming a pid, or none at all).
"""

from __future__ import annotations

import argparse
import asyncio
import errno
import hashlib
import json
import signal
import socket
import ssl
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import uvloop

REQUEST = b"GET / HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n"
KINDS = ("refused", "reset", "timeout", "bad")
ROOT = Path(__file__).resolve().parent.parent  # where `-m tests.load` imports from
MAX_HEAD = 65536


class BadAnswer(Exception):
    pass


@dataclass(frozen=True)
class Answer:
    pid: int
    generation: int  # -1 if the body does not say
    close: bool  # the server closes the connection after it


@dataclass
class Tally:
    ok: int = 0
    pids: dict[int, list[float]] = field(default_factory=dict)  # pid -> [first answer, last answer, count]
    generations: dict[int, int] = field(default_factory=dict)  # generation -> answers
    certs: dict[str, list[float]] = field(default_factory=dict)  # TLS: sha256 -> [first, last connect, count]
    failures: list[tuple[float, str, str]] = field(default_factory=list)  # (time, kind, detail)
    latencies: list[tuple[float, float]] | None = None  # with `latency`: (answered at, ms from the request)
    started: float = 0.0
    ended: float = 0.0
    latency: dict[int, int] = field(default_factory=dict)  # tenths of a millisecond -> answers that took that long

    def answer(self, answer: Answer, at: float, sent: float | None = None) -> None:
        self.ok += 1
        if sent is not None:
            bucket = int((at - sent) * 10_000)
            self.latency[bucket] = self.latency.get(bucket, 0) + 1
            if self.latencies is not None:
                self.latencies.append((round(at, 4), round(1000 * (at - sent), 2)))
        seen = self.pids.setdefault(answer.pid, [at, at, 0])
        seen[1] = at
        seen[2] += 1
        self.generations[answer.generation] = self.generations.get(answer.generation, 0) + 1

    def cert(self, sha256: str, at: float) -> None:
        seen = self.certs.setdefault(sha256, [at, at, 0])
        seen[1] = at
        seen[2] += 1

    def fail(self, exc: BaseException, reused: bool | None = None) -> None:
        prefix = "" if reused is None else ("reused: " if reused else "new: ")
        self.failures.append((time.monotonic(), failure_kind(exc), prefix + describe(exc)))

    @property
    def connections(self) -> int:
        """Requests sent (one per connection in the new-connections mode)."""
        return self.ok + len(self.failures)

    requests = connections

    def failed(self) -> dict[str, int]:
        """Failures per kind, every kind named."""
        return {kind: sum(1 for _t, k, _d in self.failures if k == kind) for kind in KINDS}

    def reused(self) -> int:
        """Failures of requests sent on a reused keep-alive connection."""
        return sum(1 for _t, _k, detail in self.failures if detail.startswith("reused: "))

    def latency_ms(self, q: float) -> float | None:
        """The q-th percentile (0-100) of the answers' latency in ms (None: none timed)."""
        total = sum(self.latency.values())
        if not total:
            return None
        rank, seen = q / 100 * (total - 1), 0
        for bucket in sorted(self.latency):
            seen += self.latency[bucket]
            if seen > rank:
                return bucket / 10
        return max(self.latency) / 10

    def describe(self) -> str:
        examples = sorted({f"{kind}: {detail}" for _t, kind, detail in self.failures})[:5]
        return (f"{self.connections} requests, {self.ok} answered, failed {self.failed()} "
                f"({self.reused()} on reused connections) {examples}")

    def as_json(self) -> dict[str, Any]:
        return {"ok": self.ok, "pids": self.pids, "generations": self.generations, "certs": self.certs,
                "failures": self.failures, "started": self.started, "ended": self.ended, "latency": self.latency,
                "latencies": self.latencies}

    @classmethod
    def merged(cls, tallies: list[dict[str, Any]]) -> Tally:
        """One tally from the JSON of several clients."""
        out = cls(ok=sum(t["ok"] for t in tallies), started=min(t["started"] for t in tallies),
                  ended=max(t["ended"] for t in tallies),
                  failures=sorted((at, kind, detail) for t in tallies for at, kind, detail in t["failures"]))
        if any(t.get("latencies") is not None for t in tallies):
            out.latencies = sorted((at, took) for t in tallies for at, took in t.get("latencies") or [])
        for tally in tallies:
            for key, mine in (("pids", out.pids), ("certs", out.certs)):
                for name, (first, last, count) in tally[key].items():
                    seen = mine.setdefault(int(name) if key == "pids" else name, [first, last, 0])  # type: ignore[arg-type]
                    seen[0], seen[1], seen[2] = min(seen[0], first), max(seen[1], last), seen[2] + count
            for generation, count in tally["generations"].items():
                out.generations[int(generation)] = out.generations.get(int(generation), 0) + count
            for bucket, count in tally.get("latency", {}).items():
                out.latency[int(bucket)] = out.latency.get(int(bucket), 0) + count
        return out


@dataclass(frozen=True)
class Mode:
    """What each client sends: one GET per new connection, or requests back to back on kept ones."""

    keep_alive: bool = False
    method: str = "GET"  # keep-alive mode: GET or POST
    body: int = 64  # POST: bytes of body
    pipeline: int = 1  # keep-alive mode: requests written at once before reading their answers
    http10: bool = False  # keep-alive mode: HTTP/1.0 requests with `Connection: keep-alive`
    httpx: bool = False  # the requests through httpx.AsyncClient's connection pool instead
    pause: float = 0.0  # keep-alive mode: seconds each client waits after an answer before its next request
    latency: bool = False  # keep each answer's time from its request (connect() on a new connection) in the tally

    def request(self) -> bytes:
        if not self.keep_alive:
            return REQUEST
        version, connection = ("HTTP/1.0", "Connection: keep-alive\r\n") if self.http10 else ("HTTP/1.1", "")
        body = b"x" * self.body if self.method == "POST" else b""
        length = f"Content-Length: {len(body)}\r\n" if self.method == "POST" else ""
        return f"{self.method} / {version}\r\nHost: bench\r\n{connection}{length}\r\n".encode() + body

    def arguments(self) -> list[str]:
        latency = ["--latency"] if self.latency else []
        if not self.keep_alive:
            return latency
        return [*latency, "--keep-alive", "--method", self.method, "--body", str(self.body),
                "--pipeline", str(self.pipeline),
                *(["--http10"] if self.http10 else []), *(["--httpx"] if self.httpx else []),
                *(["--pause", str(self.pause)] if self.pause else [])]


class Clients:
    """`clients` processes of this load against `connect` (HOST:PORT), for at most `seconds`.

    A context manager: whatever happens, no client outlives the block. The processes start in the
    caller's network namespace; give them a moment (~0.3 s) to import before counting on their load.
    """

    def __init__(self, connect: str, clients: int = 1, concurrency: int = 64, seconds: float = 60.0,
                 timeout: float = 5.0, tls_ca: str | None = None, *, keep_alive: bool = False, method: str = "GET",
                 body: int = 64, pipeline: int = 1, http10: bool = False, httpx: bool = False,
                 pause: float = 0.0, latency: bool = False) -> None:
        mode = Mode(keep_alive or httpx, method, body, pipeline, http10, httpx, pause, latency)
        command = [sys.executable, "-m", "tests.load", "--connect", connect, "--concurrency", str(concurrency),
                   "--seconds", str(seconds), "--timeout", str(timeout), *(["--tls-ca", tls_ca] if tls_ca else []),
                   *mode.arguments()]
        self.procs = [subprocess.Popen(command, stdout=subprocess.PIPE, cwd=ROOT) for _ in range(clients)]

    def __enter__(self) -> Clients:
        return self

    def __exit__(self, *exc: object) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()

    def finish(self, stop: bool = True) -> Tally:
        """Stop the clients (they let what is in flight finish) or let them run out their time; the merged tally."""
        if stop:
            for proc in self.procs:
                proc.terminate()
        outputs = [proc.communicate(timeout=60)[0] for proc in self.procs]
        for proc, output in zip(self.procs, outputs, strict=True):
            if proc.returncode != 0 or not output:
                raise RuntimeError(f"load client {proc.pid} exited {proc.returncode} without a tally")
        return Tally.merged([json.loads(output) for output in outputs])


def parse_address(text: str) -> tuple[socket.AddressFamily, tuple[str, int]]:
    host, _, port = text.rpartition(":")
    if host.startswith("["):
        return socket.AF_INET6, (host[1:-1], int(port))
    return socket.AF_INET, (host, int(port))


def parse_answer(head: bytes, body: bytes) -> Answer:
    """An answer: `200`, a JSON body naming the pid (and the generation); whether the server closes after it."""
    if not head.startswith(b"HTTP/1.1 200 ") and not head.startswith(b"HTTP/1.0 200 "):
        raise BadAnswer(repr((head + body)[:40]) if head or body else "closed without an answer")
    try:
        data = json.loads(body)
        pid, generation = int(data["pid"]), int(data.get("generation", -1))
    except (ValueError, KeyError, TypeError, AttributeError):
        raise BadAnswer(f"body without a pid: {body[:40]!r}") from None
    tokens = {t.strip() for t in header(head, b"connection").lower().split(b",")}
    close = b"close" in tokens or (head.startswith(b"HTTP/1.0") and b"keep-alive" not in tokens)
    return Answer(pid, generation, close)


def header(head: bytes, name: bytes) -> bytes:
    """The value of a header (several lines joined by commas), b"" if absent."""
    values = [line.partition(b":")[2].strip() for line in head.split(b"\r\n")[1:]
              if line.partition(b":")[0].strip().lower() == name]
    return b", ".join(values)


def answer_pid(raw: bytes) -> int:
    head, _, body = raw.partition(b"\r\n\r\n")
    return parse_answer(head, body).pid


def failure_kind(exc: BaseException) -> str:
    if isinstance(exc, ConnectionRefusedError):
        return "refused"
    if isinstance(exc, ConnectionResetError | BrokenPipeError):
        return "reset"
    if isinstance(exc, TimeoutError):
        return "timeout"
    return "bad"


def describe(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.errno is not None and exc.errno in errno.errorcode:
        return errno.errorcode[exc.errno]
    return str(exc) or type(exc).__name__


def certificate(writer: asyncio.StreamWriter) -> str:
    peer = writer.get_extra_info("ssl_object")
    return hashlib.sha256(peer.getpeercert(binary_form=True) or b"").hexdigest() if peer else ""


async def one(loop: asyncio.AbstractEventLoop, family: socket.AddressFamily, address: tuple[str, int],
              timeout: float, tally: Tally, tls: ssl.SSLContext | None = None) -> Answer:
    """One connection, one GET: the answer, or an exception that says what went wrong."""
    if tls is not None:
        return await one_tls(family, address, timeout, tally, tls)
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setblocking(False)
    try:
        async with asyncio.timeout(timeout):
            await loop.sock_connect(sock, address)
            await loop.sock_sendall(sock, REQUEST)
            chunks = []
            while chunk := await loop.sock_recv(sock, 65536):
                chunks.append(chunk)
        head, _, body = b"".join(chunks).partition(b"\r\n\r\n")
        return parse_answer(head, body)
    finally:
        sock.close()


async def one_tls(family: socket.AddressFamily, address: tuple[str, int], timeout: float, tally: Tally,
                  tls: ssl.SSLContext) -> Answer:
    """The same over TLS (the certificate checked against the CA and the address, and counted)."""
    async with asyncio.timeout(timeout):
        started = time.monotonic()
        reader, writer = await asyncio.open_connection(*address, family=family, ssl=tls)
        try:
            tally.cert(certificate(writer), started)
            writer.write(REQUEST)
            head, _, body = (await reader.read()).partition(b"\r\n\r\n")
            return parse_answer(head, body)
        finally:
            writer.close()


async def read_answer(reader: asyncio.StreamReader) -> Answer:
    """One answer with a Content-Length from a kept connection."""
    try:
        head = await reader.readuntil(b"\r\n\r\n")
    except asyncio.IncompleteReadError as exc:
        raise BadAnswer(f"closed after {len(exc.partial)} bytes of the head" if exc.partial
                        else "closed without an answer") from None
    except asyncio.LimitOverrunError:
        raise BadAnswer("answer head too large") from None
    length = header(head, b"content-length")
    if not length.isdigit():
        raise BadAnswer(f"no Content-Length: {head[:60]!r}")
    try:
        body = await reader.readexactly(int(length))
    except asyncio.IncompleteReadError:
        raise BadAnswer("closed in the middle of the body") from None
    return parse_answer(head[:-4], body)


class KeptConnection:
    """One keep-alive client: request after request on one connection, a new one after a close."""

    def __init__(self, family: socket.AddressFamily, address: tuple[str, int], timeout: float, tally: Tally,
                 tls: ssl.SSLContext | None, mode: Mode) -> None:
        self.family, self.address, self.timeout, self.tally, self.tls = family, address, timeout, tally, tls
        self.batch = mode.request() * mode.pipeline
        self.pipeline = mode.pipeline
        self.writer: asyncio.StreamWriter | None = None
        self.reader: asyncio.StreamReader | None = None
        self.reused = False  # the connection has answered before

    async def round(self) -> None:
        """Send `pipeline` requests and read their answers; each unanswered one is a failure."""
        answered = 0
        sent = time.monotonic()  # a new connection's connect counts, as in the new-connections mode
        try:
            async with asyncio.timeout(self.timeout):
                if self.writer is None:
                    started = time.monotonic()
                    self.reader, self.writer = await asyncio.open_connection(*self.address, family=self.family,
                                                                             ssl=self.tls)
                    if self.tls:
                        self.tally.cert(certificate(self.writer), started)
                assert self.reader is not None
                self.writer.write(self.batch)
                while answered < self.pipeline:
                    answer = await read_answer(self.reader)
                    answered += 1
                    self.tally.answer(answer, time.monotonic(), sent)
                    if answer.close:
                        if answered < self.pipeline:
                            raise BadAnswer(f"{self.pipeline - answered} pipelined requests unanswered: "
                                            "Connection: close before them")
                        self.close()
                        return
            self.reused = True
        except (OSError, BadAnswer, TimeoutError) as exc:
            for _ in range(self.pipeline - answered):
                self.tally.fail(exc, self.reused or answered > 0)
            self.close()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        self.reader = self.writer = None
        self.reused = False


async def run(connect: str, concurrency: int, seconds: float, timeout: float, tls_ca: str | None = None,
              mode: Mode | None = None) -> Tally:
    loop = asyncio.get_running_loop()
    mode = mode or Mode()
    tls = ssl.create_default_context(cafile=tls_ca) if tls_ca else None
    family, address = parse_address(connect)
    stop = asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    tally = Tally(started=time.monotonic(), latencies=[] if mode.latency else None)
    deadline = tally.started + seconds

    async def client() -> None:
        while not stop.is_set() and time.monotonic() < deadline:
            sent = time.monotonic()
            try:
                answer = await one(loop, family, address, timeout, tally, tls)
            except (OSError, BadAnswer, TimeoutError) as exc:
                tally.fail(exc)
            else:
                tally.answer(answer, time.monotonic(), sent)

    async def kept() -> None:
        connection = KeptConnection(family, address, timeout, tally, tls, mode)
        while not stop.is_set() and time.monotonic() < deadline:
            await connection.round()
            if mode.pause:
                await asyncio.sleep(mode.pause)
        connection.close()

    if mode.httpx:
        await through_httpx(connect, concurrency, timeout, tls_ca, mode, tally, stop, deadline)
    else:
        await asyncio.gather(*((kept if mode.keep_alive else client)() for _ in range(concurrency)))
    tally.ended = time.monotonic()
    return tally


async def through_httpx(connect: str, concurrency: int, timeout: float, tls_ca: str | None, mode: Mode,
                        tally: Tally, stop: asyncio.Event, deadline: float) -> None:
    """`concurrency` tasks sending requests back to back through one httpx.AsyncClient pool."""
    import httpx  # a test dependency; only this mode needs it

    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    url = f"{'https' if tls_ca else 'http'}://{connect}/"
    body = b"x" * mode.body if mode.method == "POST" else None
    kinds: dict[type[BaseException], str] = {httpx.ConnectError: "refused", httpx.ReadError: "reset",
                                             httpx.WriteError: "reset", httpx.TimeoutException: "timeout"}
    async with httpx.AsyncClient(limits=limits, timeout=timeout, verify=ssl.create_default_context(
            cafile=tls_ca) if tls_ca else True) as pool:

        async def client() -> None:
            while not stop.is_set() and time.monotonic() < deadline:
                try:
                    response = await pool.request(mode.method, url, content=body)
                    answer = parse_answer(f"HTTP/1.1 {response.status_code} -".encode(), response.content)
                except (httpx.HTTPError, BadAnswer) as exc:
                    kind = next((k for cls, k in kinds.items() if isinstance(exc, cls)), "bad")
                    tally.failures.append((time.monotonic(), kind, f"pool: {type(exc).__name__}: {exc}"))
                else:
                    tally.answer(answer, time.monotonic())

        await asyncio.gather(*(client() for _ in range(concurrency)))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.load", description=__doc__.splitlines()[0])
    parser.add_argument("--connect", required=True, metavar="HOST:PORT")
    parser.add_argument("--concurrency", type=int, default=256)
    parser.add_argument("--seconds", type=float, default=30.0)
    parser.add_argument("--timeout", type=float, default=5.0)
    parser.add_argument("--tls-ca", metavar="PEM", help="connect over TLS, trusting this CA")
    parser.add_argument("--keep-alive", action="store_true", help="keep each connection, requests back to back")
    parser.add_argument("--method", choices=("GET", "POST"), default="GET", help="with --keep-alive")
    parser.add_argument("--body", type=int, default=64, help="bytes of each POST's body")
    parser.add_argument("--pipeline", type=int, default=1, help="with --keep-alive: requests written at once")
    parser.add_argument("--http10", action="store_true", help="with --keep-alive: HTTP/1.0, Connection: keep-alive")
    parser.add_argument("--httpx", action="store_true", help="the requests through httpx.AsyncClient's pool")
    parser.add_argument("--pause", type=float, default=0.0, help="with --keep-alive: seconds between requests")
    parser.add_argument("--latency", action="store_true",
                        help="report each answer's time and ms from its request (or connect()) in `latencies`")
    args = parser.parse_args(argv)
    mode = Mode(args.keep_alive or args.httpx, args.method, args.body, args.pipeline, args.http10, args.httpx,
                args.pause, args.latency)
    tally = uvloop.run(run(args.connect, args.concurrency, args.seconds, args.timeout, args.tls_ca, mode))
    json.dump(tally.as_json(), sys.stdout)
    return 0


if __name__ == "__main__":
    sys.exit(main())
