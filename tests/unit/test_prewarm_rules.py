"""Prewarming: the plan a run leaves for the next (prewarmplan.py), and what a worker checks
before it starts a zygote ahead of a run's slots (prewarm.py)."""

from __future__ import annotations

import hashlib
import os
import types

import pytest

from pytest_celery_dispatch import prewarm, prewarmplan
from pytest_celery_dispatch.health import HealthBook
from pytest_celery_dispatch.names import ENV_PREWARM, ENV_SLOT_GATE, ENV_WORKSPACE
from pytest_celery_dispatch.serialization import PROTOCOL
from pytest_celery_dispatch.slotgate import SlotGate

ARGS = ["--celery-dispatch", "tests"]


# ---------------------------------------------------------------- the plan (controller side)


def test_a_run_leaves_the_tests_of_each_queue_a_worker_served():
    plan = prewarmplan.plan_to_remember(
        ARGS,
        {"queue_a": ["t.py::a"], "queue_b": ["t.py::b"], "nobody": ["t.py::c"]},
        {"queue_a": ["w1", "w2"], "queue_b": ["w3"]},
    )
    assert plan == {
        "args": ARGS,
        "queues": {"queue_a": ["t.py::a"], "queue_b": ["t.py::b"]},
        "workers": {"queue_a": 2, "queue_b": 1},
    }
    assert prewarmplan.plan_to_remember(ARGS, {"nobody": ["t.py::c"]}, {}) is None
    assert prewarmplan.remembered_plan(plan, ARGS) == {
        "queue_a": (["t.py::a"], 2),
        "queue_b": (["t.py::b"], 1),
    }


def test_only_a_run_with_the_same_arguments_goes_by_the_plan():
    plan = prewarmplan.plan_to_remember(ARGS, {"q": ["t.py::a"]}, {"q": ["w"]})
    assert prewarmplan.remembered_plan(plan, [*ARGS, "-k", "slow"]) == {}
    assert prewarmplan.remembered_plan(None, ARGS) == {}


@pytest.mark.parametrize(
    ("queues", "workers"),
    [
        ({"q": "t.py::a"}, {"q": 1}),  # not a list of nodeids
        ({"q": ["t.py::a", 3]}, {"q": 1}),
        ({"q": []}, {"q": 1}),
        ({"q": ["t.py::a"]}, {"q": 0}),
        ({"q": ["t.py::a"]}, {"q": "1"}),
        ({"": ["t.py::a"]}, {"": 1}),
    ],
)
def test_a_plan_that_looks_wrong_is_not_followed(queues, workers):
    cached = {"args": ARGS, "queues": queues, "workers": workers}
    assert prewarmplan.remembered_plan(cached, ARGS) == {}


def test_one_prewarm_per_worker_that_served_the_queue_up_to_a_bound():
    cached = {"args": ARGS, "queues": {"q": ["t.py::a"]}, "workers": {"q": 50}}
    assert prewarmplan.remembered_plan(cached, ARGS) == {
        "q": (["t.py::a"], prewarmplan.MAX_PER_QUEUE)
    }


class FakePayloads:
    stream = False

    def for_slot(self, slot_id, queue, nodeids):
        return {"session_id": slot_id, "queue": queue, "nodeids": nodeids, "ship": {"mode": "auto"}}


def test_a_prewarm_is_a_slot_payload_without_the_tree():
    payload = prewarmplan.prewarm_payload(FakePayloads(), "q", ["t.py::a"])  # type: ignore[arg-type]
    assert payload == {"session_id": "prewarm-q", "queue": "q", "nodeids": ["t.py::a"]}


@pytest.mark.parametrize(
    ("stream", "mode", "cache"),
    [(True, "auto", {}), (False, "always", {}), (False, "auto", None)],
    ids=["-s: no zygote", "--celery-ship always: never in place", "no cache"],
)
def test_no_prewarm_where_a_worker_could_not_use_it(stream, mode, cache):
    payloads = FakePayloads()
    payloads.stream = stream
    assert prewarmplan.start_prewarm(object(), cache, ARGS, payloads, mode) is None  # type: ignore[arg-type]


class FakeApp:
    def __init__(self):
        self.sent = []

    def send_task(self, name, **options):
        self.sent.append((name, options))


class FakeCache:
    def __init__(self, value):
        self.value = value

    def get(self, key, default):
        return self.value if key == prewarmplan.PLAN_KEY else default


def test_the_plan_s_prewarms_leave_as_tasks_that_expire():
    app = FakeApp()
    cache = FakeCache({"args": ARGS, "queues": {"q": ["t.py::a"]}, "workers": {"q": 2}})
    thread = prewarmplan.start_prewarm(app, cache, ARGS, FakePayloads(), "auto")  # type: ignore[arg-type]
    assert thread is not None
    thread.join(10)
    assert [name for name, _ in app.sent] == ["pytest_celery_dispatch.prewarm"] * 2
    options = app.sent[0][1]
    assert options["queue"] == options["routing_key"] == "q"
    assert options["expires"] == options["expiration"] == prewarmplan.PREWARM_EXPIRES
    assert options["serializer"] == "json"
    assert options["args"][0]["nodeids"] == ["t.py::a"]


