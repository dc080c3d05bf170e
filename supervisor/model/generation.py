"""A generation: one start of a program under one config snapshot, its worker slots and their listeners.

Lifecycle: `STARTING -> SERVING -> RETIRING -> RETIRED`, or `STARTING -> ROLLED_BACK`; each move is
one method, checked and logged. Invariants:
- a generation only retires once its successor is SERVING, so the group always has listeners
  with live workers behind them (except on stop/shutdown, where that is the point);
- every listener of a generation is shut before its workers get any signal (`Worker.stop` and
  `Worker.kill` shut first), so the kernel moves their queues to the remaining members instead
  of resetting them. `retire()` shuts all of them at once, before any worker is told anything.
- with `accept_queue: shared` the generation owns one listener per address, opened with its first
  worker and inherited by every worker it starts: a worker that goes (crash, recycling, scale down,
  kill) leaves it open for its siblings; it is shut only when the generation retires or rolls back
  (or, FATAL, once no worker is left to accept), and closed when its last worker has exited.
"""

from __future__ import annotations

import dataclasses
import enum
import os
import shutil
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

import structlog

from supervisor.config import plain, tls
from supervisor.config.schema import AcceptQueue, Program
from supervisor.errors import SpawnError
from supervisor.model.slot import Slot
from supervisor.process.worker import Worker, WorkerState
from supervisor.system import accounts, listeners
from supervisor.system.listeners import Listener

log = structlog.get_logger()


class GenerationState(enum.Enum):
    STARTING = "starting"
    SERVING = "serving"
    RETIRING = "retiring"
    RETIRED = "retired"
    ROLLED_BACK = "rolled_back"


def shared_backlog(program: Program) -> int:
    """The backlog of a generation's shared listener: the program's `backlog` for each of its workers,
    the room that one queue per worker would give them together (the kernel caps it at
    net.core.somaxconn). With `backlog` alone, making `shared` the default would have cut the room
    for waiting connections by the number of workers: 2 x 128 in flight against 2 slow workers
    (gunicorn sync, uvicorn) overflowed one queue of 128, and the SYNs dropped came back after 1 s
    and 3 s, or timed out (python -m bench --only peers)."""
    return program.backlog * program.workers


class Spawner(Protocol):
    """What starts a worker: `worker.Spawner` for real, a fake in the unit tests."""

    def listen(self, program: Program, backlog: int | None = None) -> list[Listener]: ...

    def spawn(self, program: Program, generation: int, index: int, shared: list[Listener] | None = None) -> Worker: ...


