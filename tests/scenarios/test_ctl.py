"""`supervisorctl` as an operator types it: no flags (the config found through $SUPERVISOR_CONFIG or the
default path), `restart` under load, `version`, `status PROGRAM`."""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

import pytest

from supervisor import __version__
from supervisor.config.locate import DEFAULT_PATH
from tests.harness import BIN, Supervisor, program, supervisor, wait_for
from tests.load import Clients

pytestmark = pytest.mark.usefixtures("netns")

# A private mount namespace whose /etc is the host's with an overlay on top: what the test writes there
# (the default config path) lands in `$0`/upper, and the host's /etc is never written.
OVERLAY = ('mkdir -p "$0/upper/reuseport-supervisor" "$0/work" '
           '&& cp "$0/supervisor.yaml" "$0/upper/reuseport-supervisor/" '
           '&& mount -t overlay overlay -o "lowerdir=/etc,upperdir=$0/upper,workdir=$0/work" /etc && exec "$@"')


def ctl(*args: str, env: dict[str, str] | None = None,
        prefix: tuple[str, ...] = ()) -> subprocess.CompletedProcess[str]:
    """supervisorctl without -c or -s."""
    clean = {k: v for k, v in os.environ.items() if k != "SUPERVISOR_CONFIG"}
    return subprocess.run([*prefix, str(BIN / "supervisorctl"), *args], capture_output=True, text=True, timeout=60,
                          env={**clean, **(env or {})})


def with_default_path(sup: Supervisor, layer: Path) -> tuple[str, ...]:
    """A command prefix that runs what follows with `sup`'s config at DEFAULT_PATH (a new layer each time:
    an overlay's upper folder serves one mount at a time)."""
    layer.mkdir()
    (layer / "supervisor.yaml").write_text(sup.config.read_text())
    return ("unshare", "-m", "--propagation", "private", "sh", "-c", OVERLAY, str(layer))


def test_without_flags_through_the_environment(tmp_path: Path) -> None:
    """$SUPERVISOR_CONFIG is enough for supervisord and supervisorctl alike (-s still wins); `version` names
    both versions; `status PROGRAM` shows that program alone; an unknown name is one line, exit 1."""
    env = {"SUPERVISOR_CONFIG": str(tmp_path / "supervisor.yaml")}
    sup = Supervisor(tmp_path, {"web": program(workers=1), "api": program(workers=1, listen=["127.0.0.1:8001"])})
    with open(sup.log, "ab") as log:
        sup.proc = subprocess.Popen([str(BIN / "supervisord"), "--log-format", "json"], stdout=log, stderr=log,
                                    env={**os.environ, **env})
    try:
        wait_for("every program serving", sup.serving, timeout=20)
        status = ctl("status", env=env)
        version = ctl("version", env=env)
        one = ctl("status", "api", "--json", env=env)
        unknown = ctl("status", "nope", env=env)
        missing = ctl("status", env={"SUPERVISOR_CONFIG": str(tmp_path / "gone.yaml")})
        by_socket = ctl("-s", str(sup.socket), "status", env={"SUPERVISOR_CONFIG": str(tmp_path / "gone.yaml")})
    finally:
        sup.kill()
    assert status.returncode == 0 and "web:0" in status.stdout and "api:0" in status.stdout, status.stderr
    assert version.returncode == 0 and version.stdout.splitlines() == [
        f"supervisorctl (reuseport-supervisor) {__version__}", f"supervisord (reuseport-supervisor) {__version__}"]
    assert one.returncode == 0 and [p["name"] for p in json.loads(one.stdout)["programs"]] == ["api"]
    assert (unknown.returncode, unknown.stdout, unknown.stderr) == (
        1, "", "supervisorctl: status failed: no program named 'nope'\n")
    assert (missing.returncode, missing.stderr) == (
        2, f"supervisorctl: {tmp_path}/gone.yaml: no such file (named by $SUPERVISOR_CONFIG)\n")
    assert by_socket.returncode == 0 and "web:0" in by_socket.stdout  # -s wins: no config read
    started = sup.events("supervisord_started")[0]
    assert started["config"] == env["SUPERVISOR_CONFIG"]
    assert started["listen"] == {"web": ["127.0.0.1:8000"], "api": ["127.0.0.1:8001"]}


