"""Reloads without the sysctl (`migrate: drain`, `prefer` where it cannot be set): steer, drain, then shut.

The workers here accept one connection every 5 ms, so 64 clients in flight keep a queue waiting in
every listener: a reload that shuts the old listeners without migration resets what waits there
(`migrate: off`, the control), one that drains them first loses nothing.
"""

from __future__ import annotations

import os
import pwd
import shutil
import signal
import site
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.harness import PYTHON, Supervisor, collect, open_requests, program, supervisor, wait_for
from tests.load import Clients, Tally
from tests.netns import migrate_sysctl

pytestmark = pytest.mark.usefixtures("netns")

ROOT = Path(__file__).resolve().parents[2]
APPS = ROOT / "tests" / "apps"
SLOW = [PYTHON, "-S", "-I", str(APPS / "slow_accept.py")]
RELOADS = 10


def reloads_under_load(sup: Supervisor, reloads: int = RELOADS) -> tuple[Tally, list[str]]:
    """64 new connections in flight, `reloads` reloads about 0.5 s apart; the tally and the replies."""
    replies = []
    with Clients("127.0.0.1:8000", concurrency=64, seconds=60) as load:
        wait_for("the load to reach the workers", lambda: any(w["cpu"] for w in sup.workers()))
        for _ in range(reloads):
            time.sleep(0.5)  # pacing: load between the reloads
            replies.append(sup.reload().stdout)
        time.sleep(0.5)
        tally = load.finish()
    return tally, replies


@pytest.mark.parametrize(("migrate", "accept_queue"), [("drain", "per-worker"), ("off", "per-worker"),
                                                      ("drain", "shared")])
def test_reloads_without_the_sysctl_lose_nothing_when_they_drain(tmp_path: Path, migrate: str,
                                                                 accept_queue: str) -> None:
    """`drain`: 0 failed over 10 reloads, each reply says how long it drained (also the one queue the old
    workers shared). `off`: the same reloads reset what waited in the old listeners (so this test can fail)."""
    assert migrate_sysctl() == "0"
    with supervisor(tmp_path, {"web": program(SLOW, accept_queue=accept_queue)}, migrate=migrate) as sup:
        tally, replies = reloads_under_load(sup)
        assert migrate_sysctl() == "0"  # never touched
        last = sup.status()["last_reload"]
    assert tally.ok > 1000
    if migrate == "off":
        assert tally.failed()["reset"] >= RELOADS, tally.failed()  # about one queue's worth per reload
        assert all("connections reset (migrate: off and the sysctl at 0)" in r for r in replies)
        assert last["way"] == "reset"
        return
    assert tally.failures == [], tally.failures[:5]
    closed = "1 old listener closed" if accept_queue == "shared" else "2 old listeners closed"
    assert all(f"{closed}, drained in" in r and ", 0 dropped" in r for r in replies), replies
    assert last["result"] == "done" and last["way"] == "drained" and last["dropped"] == 0


@pytest.mark.parametrize("migrate", ["drain", "off"])
def test_a_rollback_without_the_sysctl_loses_nothing(tmp_path: Path, migrate: str) -> None:
    """A new generation that never gets ready, under load: while it starts, new connections stay on the
    serving generation, so its rollback has nothing to reset, `off` included (that the load counts
    resets at all: `off` in the test above)."""
    never_ready = [PYTHON, "-S", "-I", "-c", "import time; time.sleep(60)"]
    with supervisor(tmp_path, {"web": program(SLOW)}, migrate=migrate) as sup, \
            Clients("127.0.0.1:8000", concurrency=64, seconds=60) as load:
        wait_for("the load to reach the workers", lambda: any(w["cpu"] for w in sup.workers()))
        sup.write({"web": program(never_ready, ready_timeout=1)}, migrate=migrate)
        result = sup.ctl("reload")
        time.sleep(0.5)  # the old generation serves on
        tally = load.finish()
        assert sup.generation() == 1
    assert result.returncode == 1 and "not ready within 1 s" in result.stderr, result
    assert tally.ok > 200
    assert tally.failures == [], tally.failures[:5]


def test_rolling_reloads_without_the_sysctl_drain_each_batch(tmp_path: Path) -> None:
    """`strategy: rolling`, 4 workers 2 at a time, `migrate: drain`: every batch is drained, 0 failed."""
    with supervisor(tmp_path, {"web": program(SLOW, workers=4, strategy="rolling", batch=2)}, migrate="drain") as sup:
        tally, replies = reloads_under_load(sup, reloads=4)
    assert tally.ok > 500 and tally.failures == [], tally.failures[:5]
    assert all(r.count("drained in") == 2 for r in replies), replies


@pytest.mark.parametrize(("migrate", "accept_queue"), [("drain", "per-worker"), ("off", "per-worker"),
                                                      ("off", "shared")])
