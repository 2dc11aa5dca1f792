"""Bad input gets a clear error; JSON only on the wire; passwords masked; nodeids confined."""

from __future__ import annotations

import contextlib
import json
import shutil
import subprocess
import time
import uuid
import xml.etree.ElementTree as ET

import pytest
from kombu import Connection, Consumer, Exchange, Producer, Queue

from pytest_celery_dispatch.serialization import PROTOCOL, SESSION_TASK
from tests.helpers import BROKER


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--celery-timeout=-1"], "invalid value '-1' for --celery-timeout: expected a number"),
        (["--celery-timeout=abc"], "invalid value 'abc' for --celery-timeout"),
        (["--celery-retries=two"], "invalid value 'two' for --celery-retries: expected a whole"),
        (["--celery-wait-workers=-3"], "invalid value '-3' for --celery-wait-workers"),
        (["--celery-default-queue=bad queue"], "invalid value 'bad queue' for --celery-default"),
        (
            ["--celery-broker=amqp://u:hunter2@host:notaport//"],
            "invalid value 'amqp://u:**@host:notaport//' for --celery-broker",
        ),
        (["--celery-broker=http://example.invalid/"], "expected a broker URL like"),
        (
            ["--celery-json-report=/nonexistent-dir/r.json"],
            "cannot write the JSON report '/nonexistent-dir/r.json': its directory "
            "/nonexistent-dir does not exist",
        ),
        (["--pdb"], "--pdb cannot debug a test that runs on a remote worker"),
        (["-n", "2"], "pytest-xdist's -n/--dist cannot be combined with --celery-dispatch"),
    ],
    ids=[
        "negative-timeout",
        "text-timeout",
        "text-retries",
        "negative-wait",
        "bad-queue-name",
        "bad-port",
        "bad-scheme",
        "unwritable-report",
        "pdb",
        "xdist",
    ],
)
def test_bad_options_are_usage_errors_before_any_test_runs(pytester, args, expected):
    pytester.makepyfile(
        test_x="""
        def test_would_write_a_file(tmp_path_factory):
            open("ran.txt", "w").write("ran")
        """
    )
    result = pytester.runpytest_subprocess("--celery-dispatch", *args, timeout=60)
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines([f"ERROR: celery-dispatch: *{expected}*"])
    assert "hunter2" not in result.stderr.str() + result.stdout.str()
    assert "Traceback" not in result.stderr.str()
    assert not (pytester.path / "ran.txt").exists()


def test_wrong_credentials_fail_fast_with_a_hint(pytester):
    pytester.makepyfile(
        test_creds="""
        import pytest

        @pytest.mark.queue("anything")
        def test_remote():
            pass
        """
    )
    result = pytester.runpytest_subprocess(
        "--celery-dispatch",
        "--celery-broker=amqp://guest:not-the-password@127.0.0.1:5672//",
        f"--celery-json-report={pytester.path / 'r.json'}",
        timeout=60,
    )
    assert result.ret == 1
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(
        [
            "*cannot reach the broker amqp://guest:**@127.0.0.1:5672//*ACCESS_REFUSED*"
            "*check the user name and password*"
        ]
    )
    assert "not-the-password" not in result.stdout.str()


@pytest.mark.usefixtures("workers")
def test_unknown_queue_in_a_declared_list_is_an_error_for_that_test(
    pytester, queues, run_dispatched
):
    pytester.makeini(
        f"""
        [pytest]
        celery_dispatch_queues =
            {queues.a}
            {queues.b}
        """
    )
    pytester.makepyfile(
        test_declared=queues.render(
            """
            import pytest

            @pytest.mark.queue("queue_typo")
            def test_typo():
                pass

            @pytest.mark.queue("QUEUE_A")
            def test_known():
                pass
            """
        )
    )
    run = run_dispatched()
    run.result.assert_outcomes(passed=1, errors=1)
    run.result.stdout.fnmatch_lines(
        [
            "*@pytest.mark.queue('queue_typo'): 'queue_typo' is an unknown queue; "
            "ini celery_dispatch_queues allows*"
        ]
    )


