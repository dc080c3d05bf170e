"""`metrics:` Prometheus metrics, /healthz and /readyz over HTTP, served from the master's own loop.

The HTTP side (`MetricsServer`) only parses a request line and posts a `Scrape` event; the master
answers it in its loop with `answer()`, a read of its records at that moment. So /healthz is 200 only
while the master's loop takes events, and no thread is involved (the master runs none:
docs/design.md, "The process model"). prometheus_client
writes the exposition format; it is imported on the first scrape, not by a master without `metrics:`.

The counts the kernel keeps (migrations, listen overflows) are read from the namespace's
/proc/net/netstat at each scrape: they are the kernel's own numbers, for every reuseport group of
the network namespace, and they keep growing across reloads, crashes, scale and recycling. The
master's own process_* series (memory, CPU, fds, start time) carry the names Prometheus's client
libraries give them, so the usual dashboards read them. No series is one that can only ever be 0.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import errno
import socket
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import structlog

from supervisor import __version__
from supervisor.config.schema import Metrics
from supervisor.daemon import accepting
from supervisor.daemon.events import Event, Scrape
from supervisor.daemon.facts import Facts
from supervisor.daemon.tally import BUCKETS, RESULTS, WAYS
from supervisor.errors import ControlError, SupervisorError
from supervisor.model.program import ProgramState
from supervisor.process.worker import WorkerState
from supervisor.system import migrate, procstat

log = structlog.get_logger()

MAX_CLIENTS = 64  # HTTP connections at once; more are closed unanswered (each posts one event)
# Connections of one peer address at once: a neighbour holding connections open (slowly sending, or
# nothing) cannot take the slots the kubelet's probes and Prometheus need.
MAX_PER_PEER = 4
HEAD_TIMEOUT = 1.0  # seconds a client has to send its request head (a probe sends it at once)
# When every slot is taken (neighbours from many addresses), a new connection may take the slot of the
# oldest one that has sent no request head yet: at once if the new one comes from an address that has
# sent a whole request before (the kubelet, Prometheus: `known`), else once that one has waited this long.
EVICT_AFTER = 0.1
MAX_KNOWN = 256  # addresses remembered for having sent a whole request (the most recent ones)
# The listen backlog: a burst of connections (a neighbour's flood) that fills the accept queue makes the
# kernel drop the next SYNs, a probe's too, and its client retries after 1 s: the kubelet's default probe
# timeout. The loop accepts (and closes the excess) far faster than a burst of this size arrives, 16 in each
# of its turns (daemon/accepting.py).
BACKLOG = 1024
REQUEST_TIMEOUT = 5.0  # seconds the master has to answer, and a client to read the answer
MAX_HEAD = 8192  # bytes of a request head
TEXT = "text/plain; charset=utf-8"
# The states a live worker can be in (exited and failed workers are forgotten): supervisor_workers{state}.
LIVE_STATES = (WorkerState.STARTING, WorkerState.READY, WorkerState.RETIRING)


# -- what the master answers --------------------------------------------------------------------------

def answer(master: Facts, path: str) -> tuple[int, str, bytes]:
    """(HTTP status, content type, body) for a GET of `path`."""
    if path == "/healthz":
        return 200, TEXT, b"ok\n"
    if path == "/readyz":
        reasons = not_ready(master)
        return (503, TEXT, ("; ".join(reasons) + "\n").encode()) if reasons else (200, TEXT, b"ready\n")
    if path == "/metrics":
        from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest
        from prometheus_client.registry import CollectorRegistry

        registry = CollectorRegistry(auto_describe=False)
        registry.register(_Families(families(master)))
        return 200, CONTENT_TYPE_LATEST, generate_latest(registry)
    return 404, TEXT, b"not found: /metrics, /healthz and /readyz are served here\n"


def not_ready(master: Facts) -> list[str]:
    """Why /readyz is 503: every program of the config serves, unless stopped by hand (and done stopping)."""
    reasons = []
    for program in master.config.programs:
        record = master.programs.get(program.name)
        state = record.state if record else ProgramState.STOPPED
        if state in (ProgramState.SERVING, ProgramState.RELOADING):
            continue
        if record is not None and state is ProgramState.STOPPED and record.stopped_by_hand:
            continue
        if state is ProgramState.FATAL and record is not None:
            reasons.append(f"{program.name}: fatal ({record.fatal})")
        else:
            reasons.append(f"{program.name}: {state.value}")
    if master.stopping:
        reasons.insert(0, "supervisord is shutting down")
    return reasons


def families(master: Facts) -> list[Any]:
    """Every metric, read from the master's records and the kernel now."""
    from prometheus_client.core import (
        CounterMetricFamily,
        GaugeMetricFamily,
        HistogramMetricFamily,
        InfoMetricFamily,
    )

    tally, kernel = master.tally, migrate.tcp_ext()
    out: list[Any] = [InfoMetricFamily("supervisor", "supervisord's version", value={"version": __version__})]
    reloads = CounterMetricFamily("supervisor_reloads", "Reloads by result (done, rolled_back, refused)",
                                  labels=["result"])
    for result in RESULTS:
        reloads.add_metric([result], tally.reloads[result])
    out.append(reloads)
    out.append(HistogramMetricFamily(
        "supervisor_reload_duration_seconds", "Seconds from a reload's request to its answer, for reloads done",
        buckets=[*((f"{b:g}", n) for b, n in zip(BUCKETS, tally.buckets, strict=True)),
                 ("+Inf", tally.reloads["done"])],
        sum_value=tally.seconds))
    ways = CounterMetricFamily("supervisor_reload_retirements", "Reloads done by how their old listeners ended: "
                               "migrated (by the kernel), drained (then shut) or reset", labels=["way"])
    for way in WAYS:
        ways.add_metric([way], tally.retirements[way])
    out.append(ways)
    out.append(CounterMetricFamily("supervisor_drain_dropped_connections", "Connections still queued in old "
                                   "listeners shut when drain_timeout passed (without migration: reset)",
                                   value=tally.dropped))
    out.append(CounterMetricFamily("supervisor_drain_seconds", "Seconds spent draining old listeners before "
                                   "shutting them, summed over reloads", value=tally.drain_seconds))
    for name, key, doc in (
            ("supervisor_connections_migrated", "TCPMigrateReqSuccess",
             "Connections the kernel moved from a closed listener to another (TcpExt TCPMigrateReqSuccess)"),
            ("supervisor_migrate_failures", "TCPMigrateReqFailure",
             "Connections the kernel could not move and reset (TcpExt TCPMigrateReqFailure)"),
            ("supervisor_listen_overflows", "ListenOverflows",
             "Connections dropped on a full accept queue in this network namespace (TcpExt ListenOverflows)")):
        out.append(CounterMetricFamily(name, doc, value=kernel.get(key, 0)))

    out += _last_reload(master)
    out += _process()
    names = [p.name for p in master.config.programs]
    names += [name for name in master.programs if name not in names]
    queue = GaugeMetricFamily("supervisor_listen_queue", "Connections waiting in the accept queues of the serving "
                              "generation's listeners (from the kernel, TCP_INFO)", labels=["program", "address"])
    workers = GaugeMetricFamily("supervisor_workers", "Live workers by state", labels=["program", "state"])
    restarts = CounterMetricFamily("supervisor_worker_restarts", "Workers restarted after a crash",
                                   labels=["program"])
    fatal = GaugeMetricFamily("supervisor_program_fatal", "1 while the program is FATAL", labels=["program"])
    generation = GaugeMetricFamily("supervisor_generation", "The serving generation's number (0: none)",
                                   labels=["program"])
    rss = GaugeMetricFamily("supervisor_worker_resident_memory_bytes", "Resident memory of the program's "
                            "live workers, summed", labels=["program"])
    cpu = GaugeMetricFamily("supervisor_worker_cpu_seconds", "CPU seconds (user + system) of the program's "
                            "live workers, summed (falls when a worker exits)", labels=["program"])
    expiry = GaugeMetricFamily("supervisor_tls_cert_not_after_timestamp_seconds", "When the certificate "
                               "the serving workers were given expires (Unix time)", labels=["program"])
    starting = list(master.reload.generations) if master.reload else []
    for name in names:
        record = master.programs.get(name)
        if record is None:
            continue
        gens = [*record.generations(), *(g for g in starting if g.program.name == name)]
        live = [w for g in gens for w in g.workers if w.alive]
        for state in LIVE_STATES:
            workers.add_metric([name, state.value], sum(w.state is state for w in live))
        for address, waiting in _queues(record.serving.every_listener() if record.serving else []).items():
            queue.add_metric([name, address], waiting)
        restarts.add_metric([name], record.restarts)  # what `status` shows on the program's row
        fatal.add_metric([name], 1 if record.fatal is not None else 0)
        generation.add_metric([name], record.serving.number if record.serving else 0)
        memory, seconds = _usage(w.pid for w in live)
        rss.add_metric([name], memory)
        cpu.add_metric([name], seconds)
        if record.certificate is not None:
            expiry.add_metric([name], record.certificate.not_after.timestamp())
    return [*out, queue, workers, restarts, fatal, generation, rss, cpu, expiry]


