"""End to end: a real pytest --celery-dispatch subprocess, real celery workers, on RabbitMQ
(and, for the tests that take the `transport` fixture, on the embedded broker too)."""

from __future__ import annotations

import json
import os
import re
import xml.etree.ElementTree as ET

import jsonschema
import pytest

from tests.conftest import SCHEMA

pytestmark = pytest.mark.usefixtures("workers")


def test_routing_sends_each_test_to_its_queue_worker(pytester, queues, run_dispatched, transport):
    pytester.makepyfile(
        test_routing=queues.render(
            """
            import os
            import pytest

            CONTROLLER_PID = None

            @pytest.mark.queue("QUEUE_A")
            def test_on_a():
                assert os.environ["WORKER_ID"] == "worker-a"

            @pytest.mark.queue("QUEUE_B")
            def test_on_b():
                assert os.environ["WORKER_ID"] == "worker-b"

            def test_local(dispatch_context):
                assert "WORKER_ID" not in os.environ or os.environ["WORKER_ID"] != "worker-b"
                assert dispatch_context.dispatched is False

            @pytest.mark.queue("QUEUE_B")
            def test_context_on_b(dispatch_context):
                assert dispatch_context.dispatched
                assert dispatch_context.queue == "QUEUE_B"
                assert dispatch_context.worker == "worker-b"
            """
        )
    )
    run = run_dispatched("-v")
    run.result.assert_outcomes(passed=4)
    assert run.result.ret == 0
    # Lines arrive in completion order; check each on its own.
    run.result.stdout.fnmatch_lines([f"*test_routing.py::test_on_a PASSED ?worker-a/{queues.a}?*"])
    run.result.stdout.fnmatch_lines([f"*test_routing.py::test_on_b PASSED ?worker-b/{queues.b}?*"])
    tests = {t["nodeid"].split("::")[-1]: t for t in run.report["tests"]}
    assert tests["test_on_a"]["dispatch"]["worker"] == "worker-a"
    assert tests["test_on_a"]["dispatch"]["queue"] == queues.a
    assert tests["test_on_b"]["dispatch"]["worker"] == "worker-b"
    assert tests["test_local"]["dispatch"]["worker"] == "local"
    assert tests["test_local"]["dispatch"]["queue"] is None


PARITY_SOURCE = """
import pytest

pytestmark = pytest.mark.queue("QUEUE_A")

@pytest.fixture
def broken_setup():
    raise RuntimeError("setup exploded")

@pytest.fixture
def broken_teardown():
    yield
    raise RuntimeError("teardown exploded")

def test_pass():
    pass

def test_fail():
    assert 1 + 1 == 3

def test_skip():
    pytest.skip("no device attached")

@pytest.mark.xfail(reason="known bug")
def test_xfail():
    assert False

@pytest.mark.xfail(reason="fixed meanwhile")
def test_xpass():
    pass

def test_setup_error(broken_setup):
    pass

def test_teardown_error(broken_teardown):
    pass

@pytest.mark.parametrize("value", ["a::b", "[x]", "ünï cödé", "with space", "x[y]::z"])
def test_ids(value):
    assert value
"""


def junit_cases(path):
    root = ET.parse(path).getroot()
    cases = {}
    for case in root.iter("testcase"):
        kinds = sorted(child.tag for child in case if child.tag != "properties")
        cases[(case.get("classname").split(".")[-1], case.get("name"))] = kinds
    return cases


