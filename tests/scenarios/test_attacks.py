"""The attacks of an attacker's and an operator's probe campaign (docs/operations.md, "Hardening"), each
with 64 connections in flight and a reload in the middle of it.

Every test shows the same four things: no connection of the load fails, the master answers `status`
within 100 ms all along (each call timed from a thread, through supervisorctl's own client code: the
95th percentile within 100 ms and none slower than 1.5 s on two shared cores), the reload works, and
afterwards the feature the attack aimed at still does its job.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import re
import signal
import subprocess
import time
from pathlib import Path

import psutil
import pytest
import trustme

from supervisor.daemon import control
from supervisor.daemon.endpoints import runtime_folder
from tests.harness import PYTHON, Supervisor, program, request, request_cert, wait_for, watching_status
from tests.load import Clients
from tests.scenarios.test_container import APPS, escaped, zombies
from tests.scenarios.test_metrics import get, with_metrics
from tests.scenarios.test_tls import client, tls_program, write_cert
from tests.scenarios.test_upgrade import installed, start

pytestmark = pytest.mark.usefixtures("netns")


def no_failures(*tallies: object) -> None:
    for tally in tallies:
        assert tally.ok > 100 and not tally.failures, tally.describe()  # type: ignore[attr-defined]


# -- 1. a crafted orphan environment ------------------------------------------------------------------

# A worker whose descendants leave it by a double fork (setsid) and exec themselves with LISTEN_PID set
# to 5,000 digits (int() refuses more than 4,300): one lives on, one exits after 0.3 s. They are marked
# `forged FOLDER` (argv[1]) in their command line.
CRAFTED = """
import os, sys
def escape(seconds):
    if os.fork() == 0:
        os.setsid()
        if os.fork() == 0:
            os.execve(sys.executable, [sys.executable, "-S", "-c", "import sys, time; time.sleep(float(sys.argv[3]))",
                                       "forged", sys.argv[1], seconds], dict(os.environ, LISTEN_PID="9" * 5000))
        os._exit(0)
    os.wait()
