"""A real systemd for the tests: `systemd-nspawn` boots this machine's own root through a throwaway
overlay, with a private network, and its PID 1 is a real service manager for the shipped unit.

Nothing of the host changes: the overlay's upper layer and nspawn's state (/run) are tmpfs mounts in
a private mount namespace, the container has its own network namespace (its sysctls are its own),
and a newer systemd is a layer of unpacked packages (`apt-get download` + `dpkg -x`, never
installed). What each step avoids, learnt the hard way:
- `--register=no --keep-unit`: no systemd runs on the host to register with; so no `machinectl`
  either, commands go in with `nsenter -t <PID 1> -a`.
- The container's cgroups: nspawn makes its own under the cgroup it starts in, so it starts in
  fresh sub-cgroups of ours (`name=systemd` and cgroup2), removed deepest first after. Never let
  a systemd start in the host's root cgroup: it moves every process of the machine into its own.
- overlayfs refuses a lower layer inside another lower layer: the packages are copied into the
  tmpfs before they are layered over `/`.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import psutil

from tests.netns import netns_of

# Runs as root in a new cgroup, then in a private mount namespace: the overlay, then nspawn (exec'd,
# so the pid the test holds is nspawn's and its only child is the container's PID 1).
_BOOT = r"""
for g in $CGROUPS; do echo $$ > "$g/cgroup.procs"; done
exec unshare -m --propagation private sh -ec '
  mount -n -t tmpfs tmpfs /run
  mount -n -t tmpfs tmpfs "$T"
  mkdir "$T/up" "$T/wk" "$T/root"
  lower=/
  if [ -n "$LAYER" ]; then mkdir "$T/layer"; cp -a "$LAYER/." "$T/layer/"; lower="$T/layer:/"; fi
  mount -n -t overlay overlay -o "lowerdir=$lower,upperdir=$T/up,workdir=$T/wk" "$T/root"
  exec systemd-nspawn -D "$T/root" --register=no --keep-unit --private-network -M "$NAME" -q $BINDS \
    -b systemd.unit=basic.target'
"""


class Unavailable(RuntimeError):
    """This machine cannot boot a container (not root, no nspawn, no overlayfs, no cgroups)."""


def missing() -> str | None:
    """Why a container cannot be booted here, or None."""
    if os.geteuid() != 0:
        return "booting a container needs root"
    if shutil.which("systemd-nspawn") is None:
        return "systemd-nspawn is missing (make test installs Debian's systemd-container package)"
    if not _cgroup_roots():
        return "no writable cgroup hierarchy under /sys/fs/cgroup"
    with open("/proc/filesystems") as f:
        if "overlay" not in f.read():
            return "the kernel has no overlayfs"
    return None


def _cgroup_roots() -> list[Path]:
    """Where nspawn's cgroups go: `name=systemd` and cgroup2 on a hybrid host, cgroup2 on a unified one."""
    base = Path("/sys/fs/cgroup")
    if (base / "cgroup.controllers").exists():
        return [base]
    return [base / h for h in ("systemd", "unified") if (base / h / "cgroup.procs").exists()]


def systemd_layer(folder: Path, suite: str = "bookworm-backports") -> Path:
    """systemd of `suite` unpacked into `folder/root` (merged /usr), downloaded once: a layer to put
    over `/` so that the container boots it. apt runs with its own lists, the host's are untouched."""
    root = folder / "root"
    if (root / "usr/lib/systemd/systemd").exists():
        return root
    for sub in ("lists/partial", "cache/archives/partial", "debs"):
        (folder / sub).mkdir(parents=True, exist_ok=True)
    (folder / "sources.list").write_text(
        f"deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] http://deb.debian.org/debian {suite} main\n")
    apt = ["-qq", "-o", f"Dir::Etc::SourceList={folder}/sources.list", "-o", "Dir::Etc::SourceParts=/nonexistent",
           "-o", f"Dir::State::Lists={folder}/lists", "-o", f"Dir::Cache={folder}/cache",
           "-o", "APT::Sandbox::User=root"]
    subprocess.run(["apt-get", *apt, "update"], check=True)
    subprocess.run(["apt-get", *apt, "download", *(f"{p}/{suite}" for p in ("systemd", "libsystemd-shared",
                                                                            "libsystemd0"))],
                   cwd=folder / "debs", check=True)
    unpacked = folder / "unpacked"
    shutil.rmtree(unpacked, ignore_errors=True)
    for deb in sorted((folder / "debs").glob("*.deb")):
        subprocess.run(["dpkg", "-x", str(deb), str(unpacked)], check=True)
    for top in ("bin", "sbin", "lib"):  # the host has a merged /usr: /lib is a symlink the layer must not hide
        if (unpacked / top).is_dir() and not (unpacked / top).is_symlink():
            shutil.copytree(unpacked / top, unpacked / "usr" / top, symlinks=True, dirs_exist_ok=True)
            shutil.rmtree(unpacked / top)
    unpacked.rename(root)
    return root


