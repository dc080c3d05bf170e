"""The demo worker, as supervisord runs it: a listener at fd 3, READY=1 on NOTIFY_SOCKET, SIGTERM to stop.

Real processes and sockets, each test in its own network namespace (fixed ports are free there).
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import signal
import socket
import ssl
import struct
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from supervisor import demo as demo_module
from supervisor.servers.stopping import IDLE_CLOSE
from tests.harness import wait_for

ROOT = Path(__file__).resolve().parents[2]
PORT = 8000


pytestmark = pytest.mark.usefixtures("netns")


@dataclass
class DemoProcess:
    pid: int
    pidfd: int
    stderr: Path
    notify: socket.socket
    status: int | None = None

    def wait_ready(self, timeout: float = 10.0) -> str:
        """The READY=1 datagram; fails at once if the demo exits first."""
        readable, _, _ = select.select([self.notify.fileno(), self.pidfd], [], [], timeout)
        assert readable, f"no READY=1 within {timeout} s:\n{self.log()}"
        assert self.notify.fileno() in readable, f"exited {self.wait(1)} before READY=1:\n{self.log()}"
        message = self.notify.recv(4096).decode()
        assert "READY=1" in message.split("\n"), message
        return message

    def wait(self, timeout: float = 10.0) -> int:
        if self.status is None:
            assert select.select([self.pidfd], [], [], timeout)[0], f"the demo still runs after {timeout} s"
            self.status = os.waitstatus_to_exitcode(os.waitpid(self.pid, 0)[1])
        return self.status

    def signal(self, signum: int = signal.SIGTERM) -> None:
        signal.pidfd_send_signal(self.pidfd, signum)

    def log(self) -> str:
        return self.stderr.read_text(errors="replace")

    def holds(self, sock: socket.socket) -> bool:
        """Whether the demo still has `sock` open (compared by socket inode through /proc)."""
        target = f"socket:[{os.fstat(sock.fileno()).st_ino}]"
        with contextlib.suppress(FileNotFoundError):
            return any(os.readlink(f"/proc/{self.pid}/fd/{fd}") == target
                       for fd in os.listdir(f"/proc/{self.pid}/fd"))
        return False

    def cpu_seconds(self) -> float:
        fields = Path(f"/proc/{self.pid}/stat").read_text().rpartition(")")[2].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


@contextlib.contextmanager
def running_demo(tmp_path: Path, *args: str, listener: socket.socket | None = None,
                 **env: str) -> Iterator[DemoProcess]:
    """Start `python -m supervisor.demo`, with `listener` at fd 3 (socket activation) if given."""
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(str(tmp_path / "notify.sock"))
    stderr = tmp_path / "demo.err"
    environ = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "PYTHONPATH": str(ROOT),
               "NOTIFY_SOCKET": str(tmp_path / "notify.sock"), **env}
    actions: list[tuple[int | str, ...]] = [
        (os.POSIX_SPAWN_OPEN, 2, str(stderr), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)]
    if listener is not None:
        actions.append((os.POSIX_SPAWN_DUP2, listener.fileno(), 3))
        environ["LISTEN_FDS"] = "1"
    pid = os.posix_spawn(sys.executable, [sys.executable, "-m", "supervisor.demo", *args], environ,
                         file_actions=actions)
    proc = DemoProcess(pid, os.pidfd_open(pid), stderr, notify)
    try:
        yield proc
    finally:
        if proc.status is None:
            signal.pidfd_send_signal(proc.pidfd, signal.SIGKILL)
            proc.wait()
        os.close(proc.pidfd)
        notify.close()


def make_listener(backlog: int = 128) -> socket.socket:
    """A listener as supervisord makes them: SO_REUSEPORT, bound, listening."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind(("127.0.0.1", PORT))
    sock.listen(backlog)
    return sock


def accept_queue(sock: socket.socket) -> tuple[int, int]:
    """(queued, backlog) of a listener: tcpi_unacked and tcpi_sacked of TCP_INFO."""
    queued, backlog = struct.unpack_from("II", sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 104), 24)
    return queued, backlog


