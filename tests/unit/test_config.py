"""The config file: every value validated, every error one line with file, line and key."""

from __future__ import annotations

import signal
import socket
from pathlib import Path

import pytest

from supervisor.config import schema
from supervisor.config.schema import MigrateMode, ReadyMode
from supervisor.errors import ConfigError

ROOT = Path(__file__).resolve().parents[2]
MINIMAL = "programs:\n  web:\n    command: [app]\n    listen: ['127.0.0.1:8000']\n"


def error(text: str, path: str = "conf.yaml") -> str:
    with pytest.raises(ConfigError) as info:
        schema.parse(text, path)
    return str(info.value)


class TestValidConfig:
    def test_every_key(self, tmp_path: Path) -> None:
        """A config using every setting loads into frozen values, relative paths resolved."""
        path = tmp_path / "sup.yaml"
        path.write_text(
            "control: {socket: ./run/s.sock, mode: '0660'}\n"
            "migrate: prefer\n"
            "programs:\n"
            "  web:\n"
            "    command: uvicorn app:app --fd 3\n"
            "    workers: 3\n"
            "    listen: ['127.0.0.1:8000', '[::1]:8000']\n"
            "    ready_timeout: 2.5\n"
            "    graceful_timeout: 0\n"
            "    stop_delay: 0\n"
            "    backlog: 512\n"
            "    stop_signal: quit\n"
            "    env: {PORT: 8000, NAME: web}\n"
            "    cwd: app\n"
            "    tls: {cert: c.pem, key: k.pem, warn_days: 10}\n"
            "    user: nobody\n"
            "    umask: '027'\n"
            "    ready: accepting\n"
            "    settle: 0.5\n"
            "    crash_limit: 3\n"
            "    crash_window: 30\n"
            "    max_rss: 1.5G\n"
            "    max_age: 3600\n")
        cfg = schema.load(path)
        web = cfg.program("web")
        assert cfg.control.socket == str(tmp_path / "run" / "s.sock") and cfg.control.mode == 0o660
        assert cfg.migrate is MigrateMode.PREFER
        assert web.command == ("uvicorn", "app:app", "--fd", "3") and web.workers == 3
        assert [str(a) for a in web.listen] == ["127.0.0.1:8000", "[::1]:8000"]
        assert web.listen[1].family == socket.AF_INET6 and web.listen[1].sockaddr == ("::1", 8000)
        assert web.stop_delay == 0.0
        assert web.stop_signal is signal.SIGQUIT and web.env == (("NAME", "web"), ("PORT", "8000"))
        assert web.cwd == str(tmp_path / "app") and web.tls is not None and web.tls.key == str(tmp_path / "k.pem")
        assert web.umask == 0o027 and web.ready is ReadyMode.ACCEPTING and web.max_rss == 3 * 2**29

    def test_defaults(self) -> None:
        """Unset keys take the documented defaults; the socket sits beside the file."""
        cfg = schema.parse(MINIMAL, "/etc/s/conf.yaml")
        web = cfg.programs[0]
        assert cfg.control.socket == "/etc/s/supervisor.sock" and cfg.control.mode == 0o600
        assert cfg.migrate is MigrateMode.REQUIRE
        assert (web.workers, web.ready_timeout, web.graceful_timeout, web.backlog) == (1, 10.0, 30.0, 1024)
        assert web.stop_signal is signal.SIGTERM and web.ready is ReadyMode.NOTIFY and web.tls is None
        assert web.stop_delay == 0.5


class TestExample:
    def test_the_shipped_example_is_what_the_readme_says(self) -> None:
        """config/example.yaml (what `make run` starts): the demo, 2 workers on 127.0.0.1:8000, its socket beside it."""
        path = ROOT / "config" / "example.yaml"
        cfg = schema.load(path)
        [web] = cfg.programs
        assert web.name == "web" and web.command == ("python", "-m", "supervisor.demo")
        assert web.workers == 2 and [str(a) for a in web.listen] == ["127.0.0.1:8000"]
        assert cfg.control.socket == str(ROOT / "config" / "supervisor.sock") and cfg.control.mode == 0o600
        assert schema.control_socket(path) == cfg.control.socket

    def test_the_container_config_serves_on_every_interface(self) -> None:
        """config/container.yaml (the Dockerfile's): the demo on 0.0.0.0:8000, socket in /run/reuseport-supervisor,
        metrics on 9150 (the image's HEALTHCHECK asks its /healthz)."""
        cfg = schema.load(ROOT / "config" / "container.yaml")
        [web] = cfg.programs
        assert [str(a) for a in web.listen] == ["0.0.0.0:8000"] and cfg.migrate is MigrateMode.PREFER
        assert cfg.control.socket == "/run/reuseport-supervisor/supervisor.sock"
        assert cfg.metrics is not None and str(cfg.metrics.listen) == "0.0.0.0:9150"


