"""The master as the pieces beside it see it: what they may read and ask, not the Master class itself.

The appliers (reloads, rolls, workers, handover) act on the master's state through this narrow
Protocol, so that no module imports master.py and the master's fields are assigned in master.py
only: where a piece must change one (the config a reload commits), it asks through a method.
"""

from __future__ import annotations

import asyncio
from typing import Any, Protocol

from supervisor.config.schema import Config, MigrateMode
from supervisor.daemon.events import Event
from supervisor.daemon.facts import Facts
from supervisor.daemon.stops import StopWaiters
from supervisor.daemon.watcher import Watcher
from supervisor.model.drain import Departures
from supervisor.model.generation import Spawner
from supervisor.process.preload import Templates
from supervisor.system.fdstore import FdStore, Inherited
from supervisor.system.listeners import Groups
from supervisor.system.systemd import Notifier


class Clock(Protocol):
    """The event loop's clock and timers; the unit tests drive a fake one."""

    def time(self) -> float: ...
    def call_later(self, delay: float, callback: Any, *args: Any) -> asyncio.TimerHandle: ...


class Host(Facts, Protocol):
    @property
    def clock(self) -> Clock: ...
    @property
    def spawner(self) -> Spawner: ...
    @property
    def runtime_dir(self) -> str: ...
    @property
    def watcher(self) -> Watcher: ...
    @property
    def fdstore(self) -> FdStore: ...
    @property
    def groups(self) -> Groups: ...
    @property
    def inherited(self) -> Inherited: ...
    @property
    def departures(self) -> Departures: ...
    @property
    def systemd(self) -> Notifier: ...

    def post(self, event: Event) -> None: ...
    def later(self, delay: float, event: Event) -> asyncio.TimerHandle: ...

    @property
    def templates(self) -> Templates | None: ...
    @property
    def stop_waiters(self) -> StopWaiters: ...


    # -- the master's fields, changed by the master on request
    def enable_migration(self, mode: MigrateMode) -> None: ...
    def use_config(self, config: Config) -> None: ...
    def startup_failed(self) -> None: ...