def read_response(sock: socket.socket) -> tuple[int, dict[str, str], bytes]:
    """One response, read to its exact end (more may follow on the connection): (status, headers, body)."""
    head = b""
    while not head.endswith(b"\r\n\r\n"):
        head += sock.recv(1) or pytest.fail(f"connection closed after {head!r}")
    status_line, *lines = head.decode("latin-1").strip().split("\r\n")
    headers = {name.lower(): value.strip() for name, _, value in (line.partition(":") for line in lines)}
    body, length = b"", int(headers["content-length"])
    while len(body) < length:
        body += sock.recv(length - len(body)) or pytest.fail(f"connection closed after {head + body!r}")
    return int(status_line.split(" ")[1]), headers, body


def get(path: str = "/", port: int = PORT, host: str = "127.0.0.1") -> tuple[int, dict[str, str], bytes]:
    with socket.create_connection((host, port), timeout=10) as sock:
        sock.sendall(f"GET {path} HTTP/1.1\r\nHost: test\r\n\r\n".encode())
        return read_response(sock)


def connect_accepted(listener: socket.socket) -> socket.socket:
    """A connection the demo has accepted: the shared listener's accept queue is empty again."""
    client = socket.create_connection(("127.0.0.1", PORT), timeout=10)
    wait_for("the demo to accept the connection", lambda: accept_queue(listener)[0] == 0)
    return client


def test_serves_the_inherited_listener_and_reports_ready(tmp_path: Path) -> None:
    with make_listener() as listener, running_demo(tmp_path, listener=listener, LISTEN_FDNAMES="web",
                                                   SUPERVISOR_GENERATION="7", SUPERVISOR_WORKER="2") as demo:
        assert demo.wait_ready() == "READY=1\nSTATUS=serving 1 listeners"
        status, headers, body = get("/?from=test")
        assert (status, headers["content-type"]) == (200, "application/json")
        assert json.loads(body) == {"generation": 7, "worker": 2, "pid": demo.pid, "listener": "web"}
        assert get("/health")[::2] == (200, b"ok")
        assert get("/missing")[0] == 404
        assert f"demo pid={demo.pid} generation=7 worker=2 serving web" in demo.log()


@pytest.mark.parametrize(("override", "expected"), [(None, 777), ("555", 555)])
def test_keeps_the_listener_backlog(tmp_path: Path, override: str | None, expected: int) -> None:
    """asyncio's create_server() calls listen() again, with 100 unless told: the demo passes the socket's own.

    The SUPERVISOR_BACKLOG case shows that the demo's listen() does change the socket the test holds.
    """
    env = {"SUPERVISOR_BACKLOG": override} if override else {}
    with make_listener(777) as listener, running_demo(tmp_path, listener=listener, **env) as demo:
        demo.wait_ready()
        assert accept_queue(listener) == (0, expected)


def test_graceful_stop_finishes_requests_and_accepts_no_more(tmp_path: Path) -> None:
    with make_listener() as listener, running_demo(tmp_path, listener=listener) as demo:
        demo.wait_ready()
        with connect_accepted(listener) as slow:
            slow.sendall(b"GET /?delay=1 HTTP/1.1\r\nHost: test\r\n\r\n")
            demo.signal(signal.SIGTERM)
            wait_for("the demo to close its listener", lambda: not demo.holds(listener))
            late = socket.create_connection(("127.0.0.1", PORT), timeout=10)  # queued in the test's copy
            status, headers, body = read_response(slow)
            assert (status, headers["connection"], json.loads(body)["pid"]) == (200, "close", demo.pid)
            assert slow.recv(1) == b""
        assert demo.wait() == 0
        assert accept_queue(listener)[0] == 1, "the demo accepted a connection after its stop signal"
        late.close()
        assert f"demo pid={demo.pid} stopping: 1 connections in progress" in demo.log()


def test_stop_after_an_outside_shutdown_does_not_spin(tmp_path: Path) -> None:
    """supervisord shuts the listener down, then sends SIGTERM: the loop must not poll the dead listener.

    Without the demo's immediate server.close(), uvloop spins at ~0.8 CPU-s/s on it (docs/kernel.md §5).
    """
    with make_listener() as listener, running_demo(tmp_path, listener=listener) as demo:
        demo.wait_ready()
        with connect_accepted(listener) as slow:
            slow.sendall(b"GET /?delay=1 HTTP/1.1\r\nHost: test\r\n\r\n")
            listener.shutdown(socket.SHUT_RDWR)
            demo.signal(signal.SIGTERM)
            started, cpu = time.monotonic(), demo.cpu_seconds()
            assert read_response(slow)[0] == 200
            elapsed, used = time.monotonic() - started, demo.cpu_seconds() - cpu
        assert elapsed > 0.5 and used < 0.25 * elapsed, f"{used:.2f} CPU-s in {elapsed:.2f} s"
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", PORT), timeout=10)
        assert demo.wait() == 0


