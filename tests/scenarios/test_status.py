"""`status`: per worker its state, restarts and last exit status, in the table and in --json alike."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path
from typing import Any

import pytest

from tests.harness import Supervisor, program, supervisor, wait_for

pytestmark = pytest.mark.usefixtures("netns")


def table_and_json(sup: Supervisor) -> tuple[list[str], dict[str, Any]]:
    table, data = sup.ctl("status"), sup.ctl("status", "--json")
    assert table.returncode == 0 and data.returncode == 0, table.stderr + data.stderr
    return table.stdout.splitlines(), json.loads(data.stdout)["programs"][0]


def row(lines: list[str], name: str, state: str) -> list[str]:
    """The table row of `name` ("web", or "web:1" for a worker) in `state`, split on the columns (NAME STATE
    GEN PID UPTIME RSS CPU RESTARTS, then INFO as the rest)."""
    found = [line.split(maxsplit=8) for line in lines if line.split()[:2] == [name, state]]
    assert len(found) == 1, "\n".join(lines)
    return found[0]


def test_a_restarted_worker_shows_its_restarts_and_last_exit(tmp_path: Path) -> None:
    """Worker 0 SIGKILLed once: restarts 1 and `killed by SIGKILL` on its own row and in --json."""
    with supervisor(tmp_path, {"web": program()}) as sup:
        victim = next(w["pid"] for w in sup.workers() if w["worker"] == 0)
        os.kill(victim, signal.SIGKILL)
        # One snapshot: serving() alone is also true in the 0.1 s before the restart (one worker, ready).
        wait_for("the replacement", lambda: sup.replaced(victim, 2))
        lines, data = table_and_json(sup)
    replaced, sibling = sorted(data["workers"], key=lambda w: w["worker"])
    assert (replaced["state"], replaced["restarts"], replaced["last_exit"]) == ("ready", 1, "killed by SIGKILL")
    assert (sibling["state"], sibling["restarts"], sibling["last_exit"]) == ("ready", 0, None)
    assert lines[4].split() == ["NAME", "STATE", "GEN", "PID", "UPTIME", "RSS", "CPU", "RESTARTS", "INFO"]
    _name, _state, gen, pid, *_, restarts, info = row(lines, "web:0", "serving")
    assert (gen, pid, restarts, info) == ("1", str(replaced["pid"]), "1", "last exit: killed by SIGKILL")
    assert row(lines, "web:1", "serving")[7:] == ["0"]
    assert row(lines, "web", "serving")[7:] == ["1", "2 workers, on 127.0.0.1:8000"]


def test_a_fatal_program_and_the_worker_that_gave_up(tmp_path: Path) -> None:
    """FATAL is on the program's line; the slot that gave up is a `fatal` row; its siblings serve on."""
    with supervisor(tmp_path, {"web": program(workers=3, crash_limit=2, crash_window=60)}) as sup:
        first = next(w["pid"] for w in sup.workers() if w["worker"] == 1)
        os.kill(first, signal.SIGKILL)
        wait_for("worker 1 restarted", lambda: sup.serving() and any(
            w["worker"] == 1 and w["restarts"] == 1 for w in sup.workers()))
        os.kill(next(w["pid"] for w in sup.workers() if w["worker"] == 1), signal.SIGKILL)
        wait_for("FATAL", lambda: sup.status()["programs"][0]["state"] == "fatal")
        lines, data = table_and_json(sup)
        assert sup.ctl("start", "web").returncode == 0
        after, _ = table_and_json(sup)
    assert data["fatal"] == {"reason": "2 crashes within 60 s", "workers": [
        {"worker": 1, "pid": None, "state": "fatal", "generation": 1, "restarts": 1, "last_exit": "killed by SIGKILL"}]}
    assert [(w["worker"], w["state"]) for w in data["workers"]] == [(0, "ready"), (2, "ready")]
    assert row(lines, "web", "fatal")[-1] == ("2 workers, on 127.0.0.1:8000, FATAL: 2 crashes within 60 s: no "
                                              "restarts until reload or start")
    assert row(lines, "web:1", "fatal")[2:] == ["1", "-", "-", "-", "-", "1", "last exit: killed by SIGKILL"]
    assert not any("FATAL" in line or " fatal " in line for line in after), after
