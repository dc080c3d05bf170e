"""Benchmarks: failed connections per reload, reload latency and cost, side by side with nginx and gunicorn.

`make bench` (or `python -m bench`, as root) runs every scenario in a private network namespace of
its own and prints JSON lines plus a table; see `python -m bench --help` and docs/benchmarks.md.
"""
