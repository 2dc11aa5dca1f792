"""The fault matrix, end to end: real workers killed, a real broker restarted, real signals.

Every collected test must end with exactly one final outcome, the run must finish, and an
infrastructure failure must name the worker, the queue, the test and the attempts.
"""

from __future__ import annotations

import collections
import contextlib
import os
import shutil
import signal
import subprocess
import time
import uuid

import pytest

from pytest_celery_dispatch.embedded import EMBEDDED
from pytest_celery_dispatch.retry import SILENCE_LIMIT
from tests.helpers import BROKER

SLOW_TESTS = """
import os
import time
import pytest

LOG = {log!r}
GATE = {gate!r}

@pytest.mark.queue({queue!r})
@pytest.mark.parametrize("n", range({count}))
def test_slow(n):
    with open(LOG, "a") as fh:
        fh.write(f"start {{n}} {{os.environ['WORKER_ID']}} {{os.getpid()}}\\n")
    time.sleep({sleep})
    deadline = time.monotonic() + 120
    while GATE and n > 0 and not os.path.exists(GATE) and time.monotonic() < deadline:
        time.sleep(0.05)  # held until the test opens the gate: the run spans what it does
    with open(LOG, "a") as fh:
        fh.write(f"end {{n}} {{os.environ['WORKER_ID']}}\\n")
"""


def slow_tests(pytester, queue: str, count: int, sleep: float, gate: str | None = None) -> str:
    """Tests that sleep; with ``gate``, every test but the first also waits for that file."""
    log = str(pytester.path / "runs.log")
    source = SLOW_TESTS.format(log=log, queue=queue, count=count, sleep=sleep, gate=gate)
    pytester.makepyfile(test_slow=source)
    return log


def log_lines(path: str) -> list[list[str]]:
    if not os.path.exists(path):
        return []
    with open(path) as fh:
        return [line.split() for line in fh if line.strip()]


def finished_by(lines: list[dict], worker: str) -> int:
    return sum(1 for e in lines if e["event"] == "finished" and e.get("worker") == worker)


def started_on(lines: list[dict], worker: str) -> int:
    return sum(1 for e in lines if e["event"] == "started" and e.get("worker") == worker)


TRANSPORTS = pytest.mark.parametrize("broker", [BROKER, EMBEDDED], ids=["rabbitmq", "embedded"])


@TRANSPORTS
def test_killed_worker_work_moves_to_the_other_worker_of_its_queue(
    pytester, worker_factory, controller, broker
):
    # On the embedded broker the work a killed worker had taken is gone from the folder (no
    # broker tracks it): the controller's re-dispatch is all that brings it back.
    first = worker_factory(worker_id="worker-k1", broker=broker)
    worker_factory(queue=first.queue, worker_id="worker-k2", broker=broker)
    # Enough work that worker-k1 gets its share even when worker-k2 took both slot tasks
    # first (the second waits for a free slot, and is sent back to the queue after 1 s).
    count = 16
    log = slow_tests(pytester, first.queue, count=count, sleep=0.6)
    # In place: the base temp folder is big late in the suite (120 MB), and each new pool
    # process's check of its workspace against the shipped tree's manifest held worker-k1's
    # slot back until worker-k2 had run nearly everything.
    ctl = controller("--celery-timeout=30", "--celery-ship=off", broker=broker)
    ctl.wait_for(
        lambda lines: finished_by(lines, "worker-k1") >= 1 and started_on(lines, "worker-k1") >= 2
    )
    first.signal(signal.SIGKILL)
    assert ctl.wait(120) == 0, ctl.text()
    out = ctl.text()
    assert f"{count} passed" in out
    assert "re-dispatching" in out
    report = pytester_report(ctl)
    assert sorted(t["nodeid"].split("::")[-1] for t in report["tests"]) == sorted(
        f"test_slow[{n}]" for n in range(count)
    )
    assert {t["outcome"] for t in report["tests"]} == {"passed"}
    moved = [t for t in report["tests"] if t["dispatch"]["attempts"] == 2]
    assert moved, "the killed worker's unfinished tests were re-dispatched"
    assert {t["dispatch"]["worker"] for t in moved} == {"worker-k2"}
    # The test that was running when worker-k1 died started twice, finished once (on k2).
    ends = collections.Counter(n for kind, n, *_ in log_lines(log) if kind == "end")
    assert sorted(ends, key=int) == [str(n) for n in range(count)]
    assert set(ends.values()) == {1}


def pytester_report(ctl):
    import json

    return json.loads(ctl.report.read_text())


