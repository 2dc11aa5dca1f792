"""The documented run (task_a and task_b at once, through the ``dispatcher`` fixture) while the
same run dispatches tests to the same workers: its live lines, its sections, its JSON record,
and its total close to its slower task.

The bound on ``total - slower task`` comes from the mechanism, not from the machine's speed.
Every slot of the run holds a pool process for as long as its tests run, and each slot here
runs tests of ``HOLD`` seconds. A task that has to wait for a slot's process (no process kept
beside the slots) waits at least until that slot ends: one ``HOLD`` or more late. A task with a
process of its own only waits for message hops and the handover to that process: milliseconds,
a few hundred on a very busy machine. ``HOLD / 2`` lies between the two by a wide margin on
either side, and it scales with ``HOLD``, not with the machine.
"""

from __future__ import annotations

import pytest

HOLD = 3.0  # seconds each dispatched test holds its slot's process
TESTS_PER_QUEUE = 4  # two per slot of a -c 2 worker: every slot is busy for 2 * HOLD
BOUND = HOLD / 2


@pytest.mark.usefixtures("workers")
def test_the_documented_run_is_as_long_as_its_slower_task_beside_a_dispatched_run(
    pytester, queues, run_dispatched
):
    pytester.makepyfile(
        test_bench=queues.render(
            f"""
            import time
            import pytest

            @pytest.mark.queue("QUEUE_A")
            @pytest.mark.parametrize("n", range({TESTS_PER_QUEUE}))
            def test_on_a(n):
                time.sleep({HOLD})

            @pytest.mark.queue("QUEUE_B")
            @pytest.mark.parametrize("n", range({TESTS_PER_QUEUE}))
            def test_on_b(n):
                time.sleep({HOLD})
            """
        ),
        test_docrun=queues.render(
            """
            A, B = "pytest_celery_dispatch.task_a", "pytest_celery_dispatch.task_b"

            def test_documented_run(dispatcher):
                dispatcher.require("QUEUE_A", "QUEUE_B")
                a, b = dispatcher.gather(
                    [(A, "QUEUE_A", {"duration": 0.5}), (B, "QUEUE_B", {"duration": 0.7})],
                    timeout=60,
                )
                assert (a.message, a.worker) == ("Hello from Task A", "worker-a")
                assert (b.message, b.worker) == ("Hello from Task B", "worker-b")
            """
        ),
    )
    run = run_dispatched("-v", timeout=180)
    run.result.assert_outcomes(passed=1 + 2 * TESTS_PER_QUEUE)
    # Live (without -s), before the test's own PASSED, in the original's order.
    run.result.stdout.fnmatch_lines(
        [
            "*test_docrun.py::test_documented_run*",
            "-*dispatcher: test_documented_run*-",
            "[[]*[]] SENT     task_a -> *-a (task *)",
            "[[]*[]] SENT     task_b -> *-b (task *)",
            "[[]*[]] PENDING  task_a task *",
            "[[]*[]] STARTED  task_? on worker-?-*",
            "[[]*[]] SUCCESS  task_a from worker-a via *-a: Completed in 0.5*s (round trip *",
            "[[]*[]] SUCCESS  task_b from worker-b via *-b: Completed in 0.7*s (round trip *",
            "Execution results",
            "  total time *s: 2 succeeded, 0 failed",
            "Detailed results",
            "  task * message * worker * queue * task id * execution time * timestamp",
            "  task_a * Hello from Task A * worker-a *-a *-*-*-*-* 0.5*s *T*",
            "  task_b * Hello from Task B * worker-b *-b *-*-*-*-* 0.7*s *T*",
            "Performance metrics",
            "  average 0.6*s, fastest 0.5*s (task_a), slowest 0.7*s (task_b)",
            "  total time *s = slowest task + *ms",
            f"Results saved to: {run.report_path}*",
            "*PASSED*",
        ]
    )

    report = run.report  # validated against the schema
    tests = {t["nodeid"].rsplit("::", 1)[-1]: t for t in report["tests"]}
    (record,) = tests["test_documented_run"]["dispatcher"]
    assert (record["successes"], record["failures"]) == (2, 0)
    by_name = {t["name"].rsplit(".", 1)[-1]: t for t in record["tasks"]}
    for name, worker, queue, duration in (
        ("task_a", "worker-a", queues.a, 0.5),
        ("task_b", "worker-b", queues.b, 0.7),
    ):
        task = by_name[name]
        assert (task["worker"], task["queue"], task["state"]) == (worker, queue, "SUCCESS")
        assert task["message"] == f"Hello from Task {name[-1].upper()}"
        assert task["execution_time"] >= duration
        assert task["timestamp"]
        assert task["task_id"]
        assert task["sent"] <= task["started"] <= task["received"]
    slower = record["metrics"]["slowest"]
    assert record["total_time"] - slower == pytest.approx(record["overhead"], abs=1e-3)
    assert record["overhead"] < BOUND, (
        f"the documented run took {record['total_time']:.3f}s for a {slower:.3f}s task: "
        f"a task waited for a slot's process (bound {BOUND:g}s = HOLD / 2)"
    )
    # And the run's slots were busy on both workers for at least HOLD after the documented
    # run was sent (otherwise its tasks had the workers to themselves and this proves nothing).
    for queue in (queues.a, queues.b):
        ends = [
            t["dispatch"]["finished"] for t in report["tests"] if t["dispatch"]["queue"] == queue
        ]
        assert max(ends) > record["sent"] + HOLD, (queue, ends, record["sent"])
