"""The vocabulary of the master loop: everything that happens arrives as one of these on one queue.

Signal handlers, pidfd readers, the notify socket, the control server and timers only build an
event and put it on the queue; the master loop alone acts on them. Events carry names and numbers
(a program's name, a generation's number, the watcher's key of a worker), never live records.
"""

from __future__ import annotations

import signal
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import asyncio

    from supervisor.protocol.reply import Reply
    from supervisor.protocol.requests import Request


# The signals the master acts on (docs/operations.md, "Commands"); each arrives as a SignalReceived.
HANDLED_SIGNALS = (signal.SIGHUP, signal.SIGTERM, signal.SIGINT, signal.SIGQUIT, signal.SIGUSR1,
                   signal.SIGUSR2, signal.SIGTTIN, signal.SIGTTOU)


@dataclass(frozen=True)
class SignalReceived:
    signum: int


@dataclass(frozen=True)
class WorkerExited:
    """A worker's pidfd is readable (or its template could not fork it); `worker`: the watcher's key."""

    worker: int


@dataclass(frozen=True)
class WorkerOutput:
    """A worker wrote to its stdout or stderr pipe (`stream`)."""

    worker: int
    stream: str = "stderr"


@dataclass(frozen=True)
class NotifyReceived:
    pid: int
    fields: dict[str, str]


@dataclass(frozen=True)
class ControlRequest:
    """A request from supervisorctl, a signal (HUP: Reload) or the daemon itself, and where to answer."""

    request: Request
    reply: Reply


@dataclass(frozen=True)
class SpawnDue:
    """Generation `generation` of `program`, started by the reload `reload_id`, has workers still to
    spawn: the next slice of them (the loop answers what waits in between)."""

    reload_id: int
    program: str
    generation: int


@dataclass(frozen=True)
class ReadyTimeout:
    """Generation `generation` of `program`, started by the reload whose id is `reload_id`, has waited
    its `ready_timeout`."""

    reload_id: int
    program: str
    generation: int


@dataclass(frozen=True)
class GracefulTimeout:
    """These workers were told to stop `graceful_timeout` ago: kill those still running."""

    workers: tuple[int, ...]


@dataclass(frozen=True)
class StopDue:
    """These workers' listeners were shut `stop_delay` ago: time for their stop signal."""

    workers: tuple[int, ...]
    signum: int


@dataclass(frozen=True)
class ReadinessCheck:
    """Time to look again whether a worker without sd_notify serves (ready: accepting | settle)."""

    worker: int


@dataclass(frozen=True)
class WorkerReadyTimeout:
    """A worker started outside a reload (restart, scale, recycle) had `ready_timeout` to get ready."""

    worker: int


@dataclass(frozen=True)
class RecycleCheck:
    """Time to look for workers over max_rss or max_age."""


@dataclass(frozen=True)
class ManageWorkers:
    """Time to give every empty slot of a serving generation its worker (a restart after a crash)."""


@dataclass(frozen=True)
class SwitchDue:
    """A committed reload's new connections have gone to the new generations for SWITCH_DRAIN: shut the old."""


@dataclass(frozen=True)
class RollDue:
    """A rolling reload's batch is ready and its old listeners steered away from: shut them, next batch."""

    reload_id: int
    program: str


@dataclass(frozen=True)
class LeaveDue:
    """Workers leaving a serving generation are being drained (daemon/workers.py): look again."""

    departure: int


@dataclass(frozen=True)
class TemplateWoke:
    """A preload template's fd is readable: `message` (it is ready, or it forked a worker, or could
    not), `exited` (its pidfd) or `output` (its stderr: an import's traceback)."""

    what: str
    program: str
    generation: int


@dataclass(frozen=True)
class UpgradeChecked:
    """The new code's check ended (its pidfd is readable), or it ran out of time."""

    timed_out: bool = False


@dataclass(frozen=True)
class ChildrenChanged:
    """SIGCHLD, or a worker ended: reap and sort the children the master did not start (orphans.py)."""


@dataclass(frozen=True)
class FilesCheck:
    """Time to look whether a `watch:` file changed (system/watched_files.py)."""


@dataclass(frozen=True)
class WatchdogDue:
    """Time to tell systemd the master loop is alive."""


@dataclass(frozen=True)
class Scrape:
    """A GET on the metrics endpoint (`path`): the master sets `answered` to (status, content type, body)."""

    path: str
    answered: asyncio.Future[tuple[int, str, bytes]]


Event = (SignalReceived | WorkerExited | WorkerOutput | NotifyReceived | ControlRequest | ReadyTimeout | SpawnDue
         | StopDue | GracefulTimeout | ManageWorkers | SwitchDue | UpgradeChecked | WatchdogDue
         | ReadinessCheck | WorkerReadyTimeout | RecycleCheck | ChildrenChanged | FilesCheck | Scrape
         | RollDue | TemplateWoke | LeaveDue)
