"""A rolling reload (`strategy: rolling`): a program's new generation replaces the serving one `batch`
slots at a time, so that at most N+batch workers are alive at once instead of 2N.

Each step, as a whole reload does it but for a few slots:
1. start the new generation's workers for the next `batch` slot indexes (fresh listeners join the groups);
2. wait until they are ready (or one exits, or `ready_timeout` passes: the roll stops and rolls back);
3. steer new connections away from the old workers of those slots, `SWITCH_DRAIN` later shut their
   listeners (the kernel migrates their queues to the rest of the group) and stop them;
4. once those old workers have exited (their stop signal `stop_delay` after the shut, SIGKILL
   `graceful_timeout` later), the next batch: never more than N+batch worker processes.
Once every slot is replaced the reload commits as usual: the new generation serves.

Until then the old generation is the program's serving one, with its config: crash restarts of its
slots not yet replaced use it. A roll that fails puts the slots already replaced back on it (new
workers from the old config, started at once) and shuts the new generation's listeners, whose queues
migrate to the old workers; the reply names the slots that were put back.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import structlog

from supervisor.daemon import events as ev
from supervisor.daemon import workers
from supervisor.errors import SupervisorError
from supervisor.model.generation import Generation
from supervisor.model.slot import Slot
from supervisor.process.worker import Worker, WorkerState
from supervisor.system import listeners
from supervisor.system.listeners import Listener

if TYPE_CHECKING:
    from supervisor.daemon.master import Master
    from supervisor.model.reload import Reload

log = structlog.get_logger()


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
    switching: bool = False  # the batch is ready; its old listeners are shut after SWITCH_DRAIN
    steered: list[Listener] = field(default_factory=list)
    stopping: list[Worker] = field(default_factory=list)  # the last batch's old workers, until they exit
    timer: asyncio.Handle | None = None  # the batch's ready timeout

    @classmethod
    def of(cls, old: Generation, new: Generation) -> Roll:
        indexes = sorted(set(old.slots) | set(range(new.program.workers)))
        return cls(old, new, new.program.batch, indexes, old_size=len(old.slots))

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
        """The listeners of the old workers of the step: shut at its switch."""
        return [listener for i in self.step if i in self.old.slots for w in self.old.slots[i].workers()
                for listener in w.listeners if not listener.shut]

    def staying_listeners(self) -> list[Listener]:
        """Where the group's new connections go while the step's old listeners are shut."""
        going = set(map(id, self.leaving_listeners()))
        return [listener for g in (self.old, self.new) for w in g.workers
                if w.alive and w.state is not WorkerState.RETIRING
                for listener in w.listeners if not listener.shut and id(listener) not in going]

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


# -- as the master applies it ----------------------------------------------------------------------

def start_batch(master: Master, reload: Reload, roll: Roll) -> None:
    """Step 1: the next batch's new workers start; its ready timeout starts now. Raises a spawn failure."""
    program = roll.new.program
    indexes = roll.next_batch()
    reload.reply.progress(f"{program.name}: rolling slots {_show(roll.step)} "
                          f"({len(roll.replaced)} of {roll.total} replaced)")
    log.info("roll_batch", program=program.name, gen=roll.new.number, slots=roll.step, replaced=len(roll.replaced))
    if roll.timer is not None:
        roll.timer.cancel()
    roll.timer = master.later(program.ready_timeout, ev.ReadyTimeout(reload.id, roll.new))
    reload.timers.append(roll.timer)
    for index in indexes:
        try:
            w = roll.new.spawn(master.spawner, index)
        except (OSError, SupervisorError) as exc:
            raise SupervisorError(f"{program.name}: generation {roll.new.number}: {exc}") from None
        roll.new.slots[index] = Slot(index, w)
        workers.watch_worker(master, w, roll.new)


def steer(master: Master, reload: Reload, roll: Roll, drain: float) -> None:
    """Step 3, first half: the batch serves; new connections go to every other listener of the group,
    and the handshakes already routed to the old listeners have `drain` seconds to complete (steer.py)."""
    if roll.timer is not None:
        roll.timer.cancel()
    roll.switching = True
    roll.steered = listeners.steer_to(roll.staying_listeners()) if roll.leaving_listeners() else []
    master.later(drain if roll.steered else 0.0, ev.RollDue(reload.id, roll.new.program.name))


def switch(master: Master, reload: Reload, roll: Roll) -> None:
    """Step 3, second half: shut the batch's old listeners (queues migrate), stop its old workers."""
    shut = listeners.shut_steered(roll.leaving_listeners(), roll.staying_listeners())
    listeners.unsteer(roll.steered)
    step = roll.step
    leaving = [w for slot in roll.switched() for w in slot.workers() if w.alive]
    master.stop_later(roll.old.program, roll.old.leave(leaving))
    log.info("roll_switched", program=roll.old.program.name, slots=step, listeners_closed=shut,
             retiring=[w.pid for w in leaving])
    reload.reply.progress(f"{roll.old.program.name}: slots {_show(step)} now on generation {roll.new.number}: "
                          f"{shut} old listeners closed, {len(leaving)} old workers stopping")


def put_back(master: Master, roll: Roll) -> str:
    """The roll failed: its replaced slots get workers of the old config again, started now; returns
    what the reply says about it ("" when nothing had been replaced yet)."""
    listeners.unsteer(roll.steered)
    back = sorted(i for i in roll.replaced if i < roll.old_size)
    if not back:
        return ""
    roll.old.scale(roll.old_size, master.clock.time())  # only the slots it gave up are empty
    workers.manage(master)
    log.warning("roll_rolled_back", program=roll.old.program.name, slots=back, gen=roll.old.number)
    return (f"{roll.old.program.name}: slot{'s' if len(back) > 1 else ''} {_show(back)} rolled back "
            f"to generation {roll.old.number}")


def _show(indexes: list[int]) -> str:
    return ", ".join(map(str, indexes))
