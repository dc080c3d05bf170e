"""Operating one program: `reload PROGRAM` leaves the others alone; `reload --json`; `tail [-n N] [-f] PROGRAM`."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import trustme

from supervisor.daemon import output
from supervisor.protocol import framing
from tests.harness import BIN, Supervisor, program, supervisor, wait_for
from tests.load import Clients
from tests.scenarios.test_tls import tls_program, write_cert

pytestmark = pytest.mark.usefixtures("netns")


def test_reload_of_one_program_leaves_the_other_alone_under_load(tmp_path: Path) -> None:
    sup = Supervisor(tmp_path, {"web": program(), "api": program(listen=["127.0.0.1:8001"])}).start()
    try:
        api_pids = {w["pid"] for w in sup.workers("api")}
        # The file now says something new for both: only web takes it.
        sup.write({"web": program(workers=3), "api": program(workers=1, listen=["127.0.0.1:8001"])})
        with Clients("127.0.0.1:8000", seconds=60) as web, Clients("127.0.0.1:8001", seconds=60) as api:
            wait_for("the load", lambda: sup.ctl("status").returncode == 0)
            reloaded = sup.ctl("reload", "web")
            wait_for("the retired generation's last answers (its workers exited)",
                     lambda: {w["generation"] for w in sup.workers("web")} == {2})
            tallies = web.finish(), api.finish()
        assert reloaded.returncode == 0, reloaded.stderr
        assert "web: generation 2 starting 3 workers" in reloaded.stdout and "api" not in reloaded.stdout
        assert (sup.generation("web"), sup.generation("api")) == (2, 1)
        assert {w["pid"] for w in sup.workers("api")} == api_pids
        assert all(not t.failures and t.ok > 100 for t in tallies), [t.failures[:3] for t in tallies]

        unknown = sup.ctl("reload", "nosuch")
        assert (unknown.returncode, unknown.stderr) == (
            1, f"supervisorctl: reload failed: no program named 'nosuch' in {sup.config}\n")
        # Now without a name: every program, with what the file says.
        sup.reload()
        assert (sup.generation("web"), sup.generation("api")) == (3, 2)
        wait_for("api's old workers gone, one new left", lambda: len(sup.workers("api")) == 1)
    finally:
        sup.kill()


def test_reload_and_restart_answer_as_json_with_their_phases(tmp_path: Path) -> None:
    """`--json`: stdout is the answer's data alone (generations, listeners closed, phases in ms), the
    progress lines go to stderr; a refused one is the usual one line on stderr, exit 1."""
    import json

    with supervisor(tmp_path, {"web": program()}) as sup:
        reloaded = sup.ctl("reload", "--json")
        assert reloaded.returncode == 0, reloaded.stderr
        data = json.loads(reloaded.stdout)
        assert data["generations"] == {"web": 2} and data["listeners_closed"] == 1, data
        assert set(data["phases"]) == {"config", "spawn", "ready", "switch"} and data["ms"] > 0
        assert "web: generation 2 starting 2 workers" in reloaded.stderr
        restarted = sup.ctl("restart", "web", "--json")
        assert json.loads(restarted.stdout)["generations"] == {"web": 3}, restarted
        refused = sup.ctl("restart", "nope", "--json")
        assert (refused.returncode, refused.stdout) == (1, ""), refused
        assert "no program named 'nope'" in refused.stderr


def test_tail_shows_the_last_lines_and_follows_new_ones(tmp_path: Path) -> None:
    sup = Supervisor(tmp_path, {"web": program(workers=2)}).start()
    try:
        pids = [w["pid"] for w in sup.workers()]
        last = sup.ctl("tail", "-n", "1", "web")
        assert last.returncode == 0 and len(last.stdout.splitlines()) == 1, last
        assert last.stdout.startswith("web#1 worker ") and " pid " in last.stdout and "generation=1" in last.stdout
        both = sup.ctl("tail", "web").stdout
        assert all(f"pid {pid} stderr: demo pid={pid} generation=1" in both for pid in pids), both

        # Ctrl-C ends a follow: SIGINT at its default even where pytest runs with it ignored (a job
        # started with `&` by a non-interactive shell), which an exec would keep.
        follower = subprocess.Popen([str(BIN / "supervisorctl"), "-c", str(sup.config), "tail", "-n", "1", "-f",
                                     "web"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                    preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
        try:
            assert follower.stdout is not None
            # The last line comes in the same step as the follow begins: once it is read, the follow is on.
            assert follower.stdout.readline() == last.stdout
            os.kill(pids[0], signal.SIGKILL)  # its replacement writes its first line after the follow began
            line = follower.stdout.readline()
            replacement = wait_for("the replacement", lambda: [w["pid"] for w in sup.workers() if w["pid"] not in pids])
            pid = replacement[0]
            assert line.startswith(f"web#1 worker 0 pid {pid} stderr: demo pid={pid} generation=1"), line
        finally:
            follower.send_signal(signal.SIGINT)
            assert follower.wait(timeout=10) == 0
        assert sup.ctl("status").returncode == 0  # the follower's connection ended with it

        unknown = sup.ctl("tail", "nosuch")
        assert (unknown.returncode, unknown.stderr) == (1, "supervisorctl: tail failed: no program named 'nosuch'\n")
    finally:
        sup.kill()



def test_cryptography_is_loaded_only_once_a_program_has_tls(tmp_path: Path) -> None:
    """The master maps cryptography's library only when a `tls:` program is checked (at a reload here)."""
    sup = Supervisor(tmp_path, {"web": program(workers=1)}).start()
    try:
        assert sup.proc is not None
        maps = Path(f"/proc/{sup.proc.pid}/maps")
        assert "/cryptography/" not in maps.read_text()
        certs = tmp_path / "certs"
        certs.mkdir()
        write_cert(trustme.CA(), certs)
        sup.write({"web": program(workers=1), "secure": tls_program(certs, workers=1, listen=["127.0.0.1:8443"])})
        sup.reload()
        assert "/cryptography/" in maps.read_text()
    finally:
        sup.kill()


