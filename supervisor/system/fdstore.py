"""systemd's file descriptor store: the listeners outlive a crash or a restart of supervisord.

With `FileDescriptorStoreMax=` systemd 254+ sets $FDSTORE to its size. Older systemd keeps a store
just the same (`FDSTORE=1` works since 219; 249-253 hand it back after a crash with `Restart=` and
after `systemctl restart`) but does not say so: there the unit says it, with $SUPERVISOR_FDSTORE
set to the same number (`Environment=`), read only when $FDSTORE is absent. Each listener the
master creates is sent to the store (`FDSTORE=1`, `FDNAME=program.generation.worker.n`, the fd as
SCM_RIGHTS; a generation's shared listener `program.generation.shared.n`) and removed
(`FDSTOREREMOVE=1`) when its worker (its generation) has gone, so the store holds the
serving and the still-retiring listeners. A stored listener stays open while no master runs: its
accept queue keeps filling, nothing is refused. The next start receives them as LISTEN_FDS /
LISTEN_FDNAMES and adopts those it recognises (`inherited()`) as a previous generation without
workers, shut once its new generation serves, as at a reload. Without a store (neither variable,
or no $NOTIFY_SOCKET) every call here is a no-op.
"""

from __future__ import annotations

import os
import re
import socket
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import structlog

from supervisor.config.schema import Config, Listen
from supervisor.system import listeners
from supervisor.system.listeners import Groups, Listener
from supervisor.system.systemd import Notifier

log = structlog.get_logger()

# program.generation.worker.n (or program.generation.shared.n): printable ASCII, no ':' (systemd's
# rule for names); program names may contain dots, so the name is read from the right.
_NAME = re.compile(r"(?P<program>[A-Za-z0-9_][A-Za-z0-9_.-]*)\.(?P<gen>\d+)\.(?P<worker>\d+|shared)\.(?P<n>\d+)")
SHARED = "shared"
SD_LISTEN_FDS_START = 3
# Where the unit announces its store to a systemd older than 254 (which sets no $FDSTORE).
STORE_ENV = "SUPERVISOR_FDSTORE"


def name(program: str, generation: int, worker: int | str, n: int) -> str:
    """The store's name of listener `n` of a worker, or (worker `SHARED`) of a generation."""
    return f"{program}.{generation}.{worker}.{n}"


class FdStore:
    """Sends over the daemon's own sd_notify socket (a failure is logged: the listener still works,
    only a restart would not find it)."""

    def __init__(self, notifier: Notifier, environ: Mapping[str, str] | None = None) -> None:
        env = os.environ if environ is None else environ
        self.notifier = notifier
        self.size = announced(env) if notifier.sock is not None else 0
        self.enabled = self.size > 0
        if self.enabled:
            log.info("fdstore_enabled", size=self.size, announced_by="FDSTORE" if "FDSTORE" in env else STORE_ENV)

    def keep(self, names_and_fds: list[tuple[str, int]]) -> None:
        for fdname, fd in names_and_fds if self.enabled else ():
            self.notifier.send_with_fds(f"FDSTORE=1\nFDNAME={fdname}", [fd])

    def remove(self, names: list[str]) -> None:
        for fdname in names if self.enabled else ():
            self.notifier.send_with_fds(f"FDSTOREREMOVE=1\nFDNAME={fdname}")


def announced(environ: Mapping[str, str]) -> int:
    """The store's size: $FDSTORE (systemd 254+), else $SUPERVISOR_FDSTORE (the unit's word for older
    systemd); 0 when neither is set, or set empty. ValueError, naming the variable, for anything but
    a count."""
    key = "FDSTORE" if "FDSTORE" in environ else STORE_ENV
    value = environ.get(key, "")
    if value and not (value.isascii() and value.isdigit()):
        raise ValueError(f"{key}={value}: expected the unit's FileDescriptorStoreMax=, a number of fds")
    return int(value or 0)


@dataclass(frozen=True)
class Adopted:
    """A listener handed back by the store: whose it was, and the socket."""

    program: str
    generation: int
    name: str
    listener: Listener


def inherited(config: Config, environ: dict[str, str] | None = None) -> tuple[list[Adopted], list[str]]:
    """The listeners passed in LISTEN_FDS that this config can adopt; the store names of the rest,
    which are closed here (to be removed from the store). The LISTEN_* variables are taken out of
    the environment either way."""
    env = os.environ if environ is None else environ
    count, pid = env.pop("LISTEN_FDS", ""), env.pop("LISTEN_PID", "")
    names = env.pop("LISTEN_FDNAMES", "").split(":")
    if not count.isdigit() or pid != str(os.getpid()):
        return [], []
    wanted = {(p.name, listen): p for p in config.programs for listen in p.listen}
    adopted, dropped = [], []
    for i in range(int(count)):
        fd, fdname = SD_LISTEN_FDS_START + i, names[i] if i < len(names) else ""
        match = _NAME.fullmatch(fdname)
        try:
            sock = socket.socket(fileno=fd)
        except OSError as exc:
            log.warning("fdstore_unusable", fd=fd, name=fdname, error=str(exc))
            dropped.append(fdname)
            continue
        listen = _listening_address(sock)
        program = match["program"] if match else ""
        if match is None or listen is None or (program, listen) not in wanted:
            # Not ours, no longer listening, or an address the config dropped: shut (its queue, if
            # any, migrates to the new generation's listeners of the same group) and close.
            log.info("fdstore_dropped", fd=fd, name=fdname, listening=str(listen) if listen else None)
            if listen is not None and match is not None:
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()
            dropped.append(fdname)
            continue
        adopted.append(Adopted(program, int(match["gen"]), fdname, Listener(listen, fdname, sock)))
    return adopted, [n for n in dropped if n]


def _listening_address(sock: socket.socket) -> Listen | None:
    try:
        if sock.type != socket.SOCK_STREAM or not sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN):
            return None
        host, port = sock.getsockname()[:2]
    except OSError:
        return None
    return Listen(host, port, socket.AddressFamily(sock.family))


class Inherited:
    """The listeners a master that died or stopped left in the fd store: a generation without workers,
    whose queues the first new generation of their program takes over (then they are shut)."""

    def __init__(self, store: FdStore) -> None:
        self.store = store
        self.listeners: list[Adopted] = []

    def adopt(self, config: Config, groups: Groups) -> list[Adopted]:
        """Take what the store handed over for `config`'s programs; drop (and remove) the rest."""
        self.listeners, dropped = inherited(config)
        self.store.remove(dropped)
        for a in self.listeners:
            groups.unknown(a.listener.listen)  # their order in the group is the dead master's
        if self.listeners or dropped:
            log.info("fdstore_adopted", listeners=[a.name for a in self.listeners], dropped=dropped)
        return self.listeners

    def of(self, programs: Iterable[str]) -> list[Adopted]:
        wanted = set(programs)
        return [a for a in self.listeners if a.program in wanted]

    def shut(self, programs: set[str]) -> int:
        """The programs' new generations serve: shut what was adopted (queues migrate), forget it."""
        done = self.of(programs)
        for a in done:
            listeners.close(a.listener)
        self.store.remove([a.name for a in done])
        self.listeners = [a for a in self.listeners if a.program not in programs]
        return len(done)
