"""End to end: --celery-dist loadfile / loadscope / loadgroup keep related tests on one slot.

One private worker with two slots (``celery worker -c 2``) serves every run of this module.
The test projects make a split *visible*, whatever the machine's speed: a test that must not
share its slot's work with another slot waits (bounded) until some other test of the run has
started, so two slots really run at once when the tests were split.
"""

from __future__ import annotations

import shutil
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from pytest_celery_dispatch.liveness import CONTROLLER_CHECK_INTERVAL
from pytest_celery_dispatch.runner import PLUGIN_NAME
from tests.conftest import broker_reachable
from tests.helpers import WorkerProcess, delete_queues, stop_all

#: Helpers every generated project shares (distsync.py). STATE is cleared between runs.
SYNC = """
import os
import time
from pathlib import Path

STATE = Path(__file__).parent / "state"
WAIT = 30.0  # the bound of every wait: a slot that never shows up makes a test slow, not hang


def mark(folder, name):
    path = STATE / folder
    path.mkdir(parents=True, exist_ok=True)
    (path / name).touch()


def wait_for_other(folder, name, wait=WAIT):
    # Until an entry other than ``name`` shows up in STATE/folder; False after ``wait`` seconds.
    deadline = time.monotonic() + wait
    path = STATE / folder
    while time.monotonic() < deadline:
        if any(p.name != name for p in path.iterdir()):
            return True
        time.sleep(0.02)
    return False


def log(name):
    STATE.mkdir(exist_ok=True)
    with open(STATE / "order.log", "a") as fh:
        fh.write(f"{name} {os.getpid()}\\n")
"""

#: Each test writes its name to one file, says it started, waits until another test of the
#: run started, then reads the file back: on two slots at once it reads someone else's name.
SHARED_FILE = """
import pytest
from distsync import STATE, mark, wait_for_other

pytestmark = pytest.mark.queue("QUEUE")


def roundtrip(name):
    STATE.mkdir(exist_ok=True)
    (STATE / "shared.txt").write_text(name)
    mark("started", name)
    wait_for_other("started", name)
    assert (STATE / "shared.txt").read_text() == name


def test_write_read_1():
    roundtrip("1")


def test_write_read_2():
    roundtrip("2")


def test_write_read_3():
    roundtrip("3")
"""

#: Another file: under loadfile it runs on the other slot while test_shared.py runs.
OTHER_FILE = """
import pytest
from distsync import mark

pytestmark = pytest.mark.queue("QUEUE")


@pytest.mark.parametrize("n", range(3))
def test_other(n):
    mark("started", f"other-{n}")
"""

#: A class whose tests build on each other, and two functions of the module beside it.
ORDERED_CLASS = """
import pytest
from distsync import mark, wait_for_other

pytestmark = pytest.mark.queue("QUEUE")


class TestSequence:
    steps = []

    def step(self, n):
        mark("started", f"step-{n}")
        self.steps.append(n)
        assert self.steps == list(range(1, n + 1))

    def test_1_power_on(self):
        self.step(1)
        wait_for_other("started", "step-1")  # a split class shows now: step 3 on the other slot

    def test_2_flash(self):
        self.step(2)

    def test_3_boot(self):
        self.step(3)

    def test_4_power_off(self):
        self.step(4)


def test_free_1():
    mark("started", "free-1")


def test_free_2():
    mark("started", "free-2")
"""

#: "flash" tests in two files, between unmarked ones. An unmarked test waits until unmarked
#: tests run in two processes: the slot that holds the group must take free tests after it.
GROUP_A = """
import os
import time
import pytest
from distsync import log, mark, wait_for_other

pytestmark = pytest.mark.queue("QUEUE")


def free(n):
    mark("free", str(os.getpid()))
    assert wait_for_other("free", str(os.getpid()))


@pytest.mark.xdist_group("flash")
def test_flash_erase():
    log("erase")
    time.sleep(0.2)


def test_free_1():
    free(1)


@pytest.mark.xdist_group(name="flash")
def test_flash_write():
    log("write")
    time.sleep(0.2)


def test_free_2():
    free(2)


def test_free_3():
    free(3)
"""

GROUP_B = """
import os
import time
import pytest
from distsync import log, mark, wait_for_other

pytestmark = pytest.mark.queue("QUEUE")


def free(n):
    mark("free", str(os.getpid()))
    assert wait_for_other("free", str(os.getpid()))


def test_free_4():
    free(4)


@pytest.mark.xdist_group("flash")
class TestFlash:
    @pytest.mark.parametrize("step", ["verify", "reset"])
    def test_step(self, step):
        log(step)
        time.sleep(0.2)


def test_free_5():
    free(5)


def test_free_6():
    free(6)
"""

