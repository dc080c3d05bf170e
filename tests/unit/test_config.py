"""The config file: every value validated, every error one line with file, line and key."""

from __future__ import annotations

import signal
import socket
import tempfile
from pathlib import Path

import pytest

from supervisor.config import schema, unixpath
from supervisor.config.schema import MigrateMode, ReadyMode
from supervisor.daemon import endpoints
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
        ("    wrokers: 2\n", "conf.yaml:5: programs.web.wrokers: unknown key; expected one of: accept_queue, backlog,"),
        ("    workers: 2\n    workers: 3\n", "conf.yaml:6: programs.web.workers: duplicate key"),
        ("    stop_signal: STOPIT\n", "conf.yaml:5: programs.web.stop_signal: expected a signal name such as TERM"),
        ("    ready_timeout: 0\n", "conf.yaml:5: programs.web.ready_timeout: expected more than 0 seconds"),
        ("    max_rss: lots\n", 'conf.yaml:5: programs.web.max_rss: expected a size such as "512M"'),
        ("    max_rss: 1023K\n", "conf.yaml:5: programs.web.max_rss: expected at least 1M, got 1023K"),
        ("    ready: maybe\n", 'conf.yaml:5: programs.web.ready: expected one of notify | accepting | settle'),
        ("    accept_queue: one\n",
         'conf.yaml:5: programs.web.accept_queue: expected one of per-worker | shared, got "one"'),
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
        ("'no-such-host.invalid:8000'", 'programs.web.listen[0]: "no-such-host.invalid" has no address in /etc/hosts'),
        ("'1.2.3:8000'", 'programs.web.listen[0]: expected "HOST:PORT"'),
        ("':0'", "programs.web.listen[0]: port must be 1..65535"),
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


DURATION_KEYS = ("ready_timeout", "graceful_timeout", "stop_delay", "drain_timeout", "settle", "crash_window",
                 "max_age")


