"""The control protocol between `supervisorctl` and the daemon: its framing, its typed requests, and replies."""
