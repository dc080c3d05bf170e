"""Where supervisord and its programs are reached: a control socket at any depth, listen addresses by name."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
import yaml

from supervisor.config import schema, unixpath
from tests.harness import BIN, Supervisor, program, request

pytestmark = pytest.mark.usefixtures("netns")


def folder_of_length(tmp_path: Path, length: int) -> Path:
    """A folder under tmp_path whose path has `length` characters."""
    folder = tmp_path / ("d" * (length - len(str(tmp_path)) - 1))
    assert len(str(folder)) == length, f"tmp_path is too long already: {tmp_path}"
    folder.mkdir()
    return folder


def test_a_config_in_a_200_character_folder_starts_reloads_upgrades_and_answers(tmp_path: Path) -> None:
    """The default ./supervisor.sock there is 216 bytes, over the 107 an address holds."""
    sup = Supervisor(folder_of_length(tmp_path, 200), {"web": program(workers=1)})
    sup.config.write_text(yaml.safe_dump({"programs": {"web": program(workers=1)}}))  # control: the default
    assert len(os.fsencode(sup.socket)) == 216
    sup.start()
    try:
        assert request()[0] == 200
        sup.reload()
        assert sup.generation() == 2
        by_socket = subprocess.run([str(BIN / "supervisorctl"), "-s", str(sup.socket), "status"],
                                   capture_output=True, text=True, timeout=30)
        assert by_socket.returncode == 0 and "web" in by_socket.stdout, by_socket.stderr
        pid = sup.status()["pid"]
        upgraded = sup.ctl("upgrade")
        assert upgraded.returncode == 0, upgraded.stderr
        assert sup.status()["pid"] == pid and request()[0] == 200
        assert sup.stop() == 0
        assert not sup.socket.exists()
    finally:
        sup.kill()


def test_a_control_socket_path_of_100_bytes(tmp_path: Path) -> None:
    """Under 107 bytes, but its temporary name beside it (bound first, then renamed) used to be over."""
    sup = Supervisor(folder_of_length(tmp_path, 100 - len("/supervisor.sock")), {"web": program(workers=1)})
    assert len(os.fsencode(sup.socket)) == 100
    sup.start()
    try:
        assert sup.ctl("status").returncode == 0
    finally:
        sup.kill()


def test_an_impossible_socket_name_is_one_config_line(tmp_path: Path) -> None:
    """A name over 82 bytes in a folder too deep for the whole path: supervisord and supervisorctl both say so."""
    sup = Supervisor(folder_of_length(tmp_path, 100), {"web": program(workers=1)})
    name = "s" * (unixpath.MAX_NAME + 1)
    sup.config.write_text(f"control:\n  socket: ./{name}\n" + yaml.safe_dump({"programs": {"web": program()}}))
    assert sup.exit_status_of_refused_start() == 2
    lines = sup.log_text().strip().splitlines()
    expected = f"{sup.config}:2: control.socket: {sup.folder}/{name}: a unix socket's path holds 107 bytes"
    assert len(lines) == 1 and expected in lines[0], lines
    ctl = sup.ctl("status")
    assert ctl.returncode == 2 and ctl.stderr.count("\n") == 1 and expected in ctl.stderr, ctl.stderr


def test_listen_by_name_and_by_port_alone_serve(tmp_path: Path) -> None:
    """`localhost:8000` serves on every address /etc/hosts gives localhost (127.0.0.1, and ::1 where listed;
    loopback has both in the namespace), ":8001" on every IPv4 address; durations with units."""
    loopback = schema.hosts_file("localhost")
    web = program(listen=["localhost:8000", ":8001"], ready_timeout="10s", graceful_timeout="2s", stop_delay="100ms")
    sup = Supervisor(tmp_path, {"web": web}).start()
    try:
        for ip in loopback:
            assert request((ip, 8000))[0] == 200, ip
        assert request(("127.0.0.1", 8001))[0] == 200
        sup.reload()  # the name is looked up again, to the same addresses: a reload like any other
        assert [request((ip, 8000))[1]["generation"] for ip in loopback] == [2] * len(loopback)
    finally:
        sup.kill()
    print(f"\nlocalhost is {', '.join(loopback)} here")


@pytest.mark.parametrize("depth", [80, 200])  # the socket path: 101 bytes, 221
def test_a_control_socket_in_a_missing_folder_is_named_at_start(tmp_path: Path, depth: int) -> None:
    """Exit 1 with one line that says which socket and why (it used to be a bare "AF_UNIX path too long")."""
    sup = Supervisor(tmp_path, {"web": program(workers=1)})
    missing = folder_of_length(tmp_path, depth) / "gone"
    sup.config.write_text(f"control: {{socket: {missing}/supervisor.sock}}\n"
                          + yaml.safe_dump({"programs": {"web": program(workers=1)}}))
    assert sup.exit_status_of_refused_start() == 1
    assert [e["error"] for e in sup.events("startup_failed")] == [
        f"control socket {missing}/supervisor.sock: No such file or directory"]