def test_outcome_parity_with_a_local_run(pytester, queues, run_dispatched, transport):
    pytester.makepyfile(test_parity=queues.render(PARITY_SOURCE))
    local = pytester.runpytest_subprocess(
        "-p", "no:cacheprovider", "-rA", f"--junitxml={pytester.path / 'local.xml'}"
    )
    remote = run_dispatched("-rA", f"--junitxml={pytester.path / 'remote.xml'}")

    # test_teardown_error counts as a pass (its call) and an error (its teardown), as in pytest.
    expected = dict(passed=7, failed=1, skipped=1, xfailed=1, xpassed=1, errors=2)
    local.assert_outcomes(**expected)
    remote.result.assert_outcomes(**expected)
    assert local.ret == remote.result.ret == 1

    def short_summary(result):
        lines = []
        for line in result.outlines:
            if line.split(" ")[0] in {"PASSED", "FAILED", "ERROR", "SKIPPED", "XFAIL", "XPASS"}:
                lines.append(line.replace("test_parity0/", ""))
        return sorted(lines)

    assert short_summary(remote.result) == short_summary(local)
    assert junit_cases(pytester.path / "remote.xml") == junit_cases(pytester.path / "local.xml")

    outcomes = remote.outcomes_by_nodeid()
    assert outcomes["test_parity.py::test_pass"] == "passed"
    assert outcomes["test_parity.py::test_fail"] == "failed"
    assert outcomes["test_parity.py::test_skip"] == "skipped"
    assert outcomes["test_parity.py::test_xfail"] == "xfailed"
    assert outcomes["test_parity.py::test_xpass"] == "xpassed"
    assert outcomes["test_parity.py::test_setup_error"] == "error"
    assert outcomes["test_parity.py::test_teardown_error"] == "error"
    assert outcomes["test_parity.py::test_ids[\\xfcn\\xef c\\xf6d\\xe9]"] == "passed"
    assert outcomes["test_parity.py::test_ids[a::b]"] == "passed"
    assert outcomes["test_parity.py::test_ids[x[y]::z]"] == "passed"
    assert len(outcomes) == 12
    jsonschema.validate(remote.report, SCHEMA)


def test_captured_output_of_a_failure_comes_home(pytester, queues, run_dispatched, transport):
    pytester.makepyfile(
        test_output=queues.render(
            """
            import logging
            import sys
            import pytest

            @pytest.mark.queue("QUEUE_B")
            def test_noisy_failure():
                print("stdout from the bench")
                print("stderr from the bench", file=sys.stderr)
                logging.getLogger("bench").warning("log record from the bench")
                assert False, "the device said no"
            """
        )
    )
    run = run_dispatched()
    run.result.assert_outcomes(failed=1)
    run.result.stdout.fnmatch_lines(
        [
            "*AssertionError: the device said no*",
            "*- Captured stdout call -*",
            "stdout from the bench",
            "*- Captured stderr call -*",
            "stderr from the bench",
            "*- Captured log call -*",
            "*log record from the bench*",
        ]
    )
    call = run.report["tests"][0]["call"]
    assert call["stdout"] == "stdout from the bench\n"
    assert call["stderr"] == "stderr from the bench\n"
    assert "the device said no" in call["longrepr"]


def test_junitxml_lists_dispatched_tests_with_provenance(
    pytester, queues, run_dispatched, transport
):
    pytester.makepyfile(
        test_junit=queues.render(
            """
            import pytest

            @pytest.mark.queue("QUEUE_A")
            def test_a():
                pass

            @pytest.mark.queue("QUEUE_B")
            def test_b():
                assert 0
            """
        )
    )
    xml = pytester.path / "junit.xml"
    run = run_dispatched(f"--junitxml={xml}")
    run.result.assert_outcomes(passed=1, failed=1)
    root = ET.parse(xml).getroot()
    cases = {case.get("name"): case for case in root.iter("testcase")}
    assert set(cases) == {"test_a", "test_b"}
    assert cases["test_b"].find("failure") is not None
    assert cases["test_a"].find("failure") is None
    props = {p.get("name"): p.get("value") for p in cases["test_b"].iter("property")}
    assert props["dispatch.worker"] == "worker-b"
    assert props["dispatch.queue"] == queues.b
    assert props["dispatch.attempts"] == "1"
    assert props["dispatch.task_id"]
    assert props["dispatch.host"]


def test_broker_down_fails_fast_with_masked_url(pytester, queues):
    pytester.makepyfile(
        test_down=queues.render(
            """
            import pytest

            @pytest.mark.queue("QUEUE_A")
            def test_remote():
                pass

            def test_local():
                pass
            """
        )
    )
    report = pytester.path / "report.json"
    result = pytester.runpytest_subprocess(
        "--celery-dispatch",
        "--celery-broker=amqp://bench:s3cr3t-pw@127.0.0.1:1//",
        f"--celery-json-report={report}",
        timeout=60,  # a hang fails the test; it must end in seconds
    )
    assert result.ret == 1
    result.assert_outcomes(passed=1, failed=1)
    result.stdout.fnmatch_lines(
        ["*cannot reach the broker amqp://bench:**@127.0.0.1:1//*Connection refused*"]
    )
    text = result.stdout.str() + result.stderr.str() + report.read_text()
    assert "s3cr3t-pw" not in text
    assert "Traceback" not in text
    data = json.loads(report.read_text())
    assert data["dispatch"]["broker"] == "amqp://bench:**@127.0.0.1:1//"
    jsonschema.validate(data, SCHEMA)


