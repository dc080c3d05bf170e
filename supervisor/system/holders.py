"""Who else listens on an address: the kernel's table of listening TCP sockets, against our own.

Every listener of ours sets SO_REUSEPORT, so a bind never fails where another server's would: any
socket of the same user with SO_REUSEPORT on the same address joins the same group, and the kernel
then splits new connections between two programs that know nothing of each other. So before a start
or a reload binds an address, the listening sockets of this network namespace are read from
/proc/net/tcp and /proc/net/tcp6 (`listening`) and compared with the ones this process holds (its
own fds, which include the fd store's and an upgrade's: they are ours). What is left is another
process's; `holder` names it when /proc lets us see it (as root, always).

The listening sockets are asked of the kernel by netlink (sock_diag, as `ss -lt` does), for the LISTEN
state alone: the kernel then walks its table of listeners only. /proc/net/tcp, the fallback where
sock_diag is missing, lists every socket of the namespace, TIME_WAIT ones included: a busy server
closing connections has tens of thousands, and reading them blocked the master's loop for hundreds
of milliseconds at each reload.

Overlap follows the kernel's rule for a bind without SO_REUSEPORT: the same port, and the same
address or a wildcard on either side ("0.0.0.0", or "::", which also takes IPv4 unless IPV6_V6ONLY).
"""

from __future__ import annotations

import ipaddress
import os
import socket
import struct
from dataclasses import dataclass

from supervisor.config.schema import Listen

TABLES = (("/proc/net/tcp", socket.AF_INET), ("/proc/net/tcp6", socket.AF_INET6))
LISTEN_STATE = "0A"  # TCP_LISTEN in the `st` column
MAX_TABLE_BYTES = 64 * 1024 * 1024  # a table this large is read no further (about 400,000 sockets)
MAX_PROCESSES = 65_536  # processes looked at to name a holder
MAX_CMDLINE = 200  # characters of a holder's command line quoted

NETLINK_SOCK_DIAG = 4
SOCK_DIAG_BY_FAMILY = 20
NLM_F_REQUEST, NLM_F_DUMP = 0x1, 0x300
NLMSG_ERROR, NLMSG_DONE = 2, 3
TCP_LISTEN = 10
HEADER = struct.Struct("=IHHII")  # nlmsghdr: length, type, flags, sequence, port id
# inet_diag_msg: family, state, timer, retrans; the socket id (sport, dport big-endian; src, dst 16
# bytes each; interface; cookie); expires, rqueue, wqueue, uid, inode.
DIAG_MSG = struct.Struct("=BBBBHH16s16sI8sIIIII")  # the ports as stored: big-endian (ntohs)
MAX_DIAG_BYTES = 64 * 1024 * 1024  # answers read no further (about 800,000 listeners)


@dataclass(frozen=True)
class Socket:
    """One listening socket of the namespace, as the kernel's table lists it."""

    family: socket.AddressFamily
    host: ipaddress.IPv4Address | ipaddress.IPv6Address
    port: int
    inode: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if self.family == socket.AF_INET6 else f"{self.host}:{self.port}"


def listening() -> list[Socket]:
    """Every TCP socket in LISTEN state in this network namespace."""
    try:
        return [sock for family in (socket.AF_INET, socket.AF_INET6) for sock in _diag(family)]
    except OSError:  # no sock_diag (a kernel without inet_diag): the tables, slower
        return _tables()


def _diag(family: socket.AddressFamily) -> list[Socket]:
    """The listening TCP sockets of one family, by a sock_diag dump."""
    request = struct.pack("=BBBBI", family, socket.IPPROTO_TCP, 0, 0, 1 << TCP_LISTEN) + bytes(48)
    found: list[Socket] = []
    with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, NETLINK_SOCK_DIAG) as nl:
        nl.settimeout(5)  # the kernel answers at once; never wait on it for ever
        nl.sendall(HEADER.pack(HEADER.size + len(request), SOCK_DIAG_BY_FAMILY, NLM_F_REQUEST | NLM_F_DUMP, 1, 0)
                   + request)
        received = 0
        while received < MAX_DIAG_BYTES:
            data = nl.recv(65536)
            received += len(data)
            offset = 0
            while offset + HEADER.size <= len(data):
                length, kind, _flags, _seq, _port = HEADER.unpack_from(data, offset)
                if kind == NLMSG_DONE:
                    return found
                if kind == NLMSG_ERROR:
                    code = -struct.unpack_from("=i", data, offset + HEADER.size)[0]
                    raise OSError(code, f"sock_diag: {os.strerror(code)}")
                if length < HEADER.size:
                    raise OSError(0, "sock_diag: a malformed answer")
                if length >= HEADER.size + DIAG_MSG.size:
                    found.append(_diag_row(family, data, offset + HEADER.size))
                offset += (length + 3) & ~3
            if not data:
                break
    return found


