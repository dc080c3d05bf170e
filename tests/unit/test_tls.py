"""Certificate checks and the per-generation copies, on files made by a throwaway CA."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
import trustme

from supervisor.config import tls
from supervisor.config.schema import MigrateMode
from supervisor.model import preflight


def issue(ca: trustme.CA, folder: Path) -> tuple[str, str]:
    leaf = ca.issue_cert("localhost")
    leaf.cert_chain_pems[0].write_to_path(str(folder / "cert.pem"))
    for blob in leaf.cert_chain_pems[1:]:
        blob.write_to_path(str(folder / "cert.pem"), append=True)
    leaf.private_key_pem.write_to_path(str(folder / "key.pem"))
    return str(folder / "cert.pem"), str(folder / "key.pem")


def test_a_chain_loads_and_counts(tmp_path: Path) -> None:
    """Leaf first, then the intermediate: accepted, described by its leaf, chain 2."""
    cert, key = issue(trustme.CA().create_child_ca(), tmp_path)
    bundle = tls.load(cert, key)
    assert bundle.certificate.chain == 2 and bundle.certificate.sans == ("localhost",)
    assert bundle.cert_pem == Path(cert).read_bytes() and "key_pem" not in repr(bundle)


def test_install_writes_the_checked_bytes_privately(tmp_path: Path) -> None:
    """The copies are the bytes read at the check, whatever the files hold now; key 0400, folder 0700."""
    cert, key = issue(trustme.CA(), tmp_path)
    bundle = tls.load(cert, key)
    Path(cert).write_text("replaced after the check\n")
    copies = bundle.install(str(tmp_path / "gen"))
    assert [Path(p).read_bytes() for p in copies] == [bundle.cert_pem, bundle.key_pem]
    assert [stat.S_IMODE(Path(p).stat().st_mode) for p in (*copies, tmp_path / "gen")] == [0o444, 0o400, 0o700]
    with pytest.raises(FileExistsError):
        bundle.install(str(tmp_path / "gen"))


def test_migration_problem_is_found_without_touching_the_sysctl(tmp_path: Path) -> None:
    """Only `require` can be refused: no such sysctl is a problem; one already at 1 or writable is not."""
    missing, present = tmp_path / "missing", tmp_path / "present"
    problem = preflight.migration_problem(MigrateMode.REQUIRE, str(missing))
    assert problem is not None and "Linux 5.14 or newer" in problem
    assert preflight.migration_problem(MigrateMode.PREFER, str(missing)) is None
    present.write_text("0\n")
    assert preflight.migration_problem(MigrateMode.REQUIRE, str(present)) is None
    assert present.read_text() == "0\n"


@pytest.mark.parametrize(("make", "reason"), [
    ("fifo", "not a regular file (a FIFO)"),
    ("zero", "not a regular file (a character device)"),
    ("huge", "larger than 1 MiB (2097152 bytes): not read"),
    ("missing", "cannot read: No such file or directory"),
])
def test_certificate_files_are_read_by_the_rules_of_every_file(tmp_path: Path, make: str, reason: str) -> None:
    """A cert path that became a FIFO, a device, a huge file: one line naming it, at once (never a hang
    of the master's loop in open(), never a read without end)."""
    cert, key = issue(trustme.CA(), tmp_path)
    bad = str(tmp_path / "bad.pem")
    if make == "fifo":
        os.mkfifo(bad)
    elif make == "zero":
        bad = "/dev/zero"
    elif make == "huge":
        with open(bad, "wb") as f:
            f.truncate(2 << 20)  # sparse: costs no disk
    with pytest.raises(tls.TlsError) as cert_error:
        tls.load(bad, key)
    assert str(cert_error.value) == f"{bad}: {reason}"
    with pytest.raises(tls.TlsError) as key_error:
        tls.load(cert, bad)
    assert str(key_error.value) == f"{bad}: {reason}"
