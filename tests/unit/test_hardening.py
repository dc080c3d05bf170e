"""The pure parts of the hardening (docs/operations.md, "Hardening"): config reading bounds, stderr lines,
control request parsing, fd arithmetic, the notify socket's sender checks. Real files, pipes and sockets;
no supervisord."""

from __future__ import annotations

import fcntl
import os
import socket
import subprocess
import sys
import tempfile
import termios
from pathlib import Path

import pytest

from supervisor.config import schema
from supervisor.daemon import control
from supervisor.errors import ConfigError, ControlError
from supervisor.process.worker import CUT_MARK, MAX_LINE, PIPE_READ, Pipe, Worker
from supervisor.protocol import requests
from supervisor.system import limits, orphans, readiness
from tests.harness import wait_for

MINIMAL = "programs:\n  web:\n    command: [app]\n    listen: ['127.0.0.1:8000']\n"


def load_error(path: Path | str) -> str:
    with pytest.raises(ConfigError) as info:
        schema.load(path)
    return str(info.value)


class TestConfigFiles:
    def test_only_regular_files_are_opened(self, tmp_path: Path) -> None:
        """A FIFO would block open() in the master's loop; a device may never end; each is one line."""
        fifo, folder = tmp_path / "fifo", tmp_path / "folder"
        os.mkfifo(fifo)
        folder.mkdir()
        listener = socket.socket(socket.AF_UNIX)
        listener.bind(str(tmp_path / "sock"))
        (tmp_path / "zero").symlink_to("/dev/zero")
        assert load_error(fifo) == f"{fifo}: not a regular file (a FIFO)"
        assert load_error(folder) == f"{folder}: not a regular file (a directory)"
        assert load_error(tmp_path / "sock") == f"{tmp_path / 'sock'}: not a regular file (a socket)"
        assert load_error(tmp_path / "zero") == f"{tmp_path / 'zero'}: not a regular file (a character device)"
        listener.close()

    def test_size_limit(self, tmp_path: Path) -> None:
        path = tmp_path / "c.yaml"
        path.write_text(MINIMAL + "#" * (schema.MAX_FILE - len(MINIMAL)))
        assert schema.load(path).programs[0].name == "web"  # exactly 1 MiB: read
        path.write_text(MINIMAL + "#" * (schema.MAX_FILE - len(MINIMAL) + 1))
        assert load_error(path) == f"{path}: larger than 1 MiB ({schema.MAX_FILE + 1} bytes): not read"

    def test_too_many_values_are_refused_before_nodes_are_built(self) -> None:
        """Composing costs ~10 times what parsing does: a file of 30,000 values is refused at the value
        that crosses the limit, after a parse that costs a few hundredths of a second."""
        env = "".join(f"      K{i}: {i}\n" for i in range(15_000))
        with pytest.raises(ConfigError, match=r"^c\.yaml:\d+: more than 20000 YAML values and collections"):
            schema.parse(MINIMAL + "    env:\n" + env, "c.yaml")
        assert len(schema.parse(MINIMAL + "    env:\n" + env[:env.index("K9000:")], "c.yaml").programs[0].env) == 9000

    def test_aliases_that_blow_up_a_command(self, tmp_path: Path) -> None:
        """500 references to one 100 kB string: a 100 kB file, a 50 MB argv; refused at its line."""
        big = "a" * 100_000
        text = f"programs:\n  web:\n    listen: ['127.0.0.1:8000']\n    command: [&a '{big}'" + ", *a" * 500 + "]\n"
        assert schema.parse(text.replace(", *a" * 500, ", *a"), "c.yaml").programs[0].command == (big, big)
        with pytest.raises(ConfigError, match=r"^c\.yaml:4: programs\.web\.command: command and env expand to "
                                              r"50100501 bytes with YAML aliases; at most 1048576 per program"):
            schema.parse(text, "c.yaml")

    def test_aliases_that_blow_up_env_or_repeat_programs(self) -> None:
        value = "v" * 100_000
        env = "".join(f"      K{i}: *v\n" for i in range(20))
        text = MINIMAL + f"    env:\n      V: &v '{value}'\n{env}"
        with pytest.raises(ConfigError, match=r"^c\.yaml:6: programs\.web\.env: command and env expand to 2100"):
            schema.parse(text, "c.yaml")
        # Each program under 1 MiB, but an alias repeats the whole program: bounded in all.
        arg = "a" * 100_000
        one = f"{{command: [&a '{arg}'" + ", *a" * 9 + "], listen: '127.0.0.1:1'}"
        many = f"programs:\n  p0: &p {one}\n" + "".join(f"  p{i}: *p\n" for i in range(1, 40))
        with pytest.raises(ConfigError, match=r"programs\.p16\.command: .*every program so far: 17000170"):
            schema.parse(many, "c.yaml")

    def test_one_argument_or_variable_larger_than_execve_takes(self) -> None:
        big = "a" * (schema.MAX_ARGUMENT + 1)
        with pytest.raises(ConfigError, match=r"programs\.web\.command\[1\]: 131072 bytes; execve\(\) takes at most"):
            schema.parse(f"programs:\n  web:\n    command: [app, '{big}']\n    listen: '127.0.0.1:1'\n", "c.yaml")
        with pytest.raises(ConfigError, match=r"programs\.web\.env\.X: 131072 bytes"):
            schema.parse(MINIMAL + f"    env: {{X: '{big}'}}\n", "c.yaml")


