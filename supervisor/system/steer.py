"""Steer a SO_REUSEPORT group's new connections to chosen members, before the others are shut.

Why (docs/kernel.md §8): `shutdown()` of a listener races with a handshake completing on it. tcp_v4_rcv()
sees the request's listener in TCP_LISTEN (no lock taken), builds the child socket, then
inet_csk_complete_hashdance() -> inet_csk_reqsk_queue_add() finds the listener closed under the
queue lock and inet_child_forget() resets the new connection (RST+ACK, seq = ISN+1). The kernel does
not migrate in that path and counts nothing but Tcp OutRsts (no TCPMigrateReqFailure). The window is
about a microsecond per shutdown: at 5,000 new connections/s a reload resets one with a chance of
about 0.2 %.

The only way round it from user space is that no handshake is completing on an old listener when it
is shut: first steer every new SYN of the group to the new generation, wait until the handshakes
already started on the old listeners are done (one round trip; loopback: microseconds, but softirq
processing can lag by milliseconds on a busy machine), shut them, then `detach()` so the kernel
hashes over the (now only new) listeners again. Each shutdown reorders the group, so the program is
rewritten before each one (`GroupOrder.retirement`, `shut_steered`): written once, it let SYNs reach
the old listeners still to be shut. Measured with `python -m bench.reuseport_race` (2 busy shared
cores, 6-16k connections/s): 29 resets in 10,722 shutdowns without steering; 4 in 25,724 with a
program written once; none in 6,586 with `shut_steered` after a 2 ms drain, and no connection left on
an old listener to migrate (TCPMigrateReqSuccess 0). The kernel fix (migrate the child in that path,
as inet_csk_listen_stop() does) would make this unnecessary.

A classic BPF program (SO_ATTACH_REUSEPORT_CBPF) needs no privilege. It returns an index into the
group's array of listening sockets, so the master mirrors that array with `GroupOrder`: the kernel
appends a socket when it starts listening and, when one stops, moves the last one into its place
(net/core/sock_reuseport.c, __reuseport_add_sock and __reuseport_detach_sock). A cBPF program is used
only to pick a listener for a SYN: with tcp_migrate_req=1, migration still selects by hash among the
listening members (reuseport_migrate_sock). An index out of range makes the kernel fall back to its
hash, so a stale mirror costs the protection, never a connection. Attaching replaces any program the
group had (an eBPF SELECT_OR_MIGRATE program too: do not mix the two).
"""

from __future__ import annotations

import ctypes
import socket
import struct
from collections.abc import Callable, Hashable, Sequence
from typing import Generic, TypeVar

SO_ATTACH_REUSEPORT_CBPF = 51
SO_DETACH_REUSEPORT_BPF = 68
_LD_RANDOM = (0x20, 0, 0, (-0x1000 + 56) & 0xFFFFFFFF)  # A = random u32 (SKF_AD_OFF + SKF_AD_RANDOM)
_RET_A = (0x16, 0, 0, 0)
_MAX_TARGETS = 1000  # cBPF programs are limited to 4096 instructions
M = TypeVar("M", bound=Hashable)  # what stands for a member: the master's Listener, a socket


class GroupOrder(Generic[M]):
    """The kernel's order of a reuseport group's listening members, kept by whoever creates and shuts them."""

    def __init__(self) -> None:
        self.members: list[M] = []

    def listening(self, member: M) -> None:
        """`member` has just called listen(): the kernel appended it."""
        self.members.append(member)

    def stopped(self, member: M) -> None:
        """`member` left LISTEN (shutdown or close): the last member takes its index."""
        if member not in self.members:
            return
        i = self.members.index(member)
        self.members[i] = self.members[-1]
        self.members.pop()

    def indices(self, members: Sequence[M]) -> list[int]:
        return [self.members.index(m) for m in members]

    def retirement(self, old: Sequence[M], new: Sequence[M]) -> list[tuple[M, list[int]]]:
        """In which order to shut `old`, and where to steer right before each shutdown.

        Each shutdown moves the last member into the hole, so a program written before it can point at
        an index that no longer exists (the kernel then hashes over every listening member, old ones
        included) or at another member. Each step's indices hold members of `new` both before and
        after its shutdown: all of them when the member shut is the last one (nothing moves), else all
        but the last index. Only one member of `new`, last, and an old one elsewhere: no index is
        stable, the step steers to where it is before the shutdown (its index is gone for the
        microseconds until the next step's program).
        """
        members = list(self.members)
        fresh = set(new)
        steps = []
        for _ in range(len(old)):
            left = [m for m in old if m in members]
            if not left:
                break
            last = len(members) - 1
            gone = members[last] if members[last] in left else left[0]
            targets = [i for i, m in enumerate(members) if m in fresh and (members[last] is gone or i != last)]
            steps.append((gone, targets or [i for i, m in enumerate(members) if m in fresh]))
            i = members.index(gone)
            members[i] = members[last]
            members.pop()
        return steps


def program(indices: Sequence[int]) -> list[tuple[int, int, int, int]]:
    """cBPF instructions returning one of `indices` at random (a range: mod and add; else a jump table)."""
    if not indices or len(indices) > _MAX_TARGETS:
        raise ValueError(f"steer to 1..{_MAX_TARGETS} listeners, not {len(indices)}")
    first, count = min(indices), len(indices)
    insns = [_LD_RANDOM, (0x94, 0, 0, count)]  # A %= count
    if sorted(indices) == list(range(first, first + count)):
        return [*insns, (0x04, 0, 0, first), _RET_A]  # A += first
    for j, index in enumerate(indices):  # if A == j: return index
        insns += [(0x15, 0, 1, j), (0x06, 0, 0, index)]
    return [*insns, (0x06, 0, 0, indices[0])]


def attach(member: socket.socket, indices: Sequence[int]) -> None:
    """Attach to the whole group of `member` (a listening member) a program choosing among `indices`."""
    insns = program(indices)
    code = ctypes.create_string_buffer(b"".join(struct.pack("HBBI", *insn) for insn in insns))
    fprog = struct.pack("HP", len(insns), ctypes.addressof(code))  # struct sock_fprog, native alignment
    member.setsockopt(socket.SOL_SOCKET, SO_ATTACH_REUSEPORT_CBPF, fprog)


def shut_steered(order: GroupOrder[M], old: Sequence[M], new: Sequence[M], sock: Callable[[M], socket.socket],
                 shut: Callable[[M], None]) -> None:
    """Shut the `old` members of one group one by one, new SYNs kept on `new` before and after each.

    `new` must have been steered to (`attach`) long enough before for the handshakes already routed
    to `old` to be done; `shut(member)` must shut it and call `order.stopped(member)`.
    """
    for gone, targets in order.retirement(old, new):
        attach(sock(new[0]), targets)
        shut(gone)


def detach(member: socket.socket) -> bool:
    """Remove the group's program (the kernel's hash selection again); False if it had none."""
    try:
        member.setsockopt(socket.SOL_SOCKET, SO_DETACH_REUSEPORT_BPF, 0)
    except FileNotFoundError:  # ENOENT: no program attached
        return False
    return True
