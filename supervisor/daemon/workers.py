"""The master's workers as it applies what they do: ready, ended, not ready in time; their slots
filled again (crash restart, spawn retry, `scale`) and recycled.

The records decide (`exit.worker_ended` -> `Crashed(Restart | Fatal)`..., `Generation.scale`,
`Generation.recycling`); these functions apply that on the master's state, in its loop. What a
worker's readiness or end means for a reload in progress, the master asks the reload (reloads.py).
"""

from __future__ import annotations

from collections.abc import Iterable

import structlog

from supervisor.config.schema import Program
from supervisor.daemon import events as ev
from supervisor.daemon.host import Host
from supervisor.errors import ControlError, SupervisorError
from supervisor.model import exit
from supervisor.model.drain import SWITCH_DRAIN, Departure, Drain, Shut, Way
from supervisor.model.generation import Generation, GenerationState
from supervisor.model.program import running, serving
from supervisor.model.restart import Fatal, Restart
from supervisor.model.slot import SPAWN_RETRY
from supervisor.process.preload import SPARE, Answer, Forked
from supervisor.process.worker import Worker, WorkerState
from supervisor.protocol import requests
from supervisor.protocol.reply import Reply
from supervisor.protocol.words import plural
from supervisor.system import fdstore, limits, listeners
from supervisor.system.listeners import Listener

log = structlog.get_logger()

RECYCLE_POLL = 1.0  # seconds between looks for workers over max_rss / max_age
TIMER_SLACK = 0.005  # seconds a timer may fire early (see manage)


def watch(host: Host, w: Worker, gen: Generation) -> None:
    if not host.watcher.watching(w) and w.alive:
        # The generation's shared listeners go to the store with its first watched worker, not with each.
        sent = any(host.watcher.watching(o) for o in gen.live_workers if o is not w)
        host.watcher.watch(w, gen)
        host.fdstore.keep([(stored_name(w, n, listener), listener.fileno()) for n, listener in enumerate(w.listeners)
                           if not (listener.shared and sent)])
        if gen.state is GenerationState.SERVING:  # a restart, scale-up or recycle: no reload times it
            host.later(gen.program.ready_timeout, ev.WorkerReadyTimeout(host.watcher.key(w)))


def ready(host: Host, w: Worker, gen: Generation) -> None:
    w.mark_ready()
    slot = gen.slot_of(w)
    if w in gen.unwanted and gen.state is GenerationState.SERVING:  # scaled down while it started: it leaves now
        gen.unwanted.remove(w)
        log.info("worker_started", program=w.program, gen=w.generation, worker=w.index, pid=w.pid, leaving=True)
        return leave(host, gen, [w])
    if gen.state is GenerationState.SERVING and slot is not None:
        if w is slot.replacement:
            old = slot.replacement_ready()
            log.info("worker_recycled", program=w.program, gen=w.generation, worker=w.index, pid=w.pid,
                     old_pid=old.pid if old else None)
            leave(host, gen, [old] if old else [])
        else:
            log.info("worker_started", program=w.program, gen=w.generation, worker=w.index, pid=w.pid)


def ended(host: Host, w: Worker, starting: bool) -> tuple[Generation, exit.End] | None:
    """Reap `w` and apply what its end means (exit.worker_ended); None for a spurious wake-up.
    `starting`: its generation is one the reload in progress starts (the reload then decides)."""
    was = w.state
    stored = [] if w.kept else [stored_name(w, n, listener) for n, listener in enumerate(w.listeners)
                                if not listener.shared]
    gen = host.watcher.exited(w)
    if gen is None:
        return None  # still running
    host.fdstore.remove(stored)
    record, now = host.programs[gen.program.name], host.clock.time()
    fields = {"program": w.program, "gen": w.generation, "worker": w.index, "pid": w.pid,
              "status": w.describe_exit()}
    end = exit.worker_ended(w, was, gen, record, starting, now)
    match end:
        case exit.StartFailed():
            log.error("worker_failed_to_start", **fields)
        case exit.ReplacementFailed():  # the old worker serves on
            log.error("worker_recycle_failed", **fields)
        case exit.Crashed(then=Fatal(crashes=crashes)):
            # Its listeners were shut when reaped: their queues moved to its siblings.
            log.error("worker_crashed", **fields, was=was.value)
            log.error("program_fatal", program=record.name, crashes=crashes,
                      window=gen.program.crash_window, serving=len(gen.live_workers))
        case exit.Crashed(then=Restart(after=after, restarts=restarts)):
            log.error("worker_crashed", **fields, was=was.value)
            log.info("worker_respawn_scheduled", program=record.name, worker=w.index, delay=after,
                     restarts=restarts)
            host.later(after, ev.ManageWorkers())
        case _:
            log.info("worker_exited", **fields)
    gen.worker_gone(w)
    if record.fatal is not None and gen.state is GenerationState.SERVING and not gen.live_workers:
        gen.shut_shared()  # nobody left to accept and none to come: reset rather than leave them waiting
    return gen, end


