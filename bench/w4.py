"""W4: the documented task_a / task_b run, timed from send to both results.

``task_a`` goes to queue_a (worker-a) and ``task_b`` to queue_b (worker-b) at once, with
explicit durations. The overhead of a repeat is its wall time minus the slower task's own
``execution_time`` (measured inside the worker around its sleep). Two paths are timed,
alternating: the project's ``dispatcher`` fixture (``Dispatcher.gather``, what
``example_tests/test_dispatch.py`` does) and the plain Celery app (``send_task`` + ``get``).
"""

from __future__ import annotations

import statistics
import time
from typing import Any

from . import procs

TASK_A = "pytest_celery_dispatch.task_a"
TASK_B = "pytest_celery_dispatch.task_b"
EXPECTED = {
    "a": ("Hello from Task A", "queue_a", "worker-a"),
    "b": ("Hello from Task B", "queue_b", "worker-b"),
}


def _check(tag: str, result: dict[str, Any]) -> list[str]:
    message, queue, worker = EXPECTED[tag]
    problems = []
    if result.get("message") != message:
        problems.append(f"task_{tag}: message {result.get('message')!r}")
    if result.get("queue") != queue:
        problems.append(f"task_{tag}: queue {result.get('queue')!r}, expected {queue}")
    if worker not in str(result.get("worker")):
        problems.append(f"task_{tag}: worker {result.get('worker')!r}, expected {worker}")
    return problems


def _via_dispatcher(dispatcher: Any, durations: tuple[float, float]) -> tuple[float, Any, Any]:
    start = time.perf_counter()
    a, b = dispatcher.gather(
        [
            (TASK_A, "queue_a", {"duration": durations[0]}),
            (TASK_B, "queue_b", {"duration": durations[1]}),
        ],
        timeout=60,
    )
    wall = time.perf_counter() - start
    return wall, a.result, b.result


def _via_app(app: Any, durations: tuple[float, float]) -> tuple[float, Any, Any]:
    start = time.perf_counter()
    ra = app.send_task(TASK_A, kwargs={"duration": durations[0]}, queue="queue_a")
    rb = app.send_task(TASK_B, kwargs={"duration": durations[1]}, queue="queue_b")
    a = ra.get(timeout=60)
    b = rb.get(timeout=60)
    wall = time.perf_counter() - start
    return wall, a, b


def run(broker: str, repeats: int, durations: tuple[float, float] = (0.5, 0.8)) -> dict[str, Any]:
    from pytest_celery_dispatch.fixtures import Dispatcher
    from pytest_celery_dispatch.transport import make_app

    # One app per path: once AsyncResult.get() has started the rpc backend's result consumer,
    # results are pushed to that consumer and Dispatcher.gather's ready() polling (basic_get)
    # never sees them. The dispatcher fixture has an app of its own too (dispatch_app).
    dispatcher_app = make_app(broker, "rpc://", name="bench-w4-dispatcher")
    app = make_app(broker, "rpc://", name="bench-w4-direct")
    dispatcher = Dispatcher(dispatcher_app, dispatching=False)
    samples: list[dict[str, Any]] = []
    problems: list[str] = []
    try:
        # Untimed: connections, the rpc reply queue and the workers' first task.
        _via_dispatcher(dispatcher, (0.0, 0.0))
        _via_app(app, (0.0, 0.0))
        for index in range(repeats):
            for path in ("dispatcher", "direct"):
                if path == "dispatcher":
                    wall, a, b = _via_dispatcher(dispatcher, durations)
                else:
                    wall, a, b = _via_app(app, durations)
                problems += _check("a", a) + _check("b", b)
                slower = max(float(a["execution_time"]), float(b["execution_time"]))
                overlap = a["started_at"] < b["finished_at"] and b["started_at"] < a["finished_at"]
                if not overlap:
                    problems.append(
                        f"repeat {index + 1} ({path}): task_a and task_b did not overlap"
                    )
                samples.append(
                    {
                        "repeat": index + 1,
                        "path": path,
                        "wall": wall,
                        "execution_time_a": float(a["execution_time"]),
                        "execution_time_b": float(b["execution_time"]),
                        "slower": slower,
                        "overhead_ms": (wall - slower) * 1000.0,
                        "overlap": bool(overlap),
                        "worker_a": a.get("worker"),
                        "worker_b": b.get("worker"),
                    }
                )
    except BaseException as exc:  # pytest.fail() in gather is a BaseException
        if isinstance(exc, KeyboardInterrupt | SystemExit | procs.Terminated):
            raise
        problems.append(f"W4 stopped: {type(exc).__name__}: {exc}")
    finally:
        dispatcher_app.close()
        app.close()
    paths: dict[str, Any] = {}
    for path in ("dispatcher", "direct"):
        rows = [s for s in samples if s["path"] == path]
        if not rows:
            continue
        overheads = [s["overhead_ms"] for s in rows]
        paths[path] = {
            "median_wall": statistics.median(s["wall"] for s in rows),
            "median_slower": statistics.median(s["slower"] for s in rows),
            "median_overhead_ms": statistics.median(overheads),
            "min_overhead_ms": min(overheads),
            "max_overhead_ms": max(overheads),
        }
    return {
        "durations": list(durations),
        "repeats": repeats,
        "samples": samples,
        "paths": paths,
        "ok": not problems,
        "problems": problems,
    }
