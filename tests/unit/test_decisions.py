"""The master's decisions with a fake spawner and a clock the test drives: no root, no processes, no sleeping."""

from __future__ import annotations

import json
import signal
import time
from pathlib import Path

import pytest

from supervisor import __version__
from supervisor.config.schema import Program
from supervisor.daemon import reloads, status
from supervisor.daemon.events import SignalReceived
from supervisor.model.generation import GenerationState
from supervisor.model.program import ProgramRuntime, ProgramState
from supervisor.model.restart import STABLE_AFTER
from supervisor.model.slot import RECYCLE_RETRY
from supervisor.process.worker import Worker, WorkerState
from supervisor.protocol import requests
from supervisor.system.listeners import Listener
from tests.unit.fakes import FakeSpawner, Scenario, program


def scenario(tmp_path: Path, **settings: object) -> Scenario:
    s = Scenario(tmp_path, {"web": program(**settings)})
    reply = s.start()
    assert reply.ok, reply.answer
    return s


class TestStartup:
    """At startup each program starts on its own: one that fails is FATAL, the others serve."""

    def test_a_program_that_fails_is_fatal_and_the_others_serve(self, tmp_path: Path) -> None:
        s = Scenario(tmp_path, {"web": program(), "api": program(listen=["127.0.0.1:8001"])})
        reply = s.start(ready=False)
        web = [w for w in s.starting() if w.program == "web"]
        api = [w for w in s.starting() if w.program == "api"]
        s.ready(web[0])
        s.exit(api[1])
        assert reply.answer is None and s.state("api") == "fatal" and s.state("web") == "starting"
        assert "api: FATAL: api: generation 1 worker 1 (pid" in reply.lines[-1]
        assert all(x.shut for w in api for x in w.listeners)
        s.ready(web[1])
        assert reply.ok and s.state("web") == "serving" and s.record("api").serving is None
        assert "worker 1" in (s.record("api").fatal or "")
        assert status.describe(s.master.programs) == "serving web#1 (2 workers); FATAL: api (supervisorctl status)"
        s.exit(api[0], 15)  # the given-up generation's last worker goes: api stays FATAL, nothing restarts
        s.advance(5)
        assert s.state("api") == "fatal" and s.record("api").generations() == [] and s.master.exit_code == 0
        retry = s.ask(requests.Start("api"))
        s.ready(*s.starting())
        assert retry.ok and s.state("api") == "serving" and s.record("api").fatal is None
        assert retry.answer["message"].startswith("start api done in ")  # type: ignore[index]
        assert retry.answer["message"].endswith(" ms: api#2 serving")  # type: ignore[index]

    def test_a_ready_program_serves_at_once_and_one_not_ready_in_time_is_fatal(self, tmp_path: Path) -> None:
        s = Scenario(tmp_path, {"web": program(), "api": program(listen=["127.0.0.1:8001"], ready="accepting",
                                                                  ready_timeout=3)})
        reply = s.start(ready=False)
        s.ready(*[w for w in s.starting() if w.program == "web"])
        assert s.state("web") == "serving" and reply.answer is None  # it serves; the startup goes on
        assert "web: generation 1 ready in" in reply.lines[-1]
        s.advance(3)
        assert reply.ok and s.state("web") == "serving" and s.state("api") == "fatal"
        assert "not ready within 3 s (0 of 2 workers ready; ready: accepting waits" in (s.record("api").fatal or "")

    def test_when_every_program_fails_supervisord_stops_with_exit_1(self, tmp_path: Path) -> None:
        s = Scenario(tmp_path, {"web": program(), "api": program(listen=["127.0.0.1:8001"])})
        reply = s.start(ready=False)
        s.exit(next(w for w in s.starting() if w.program == "api"))
        assert s.master.exit_code == 0 and not s.master.stopping
        s.exit(next(w for w in s.starting() if w.program == "web"))
        assert reply.ok is False and "web: generation 1 worker" in reply.answer["error"]  # type: ignore[index]
        assert s.master.exit_code == 1 and s.master.stopping

    def test_a_worker_that_binds_its_own_address_gets_a_hint(self, tmp_path: Path) -> None:
        s = Scenario(tmp_path, {"web": program()})
        reply = s.start(ready=False)
        w = s.starting()[0]
        w.tail.append("OSError: [Errno 98] Address already in use")
        s.exit(w, 1 << 8)
        assert reply.ok is False
        assert "hint: the worker tried to bind an address itself; serve on the listening sockets it is given" \
            in reply.answer["error"]  # type: ignore[index]


