"""The master's memory: what it has freed given back to the system, what it keeps for good set apart.

glibc keeps what Python frees in its heap for later mallocs: after a start (the config's YAML tree,
the imports' buffers) or a generation's end (its records), about 1 MiB of the master's resident
memory was free heap (bench: "master RSS"). malloc_trim(0) returns its free pages; it takes
0.02-0.3 ms, and the master calls it only then, after its answer.
"""

from __future__ import annotations

import ctypes
import gc

# The C library the interpreter runs on, through the process's own symbols (dlopen(NULL)); None where
# it has no malloc_trim (musl): nothing to give back then.
_trim = getattr(ctypes.CDLL(None), "malloc_trim", None)


def release() -> None:
    """Give the free pages of the C heap back to the system (glibc)."""
    if _trim is not None:
        _trim(0)


def freeze() -> None:
    """Everything the master has made so far (its modules, functions, classes: a few hundred thousand
    objects, nearly all kept for good) is left out of the garbage collector's passes from now on.
    A full pass over them took 120 ms, all at once in the master's loop, while the metrics endpoint
    was flooded (asyncio's objects make cyclic garbage, so the collector runs). Called once the
    master serves: its first commit, or its adoption after an upgrade."""
    gc.collect()
    gc.freeze()