FLASH_ORDER = ["erase", "write", "verify", "reset"]


@pytest.fixture(scope="module")
def bench(workspace: Path) -> Iterator[WorkerProcess]:
    """One worker with two slots on a private queue, for every run of this module."""
    if not broker_reachable():
        pytest.fail("RabbitMQ is not reachable: start it (rabbitmq-server -detached)")
    logs = workspace / "worker-logs"
    logs.mkdir(exist_ok=True)
    queue = f"cdtest-dist-{uuid.uuid4().hex[:8]}"
    worker = WorkerProcess(queue, "worker-dist", workspace, logs, concurrency=2)
    try:
        yield worker.start()
    finally:
        stop_all([worker])
        if broker_reachable():
            delete_queues(queue)


def project(pytester: pytest.Pytester, bench: WorkerProcess, **files: str) -> None:
    pytester.makepyfile(distsync=SYNC)
    pytester.makepyfile(**{name: src.replace("QUEUE", bench.queue) for name, src in files.items()})


def clear_state(pytester: pytest.Pytester) -> None:
    shutil.rmtree(pytester.path / "state", ignore_errors=True)


def by_name(report: dict) -> dict[str, dict]:
    return {t["nodeid"].split("::", 1)[1]: t for t in report["tests"]}


def test_loadfile_keeps_a_modules_shared_file_on_one_slot(pytester, bench, run_dispatched):
    project(pytester, bench, test_shared=SHARED_FILE, test_other=OTHER_FILE)
    # load: two slots run tests of test_shared.py at once and read each other's writes.
    load = run_dispatched("test_shared.py")
    outcomes = load.outcomes_by_nodeid()
    assert "failed" in outcomes.values(), load.result.stdout.str()
    assert len({t["dispatch"]["session"] for t in load.report["tests"]}) == 2
    assert load.report["dispatch"]["dist"] == "load"

    clear_state(pytester)
    run = run_dispatched("--celery-dist", "loadfile")
    run.result.assert_outcomes(passed=6)
    tests = by_name(run.report)
    shared = [tests[f"test_write_read_{i}"]["dispatch"] for i in (1, 2, 3)]
    assert len({d["session"] for d in shared}) == 1
    starts = [d["started"] for d in shared]
    assert starts == sorted(starts)  # in collection order
    assert run.report["dispatch"]["dist"] == "loadfile"


def test_loadscope_keeps_an_ordered_class_on_one_slot(pytester, bench, run_dispatched):
    project(pytester, bench, test_sequence=ORDERED_CLASS)
    run = run_dispatched("--celery-dist", "loadscope")
    run.result.assert_outcomes(passed=6)
    tests = by_name(run.report)
    steps = [t for name, t in tests.items() if name.startswith("TestSequence::")]
    assert len({t["dispatch"]["session"] for t in steps}) == 1
    free = {tests[f"test_free_{n}"]["dispatch"]["session"] for n in (1, 2)}
    assert len(free) == 1  # the module's functions are one scope too
    assert free != {steps[0]["dispatch"]["session"]}


def test_loadgroup_runs_a_group_on_one_slot_in_order_and_shares_the_rest(
    pytester, bench, run_dispatched
):
    project(pytester, bench, test_group_a=GROUP_A, test_group_b=GROUP_B)
    run = run_dispatched("--celery-dist", "loadgroup", "-p", "no:xdist", "--strict-markers")
    run.result.assert_outcomes(passed=10)
    tests = run.report["tests"]
    flash = [t for t in tests if "flash" in t["nodeid"].lower()]
    free = [t for t in tests if "free" in t["nodeid"]]
    assert len(flash) == 4
    assert len(free) == 6
    assert len({(t["dispatch"]["session"], t["dispatch"]["worker"]) for t in flash}) == 1
    assert {t["dispatch"]["worker"] for t in flash} == {"worker-dist"}
    order = (pytester.path / "state" / "order.log").read_text().split()
    assert order[0::2] == FLASH_ORDER  # collection order, across two files
    assert len(set(order[1::2])) == 1  # one process
    assert len({t["dispatch"]["session"] for t in free}) == 2  # the rest spreads over both


