"""`watch:` reloads when a certificate changes the way Kubernetes changes a mounted Secret."""

from __future__ import annotations

import hashlib
import os
import shutil
import ssl
import time
from pathlib import Path

import pytest
import trustme

from tests.harness import Supervisor, program, request_cert, wait_for
from tests.load import Clients

pytestmark = pytest.mark.usefixtures("netns")


@pytest.fixture
def ca() -> trustme.CA:
    return trustme.CA()


def client(ca: trustme.CA) -> ssl.SSLContext:
    context = ssl.create_default_context()
    ca.configure_trust(context)
    return context


def publish(ca: trustme.CA, secret: Path, stamp: str, key_of: trustme.LeafCert | None = None) -> str:
    """Write a Secret's new version as the kubelet does: a new `..<stamp>` folder, an atomic swap of
    the `..data` link, the old version removed; tls.crt and tls.key link through `..data`. `key_of`:
    put another certificate's key in (a broken Secret). Returns the new certificate's SHA-256."""
    leaf = ca.issue_cert("localhost", "127.0.0.1")
    version = secret / f"..{stamp}"
    version.mkdir()
    (version / "tls.crt").write_bytes(b"".join(b.bytes() for b in leaf.cert_chain_pems))
    (version / "tls.key").write_bytes((key_of or leaf).private_key_pem.bytes())
    old = os.readlink(secret / "..data") if (secret / "..data").is_symlink() else None
    (secret / "..data_tmp").symlink_to(version.name)
    os.replace(secret / "..data_tmp", secret / "..data")
    for name in ("tls.crt", "tls.key"):
        if not (secret / name).is_symlink():
            (secret / name).symlink_to(f"..data/{name}")
    if old:
        shutil.rmtree(secret / old)
    return hashlib.sha256(ssl.PEM_cert_to_DER_cert(leaf.cert_chain_pems[0].bytes().decode())).hexdigest()


def watching_supervisor(tmp_path: Path, ca: trustme.CA) -> Supervisor:
    secret = tmp_path / "secret"
    secret.mkdir()
    publish(ca, secret, "2026_12_01_00_00_00.1")
    programs = {"web": program(tls={"cert": str(secret / "tls.crt"), "key": str(secret / "tls.key")})}
    sup = Supervisor(tmp_path, programs)
    sup.top = {"watch": [str(secret / "tls.crt"), str(secret / "tls.key")]}
    sup.write(programs)
    return sup


def test_each_swapped_secret_is_one_reload_with_no_failed_connection(tmp_path: Path, ca: trustme.CA) -> None:
    """Three swaps, three reloads, under 64 TLS connections in flight (the load notes the certificate each
    handshake got): no connection fails, and the new certificate is served."""
    sup = watching_supervisor(tmp_path, ca)
    ca.cert_pem.write_to_path(str(tmp_path / "ca.pem"))
    try:
        sup.start()
        with Clients("127.0.0.1:8000", concurrency=64, seconds=60, tls_ca=str(tmp_path / "ca.pem")) as clients:
            time.sleep(1.0)  # TLS answers
            certificates: list[str] = []
            for generation in (2, 3, 4):
                new = publish(ca, tmp_path / "secret", f"2026_12_02_00_00_00.{generation}")

                def swapped(g: int = generation) -> bool:
                    return sup.generation() == g

                wait_for("the reload the swap started", swapped, timeout=10)
                assert sup.status()["programs"][0]["tls"]["sha256"] == new
                served = time.monotonic()
                certificates.append(new)
                time.sleep(1.0)  # answers with the new certificate
            time.sleep(2.5)  # more than two looks: no reload comes without a change
            tally = clients.finish()
        assert sup.generation() == 4 and len(sup.events("watch_changed")) == 3, sup.events("watch_changed")
        assert tally.connections > 1000 and not tally.failures, tally.describe()
        assert all(tally.certs.get(cert, [0, 0, 0])[2] > 50 for cert in certificates), tally.certs  # each one served
        assert {cert for cert, (_first, last, _n) in tally.certs.items() if last > served} == {new}
    finally:
        sup.kill()


def test_an_edited_config_in_the_watch_list_is_reloaded(tmp_path: Path) -> None:
    """`watch:` may list the config itself: an edit is a reload, as `supervisorctl reload` would do."""
    sup = Supervisor(tmp_path, {"web": program()})
    sup.top = {"watch": [str(sup.config)]}
    sup.write({"web": program()})
    try:
        sup.start()
        sup.write({"web": program(workers=3)})
        wait_for("the edit reloaded", lambda: sup.generation() == 2 and sup.serving(), timeout=10)
        assert len(sup.workers()) == 3 and len(sup.events("watch_changed")) == 1
    finally:
        sup.kill()


def test_a_broken_secret_is_refused_once_and_the_next_change_reloads(tmp_path: Path, ca: trustme.CA) -> None:
    sup = watching_supervisor(tmp_path, ca)
    try:
        sup.start()
        old = sup.status()["programs"][0]["tls"]["sha256"]
        publish(ca, tmp_path / "secret", "2026_12_02_00_00_00.2", key_of=ca.issue_cert("other.example"))
        refused = wait_for("the refusal", lambda: [e for e in sup.events("request_failed") if e["origin"] == "watch"])
        assert "the key does not match the certificate" in refused[0]["error"], refused
        time.sleep(2.5)  # more than two looks: it is not retried in a loop
        assert len([e for e in sup.events("request_failed") if e["origin"] == "watch"]) == 1
        assert sup.generation() == 1 and request_cert(tls=client(ca))[2] == old
        new = publish(ca, tmp_path / "secret", "2026_12_02_00_00_00.3")
        wait_for("the reload the next change started", lambda: sup.generation() == 2, timeout=10)
        assert request_cert(tls=client(ca))[2] == new
    finally:
        sup.kill()
