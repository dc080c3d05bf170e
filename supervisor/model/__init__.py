"""The records that decide: programs, generations, slots, restarts, plans, reloads and rolls.

They take facts (a worker is ready, one exited, a timer fired) and return decisions as values; the
daemon applies them. Nothing here opens a socket or waits.
"""
