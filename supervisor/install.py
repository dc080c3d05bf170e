"""The installation this code runs from: its version, and whether its files are still its own.

The classic Supervisor (the `supervisor` distribution) ships the same import package, `supervisor`, and
the same two commands. pip lets both into one environment without a word: the one installed last owns
`supervisor/__init__.py` and the commands, and uninstalling either deletes files of the other (each
RECORD lists the shared paths). That is detected from the files pip leaves beside the package, the
`*.dist-info/RECORD` lists, before the commands import what may be gone; reading them costs well
under a millisecond, which `supervisorctl` can afford on every start and importlib.metadata (its
import alone: ~30 ms) could not.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path

DISTRIBUTION = "reuseport-supervisor"
PACKAGE = "supervisor"
_OURS = "reuseport_supervisor-"  # how pip names this distribution's dist-info folder


def version() -> str:
    """The installed distribution's version, or the source tree's when it runs uninstalled."""
    from importlib import metadata

    try:
        return metadata.version(DISTRIBUTION)
    except metadata.PackageNotFoundError:
        from supervisor import __version__

        return __version__


class PrintVersion(argparse.Action):
    """`--version`: prints "reuseport-supervisor X.Y.Z"; the version is read only when asked for."""

    def __init__(self, option_strings: Sequence[str], dest: str, **kwargs: object) -> None:
        super().__init__(option_strings, dest, nargs=0, help="print the version and exit")

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace,
                 values: object, option_string: str | None = None) -> None:
        print(f"{DISTRIBUTION} {version()}")
        parser.exit()


def problem(site: Path | None = None) -> str | None:
    """Why the `supervisor` package here is not this distribution's alone, in one line; None if it is
    (or if nothing says: a source tree, an editable install, files placed by hand)."""
    site = site if site is not None else Path(__file__).resolve().parent.parent
    try:
        folders = [entry for entry in os.scandir(site) if entry.name.endswith(".dist-info") and entry.is_dir()]
    except OSError:
        return None
    ours = [entry for entry in folders if entry.name.startswith(_OURS)]
    if len(ours) != 1:
        return None  # not installed from a wheel here (or pip's own record is unreadable): nothing to compare
    mine = _record(Path(ours[0].path))
    for entry in folders:
        if entry is ours[0]:
            continue
        theirs = [path for path in _record(Path(entry.path)) if path.startswith(f"{PACKAGE}/")]
        if theirs:
            both = sorted(set(theirs) & set(mine)) or theirs
            return (f"{_name(entry.name)} is installed in {site} too: it writes {_files(theirs)} into the "
                    f"`{PACKAGE}` package of {_name(ours[0].name)} ({both[0]} among them); the two cannot share an "
                    f"environment (the one installed last owns the shared files and the commands, uninstalling "
                    f"either deletes the other's): uninstall both, then install {DISTRIBUTION} alone, in an "
                    f"environment of its own")
    missing = [path for path in mine if path.startswith(f"{PACKAGE}/") and not (site / path).exists()]
    if missing:
        return (f"{_files(missing)} of {_name(ours[0].name)} are missing from {site} ({missing[0]} among them; "
                f"an uninstall of another distribution that shared them takes them along): reinstall it with "
                f"`pip install --force-reinstall {DISTRIBUTION}`")
    return None


def refuse_if_mixed(command: str) -> bool:
    """Say on stderr, in one line, why this installation cannot be trusted; True if it said so."""
    why = problem()
    if why is None:
        return False
    print(f"{command}: {why}", file=sys.stderr)
    return True


def _record(dist_info: Path) -> list[str]:
    """The paths a dist-info's RECORD lists (relative to the site folder; the first CSV field)."""
    try:
        text = (dist_info / "RECORD").read_text(encoding="utf-8", errors="replace")
    except OSError:
        return []
    return [line.split(",", 1)[0].strip('"') for line in text.splitlines() if line]


def _name(dist_info: str) -> str:
    """`supervisor-4.2.5.dist-info` -> `supervisor 4.2.5`."""
    name, _, rest = dist_info.removesuffix(".dist-info").partition("-")
    return f"{name.replace('_', '-')} {rest}".strip()


def _files(paths: list[str]) -> str:
    return f"{len(paths)} file" if len(paths) == 1 else f"{len(paths)} files"
