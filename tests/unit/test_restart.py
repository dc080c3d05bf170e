"""Restart decisions are pure: crash times in, delay or FATAL out."""

from __future__ import annotations

from supervisor.model.restart import MAX_DELAY, STABLE_AFTER, CrashHistory, Fatal, Restart


class TestCrashHistory:
    def test_backoff_doubles_for_a_worker_crashing_in_a_row(self) -> None:
        """0.1, 0.2, 0.4 ... seconds, capped at MAX_DELAY."""
        history = CrashHistory(limit=100, window=1000)
        restarts, delays = 0, []
        for t in range(12):
            decision = history.record(now=float(t), ran=0.5, restarts=restarts)
            assert isinstance(decision, Restart)
            restarts = decision.restarts
            delays.append(decision.after)
        assert delays[:4] == [0.1, 0.2, 0.4, 0.8] and delays[-1] == MAX_DELAY

    def test_a_stable_worker_restarts_at_once(self) -> None:
        """A worker that ran long enough before crashing starts its backoff over."""
        decision = CrashHistory(limit=5, window=60).record(now=100.0, ran=STABLE_AFTER, restarts=7)
        assert decision == Restart(after=0.0, restarts=0, crashes=1)

    def test_too_many_crashes_in_the_window_is_fatal(self) -> None:
        """The limit-th crash within the window says FATAL."""
        history = CrashHistory(limit=3, window=10)
        assert isinstance(history.record(0.0, 1.0, 0), Restart)
        assert isinstance(history.record(5.0, 1.0, 0), Restart)
        assert history.record(9.0, 1.0, 0) == Fatal("3 crashes within 10 s", 3)

    def test_old_crashes_leave_the_window(self) -> None:
        """Crashes older than the window do not count."""
        history = CrashHistory(limit=3, window=10)
        history.record(0.0, 1.0, 0)
        history.record(1.0, 1.0, 0)
        assert history.record(11.5, 1.0, 0).crashes == 1
