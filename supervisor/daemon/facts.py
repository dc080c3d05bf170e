"""The master's facts as the pieces that only read them see them (`status`, /metrics, the appliers)."""

from __future__ import annotations

from typing import Any, Protocol

from supervisor.config.schema import Config
from supervisor.daemon.tally import Tally
from supervisor.model.program import ProgramRuntime
from supervisor.model.reload import Reload
from supervisor.system.migrate import MigrateStatus


class Facts(Protocol):
    """What the master knows, read-only: its records, the reload in progress, its history."""

    @property
    def config(self) -> Config: ...
    @property
    def programs(self) -> dict[str, ProgramRuntime]: ...
    @property
    def reload(self) -> Reload | None: ...
    @property
    def migration(self) -> MigrateStatus: ...
    @property
    def stopping(self) -> bool: ...
    @property
    def tally(self) -> Tally: ...
    @property
    def started(self) -> float: ...
    @property
    def started_at(self) -> float: ...
    @property
    def upgraded(self) -> dict[str, Any] | None: ...
    @property
    def last_reload(self) -> dict[str, Any] | None: ...
