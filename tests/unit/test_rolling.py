"""`strategy: rolling`: the roll's decisions with the fake spawner and clock (no processes, no sleeping)."""

from __future__ import annotations

from pathlib import Path

import pytest

from supervisor.config import schema
from supervisor.ctl import table
from supervisor.errors import ConfigError
from supervisor.model.generation import GenerationState
from supervisor.process.worker import Worker, WorkerState
from supervisor.protocol import requests
from tests.unit.fakes import FakeWorker, Scenario, program


def rolling(tmp_path: Path, workers: int = 4, **settings: object) -> Scenario:
    s = Scenario(tmp_path, {"web": program(workers=workers, strategy="rolling", **settings)})
    assert s.start().ok
    return s


def alive(s: Scenario) -> list[FakeWorker]:
    return [w for w in s.spawner.spawned if w.alive]


def exit_stopped(s: Scenario) -> None:
    """The old workers that got their stop signal exit, as a real server would."""
    for w in alive(s):
        if w.signals:
            s.exit(w, 0)


def roll_batch(s: Scenario) -> list[Worker]:
    """Make the batch in progress ready, let its switch and stop happen; returns the batch's new workers."""
    fresh = s.starting()
    s.ready(*fresh)
    s.advance(0.02)  # SWITCH_DRAIN
    s.advance(0.5)  # stop_delay: the stop signal
    exit_stopped(s)
    return list(fresh)