escape("600")
escape("0.3")
os.execvp(sys.executable, [sys.executable, "-m", "supervisor.demo"])
"""


def crafted(folder: Path) -> set[int]:
    """The live descendants with the crafted environment (host pids)."""
    found = set()
    for proc in psutil.process_iter(["cmdline", "status"]):
        cmdline = proc.info["cmdline"] or []
        if cmdline[-3:-1] == ["forged", str(folder)] and proc.info["status"] != psutil.STATUS_ZOMBIE:
            found.add(proc.pid)
    return found


def short_orphans(sup: Supervisor, folder: Path) -> set[int]:
    """The short-lived orphans the escaper workers now serving left (their `escaped-PID` files)."""
    return {int((folder / f"escaped-{w['pid']}").read_text().split()[1]) for w in sup.workers("web")}


def reaped(sup: Supervisor) -> set[int]:
    return {e["pid"] for e in sup.events("orphan_reaped")}


def test_a_crafted_orphan_environment(tmp_path: Path) -> None:
    """Orphans with LISTEN_PID of 5,000 digits, beside a worker's ordinary escapees; a `watch:` reload
    under 64 new and 64 kept-alive connections: orphans are still reaped, the escapees of a worker that
    went are killed, the crafted ones (no worker named) are kept until the stop; TERM ends supervisord with
    exit status 0 and nothing left behind."""
    programs = {"web": program([PYTHON, str(APPS / "escaper.py"), str(tmp_path)], graceful_timeout=3),
                "crafted": program([PYTHON, "-c", CRAFTED, str(tmp_path)], workers=1, listen=["127.0.0.1:8001"],
                                   graceful_timeout=3)}
    sup = Supervisor(tmp_path, programs)
    sup.top = {"watch": [str(sup.config)]}  # the reload: an edit of the config, seen by the timer the attack hit
    sup.write(programs)
    try:
        sup.start()
        assert sup.proc is not None
        with watching_status(sup) as watch:
            wait_for("the crafted orphans adopted", lambda: len(crafted(tmp_path)) == 1 and [
                e for e in sup.events("orphan_adopted") if " forged " in e["command"]])
            first = wait_for("a lingerer per worker", lambda: len(escaped(tmp_path)) == 2 and escaped(tmp_path))
            with Clients("127.0.0.1:8000", seconds=60) as new, \
                    Clients("127.0.0.1:8000", seconds=60, keep_alive=True) as kept:
                time.sleep(1.0)  # the load runs
                sup.write({**programs, "web": {**programs["web"], "graceful_timeout": 4}})
                wait_for("the watch: reload", lambda: sup.generation() == 2 and sup.serving(), timeout=10)
                time.sleep(0.5)  # and after it
                tallies = new.finish(), kept.finish()
            wait_for("generation 1's lingerers killed", lambda: not first & escaped(tmp_path), timeout=3 + 2)
            wait_for("generation 2's short orphans reaped", lambda: short_orphans(sup, tmp_path) <= reaped(sup))
            wait_for("no zombies", lambda: not zombies(sup.proc.pid if sup.proc else 0))
        summary = watch.check()
        no_failures(*tallies)
        killed = sup.events("orphan_killed")
        assert len(killed) == 2 and all("is gone" in e["reason"] for e in killed), killed
        # Adopted with no worker named (a short one may exit before the master looks: reaped unadopted).
        adopted = [e for e in sup.events("orphan_adopted") if " forged " in e["command"]]
        assert adopted and all(e["owner"] is None for e in adopted), adopted
        assert len(crafted(tmp_path)) == 2 and request()[0] == 200  # the long-lived one of each generation
        assert "Traceback" not in sup.log_text()

        assert sup.stop(signal.SIGTERM) == 0, sup.log_text()[-2000:]
        assert not escaped(tmp_path) and not crafted(tmp_path), "supervisord left descendants running"
        assert not sup.socket.exists() and not os.path.exists(runtime_folder(str(sup.socket)))
        print(f"{len(reaped(sup))} orphans reaped; {summary}")
    finally:
        sup.kill()
        for pid in escaped(tmp_path) | crafted(tmp_path):  # a failed test's: SIGKILL leaves them behind
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


# -- 2. certificates and watched files ----------------------------------------------------------------

SPARSE = 10 << 30  # bytes


def sparse(path: Path) -> None:
    """A 10 GB file of holes (it takes no space)."""
    with open(path, "wb") as f:
        f.truncate(SPARSE)


def watch_refusals(sup: Supervisor, count: int) -> list[str]:
    """The errors of the reloads `watch:` started and were refused, once there are `count` of them."""
    found = [e["error"] for e in sup.events("request_failed") if e["origin"] == "watch"]
    return found if len(found) == count else []


def test_certificates_that_would_block_or_flood_the_master(tmp_path: Path) -> None:
    """A watched `tls:` certificate becomes a FIFO, /dev/zero, a 10 GB sparse file: each is one `watch:`
    refusal and one `reload` refusal naming the config's line, the key and the file, at once, and the
    master's RSS stays flat. In the middle and at the end a good certificate: `watch:` reloads on that
    change and serves it, under 64 new connections and 16 kept-alive TLS ones; none fails."""
    ca = trustme.CA()
    certs = tmp_path / "certs"
    certs.mkdir()
    write_cert(ca, certs)
    ca.cert_pem.write_to_path(str(tmp_path / "ca.pem"))
    cert, key = certs / "cert.pem", certs / "key.pem"
    programs = {"web": program(), "secure": tls_program(certs, workers=1, listen=["127.0.0.1:8443"])}
    sup = Supervisor(tmp_path, programs)
    sup.top = {"watch": [str(cert), str(key)]}
    sup.write(programs)
    # The config's check of its `watch:` entries (the same file rules) names a file that is no regular
    # one first, as `watch[0]` at its line; a regular one too large to read is the certificate's refusal.
    watched = rf"{re.escape(str(sup.config))}:\d+: watch\[0\]"
    attacks = [
        ("fifo", lambda: os.mkfifo(cert), watched, "not a regular file (a FIFO)"),
        ("good", None, "", ""),
        ("zero", lambda: cert.symlink_to("/dev/zero"), watched, "not a regular file (a character device)"),
        ("sparse", lambda: sparse(cert), "secure: tls", f"larger than 1 MiB ({SPARSE} bytes): not read"),
        ("good", None, "", ""),
    ]
    try:
        sup.start()
        assert sup.proc is not None
        rss_before = psutil.Process(sup.proc.pid).memory_info().rss
        timings, served = [], []
        with watching_status(sup) as watch, \
                Clients("127.0.0.1:8000", seconds=60) as web, \
                Clients("127.0.0.1:8443", concurrency=16, seconds=60, tls_ca=str(tmp_path / "ca.pem"),
                        keep_alive=True) as secure:
            time.sleep(1.0)  # TLS answers
            for name, make, named, reason in attacks:
                cert.unlink()
                changed = time.monotonic()
                if make is None:  # a good certificate: the next change reloads
                    served.append(hashlib.sha256(bytes.fromhex(write_cert(ca, certs))).hexdigest())
                    wait_for("the watch: reload of a good certificate",
                             lambda: sup.generation("secure") == len(served) + 1, timeout=5)
                    assert request_cert(("127.0.0.1", 8443), tls=client(ca))[2] == served[-1]
                    timings.append(f"good: served after {time.monotonic() - changed:.1f} s")
                    continue
                make()
                expected = re.compile(rf"^{named}: {re.escape(f'{cert}: {reason}')}$")
                count = len(timings) - len(served) + 1
                refusals = wait_for(f"the watch: refusal of the {name}", functools.partial(watch_refusals, sup, count),
                                    timeout=5)
                assert expected.match(refusals[-1]), refusals
                seen, begun = time.monotonic() - changed, time.monotonic()
                refused = sup.ctl("reload")
                answered = time.monotonic() - begun
                assert refused.returncode == 1 and expected.match(refused.stderr.removeprefix(
                    "supervisorctl: reload failed: ").removesuffix("\n")), refused
                assert answered < 2, f"{name}: the reload answered after {answered:.1f} s"
                timings.append(f"{name}: refused by watch: after {seen:.1f} s, by reload in {answered:.2f} s")
            time.sleep(0.5)  # the load runs on after it
            tallies = web.finish(), secure.finish()
        summary = watch.check(rss_before=rss_before)
        no_failures(*tallies)
        assert all(tallies[1].certs[sha][2] >= 16 for sha in served), tallies[1].certs  # each one served
        assert sup.generation("web") == 3
        print("; ".join(timings) + f"; {summary}")
    finally:
        sup.kill()


# -- 3. the metrics port under slow clients -----------------------------------------------------------

# A neighbour keeps `argv[2]` connections to the metrics port open, sending nothing or half a request
# head, and opens a new one for each the server closes, for argv[3] seconds; then prints how many it
# opened in all. Its connections come from argv[4] addresses of its own, 127.0.0.2 and up.
SLOW = """
import selectors, socket, sys, time
host, port = sys.argv[1].rsplit(":", 1)
count, until, addresses = int(sys.argv[2]), time.monotonic() + float(sys.argv[3]), int(sys.argv[4])
selector, opened = selectors.DefaultSelector(), 0
def slow():
    global opened
    sock = socket.socket()
    sock.bind((f"127.0.0.{2 + opened % addresses}", 0))
    sock.setblocking(False)
    try:
        sock.connect((host, int(port)))
    except BlockingIOError:
        pass
    opened += 1
    selector.register(sock, selectors.EVENT_WRITE if opened % 2 else selectors.EVENT_READ)
