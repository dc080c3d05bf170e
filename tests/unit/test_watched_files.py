"""`watch:` files: what counts as a change, and when the reload it asks for is due."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from supervisor.config.schema import parse
from supervisor.errors import ConfigError
from supervisor.system import watched_files
from supervisor.system.watched_files import Files


def swap_data(folder: Path, stamp: str, content: str) -> None:
    """Publish a new version as the kubelet does: a new timestamped folder, then an atomic swap of `..data`."""
    version = folder / f"..{stamp}"
    version.mkdir()
    (version / "tls.crt").write_text(content)
    (folder / "..data.tmp").symlink_to(version.name)
    os.replace(folder / "..data.tmp", folder / "..data")
    if not (folder / "tls.crt").is_symlink():
        (folder / "tls.crt").symlink_to("..data/tls.crt")


def test_a_change_is_due_after_one_quiet_look(tmp_path: Path) -> None:
    path = tmp_path / "cert.pem"
    path.write_text("one")
    files = Files([str(path)])
    assert files.check() is None
    path.write_text("two")
    assert files.check() is None  # changed: wait for a quiet look
    assert files.check() == [str(path)]
    assert files.check() is None  # seen: no second reload


def test_changes_in_a_row_are_one_reload(tmp_path: Path) -> None:
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert.write_text("c1")
    key.write_text("k1")
    files = Files([str(cert), str(key)])
    cert.write_text("c2")
    assert files.check() is None
    key.write_text("k2")
    assert files.check() is None
    assert files.check() == [str(cert), str(key)]


def test_files_that_never_rest_are_reloaded_after_a_while(tmp_path: Path) -> None:
    path = tmp_path / "log.txt"
    path.write_text("0")
    files = Files([str(path)])
    due = []
    for i in range(1, watched_files.MAX_WAIT + 1):
        path.write_text(str(i))
        due.append(files.check())
    assert due[:-1] == [None] * (watched_files.MAX_WAIT - 1) and due[-1] == [str(path)]


def test_touch_is_not_a_change(tmp_path: Path) -> None:
    path = tmp_path / "cert.pem"
    path.write_text("same")
    files = Files([str(path)])
    path.write_text("same")
    os.utime(path, ns=(1, 1))
    assert files.check() is None and files.check() is None


def test_a_kubernetes_secret_swap_is_a_change(tmp_path: Path) -> None:
    swap_data(tmp_path, "2026_12_01", "old")
    files = Files([str(tmp_path / "tls.crt")])
    swap_data(tmp_path, "2026_12_02", "new")
    assert files.check() is None and files.check() == [str(tmp_path / "tls.crt")]


def test_a_fifo_or_a_missing_file_never_blocks(tmp_path: Path) -> None:
    """A FIFO is never opened (it would block the master's loop until a writer comes)."""
    path = tmp_path / "cert.pem"
    path.write_text("file")
    files = Files([str(path)])
    path.unlink()
    os.mkfifo(path)
    assert files.check() is None and files.check() == [str(path)]
    path.unlink()
    assert files.check() is None and files.check() == [str(path)]


def test_the_list_follows_the_config(tmp_path: Path) -> None:
    one, two = tmp_path / "one", tmp_path / "two"
    one.write_text("1")
    two.write_text("2")
    files = Files([str(one)])
    files.follow([str(one), str(two)])
    two.write_text("2b")
    assert files.check() is None and files.check() == [str(two)]
    files.follow([str(one)])
    assert files.seen.keys() == {str(one)}


def config_with(watch: str) -> str:
    return f"programs:\n  web:\n    command: demo\n    listen: 127.0.0.1:8000\nwatch: {watch}\n"


def test_watch_paths_are_resolved_and_checked(tmp_path: Path) -> None:
    (tmp_path / "cert.pem").write_text("x")
    config = parse(config_with("[cert.pem, cert.pem]"), str(tmp_path / "s.yaml"))
    assert config.watch == (str(tmp_path / "cert.pem"),)
    assert parse(config_with("cert.pem"), str(tmp_path / "s.yaml")).watch == (str(tmp_path / "cert.pem"),)


@pytest.mark.parametrize(("value", "problem"), [
    ("[missing.pem]", "s.yaml:5: watch[0]: {folder}/missing.pem: No such file or directory"),
    ("[cert.pem, fifo]", "s.yaml:5: watch[1]: {folder}/fifo: not a regular file (a FIFO)"),
    ("{a: 1}", "s.yaml:5: watch: expected a list, got a mapping"),
    ("[3]", "s.yaml:5: watch[0]: expected a non-empty string, got 3"),
])
def test_a_wrong_watch_entry_is_one_line(tmp_path: Path, value: str, problem: str) -> None:
    (tmp_path / "cert.pem").write_text("x")
    os.mkfifo(tmp_path / "fifo")
    with pytest.raises(ConfigError) as error:
        parse(config_with(value), str(tmp_path / "s.yaml"))
    assert str(error.value).endswith(problem.format(folder=tmp_path)), str(error.value)
