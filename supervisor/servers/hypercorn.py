"""hypercorn under supervisord: `python -m supervisor.servers.hypercorn APP [options]`.

It serves APP (`module:attribute`, an ASGI application) on every inherited listener (LISTEN_FDS) with the
group's backlog, sends `READY=1` once it serves (`ready: notify`), and stops as the stop contract says
(supervisor.servers.stopping), through hypercorn's public API only: `hypercorn.asyncio.serve` with its
own config and a shutdown trigger.

hypercorn's own stop, once its trigger fires, closes every idle HTTP/1.1 connection at once and ends the
others after their answer without saying so in it (0.18): both lose the next request of a keep-alive
client. So the runner holds the trigger back: on its stop signal it adds `Connection: close` to every
HTTP/1.x answer (hypercorn then closes that connection), and fires the trigger once no request has been
in progress for `--stop-idle` seconds: every connection still open has then been quiet that long. An
HTTP/2 connection gets GOAWAY from hypercorn then (`close_connection()`, which names the last stream it
took, so the client can send the others again); HTTP/2 has no `Connection: close`. hypercorn's
`graceful_timeout` gets what is left of finish_within() (0.9 x graceful_timeout).

Options: `--config FILE` (hypercorn's: TOML, `python:module` or `file:path.py`), `--worker-class`
(uvloop, the default, or asyncio), `--keep-alive S`, `--access-logfile -`, `--log-level`,
`--stop-idle S`. Tested with hypercorn 0.18 (the `hypercorn` extra pins it).

Limit: pipelined HTTP/1.1 requests behind an answer that says close are not answered (the client sends
them again, as RFC 9112 asks); hypercorn does not show a request's place in its connection's pipeline.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import signal
import sys
from collections.abc import Awaitable, Callable
from typing import Any

import uvloop
from hypercorn.asyncio import serve
from hypercorn.config import Config

from supervisor.servers.activation import StartError, backlog_override, inherited_listeners, kept_backlog, notify
from supervisor.servers.stopping import IDLE_CLOSE, finish_within

PROG = "python -m supervisor.servers.hypercorn"
CLOSE = (b"connection", b"close")


class Stop:
    """The stop contract for a whole hypercorn worker: a middleware around the application that sees
    every request, and the shutdown trigger that waits until they have been quiet long enough."""

    def __init__(self, app: Callable[..., Awaitable[None]], config: Config, idle_close: float) -> None:
        self.app, self.config, self.idle_close = app, config, idle_close
        self.loop = asyncio.get_running_loop()
        self.signalled = asyncio.Event()
        self.in_progress = 0
        self.active = self.loop.time()  # when the last request started or ended
        for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGQUIT):
            self.loop.add_signal_handler(signum, self.signalled.set)

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        http1 = scope.get("http_version", "1.1") in ("1.0", "1.1")

        async def closing_send(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start" and http1 and self.signalled.is_set():
                message = {**message, "headers": [*message.get("headers", []), CLOSE]}
            await send(message)

        self.in_progress += 1
        self.active = self.loop.time()
        try:
            await self.app(scope, receive, closing_send)
        finally:
            self.in_progress -= 1
            self.active = self.loop.time()

    async def trigger(self) -> None:
        """hypercorn's shutdown trigger: hypercorn awaits it once every listener is served."""
        notify("READY=1\nSTATUS=hypercorn serving")
        await self.signalled.wait()
        deadline = self.loop.time() + finish_within()
        while self.loop.time() < deadline and (self.in_progress or self.loop.time() < self.active + self.idle_close):
            await asyncio.sleep(0.05)
        # What hypercorn waits for its connections' tasks after this: the rest of the stop's bound.
        self.config.graceful_timeout = max(0.0, deadline - self.loop.time())


def load_app(path: str) -> Callable[..., Awaitable[None]]:
    module_name, _, attribute = path.partition(":")
    try:
        found: Any = importlib.import_module(module_name)
        for name in (attribute or "app").split("."):
            found = getattr(found, name)
    except (ImportError, AttributeError) as exc:
        raise StartError(f"cannot load the application {path!r}: {exc}") from None
    return found


def load_config(path: str | None) -> Config:
    if path is None:
        return Config()
    if path.startswith("python:"):
        return Config.from_object(path[len("python:"):])
    if path.startswith("file:"):
        return Config.from_pyfile(path[len("file:"):])
    return Config.from_toml(path)


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.splitlines()[0])
    parser.add_argument("application", help="module:attribute")
    parser.add_argument("-c", "--config", help="hypercorn's config: TOML, python:module or file:path.py")
    parser.add_argument("-k", "--worker-class", choices=("uvloop", "asyncio"), default="uvloop")
    parser.add_argument("--keep-alive", type=float, help="seconds an idle kept connection stays open")
    parser.add_argument("--access-logfile", help="`-` for stdout")
    parser.add_argument("--log-level")
    parser.add_argument("--stop-idle", type=float, default=IDLE_CLOSE,
                        help="stopping: seconds without a request before the idle connections are closed")
    return parser.parse_args(argv)


async def run(args: argparse.Namespace) -> None:
    config = load_config(args.config)
    listeners = inherited_listeners()
    if not listeners:
        raise StartError("no listeners: run under supervisord (LISTEN_FDS)")
    # hypercorn calls listen() again with its backlog (100 by default): keep the group's.
    config.backlog = kept_backlog(listeners[0][1], backlog_override())
    # hypercorn makes its own socket objects of these fds: ours must not close them too.
    config.bind = [f"fd://{sock.detach()}" for _name, sock in listeners]
    config.insecure_bind = []
    if args.keep_alive is not None:
        config.keep_alive_timeout = args.keep_alive
    if args.access_logfile is not None:
        config.accesslog = args.access_logfile
    if args.log_level is not None:
        config.loglevel = args.log_level
    stop = Stop(load_app(args.application), config, args.stop_idle)
    await serve(stop, config, shutdown_trigger=stop.trigger, mode="asgi")  # type: ignore[arg-type]


def main(argv: list[str] | None = None) -> int:
    args = parse(sys.argv[1:] if argv is None else argv)
    try:
        if args.worker_class == "uvloop":
            uvloop.run(run(args))
        else:
            asyncio.run(run(args))
    except StartError as exc:
        print(f"{PROG}: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
