"""Wire format shared by the controller, the worker task and the runner: JSON only.

Reports travel as pytest's own ``pytest_report_to_serializable`` dicts inside a small envelope.
A value ``json.dumps`` rejects is replaced by its ``str()`` (the pytest-reportlog habit), so a
test that puts an odd object in ``user_properties`` still gets its report home.

PYTEST_DONT_REWRITE: spare runners import it before pytest configures (see spare_boot.py).
"""

from __future__ import annotations

import hashlib
import json
import os
import posixpath
from typing import Any, Literal, TypedDict

from .names import SLOT_TASK
from .names import reply_queue_name as reply_queue_name
from .names import stop_queue_name as stop_queue_name
from .names import work_queue_name as work_queue_name


class DispatchError(Exception):
    """An infrastructure failure that ends a dispatched test (worker lost, no consumer...)."""

    __module__ = "pytest_celery_dispatch"


PROTOCOL = 1
SESSION_TASK = SLOT_TASK
#: A running batch sends an ``alive`` event this often (seconds).
HEARTBEAT_INTERVAL = 2.0

EventType = Literal[
    "session_started",  # a worker slot took the session; its runner is starting
    "session_finished",  # the work queue ran dry; the runner tore its fixtures down
    "started",  # the session took a chunk (batch_id) from the work queue
    "finished",  # every test of that chunk ended
    "alive",  # heartbeat of a session, naming the chunk it works on
    "logstart",  # a test began (runner)
    "report",  # one phase report (runner)
    "logfinish",  # a test ended (runner)
    "crashed",  # the runner died or was killed while running a test
    "missing",  # nodeids the worker could not collect
    "refused",  # nodeids the worker refused (outside its workspace, a different file)
    "output",  # what tests printed, streamed as it comes (-s on the controller)
    "warning",  # a warning recorded on the worker
    "results",  # finished tests sent together: each with its location, times and reports
    "shipped",  # where a slot runs the tests: in place, up to date, shipped (see shipworker)
    "ship_wanted",  # blobs a slot lacks: the controller sends them to its blob queue
    "ship_progress",  # a slot receiving blobs is alive
    "artifact_chunk",  # a piece of a test's file (artifactship): name, offset, base64 data
    "artifacts",  # a test's files as sent: name, size, bytes, sha256, cut (before its results)
]


class SessionPayload(TypedDict):
    """The single argument of the ``run_session`` task."""

    protocol: int
    run_id: str
    reply_to: str
    work_queue: str
    session_id: str
    queue: str
    nodeids: list[str]  # every test of the run on this queue: what the runner collects
    timeout: float
    pytest_args: list[str]
    files: dict[str, str]  # test file (workspace-relative) -> sha256 of its bytes
    stream: bool  # -s on the controller: stream the tests' output as it comes
    plugin_options: dict[str, Any]  # other plugins' option values, applied if they exist there
    identity: dict[str, Any]  # who the run is (identity.Identity): workers log it
    ship: dict[str, Any]  # the run's tree: mode, the manifest's digest and size (see shipworker)
    health: list[str]  # ini celery_dispatch_health: the run's health tests (see health.py)
    health_every: float | None  # ini celery_dispatch_health_every (minutes)
    artifacts: dict[str, Any]  # artifactpaths.Limits: what a test may bring home


class Chunk(TypedDict):
    """One message on a run's work queue: tests for whichever session takes it."""

    batch_id: str
    attempt: int
    nodeids: list[str]


class Event(TypedDict, total=False):
    """One message on the per-run reply queue."""

    protocol: int
    type: EventType
    run_id: str
    batch_id: str
    session_id: str
    queue: str
    worker: str
    hostname: str
    task_id: str
    pid: int
    ts: float
    nodeid: str
    nodeids: list[str]
    location: list[Any]
    report: dict[str, Any]
    reason: str
    message: str
    data: str  # output
    category: str  # warning
    filename: str  # warning
    lineno: int  # warning
    when: str  # warning
    elapsed: float  # alive: how long the current test has run
    tests: list[dict[str, Any]]  # results
    concurrency: int  # session_started: the worker's slots
    ship: dict[str, Any]  # shipped: what the slot found and did
    blobs: list[str]  # ship_wanted: sha256 of each blob
    blob_queue: str  # ship_wanted
    name: str  # artifact_chunk: the file, relative to its test's folder
    offset: int  # artifact_chunk
    files: list[dict[str, Any]]  # artifacts


