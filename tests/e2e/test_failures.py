"""End to end: results that never come back, and tests that take their process down."""

from __future__ import annotations

import signal
import uuid

import pytest

from tests.helpers import WorkerProcess, delete_queues


@pytest.fixture
def frozen_worker(workspace):
    """A worker on a private queue, frozen with SIGSTOP: it holds its connection (so the
    queue still shows a consumer) but never starts, acks or reports anything."""
    queue = f"cdtest-frozen-{uuid.uuid4().hex[:8]}"
    worker = WorkerProcess(queue, "worker-frozen", workspace, workspace, concurrency=1).start()
    worker.signal(signal.SIGSTOP)
    try:
        yield worker
    finally:
        worker.stop()  # SIGCONT, then SIGTERM: the stale batches find their run gone
        delete_queues(queue)


def test_a_result_that_never_comes_back_fails_after_the_deadline(
    pytester, frozen_worker, run_dispatched
):
    pytester.makepyfile(
        test_frozen=f"""
            import pytest

            @pytest.mark.queue("{frozen_worker.queue}")
            def test_never_answered():
                pass
            """
    )
    run = run_dispatched("--celery-timeout=1", "--celery-retries=1", timeout=90)
    assert run.result.ret == 1
    run.result.assert_outcomes(failed=1)
    run.result.stdout.fnmatch_lines(
        [
            "*queue cdtest-frozen-*: not taken from the queue within 3s; re-dispatching 1 test(s)"
            " in 1s (attempt 2 of 2)",
            "*no worker of queue cdtest-frozen-* started *test_never_answered after 2 attempts*",
        ]
    )
    test = run.report["tests"][0]
    assert test["outcome"] == "failed"
    assert test["dispatch"]["attempts"] == 2
    assert "after 2 attempts" in test["dispatch"]["infrastructure_error"]