class TestReload:
    def test_startup_serves_once_every_worker_is_ready(self, tmp_path: Path) -> None:
        s = Scenario(tmp_path, {"web": program()})
        reply = s.start(ready=False)
        assert s.state() == "starting" and reply.answer is None
        first, second = s.starting()
        s.ready(first)
        assert s.state() == "starting"
        s.ready(second)
        assert s.state() == "serving" and reply.ok and s.master.reload is None

    def test_a_reload_commits_shut_first_then_stop_signal_after_stop_delay(self, tmp_path: Path) -> None:
        s = scenario(tmp_path)
        old = s.serving()
        reply = s.ask(requests.Reload())
        assert s.state() == "reloading" and reply.answer is None
        s.ready(*s.starting())
        serving = s.record().serving
        assert reply.ok and serving is not None and serving.number == 2
        assert all(w.state is WorkerState.RETIRING and all(x.shut for x in w.listeners) for w in old)
        assert all(w.signals == [] for w in old)  # nothing before stop_delay
        s.advance(0.5)
        assert all(w.signals == [(s.clock.time(), "SIGTERM", True)] for w in old)
        s.advance(5)  # graceful_timeout after the signal: the stubborn are killed
        assert all([sig for _, sig, _ in w.signals] == ["SIGTERM", "SIGKILL"] for w in old)

    def test_done_in_counts_from_the_request_so_the_phases_add_up_to_it(self, tmp_path: Path) -> None:
        """"done in N ms" (`ms`) includes the config's read and check: a slow one (3,000 env entries) too."""
        s = scenario(tmp_path, env={f"VAR_{n}": "x" * 40 for n in range(3000)})
        s.serving()
        reply = s.ask(requests.Reload())
        s.ready(*s.starting())
        data = reply.answer["data"]  # type: ignore[index]
        assert data["phases"]["config"] >= 5, data["phases"]
        assert abs(sum(data["phases"].values()) - data["ms"]) <= 1, data

    def test_stop_delay_zero_sends_the_signal_in_the_same_step(self, tmp_path: Path) -> None:
        s = scenario(tmp_path, stop_delay=0)
        old = s.serving()
        s.ask(requests.Reload())
        s.ready(*s.starting())
        assert all(w.signals == [(s.clock.time(), "SIGTERM", True)] for w in old)

    def test_a_new_worker_that_exits_rolls_back(self, tmp_path: Path) -> None:
        s = scenario(tmp_path)
        serving = s.serving()
        reply = s.ask(requests.Reload())
        ready, failing = s.starting()
        s.ready(ready)
        s.exit(failing)
        assert reply.ok is False and "worker 1" in reply.answer["error"]  # type: ignore[index]
        assert "exit status 3 before it was ready; rolled back, still serving: web#1" in reply.answer["error"]  # type: ignore[index]
        assert s.state() == "serving" and s.serving() == serving and all(w.signals == [] for w in serving)
        assert all(x.shut for x in ready.listeners)
        s.advance(0.5)  # the new worker that was ready may hold connections: stopped like an old one
        assert [sig for _, sig, _ in ready.signals] == ["SIGTERM"]

    def test_restart_replaces_a_program_with_the_settings_it_runs_and_rolls_back_like_a_reload(
            self, tmp_path: Path) -> None:
        """`restart web`: generation 2 from the config as loaded (the file, changed meanwhile, is not read);
        a worker of generation 3 that exits rolls it back, generation 2 serves on; both are the last reload."""
        s = scenario(tmp_path)
        s.write({"web": program(workers=5)})
        first = s.ask(requests.Restart("web"))
        assert s.state() == "reloading" and len(s.starting()) == 2
        s.ready(*s.starting())
        assert first.ok and first.answer["message"].startswith("restart web done in ")  # type: ignore[index]
        assert s.record().serving.number == 2 and len(s.serving()) == 2  # type: ignore[union-attr]
        assert s.master.last_reload is not None and s.master.last_reload["what"] == "restart web"
        serving = s.serving()
        second = s.ask(requests.Restart("web"))
        ready, failing = s.starting()
        s.ready(ready)
        s.exit(failing)
        assert second.ok is False and second.answer["error"].endswith(  # type: ignore[index]
            "exit status 3 before it was ready; rolled back, still serving: web#2")
        assert s.state() == "serving" and s.serving() == serving and all(w.signals == [] for w in serving)
        assert s.master.last_reload["result"] == "rolled back"
        assert s.master.tally.reloads == {"done": 0, "rolled_back": 0, "refused": 0}  # reloads only

    def test_version_is_answered_even_behind_a_reload(self, tmp_path: Path) -> None:
        s = scenario(tmp_path)
        s.ask(requests.Reload())
        version = s.ask(requests.Version())
        assert version.ok and version.answer["data"] == {"version": __version__}  # type: ignore[index]

    def test_a_generation_not_ready_in_time_rolls_back_and_names_it(self, tmp_path: Path) -> None:
        s = scenario(tmp_path)
        reply = s.ask(requests.Reload())
        late = s.starting()
        s.ready(late[0])
        s.advance(9.9)
        assert reply.answer is None
        s.advance(0.2)
        assert reply.ok is False
        assert "web: generation 2 not ready within 10 s (1 of 2 workers ready; ready: notify waits for each " \
               "worker to send READY=1 to $NOTIFY_SOCKET" in reply.answer["error"]  # type: ignore[index]
        assert [sig for _, sig, _ in late[1].signals] == ["SIGKILL"]  # never ready: killed at once
        serving = s.record().serving
        assert serving is not None and serving.number == 1

    def test_requests_wait_behind_a_reload_and_reloads_that_piled_up_become_one(self, tmp_path: Path) -> None:
        s = scenario(tmp_path)
        first = s.ask(requests.Reload())
        scale = s.ask(requests.Scale("web", 3))  # it would change the generation being replaced: it waits
        second, third = s.ask(requests.Reload()), s.ask(requests.Reload())
        assert [r.lines for r in (scale, second, third)] == [["waiting for the reload in progress"]] * 3
        s.ready(*s.starting())
        assert first.ok and scale.ok and second.answer is None
        assert len(s.record().serving.slots) == 3  # type: ignore[union-attr]  # generation 2, scaled
        s.ready(*s.starting())  # the third worker of generation 2, then one reload for both callers
        s.ready(*s.starting())
        assert second.ok and third.ok and second.answer == third.answer
        assert s.record().serving.number == 3 and s.record().last_number == 3  # type: ignore[union-attr]

    def test_ten_ttin_during_a_reload_give_ten_workers_more_after_it(self, tmp_path: Path) -> None:
        """Each signal waits as `by=+1`, counted when carried out (it was an absolute count taken at
        the signal: ten of them all said 3)."""
        s = scenario(tmp_path)
        s.ask(requests.Reload())
        for _ in range(10):
            s.master.post(SignalReceived(signal.SIGTTIN))
        s.drain()
        s.ready(*s.starting())  # generation 2 serves; the ten requests are carried out in order
        assert len(s.record().serving.active_slots()) == 12  # type: ignore[union-attr]
        for _ in range(15):
            s.master.post(SignalReceived(signal.SIGTTOU))
        s.drain()
        assert len(s.record().serving.active_slots()) == 1  # type: ignore[union-attr]  # never fewer than one

    def test_stop_during_a_reload_waits_and_shutdown_rolls_it_back(self, tmp_path: Path) -> None:
        s = scenario(tmp_path)
        reload = s.ask(requests.Reload())
        stop = s.ask(requests.Stop("web"))
        assert stop.lines == ["waiting for the reload in progress"]
        bye = s.ask(requests.Shutdown())
        assert reload.ok is False and "supervisord is shutting down" in reload.answer["error"]  # type: ignore[index]
        assert stop.ok is False and s.state() == "stopping"
        for w in s.spawner.spawned:
            if w.alive:
                s.exit(w, 0)
        assert s.master.done() and s.state() == "stopped" and bye.answer is None  # answered when run() ends


    def test_a_program_gone_from_the_config_retires_and_can_come_back_while_it_finishes(
            self, tmp_path: Path) -> None:
        s = Scenario(tmp_path, {"web": program(), "api": program(listen=["127.0.0.1:8001"])})
        s.start()
        api = s.serving("api")
        s.write({"web": program()})
        s.ask(requests.Reload())
        s.ready(*s.starting())
        assert s.state("api") == "stopping" and all(w.state is WorkerState.RETIRING for w in api)
        assert [p["name"] for p in status.snapshot(s.master)["programs"]] == ["web", "api"]  # until it is gone
        s.write({"web": program(), "api": program(listen=["127.0.0.1:8001"])})
        reply = s.ask(requests.Reload())
        assert s.state("api") == "starting"
        s.ready(*s.starting())
        assert reply.ok and s.state("api") == "serving" and s.record("api").serving.number == 2  # type: ignore[union-attr]
        for w in api:
            s.exit(w, 0)
        assert s.state("api") == "serving" and s.record("api").retiring == []


