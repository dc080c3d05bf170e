"""The WSGI app gunicorn serves in the tests and the benchmark: like the demo's `GET /`, a JSON body naming the
worker's pid (and, under the supervisor, its generation)."""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable
from typing import Any


def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
    body = json.dumps({"generation": int(os.environ.get("SUPERVISOR_GENERATION", "0")), "pid": os.getpid()}).encode()
    start_response("200 OK", [("Content-Type", "application/json"), ("Content-Length", str(len(body)))])
    return [body]
