"""Keep-alive clients through reloads: every connection an old worker holds ends with an answer that says
`Connection: close`, so not one request is lost (README "What a worker gets", the stop contract).

64 persistent HTTP/1.1 connections send requests back to back while the program reloads about every
0.5 s for 15 s. Each server runs as 2 workers under supervisord (`migrate: require`). The control runs
prove the load can fail: the demo's stop before the contract (`--close-idle-at-stop`) loses about one
request per open connection and reload.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest

from tests.harness import DEMO, PYTHON, Supervisor, program, supervisor
from tests.load import Clients, Tally

pytestmark = pytest.mark.usefixtures("netns")
ROOT = Path(__file__).resolve().parents[2]  # the workers' cwd: `tests.apps...` imports from here
RELOADING = 15.0  # seconds of reloads per run
MIN_RELOADS = 8  # a slow server (hypercorn starts in 1-2 s on a busy machine) gets up to twice the time for these
PAUSE = 0.5  # seconds between one reload's end and the next one's start
CONCURRENCY = 64


def reload_under_keep_alive(tmp_path: Path, settings: dict[str, Any], method: str = "GET",
                            seconds: float = RELOADING, **load: Any) -> tuple[Tally, int, Supervisor]:
    """Reload back to back under 64 kept connections; the tally, the number of reloads, the supervisor."""
    with supervisor(tmp_path, {"web": settings}) as sup, \
            Clients("127.0.0.1:8000", concurrency=CONCURRENCY, seconds=seconds + 60, keep_alive=True,
                    method=method, **load) as clients:
        time.sleep(0.5)  # the clients import and connect
        reloads = 0
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline or (reloads < MIN_RELOADS and time.monotonic() < deadline + seconds):
            time.sleep(PAUSE)
            sup.reload()
            reloads += 1
        time.sleep(0.5)  # the last generation serves the kept connections
        tally = clients.finish()
    print(f"\n{tally.describe()}, {reloads} reloads")
    return tally, reloads, sup


def killed(sup: Supervisor) -> list[dict[str, Any]]:
    """Workers supervisord had to kill at graceful_timeout."""
    return sup.events("graceful_timeout")


SERVERS = {
    "demo": program(DEMO, ready="notify"),
    "uvicorn runner": program([PYTHON, "-m", "supervisor.servers.uvicorn", "--no-access-log", "tests.apps.asgi:app"],
                              ready="notify", cwd=str(ROOT)),
    "hypercorn runner": program([PYTHON, "-m", "supervisor.servers.hypercorn", "tests.apps.asgi:app"],
                                ready="notify", cwd=str(ROOT)),
}


@pytest.mark.parametrize("method", ["GET", "POST"])
@pytest.mark.parametrize("server", SERVERS)
def test_no_request_is_lost_on_kept_connections(tmp_path: Path, server: str, method: str) -> None:
    tally, reloads, sup = reload_under_keep_alive(tmp_path, SERVERS[server], method)
    assert reloads >= MIN_RELOADS and tally.ok > 20 * CONCURRENCY * reloads // 10, tally.describe()
    assert not tally.failures, tally.describe()
    assert tally.generations.get(reloads + 1), tally.generations  # the last generation serves
    assert not killed(sup)


def test_closing_idle_connections_at_the_stop_loses_requests(tmp_path: Path) -> None:
    """The control: an old worker that closes its idle kept connections at once loses requests on them."""
    tally, reloads, _sup = reload_under_keep_alive(tmp_path, program([*DEMO, "--close-idle-at-stop"],
                                                                     ready="notify"), seconds=5)
    assert reloads >= 3 and tally.failures, tally.describe()
    assert tally.reused() == len(tally.failures), tally.describe()  # the kernel's part is lossless


def test_stock_uvicorn_loses_requests_on_kept_connections(tmp_path: Path) -> None:
    """The control for the runner: `uvicorn --fd 3` with the settings "Tested servers" gave it before."""
    stock = program([PYTHON, "-m", "uvicorn", "--fd", "3", "--no-access-log", "tests.apps.asgi:app"],
                    ready="accepting", settle=0.2, stop_delay=0.5, cwd=str(ROOT))
    tally, reloads, _sup = reload_under_keep_alive(tmp_path, stock, "POST", seconds=5)
    assert reloads >= 3 and tally.failures, tally.describe()
