"""Certificate rotation by reload: checked before the switch, no failed handshake during it."""

from __future__ import annotations

import datetime
import json
import re
import ssl
import sys
import time
from pathlib import Path

import pytest
import trustme

from tests.harness import Load, Supervisor, program, request_cert, supervisor, wait_for

pytestmark = pytest.mark.usefixtures("netns")
NOW = datetime.datetime.now(datetime.UTC)


@pytest.fixture
def ca() -> trustme.CA:
    return trustme.CA()


def write_cert(ca: trustme.CA, folder: Path, **validity: datetime.datetime) -> str:
    """Issue a localhost certificate and put it in place the way certbot does (a new file, renamed)."""
    leaf = ca.issue_cert("localhost", "127.0.0.1", **validity)
    for name, blob in (("cert.pem", leaf.cert_chain_pems), ("key.pem", [leaf.private_key_pem])):
        tmp = folder / f".{name}.new"
        tmp.write_bytes(b"".join(b.bytes() for b in blob))
        tmp.replace(folder / name)
    return ssl.PEM_cert_to_DER_cert(leaf.cert_chain_pems[0].bytes().decode()).hex()


def tls_program(folder: Path, **settings: object) -> dict[str, object]:
    return program(tls={"cert": str(folder / "cert.pem"), "key": str(folder / "key.pem")}, **settings)


def client(ca: trustme.CA) -> ssl.SSLContext:
    context = ssl.create_default_context()
    ca.configure_trust(context)
    return context


def test_reload_rotates_the_certificate_under_load(tmp_path: Path, ca: trustme.CA) -> None:
    """After the reload every new handshake presents the new certificate; none fails meanwhile."""
    write_cert(ca, tmp_path)
    with supervisor(tmp_path, {"web": tls_program(tmp_path)}) as sup, \
            Load(threads=3, seconds=30, tls=client(ca)) as load:
        old = sup.status()["programs"][0]["tls"]
        wait_for("TLS answers", lambda: load.total > 50)
        rotated = time.monotonic()
        write_cert(ca, tmp_path)
        sup.reload()
        switched = time.monotonic()
        new = sup.status()["programs"][0]["tls"]
        wait_for("answers after the switch", lambda: sum(t > switched for t, _ in load.certificates) > 100)
    assert load.failed == 0, (load.outcomes, load.errors)
    assert new["sha256"] != old["sha256"] and "localhost" in new["sans"] and "127.0.0.1" in new["sans"]
    after = {cert for started, cert in load.certificates if started > switched}
    before = {cert for started, cert in load.certificates if started < rotated}
    assert before == {old["sha256"]} and after == {new["sha256"]}


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
        if break_files == "mismatch":
            key = (tmp_path / "key.pem").read_bytes()
            write_cert(ca, tmp_path)
            (tmp_path / "key.pem").write_bytes(key)
        elif break_files == "expired":
            write_cert(ca, tmp_path, not_before=NOW - datetime.timedelta(days=30),
                       not_after=NOW - datetime.timedelta(days=1))
        elif break_files == "garbage":
            cert.write_text("not a certificate\n")
        else:
            cert.unlink()
        result = sup.ctl("reload")
        assert result.returncode == 1
        assert message in result.stderr and str(cert if break_files != "mismatch" else tmp_path / "key.pem") \
            in result.stderr, result.stderr
        assert len(result.stderr.strip().splitlines()) == 1
        assert sup.generation() == 1
        assert request_cert(tls=client(ca))[0] == 200


def test_expiry_warning_and_status(tmp_path: Path, ca: trustme.CA) -> None:
    """A certificate expiring within warn_days reloads with a warning; status shows subject, SANs, expiry."""
    write_cert(ca, tmp_path)
    with supervisor(tmp_path, {"web": tls_program(tmp_path)}) as sup:
        write_cert(ca, tmp_path, not_after=NOW + datetime.timedelta(days=5))
        result = sup.reload()
        assert re.search(r"warning: web: tls: .*cert.pem expires in [45]\.\d days", result.stdout), result.stdout
        table = sup.ctl("status").stdout
        data = json.loads(sup.ctl("status", "--json").stdout)["programs"][0]["tls"]
    assert "tls: OU=Testing cert" in table and "SANs localhost, 127.0.0.1, expires 20" in table
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
    cert, key = str(tmp_path / "cert.pem"), str(tmp_path / "key.pem")
    assert argv == ["--ssl-certfile", cert, f"--ssl-keyfile={key}", cert]


def test_placeholder_without_tls_is_a_config_error(tmp_path: Path) -> None:
    """A command that uses {tls.cert} without a tls section is refused at start with file and key."""
    sup = Supervisor(tmp_path, {"web": program(command=["x", "{tls.cert}"])})
    sup.start(wait=False)
    assert sup.proc is not None and sup.proc.wait(timeout=20) == 2
    assert "programs.web.command: uses {tls.cert} but programs.web.tls is not set" in sup.log_text()
