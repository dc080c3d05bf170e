"""What workers write (docs/logs.md): stdout captured like stderr, one structured event a line, `tail`
of both streams or one; a flood bounded by `log_limit` while `status` stays quick and a reload under
load loses nothing; `stdout: inherit` passes through raw; preload workers' stdout is their own."""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import termios
import threading
import time
from pathlib import Path

import pytest

from supervisor.daemon import output
from supervisor.process.worker import MAX_LINE
from supervisor.protocol import framing
from tests.harness import PYTHON, Supervisor, program, supervisor, wait_for, watching_status
from tests.load import Clients

pytestmark = pytest.mark.usefixtures("netns")


# READY=1, then once the file argv[1] exists: 10,000 numbered lines on stdout (then the file
# argv[1].done), then once argv[1].2 exists "done" on stderr.
PRINTER = """
import os, socket, sys, time
socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM).sendto(b"READY=1", os.environ["NOTIFY_SOCKET"])
while not os.path.exists(sys.argv[1]):
    time.sleep(0.01)
for i in range(10000):
    print(f"line {i:05d}", flush=True)
open(sys.argv[1] + ".done", "w").close()
while not os.path.exists(sys.argv[1] + ".2"):
    time.sleep(0.01)
print("done", file=sys.stderr, flush=True)
time.sleep(600)
"""

# READY=1, then 'y' lines on stderr as fast as the pipe takes them for argv[1] seconds; then the
# number of lines written goes to the file argv[2].GENERATION.
FLOODER = """
import os, socket, sys, time
socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM).sendto(b"READY=1", os.environ["NOTIFY_SOCKET"])
chunk = b"y\\n" * 32768
written, deadline = 0, time.monotonic() + float(sys.argv[1])
while time.monotonic() < deadline:
    written += os.write(2, chunk)
with open(f"{sys.argv[2]}.{os.environ['SUPERVISOR_GENERATION']}", "w") as done:
    done.write(str(written // 2))
time.sleep(600)
"""


class Follower:
    """`tail -n 0 -f PROGRAM [STREAM]` on a socket of its own (supervisorctl's framing), read by a thread
    as raw bytes (no decoding there: it would hold this process's GIL from the measuring thread)."""

    def __init__(self, sup: Supervisor, program: str, stream: str = "") -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.connect(str(sup.socket))
        request = {"command": "tail", "program": program, "lines": 0, "follow": True}
        self.sock.sendall(framing.encode({**request, **({"stream": stream} if stream else {})}))
        self.chunks: list[bytes] = []
        self.thread = threading.Thread(target=self._read, daemon=True)

    def __enter__(self) -> Follower:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.sock.shutdown(socket.SHUT_RDWR)
        self.thread.join(timeout=10)
        self.sock.close()

    def _read(self) -> None:
        with contextlib.suppress(OSError):
            while chunk := self.sock.recv(65536):
                self.chunks.append(chunk)

    def lines(self) -> list[dict[str, str]]:
        return [framing.decode(line) for line in b"".join(self.chunks).splitlines(keepends=True)]


def test_every_stdout_line_is_an_event_tail_has_the_last_ones_and_status_stays_quick(tmp_path: Path) -> None:
    trigger = tmp_path / "go"
    printer = program([PYTHON, "-S", "-c", PRINTER, str(trigger)], workers=1,
                      log_limit={"lines": 20000, "burst": 1})  # every line in the log: no drop here
    with supervisor(tmp_path, {"printer": printer}) as sup, \
            Follower(sup, "printer", "stdout") as only_stdout, Follower(sup, "printer") as both_streams:
        pid = sup.workers("printer")[0]["pid"]
        with watching_status(sup, interval=0.02) as latency:
            time.sleep(0.2)  # a few calls before, for comparison
            trigger.touch()
            began = time.monotonic()
            wait_for("the 10,000 lines written", (tmp_path / "go.done").exists, timeout=60)
            writing = time.monotonic() - began  # the worker waits on its pipe at supervisord's pace
            # A cheap look (no JSON parsing here: it would hold this process's GIL from the measuring thread).
            wait_for("the last one logged", lambda: b'"line 09999"' in sup.log.read_bytes(), timeout=60,
                     interval=0.1)
        (tmp_path / "go.2").touch()  # now "done" on stderr: after them in the order supervisord reads
        wait_for("the stderr line", lambda: b'"done"' in sup.log.read_bytes())
        summary = latency.check()
        # `tail -f` followers: every line as it was read, of the stream they asked for.
        wait_for("the followers' lines",
                 lambda: (len(only_stdout.lines()), len(both_streams.lines())) == (10000, 10001))
        tag = f"printer#1 worker 0 pid {pid}"
        assert only_stdout.lines() == [{"line": f"{tag} stdout: line {i:05d}", "stream": "stdout"}
                                       for i in range(10000)]
        assert both_streams.lines()[:10000] == only_stdout.lines()
        assert both_streams.lines()[-1] == {"line": f"{tag} stderr: done", "stream": "stderr"}
        events = sup.events("worker_stdout")
        assert [e["line"] for e in events] == [f"line {i:05d}" for i in range(10000)]
        assert {(e["program"], e["pid"], e["gen"], e["worker"]) for e in events} == {("printer", pid, 1, 0)}
        assert sup.events("worker_output_dropped") == []

        last = sup.ctl("tail", "-n", "1000", "printer", "stdout")
        assert last.returncode == 0, last
        assert last.stdout.splitlines() == [f"printer#1 worker 0 pid {pid} stdout: line {i:05d}"
                                            for i in range(9000, 10000)]
        both = sup.ctl("tail", "-n", "3", "printer").stdout.splitlines()
        assert [line.split(": ", 1)[1] for line in both] == ["line 09998", "line 09999", "done"]
        assert both[-1] == f"printer#1 worker 0 pid {pid} stderr: done"
        assert sup.ctl("tail", "printer", "stderr").stdout.splitlines() == [both[-1]]
        bad = sup.ctl("tail", "printer", "stdin")
        assert bad.returncode == 2 and "invalid choice: 'stdin'" in bad.stderr
        print(f"10,000 stdout lines written in {writing:.2f} s and logged; {summary}")


