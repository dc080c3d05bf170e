"""`metrics:` /metrics, /healthz and /readyz, scraped with prometheus_client's own parser while the
master reloads under load, restarts a crashed worker and scales down."""

from __future__ import annotations

import datetime
import os
import signal
import socket
import time
from pathlib import Path
from typing import Any

import pytest
import trustme
import yaml
from prometheus_client.parser import text_string_to_metric_families

from tests.harness import (
    Supervisor,
    collect,
    kernel_counters,
    open_requests,
    parse_response,
    program,
    read_all,
    wait_for,
)
from tests.load import Clients
from tests.scenarios.test_tls import tls_program, write_cert

pytestmark = pytest.mark.usefixtures("netns")
METRICS = ("127.0.0.1", 9150)


def with_metrics(sup: Supervisor, address: str = "127.0.0.1:9150") -> Supervisor:
    doc = yaml.safe_load(sup.config.read_text())
    doc["metrics"] = {"listen": address}
    sup.config.write_text(yaml.safe_dump(doc, sort_keys=False))
    return sup


def get(path: str, address: tuple[str, int] = METRICS) -> tuple[int, str]:
    with socket.create_connection(address, timeout=10) as sock:
        sock.sendall(f"GET {path} HTTP/1.1\r\nHost: test\r\n\r\n".encode())
        raw = read_all(sock)
    code, _ = parse_response(raw)
    return code, raw.partition(b"\r\n\r\n")[2].decode()


def raw(request: bytes) -> bytes:
    with socket.create_connection(METRICS, timeout=10) as sock:
        sock.sendall(request)
        try:
            return read_all(sock)
        except ConnectionResetError:  # closed with the rest of the request unread
            return b""


def scrape(address: tuple[str, int] = METRICS) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of /metrics: (name, sorted labels) -> value."""
    code, body = get("/metrics", address)
    assert code == 200, body
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(body) for s in family.samples}


def value(samples: dict[Any, float], name: str, **labels: str) -> float:
    return samples[(name, tuple(sorted(labels.items())))]


def assert_kernel_counts(samples: dict[Any, float]) -> None:
    """Nothing migrates between the scrape and this read (no reload, crash or scale in between)."""
    kernel = kernel_counters()
    assert value(samples, "supervisor_connections_migrated_total") == kernel["TCPMigrateReqSuccess"]
    assert value(samples, "supervisor_migrate_failures_total") == kernel["TCPMigrateReqFailure"]
    assert value(samples, "supervisor_listen_overflows_total") == kernel["ListenOverflows"]


def test_metrics_follow_reloads_crashes_and_scale_under_load(tmp_path: Path) -> None:
    ca = trustme.CA()
    certs = tmp_path / "certs"
    certs.mkdir()
    write_cert(ca, certs)
    not_after = trustme_not_after(certs / "cert.pem")
    sup = with_metrics(Supervisor(tmp_path, {
        # per-worker queues: a crashed worker's queue migrates to its siblings, which the metric counts
        "web": program(workers=3, stop_delay=0.2, accept_queue="per-worker"),
        "secure": tls_program(certs, workers=1, listen=["127.0.0.1:8443"]),
    }))
    try:
        sup.start()
        before = scrape()
        assert value(before, "supervisor_info", version=sup.status()["version"]) == 1
        assert value(before, "supervisor_generation", program="web") == 1
        assert value(before, "supervisor_workers", program="web", state="ready") == 3
        assert value(before, "supervisor_listen_queue", program="web", address="127.0.0.1:8000") >= 0
        assert value(before, "supervisor_tls_cert_not_after_timestamp_seconds", program="secure") == not_after
        assert value(before, "supervisor_worker_resident_memory_bytes", program="web") > 1 << 20
        assert_kernel_counts(before)
        with Clients("127.0.0.1:8000", concurrency=64, seconds=60) as load:
            wait_for("the load", lambda: sup.ctl("status").returncode == 0)
            sup.reload()
            tally = load.finish()
        after_reload = scrape()
        assert_kernel_counts(after_reload)
        # A crash with connections queued: the worker frozen first, so that all it holds is its queue.
        victim = next(w["pid"] for w in sup.workers() if w["generation"] == 2 and w["state"] == "ready")
        os.kill(victim, signal.SIGSTOP)
        socks = open_requests(150)
        # What hashed to the frozen worker's listener waits in its accept queue, as the kernel says.
        frozen = value(scrape(), "supervisor_listen_queue", program="web", address="127.0.0.1:8000")
        os.kill(victim, signal.SIGKILL)
        outcomes, _ = collect(socks)
        wait_for("the crashed worker replaced", lambda: sup.replaced(victim, 3))
        after_crash = scrape()
        assert_kernel_counts(after_crash)
        assert sup.ctl("scale", "web", "2").returncode == 0
        wait_for("scaled down", lambda: len(sup.workers()) == 2)
        samples = scrape()
        assert_kernel_counts(samples)
    finally:
        sup.kill()
    assert not tally.failures and tally.ok > 100, tally.failures[:5]
    assert dict(outcomes) == {"ok": 150}
    assert 0 < frozen <= 150
    assert value(after_reload, "supervisor_reloads_total", result="done") == 1
    assert value(after_reload, "supervisor_reload_duration_seconds_count") == 1
    assert 0 < value(after_reload, "supervisor_reload_duration_seconds_sum") < 30
    assert value(after_reload, "supervisor_generation", program="web") == 2
    # The frozen worker's queue migrated to its siblings, and the metric is the kernel's count of it.
    assert value(after_crash, "supervisor_connections_migrated_total") > value(
        after_reload, "supervisor_connections_migrated_total")
    assert value(after_crash, "supervisor_worker_restarts_total", program="web") == 1
    assert value(samples, "supervisor_workers", program="web", state="ready") == 2
    assert value(samples, "supervisor_program_fatal", program="web") == 0


def trustme_not_after(cert: Path) -> float:
    from cryptography import x509

    return x509.load_pem_x509_certificate(cert.read_bytes()).not_valid_after_utc.timestamp()


def openssl_mapped(pid: int) -> set[str]:
    """OpenSSL's libraries in the memory map of process `pid`."""
    return {line.split()[-1] for line in Path(f"/proc/{pid}/maps").read_text().splitlines()
            if "libssl" in line or "libcrypto" in line}


