"""A rolling reload (`strategy: rolling`, model/roll.py) as the master applies it, batch by batch.

Each step: the batch's new workers start (`start_batch`); once they are ready, new connections are
steered away from the batch's old listeners (`steer`); once no handshake is in flight on them (at
most `SWITCH_DRAIN` later) those are shut and their workers stopped (`switch`); a roll that fails puts
the replaced slots back (`put_back`).
"""

from __future__ import annotations

import structlog

from supervisor.daemon import events as ev
from supervisor.daemon import workers
from supervisor.daemon.host import Host
from supervisor.errors import SupervisorError
from supervisor.model.drain import SWITCH_DRAIN, Drain, Way, way
from supervisor.model.reload import Reload
from supervisor.model.roll import Roll
from supervisor.model.slot import Slot
from supervisor.protocol.words import plural
from supervisor.system import listeners

log = structlog.get_logger()


def start_batch(host: Host, reload: Reload, roll: Roll) -> None:
    """Step 1: the next batch's new workers start; its ready timeout starts now. Raises a spawn failure."""
    program = roll.new.program
    indexes = roll.next_batch()
    reload.reply.progress(f"{program.name}: rolling slots {_show(roll.step)} "
                          f"({len(roll.replaced)} of {roll.total} replaced)")
    log.info("roll_batch", program=program.name, gen=roll.new.number, slots=roll.step, replaced=len(roll.replaced))
    if roll.timer is not None:
        roll.timer.cancel()
    roll.timer = host.later(program.ready_timeout, ev.ReadyTimeout(reload.id, program.name, roll.new.number))
    reload.timers.append(roll.timer)
    for index in indexes:
        try:
            w = roll.new.spawn(host.spawner, index)
        except (OSError, SupervisorError) as exc:
            raise SupervisorError(f"{program.name}: generation {roll.new.number}: {exc}") from None
        roll.new.slots[index] = Slot(index, w)
        workers.watch(host, w, roll.new)


def steer(host: Host, reload: Reload, roll: Roll) -> None:
    """Step 3, first half: the batch serves; new connections go to every other listener of the group,
    and the old listeners wait until they may be shut (model/drain.py: the handshakes routed to them
    complete; without migration, their workers accept what waits)."""
    if roll.timer is not None:
        roll.timer.cancel()
    roll.switching = True
    leaving = roll.leaving_listeners()
    roll.steered = listeners.steer_to(roll.staying_listeners()) if leaving else []
    roll.drain = Drain(way(host.migration.drains, host.migration.enabled), host.clock.time(),
                       roll.old.program.drain_timeout)
    # Drained: the queues are first looked at SWITCH_DRAIN later. Otherwise the batch's old listeners are
    # shut at once, or SWITCH_DRAIN later if a handshake may be in flight on them (roll_due asks).
    drained = (roll.steered or leaving) and roll.drain.way is Way.DRAINED
    host.later(SWITCH_DRAIN if drained else 0.0, ev.RollDue(reload.id, roll.new.program.name))


def switch(host: Host, reload: Reload, roll: Roll, dropped: int) -> None:
    """Step 3, second half: shut the batch's old listeners (queues migrate, or were drained), stop its
    old workers. `dropped`: what the drained listeners still held (drain_timeout passed)."""
    drained = "" if roll.drain is None or roll.drain.way is not Way.DRAINED else \
        f" (drained in {roll.drain.ms} ms, {dropped} dropped)"
    shut = listeners.shut_steered(roll.leaving_listeners(), roll.staying_listeners())
    listeners.unsteer(roll.steered)
    step = roll.step
    leaving = [w for slot in roll.switched() for w in slot.workers() if w.alive]
    workers.stop_later(host, roll.old.program, roll.old.leave(leaving))
    log.info("roll_switched", program=roll.old.program.name, slots=step, listeners_closed=shut,
             retiring=[w.pid for w in leaving])
    reload.reply.progress(f"{roll.old.program.name}: slots {_show(step)} now on generation {roll.new.number}: "
                          f"{plural(shut, 'old listener')} closed{drained}, "
                          f"{plural(len(leaving), 'old worker')} stopping")


def put_back(host: Host, roll: Roll) -> str:
    """The roll failed: its replaced slots get workers of the old config again, started now; returns
    what the reply says about it ("" when nothing had been replaced yet)."""
    listeners.unsteer(roll.steered)
    back = sorted(i for i in roll.replaced if i < roll.old_size)
    if not back:
        return ""
    roll.old.scale(roll.old_size, host.clock.time())  # only the slots it gave up are empty
    workers.manage(host)
    log.warning("roll_rolled_back", program=roll.old.program.name, slots=back, gen=roll.old.number)
    return (f"{roll.old.program.name}: slot{'s' if len(back) > 1 else ''} {_show(back)} rolled back "
            f"to generation {roll.old.number}")


def _show(indexes: list[int]) -> str:
    return ", ".join(map(str, indexes))