class TestSlots:
    def test_restarts_count_every_restart_while_the_backoff_starts_over(self, tmp_path: Path) -> None:
        """A worker killed after running STABLE_AFTER: restarted at once (no backoff), and still counted:
        the slot's restarts (`status`) and the program's (the metric) are both 1."""
        s = scenario(tmp_path)
        s.advance(STABLE_AFTER + 1)
        s.exit(next(w for w in s.serving() if w.index == 1), 9)
        s.advance(0)
        s.ready(*s.starting())
        slot = s.record().serving.slots[1]  # type: ignore[union-attr]
        assert (slot.restarts, slot.streak, s.record().restarts) == (1, 0, 1)
        assert status.snapshot(s.master)["programs"][0]["restarts"] == 1

    def test_crash_backoff_fatal_and_start_revives(self, tmp_path: Path) -> None:
        s = scenario(tmp_path, crash_limit=3, crash_window=60)
        for expected in (1, 2):
            victim = next(w for w in s.serving() if w.index == 1)
            s.exit(victim, 9)  # killed by SIGKILL
            s.advance(0.05 * 2 ** expected)  # 0.1 s, then 0.2 s
            restarted = s.starting()
            assert [w.index for w in restarted] == [1]
            s.ready(*restarted)
            assert s.record().serving.slots[1].restarts == expected  # type: ignore[union-attr]
        s.exit(next(w for w in s.serving() if w.index == 1), 9)
        assert s.state() == "fatal" and s.record().fatal == "3 crashes within 60 s"
        s.advance(60)
        assert s.starting() == [] and len(s.serving()) == 1  # no restart; worker 0 serves on
        reply = s.ask(requests.Start("web"))
        s.ready(*s.starting())
        assert reply.ok and s.state() == "serving" and s.record().fatal is None and s.record().crashes is None

    def test_a_crash_during_a_reload_can_make_the_program_fatal_and_the_reload_still_commits(
            self, tmp_path: Path) -> None:
        s = scenario(tmp_path, crash_limit=1)
        reply = s.ask(requests.Reload())
        s.exit(s.serving()[0], 9)
        assert s.state() == "fatal" and s.master.reload is not None
        snapshot = status.snapshot(s.master)["programs"][0]
        assert snapshot["state"] == "fatal" and snapshot["fatal"]["workers"][0]["state"] == "fatal"
        s.ready(*s.starting())
        assert reply.ok and s.state() == "serving" and s.record().fatal is None

    def test_the_recycle_look_comes_again_after_a_look_that_failed(self, tmp_path: Path) -> None:
        """A bug inside one look (here the spawner raising what it never should) is the catch-all's to
        log; the next look is armed all the same, and recycles."""
        s = scenario(tmp_path, max_age=100)
        s.advance(101)
        real, calls = s.spawner.spawn, []

        def broken(*args: object) -> object:
            calls.append(args)
            raise RuntimeError("a bug")
        s.spawner.spawn = broken  # type: ignore[assignment,method-assign]
        s.recycle_check()  # handler_failed, logged by the master's catch-all
        assert calls and s.starting() == []
        s.spawner.spawn = real  # type: ignore[method-assign]
        s.advance(1.0)  # RECYCLE_POLL: the next look
        assert len(s.starting()) == 2

    def test_a_recycle_replacement_that_fails_then_one_that_works(self, tmp_path: Path) -> None:
        s = scenario(tmp_path, max_age=100, accept_queue="per-worker")
        s.advance(101)
        s.recycle_check()
        replacements = s.starting()
        assert len(replacements) == 2
        s.exit(replacements[0])  # failed: the old worker of slot 0 serves on
        slot = s.record().serving.slots[0]  # type: ignore[union-attr]
        assert slot.replacement is None and slot.worker is not None and slot.worker.alive
        old = slot.worker
        s.ready(replacements[1])  # slot 1 recycled: its old worker leaves with its listeners shut
        assert s.record().serving.slots[1].worker is replacements[1]  # type: ignore[union-attr]
        s.advance(RECYCLE_RETRY - 1)
        assert s.starting() == []
        s.advance(2)
        retry = s.starting()
        assert [w.index for w in retry] == [0]
        s.ready(*retry)
        assert old.state is WorkerState.RETIRING and all(x.shut for x in old.listeners)

    def test_scale_up_and_down(self, tmp_path: Path) -> None:
        s = scenario(tmp_path, accept_queue="per-worker")
        reply = s.ask(requests.Scale("web", 4))
        assert reply.ok and [w.index for w in s.starting()] == [2, 3]
        s.ready(*s.starting())
        down = s.ask(requests.Scale("web", 1))
        assert down.answer["message"] == "web: 1 worker (0 started, 3 retiring)"  # type: ignore[index]
        gen = s.record().serving
        assert gen is not None and sorted(gen.slots) == [0] and len(gen.leaving) == 3
        assert all(all(x.shut for x in w.listeners) for w in gen.leaving)
        assert s.ask(requests.Scale("web", 0)).answer == {"ok": False, "error": "workers must be 1..4096, got 0"}

    def test_scale_down_at_once_lets_the_starting_workers_become_ready_then_leave(self, tmp_path: Path) -> None:
        """`scale web 4` then `scale web 1`: a worker is never handed a listener already shut."""
        s = scenario(tmp_path, accept_queue="per-worker")
        s.ask(requests.Scale("web", 4))
        fresh = s.starting()
        down = s.ask(requests.Scale("web", 1))
        assert down.answer["message"] == "web: 1 worker (0 started, 1 retiring, 2 leaving once ready)"  # type: ignore[index]
        gen = s.record().serving
        assert gen is not None and gen.unwanted == fresh
        assert not any(x.shut for w in fresh for x in w.listeners) and all(w.signals == [] for w in fresh)
        s.ready(fresh[0])
        assert all(x.shut for x in fresh[0].listeners) and gen.unwanted == [fresh[1]]
        s.advance(0.5)
        assert [sig for _, sig, _ in fresh[0].signals] == ["SIGTERM"]
        s.exit(fresh[1])  # one that never got ready and exits: gone, not restarted
        assert gen.unwanted == [] and s.starting() == [] and sorted(gen.slots) == [0]

    def test_a_spawn_that_fails_is_retried(self, tmp_path: Path) -> None:
        s = scenario(tmp_path)
        s.spawner.fail_next = 1
        s.exit(s.serving()[0], 9)
        s.advance(0.1)
        assert s.starting() == []
        s.advance(10)
        assert [w.index for w in s.starting()] == [0]