def test_collect_only_shows_the_groups(pytester, bench, run_dispatched):
    project(pytester, bench, test_group_a=GROUP_A, test_group_b=GROUP_B)
    run = run_dispatched("--co", "--celery-dist", "loadgroup")
    assert run.result.ret == 0
    run.result.stdout.fnmatch_lines(
        [
            f"  {bench.queue}: 10 tests in 1 group (--celery-dist loadgroup)",
            "    group flash: 4 tests, one slot",
            "      *test_group_a.py::test_flash_erase  [[]marker[]]",
            "      *test_group_a.py::test_flash_write  [[]marker[]]",
            "      *test_group_b.py::TestFlash::test_step[[]verify[]]  [[]marker[]]",
            "      *test_group_b.py::TestFlash::test_step[[]reset[]]  [[]marker[]]",
            "    not grouped: 6 tests, shared as load",
            "      *test_group_a.py::test_free_1  [[]marker[]]",
        ]
    )
    scoped = run_dispatched("--co", "--celery-dist", "loadscope")
    scoped.result.stdout.fnmatch_lines(
        [
            f"  {bench.queue}: 10 tests in 3 groups (--celery-dist loadscope)",
            "    group *test_group_a.py: 5 tests, one slot",
            "    group *test_group_b.py: 3 tests, one slot",
            "    group *test_group_b.py::TestFlash: 2 tests, one slot",
        ]
    )


def test_a_bad_mode_names_the_option_and_the_modes(pytester, run_dispatched):
    pytester.makepyfile("def test_x(): pass")
    run = run_dispatched("--celery-dist", "each")
    assert run.result.ret == pytest.ExitCode.USAGE_ERROR
    run.result.stderr.fnmatch_lines(
        [
            "*celery-dispatch: invalid value 'each' for --celery-dist: "
            "expected one of load, loadfile, loadscope, loadgroup*"
        ]
    )


def test_xdist_group_works_with_strict_markers_without_xdist(pytester):
    pytester.makepyfile(
        """
        import pytest

        @pytest.mark.xdist_group(name="flash")
        def test_x():
            pass
        """
    )
    result = pytester.runpytest_subprocess("-p", "no:xdist", "--strict-markers")
    result.assert_outcomes(passed=1)


CRASHING_GROUP = """
import os
import pytest
from distsync import log

pytestmark = pytest.mark.queue("QUEUE")


@pytest.mark.xdist_group("bench")
class TestBench:
    def test_1_connect(self):
        log("connect")

    def test_2_firmware_crashes_the_process(self):
        log("crash")
        os._exit(3)

    def test_3_recover(self):
        log("recover")

    def test_4_disconnect(self):
        log("disconnect")


def test_free():
    pass
"""


def test_a_crash_inside_a_group_leaves_the_rest_of_it_on_its_slot_in_order(
    pytester, bench, run_dispatched
):
    project(pytester, bench, test_crash=CRASHING_GROUP)
    run = run_dispatched("--celery-dist", "loadgroup")
    run.result.assert_outcomes(passed=4, failed=1)
    tests = by_name(run.report)
    group = [t for name, t in tests.items() if name.startswith("TestBench::")]
    assert [t["outcome"] for t in group] == ["passed", "failed", "passed", "passed"]
    assert "crashed" in group[1]["call"]["longrepr"]
    assert len({t["dispatch"]["session"] for t in group}) == 1
    order = (pytester.path / "state" / "order.log").read_text().split()
    assert order[0::2] == ["connect", "crash", "recover", "disconnect"]
    assert order[1] == order[3] != order[5] == order[7]  # a new runner took over after the crash


#: A group of four on one slot and a test that fails on the other slot while the group's first
#: test runs. The group's first test holds its slot until its runner is told to stop (bounded),
#: so the stop reaches the slot in the middle of the group.
STOP_IN_GROUP = """
import time
import pytest
from distsync import STATE, WAIT, log, mark, wait_for_other

pytestmark = pytest.mark.queue("QUEUE")


@pytest.mark.xdist_group("bench")
class TestBench:
    def test_1_hold(self, request):
        log("g1")
        mark("started", "g1")
        runner = request.config.pluginmanager.get_plugin("celery-dispatch-runner")
        deadline = time.monotonic() + WAIT
        while not runner.stop_requested and time.monotonic() < deadline:
            time.sleep(0.02)

    def test_2(self):
        log("g2")

    def test_3(self):
        log("g3")

    def test_4(self):
        log("g4")


def test_fails():
    mark("started", "fails")
    wait_for_other("started", "fails")
    log("fails")
    assert False, "planned failure"
"""


def junit_cases(path: Path) -> dict[str, str]:
    """``classname::name`` -> outcome of each testcase of a JUnit file."""
    import xml.etree.ElementTree as ET

    cases = {}
    for case in ET.parse(path).getroot().iter("testcase"):
        kinds = {child.tag for child in case} & {"failure", "error", "skipped"}
        cases[f"{case.get('classname')}::{case.get('name')}"] = kinds.pop() if kinds else "passed"
    return cases


