"""A program's runtime: one record with an explicit state, changed only by its transition methods.

    STOPPED --starting--> STARTING --committed--> SERVING --starting--> RELOADING --committed--> SERVING
    STARTING --rolled_back--> STOPPED            RELOADING --rolled_back--> SERVING
    STARTING --start_failed--> FATAL (at startup: the other programs start; `start` or a reload tries again)
    SERVING --went_fatal--> FATAL (its healthy workers serve on; a reload or `start` tries again)
    SERVING | RELOADING | FATAL --stopping--> STOPPING --(last worker gone)--> STOPPED

A FATAL program being reloaded stays FATAL until its new generation commits. `status` is a view of
these records and nothing else.
"""

from __future__ import annotations

import datetime
import enum
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import structlog

from supervisor.config import tls
from supervisor.config.schema import Config, Program
from supervisor.errors import ControlError
from supervisor.model.generation import Generation
from supervisor.model.restart import CrashHistory

log = structlog.get_logger()


class ProgramState(enum.Enum):
    STARTING = "starting"
    SERVING = "serving"
    RELOADING = "reloading"
    STOPPING = "stopping"
    STOPPED = "stopped"
    FATAL = "fatal"


RUNNING = (ProgramState.SERVING, ProgramState.RELOADING, ProgramState.FATAL)


def names(programs: Mapping[str, ProgramRuntime], running: bool = False, by_hand: bool = False,
          fatal: bool = False) -> list[str]:
    """Programs with a serving generation, stopped by hand, or FATAL."""
    return [name for name, r in programs.items() if (running and r.serving is not None)
            or (by_hand and r.stopped_by_hand) or (fatal and r.fatal is not None)]


def running(programs: Mapping[str, ProgramRuntime], config: Config, name: str) -> ProgramRuntime:
    """The runtime of a running program (one with a serving generation), or the ControlError a user should see."""
    record = programs.get(name)
    if record is not None and record.serving is not None:
        return record
    if name in {p.name for p in config.programs}:
        raise ControlError(f"{name} is not running")
    raise ControlError(f"no program named {name!r}")


def serving(programs: Mapping[str, ProgramRuntime]) -> list[tuple[ProgramRuntime, Generation]]:
    return [(r, r.serving) for r in programs.values() if r.serving is not None]


