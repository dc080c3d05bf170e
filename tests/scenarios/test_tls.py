"""Certificate rotation by reload: checked before the switch, no failed handshake during it."""

from __future__ import annotations

import datetime
import json
import os
import re
import signal
import ssl
import stat
import sys
import time
from pathlib import Path
from typing import Any

import psutil
import pytest
import trustme

from tests.harness import Supervisor, program, request_cert, supervisor, wait_for
from tests.load import Clients

pytestmark = pytest.mark.usefixtures("netns")
NOW = datetime.datetime.now(datetime.UTC)


@pytest.fixture
def ca() -> trustme.CA:
    return trustme.CA()


def write_cert(ca: trustme.CA, folder: Path, not_before: datetime.datetime | None = None,
               not_after: datetime.datetime | None = None) -> str:
    """Issue a localhost certificate and put it in place the way certbot does (a new file, renamed)."""
    leaf = ca.issue_cert("localhost", "127.0.0.1", not_before=not_before, not_after=not_after)
    for name, blob in (("cert.pem", leaf.cert_chain_pems), ("key.pem", [leaf.private_key_pem])):
        tmp = folder / f".{name}.new"
        tmp.write_bytes(b"".join(b.bytes() for b in blob))
        tmp.replace(folder / name)
    return ssl.PEM_cert_to_DER_cert(leaf.cert_chain_pems[0].bytes().decode()).hex()


def break_certificate(ca: trustme.CA, folder: Path, how: str) -> None:
    """Make the files in `folder` unusable: a key of another certificate, expired, garbage or missing."""
    cert = folder / "cert.pem"
    if how == "mismatch":
        key = (folder / "key.pem").read_bytes()
        write_cert(ca, folder)
        (folder / "key.pem").write_bytes(key)
    elif how == "expired":  # the demo would serve it: only the check can refuse it
        write_cert(ca, folder, not_before=NOW - datetime.timedelta(days=30), not_after=NOW - datetime.timedelta(days=1))
    elif how == "garbage":
        cert.write_text("not a certificate\n")
    else:
        cert.unlink()


def tls_program(folder: Path, **settings: Any) -> dict[str, Any]:
    return program(tls={"cert": str(folder / "cert.pem"), "key": str(folder / "key.pem")}, **settings)


def client(ca: trustme.CA) -> ssl.SSLContext:
    context = ssl.create_default_context()
    ca.configure_trust(context)
    return context


def test_reload_rotates_the_certificate_under_load(tmp_path: Path, ca: trustme.CA) -> None:
    """After the reload every new handshake presents the new certificate; none fails meanwhile."""
    write_cert(ca, tmp_path)
    ca.cert_pem.write_to_path(str(tmp_path / "ca.pem"))
    with supervisor(tmp_path, {"web": tls_program(tmp_path)}) as sup, \
            Clients("127.0.0.1:8000", concurrency=8, tls_ca=str(tmp_path / "ca.pem")) as load:
        old = sup.status()["programs"][0]["tls"]
        time.sleep(1.0)  # TLS answers
        rotated = time.monotonic()
        write_cert(ca, tmp_path)
        sup.reload()
        switched = time.monotonic()
        new = sup.status()["programs"][0]["tls"]
        time.sleep(1.5)  # answers after the switch
        tally = load.finish()
    assert not tally.failures, tally.describe()
    assert new["sha256"] != old["sha256"] and "localhost" in new["sans"] and "127.0.0.1" in new["sans"]
    # Each certificate with the first and last time a connection that saw it started.
    before = {cert for cert, (first, _last, _n) in tally.certs.items() if first < rotated}
    after = {cert for cert, (_first, last, _n) in tally.certs.items() if last > switched}
    assert before == {old["sha256"]} and after == {new["sha256"]}
    assert tally.certs[new["sha256"]][2] > 100 and tally.certs[old["sha256"]][2] > 50, tally.certs


@pytest.mark.parametrize(("break_files", "message"), [
    ("mismatch", "the key does not match the certificate"),
    ("expired", "expired on"),
    ("garbage", "not a PEM certificate"),
    ("missing", "cannot read: No such file or directory"),
])
def test_unusable_certificate_refuses_the_reload(tmp_path: Path, ca: trustme.CA, break_files: str,
                                                 message: str) -> None:
    """One clear line, exit 1, and the serving generation (with its certificate) serves on."""
    write_cert(ca, tmp_path)
    with supervisor(tmp_path, {"web": tls_program(tmp_path)}) as sup:
        cert = tmp_path / "cert.pem"
        break_certificate(ca, tmp_path, break_files)
        result = sup.ctl("reload")
        assert result.returncode == 1
        assert message in result.stderr and str(cert if break_files != "mismatch" else tmp_path / "key.pem") \
            in result.stderr, result.stderr
        assert len(result.stderr.strip().splitlines()) == 1
        assert sup.generation() == 1
        assert request_cert(tls=client(ca))[0] == 200


