"""A stand-in for a large read-only model or cache that a worker loads at import (`MODEL_MIB`, default 64).

Imported by `bench.model_server`, and listed in `preload:` by the memory benchmark: forked workers
then share its pages with their template (copy-on-write) instead of each holding a copy.
"""

import os

MODEL = b"\x01" * (int(os.environ.get("MODEL_MIB", "64")) << 20)  # every page written: resident