@pytest.mark.parametrize(
    ("sig", "broker"),
    [(signal.SIGKILL, BROKER), (signal.SIGTERM, BROKER), (signal.SIGKILL, EMBEDDED)],
    ids=["SIGKILL", "SIGTERM", "SIGKILL-embedded"],
)
def test_the_only_worker_of_a_queue_goes_away(pytester, worker_factory, controller, sig, broker):
    worker = worker_factory(worker_id="worker-only", broker=broker)
    slow_tests(pytester, worker.queue, count=6, sleep=1.0)
    ctl = controller("--celery-retries=2", "--celery-wait-workers=1", "-rf", broker=broker)
    ctl.wait_for(lambda lines: started_on(lines, "worker-only") >= 1)
    worker.signal(sig)  # SIGTERM: Celery's warm shutdown finishes the running batch first
    assert ctl.wait(120) == 1, ctl.text()
    report = pytester_report(ctl)
    outcomes = collections.Counter(t["outcome"] for t in report["tests"])
    assert sum(outcomes.values()) == 6
    assert outcomes["failed"] >= 1
    failed = [t for t in report["tests"] if t["outcome"] == "failed"]
    errors = [t["dispatch"]["infrastructure_error"] for t in failed]
    for test, error in zip(failed, errors, strict=False):
        assert test["nodeid"] in error
        assert "after 3 attempts" in error, error
        assert f"no worker consumes queue '{worker.queue}' any more" in error, error
    if sig == signal.SIGKILL:
        # The batch it was running is lost by name; SIGTERM lets that batch finish instead.
        assert any("(worked on by worker-only)" in e for e in errors), errors
    assert "re-dispatching" in ctl.text()


@TRANSPORTS
def test_a_worker_started_while_the_controller_waits_gets_the_work(
    pytester, worker_factory, controller, broker
):
    queue = f"cdtest-late-{uuid.uuid4().hex[:8]}"
    slow_tests(pytester, queue, count=5, sleep=0.0)
    ctl = controller("--celery-wait-workers=60", broker=broker)
    deadline = time.monotonic() + 60
    while "no worker yet, waiting up to 60s" not in ctl.text():
        assert ctl.proc.poll() is None, ctl.text()
        assert time.monotonic() < deadline, ctl.text()
        time.sleep(0.05)
    worker_factory(queue=queue, worker_id="worker-late", broker=broker)
    assert ctl.wait(120) == 0, ctl.text()
    assert f"a worker now consumes {queue}; sending 5 tests" in ctl.text()
    report = pytester_report(ctl)
    assert [t["outcome"] for t in report["tests"]] == ["passed"] * 5
    assert {t["dispatch"]["worker"] for t in report["tests"]} == {"worker-late"}


@pytest.fixture
def broker_restart():
    """Stops RabbitMQ's application and always starts it again, even when the test fails."""
    rabbitmqctl = shutil.which("rabbitmqctl")
    if rabbitmqctl is None:
        pytest.skip("rabbitmqctl is needed to restart the broker")

    def restart(down_for: float) -> None:
        subprocess.run([rabbitmqctl, "stop_app"], check=True, capture_output=True, timeout=60)
        try:
            time.sleep(down_for)
        finally:
            subprocess.run([rabbitmqctl, "start_app"], check=True, capture_output=True, timeout=120)
            subprocess.run([rabbitmqctl, "await_startup"], capture_output=True, timeout=120)

    try:
        yield restart
    finally:
        subprocess.run([rabbitmqctl, "start_app"], capture_output=True, timeout=120)
        subprocess.run([rabbitmqctl, "await_startup"], capture_output=True, timeout=120)


def test_broker_restart_mid_run_loses_nothing(pytester, worker_factory, controller, broker_restart):
    worker = worker_factory(worker_id="worker-r", concurrency=2)
    gate = pytester.path / "broker-back"
    log = slow_tests(pytester, worker.queue, count=10, sleep=0.5, gate=str(gate))
    ctl = controller("--celery-timeout=60")
    ctl.wait_for(lambda lines: finished_by(lines, "worker-r") >= 1)
    broker_restart(down_for=5.0)
    gate.touch()  # the other tests were held on the worker across the whole outage
    assert ctl.wait(180) == 0, ctl.text()
    report = pytester_report(ctl)
    assert len(report["tests"]) == 10
    assert {t["outcome"] for t in report["tests"]} == {"passed"}
    ends = collections.Counter(n for kind, n, *_ in log_lines(log) if kind == "end")
    assert sorted(ends, key=int) == [str(n) for n in range(10)]
    assert "reconnected after" in ctl.text()


