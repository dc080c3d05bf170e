"""uvicorn under supervisord: `python -m supervisor.servers.uvicorn APP [uvicorn options]`.

What `uvicorn --fd 3 APP` does not: it serves every inherited listener (LISTEN_FDS, in config order),
keeps each listener's backlog (SUPERVISOR_BACKLOG), sends `READY=1` once it serves (`ready: notify`),
and stops as the stop contract says (supervisor.servers.stopping). uvicorn's own stop closes every
connection with no request in progress at once, so a keep-alive client that sends its next request at
that instant gets nothing back; and when it finds a request in progress, it closes the connection after
the answer without saying so in the answer (0.55, h11). The runner passes uvicorn its own HTTP protocol
class (uvicorn's `http` setting, a public extension point) that, once stopping:

- adds `Connection: close` to the next answer of every connection (not to answers that have pipelined
  requests read behind them: those are answered too), after which uvicorn closes it;
- closes a connection with nothing in progress only once it has been quiet for `--stop-idle` seconds
  (and no request waits unread in its socket);
- and uvicorn's `--timeout-graceful-shutdown` defaults to finish_within() (0.9 x graceful_timeout).

Every other option is uvicorn's own (`python -m uvicorn --help`); those that choose listeners or processes
(`--host`, `--port`, `--uds`, `--fd`, `--reload`, `--workers`) and `--http` are refused. Tested with
uvicorn 0.55 (the `uvicorn` extra pins it).
"""

from __future__ import annotations

import asyncio
import inspect
import socket
import sys
from typing import Any

import click
import h11
import uvicorn
from uvicorn.main import main as uvicorn_command
from uvicorn.protocols.http.h11_impl import H11Protocol

from supervisor.servers.activation import StartError, backlog_override, inherited_listeners, kept_backlog, notify
from supervisor.servers.stopping import IDLE_CLOSE, ShutWatch, finish_within, unread, unsent

PROG = "python -m supervisor.servers.uvicorn"
LINGER = 2.0  # seconds a closing connection reads on after its FIN, for the client to close its side
REFUSED = ("host", "port", "uds", "fd", "reload", "workers", "http")  # the listeners are supervisord's


class LingeringTransport:
    """The connection's transport, but its close() sends a FIN after the last answer and reads on until
    the client closes (or LINGER s pass): a close() with bytes of the request still coming (a POST whose
    body the application did not read, sent after its head as httpx does) would answer them with a
    reset, which can throw the answer away in the client's kernel before it is read."""

    def __init__(self, transport: asyncio.Transport, loop: asyncio.AbstractEventLoop) -> None:
        self.transport, self.loop = transport, loop
        self.lingering: asyncio.TimerHandle | None = None

    def __getattr__(self, name: str) -> Any:
        return getattr(self.transport, name)

    def close(self) -> None:
        if self.lingering is not None or self.transport.is_closing():
            return
        if not self.transport.can_write_eof():  # TLS: no half-close
            self.transport.close()
            return
        self.transport.write_eof()  # after what is buffered
        self.lingering = self.loop.call_later(LINGER, self.transport.close)

    def is_closing(self) -> bool:
        return self.lingering is not None or self.transport.is_closing()

    def end(self) -> None:
        if self.lingering is not None:
            self.lingering.cancel()
        self.transport.close()