class TestErrors:
    @pytest.mark.parametrize(("change", "expected"), [
        ("    workers: two\n", 'conf.yaml:5: programs.web.workers: expected an integer, got "two"'),
        ("    workers: true\n", "conf.yaml:5: programs.web.workers: expected an integer, got a boolean (true)"),
        ("    workers: 0\n", "conf.yaml:5: programs.web.workers: expected an integer from 1 to 4096, got 0"),
        ("    wrokers: 2\n", "conf.yaml:5: programs.web.wrokers: unknown key; expected one of: backlog,"),
        ("    workers: 2\n    workers: 3\n", "conf.yaml:6: programs.web.workers: duplicate key"),
        ("    stop_signal: STOPIT\n", "conf.yaml:5: programs.web.stop_signal: expected a signal name such as TERM"),
        ("    ready_timeout: 0\n", "conf.yaml:5: programs.web.ready_timeout: expected more than 0 seconds"),
        ("    max_rss: lots\n", 'conf.yaml:5: programs.web.max_rss: expected a size such as "512M"'),
        ("    max_rss: 1023K\n", "conf.yaml:5: programs.web.max_rss: expected at least 1M, got 1023K"),
        ("    ready: maybe\n", 'conf.yaml:5: programs.web.ready: expected one of notify | accepting | settle'),
        ("    env: {1X: y}\n", "conf.yaml:5: programs.web.env.1X: not a valid environment variable name"),
        ("    tls: {cert: c.pem}\n", "conf.yaml:5: programs.web.tls.key: required"),
        ("    ready_timeout: .inf\n",
         "conf.yaml:5: programs.web.ready_timeout: expected a number of seconds, got .inf"),
        ("    stop_delay: -1\n",
         "conf.yaml:5: programs.web.stop_delay: expected at least 0 seconds (and at most a day), got -1"),
        ("    graceful_timeout: .nan\n", "conf.yaml:5: programs.web.graceful_timeout: expected a number of seconds"),
        ("    ready_timeout: 1" + "0" * 400 + "\n",  # an integer no float can hold
         "conf.yaml:5: programs.web.ready_timeout: expected a number of seconds"),
        ("    settle: -.inf\n", "conf.yaml:5: programs.web.settle: expected a number of seconds, got -.inf"),
        ("    max_age: 0x_\n", "conf.yaml:5: programs.web.max_age: expected a number of seconds, got 0x_"),
        ("    workers: 0x_\n", "conf.yaml:5: programs.web.workers: expected an integer, got 0x_"),
        ('    crash_window: !!float ""\n', "conf.yaml:5: programs.web.crash_window: expected a number of seconds"),
    ])
    def test_program_values(self, change: str, expected: str) -> None:
        """Each wrong value names the file, its line and its dotted key."""
        assert error(MINIMAL + change).startswith(expected)

    def test_yaml_numbers(self) -> None:
        """Numbers are read as YAML 1.1 reads them: hex, sexagesimal (1:30 is 90), underscores."""
        text = MINIMAL + "    ready_timeout: 0x10\n    graceful_timeout: 1:30\n    settle: 1_0.5\n    workers: 0x10\n"
        web = schema.parse(text, "conf.yaml").programs[0]
        assert (web.ready_timeout, web.graceful_timeout, web.settle, web.workers) == (16.0, 90.0, 10.5, 16)

    @pytest.mark.parametrize(("listen", "expected"), [
        ("'::1:8000'", 'programs.web.listen[0]: expected "HOST:PORT" or "[IPV6]:PORT"'),
        ("'localhost:8000'", 'programs.web.listen[0]: expected "HOST:PORT"'),
        ("'127.0.0.1:0'", "programs.web.listen[0]: port must be 1..65535"),
        ("['127.0.0.1:80', '127.0.0.1:80']", "programs.web.listen[1]: 127.0.0.1:80 is listed twice"),
        ("[]", "programs.web.listen: expected at least one address"),
    ])
    def test_listen_addresses(self, listen: str, expected: str) -> None:
        """Addresses are IP literals with a port; IPv6 in brackets; no duplicates."""
        assert expected in error(f"programs:\n  web:\n    command: [app]\n    listen: {listen}\n")

    def test_two_programs_cannot_share_an_address(self) -> None:
        """One reuseport group would mix their workers: refused, naming the other program."""
        text = MINIMAL + "  api:\n    command: [api]\n    listen: ['127.0.0.1:8000']\n"
        assert "programs.api.listen: 127.0.0.1:8000 is already used by program web" in error(text)

    def test_structure(self) -> None:
        """Missing sections, wrong shapes, unknown top-level keys and tls placeholders without tls."""
        assert error("") == "conf.yaml: programs: required (a mapping of program name to settings)"
        assert error("programs: []\n").startswith("conf.yaml:1: programs: expected a mapping, got a list")
        wrong = error("migrate: yes\n" + MINIMAL)
        assert "conf.yaml:1: migrate: expected one of require | prefer | drain | off" in wrong
        assert "conf.yaml:1: program: unknown key" in error("program: {}\n")
        assert "programs.web.command: required" in error("programs:\n  web:\n    listen: ['127.0.0.1:1']\n")
        text = "programs:\n  web:\n    command: [app, '{tls.cert}']\n    listen: ['127.0.0.1:1']\n"
        assert "programs.web.command: uses {tls.cert} but programs.web.tls is not set" in error(text)

    def test_broken_yaml_and_unreadable_files(self, tmp_path: Path) -> None:
        """Broken YAML names its line; an unreadable file says why."""
        assert error("programs:\n  web: [unclosed\n").startswith("conf.yaml:3: broken YAML")
        with pytest.raises(ConfigError, match="cannot read: No such file or directory"):
            schema.load(tmp_path / "missing.yaml")


class TestControlSocket:
    def test_found_even_when_programs_are_wrong(self, tmp_path: Path) -> None:
        """The client finds the daemon's socket in a file whose programs would not validate."""
        path = tmp_path / "s.yaml"
        path.write_text("control: {socket: /run/x.sock}\nprograms: {web: {workers: two}}\n")
        assert schema.control_socket(path) == "/run/x.sock"

    def test_default_beside_the_file(self, tmp_path: Path) -> None:
        path = tmp_path / "s.yaml"
        path.write_text(MINIMAL)
        assert schema.control_socket(path) == str(tmp_path / "supervisor.sock")
