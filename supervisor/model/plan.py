"""What a reload or a start will do, computed as plain data before anything is touched."""

from __future__ import annotations

import dataclasses
from collections.abc import Collection
from dataclasses import dataclass

from supervisor.config.schema import Config, Program
from supervisor.errors import ControlError


@dataclass(frozen=True)
class ReloadPlan:
    """New generations to start, and the programs whose serving generations retire once they serve."""

    start: tuple[Program, ...]
    retire: tuple[str, ...]

    @property
    def removed(self) -> tuple[str, ...]:
        """Programs that retire without a successor (gone from the config)."""
        started = {p.name for p in self.start}
        return tuple(name for name in self.retire if name not in started)


def plan_reload(config: Config, running: Collection[str], stopped: Collection[str],
                only: Collection[str] = ()) -> ReloadPlan:
    """Reload: a new generation of every program in the config except those stopped by hand.

    Every running program is replaced, even when its settings did not change: a reload is how new
    code and new certificates are picked up. Programs gone from the config retire. `only`: just
    these programs (`reload web`); the others keep their generation.
    """
    start = tuple(p for p in config.programs if p.name not in stopped and (not only or p.name in only))
    if only and not start:
        raise ControlError(f"{', '.join(only)}: stopped by hand; `start` {'it' if len(only) == 1 else 'them'} instead")
    # A running program is either replaced (still configured) or removed (gone): it retires either way.
    return ReloadPlan(start=start, retire=tuple(name for name in running if not only or name in only))


def select(current: Config, new: Config, only: Collection[str]) -> Config:
    """The config a reload of only some programs runs: their settings from `new`, everything else
    (the other programs, control, migrate, metrics, watch) as it is now. ControlError names what cannot be."""
    wanted = {p.name: p for p in new.programs if p.name in only}
    if missing := [name for name in only if name not in wanted]:
        raise ControlError(f"no program named {missing[0]!r} in {new.path}")
    kept = [p for p in current.programs if p.name not in wanted]
    programs = (*kept, *(wanted[name] for name in dict.fromkeys(only)))
    owner: dict[object, str] = {}
    for program in programs:
        for address in program.listen:
            if address in owner:
                raise ControlError(f"{program.name}: {address} is used by program {owner[address]} as it runs now; "
                                   f"reload both")
            owner[address] = program.name
    order = [p.name for p in new.programs] + [p.name for p in current.programs]
    return dataclasses.replace(current, programs=tuple(sorted(programs, key=lambda p: order.index(p.name))))


def plan_start(config: Config, name: str, running: Collection[str], fatal: Collection[str] = ()) -> ReloadPlan:
    """`start NAME`: one new generation of a program that is not running, or that is FATAL.

    A FATAL program still serves with the workers it has left: they retire once the new generation
    is ready, as in a reload.
    """
    try:
        program = config.program(name)
    except KeyError:
        raise ControlError(f"no program named {name!r}") from None
    if name in running and name not in fatal:
        raise ControlError(f"{name} is already running")
    return ReloadPlan(start=(program,), retire=(name,) if name in running else ())


def plan_restart(config: Config, name: str, running: Collection[str]) -> ReloadPlan:
    """`restart NAME`: a new generation of a running program with the settings the daemon runs now (the
    file is not read again: that is `reload NAME`); the serving one retires once it is ready, as in a
    reload. A program that is not running has nothing to restart: `start` it."""
    try:
        program = config.program(name)
    except KeyError:
        raise ControlError(f"no program named {name!r}") from None
    if name not in running:
        raise ControlError(f"{name} is not running; `start` it instead")
    return ReloadPlan(start=(program,), retire=(name,))
