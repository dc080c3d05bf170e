"""`supervisorctl status`'s table, from the daemon's answer: snapshots of the whole text."""

from __future__ import annotations

from typing import Any

from supervisor.ctl import table

HEAD = {"pid": 100, "uptime": 3725, "version": "1.2.3", "started_at": "2026-12-07T05:00:00+00:00",
        "config": "/etc/reuseport-supervisor/supervisor.yaml", "upgraded": None,
        "migrate": {"mode": "require", "enabled": True, "reason": "net.ipv4.tcp_migrate_req = 1"}}


def worker(index: int, pid: int | None, generation: int = 3, state: str = "ready", **facts: Any) -> dict[str, Any]:
    return {"worker": index, "pid": pid, "state": state, "generation": generation, "leaving": False,
            "uptime": 65.0, "restarts": 0, "rss": 21 * 2**20, "cpu": 0.25, "last_exit": None, **facts}


def program(name: str, workers: list[dict[str, Any]], state: str = "serving", **facts: Any) -> dict[str, Any]:
    return {"name": name, "state": state, "listen": ["127.0.0.1:8000", "[::1]:8000"], "restarts": 0,
            "generations": [{"generation": 3, "state": "serving", "uptime": 65.0}], "workers": workers,
            "last_exit": None, "tls": None, "fatal": None, "roll": None, **facts}


class TestGrid:
    def test_long_names_and_many_workers_line_up(self) -> None:
        """Every column starts at the same place on program and worker rows, whatever the name's length
        and the number of workers (12: two-digit indices)."""
        many = [worker(i, 4000 + i, restarts=1 if i == 11 else 0,
                       last_exit="killed by SIGKILL" if i == 11 else None) for i in range(12)]
        data = {**HEAD, "last_reload": None, "programs": [
            program("web", [worker(0, 31)], listen=["127.0.0.1:8000"]),
            program("a-rather-long-program-name-for-the-api", many, restarts=1,
                    last_exit="worker 11 (pid 3999) killed by SIGKILL"),
        ]}
        assert table.render(data) == """\
supervisord 1.2.3 pid 100, up 1h02m (since 2026-12-07 05:00:00 UTC), config /etc/reuseport-supervisor/supervisor.yaml
migration: require (on: net.ipv4.tcp_migrate_req = 1)
last reload: none since supervisord started

NAME                                         STATE    GEN   PID  UPTIME     RSS    CPU  RESTARTS  INFO
web                                          serving    3     -   1m05s   21.0M  0.25s         0  \
1 worker, on 127.0.0.1:8000
  web:0                                      serving    3    31   1m05s   21.0M  0.25s         0
a-rather-long-program-name-for-the-api       serving    3     -   1m05s  252.0M  3.00s         1  \
12 workers, on 127.0.0.1:8000 [::1]:8000
  a-rather-long-program-name-for-the-api:0   serving    3  4000   1m05s   21.0M  0.25s         0
  a-rather-long-program-name-for-the-api:1   serving    3  4001   1m05s   21.0M  0.25s         0
  a-rather-long-program-name-for-the-api:2   serving    3  4002   1m05s   21.0M  0.25s         0
  a-rather-long-program-name-for-the-api:3   serving    3  4003   1m05s   21.0M  0.25s         0
  a-rather-long-program-name-for-the-api:4   serving    3  4004   1m05s   21.0M  0.25s         0
  a-rather-long-program-name-for-the-api:5   serving    3  4005   1m05s   21.0M  0.25s         0
  a-rather-long-program-name-for-the-api:6   serving    3  4006   1m05s   21.0M  0.25s         0
  a-rather-long-program-name-for-the-api:7   serving    3  4007   1m05s   21.0M  0.25s         0
  a-rather-long-program-name-for-the-api:8   serving    3  4008   1m05s   21.0M  0.25s         0
  a-rather-long-program-name-for-the-api:9   serving    3  4009   1m05s   21.0M  0.25s         0
  a-rather-long-program-name-for-the-api:10  serving    3  4010   1m05s   21.0M  0.25s         0
  a-rather-long-program-name-for-the-api:11  serving    3  4011   1m05s   21.0M  0.25s         1  \
last exit: killed by SIGKILL
a-rather-long-program-name-for-the-api: last crash: worker 11 (pid 3999) killed by SIGKILL"""

    def test_a_reload_in_progress_a_fatal_program_and_a_stopped_one(self) -> None:
        """One vocabulary: a program reloading (old workers stopping and draining, a new one starting), a
        FATAL one with the slot that gave up, a stopped one; counts in the singular for one."""
        data = {**HEAD, "programs": [
            program("web", [worker(0, 31, state="retiring"), worker(1, 32, leaving=True),
                            worker(0, 41, generation=4, state="starting", uptime=0.4, rss=None, cpu=None)],
                    state="reloading", generations=[{"generation": 3, "state": "serving", "uptime": 65.0},
                                                    {"generation": 4, "state": "starting", "uptime": 0.4}]),
            program("api", [worker(1, 52, restarts=2)], state="fatal", restarts=4, listen=["127.0.0.1:8001"],
                    fatal={"reason": "5 crashes within 60 s", "workers": [
                        {"worker": 0, "pid": None, "state": "fatal", "generation": 3, "restarts": 2,
                         "last_exit": "exit status 1"}]},
                    tls={"subject": "CN=api.example", "sans": ["api.example"],
                         "not_after": "2027-03-01T00:00:00+00:00", "days_left": 83.8}),
            program("batch", [], state="stopped", generations=[], listen=["127.0.0.1:8002"]),
        ], "last_reload": {"at": "2026-12-07T05:59:58.5+00:00", "what": "restart web", "result": "done", "ms": 412,
                           "way": "migrated", "drain_ms": 0, "dropped": 0, "migrated": 1}}
        assert table.render(data).split("\n", 2)[2] == """\
last restart web: done at 2026-12-07 05:59:58 UTC in 412 ms, old listeners shut, 1 connection migrated

NAME     STATE      GEN  PID  UPTIME    RSS    CPU  RESTARTS  INFO
web      reloading  3>4    -   1m05s  42.0M  0.50s         0  0 workers +1 new +2 leaving, on 127.0.0.1:8000 [::1]:8000
  web:0  stopping     3   31   1m05s  21.0M  0.25s         0
  web:1  draining     3   32   1m05s  21.0M  0.25s         0
  web:0  starting     4   41      0s      -      -         0
api      fatal        3    -   1m05s  21.0M  0.25s         4  \
1 worker, on 127.0.0.1:8001, FATAL: 5 crashes within 60 s: no restarts until reload or start
  api:1  serving      3   52   1m05s  21.0M  0.25s         2
  api:0  fatal        3    -       -      -      -         2  last exit: exit status 1
batch    stopped      -    -       -      -      -         0  0 workers, on 127.0.0.1:8002
api: tls CN=api.example, SANs api.example, expires 2027-03-01 00:00:00 UTC (83.8 days)"""

    def test_every_state_word_is_explained(self) -> None:
        """The words the STATE column can show are the words --help explains."""
        shown = {*table.WORKER_STATES.values(), "draining", "starting", "serving", "reloading", "stopping",
                 "stopped", "fatal"}
        assert shown == set(table.STATES)
        assert all(f"  {word}" in table.states_help() for word in table.STATES)


