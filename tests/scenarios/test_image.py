"""The container image, built from the Dockerfile by a real OCI builder (podman) and run: the demo serves,
the HEALTHCHECK passes, a reload under 64 requests in flight loses none, and `podman stop` (SIGTERM to
PID 1, KILL after the grace period) ends it with status 0 well within that period.

No registry is reachable here, so the base is made from Debian's packages (mmdebstrap: bookworm with
python3 and python3-venv, the Dockerfile's two needs) and passed as the BASE build argument. It is
kept in /var/tmp, keyed by its recipe, with podman's own store (its layers cache the build): the
first run takes a minute more, the next ones build only what changed.

Podman runs with a store and a containers.conf of the test's own, not the machine's: runc where the
cgroups are hybrid (crun refuses them), no default sysctls (podman's ping_group_range is not needed), and
explicit ulimits (podman's default nofile of 1048576 needs CAP_SYS_RESOURCE, which a container-run CI
may lack)."""

from __future__ import annotations

import hashlib
import json
import os
import resource
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from supervisor import __version__
from tests.harness import request, wait_for
from tests.load import Clients
from tests.netns import netns_of

pytestmark = pytest.mark.usefixtures("netns")
ROOT = Path(__file__).resolve().parents[2]
CACHE = Path("/var/tmp/reuseport-supervisor-tests")
RUNROOT = "/run/reuseport-supervisor-tests"  # podman's state of running containers (and its tmp_dir): not the host's
MIRROR = "http://deb.debian.org/debian"
BASE_RECIPE = ["--variant=minbase", "--include=python3,python3-venv", "bookworm"]
CONFIG = "/etc/reuseport-supervisor/supervisor.yaml"
GRACE = 30  # podman stop -t: what Kubernetes' terminationGracePeriodSeconds is by default


class Podman:
    """podman with the test's store and settings; every call checked unless told otherwise."""

    def __init__(self) -> None:
        CACHE.mkdir(parents=True, exist_ok=True)
        conf = CACHE / "containers.conf"
        runtime = "runc" if Path("/sys/fs/cgroup/unified").is_dir() else "crun"  # hybrid cgroups: crun refuses
        conf.write_text(f'[containers]\ndefault_sysctls = []\n[engine]\nruntime = "{runtime}"\n'
                        f'cgroup_manager = "cgroupfs"\nevents_logger = "file"\ntmp_dir = "{RUNROOT}/libpod"\n'
                        '[network]\nnetwork_backend = "netavark"\n')
        self.env = {**os.environ, "CONTAINERS_CONF": str(conf)}
        overlay_below = subprocess.run(["stat", "-f", "-c", "%T", str(CACHE)], capture_output=True, text=True)
        driver = "vfs" if overlay_below.stdout.strip() == "overlayfs" else "overlay"  # no overlay on overlay
        self.base = ["podman", "--root", str(CACHE / f"store-{driver}"), "--runroot", RUNROOT,
                     "--storage-driver", driver]

    def __call__(self, *args: str, check: bool = True, timeout: float = 600) -> subprocess.CompletedProcess[str]:
        done = subprocess.run([*self.base, *args], env=self.env, capture_output=True, text=True, timeout=timeout)
        if check and done.returncode != 0:
            raise AssertionError(f"podman {' '.join(args)}: exit {done.returncode}\n{done.stderr[-3000:]}")
        return done


def base_image(podman: Podman) -> str:
    """The Debian base, made once per recipe (~30 s and 225 MB) and imported into the store once."""
    key = hashlib.sha256(" ".join([*BASE_RECIPE, MIRROR]).encode()).hexdigest()[:12]
    name = f"localhost/reuseport-supervisor-base:{key}"
    if podman("image", "exists", name, check=False).returncode == 0:
        return name
    tar = CACHE / f"base-{key}.tar"
    if not tar.exists():
        partial = tar.with_suffix(".partial")
        subprocess.run(["mmdebstrap", "--quiet", "--format=tar", *BASE_RECIPE, str(partial), MIRROR],
                       check=True, timeout=900, capture_output=True)
        partial.rename(tar)
    podman("import", "--quiet", str(tar), name)
    return name


@pytest.fixture(scope="module")
def image() -> Iterator[tuple[Podman, str]]:
    """Built from the repository's Dockerfile as a user would, with BASE set. The build runs in the host's
    network namespace (pip fetches the dependencies) and trusts the certificates the host trusts (a
    TLS-inspecting proxy on the way to PyPI: Debian's pip reads the system bundle)."""
    missing = [tool for tool in ("podman", "mmdebstrap") if shutil.which(tool) is None]
    if missing:
        message = f"{', '.join(missing)} not installed (make debian-packages installs them)"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)
    podman = Podman()
    started = time.monotonic()
    base = base_image(podman)  # a module fixture: set up before the test's private namespace
    tag = f"localhost/reuseport-supervisor:{__version__}-test"
    podman("build", "--quiet", "--format", "docker", "--network", "host", "--build-arg", f"BASE={base}",
           "--volume", "/etc/ssl/certs/ca-certificates.crt:/etc/ssl/certs/ca-certificates.crt:ro",
           "--tag", tag, str(ROOT))
    podman("image", "prune", "--force")  # the layers of earlier builds: the cache must not grow per run
    print(f"base and image: {time.monotonic() - started:.1f} s")
    yield podman, tag


