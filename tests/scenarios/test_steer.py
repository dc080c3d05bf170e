"""Steering a reuseport group's new connections (supervisor.steer), with real sockets in a private namespace."""

from __future__ import annotations

import socket
from collections.abc import Iterator

import pytest

from supervisor.system import steer

pytestmark = pytest.mark.usefixtures("netns")
ADDRESS = ("127.0.0.1", 8000)


def member(order: steer.GroupOrder[socket.socket]) -> socket.socket:
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind(ADDRESS)
    sock.listen(1024)
    order.listening(sock)
    return sock


def queued(sock: socket.socket) -> int:
    """Connections in the accept queue (tcpi_unacked of a listener)."""
    return int.from_bytes(sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 104)[24:28], "little")


@pytest.fixture
def clients() -> Iterator[list[socket.socket]]:
    made: list[socket.socket] = []
    yield made
    for sock in made:
        sock.close()


def connect(clients: list[socket.socket], n: int) -> None:
    """n connections: the kernel completes their handshakes and queues them, nobody accepts."""
    for _ in range(n):
        clients.append(socket.create_connection(ADDRESS, timeout=5))


def test_steered_connections_all_reach_the_chosen_members(clients: list[socket.socket]) -> None:
    order: steer.GroupOrder[socket.socket] = steer.GroupOrder()
    old = [member(order) for _ in range(2)]
    new = [member(order) for _ in range(2)]
    steer.attach(new[0], order.indices(new))
    connect(clients, 200)
    assert [queued(s) for s in old] == [0, 0]
    assert sum(queued(s) for s in new) == 200 and min(queued(s) for s in new) > 50  # spread over both
    assert steer.detach(new[1]) and not steer.detach(new[1])  # any member acts for the group
    connect(clients, 200)
    assert sum(queued(s) for s in old) > 50  # the kernel's hash again


def test_the_order_follows_the_kernel_when_members_stop(clients: list[socket.socket]) -> None:
    """The kernel moves the last member into a stopped one's index: steering to each one by its index proves it."""
    order: steer.GroupOrder[socket.socket] = steer.GroupOrder()
    socks = [member(order) for _ in range(5)]
    for gone in (socks[1], socks[0]):
        gone.shutdown(socket.SHUT_RDWR)
        order.stopped(gone)
    socks.append(member(order))
    assert order.members == [socks[3], socks[4], socks[2], socks[5]]
    for target in order.members:
        before = queued(target)
        steer.attach(target, order.indices([target]))
        connect(clients, 20)
        assert queued(target) - before == 20


def test_a_jump_table_for_members_that_are_not_adjacent(clients: list[socket.socket]) -> None:
    order: steer.GroupOrder[socket.socket] = steer.GroupOrder()
    socks = [member(order) for _ in range(4)]
    chosen = [socks[3], socks[1]]
    assert steer.program(order.indices(chosen))[2][0] == 0x15  # jeq: not a range
    steer.attach(socks[0], order.indices(chosen))
    connect(clients, 100)
    assert (queued(socks[0]), queued(socks[2])) == (0, 0)
    assert queued(socks[1]) + queued(socks[3]) == 100


def test_an_index_out_of_range_falls_back_to_the_hash(clients: list[socket.socket]) -> None:
    """A stale order costs the steering, never a connection."""
    order: steer.GroupOrder[socket.socket] = steer.GroupOrder()
    socks = [member(order) for _ in range(2)]
    steer.attach(socks[0], [7])
    connect(clients, 100)
    assert queued(socks[0]) + queued(socks[1]) == 100 and min(map(queued, socks)) > 10


def test_no_program_for_no_member_or_too_many() -> None:
    with pytest.raises(ValueError):
        steer.program([])
    with pytest.raises(ValueError):
        steer.program(list(range(1001)))


@pytest.mark.parametrize(("old_count", "new_count"), [(2, 2), (3, 1), (2, 4)])
def test_retirement_keeps_every_new_connection_off_the_old_members(clients: list[socket.socket], old_count: int,
                                                                    new_count: int) -> None:
    """Each step's program holds before and after its shutdown (the kernel refills the hole with the last member)."""
    order: steer.GroupOrder[socket.socket] = steer.GroupOrder()
    old = [member(order) for _ in range(old_count)]
    new = [member(order) for _ in range(new_count)]
    steer.attach(new[0], order.indices(new))
    for gone, targets in order.retirement(old, new):
        stable = new_count > 1 or order.members[-1] is gone  # else its index is gone after the shutdown
        steer.attach(new[0], targets)
        connect(clients, 20)
        assert [queued(s) for s in old if s in order.members] == [0] * sum(s in order.members for s in old)
        gone.shutdown(socket.SHUT_RDWR)
        order.stopped(gone)
        if stable:
            connect(clients, 20)
            assert [queued(s) for s in old if s in order.members] == [0] * sum(s in order.members for s in old)
    assert sum(queued(s) for s in new) == len(clients)
