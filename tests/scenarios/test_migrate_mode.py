"""A reload that changes `migrate` applies it only once the new generation serves."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from tests.harness import BIN, PYTHON, Supervisor, program, supervisor, wait_for
from tests.netns import migrate_sysctl

pytestmark = pytest.mark.usefixtures("netns")
FAILS = [PYTHON, "-c", "raise SystemExit(3)"]


@pytest.mark.parametrize(("before", "after"), [("off", "require"), ("off", "prefer"), ("require", "off")])
def test_a_rolled_back_reload_leaves_the_migrate_mode(tmp_path: Path, before: str, after: str) -> None:
    """A bad reload changes nothing: neither the sysctl nor the mode `status` shows; a good one applies it."""
    with supervisor(tmp_path, {"web": program()}, migrate=before) as sup:
        sysctl, mode = migrate_sysctl(), sup.status()["migrate"]
        sup.write({"web": program(FAILS)}, migrate=after)
        result = sup.ctl("reload")
        assert result.returncode == 1 and "exit status 3 before it was ready" in result.stderr, result.stderr
        assert "rolled back, still serving: web#1" in result.stderr
        assert (migrate_sysctl(), sup.status()["migrate"]) == (sysctl, mode)
        sup.write({"web": program()}, migrate=after)
        assert f"migrate: {before} -> {after} once the new generation serves" in sup.reload().stdout
        assert sup.status()["migrate"]["mode"] == after
        assert migrate_sysctl() == ("1" if after != "off" else sysctl)


def test_a_reload_to_require_that_cannot_be_honoured_starts_nothing(tmp_path: Path) -> None:
    """Read-only /proc/sys: `off` serves; a reload to `require` is refused in one line before any worker starts."""
    sup = Supervisor(tmp_path, {"web": program()}, migrate="off")
    cmd = f"mount -o bind,ro /proc/sys /proc/sys && exec {BIN}/supervisord -c {sup.config} --log-format json"
    with open(sup.log, "ab") as log:
        sup.proc = subprocess.Popen(["unshare", "-m", "sh", "-c", cmd], stdout=log, stderr=log)
    try:
        wait_for("every program serving", sup.serving, timeout=20)
        sup.write({"web": program()}, migrate="require")
        result = sup.ctl("reload")
        assert result.returncode == 1 and result.stdout == "", result.stdout
        assert result.stderr.strip().splitlines() == [
            "supervisorctl: reload failed: migrate: require, but cannot set net.ipv4.tcp_migrate_req=1 "
            "(read-only /proc/sys)"]
        assert sup.generation() == 1 and sup.status()["migrate"]["mode"] == "off"
        assert '"generation_retiring"' not in sup.log_text() and migrate_sysctl() == "0"
    finally:
        sup.kill()
