"""In a container: supervisord as PID 1 (and as a plain subreaper) reaps orphans and kills what a
worker left behind when that worker goes; the Dockerfile says what it must (test_image.py builds and
runs it, tests/unit/test_kubernetes.py checks the Kubernetes manifests)."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import psutil
import pytest

from tests.harness import PYTHON, Supervisor, program, request, wait_for

pytestmark = pytest.mark.usefixtures("netns")
ROOT = Path(__file__).resolve().parents[2]
APPS = ROOT / "tests" / "apps"
# A PID namespace of its own with /proc to match; supervisord is its PID 1. --kill-child: a test that
# kills unshare takes the namespace (and so everything in it) down with it.
PID1 = ["unshare", "--pid", "--fork", "--mount-proc", "--kill-child"]


def escaped(folder: Path) -> set[int]:
    """The live processes the escaper workers left behind (host pids): each runs `escaper.py FOLDER`."""
    found = set()
    for proc in psutil.process_iter(["cmdline", "status"]):
        cmdline = proc.info["cmdline"] or []
        if str(folder) in cmdline and any(arg.endswith("escaper.py") for arg in cmdline) \
                and proc.info["status"] != psutil.STATUS_ZOMBIE:
            found.add(proc.pid)
    return found


def zombies(around: int) -> list[int]:
    """Zombies among the descendants of `around` (host pid): nobody reaped them."""
    try:
        tree = psutil.Process(around).children(recursive=True)
    except psutil.NoSuchProcess:
        return []
    return [p.pid for p in tree if _status(p) == psutil.STATUS_ZOMBIE]


def _status(proc: psutil.Process) -> str:
    try:
        return proc.status()
    except psutil.NoSuchProcess:
        return "gone"


def listening(port: int) -> int:
    """Sockets in LISTEN on the port in this network namespace (one per serving worker, if none rejoined)."""
    out = subprocess.run(["ss", "-Hltn", f"sport = :{port}"], capture_output=True, text=True, check=True).stdout
    return len(out.splitlines())


def host_pid(inner: int, ns_pid: int) -> int:
    """The host pid of the process that is `ns_pid` in the PID namespace of `inner` (a host pid)."""
    namespace = os.readlink(f"/proc/{inner}/ns/pid")
    for proc in psutil.Process(inner).children(recursive=True):
        try:
            with open(f"/proc/{proc.pid}/status") as f:
                ids = next(line.split()[1:] for line in f if line.startswith("NSpid:"))
            if int(ids[-1]) == ns_pid and os.readlink(f"/proc/{proc.pid}/ns/pid") == namespace:
                return proc.pid
        except FileNotFoundError:  # reaped since the listing (an escaper's short-lived orphan)
            continue
    raise AssertionError(f"no process {ns_pid} in the namespace of {inner}")


@pytest.mark.parametrize("pid1", [True, False], ids=["pid1", "subreaper"])
def test_what_a_worker_left_behind_goes_with_it(tmp_path: Path, pid1: bool) -> None:
    """A worker that double-forks a `setsid` child keeping its listener: after a reload and after a
    crash that child is gone within the graceful timeout and has not rejoined the reuseport group; an
    orphan that exits is reaped; TERM ends supervisord with exit status 0 and nothing left behind."""
    escaper = program([PYTHON, str(APPS / "escaper.py"), str(tmp_path)], graceful_timeout=3)
    sup = Supervisor(tmp_path, {"web": escaper})
    if pid1:
        sup.prefix = PID1
    try:
        sup.start()
        assert sup.proc is not None
        daemon = psutil.Process(sup.proc.pid).children()[0].pid if pid1 else sup.proc.pid
        first = wait_for("a lingerer per worker", lambda: len(escaped(tmp_path)) == 2 and escaped(tmp_path))
        wait_for("the short orphans reaped (no zombies)", lambda: not zombies(daemon))
        assert sup.events("orphan_reaped"), "the short-lived orphans were reaped by someone else"

        if pid1:  # HUP reloads: PID 1 has a handler for it (the kernel would drop it otherwise)
            os.kill(daemon, signal.SIGHUP)
            wait_for("the HUP reload", lambda: sup.generation() == 2 and sup.serving(), timeout=20)
        else:
            sup.reload()
        wait_for("generation 1's lingerers gone", lambda: not first & escaped(tmp_path), timeout=3 + 2)
        wait_for("the serving generation's one listener", lambda: listening(8000) == 1)
        assert request()[0] == 200
        killed = sup.events("orphan_killed")
        assert len(killed) == 2 and all("is gone" in e["reason"] for e in killed), killed

        second = escaped(tmp_path)
        victim = sup.workers()[0]["pid"]
        os.kill(host_pid(daemon, victim) if pid1 else victim, signal.SIGKILL)
        wait_for("the crashed worker's lingerer gone", lambda: len(second & escaped(tmp_path)) == 1, timeout=3 + 2)
        wait_for("the slot restarted", lambda: sup.replaced(victim, 2))
        wait_for("the serving generation's one listener", lambda: listening(8000) == 1)
        wait_for("no zombies", lambda: not zombies(daemon))

        os.kill(daemon, signal.SIGTERM)  # unshare does not pass signals on: to PID 1 itself
        assert sup.proc.wait(timeout=30) == 0  # unshare exits as its child did
        assert not escaped(tmp_path), "supervisord stopped and left its workers' descendants running"
    finally:
        sup.kill()


def test_as_pid_1_a_stranger_is_not_killed_on_the_strength_of_its_environment(tmp_path: Path) -> None:
    """Any orphan of a container becomes PID 1's child, and anyone can set LISTEN_PID: one that names a
    worker gone (crafted, not descended from it) is spared and reaped, not killed; the master stays
    responsive and a reload works."""
    sup = Supervisor(tmp_path, {"web": program()})
    sup.prefix = PID1
    try:
        sup.start()
        assert sup.proc is not None
        daemon = psutil.Process(sup.proc.pid).children()[0].pid
        victim = sup.workers()[0]["pid"]  # its pid inside the namespace
        os.kill(host_pid(daemon, victim), signal.SIGKILL)
        wait_for("the slot restarted", lambda: sup.replaced(victim, 2))
        # A process that enters the namespace from outside and is orphaned there: PID 1 adopts it.
        subprocess.run(["nsenter", "--target", str(daemon), "--pid", "--", "sh", "-c",
                        f"LISTEN_PID={victim} setsid sleep 61 >/dev/null 2>&1 &"], check=True)
        spared = wait_for("the stranger adopted and spared", lambda: sup.events("orphan_spared"), timeout=5)
        assert spared[0]["owner"] == victim and spared[0]["command"] == "sleep 61"
        stranger = host_pid(daemon, spared[0]["pid"])
        sup.reload()
        started = time.monotonic()
        sup.status()
        assert time.monotonic() - started < 0.1
        assert psutil.Process(stranger).is_running() and not sup.events("orphan_killed")
        os.kill(daemon, signal.SIGTERM)
        assert sup.proc.wait(timeout=30) == 0  # what is left when PID 1 stops goes with it
        assert not psutil.pid_exists(stranger) or _status(psutil.Process(stranger)) == psutil.STATUS_ZOMBIE
    finally:
        sup.kill()


def test_the_dockerfile_runs_supervisord_as_pid_1() -> None:
    """Its entrypoint is supervisord (exec form: PID 1, signals reach it), and what it copies exists."""
    lines = [line.strip() for line in (ROOT / "Dockerfile").read_text().splitlines()]
    entrypoint = next(line for line in lines if line.startswith("ENTRYPOINT"))
    assert entrypoint.startswith('ENTRYPOINT ["supervisord"'), entrypoint
    for line in lines:
        if line.startswith("COPY") and "--from" not in line:
            *sources, _target = line.split()[1:]
            for source in sources:
                assert (ROOT / source).exists(), f"the Dockerfile copies {source}, which is not in the repository"