@dataclass(eq=False)
class Generation:
    """The workers of one program started together; replaced as a whole on reload."""

    program: Program
    number: int
    slots: dict[int, Slot] = field(default_factory=dict)
    leaving: list[Worker] = field(default_factory=list)  # scaled down or recycled out, until they exit
    # Scaled down while still starting: each leaves once it is ready, so that no worker is ever handed
    # a listener already shut; its listeners stay in the group meanwhile, and what queues there is served.
    unwanted: list[Worker] = field(default_factory=list)
    state: GenerationState = GenerationState.STARTING
    started: float = field(default_factory=time.monotonic)
    ready_at: float | None = None
    tls_folder: str | None = None  # the copies of the certificate and key its workers read
    shared: list[Listener] = field(default_factory=list)  # `accept_queue: shared`: one per address
    kept: bool = False  # handed over to systemd's fd store: its shared listeners are never shut here

    @classmethod
    def create(cls, program: Program, number: int, runtime_dir: str, bundle: tls.Bundle | None) -> Generation:
        """A new generation; its workers, also those started later, read the TLS copies made here."""
        folder = None
        if bundle is not None and program.tls is not None:
            # Every worker of the generation, also one restarted, scaled up or recycled later, reads
            # these copies of the bytes just checked: new files on disk wait for the next reload.
            folder = os.path.join(runtime_dir, f"tls.{number}.{program.name}")  # digits first: no two alike
            cert, key = bundle.install(folder, accounts.run_as(program))
            program = dataclasses.replace(program, tls=dataclasses.replace(program.tls, cert=cert, key=key))
        return cls(program, number, tls_folder=folder)

    @property
    def name(self) -> str:
        return f"{self.program.name}#{self.number}"

    # -- workers ------------------------------------------------------------------------------------

    @property
    def workers(self) -> list[Worker]:
        """Every worker of the generation, by slot, then those leaving it."""
        return [w for index in sorted(self.slots) for w in self.slots[index].workers()] + self.leaving + self.unwanted

    @property
    def live_workers(self) -> list[Worker]:
        return [w for w in self.workers if w.alive]

    @property
    def size(self) -> int:
        return len(self.slots)

    def active_slots(self) -> set[int]:
        """Worker indexes with a worker that is not on its way out."""
        return {index for index, slot in self.slots.items() if slot.active}

    def slot_of(self, w: Worker) -> Slot | None:
        slot = self.slots.get(w.index)
        return slot if slot is not None and slot.holds(w) else None

    def all_ready(self) -> bool:
        return bool(self.slots) and all(s.worker is not None and s.worker.state is WorkerState.READY
                                        for s in self.slots.values())

    def finished(self) -> bool:
        return not self.live_workers

    def start(self, spawner: Spawner, limit: int | None = None) -> bool:
        """Open the listeners and spawn the workers of the slots still empty, `limit` of them at most (all
        by default; the others wait in empty slots); True once every slot has its worker. On error raise
        (the reload rolls back what started)."""
        empty = [i for i in range(self.program.workers) if i not in self.slots or self.slots[i].worker is None]
        for index in empty[:limit]:
            self.slots[index] = Slot(index, self.spawn(spawner, index))
        for index in empty[limit:] if limit is not None else ():
            self.slots.setdefault(index, Slot(index))
        return limit is None or len(empty) <= limit

    def spawn(self, spawner: Spawner, index: int) -> Worker:
        """The one way a worker of this generation starts: on fresh listeners that join the groups, or
        (`accept_queue: shared`) on the generation's, opened with its first worker."""
        if self.program.accept_queue is not AcceptQueue.SHARED:
            return spawner.spawn(self.program, self.number, index)
        if not self.shared:
            self.shared = spawner.listen(self.program, shared_backlog(self.program))
            for listener in self.shared:
                listener.shared = True
        if any(listener.shut for listener in self.shared):
            raise SpawnError(f"{self.name}: its shared listeners are shut; it starts no more workers")
        return spawner.spawn(self.program, self.number, index, self.shared)

    def every_listener(self) -> list[Listener]:
        """Every listener of the generation, each once (its workers all hold the shared ones)."""
        return listeners.unique([*self.shared, *(listener for w in self.workers for listener in w.listeners)])

    def scale(self, count: int, now: float) -> list[Worker]:
        """Slots 0..count-1, each to be filled now if empty; returns the ready workers of the slots that go
        (those still starting wait in `unwanted` until they are ready)."""
        for index in range(count):
            slot = self.slots.setdefault(index, Slot(index))
            if slot.worker is None:
                slot.restart_at = now  # also one waiting for its restart: `scale` starts it now
        gone = [self.slots.pop(index) for index in sorted(self.slots) if index >= count]
        going = [w for slot in gone for w in slot.workers() if w.alive]
        self.unwanted += [w for w in going if w.state is WorkerState.STARTING]
        return [w for w in going if w.state is not WorkerState.STARTING]

    def due(self, now: float) -> list[Slot]:
        """Empty slots whose worker is to start now (restart after a crash, scale up, spawn retry)."""
        return [slot for index, slot in sorted(self.slots.items()) if slot.due(now)]

    def recycling(self, now: float) -> list[tuple[Slot, str]]:
        """Slots whose worker is over max_age or max_rss, with the reason; none while one is being replaced."""
        program = self.program
        if program.max_rss is None and program.max_age is None:
            return []
        due = [(slot, slot.recycle_reason(program.max_rss, program.max_age, now))
               for index, slot in sorted(self.slots.items()) if slot.wants_recycling(now)]
        return [(slot, reason) for slot, reason in due if reason]

    def leave(self, workers: list[Worker]) -> list[Worker]:
        """Workers leave a serving generation (scale down, recycled): shut now, stopped by the master."""
        for w in workers:
            w.retire()
            if w not in self.leaving:
                self.leaving.append(w)
        return workers

    def draining(self, workers: list[Worker]) -> None:
        """Workers on their way out of a serving generation whose listeners are drained first (no
        migration): out of their slots, still accepting until `leave`."""
        self.leaving += [w for w in workers if w not in self.leaving]

    def worker_gone(self, w: Worker) -> None:
        if w in self.unwanted:
            self.unwanted.remove(w)
        if w in self.leaving:
            self.leaving.remove(w)

    def queued(self) -> int:
        """Connections waiting in this generation's accept queues (what a shut would migrate)."""
        total = 0
        for listener in self.every_listener():
            if not listener.shut:
                try:
                    total += listener.queued()
                except OSError:
                    pass
        return total

    def kill(self) -> None:
        for w in self.workers:
            w.kill()

    # -- transitions --------------------------------------------------------------------------------

    def _move(self, to: GenerationState, *sources: GenerationState) -> None:
        if self.state not in sources:
            raise RuntimeError(f"generation {self.name}: {self.state.value} -> {to.value} is not a transition")
        log.debug("generation_state", program=self.program.name, gen=self.number, came=self.state.value,
                  state=to.value)
        self.state = to

    def mark_serving(self) -> None:
        self._move(GenerationState.SERVING, GenerationState.STARTING)
        self.ready_at = time.monotonic()

    def retire(self) -> int:
        """Shut every listener at once and mark every worker retiring; returns the listeners shut.

        All shutdowns happen before any signal (the master sends those after `stop_delay`), so a
        worker that exits quickly never closes a listener that could still receive migrations.
        """
        self._move(GenerationState.RETIRING, GenerationState.SERVING)
        return self._shut_all()

    def hand_over(self) -> list[Worker]:
        """Retire without shutting anything: the listeners stay open in systemd's fd store for the next
        start (fdstore.py), so no signal or kill of these workers shuts them either."""
        self._move(GenerationState.RETIRING, GenerationState.SERVING)
        self.kept = True
        for w in self.workers:
            w.kept = True
            w.retire()
        return self.live_workers

    def rollback(self) -> list[Worker]:
        """Shut the listeners first (their queues migrate back to the serving generation).

        Workers not ready yet are killed; ready ones may hold accepted connections, so they are
        returned to be stopped as retiring workers are.
        """
        self._move(GenerationState.ROLLED_BACK, GenerationState.STARTING)
        starting = [w for w in self.workers if w.state is WorkerState.STARTING]
        self._shut_all()
        for w in starting:
            w.kill()
        return [w for w in self.live_workers if w not in starting]

    def finish(self) -> None:
        """The last worker has exited: the shared listeners and the TLS copies go, a retiring generation
        is retired."""
        for listener in self.shared:
            if self.kept:
                listener.sock.close()  # the fd store keeps it open and listening for the next master
            else:
                listeners.close(listener)
        self.shared = []
        if self.tls_folder is not None:
            shutil.rmtree(self.tls_folder, ignore_errors=True)
        if self.state is GenerationState.RETIRING:
            self._move(GenerationState.RETIRED, GenerationState.RETIRING)

    def shut_shared(self) -> int:
        """Shut the shared listeners (FATAL, no worker left: what waits there is reset, not left hanging)."""
        count = 0
        for listener in self.shared:
            if not listener.shut and not self.kept:
                listeners.shut(listener)
                count += 1
        return count

    def _shut_all(self) -> int:
        count = 0
        for listener in self.every_listener():
            if not listener.shut:
                listeners.shut(listener)
                count += 1
        for w in self.workers:
            w.retire()
        return count

    # -- plain data ---------------------------------------------------------------------------------

    def to_json(self) -> dict[str, Any]:
        return {"program": plain.to_plain(self.program), "number": self.number, "state": self.state.value,
                "started": self.started, "ready_at": self.ready_at, "tls_folder": self.tls_folder,
                "slots": [self.slots[i].to_json() for i in sorted(self.slots)],
                "leaving": [w.to_json() for w in self.leaving], "unwanted": [w.to_json() for w in self.unwanted],
                "shared": [listener.to_json() for listener in self.shared], "kept": self.kept}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Generation:
        slots = [Slot.from_json(s) for s in data["slots"]]
        gen = cls(program=plain.from_plain(Program, data["program"]), number=data["number"],
                  slots={s.index: s for s in slots}, leaving=[Worker.from_json(w) for w in data["leaving"]],
                  unwanted=[Worker.from_json(w) for w in data.get("unwanted", ())],
                  state=GenerationState(data["state"]), started=data["started"], ready_at=data["ready_at"],
                  tls_folder=data["tls_folder"], shared=[Listener.from_json(s) for s in data.get("shared", ())],
                  kept=data.get("kept", False))
        for w in gen.live_workers:  # every live worker holds them (a worker's own record leaves them out)
            w.listeners = [*gen.shared, *w.listeners]
        return gen