def stored_name(w: Worker, n: int, listener: Listener) -> str:
    """The fd store's name of a worker's listener `n`: its own, or its generation's shared one."""
    return fdstore.name(w.program, w.generation, fdstore.SHARED if listener.shared else w.index, n)


def ready_timeout(host: Host, w: Worker) -> None:
    gen = host.watcher.generation_of(w)
    if gen is not None and w.state is WorkerState.STARTING:
        log.error("worker_not_ready", program=w.program, gen=w.generation, worker=w.index, pid=w.pid,
                  timeout=gen.program.ready_timeout)
        w.kill()  # shuts its listeners first; its exit is a crash



def manage(host: Host) -> None:
    """Reconcile, as gunicorn's arbiter does: each empty slot whose time has come gets a worker."""
    # A loop may run a timer a little before its time (loop.time() just short of the deadline: uvloop does):
    # without this slack, a restart due "now" would wait for a wake-up that never comes.
    now = host.clock.time() + TIMER_SLACK
    for record, gen in serving(host.programs):
        if record.fatal is None and not host.stopping:
            for slot in gen.due(now):
                slot.filled(spawn_into(host, gen, slot.index), now)
                if slot.worker is None:
                    host.later(SPAWN_RETRY, ev.ManageWorkers())


def spawn_into(host: Host, gen: Generation, index: int) -> Worker | None:
    """One more worker in a serving generation (restart, scale up, recycle), on fresh listeners."""
    try:
        w = gen.spawn(host.spawner, index)
    except (OSError, SupervisorError) as exc:
        log.error("spawn_failed", program=gen.program.name, worker=index, error=str(exc))
        return None
    watch(host, w, gen)
    return w


def scale(host: Host, request: requests.Scale, reply: Reply) -> None:
    """`scale NAME N`, TTIN, TTOU: more workers on fresh listeners, or retire the highest indexes.
    A relative request (`by`, the signals) counts from the workers running now, at least one left."""
    name = request.program
    gen = running(host.programs, host.config, name).serving
    assert gen is not None
    count = request.workers if request.workers is not None else max(1, len(gen.active_slots()) + (request.by or 0))
    if not 1 <= count <= 4096:
        raise ControlError(f"workers must be 1..4096, got {count}")
    sizes = {r.name: len(g.active_slots()) for r, g in serving(host.programs)}
    if problem := limits.scale_problem(host.config, name, count, sizes):
        raise ControlError(problem)
    leaving = gen.scale(count, host.clock.time())
    due = gen.due(host.clock.time())
    manage(host)
    started = sum(slot.worker is not None for slot in due)  # what really started, not what was tried
    failed = f", {len(due) - started} could not start (retried in {SPAWN_RETRY:g} s)" if started < len(due) else ""
    leave(host, gen, leaving)
    log.info("program_scaled", program=name, workers=count, started=started, retiring=len(leaving))
    waits = f", {len(gen.unwanted)} leaving once ready" if gen.unwanted else ""
    reply.finish(True, f"{name}: {plural(count, 'worker')} ({started} started, {len(leaving)} retiring"
                       f"{waits}{failed})")


def recycle_check(host: Host) -> None:
    """Replace workers over max_rss or max_age: the new one listens first, the old one retires once it is ready."""
    now = host.clock.time()
    try:
        for record, gen in serving(host.programs):
            for slot, reason in gen.recycling(now):
                log.info("worker_recycling", program=record.name, gen=gen.number, worker=slot.index,
                         pid=slot.worker.pid if slot.worker else None, reason=reason)
                slot.replacement = spawn_into(host, gen, slot.index)
    finally:  # the next look whatever happens in this one (a failure is the master's catch-all's to log)
        host.later(RECYCLE_POLL, ev.RecycleCheck())


def stop_later(host: Host, program: Program, workers: list[Worker]) -> None:
    """Workers whose listeners are shut: the stop signal after `stop_delay`, SIGKILL `graceful_timeout` later.

    The delay lets a server read the requests of connections it accepted just before the shut
    (uvicorn closes those unread when it stops); nothing new reaches it, its queue has migrated.
    """
    if not workers:
        return
    now, keys = host.clock.time(), tuple(host.watcher.key(w) for w in workers)
    for w in workers:  # the deadlines an upgrade hands over
        w.stop_at, w.kill_at = now + program.stop_delay, now + program.stop_delay + program.graceful_timeout
    if program.stop_delay:
        host.later(program.stop_delay, ev.StopDue(keys, program.stop_signal))
    else:
        for w in workers:
            w.stop(program.stop_signal)
    host.later(program.stop_delay + program.graceful_timeout, ev.GracefulTimeout(keys))