@pytest.mark.parametrize(("break_files", "message"), [
    ("mismatch", "the key does not match the certificate"),
    ("expired", "expired on"),
])
def test_start_checks_the_certificate_like_a_reload(tmp_path: Path, ca: trustme.CA, break_files: str,
                                                    message: str) -> None:
    """`start` of a stopped program reads and checks the files anew: refused in one line, nothing changes."""
    write_cert(ca, tmp_path)
    with supervisor(tmp_path, {"web": tls_program(tmp_path)}) as sup:
        assert sup.ctl("stop", "web").returncode == 0
        before = sup.status()["programs"]
        break_certificate(ca, tmp_path, break_files)
        result = sup.ctl("start", "web")
        assert result.returncode == 1 and result.stdout == "", result.stdout
        assert message in result.stderr and len(result.stderr.strip().splitlines()) == 1, result.stderr
        assert sup.status()["programs"] == before and before[0]["state"] == "stopped"
        write_cert(ca, tmp_path)
        assert sup.ctl("start", "web").returncode == 0
        assert sup.generation() == 2  # the refused start used no generation number
        assert request_cert(tls=client(ca))[2] == sup.status()["programs"][0]["tls"]["sha256"]


def serve_until(sup: Supervisor, context: ssl.SSLContext, pids: set[int]) -> set[str]:
    """Certificates presented by the demo until every worker in `pids` has answered at least once."""
    seen: dict[int, str] = {}

    def all_answered() -> bool:
        _code, body, cert = request_cert(tls=context)
        seen[body["pid"]] = cert
        return pids <= seen.keys()
    wait_for(f"answers from workers {sorted(pids)}", all_answered, timeout=20, interval=0)
    return set(seen.values())


@pytest.mark.parametrize("how", ["crash", "scale", "recycle"])
def test_workers_started_between_reloads_keep_the_checked_certificate(tmp_path: Path, ca: trustme.CA,
                                                                       how: str) -> None:
    """A new certificate on disk is not served before a reload, not even by a worker started since."""
    write_cert(ca, tmp_path)
    settings: dict[str, object] = {"workers": 1, "max_age": 2} if how == "recycle" else {"workers": 1}
    with supervisor(tmp_path, {"web": tls_program(tmp_path, **settings)}) as sup:
        checked = sup.status()["programs"][0]["tls"]["sha256"]
        first = sup.workers()[0]["pid"]
        write_cert(ca, tmp_path)  # renewed on disk, no reload yet
        if how == "crash":
            os.kill(first, signal.SIGKILL)
        elif how == "scale":
            assert sup.ctl("scale", "web", "3").returncode == 0
        wait_for("workers started after the renewal", lambda: sup.serving() and any(
            w["pid"] != first and w["state"] == "ready" for w in sup.workers()), timeout=20)
        started = {w["pid"] for w in sup.workers() if w["pid"] != first and w["state"] == "ready"}
        assert serve_until(sup, client(ca), started) == {checked}
        assert sup.status()["programs"][0]["tls"]["sha256"] == checked
        sup.reload()
        renewed = sup.status()["programs"][0]["tls"]["sha256"]
        assert renewed != checked
        assert serve_until(sup, client(ca), {w["pid"] for w in sup.workers() if w["generation"] == 2}) == {renewed}


def test_a_copy_that_cannot_be_written_rolls_the_reload_back(tmp_path: Path, ca: trustme.CA) -> None:
    """Writing the new generation's copy fails (here: its folder is already taken): the reload is
    refused in one line naming the cause, generation 1 serves on, and the next reload works."""
    write_cert(ca, tmp_path)
    with supervisor(tmp_path, {"web": tls_program(tmp_path, workers=1)}) as sup:
        pid = sup.workers()[0]["pid"]
        runtime = Path(psutil.Process(pid).environ()["SUPERVISOR_TLS_CERT"]).parent.parent
        (runtime / "tls.2.web").mkdir()
        result = sup.ctl("reload")
        assert result.returncode == 1 and "cannot copy the certificate and key" in result.stderr, result.stderr
        assert "File exists" in result.stderr and len(result.stderr.strip().splitlines()) == 1, result.stderr
        assert [w["pid"] for w in sup.workers()] == [pid] and sup.serving()
        code, _, cert = request_cert(tls=client(ca))
        assert code == 200 and cert == sup.status()["programs"][0]["tls"]["sha256"]
        sup.reload()
        assert sup.generation() == 3 and request_cert(tls=client(ca))[0] == 200


