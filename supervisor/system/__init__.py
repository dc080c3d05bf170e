"""The kernel and systemd edge: listening sockets and their steering, the migration sysctl, the subreaper
and orphans, file descriptor limits, accounts, the sd_notify sockets, systemd's fd store, watched files."""
