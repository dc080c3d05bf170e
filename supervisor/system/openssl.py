"""The master without OpenSSL: about 7 MiB of its resident memory (bench: "master RSS").

supervisord never speaks TLS: its workers load their certificates, and it checks them with
`cryptography` (config/tls.py). Yet `import asyncio` imports `ssl` for loop.create_server(ssl=...),
which maps OpenSSL's libssl and libcrypto and builds their tables, and hashlib maps libcrypto for
its sha256. So the master imports asyncio with `ssl` marked missing, as on a Python built without
it (asyncio's own fallback: its TLS calls would raise), and hashes with the sha256 CPython builds in.
`ssl` stays importable afterwards: prometheus_client imports it for a server the master does not use.
"""

from __future__ import annotations

import importlib
import sys
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from collections.abc import Callable
    from typing import Any


def import_without_ssl(*names: str) -> None:
    """Import `names` (asyncio, and what imports it) with `ssl` missing, unless ssl or asyncio is loaded
    already (a test's process: they are what they are there)."""
    if "ssl" in sys.modules or "asyncio" in sys.modules:
        return
    sys.modules["ssl"] = None  # type: ignore[assignment]  # the import system's "not available"
    try:
        for name in names:
            importlib.import_module(name)
    finally:
        del sys.modules["ssl"]


def _builtin_sha256() -> Callable[[bytes], Any]:
    """CPython's own sha256 (`_sha256` up to 3.11, `_sha2` since 3.12); hashlib's where neither is built."""
    for module in ("_sha256", "_sha2"):
        try:
            return importlib.import_module(module).sha256
        except (ImportError, AttributeError):
            pass
    import hashlib

    return hashlib.sha256


_SHA256 = _builtin_sha256()


def sha256(data: bytes) -> str:
    """The SHA-256 of `data`, in hex, as hashlib.sha256(data).hexdigest()."""
    return str(_SHA256(data).hexdigest())