def test_queue_without_consumer_fails_its_tests_only(pytester, queues, run_dispatched, transport):
    pytester.makepyfile(
        test_noconsumer=queues.render(
            """
            import pytest

            @pytest.mark.queue("QUEUE_EMPTY")
            def test_orphan():
                pass

            @pytest.mark.queue("QUEUE_A")
            def test_served():
                pass
            """
        )
    )
    run = run_dispatched("--celery-wait-workers=1", timeout=60)
    run.result.assert_outcomes(passed=1, failed=1)
    run.result.stdout.fnmatch_lines([f"*no worker consumes queue '{queues.empty}' (waited 1s*"])
    outcomes = run.outcomes_by_nodeid()
    assert outcomes["test_noconsumer.py::test_served"] == "passed"
    assert outcomes["test_noconsumer.py::test_orphan"] == "failed"


def test_hanging_test_is_killed_after_the_timeout(pytester, queues, run_dispatched, transport):
    pytester.makepyfile(
        test_hang=queues.render(
            """
            import time
            import pytest

            pytestmark = pytest.mark.queue("QUEUE_A")

            def test_hangs():
                time.sleep(600)

            def test_after():
                pass
            """
        )
    )
    run = run_dispatched("--celery-timeout=2", timeout=90)
    run.result.assert_outcomes(passed=1, failed=1)
    run.result.stdout.fnmatch_lines(["*test_hangs*timeout: still running after 2s*"])
    # It ran until it was killed: no sooner than its 2 s deadline after its start (both on the
    # worker's clock), not the 0 s of a test that never started.
    hung = next(t for t in run.report["tests"] if t["nodeid"].endswith("::test_hangs"))
    assert hung["call"]["duration"] >= 2.0, hung
    # Where it hung: the runner's stacks, asked of it before it was killed.
    where = hung["call"]["longrepr"].split("--- where the test process was when it was killed")
    assert len(where) == 2, hung["call"]["longrepr"]
    assert 'test_hang.py", line 7 in test_hangs' in where[1], where[1]  # time.sleep(600)
    assert hung["dispatch"]["finished"] - hung["dispatch"]["started"] >= 2.0, hung


def test_invalid_marker_is_an_error_for_that_test_only(pytester, queues, run_dispatched):
    pytester.makepyfile(
        test_badmarker=queues.render(
            """
            import pytest

            @pytest.mark.queue()
            def test_no_name():
                pass

            @pytest.mark.queue(42)
            def test_not_a_string():
                pass

            @pytest.mark.queue("QUEUE_A")
            def test_fine():
                pass
            """
        )
    )
    run = run_dispatched()
    run.result.assert_outcomes(passed=1, errors=2)
    run.result.stdout.fnmatch_lines(
        [
            "*test_no_name*needs a queue name*",
            "*test_not_a_string*needs a queue name as a string, got int 42*",
        ]
    )


def test_nothing_changes_without_the_flag(pytester, queues):
    pytester.makepyfile(
        test_plain=queues.render(
            """
            import os
            import pytest

            @pytest.mark.queue("QUEUE_B")
            def test_marked_runs_here():
                assert os.environ.get("WORKER_ID") != "worker-b"
            """
        )
    )
    result = pytester.runpytest_subprocess("--strict-markers", "-p", "no:cacheprovider")
    result.assert_outcomes(passed=1)
    assert not list(pytester.path.glob("dispatch_results_*.json"))
    out = result.stdout.str()
    assert "celery-dispatch:" not in out  # no header line
    assert "celery dispatch" not in out  # no summary section


def test_default_queue_sends_unmarked_tests(pytester, queues, run_dispatched):
    pytester.makepyfile(
        test_default=queues.render(
            """
            import os

            def test_unmarked():
                assert os.environ["WORKER_ID"] == "worker-b"
            """
        )
    )
    run = run_dispatched(f"--celery-default-queue={queues.b}")
    run.result.assert_outcomes(passed=1)
    assert run.report["tests"][0]["dispatch"]["queue"] == queues.b


