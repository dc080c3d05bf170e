"""The preload template (`preload:`): run by the program's own Python as a script, one per generation.

It imports the program's `preload` modules once, then forks a worker each time the master asks. It
starts no thread and no event loop: only a single-threaded process can fork safely. Only the standard
library here: the program's interpreter need not have supervisor installed.

Protocol (docs/operations.md, "Rolling reloads and preloading"), on a SOCK_SEQPACKET socket at fd 3,
one JSON object per message:
- template -> master: {"ready": ms, "files": n} once the modules are imported (n: the files it
  stamped, see below). An import that fails prints its traceback to stderr and exits 1: the
  generation fails with that traceback.
- master -> template: {"check": id}: are the files the imports read unchanged? Answer {"checked": id,
  "changed": [path, ...]} (at most CHANGED_SHOWN paths; empty: the template is current). A spare
  template, started ahead of the next generation, is asked this before it forks for one.
- master -> template: {"fork": id, "env": {...}, "stdout": bool} with, as SCM_RIGHTS, the worker's
  stderr, its stdout if "stdout" is true (else it keeps the template's: supervisord's own), and its
  listeners (they become fds 2, 1 and 3..); "args", when present, are the command's arguments for
  this worker (a generation's own TLS file paths). EOF: the generation is over, the template exits.
- intermediate -> master: {"forked": id, "pid": pid} with a pidfd of the worker, or {"failed": id,
  "error": "..."}. The template forks an intermediate that forks the worker and exits: the worker is
  reparented to the master (PR_SET_CHILD_SUBREAPER), which learns its pid from a pidfd opened while the
  intermediate was still its parent (the pid cannot be reused before the master reaps it).

The worker waits until the master is its parent, sets its parent-death signal (tied to the parent at
the time it is set: prctl(2)), checks the master is still its parent, then runs the command's module
or script as `__main__` with its arguments, as `python -m` or `python script.py` would.
"""

import sys

if __name__ == "__main__":
    # Run as a script: its own folder (supervisor/process/) is sys.path[0]; the program must not
    # import supervisor's modules as top-level ones (`worker`, `preload`, ...). Set as the command's
    # would be below. (Imported, by the unit tests, it leaves sys.path alone.)
    del sys.path[0]

import ctypes
import gc
import importlib
import json
import os
import runpy
import signal
import socket
import stat
import time
import traceback
import warnings
from collections.abc import Callable
from typing import Any

CONTROL_FD = 3
PR_SET_PDEATHSIG = 1  # linux/prctl.h
REPARENT_TIMEOUT = 5.0  # seconds a worker waits for the intermediate to exit (it does so at once)
EXIT_ORPHAN = 70  # the worker's exit status when the master is gone before it could run
CHANGED_SHOWN = 5  # changed paths named in a "checked" answer

# What the preload imports read, recorded by an audit hook (PEP 578) while they run: the data files
# an import loads (a model, a template folder's files) count as the application's code too. A hook
# cannot be removed: it stays in the template and its workers, one early return per audit event.
_reading: set[str] | None = None


_KERNEL_FILES = ("/proc/", "/sys/", "/dev/")  # their times say nothing about the code


def _record_open(event: str, args: tuple[Any, ...]) -> None:
    if _reading is None or event != "open":
        return
    path, mode, flags = args
    # open() and io.open_code() give a mode, os.open() flags only.
    reads = flags & os.O_ACCMODE == os.O_RDONLY if mode is None else not any(c in mode for c in "wax+")
    if isinstance(path, str | bytes) and reads:
        name = os.fsdecode(path)
        if not name.startswith(_KERNEL_FILES):
            _reading.add(name)


Stamps = dict[str, tuple[int, int, int]]


