"""The operating features that need no process: `metrics:` in the config, the requests `reload
PROGRAM...` and `tail`, the config a partial reload runs (the output ring and its followers:
test_output.py)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from supervisor.config import schema
from supervisor.daemon.metrics import not_ready
from supervisor.daemon.tally import Tally
from supervisor.errors import ConfigError, ControlError
from supervisor.model.plan import plan_reload, select
from supervisor.protocol import requests
from tests.unit.fakes import Scenario
from tests.unit.fakes import program as fake_program

TWO = ("programs:\n  web:\n    command: [app]\n    listen: ['127.0.0.1:8000']\n"
       "  api:\n    command: [app]\n    listen: ['127.0.0.1:8001']\n")


def parse_error(text: str) -> str:
    with pytest.raises(ConfigError) as info:
        schema.parse(text, "conf.yaml")
    return str(info.value)


class TestMetricsConfig:
    def test_off_unless_set(self) -> None:
        assert schema.parse(TWO, "conf.yaml").metrics is None
        on = schema.parse("metrics: {listen: '[::1]:9150'}\n" + TWO, "conf.yaml").metrics
        assert on is not None and str(on.listen) == "[::1]:9150"

    @pytest.mark.parametrize(("text", "message"), [
        ("metrics: {}\n", 'conf.yaml:1: metrics.listen: required (an address such as "127.0.0.1:9150")'),
        ("metrics: {listen: 9150}\n", 'conf.yaml:1: metrics.listen: expected a non-empty string, got 9150'),
        ("metrics: {listen: '127.0.0.1:9150', path: /m}\n", "conf.yaml:1: metrics.path: unknown key; "
         "expected one of: listen"),
        ("metrics: {listen: '127.0.0.1:8001'}\n", "conf.yaml:1: metrics.listen: 127.0.0.1:8001 is used by program api"),
    ])
    def test_errors_name_the_line_and_key(self, text: str, message: str) -> None:
        assert parse_error(text + TWO) == message


class TestRequests:
    def test_reload_of_named_programs_and_tail(self) -> None:
        parse = requests.parse_request
        assert parse(b'{"command":"reload","programs":["web","api"]}') == requests.Reload(("web", "api"))
        assert parse(b'{"command":"tail","program":"web"}') == requests.Tail("web", 10, False)
        tail = requests.Tail("web", 3, True)
        assert parse(requests.encode(requests.to_message(tail))) == tail

    @pytest.mark.parametrize(("line", "message"), [
        (b'{"command":"reload","programs":"web"}', "reload: programs must be a list"),
        (b'{"command":"reload","programs":[1]}', "reload: programs must be a list of strings"),
        (b'{"command":"tail","program":"web","follow":1}', "tail: follow must be a bool"),
        (b'{"command":"tail","program":"web","lines":true}', "tail: lines must be a int"),
        (b'{"command":"tail"}', "tail: missing argument 'program'"),
    ])
    def test_malformed(self, line: bytes, message: str) -> None:
        with pytest.raises(ControlError, match=message):
            requests.parse_request(line)


class TestPartialReload:
    def test_only_the_named_programs_take_the_new_settings(self, tmp_path: Path) -> None:
        current = schema.parse(TWO, str(tmp_path / "s.yaml"))
        new = schema.parse(TWO.replace("[app]", "[app2]") + "migrate: off\n", str(tmp_path / "s.yaml"))
        merged = select(current, new, ("web",))
        assert [(p.name, p.command) for p in merged.programs] == [("web", ("app2",)), ("api", ("app",))]
        assert merged.migrate is current.migrate
        plan = plan_reload(merged, running=["web", "api"], stopped=[], only=("web",))
        assert [p.name for p in plan.start] == ["web"] and plan.retire == ("web",) and plan.removed == ()

    def test_refusals(self, tmp_path: Path) -> None:
        current = schema.parse(TWO, str(tmp_path / "s.yaml"))
        with pytest.raises(ControlError, match=re.escape(f"no program named 'db' in {tmp_path / 's.yaml'}")):
            select(current, current, ("db",))
        moved = schema.parse(TWO.replace("8000", "8002").replace("8001", "8000"), str(tmp_path / "s.yaml"))
        with pytest.raises(ControlError, match=r"api: 127\.0\.0\.1:8000 is used by program web as it runs now"):
            select(current, moved, ("api",))
        with pytest.raises(ControlError, match="web: stopped by hand; `start` it instead"):
            plan_reload(current, running=["api"], stopped=["web"], only=("web",))


def test_reload_durations_fill_the_histogram_buckets() -> None:
    tally = Tally()
    tally.reloaded("done", 0.3)
    tally.reloaded("rolled_back")
    assert tally.reloads == {"done": 1, "rolled_back": 1, "refused": 0}
    assert tally.buckets == [0, 0, 1, 1, 1, 1, 1, 1, 1] and tally.seconds == 0.3


class TestDecisions:
    """`reload PROGRAM` and the counts /metrics shows, with the fake spawner and clock."""

    def test_named_reloads_wait_merge_and_leave_the_others_alone(self, tmp_path: Path) -> None:
        s = Scenario(tmp_path, {"web": fake_program(), "api": fake_program(listen=["127.0.0.1:8001"])})
        assert s.start().ok and not_ready(s.master) == []
        api = s.serving("api")
        first = s.ask(requests.Reload(("web",)))
        assert {w.program for w in s.starting()} == {"web"} and not_ready(s.master) == []  # reloading serves
        second, third = s.ask(requests.Reload(("api",))), s.ask(requests.Reload(("web",)))
        s.ready(*s.starting())
        assert first.ok and s.serving("api") == api and s.record("web").serving.number == 2  # type: ignore[union-attr]
        # The two that waited became one reload of both programs.
        assert {w.program for w in s.starting()} == {"web", "api"}
        s.ready(*s.starting())
        assert second.ok and third.ok and second.answer == third.answer
        assert (s.record("web").serving.number, s.record("api").serving.number) == (3, 2)  # type: ignore[union-attr]
        refused = s.ask(requests.Reload(("nosuch",)))
        assert refused.ok is False and "no program named 'nosuch'" in refused.answer["error"]  # type: ignore[index]
        assert s.master.tally.reloads == {"done": 2, "rolled_back": 0, "refused": 1}

    def test_readiness_names_what_is_not_serving(self, tmp_path: Path) -> None:
        s = Scenario(tmp_path, {"web": fake_program(crash_limit=1)})
        s.start(ready=False)
        assert not_ready(s.master) == ["web: starting"]
        s.ready(*s.starting())
        s.exit(s.serving()[0])
        assert not_ready(s.master) == ["web: fatal (1 crashes within 60 s)"]
        assert s.record().restarts == 0  # FATAL: no restart
        assert s.ask(requests.Start("web")).answer is None
        s.ready(*s.starting())
        assert not_ready(s.master) == []
