"""Reading the kernel's table of listening sockets, and when two addresses overlap (system/holders.py)."""

from __future__ import annotations

import ipaddress
import os
import socket

import pytest

from supervisor.config.schema import parse_listen
from supervisor.system import holders
from supervisor.system.holders import Socket, _row, overlaps

# Rows as /proc/net/tcp and /proc/net/tcp6 print them (each 32-bit word of the address in host order).
V4 = "   0: 0100007F:1F40 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 4242 1 0 100 0 0 10 0"
V6 = ("   1: 00000000000000000000000001000000:1F41 00000000000000000000000000000000:0000 0A "
      "00000000:00000000 00:00000000 00000000  1000        0 777 1 0 100 0 0 10 0")
ESTABLISHED = V4.replace(" 0A ", " 01 ")


def test_rows_read_as_the_kernel_means_them() -> None:
    assert _row(V4, socket.AF_INET) == Socket(socket.AF_INET, ipaddress.ip_address("127.0.0.1"), 8000, 4242)
    assert _row(V6, socket.AF_INET6) == Socket(socket.AF_INET6, ipaddress.ip_address("::1"), 8001, 777)
    assert _row(ESTABLISHED, socket.AF_INET) is None
    assert _row("   0: 0100007F:1F40 torn", socket.AF_INET) is None
    assert _row(V4.replace("0100007F", "XYZ"), socket.AF_INET) is None


def sock(text: str) -> Socket:
    listen = parse_listen(text)
    return Socket(listen.family, ipaddress.ip_address(listen.host), listen.port, 1)


@pytest.mark.parametrize(("ours", "theirs", "expected"), [
    ("127.0.0.1:8000", "127.0.0.1:8000", True),
    ("127.0.0.1:8000", "127.0.0.1:8001", False),
    ("127.0.0.1:8000", "127.0.0.2:8000", False),
    ("127.0.0.1:8000", "0.0.0.0:8000", True),
    ("0.0.0.0:8000", "127.0.0.1:8000", True),
    ("127.0.0.1:8000", "[::]:8000", True),  # dual-stack unless IPV6_V6ONLY
    ("[::1]:8000", "127.0.0.1:8000", False),
    ("[::]:8000", "127.0.0.1:8000", True),
    ("[::1]:8000", "[::1]:8000", True),
    ("127.0.0.1:8000", "[::ffff:127.0.0.1]:8000", True),
])
def test_overlap_follows_the_kernels_rule_for_a_plain_bind(ours: str, theirs: str, expected: bool) -> None:
    assert overlaps(parse_listen(ours), sock(theirs)) is expected


def test_sock_diag_lists_the_listeners_the_tables_list() -> None:
    """The netlink dump (LISTEN only) and /proc/net/tcp{,6} agree, IPv4, IPv6 and dual-stack; a
    connected socket and one in TIME_WAIT are in neither answer."""
    v4 = socket.create_server(("127.0.0.1", 0))
    v6 = socket.create_server(("::1", 0), family=socket.AF_INET6)
    dual = socket.create_server(("::", 0), family=socket.AF_INET6, dualstack_ipv6=True)
    client = socket.create_connection(v4.getsockname())
    served, _ = v4.accept()
    served.close()  # the server side closes first: TIME_WAIT there
    try:
        ports = {sock.getsockname()[1] for sock in (v4, v6, dual)}
        found = [s for s in holders.listening() if s.port in ports]
        assert sorted(found, key=str) == sorted((s for s in holders._tables() if s.port in ports), key=str)
        ours = {(s.family, str(s.host), s.port) for s in found}
        assert {(socket.AF_INET, "127.0.0.1", v4.getsockname()[1]), (socket.AF_INET6, "::1", v6.getsockname()[1]),
                (socket.AF_INET6, "::", dual.getsockname()[1])} <= ours
        assert {s.inode for s in found} >= {os.fstat(sock.fileno()).st_ino for sock in (v4, v6, dual)}
        assert len([s for s in found if s.port == v4.getsockname()[1]]) == 1
    finally:
        for sock in (client, v4, v6, dual):
            sock.close()