def test_an_outside_shutdown_alone_does_not_spin_and_kept_connections_go_on(tmp_path: Path) -> None:
    """supervisord shuts a retiring worker's listener `stop_delay` before its stop signal: meanwhile the
    worker stops watching it (stopping.close_when_shut) and serves the connections it has, as before.

    Without it, uvloop spins on the dead listener at ~0.8 CPU-s/s until the signal (docs/kernel.md §5)."""
    with make_listener() as listener, running_demo(tmp_path, listener=listener) as demo:
        demo.wait_ready()
        with connect_accepted(listener) as kept:
            kept.sendall(b"GET /health HTTP/1.1\r\nHost: test\r\n\r\n")
            assert read_response(kept)[1]["connection"] == "keep-alive"
            listener.shutdown(socket.SHUT_RDWR)
            wait_for("the demo to close its listener", lambda: not demo.holds(listener))
            started, cpu = time.monotonic(), demo.cpu_seconds()
            time.sleep(1.0)
            elapsed, used = time.monotonic() - started, demo.cpu_seconds() - cpu
            assert used < 0.1 * elapsed, f"{used:.2f} CPU-s in {elapsed:.2f} s"
            kept.sendall(b"GET / HTTP/1.1\r\nHost: test\r\n\r\n")  # not stopping: served as ever
            status, headers, _ = read_response(kept)
            assert (status, headers["connection"]) == (200, "keep-alive")
        demo.signal(signal.SIGTERM)
        assert demo.wait() == 0


def test_stop_answers_kept_and_accepted_connections_and_closes_quiet_ones(tmp_path: Path) -> None:
    """The stop contract: a kept connection's next request, and one accepted but not asked yet, get an answer
    that says `Connection: close`; a connection that stays quiet is closed IDLE_CLOSE s after its last byte."""
    with make_listener() as listener, running_demo(tmp_path, listener=listener) as demo:
        demo.wait_ready()
        with connect_accepted(listener) as kept, connect_accepted(listener) as idle, \
                connect_accepted(listener) as fresh:
            for sock in (kept, idle):
                sock.sendall(b"GET /health HTTP/1.1\r\nHost: test\r\n\r\n")
                assert read_response(sock)[1]["connection"] == "keep-alive"
            last_answer = time.monotonic()
            demo.signal(signal.SIGTERM)
            wait_for("the demo to close its listener", lambda: not demo.holds(listener))
            for sock in (kept, fresh):
                sock.sendall(b"GET / HTTP/1.1\r\nHost: test\r\n\r\n")
                status, headers, _ = read_response(sock)
                assert (status, headers["connection"]) == (200, "close")
                assert sock.recv(1) == b""
            assert idle.recv(1) == b""
            quiet_for = time.monotonic() - last_answer
            assert IDLE_CLOSE - 0.1 < quiet_for < IDLE_CLOSE + 1, quiet_for
        assert demo.wait() == 0


def test_stop_answers_every_pipelined_request_it_has_read(tmp_path: Path) -> None:
    """Requests already read when the stop comes are all answered; only the last answer says close."""
    with make_listener() as listener, running_demo(tmp_path, listener=listener) as demo:
        demo.wait_ready()
        with connect_accepted(listener) as sock:
            sock.sendall(b"GET /?delay=0.5 HTTP/1.1\r\nHost: test\r\n\r\n" * 3)
            time.sleep(0.2)  # read, the first one waiting for its answer
            demo.signal(signal.SIGTERM)
            answers = [read_response(sock) for _ in range(3)]
            assert [(status, headers["connection"]) for status, headers, _ in answers] == [
                (200, "keep-alive"), (200, "keep-alive"), (200, "close")]
            assert sock.recv(1) == b""
        assert demo.wait() == 0


