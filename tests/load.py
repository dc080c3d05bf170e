"""A load of new connections: each one sends one GET and reads the whole answer, on uvloop.

The one load client of the tests and the benchmark (`bench` imports it from here). `Clients` runs it
in subprocesses for a bounded time and returns their merged `Tally`:

    with Clients("127.0.0.1:8000", concurrency=64, seconds=60) as load:
        ...  # reload, crash, scale
        tally = load.finish()
    assert not tally.failures

`python -m tests.load --connect 127.0.0.1:8000 --concurrency 256 --seconds 30` keeps that many
connections in flight (over TLS with `--tls-ca PEM`) until the time is up or it gets SIGTERM/SIGINT
(then it lets the ones in flight finish), and prints one JSON object: the answers per server pid and
every failure with its time and kind. Times are CLOCK_MONOTONIC, comparable between processes.
Several of these processes make a load that one core alone could not.

Failure kinds: refused (ECONNREFUSED), reset (ECONNRESET, EPIPE), timeout (no complete answer within
--timeout), bad (an answer that is not `200` with a JSON body naming a pid, or none at all).
"""

from __future__ import annotations

import argparse
import asyncio
import errno
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


class BadAnswer(Exception):
    pass


@dataclass
class Tally:
    ok: int = 0
    pids: dict[int, list[float]] = field(default_factory=dict)  # pid -> [first answer, last answer, count]
    failures: list[tuple[float, str, str]] = field(default_factory=list)  # (time, kind, detail)
    started: float = 0.0
    ended: float = 0.0

    def answer(self, pid: int, at: float) -> None:
        self.ok += 1
        seen = self.pids.setdefault(pid, [at, at, 0])
        seen[1] = at
        seen[2] += 1

    @property
    def connections(self) -> int:
        return self.ok + len(self.failures)

    def failed(self) -> dict[str, int]:
        """Failures per kind, every kind named."""
        return {kind: sum(1 for _t, k, _d in self.failures if k == kind) for kind in KINDS}

    def as_json(self) -> dict[str, Any]:
        return {"ok": self.ok, "pids": self.pids, "failures": self.failures,
                "started": self.started, "ended": self.ended}

    @classmethod
    def merged(cls, tallies: list[dict[str, Any]]) -> Tally:
        """One tally from the JSON of several clients."""
        out = cls(ok=sum(t["ok"] for t in tallies), started=min(t["started"] for t in tallies),
                  ended=max(t["ended"] for t in tallies),
                  failures=sorted((at, kind, detail) for t in tallies for at, kind, detail in t["failures"]))
        for tally in tallies:
            for pid, (first, last, count) in tally["pids"].items():
                seen = out.pids.setdefault(int(pid), [first, last, 0])
                seen[0], seen[1], seen[2] = min(seen[0], first), max(seen[1], last), seen[2] + count
        return out


class Clients:
    """`clients` processes of this load against `connect` (HOST:PORT), for at most `seconds`.

    A context manager: whatever happens, no client outlives the block. The processes start in the
    caller's network namespace; give them a moment (~0.3 s) to import before counting on their load.
    """

    def __init__(self, connect: str, clients: int = 1, concurrency: int = 64, seconds: float = 60.0,
                 timeout: float = 5.0, tls_ca: str | None = None) -> None:
        command = [sys.executable, "-m", "tests.load", "--connect", connect, "--concurrency", str(concurrency),
                   "--seconds", str(seconds), "--timeout", str(timeout), *(["--tls-ca", tls_ca] if tls_ca else [])]
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


def answer_pid(raw: bytes) -> int:
    head, _, body = raw.partition(b"\r\n\r\n")
    if not head.startswith(b"HTTP/1.1 200 ") and not head.startswith(b"HTTP/1.0 200 "):
        raise BadAnswer(repr(raw[:40]) if raw else "closed without an answer")
    try:
        return int(json.loads(body)["pid"])
    except (ValueError, KeyError, TypeError):
        raise BadAnswer(f"body without a pid: {body[:40]!r}") from None


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


async def one(loop: asyncio.AbstractEventLoop, family: socket.AddressFamily, address: tuple[str, int],
              timeout: float, tls: ssl.SSLContext | None = None) -> int:
    """One connection, one GET: the answering pid, or an exception that says what went wrong."""
    if tls is not None:
        return await one_tls(family, address, timeout, tls)
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setblocking(False)
    try:
        async with asyncio.timeout(timeout):
            await loop.sock_connect(sock, address)
            await loop.sock_sendall(sock, REQUEST)
            chunks = []
            while chunk := await loop.sock_recv(sock, 65536):
                chunks.append(chunk)
        return answer_pid(b"".join(chunks))
    finally:
        sock.close()


async def one_tls(family: socket.AddressFamily, address: tuple[str, int], timeout: float,
                  tls: ssl.SSLContext) -> int:
    """The same over TLS (the certificate checked against the CA and the address)."""
    async with asyncio.timeout(timeout):
        reader, writer = await asyncio.open_connection(*address, family=family, ssl=tls)
        try:
            writer.write(REQUEST)
            return answer_pid(await reader.read())
        finally:
            writer.close()


async def run(connect: str, concurrency: int, seconds: float, timeout: float, tls_ca: str | None = None) -> Tally:
    loop = asyncio.get_running_loop()
    tls = ssl.create_default_context(cafile=tls_ca) if tls_ca else None
    family, address = parse_address(connect)
    stop = asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    tally = Tally(started=time.monotonic())
    deadline = tally.started + seconds

    async def client() -> None:
        while not stop.is_set() and time.monotonic() < deadline:
            try:
                pid = await one(loop, family, address, timeout, tls)
            except (OSError, BadAnswer, TimeoutError) as exc:
                tally.failures.append((time.monotonic(), failure_kind(exc), describe(exc)))
            else:
                tally.answer(pid, time.monotonic())

    await asyncio.gather(*(client() for _ in range(concurrency)))
    tally.ended = time.monotonic()
    return tally


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.load", description=__doc__.splitlines()[0])
    parser.add_argument("--connect", required=True, metavar="HOST:PORT")
    parser.add_argument("--concurrency", type=int, default=256)
    parser.add_argument("--seconds", type=float, default=30.0)
    parser.add_argument("--timeout", type=float, default=5.0)
    parser.add_argument("--tls-ca", metavar="PEM", help="connect over TLS, trusting this CA")
    args = parser.parse_args(argv)
    tally = uvloop.run(run(args.connect, args.concurrency, args.seconds, args.timeout, args.tls_ca))
    json.dump(tally.as_json(), sys.stdout)
    return 0


if __name__ == "__main__":
    sys.exit(main())