def test_a_typo_in_an_ini_route_names_the_setting_and_the_close_declared_queue(
    pytester, queues, run_dispatched
):
    typo = queues.a + "x"
    pytester.makeini(
        f"""
        [pytest]
        celery_dispatch_queues =
            {queues.a}
            {queues.b}
        celery_dispatch_routes =
            test_routed.py = {typo}
        """
    )
    pytester.makepyfile(test_routed="def test_x(): pass")
    run = run_dispatched()
    assert run.result.ret == pytest.ExitCode.USAGE_ERROR
    run.result.stderr.fnmatch_lines(
        [
            f"*celery-dispatch: ini celery_dispatch_routes: route 'test_routed.py': '{typo}' is "
            f"an unknown queue (did you mean {queues.a}?); ini celery_dispatch_queues allows "
            f"{queues.a}, {queues.b}. Fix the name or add the queue there.*"
        ]
    )


# ---------------------------------------------------------------------------- the wire


def _send_raw(queue: str, body, serializer_content_type: str, task_id: str) -> None:
    """Publish a task message the way Celery's protocol 2 frames it, with any content type."""
    with Connection(BROKER) as conn:
        producer = Producer(conn.channel())
        producer.publish(
            body,
            exchange=Exchange(queue, type="direct"),
            routing_key=queue,
            content_type=serializer_content_type,
            content_encoding="binary" if "pickle" in serializer_content_type else "utf-8",
            headers={"lang": "py", "task": SESSION_TASK, "id": task_id, "root_id": task_id},
            declare=[Queue(queue, Exchange(queue, type="direct"), routing_key=queue)],
        )


def _payload(run_id: str, reply_to: str, queue: str, nodeids: list[str]) -> dict:
    return {
        "protocol": PROTOCOL,
        "run_id": run_id,
        "reply_to": reply_to,
        "work_queue": f"{reply_to}-work",
        "session_id": f"{run_id}.s1",
        "queue": queue,
        "nodeids": nodeids,
        "timeout": 30,
        "pytest_args": [],
        "files": {},
    }


def _put_work(reply_to: str, nodeids: list[str]) -> None:
    """The run's work queue, holding one chunk with these nodeids."""
    name = f"{reply_to}-work"
    with Connection(BROKER) as conn:
        channel = conn.channel()
        Queue(name, Exchange("", type="direct"), routing_key=name, auto_delete=False)(
            channel
        ).declare()
        Producer(channel).publish(
            {"batch_id": "b1", "attempt": 1, "nodeids": nodeids},
            exchange="",
            routing_key=name,
            serializer="json",
        )


def _reply_queue(name: str) -> Queue:
    return Queue(
        name, Exchange("", type="direct"), routing_key=name, durable=False, auto_delete=True
    )


def _collect(reply: str, until: float) -> list[dict]:
    events: list[dict] = []
    with (
        Connection(BROKER) as conn,
        Consumer(
            conn.channel(),
            queues=[_reply_queue(reply)],
            accept=["json"],
            callbacks=[
                lambda body, msg: (
                    events.append(json.loads(body) if isinstance(body, (str, bytes)) else body),
                    msg.ack(),
                )
            ],
        ),
    ):
        deadline = time.monotonic() + until
        while time.monotonic() < deadline:
            with contextlib.suppress(TimeoutError):
                conn.drain_events(timeout=0.2)
            if any(e.get("type") == "session_finished" for e in events):
                break
    return events