for _ in range(count):
    slow()
while time.monotonic() < until:
    for key, events in selector.select(0.1):
        sock = key.fileobj
        if events & selectors.EVENT_WRITE:  # connected: half a head, and never the rest
            try:
                sock.send(b"GET /healthz HTTP/1.1\\r\\n")
            except OSError:
                pass
            selector.modify(sock, selectors.EVENT_READ)
            continue
        try:
            if sock.recv(4096):
                continue
        except OSError:
            pass
        selector.unregister(sock)  # closed by the server: open another
        sock.close()
        slow()
print(opened)
"""


@pytest.mark.parametrize("addresses", [
    1,  # a neighbour pod: one address
    30,  # more addresses than MAX_CLIENTS / MAX_PER_PEER: every slot taken, the oldest head-less one gives way
], ids=["one-address", "30-addresses"])
def test_healthz_under_a_thousand_slow_connections(tmp_path: Path, addresses: int) -> None:
    """A neighbour holds 1,000 slow connections to the metrics port and re-opens them as they are closed;
    a monitor asks /healthz every 0.2 s: every probe answered within 1 s, status within 100 ms, and a
    reload under 64 kept-alive connections in the middle loses none. From 30 addresses the neighbour
    takes every slot: the monitor, which probed before the attack (as a kubelet does from the pod's
    start), takes the slot of a connection that sent no request yet."""
    sup = with_metrics(Supervisor(tmp_path, {"web": program()})).start()
    neighbour = None
    assert get("/healthz") == (200, "ok\n")
    try:
        with watching_status(sup) as watch, Clients("127.0.0.1:8000", seconds=60, keep_alive=True) as load:
            neighbour = subprocess.Popen([PYTHON, "-S", "-c", SLOW, "127.0.0.1:9150", "1000", "5", str(addresses)],
                                         stdout=subprocess.PIPE, text=True)
            probes = []
            time.sleep(0.5)  # the neighbour's 1,000 are open
            for n in range(20):
                began = time.monotonic()
                assert get("/healthz") == (200, "ok\n")
                probes.append(time.monotonic() - began)
                if n == 8:
                    assert "reload done" in sup.reload().stdout
                time.sleep(max(0.0, began + 0.2 - time.monotonic()))
            assert get("/readyz")[0] == 200
            opened = int(neighbour.communicate(timeout=30)[0])
            tally = load.finish()
        summary = watch.check()
        no_failures(tally)
        assert max(probes) < 1.0, probes
        assert opened > 1000, f"the neighbour opened {opened}: none of its connections was closed"
        probes.sort()
        print(f"the neighbour opened {opened} connections; /healthz p50 {probes[len(probes) // 2] * 1000:.1f} ms, "
              f"max {probes[-1] * 1000:.1f} ms; {summary}")
    finally:
        sup.kill()
        if neighbour is not None and neighbour.poll() is None:
            neighbour.kill()
            neighbour.wait()


# -- 4. `tail -f` followers ---------------------------------------------------------------------------

# A worker that writes a stderr line every 5 ms (its readiness: alive for 0.2 s).
CHATTY = [PYTHON, "-S", "-c", "import sys, time\nwhile True:\n    sys.stderr.write('x' * 100 + '\\n')\n"
          "    sys.stderr.flush()\n    time.sleep(0.005)"]

# `argv[2]` followers of program argv[3], in supervisorctl's framing; every other one is read, the rest
# never. Runs until stdin closes; prints what each got: "follows" (lines read), or the refusal.
FOLLOWERS = """
import json, selectors, socket, sys
selector, answers = selectors.DefaultSelector(), []
request = json.dumps({"command": "tail", "program": sys.argv[3], "lines": 1, "follow": True}).encode() + b"\\n"
for n in range(int(sys.argv[2])):
    sock = socket.socket(socket.AF_UNIX)
    sock.connect(sys.argv[1])
    sock.sendall(request)
    stream = sock.makefile("rb")
    first = json.loads(stream.readline())  # the last line, in the same step as the follow begins
    answers.append({"follows": 1} if "line" in first else first)
    if "line" in first and n % 2:
        sock.setblocking(False)
        selector.register(sock, selectors.EVENT_READ, n)
    elif "line" not in first:
        sock.close()
    else:
        answers[-1]["held"] = sock  # not read