def test_the_master_runs_without_openssl_and_still_scrapes(tmp_path: Path) -> None:
    """supervisord speaks no TLS: a master without a `tls:` program maps neither libssl nor libcrypto
    (system/openssl.py), and reloads so. The first scrape imports prometheus_client, which imports ssl:
    that import still works."""
    sup = with_metrics(Supervisor(tmp_path, {"web": program(workers=1)})).start()
    try:
        assert sup.proc is not None
        assert openssl_mapped(sup.proc.pid) == set()
        assert get("/healthz") == (200, "ok\n")
        assert "reload done" in sup.reload().stdout
        assert openssl_mapped(sup.proc.pid) == set()
        assert value(scrape(), "supervisor_program_fatal", program="web") == 0
    finally:
        sup.kill()


def test_readyz_follows_fatal_stop_and_start(tmp_path: Path) -> None:
    """503 while a program is FATAL or stopping, with the reason; 200 once it serves again (or is stopped)."""
    sup = with_metrics(Supervisor(tmp_path, {
        "web": program(workers=1),
        "api": program(workers=1, listen=["127.0.0.1:8001"], crash_limit=1, stop_delay=3),
    }))
    try:
        sup.start()
        assert get("/healthz") == (200, "ok\n")
        assert get("/readyz") == (200, "ready\n")
        assert get("/nothing")[0] == 404
        assert raw(b"POST /metrics HTTP/1.1\r\n\r\n").startswith(b"HTTP/1.1 405 ")
        assert raw(b"HEAD /healthz HTTP/1.1\r\n\r\n").endswith(b"Connection: close\r\n\r\n")
        assert raw(b"GET /" + b"x" * 9000 + b" HTTP/1.1\r\n\r\n") == b""  # a head over 8 KiB: closed unanswered
        os.kill(sup.workers("api")[0]["pid"], signal.SIGKILL)
        wait_for("api FATAL", lambda: get("/readyz")[0] == 503)
        assert get("/readyz")[1].startswith("api: fatal (1 crashes within")
        assert value(scrape(), "supervisor_program_fatal", program="api") == 1
        assert sup.ctl("start", "api").returncode == 0
        assert get("/readyz") == (200, "ready\n")
        stopping = sup.ctl_async("stop", "api")
        wait_for("api stopping", lambda: get("/readyz") == (503, "api: stopping\n"))
        assert stopping.wait(timeout=30) == 0
        assert get("/readyz") == (200, "ready\n")  # stopped by hand: not waited for
        assert get("/healthz") == (200, "ok\n")
    finally:
        sup.kill()


