"""The footprint part: the master's resident memory with and without a `tls:` program, and what
`supervisorctl status` costs next to a bare start of the same interpreter (the goals:
cryptography only loaded for TLS; status at most about twice `python -c pass`)."""

from __future__ import annotations

import os
import statistics
import subprocess
import time
import urllib.request
from pathlib import Path
from typing import Any

import psutil
import trustme
import yaml

from tests import harness

METRICS_PORT = 9150
SETTLE = 1.0  # seconds a started master runs before its RSS is read (the first status, imports done)


def footprint(spec: dict[str, Any], folder: Path) -> dict[str, Any]:
    rss: dict[str, list[float]] = {"plain": [], "tls": [], "metrics": []}
    for run in range(spec["rounds"]):
        for mode in rss:
            rss[mode].append(master_rss(folder / f"{mode}-{run}", mode))
    (folder / "ctl").mkdir()
    sup = harness.Supervisor(folder / "ctl", {"web": harness.program(workers=1)}).start()
    ctl = str(harness.BIN / "supervisorctl")
    commands = {"python -c pass": [harness.PYTHON, "-c", "pass"],
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
    return {"scenario": "footprint", "rounds": spec["rounds"], "runs": spec["runs"],
            "master_rss_mib": {mode: round(statistics.median(v) / 2**20, 1) for mode, v in rss.items()},
            "ctl_ms": ms,
            "status_to_bare": {key: round(ms["supervisorctl status"][key] / bare[key], 2) for key in bare},
            "socket_status_to_bare": {key: round(ms["supervisorctl -s SOCKET status"][key] / bare[key], 2)
                                      for key in bare}}


def master_rss(folder: Path, mode: str) -> float:
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
