"""A runner that hangs before its first test (a conftest.py that blocks at import on the worker,
as one opening a device that never answers would): the run still ends, each test failed once
by name with what happened and how to fix it, and no process of the run is left behind."""

from __future__ import annotations

import os

from pytest_celery_dispatch.driver import fork_wait_limit, start_hang, start_wait_limit
from tests.e2e.test_slow_collection import alive, attempts

#: The run's --celery-timeout: short, so the runners' start is bounded by the floor.
TIMEOUT = 2.0
TESTS = 4


def hung_conftest(pytester, log) -> None:
    """A conftest whose import, on a worker only, appends the pid and process group of the
    process importing it (the zygote, a runner) to ``log``, then blocks for good."""
    pytester.makeconftest(
        f"""
        import os
        import time

        if "DISPATCH_WORKER_ID" in os.environ:  # on a worker, not in the controller
            with open({str(log)!r}, "a") as fh:
                fh.write(f"{{os.getpid()}} {{os.getpgid(0)}}\\n")
            time.sleep(10**6)
        """
    )


def group_members(pgid: int) -> list[int]:
    """The live processes of a process group."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit() and alive(int(entry)):
            try:
                with open(f"/proc/{entry}/stat") as fh:
                    fields = fh.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[2]) == pgid:
                found.append(int(entry))
    return found


def test_a_conftest_that_hangs_on_the_worker_fails_each_test_once_and_the_run_ends(
    pytester, worker_factory, run_dispatched
):
    worker = worker_factory(worker_id="worker-hung", concurrency=2)
    log = pytester.path / "hung.log"
    hung_conftest(pytester, log)
    pytester.makepyfile(
        test_bench=f"""
        import pytest

        @pytest.mark.queue({worker.queue!r})
        @pytest.mark.parametrize("n", range({TESTS}))
        def test_n(n):
            pass
        """
    )
    # A slot waits for the zygote's fork (hung too) at most fork_wait_limit, then for its own
    # runner's first test at most start_wait_limit; the rest is a generous margin.
    worst = fork_wait_limit(TIMEOUT) + start_wait_limit(TIMEOUT)
    run = run_dispatched(
        "--celery-ship=off", f"--celery-timeout={TIMEOUT:g}", "-rf", timeout=worst + 120
    )
    limit = start_wait_limit(TIMEOUT)
    why = start_hang(limit, TIMEOUT)
    run.result.assert_outcomes(failed=TESTS)
    for n in range(TESTS):
        # One final outcome each in the terminal: one line in the short summary, one failure
        # that names the test, the worker, what happened and how to fix it.
        failed = [line for line in run.result.outlines if line.startswith("FAILED ")]
        assert len([line for line in failed if f"::test_n[{n}] " in line]) == 1, failed
        # The failure section's header line; the short summary repeats the message, cut to the
        # terminal's width except on CI (pytest's running_on_ci), so it is left out here.
        named = [
            line
            for line in run.result.outlines
            if not line.startswith("FAILED ")
            and f"test_n[{n}] crashed on worker-hung" in line
            and why in line
        ]
        assert len(named) == 1, run.result.outlines
    report = run.report
    assert len(report["tests"]) == TESTS
    for test in report["tests"]:
        assert test["outcome"] == "failed", test
        assert why in test["call"]["longrepr"], test["call"]["longrepr"]
        # Where it hung: the conftest's sleep (line 7), from the runner's stacks before the kill.
        where = test["call"]["longrepr"].split("--- where the test process was when it was killed")
        assert len(where) == 2, test["call"]["longrepr"]
        assert 'conftest.py", line 7 in <module>' in where[1], where[1]
    assert set(attempts(report).values()) == {1}  # nothing counted lost and sent again
    # Every process that imported the conftest on the worker (the zygote, the slots' own
    # runners) was killed with its process group.
    started = [tuple(map(int, line.split())) for line in log.read_text().splitlines()]
    assert started
    for pid, pgid in started:
        assert not alive(pid), pid
        assert group_members(pgid) == [], (pid, pgid)
