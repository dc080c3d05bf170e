"""How the daemon's answers and `supervisorctl status` say a count: "1 worker", "2 workers", "1 old worker".

Shared by both sides, so it imports nothing (supervisorctl's start stays fast).
"""

from __future__ import annotations


def plural(count: int, noun: str) -> str:
    """`count` and `noun`, with an s unless there is exactly one: plural(0, "old worker") == "0 old workers"."""
    return f"{count} {noun}{'' if count == 1 else 's'}"