def stamp(paths: set[str]) -> Stamps:
    """Each regular file's (mtime in ns, size, inode): a file rewritten in place or replaced by a new
    one (an editor's or pip's rename) differs; one that is gone (or not a file) has none."""
    stamps: Stamps = {}
    for path in paths:
        try:
            st = os.stat(path)
        except OSError:
            continue
        if stat.S_ISREG(st.st_mode):
            stamps[path] = (st.st_mtime_ns, st.st_size, st.st_ino)
    return stamps


def record_reads() -> None:
    """From now on, what is opened for reading is recorded (once per process: the audit hook stays)."""
    global _reading
    _reading = set()
    sys.addaudithook(_record_open)


def recorded() -> set[str]:
    """What was read since record_reads, and the file of every module loaded by now; recording stops."""
    global _reading
    read, _reading = _reading or set(), None
    return read | imported_files()


def imported_files() -> set[str]:
    """The source (or extension) file of every module loaded now."""
    return {f for m in list(sys.modules.values()) if isinstance(f := getattr(m, "__file__", None), str)}


def changed(before: Stamps, now: Stamps) -> list[str]:
    """The files of `before` whose stamp differs now, or that are gone; sorted."""
    return sorted(path for path, was in before.items() if now.get(path) != was)


def main() -> int:
    spec = json.loads(sys.argv[1])
    kind, target, args = spec["main"]
    sys.path.insert(0, os.getcwd() if kind == "module" else os.path.dirname(os.path.abspath(target)))
    for name in ("LISTEN_FDS", "LISTEN_PID", "LISTEN_FDNAMES"):  # the workers get their own
        os.environ.pop(name, None)
    control = socket.socket(fileno=CONTROL_FD)
    started = time.monotonic()
    record_reads()
    for module in spec["preload"]:
        importlib.import_module(module)  # a failure: traceback on stderr, exit status 1
    stamps = stamp(recorded())
    prepared = prepare_main(kind, target)
    # What the imports created is never collected in a worker: the collector would write to every
    # object's header and so copy every shared page (gc.freeze, Python 3.7).
    gc.freeze()
    # The intermediates are reaped by the kernel: the template forks the next worker without waiting
    # for the last intermediate to exit. Each child sets SIGCHLD back to the default first thing.
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)
    control.send(json.dumps({"ready": round((time.monotonic() - started) * 1000), "files": len(stamps)}).encode())
    while True:
        message, fds, _flags, _address = socket.recv_fds(control, 65536, 256)
        if not message:
            return 0  # the master closed its end: the generation is over
        request = json.loads(message)
        if "check" in request:
            now = changed(stamps, stamp(set(stamps)))
            control.send(json.dumps({"checked": request["check"], "changed": now[:CHANGED_SHOWN]}).encode())
            continue
        run = fork(control, request, fds, spec)
        if run is not None:  # in the worker, with the template's frames left behind
            control.detach()  # its fd number now holds the worker's first listener
            break
        for fd in fds:
            os.close(fd)
    return run(kind, target, request.get("args", args), prepared)


def fork(control: socket.socket, request: dict[str, Any], fds: list[int],
         spec: dict[str, Any]) -> Callable[[str, str, list[str], Any], int] | None:
    """Fork one worker through an intermediate; returns in the worker only (what to run), else None."""
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        intermediate = os.fork()
    except OSError as exc:  # EAGAIN (RLIMIT_NPROC, pid_max), ENOMEM: this worker fails, the template stays
        control.send(json.dumps({"failed": request["fork"], "error": f"fork: {exc}"}).encode())
        return None
    if intermediate:
        return None  # the intermediate reports and exits; the kernel reaps it (SIGCHLD ignored)
    try:
        # Before the worker exists: with SIGCHLD ignored the kernel would reap it, and the master
        # would never see its exit status.
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        worker = os.fork()
        if worker == 0:
            try:
                become_worker(request, fds, spec)
            except BaseException:  # its stderr is the worker's: the master reports it
                traceback.print_exc()
                os._exit(1)
            return run_main
        pidfd = os.pidfd_open(worker)
        socket.send_fds(control, [json.dumps({"forked": request["fork"], "pid": worker}).encode()], [pidfd])
    except BaseException as exc:  # reported to the master, whatever it is
        try:
            control.send(json.dumps({"failed": request["fork"], "error": f"{type(exc).__name__}: {exc}"}).encode())
        finally:
            os._exit(1)
    os._exit(0)


