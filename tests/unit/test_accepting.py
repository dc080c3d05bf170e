"""daemon/accepting.py's Acceptor on a real unix socket: refusals cost nothing more than accept and
close, ACCEPT_BATCH per turn, and a master out of fds leaves its queue alone for a while, then goes on."""

from __future__ import annotations

import asyncio
import os
import socket
from collections.abc import Callable
from pathlib import Path

import pytest

from supervisor.daemon import accepting


def listener(tmp_path: Path) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(str(tmp_path / "s"))
    sock.listen(128)
    return sock


def clients(tmp_path: Path, n: int) -> list[socket.socket]:
    out = []
    for _ in range(n):
        c = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        c.connect(str(tmp_path / "s"))
        out.append(c)
    return out


def test_refused_connections_are_closed_and_admitted_ones_handled(tmp_path: Path) -> None:
    handled: list[int] = []

    async def handle(conn: socket.socket, n: int) -> None:
        handled.append(n)
        conn.close()

    async def main() -> None:
        asked = iter(range(100))
        acceptor = accepting.Acceptor(listener(tmp_path), lambda peer: n if (n := next(asked)) % 2 else None, handle)
        socks = clients(tmp_path, 6)
        await asyncio.sleep(0.1)
        acceptor.close()
        for c in socks:
            c.settimeout(5)
            assert c.recv(1) == b""  # closed unanswered, admitted or not (handle closes here)
            c.close()

    asyncio.run(main())
    assert handled == [1, 3, 5]


def test_at_most_a_batch_per_turn(tmp_path: Path) -> None:
    async def main() -> int:
        admitted: list[object] = []
        acceptor = accepting.Acceptor(listener(tmp_path), noting(admitted), _close)
        socks = clients(tmp_path, accepting.ACCEPT_BATCH * 2 + 3)
        acceptor._accept()  # one turn's callback
        first = len(admitted)
        await asyncio.sleep(0.1)
        acceptor.close()
        for c in socks:
            c.close()
        assert len(admitted) == len(socks)
        return first

    assert asyncio.run(main()) == accepting.ACCEPT_BATCH


async def _close(conn: socket.socket, admitted: object) -> None:
    conn.close()


def noting(seen: list[object]) -> Callable[[object], None]:
    """An admit() that refuses every connection and notes its peer."""
    return seen.append


def test_out_of_fds_it_pauses_then_takes_what_waited(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(accepting, "PAUSE_AFTER_EMFILE", 0.2)
    taken: list[object] = []

    async def main() -> None:
        sock = listener(tmp_path)
        acceptor = accepting.Acceptor(sock, noting(taken), _close)
        socks = clients(tmp_path, 3)
        spare: list[int] = []
        try:
            while True:  # every fd this process may have
                spare.append(os.dup(0))
        except OSError:
            pass
        acceptor._accept()  # EMFILE: nothing taken, the queue left alone
        paused = sock.fileno() not in asyncio.get_running_loop()._selector.get_map()  # type: ignore[attr-defined]
        for fd in spare:
            os.close(fd)
        assert paused and taken == []
        await asyncio.sleep(0.4)
        assert len(taken) == 3
        acceptor.close()
        for c in socks:
            c.close()

    asyncio.run(main())