def _diag_row(family: socket.AddressFamily, data: bytes, offset: int) -> Socket:
    fields = DIAG_MSG.unpack_from(data, offset)
    sport, src, inode = fields[4], fields[6], fields[-1]
    host = ipaddress.ip_address(src[:4] if family == socket.AF_INET else src)
    return Socket(family, host, socket.ntohs(sport), inode)


def _tables() -> list[Socket]:
    """The same from /proc/net/tcp and tcp6 (every socket of the namespace is listed there)."""
    found = []
    for path, family in TABLES:
        try:
            with open(path, "rb") as table:
                text = table.read(MAX_TABLE_BYTES).decode("ascii", "replace")
        except OSError:
            continue  # no IPv6 in this kernel
        for line in text.splitlines()[1:]:
            if (sock := _row(line, family)) is not None:
                found.append(sock)
    return found


def _row(line: str, family: socket.AddressFamily) -> Socket | None:
    """`sl local_address rem_address st ... uid timeout inode ...`; None for any other state or a torn line."""
    fields = line.split()
    if len(fields) < 10 or fields[3] != LISTEN_STATE:
        return None
    address, _, port = fields[1].partition(":")
    try:
        raw = bytes.fromhex(address)
        # The kernel prints each 32-bit word of the address in its own (little-endian) byte order.
        words = b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4))
        host = ipaddress.ip_address(words)
        return Socket(family, host, int(port, 16), int(fields[9]))
    except ValueError:
        return None


def own_inodes() -> set[int]:
    """The sockets this process holds an fd of."""
    inodes = set()
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue  # the fd listing itself, closed meanwhile
        if target.startswith("socket:["):
            inodes.add(int(target[8:-1]))
    return inodes


def overlaps(listen: Listen, sock: Socket) -> bool:
    if listen.port != sock.port:
        return False
    ours = ipaddress.ip_address(listen.host)
    if sock.family == socket.AF_INET6 and sock.host.is_unspecified:
        return True  # "::" takes IPv4 too, unless the holder set IPV6_V6ONLY (we cannot see that)
    if sock.host.version != ours.version:
        if listen.family == socket.AF_INET6 and ours.is_unspecified:
            return True
        mapped = getattr(sock.host, "ipv4_mapped", None)
        return mapped is not None and (mapped == ours or ours.is_unspecified)
    return sock.host == ours or sock.host.is_unspecified or ours.is_unspecified


def foreign(listen: Listen, sockets: list[Socket], ours: set[int]) -> list[Socket]:
    """The listening sockets of other processes that `listen` would share or overlap."""
    return [s for s in sockets if s.inode not in ours and overlaps(listen, s)]


def holder(inode: int) -> str:
    """`pid 1234 (python3 -m http.server 8000)`, or why it cannot be said."""
    wanted = f"socket:[{inode}]"
    try:
        pids = [name for name in os.listdir("/proc") if name.isdigit()][:MAX_PROCESSES]
    except OSError:
        pids = []
    for pid in pids:
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            continue  # gone, or another user's
        for fd in fds:
            try:
                if os.readlink(f"/proc/{pid}/fd/{fd}") != wanted:
                    continue
            except OSError:
                continue
            return f"pid {pid} ({_cmdline(pid)})"
    return "a process this user cannot see (another user's, or one that has just exited)"


def _cmdline(pid: str) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            raw = f.read(MAX_CMDLINE * 4)
    except OSError:
        return "?"
    text = raw.replace(b"\0", b" ").decode("utf-8", "replace").strip() or "?"
    return text if len(text) <= MAX_CMDLINE else text[:MAX_CMDLINE] + "..."


def problems(addresses: list[Listen], sockets: list[Socket], ours: set[int]) -> list[str]:
    """One line per address that another process listens on (or overlaps): the address and its holder."""
    out = []
    for listen in addresses:
        for sock in foreign(listen, sockets, ours)[:1]:
            what = "listens on it" if str(sock) == str(listen) else f"listens on {sock}, which overlaps it"
            out.append(f"{listen} is in use: {holder(sock.inode)} {what}; "
                       f"set share_listen: true to join its SO_REUSEPORT group on purpose")
    return out
