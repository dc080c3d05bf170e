"""A minimal ASGI app for running real uvicorn workers under the supervisor in tests."""

from __future__ import annotations

import json
import os
from typing import Any

ANSWER = json.dumps({"generation": int(os.environ.get("SUPERVISOR_GENERATION", "0")),
                     "worker": int(os.environ.get("SUPERVISOR_WORKER", "0")), "pid": os.getpid()}).encode()


async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    if scope["type"] != "http":
        return
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(ANSWER)).encode())]
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    await send({"type": "http.response.body", "body": ANSWER})