def _last_reload(master: Facts) -> list[Any]:
    """The last reload, restart or start (what `status` shows): whether it was done, and when it ended.
    Before any, the config read at startup counts, as Prometheus's own config_last_reload_* do."""
    from prometheus_client.core import GaugeMetricFamily

    last = master.last_reload
    done, at = (1, master.started_at) if last is None else (int(last["result"] == "done"), last["at"])
    return [GaugeMetricFamily("supervisor_last_reload_successful", "1 if the last reload, restart or start was "
                              "done, 0 if it was rolled back or refused", value=done),
            GaugeMetricFamily("supervisor_last_reload_timestamp_seconds", "When the last reload, restart or start "
                              "ended (Unix time; before any, when supervisord started)", value=at)]


def _process() -> list[Any]:
    """The master's own process_* series, under the names Prometheus's client libraries give them."""
    import resource

    import psutil
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

    me = psutil.Process()
    with me.oneshot():
        memory, times, fds, started = me.memory_info(), me.cpu_times(), me.num_fds(), me.create_time()
    return [
        GaugeMetricFamily("process_resident_memory_bytes", "supervisord's resident memory in bytes", value=memory.rss),
        GaugeMetricFamily("process_virtual_memory_bytes", "supervisord's virtual memory in bytes", value=memory.vms),
        CounterMetricFamily("process_cpu_seconds", "supervisord's user and system CPU time in seconds",
                            value=times.user + times.system),
        GaugeMetricFamily("process_open_fds", "supervisord's open file descriptors", value=fds),
        GaugeMetricFamily("process_max_fds", "supervisord's limit of open file descriptors",
                          value=resource.getrlimit(resource.RLIMIT_NOFILE)[0]),
        GaugeMetricFamily("process_start_time_seconds", "When supervisord's process started (Unix time; an "
                          "upgrade keeps the process)", value=started),
    ]