class TestRecords:
    def test_the_state_round_trips_through_json(self, tmp_path: Path) -> None:
        s = scenario(tmp_path, max_age=100, crash_limit=5)
        s.exit(s.serving()[1], 9)
        s.advance(0.1)
        s.ask(requests.Reload())
        record = s.record()
        text = json.dumps(record.to_json())
        copy = ProgramRuntime.from_json(json.loads(text))
        try:
            assert copy.to_json() == record.to_json()
            assert copy.state is ProgramState.RELOADING and copy.serving is not None
            assert copy.serving.state is GenerationState.SERVING
            assert copy.serving.program == record.serving.program  # type: ignore[union-attr]
        finally:
            for gen in copy.generations():
                for w in gen.workers:
                    for listener in w.listeners:
                        listener.sock.detach()  # the same fds as the original's

    def test_a_transition_from_the_wrong_state_is_refused(self, tmp_path: Path) -> None:
        record = ProgramRuntime("web")
        try:
            record.went_fatal("why")
        except RuntimeError as exc:
            assert str(exc) == "program web: stopped -> fatal is not a transition"
        else:
            raise AssertionError("a stopped program cannot go FATAL")


class SlowSpawner(FakeSpawner):
    """Each spawn takes real time, as a posix_spawn of an interpreter does."""

    def spawn(self, program: Program, generation: int, index: int, shared: list[Listener] | None = None) -> Worker:
        time.sleep(0.004)
        return super().spawn(program, generation, index, shared)