def pipe_worker() -> tuple[Worker, int]:
    read_end, write_end = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    os.set_blocking(write_end, True)
    return Worker("web", 1, 0, pid=0, pidfd=-1, stderr=Pipe("stderr", read_end), listeners=[]), write_end


def drain(w: Worker) -> list[str]:
    """read_stderr() until the pipe is empty, as the master's reader would fire."""
    lines: list[str] = []
    while w.stderr.fd >= 0 and int.from_bytes(fcntl.ioctl(w.stderr.fd, termios.FIONREAD, b"\0" * 4), "little"):
        lines += w.read_stderr()
        assert len(w.stderr.partial) <= MAX_LINE
    return lines


class TestStderr:
    def test_a_long_line_is_cut_and_its_rest_skipped(self) -> None:
        w, pipe = pipe_worker()
        os.write(pipe, b"first\n" + b"x" * 40_000)
        lines = drain(w)
        for _ in range(10):  # 10 x 40 kB more of the same line: memory stays below MAX_LINE
            os.write(pipe, b"x" * 40_000)
            lines += drain(w)
        os.write(pipe, b"x\nnext\nunfinished")
        lines += drain(w)
        assert lines == ["first", "x" * MAX_LINE + CUT_MARK.decode(), "next"]
        os.close(pipe)
        assert w.read_stderr() == ["unfinished"]  # EOF: the last line needs no newline
        assert w.stderr.fd == -1

    def test_a_complete_line_too_long_is_cut_without_skipping_the_next(self) -> None:
        w, pipe = pipe_worker()
        os.write(pipe, b"y" * 100 + b"\n")
        assert w.read_stderr() == ["y" * 100]
        w.stderr.partial = b"z" * (MAX_LINE - 10)
        os.write(pipe, b"z" * 20 + b"\nafter\n")
        assert w.read_stderr() == ["z" * MAX_LINE + CUT_MARK.decode(), "after"]
        os.close(pipe)

    def test_a_bounded_read_per_call_and_everything_once_the_worker_has_exited(self) -> None:
        """A call takes at most PIPE_READ bytes (the loop's reader fires again for the rest); once
        the worker is gone, what is left in the pipe is read at once (its last words)."""
        w, pipe = pipe_worker()
        os.write(pipe, b"a\n" * PIPE_READ)  # 2 x PIPE_READ bytes
        assert len(w.read_stderr()) == PIPE_READ // 2
        assert len(w.read_stderr()) == PIPE_READ // 2
        assert w.read_stderr() == []
        os.write(pipe, b"b\n" * 20_000)
        w.status = 0  # reaped
        assert len(w.read_stderr()) == 20_000 and list(w.tail)[-1] == "b"
        os.close(pipe)