class TestRolling:
    def test_a_reload_replaces_one_worker_at_a_time_never_more_than_n_plus_one(self, tmp_path: Path) -> None:
        s = rolling(tmp_path, accept_queue="per-worker")
        old = s.serving()
        reply = s.ask(requests.Reload())
        peak = len(alive(s))
        for step in range(4):
            assert len(s.starting()) == 1 and s.starting()[0].index == step
            roll_batch(s)
            peak = max(peak, len(alive(s)))
        assert peak == 5
        assert reply.ok, reply.answer
        serving = s.record().serving
        assert serving is not None and serving.number == 2
        assert sorted(w.index for w in s.serving()) == [0, 1, 2, 3]
        assert all(w.state is WorkerState.EXITED for w in old)
        assert "web: slots 0 now on generation 2: 1 old listener closed, 1 old worker stopping" in reply.lines

    def test_an_old_worker_is_shut_before_its_stop_signal_and_the_next_batch_waits_for_its_exit(
            self, tmp_path: Path) -> None:
        s = rolling(tmp_path, accept_queue="per-worker")
        old = {w.index: w for w in s.serving()}
        s.ask(requests.Reload())
        s.ready(*s.starting())
        assert not any(x.shut for x in old[0].listeners)  # steered away first, shut on a later turn
        s.advance(0.02)
        shut_at = s.clock.time()
        assert all(x.shut for x in old[0].listeners) and old[0].state is WorkerState.RETIRING
        assert not any(x.shut for w in (old[1], old[2], old[3]) for x in w.listeners)
        assert old[0].signals == []
        s.advance(0.5)  # stop_delay
        assert [(sig, shut) for _, sig, shut in old[0].signals] == [("SIGTERM", True)]
        assert old[0].signals[0][0] <= shut_at + 0.5
        assert s.starting() == []  # the old worker still runs: the next batch would make N+2
        s.exit(old[0], 0)
        assert [w.index for w in s.starting()] == [1]

    def test_a_roll_right_after_another_waits_for_the_last_old_worker_before_its_first_batch(
            self, tmp_path: Path) -> None:
        """The first reload's last old worker is still on its way out when the second reload begins: its
        first batch would make N+batch+1 processes."""
        s = rolling(tmp_path, workers=2)
        first = s.ask(requests.Reload())
        s.ready(*s.starting())
        s.advance(0.02)
        s.advance(0.5)
        exit_stopped(s)
        s.ready(*s.starting())
        s.advance(0.02)
        s.advance(0.5)  # the last old worker has its stop signal, and has not exited yet
        assert first.ok, first.answer
        last = [w for w in alive(s) if w.signals]
        assert len(last) == 1
        second = s.ask(requests.Reload())
        assert s.starting() == []  # 2 serving + 1 leaving: a new worker now would make 4
        s.exit(last[0], 0)
        assert [w.index for w in s.starting()] == [0]
        roll_batch(s)
        roll_batch(s)
        assert second.ok, second.answer

    def test_batch_replaces_k_workers_at_a_time(self, tmp_path: Path) -> None:
        s = rolling(tmp_path, batch=2)
        reply = s.ask(requests.Reload())
        peak = 0
        for step in range(2):
            assert sorted(w.index for w in s.starting()) == [2 * step, 2 * step + 1]
            peak = max(peak, len(alive(s)))
            roll_batch(s)
        assert peak == 6 and reply.ok

    def test_each_batch_has_its_own_ready_timeout(self, tmp_path: Path) -> None:
        s = rolling(tmp_path, workers=3)
        reply = s.ask(requests.Reload())
        for _ in range(3):
            s.advance(8)  # 24 s in all, more than ready_timeout (10 s), less per batch
            roll_batch(s)
        assert reply.ok, reply.answer

    def test_a_replacement_that_fails_puts_the_replaced_slots_back_on_the_old_config(self, tmp_path: Path) -> None:
        s = rolling(tmp_path)
        old = s.record().serving
        assert old is not None
        s.write({"web": program(workers=4, strategy="rolling", env={"CODE": "new"})})
        reply = s.ask(requests.Reload())
        roll_batch(s)
        replaced = roll_batch(s)
        failing = s.starting()[0]
        s.exit(failing)
        assert reply.ok is False
        error = reply.answer["error"]  # type: ignore[index]
        assert "generation 2 worker 2" in error and "exit status 3 before it was ready" in error
        assert error.endswith("rolled back, still serving: web#1; web: slots 0, 1 rolled back to generation 1")
        assert s.record().serving is old and s.state() == "serving"
        assert all(all(x.shut for x in w.listeners) for w in replaced)  # their queues go to the old config
        back = s.starting()  # the old config's workers started again in the slots given up
        assert sorted(w.index for w in back) == [0, 1] and all(w.generation == 1 for w in back)
        assert sorted(old.slots) == [0, 1, 2, 3]
        s.ready(*back)
        assert sorted(w.index for w in s.serving()) == [0, 1, 2, 3]
        assert s.record().retiring[0].state is GenerationState.ROLLED_BACK

    def test_a_replacement_that_dies_during_its_switch_leaves_the_old_worker_serving(self, tmp_path: Path) -> None:
        s = rolling(tmp_path)
        old = {w.index: w for w in s.serving()}
        reply = s.ask(requests.Reload())
        [fresh] = s.starting()
        s.ready(fresh)  # steered away from the old worker; its shut is due on a later turn
        s.exit(fresh)
        assert reply.ok is False and "generation 2 worker 0" in reply.answer["error"]  # type: ignore[index]
        s.advance(1)  # the switch that was due finds no roll: nothing is shut
        assert not any(x.shut for x in old[0].listeners) and old[0].state is WorkerState.READY
        assert old[0].signals == [] and sorted(w.index for w in s.serving()) == [0, 1, 2, 3]

    def test_a_batch_not_ready_in_time_rolls_back(self, tmp_path: Path) -> None:
        s = rolling(tmp_path, workers=2)
        reply = s.ask(requests.Reload())
        roll_batch(s)
        s.advance(10.1)
        assert reply.ok is False and "not ready within 10 s" in reply.answer["error"]  # type: ignore[index]
        assert "web: slot 0 rolled back to generation 1" in reply.answer["error"]  # type: ignore[index]

    def test_fewer_workers_in_the_new_config_retire_the_rest_in_the_last_batch(self, tmp_path: Path) -> None:
        s = rolling(tmp_path, workers=3)
        s.write({"web": program(workers=2, strategy="rolling")})
        reply = s.ask(requests.Reload())
        roll_batch(s)
        roll_batch(s)
        s.advance(0.52)  # slot 2 has no new worker: shut and stopped without waiting for one
        exit_stopped(s)
        assert reply.ok, reply.answer
        assert sorted(w.index for w in s.serving()) == [0, 1] and len(alive(s)) == 2

    def test_status_shows_a_program_in_the_middle_of_a_roll(self, tmp_path: Path) -> None:
        s = rolling(tmp_path, batch=2)
        s.ask(requests.Reload())
        roll_batch(s)
        facts = s.ask(requests.Status()).answer["data"]["programs"][0]  # type: ignore[index]
        assert facts["state"] == "reloading"
        assert facts["roll"] == {"replaced": 2, "replacing": [2, 3], "of": 4, "batch": 2, "from": 1, "to": 2}
        row = table.render(s.ask(requests.Status()).answer["data"]).splitlines()[5]  # type: ignore[index]
        assert row.split()[:3] == ["web", "reloading", "1>2"]
        assert row.endswith("rolling #1 -> #2: 2 of 4 slots replaced, 2 at a time")

    def test_the_first_start_and_all_at_once_start_every_worker_together(self, tmp_path: Path) -> None:
        s = Scenario(tmp_path, {"web": program(workers=3, strategy="rolling")})
        s.start(ready=False)
        assert len(s.starting()) == 3  # nothing to roll from
        s.ready(*s.starting())
        s.write({"web": program(workers=3)})
        s.ask(requests.Reload())
        assert len(s.starting()) == 3


@pytest.mark.parametrize(("settings", "error"), [
    ({"strategy": "one-by-one"}, "programs.web.strategy: expected one of all-at-once | rolling, got \"one-by-one\""),
    ({"batch": 0}, "programs.web.batch: expected an integer from 1 to 4096, got 0"),
])
def test_config_errors_name_the_key(tmp_path: Path, settings: dict[str, object], error: str) -> None:
    s = Scenario(tmp_path, {"web": program()})
    s.write({"web": program(**settings)})
    with pytest.raises(ConfigError, match=error):
        schema.load(s.path)
