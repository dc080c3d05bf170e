"""The demo app with `bench.bigmodel` loaded first: `python -m bench.model_server` (the memory benchmark's worker)."""

import sys

from bench import bigmodel  # noqa: F401 - the point: a worker that holds the model
from supervisor import demo

if __name__ == "__main__":
    sys.exit(demo.main([]))
