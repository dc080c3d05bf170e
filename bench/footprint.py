"""The footprint part: the master's resident memory with and without a `tls:` program, what
`supervisorctl status` costs next to a bare start of the same interpreter, and what `supervisorctl
reload` adds to the daemon's own "done in" figure. Each figure goes beside its goal (GOALS) and the
command that produced it.

The package's modules are compiled first (`compileall`), as `pip install` does: a source tree run under
PYTHONDONTWRITEBYTECODE compiles every module at every start, which costs both time and memory.

Every command measured here runs from `installed()`, a venv that reaches the package and its
dependencies by plain path entries, as a `pip install` of the wheel does, and not from the development
venv: its editable install puts setuptools' import hook into every interpreter's start (the hook's
own import brings pathlib and re), which made `python -c pass` 40 ms against 13 ms here and hid what
supervisorctl's imports cost behind a slow bare start.
"""

from __future__ import annotations

import os
import re
import statistics
import subprocess
import sysconfig
import time
import tomllib
import urllib.request
from pathlib import Path
from typing import Any

import psutil
import trustme
import yaml

from tests import harness

ROOT = Path(__file__).resolve().parents[1]
METRICS_PORT = 9150
SETTLE = 1.0  # seconds a started master runs before its RSS is read (the first status, imports done)
GOALS = {"master_rss_mib": 25.0, "status_to_bare": 2.0, "reload_over_daemon_ms": 20.0}
# The floor under the master's RSS: the interpreter with the dependencies the master cannot do without
# imported as it imports them (asyncio and structlog without ssl: supervisor/system/openssl.py) and an
# event loop run, nothing of this package.
FLOOR = ("import sys\nsys.modules['ssl'] = None\nimport asyncio, structlog\ndel sys.modules['ssl']\n"
         "import argparse, psutil, yaml\n"
         f"asyncio.run(asyncio.sleep({SETTLE}))\n"
         "print(next(int(l.split()[1]) for l in open('/proc/self/status') if l.startswith('VmRSS:')) * 1024)")


