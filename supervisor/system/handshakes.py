"""Handshakes in flight: TCP connections the kernel holds as request sockets (SYN_RECV) on given ports.

A reload steers new connections to the new listeners, then shuts the old ones. A handshake an old
listener answered before the steering completes when the client's final ACK comes, one round trip
later; if that ACK meets the shut listener at the wrong microsecond, the kernel resets the connection
instead of migrating it (docs/kernel.md §8). So the old listeners are shut `SWITCH_DRAIN` after the
steering, unless the kernel shows no request socket at all on their ports: then no handshake can
complete on them, and a new SYN goes to the listeners that stay.

Asked of the kernel's socket diagnostics (NETLINK_SOCK_DIAG, as `ss -tn state syn-recv` does): one
dump of the TCP request sockets of both address families. The kernel walks its whole established
hash for it (shared with the host's namespace: 262,144 buckets on the test machine), 1 to 3 ms of the
master's loop, once per switch. The answer is "none" only when the dump said so: an error, a dump
that takes longer than `TIMEOUT` or lists more than `LOOKED_AT` sockets counts as "some" (the caller
then waits as it would without asking).
"""

from __future__ import annotations

import socket
import struct
import time
from collections.abc import Iterable

NETLINK_SOCK_DIAG = 4
# The original request (struct inet_diag_req): unlike SOCK_DIAG_BY_FAMILY, one dump covers IPv4 and IPv6
# (the kernel runs it with family AF_UNSPEC), so the hash is walked once. Its answers are inet_diag_msg too.
TCPDIAG_GETSOCK = 18
NLM_F_REQUEST, NLM_F_DUMP = 0x1, 0x300
NLMSG_ERROR, NLMSG_DONE = 2, 3
TCP_SYN_RECV = 3  # the kernel adds its request sockets (TCP_NEW_SYN_RECV) to a dump that asks for this state
HEADER = struct.Struct("=IHHII")  # struct nlmsghdr
REQUEST = struct.Struct("=BBBB48xII")  # struct inet_diag_req: family, src_len, dst_len, ext, an empty id, states, dbs
SPORT = struct.Struct("!H")  # inet_diag_msg: family, state, timer, retrans, then id.idiag_sport (big-endian)
SPORT_AT = 4
LOOKED_AT = 4096  # request sockets read at most: past that, a SYN flood or a busy port, "some"
TIMEOUT = 0.05  # seconds a dump may take before it counts as "some" (the master's loop waits on it)


def pending(ports: Iterable[int]) -> bool:
    """Whether the kernel may hold a handshake in flight to any of `ports` (TCP, IPv4 or IPv6, any
    local address of this network namespace): False only when the kernel's dump listed none."""
    wanted = set(ports)
    if not wanted:
        return False
    try:
        return _pending(wanted)
    except (OSError, struct.error):
        return True


def _pending(ports: set[int]) -> bool:
    with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, NETLINK_SOCK_DIAG) as nl:
        deadline = time.monotonic() + TIMEOUT
        body = REQUEST.pack(socket.AF_UNSPEC, 0, 0, 0, 1 << TCP_SYN_RECV, 0)
        nl.send(HEADER.pack(HEADER.size + len(body), TCPDIAG_GETSOCK, NLM_F_REQUEST | NLM_F_DUMP, 1, 0) + body)
        seen = 0
        while (left := deadline - time.monotonic()) > 0:
            nl.settimeout(left)
            data = nl.recv(65536)
            if not data:
                return True
            at = 0
            while at + HEADER.size <= len(data):
                length, kind, _flags, _seq, _pid = HEADER.unpack_from(data, at)
                if kind == NLMSG_DONE:
                    return False
                if kind == NLMSG_ERROR or length < HEADER.size:
                    return True
                if SPORT.unpack_from(data, at + HEADER.size + SPORT_AT)[0] in ports:
                    return True
                seen += 1
                if seen > LOOKED_AT:
                    return True
                at += (length + 3) & ~3  # NLMSG_ALIGN
        return True
