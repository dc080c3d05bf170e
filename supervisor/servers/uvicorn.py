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
- closes a connection with nothing in progress only once it has been quiet for `--stop-idle` seconds;
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
from supervisor.servers.stopping import IDLE_CLOSE, finish_within, unsent

PROG = "python -m supervisor.servers.uvicorn"
REFUSED = ("host", "port", "uds", "fd", "reload", "workers", "http")  # the listeners are supervisord's


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
        return not in_progress and not self.conn.trailing_data[0] and not unsent(self.transport)

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
        elif self.cycle is None or self.cycle.response_complete:  # answers still on their way: look again
            self.quiet_timer = self.loop.call_later(self.idle_close, self.quiet)

    def data_received(self, data: bytes) -> None:
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
        super().connection_lost(exc)


class NotifyingServer(uvicorn.Server):
    """uvicorn's server that tells supervisord it serves, once every listener is served."""

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets=sockets)
        if self.started and not self.should_exit:
            notify(f"READY=1\nSTATUS=uvicorn serving {len(sockets or [])} listeners")


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