def kill_stubborn(workers: list[Worker]) -> None:
    """`graceful_timeout` has passed since their stop signal: SIGKILL those still running."""
    if stubborn := [w for w in workers if w.alive]:
        log.warning("graceful_timeout", program=stubborn[0].program, gen=stubborn[0].generation,
                    killing=[w.pid for w in stubborn])
        for w in stubborn:
            w.kill()


def forked(host: Host, answers: Iterable[Answer]) -> None:
    """A preload template's answers: a forked worker is watched as a spawned one (killed if that was
    asked meanwhile); one it could not fork ends as a worker that exited before it was ready."""
    for answer in answers:
        if isinstance(answer, Forked):
            host.watcher.forked(answer.worker)
            if answer.worker.doomed:
                answer.worker.kill()
        else:
            host.post(ev.WorkerExited(host.watcher.key(answer.worker)))


def read_forks(host: Host) -> None:
    """Every preload template's answers waiting to be read: a preload worker's READY=1 may be read
    before its template's "forked" message, sent before the worker could run."""
    if host.templates is not None:
        for t in list(host.templates.running.values()):
            forked(host, host.templates.read(t))


def template_woke(host: Host, event: ev.TemplateWoke) -> None:
    """A preload template wrote a message, wrote output, or exited."""
    if host.templates is None or (t := host.templates.find(event.program, event.generation)) is None:
        return
    if event.what == "message":
        forked(host, host.templates.read(t))
    elif event.what == "exited":
        answers = host.templates.ended(t)
        forked(host, answers or [])
        if answers is not None and t.generation == SPARE and t.ready_ms is not None:
            spare(host, t.program)  # a spare that died idle is replaced (one whose imports failed is not)
    else:
        host.templates.output(t)


def spare(host: Host, name: str) -> None:
    """The program's next generation gets a spare template (`preload_spare`) started with the serving
    generation's settings, or loses the one it has (stopped, FATAL, shutting down)."""
    if host.templates is None:
        return
    record = host.programs.get(name)
    gen = record.serving if record is not None and record.fatal is None and not host.stopping else None
    wanted = gen.program if gen is not None and gen.program.preload and gen.program.preload_spare else None
    host.templates.keep_spare(name, wanted)


def spares(host: Host) -> None:
    """After a reload, start, stop or shutdown: every program's spare as `spare` says."""
    if host.templates is not None:
        for name in sorted(set(host.programs) | {t.program for t in host.templates.running.values()}):
            spare(host, name)


def leave(host: Host, gen: Generation, leaving: list[Worker]) -> None:
    """Workers leave a serving generation: with migration (or `off`) their listeners are shut now; when
    the master drains, new connections are steered to the workers that stay and the leaving ones
    accept what waits in their queues first (model/drain.py), then are shut and stopped."""
    going = _own(leaving)  # a shared listener stays: the workers that stay accept from it
    if not host.migration.drains or not going:
        stop_later(host, gen.program, gen.leave(leaving))
        return
    gen.draining(leaving)
    steered = listeners.steer_to(_staying(gen))
    departure = Departure(gen, leaving, steered, Drain(Way.DRAINED, host.clock.time(), gen.program.drain_timeout))
    host.later(SWITCH_DRAIN, ev.LeaveDue(host.departures.add(departure)))


def departure_due(host: Host, number: int) -> None:
    """A departure's drain looks again: wait more, or shut the leaving listeners and stop their workers."""
    departure = host.departures.pending.get(number)
    if departure is None:
        return
    going = _own(departure.workers)
    step = departure.drain.next(host.clock.time(), sum(listener.queued() for listener in going))
    if not isinstance(step, Shut):
        host.later(step.seconds, ev.LeaveDue(number))
        return
    del host.departures.pending[number]
    gen = departure.gen
    staying = _staying(gen)
    listeners.shut_steered(going, staying)
    if any(d.gen is gen for d in host.departures.pending.values()):
        listeners.steer_to(staying)  # another departure still drains: its workers get nothing new either
    else:
        listeners.unsteer(departure.steered)
    log.info("workers_drained", program=gen.program.name, gen=gen.number, pids=[w.pid for w in departure.workers],
             drain_ms=departure.drain.ms, dropped=step.dropped)
    if step.dropped:
        log.warning("drain_dropped", program=gen.program.name, dropped=step.dropped, drain_ms=departure.drain.ms)
    host.tally.retired("drained", step.dropped, departure.drain.ms / 1000, reload=False)
    stop_later(host, gen.program, gen.leave([w for w in departure.workers if w.alive]))


def _staying(gen: Generation) -> list[Listener]:
    """Where a generation's new connections go while some of its workers drain: its ready workers'."""
    return listeners.unique(listener for w in gen.workers
                            if w.alive and w not in gen.leaving and w.state is WorkerState.READY
                            for listener in w.listeners if not listener.shut)


def _own(workers: list[Worker]) -> list[Listener]:
    """The open listeners of these workers that are their own (not their generation's shared ones)."""
    return [listener for w in workers for listener in w.listeners if not listener.shut and not listener.shared]