def installed(folder: Path) -> Path:
    """A venv with this package and its dependencies on plain path entries (a .pth: the repository,
    then the development venv's site-packages, whose own .pth files are not run), and the two commands
    as pip writes them for a wheel; its bin folder. No network: the benchmark runs in a namespace of
    its own."""
    venv = folder / "venv"
    folder.mkdir(parents=True, exist_ok=True)
    subprocess.run([harness.PYTHON, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    python = venv / "bin" / "python"
    site = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                          capture_output=True, text=True, check=True).stdout.strip()
    Path(site, "reuseport_supervisor.pth").write_text(f"{ROOT}\n{sysconfig.get_path('purelib')}\n")
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    for name, entry in scripts.items():
        module, function = entry.split(":")
        script = venv / "bin" / name
        script.write_text(f"#!{python}\nimport sys\nfrom {module} import {function}\n"
                          f"if __name__ == '__main__':\n    sys.argv[0] = sys.argv[0].removesuffix('.exe')\n"
                          f"    sys.exit({function}())\n")
        script.chmod(0o755)
    return venv / "bin"


def footprint(spec: dict[str, Any], folder: Path) -> dict[str, Any]:
    subprocess.run([harness.PYTHON, "-m", "compileall", "-q", str(ROOT / "supervisor")], check=True,
                   stdout=subprocess.DEVNULL)
    bin_ = installed(folder)
    rss: dict[str, list[float]] = {"plain": [], "tls": [], "metrics": [], "floor": []}
    for run in range(spec["rounds"]):
        for mode in rss:
            rss[mode].append(floor_rss(bin_) if mode == "floor" else master_rss(folder / f"{mode}-{run}", mode, bin_))
    (folder / "ctl").mkdir()
    sup = harness.Supervisor(folder / "ctl", {"web": harness.program(workers=1)})
    sup.bin = bin_
    sup.start()
    ctl = str(bin_ / "supervisorctl")
    commands = {"python -c pass": [str(bin_ / "python"), "-c", "pass"],
                "supervisorctl status": [ctl, "-c", str(sup.config), "status"],
                "supervisorctl -s SOCKET status": [ctl, "-s", str(sup.socket), "status"]}
    times: dict[str, list[tuple[float, float]]] = {name: [] for name in commands}
    try:
        for _ in range(spec["runs"]):  # interleaved: both see the same load on the machine
            for name, command in commands.items():
                times[name].append(run_once(command))
    finally:
        sup.kill()
    # Wall time, and CPU time (user + system of the process), which other jobs on the machine disturb less.
    ms = {name: {f"{kind}_{stat}": round(fn([t[i] for t in runs]) * 1000, 1)
                 for i, kind in enumerate(("wall", "cpu")) for stat, fn in (("min", min), ("p50", statistics.median))}
          for name, runs in times.items()}
    bare = ms["python -c pass"]
    reload = {str(n): reload_overhead(folder / f"reload-{n}", n, spec["reloads"], bin_)
              for n in spec["reload_workers"]}
    return {"scenario": "footprint", "rounds": spec["rounds"], "runs": spec["runs"], "goals": GOALS,
            "commands": {"master": "supervisord -c CONFIG (one demo worker; RSS of the master, "
                                   f"{SETTLE:g} s after it serves)",
                         "floor": f"{bin_ / 'python'} -c {FLOOR!r}",
                         "install": "a venv with the package on a plain path entry, as a wheel install has it "
                                    "(bench/footprint.py installed())",
                         **{name: " ".join(command) for name, command in commands.items()},
                         "reload": f"{ctl} -c CONFIG reload (wall time) against its 'done in N ms'"},
            "master_rss_mib": {mode: round(statistics.median(v) / 2**20, 1) for mode, v in rss.items()},
            "reload_over_daemon_ms": reload,
            "ctl_ms": ms,
            "status_to_bare": {key: round(ms["supervisorctl status"][key] / bare[key], 2) for key in bare},
            "socket_status_to_bare": {key: round(ms["supervisorctl -s SOCKET status"][key] / bare[key], 2)
                                      for key in bare}}


def master_rss(folder: Path, mode: str, bin_: Path) -> float:
    """The resident bytes of a master serving one demo worker: `plain`; `tls` (with a certificate);
    `metrics` (with the metrics endpoint, scraped once: prometheus_client loaded)."""
    folder.mkdir(parents=True)
    settings: dict[str, Any] = {"workers": 1}
    if mode == "tls":
        leaf = trustme.CA().issue_cert("localhost")
        leaf.cert_chain_pems[0].write_to_path(str(folder / "cert.pem"))
        leaf.private_key_pem.write_to_path(str(folder / "key.pem"))
        settings["tls"] = {"cert": str(folder / "cert.pem"), "key": str(folder / "key.pem")}
    sup = harness.Supervisor(folder, {"web": harness.program(**settings)})
    sup.bin = bin_
    if mode == "metrics":
        doc = yaml.safe_load(sup.config.read_text())
        sup.config.write_text(yaml.safe_dump({**doc, "metrics": {"listen": f"127.0.0.1:{METRICS_PORT}"}}))
    sup.start()
    try:
        if mode == "metrics":
            urllib.request.urlopen(f"http://127.0.0.1:{METRICS_PORT}/metrics", timeout=10).read()
        time.sleep(SETTLE)
        assert sup.proc is not None
        return float(psutil.Process(sup.proc.pid).memory_info().rss)
    finally:
        sup.kill()


def floor_rss(bin_: Path) -> float:
    """The resident bytes of an interpreter that imported the master's dependencies and ran a loop."""
    out = subprocess.run([str(bin_ / "python"), "-c", FLOOR], capture_output=True, text=True, check=True).stdout
    return float(out.split()[-1])


def reload_overhead(folder: Path, workers: int, reloads: int, bin_: Path) -> dict[str, Any]:
    """`supervisorctl -c CONFIG reload` of `workers` demo workers: its wall time, the daemon's own figure
    ("done in N ms", from the request taken to the old listeners closed) and the difference, which is
    what the command adds (its start, the config read and checked, the answer's way back)."""
    folder.mkdir(parents=True)
    sup = harness.Supervisor(folder, {"web": harness.program(workers=workers)})
    sup.bin = bin_
    sup.start(timeout=120)
    ctl = [str(bin_ / "supervisorctl"), "-c", str(sup.config), "reload"]
    over, walls, daemons = [], [], []
    try:
        for _ in range(reloads):
            harness.wait_for("the old generation gone", lambda: len(sup.workers()) == workers, timeout=60)
            started = time.perf_counter()
            done = subprocess.run(ctl, capture_output=True, text=True, timeout=300)
            wall = (time.perf_counter() - started) * 1000
            figure = re.search(r"done in (\d+) ms", done.stdout)
            if done.returncode != 0 or figure is None:
                raise RuntimeError(f"{ctl} exited {done.returncode}: {done.stdout} {done.stderr}")
            walls.append(wall)
            daemons.append(float(figure.group(1)))
            over.append(wall - daemons[-1])
    finally:
        sup.kill()
    return {"n": reloads, "over_min": round(min(over), 1), "over_p50": round(statistics.median(over), 1),
            "over_max": round(max(over), 1),
            "wall_p50": round(statistics.median(walls), 1), "daemon_p50": round(statistics.median(daemons), 1)}


def run_once(command: list[str]) -> tuple[float, float]:
    """Wall seconds and CPU seconds (user + system) of one run of `command`."""
    started = time.perf_counter()
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL)
    _pid, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - started
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise RuntimeError(f"{command} exited {proc.returncode}")
    return wall, usage.ru_utime + usage.ru_stime
