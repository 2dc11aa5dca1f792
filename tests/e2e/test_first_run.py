"""What a new user meets on a first try: the plan of ``--co``, no RabbitMQ, a typo in a queue
name, and the slots in the reports (issue #22)."""

from __future__ import annotations

import json

import pytest

PLAN_PROJECT = """
import pytest

@pytest.mark.queue("queue_a")
def test_on_a():
    pass

@pytest.mark.queue("queue_b")
def test_on_b():
    pass

def test_here():
    pass
"""


def test_collect_only_says_why_nothing_was_sent_and_writes_no_report(
    pytester: pytest.Pytester,
) -> None:
    pytester.makepyfile(test_plan=PLAN_PROJECT)
    result = pytester.runpytest_subprocess("--celery-dispatch", "--co", "-p", "no:cacheprovider")
    assert result.ret == 0
    result.stdout.fnmatch_lines(
        [
            "celery-dispatch plan (--collect-only: nothing is sent)",
            "  queue_a: 1 test",
            "  queue_b: 1 test",
            "  local (controller): 1 test",
            "*celery dispatch*",
            "nothing was sent: a collect-only run (--co); the plan is above",
        ]
    )
    out = result.stdout.str()
    assert "no test was dispatched" not in out
    assert "JSON report:" not in out
    assert list(pytester.path.glob("dispatch_results_*.json")) == []


def test_collect_only_writes_the_report_asked_for_by_path(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(test_plan=PLAN_PROJECT)
    report = pytester.path / "plan.json"
    result = pytester.runpytest_subprocess(
        "--celery-dispatch", "--co", "-p", "no:cacheprovider", f"--celery-json-report={report}"
    )
    assert result.ret == 0
    data = json.loads(report.read_text())
    assert data["tests"] == []
    assert data["summary"]["collected"] == 3
    assert data["dispatch"]["collect_only"] is True
    result.stdout.fnmatch_lines([f"JSON report: {report}"])


def test_no_broker_points_at_the_one_machine_way(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        test_nobroker="""
        import pytest

        @pytest.mark.queue("queue_a")
        def test_remote():
            pass
        """
    )
    result = pytester.runpytest_subprocess(
        "--celery-dispatch",
        "--celery-broker=amqp://guest:guest@127.0.0.1:1//",
        "-p",
        "no:cacheprovider",
        f"--celery-json-report={pytester.path / 'report.json'}",
        timeout=60,
    )
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(
        [
            "celery-dispatch: cannot reach the broker amqp://guest:**@127.0.0.1:1//: "
            "*Connection refused; start RabbitMQ (rabbitmq-server -detached), "
            "pass --celery-broker URL, "
            "or try it on this machine: --celery-broker embedded --celery-local-workers auto"
        ]
    )
    assert "))" not in result.stdout.str()


def test_a_typo_in_a_queue_name_gets_a_guess(pytester, queues, transport, run_dispatched) -> None:
    # workers serve queues.a (...-a) and queues.b (...-b); the test names ...-c, one edit away
    # from both. The run has no other queue: the guess comes from the workers' active queues
    # (RabbitMQ: an active_queues broadcast; embedded broker: the workers' presence files).
    typo = queues.a[:-1] + "c"
    pytester.makepyfile(
        test_typo=f"""
        import pytest

        @pytest.mark.queue({typo!r})
        def test_on_the_bench():
            pass
        """
    )
    run = run_dispatched("--celery-wait-workers=7", timeout=90)
    run.result.assert_outcomes(failed=1)
    guess = f"did you mean {queues.a} or {queues.b}?"
    run.result.stdout.fnmatch_lines(
        [
            f"celery-dispatch workers: {typo}: no worker yet, waiting up to 7s for 1 test "
            f"({guess})",
            f"celery-dispatch waiting: {typo} 1 queued, 0 running, 0 done (no worker; {guess})",
            f"*no worker consumes queue '{typo}' (waited 7s, --celery-wait-workers). D{guess[1:]}"
            " Otherwise start one:*",
        ]
    )


@pytest.mark.usefixtures("workers")
def test_a_typo_in_an_ini_route_gets_the_same_guess(pytester, queues, run_dispatched) -> None:
    # As above, with the queue from ini celery_dispatch_routes instead of a marker.
    typo = queues.a[:-1] + "c"
    pytester.makeini(
        f"""
        [pytest]
        celery_dispatch_routes =
            */test_typo.py::* = {typo}
        """
    )
    pytester.makepyfile(test_typo="def test_on_the_bench(): pass")
    run = run_dispatched("--celery-wait-workers=1", timeout=90)
    run.result.assert_outcomes(failed=1)
    guess = f"did you mean {queues.a} or {queues.b}?"
    run.result.stdout.fnmatch_lines(
        [
            f"celery-dispatch workers: {typo}: no worker yet, waiting up to 1s for 1 test "
            f"({guess})",
            f"*no worker consumes queue '{typo}' (waited 1s, --celery-wait-workers). D{guess[1:]}"
            " Otherwise start one:*",
        ]
    )


def test_slots_mean_configured_slots_in_the_report_and_the_timeline(
    pytester, worker_factory, run_dispatched
) -> None:
    # A worker alone on its queue with -c 2, as worker-a in `make demo`.
    bench = worker_factory(worker_id="worker-two-slots", concurrency=2)
    pytester.makepyfile(
        test_slots=f"""
        import pytest

        pytestmark = pytest.mark.queue({bench.queue!r})

        @pytest.mark.parametrize("n", range(3))
        def test_device(n):
            pass
        """
    )
    timeline = pytester.path / "timeline.html"
    run = run_dispatched(f"--celery-timeline={timeline}")
    run.result.assert_outcomes(passed=3)
    dispatch = run.report["dispatch"]
    queue = dispatch["queues"][bench.queue]
    worker = dispatch["workers"]["worker-two-slots"]
    assert dispatch["slots"][bench.queue] == queue["slots"] == worker["slots"] == 2
    sessions = {t["dispatch"]["session"] for t in run.report["tests"]}
    assert queue["lanes_used"] == worker["lanes_used"] == len(sessions) in (1, 2)
    page = timeline.read_text()
    lanes = len(sessions)
    assert (
        f'<td>{bench.queue}</td><td class="num">1</td><td class="num">2</td>'
        f'<td class="num">{lanes}</td><td class="num">3</td>'
    ) in page
    assert (
        f'<td>worker-two-slots</td><td>{bench.queue}</td><td class="num">2</td>'
        f'<td class="num">{lanes}</td><td class="num">3</td>'
    ) in page