class TestLastReload:
    def test_each_result(self) -> None:
        """Done (by way), rolled back and refused: when, how long, what moved or why not."""
        at = "2026-12-07T05:59:58+00:00"
        assert table.render({**HEAD, "programs": [], "last_reload": {
            "at": at, "what": "reload", "result": "rolled back", "ms": 5012,
            "reason": "web: generation 4 not ready within 5 s (0 of 1 worker ready)"}}).splitlines()[2] == (
            "last reload: rolled back at 2026-12-07 05:59:58 UTC in 5012 ms: web: generation 4 not ready within "
            "5 s (0 of 1 worker ready)")
        assert table.render({**HEAD, "programs": [], "last_reload": {
            "at": at, "what": "reload", "result": "refused", "ms": None,
            "reason": "s.yaml:3: programs.web.workers: expected an integer"}}).splitlines()[2] == (
            "last reload: refused at 2026-12-07 05:59:58 UTC: s.yaml:3: programs.web.workers: expected an integer")
        assert table.render({**HEAD, "programs": [], "last_reload": {
            "at": at, "what": "reload", "result": "done", "ms": 655, "way": "drained", "drain_ms": 291,
            "dropped": 0, "migrated": 0}}).splitlines()[2] == (
            "last reload: done at 2026-12-07 05:59:58 UTC in 655 ms, old listeners drained in 291 ms, 0 dropped")


class TestHelp:
    def test_help_explains_the_states_and_where_the_config_is_found(self, capsys: Any) -> None:
        """`supervisorctl --help` and `status --help` print the states; --version the client's version."""
        from supervisor import __version__
        from supervisor.config.locate import DEFAULT_PATH
        from supervisor.ctl import main

        assert main.main(["--help"]) == 0
        top = capsys.readouterr().out
        assert main.main(["status", "--help"]) == 0
        status = capsys.readouterr().out
        assert main.main(["--version"]) == 0
        assert capsys.readouterr().out == f"reuseport-supervisor {__version__}\n"
        assert table.states_help() in top and table.states_help() in status
        assert "$SUPERVISOR_CONFIG" in top and DEFAULT_PATH in top and "restart PROGRAM" in top

    def test_help_command_as_in_supervisor(self, capsys: Any) -> None:
        """`supervisorctl help` is --help; `help COMMAND` that command's; an unknown one exits 2 naming them."""
        from supervisor.ctl import main

        assert main.main(["help"]) == 0
        assert "help [COMMAND]" in capsys.readouterr().out
        assert main.main(["help", "tail"]) == 0
        assert capsys.readouterr().out.startswith("usage: supervisorctl tail ")
        assert main.main(["help", "nope"]) == 2
        assert "help: no command named 'nope' (one of status, " in capsys.readouterr().err
