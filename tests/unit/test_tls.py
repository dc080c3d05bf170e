"""Certificate checks and the per-generation copies, on files made by a throwaway CA."""

from __future__ import annotations

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
