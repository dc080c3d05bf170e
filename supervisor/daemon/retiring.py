"""Generations as they end: every listener shut at once, the stop signals after stop_delay, the
record forgotten once its last worker has exited, and the `stop` requests that wait for that.

The records decide what ends (`ProgramRuntime.stopping`, `Generation.retire`); these functions apply
it on the master's state, in its loop, for the master and the appliers beside it (reloads, handover).
"""

from __future__ import annotations

import structlog

from supervisor.daemon import workers
from supervisor.daemon.host import Host
from supervisor.model.generation import Generation, GenerationState
from supervisor.model.program import running
from supervisor.protocol.reply import Reply
from supervisor.protocol.words import plural
from supervisor.system import fdstore, memory

log = structlog.get_logger()


def retire(host: Host, gen: Generation) -> int:
    """Shut every listener of `gen` at once; its workers' stop signals follow after stop_delay."""
    closed = gen.retire()
    generation_over(host, gen)
    # Those that left it before (scaled down, recycled, rolled out) were given their stop already.
    workers.stop_later(host, gen.program, [w for w in gen.live_workers if w not in gen.leaving])
    log.info("generation_retiring", program=gen.program.name, gen=gen.number, listeners_closed=closed,
             workers=len(gen.live_workers))
    forget_if_finished(host, gen)
    return closed


def generation_over(host: Host, gen: Generation) -> None:
    """`gen` starts no more workers: its preload template, if any, exits."""
    if host.templates is not None:
        workers.forked(host, host.templates.retire(gen.program.name, gen.number))


def forget_if_finished(host: Host, gen: Generation) -> None:
    """A retiring or rolled-back generation stays in `status` until its last worker has exited."""
    if gen.state in (GenerationState.SERVING, GenerationState.STARTING) or not gen.finished():
        return
    if not gen.kept:
        host.fdstore.remove([fdstore.name(gen.program.name, gen.number, fdstore.SHARED, n)
                             for n in range(len(gen.shared))])
    gen.finish()
    host.programs[gen.program.name].generation_finished(gen)
    log.info("generation_finished", program=gen.program.name, gen=gen.number, state=gen.state.value)
    host.stop_waiters.finished(gen)
    memory.release()  # its records


def stop_program(host: Host, name: str, reply: Reply) -> None:
    """`stop NAME`: its serving generation retires; answered once its last worker has exited."""
    gen = running(host.programs, host.config, name).stopping(by_hand=True)
    assert gen is not None
    reply.progress(f"{name}: stopping generation {gen.number} ({plural(len(gen.live_workers), 'worker')})")
    host.stop_waiters.add(gen, reply)
    retire(host, gen)
    workers.spare(host, name)


def stop_all(host: Host) -> None:
    """A shutdown: every running program's generation retires. Under systemd's fd store a stop is a
    restart to be: the listeners stay open there, unshut, and their queues wait for the next start
    (system/fdstore.py)."""
    for record in [r for r in host.programs.values() if r.running]:
        if (gen := record.stopping(by_hand=False)) and host.fdstore.enabled:
            workers.stop_later(host, gen.program, gen.hand_over())
            generation_over(host, gen)
            forget_if_finished(host, gen)
        elif gen:
            retire(host, gen)
    workers.spares(host)  # stopping: none left
