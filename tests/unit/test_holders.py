"""Reading the kernel's table of listening sockets, and when two addresses overlap (system/holders.py)."""

from __future__ import annotations

import ipaddress
import socket

import pytest

from supervisor.config.schema import parse_listen
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