class StoppingH11Protocol(H11Protocol):
    """uvicorn's h11 protocol with the stop contract's last answer and quiet close."""

    idle_close = IDLE_CLOSE  # set by the runner from --stop-idle

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.stopping = False
        self.active = self.loop.time()  # its last byte in or out, or its creation
        self.quiet_timer: asyncio.TimerHandle | None = None
        # uvicorn runs `self.app` for each request of this connection: wrap it to see each answer's head.
        self.inner_app = self.app
        self.app = self.closing_app

    async def closing_app(self, scope: Any, receive: Any, send: Any) -> None:
        async def closing_send(message: Any) -> None:
            if message["type"] == "http.response.start" and self.stopping and not self.conn.trailing_data[0]:
                # h11 sees the header and ends the connection after this answer (our_state MUST_CLOSE).
                message = {**message, "headers": [*message.get("headers", []), (b"connection", b"close")]}
            await send(message)

        await self.inner_app(scope, receive, closing_send)

    def shutdown(self) -> None:
        """uvicorn's stop: instead of closing idle connections at once, answer their next request with
        `Connection: close`, or close them once quiet."""
        self.stopping = True
        if self.idle():
            self.close_when_quiet()

    def idle(self) -> bool:
        in_progress = self.cycle is not None and not self.cycle.response_complete
        return not (in_progress or self.conn.trailing_data[0] or unsent(self.transport) or unread(self.transport))

    def close_when_quiet(self) -> None:
        if self.quiet_timer is not None:
            self.quiet_timer.cancel()
        self.quiet_timer = self.loop.call_at(self.active + self.idle_close, self.quiet)

    def quiet(self) -> None:
        self.quiet_timer = None
        if self.transport.is_closing():
            return
        if self.idle():
            try:
                self.conn.send(h11.ConnectionClosed())
            except h11.LocalProtocolError:
                pass
            self.transport.close()
        elif self.cycle is None or self.cycle.response_complete:  # answers on their way, or a request: look again
            self.quiet_timer = self.loop.call_later(self.idle_close, self.quiet)

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(LingeringTransport(transport, self.loop))  # type: ignore[arg-type]

    def eof_received(self) -> None:
        if isinstance(self.transport, LingeringTransport) and self.transport.lingering is not None:
            self.transport.end()  # the client has closed its side too

    def data_received(self, data: bytes) -> None:
        if isinstance(self.transport, LingeringTransport) and self.transport.lingering is not None:
            return  # after our FIN: whatever the client still sends is not answered
        self.active = self.loop.time()
        if self.quiet_timer is not None:
            self.quiet_timer.cancel()
            self.quiet_timer = None
        super().data_received(data)
        if self.stopping and not self.transport.is_closing() and self.idle():
            self.close_when_quiet()  # not a whole request

    def on_response_complete(self) -> None:
        self.active = self.loop.time()
        super().on_response_complete()
        if self.stopping and not self.transport.is_closing() and self.idle():
            self.close_when_quiet()  # its answer had started before the stop: the next one says close

    def connection_lost(self, exc: Exception | None) -> None:
        if self.quiet_timer is not None:
            self.quiet_timer.cancel()
        if isinstance(self.transport, LingeringTransport) and self.transport.lingering is not None:
            self.transport.lingering.cancel()
        super().connection_lost(exc)


class NotifyingServer(uvicorn.Server):
    """uvicorn's server that tells supervisord it serves, once every listener is served, and stops watching
    a listener supervisord shut."""

    shut_watch: ShutWatch | None = None

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets=sockets)
        self.shut_watch = ShutWatch(asyncio.get_running_loop())  # from the shut to the stop signal: no spinning
        for server in getattr(self, "servers", []):  # none when the app's lifespan startup failed
            self.shut_watch.add(server)
        if self.started and not self.should_exit:
            notify(f"READY=1\nSTATUS=uvicorn serving {len(sockets or [])} listeners")

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        if self.shut_watch is not None:
            self.shut_watch.release()
        await super().shutdown(sockets=sockets)


def config(argv: list[str]) -> tuple[uvicorn.Config, list[socket.socket]]:
    """uvicorn's Config from its own command line, with the runner's protocol and the inherited listeners."""
    stop_idle = IDLE_CLOSE
    if "--stop-idle" in argv:
        at = argv.index("--stop-idle")
        try:
            stop_idle = float(argv[at + 1])
        except (IndexError, ValueError):
            raise StartError("--stop-idle: expected a number of seconds") from None
        argv = argv[:at] + argv[at + 2:]
    try:
        params = uvicorn_command.make_context(PROG, list(argv)).params
    except click.exceptions.Exit as exc:  # --help, --version
        raise SystemExit(exc.exit_code) from None
    except click.ClickException as exc:
        raise StartError(exc.format_message()) from None
    defaults = {param.name: param.default for param in uvicorn_command.params}
    given = [name for name in REFUSED if params.get(name) != defaults.get(name)]
    if given:
        raise StartError(f"--{given[0].replace('_', '-')}: supervisord gives the listeners (LISTEN_FDS) "
                         "and runs the processes; the runner sets uvicorn's HTTP protocol itself")
    listeners = [sock for _name, sock in inherited_listeners()]
    if not listeners:
        raise StartError("no listeners: run under supervisord (LISTEN_FDS)")
    if params.get("app_dir") is not None:
        sys.path.insert(0, params["app_dir"])
    wanted = inspect.signature(uvicorn.Config).parameters
    kwargs = {name: value for name, value in params.items() if name in wanted and name not in REFUSED}
    kwargs["log_config"] = kwargs.get("log_config") or uvicorn.config.LOGGING_CONFIG
    for name in ("reload_dirs", "reload_includes", "reload_excludes"):
        kwargs.pop(name, None)
    if kwargs.get("timeout_graceful_shutdown") is None:
        kwargs["timeout_graceful_shutdown"] = finish_within()
    # listen() again, as asyncio's create_server() does, must keep the group's backlog.
    kwargs["backlog"] = kept_backlog(listeners[0], backlog_override())
    StoppingH11Protocol.idle_close = stop_idle
    return uvicorn.Config(http=StoppingH11Protocol, **kwargs), listeners


def main(argv: list[str] | None = None) -> int:
    try:
        settings, listeners = config(sys.argv[1:] if argv is None else argv)
    except StartError as exc:
        print(f"{PROG}: {exc}", file=sys.stderr)
        return 2
    NotifyingServer(settings).run(sockets=listeners)
    return 0


if __name__ == "__main__":
    sys.exit(main())