class Machine:
    """A container booted to basic.target; `run` a command in it, `network()` to talk to it."""

    def __init__(self, folder: Path, layer: Path | None = None, binds: dict[str, Path] | None = None) -> None:
        self.folder = folder
        self.layer = layer
        self.binds = binds or {}
        self.cgroups = [root / f"reuseport-test-{os.getpid()}-{folder.name}" for root in _cgroup_roots()]
        self.nspawn: subprocess.Popen[bytes] | None = None
        self.pid1 = 0

    def boot(self, timeout: float = 60) -> Machine:
        for cgroup in self.cgroups:
            cgroup.mkdir()
        mount = self.folder / "overlay"
        mount.mkdir()
        env = {**os.environ, "T": str(mount), "LAYER": str(self.layer or ""), "NAME": "reuseport-test",
               "CGROUPS": " ".join(map(str, self.cgroups)),
               "BINDS": " ".join(f"--bind={host}:{inside}" for inside, host in self.binds.items())}
        with open(self.folder / "console.log", "wb") as console:
            self.nspawn = subprocess.Popen(["sh", "-ec", _BOOT], env=env, stdin=subprocess.DEVNULL,
                                           stdout=console, stderr=console)
        deadline = time.monotonic() + timeout
        while self.state() not in ("running", "degraded"):
            if self.nspawn.poll() is not None or time.monotonic() > deadline:
                raise Unavailable(f"the container did not boot (nspawn: {self.nspawn.poll()}):\n{self.console()}")
            time.sleep(0.05)
        return self

    def state(self) -> str:
        """systemd's `is-system-running` in the container ("" until its PID 1 answers)."""
        if not self.pid1:
            assert self.nspawn is not None
            with contextlib.suppress(psutil.NoSuchProcess):
                children = psutil.Process(self.nspawn.pid).children()
                self.pid1 = children[0].pid if children and children[0].name() == "systemd" else 0
            if not self.pid1:
                return ""
        return self.run("systemctl", "is-system-running", check=False).stdout.strip()

    def run(self, *command: str, check: bool = True, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        """A command inside, in every namespace of the container (root, as the container's root)."""
        result = subprocess.run(["nsenter", "-t", str(self.pid1), "-a", *command], capture_output=True,
                                text=True, timeout=timeout)
        if check and result.returncode != 0:
            raise AssertionError(f"{' '.join(command)} exited {result.returncode}: {result.stderr}{result.stdout}")
        return result

    def host_pid(self, pid: int) -> int:
        """The host's pid of the container's process `pid` (the last field of NSpid is the inner one)."""
        for proc in psutil.Process(self.pid1).children(recursive=True):
            with contextlib.suppress(psutil.NoSuchProcess, FileNotFoundError):
                status = Path(f"/proc/{proc.pid}/status").read_text()
                if next(line for line in status.splitlines() if line.startswith("NSpid:")).split()[-1] == str(pid):
                    return proc.pid
        raise AssertionError(f"no process {pid} in the container")

    @contextlib.contextmanager
    def network(self) -> Iterator[None]:
        """The calling thread (and what it starts meanwhile) in the container's network namespace."""
        with netns_of(self.pid1):
            yield

    def console(self) -> str:
        return (self.folder / "console.log").read_text(errors="replace")[-4000:]

    def halt(self, timeout: float = 30) -> None:
        """SIGTERM to nspawn halts the container (systemd's orderly shutdown); SIGKILL if it hangs."""
        if self.nspawn is not None:
            self.nspawn.send_signal(signal.SIGTERM)
            try:
                self.nspawn.wait(timeout)
            except subprocess.TimeoutExpired:
                self.nspawn.kill()
                self.nspawn.wait()
        for cgroup in self.cgroups:
            if cgroup.exists():
                for sub in sorted((p for p in cgroup.rglob("*") if p.is_dir()), key=lambda p: -len(p.parts)):
                    _remove(sub)
                _remove(cgroup)


def _remove(cgroup: Path, timeout: float = 10) -> None:
    """rmdir a cgroup whose processes are gone: a v1 hierarchy says EBUSY for a moment after they are."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            cgroup.rmdir()
            return
        except OSError as exc:
            if exc.errno != errno.EBUSY or time.monotonic() > deadline:
                raise
            time.sleep(0.05)