def test_stop_is_bounded_by_the_graceful_timeout(tmp_path: Path) -> None:
    """A client that never reads its answers (its receive window full) cannot hold the demo: it exits at
    min(FINISH_SHARE x SUPERVISOR_GRACEFUL_TIMEOUT, the timeout less FINISH_MARGIN) after the stop signal."""
    with make_listener() as listener, running_demo(tmp_path, listener=listener,
                                                   SUPERVISOR_GRACEFUL_TIMEOUT="2") as demo:
        demo.wait_ready()
        with connect_accepted(listener) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            sock.setblocking(False)
            with contextlib.suppress(BlockingIOError):
                for _ in range(20000):  # until the demo's answers fill both sides' buffers
                    sock.send(b"GET / HTTP/1.1\r\nHost: test\r\n\r\n")
            started = time.monotonic()
            demo.signal(signal.SIGTERM)
            assert demo.wait(5) == 0
            assert 1.4 < time.monotonic() - started < 3  # at 1.5 s, and its exit (a busy machine is slow)
        assert "closing 1 connections still open 1.5 s after the stop" in demo.log()


def test_stop_waits_for_a_tls_handshake_in_progress(tmp_path: Path) -> None:
    """Over TLS the server knows a connection only after the handshake: one accepted but still shaking
    hands when the stop comes must get its answer (a reload under TLS load lost one such client)."""
    trustme = pytest.importorskip("trustme")
    ca = trustme.CA()
    cert = ca.issue_cert("localhost")
    cert.private_key_and_cert_chain_pem.write_to_path(str(tmp_path / "server.pem"))
    client_context = ssl.create_default_context()
    ca.configure_trust(client_context)
    pem = str(tmp_path / "server.pem")
    with make_listener() as listener, running_demo(tmp_path, listener=listener, SUPERVISOR_TLS_CERT=pem,
                                                   SUPERVISOR_TLS_KEY=pem) as demo:
        demo.wait_ready()
        with connect_accepted(listener) as raw:  # accepted; no ClientHello sent yet
            demo.signal(signal.SIGTERM)
            wait_for("the demo to close its listener", lambda: not demo.holds(listener))
            time.sleep(0.3)  # the demo would have exited by now if it did not count the connection
            with client_context.wrap_socket(raw, server_hostname="localhost") as tls:
                tls.sendall(b"GET / HTTP/1.1\r\nHost: test\r\n\r\n")
                status, headers, _ = read_response(tls)
                assert (status, headers["connection"]) == (200, "close")
        assert demo.wait() == 0


def test_an_unfinished_tls_handshake_does_not_hold_the_stop_forever(tmp_path: Path) -> None:
    trustme = pytest.importorskip("trustme")
    pem = str(tmp_path / "server.pem")
    trustme.CA().issue_cert("localhost").private_key_and_cert_chain_pem.write_to_path(pem)
    with make_listener() as listener, running_demo(tmp_path, listener=listener, SUPERVISOR_TLS_CERT=pem,
                                                   SUPERVISOR_TLS_KEY=pem) as demo:
        demo.wait_ready()
        with connect_accepted(listener):  # never shakes hands
            started = time.monotonic()
            demo.signal(signal.SIGTERM)
            assert demo.wait(demo_module.STOP_GRACE + 5) == 0
            assert time.monotonic() - started >= demo_module.STOP_GRACE - 0.5


def test_second_stop_signal_exits_at_once(tmp_path: Path) -> None:
    with make_listener() as listener, running_demo(tmp_path, listener=listener) as demo:
        demo.wait_ready()
        with connect_accepted(listener) as slow:
            slow.sendall(b"GET /?delay=30 HTTP/1.1\r\nHost: test\r\n\r\n")
            demo.signal(signal.SIGTERM)
            wait_for("the demo to close its listener", lambda: not demo.holds(listener))
            demo.signal(signal.SIGINT)
            assert demo.wait(5) == 0


