"""A reload of 64 workers: the master answers `status` all along, and no connection fails."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from tests.harness import program, supervisor, watching_status
from tests.load import Clients

pytestmark = pytest.mark.usefixtures("netns")
WORKERS = 64
SETTINGS: dict[str, dict[str, Any]] = {
    "spawned": {},
    "preload": {"preload": ["supervisor.demo"]},
}


@pytest.mark.parametrize("name", SETTINGS)
def test_a_64_worker_reload_never_leaves_status_unanswered(tmp_path: Path, name: str) -> None:
    """`status` every 100 ms through the reload of 64 workers, spawned (a posix_spawn each, which the
    master does a slice at a time) or forked from the spare template: p95 within 100 ms, the master never
    on a CPU for 50 ms while one waits (StatusWatch.check); 64 connections in flight, none fails."""
    settings = program(workers=WORKERS, ready_timeout=60, stop_delay=0.1, graceful_timeout=5, **SETTINGS[name])
    with supervisor(tmp_path, {"web": settings}) as sup:
        with watching_status(sup) as watch, Clients("127.0.0.1:8000", seconds=60) as load:
            result = sup.reload()
            tally = load.finish()
        assert result.returncode == 0, result.stderr
        summary = watch.check()
        assert not tally.failures and tally.ok > 100, tally.describe()
        assert len(sup.workers()) >= WORKERS, summary
        if name == "preload":
            assert sup.events("template_spare_used"), summary