def test_a_metrics_address_in_use(tmp_path: Path) -> None:
    """At start: one line and exit 1. At reload: refused in one line, the old endpoint stays."""
    taken = socket.create_server(("127.0.0.1", 9151))
    try:
        sup = with_metrics(Supervisor(tmp_path, {"web": program(workers=1)}), "127.0.0.1:9151")
        assert sup.exit_status_of_refused_start() == 1
        failed = sup.events("startup_failed")
        assert [e["error"] for e in failed] == [
            "metrics.listen: 127.0.0.1:9151: Address already in use (another process listens there)"]

        with_metrics(sup, "127.0.0.1:9150").start()
        try:
            with_metrics(sup, "127.0.0.1:9151")
            refused = sup.ctl("reload")
            assert refused.returncode == 1
            assert refused.stderr.strip().splitlines() == [
                "supervisorctl: reload failed: metrics.listen: 127.0.0.1:9151: Address already in use (another "
                "process listens there); metrics stay on 127.0.0.1:9150"]
            assert value(scrape(), "supervisor_reloads_total", result="refused") == 1
            taken.close()
            moved = sup.reload()
            assert "metrics: now on 127.0.0.1:9151" in moved.stdout
            samples = wait_for("the new endpoint", lambda: _try(lambda: scrape(("127.0.0.1", 9151))))
            assert value(samples, "supervisor_reloads_total", result="done") == 1
            with pytest.raises(ConnectionRefusedError):
                get("/healthz")
        finally:
            sup.kill()
    finally:
        taken.close()


def _try(scraper: Any) -> Any:
    try:
        return scraper()
    except OSError:
        return None


def test_the_masters_process_the_last_reload_and_restart_counts_as_status_shows_them(tmp_path: Path) -> None:
    """process_* of the master as psutil sees it; the last reload as gauges (refused: 0, done: 1); after a
    crash and the SIGKILL of a worker that ran past STABLE_AFTER (no backoff, so no streak), `status`
    (JSON and table) and supervisor_worker_restarts_total both say 2; no series that cannot be non-zero."""
    import psutil

    from supervisor.model.restart import STABLE_AFTER

    sup = with_metrics(Supervisor(tmp_path, {"web": program(workers=2)})).start()
    try:
        first = scrape()
        master = psutil.Process(sup.status()["pid"])
        fds = len(os.listdir(f"/proc/{master.pid}/fd"))
        started = sup.status()["started_at"]
        good = sup.config.read_text()
        sup.config.write_text(good.replace("workers: 2", "workers: two"))
        assert sup.ctl("reload").returncode == 1
        refused = scrape()
        sup.config.write_text(good)
        sup.reload()
        done = scrape()
        os.kill(next(w["pid"] for w in sup.workers() if w["worker"] == 0 and w["generation"] == 2), signal.SIGKILL)
        wait_for("worker 0 restarted", lambda: sup.status()["programs"][0]["restarts"] == 1 and sup.replaced(-1, 2))
        stable = next(w for w in sup.workers() if w["worker"] == 1)
        time.sleep(max(0.0, STABLE_AFTER + 0.5 - stable["uptime"]))
        os.kill(stable["pid"], signal.SIGKILL)
        wait_for("worker 1 restarted", lambda: sup.replaced(stable["pid"], 2))
        data, table = sup.status()["programs"][0], sup.ctl("status").stdout.splitlines()
        after = scrape()
    finally:
        sup.kill()
    assert value(first, "process_resident_memory_bytes") > 1 << 20
    assert abs(value(first, "process_open_fds") - fds) <= 2  # the scrape's own connection, the ctl's
    assert value(first, "process_max_fds") >= fds
    assert abs(value(first, "process_start_time_seconds") - master.create_time()) < 0.1
    assert 0 < value(first, "process_cpu_seconds_total") < 60
    started_at = datetime.datetime.fromisoformat(started).timestamp()
    assert (value(first, "supervisor_last_reload_successful"),
            value(first, "supervisor_last_reload_timestamp_seconds")) == (1, pytest.approx(started_at))
    assert value(refused, "supervisor_last_reload_successful") == 0
    assert value(refused, "supervisor_last_reload_timestamp_seconds") > started_at
    assert value(done, "supervisor_last_reload_successful") == 1
    assert value(done, "supervisor_last_reload_timestamp_seconds") > value(
        refused, "supervisor_last_reload_timestamp_seconds")
    assert value(after, "supervisor_worker_restarts_total", program="web") == data["restarts"] == 2
    assert sorted((w["worker"], w["restarts"]) for w in data["workers"]) == [(0, 1), (1, 1)]
    assert next(line for line in table if line.startswith("web ")).split()[7] == "2"  # RESTARTS
    states = {dict(labels).get("state") for name, labels in after if name == "supervisor_workers"}
    assert states == {"starting", "ready", "retiring"}