def test_a_stderr_flood_is_held_to_the_budget_while_a_reload_under_load_loses_nothing(tmp_path: Path) -> None:
    """A worker writes stderr as fast as it can for 3 s, its replacement (a reload in the middle, with 64
    connections in flight to another program) for 3 s more: the log gets at most the budget of lines and
    bytes and one `worker_output_dropped` a second; `status` stays under 100 ms; nothing fails."""
    done = tmp_path / "done"
    limit = {"lines": 500, "bytes": "16K", "burst": 1}
    flooder = program([PYTHON, "-S", "-c", FLOODER, "3", str(done)], workers=1, listen=["127.0.0.1:8001"],
                      log_limit=limit, graceful_timeout=1)
    with supervisor(tmp_path, {"web": program(workers=2), "noisy": flooder}) as sup:
        log_before = sup.log.stat().st_size
        started = time.monotonic()
        with watching_status(sup, interval=0.02) as latency, \
                Clients("127.0.0.1:8000", concurrency=64, seconds=60) as load:
            time.sleep(1.0)
            reloaded = sup.ctl("reload", timeout=60)
            wait_for("the second flood's end", lambda: Path(f"{done}.2").exists(), timeout=30)
            tally = load.finish()
        flood = time.monotonic() - started
        summary = latency.check()
        assert reloaded.returncode == 0, reloaded.stdout + reloaded.stderr
        assert not tally.failures and tally.ok > 100, tally.failed()
        # What the log got from `noisy`, and what it was told was dropped.
        time.sleep(output.REPORT_INTERVAL + 0.2)  # the last report is due
        logged = [e for e in sup.events("worker_stderr") if e["program"] == "noisy"]
        dropped = sup.events("worker_output_dropped")
        written = sum(int(Path(f"{done}.{gen}").read_text()) for gen in (1, 2) if Path(f"{done}.{gen}").exists())
        line_bytes = sum(len(e["line"]) + 1 for e in logged)
        budget_lines = 500 * (1 + flood + output.REPORT_INTERVAL)
        budget_bytes = 16384 * (1 + flood + output.REPORT_INTERVAL) + MAX_LINE
        assert len(logged) <= budget_lines and line_bytes <= budget_bytes
        assert len(dropped) <= flood / output.REPORT_INTERVAL + 2
        assert sum(d["lines"] for d in dropped) >= written - len(logged) - 2 * 32768  # the second's unread pipe
        grown = sup.log.stat().st_size - log_before
        # Each logged line is one JSON event (~150 bytes of envelope); the reload's own events are few.
        noisy_log = sum(len(json.dumps(e)) + 1 for e in [*logged, *dropped])
        assert grown - noisy_log < 64 << 10, (grown, noisy_log)
        print(f"{written} lines written in {flood:.1f} s; log: {len(logged)} lines ({line_bytes} bytes of text, "
              f"budget {budget_lines:.0f} lines / {budget_bytes:.0f} bytes), {len(dropped)} dropped events "
              f"for {sum(d['lines'] for d in dropped)} lines; log grew {grown} bytes; {summary}; "
              f"{tally.ok} requests, 0 failed")