class TestControlRequests:
    @pytest.mark.parametrize(("line", "error"), [
        (b"[" * 60000, "malformed request: nested too deeply"),
        (b'{"command": "start", "program": "\\udc00x"}', "malformed request: program: an invalid UTF-16 surrogate"),
        (b'{"command": "scale", "program": "w", "workers": 1' + b"0" * 4400 + b"}",
         "malformed request: a number with too many digits"),
        (b'{"command": "scale", "program": "w", "workers": 4294967296}', "malformed request: workers: out of range"),
        ('{"command": "status"}'.encode("utf-16-le"), "malformed request: a NUL byte"),
        (b"\xff{}", "malformed request: not UTF-8 text"),
        (b'{"command": "status", "x": 1}', "status: unknown argument 'x'"),
    ])
    def test_malformed(self, line: bytes, error: str) -> None:
        with pytest.raises(ControlError) as info:
            control.parse(line)
        assert str(info.value).startswith(error)

    def test_well_formed(self) -> None:
        request = control.parse(b'{"command": "scale", "program": "w\\u00e9b", "workers": 3}\n')
        assert request == requests.Scale("wéb", 3)


class TestLimits:
    def test_what_a_config_needs(self) -> None:
        text = MINIMAL.replace("['127.0.0.1:8000']", "['127.0.0.1:8000', '[::1]:8000']") + \
            "    workers: 10\n  api:\n    command: [api]\n    listen: '127.0.0.1:9000'\n"
        cfg = schema.parse(text, "c.yaml")
        # web: 10 workers x (2 listeners + pidfd + stderr + stdout); api: 1 x 4; two generations of each.
        assert limits.needed(cfg.programs) == limits.MASTER_FDS + 2 * (10 * 5 + 1 * 4)
        assert limits.problem(cfg, 1024) is None
        assert limits.problem(cfg, 200) == (
            "needs 268 file descriptors (2 generations x [10 x 5 (web) + 1 x 4 (api)] + 160 for the master), "
            "but the limit (RLIMIT_NOFILE) is 200")
        assert limits.scale_problem(cfg, "web", 200, limit=1024) == (
            "scale web 200: needs 2168 file descriptors (2 generations x [200 x 5 (web) + 1 x 4 (api)] "
            "+ 160 for the master), but the limit (RLIMIT_NOFILE) is 1024")
        # `stdout: inherit`: no stdout pipe.
        inherit = schema.parse(text.replace("    workers: 10\n", "    workers: 10\n    stdout: inherit\n"), "c.yaml")
        assert limits.per_worker(inherit.program("web")) == 4
        # The counts running now (api scaled to 50) count, not the config's.
        assert limits.scale_problem(cfg, "web", 10, running={"web": 10, "api": 50}, limit=500) is not None
        assert limits.scale_problem(cfg, "web", 10, running={"web": 10, "api": 1}, limit=500) is None

    def test_the_soft_limit_is_raised_to_the_hard_one(self) -> None:
        code = ("import resource; from supervisor.system import limits\n"
                "resource.setrlimit(resource.RLIMIT_NOFILE, (256, 2048))\n"
                "print(limits.raise_soft_limit(), resource.getrlimit(resource.RLIMIT_NOFILE))")
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
        assert out.split() == ["(2048,", "2048)", "(2048,", "2048)"]


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class TestNotifySenders:
    def test_workers_and_their_session_are_found_without_a_walk(self) -> None:
        """A child of a worker stays in the worker's session: found by getsid(), no budget spent."""
        leader = subprocess.Popen(["sh", "-c", "sleep 30 & wait"], start_new_session=True)
        try:
            child = _wait_child(leader.pid)
            empty = readiness.WalkBudget(0.0)
            assert readiness.find_worker({leader.pid: "w"}, leader.pid, empty) == "w"
            assert readiness.find_worker({leader.pid: "w"}, child, empty) == "w"
            assert readiness.find_worker({leader.pid: "w"}, os.getpid(), empty) is None
        finally:
            leader.kill()
            leader.wait()

    def test_a_child_that_left_the_session_costs_a_rationed_walk(self) -> None:
        clock = FakeClock()
        walks = readiness.WalkBudget(2, clock)
        parent = os.getpid()  # a "worker" whose child (the test's subprocess) is in another session
        child = subprocess.Popen(["sleep", "30"], start_new_session=True)
        try:
            found = [readiness.find_worker({parent: "w"}, child.pid, walks) for _ in range(5)]
            assert found == ["w", "w", None, None, None]  # 2 walks a second, then dropped
            clock.now = 0.5
            assert readiness.find_worker({parent: "w"}, child.pid, walks) == "w"
        finally:
            child.kill()
            child.wait()

    def test_receive_takes_a_bounded_number_per_call(self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        """(The kernel queues net.unix.max_dgram_qlen datagrams, 10 by default: a sender then waits.)"""
        monkeypatch.setattr(readiness, "MAX_PER_WAKEUP", 3)
        notify = readiness.NotifySocket(str(tmp_path / "notify.sock"))
        sender = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        for _ in range(8):
            sender.sendto(b"READY=1", notify.path)
        assert [len(notify.receive()) for _ in range(4)] == [3, 3, 2, 0]
        assert oct(os.stat(notify.path).st_mode & 0o777) == "0o600"
        sender.close()
        notify.close()

    @pytest.mark.skipif(os.geteuid() != 0, reason="needs root to send as other users")
    def test_admit_lets_exactly_the_named_users_in(self) -> None:
        folder = tempfile.TemporaryDirectory(prefix="notify.", dir="/tmp")  # pytest's folders are 0700
        os.chmod(folder.name, 0o711)
        notify = readiness.NotifySocket(os.path.join(folder.name, "notify.sock"))
        try:
            assert _send_as("nobody", notify.path) == "PermissionError"
            readiness.admit(notify.path, 65534)
            readiness.admit(notify.path, 65534)  # once is enough
            assert readiness._acl_users(notify.path) == {65534}
            assert _send_as("nobody", notify.path) == "sent"
            assert _send_as("daemon", notify.path) == "PermissionError"
            readiness.admit(notify.path, 1)
            assert _send_as("daemon", notify.path) == "sent" and readiness._acl_users(notify.path) == {1, 65534}
            assert len(notify.receive()) == 2  # what nobody and daemon sent
        finally:
            notify.close()
            folder.cleanup()


def _send_as(user: str, path: str) -> str:
    code = ("import socket, sys\ntry:\n    socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM).sendto(b'READY=1', "
            "sys.argv[1])\nexcept OSError as exc:\n    print(type(exc).__name__)\nelse:\n    print('sent')")
    return subprocess.run(["/usr/bin/setpriv", f"--reuid={user}", f"--regid={user if user != 'nobody' else 'nogroup'}",
                           "--clear-groups", sys.executable, "-S", "-c", code, path],
                          capture_output=True, text=True, check=True, timeout=30).stdout.strip()


def _children(pid: int) -> list[str]:
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return f.read().split()
    except OSError:
        return []


def _wait_child(pid: int) -> int:
    return int(wait_for(f"a child of {pid}", lambda: _children(pid), timeout=2, interval=0.01)[0])


class TestOrphanEnvironment:
    """What the master reads of a process it did not start is bounded: a crafted LISTEN_PID names no owner."""

    @pytest.mark.parametrize(("value", "owner"), [("1234", 1234), ("9" * 5000, None), ("12a", None), ("", None)])
    def test_listen_pid_of_any_length(self, value: str, owner: int | None) -> None:
        child = subprocess.Popen(["sleep", "30"], env={"LISTEN_PID": value, "PATH": os.environ["PATH"]})
        try:
            wait_for("sleep to run", lambda: Path(f"/proc/{child.pid}/cmdline").read_bytes().startswith(b"sleep"))
            found = orphans.adopt(child.pid)
            assert found.owner == owner and "sleep" in found.command
        finally:
            child.kill()
            child.wait()