def test_without_flags_through_the_default_path(tmp_path: Path) -> None:
    """supervisord and supervisorctl read DEFAULT_PATH when neither -c nor $SUPERVISOR_CONFIG is given;
    where it does not exist, one line says where they looked (exit 2)."""
    sup = Supervisor(tmp_path, {"web": program(workers=1)})
    with open(sup.log, "ab") as log:
        sup.proc = subprocess.Popen([*with_default_path(sup, tmp_path / "daemon"), str(BIN / "supervisord"),
                                     "--log-format", "json"], stdout=log, stderr=log,
                                    env={k: v for k, v in os.environ.items() if k != "SUPERVISOR_CONFIG"})
    try:
        wait_for("web serving", sup.serving, timeout=20)
        status = ctl("status", "web", prefix=with_default_path(sup, tmp_path / "ctl"))
    finally:
        sup.kill()
    assert status.returncode == 0 and "web:0" in status.stdout, status.stderr
    assert sup.events("supervisord_started")[0]["config"] == DEFAULT_PATH
    if not os.path.exists(DEFAULT_PATH):  # the host's own /etc, as it is
        nothing = ctl("status")
        assert (nothing.returncode, nothing.stderr) == (
            2, f"supervisorctl: {DEFAULT_PATH}: no such file (the default path: neither -c nor $SUPERVISOR_CONFIG "
               "was given)\n")
        daemon = subprocess.run([str(BIN / "supervisord")], capture_output=True, text=True, timeout=60,
                                env={k: v for k, v in os.environ.items() if k != "SUPERVISOR_CONFIG"})
        assert (daemon.returncode, daemon.stderr) == (2, nothing.stderr.replace("supervisorctl", "supervisord", 1))


def test_restart_replaces_the_workers_under_load_with_the_settings_it_runs(tmp_path: Path) -> None:
    """`restart web` with 64 requests in flight: a new generation, not one request lost; the file, changed
    meanwhile, is not read (that is `reload`); `restart` of a stopped program says to `start` it."""
    with supervisor(tmp_path, {"web": program(workers=2)}) as sup:
        sup.write({"web": program(workers=3)})  # not read by a restart
        with Clients("127.0.0.1:8000", concurrency=64, seconds=30) as load:
            time.sleep(0.5)  # the clients import and get answers
            restarted = sup.ctl("restart", "web")
            time.sleep(0.5)  # answers from the new generation
            tally = load.finish()
        workers = sup.workers()
        assert sup.ctl("stop", "web").returncode == 0
        refused = sup.ctl("restart", "web")
    assert restarted.returncode == 0, restarted.stderr
    assert restarted.stdout.splitlines()[-1].startswith("restart web done in ")
    assert "1 old listener closed" in restarted.stdout and "2 old workers stopping" in restarted.stdout
    assert sorted(w["generation"] for w in workers if w["state"] == "ready") == [2, 2]
    assert tally.ok > 100 and tally.failures == [], tally.failures[:5]
    assert set(tally.generations) == {1, 2}
    assert (refused.returncode, refused.stderr) == (1, "supervisorctl: restart failed: web is not running; `start` it "
                                                      "instead\n")


@pytest.mark.parametrize(("text", "error"), [
    # read without pyyaml (config/socketpath.py): the socket's own problem, with its line
    ("control:\n  socket: /" + "d" * 150 + "/" + "s" * 83 + "\n", ":2: control.socket: /dd"),
    # pyyaml's reader, the daemon's: broken YAML, a socket that is no string, control that is no mapping
    ("control:\n  socket: /s\nprograms: {web: [}\n", ":3: broken YAML: "),
    ("control:\n  socket: 8000\n", ":2: control.socket: expected a non-empty string"),
    ("control: [a]\n", ":1: control: expected a mapping"),
])
def test_a_bad_config_is_one_line_with_file_line_and_key(tmp_path: Path, text: str, error: str) -> None:
    """supervisorctl -c FILE with a config it cannot take the socket from: exit 2, one line naming the file,
    the line and the key, whichever reader found the problem."""
    path = tmp_path / "supervisor.yaml"
    path.write_text(text)
    bad = ctl("-c", str(path), "status")
    assert bad.returncode == 2 and bad.stdout == ""
    assert bad.stderr.startswith(f"supervisorctl: {path}{error}") and bad.stderr.count("\n") == 1, bad.stderr
