"""`accept_queue: shared`: one listener per generation and address, and who may shut it (the fake
spawner and clock: no processes, no sleeping; tests/scenarios/test_shared_queue.py has the kernel's side)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

from supervisor.daemon.workers import stored_name
from supervisor.model.program import ProgramRuntime
from supervisor.process.worker import Worker, WorkerState
from supervisor.protocol import requests
from supervisor.system import fdstore, listeners
from supervisor.system.listeners import Listener
from tests.unit.fakes import Scenario, program
from tests.unit.test_rolling import roll_batch


def shared(tmp_path: Path, **settings: object) -> Scenario:
    s = Scenario(tmp_path, {"web": program(accept_queue="shared", **settings)})
    assert s.start().ok
    return s


def the_listener(workers: Sequence[Worker]) -> Listener:
    """The one listener all these workers hold (it is one object, with one socket)."""
    held = listeners.unique(x for w in workers for x in w.listeners)
    assert len(held) == 1 and held[0].shared, held
    return held[0]


class TestOneListenerPerGeneration:
    def test_every_worker_holds_the_generation_listener_and_a_reload_shuts_it_before_any_signal(
            self, tmp_path: Path) -> None:
        s = shared(tmp_path)
        old = s.serving()
        first = the_listener(old)
        reply = s.ask(requests.Reload())
        second = the_listener(s.starting())
        assert second is not first and not first.shut
        s.ready(*s.starting())
        assert reply.ok and first.shut and not second.shut
        assert reply.answer is not None and "1 old listener closed" in reply.answer["message"]
        s.advance(0.5)
        assert all(w.signals == [(s.clock.time(), "SIGTERM", True)] for w in old)
        assert first.fileno() >= 0  # the master's copy stays until the generation's last worker exits
        for w in old:
            s.exit(w, 0)
        assert first.fileno() == -1 and s.record().generations() == [s.record().serving]

    def test_a_rollback_shuts_the_new_listener_and_the_serving_one_stays(self, tmp_path: Path) -> None:
        s = shared(tmp_path)
        serving = the_listener(s.serving())
        reply = s.ask(requests.Reload())
        ready, failing = s.starting()
        fresh = the_listener([ready, failing])
        s.ready(ready)
        s.exit(failing)
        assert reply.ok is False and fresh.shut and not serving.shut
        assert s.state() == "serving" and the_listener(s.serving()) is serving

    def test_a_crash_leaves_it_open_and_the_restart_gets_the_same(self, tmp_path: Path) -> None:
        s = shared(tmp_path)
        listener = the_listener(s.serving())
        s.exit(s.serving()[1], 9)
        assert not listener.shut and listener.fileno() >= 0
        s.advance(0.1)
        (restarted,) = s.starting()
        assert restarted.listeners == [listener]
        s.ready(restarted)
        assert the_listener(s.serving()) is listener

    def test_fatal_with_no_worker_left_shuts_it_and_start_opens_a_new_one(self, tmp_path: Path) -> None:
        s = shared(tmp_path, workers=1, crash_limit=1)
        listener = the_listener(s.serving())
        s.exit(s.serving()[0], 9)
        assert s.state() == "fatal" and listener.shut  # nobody would accept: reset, not left waiting
        reply = s.ask(requests.Start("web"))
        s.ready(*s.starting())
        assert reply.ok and not the_listener(s.serving()).shut

    def test_fatal_with_a_worker_left_keeps_it_for_that_worker(self, tmp_path: Path) -> None:
        s = shared(tmp_path, crash_limit=1)
        listener = the_listener(s.serving())
        s.exit(s.serving()[1], 9)
        assert s.state() == "fatal" and not listener.shut and len(s.serving()) == 1

    def test_scale_up_and_down_and_kill_never_shut_it(self, tmp_path: Path) -> None:
        s = shared(tmp_path)
        listener = the_listener(s.serving())
        assert s.ask(requests.Scale("web", 4)).ok
        assert all(w.listeners == [listener] for w in s.starting())
        s.ready(*s.starting())
        down = s.ask(requests.Scale("web", 1))
        assert down.answer["message"] == "web: 1 worker (0 started, 3 retiring)"  # type: ignore[index]
        gen = s.record().serving
        assert gen is not None and not listener.shut and len(gen.leaving) == 3
        s.advance(0.5)  # their stop signal, the shared listener open: the one that stays accepts from it
        leaving = [w for w in s.spawner.spawned if w in gen.leaving]
        assert len(leaving) == 3 and all(w.signals == [(s.clock.time(), "SIGTERM", False)] for w in leaving)
        for w in list(gen.leaving):
            s.exit(w, 0)
        assert not listener.shut and listener.fileno() >= 0
        s.serving()[0].kill()
        assert not listener.shut

    def test_a_recycled_worker_leaves_and_its_replacement_gets_the_same(self, tmp_path: Path) -> None:
        s = shared(tmp_path, max_age=100)
        listener = the_listener(s.serving())
        old = s.serving()
        s.advance(101)
        s.recycle_check()
        fresh = s.starting()
        assert len(fresh) == 2 and all(w.listeners == [listener] for w in fresh)
        s.ready(*fresh)
        assert all(w.state is WorkerState.RETIRING for w in old) and not listener.shut

    def test_the_fd_store_names_the_shared_listener_once_per_generation(self, tmp_path: Path) -> None:
        s = shared(tmp_path)
        w = s.serving()[0]
        assert stored_name(w, 0, w.listeners[0]) == "web.1.shared.0"
        adopted = fdstore._NAME.fullmatch("my.web.1.shared.0")
        assert adopted is not None and (adopted["program"], adopted["gen"]) == ("my.web", "1")

    def test_the_state_round_trips_with_one_listener_object(self, tmp_path: Path) -> None:
        """Across an upgrade the shared listener is one record and one socket, held by each worker."""
        s = shared(tmp_path)
        s.exit(s.serving()[1], 9)
        s.advance(0.1)
        s.ready(*s.starting())
        record = s.record()
        data = json.loads(json.dumps(record.to_json()))
        assert [len(w["listeners"]) for w in (slot["worker"] for slot in data["serving"]["slots"])] == [0, 0]
        copy = ProgramRuntime.from_json(data)
        try:
            gen = copy.serving
            assert gen is not None and copy.to_json() == record.to_json()
            assert len(gen.shared) == 1 and all(w.listeners == gen.shared for w in gen.live_workers)
            assert gen.live_workers[0].listeners[0] is gen.live_workers[1].listeners[0]
        finally:
            for listener in copy.serving.shared if copy.serving else []:
                listener.sock.detach()  # the same fd as the original's


class TestRollingShared:
    def test_the_old_listener_stays_for_the_old_slots_until_the_last_batch(self, tmp_path: Path) -> None:
        s = Scenario(tmp_path, {"web": program(workers=3, strategy="rolling", accept_queue="shared")})
        assert s.start().ok
        old = the_listener(s.serving())
        reply = s.ask(requests.Reload())
        new = the_listener(roll_batch(s))
        assert not old.shut and not new.shut
        roll_batch(s)
        assert not old.shut
        roll_batch(s)
        assert reply.ok and old.shut and not new.shut
        assert the_listener(s.serving()) is new
