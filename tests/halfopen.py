"""Handshakes held half open: a client on the far side of a TUN device, written by hand.

Inside a test's private network namespace, `Peer` brings up a TUN device and plays a TCP client
behind it: `syn()` sends a SYN to a loopback listener, reads the listener's SYN+ACK and sends no ACK,
so the kernel keeps a request socket (SYN_RECV) on the listener's port for as long as the test wants;
`ack()` then completes the handshake with data, as a client whose final ACK was late, and `answer()`
reads what came back. The packets are real ones through the kernel's stack: only the client is ours
(it acknowledges a FIN only when the answer is whole: one segment on loopback, or in order).

`net.ipv4.conf.<tun>.route_localnet` lets packets from the device reach 127.0.0.1 and the answers go
back out of it (the namespace's own setting).
"""

from __future__ import annotations

import fcntl
import os
import select
import struct
import subprocess
import time
from dataclasses import dataclass

TUNSETIFF = 0x400454CA
IFF_TUN, IFF_NO_PI = 0x0001, 0x1000
DEVICE = "hs0"
LOCAL, PEER = "10.77.0.1", "10.77.0.2"
FIN, SYN, RST, PSH, ACK = 0x01, 0x02, 0x04, 0x08, 0x10


def checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def address(text: str) -> bytes:
    return bytes(int(part) for part in text.split("."))


@dataclass
class Handshake:
    sport: int
    dport: int
    seq: int  # our next sequence number
    ack: int  # the listener's next sequence number


class Peer:
    """The TUN device and the hand-written client behind it (one per namespace)."""

    def __init__(self) -> None:
        self.fd = os.open("/dev/net/tun", os.O_RDWR | os.O_CLOEXEC)
        fcntl.ioctl(self.fd, TUNSETIFF, struct.pack("16sH", DEVICE.encode(), IFF_TUN | IFF_NO_PI))
        for command in (["ip", "addr", "add", f"{LOCAL}/24", "dev", DEVICE], ["ip", "link", "set", DEVICE, "up"]):
            subprocess.run(command, check=True)
        for setting, value in (("route_localnet", "1"), ("rp_filter", "0")):
            with open(f"/proc/sys/net/ipv4/conf/{DEVICE}/{setting}", "w") as f:
                f.write(value)
        self.next_port = 40000

    def close(self) -> None:
        os.close(self.fd)

    def __enter__(self) -> Peer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def syn(self, port: int, host: str = "127.0.0.1", timeout: float = 2.0) -> Handshake:
        """A SYN to host:port; returns once the listener answered SYN+ACK (its request socket exists)."""
        self.next_port += 1
        sport, isn = self.next_port, 1000
        self._send(host, sport, port, isn, 0, SYN)
        seq, ack = self._synack(host, sport, port, timeout)
        return Handshake(sport, port, isn + 1, seq + 1) if ack == isn + 1 else self._mismatch(ack, isn)

    def ack(self, shake: Handshake, data: bytes, host: str = "127.0.0.1") -> None:
        """The late final ACK, with the request's bytes (the listener's child socket is made of it)."""
        self._send(host, shake.sport, shake.dport, shake.seq, shake.ack, ACK | PSH, data)
        shake.seq += len(data)

    def answer(self, shake: Handshake, timeout: float = 5.0) -> bytes | None:
        """The bytes the listener's side sent back on this connection, read until its FIN (we acknowledge
        each segment, as a client would); None if the kernel answered with a reset."""
        got: dict[int, bytes] = {}
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            ready, _, _ = select.select([self.fd], [], [], left)
            packet = os.read(self.fd, 65536) if ready else b""
            if len(packet) < 40 or packet[0] >> 4 != 4 or packet[9] != 6:
                continue
            at = (packet[0] & 0x0F) * 4
            src_port, dst_port, seq, _ack, offset, flags = struct.unpack_from("!HHIIBB", packet, at)
            if (src_port, dst_port) != (shake.dport, shake.sport):
                continue
            if flags & RST:
                return None
            data = packet[at + (offset >> 4) * 4:]
            if data:
                got[seq] = data
            if flags & FIN:
                self._send("127.0.0.1", shake.sport, shake.dport, shake.seq, seq + len(data) + 1, ACK | FIN)
                return b"".join(got[k] for k in sorted(got))
            if data:
                self._send("127.0.0.1", shake.sport, shake.dport, shake.seq, seq + len(data), ACK)
        raise TimeoutError(f"no FIN from port {shake.dport} within {timeout} s; got {b''.join(got.values())!r}")

    def _mismatch(self, ack: int, isn: int) -> Handshake:
        raise AssertionError(f"SYN+ACK acknowledges {ack}, not {isn + 1}")

    def _send(self, host: str, sport: int, dport: int, seq: int, ack: int, flags: int, data: bytes = b"") -> None:
        src, dst = address(PEER), address(host)
        tcp = struct.pack("!HHIIBBHHH", sport, dport, seq, ack, 5 << 4, flags, 65535, 0, 0) + data
        pseudo = src + dst + struct.pack("!BBH", 0, 6, len(tcp))
        tcp = tcp[:16] + struct.pack("!H", checksum(pseudo + tcp)) + tcp[18:]
        ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(tcp), 0, 0x4000, 64, 6, 0, src, dst)
        ip = ip[:10] + struct.pack("!H", checksum(ip)) + ip[12:]
        os.write(self.fd, ip + tcp)

    def _synack(self, host: str, sport: int, dport: int, timeout: float) -> tuple[int, int]:
        """Reads packets off the device until the SYN+ACK for (sport, dport): its (seq, ack)."""
        while True:
            ready, _, _ = select.select([self.fd], [], [], timeout)
            if not ready:
                raise TimeoutError(f"no SYN+ACK from {host}:{dport} within {timeout} s")
            packet = os.read(self.fd, 65536)
            if len(packet) < 40 or packet[0] >> 4 != 4 or packet[9] != 6:
                continue  # IPv6 router solicitations and the like
            at = (packet[0] & 0x0F) * 4
            src_port, dst_port, seq, ack, _off, flags = struct.unpack_from("!HHIIBB", packet, at)
            if (src_port, dst_port) == (dport, sport) and flags & (SYN | ACK) == SYN | ACK:
                return seq, ack
