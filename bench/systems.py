"""The servers the benchmark compares, each started the way its users run it and reloaded its own way.

Every system serves `GET /` with a JSON body naming the answering worker's pid, on new connections,
with the same number of workers and the same listen backlog. Each one is started inside the
benchmark's private network namespace, in a folder of its own.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil

from bench import kernel
from tests import harness
from tests.harness import BIN, PYTHON
from tests.servicemanager import ServiceManager

ROOT = Path(__file__).resolve().parent.parent
HOST = "127.0.0.1"


class StartFailed(RuntimeError):
    pass


@dataclass
class Server:
    """One server process tree: its master (the process started) and the workers below it."""

    folder: Path
    port: int = 8000
    workers: int = 2
    backlog: int = 128
    proc: subprocess.Popen[bytes] | None = field(default=None, init=False)

    label = "server"

    @property
    def address(self) -> str:
        return f"{HOST}:{self.port}"

    @property
    def log(self) -> Path:
        return self.folder / f"{self.label}.log"

    def command(self) -> list[str]:
        raise NotImplementedError

    def prepare(self) -> None:
        """Write the config files the command reads."""

    def start(self) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        self.prepare()
        env = {**os.environ, "PATH": f"{BIN}:{os.environ.get('PATH', '')}"}
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(self.command(), stdout=log, stderr=log, env=env, cwd=ROOT,
                                         start_new_session=True)
        self.wait_serving()

    def wait_serving(self, timeout: float = 60.0) -> None:
        """Until every worker holds a listener on the port (the master's own listeners do not count)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                raise StartFailed(f"{self.label} exited {self.proc.returncode}: {self.log_tail()}")
            if len(kernel.listening_pids(self.port, self.worker_pids())) >= self.workers:
                return
            time.sleep(0.05)
        raise StartFailed(f"{self.label}: {self.workers} workers not listening after {timeout:g} s: {self.log_tail()}")

    @property
    def master_pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def worker_pids(self) -> set[int]:
        try:
            return {p.pid for p in psutil.Process(self.master_pid).children(recursive=True)}
        except psutil.NoSuchProcess:
            return set()

    def reload(self) -> dict[str, Any]:
        """Run the system's reload command; what it reports besides its duration."""
        raise NotImplementedError

    def stop(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                pass
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)  # whatever is left of the tree
        except ProcessLookupError:
            pass
        self.proc.wait()

    def log_tail(self, lines: int = 5) -> str:
        try:
            return " | ".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


@dataclass
class Supervisor(Server):
    """This project: supervisord running the demo app (or `program`'s command), reloaded through its control socket.

    Written, started, waited for and asked the way the tests do it (tests/harness.py), in a session of its own.
    """

    migrate: str = "require"
    addresses: int = 1  # listen on `port`, `port + 1`, ...
    program: dict[str, Any] = field(default_factory=dict)  # more program settings: command, ready, stop_delay...
    manager: ServiceManager | None = None  # start it under this stand-in for systemd (notify socket, fd store)
    env: dict[str, str] = field(default_factory=dict)  # added to supervisord's environment
    sup: harness.Supervisor | None = field(default=None, init=False)

    label = "supervisord"  # its log: harness.Supervisor's

    def start(self, timeout: float = 60.0) -> None:
        """Start supervisord and wait until the start-up generation serves (every worker ready)."""
        self.folder.mkdir(parents=True, exist_ok=True)
        listen = [f"{HOST}:{self.port + i}" for i in range(self.addresses)]
        program = harness.program(workers=self.workers, listen=listen, backlog=self.backlog, ready_timeout=60,
                                  graceful_timeout=10, **self.program)
        self.sup = harness.Supervisor(self.folder, {"web": program}, self.migrate)
        self.sup.new_session = True
        self.sup.env = dict(self.env)
        try:
            if self.manager is not None:  # with the stored listeners as LISTEN_FDS, NOTIFY_SOCKET and FDSTORE set
                self.manager.start(self.sup, timeout=timeout)
            else:
                self.sup.start(timeout=timeout)
        except AssertionError as exc:
            raise StartFailed(f"{str(exc).splitlines()[0]} | {self.log_tail()}") from None
        finally:
            self.proc = self.sup.proc

    def request(self, command: str) -> dict[str, Any]:
        """One control request (what `supervisorctl` sends, without its interpreter start-up): its data, and
        its message as `message`."""
        assert self.sup is not None
        final = self.sup.request(command)
        if not final.get("ok"):
            raise StartFailed(f"supervisorctl {command}: {final.get('error')} | {self.log_tail()}")
        return {**(final.get("data") or {}), "message": final.get("message", "")}

    def reload(self) -> dict[str, Any]:
        data = self.request("reload")
        return {"daemon_ms": data["ms"], "migrated": data["migrated"], "queued": data["queued"],
                "drain_ms": data.get("drain_ms"), "dropped": data.get("dropped")}


@dataclass
class Nginx(Server):
    """nginx from Debian's packages, `nginx -s reload`; `reuseport` gives each worker a listener."""

    reuseport: bool = True

    label = "nginx"

    @property
    def config(self) -> Path:
        return self.folder / "nginx.conf"

    def prepare(self) -> None:
        listen = f"{self.address}{' reuseport' if self.reuseport else ''} backlog={self.backlog}"
        temp = " ".join(f"{kind}_temp_path {self.folder}/{kind};" for kind in
                        ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"))
        self.config.write_text(f"""daemon off;
worker_processes {self.workers};
pid {self.folder}/nginx.pid;
error_log {self.folder}/error.log notice;
events {{ worker_connections 4096; accept_mutex off; }}
http {{
    access_log off;
    {temp}
    server {{
        listen {listen};
        location / {{ default_type application/json; return 200 '{{"pid": $pid}}'; }}
    }}
}}
""")

    def command(self) -> list[str]:
        return [nginx_binary(), "-e", str(self.folder / "error.log"), "-c", str(self.config)]

    def reload(self) -> dict[str, Any]:
        subprocess.run([*self.command(), "-s", "reload"], check=True, capture_output=True)
        return {}


@dataclass
class Gunicorn(Server):
    """gunicorn from PyPI, sync workers, reloaded with SIGHUP to its master: with `--reuse-port` (each worker
    a listener of its own) or without (its default: one listener the master binds and every worker inherits)."""

    reuse_port: bool = True

    label = "gunicorn"

    def command(self) -> list[str]:
        return [str(BIN / "gunicorn"), *(["--reuse-port"] if self.reuse_port else []), "--workers", str(self.workers),
                "--bind", self.address, "--backlog", str(self.backlog), "--graceful-timeout", "10",
                "--no-control-socket", "--chdir", str(ROOT), "tests.apps.wsgi:app"]

    def reload(self) -> dict[str, Any]:
        os.kill(self.master_pid, signal.SIGHUP)
        return {}


@dataclass
class Uvicorn(Server):
    """uvicorn's own process manager, `uvicorn --workers N`: its master binds one listener every worker inherits
    (one shared accept queue); SIGHUP replaces the workers one after the other, each new one ready before the old
    one gets SIGTERM."""

    label = "uvicorn"

    def command(self) -> list[str]:
        return [PYTHON, "-m", "uvicorn", "--workers", str(self.workers), "--host", HOST, "--port", str(self.port),
                "--backlog", str(self.backlog), "--no-access-log", "tests.apps.asgi:app"]

    def reload(self) -> dict[str, Any]:
        os.kill(self.master_pid, signal.SIGHUP)
        return {}


@dataclass
class Granian(Server):
    """Granian (a Rust HTTP server for Python apps) from PyPI, `granian --workers N`: on Linux each worker binds
    a SO_REUSEPORT listener of its own; SIGHUP replaces the workers one after the other (start a new one, wait
    `--respawn-interval` s, stop the old one), so what the old one's queue holds survives only by migration
    (net.ipv4.tcp_migrate_req). The interval is 0.5 s here instead of Granian's default 3.5 s, so that a
    reload of 2 workers fits in the benchmark's second between reloads."""

    respawn_interval: float = 0.5

    label = "granian"

    def command(self) -> list[str]:
        return [str(BIN / "granian"), "--interface", "asgi", "--host", HOST, "--port", str(self.port), "--workers",
                str(self.workers), "--backlog", str(max(128, self.backlog)), "--no-access-log", "--respawn-interval",
                str(self.respawn_interval), "--working-dir", str(ROOT), "tests.apps.asgi:app"]

    def reload(self) -> dict[str, Any]:
        os.kill(self.master_pid, signal.SIGHUP)
        return {}


@dataclass
class DirectDemo(Server):
    """The demo app without a supervisor: `workers` processes binding their own SO_REUSEPORT listeners."""

    label = "demo"
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list, init=False)

    def start(self) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        command = [PYTHON, "-m", "supervisor.demo", "--bind", self.address, "--backlog", str(self.backlog)]
        with open(self.log, "ab") as log:
            # Each in a session of its own, as supervisord starts its workers: with the scheduler's
            # autogroups (kernel.sched_autogroup_enabled) a session is a scheduling group, and sharing
            # the load's group changed the figure by a quarter on two cores.
            self.procs = [subprocess.Popen(command, stdout=log, stderr=log, cwd=ROOT, start_new_session=True)
                          for _ in range(self.workers)]
        self.wait_serving()

    def worker_pids(self) -> set[int]:
        return {p.pid for p in self.procs if p.poll() is None}

    @property
    def master_pid(self) -> int:
        raise StartFailed("the directly run demo has no master")

    def stop(self) -> None:
        for p in self.procs:
            p.terminate()
        for p in self.procs:
            p.wait(30)


def nginx_binary() -> str:
    found = shutil.which("nginx") or ("/usr/sbin/nginx" if os.path.exists("/usr/sbin/nginx") else None)
    if found is None:
        raise StartFailed("nginx is not installed (Debian: apt-get install nginx; `make bench` does it)")
    return found
