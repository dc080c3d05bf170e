"""`strategy: rolling` with real workers, sockets and the kernel's migration, under load."""

from __future__ import annotations

import contextlib
import threading
import time
from pathlib import Path
from typing import Any

import psutil
import pytest

from tests.harness import DEMO, Supervisor, program, request, running, supervisor, wait_for
from tests.load import Clients

pytestmark = pytest.mark.usefixtures("netns")

# Worker 2 of a generation started with FAIL=1 exits before it is ready; the others are the demo.
FAILS_AT_SLOT_2 = ["/bin/sh", "-c", '[ -n "$FAIL" ] && [ "$SUPERVISOR_WORKER" = 2 ] && '
                   '{ echo "slot 2 cannot load its model" >&2; exit 3; }; exec "$@"', "worker", *DEMO]


def rolling(**settings: Any) -> dict[str, Any]:
    return program(workers=4, strategy="rolling", stop_delay=0.2, graceful_timeout=2, **settings)


def is_template(pid: int) -> bool:
    """A live process running supervisor/process/preload_child.py (a template, or a worker it forked)."""
    try:
        return b"preload_child.py" in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False


class Sampler:
    """Records the master's live children every few milliseconds while it runs."""

    def __init__(self, sup: Supervisor) -> None:
        assert sup.proc is not None
        self.sup = sup
        self.master = psutil.Process(sup.proc.pid)
        self.samples: list[set[int]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        # Straight from /proc, not psutil: a sample must cost far less than the 5 ms between two, also on
        # a busy machine (the master has one thread: its children are that thread's).
        children = Path(f"/proc/{self.master.pid}/task/{self.master.pid}/children")
        while not self._stop.is_set():
            alive = set()
            for pid in children.read_text().split():
                try:
                    state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
                except (OSError, IndexError):  # gone since the listing
                    continue
                if state != "Z":
                    alive.add(int(pid))
            self.samples.append(alive)
            time.sleep(0.005)

    @property
    def peak(self) -> int:
        """The most worker processes alive at once (a preload template is a child, not a worker; a
        template just started, such as the next spare, may not be in the log yet: a live process of the
        template's command that the master does not list as a worker is one too)."""
        seen: set[int] = set().union(*self.samples)
        workers = {w["pid"] for w in self.sup.workers()}

        def templates() -> set[int]:
            logged = {e["pid"] for e in self.sup.events("template_started")}
            return logged | {pid for pid in seen - workers if is_template(pid)}

        def unknown() -> set[int]:
            return {pid for pid in seen - workers - templates() if running(pid)}

        # The next spare starts right after the answer: sampled before its spawn chain ran the template's
        # command, it may still be on its way there now. Give live ones a moment to show what they are.
        with contextlib.suppress(AssertionError):
            wait_for("the live children to show what they are", lambda: not unknown(), timeout=5)
        known = templates()
        return max(len(sample - known) for sample in self.samples)

    def __enter__(self) -> Sampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5)


def test_a_rolling_reload_under_load_fails_nothing_and_never_runs_more_than_n_plus_k(tmp_path: Path) -> None:
    """4 workers, batch 1 then batch 2 (forked from a preload template), 64 connections in flight: 0 failed,
    at most 5 (then 6) workers alive."""
    with supervisor(tmp_path, {"web": rolling()}) as sup, Clients("127.0.0.1:8000", seconds=60) as load:
        time.sleep(0.5)  # the load runs before the reload (Clients has no live count to wait on)
        for generation, batch, preload in ((2, 1, []), (3, 2, ["supervisor.demo"])):
            sup.write({"web": rolling(batch=batch, preload=preload)})  # the config being rolled in counts
            with Sampler(sup) as sampler:
                out = sup.reload().stdout
            assert len(sampler.samples) > 50 and sampler.peak == 4 + batch, (sampler.peak, out)
            assert f"web: slots 3 now on generation {generation}" in out or \
                f"web: slots 2, 3 now on generation {generation}" in out, out
            assert sup.generation() == generation
            assert {w["generation"] for w in sup.workers() if w["state"] == "ready"} == {generation}
        time.sleep(0.3)  # the load runs on against the last generation
        tally = load.finish()
    assert not tally.failures, tally.failed()
    assert tally.ok > 1000


def test_a_replacement_that_fails_halfway_leaves_the_program_serving_on_the_old_config(tmp_path: Path) -> None:
    """Slots 0 and 1 rolled, slot 2 fails: they go back to generation 1, which serves; 0 failed under load."""
    with supervisor(tmp_path, {"web": rolling(command=FAILS_AT_SLOT_2)}) as sup, \
            Clients("127.0.0.1:8000", seconds=60) as load:
        time.sleep(0.5)  # the load runs before the reload (Clients has no live count to wait on)
        sup.write({"web": rolling(command=FAILS_AT_SLOT_2, env={"FAIL": "1"})})
        result = sup.ctl("reload")
        assert result.returncode == 1, result.stdout
        assert "generation 2 worker 2" in result.stderr and "slot 2 cannot load its model" in result.stderr
        assert "still serving: web#1; web: slots 0, 1 rolled back to generation 1" in result.stderr
        # Generation 2's ready workers stop after stop_delay; the put-back ones get ready.
        wait_for("4 ready workers of generation 1", lambda: sorted(
            (w["worker"], w["generation"], w["state"]) for w in sup.workers()) == [(i, 1, "ready") for i in range(4)])
        assert sup.generation() == 1
        tally = load.finish()
        assert request()[1]["generation"] == 1
    assert not tally.failures, tally.failed()
    assert tally.ok > 500
