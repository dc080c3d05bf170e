"""The master's workers as it applies what they do: ready, ended, not ready in time; their slots
filled again (crash restart, spawn retry, `scale`) and recycled.

The records decide (`Slot.crashed` -> `Restart | Fatal`, `Generation.scale`, `Generation.recycling`);
these functions apply that on the master's state, in its loop.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import structlog

from supervisor.daemon import events as ev
from supervisor.errors import ControlError, SupervisorError
from supervisor.model import reload as reloading
from supervisor.model.generation import Generation, GenerationState
from supervisor.model.program import serving
from supervisor.model.restart import Fatal, Restart
from supervisor.model.slot import SPAWN_RETRY
from supervisor.process.worker import Worker, WorkerState
from supervisor.system import fdstore, limits

if TYPE_CHECKING:
    from supervisor.daemon.master import Master
    from supervisor.protocol.reply import Reply

log = structlog.get_logger()

RECYCLE_POLL = 1.0  # seconds between looks for workers over max_rss / max_age
TIMER_SLACK = 0.005  # seconds a timer may fire early (see manage)


def watch_worker(master: Master, w: Worker, gen: Generation) -> None:
    if not master.watcher.watching(w) and w.alive:
        master.watcher.watch(w, gen)
        master.fdstore.keep([(fdstore.name(w.program, w.generation, w.index, n), listener.fileno())
                           for n, listener in enumerate(w.listeners)])
        if gen.state is GenerationState.SERVING:  # a restart, scale-up or recycle: no reload times it
            master.later(gen.program.ready_timeout, ev.WorkerReadyTimeout(w))


def worker_ready(master: Master, w: Worker, gen: Generation) -> None:
    w.mark_ready()
    slot = gen.slot_of(w)
    if gen.state is GenerationState.SERVING and slot is not None:
        if w is slot.replacement:
            old = slot.replacement_ready()
            log.info("worker_recycled", program=w.program, gen=w.generation, worker=w.index, pid=w.pid,
                     old_pid=old.pid if old else None)
            master.stop_later(gen.program, gen.leave([old] if old else []))
        else:
            log.info("worker_started", program=w.program, gen=w.generation, worker=w.index, pid=w.pid)
    if master.reload is not None:
        reloading.apply(master, master.reload.worker_ready())


def worker_exited(master: Master, w: Worker) -> None:
    was = w.state
    stored = [] if w.kept else [fdstore.name(w.program, w.generation, w.index, n) for n in range(len(w.listeners))]
    gen = master.watcher.exited(w)
    if gen is None:
        return  # a spurious wake-up: still running
    master.fdstore.remove(stored)
    record, slot, now = master.programs[gen.program.name], gen.slot_of(w), master.clock.time()
    fields = {"program": w.program, "gen": w.generation, "worker": w.index, "pid": w.pid,
              "status": w.describe_exit()}
    if master.reload is not None and gen in master.reload.generations:
        log.error("worker_failed_to_start", **fields)
        reloading.apply(master, master.reload.worker_exited(gen, w))
    elif gen is record.serving and slot and was is not WorkerState.RETIRING:  # not one being switched out
        # Its listeners were shut when reaped: their queues moved to its siblings.
        record.last_exit = f"worker {w.index} (pid {w.pid}) {w.describe_exit()}"
        if w is slot.replacement:  # a recycling replacement failed; the old worker serves on
            log.error("worker_recycle_failed", **fields)
            slot.replacement_failed(now)
        else:
            log.error("worker_crashed", **fields, was=was.value)
            match slot.crashed(w, now, record.crash_history(gen.program)):
                case Fatal(why=why, crashes=crashes):
                    record.went_fatal(why)
                    log.error("program_fatal", program=record.name, crashes=crashes,
                              window=gen.program.crash_window, serving=len(gen.live_workers))
                case Restart(after=after, restarts=restarts):
                    master.tally.restarted(record.name)
                    log.info("worker_respawn_scheduled", program=record.name, worker=w.index, delay=after,
                             restarts=restarts)
                    master.later(after, ev.ManageWorkers())
    else:
        log.info("worker_exited", **fields)
    gen.worker_gone(w)
    master.forget_if_finished(gen)
    if master.reload is not None and master.reload.rolls and gen not in master.reload.generations:
        reloading.apply(master, master.reload.worker_ready())  # a rolled-out worker gone: the next batch may start
    master.check_children()  # what left the worker's session is now the master's: gone with the worker


def ready_timeout(master: Master, w: Worker) -> None:
    gen = master.watcher.generation_of(w)
    if gen is not None and w.state is WorkerState.STARTING:
        log.error("worker_not_ready", program=w.program, gen=w.generation, worker=w.index, pid=w.pid,
                  timeout=gen.program.ready_timeout)
        w.kill()  # shuts its listeners first; its exit is a crash



def manage(master: Master) -> None:
    """Reconcile, as gunicorn's arbiter does: each empty slot whose time has come gets a worker."""
    # uvloop may run a timer a little before its time (loop.time() just short of the deadline):
    # without this slack, a restart due "now" would wait for a wake-up that never comes.
    now = master.clock.time() + TIMER_SLACK
    for record, gen in serving(master.programs):
        if record.fatal is None and not master.stopping:
            for slot in gen.due(now):
                slot.filled(spawn_into(master, gen, slot.index), now)
                if slot.worker is None:
                    master.later(SPAWN_RETRY, ev.ManageWorkers())


def spawn_into(master: Master, gen: Generation, index: int) -> Worker | None:
    """One more worker in a serving generation (restart, scale up, recycle), on fresh listeners."""
    try:
        w = gen.spawn(master.spawner, index)
    except (OSError, SupervisorError) as exc:
        log.error("spawn_failed", program=gen.program.name, worker=index, error=str(exc))
        return None
    watch_worker(master, w, gen)
    return w


def scale(master: Master, name: str, count: int, reply: Reply) -> None:
    """`scale NAME N`, TTIN, TTOU: more workers on fresh listeners, or retire the highest indexes."""
    gen = master.running(name).serving
    assert gen is not None
    if not 1 <= count <= 4096:
        raise ControlError(f"workers must be 1..4096, got {count}")
    running = {r.name: len(g.active_slots()) for r, g in serving(master.programs)}
    if problem := limits.scale_problem(master.config, name, count, running):
        raise ControlError(problem)
    leaving = gen.leave(gen.scale(count, master.clock.time()))
    due = gen.due(master.clock.time())
    manage(master)
    started = sum(slot.worker is not None for slot in due)  # what really started, not what was tried
    failed = f", {len(due) - started} could not start (retried in {SPAWN_RETRY:g} s)" if started < len(due) else ""
    master.stop_later(gen.program, leaving)
    log.info("program_scaled", program=name, workers=count, started=started, retiring=len(leaving))
    reply.finish(True, f"{name}: {count} workers ({started} started, {len(leaving)} retiring{failed})")


def recycle_check(master: Master) -> None:
    """Replace workers over max_rss or max_age: the new one listens first, the old one retires once it is ready."""
    now = master.clock.time()
    for record, gen in serving(master.programs):
        for slot, reason in gen.recycling(now):
            log.info("worker_recycling", program=record.name, gen=gen.number, worker=slot.index,
                     pid=slot.worker.pid if slot.worker else None, reason=reason)
            slot.replacement = spawn_into(master, gen, slot.index)
    master.later(RECYCLE_POLL, ev.RecycleCheck())
