"""Listening sockets: one per worker (or, `accept_queue: shared`, per generation) and listen address,
all members of one SO_REUSEPORT group.

The master creates every listener (so they all share its uid, which the kernel requires of a group,
and a worker that dropped privileges cannot add a socket of its own), hands it to the worker as an
inherited fd, and keeps its own copy. That copy is what makes `shut()` work at once: shutdown()
acts on the socket, not on one descriptor, so the master ends a listener whatever its worker is
doing (busy, stopped, ignoring signals). See docs/kernel.md §5.
"""

from __future__ import annotations

import errno
import socket
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from supervisor.config.schema import Listen, parse_listen
from supervisor.system import handshakes, steer


@dataclass(eq=False)
class Group:
    """One reuseport group (one listen address) as this process made it: the kernel's order of its
    listening members (steer.py), appended at listen(), moved by shut(). `order` is None once members
    of unknown position joined (left by a dead master in the fd store): the group is not steered for
    this master's life, since a wrong mirror would steer new connections onto the old listeners."""

    order: steer.GroupOrder[Listener] | None = field(default_factory=steer.GroupOrder)


class Groups:
    """The master's reuseport groups by address; every listener it opens joins its address's group."""

    def __init__(self) -> None:
        self.by_address: dict[str, Group] = {}

    def of(self, listen: Listen) -> Group:
        return self.by_address.setdefault(str(listen), Group())

    def open(self, listen: Listen, name: str, backlog: int) -> Listener:
        """A new listener (open_listener), a member of its group."""
        listener = open_listener(listen, name, backlog)
        self.known(listener)
        return listener

    def known(self, listener: Listener) -> None:
        """The listener joins the mirror of its group, last (also one kept across an upgrade, in order)."""
        listener.group = group = self.of(listener.listen)
        if group.order is not None:
            group.order.listening(listener)

    def unknown(self, listen: Listen) -> None:
        """The group of `listen` has members whose place in it nobody knows (adopted from the fd store)."""
        self.of(listen).order = None

    def orders(self) -> dict[str, list[int] | None]:
        """Each group's order by listener fd, for an upgrade to hand over."""
        return {address: None if g.order is None else [m.fileno() for m in g.order.members]
                for address, g in self.by_address.items()}

    def restore(self, orders: Mapping[str, list[int] | None], kept: Mapping[int, Listener]) -> None:
        """The orders an upgrade handed over, with the listeners it kept by fd."""
        for address, fds in orders.items():
            if fds is None or any(fd not in kept for fd in fds):
                self.by_address[address] = Group(None)  # not all found: no steering rather than a wrong one
            else:
                for fd in fds:
                    self.known(kept[fd])


@dataclass(eq=False)
class Listener:
    """The master's copy of one worker's listening socket, or of one its generation's workers all share."""

    listen: Listen
    name: str  # LISTEN_FDNAMES entry: no ':' allowed there, so not the address itself
    sock: socket.socket = field(repr=False)
    shut: bool = False
    # The generation's, inherited by each of its workers (`accept_queue: shared`): a worker that goes
    # neither shuts nor closes it, its siblings accept from it; the generation ends it (model/generation.py).
    shared: bool = False
    group: Group | None = field(default=None, repr=False)  # set as it joins Groups; None: not mirrored

    def fileno(self) -> int:
        return self.sock.fileno()

    def to_json(self) -> dict[str, Any]:
        return {"listen": str(self.listen), "name": self.name, "fd": self.fileno(), "shut": self.shut,
                "shared": self.shared}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Listener:
        """The record of a listener whose fd is open in this process (after an exec that kept it)."""
        listen = parse_listen(data["listen"])
        return cls(listen=listen, name=data["name"], sock=socket.socket(fileno=data["fd"]), shut=data["shut"],
                   shared=data.get("shared", False))

    def queued(self) -> int:
        """Connections waiting in the accept queue (tcpi_unacked of a listener)."""
        return tcp_queue(self.sock)[0]


