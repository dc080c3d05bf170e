"""The shipped unit under a real systemd (tests/nspawn.py boots one): systemd 254 from
bookworm-backports, which announces the fd store with $FDSTORE, and this machine's own 252, where
the unit's SUPERVISOR_FDSTORE does. Installed as docs/systemd.md says; then start, reload under
load, supervisord killed (SIGKILL) and brought back by Restart=on-failure, restart under load, stop;
on 254 also FileDescriptorStorePreserve=yes. A control on 252 without SUPERVISOR_FDSTORE shows the
request after the kill refused.

What a real systemd cannot show here (unknown fds in the store, ten kills in a row) the stand-in
service manager covers (test_fdstore.py).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest

from tests import nspawn
from tests.harness import collect, open_requests, wait_for
from tests.load import Clients

ROOT = Path(__file__).resolve().parents[2]
UNIT = "reuseport-supervisor"
VENV = "/opt/reuseport-supervisor"


def cannot(why: str) -> None:
    """Skip, or fail in CI, where a missing capability is a failure."""
    if os.environ.get("CI") == "true":
        pytest.fail(f"CI must be able to run the unit under a real systemd: {why}")
    pytest.skip(why)


@pytest.fixture(scope="session")
def unavailable() -> str | None:
    return nspawn.missing()


@pytest.fixture(scope="session")
def wheels(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The package and its runtime dependencies as wheels (the container has no network), kept in
    pytest's cache: only the package's own is built again, offline when its build needs nothing new.
    From a copy of the sources: setuptools' build/ folder in the clone could carry deleted modules."""
    folder = Path(request.config.cache.mkdir("nspawn-wheels"))
    source = tmp_path_factory.mktemp("source")
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source)
    shutil.copytree(ROOT / "supervisor", source / "supervisor", ignore=shutil.ignore_patterns("__pycache__"))
    for old in folder.glob("reuseport_supervisor-*.whl"):
        old.unlink()
    pip = [sys.executable, "-m", "pip", "wheel", "-q", "-w", str(folder)]
    offline = subprocess.run([*pip, "--no-index", "--find-links", str(folder), str(source)], capture_output=True)
    if offline.returncode != 0:  # the first time, or a new dependency: setuptools for the next offline build
        built = subprocess.run([*pip, str(source), "setuptools>=68"], capture_output=True, text=True)
        if built.returncode != 0:
            cannot(f"pip wheel failed (no package index?): {built.stderr.strip().splitlines()[-1:]}")
    return folder


@pytest.fixture(scope="session")
def opt(request: pytest.FixtureRequest) -> Path:
    """Bound at /opt/reuseport-supervisor in every container: the venv, made in the first container
    that finds none, kept in pytest's cache (install() puts this session's package in)."""
    opt = Path(request.config.cache.mkdir("nspawn-opt"))
    opt.chmod(0o755)  # as /opt is: the workers' user reads the venv
    return opt


@pytest.fixture
def machine(request: pytest.FixtureRequest, unavailable: str | None, tmp_path: Path) -> Iterator[nspawn.Machine]:
    if unavailable:
        cannot(unavailable)
    wheels, opt = request.getfixturevalue("wheels"), request.getfixturevalue("opt")  # only where it can run
    layer = None
    if request.param == 254:
        try:
            layer = nspawn.systemd_layer(Path(request.config.cache.mkdir("systemd-254")))
        except subprocess.CalledProcessError as exc:
            cannot(f"systemd 254 from bookworm-backports could not be fetched: {exc}")
    box = nspawn.Machine(tmp_path, layer, binds={VENV: opt, "/wheels": wheels})
    try:
        box.boot()
        assert box.run("systemctl", "--version").stdout.split()[1] == str(request.param)
        install(box)
        yield box
    finally:
        box.halt()


