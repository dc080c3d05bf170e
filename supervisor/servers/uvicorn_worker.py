"""gunicorn's uvicorn worker class with the stop contract: `gunicorn --worker-class
supervisor.servers.uvicorn_worker.UvicornWorker APP`.

uvicorn-worker's class (the `uvicorn-worker` package) runs uvicorn inside each gunicorn worker, with
uvicorn's own stop: the next request of every idle keep-alive connection is lost at a reload (see
supervisor.servers.uvicorn). This subclass only swaps uvicorn's HTTP protocol for the runner's
(through `CONFIG_KWARGS`, the class attribute uvicorn-worker documents for this) and bounds uvicorn's
wait for its connections by 0.9 x gunicorn's `--graceful-timeout`, before the arbiter kills it. uvicorn
calls listen() again on the inherited socket with gunicorn's `--backlog` (2048 unless set): the class
gives it the group's backlog instead (SUPERVISOR_BACKLOG, or the socket's own).
Tested with uvicorn-worker 0.4 and gunicorn 27.
"""

from __future__ import annotations

from typing import Any

import uvicorn_worker  # type: ignore[import-untyped]

from supervisor.servers.activation import backlog_override, kept_backlog
from supervisor.servers.stopping import finish_within
from supervisor.servers.uvicorn import StoppingH11Protocol


class UvicornWorker(uvicorn_worker.UvicornWorker):
    CONFIG_KWARGS = {"loop": "auto", "http": StoppingH11Protocol}

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.config.timeout_graceful_shutdown = finish_within(self.cfg.graceful_timeout)
        # listen() on a listening socket replaces its backlog: keep the one supervisord gave the whole group
        self.config.backlog = kept_backlog(self.sockets[0], backlog_override())