def test_report_and_summary_describe_the_run(pytester, queues, run_dispatched, transport):
    pytester.makepyfile(
        test_summary=queues.render(
            """
            import pytest

            @pytest.mark.queue("QUEUE_A")
            @pytest.mark.parametrize("n", range(4))
            def test_a(n):
                pass

            @pytest.mark.queue("QUEUE_B")
            @pytest.mark.parametrize("n", range(3))
            def test_b(n):
                assert n != 2
            """
        )
    )
    events = pytester.path / "events.jsonl"
    run = run_dispatched(f"--celery-event-log={events}")
    run.result.assert_outcomes(passed=6, failed=1)
    run.result.stdout.fnmatch_lines(
        [
            "*= celery dispatch =*",
            "Execution results",
            "*7 dispatched, 0 local: 1 failed, 6 passed*",
            "Detailed results",
            "Performance metrics",
            "*wall time*speed-up*",
            "Per queue",
            f"*{queues.a}*1*4*4 passed*",
            f"*{queues.b}*1*3*1 failed, 2 passed*",
            "Per worker",
            "*worker-a*",
            "*worker-b*",
            f"JSON report: {run.report_path}",
        ]
    )
    data = run.report
    jsonschema.validate(data, SCHEMA)
    assert data["summary"] == {"passed": 6, "failed": 1, "total": 7, "collected": 7}
    assert data["exitcode"] == 1
    assert data["dispatch"]["queues"][queues.a]["tests"] == 4
    assert data["dispatch"]["workers"]["worker-b"]["outcomes"] == {"passed": 2, "failed": 1}
    assert data["dispatch"]["tests_dispatched"] == 7
    for test in data["tests"]:
        info = test["dispatch"]
        assert info["attempts"] == 1
        assert info["sent"] <= info["started"] <= info["finished"]
    lines = [json.loads(line) for line in events.read_text().splitlines()]
    kinds = {}
    for line in lines:
        kinds.setdefault(line["nodeid"], []).append(line["event"])
    assert len(kinds) == 7
    assert all(k == ["sent", "started", "finished"] for k in kinds.values())


def test_user_properties_and_output_travel_with_the_report(pytester, queues, run_dispatched):
    pytester.makepyfile(
        test_roundtrip=queues.render(
            """
            import pytest

            @pytest.mark.queue("QUEUE_A")
            def test_with_property(record_property):
                record_property("bench", "A")
                print("out")
            """
        )
    )
    run = run_dispatched()
    run.result.assert_outcomes(passed=1)
    test = run.report["tests"][0]
    assert {"bench": "A"} in test["user_properties"]
    assert {"dispatch.worker": "worker-a"} in test["user_properties"]
    assert test["call"]["stdout"] == "out\n"
    assert os.path.basename(test["nodeid"].split("::")[0]) == "test_roundtrip.py"


def test_the_worker_never_dispatches_again(pytester, queues, run_dispatched):
    # The project's own ini turns dispatching on; the worker's pytest process reads the same
    # ini but must run the test itself, not send it to the queue once more.
    pytester.makeini(
        """
        [pytest]
        addopts = --celery-dispatch
        """
    )
    pytester.makepyfile(
        test_nested=queues.render(
            """
            import os
            import pytest

            @pytest.mark.queue("QUEUE_A")
            def test_runs_on_the_worker(dispatch_context):
                assert dispatch_context.dispatched
                assert dispatch_context.worker == "worker-a"
                assert os.environ["PYTEST_CELERY_DISPATCH_RUNNER"] == "1"
            """
        )
    )
    run = run_dispatched(timeout=60)
    run.result.assert_outcomes(passed=1)
    assert run.report["tests"][0]["dispatch"]["attempts"] == 1