def install(box: nspawn.Machine) -> None:
    """docs/systemd.md's install steps, from the wheels instead of the index."""
    box.run("useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", "reuseport-web")
    # PIP_CONFIG_FILE: this machine's pip.conf (mirrors, constraints) is not the user's.
    pip = ["env", "PIP_CONFIG_FILE=/dev/null", f"{VENV}/bin/pip", "install", "-q", "--no-index", "--find-links",
           "/wheels"]
    if box.run(f"{VENV}/bin/python", "-c", "", check=False).returncode != 0:
        box.run("python3", "-m", "venv", "--clear", VENV)
    else:  # the venv of an earlier session: this session's package, whatever its version says
        wheel = next(Path(box.binds["/wheels"]).glob("reuseport_supervisor-*.whl")).name
        box.run(*pip, "--force-reinstall", "--no-deps", f"/wheels/{wheel}", timeout=120)
    box.run(*pip, "reuseport-supervisor", timeout=120)
    box.run("install", "-D", "-m", "0644", str(ROOT / "config" / "systemd.yaml"),
            "/etc/reuseport-supervisor/supervisor.yaml")
    box.run("install", "-m", "0644", str(ROOT / "systemd" / f"{UNIT}.service"), "/etc/systemd/system/")
    box.run("systemctl", "daemon-reload")
    box.run("systemctl", "enable", f"{UNIT}.service")  # started by each test (the container runs basic.target)


def systemctl(box: nspawn.Machine, *args: str) -> None:
    """`systemctl ARGS`, which must succeed: else the unit's journal is in the failure."""
    result = box.run("systemctl", *args, check=False)
    if result.returncode != 0:
        journal = box.run("journalctl", "-u", UNIT, "-o", "cat", "--no-pager", "-n", "30", check=False).stdout
        raise AssertionError(f"systemctl {' '.join(args)} exited {result.returncode}: {result.stderr}\n{journal}")


def show(box: nspawn.Machine, prop: str) -> str:
    return box.run("systemctl", "show", UNIT, "-p", prop, "--value").stdout.strip()


def events(box: nspawn.Machine, name: str) -> list[dict[str, Any]]:
    """supervisord's log lines of one event, from the journal (it logs JSON on stderr)."""
    lines = box.run("journalctl", "-u", UNIT, "-o", "cat", "--no-pager").stdout.splitlines()
    found = [json.loads(line) for line in lines if line.startswith("{") and f'"{name}"' in line]
    return [e for e in found if e.get("event") == name]


def generation(box: nspawn.Machine) -> int:
    status = json.loads(box.run(f"{VENV}/bin/supervisorctl", "-c", "/etc/reuseport-supervisor/supervisor.yaml",
                                "status", "--json").stdout)
    return next(g["generation"] for g in status["programs"][0]["generations"] if g["state"] == "serving")


def kill_main(box: nspawn.Machine) -> int:
    """SIGKILL to supervisord (kill -9 of the unit's MainPID); returns its pid once it and its workers
    are gone (they got their stop signal and finished what they had accepted). Then no process of
    the unit holds a listener: only systemd's fd store may."""
    pid = int(show(box, "MainPID"))
    main = psutil.Process(box.host_pid(pid))
    tree = [main, *main.children(recursive=True)]
    main.kill()
    _gone, alive = psutil.wait_procs(tree, timeout=15)
    assert not alive, f"still running after supervisord's death: {alive}"
    return pid

class Clock:
    """How long each step took, printed at the end (pytest -s shows it)."""

    def __init__(self) -> None:
        self.last = time.monotonic()
        self.steps: list[str] = []

    def step(self, what: str) -> None:
        now = time.monotonic()
        self.steps.append(f"{what} {now - self.last:.1f} s (at {now:.2f})")
        self.last = now