def open_listener(listen: Listen, name: str, backlog: int) -> Listener:
    """Create, bind and listen a SO_REUSEPORT socket; raises OSError with the address in the message."""
    sock = socket.socket(listen.family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        if listen.family == socket.AF_INET6:
            # Keep IPv6 groups IPv6-only so "[::]:80" and "0.0.0.0:80" are separate, predictable groups.
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind(listen.sockaddr)
        # Every member gets the same backlog: migration ignores the target's backlog (docs/kernel.md §4),
        # so a smaller new listener would take the old queue and then drop new connections.
        sock.listen(backlog)
    except OSError as exc:
        sock.close()
        raise OSError(exc.errno, f"cannot listen on {listen}: {exc.strerror}") from None
    return Listener(listen=listen, name=name, sock=sock)


def unique(listeners: Iterable[Listener]) -> list[Listener]:
    """Each listener once, in order: the workers of a generation with one shared queue all hold its listeners."""
    return list({id(listener): listener for listener in listeners}.values())


def order_of(listener: Listener) -> steer.GroupOrder[Listener] | None:
    return listener.group.order if listener.group is not None else None


def shut(listener: Listener) -> None:
    """Take the listener out of its group now; the kernel migrates its queue (tcp_migrate_req=1).

    SHUT_RDWR on the master's copy stops the socket even while the worker still holds its fd;
    closing the copy alone would do nothing (docs/kernel.md §5). SHUT_WR would be a no-op on a listener.
    """
    if listener.shut:
        return
    listener.shut = True
    try:
        listener.sock.shutdown(socket.SHUT_RDWR)
    except OSError as exc:
        # ENOTCONN: already out of LISTEN (e.g. the worker called shutdown itself); nothing to migrate.
        if exc.errno != errno.ENOTCONN:
            raise
    finally:
        if (order := order_of(listener)) is not None:
            order.stopped(listener)


def steer_to(fresh: list[Listener]) -> list[Listener]:
    """Send every new connection of the groups of `fresh` to them (steer.py: the kernel race of a
    shutdown during a handshake); returns one member per steered group, for `unsteer`."""
    steered = []
    for members in _by_address(fresh).values():
        order = order_of(members[0])
        try:
            if order is not None:
                steer.attach(members[0].sock, order.indices(members))
                steered.append(members[0])
        except (OSError, ValueError):
            pass  # not steered: the shutdown below is the plain one, as without steering
    return steered


def shut_steered(old: list[Listener], fresh: list[Listener]) -> int:
    """Shut `old`, one group at a time, the program rewritten before each shutdown; returns how many."""
    count = 0
    fresh_by = _by_address(fresh)
    for address, members in _by_address([listener for listener in old if not listener.shut]).items():
        order, new = order_of(members[0]), fresh_by.get(address)
        try:
            if order is not None and new and all(m in order.members for m in [*members, *new]):
                steer.shut_steered(order, members, new, lambda m: m.sock, shut)
        except (OSError, ValueError):
            pass
        for listener in members:  # whatever the steering did not shut
            shut(listener)
        count += len(members)
    return count


def unsteer(steered: list[Listener]) -> None:
    for listener in steered:
        try:
            steer.detach(listener.sock)
        except OSError:
            pass


def handshaking(old: Iterable[Listener]) -> bool:
    """Whether a handshake may be in flight on the ports of the `old` listeners not shut yet (a steered
    switch waits for those: model/drain.py)."""
    return handshakes.pending({listener.listen.port for listener in old if not listener.shut})


def _by_address(listeners: list[Listener]) -> dict[str, list[Listener]]:
    out: dict[str, list[Listener]] = {}
    for listener in unique(listeners):
        out.setdefault(str(listener.listen), []).append(listener)
    return out


def close(listener: Listener) -> None:
    """Shut the listener, then drop the master's copy."""
    try:
        shut(listener)
    finally:
        listener.sock.close()


def tcp_queue(sock: socket.socket) -> tuple[int, int]:
    """(queued, backlog) of a listening socket, from TCP_INFO.

    For a listener the kernel reports the accept-queue length in tcpi_unacked and the backlog in
    tcpi_sacked (tcp_get_info() in net/ipv4/tcp.c).
    """
    info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 104)
    return int.from_bytes(info[24:28], "little"), int.from_bytes(info[28:32], "little")
