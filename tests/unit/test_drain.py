"""When retiring listeners may be shut (model/drain.py): the decision alone, with the times a test picks."""

from __future__ import annotations

from pathlib import Path

import pytest

from supervisor.config.schema import MigrateMode
from supervisor.model.drain import DRAIN_GRACE, DRAIN_POLL, SWITCH_DRAIN, Drain, Shut, Wait, Way, way
from supervisor.process.worker import WorkerState
from supervisor.protocol import requests
from supervisor.system.migrate import MigrateStatus
from tests.unit.fakes import Scenario, program


@pytest.mark.parametrize("kind", [Way.MIGRATED, Way.RESET])
def test_without_draining_the_shut_follows_the_steering(kind: Way) -> None:
    drain = Drain(kind, started=100.0)
    first = drain.next(100.0, queued=50)
    assert isinstance(first, Wait) and first.seconds == pytest.approx(SWITCH_DRAIN)
    assert drain.next(100.0 + SWITCH_DRAIN, queued=50) == Shut(0)  # what waits is the kernel's to move (or reset)
    assert drain.ms == round(SWITCH_DRAIN * 1000)


@pytest.mark.parametrize("kind", [Way.MIGRATED, Way.RESET])
def test_without_a_handshake_in_flight_the_shut_is_at_once(kind: Way) -> None:
    asked: list[float] = []

    def none_in_flight() -> bool:
        asked.append(1)
        return False

    drain = Drain(kind, started=100.0)
    assert drain.next(100.0, queued=50, in_flight=none_in_flight) == Shut(0)
    assert asked and drain.ms == 0


def test_a_handshake_in_flight_keeps_the_wait_and_is_not_asked_again_once_it_is_over() -> None:
    drain = Drain(Way.MIGRATED, started=100.0)
    wait = drain.next(100.0, queued=0, in_flight=lambda: True)
    assert isinstance(wait, Wait) and wait.seconds == pytest.approx(SWITCH_DRAIN)
    assert drain.next(100.0 + SWITCH_DRAIN, queued=0, in_flight=lambda: pytest.fail("asked after the wait")) == Shut(0)


def test_draining_never_asks_about_handshakes() -> None:
    """Without migration the queues decide: a handshake completing lands in one, and the grace sees it."""
    drain = Drain(Way.DRAINED, started=100.0, timeout=10.0)
    assert drain.next(100.0, queued=0, in_flight=lambda: pytest.fail("asked")) == Wait(DRAIN_POLL)


def test_draining_shuts_once_the_queues_stayed_empty_for_the_grace() -> None:
    drain = Drain(Way.DRAINED, started=100.0, timeout=10.0)
    assert drain.next(100.0, queued=30) == Wait(DRAIN_POLL)
    assert drain.next(100.1, queued=0) == Wait(DRAIN_POLL)  # empty: the grace begins
    assert drain.next(100.2, queued=2) == Wait(DRAIN_POLL)  # a late handshake landed: it begins again
    assert drain.next(100.3, queued=0) == Wait(DRAIN_POLL)
    assert drain.next(100.3 + DRAIN_GRACE / 2, queued=0) == Wait(DRAIN_POLL)
    assert drain.next(100.3 + DRAIN_GRACE, queued=0) == Shut(0)
    assert drain.waiting == 30 and drain.ms == round((0.3 + DRAIN_GRACE) * 1000)


def test_a_queue_that_never_empties_is_shut_at_the_timeout_and_counted() -> None:
    drain = Drain(Way.DRAINED, started=100.0, timeout=1.0)
    assert drain.next(100.5, queued=20) == Wait(DRAIN_POLL)
    assert drain.next(101.0, queued=20) == Shut(20)


def test_a_timer_a_little_early_still_counts() -> None:
    """uvloop may fire a timer just before its time; a float sum may fall short by an ulp."""
    assert Drain(Way.MIGRATED, started=0.1).next(0.1 + SWITCH_DRAIN - 1e-12, queued=0) == Shut(0)


@pytest.mark.parametrize(("mode", "enabled", "expected"), [
    (MigrateMode.REQUIRE, True, Way.MIGRATED),
    (MigrateMode.PREFER, True, Way.MIGRATED),
    (MigrateMode.PREFER, False, Way.DRAINED),
    (MigrateMode.DRAIN, True, Way.DRAINED),
    (MigrateMode.DRAIN, False, Way.DRAINED),
    (MigrateMode.OFF, True, Way.MIGRATED),
    (MigrateMode.OFF, False, Way.RESET),
])
def test_the_way_follows_the_mode_and_the_sysctl(mode: MigrateMode, enabled: bool, expected: Way) -> None:
    status = MigrateStatus(mode, enabled, "")
    assert way(status.drains, status.enabled) is expected


def test_a_scale_down_drains_then_stops_and_an_upgrade_waits_for_it(tmp_path: Path) -> None:
    """`migrate: drain`: the worker scaled away keeps its listener open and gets no stop signal until
    its queue (empty here) has been quiet for the grace; an upgrade asked meanwhile is refused."""
    s = Scenario(tmp_path, {"web": program(workers=2, stop_delay=0, accept_queue="per-worker")}, migrate="drain")
    assert s.start().ok
    leaving = s.serving()[1]
    assert s.ask(requests.Scale("web", 1)).ok
    assert leaving.state is WorkerState.READY and not any(x.shut for x in leaving.listeners)
    refused = s.ask(requests.Upgrade())
    assert refused.ok is False and refused.answer is not None and "being drained" in refused.answer["error"]
    s.advance(SWITCH_DRAIN + DRAIN_GRACE + 2 * DRAIN_POLL)
    assert leaving.state is WorkerState.RETIRING and all(x.shut for x in leaving.listeners)
    assert leaving.signals and leaving.signals[0][1:] == ("SIGTERM", True)  # after its listeners were shut
    assert not s.master.departures.pending