class TestSlicedSpawn:
    """A generation's workers are spawned SPAWN_SLICE at a time: what waits in the queue is answered in between."""

    def slow(self, tmp_path: Path, workers: int) -> Scenario:
        """Two workers serving; the next reload starts `workers`, each spawn taking real time."""
        s = scenario(tmp_path)
        s.write({"web": program(workers=workers)})
        slow = SlowSpawner(s.clock)
        slow.pids = s.spawner.pids
        s.spawner = s.master._spawner = slow
        return s

    def test_status_is_answered_between_slices_and_the_reload_commits_once_all_are_ready(
            self, tmp_path: Path) -> None:
        s = self.slow(tmp_path, workers=12)
        reply = s.ask(requests.Reload())
        first = len(s.spawner.spawned)
        assert 1 <= first < 12 and reply.answer is None
        assert s.master.reloads.current is not None
        [gen] = s.master.reloads.current.generations
        assert len(gen.slots) == 12 and not gen.all_ready()  # the rest wait in empty slots
        s.ready(*s.starting())
        assert reply.answer is None  # those spawned are ready, but not all are spawned
        for _ in range(12):
            if reply.answer is not None:
                break
            assert s.ask(requests.Status()).ok  # answered between two slices
            s.advance(0)
            s.ready(*s.starting())
        assert len(s.spawner.spawned) == 12 and reply.ok and s.record().serving is gen and len(gen.live_workers) == 12

    def test_no_more_than_starting_at_once_workers_start_at_a_time(self, tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.setattr(reloads, "STARTING_AT_ONCE", 3)
        s = scenario(tmp_path)
        s.write({"web": program(workers=8)})
        reply = s.ask(requests.Reload())
        s.advance(0)
        assert len(s.starting()) == 3
        s.ready(s.starting()[0])  # one ready: room for one more
        s.advance(0)
        assert len(s.starting()) == 3
        while s.starting():
            s.ready(*s.starting())
            s.advance(0)
        assert reply.ok and len(s.serving()) == 8

    def test_workers_forked_from_a_template_start_more_at_a_time(self) -> None:
        """No interpreter and no imports to a forked worker's start: four times the spawned limit."""
        from supervisor.config.schema import Program

        spawned = Program(name="web", command=("python", "-m", "app"), listen=())
        forked = Program(name="web", command=("python", "-m", "app"), listen=(), preload=("app",))
        assert reloads.at_once(spawned) == reloads.STARTING_AT_ONCE
        assert reloads.at_once(forked) == reloads.FORKED_AT_ONCE == 4 * reloads.STARTING_AT_ONCE

    def test_a_rollback_stops_the_spawning(self, tmp_path: Path) -> None:
        s = self.slow(tmp_path, workers=12)
        reply = s.ask(requests.Reload())
        s.exit(s.starting()[0])
        assert reply.ok is False and s.state() == "serving"
        spawned = len(s.spawner.spawned)
        s.advance(1)
        assert len(s.spawner.spawned) == spawned < 12