def test_the_plan_s_prewarms_say_which_tests_each_queue_was_sent():
    app, sent = FakeApp(), {}
    cache = FakeCache({"args": ARGS, "queues": {"q": ["t.py::a"]}, "workers": {"q": 1}})
    thread = prewarmplan.start_prewarm(app, cache, ARGS, FakePayloads(), "auto", sent)  # type: ignore[arg-type]
    assert thread is not None
    thread.join(10)
    assert sent == {"q": ["t.py::a"]}


class SeeingApp(FakeApp):
    """Sees what ``sent`` says as each prewarm goes, or fails to."""

    def __init__(self, sent, fail=False):
        super().__init__()
        self.said, self.fail, self.seen = sent, fail, []

    def send_task(self, name, **options):
        self.seen.append(dict(self.said))
        if self.fail:
            raise ConnectionError("broker gone")
        super().send_task(name, **options)


def test_a_queue_s_prewarm_is_said_sent_as_it_goes_and_taken_back_if_it_fails():
    """The session's prewarms once collected skip what the plan's thread says it sent: saying
    it only after the send left a window for the same prewarm twice."""
    cache = FakeCache({"args": ARGS, "queues": {"q": ["t.py::a"]}, "workers": {"q": 1}})
    sent: dict[str, list[str]] = {}
    app = SeeingApp(sent)
    thread = prewarmplan.start_prewarm(app, cache, ARGS, FakePayloads(), "auto", sent)  # type: ignore[arg-type]
    assert thread is not None
    thread.join(10)
    assert app.seen == [{"q": ["t.py::a"]}]
    failing: dict[str, list[str]] = {}
    app = SeeingApp(failing, fail=True)
    thread = prewarmplan.start_prewarm(app, cache, ARGS, FakePayloads(), "auto", failing)  # type: ignore[arg-type]
    assert thread is not None
    thread.join(10)
    assert app.seen == [{"q": ["t.py::a"]}]
    assert failing == {}


def test_once_collected_a_queue_whose_tests_no_prewarm_named_is_prewarmed():
    """A run without a plan (no cache: a CI job), or whose tests are not its plan's: one
    prewarm per consumer of each queue that has one, up to the bound; none for a queue the
    plan's prewarms named with the same tests."""
    app = FakeApp()
    queues = {
        "planned": ["t.py::a"],
        "changed": ["t.py::b", "t.py::c"],
        "new": ["t.py::d"],
        "nobody": ["t.py::e"],
        "crowded": ["t.py::f"],
    }
    workers = {"planned": 1, "changed": 2, "new": 1, "nobody": 0, "crowded": 50}
    sent = {"planned": ["t.py::a"], "changed": ["t.py::b"]}
    prewarmed = prewarmplan.prewarm_collected(app, FakePayloads(), "auto", queues, workers, sent)  # type: ignore[arg-type]
    assert prewarmed == ["changed", "new", "crowded"]
    by_queue = [(o["queue"], o["args"][0]["nodeids"]) for _, o in app.sent]
    assert by_queue == [
        ("changed", ["t.py::b", "t.py::c"]),
        ("changed", ["t.py::b", "t.py::c"]),
        ("new", ["t.py::d"]),
        *[("crowded", ["t.py::f"])] * prewarmplan.MAX_PER_QUEUE,
    ]
    assert all(o["expires"] == prewarmplan.PREWARM_EXPIRES for _, o in app.sent)


@pytest.mark.parametrize(("stream", "mode"), [(True, "auto"), (False, "always")])
def test_once_collected_no_prewarm_where_a_worker_could_not_use_it(stream, mode):
    app, payloads = FakeApp(), FakePayloads()
    payloads.stream = stream
    assert (
        prewarmplan.prewarm_collected(app, payloads, mode, {"q": ["t.py::a"]}, {"q": 1}, {}) == []
    )  # type: ignore[arg-type]
    assert app.sent == []


# ---------------------------------------------------------------- the worker's checks


class FakeZygotes:
    def __init__(self):
        self.specs = []

    def prewarm(self, spec, hung_after):
        self.specs.append((spec, hung_after))
        return object()


class FakeSpares:
    def prepare(self, *args, **kwargs):
        pass


@pytest.fixture
def bench(tmp_path, monkeypatch):
    """A worker's workspace with one test file, its slot gate (one slot) and health book."""
    ws = tmp_path / "ws"
    ws.mkdir()
    (ws / "test_a.py").write_text("def test_x(): pass\n")
    gate = tmp_path / "gate"
    gate.mkdir()
    monkeypatch.setenv(ENV_WORKSPACE, str(ws))
    monkeypatch.setenv(ENV_SLOT_GATE, str(gate))
    monkeypatch.delenv(ENV_PREWARM, raising=False)
    return types.SimpleNamespace(ws=ws, gate=gate)


