"""The `latency` part of the benchmark: how long a reload of an idle program takes, where the time goes,
beside `nginx -s reload` and the goals.

- `reload_latency`: one system, `reloads` reloads, each once the last one has settled (its old workers
  gone; under `preload:` every template ready, the spare too). nginx: the wall time of `nginx -s
  reload` (it returns once the master has the signal, before its new workers serve). Ours, per row
  (workers, `preload:` with or without the spare, or spawned workers): the daemon's own figure
  (`reload done in N ms`, from the config read to the old listeners shut), the wall time of the
  control request (what `supervisorctl reload` waits for, without its interpreter start), the wall
  time of `supervisorctl reload` itself (from a plain-path install: footprint.installed), and the
  daemon's `phases` (config, spawn, ready, switch).
"""

from __future__ import annotations

import statistics
import subprocess
import time
from pathlib import Path
from typing import Any

from bench import footprint, kernel, preload, systems

# Goals, each with the row it is read from: (label, workers, mode, figure, bound, what the bound is).
SPARE_RATIO = 6.0  # a 2-worker `preload:` reload within 6x `nginx -s reload`
OPERATOR_MS = 1000.0  # 64 workers with `preload:` as the operator sees it (supervisorctl reload)
MODES = ("spare", "preload", "spawned")  # preload with its spare, preload without one, no preload
SETTLE = 0.2  # seconds of quiet after a reload has settled, before the next one


def reload_latency(spec: dict[str, Any], folder: Path) -> dict[str, Any]:
    kernel.set_migrate(1)
    if spec["system"] == "nginx":
        return nginx_latency(spec, folder)
    mode = spec["mode"]
    program: dict[str, Any] = {"stop_delay": 0.1}
    if mode != "spawned":
        program.update(preload=["supervisor.demo"], preload_spare=mode == "spare")
    server = systems.Supervisor(folder, workers=spec["workers"], backlog=spec["backlog"], program=program)
    server.start()
    runs: list[dict[str, Any]] = []
    try:
        for _ in range(spec["reloads"]):
            settle(server, spec["workers"])
            started = time.monotonic()
            data = server.request("reload")
            request_ms = (time.monotonic() - started) * 1000
            runs.append({"daemon_ms": data["ms"], "request_ms": round(request_ms, 1), "phases": data["phases"]})
        assert server.sup is not None
        server.sup.bin = footprint.installed(folder / "install")  # the command as a wheel install has it
        for run in runs[: spec["ctl_reloads"]]:
            settle(server, spec["workers"])
            started = time.monotonic()
            result = server.sup.ctl("reload")
            run["ctl_ms"] = round((time.monotonic() - started) * 1000, 1)
            assert result.returncode == 0, result.stderr
    finally:
        server.stop()
    phases = {name: statistics.median(r["phases"].get(name, 0.0) for r in runs) for name in runs[0]["phases"]}
    return {"scenario": "reload_latency", "system": "supervisor", "mode": mode, "workers": spec["workers"],
            "reloads": len(runs), "daemon_ms": median(runs, "daemon_ms"), "request_ms": median(runs, "request_ms"),
            "ctl_ms": median([r for r in runs if "ctl_ms" in r], "ctl_ms"), "phases": phases, "runs": runs}


def nginx_latency(spec: dict[str, Any], folder: Path) -> dict[str, Any]:
    server = systems.Nginx(folder, workers=spec["workers"], backlog=spec["backlog"])
    server.start()
    times = []
    try:
        for _ in range(spec["reloads"]):
            time.sleep(SETTLE * 2)  # its last reload's new workers started, the old ones gone
            started = time.monotonic()
            subprocess.run([*server.command(), "-s", "reload"], check=True, capture_output=True)
            times.append(round((time.monotonic() - started) * 1000, 1))
    finally:
        server.stop()
    return {"scenario": "reload_latency", "system": "nginx", "mode": "-s reload", "workers": spec["workers"],
            "reloads": len(times), "ctl_ms": statistics.median(times), "runs": times}


def settle(server: systems.Supervisor, workers: int, timeout: float = 60.0) -> None:
    """Until only the serving generation's workers are left and every template started is ready."""
    assert server.sup is not None
    sup = server.sup
    preload.steady(server, workers, timeout)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        started = {e["pid"] for e in sup.events("template_started")}
        if started <= {e["pid"] for e in sup.events("template_ready")}:
            break
        time.sleep(0.05)
    time.sleep(SETTLE)


def median(runs: list[dict[str, Any]], key: str) -> float | None:
    values = [r[key] for r in runs if r.get(key) is not None]
    return round(statistics.median(values), 1) if values else None


def tables(results: list[dict[str, Any]], table: Any) -> str:
    rows = [r for r in results if r["scenario"] == "reload_latency"]
    if not rows:
        return ""
    nginx = next((r["ctl_ms"] for r in rows if r["system"] == "nginx"), None)
    out = [f"\nReload latency of an idle program, median of {rows[0]['reloads']} reloads, ms: the daemon's own "
           "figure, the control request's wall time (without supervisorctl's start), `supervisorctl reload`'s "
           "wall time, and where the daemon's time went (config read; spawn: every worker asked for; ready: "
           "until the last is ready; switch: old listeners shut and the answer):\n\n"]
    body = []
    for r in sorted(rows, key=lambda r: (r["system"], r["workers"], r["mode"])):
        phases = r.get("phases") or {}
        body.append([r["system"], r["workers"], r["mode"], r.get("daemon_ms", "-"), r.get("request_ms", "-"),
                     r.get("ctl_ms", "-"), " / ".join(f"{phases.get(p, 0):g}" for p in ("config", "spawn", "ready",
                                                                                          "switch")) or "-"])
    out.append(table(["system", "workers", "mode", "daemon", "request", "supervisorctl",
                      "config / spawn / ready / switch"], body))
    goals = []
    spare = next((r for r in rows if r["system"] == "supervisor" and r["workers"] == 2 and r["mode"] == "spare"), None)
    if spare and nginx:
        goals.append(["2 workers, `preload:`, code unchanged: daemon figure", f"{spare['daemon_ms']:g} ms",
                      f"{spare['daemon_ms'] / nginx:.1f}x `nginx -s reload` ({nginx:g} ms)",
                      f"<= {SPARE_RATIO:g}x"])
        goals.append(["the same: control request", f"{spare['request_ms']:g} ms",
                      f"{spare['request_ms'] / nginx:.1f}x", f"<= {SPARE_RATIO:g}x"])
    big = next((r for r in rows if r["system"] == "supervisor" and r["workers"] == 64 and r["mode"] == "spare"), None)
    if big and big.get("ctl_ms") is not None:
        goals.append(["64 workers, `preload:`: `supervisorctl reload`", f"{big['ctl_ms']:g} ms", "",
                      f"< {OPERATOR_MS:g} ms"])
    if goals:
        out.append("\nAgainst the goals:\n\n")
        out.append(table(["figure", "measured", "ratio", "goal"], goals))
    out.append("\nCommand: `python -m bench --only latency`\n")
    return "".join(out)
