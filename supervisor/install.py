"""The installation this code runs from: its version, and whether its files are still its own.

The classic Supervisor (the `supervisor` distribution) ships the same import package, `supervisor`, and
the same two commands. pip lets both into one environment without a word: the one installed last owns
`supervisor/__init__.py` and the commands, and uninstalling either deletes files of the other (each
RECORD lists the shared paths). That is detected from the files pip leaves beside the package, the
`*.dist-info/RECORD` lists, before the commands import what may be gone. The quick look (two folder
listings and one RECORD) costs a fraction of a millisecond, which `supervisorctl` can afford on every
start and importlib.metadata (its import alone: ~30 ms) could not. Paths are plain strings here
(os.path, not pathlib) and argparse is imported only for `--version`: either one's import, with
what it brings (`re`, `enum`, `urllib.parse`), cost supervisorctl more than the look itself.
"""

from __future__ import annotations

import os
import sys

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (supervisorctl's start)
if TYPE_CHECKING:
    import argparse

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


def add_version_option(parser: argparse.ArgumentParser) -> None:
    """`--version`: prints "reuseport-supervisor X.Y.Z"; the version is read only when asked for."""
    import argparse

    class PrintVersion(argparse.Action):
        def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace,
                     values: object, option_string: str | None = None) -> None:
            print(f"{DISTRIBUTION} {version()}")
            parser.exit()

    parser.add_argument("--version", nargs=0, action=PrintVersion, help="print the version and exit")


def problem(site: str | os.PathLike[str] | None = None) -> str | None:
    """Why the `supervisor` package here is not this distribution's alone, in one line; None if it is
    (or if nothing says: a source tree, an editable install).

    The quick look, at every start: the package folder's entries against this distribution's RECORD.
    Only when they differ are the other distributions' RECORDs read, to name the one responsible."""
    site = os.fspath(site) if site is not None else os.path.dirname(os.path.dirname(os.path.realpath(__file__)))
    package = os.path.join(site, PACKAGE)
    try:
        folders = [entry for entry in os.scandir(site) if entry.name.endswith(".dist-info") and entry.is_dir()]
    except OSError:
        return None
    ours = [entry for entry in folders if entry.name.startswith(_OURS)]
    if len(ours) != 1:
        return None  # not installed from a wheel here (or pip's own record is unreadable): nothing to compare
    me = _name(ours[0].name)
    mine = _package_files(ours[0].path)
    expected = {path.split("/")[1] for path in mine} - {"__pycache__"}  # Python writes that one itself too
    try:
        present = {entry.name for entry in os.scandir(package)} - {"__pycache__"}
    except OSError:
        present = set()
    foreign = sorted(present - expected)
    if foreign:
        for entry in folders:
            theirs = _package_files(entry.path) if entry is not ours[0] else []
            if theirs:
                both = sorted(set(theirs) & set(mine)) or theirs
                return (f"{_name(entry.name)} is installed in {site} too: it writes {_files(theirs)} into the "
                        f"`{PACKAGE}` package of {me} ({both[0]} among them); the two cannot share an "
                        f"environment (the one installed last owns the shared files and the commands, "
                        f"uninstalling either deletes the other's): uninstall both, then install {DISTRIBUTION} "
                        f"alone, in an environment of its own")
        return (f"{package} holds {_files(foreign)} that {me} did not install ({PACKAGE}/{foreign[0]} among "
                f"them): install {DISTRIBUTION} alone, in an environment of its own")
    missing = [path for path in mine if path.split("/")[1] in expected - present]
    if missing:
        return (f"{me} misses {_files(missing)} in {site} ({missing[0]} among them; an uninstall of another "
                f"distribution that shared them takes them along): reinstall it with "
                f"`pip install --force-reinstall {DISTRIBUTION}`")
    return None


def refuse_if_mixed(command: str) -> bool:
    """Say on stderr, in one line, why this installation cannot be trusted; True if it said so."""
    why = problem()
    if why is None:
        return False
    print(f"{command}: {why}", file=sys.stderr)
    return True


def _package_files(dist_info: str) -> list[str]:
    """The paths under `supervisor/` that a dist-info's RECORD lists (relative to the site folder; the
    first CSV field). Most RECORDs have none: a substring search skips them without parsing."""
    try:
        with open(os.path.join(dist_info, "RECORD"), encoding="utf-8", errors="replace") as f:
            text = f.read()
    except OSError:
        return []
    if f"{PACKAGE}/" not in text:
        return []
    paths = (line.split(",", 1)[0].strip('"') for line in text.splitlines())
    return [path for path in paths if path.startswith(f"{PACKAGE}/")]


def _name(dist_info: str) -> str:
    """`supervisor-4.2.5.dist-info` -> `supervisor 4.2.5`."""
    name, _, rest = dist_info.removesuffix(".dist-info").partition("-")
    return f"{name.replace('_', '-')} {rest}".strip()


def _files(paths: list[str]) -> str:
    return f"{len(paths)} file" if len(paths) == 1 else f"{len(paths)} files"
