"""The `preload` part of the benchmark: what a reload costs in time and memory, with and without
forking workers from a per-generation template (`preload:`) and with `strategy: rolling`.

- `preload_reload`: reload time (the daemon's own: from the request to the old listeners closed) of
  the demo app with 1..64 workers, spawned (`python -m supervisor.demo` each) or forked from a
  template that imported the demo; each reload starts once the last one's old workers have exited.
- `memory`: a worker that holds a 64 MiB read-only "model" (`bench.bigmodel`), N workers; the
  program's memory as the sum of the proportional set size (PSS, /proc/PID/smaps_rollup) of every
  process below the master (workers, and the template under preload), sampled every 20 ms during
  reloads: the peak, and the steady value once the old workers are gone. Modes: `all-at-once` (a
  whole new generation, then the old one retires), `rolling` (batch 1), `preload` (all at once,
  forked from the template: the model's pages are shared copy-on-write).
"""

from __future__ import annotations

import statistics
import threading
import time
from pathlib import Path
from typing import Any

import psutil

from bench import kernel, systems
from tests.harness import PYTHON

MODEL_MIB = 64
SAMPLE = 0.02  # seconds between PSS samples


def preload_reload(spec: dict[str, Any], folder: Path) -> dict[str, Any]:
    kernel.set_migrate(1)
    program = {"preload": ["supervisor.demo"]} if spec["preload"] else {}
    server = systems.Supervisor(folder, workers=spec["workers"], backlog=spec["backlog"], program=program)
    server.start()
    try:
        times = []
        for _ in range(spec["reloads"]):
            # Each reload on a quiet program: the last one's old workers (and template) gone first.
            steady(server, spec["workers"])
            times.append(server.reload()["daemon_ms"])
    finally:
        server.stop()
    return {"scenario": "preload_reload", "workers": spec["workers"], "preload": spec["preload"],
            "reloads": len(times), "reload_ms": {"median": statistics.median(times), "min": min(times),
                                                 "max": max(times), "runs": times}}


def pss_mib(root: int) -> float:
    """The proportional set size of every process below `root`, in MiB."""
    total = 0
    try:
        tree = psutil.Process(root).children(recursive=True)
    except psutil.Error:
        return 0.0
    for proc in tree:
        try:
            with open(f"/proc/{proc.pid}/smaps_rollup") as f:
                total += next(int(line.split()[1]) for line in f if line.startswith("Pss:"))
        except (OSError, StopIteration):
            pass  # gone meanwhile
    return total / 1024


class PeakPss:
    """The highest PSS sum of the master's tree while it runs."""

    def __init__(self, master: int) -> None:
        self.master, self.peak = master, 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(SAMPLE):
            self.peak = max(self.peak, pss_mib(self.master))

    def __enter__(self) -> PeakPss:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=10)


def steady(server: systems.Supervisor, workers: int, timeout: float = 30.0) -> float:
    """The PSS sum once only the serving generation's workers (and its template) are left."""
    assert server.sup is not None and server.proc is not None
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and len(server.sup.workers()) != workers:
        time.sleep(0.05)
    time.sleep(0.3)  # the retired template's exit
    return pss_mib(server.proc.pid)


def memory(spec: dict[str, Any], folder: Path) -> dict[str, Any]:
    kernel.set_migrate(1)
    program: dict[str, Any] = {"command": [PYTHON, "-m", "bench.model_server"],
                               "cwd": str(systems.ROOT), "env": {"MODEL_MIB": str(spec["model_mib"])},
                               "stop_delay": 0.2}
    if spec["mode"] == "rolling":
        program.update(strategy="rolling", batch=1)
    if spec["mode"] == "preload":
        program["preload"] = ["bench.bigmodel", "supervisor.demo"]
    server = systems.Supervisor(folder, workers=spec["workers"], backlog=spec["backlog"], program=program)
    server.start()
    try:
        assert server.proc is not None
        steady_mib = [steady(server, spec["workers"])]
        peaks, times = [], []
        for _ in range(spec["reloads"]):
            with PeakPss(server.proc.pid) as sampler:
                times.append(server.reload()["daemon_ms"])
                steady_mib.append(steady(server, spec["workers"]))
            peaks.append(sampler.peak)
    finally:
        server.stop()
    return {"scenario": "memory", "mode": spec["mode"], "workers": spec["workers"], "model_mib": spec["model_mib"],
            "reloads": len(peaks), "peak_pss_mib": round(statistics.median(peaks), 1),
            "steady_pss_mib": round(statistics.median(steady_mib), 1), "reload_ms": statistics.median(times),
            "runs": {"peak": [round(p, 1) for p in peaks], "steady": [round(s, 1) for s in steady_mib]}}


def _cell(result: dict[str, Any] | None) -> str:
    if result is None:
        return "-"
    times = result["reload_ms"]
    return f"{times['median']:g} ({times['min']:g}-{times['max']:g})"


def tables(results: list[dict[str, Any]], table: Any) -> str:
    out = []
    reloads = [r for r in results if r["scenario"] == "preload_reload"]
    if reloads:
        rows = []
        for workers in sorted({r["workers"] for r in reloads}):
            spawned = next((r for r in reloads if r["workers"] == workers and not r["preload"]), None)
            forked = next((r for r in reloads if r["workers"] == workers and r["preload"]), None)
            ratio = (f"{spawned['reload_ms']['median'] / forked['reload_ms']['median']:.1f}x"
                     if spawned and forked else "-")
            rows.append([workers, _cell(spawned), _cell(forked), ratio])
        out.append(f"\nReload time of the demo app in ms, median (min-max) of {reloads[0]['reloads']} reloads: "
                   "workers spawned, or forked from a per-generation template (`preload:`):\n\n")
        out.append(table(["workers", "spawned", "preload", "gain"], rows))
    memory = [r for r in results if r["scenario"] == "memory"]
    if memory:
        first = memory[0]
        out.append(f"\nMemory of a program whose workers each load a {first['model_mib']} MiB model: sum of the "
                   f"PSS of its processes (workers, and the template under preload), median of "
                   f"{first['reloads']} reloads:\n\n")
        out.append(table(["strategy", "workers", "steady MiB", "peak during reload MiB", "reload ms"],
                         [[r["mode"], r["workers"], r["steady_pss_mib"], r["peak_pss_mib"], r["reload_ms"]]
                          for r in memory]))
    return "".join(out)
