"""supervisor.install: a `supervisor` package shared with another distribution, told from pip's RECORD
files beside it (site folders made here, as pip lays them out)."""

from __future__ import annotations

from pathlib import Path

import pytest

from supervisor import __version__, install

OURS = ["supervisor/__init__.py", "supervisor/demo.py", "supervisor/daemon/main.py"]


def site(tmp_path: Path, **others: list[str]) -> Path:
    """A site folder with this distribution installed and the named others over it (files and RECORDs)."""
    for folder, files in {"reuseport_supervisor-0.1.0": OURS, **others}.items():
        for path in files:
            (tmp_path / path).parent.mkdir(parents=True, exist_ok=True)
            (tmp_path / path).write_text("")
        (tmp_path / f"{folder}.dist-info").mkdir()
        lines = [f"{path},sha256=x,1" for path in files] + [f"{folder}.dist-info/RECORD,,"]
        (tmp_path / f"{folder}.dist-info" / "RECORD").write_text("\n".join(lines) + "\n")
    return tmp_path


def test_installed_alone_it_is_fine(tmp_path: Path) -> None:
    """Other distributions beside it, and the __pycache__ folders Python writes itself, are no concern."""
    site(tmp_path, **{"pyyaml-6.0.2": ["yaml/__init__.py", "_yaml/__init__.py"]})
    (tmp_path / "supervisor" / "__pycache__").mkdir()
    assert install.problem(tmp_path) is None


def test_files_nobody_installed_in_the_package_are_named(tmp_path: Path) -> None:
    (site(tmp_path) / "supervisor" / "supervisord.py").write_text("")
    assert install.problem(tmp_path) == (
        f"{tmp_path}/supervisor holds 1 file that reuseport-supervisor 0.1.0 did not install "
        "(supervisor/supervisord.py among them): install reuseport-supervisor alone, in an environment of its own")


@pytest.mark.parametrize(("files", "count"), [(["supervisor/supervisord.py", "supervisor/__init__.py"], "2 files"),
                                              (["supervisor/supervisord.py"], "1 file")], ids=["shared", "own"])
def test_another_distribution_writing_into_the_package_is_named(tmp_path: Path, files: list[str], count: str) -> None:
    """Named with the first file both claim (the one that changed hands), else its first in the package."""
    why = install.problem(site(tmp_path, **{"supervisor-4.3.0": files}))
    assert why is not None and "\n" not in why
    assert why.startswith(f"supervisor 4.3.0 is installed in {tmp_path} too: it writes {count} into the "
                          f"`supervisor` package of reuseport-supervisor 0.1.0 ({files[-1]} among them)")
    assert why.endswith("uninstall both, then install reuseport-supervisor alone, in an environment of its own")


def test_files_taken_along_by_an_uninstall_are_named(tmp_path: Path) -> None:
    (site(tmp_path) / "supervisor" / "__init__.py").unlink()
    assert install.problem(tmp_path) == (
        f"reuseport-supervisor 0.1.0 misses 1 file in {tmp_path} (supervisor/__init__.py among them; an "
        "uninstall of another distribution that shared them takes them along): reinstall it with "
        "`pip install --force-reinstall reuseport-supervisor`")


def test_a_source_tree_or_an_editable_install_says_nothing(tmp_path: Path) -> None:
    """No dist-info of ours beside the package: nothing to compare with (the repository, `pip install -e`)."""
    (tmp_path / "supervisor").mkdir()
    (tmp_path / "supervisor" / "supervisord.py").write_text("")
    (tmp_path / "supervisor-4.3.0.dist-info").mkdir()
    assert install.problem(tmp_path) is None
    assert install.problem(tmp_path / "absent") is None
    assert install.problem() is None  # this test run's own package: the repository


def test_both_commands_name_this_project(capsys: pytest.CaptureFixture[str]) -> None:
    from supervisor.ctl.main import main as supervisorctl
    from supervisor.daemon.main import main as supervisord

    with pytest.raises(SystemExit) as stopped:
        supervisord(["--version"])
    assert stopped.value.code == 0
    assert supervisorctl(["--version"]) == 0
    assert capsys.readouterr().out == f"reuseport-supervisor {__version__}\n" * 2
