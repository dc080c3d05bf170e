"""What workers write (daemon/output.py): the log budget's arithmetic on a fake clock, one
`worker_output_dropped` per interval, the rings `tail` reads per stream, followers (a real socket
pair, a real event loop); the config keys `stdout` and `log_limit`."""

from __future__ import annotations

import asyncio
import os
import socket
from collections.abc import MutableMapping
from typing import Any

import pytest
from structlog.testing import capture_logs

from supervisor.config import schema
from supervisor.config.schema import LogLimit, OutputMode
from supervisor.daemon import output
from supervisor.daemon.output import Budget, Output
from supervisor.errors import ConfigError, ControlError
from supervisor.process import worker
from supervisor.process.worker import MAX_LINE, Pipe, Worker
from supervisor.protocol import requests
from supervisor.protocol.reply import Reply
from tests.unit.fakes import FakeClock

MINIMAL = "programs:\n  web:\n    command: [app]\n    listen: ['127.0.0.1:8000']\n"


def a_worker(pid: int = 100, gen: int = 2) -> Worker:
    return Worker(program="web", generation=gen, index=1, pid=pid, pidfd=-1, stderr=Pipe("stderr"), listeners=[])


def logged(logs: list[MutableMapping[str, Any]], event: str) -> list[MutableMapping[str, Any]]:
    return [entry for entry in logs if entry["event"] == event]


class TestBudget:
    def test_a_full_bucket_takes_a_burst_then_the_rate(self) -> None:
        """`burst` seconds' worth at once, then `lines` per second; what is over is counted."""
        budget = Budget(LogLimit(lines=10, bytes=1 << 20, burst=2), now=0.0)
        assert budget.admit([5] * 50, now=0.0) == 20
        assert budget.take_dropped() == (30, 150) and budget.take_dropped() == (0, 0)
        assert budget.admit([5] * 50, now=0.5) == 5  # half a second: 5 lines
        assert budget.admit([5] * 50, now=100.0) == 20  # never more than the burst

    def test_bytes_bound_the_log_as_lines_do(self) -> None:
        budget = Budget(LogLimit(lines=1000, bytes=1000, burst=1), now=0.0)
        assert budget.admit([100] * 50, now=0.0) == 10
        assert budget.take_dropped() == (40, 4000)
        # Empty: nothing until some is paid back; then a line may take the balance below zero.
        assert budget.admit([100], now=0.0) == 0 and budget.admit([100, 100], now=0.05) == 1
        assert budget.admit([100], now=0.09) == 0 and budget.admit([100], now=0.2) == 1

    def test_a_line_longer_than_the_balance_passes_once_and_the_next_ones_pay_for_it(self) -> None:
        budget = Budget(LogLimit(lines=1000, bytes=1024, burst=1), now=0.0)
        assert budget.admit([MAX_LINE, 1], now=0.0) == 1  # 64 KiB: the balance goes to -63 KiB
        assert budget.admit([1], now=1.0) == 0  # 1 KiB paid back of 63
        assert budget.admit([1], now=64.0) == 1

    def test_over_any_span_the_log_gets_at_most_the_burst_and_the_rate(self) -> None:
        """A worker that writes 1000 lines of 100 bytes every 10 ms for 60 s (fake time)."""
        limit = LogLimit(lines=200, bytes=10_000, burst=3)
        budget = Budget(limit, now=0.0)
        admitted_lines = admitted_bytes = 0
        for tick in range(6000):
            admitted = budget.admit([100] * 1000, now=tick / 100)
            admitted_lines += admitted
            admitted_bytes += 100 * admitted
        assert admitted_lines <= limit.lines * (limit.burst + 60)
        assert admitted_bytes <= limit.bytes * (limit.burst + 60) + MAX_LINE
        assert admitted_bytes >= limit.bytes * 60  # and the rate is given, not less
        dropped_lines, _ = budget.take_dropped()
        assert admitted_lines + dropped_lines == 6_000_000

    def test_time_going_back_refills_nothing(self) -> None:
        budget = Budget(LogLimit(lines=1, bytes=1000, burst=1), now=10.0)
        assert [budget.admit([1], now=t) for t in (10.0, 5.0, 10.5, 11.0)] == [1, 0, 0, 1]


