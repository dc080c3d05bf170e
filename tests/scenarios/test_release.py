"""The release check: `python -m build` makes a wheel and an sdist; the wheel, installed into a fresh venv
outside the repository, names itself, runs the demo under supervisord and answers supervisorctl. Then the
classic Supervisor goes into the same venv, as a user might do by mistake, and the commands of this
project that still run say what happened in one line instead of a traceback.

The venv is made once for the module (pip needs the network: the host's namespace); the serving test
runs in a private network namespace, the mixed-install test last, as it spoils the venv."""

from __future__ import annotations

import os
import subprocess
import sys
import tarfile
import tempfile
import time
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from supervisor import __version__
from tests.harness import request, wait_for

ROOT = Path(__file__).resolve().parents[2]


@dataclass(frozen=True)
class Release:
    wheel: Path
    sdist: Path
    venv: Path
    home: Path  # the working folder of every command: nothing of the repository is importable from it

    def env(self) -> dict[str, str]:
        """The caller's environment (pip's settings) with the venv first on PATH and no way back to the
        repository: no PYTHONPATH, no VIRTUAL_ENV of the test run."""
        env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")}
        env["PATH"] = f"{self.venv / 'bin'}:/usr/sbin:/usr/bin:/sbin:/bin"
        return env

    def run(self, *command: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
        bin_ = self.venv / "bin"
        first = str(bin_ / command[0]) if (bin_ / command[0]).exists() else command[0]
        return subprocess.run([first, *command[1:]], cwd=self.home, env=self.env(), capture_output=True, text=True,
                              timeout=timeout)

    def pip(self, *args: str) -> None:
        done = self.run("python", "-m", "pip", "--disable-pip-version-check", "-q", *args)
        assert done.returncode == 0, done.stderr[-2000:]


@pytest.fixture(scope="module")
def release(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Release]:
    """Built with `python -m build` (an isolated build, as a release is made) and installed alone."""
    folder = tmp_path_factory.mktemp("release")
    dist = folder / "dist"
    started = time.monotonic()
    built = subprocess.run([sys.executable, "-m", "build", "--outdir", str(dist), str(ROOT)], cwd=folder,
                           capture_output=True, text=True, timeout=300)
    assert built.returncode == 0, built.stdout[-3000:] + built.stderr[-3000:]
    [wheel] = dist.glob("*.whl")
    [sdist] = dist.glob("*.tar.gz")
    home = folder / "elsewhere"
    home.mkdir()
    subprocess.run([sys.executable, "-m", "venv", str(folder / "venv")], check=True, timeout=120)
    release = Release(wheel, sdist, folder / "venv", home)
    release.pip("install", str(wheel))
    print(f"build and install: {time.monotonic() - started:.1f} s")
    yield release


def test_the_wheel_and_the_sdist_hold_the_package_and_its_commands(release: Release) -> None:
    """Both carry the package, the demo included (`make run` and the image need nothing else); the wheel
    declares the two commands; neither carries the tests."""
    assert release.wheel.name == f"reuseport_supervisor-{__version__}-py3-none-any.whl"
    names = zipfile.ZipFile(release.wheel).namelist()
    assert "supervisor/demo.py" in names and "supervisor/install.py" in names
    assert not [n for n in names if n.startswith("tests/")]
    entry_points = zipfile.ZipFile(release.wheel).read(
        f"reuseport_supervisor-{__version__}.dist-info/entry_points.txt").decode()
    assert "supervisord = supervisor.daemon.entry:main" in entry_points
    assert "supervisorctl = supervisor.ctl.main:run" in entry_points
    with tarfile.open(release.sdist) as sdist:
        members = sdist.getnames()
    assert f"reuseport_supervisor-{__version__}/supervisor/demo.py" in members


def test_installed_alone_it_names_itself_serves_the_demo_and_answers(release: Release, netns: None) -> None:
    """`--version` of both commands names this project; supervisord (the venv's, from the venv's PATH:
    `python` in the config is the venv's) runs the demo; `supervisorctl status` and `shutdown` answer."""
    for command in ("supervisord", "supervisorctl"):
        done = release.run(command, "--version")
        assert (done.returncode, done.stdout) == (0, f"reuseport-supervisor {__version__}\n"), done
    where = release.run("python", "-c", "import supervisor.demo; print(supervisor.demo.__file__)")
    assert where.stdout.startswith(str(release.venv)), where  # the installed code, not the repository's

    config = release.home / "supervisor.yaml"
    config.write_text("control:\n  socket: ./supervisor.sock\nmigrate: require\nprograms:\n  web:\n"
                      "    command: [python, -m, supervisor.demo]\n    workers: 2\n"
                      '    listen: ["127.0.0.1:8000"]\n    graceful_timeout: 5\n')
    daemon = subprocess.Popen([str(release.venv / "bin" / "supervisord"), "-c", str(config)], cwd=release.home,
                              env=release.env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        wait_for("the demo serving", lambda: _answers(), timeout=20)
        status = release.run("supervisorctl", "-c", str(config), "status")
        assert status.returncode == 0 and "web" in status.stdout and "serving" in status.stdout, status
        assert release.run("supervisorctl", "-c", str(config), "shutdown").returncode == 0
        assert daemon.wait(timeout=20) == 0
    finally:
        if daemon.poll() is None:
            daemon.kill()
            daemon.wait()


def test_make_run_says_what_it_does_with_the_sysctl_before_it_starts(release: Release, netns: None) -> None:
    """`make run` (here with the release's venv, which has what running needs) says in one line, before
    supervisord starts, that it will set net.ipv4.tcp_migrate_req in this network namespace (as root),
    then runs config/example.yaml's demo; the sysctl is 1 afterwards, as it said."""
    (release.venv / ".installed-run").touch()  # what running needs is installed: make only runs it
    assert _sysctl() == "0"
    errors = tempfile.TemporaryFile(mode="w+")  # noqa: SIM115  # closed in the finally; why make ended other than 0
    make = subprocess.Popen(["make", "--no-print-directory", "-C", str(ROOT), "run", f"VENV={release.venv}"],
                            env=release.env(), stdout=subprocess.PIPE, stderr=errors, text=True)
    try:
        assert make.stdout is not None
        said = make.stdout.readline()
        assert said.startswith("make run: supervisord will set net.ipv4.tcp_migrate_req=1 in this network "
                               "namespace"), said
        wait_for("the demo serving", lambda: _answers(), timeout=20)
        assert _sysctl() == "1"
        done = release.run("supervisorctl", "-c", str(ROOT / "config" / "example.yaml"), "shutdown")
        assert done.returncode == 0, done
        if make.wait(timeout=20) != 0:
            errors.seek(0)
            rest = make.stdout.read()
            raise AssertionError(f"make run exited {make.returncode}; its output: {rest[-3000:]}; "
                                 f"its errors: {errors.read()[-3000:]}")
    finally:
        if make.poll() is None:
            make.kill()
            make.wait()
        errors.close()


def _sysctl() -> str:
    return Path("/proc/sys/net/ipv4/tcp_migrate_req").read_text().strip()


def test_classic_supervisor_in_the_same_venv_is_named_in_one_line(release: Release) -> None:
    """Installed over ours, the classic Supervisor owns the commands and `supervisor/__init__.py`; our code
    that still runs (`python -m supervisor.daemon`, `... ctl`) says so in one line, exit status 2. Ours
    reinstalled over it: our commands are back and say the same. The classic one uninstalled: it took
    files of ours along, and what is left says that."""
    config = release.home / "supervisor.yaml"
    config.write_text("control:\n  socket: ./supervisor.sock\nprograms: {}\n")
    release.pip("install", "supervisor")
    classic = release.run("supervisord", "--version")
    assert "reuseport-supervisor" not in classic.stdout + classic.stderr, classic  # not our command any more
    for module in ("supervisor.daemon", "supervisor.ctl"):
        _says_in_one_line(release.run("python", "-m", module, "-c", str(config), "status"), "supervisor 4.")

    release.pip("install", "--force-reinstall", "--no-deps", str(release.wheel))
    _says_in_one_line(release.run("supervisord", "-c", str(config)), "supervisor 4.")
    _says_in_one_line(release.run("supervisorctl", "--version"), "supervisor 4.")

    release.pip("uninstall", "-y", "supervisor")
    _says_in_one_line(release.run("python", "-m", "supervisor.daemon", "-c", str(config)),
                      f"reuseport-supervisor {__version__} misses")
    release.pip("install", "--force-reinstall", "--no-deps", str(release.wheel))
    assert release.run("supervisorctl", "--version").stdout == f"reuseport-supervisor {__version__}\n"


def _says_in_one_line(done: subprocess.CompletedProcess[str], *words: str) -> None:
    lines = done.stderr.splitlines()
    assert done.returncode == 2 and len(lines) == 1 and not done.stdout, done
    for word in words:
        assert word in lines[0], lines[0]


def _answers() -> bool:
    try:
        return request()[0] == 200
    except OSError:
        return False
