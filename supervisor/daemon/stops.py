"""The `stop PROGRAM` requests that wait for their generation's last worker (daemon/retiring.py)."""

from __future__ import annotations

from supervisor.model.generation import Generation
from supervisor.protocol.reply import Reply


class StopWaiters:
    """`stop PROGRAM` requests, answered once the generation they stop has no worker left."""

    def __init__(self) -> None:
        self._waiting: list[tuple[Generation, Reply]] = []

    def add(self, gen: Generation, reply: Reply) -> None:
        self._waiting.append((gen, reply))

    def finished(self, gen: Generation) -> None:
        for reply in [r for g, r in self._waiting if g is gen]:
            reply.finish(True, f"{gen.program.name} stopped")
        self._waiting = [(g, r) for g, r in self._waiting if g is not gen]
