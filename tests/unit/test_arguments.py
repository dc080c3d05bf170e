"""supervisorctl's two readings of its command line: quick_args (the plain forms, without argparse) gives what
argparse gives, or leaves the line to argparse."""

from __future__ import annotations

import itertools
import random
from typing import Any

import pytest

from supervisor.ctl import arguments
from supervisor.ctl.main import quick_args

OPTIONS = ["-c", "--config", "-s", "--socket", "--timeout", "--conf", "--json", "-h", "--version", "-cx.yaml",
           "--config=x.yaml", "--"]
VALUES = ["x.yaml", "/run/s.sock", "status", "reload", "5", "0.5", "0", "-1", "nan", "inf", "1e3", "", "a b", "-x"]
COMMANDS = ["status", "reload", "start", "restart", "stop", "shutdown", "upgrade", "version", "help", "tail",
            "scale", "bogus", ""]
WORDS = ["web", "api", "web", "2", "-n", "--json", "-f", "", "stdout", "-c"]


def argparse_reads(argv: list[str], capsys: pytest.CaptureFixture[str]) -> dict[str, Any] | None:
    try:
        return vars(arguments.parse_args(argv))
    except SystemExit:
        capsys.readouterr()  # argparse's usage and error
        return None


@pytest.mark.parametrize(("argv", "expected"), [
    (["-c", "x.yaml", "status"], {"config": "x.yaml", "socket": None, "version": None, "timeout": 600.0,
                                  "command": "status", "program": "", "json": False}),
    (["-s", "/run/s.sock", "--timeout", "5", "reload", "web", "api"],
     {"config": None, "socket": "/run/s.sock", "version": None, "timeout": 5.0, "command": "reload",
      "programs": ["web", "api"], "json": False}),
    (["restart", "web"], {"config": None, "socket": None, "version": None, "timeout": 600.0, "command": "restart",
                          "program": "web", "json": False}),
    (["--config", "status", "shutdown"], {"config": "status", "socket": None, "version": None, "timeout": 600.0,
                                          "command": "shutdown"}),
])
def test_the_plain_forms_are_read_without_argparse(argv: list[str], expected: dict[str, Any],
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    quick = quick_args(argv)
    assert quick is not None and vars(quick) == expected == argparse_reads(argv, capsys)


@pytest.mark.parametrize("argv", [
    ["status", "--json"], ["reload", "--json"], ["-c", "x.yaml", "-s", "s.sock", "status"], ["help"],
    ["--timeout", "0", "status"], ["start"], ["stop", "a", "b"], ["-c", "-x", "status"], ["tail", "web"],
    ["status", "-c", "x.yaml"], ["-c", "a", "-c", "b", "status"]])
def test_anything_else_goes_to_argparse(argv: list[str]) -> None:
    assert quick_args(argv) is None


def test_whatever_it_reads_argparse_reads_alike(capsys: pytest.CaptureFixture[str]) -> None:
    """Command lines drawn from options, values, commands and words, in and out of order: where the quick
    reading answers, argparse answers the same; where argparse refuses, the quick reading never answers."""
    rng = random.Random(7)
    lines = [[*opts, command, *words] for opts in ([], ["-c", "x.yaml"], ["-s", "s.sock", "--timeout", "5"])
             for command in COMMANDS for words in itertools.combinations(WORDS[:4], 2)]
    for _ in range(1500):
        pool = [rng.choice(OPTIONS), rng.choice(VALUES), rng.choice(COMMANDS), rng.choice(WORDS)]
        lines.append([rng.choice(pool) for _ in range(rng.randrange(1, 6))])
    read = 0
    for argv in lines:
        quick = quick_args(argv)
        if quick is not None:
            assert vars(quick) == argparse_reads(argv, capsys), argv
            read += 1
    assert read > 100


@pytest.mark.parametrize(("argv", "code"), [(["--version"], 141), (["help"], 0)])
def test_a_reader_that_left_gets_no_traceback(argv: list[str], code: int) -> None:
    """`supervisorctl ... | head`: output to a pipe nobody reads any more ends the command quietly, with
    the status a shell gives a command that SIGPIPE ended (argparse's own help drops what it cannot
    write, and exits 0)."""
    import os
    import subprocess
    import sys

    from supervisor.ctl.main import EXIT_SIGPIPE

    read, write = os.pipe()
    os.close(read)  # the reader is gone before the first byte
    try:
        done = subprocess.run([sys.executable, "-m", "supervisor.ctl", *argv], stdout=write,
                              stderr=subprocess.PIPE, text=True, timeout=30)
    finally:
        os.close(write)
    assert (done.returncode, done.stderr) == (code, "")
    assert EXIT_SIGPIPE == 141
