"""Routing a real lab needs: ini routes, the route hook, fan-out, the --co plan, exclusivity."""

from __future__ import annotations

import itertools
import json

import pytest

pytestmark = pytest.mark.usefixtures("workers")


def test_ini_routes_send_unmarked_tests_and_a_marker_still_wins(pytester, queues, run_dispatched):
    pytester.makeini(
        f"""
        [pytest]
        celery_dispatch_routes =
            {pytester.path.name}/hw_a/* = {queues.a}
            {pytester.path.name}/hw_b = {queues.b}
        """
    )
    pytester.mkpydir("hw_a")
    pytester.mkpydir("hw_b")
    (pytester.path / "hw_a" / "test_flash.py").write_text(
        queues.render(
            "import os\nimport pytest\n\n"
            "def test_on_a():\n    assert os.environ['WORKER_ID'] == 'worker-a'\n\n"
            "@pytest.mark.queue('QUEUE_B')\n"
            "def test_marker_wins():\n    assert os.environ['WORKER_ID'] == 'worker-b'\n"
        )
    )
    (pytester.path / "hw_b" / "test_adc.py").write_text(
        "import os\n\ndef test_on_b():\n    assert os.environ['WORKER_ID'] == 'worker-b'\n"
    )
    pytester.makepyfile(test_here="def test_local():\n    pass\n")
    run = run_dispatched()
    run.result.assert_outcomes(passed=4)
    sources = {t["nodeid"].split("::")[-1]: t["dispatch"]["queue"] for t in run.report["tests"]}
    assert sources == {
        "test_on_a": queues.a,
        "test_marker_wins": queues.b,
        "test_on_b": queues.b,
        "test_local": None,
    }


def test_the_route_hook_comes_after_markers_and_before_ini_routes(pytester, queues, run_dispatched):
    pytester.makeini(
        f"""
        [pytest]
        celery_dispatch_routes = * = {queues.a}
        """
    )
    pytester.makeconftest(
        f"""
        def pytest_celery_dispatch_route(item):
            if "bench_b" in item.name:
                return {queues.b!r}
            return None
        """
    )
    pytester.makepyfile(
        test_hook=queues.render(
            """
            import os
            import pytest

            def test_bench_b_by_hook():
                assert os.environ["WORKER_ID"] == "worker-b"

            def test_default_route():
                assert os.environ["WORKER_ID"] == "worker-a"

            @pytest.mark.queue("QUEUE_A")
            def test_bench_b_but_marked():
                assert os.environ["WORKER_ID"] == "worker-a"
            """
        )
    )
    run = run_dispatched()
    run.result.assert_outcomes(passed=3)


def test_fan_out_runs_a_test_once_on_each_queue(pytester, queues, run_dispatched):
    pytester.makepyfile(
        test_fan=queues.render(
            """
            import os
            import pytest

            @pytest.mark.queue("QUEUE_A", "QUEUE_B")
            @pytest.mark.parametrize("image", ["v1", "v2"])
            def test_flash(image, dispatch_context):
                assert dispatch_context.queue in ("QUEUE_A", "QUEUE_B")
                assert os.environ["WORKER_ID"] == (
                    "worker-a" if dispatch_context.queue == "QUEUE_A" else "worker-b"
                )
            """
        )
    )
    xml = pytester.path / "junit.xml"
    run = run_dispatched("-v", f"--junitxml={xml}")
    run.result.assert_outcomes(passed=4)
    names = sorted(t["nodeid"].split("::")[-1] for t in run.report["tests"])
    assert names == sorted(
        f"test_flash[{image}-{q}]" for image in ("v1", "v2") for q in (queues.a, queues.b)
    )
    for test in run.report["tests"]:
        assert test["nodeid"].endswith(f"-{test['dispatch']['queue']}]")
    assert xml.read_text().count("<testcase ") == 4
    # Without --celery-dispatch the same four items run locally (nodeids stay the same).
    local = pytester.runpytest_subprocess("-p", "no:cacheprovider", "-q", "--co")
    local.stdout.fnmatch_lines(
        [f"*test_flash[[]v1-{queues.a}[]]*", f"*test_flash[[]v2-{queues.b}[]]*"]
    )


def test_collect_only_shows_the_plan_and_sends_nothing(pytester, queues, run_dispatched):
    pytester.makepyfile(
        test_plan=queues.render(
            """
            import pytest

            @pytest.mark.queue("QUEUE_A")
            def test_a():
                pass

            @pytest.mark.queue(42)
            def test_bad():
                pass

            def test_local():
                pass
            """
        )
    )
    events = pytester.path / "events.jsonl"
    run = run_dispatched("--co", f"--celery-event-log={events}")
    assert run.result.ret == 0
    run.result.stdout.fnmatch_lines(
        [
            "celery-dispatch plan (--collect-only: nothing is sent)",
            f"  {queues.a}: 1 test",
            "    *test_plan.py::test_a  [[]marker[]]",
            "  local (controller): 1 test",
            "    *test_plan.py::test_local  [[]local[]]",
            "  invalid routing: 1 test(s)",
            "    *test_plan.py::test_bad: @pytest.mark.queue needs a queue name as a string*",
        ]
    )
    assert not events.exists() or not events.read_text().strip()
    assert json.loads(run.report_path.read_text())["tests"] == []


def test_a_concurrency_1_queue_runs_one_test_at_a_time(pytester, worker_factory, run_dispatched):
    bench = worker_factory(worker_id="worker-exclusive", concurrency=1)
    pytester.makepyfile(
        test_exclusive=f"""
        import time
        import pytest

        pytestmark = pytest.mark.queue({bench.queue!r})

        @pytest.mark.parametrize("n", range(6))
        def test_device(n):
            time.sleep(0.3)
        """
    )
    run = run_dispatched()
    run.result.assert_outcomes(passed=6)
    spans = sorted(
        (t["dispatch"]["started"], t["dispatch"]["finished"]) for t in run.report["tests"]
    )
    for (_, end), (start, _) in itertools.pairwise(spans):
        assert start >= end, f"two tests overlapped on an exclusive bench: {spans}"
    assert run.report["dispatch"]["slots"] == {bench.queue: 1}
