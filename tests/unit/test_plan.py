"""Planning is pure: a config and the running programs in, a plan out."""

from __future__ import annotations

import socket

import pytest

from supervisor.config.schema import Config, Control, Listen, Program
from supervisor.errors import ControlError
from supervisor.model.plan import plan_reload, plan_restart, plan_start


def make_config(*names: str) -> Config:
    listen = (Listen("127.0.0.1", 8000, socket.AF_INET),)
    programs = tuple(Program(name=n, command=("true",), listen=listen) for n in names)
    return Config(path="/etc/s.yaml", control=Control(socket="/run/s.sock"), programs=programs)


class TestPlanReload:
    def test_first_start_starts_everything(self) -> None:
        """With nothing running, every program starts and nothing retires."""
        plan = plan_reload(make_config("web", "api"), running=[], stopped=[])
        assert [p.name for p in plan.start] == ["web", "api"] and plan.retire == ()

    def test_running_programs_are_replaced(self) -> None:
        """A reload replaces every running program, changed or not."""
        plan = plan_reload(make_config("web", "api"), running=["web", "api"], stopped=[])
        assert [p.name for p in plan.start] == ["web", "api"]
        assert plan.retire == ("web", "api") and plan.removed == ()

    def test_removed_programs_retire_without_successor(self) -> None:
        """A program gone from the config retires; one added starts."""
        plan = plan_reload(make_config("web", "new"), running=["web", "old"], stopped=[])
        assert [p.name for p in plan.start] == ["web", "new"]
        assert plan.removed == ("old",)

    def test_stopped_programs_stay_stopped(self) -> None:
        """A program stopped by hand is not started by a reload."""
        plan = plan_reload(make_config("web", "api"), running=["web"], stopped=["api"])
        assert [p.name for p in plan.start] == ["web"]


class TestPlanStart:
    def test_start_one(self) -> None:
        """`start api` plans one generation and retires nothing."""
        plan = plan_start(make_config("web", "api"), "api", running=["web"])
        assert [p.name for p in plan.start] == ["api"] and plan.retire == ()

    def test_start_running_or_unknown_is_refused(self) -> None:
        """Starting a running or unknown program is a ControlError that says which."""
        with pytest.raises(ControlError, match="already running"):
            plan_start(make_config("web"), "web", running=["web"])
        with pytest.raises(ControlError, match="no program named 'x'"):
            plan_start(make_config("web"), "x", running=[])

    def test_start_a_fatal_program(self) -> None:
        """`start` on a FATAL program (still serving what is left) replaces its generation."""
        plan = plan_start(make_config("web", "api"), "web", running=["web", "api"], fatal=["web"])
        assert [p.name for p in plan.start] == ["web"] and plan.retire == ("web",)


class TestPlanRestart:
    def test_restart_replaces_one_running_program(self) -> None:
        """`restart web`: a new generation of web from the config the daemon runs, web's serving one retires."""
        plan = plan_restart(make_config("web", "api"), "web", running=["web", "api"])
        assert [p.name for p in plan.start] == ["web"] and plan.retire == ("web",) and plan.removed == ()

    def test_restart_of_a_stopped_or_unknown_program_is_refused(self) -> None:
        """Nothing runs to be restarted: the error says to `start` it; an unknown name is named."""
        with pytest.raises(ControlError, match="api is not running; `start` it instead"):
            plan_restart(make_config("web", "api"), "api", running=["web"])
        with pytest.raises(ControlError, match="no program named 'x'"):
            plan_restart(make_config("web"), "x", running=["web"])
