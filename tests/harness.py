"""Scenario helpers: a supervisord under test and HTTP clients (the load is tests/load.py).

Tests read as: write a config, start, load, reload, assert. Every wait has a deadline and says
what it waited for.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import signal
import socket
import ssl
import statistics
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any, NamedTuple

import psutil
import yaml

from supervisor.ctl.main import exchange
from supervisor.errors import ControlError
from supervisor.system import holders
from tests.load import failure_kind

PYTHON = sys.executable
BIN = Path(sys.executable).parent
DEMO = [PYTHON, "-m", "supervisor.demo"]


def running(pid: int) -> bool:
    """The process exists and has not ended (a zombie has ended)."""
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def zombie(pid: int) -> bool:
    """The process has ended and nobody has reaped it yet (False once it is gone)."""
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def wait_for(what: str, check: Callable[[], Any], timeout: float = 10.0, interval: float = 0.02) -> Any:
    """Poll `check` until it returns something truthy; fail naming `what` after `timeout`."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        last = check()
        if last:
            return last
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout} s waiting for {what} (last: {last!r})")


def listening_inodes(port: int = 8000) -> list[int]:
    """The kernel's LISTEN sockets on `port` in this thread's network namespace, by inode (sock_diag)."""
    return sorted(s.inode for s in holders.listening() if s.port == port)


def program(command: list[str] | None = None, **settings: Any) -> dict[str, Any]:
    return {"command": command or DEMO, "workers": 2, "listen": ["127.0.0.1:8000"], "ready_timeout": 10,
            "graceful_timeout": 5, **settings}