def test_dash_s_streams_dispatched_output_as_it_arrives(
    pytester, queues, run_dispatched, transport
):
    pytester.makepyfile(
        test_stream=queues.render(
            """
            import sys
            import time
            import pytest

            @pytest.mark.queue("QUEUE_B")
            def test_talks():
                print("first line from the bench", flush=True)
                time.sleep(1.5)
                print("second line", flush=True)
                print("to stderr", file=sys.stderr, flush=True)
            """
        )
    )
    events = pytester.path / "events.jsonl"
    run = run_dispatched("-s", f"--celery-event-log={events}")
    run.result.assert_outcomes(passed=1)
    run.result.stdout.fnmatch_lines(
        [
            "[[]worker-b[]] first line from the bench",
            "[[]worker-b[]] second line",
            "[[]worker-b[]] to stderr",
        ]
    )
    # Shown as it came: the first line before the test finished, not with its report.
    out = run.result.stdout.str()
    assert out.index("first line from the bench") < out.index("test_stream.py .")


@pytest.mark.usefixtures("workers")
def test_dispatcher_gathers_concurrently_even_after_a_plain_get(pytester, queues, monkeypatch):
    from tests.helpers import BROKER

    monkeypatch.setenv("CELERY_BROKER_URL", BROKER)
    pytester.makepyfile(
        test_gather=queues.render(
            """
            A, B = "pytest_celery_dispatch.task_a", "pytest_celery_dispatch.task_b"
            CALLS = [(A, "QUEUE_A", {"duration": 0.3}), (B, "QUEUE_B", {"duration": 0.6})]

            def test_gather_get_gather(dispatcher, dispatch_app):
                dispatcher.require("QUEUE_A", "QUEUE_B")
                first = dispatcher.gather(CALLS, timeout=20)
                plain = dispatch_app.send_task(A, kwargs={"duration": 0}, queue="QUEUE_A")
                assert plain.get(timeout=20)["message"] == "Hello from Task A"
                a, b = dispatcher.gather(CALLS, timeout=20)
                assert (a.result["worker"], b.result["worker"]) == ("worker-a", "worker-b")
                # Each round trip is the task's own: A is not made to wait for B.
                assert a.round_trip < b.round_trip
                assert [r.result["message"] for r in first] == [
                    "Hello from Task A", "Hello from Task B"
                ]
            """
        )
    )
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", timeout=90)
    result.assert_outcomes(passed=1)


def test_a_workers_slots_are_found_though_the_labs_other_workers_answer_too(
    pytester, worker_factory, run_dispatched
):
    """The broadcast at the start is answered by every worker on the broker: the wait ends
    when this run's workers have answered, not after as many replies from anyone."""
    for n in range(3):
        worker_factory(worker_id=f"bystander-{n}")  # other queues of the same lab
    worker = worker_factory(worker_id="worker-three", concurrency=3)
    pytester.makepyfile(
        test_three=f"""
        import pytest

        @pytest.mark.queue({worker.queue!r})
        @pytest.mark.parametrize("n", range(3))
        def test_n(n):
            pass
        """
    )
    run = run_dispatched("--celery-ship=off")
    run.result.assert_outcomes(passed=3)
    run.result.stdout.fnmatch_lines(
        [f"celery-dispatch workers: {worker.queue}: 1 worker (*), 3 slots, 3 tests"]
    )


def test_a_late_line_of_the_plugin_never_lands_on_a_line_of_progress_dots(
    pytester, queues, run_dispatched
):
    # A local test whose dispatcher writes live lines, then its dot; then, while a queue
    # without a worker keeps the run waiting past STATUS_EVERY, the plugin's waiting line.
    from pytest_celery_dispatch.terminal import STATUS_EVERY

    pytester.makepyfile(
        test_live=queues.render(
            """
            import pytest

            def test_local_with_live_lines(dispatcher):
                dispatcher.call("pytest_celery_dispatch.task_a", "QUEUE_A", timeout=20)

            @pytest.mark.queue("QUEUE_EMPTY")
            def test_waits_for_a_worker():
                pass
            """
        )
    )
    wait = STATUS_EVERY + 2
    run = run_dispatched(f"--celery-wait-workers={wait:g}", "-p", "no:randomly", timeout=90)
    run.result.assert_outcomes(passed=1, failed=1)
    lines = run.result.stdout.lines
    plugin_lines = [line for line in lines if re.search(r"celery-dispatch( \w+)?: ", line)]
    assert any("celery-dispatch waiting:" in line for line in plugin_lines), lines
    for line in plugin_lines:
        assert line.startswith("celery-dispatch"), lines
