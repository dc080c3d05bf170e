"""reuseport-supervisor: zero-loss graceful reloads through SO_REUSEPORT and kernel socket migration."""

__version__ = "0.1.0"
