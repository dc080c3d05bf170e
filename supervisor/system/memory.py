"""Memory the master has freed, given back to the system.

glibc keeps what Python frees in its heap for later mallocs: after a start (the config's YAML tree,
the imports' buffers) or a generation's end (its records), about 1 MiB of the master's resident
memory was free heap (bench: "master RSS"). malloc_trim(0) returns its free pages; it takes
0.02-0.3 ms, and the master calls it only then, after its answer.
"""

from __future__ import annotations

import ctypes

# The C library the interpreter runs on, through the process's own symbols (dlopen(NULL)); None where
# it has no malloc_trim (musl): nothing to give back then.
_trim = getattr(ctypes.CDLL(None), "malloc_trim", None)


def release() -> None:
    """Give the free pages of the C heap back to the system (glibc)."""
    if _trim is not None:
        _trim(0)