def task():
    return types.SimpleNamespace(
        request=types.SimpleNamespace(id="tid", hostname="w@h", delivery_info={})
    )


def payload(bench, **changes):
    digest = hashlib.sha256((bench.ws / "test_a.py").read_bytes()).hexdigest()
    found = {
        "protocol": PROTOCOL,
        "run_id": "run1",
        "queue": "q",
        "nodeids": ["test_a.py::test_x"],
        "files": {"test_a.py": digest},
        "timeout": 30,
        "pytest_args": ["--tb=short"],
    }
    found.update(changes)
    return found


def test_a_worker_with_a_free_slot_starts_the_zygote_of_the_run_s_tests(bench):
    """In the background: the task (and its pool process) is done before the zygote listens,
    so a plain task sent to the worker meanwhile does not wait for it."""
    zygotes, later = FakeZygotes(), []
    done = prewarm.prewarm_zygote(task(), payload(bench), zygotes, FakeSpares(), later.append)  # type: ignore[arg-type]
    assert done == "starting a zygote for 1 tests"
    assert zygotes.specs == []
    (start,) = later
    start()
    ((spec, hung_after),) = zygotes.specs
    assert spec.key == "run1/q"  # the key and fields run_session's slots make their zygote of
    assert spec.nodeids == ["test_a.py::test_x"]
    assert spec.workspace == os.path.realpath(bench.ws)
    assert spec.pytest_args == ["--tb=short"]
    assert hung_after >= 30  # as long as a slot waits for its fork


class BrokenZygotes(FakeZygotes):
    def prewarm(self, spec, hung_after):
        raise OSError("no room left on the device")


def test_a_zygote_that_cannot_start_is_said_in_the_worker_log(bench, caplog):
    """The task has ended when its zygote starts: what goes wrong is logged, not raised into
    the thread."""
    later = []
    prewarm.prewarm_zygote(task(), payload(bench), BrokenZygotes(), FakeSpares(), later.append)  # type: ignore[arg-type]
    (start,) = later
    with caplog.at_level("WARNING", logger="pytest_celery_dispatch.worker"):
        start()
    assert "prewarm: no zygote started: no room left on the device" in caplog.messages


@pytest.mark.parametrize(
    ("case", "expected"),
    [
        ("off", "off (DISPATCH_PREWARM=0)"),
        ("protocol", "not a prewarm of this worker's protocol"),
        ("busy", "every slot busy"),
        ("quarantined", "quarantined"),
        ("different bytes", "the run's tests are not this workspace's"),
        ("outside", "the run's tests are not this workspace's"),
        ("bad timeout", "not a prewarm of this worker's protocol"),
    ],
)
def test_nothing_starts_where_the_run_s_slot_would_not_run_it(bench, monkeypatch, case, expected):
    changes: dict = {}
    lease = None
    if case == "off":
        monkeypatch.setenv(ENV_PREWARM, "0")
    elif case == "protocol":
        changes["protocol"] = PROTOCOL + 1
    elif case == "busy":  # another run's session holds the bench's one slot
        lease = SlotGate(str(bench.gate), 1).acquire()
    elif case == "quarantined":
        with HealthBook(str(bench.gate)).changing() as state:
            state["quarantine"] = {"reason": "board unplugged"}
    elif case == "different bytes":
        changes["files"] = {"test_a.py": "0" * 64}
    elif case == "outside":
        changes["nodeids"] = ["../elsewhere/test_b.py::test_y"]
    elif case == "bad timeout":
        changes["timeout"] = "soon"
    zygotes = FakeZygotes()
    try:
        done = prewarm.prewarm_zygote(task(), payload(bench, **changes), zygotes, FakeSpares())  # type: ignore[arg-type]
    finally:
        if lease is not None:
            lease.release()
    assert done == expected
    assert zygotes.specs == []


def test_a_run_s_selection_is_its_paths_and_selection_options_not_its_report_files():
    def config(args, **options):
        base = {"keyword": "", "markexpr": "", "lf": False, "junitxml": "a.xml"}
        return types.SimpleNamespace(args=args, option=types.SimpleNamespace(**{**base, **options}))

    same = prewarmplan.selection(config(["tests"], junitxml="job-1.xml"))
    assert same == prewarmplan.selection(config(["tests"], junitxml="job-2.xml")) == ["tests"]
    assert prewarmplan.selection(config(["tests"], keyword="slow")) == ["tests", "keyword=slow"]
    assert prewarmplan.selection(config(["tests"], lf=True)) == ["tests", "lf=True"]
    assert prewarmplan.selection(config(["tests/a.py"])) != same