def become_worker(request: dict[str, Any], fds: list[int], spec: dict[str, Any]) -> None:
    """What the spawn chain does for a spawned worker: session, parent-death signal, fds, environment."""
    os.setsid()
    master = spec["master"]
    deadline = time.monotonic() + REPARENT_TIMEOUT
    while os.getppid() != master:  # the intermediate exits right after sending our pid
        if time.monotonic() > deadline:
            os._exit(EXIT_ORPHAN)
        time.sleep(0.0002)
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_PDEATHSIG, spec["pdeathsig"], 0, 0, 0) != 0 or os.getppid() != master:
        os._exit(EXIT_ORPHAN)  # the master died before the signal was set: nobody would stop us
    streams = 2 if request.get("stdout") else 1  # stderr, and stdout when it is a pipe of its own
    listeners = fds[streams:]
    # Park every received fd above where they go, then place them: a received fd may sit in 3..3+n.
    park = max([*fds, CONTROL_FD, 2 + len(listeners)]) + 1
    parked = [os.dup2(fd, park + i, inheritable=False) for i, fd in enumerate(fds)]
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    os.dup2(parked[0], 2)
    if streams == 2:
        os.dup2(parked[1], 1)
    for i, fd in enumerate(parked[streams:]):
        os.dup2(fd, 3 + i)  # inheritable, as a spawned worker's are; fd 3 was the control socket
    for fd in {*fds, *parked, devnull} - set(range(3 + len(listeners))):
        os.close(fd)
    os.environ.update(request["env"])
    os.environ["LISTEN_PID"] = str(os.getpid())


def prepare_main(kind: str, target: str) -> Any:
    """The code `python -m target` runs, compiled once here rather than by every worker (runpy compiles
    the module's source again where there is no .pyc: 8 to 30 ms a worker). Only for a module the
    imports loaded already, not a package (its __main__ would be imported here), and while runpy has
    the two functions run_module is made of; otherwise None, and each worker runs run_module."""
    module = sys.modules.get(target)
    details = getattr(runpy, "_get_module_details", None)
    if kind != "module" or module is None or hasattr(module, "__path__") or details is None \
            or not hasattr(runpy, "_run_module_code"):
        return None
    try:
        with warnings.catch_warnings():  # runpy's warning about a module imported before: the point here
            warnings.filterwarnings("ignore", "'.*' found in sys.modules", RuntimeWarning)
            return details(target)
    except Exception:  # the worker's run_module meets it again and reports it
        return None


def run_main(kind: str, target: str, args: list[str], prepared: Any = None) -> int:
    """Run the command's module or script as __main__, as the interpreter would have (run_module with
    alter_sys is _get_module_details, then _run_module_code: `prepared` is the first's result)."""
    # runpy warns when the module was imported before (preloaded): here that is the point.
    warnings.filterwarnings("ignore", "'.*' found in sys.modules", RuntimeWarning)
    if kind == "module" and prepared is not None:
        sys.argv = [target, *args]  # runpy puts the module's path in argv[0]
        _name, spec, code = prepared
        runpy._run_module_code(code, None, "__main__", spec)  # type: ignore[attr-defined]
    elif kind == "module":
        sys.argv = [target, *args]  # runpy puts the module's path in argv[0]
        runpy.run_module(target, run_name="__main__", alter_sys=True)
    else:
        sys.argv = [target, *args]
        runpy.run_path(target, run_name="__main__")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except SystemExit:
        raise
    except BaseException:
        traceback.print_exc()
        sys.exit(1)