CRASHERS = {
    "os_exit": ("os._exit(3)", "exit code 3"),
    "segfault": ("import ctypes; ctypes.string_at(0)", "killed by SIGSEGV"),
}


@pytest.mark.usefixtures("workers")
@pytest.mark.parametrize("how", sorted(CRASHERS))
def test_a_test_that_takes_its_process_down_fails_as_crashed(pytester, queues, run_dispatched, how):
    code, expected = CRASHERS[how]
    pytester.makepyfile(
        test_crash=queues.render(
            f"""
            import os
            import pytest

            pytestmark = pytest.mark.queue("QUEUE_A")

            def test_dies():
                {code}

            @pytest.mark.parametrize("n", range(4))
            def test_after(n):
                pass
            """
        )
    )
    # 5 tests, 1 consumer: test_dies shares its batch with later tests, which must still run.
    run = run_dispatched(timeout=90)
    run.result.assert_outcomes(passed=4, failed=1)
    run.result.stdout.fnmatch_lines([f"*test_dies crashed on worker-a*{expected}*"])
    outcomes = run.outcomes_by_nodeid()
    assert outcomes["test_crash.py::test_dies"] == "failed"
    assert all(outcomes[f"test_crash.py::test_after[{n}]"] == "passed" for n in range(4))


@pytest.mark.usefixtures("workers")
@pytest.mark.parametrize("stream", [[], ["-s"]], ids=["captured", "streamed"])
def test_pytest_timeout_marker_is_honoured_on_the_worker(pytester, queues, run_dispatched, stream):
    # Under -s the runner streams the tests' own output home; pytest-timeout still writes its
    # stacks through pytest's terminal writer and fails the test with its own message.
    pytester.makepyfile(
        test_marked_timeout=queues.render(
            """
            import threading
            import time
            import pytest

            @pytest.mark.queue("QUEUE_B")
            @pytest.mark.timeout(1)
            def test_too_slow():
                threading.Thread(target=time.sleep, args=(30,), name="helper", daemon=True).start()
                time.sleep(30)

            @pytest.mark.queue("QUEUE_B")
            def test_fine():
                pass
            """
        )
    )
    run = run_dispatched(*stream, timeout=90)
    run.result.assert_outcomes(passed=1, failed=1)
    run.result.stdout.fnmatch_lines(["*Failed: Timeout (>1.0s) from pytest-timeout*"])
    if stream:  # the other threads' stacks are streamed home, as a local -s run shows them
        run.result.stdout.fnmatch_lines(["[[]worker-b[]] *Stack of helper*"])


@TRANSPORTS
def test_ctrl_c_stops_the_run_and_the_workers(pytester, worker_factory, controller, broker):
    worker = worker_factory(worker_id="worker-int", concurrency=2, broker=broker)
    log = slow_tests(pytester, worker.queue, count=12, sleep=30)
    ctl = controller(broker=broker)
    ctl.wait_for(lambda lines: started_on(lines, "worker-int") >= 2)
    ctl.proc.send_signal(signal.SIGINT)
    assert ctl.wait(30) == 2, ctl.text()  # pytest's "interrupted"
    report = pytester_report(ctl)
    assert report["dispatch"]["interrupted"] is True
    # The workers drop this run: the running tests' processes are gone within seconds, and
    # nothing else of it starts.
    pids = [int(line[3]) for line in log_lines(log) if line[0] == "start"]
    assert pids
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and any(_alive(p) for p in pids):
        time.sleep(0.2)
    assert not any(_alive(p) for p in pids)
    time.sleep(2)
    assert len([line for line in log_lines(log) if line[0] == "start"]) == len(pids)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with contextlib.suppress(OSError), open(f"/proc/{pid}/stat") as fh:
        return fh.read().split()[2] != "Z"
    return True