selector.register(sys.stdin, selectors.EVENT_READ, None)
print("ready", flush=True)
while True:
    for key, _ in selector.select():
        if key.data is None:
            for answer in answers:
                answer.pop("held", None)
            print(json.dumps(answers))
            sys.exit(0)
        data = key.fileobj.recv(65536)
        answers[key.data]["follows"] += data.count(b"\\n")
        if not data:
            selector.unregister(key.fileobj)
"""


def test_a_hundred_tail_followers(tmp_path: Path) -> None:
    """100 `tail -f` of a chatty program, half of them never read: MAX_FOLLOWERS follow, the rest are
    refused in one line; root's `status` is answered within 100 ms and `reload` works under 64 connections
    in flight; the followers that read go on getting lines after the reload."""
    sup = Supervisor(tmp_path, {"web": program(), "chatty": program(CHATTY, workers=1, listen=["127.0.0.1:8001"],
                                                                     ready="settle", settle=0.2)}).start()
    try:
        with watching_status(sup) as watch:
            followers = subprocess.Popen([PYTHON, "-S", "-c", FOLLOWERS, str(sup.socket), "100", "chatty"],
                                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
            assert followers.stdout is not None and followers.stdout.readline() == "ready\n"
            with Clients("127.0.0.1:8000", seconds=60) as new, \
                    Clients("127.0.0.1:8000", seconds=60, keep_alive=True) as kept:
                time.sleep(1.0)  # the load and the followers run
                assert sup.ctl("status").returncode == 0
                reloaded = sup.ctl("reload")
                time.sleep(1.0)  # and after it
                tallies = new.finish(), kept.finish()
            answers = json.loads(followers.communicate(timeout=30)[0])
        summary = watch.check()
        assert reloaded.returncode == 0 and "chatty: generation 2 ready" in reloaded.stdout, reloaded
        no_failures(*tallies)
        following = [a["follows"] for a in answers if "follows" in a]
        refused = [a for a in answers if "follows" not in a]
        assert len(following) == control.MAX_FOLLOWERS, answers
        assert refused == [{"ok": False, "error": f"too many tail -f followers ({control.MAX_FOLLOWERS} open); "
                                                  "stop one first"}] * (100 - control.MAX_FOLLOWERS)
        read = following[1::2]  # the odd ones were read
        assert min(read) > 200, read  # 2 s of 200 lines a second, across the reload
        assert "chatty#2" in sup.ctl("tail", "-n", "1", "chatty").stdout
        print(f"followers that read got {min(read)}-{max(read)} lines; {summary}")
    finally:
        sup.kill()


# -- 5. a release that fails while adopting -----------------------------------------------------------


# Where the fake broken release raises: in the adoption, once the new code serves the control socket; or
# in restoring the records, before it has taken the socket over.
BREAKAGES = {
    "adopt": "async def adopt(master: Handing, state: dict[str, Any]) -> None:\n",
    "restore": "def restored(state: dict[str, Any]) -> Restored:\n",
}


@pytest.mark.parametrize("where", BREAKAGES)
def test_a_broken_release_fails_while_adopting(tmp_path: Path, where: str) -> None:
    """New code that passes the upgrade check but raises while it takes the state over (a fake broken
    release), under 64 new and 64 kept-alive connections: the upgrade is answered with the reason,
    supervisord stays alive (same pid), the old workers serve on, 0 failed; status answered within 100 ms
    before it and, with the reason, after it; TERM ends it."""
    site = installed(tmp_path)
    sup = start(tmp_path, site)
    try:
        assert sup.proc is not None
        workers = sorted(w["pid"] for w in sup.workers())
        handover = site / "supervisor" / "daemon" / "handover.py"
        code = handover.read_text()
        assert BREAKAGES[where] in code
        broken = BREAKAGES[where] + "    raise RuntimeError('a broken release')\n"
        handover.write_text(code.replace(BREAKAGES[where], broken))
        with watching_status(sup) as watch, Clients("127.0.0.1:8000", seconds=60) as new, \
                Clients("127.0.0.1:8000", seconds=60, keep_alive=True) as kept:
            time.sleep(1.0)  # load and status before the upgrade
            began = time.monotonic()
            result = sup.ctl("upgrade")
            upgraded = time.monotonic()
            time.sleep(1.0)  # and after it
            tallies = new.finish(), kept.finish()
        assert result.returncode == 1, result
        assert "upgrade failed while the new code took over the state: RuntimeError: a broken release" \
            in result.stderr
        assert sup.proc.poll() is None and '"upgrade_adopt_failed"' in sup.log_text()
        no_failures(*tallies)
        assert set(tallies[0].pids) == set(tallies[1].pids) == set(workers)
        refusal = ("upgrade failed while the new code took over the state: RuntimeError: a broken release; the "
                   "workers serve on, but supervisord takes no requests until it is restarted")
        after = [call.error for call in watch.calls if call.started > upgraded]
        assert len(after) >= 5 and all(refusal in error for error in after), after[:3]
        summary = watch.check(excluding=[(began, upgraded)], refusal=refusal)
        status = sup.ctl("status")
        assert (status.returncode, status.stderr) == (1, f"supervisorctl: status failed: {refusal}\n"), status
        assert sup.stop(signal.SIGTERM) == 1
        print(f"upgrade answered in {upgraded - began:.2f} s; {summary}")
    finally:
        sup.kill()