class TestOutput:
    def test_lines_over_the_budget_are_counted_once_per_interval_and_kept_for_tail(self) -> None:
        clock = FakeClock()
        out = Output(clock)
        limit = LogLimit(lines=10, bytes=1 << 20, burst=1)
        with capture_logs() as logs:
            out.record(a_worker(), "stdout", [f"line {i}" for i in range(25)], limit)
            out.record(a_worker(), "stderr", ["more"] * 5, limit)
            assert len(logged(logs, "worker_stdout")) == 10 and logged(logs, "worker_output_dropped") == []
            clock.advance(output.REPORT_INTERVAL, lambda: None)
            clock.advance(5, lambda: None)  # no more drops: no more reports
        dropped = logged(logs, "worker_output_dropped")
        assert [(d["program"], d["lines"], d["bytes"]) for d in dropped] == [("web", 20, 15 * 8 + 5 * 5)]
        assert "dropped 20 lines" in dropped[0]["text"]
        assert logged(logs, "worker_stdout")[0] == {
            "event": "worker_stdout", "log_level": "info", "program": "web", "gen": 2, "worker": 1, "pid": 100,
            "line": "line 0"}
        assert [line.text for line in out.last("web", 30)] == [f"line {i}" for i in range(25)] + ["more"] * 5

    def test_a_flood_gives_one_report_per_interval(self) -> None:
        clock = FakeClock()
        out = Output(clock)
        limit = LogLimit(lines=100, bytes=1 << 20, burst=1)
        with capture_logs() as logs:
            for _ in range(50):  # 5 s of 1000 lines every 0.1 s
                out.record(a_worker(), "stderr", ["y"] * 1000, limit)
                clock.advance(0.1, lambda: None)
            out.close("supervisord stopped")  # what is left is reported at the stop
        dropped = logged(logs, "worker_output_dropped")
        assert 5 <= len(dropped) <= 6
        written = len(logged(logs, "worker_stderr"))
        assert written <= 100 * (1 + 5) and written + sum(d["lines"] for d in dropped) == 50_000

    def test_no_more_than_a_reads_worth_is_logged_at_once(self) -> None:
        """A dead worker's pipe read in one step: LOGGED_AT_ONCE lines logged, the rest counted."""
        clock = FakeClock()
        out = Output(clock)
        with capture_logs() as logs:
            out.record(a_worker(), "stderr", ["y"] * 32768, LogLimit())
            clock.advance(output.REPORT_INTERVAL, lambda: None)
        assert len(logged(logs, "worker_stderr")) == output.LOGGED_AT_ONCE
        assert logged(logs, "worker_output_dropped")[0]["lines"] == 32768 - output.LOGGED_AT_ONCE
        assert len(out.last("web", output.LINES)) == output.LINES

    def test_a_new_limit_goes_on_with_what_is_left(self) -> None:
        """A reload's two generations bring two limits in turn: the buckets never refill from it."""
        clock = FakeClock()
        out = Output(clock)
        old, new = LogLimit(lines=10, burst=1), LogLimit(lines=50, burst=1)
        with capture_logs() as logs:
            out.record(a_worker(gen=1), "stdout", ["a"] * 8, old)
            for _ in range(5):
                out.record(a_worker(gen=2), "stdout", ["b"] * 10, new)
                out.record(a_worker(gen=1), "stdout", ["a"] * 10, old)
            out.record(a_worker(gen=2), "stdout", ["b"], new)  # the old generation has gone
            clock.now += 1.0  # a second under the new limit: 50 more
            out.record(a_worker(gen=2), "stdout", ["b"] * 100, new)
        lines = [e["line"] for e in logged(logs, "worker_stdout")]
        assert lines == ["a"] * 8 + ["b"] * 2 + ["b"] * 50

    def test_each_stream_has_its_own_bounded_ring_and_tail_merges_them_in_order(self) -> None:
        out = Output(FakeClock())
        limit = LogLimit(lines=1_000_000, bytes=1 << 30)
        with capture_logs():
            out.record(a_worker(), "stderr", ["Traceback", "Error"], limit)
            out.record(a_worker(), "stdout", [f"GET /{i}" for i in range(output.LINES + 5)], limit)
            out.record(a_worker(), "stderr", ["after"], limit)
            # An access log flood does not push the errors out of the stderr ring.
            assert [line.text for line in out.last("web", 3, "stderr")] == ["Traceback", "Error", "after"]
            assert len(out.rings[("web", "stdout")]) == output.LINES
            assert [line.text for line in out.last("web", 2)] == [f"GET /{output.LINES + 4}", "after"]
            assert [line.stream for line in out.last("web", 2)] == ["stdout", "stderr"]
            out.record(a_worker(), "stdout", ["x" * 65536] * 10, limit)
        key = ("web", "stdout")
        assert out.sizes[key] <= output.BYTES and len(out.rings[key]) == output.BYTES // 65536
        assert out.sizes[key] == sum(len(line.text) for line in out.rings[key])
        assert sum(len(line.text) for line in out.last("web", output.LINES)) <= output.BYTES

    def test_a_line_names_its_program_generation_worker_pid_and_stream(self) -> None:
        out = Output(FakeClock())
        with capture_logs():
            out.record(a_worker(), "stdout", ["hello"], LogLimit())
        assert out.last("web", 1)[0].tagged("web") == "web#2 worker 1 pid 100 stdout: hello"

    def test_followers_get_their_stream_and_one_that_does_not_read_is_dropped(self) -> None:
        asyncio.run(self._followers())

    async def _followers(self) -> None:
        ours, theirs = socket.socketpair()
        only_out, only_out_theirs = socket.socketpair()
        theirs.setblocking(False)
        only_out_theirs.setblocking(False)
        try:
            _reader, writer = await asyncio.open_connection(sock=ours)
            _r2, writer2 = await asyncio.open_connection(sock=only_out)
            reply, out = Reply(writer), Output(asyncio.get_running_loop())
            out.follow("web", reply)
            out.follow("web", Reply(writer2), "stdout")
            with capture_logs():
                out.record(a_worker(), "stderr", ["first"], LogLimit())
                out.record(a_worker(), "stdout", ["second"], LogLimit())
                await asyncio.sleep(0.01)
                assert theirs.recv(4096) == (
                    requests.encode({"line": "web#2 worker 1 pid 100 stderr: first", "stream": "stderr"})
                    + requests.encode({"line": "web#2 worker 1 pid 100 stdout: second", "stream": "stdout"}))
                assert only_out_theirs.recv(4096) == requests.encode(
                    {"line": "web#2 worker 1 pid 100 stdout: second", "stream": "stdout"})
                for _ in range(output.FOLLOWER_BUFFER // 60000 + 20):  # never read from here on
                    out.record(a_worker(), "stderr", ["y" * 60000], LogLimit())
            assert [r for r, _ in out.followers["web"]] != [reply] and writer.is_closing()
            out.close("stopped")
        finally:
            theirs.close()
            only_out_theirs.close()


class TestTailRequest:
    def test_the_stream_is_an_argument_and_a_wrong_one_is_refused(self) -> None:
        line = b'{"command": "tail", "program": "web", "stream": "stdout"}\n'
        assert requests.parse_request(line) == requests.Tail("web", 10, False, "stdout")
        out = Output(FakeClock())
        with pytest.raises(ControlError, match=r"^stream must be stdout or stderr, got 'stdin'$"):
            out.answer_tail(requests.Tail("web", stream="stdin"), Reply(), {"web"}, stopping=False)
        with pytest.raises(ControlError, match="stream must be a str"):
            requests.parse_request(b'{"command": "tail", "program": "web", "stream": 1}\n')


class TestConfig:
    def test_defaults_and_values(self) -> None:
        program = schema.parse(MINIMAL, "c.yaml").programs[0]
        assert (program.stdout, program.log_limit) == (OutputMode.LOG, LogLimit(1000, 1 << 20, 10.0))
        text = MINIMAL + "    stdout: inherit\n    log_limit: {lines: 50, bytes: 64K, burst: 0.5}\n"
        program = schema.parse(text, "c.yaml").programs[0]
        assert (program.stdout, program.log_limit) == (OutputMode.INHERIT, LogLimit(50, 65536, 0.5))
        assert schema.parse(MINIMAL + "    log_limit: {lines: 5}\n", "c.yaml").programs[0].log_limit == LogLimit(5)

    @pytest.mark.parametrize(("extra", "error"), [
        ("    stdout: journal\n", "c.yaml:5: programs.web.stdout: expected one of log | inherit, got \"journal\""),
        ("    log_limit: 100\n", "c.yaml:5: programs.web.log_limit: expected a mapping, got 100"),
        ("    log_limit: {rate: 5}\n",
         "c.yaml:5: programs.web.log_limit.rate: unknown key; expected one of: bytes, burst, lines"),
        ("    log_limit: {lines: 0}\n",
         "c.yaml:5: programs.web.log_limit.lines: expected an integer from 1 to 1000000, got 0"),
        ("    log_limit: {bytes: 100}\n", "c.yaml:5: programs.web.log_limit.bytes: expected at least 1K, got 100"),
        ("    log_limit: {bytes: lots}\n",
         "c.yaml:5: programs.web.log_limit.bytes: expected a size such as \"512M\" or bytes, got \"lots\""),
        ("    log_limit: {burst: 0}\n",
         "c.yaml:5: programs.web.log_limit.burst: expected more than 0 seconds (and at most a day), got 0"),
    ])
    def test_errors_name_file_line_and_key(self, extra: str, error: str) -> None:
        with pytest.raises(ConfigError) as info:
            schema.parse(MINIMAL + extra, "c.yaml")
        assert str(info.value) == error


class TestPipe:
    def test_carriage_returns_and_bytes_that_are_not_utf8(self) -> None:
        read_end, write_end = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        pipe = Pipe("stdout", read_end)
        os.write(write_end, b"crlf\r\n\xffbad \xe2\x82\n\xe2\x82\xac ok\nhalf")
        assert pipe.read(4096) == ["crlf", "\ufffdbad \ufffd", "\u20ac ok"]
        os.close(write_end)
        assert pipe.read(4096) == ["half"] and pipe.fd == -1


class TestHandover:
    def test_a_state_of_a_version_that_captured_stderr_only_still_reads(self) -> None:
        """An upgrade from the version before stdout was captured: stderr as an fd number, its line
        begun at the top level; the stdout pipe closed (that worker's stdout was inherited)."""
        data = a_worker().to_json()
        data.update(stderr=7, partial="half a li", skipping=False)
        del data["stdout"]
        w = Worker.from_json(data)
        assert (w.stderr.fd, w.stderr.partial, w.stdout.fd) == (7, b"half a li", -1)
        w.stdout.fd, w.stdout.partial = 9, b"\xff\x00"
        again = Worker.from_json(w.to_json())
        assert (again.stdout.fd, again.stdout.partial, again.stderr.partial) == (9, b"\xff\x00", b"half a li")


class TestSpawnActions:
    def test_stdout_is_placed_only_when_it_is_a_pipe(self) -> None:
        inherited = worker._fd_actions([4], stdin=9, stderr=10)
        piped = worker._fd_actions([4], stdin=9, stderr=10, stdout=11)
        assert (os.POSIX_SPAWN_DUP2, 11, 1) in piped and not any(a[1:] == (11, 1) for a in inherited)
        assert all(action[2] != 1 for action in inherited if action[0] == os.POSIX_SPAWN_DUP2)
