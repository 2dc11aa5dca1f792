"""A suite whose collection is slow: the slots of a worker wait for the run's zygote inside their
loops (heartbeats going on) and share its one collection; a zygote that goes away or a broken
collection still gives each test exactly one outcome; a run dropped while its slots wait leaves
nothing behind."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import pytest

from pytest_celery_dispatch.driver import FORK_WAIT_MIN
from pytest_celery_dispatch.liveness import BENCH_RELEASE_LIMIT
from pytest_celery_dispatch.names import ENV_ZYGOTE_HOME
from pytest_celery_dispatch.retry import SILENCE_LIMIT
from pytest_celery_dispatch.zygote import PREWARMED, ZYGOTE_FIRST_WAIT, ZYGOTE_START_WAIT
from tests.e2e.test_warm_runners import runner_gate, session_summaries, wait_for

#: Longer than a slot once waited for its fork (it then collected again on its own) and than
#: the controller's patience with a silent slot (its chunks would be sent again).
SLOW = max(ZYGOTE_START_WAIT + FORK_WAIT_MIN, SILENCE_LIMIT) + 2


def slow_conftest(
    pytester, log: Path, sleep: float, *, first_only=False, fail=False, only_on: str = ""
):
    """A conftest whose import, on a worker only, appends the collecting process's pid and a
    zygote's folder ("-" in a runner) to ``log`` and sleeps ``sleep`` s (``first_only``: only
    in the first process to collect; ``only_on``: only on the worker of that id), then raises
    if ``fail``."""
    pytester.makeconftest(
        f"""
        import os
        import time

        worker = os.environ.get("DISPATCH_WORKER_ID")  # on a worker, not in the controller
        if worker and {only_on!r} in ("", worker):
            first = not os.path.exists({str(log)!r})
            home = os.environ.get({ENV_ZYGOTE_HOME!r}, "-")
            with open({str(log)!r}, "a") as fh:
                fh.write(f"{{os.getpid()}} {{home}}\\n")
            if first or not {first_only!r}:
                time.sleep({sleep!r})
            if {fail!r}:
                raise RuntimeError("this bench cannot load the conftest")
        """
    )


def collectors(log: Path) -> list[int]:
    return [int(line.split()[0]) for line in log.read_text().splitlines()] if log.exists() else []


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def attempts(report: dict) -> dict[str, int]:
    return {t["nodeid"]: t["dispatch"]["attempts"] for t in report["tests"]}


def test_a_slow_collection_is_collected_once_per_worker_and_shared_by_its_slots(
    pytester, worker_factory, run_dispatched
):
    worker = worker_factory(worker_id="worker-slow", concurrency=2)
    log = pytester.path / "collect.log"
    runs = pytester.path / "runs.log"
    slow_conftest(pytester, log, SLOW)
    pytester.makepyfile(
        test_shared=f"""
        import pytest
        import runner_gate

        @pytest.mark.queue({worker.queue!r})
        @pytest.mark.parametrize("n", range(6))
        def test_slot(n):
            runner_gate.record_and_wait()
        """
    )
    runner_gate(pytester, runs)
    run = run_dispatched("--celery-ship=off", timeout=SLOW + 120)
    run.result.assert_outcomes(passed=6)
    runners = {int(p) for p in runs.read_text().split()}
    assert len(runners) == 2, runners  # both slots ran tests
    # One process collected (the zygote): both slots waited for it past the wait they once had
    # and got their runners forked from it; it ran no test itself.
    assert len(collectors(log)) == 1, collectors(log)
    assert not runners & set(collectors(log))
    # Their heartbeats went on while they waited: nothing was counted lost and sent again.
    assert set(attempts(run.report).values()) == {1}, attempts(run.report)
    wait_for(lambda: len(session_summaries(worker)) == 2, "both sessions' log lines")
    for summary in session_summaries(worker):
        assert summary["warm_start"] is True, summary
        assert summary["runner_starts"] == 1, summary


def test_a_zygote_killed_while_its_slot_waits_the_slot_runs_its_own_and_the_tests_pass(
    pytester, worker_factory, controller
):
    worker = worker_factory(worker_id="worker-zkill", concurrency=1)
    log = pytester.path / "collect.log"
    slow_conftest(pytester, log, 10 * SLOW, first_only=True)  # the zygote: until killed
    pytester.makepyfile(
        test_three=f"""
        import pytest

        @pytest.mark.queue({worker.queue!r})
        @pytest.mark.parametrize("n", range(3))
        def test_n(n):
            pass
        """
    )
    ctl = controller("--celery-ship=off")
    wait_for(lambda: len(collectors(log)) == 1, "the zygote collecting")
    # Past the wait a slot once had for its fork: still waiting, no collection of its own.
    time.sleep(ZYGOTE_START_WAIT + FORK_WAIT_MIN)
    (zygote,) = collectors(log)
    assert len(collectors(log)) == 1
    os.kill(zygote, signal.SIGKILL)
    assert ctl.wait(SLOW + 120) == 0, ctl.text()
    report = json.loads(ctl.report.read_text())
    assert report["summary"]["passed"] == 3, report["summary"]
    assert set(attempts(report).values()) == {1}  # the slot was heard all along
    assert len(collectors(log)) == 2  # the slot's own runner, after the zygote was killed
    assert log.read_text().splitlines()[1].split()[1] == "-"  # a runner's, not a zygote's
    wait_for(lambda: len(session_summaries(worker)) == 1, "the session's log line")
    (summary,) = session_summaries(worker)
    assert summary["runner_starts"] == 2, summary


@pytest.mark.parametrize("broken", ["module", "conftest"])
def test_a_broken_slow_collection_gives_the_outcomes_it_gives_without_the_zygote(
    pytester, worker_factory, run_dispatched, broken
):
    forked = worker_factory(worker_id="worker-bf", concurrency=1)
    own = worker_factory(worker_id="worker-bo", extra_env={"DISPATCH_FORK_RUNNERS": "0"})
    log = pytester.path / "collect.log"
    slow_conftest(pytester, log, SLOW, fail=broken == "conftest")
    pytester.makepyfile(test_ok="def test_one():\n    pass\n\ndef test_two():\n    pass\n")
    pytester.makepyfile(
        test_broken="""
        import os

        if "DISPATCH_WORKER_ID" in os.environ:
            raise ImportError("this bench lacks a module")

        def test_three():
            pass
        """
    )
    outcomes = []
    for worker in (forked, own):
        run = run_dispatched(
            "--celery-ship=off", f"--celery-default-queue={worker.queue}", timeout=3 * SLOW + 120
        )
        nodeids = [t["nodeid"] for t in run.report["tests"]]
        assert len(nodeids) == len(set(nodeids)) == 3, nodeids  # one final outcome each
        outcomes.append(run.outcomes_by_nodeid())
    assert outcomes[0] == outcomes[1]
    if broken == "module":
        assert outcomes[0]["test_ok.py::test_one"] == "passed", outcomes[0]
        assert outcomes[0]["test_broken.py::test_three"] != "passed", outcomes[0]
    else:
        assert "passed" not in outcomes[0].values(), outcomes[0]


def sessions_started(worker) -> int:
    return sum('"session started"' in line for line in worker.log_path.read_text().splitlines())


@pytest.mark.parametrize("zygote", ["prewarmed", "the slot's own"])
@pytest.mark.parametrize("how", ["ctrl-c", "-x"])
def test_a_run_stopped_while_its_slot_waits_for_the_zygote_leaves_nothing_behind(
    pytester, worker_factory, controller, how, zygote
):
    """Ctrl-C of the controller (the run is dropped), or -x after a test failed on another
    worker (the run stops): the waiting slot gives its request up and ends, and kills the
    zygote it waited for, whether it started it or a prewarm did (no slot started that one)."""
    prewarm = "1" if zygote == "prewarmed" else "0"
    worker = worker_factory(
        worker_id="worker-zint", concurrency=1, extra_env={"DISPATCH_PREWARM": prewarm}
    )
    log = pytester.path / "collect.log"
    slow_conftest(pytester, log, 10 * SLOW, only_on="worker-zint")
    pytester.makepyfile(
        test_one=f"""
        import pytest

        @pytest.mark.queue({worker.queue!r})
        def test_one():
            pass
        """
    )
    args = ["--celery-ship=off"]
    if how == "-x":
        other = worker_factory(worker_id="worker-zfail", concurrency=1)
        pytester.makepyfile(
            test_fail=f"""
            import os
            import time
            import pytest

            def waiting():
                if not os.path.exists({str(log)!r}):
                    return False  # the zygote does not collect yet
                with open({str(worker.log_path)!r}) as fh:
                    return '"session started"' in fh.read()  # the slot waits for it

            @pytest.mark.queue({other.queue!r})
            def test_fails_once_the_slot_waits_for_the_collecting_zygote():
                deadline = time.monotonic() + {ZYGOTE_FIRST_WAIT}
                while not waiting() and time.monotonic() < deadline:
                    time.sleep(0.05)
                assert False, "planned failure"
            """
        )
        args.append("-x")
    ctl = controller(*args)
    wait_for(lambda: len(collectors(log)) == 1, "the zygote collecting")
    wait_for(lambda: sessions_started(worker) == 1, "the slot waiting for it")
    (pid,) = collectors(log)
    home = log.read_text().split()[1]
    assert os.path.isdir(home), home
    assert os.path.exists(os.path.join(home, PREWARMED)) == (zygote == "prewarmed")
    if how == "ctrl-c":
        ctl.proc.send_signal(signal.SIGINT)
        assert ctl.wait(30) == 2, ctl.text()  # pytest's "interrupted"
    else:
        assert ctl.wait(30) == 1, ctl.text()
        assert "stopping after 1 failures" in ctl.text()
    # The slot drops or stops the run and gives up its request: the zygote that was
    # collecting for it is killed (a runner it forked would die with it) and its folder
    # removed, within the time a dropped run has to free a bench.
    deadline = time.monotonic() + BENCH_RELEASE_LIMIT
    while time.monotonic() < deadline and (alive(pid) or os.path.exists(home)):
        time.sleep(0.2)
    assert not alive(pid)
    assert not os.path.exists(home)
    assert len(collectors(log)) == 1  # no runner of its own was started either
    wait_for(lambda: len(session_summaries(worker)) == 1, "the session's log line")
    (summary,) = session_summaries(worker)
    assert summary["state"] == ("kill" if how == "ctrl-c" else "stop"), summary
    assert summary["chunks"] == 0, summary