def _queues(listeners: Iterable[Any]) -> dict[str, int]:
    """Address -> connections waiting in these listeners, the open ones (each once: Generation.every_listener)."""
    queued: dict[str, int] = {}
    for listener in listeners:
        if listener.shut:
            continue
        address = str(listener.listen)
        try:
            queued[address] = queued.get(address, 0) + listener.queued()
        except OSError:
            queued.setdefault(address, 0)
    return queued


def _usage(pids: Iterable[int]) -> tuple[int, float]:
    """Resident bytes and CPU seconds of these processes, summed (those gone meanwhile count 0)."""
    used = [u for u in map(procstat.usage, pids) if u is not None]
    return sum(u.rss for u in used), sum(u.cpu for u in used)


class _Families:
    """A collector of metric families computed once per scrape."""

    def __init__(self, computed: list[Any]) -> None:
        self.computed = computed

    def describe(self) -> list[Any]:
        return []

    def collect(self) -> list[Any]:
        return self.computed


# -- the HTTP side -------------------------------------------------------------------------------------

class MetricsServer:
    """The metrics endpoint; every request it reads becomes a Scrape event answered by the master."""

    def __init__(self, post: Callable[[Event], None]) -> None:
        self.post = post
        self.settings: Metrics | None = None
        self.server: accepting.Acceptor[_Client] | None = None
        self.clients = 0
        self.peers: dict[str, int] = {}  # open connections by peer address
        self.waiting: dict[int, _Client] = {}  # those still without a request head, oldest first
        self.known: collections.OrderedDict[str, None] = collections.OrderedDict()  # MAX_KNOWN addresses

    async def open(self, settings: Metrics | None) -> None:
        """At start: listen on `settings.listen` (nothing when None); raises SupervisorError in one line."""
        self.settings = settings
        if settings is not None:
            self.server = accepting.Acceptor(bind(settings), self._admit, self._handle)
            log.info("metrics_listening", address=str(settings.listen))

    def move(self, settings: Metrics | None) -> str | None:
        """At a reload: the new address is bound before the old one closes, so a failure (raised as
        ControlError) leaves the old endpoint serving. Returns what changed, for the reply."""
        if settings == self.settings:
            return None
        try:
            sock = bind(settings) if settings is not None else None
        except SupervisorError as exc:
            raise ControlError(f"{exc}; metrics stay on {self.settings.listen if self.settings else 'nothing'}") \
                from None
        self.close()
        self.settings = settings
        if sock is not None:
            self.server = accepting.Acceptor(sock, self._admit, self._handle)
        return f"metrics: now on {settings.listen}" if settings else "metrics: off"

    def close(self) -> None:
        if self.server is not None:
            self.server.close()
            self.server = None

    def _admit(self, peername: Any) -> _Client | None:
        """A new connection, before anything is read or made for it: its place, or None (closed unanswered)."""
        peer = str(peername[0]) if isinstance(peername, tuple) and peername else "?"
        known = peer in self.known
        if self.peers.get(peer, 0) >= MAX_PER_PEER or (self.clients >= MAX_CLIENTS and not self._evict(known)):
            return None
        client = _Client(peer, asyncio.get_running_loop().time(), known)
        self.clients += 1
        self.peers[peer] = self.peers.get(peer, 0) + 1
        self.waiting[id(client)] = client
        return client

    async def _handle(self, conn: socket.socket, client: _Client) -> None:
        writer = None
        try:
            reader, writer = await asyncio.open_connection(sock=conn, limit=MAX_HEAD)
            client.writer = writer
            if not client.counted:  # its place was given to another meanwhile
                return
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), timeout=HEAD_TIMEOUT)
            self.waiting.pop(id(client), None)
            self.known[client.peer] = None
            self.known.move_to_end(client.peer)
            while len(self.known) > MAX_KNOWN:
                self.known.popitem(last=False)
            await self._serve(head, writer)
        except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, TimeoutError):
            pass
        finally:
            self._free(client)
            if writer is not None:
                writer.close()
            else:
                conn.close()

    def _evict(self, known: bool) -> bool:
        """Every place is taken: free the place of the oldest client, from an address not known, still
        without a request head, if it has waited EVICT_AFTER or the new one is `known`. False when
        there is none (the new connection is closed)."""
        now = asyncio.get_running_loop().time()
        oldest = next((c for c in self.waiting.values() if not c.known), None)
        if oldest is None or (not known and now - oldest.started < EVICT_AFTER):
            return False
        self._free(oldest)
        if oldest.writer is not None:  # its read ends; its task finds its place freed already
            oldest.writer.transport.abort()
        return True

    def _free(self, client: _Client) -> None:
        self.waiting.pop(id(client), None)
        if client.counted:
            client.counted = False
            self.clients -= 1
            if (left := self.peers.pop(client.peer) - 1) > 0:
                self.peers[client.peer] = left

    async def _serve(self, head: bytes, writer: asyncio.StreamWriter) -> None:
        parts = head.split(b"\r\n", 1)[0].split()
        if len(parts) != 3 or parts[0] not in (b"GET", b"HEAD"):
            return _respond(writer, 405, TEXT, b"only GET\n", head=False)
        path = parts[1].split(b"?", 1)[0].decode("latin-1")
        answered: asyncio.Future[tuple[int, str, bytes]] = asyncio.get_running_loop().create_future()
        self.post(Scrape(path, answered))
        try:
            code, kind, body = await asyncio.wait_for(answered, timeout=REQUEST_TIMEOUT)
        except TimeoutError:
            code, kind, body = 503, TEXT, b"the master's loop did not answer in time\n"
        _respond(writer, code, kind, body, head=parts[0] == b"HEAD")
        await asyncio.wait_for(writer.drain(), timeout=REQUEST_TIMEOUT)  # a client that does not read: closed


