"""Handshakes in flight across a switch (system/handshakes.py, model/drain.py), through the real kernel.

The old listeners are shut at once when the kernel holds no handshake on their ports, and `SWITCH_DRAIN`
later when it does. A handshake held half open across the reload (tests/halfopen.py: a hand-written
client behind a TUN device, its final ACK late) is answered by the new generation with migration, and
reset without it: the wait is only for the ones that complete within it; the kernel moves the others.
"""

from __future__ import annotations

import json
import socket
import statistics
from pathlib import Path

import pytest

from supervisor.model.drain import SWITCH_DRAIN
from supervisor.system import handshakes
from tests import harness
from tests.halfopen import Peer

pytestmark = pytest.mark.usefixtures("netns")
REQUEST = b"GET / HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n"


def test_pending_sees_a_request_socket_on_its_ports_only() -> None:
    with socket.socket() as listener, Peer() as peer:
        listener.bind(("127.0.0.1", 8000))
        listener.listen(16)
        assert not handshakes.pending([8000]) and not handshakes.pending([])
        shake = peer.syn(8000)
        assert handshakes.pending([8000]) and handshakes.pending([7999, 8000]) and not handshakes.pending([8001])
        peer.ack(shake, REQUEST)
        listener.settimeout(5)
        conn, _ = listener.accept()
        conn.close()
        assert not handshakes.pending([8000])  # the request socket became the accepted connection


def test_an_idle_reload_shuts_the_old_listener_at_once(tmp_path: Path) -> None:
    sup = harness.Supervisor(tmp_path, {"web": harness.program(workers=2)}).start()
    try:
        drains = []
        for _ in range(3):
            final = sup.request("reload")
            assert final["ok"] and final["data"]["way"] == "migrated", final
            drains.append(final["data"]["drain_ms"])
        # Nothing to wait for (no handshake on port 8000): the shut follows the kernel's answer, a dump of
        # 1 to 3 ms, not SWITCH_DRAIN. The median leaves room for one reload the machine held up.
        assert statistics.median(drains) < SWITCH_DRAIN * 1000 / 2, drains
    finally:
        sup.stop()


@pytest.mark.parametrize(("migrate", "answered"), [("require", True), ("off", False)])
def test_a_handshake_in_flight_holds_the_switch_then_migrates(tmp_path: Path, migrate: str, answered: bool) -> None:
    sup = harness.Supervisor(tmp_path, {"web": harness.program(workers=2)}, migrate=migrate).start()
    try:
        with Peer() as peer:
            shake = peer.syn(8000)  # on generation 1's listener, which the reload shuts
            final = sup.request("reload")
            assert final["ok"], final
            assert final["data"]["drain_ms"] >= round(SWITCH_DRAIN * 1000) - 1, final  # the switch waited for it
            assert sup.generation() == 2
            peer.ack(shake, REQUEST)  # later than the wait: only the kernel's migration can save it now
            answer = peer.answer(shake)
        if not answered:
            assert answer is None, answer  # migrate: off, the sysctl at 0: the late handshake is reset
            return
        assert answer is not None and answer.startswith(b"HTTP/1.1 200 "), answer
        assert json.loads(answer.partition(b"\r\n\r\n")[2])["generation"] == 2
    finally:
        sup.stop()


def test_a_dump_past_its_bounds_counts_as_a_handshake_in_flight(monkeypatch: pytest.MonkeyPatch) -> None:
    """A SYN flood on another port (or a slow dump) must not make the master's loop wait: past
    LOOKED_AT sockets or TIMEOUT seconds the answer is "some", and the switch waits as without asking."""
    with socket.socket() as listener, Peer() as peer:
        listener.bind(("127.0.0.1", 8001))
        listener.listen(16)
        peer.syn(8001)
        assert not handshakes.pending([8000])
        monkeypatch.setattr(handshakes, "LOOKED_AT", 0)
        assert handshakes.pending([8000])
        monkeypatch.setattr(handshakes, "LOOKED_AT", 4096)
        monkeypatch.setattr(handshakes, "TIMEOUT", 0.0)
        assert handshakes.pending([8000])