def test_scale_down_and_recycling_without_the_sysctl(tmp_path: Path, migrate: str, accept_queue: str) -> None:
    """Workers leaving a serving generation (`scale` down, `max_age` recycling) under load: drained
    first, 0 failed; shut at once (`off`), what waited in their queues is reset. With one shared queue
    a leaving worker shuts nothing: nothing to drain, nothing reset, even with `off`."""
    settings = program(SLOW, workers=3, max_age=2, accept_queue=accept_queue)
    with supervisor(tmp_path, {"web": settings}, migrate=migrate) as sup, \
            Clients("127.0.0.1:8000", concurrency=64, seconds=60) as load:
        wait_for("the load to reach the workers", lambda: any(w["cpu"] for w in sup.workers()))
        for count in (2, 3, 1, 3, 2):
            assert sup.ctl("scale", "web", str(count)).returncode == 0
            time.sleep(0.8)  # pacing: load between the scales
        if migrate == "drain":  # and a worker past max_age recycled under the load (3 drains are the scales)
            wait_for("a recycled worker drained", lambda: sup.log_text().count('"workers_drained"') >= 4)
        else:
            wait_for("a recycled worker", lambda: '"worker_recycled"' in sup.log_text())
        tally = load.finish()
        drained = sup.log_text().count('"workers_drained"')
    assert tally.ok > 500
    if accept_queue == "shared":
        assert tally.failures == [], tally.failures[:5]
        assert drained == 0
    elif migrate == "off":
        assert tally.failed()["reset"] > 0, tally.failed()
        assert drained == 0
    else:
        assert tally.failures == [], tally.failures[:5]
        assert drained >= 4


def test_a_worker_that_stopped_accepting_cannot_hold_a_reload(tmp_path: Path) -> None:
    """A frozen old worker: the reload waits `drain_timeout`, then shuts; the 20 connections its queue
    held are reset, and the reply, `status` and /metrics count exactly those."""
    programs = {"web": program(SLOW, workers=1, drain_timeout=1, graceful_timeout=1)}
    sup = Supervisor(tmp_path, programs, migrate="drain")
    sup.top = {"metrics": {"listen": "127.0.0.1:9150"}}
    sup.write(programs, migrate="drain")
    try:
        sup.start()
        old = sup.workers()[0]["pid"]
        os.kill(old, signal.SIGSTOP)
        socks = open_requests(20)  # on loopback each is in the accept queue once connect() returns
        began = time.monotonic()
        result = sup.reload()
        took = time.monotonic() - began
        outcomes, _ = collect(socks)
        os.kill(old, signal.SIGCONT)
        last = sup.status()["last_reload"]
        metrics = _get("127.0.0.1", 9150, "/metrics")
    finally:
        sup.kill()
    assert 1.0 <= took < 4.0, took
    assert "20 dropped (drain_timeout passed: their workers did not accept them)" in result.stdout, result.stdout
    assert outcomes == {"reset": 20}, outcomes
    assert (last["way"], last["dropped"]) == ("drained", 20)
    assert "supervisor_drain_dropped_connections_total 20.0" in metrics
    assert 'supervisor_reload_retirements_total{way="drained"} 1.0' in metrics


@pytest.fixture
def unprivileged_folder() -> Iterator[Path]:
    """A folder `nobody` owns, under /tmp (pytest's own folders are root's alone)."""
    folder = Path(tempfile.mkdtemp(prefix="drain-"))
    nobody = pwd.getpwnam("nobody")
    os.chown(folder, nobody.pw_uid, nobody.pw_gid)
    folder.chmod(0o755)
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


def test_an_unprivileged_supervisord_with_prefer_drains_and_loses_nothing(unprivileged_folder: Path) -> None:
    """supervisord as `nobody`: it cannot set the sysctl, says so once, and its reloads drain: 0 failed.

    The venv's interpreter lies under root's home, which `nobody` cannot enter: supervisord and its
    workers run on Debian's python3 with the venv's packages on PYTHONPATH."""
    system_python = "/usr/bin/python3"
    slow = [system_python, "-S", "-I", str(APPS / "slow_accept.py")]
    sup = Supervisor(unprivileged_folder, {"web": program(slow)}, migrate="prefer")
    sup.prefix = ["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups", "--", system_python]
    sup.env = {"PYTHONPATH": os.pathsep.join([str(ROOT), *site.getsitepackages()])}
    try:
        migration = sup.start().status()["migrate"]
        tally, replies = reloads_under_load(sup, reloads=6)
    finally:
        sup.kill()
    assert (migration["enabled"], migration["drains"]) == (False, True), migration
    assert "draining old listeners instead of migrating" in migration["reason"]
    assert tally.ok > 500 and tally.failures == [], tally.failures[:5]
    assert all("drained in" in r for r in replies), replies


def _get(host: str, port: int, path: str) -> str:
    import urllib.request

    with urllib.request.urlopen(f"http://{host}:{port}{path}", timeout=10) as answer:
        return str(answer.read().decode())