@dataclass(eq=False)
class ProgramRuntime:
    name: str
    state: ProgramState = ProgramState.STOPPED
    serving: Generation | None = None
    retiring: list[Generation] = field(default_factory=list)  # retiring or rolled back, until their workers exit
    last_number: int = 0  # generation numbers keep growing across stop and start
    stopped_by_hand: bool = False  # `stop`: a reload leaves it stopped
    fatal: str | None = None  # why it is FATAL
    last_exit: str | None = None  # the last worker that ended unasked
    restarts: int = 0  # workers restarted after a crash, every generation since supervisord started
    crashes: CrashHistory | None = None
    certificate: tls.Certificate | None = None  # what the serving generation's workers were given

    @property
    def running(self) -> bool:
        return self.state in RUNNING

    def next_number(self) -> int:
        self.last_number += 1
        return self.last_number

    def crash_history(self, program: Program) -> CrashHistory:
        if self.crashes is None:
            self.crashes = CrashHistory(program.crash_limit, program.crash_window)
        return self.crashes

    def generations(self) -> list[Generation]:
        """Every generation with workers to show: the serving one and those on their way out."""
        return sorted([*([self.serving] if self.serving else []), *self.retiring], key=lambda g: g.number)

    # -- transitions ----------------------------------------------------------------------------------

    def _move(self, to: ProgramState, *sources: ProgramState) -> None:
        if self.state not in sources:
            raise RuntimeError(f"program {self.name}: {self.state.value} -> {to.value} is not a transition")
        if to is not self.state:
            log.debug("program_state", program=self.name, came=self.state.value, state=to.value)
        self.state = to

    def starting(self) -> None:
        """A new generation of it starts (startup, reload, `start`)."""
        to = {ProgramState.SERVING: ProgramState.RELOADING, ProgramState.FATAL: ProgramState.FATAL}.get(
            self.state, ProgramState.STARTING)  # also while a stopped generation still finishes
        self._move(to, ProgramState.STOPPED, ProgramState.STOPPING, ProgramState.SERVING, ProgramState.FATAL)

    def committed(self, gen: Generation, certificate: tls.Certificate | None) -> Generation | None:
        """Its new generation serves; returns the one it replaces (to be retired by the master).

        A fresh start: crashes of the generations before it no longer count, and the new config's
        crash_limit/crash_window apply.
        """
        self._move(ProgramState.SERVING, ProgramState.STARTING, ProgramState.RELOADING, ProgramState.FATAL)
        old, self.serving = self.serving, gen
        if old is not None:
            self.retiring.append(old)
        self.stopped_by_hand = False
        self.fatal, self.crashes, self.certificate = None, None, certificate
        return old

    def rolled_back(self, gen: Generation) -> None:
        """Its new generation failed: back to what it was; the generation is kept until its workers exit."""
        to = {ProgramState.STARTING: ProgramState.STOPPED, ProgramState.RELOADING: ProgramState.SERVING,
              ProgramState.FATAL: ProgramState.FATAL}[self.state]
        self._move(to, ProgramState.STARTING, ProgramState.RELOADING, ProgramState.FATAL)
        self.retiring.append(gen)

    def start_failed(self, gen: Generation, why: str) -> None:
        """Its first generation failed at startup: FATAL, with nothing serving; the generation is kept
        until its workers exit."""
        self._move(ProgramState.FATAL, ProgramState.STARTING)
        self.retiring.append(gen)
        self.fatal = why

    def went_fatal(self, why: str) -> None:
        """Its serving generation's workers crashed too often (also while a reload of it waits)."""
        self._move(ProgramState.FATAL, ProgramState.SERVING, ProgramState.RELOADING, ProgramState.FATAL)
        self.fatal = why

    def stopping(self, by_hand: bool) -> Generation | None:
        """`stop`, a shutdown, or gone from the config; returns its serving generation, to be retired."""
        self._move(ProgramState.STOPPING, *RUNNING)
        old, self.serving = self.serving, None
        if old is not None:
            self.retiring.append(old)
        self.stopped_by_hand = self.stopped_by_hand or by_hand
        self.fatal, self.crashes = None, None  # stopped, not FATAL any more
        return old

    def generation_finished(self, gen: Generation) -> None:
        """The last worker of a retiring or rolled-back generation has exited."""
        if gen in self.retiring:
            self.retiring.remove(gen)
        if self.state is ProgramState.STOPPING and not self.retiring:
            self._move(ProgramState.STOPPED, ProgramState.STOPPING)

    # -- plain data -----------------------------------------------------------------------------------

    def to_json(self) -> dict[str, Any]:
        cert = self.certificate
        return {
            "name": self.name, "state": self.state.value, "last_number": self.last_number,
            "serving": self.serving.to_json() if self.serving else None,
            "retiring": [g.to_json() for g in self.retiring], "stopped_by_hand": self.stopped_by_hand,
            "fatal": self.fatal, "last_exit": self.last_exit, "restarts": self.restarts,
            "crashes": self.crashes.to_json() if self.crashes else None,
            "certificate": None if cert is None else {
                "subject": cert.subject, "sans": list(cert.sans), "not_after": cert.not_after.isoformat(),
                "fingerprint": cert.fingerprint, "chain": cert.chain},
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> ProgramRuntime:
        cert = data["certificate"]
        return cls(
            name=data["name"], state=ProgramState(data["state"]), last_number=data["last_number"],
            serving=Generation.from_json(data["serving"]) if data["serving"] else None,
            retiring=[Generation.from_json(g) for g in data["retiring"]], stopped_by_hand=data["stopped_by_hand"],
            fatal=data["fatal"], last_exit=data["last_exit"], restarts=data.get("restarts", 0),
            crashes=CrashHistory.from_json(data["crashes"]) if data["crashes"] else None,
            certificate=None if cert is None else tls.Certificate(
                subject=cert["subject"], sans=tuple(cert["sans"]),
                not_after=datetime.datetime.fromisoformat(cert["not_after"]),
                fingerprint=cert["fingerprint"], chain=cert["chain"]),
        )
