"""A rolling reload (`strategy: rolling`): a program's new generation replaces the serving one `batch`
slots at a time, so that at most N+batch workers are alive at once instead of 2N.

Each step, as a whole reload does it but for a few slots:
1. start the new generation's workers for the next `batch` slot indexes (fresh listeners join the groups);
2. wait until they are ready (or one exits, or `ready_timeout` passes: the roll stops and rolls back);
3. steer new connections away from the old workers of those slots, then (model/drain.py) shut their
   listeners (the kernel migrates their queues to the rest of the group) and stop them;
4. once those old workers have exited (their stop signal `stop_delay` after the shut, SIGKILL
   `graceful_timeout` later), the next batch: never more than N+batch worker processes. The first
   batch, likewise, waits for the workers of earlier generations still on their way out (a reload
   right after another).
Once every slot is replaced the reload commits as usual: the new generation serves.

Until then the old generation is the program's serving one, with its config: crash restarts of its
slots not yet replaced use it. A roll that fails puts the slots already replaced back on it (new
workers from the old config, started at once) and shuts the new generation's listeners, whose queues
migrate to the old workers; the reply names the slots that were put back.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

from supervisor.model.drain import Drain
from supervisor.model.generation import Generation
from supervisor.model.slot import Slot
from supervisor.process.worker import Worker, WorkerState
from supervisor.system import listeners
from supervisor.system.listeners import Listener


class Timer(Protocol):
    def cancel(self) -> None: ...


@dataclass(eq=False)
class Roll:
    """One program's roll: which slots are replaced, which are being replaced, which wait."""

    old: Generation  # serving until the roll is done; gives up a slot per index replaced
    new: Generation  # starting; gets a slot per index replaced (indexes below its `workers`)
    batch: int
    todo: list[int]  # slot indexes still to replace, in order
    old_size: int  # the old generation's slots when the roll began, to put back on a failure
    step: list[int] = field(default_factory=list)  # the indexes of the batch in progress
    replaced: list[int] = field(default_factory=list)  # indexes whose old worker has been retired
    switching: bool = False  # the batch is ready; its old listeners are shut once no handshake is in flight on
    # them, at most SWITCH_DRAIN later (drain.Drain)
    steered: list[Listener] = field(default_factory=list)
    stopping: list[Worker] = field(default_factory=list)  # the last batch's old workers, until they exit
    timer: Timer | None = None  # the batch's ready timeout
    drain: Drain | None = None  # the batch's switch: when its old listeners may be shut

    @classmethod
    def of(cls, old: Generation, new: Generation, leaving: list[Worker] | None = None) -> Roll:
        """`leaving`: workers of earlier generations still on their way out (a roll that ended just before):
        the first batch waits for them as each later batch waits for the one before."""
        indexes = sorted(set(old.slots) | set(range(new.program.workers)))
        return cls(old, new, new.program.batch, indexes, old_size=len(old.slots),
                   stopping=[w for w in leaving or [] if w.alive])

    @property
    def total(self) -> int:
        return len(self.replaced) + len(self.step) + len(self.todo)

    @property
    def done(self) -> bool:
        return not self.todo and not self.step

    def next_batch(self) -> list[int]:
        """The next `batch` indexes become the step in progress; returns those that get a new worker."""
        self.step, self.todo = self.todo[:self.batch], self.todo[self.batch:]
        return [i for i in self.step if i < self.new.program.workers]

    def next_due(self) -> bool:
        """No batch in progress, slots left to replace, and the last batch's old workers have exited."""
        return not self.step and bool(self.todo) and not any(w.alive for w in self.stopping)

    def batch_ready(self) -> bool:
        """Every new worker of the step is ready, and its switch has not begun."""
        if not self.step or self.switching:
            return False
        fresh = [self.new.slots.get(i) for i in self.step if i < self.new.program.workers]
        return all(s is not None and s.worker is not None and s.worker.state is WorkerState.READY for s in fresh)

    def leaving_listeners(self) -> list[Listener]:
        """The listeners of the old workers of the step: shut at its switch. The old generation's shared
        ones (`accept_queue: shared`) serve its other slots: they go with the step that leaves none."""
        last = not set(self.old.slots) - set(self.step)
        return listeners.unique(listener for i in self.step if i in self.old.slots
                                for w in self.old.slots[i].workers()
                                for listener in w.listeners if not listener.shut and (last or not listener.shared))

    def staying_listeners(self) -> list[Listener]:
        """Where the group's new connections go while the step's old listeners are shut."""
        going = set(map(id, self.leaving_listeners()))
        return listeners.unique(listener for g in (self.old, self.new) for w in g.workers
                                if w.alive and w.state is not WorkerState.RETIRING
                                for listener in w.listeners if not listener.shut and id(listener) not in going)

    def switched(self) -> list[Slot]:
        """The step's old slots leave the old generation (returned, to be retired); the step is replaced."""
        gone = [self.old.slots.pop(i) for i in self.step if i in self.old.slots]
        self.replaced += self.step
        self.step, self.switching, self.steered = [], False, []
        self.stopping = [w for slot in gone for w in slot.workers() if w.alive]
        return gone

    def facts(self) -> dict[str, Any]:
        """For `status`: how far the roll is."""
        return {"replaced": len(self.replaced), "replacing": list(self.step), "of": self.total,
                "batch": self.batch, "from": self.old.number, "to": self.new.number}