@pytest.mark.parametrize(
    ("option", "broker"),
    [("-x", BROKER), ("--maxfail=2", BROKER), ("-x", EMBEDDED)],
    ids=["-x", "--maxfail=2", "-x-embedded"],
)
def test_maxfail_stops_and_starts_no_new_test(pytester, worker_factory, controller, option, broker):
    worker = worker_factory(worker_id="worker-x", concurrency=2, broker=broker)
    log = str(pytester.path / "runs.log")
    pytester.makepyfile(
        test_stop=f"""
        import os
        import time
        import pytest

        @pytest.mark.queue({worker.queue!r})
        @pytest.mark.parametrize("n", range(16))
        def test_n(n):
            with open({log!r}, "a") as fh:
                fh.write(f"start {{n}}\\n")
            time.sleep(0.4)
            with open({log!r}, "a") as fh:
                fh.write(f"end {{n}}\\n")
            assert n not in (1, 9), "planned failure"
        """
    )
    ctl = controller(option, broker=broker)
    assert ctl.wait(90) == 1, ctl.text()
    out = ctl.text()
    limit = 1 if option == "-x" else 2
    assert f"stopping after {limit} failures" in out
    assert "celery-dispatch: stopping:" in out
    time.sleep(2.5)  # let the running tests finish on the worker
    lines = log_lines(log)
    started = [int(n) for kind, n in lines if kind == "start"]
    ended = {int(n) for kind, n in lines if kind == "end"}
    assert set(started) == ended, "running tests finish"
    report = pytester_report(ctl)
    reported = len(report["tests"])
    extra = len(started) - reported
    # Each of the 2 slots may finish the test it was running; nothing else starts.
    assert 0 <= extra <= 2, (started, reported)
    assert report["dispatch"]["stopped_early"]["running_not_reported"] <= 2
    assert sum(1 for t in report["tests"] if t["outcome"] == "failed") == limit


@pytest.mark.usefixtures("workers")
def test_unserializable_exceptions_still_report(pytester, queues, run_dispatched):
    pytester.makepyfile(
        test_odd=queues.render(
            """
            import socket
            import threading
            import pytest

            pytestmark = pytest.mark.queue("QUEUE_A")

            class HoldsASocket(Exception):
                def __init__(self):
                    super().__init__("holding a socket")
                    self.sock = socket.socket()
                    self.lock = threading.Lock()

            class BadReduce(Exception):
                def __reduce__(self):
                    raise TypeError("cannot reduce me")

            class BadStr(Exception):
                def __str__(self):
                    raise RuntimeError("no str for you")

            def test_socket():
                raise HoldsASocket()

            def test_reduce():
                raise BadReduce("reduce")

            def test_str():
                raise BadStr()
            """
        )
    )
    run = run_dispatched(timeout=60)
    run.result.assert_outcomes(failed=3)
    run.result.stdout.fnmatch_lines(
        ["*HoldsASocket: holding a socket*", "*BadReduce: reduce*", "*BadStr*"]
    )


@pytest.mark.usefixtures("workers")
def test_huge_and_undecodable_output_arrives(pytester, queues, run_dispatched):
    pytester.makepyfile(
        test_output=queues.render(
            """
            import os
            import sys
            import pytest

            pytestmark = pytest.mark.queue("QUEUE_B")

            def test_ten_megabytes():
                sys.stdout.write("x" * 10_000_000 + "\\nTHE-END\\n")
                assert False

            def test_bad_bytes():
                os.write(1, b"bytes \\xff\\xfe\\xc3 on stdout\\n")
                os.write(2, b"bytes \\x80 on stderr\\n")
                assert False
            """
        )
    )
    run = run_dispatched(timeout=120)
    run.result.assert_outcomes(failed=2)
    out = run.result.stdout.str()
    assert "characters of this section were cut" in out
    assert "THE-END" in out
    assert "bytes \ufffd\ufffd\ufffd on stdout" in out
    assert len(out) < 3_000_000
    tests = {t["nodeid"].split("::")[-1]: t for t in run.report["tests"]}
    assert len(tests["test_ten_megabytes"]["call"]["stdout"]) < 1_100_000


def test_a_worker_with_a_different_test_file_is_named(
    pytester, workspace, worker_factory, tmp_path
):
    pytester.makepyfile(
        test_drift="""
        import pytest

        @pytest.mark.queue(QUEUE)
        def test_one():
            pass
        """
    )
    # The worker's checkout has an older copy of the same file.
    other_root = tmp_path / "other-checkout"
    drifted = other_root / pytester.path.name
    drifted.mkdir(parents=True)
    worker = worker_factory(worker_id="worker-old", root=other_root)
    source = (pytester.path / "test_drift.py").read_text().replace("QUEUE", repr(worker.queue))
    (pytester.path / "test_drift.py").write_text(source)
    (drifted / "test_drift.py").write_text(source.replace("pass", "assert True  # older"))
    result = pytester.runpytest_subprocess(
        "--celery-dispatch",
        f"--rootdir={workspace}",
        f"--celery-json-report={pytester.path / 'r.json'}",
        timeout=60,
    )
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(
        [f"*worker-old has a different {pytester.path.name}/test_drift.py (sha256 *"]
    )