def test_unprivileged_workers_read_a_private_copy(tmp_path: Path, ca: trustme.CA) -> None:
    """Workers run as nobody read the generation's copy (key 0400, theirs), gone once the generation is."""
    write_cert(ca, tmp_path)
    tmp_path.chmod(0o700)  # the original files are out of nobody's reach
    with supervisor(tmp_path, {"web": tls_program(tmp_path, user="nobody", cwd="/", workers=1)}) as sup:
        pid = sup.workers()[0]["pid"]
        key = Path(psutil.Process(pid).environ()["SUPERVISOR_TLS_KEY"])
        info = key.stat()
        assert key.read_bytes() == (tmp_path / "key.pem").read_bytes() and tmp_path not in key.parents
        assert stat.S_IMODE(info.st_mode) == 0o400 and info.st_uid == psutil.Process(pid).uids().real
        folder = key.parent.stat()  # the master's: the workers reach the files but cannot replace them
        assert (stat.S_IMODE(folder.st_mode), folder.st_uid) == (0o711, 0)
        assert request_cert(tls=client(ca))[0] == 200
        sup.reload()
        wait_for("the old worker to exit", lambda: not psutil.pid_exists(pid))
        wait_for("its copy to go", lambda: not key.parent.exists())
        assert request_cert(tls=client(ca))[0] == 200


def test_a_chain_with_an_intermediate_verifies_against_the_root(tmp_path: Path, ca: trustme.CA) -> None:
    """Leaf + intermediate in the cert file passes the check; a client trusting only the root verifies it."""
    write_cert(ca.create_child_ca(), tmp_path)
    assert (tmp_path / "cert.pem").read_text().count("BEGIN CERTIFICATE") == 2
    with supervisor(tmp_path, {"web": tls_program(tmp_path)}) as sup:
        served = sup.status()["programs"][0]["tls"]
        code, _body, cert = request_cert(tls=client(ca))
    assert served["chain"] == 2 and code == 200 and cert == served["sha256"]


def test_expiry_warning_and_status(tmp_path: Path, ca: trustme.CA) -> None:
    """A certificate expiring within warn_days reloads with a warning; status shows subject, SANs, expiry."""
    write_cert(ca, tmp_path)
    with supervisor(tmp_path, {"web": tls_program(tmp_path)}) as sup:
        write_cert(ca, tmp_path, not_after=NOW + datetime.timedelta(days=5))
        result = sup.reload()
        assert re.search(r"warning: web: tls: .*cert.pem expires in [45]\.\d days", result.stdout), result.stdout
        table = sup.ctl("status").stdout
        data = json.loads(sup.ctl("status", "--json").stdout)["programs"][0]["tls"]
    assert "web: tls OU=Testing cert" in table and "SANs localhost, 127.0.0.1, expires 20" in table
    assert 4.8 < data["days_left"] <= 5


def test_tls_placeholders_reach_the_command(tmp_path: Path, ca: trustme.CA) -> None:
    """{tls.cert} and {tls.key} in the command become the paths (for uvicorn --ssl-certfile ...)."""
    write_cert(ca, tmp_path)
    seen = tmp_path / "argv.json"
    dump = [sys.executable, "-c", (
        "import json, os, socket, sys, signal\n"
        f"open({str(seen)!r}, 'w').write(json.dumps(sys.argv[1:] + [os.environ['SUPERVISOR_TLS_CERT']]))\n"
        "socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM).sendto(b'READY=1', os.environ['NOTIFY_SOCKET'])\n"
        "signal.pause()\n"), "--ssl-certfile", "{tls.cert}", "--ssl-keyfile={tls.key}"]
    with supervisor(tmp_path, {"web": tls_program(tmp_path, command=dump, workers=1)}):
        argv = json.loads(seen.read_text())
    cert, key = argv[1], argv[2].removeprefix("--ssl-keyfile=")
    assert argv == ["--ssl-certfile", cert, f"--ssl-keyfile={key}", cert]
    # The generation's copies of the checked files (test_unprivileged_workers_read_a_private_copy).
    assert Path(key).parent == Path(cert).parent != tmp_path


def test_placeholder_without_tls_is_a_config_error(tmp_path: Path) -> None:
    """A command that uses {tls.cert} without a tls section is refused at start with file and key."""
    sup = Supervisor(tmp_path, {"web": program(command=["x", "{tls.cert}"])})
    assert sup.exit_status_of_refused_start() == 2
    assert "programs.web.command: uses {tls.cert} but programs.web.tls is not set" in sup.log_text()