def test_http_keep_alive_pipelining_bodies_and_errors(tmp_path: Path) -> None:
    with make_listener() as listener, running_demo(tmp_path, listener=listener) as demo:
        demo.wait_ready()
        with socket.create_connection(("127.0.0.1", PORT), timeout=10) as sock:
            sock.sendall(b"POST /health HTTP/1.1\r\nContent-Length: 5\r\n\r\nhello"
                         b"GET /?delay=0.1 HTTP/1.1\r\n\r\nGET /health HTTP/1.1\r\n\r\n")
            assert [read_response(sock)[0] for _ in range(3)] == [405, 200, 200]
            sock.sendall(b"GET / HTTP/1.1\r\nContent-Length: 3\r\n\r\n")
            sock.sendall(b"abcGET /nope HTTP/1.1\r\n\r\n")
            assert [read_response(sock)[0] for _ in range(2)] == [200, 404]
            sock.sendall(b"NONSENSE\r\n\r\n")
            assert read_response(sock)[0] == 400 and sock.recv(1) == b""
        with socket.create_connection(("127.0.0.1", PORT), timeout=10) as sock:
            sock.sendall(b"GET /health HTTP/1.0\r\n\r\n")
            assert read_response(sock)[1]["connection"] == "close" and sock.recv(1) == b""
        with socket.create_connection(("127.0.0.1", PORT), timeout=10) as sock:
            sock.sendall(b"GET /health HTTP/1.0\r\nConnection: Keep-Alive\r\n\r\n"
                         b"GET /?delay=x HTTP/1.0\r\n\r\n")
            assert read_response(sock)[1]["connection"] == "keep-alive"
            assert read_response(sock)[0] == 400


@pytest.mark.parametrize(("env", "args", "error"), [
    ({"LISTEN_FDS": "1", "LISTEN_PID": "1"}, [], "LISTEN_PID=1 but this is pid"),
    ({}, [], "no listeners"),
    ({"LISTEN_FDS": "1"}, ["--bind", f"127.0.0.1:{PORT}"], "both --bind and LISTEN_FDS"),
    ({"SUPERVISOR_GENERATION": "two"}, ["--bind", f"127.0.0.1:{PORT}"], "SUPERVISOR_GENERATION='two'"),
])
def test_refuses_to_start_without_its_listeners(env: dict[str, str], args: list[str], error: str) -> None:
    env = {"PATH": os.environ.get("PATH", ""), "PYTHONPATH": str(ROOT), **env}
    result = subprocess.run([sys.executable, "-m", "supervisor.demo", *args], capture_output=True, text=True,
                            env=env, timeout=30)
    assert result.returncode == 2
    assert error in result.stderr and len(result.stderr.strip().splitlines()) == 1, result.stderr


def test_refuses_a_listener_that_was_shut_down(tmp_path: Path) -> None:
    """listen() would put it back in its reuseport group, where connections would wait for nobody."""
    with make_listener() as listener:
        listener.shutdown(socket.SHUT_RDWR)
        with running_demo(tmp_path, listener=listener) as demo:
            assert demo.wait() == 2
            assert "fd 3 from LISTEN_FDS is not a listening stream socket" in demo.log()
        assert listener.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN) == 0  # still out of the group


def test_standalone_bind_serves_ipv4_and_ipv6(tmp_path: Path) -> None:
    with running_demo(tmp_path, "--bind", f"127.0.0.1:{PORT}", "--bind", f"[::1]:{PORT + 1}",
                      "--backlog", "321") as demo:
        assert demo.wait_ready() == "READY=1\nSTATUS=serving 2 listeners"
        assert json.loads(get("/")[2])["listener"] == f"127.0.0.1:{PORT}"
        assert json.loads(get("/", PORT + 1, "::1")[2])["listener"] == f"[::1]:{PORT + 1}"
        listening = subprocess.run(["ss", "-Hltn"], capture_output=True, text=True, check=True).stdout
        assert sorted(line.split()[2] for line in listening.splitlines()) == ["321", "321"]  # Send-Q: backlog
        demo.signal(signal.SIGTERM)
        assert demo.wait() == 0


def test_notify_speaks_to_abstract_sockets(monkeypatch: pytest.MonkeyPatch) -> None:
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as receiver:
        receiver.bind(f"\0demo-notify-{os.getpid()}")
        monkeypatch.setenv("NOTIFY_SOCKET", f"@demo-notify-{os.getpid()}")
        demo_module.notify("READY=1")
        receiver.settimeout(5)
        assert receiver.recv(64) == b"READY=1"