@pytest.fixture
def short_consumer_timeout():
    """RabbitMQ's consumer_timeout lowered to 3 s (checked every second) for this test only;
    channels opened meanwhile keep it, so workers must start inside the fixture."""
    rabbitmqctl = shutil.which("rabbitmqctl")
    if rabbitmqctl is None:
        pytest.skip("rabbitmqctl is needed to change consumer_timeout")

    def set_env(key: str, value: int) -> None:
        subprocess.run(
            [rabbitmqctl, "eval", f"application:set_env(rabbit, {key}, {value})."],
            check=True,
            capture_output=True,
            timeout=60,
        )

    set_env("consumer_timeout", 3000)
    set_env("channel_tick_interval", 1000)
    try:
        yield 3.0
    finally:
        set_env("consumer_timeout", 1800000)
        set_env("channel_tick_interval", 60000)


def test_a_test_longer_than_consumer_timeout_is_neither_lost_nor_run_twice(
    pytester, worker_factory, controller, short_consumer_timeout
):
    worker = worker_factory(worker_id="worker-long")
    log = str(pytester.path / "runs.log")
    pytester.makepyfile(
        test_long=f"""
        import time
        import pytest

        pytestmark = pytest.mark.queue({worker.queue!r})

        @pytest.mark.parametrize("n", range(3))
        def test_hardware(n):
            with open({log!r}, "a") as fh:
                fh.write(f"run {{n}}\\n")
            time.sleep(8 if n == 0 else 0.1)  # longer than the broker's 3 s timeout
        """
    )
    ctl = controller()
    assert ctl.wait(120) == 0, ctl.text()
    assert sorted(line[1] for line in log_lines(log)) == ["0", "1", "2"]  # each ran once
    # While the long test ran, a status line said what the queue was doing.
    assert f"celery-dispatch waiting: {worker.queue} " in ctl.text()
    assert " 1 running, " in ctl.text()
    assert worker.proc.poll() is None
    assert "PRECONDITION_FAILED" not in worker.log_path.read_text()

    # Control: the lowered timeout was in force. A task acknowledged late (the demo's
    # task_a) held for 6 s costs its worker the channel.
    from pytest_celery_dispatch.transport import make_app

    witness = worker_factory(worker_id="worker-witness")
    app = make_app(BROKER, "rpc://")
    app.send_task("pytest_celery_dispatch.task_a", kwargs={"duration": 6}, queue=witness.queue)
    app.close()
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and "PRECONDITION_FAILED" not in witness.log_path.read_text():
        time.sleep(0.5)
    assert "PRECONDITION_FAILED" in witness.log_path.read_text()


@TRANSPORTS
def test_a_chunk_taken_beside_a_test_longer_than_the_silence_limit_runs_once(
    pytester, worker_factory, controller, broker
):
    """A slot takes its next chunk while its test runs; that chunk is silent until the test
    ends. With tests longer than SILENCE_LIMIT it must not count as lost (and run twice)."""
    worker = worker_factory(worker_id="worker-soak", broker=broker)
    log = slow_tests(pytester, worker.queue, count=2, sleep=SILENCE_LIMIT + 2)
    ctl = controller(broker=broker)
    assert ctl.wait(120) == 0, ctl.text()
    assert sorted(line[1] for line in log_lines(log) if line[0] == "start") == ["0", "1"]
    assert "re-dispatching" not in ctl.text()
    assert {t["dispatch"]["attempts"] for t in pytester_report(ctl)["tests"]} == {1}


@pytest.mark.usefixtures("workers")
def test_pytest_timeout_thread_method_stops_a_streamed_test(pytester, queues, run_dispatched):
    # The thread method dumps the stacks and ends the runner's process (os._exit): the test
    # fails as crashed, the others run in a new runner, the dump is streamed home.
    pytester.makepyfile(
        test_thread_timeout=queues.render(
            """
            import time
            import pytest

            @pytest.mark.queue("QUEUE_B")
            @pytest.mark.timeout(1, method="thread")
            def test_too_slow():
                time.sleep(30)

            @pytest.mark.queue("QUEUE_B")
            def test_fine():
                pass
            """
        )
    )
    run = run_dispatched("-s", timeout=90)
    run.result.assert_outcomes(passed=1, failed=1)
    run.result.stdout.fnmatch_lines(
        ["[[]worker-b[]] *+ Timeout +*", "*test_too_slow crashed on worker-b*"]
    )