@dataclass(eq=False)
class _Client:
    """A connection holding a slot: whose, since when, and whether it still counts."""

    peer: str
    started: float
    known: bool  # from an address that has sent a whole request before
    writer: asyncio.StreamWriter | None = None  # once its stream is made
    counted: bool = True


REASONS = {200: "OK", 404: "Not Found", 405: "Method Not Allowed", 500: "Internal Server Error",
           503: "Service Unavailable"}


def _respond(writer: asyncio.StreamWriter, code: int, kind: str, body: bytes, head: bool) -> None:
    writer.write(f"HTTP/1.1 {code} {REASONS[code]}\r\nContent-Type: {kind}\r\nContent-Length: {len(body)}\r\n"
                 f"Connection: close\r\n\r\n".encode() + (b"" if head else body))


def bind(settings: Metrics) -> socket.socket:
    """A listening TCP socket on the metrics address; SupervisorError names the key and the reason."""
    address = settings.listen
    sock = socket.socket(address.family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address.sockaddr)
        sock.listen(BACKLOG)
        sock.setblocking(False)
    except OSError as exc:
        sock.close()
        hint = " (another process listens there)" if exc.errno == errno.EADDRINUSE else ""
        raise SupervisorError(f"metrics.listen: {address}: {exc.strerror}{hint}") from None
    return sock


def answer_scrape(master: Facts, event: Scrape) -> None:
    """The master's side of a Scrape: answer unless the client has given up."""
    if event.answered.done():
        return
    try:
        result = answer(master, event.path)
    except Exception:  # a bug here must not cost the client its answer nor the master its loop
        log.exception("metrics_failed", path=event.path)
        result = 500, TEXT, b"internal error (details in the supervisord log)\n"
    with contextlib.suppress(asyncio.InvalidStateError):
        event.answered.set_result(result)