def test_stdout_inherit_passes_through_raw(tmp_path: Path) -> None:
    """`stdout: inherit`: the worker's stdout is supervisord's own (here the log file the harness
    gives it), unchanged; stderr still comes through the master."""
    script = ("import os, sys\nprint(f'raw from {os.getpid()}', flush=True)\n"
              "from supervisor import demo\nsys.exit(demo.main([]))\n")
    with supervisor(tmp_path, {"web": program([PYTHON, "-c", script], workers=1, stdout="inherit")}) as sup:
        pid = sup.workers()[0]["pid"]
        wait_for("the raw line", lambda: f"raw from {pid}\n" in sup.log_text())
        assert sup.events("worker_stdout") == []
        assert sup.ctl("tail", "web", "stdout").stdout == ""
        assert any(e["pid"] == pid for e in sup.events("worker_stderr"))  # the demo's start line


@pytest.mark.parametrize("mode", ["log", "inherit"])
def test_a_preload_worker_has_its_own_stdout(tmp_path: Path, mode: str) -> None:
    """Forked by its template: `log` gives it a pipe of its own (its lines carry its pid, not the
    template's), `inherit` gives it supervisord's stdout as a spawned worker has."""
    (tmp_path / "app.py").write_text("import os, sys\nfrom supervisor import demo\n"
                                     "print(f'hello from {os.getpid()}', flush=True)\nsys.exit(demo.main([]))\n")
    settings = program([PYTHON, str(tmp_path / "app.py")], preload=["supervisor.demo"], stdout=mode)
    with supervisor(tmp_path, {"web": settings}) as sup:
        pids = sorted(w["pid"] for w in sup.workers())
        if mode == "log":
            events = wait_for("both workers' lines", lambda: len(sup.events("worker_stdout")) == 2
                              and sup.events("worker_stdout"))
            assert sorted((e["pid"], e["line"]) for e in events) == [(p, f"hello from {p}") for p in pids]
        else:
            wait_for("both raw lines", lambda: all(f"hello from {p}\n" in sup.log_text() for p in pids))
            assert sup.events("worker_stdout") == []


# READY=1, half a line on stdout, and once the file argv[1] exists its end.
HALF = """
import os, socket, sys, time
socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM).sendto(b"READY=1", os.environ["NOTIFY_SOCKET"])
os.write(1, b"begun before ")
while not os.path.exists(sys.argv[1]):
    time.sleep(0.01)
os.write(1, b"ended after\\n")
time.sleep(600)
"""


def test_a_stdout_line_begun_before_an_upgrade_ends_after_it(tmp_path: Path) -> None:
    """`upgrade` hands the worker's stdout pipe over, with the line begun on it: one event, its pid."""
    trigger = tmp_path / "go"
    with supervisor(tmp_path, {"half": program([PYTHON, "-S", "-c", HALF, str(trigger)], workers=1)}) as sup:
        pid = sup.workers("half")[0]["pid"]
        wait_for("supervisord to read the half line", lambda: unread(pid) == 0)
        upgraded = sup.ctl("upgrade")
        assert upgraded.returncode == 0, upgraded.stdout + upgraded.stderr
        trigger.touch()
        events = wait_for("the line", lambda: sup.events("worker_stdout"))
        assert [(e["pid"], e["line"]) for e in events] == [(pid, "begun before ended after")]
        tail = sup.ctl("tail", "half", "stdout").stdout
        assert tail == f"half#1 worker 0 pid {pid} stdout: begun before ended after\n"


def unread(pid: int) -> int:
    """Bytes waiting in the pipe that is the worker's stdout (a read end of it, through /proc)."""
    fd = os.open(f"/proc/{pid}/fd/1", os.O_RDONLY | os.O_NONBLOCK)
    try:
        return int.from_bytes(fcntl.ioctl(fd, termios.FIONREAD, b"\0" * 4), "little")
    finally:
        os.close(fd)


def test_a_preload_template_that_floods_at_import_is_held_to_its_programs_budget(tmp_path: Path) -> None:
    """A preloaded module writes 100,000 lines while imported: `template_stderr` events within the
    program's `log_limit`, the rest counted; the workers forked after it serve."""
    (tmp_path / "chatty.py").write_text("import sys\nfor i in range(100000):\n    print(f'import line {i}')\n")
    # One template's 100,000 lines: no spare importing (and printing) the same once the program serves.
    settings = program([PYTHON, "-m", "supervisor.demo"], preload=["chatty"], cwd=str(tmp_path),
                       log_limit={"lines": 100, "burst": 1}, preload_spare=False)
    started = time.monotonic()
    with supervisor(tmp_path, {"web": settings}) as sup:
        dropped = wait_for("the count of what was dropped", lambda: sup.events("worker_output_dropped"))
        elapsed = time.monotonic() - started
        logged = sup.events("template_stderr")
        assert logged[0]["line"] == "import line 0" and len(logged) <= 100 * (1 + elapsed)
        assert sum(d["lines"] for d in dropped) + len(logged) <= 100000
        assert all(w["state"] == "ready" for w in sup.workers())