def test_the_image_serves_reloads_under_load_and_stops_on_sigterm(image: tuple[Podman, str]) -> None:
    podman, tag = image
    built = json.loads(podman("image", "inspect", tag).stdout)[0]
    config, check = built["Config"], built["Healthcheck"]["Test"]  # docker format: OCI has no HEALTHCHECK
    assert check[0] == "CMD" and "http://127.0.0.1:9150/healthz" in check[-1], check
    assert config["User"] == "supervisor" and config["Entrypoint"] == ["supervisord", "-c", CONFIG]
    version = podman("run", "--rm", "--network", "none", *_ulimits(), tag, "--version")
    assert version.stdout == f"reuseport-supervisor {__version__}\n", version

    name = f"reuseport-supervisor-test-{os.getpid()}"
    podman("run", "--detach", "--name", name, "--network", "none", "--sysctl", "net.ipv4.tcp_migrate_req=1",
           "--health-interval", "disable", *_ulimits(), tag)
    try:
        pid = int(podman("inspect", "--format", "{{.State.Pid}}", name).stdout)
        with netns_of(pid):
            wait_for("the demo serving in the container", lambda: _answers(), timeout=20)
            wait_for("the HEALTHCHECK passing", lambda: podman("healthcheck", "run", name, check=False).returncode == 0)
            where = podman("exec", name, "python", "-c", "import supervisor.demo as d; print(d.__file__)").stdout
            assert where.startswith("/opt/reuseport-supervisor/venv/lib/"), where  # what the workers import
            with Clients("127.0.0.1:8000", concurrency=64, seconds=30) as load:
                time.sleep(1.0)
                reload = podman("exec", name, "supervisorctl", "-c", CONFIG, "reload", timeout=60)
                assert "reload done" in reload.stdout, reload
                time.sleep(1.0)
                tally = load.finish()
        assert not tally.failures, tally.failures[:5]
        assert tally.ok > 200 and {1, 2} <= set(tally.generations), (tally.ok, tally.generations)
        events = [json.loads(line) for line in podman("logs", name).stderr.splitlines() if line.startswith("{")]
        migration = next(e for e in events if e["event"] == "migration")
        assert migration["enabled"], f"--sysctl did not reach supervisord in the container: {migration}"

        started = time.monotonic()
        podman("stop", "--time", str(GRACE), name, timeout=GRACE + 30)
        took = time.monotonic() - started
        state = json.loads(podman("inspect", name).stdout)[0]["State"]
        assert state["ExitCode"] == 0 and took < GRACE / 2, (state["ExitCode"], took)
        assert '"event": "supervisord_stopped"' in podman("logs", name).stderr  # its own graceful stop, not a KILL
        print(f"reload under load: {tally.ok} answers, none lost; podman stop: {took:.2f} s")
    finally:
        podman("rm", "--force", name, check=False)


def test_a_configmap_edit_reloads_the_container_by_itself(image: tuple[Podman, str]) -> None:
    """The Kubernetes recipe (deploy/kubernetes/): the config mounted as a folder laid out as the kubelet
    lays out a ConfigMap volume (`supervisor.yaml -> ..data/supervisor.yaml`, `..data -> ..<version>`)
    lists itself under `watch:`; swapping `..data` to a version with 3 workers reloads the container's
    supervisord by itself, the demo serving throughout."""
    podman, tag = image
    volume = CACHE / f"configmap-{os.getpid()}"  # not under /tmp/pytest-of-root (0700): uid 10001 reads it
    text = (ROOT / "config" / "container.yaml").read_text() + f"watch: [{CONFIG}]\n"
    _configmap(volume, "..v1", text)
    os.symlink("..data/supervisor.yaml", volume / "supervisor.yaml")
    name = f"reuseport-supervisor-configmap-{os.getpid()}"
    podman("run", "--detach", "--name", name, "--network", "none", "--health-interval", "disable",
           "--volume", f"{volume}:{Path(CONFIG).parent}:ro", *_ulimits(), tag)
    try:
        with netns_of(int(podman("inspect", "--format", "{{.State.Pid}}", name).stdout)):
            wait_for("the demo serving in the container", lambda: _answers(), timeout=20)
            _configmap(volume, "..v2", text.replace("workers: 2", "workers: 3"))
            wait_for("generation 2 with 3 workers", lambda: _workers(podman, name) == (2, 3), timeout=20)
            assert _answers()
    finally:
        podman("rm", "--force", name, check=False)
        shutil.rmtree(volume, ignore_errors=True)


def _configmap(volume: Path, version: str, text: str) -> None:
    """Write a version of the volume and point `..data` at it with one rename, as the kubelet does."""
    (volume / version).mkdir(parents=True)
    (volume / version / "supervisor.yaml").write_text(text)
    (volume / "..data_tmp").symlink_to(version)
    (volume / "..data_tmp").rename(volume / "..data")


def _workers(podman: Podman, name: str) -> tuple[int, int]:
    """(serving generation, its workers) of the program `web`, as `supervisorctl status --json` says."""
    done = podman("exec", name, "supervisorctl", "-c", CONFIG, "status", "--json", check=False)
    if done.returncode != 0:
        return (0, 0)
    [web] = [p for p in json.loads(done.stdout)["programs"] if p["name"] == "web"]
    serving = next((g["generation"] for g in web["generations"] if g["state"] == "serving"), 0)
    return (serving, sum(w["generation"] == serving for w in web["workers"]))


def _ulimits() -> list[str]:
    """The limits this process has (podman's defaults are higher, and raising needs CAP_SYS_RESOURCE)."""
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    return ["--ulimit", f"nofile={hard}:{hard}", "--ulimit", "nproc=4096:4096"]


def _answers() -> bool:
    try:
        return request()[0] == 200
    except OSError:
        return False
