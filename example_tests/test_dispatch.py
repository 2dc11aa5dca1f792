"""The documented run of the original demo: task_a on queue_a and task_b on queue_b, at once.

Runs in the controller (no queue marker): it sends the two tasks itself through the
``dispatcher`` fixture, which reports each task's states live (SENT, PENDING, STARTED on which
worker, SUCCESS), then the original's sections (execution results, detailed results, performance
metrics), and keeps the run for the JSON report. The durations are the original's (0.5 s and
0.7 s), so the numbers compare: the run takes about as long as task_b. Without a broker or a
worker on each queue it skips (plain run) or fails (``--celery-dispatch`` run) with the reason.
"""

TASK_A = "pytest_celery_dispatch.task_a"
TASK_B = "pytest_celery_dispatch.task_b"


def test_task_a_and_task_b_run_concurrently(dispatcher):
    dispatcher.require("queue_a", "queue_b")

    a, b = dispatcher.gather(
        [(TASK_A, "queue_a", {"duration": 0.5}), (TASK_B, "queue_b", {"duration": 0.7})],
        timeout=30,
    )

    assert (a.message, a.queue) == ("Hello from Task A", "queue_a")
    assert "worker-a" in a.worker
    assert (b.message, b.queue) == ("Hello from Task B", "queue_b")
    assert "worker-b" in b.worker
    for res, duration in ((a, 0.5), (b, 0.7)):
        assert res.result["task_id"] == res.task_id
        assert res.execution_time >= duration
        assert res.timestamp
    # Both ran at the same time, on two workers: their execution windows overlap.
    assert a.result["started_at"] < b.result["finished_at"]
    assert b.result["started_at"] < a.result["finished_at"]