@pytest.mark.parametrize("machine", [254, 252], indirect=True, ids=["systemd-254", "systemd-252"])
def test_the_unit_under_a_real_systemd(machine: nspawn.Machine, request: pytest.FixtureRequest) -> None:
    box, clock, version = machine, Clock(), request.node.callspec.params["machine"]
    systemctl(box, "start", UNIT)  # returns at READY=1
    clock.step("start")
    announced = events(box, "fdstore_enabled")[0]
    assert announced["announced_by"] == ("FDSTORE" if version >= 254 else "SUPERVISOR_FDSTORE")
    assert show(box, "NFileDescriptorStore") == "1"  # one address: the generation's one listener
    workers = box.run("ps", "-o", "user=", "--ppid", show(box, "MainPID")).stdout.split()
    assert workers == ["reuseport-web"] * 2, workers

    with box.network(), Clients("127.0.0.1:8000", concurrency=64, seconds=60, timeout=15) as load:
        time.sleep(0.5)  # the clients import, then run
        systemctl(box, "reload", UNIT)
        clock.step("reload")
        wait_for("the store to hold the new generation's listeners only",
                 lambda: show(box, "NFileDescriptorStore") == "1")

        killed = kill_main(box)
        waiting = open_requests(4)  # sent while nothing runs: they queue in the listeners in the store
        wait_for("Restart= to bring supervisord back",
                 lambda: show(box, "ActiveState") == "active" and show(box, "MainPID") not in ("0", str(killed)),
                 timeout=30)
        outcomes, generations = collect(waiting)
        assert outcomes == {"ok": 4} and generations == {3: 4}, (outcomes, generations)
        assert generation(box) == 3  # numbering goes on from the adopted 2
        assert show(box, "NRestarts") == "1"
        clock.step("SIGKILL and Restart=")

        systemctl(box, "restart", UNIT)
        clock.step("restart")
        time.sleep(0.5)
        tally = load.finish()
    assert tally.ok > 300 and not tally.failures, tally.failed()
    assert generation(box) == 4
    # ExitType=cgroup: after the kill systemd waited for the workers instead of killing them.
    assert "SIGKILL" not in box.run("journalctl", "-u", UNIT, "-o", "cat", "--no-pager").stdout
    adopted = [sorted(e["listeners"]) for e in events(box, "fdstore_adopted")]
    assert adopted == [["web.2.shared.0"], ["web.3.shared.0"]], adopted

    systemctl(box, "stop", UNIT)
    clock.step("stop")
    assert show(box, "ActiveState") == "inactive" and show(box, "NFileDescriptorStore") == "0"
    with box.network(), pytest.raises(ConnectionRefusedError):
        open_requests(1)
    if version >= 254:
        stop_and_start_with_the_store_preserved(box)
        clock.step("FileDescriptorStorePreserve=yes: start, stop, start, stop")
    print(f"\nsystemd {version}: {tally.ok} answers, {len(tally.failures)} failed; " + ", ".join(clock.steps))


def stop_and_start_with_the_store_preserved(box: nspawn.Machine) -> None:
    """FileDescriptorStorePreserve=yes (254+): the listeners stay in the store while the service is
    stopped, so a request sent then waits and is answered after the next start. (The store lives as
    long as the unit is loaded: an enabled unit stays loaded, one nothing refers to is unloaded.)"""
    drop_in(box, "FileDescriptorStorePreserve=yes")
    systemctl(box, "start", UNIT)
    systemctl(box, "stop", UNIT)
    assert show(box, "NFileDescriptorStore") == "1"
    with box.network():
        waiting = open_requests(2)
    systemctl(box, "start", UNIT)
    outcomes, _generations = collect(waiting)
    assert outcomes == {"ok": 2}, outcomes
    systemctl(box, "stop", UNIT)
    systemctl(box, "clean", "--what=fdstore", UNIT)  # how to empty it then
    assert show(box, "NFileDescriptorStore") == "0"


def drop_in(box: nspawn.Machine, *lines: str) -> None:
    """A drop-in of [Service] lines over the shipped unit, as an administrator adds one."""
    folder = f"/etc/systemd/system/{UNIT}.service.d"
    box.run("sh", "-c", f'mkdir -p {folder} && printf "%s\\n" "[Service]" "$@" > {folder}/test.conf', "sh", *lines)
    box.run("systemctl", "daemon-reload")


@pytest.mark.parametrize("machine", [252], indirect=True, ids=["systemd-252"])
def test_without_the_store_on_systemd_252_a_crash_refuses_connections(machine: nspawn.Machine) -> None:
    """Control: the unit without SUPERVISOR_FDSTORE on 252 (as it was before): nothing is stored, and
    a request sent after the same kill is refused, so the test above can fail."""
    box = machine
    drop_in(box, "Environment=SUPERVISOR_FDSTORE=")
    systemctl(box, "start", UNIT)
    assert show(box, "NFileDescriptorStore") == "0" and not events(box, "fdstore_enabled")
    with box.network():
        kill_main(box)
        with pytest.raises(ConnectionRefusedError):  # the same request as above, at the same moment
            open_requests(1)
    wait_for("Restart= to bring supervisord back", lambda: show(box, "ActiveState") == "active", timeout=30)
    assert not events(box, "fdstore_adopted")
    systemctl(box, "stop", UNIT)
