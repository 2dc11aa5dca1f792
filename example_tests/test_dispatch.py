"""The documented run of the original demo: task_a on queue_a and task_b on queue_b, at once.

Runs in the controller (no queue marker): it sends the two tasks itself through the
``dispatcher`` fixture and checks who answered, through which queue, and that the two
executions overlapped in time. Without a broker or a worker on each queue it skips (plain
run) or fails (``--celery-dispatch`` run) with the reason.
"""

TASK_A = "pytest_celery_dispatch.task_a"
TASK_B = "pytest_celery_dispatch.task_b"


def test_task_a_and_task_b_run_concurrently(dispatcher):
    dispatcher.require("queue_a", "queue_b")

    a, b = dispatcher.gather(
        [(TASK_A, "queue_a", {"duration": 1.0}), (TASK_B, "queue_b", {"duration": 1.0})],
        timeout=30,
    )

    for res in (a, b):
        print(
            f"{res.name}: {res.result['message']!r} from {res.result['worker']} via "
            f"{res.result['queue']} in {res.result['execution_time']:.3f}s "
            f"(round trip {res.round_trip:.3f}s, task {res.task_id})"
        )
    assert a.result["message"] == "Hello from Task A"
    assert a.result["queue"] == "queue_a"
    assert "worker-a" in a.result["worker"]
    assert b.result["message"] == "Hello from Task B"
    assert b.result["queue"] == "queue_b"
    assert "worker-b" in b.result["worker"]
    for res in (a, b):
        assert res.result["task_id"] == res.task_id
        assert res.result["execution_time"] >= 1.0
        assert res.result["timestamp"]
    # Both ran at the same time, on two workers: their execution windows overlap.
    assert a.result["started_at"] < b.result["finished_at"]
    assert b.result["started_at"] < a.result["finished_at"]