class Supervisor:
    """A supervisord process started from a config written in `folder`."""

    def __init__(self, folder: Path, programs: dict[str, dict[str, Any]], migrate: str = "require") -> None:
        self.folder = folder
        self.config = folder / "supervisor.yaml"
        self.socket = folder / "supervisor.sock"
        self.log = folder / "supervisord.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.env: dict[str, str] = {}  # added to supervisord's environment (and so its workers')
        self.new_session = False  # start supervisord in a session of its own (killpg reaches its whole tree)
        self.prefix: list[str] = []  # run before supervisord's command line (a service manager's trampoline)
        self.pass_fds: tuple[int, ...] = ()  # fds supervisord inherits (a service manager's LISTEN_FDS)
        self.bin = BIN  # where supervisord and supervisorctl are (bench/footprint.py: an installed copy)
        self.top: dict[str, Any] = {}  # more top-level keys of the config (watch:)
        self.write(programs, migrate)

    def write(self, programs: dict[str, dict[str, Any]], migrate: str = "require") -> None:
        doc = {"control": {"socket": str(self.socket)}, "migrate": migrate, "programs": programs, **self.top}
        self.config.write_text(yaml.safe_dump(doc, sort_keys=False))

    def start(self, wait: bool = True, timeout: float = 20) -> Supervisor:
        env = {**os.environ, "PATH": f"{self.bin}:{os.environ.get('PATH', '')}", **self.env}
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                [*self.prefix, str(self.bin / "supervisord"), "-c", str(self.config), "--log-format", "json"],
                stdout=log, stderr=log, env=env, start_new_session=self.new_session, pass_fds=self.pass_fds)
        if wait:
            wait_for("every program serving", self.serving, timeout=timeout)
        return self

    def exit_status_of_refused_start(self, timeout: float = 20) -> int:
        """Start a supervisord that must exit by itself; its exit status (it is killed if it does not)."""
        self.start(wait=False)
        assert self.proc is not None
        try:
            return self.proc.wait(timeout=timeout)
        finally:
            self.kill()

    def serving(self) -> bool:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise AssertionError(f"supervisord exited {self.proc.returncode}:\n{self.log_text()}")
        try:
            data = self.status()
        except (OSError, ValueError, ControlError):  # ControlError: a line cut short (framing.decode)
            return False
        except AssertionError:  # refused: a socket file a killed supervisord left, not yet replaced
            if self.proc.poll() is None:
                return False
            raise
        return not data["reloading"] and all(p["state"] == "serving" and p["workers"] and
                                             all(w["state"] == "ready" for w in p["workers"])
                                             for p in data["programs"])

    def status(self) -> dict[str, Any]:
        try:
            final = self.request("status", timeout=10)
        except ConnectionRefusedError:
            assert self.proc is not None
            with contextlib.suppress(subprocess.TimeoutExpired):  # a supervisord on its way out: its exit status
                self.proc.wait(0.5)
            raise AssertionError(f"supervisord does not answer (exit status {self.proc.poll()})") from None
        if not final:
            raise ValueError("supervisord closed the control connection without an answer")
        return final["data"]

    def request(self, command: str, timeout: float = 300, **arguments: Any) -> dict[str, Any]:
        """One control request, as supervisorctl sends it but without its interpreter's start-up: the
        final message ({"ok": true, "message": ..., "data": ...} or {"ok": false, "error": ...})."""
        final: dict[str, Any] = {}
        for message in exchange(str(self.socket), {"command": command, **arguments}, timeout):
            final = message
        return final

    def ctl(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        return subprocess.run([str(self.bin / "supervisorctl"), "-c", str(self.config), *args],
                              capture_output=True, text=True, timeout=timeout)

    def ctl_async(self, *args: str) -> subprocess.Popen[str]:
        """supervisorctl running in the background (a request that waits); `.wait()` gives its exit status."""
        return subprocess.Popen([str(self.bin / "supervisorctl"), "-c", str(self.config), *args],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    def reload(self) -> subprocess.CompletedProcess[str]:
        result = self.ctl("reload")
        assert result.returncode == 0, f"reload failed ({result.returncode}): {result.stdout}{result.stderr}"
        return result

    def workers(self, name: str = "web") -> list[dict[str, Any]]:
        return next(p for p in self.status()["programs"] if p["name"] == name)["workers"]

    def replaced(self, victim: int, workers: int, name: str = "web") -> bool:
        """`victim` is gone and `workers` workers, all ready, serve: in one status snapshot (two could
        see the siblings alone, ready, just before the replacement starts)."""
        found = self.workers(name)
        return len(found) == workers and victim not in {w["pid"] for w in found} and all(
            w["state"] == "ready" for w in found)

    def generation(self, name: str = "web") -> int:
        """The number of the generation that serves (0 if none does). Workers of other generations
        (a rolled-back one in its stop_delay, a retiring one) may still be alive."""
        program = next(p for p in self.status()["programs"] if p["name"] == name)
        return next((g["generation"] for g in program["generations"] if g["state"] == "serving"), 0)

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")

    def events(self, name: str) -> list[dict[str, Any]]:
        """The JSON log lines of one event, in order."""
        found = []
        for line in self.log_text().splitlines():
            try:
                entry = json.loads(line)
            except ValueError:
                continue  # what a worker wrote to stdout
            if isinstance(entry, dict) and entry.get("event") == name:
                found.append(entry)
        return found

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30) -> int:
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        return self.proc.wait(timeout)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


class StatusCall(NamedTuple):
    started: float  # monotonic
    seconds: float
    error: str  # "" if answered ok
    cpu: float  # seconds the master ran on a CPU meanwhile (its work, not the machine's contention)
    waited: float  # seconds the master was runnable but waited for a CPU meanwhile (the machine)


class StatusWatch:
    """`status` every `interval` seconds from a thread, through supervisorctl's own client code (as
    `Supervisor.request` sends it), while an attack runs: each call's latency and error, what the
    master did meanwhile (/proc/PID/schedstat: on a CPU, or waiting for one), and its RSS after it.

    On two shared cores a call can take 100 ms or more while the master only waited for a CPU; one
    where the master ran for that long is the master's own doing: `check` bounds both."""

    def __init__(self, sup: Supervisor, interval: float = 0.1) -> None:
        self.sup = sup
        self.interval = interval
        self.calls: list[StatusCall] = []
        self.rss: list[int] = []
        self._stop = threading.Event()

    def run(self) -> None:
        assert self.sup.proc is not None
        master = psutil.Process(self.sup.proc.pid)
        while not self._stop.wait(self.interval):
            started, before = time.monotonic(), schedstat(master.pid)
            try:
                final = self.sup.request("status", timeout=10)
                error = "" if final.get("ok") else f"answered {final!r}"
            except (OSError, ValueError, ControlError) as exc:
                error = repr(exc)
            seconds, after = time.monotonic() - started, schedstat(master.pid)
            self.calls.append(StatusCall(started, seconds, error, after[0] - before[0], after[1] - before[1]))
            with contextlib.suppress(psutil.Error):
                self.rss.append(master.memory_info().rss)

    def answered(self, excluding: Iterable[tuple[float, float]] = (), refusal: str = "") -> list[StatusCall]:
        """The calls, each answered (assertion error for any that failed). `excluding`: (from, to)
        monotonic times when the master is known not to answer (an upgrade's exec); calls that overlap
        them are left out. `refusal`: an answer with this text counts as answered (a refusal expected)."""
        windows = list(excluding)
        kept = [call for call in self.calls
                if not any(call.started < end and call.started + call.seconds > begin for begin, end in windows)]
        failed = [call.error for call in kept if call.error and not (refusal and refusal in call.error)]
        assert not failed, f"{len(failed)} of {len(kept)} status calls failed: {failed[:3]}"
        return kept

    def check(self, p95: float = 0.1, worst: float = 1.5, cpu: float = 0.05,
              excluding: Iterable[tuple[float, float]] = (), refusal: str = "", rss_before: int | None = None,
              rss_growth: int = 48 << 20) -> str:
        """Assert every status was answered, the 95th percentile within `p95` seconds, the slowest within
        `worst`, the master never ran more than `cpu` seconds while one waited, and (given `rss_before`)
        its RSS grew by less than `rss_growth`; a summary. `excluding`, `refusal`: as for answered()."""
        calls = self.answered(excluding, refusal)
        assert len(calls) >= 5, f"only {len(calls)} status calls: the attack was too short to watch"
        seconds = [call.seconds for call in calls]
        p50, p95_seen = statistics.median(seconds), percentile(seconds, 0.95)
        slowest = max(calls, key=lambda call: call.seconds)
        busiest = max(calls, key=lambda call: call.cpu)
        summary = (f"status p50 {p50 * 1000:.1f} ms, p95 {p95_seen * 1000:.1f} ms, "
                   f"max {slowest.seconds * 1000:.1f} ms (the master on a CPU {slowest.cpu * 1000:.0f} ms, waiting "
                   f"for one {slowest.waited * 1000:.0f} ms), {len(calls)} calls; the master's most CPU during one "
                   f"{busiest.cpu * 1000:.0f} ms")
        assert p95_seen <= p95 and slowest.seconds < worst and busiest.cpu < cpu, summary
        if rss_before is not None:
            top = max(self.rss, default=rss_before)
            summary += f"; master RSS {rss_before >> 20} -> {top >> 20} MiB"
            assert top - rss_before < rss_growth, summary
        return summary


def schedstat(pid: int) -> tuple[float, float]:
    """Seconds a process has run on a CPU, and waited runnable for one (0, 0 once it is gone)."""
    try:
        with open(f"/proc/{pid}/schedstat") as f:
            ran, waited, _slices = f.read().split()
    except (OSError, ValueError):
        return 0.0, 0.0
    return int(ran) / 1e9, int(waited) / 1e9


def percentile(values: list[float], q: float) -> float:
    """The nearest-rank percentile: the smallest value that at least a fraction q of `values` do not exceed."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(len(ordered) * q) - 1)] if ordered else 0.0


@contextlib.contextmanager
def watching_status(sup: Supervisor, interval: float = 0.1) -> Iterator[StatusWatch]:
    """A StatusWatch running for the block."""
    watch = StatusWatch(sup, interval)
    thread = threading.Thread(target=watch.run, daemon=True)
    thread.start()
    try:
        yield watch
    finally:
        watch._stop.set()
        thread.join(timeout=30)


@contextlib.contextmanager
def supervisor(folder: Path, programs: dict[str, dict[str, Any]], migrate: str = "require",
               new_session: bool = False) -> Iterator[Supervisor]:
    sup = Supervisor(folder, programs, migrate)
    sup.new_session = new_session
    try:
        yield sup.start()
    finally:
        sup.kill()


def request(address: tuple[str, int] = ("127.0.0.1", 8000), path: str = "/",
            timeout: float = 10) -> tuple[int, dict[str, Any]]:
    """One GET on a new connection; returns (status, JSON body)."""
    code, body, _cert = request_cert(address, path, timeout)
    return code, body


def request_cert(address: tuple[str, int] = ("127.0.0.1", 8000), path: str = "/", timeout: float = 10,
                 tls: ssl.SSLContext | None = None) -> tuple[int, dict[str, Any], str]:
    """One GET on a new connection, over TLS if given; also the SHA-256 of the server's certificate."""
    with socket.create_connection(address, timeout=timeout) as raw:
        sock = tls.wrap_socket(raw, server_hostname="localhost") if tls else raw
        peer = sock.getpeercert(binary_form=True) if isinstance(sock, ssl.SSLSocket) else None
        cert = hashlib.sha256(peer or b"").hexdigest() if tls else ""
        sock.sendall(f"GET {path} HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n".encode())
        return (*parse_response(read_all(sock)), cert)


def read_all(sock: socket.socket) -> bytes:
    chunks = []
    while chunk := sock.recv(65536):
        chunks.append(chunk)
    return b"".join(chunks)


def parse_response(raw: bytes) -> tuple[int, dict[str, Any]]:
    head, _, body = raw.partition(b"\r\n\r\n")
    if not head.startswith(b"HTTP/1."):
        raise ValueError(f"not an HTTP response: {raw[:80]!r}")
    code = int(head.split(b" ", 2)[1])
    try:
        return code, json.loads(body) if body.startswith(b"{") else {}
    except ValueError:
        return code, {}


def open_requests(n: int, address: tuple[str, int] = ("127.0.0.1", 8000)) -> list[socket.socket]:
    """n connections, each with a complete GET sent: they wait in an accept queue if nobody accepts."""
    socks = []
    for _ in range(n):
        sock = socket.create_connection(address, timeout=10)
        sock.sendall(b"GET / HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n")
        socks.append(sock)
    return socks


def collect(socks: list[socket.socket], timeout: float = 15) -> tuple[Counter[str], Counter[int]]:
    """Read every answer: outcome kinds and the generations that served them."""
    outcomes: Counter[str] = Counter()
    generations: Counter[int] = Counter()
    for sock in socks:
        sock.settimeout(timeout)
        try:
            code, body = parse_response(read_all(sock))
            outcomes["ok" if code == 200 else f"http:{code}"] += 1
            generations[body.get("generation", -1)] += 1
        except (OSError, ValueError) as exc:
            outcomes[failure_kind(exc)] += 1
        finally:
            sock.close()
    return outcomes, generations


def kernel_counters() -> dict[str, int]:
    """The kernel's counters a lost connection shows in: TcpExt's listen and migration counters, and
    Tcp OutRsts (the only one the shutdown-during-handshake race moves, see docs/kernel.md §8)."""
    from supervisor.system import migrate

    table = migrate.tcp_ext()
    counters = {key: table.get(key, 0) for key in ("ListenOverflows", "ListenDrops", "TCPMigrateReqSuccess",
                                                     "TCPMigrateReqFailure")}
    with open("/proc/net/snmp") as f:
        tcp = [line.split() for line in f if line.startswith("Tcp:")]
    counters["OutRsts"] = int(dict(zip(tcp[0], tcp[1], strict=True)).get("OutRsts", 0))
    return counters