def imported(sup: Supervisor) -> set[str]:
    """The modules the master imported so far, as `python -X importtime` listed them in its log."""
    return {line.rpartition("|")[2].strip() for line in sup.log_text().splitlines() if line.startswith("import time:")}


def test_prometheus_client_and_cryptography_are_imported_only_for_what_uses_them(tmp_path: Path) -> None:
    """A master without `metrics:` and `tls:` never imports prometheus_client nor cryptography, through a
    status and a reload; one with `metrics:` imports prometheus_client (and not cryptography) for a scrape."""
    (tmp_path / "plain").mkdir()
    (tmp_path / "metrics").mkdir()
    plain = Supervisor(tmp_path / "plain", {"web": program(workers=1)})
    metered = Supervisor(tmp_path / "metrics", {"web": program(workers=1)})
    metered.top = {"metrics": {"listen": "127.0.0.1:9150"}}
    metered.write({"web": program(workers=1)})
    for sup in (plain, metered):
        sup.prefix = [sys.executable, "-X", "importtime"]  # the listing goes to the master's log (stderr)
    plain.start()
    try:
        assert plain.ctl("status").returncode == 0 and plain.reload().returncode == 0
        modules = imported(plain)
    finally:
        plain.kill()
    assert "supervisor.daemon.master" in modules  # the listing is there to look at
    assert not {m for m in modules if m.split(".")[0] in ("prometheus_client", "cryptography")}
    metered.start()
    try:
        with socket.create_connection(("127.0.0.1", 9150), timeout=10) as sock:
            sock.sendall(b"GET /metrics HTTP/1.1\r\nHost: test\r\n\r\n")
            assert sock.recv(100).startswith(b"HTTP/1.1 200")
        modules = imported(metered)
    finally:
        metered.kill()
    assert "prometheus_client" in modules and "cryptography" not in modules


# A worker that writes 1 KB stderr lines without pause (its readiness: alive for 0.2 s).
FLOOD = [sys.executable, "-S", "-c", "import sys\nwhile True: sys.stderr.write('x' * 1000 + '\\n')"]


def test_a_tail_follower_that_does_not_read_is_dropped_and_the_master_answers_on(tmp_path: Path) -> None:
    sup = Supervisor(tmp_path, {"flood": program(FLOOD, workers=1, ready="settle", settle=0.2)}).start()
    try:
        # A socket of its own (a small receive buffer, never read), the request in supervisorctl's framing.
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as follower:
            follower.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            follower.connect(str(sup.socket))
            follower.sendall(framing.encode({"command": "tail", "program": "flood", "lines": 0, "follow": True}))
            # Never read: what waits for it grows until supervisord gives up on it.
            dropped = wait_for("the follower dropped", lambda: sup.events("tail_follower_dropped"), timeout=30)
            assert dropped[0]["buffered"] <= output.FOLLOWER_BUFFER
            assert sup.status()["programs"][0]["state"] == "serving"
            assert len(sup.ctl("tail", "-n", "3", "flood").stdout.splitlines()) == 3
    finally:
        sup.kill()