def test_x_stops_a_group_on_another_slot_after_its_running_test(pytester, bench, run_dispatched):
    project(pytester, bench, test_stop=STOP_IN_GROUP.replace("celery-dispatch-runner", PLUGIN_NAME))
    junit = pytester.path / "junit.xml"
    run = run_dispatched("--celery-dist", "loadgroup", "-x", f"--junitxml={junit}")
    out = run.result.stdout.str()
    assert run.result.ret == pytest.ExitCode.TESTS_FAILED, out
    assert "stopping after 1 failures" in out
    assert "celery-dispatch: stopping:" in out
    # As pytest -x here: the failure is the last report; what ran after it is not reported.
    run.result.assert_outcomes(failed=1)
    report = run.report
    assert [(t["nodeid"].split("/")[-1], t["outcome"]) for t in report["tests"]] == [
        ("test_stop.py::test_fails", "failed")
    ]
    assert report["summary"]["collected"] == 5
    # The group's first test was running (its slot finishes it), the other three never start.
    stopped = report["dispatch"]["stopped_early"]
    assert stopped == {"queued_not_run": 3, "running_not_reported": 1}, stopped
    assert "stopping: 3 test(s) not started will not run, 1 running test(s)" in out
    assert list(junit_cases(junit).values()) == ["failure"]
    time.sleep(2 * CONTROLLER_CHECK_INTERVAL + 1)  # the slot would have gone on by now
    order = (pytester.path / "state" / "order.log").read_text().split()
    assert order[0::2] == ["g1", "fails"], "the group's other tests never start"


#: The same group, its second test hanging past --celery-timeout instead of crashing.
HANG_IN_GROUP = (
    CRASHING_GROUP.replace("import os", "import time")
    .replace("test_2_firmware_crashes_the_process", "test_2_hangs")
    .replace('log("crash")\n        os._exit(3)', 'log("hang")\n        time.sleep(600)')
)
assert "time.sleep(600)" in HANG_IN_GROUP


def test_a_test_past_the_timeout_inside_a_group_fails_by_name_and_the_group_goes_on(
    pytester, bench, run_dispatched
):
    project(pytester, bench, test_hang=HANG_IN_GROUP)
    junit = pytester.path / "junit.xml"
    run = run_dispatched(
        "--celery-dist", "loadgroup", "--celery-timeout=2", f"--junitxml={junit}", timeout=120
    )
    run.result.assert_outcomes(passed=4, failed=1)
    run.result.stdout.fnmatch_lines(["*test_2_hangs*timeout: still running after 2s*"])
    tests = by_name(run.report)
    group = [t for name, t in tests.items() if name.startswith("TestBench::")]
    assert [t["outcome"] for t in group] == ["passed", "failed", "passed", "passed"]
    assert "timeout: still running after 2s" in group[1]["call"]["longrepr"]
    assert all(t["dispatch"]["attempts"] == 1 for t in group), "nothing was sent again"
    assert len({t["dispatch"]["session"] for t in group}) == 1
    order = (pytester.path / "state" / "order.log").read_text().split()
    assert order[0::2] == ["connect", "hang", "recover", "disconnect"]
    assert order[1] == order[3] != order[5] == order[7]  # a new runner took over after the kill
    cases = junit_cases(junit)
    assert sorted(cases.values()) == ["failure"] + ["passed"] * 4
    (failed,) = (k for k, v in cases.items() if v == "failure")
    assert failed.endswith("TestBench::test_2_hangs")


def test_x_after_a_timeout_inside_a_group_starts_nothing_more_of_it(
    pytester, bench, run_dispatched
):
    project(pytester, bench, test_hang=HANG_IN_GROUP)
    run = run_dispatched("--celery-dist", "loadgroup", "--celery-timeout=2", "-x", timeout=120)
    out = run.result.stdout.str()
    assert run.result.ret == pytest.ExitCode.TESTS_FAILED, out
    assert "stopping after 1 failures" in out
    outcomes = {n.split("::", 1)[1]: o for n, o in run.outcomes_by_nodeid().items()}
    assert outcomes["TestBench::test_2_hangs"] == "failed"
    assert "TestBench::test_3_recover" not in outcomes
    time.sleep(2 * CONTROLLER_CHECK_INTERVAL + 1)  # the slot would have gone on by now
    order = (pytester.path / "state" / "order.log").read_text().split()
    assert order[0::2] == ["connect", "hang"], "nothing of the group starts after the timeout"
