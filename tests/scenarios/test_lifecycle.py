"""Start, status, stop, start, shutdown, stubborn workers, and what the master leaves behind."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import stat
import subprocess
import tempfile
import time
from pathlib import Path

import psutil
import pytest
import yaml

from supervisor.process.worker import SETPRIV
from tests.harness import (
    BIN,
    PYTHON,
    Supervisor,
    parse_response,
    program,
    read_all,
    request,
    supervisor,
    wait_for,
    zombie,
)

pytestmark = pytest.mark.usefixtures("netns")

# A worker that is ready at once and ignores SIGTERM: only SIGKILL ends it. Stdlib only, -S -I: fast.
STUBBORN = [PYTHON, "-S", "-I", "-c", (
    "import os, signal, socket\n"
    "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
    "s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)\n"
    "s.sendto(b'READY=1', os.environ['NOTIFY_SOCKET'])\n"
    "signal.pause()\n"
)]


def test_workers_get_the_socket_activation_contract(tmp_path: Path) -> None:
    """Each worker has its listeners at fds 3.., LISTEN_PID = its pid, and its generation and index."""
    dump = [PYTHON, "-S", "-I", "-c", (
        "import json, os, socket, sys, signal\n"
        "keys = ['LISTEN_FDS', 'LISTEN_PID', 'LISTEN_FDNAMES', 'SUPERVISOR_GENERATION', 'SUPERVISOR_WORKER']\n"
        "facts = {k: os.environ.get(k) for k in keys}\n"
        "facts['pid'] = os.getpid()\n"
        "facts['fds'] = [socket.socket(fileno=os.dup(fd)).getsockname()[1] for fd in (3, 4)]\n"
        "open(os.path.join(sys.argv[1], f\"{os.getpid()}.json\"), 'w').write(json.dumps(facts))\n"
        "socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM).sendto(b'READY=1', os.environ['NOTIFY_SOCKET'])\n"
        "signal.pause()\n"
    ), str(tmp_path)]
    with supervisor(tmp_path, {"web": program(dump, listen=["127.0.0.1:8000", "[::1]:8001"])}) as sup:
        facts = [json.loads((tmp_path / f"{w['pid']}.json").read_text()) for w in sup.workers()]
    assert sorted(f["SUPERVISOR_WORKER"] for f in facts) == ["0", "1"]
    for f in facts:
        assert f["LISTEN_FDS"] == "2" and f["LISTEN_PID"] == str(f["pid"])
        assert f["LISTEN_FDNAMES"] == "web.0:web.1" and f["SUPERVISOR_GENERATION"] == "1"
        assert f["fds"] == [8000, 8001]


def test_status_shows_programs_workers_and_migration(tmp_path: Path) -> None:
    """`status` prints a table, `status --json` the same facts as JSON."""
    with supervisor(tmp_path, {"web": program()}) as sup:
        table = sup.ctl("status")
        data = json.loads(sup.ctl("status", "--json").stdout)
    assert table.returncode == 0
    assert "migration: require (on" in table.stdout and "web" in table.stdout and "  web:0  serving" in table.stdout
    assert data["migrate"]["enabled"] is True
    web = data["programs"][0]
    assert web["state"] == "serving" and len(web["workers"]) == 2
    assert all(w["rss"] > 0 and w["state"] == "ready" for w in web["workers"])


def slow_request(pids: list[int], delay: float) -> socket.socket:
    """A `GET /?delay=S` that one of the demo workers `pids` has accepted and is busy with."""
    sock = socket.create_connection(("127.0.0.1", 8000), timeout=10)
    sock.sendall(f"GET /?delay={delay} HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n".encode())
    wait_for("a worker to accept the request", lambda: any(
        c.status == psutil.CONN_ESTABLISHED for pid in pids for c in psutil.Process(pid).net_connections()))
    return sock


def answer(sock: socket.socket) -> bytes:
    """What the server sent before it closed the connection (nothing, if it was killed)."""
    try:
        return read_all(sock)
    except ConnectionResetError:
        return b""
    finally:
        sock.close()


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_term_or_int_stops_gracefully_and_leaves_no_process(tmp_path: Path, sig: signal.Signals) -> None:
    """SIGTERM or SIGINT (Ctrl-C): a request in progress is answered, the daemon exits 0, no worker survives."""
    with supervisor(tmp_path, {"web": program()}) as sup:
        pids = [w["pid"] for w in sup.workers()]
        sock = slow_request(pids, 1)
        assert sup.stop(sig) == 0
    assert parse_response(answer(sock))[0] == 200
    assert not [pid for pid in pids if psutil.pid_exists(pid)]
    assert not (tmp_path / "supervisor.sock").exists()


def stubborn_and_busy() -> dict[str, dict[str, object]]:
    """Demo workers (to be given a slow request) and a worker that ignores SIGTERM: a graceful stop waits 30 s."""
    return {"web": program(graceful_timeout=30),
            "stubborn": program(STUBBORN, workers=1, listen=["127.0.0.1:8001"], graceful_timeout=30)}


@pytest.mark.parametrize(("first", "second"), [(signal.SIGTERM, signal.SIGTERM), (signal.SIGTERM, signal.SIGINT),
                                               (signal.SIGINT, signal.SIGTERM)])
def test_second_term_or_int_stops_fast(tmp_path: Path, first: signal.Signals, second: signal.Signals) -> None:
    """During a graceful stop that waits for a 30 s request and a worker ignoring SIGTERM, a second TERM/INT
    kills the workers: exit 0 at once."""
    with supervisor(tmp_path, stubborn_and_busy()) as sup:
        assert sup.proc is not None
        pids = [w["pid"] for w in sup.workers()] + [w["pid"] for w in sup.workers("stubborn")]
        sock = slow_request(pids, 30)
        sup.proc.send_signal(first)
        wait_for("the graceful stop", lambda: sup.events("shutting_down"))
        with pytest.raises(subprocess.TimeoutExpired):
            sup.proc.wait(timeout=1)  # the graceful stop waits for the request: the fast one must be the cause
        started = time.monotonic()
        assert sup.stop(second, timeout=10) == 0
        assert time.monotonic() - started < 5
    assert not answer(sock).startswith(b"HTTP/"), "the request was answered: the stop was not fast"
    assert not [pid for pid in pids if psutil.pid_exists(pid)]
    assert not (tmp_path / "supervisor.sock").exists()


def test_quit_stops_fast(tmp_path: Path) -> None:
    """SIGQUIT: listeners shut and workers killed at once, also a worker that ignores its stop signal."""
    with supervisor(tmp_path, stubborn_and_busy()) as sup:
        pids = [w["pid"] for w in sup.workers()] + [w["pid"] for w in sup.workers("stubborn")]
        sock = slow_request(pids, 30)
        started = time.monotonic()
        assert sup.stop(signal.SIGQUIT, timeout=10) == 0
        assert time.monotonic() - started < 5
    assert not answer(sock).startswith(b"HTTP/")
    assert not [pid for pid in pids if psutil.pid_exists(pid)]
    assert [e["fast"] for e in sup.events("shutting_down")] == [True]
    assert not (tmp_path / "supervisor.sock").exists()


def test_stop_and_start_a_program(tmp_path: Path) -> None:
    """`stop web` waits for its workers to exit; `start web` brings up a new generation."""
    with supervisor(tmp_path, {"web": program()}) as sup:
        stop = sup.ctl("stop", "web")
        assert stop.returncode == 0 and "web stopped" in stop.stdout
        assert next(p for p in sup.status()["programs"])["state"] == "stopped"
        with pytest.raises(OSError):
            request(timeout=2)
        start = sup.ctl("start", "web")
        assert start.returncode == 0, start.stderr
        assert request()[1]["generation"] == 2
        again = sup.ctl("start", "web")
        assert again.returncode == 1 and "already running" in again.stderr
        unknown = sup.ctl("stop", "nope")
        assert unknown.returncode == 1 and "no program named 'nope'" in unknown.stderr


def test_supervisorctl_exit_codes(tmp_path: Path) -> None:
    """2 for usage and config errors, 3 when no daemon answers."""
    sup = Supervisor(tmp_path, {"web": program()})
    assert sup.ctl("status").returncode == 3
    assert sup.ctl("frobnicate").returncode == 2
    broken = tmp_path / "broken.yaml"
    broken.write_text("control: [unclosed\n")
    result = subprocess.run([str(BIN / "supervisorctl"), "-c", str(broken), "status"], capture_output=True, text=True)
    assert result.returncode == 2 and f"{broken}:" in result.stderr


def test_stubborn_workers_are_killed_and_200_reloads_leak_nothing(tmp_path: Path) -> None:
    """Workers ignoring SIGTERM die after graceful_timeout; 200 reloads leave no fd, thread or zombie."""
    with supervisor(tmp_path, {"web": program(STUBBORN, workers=1, graceful_timeout=0.2)}) as sup:
        master = psutil.Process(sup.proc.pid)  # type: ignore[union-attr]
        for _ in range(5):
            sup.reload()
        wait_for("old workers killed", lambda: len(master.children()) == 1, timeout=10)
        fds, threads = master.num_fds(), master.num_threads()
        for _ in range(200):
            sup.reload()
        wait_for("old workers killed", lambda: len(master.children()) == 1, timeout=10)
        assert master.num_fds() == fds, sorted(os.listdir(f"/proc/{master.pid}/fd"))
        assert master.num_threads() == threads
        assert not [c.pid for c in master.children() if zombie(c.pid)]
        assert '"graceful_timeout"' in sup.log_text()
        assert sup.generation() == 206


def test_migrate_require_refuses_to_start_without_the_sysctl(tmp_path: Path) -> None:
    """A read-only /proc/sys (as under systemd's ProtectKernelTunables): one clear line, exit 1."""
    sup = Supervisor(tmp_path, {"web": program()})
    cmd = f"mount -o bind,ro /proc/sys /proc/sys && exec {BIN}/supervisord -c {sup.config}"
    result = subprocess.run(["unshare", "-m", "sh", "-c", cmd], capture_output=True, text=True, timeout=30)
    assert result.returncode == 1, result.stderr
    assert "migrate: require, but cannot set net.ipv4.tcp_migrate_req=1" in result.stderr


def test_migrate_prefer_runs_without_the_sysctl(tmp_path: Path) -> None:
    """`prefer` without the sysctl warns in one line (level warning) and serves, draining at reloads."""
    sup = Supervisor(tmp_path, {"web": program()}, migrate="prefer")
    cmd = f"mount -o bind,ro /proc/sys /proc/sys && exec {BIN}/supervisord -c {sup.config}"
    proc = subprocess.Popen(["unshare", "-m", "sh", "-c", cmd], stderr=subprocess.PIPE, text=True)
    try:
        wait_for("the demo to answer", lambda: _answers())
        assert json.loads(sup.ctl("status", "--json").stdout)["migrate"]["enabled"] is False
    finally:
        proc.send_signal(signal.SIGTERM)
        _out, err = proc.communicate(timeout=30)
    warned = [json.loads(line) for line in err.splitlines() if "draining old listeners instead of migrating" in line]
    assert [(w["event"], w["level"]) for w in warned] == [("migration", "warning")], err


def _answers() -> bool:
    try:
        return request(timeout=1)[0] == 200
    except OSError:
        return False


def test_malformed_control_messages_change_nothing(tmp_path: Path) -> None:
    """Garbage, unknown commands and half requests get a one-line error; the service serves on."""
    with supervisor(tmp_path, {"web": program()}) as sup:
        answers = []
        # Raw bytes on purpose: lines supervisorctl would never send.
        for raw in (b"garbage\n", b'{"command":"explode"}\n', b'{"command":"stop"}\n', b"\xff\n" * 3):
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
                sock.settimeout(10)
                sock.connect(str(sup.socket))
                sock.sendall(raw)
                answers.append(json.loads(sock.makefile("rb").readline()))
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:  # connects and says nothing
            sock.connect(str(sup.socket))
            assert request()[0] == 200 and sup.status()["programs"][0]["state"] == "serving"
        assert [a["ok"] for a in answers] == [False] * 4
        assert "malformed message" in answers[0]["error"] and "unknown command 'explode'" in answers[1]["error"]
        assert "missing argument 'program'" in answers[2]["error"]
        assert sup.generation() == 1 and request()[0] == 200


def test_signals_during_a_reload(tmp_path: Path) -> None:
    """SIGHUP during a reload waits its turn; SIGTERM during one rolls it back and stops cleanly."""
    slow = [PYTHON, "-c", (
        "import os, socket, time, signal\n"
        "time.sleep(1)\n"
        "socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM).sendto(b'READY=1', os.environ['NOTIFY_SOCKET'])\n"
        "signal.pause()\n")]
    with supervisor(tmp_path, {"web": program(slow, graceful_timeout=0.5)}) as sup:
        assert sup.proc is not None
        reload = subprocess.Popen([str(BIN / "supervisorctl"), "-c", str(sup.config), "reload"],
                                  stdout=subprocess.PIPE, text=True)
        wait_for("the reload to start", lambda: sup.status()["reloading"])
        sup.proc.send_signal(signal.SIGHUP)
        assert reload.wait(timeout=20) == 0
        wait_for("the SIGHUP reload to finish", lambda: sup.generation() == 3 and sup.serving(), timeout=20)
        pids = [w["pid"] for w in sup.workers()]
        reload = subprocess.Popen([str(BIN / "supervisorctl"), "-c", str(sup.config), "reload"],
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        wait_for("the reload to start", lambda: sup.status()["reloading"])
        new = [c.pid for c in psutil.Process(sup.proc.pid).children() if c.pid not in pids]
        assert sup.stop() == 0
        _out, err = reload.communicate(timeout=10)
    assert reload.returncode == 1 and "shutting down" in err
    assert not [pid for pid in pids + new if psutil.pid_exists(pid)]


def test_supervisorctl_shutdown(tmp_path: Path) -> None:
    """`shutdown` returns once the daemon has stopped every worker; the daemon exits 0, without a
    traceback for the connection that asked (still open as its loop ends)."""
    sup = Supervisor(tmp_path, {"web": program()}).start()
    pids = [w["pid"] for w in sup.workers()]
    result = sup.ctl("shutdown")
    assert result.returncode == 0 and "supervisord stopped" in result.stdout
    assert sup.proc is not None and sup.proc.wait(timeout=10) == 0
    assert not [pid for pid in pids if psutil.pid_exists(pid)]
    assert "Traceback" not in sup.log_text(), sup.log_text()[-2000:]


def as_nobody(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([SETPRIV, "--reuid=nobody", "--regid=nogroup", "--clear-groups", *argv],
                          capture_output=True, text=True, timeout=30)


@pytest.mark.parametrize(("mode", "expected"), [(None, 0o600), ("0660", 0o660), ("0666", 0o666)])
def test_control_socket_mode_and_who_may_use_it(tmp_path: Path, mode: str | None, expected: int) -> None:
    """The socket has mode 0600 unless `control.mode` says otherwise; other users are refused either way,
    with exit 1 and why: by the file mode, or, where the mode lets them connect, by their peer uid."""
    sup = Supervisor(tmp_path, {"web": program(workers=1)})
    # pytest's folders are 0700: a stranger must be able to reach the socket for its mode to matter.
    folder = tempfile.TemporaryDirectory(prefix="control.", dir="/tmp")
    os.chmod(folder.name, 0o711)
    sup.socket = Path(folder.name) / "supervisor.sock"
    doc = yaml.safe_load(sup.config.read_text())
    doc["control"] = {"socket": str(sup.socket), **({"mode": mode} if mode else {})}
    sup.config.write_text(yaml.safe_dump(doc, sort_keys=False))
    try:
        sup.start()
        assert stat.S_IMODE(os.stat(sup.socket).st_mode) == expected
        assert stat.S_ISSOCK(os.stat(sup.socket).st_mode)
        stranger = as_nobody(str(BIN / "supervisorctl"), "-s", str(sup.socket), "status")
        if expected & 0o002:
            assert stranger.returncode == 1 and "permission denied for uid 65534" in stranger.stderr, stranger
        else:
            assert stranger.returncode == 1 and "permission denied on" in stranger.stderr, stranger
        assert sup.ctl("status").returncode == 0
    finally:
        sup.kill()
        folder.cleanup()


def test_first_generation_that_fails_stops_supervisord(tmp_path: Path) -> None:
    """Worker 0 exits 1 at start, worker 1 would never be ready: exit 1 at once, one line with the reason,
    worker 1 killed."""
    pids = tmp_path / "pids"
    pids.mkdir()
    failing = [PYTHON, "-S", "-I", "-c", (
        "import os, sys, time\n"
        f"open(os.path.join({str(pids)!r}, str(os.getpid())), 'w').close()\n"
        "if os.environ['SUPERVISOR_WORKER'] == '1':\n"
        "    time.sleep(60)\n"
        f"while len(os.listdir({str(pids)!r})) < 2:\n"  # worker 1 runs when worker 0 fails
        "    time.sleep(0.01)\n"
        "print('cannot load app: boom', file=sys.stderr)\n"
        "sys.exit(1)\n")]
    sup = Supervisor(tmp_path, {"web": program(failing, ready_timeout=30)})
    assert sup.exit_status_of_refused_start() == 1
    [failed] = sup.events("reload_failed")
    assert re.fullmatch(r"web: generation 1 worker 0 \(pid \d+\) exit status 1 before it was ready; "
                        r"last stderr lines:\n  cannot load app: boom", failed["reason"]), failed
    started = [int(p.name) for p in pids.iterdir()]
    assert len(started) == 2 and not [pid for pid in started if psutil.pid_exists(pid)]
    assert sup.events("supervisord_stopped")[0]["exit_code"] == 1
    assert not sup.socket.exists()


def test_address_in_use_refuses_the_start(tmp_path: Path) -> None:
    """Another process listens on the port without SO_REUSEPORT: refused before anything starts, exit 2
    with one line naming the address and the process (tests/scenarios/test_first_start.py: with it)."""
    with socket.create_server(("127.0.0.1", 8000)) as taken:
        sup = Supervisor(tmp_path, {"web": program()})
        assert sup.exit_status_of_refused_start() == 2
        assert taken.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN) == 1  # untouched
    [failed] = sup.events("preflight_failed")
    assert f"web: 127.0.0.1:8000 is in use: pid {os.getpid()} (" in failed["problem"], failed
    assert "\n" not in failed["problem"]


def test_supervisorctl_timeout(tmp_path: Path) -> None:
    """`--timeout S`: no answer within S seconds is exit 3 with a line that says so; the reload goes on."""
    slow = [PYTHON, "-S", "-I", "-c", (
        "import os, socket, time, signal\n"
        "time.sleep(4)\n"
        "socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM).sendto(b'READY=1', os.environ['NOTIFY_SOCKET'])\n"
        "signal.pause()\n")]
    with supervisor(tmp_path, {"web": program(slow, workers=1)}) as sup:
        started = time.monotonic()
        result = sup.ctl("--timeout", "0.5", "reload")
        assert time.monotonic() - started < 3.5  # the reload itself takes 4 s
        assert result.returncode == 3, result
        assert "no answer from supervisord" in result.stderr and "within 0.5 s" in result.stderr, result.stderr
        wait_for("the reload to finish anyway", lambda: sup.generation() == 2 and sup.serving())
        for bad in ("0", "-1", "nan", "soon"):
            refused = sup.ctl("--timeout", bad, "status")
            assert refused.returncode == 2 and "expected a positive number of seconds" in refused.stderr, refused


def test_a_second_supervisord_on_the_same_control_socket_exits_and_leaves_the_first_alone(tmp_path: Path) -> None:
    """The second one exits 1 with one line; the running one keeps its socket (it used to be unlinked)."""
    with supervisor(tmp_path, {"web": program()}) as sup:
        (tmp_path / "second").mkdir()
        second = Supervisor(tmp_path / "second", {"web": program()})
        # The same control socket (an absolute path), another address (one in use is refused before).
        second.config.write_text(sup.config.read_text().replace("127.0.0.1:8000", "127.0.0.1:8001"))
        assert second.exit_status_of_refused_start() == 1
        [failed] = second.events("startup_failed")
        assert "another supervisord is already running on this control socket" in failed["error"]
        assert sup.socket.exists() and sup.status()["programs"][0]["state"] == "serving"
        assert request()[0] == 200
