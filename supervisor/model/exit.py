"""What a worker's end means: the model decides, the daemon applies (daemon/workers.py).

A worker that ended is one of: a new generation's worker that never got ready (its reload decides:
roll back), a recycling replacement that failed (the old worker serves on, a new try later), a
crash of a serving worker (restart after a backoff, or FATAL), or a worker that was on its way out.
"""

from __future__ import annotations

from dataclasses import dataclass

from supervisor.model.generation import Generation
from supervisor.model.program import ProgramRuntime
from supervisor.model.restart import Fatal, Restart
from supervisor.process.worker import Worker, WorkerState


@dataclass(frozen=True)
class StartFailed:
    """A worker of a generation that a reload is starting ended before the reload committed."""


@dataclass(frozen=True)
class ReplacementFailed:
    """A recycling replacement ended; the worker it was to replace serves on."""


@dataclass(frozen=True)
class Crashed:
    """A serving worker ended unasked: restart its slot later, or the program is FATAL now."""

    then: Restart | Fatal


@dataclass(frozen=True)
class Left:
    """A retiring worker, or one of a generation that no longer serves: nothing to do but forget it."""


End = StartFailed | ReplacementFailed | Crashed | Left


def worker_ended(w: Worker, was: WorkerState, gen: Generation, record: ProgramRuntime, starting: bool,
                 now: float) -> End:
    """Decide what the end of `w` (in state `was` before it ended) means, and record it in its slot and
    program. `starting`: its generation is one the reload in progress starts."""
    if starting:
        return StartFailed()
    slot = gen.slot_of(w)
    if gen is not record.serving or slot is None or was is WorkerState.RETIRING:  # one being switched out
        return Left()
    record.last_exit = f"worker {w.index} (pid {w.pid}) {w.describe_exit()}"
    if w is slot.replacement:
        slot.replacement_failed(now)
        return ReplacementFailed()
    then = slot.crashed(w, now, record.crash_history(gen.program))
    if isinstance(then, Fatal):
        record.went_fatal(then.why)
    else:
        record.restarts += 1
    return Crashed(then)