def dumps(obj: Any) -> str:
    return json.dumps(obj, default=str, ensure_ascii=False)


def loads(text: str | bytes) -> Any:
    return json.loads(text)


def encode_text(obj: Any) -> bytes:
    """:func:`dumps` as UTF-8 bytes; a lone surrogate from odd output becomes ``?``."""
    return dumps(obj).encode("utf-8", "replace")


class RawTest:
    """A finished test as its runner encoded it, relayed home by the slot without a decode.

    ``data`` is the JSON object of one entry of a ``results`` event's ``tests``; the slot keeps
    the two fields it reads (``nodeid``, ``outcome``: its log lines) beside it.
    """

    __slots__ = ("data", "nodeid", "outcome")

    def __init__(self, nodeid: str, outcome: str, data: bytes) -> None:
        self.nodeid = nodeid
        self.outcome = outcome
        self.data = data

    @classmethod
    def spliced(cls, nodeid: str, outcome: str, batch_id: str, fields: bytes) -> RawTest:
        """The runner's encoded fields (a JSON object's members, no braces) with the chunk
        the slot ran the test for."""
        return cls(nodeid, outcome, b'{"batch_id":%s,%s}' % (encode_text(batch_id), fields))


def encode_event(body: dict[str, Any]) -> bytes:
    """One event as the bytes of its message: a ``results`` event's :class:`RawTest` entries
    are spliced in as they are (a test's reports are encoded once, in its runner)."""
    tests = body.get("tests")
    if not tests or not any(isinstance(t, RawTest) for t in tests):
        return encode_text(body)
    head = encode_text({k: v for k, v in body.items() if k != "tests"})
    entries = b",".join(t.data if isinstance(t, RawTest) else encode_text(t) for t in tests)
    return b'%s%s"tests":[%s]}' % (head[:-1], b"," if len(head) > 2 else b"", entries)


class UnsafeNodeId(ValueError):
    """A nodeid that would reach outside the worker's workspace."""


def file_digest(path: str) -> str:
    """sha256 of a file's bytes: the worker must run the very file the controller collected."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def nodeid_path(nodeid: str) -> str:
    """The file part of a nodeid (``a/test_x.py::T::t[p::q]`` -> ``a/test_x.py``)."""
    return nodeid.split("::", 1)[0]


def check_nodeid(nodeid: str) -> str:
    """Refuse nodeids that are absolute or climb out of the workspace; return the file part."""
    if not isinstance(nodeid, str) or not nodeid or "\x00" in nodeid:
        raise UnsafeNodeId(f"invalid nodeid {nodeid!r}")
    path = nodeid_path(nodeid)
    if path.startswith(("/", "\\")) or (len(path) > 1 and path[1] == ":") or "\\" in path:
        raise UnsafeNodeId(f"nodeid {nodeid!r} is an absolute path; nodeids are workspace-relative")
    normalized = posixpath.normpath(path)
    if normalized == ".." or normalized.startswith("../"):
        raise UnsafeNodeId(f"nodeid {nodeid!r} points outside the worker's workspace")
    return path


def confine(workspace: str, nodeid: str) -> str:
    """Absolute path of a nodeid's file inside ``workspace`` (symlinks resolved), or raise."""
    rel = check_nodeid(nodeid)
    root = os.path.realpath(workspace)
    full = os.path.realpath(os.path.join(root, rel))
    if full != root and not full.startswith(root + os.sep):
        raise UnsafeNodeId(f"nodeid {nodeid!r} resolves outside the worker's workspace {root}")
    return full
