"""The controller's end (DispatchSession._shutdown): what it waits for, in which order."""

from __future__ import annotations

from types import SimpleNamespace

from pytest_celery_dispatch.session import DispatchSession


class Recorder:
    def __init__(self, calls, name):
        self.calls, self.name = calls, name

    def __getattr__(self, attr):
        return lambda *args, **kwargs: self.calls.append((self.name, attr, kwargs))


def test_the_reply_consumer_is_told_to_stop_before_the_line_is_told_the_run_is_gone():
    """Each waits up to its thread's next turn (the consumer's drain, the board's send): told
    together, the two waits overlap instead of adding up at the end of every run."""
    calls = []
    session = DispatchSession.__new__(DispatchSession)
    session.turns = Recorder(calls, "turns")
    session._consumer = Recorder(calls, "consumer")
    session._broker = None
    session._local_workers = None
    session._session = None
    session.interrupted = False
    session.terminal = SimpleNamespace(write_line=print)
    session.replayer = SimpleNamespace(
        check_invariant=lambda write: None, event_log=SimpleNamespace(close=lambda: None)
    )
    session._shutdown()
    assert calls[:2] == [("consumer", "stop", {"timeout": 0}), ("turns", "close", {})]
    assert ("consumer", "stop", {}) in calls[2:]  # and joined after