def test_a_pickle_message_is_refused_and_the_worker_stays_up(pytester, worker_factory):
    import pickle

    marker = pytester.path / "pwned.txt"
    worker = worker_factory(worker_id="worker-json")
    pytester.makepyfile(
        test_payload=f"""
        def test_would_run():
            open({str(marker)!r}, "w").write("ran")
        """
    )
    run_id = uuid.uuid4().hex[:12]
    reply = f"cdtest-reply-{run_id}"
    nodeid = f"{pytester.path.name}/test_payload.py::test_would_run"
    body = pickle.dumps(([_payload(run_id, reply, worker.queue, [nodeid])], {}, {}))
    with Connection(BROKER) as conn:
        _reply_queue(reply)(conn.channel()).declare()
    _send_raw(worker.queue, body, "application/x-python-serialize", f"pickle-{run_id}")
    time.sleep(3)
    log = worker.log_path.read_text()
    assert "Refusing to deserialize untrusted content of type pickle" in log
    assert not marker.exists()
    assert worker.proc.poll() is None
    # Still serving: the same payload as JSON runs.
    _put_work(reply, [nodeid])
    json_body = json.dumps([[_payload(run_id, reply, worker.queue, [nodeid])], {}, {}])
    _send_raw(worker.queue, json_body, "application/json", f"json-{run_id}")
    events = _collect(reply, until=30)
    assert "finished" in [e["type"] for e in events], events
    assert marker.read_text() == "ran"


@pytest.mark.parametrize(
    "bad",
    ["../outside/test_x.py::test_y", "/etc/passwd::x", "sub/../../escape.py::t"],
)
def test_nodeids_outside_the_workspace_are_refused(pytester, worker_factory, bad):
    worker = worker_factory(worker_id="worker-conf")
    run_id = uuid.uuid4().hex[:12]
    reply = f"cdtest-reply-{run_id}"
    with Connection(BROKER) as conn:
        _reply_queue(reply)(conn.channel()).declare()
    body = json.dumps([[_payload(run_id, reply, worker.queue, [bad])], {}, {}])
    _send_raw(worker.queue, body, "application/json", f"conf-{run_id}")
    events = _collect(reply, until=30)
    assert [e["type"] for e in events] == ["refused", "session_started", "session_finished"]
    assert bad in events[0]["reason"]
    assert events[0]["nodeids"] == [bad]
    assert "workspace" in events[0]["reason"] or "absolute" in events[0]["reason"]


@pytest.fixture
def secret_user():
    """A broker user whose password is distinctive enough to grep for."""
    rabbitmqctl = shutil.which("rabbitmqctl")
    if rabbitmqctl is None:
        pytest.skip("rabbitmqctl is needed to create a broker user")
    user = f"cdtest-{uuid.uuid4().hex[:6]}"
    password = f"pw-{uuid.uuid4().hex}"
    subprocess.run([rabbitmqctl, "add_user", user, password], check=True, capture_output=True)
    try:
        subprocess.run(
            [rabbitmqctl, "set_permissions", "-p", "/", user, ".*", ".*", ".*"],
            check=True,
            capture_output=True,
        )
        yield user, password
    finally:
        subprocess.run([rabbitmqctl, "delete_user", user], capture_output=True)


def test_the_broker_password_appears_nowhere(pytester, workspace, worker_factory, secret_user):
    user, password = secret_user
    url = f"amqp://{user}:{password}@127.0.0.1:5672//"
    worker = worker_factory(worker_id="worker-secret", broker=url)
    pytester.makepyfile(
        test_secret=f"""
        import pytest

        @pytest.mark.queue({worker.queue!r})
        def test_fails_loudly():
            print("some output")
            assert False

        @pytest.mark.queue("cdtest-nobody-{uuid.uuid4().hex[:6]}")
        def test_no_consumer():
            pass
        """
    )
    report = pytester.path / "report.json"
    junit = pytester.path / "junit.xml"
    events = pytester.path / "events.jsonl"
    result = pytester.runpytest_subprocess(
        "--celery-dispatch",
        f"--celery-broker={url}",
        f"--rootdir={workspace}",
        f"--celery-json-report={report}",
        f"--celery-event-log={events}",
        f"--junitxml={junit}",
        "--celery-wait-workers=1",
        "-v",
        "-rA",
        timeout=90,
    )
    result.assert_outcomes(failed=2)
    ET.parse(junit)  # well-formed
    seen = {
        "terminal": result.stdout.str() + result.stderr.str(),
        "json report": report.read_text(),
        "event log": events.read_text(),
        "junit": junit.read_text(),
        "worker log": worker.log_path.read_text(),
    }
    for where, text in seen.items():
        assert password not in text, f"password printed in the {where}"
    assert f"amqp://{user}:**@127.0.0.1:5672//" in seen["terminal"]