class TestFormsPeopleType:
    @pytest.mark.parametrize("key", DURATION_KEYS)
    @pytest.mark.parametrize(("text", "seconds"), [
        ("30s", 30.0), ("500ms", 0.5), ("2m", 120.0), ("1h", 3600.0), ("1.5s", 1.5), ("250 ms", 0.25), ("45", 45.0),
        ("2.5", 2.5),
    ])
    def test_every_duration_key_takes_units(self, key: str, text: str, seconds: float) -> None:
        """As nginx and Go write durations; a plain number is seconds, as before."""
        program = schema.parse(MINIMAL + f"    {key}: {text}\n", "conf.yaml").programs[0]
        assert getattr(program, key) == seconds

    @pytest.mark.parametrize(("change", "expected"), [
        ("    graceful_timeout: 30 sec\n", 'conf.yaml:5: programs.web.graceful_timeout: expected a number of seconds, '
                                         'got "30 sec" (or a duration: "500ms", "30s", "2m", "1h")'),
        ("    stop_delay: -1s\n", 'conf.yaml:5: programs.web.stop_delay: expected a number of seconds, got "-1s"'),
        ("    ready_timeout: 0ms\n", "conf.yaml:5: programs.web.ready_timeout: expected more than 0 seconds (and at "
                                   "most a day), got 0ms"),
        ("    max_age: 25h\n", "conf.yaml:5: programs.web.max_age: expected more than 0 seconds (and at most a day), "
                             "got 25h"),
        ("    settle: 1d\n", 'conf.yaml:5: programs.web.settle: expected a number of seconds, got "1d"'),
    ])
    def test_a_wrong_duration_is_one_line(self, change: str, expected: str) -> None:
        assert error(MINIMAL + change).startswith(expected)

    @pytest.mark.parametrize(("listen", "expected"), [
        ("':8000'", ["0.0.0.0:8000"]),
        ("'*:8000'", ["0.0.0.0:8000"]),
        ("'localhost:8000'", ["127.0.0.1:8000", "[::1]:8000"]),
        ("'web.internal:8000'", ["10.0.0.7:8000"]),
        ("['Web.Internal:8000', 'localhost:8001']", ["10.0.0.7:8000", "127.0.0.1:8001", "[::1]:8001"]),
    ])
    def test_listen_by_name_or_port_alone(self, monkeypatch: pytest.MonkeyPatch, tmp_path: Path, listen: str,
                                          expected: list[str]) -> None:
        """A name: each of its addresses in /etc/hosts, each its own reuseport group; ":PORT": every IPv4 address."""
        hosts = tmp_path / "hosts"
        hosts.write_text("127.0.0.1 localhost\n# 10.9.9.9 web.internal\n::1 localhost ip6-localhost\n"
                         "10.0.0.7 db web.internal  # the app\nnot-an-ip web.internal\n")
        monkeypatch.setattr(schema, "HOSTS", str(hosts))
        program = schema.parse(f"programs:\n  web:\n    command: [app]\n    listen: {listen}\n", "c.yaml").programs[0]
        assert [str(a) for a in program.listen] == expected

    def test_localhost_without_an_entry_is_the_loopback_addresses(self, monkeypatch: pytest.MonkeyPatch,
                                                                  tmp_path: Path) -> None:
        (tmp_path / "hosts").write_text("10.0.0.7 db\n")
        monkeypatch.setattr(schema, "HOSTS", str(tmp_path / "hosts"))
        assert [str(a) for a in schema.parse(MINIMAL.replace("'127.0.0.1:8000'", "'localhost:80'"), "c.yaml")
                .programs[0].listen] == ["127.0.0.1:80", "[::1]:80"]

    def test_names_refused_in_one_line(self, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
        """Unknown names (never asked of DNS), an address twice, and metrics (one address) given a name of two."""
        (tmp_path / "hosts").write_text("127.0.0.1 localhost\n::1 localhost\n")
        monkeypatch.setattr(schema, "HOSTS", str(tmp_path / "hosts"))
        assert error(MINIMAL.replace("'127.0.0.1:8000'", "'example.com:80'")) == (
            'conf.yaml:4: programs.web.listen[0]: "example.com" has no address in ' + str(tmp_path / "hosts") +
            " (names are looked up there only, never in DNS); add it there or write the IP address")
        assert error(MINIMAL.replace("'127.0.0.1:8000'", "'localhost:8000', '[::1]:8000'")) == (
            "conf.yaml:4: programs.web.listen[1]: [::1]:8000 is listed twice")
        assert error(MINIMAL + "metrics: {listen: 'localhost:9150'}\n") == (
            "conf.yaml:5: metrics.listen: localhost:9150 names 2 addresses (127.0.0.1:9150, [::1]:9150); "
            "this key takes one: write it")
        (tmp_path / "hosts").write_bytes(b"0.0.0.0 ads.example\n" * 70_000)  # a blocklist over 1 MiB
        assert error(MINIMAL.replace("'127.0.0.1:8000'", "'localhost:80'")) == (
            f"conf.yaml:4: programs.web.listen[0]: {tmp_path / 'hosts'}, where names are looked up: larger than "
            "1 MiB (1400000 bytes): not read; write the IP address")
        assert str(schema.parse(MINIMAL + "metrics: {listen: ':9150'}\n", "c.yaml").metrics.listen) == "0.0.0.0:9150"  # type: ignore[union-attr]


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

    def test_any_depth_but_not_any_name(self, tmp_path: Path) -> None:
        """A deep path is reached through its folder (/proc/self/fd/N/NAME); only a name too long for
        that is refused, by the daemon's reader and the client's alike, in one line."""
        deep = "/" + "d" * 150
        assert schema.parse(MINIMAL + f"control:\n  socket: {deep}/supervisor.sock\n", "c.yaml").control.socket == \
            f"{deep}/supervisor.sock"
        fits = "/" + "n" * 105  # 106 bytes: the whole path fits, whatever its name
        assert schema.parse(MINIMAL + f"control: {{socket: {fits}}}\n", "c.yaml").control.socket == fits
        named = f"{deep}/{'s' * unixpath.MAX_NAME}"
        assert schema.parse(MINIMAL + f"control: {{socket: {named}}}\n", "c.yaml").control.socket == named
        impossible = named + "s"
        expected = (f"c.yaml:7: control.socket: {impossible}: a unix socket's path holds 107 bytes, and in a deeper "
                    f"folder its file name at most 82; this one is 235 bytes with a name of 83: choose a shorter name")
        assert error(MINIMAL + "\n\n" + f"control: {{socket: {impossible}}}\n", "c.yaml") == expected
        path = tmp_path / "c.yaml"
        path.write_text(MINIMAL + "\n\n" + f"control: {{socket: {impossible}}}\n")
        with pytest.raises(ConfigError) as info:
            schema.control_socket(path)
        assert str(info.value) == expected.replace("c.yaml", str(path), 1)

    def test_the_runtime_folder_keeps_the_notify_socket_within_an_address(self, monkeypatch: pytest.MonkeyPatch,
                                                                         tmp_path: Path) -> None:
        """Workers reach the notify socket by its path: where $TMPDIR is too deep for it, /tmp."""
        monkeypatch.delenv("RUNTIME_DIRECTORY", raising=False)
        monkeypatch.setattr(tempfile, "tempdir", "/var/tmp")
        assert endpoints.runtime_folder("/x.sock").startswith("/var/tmp/supervisord.")
        monkeypatch.setattr(tempfile, "tempdir", "/" + "t" * 80)
        folder = endpoints.runtime_folder("/x.sock")
        assert folder.startswith("/tmp/supervisord.") and unixpath.fits(f"{folder}/{endpoints.NOTIFY_SOCKET}")
