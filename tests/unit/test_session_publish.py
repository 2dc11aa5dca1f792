"""The controller sends chunks (DispatchSession.execute): what it asks of the broker."""

from __future__ import annotations

from types import SimpleNamespace

from pytest_celery_dispatch.names import work_queue_name
from pytest_celery_dispatch.session import DispatchSession
from pytest_celery_dispatch.work import Publish


def _publishing_session(calls, fail_publishes=0):
    failures = [fail_publishes]

    class Broker:
        def declare_work_queue(self, name):
            calls.append(("declare", name))

        def publish_work(self, name, message):
            if failures[0] > 0:
                failures[0] -= 1
                raise ConnectionError("connection reset")
            calls.append(("publish", name, message["batch_id"]))

    session = DispatchSession.__new__(DispatchSession)
    session.run_id = "r1"
    session._broker = Broker()
    session.scheduler = SimpleNamespace(
        sent=lambda chunk: None, send_failed=lambda chunk, error: calls.append(("failed",)) or []
    )
    session.replayer = SimpleNamespace(sent=lambda nodeids, queue, attempt: None)
    return session


def _chunk(batch_id, queue):
    return SimpleNamespace(batch_id=batch_id, queue=queue, attempt=1, nodeids=[f"t_{batch_id}"])


def test_a_batch_of_chunks_declares_each_work_queue_once():
    """A run's start publishes a queue's chunks in one batch: one declare per work queue (a
    round trip each), not one per chunk; the next batch declares again."""
    calls = []
    session = _publishing_session(calls)
    batch = [Publish(_chunk(f"c{i}", "queue_a" if i < 3 else "queue_b")) for i in range(5)]
    session.execute(batch)
    a, b = work_queue_name("r1", "queue_a"), work_queue_name("r1", "queue_b")
    assert calls == [
        ("declare", a),
        ("publish", a, "c0"),
        ("publish", a, "c1"),
        ("publish", a, "c2"),
        ("declare", b),
        ("publish", b, "c3"),
        ("publish", b, "c4"),
    ]
    calls.clear()
    session.execute([Publish(_chunk("c5", "queue_a"))])
    assert calls == [("declare", a), ("publish", a, "c5")]


def test_a_failed_publish_declares_the_work_queue_again_before_the_next_chunk():
    calls = []
    session = _publishing_session(calls, fail_publishes=1)
    session.execute([Publish(_chunk("c0", "queue_a")), Publish(_chunk("c1", "queue_a"))])
    a = work_queue_name("r1", "queue_a")
    assert calls == [("declare", a), ("failed",), ("declare", a), ("publish", a, "c1")]
