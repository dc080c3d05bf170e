"""When retiring listeners may be shut (model/drain.py): the decision alone, with the times a test picks."""

from __future__ import annotations

import pytest

from supervisor.config.schema import MigrateMode
from supervisor.model.drain import DRAIN_GRACE, DRAIN_POLL, SWITCH_DRAIN, Drain, Shut, Wait, Way, way
from supervisor.system.migrate import MigrateStatus


@pytest.mark.parametrize("kind", [Way.MIGRATED, Way.RESET])
def test_without_draining_the_shut_follows_the_steering(kind: Way) -> None:
    drain = Drain(kind, started=100.0)
    first = drain.next(100.0, queued=50)
    assert isinstance(first, Wait) and first.seconds == pytest.approx(SWITCH_DRAIN)
    assert drain.next(100.0 + SWITCH_DRAIN, queued=50) == Shut(0)  # what waits is the kernel's to move (or reset)
    assert drain.ms == round(SWITCH_DRAIN * 1000)


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
