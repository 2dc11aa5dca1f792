"""The original demo's example tasks, ``task_a`` (``queue_a``) and ``task_b`` (``queue_b``).

Each simulates some work and says who did it, where and when. :mod:`.worker` registers them on
the worker app under their names (``pytest_celery_dispatch.task_a`` / ``task_b``); the bundled
``example_tests/test_dispatch.py`` sends them with the ``dispatcher`` fixture.
"""

from __future__ import annotations

import logging
import random
import time
from datetime import datetime, timezone
from typing import Any

from celery import Celery, Task

from .names import TASK_A, TASK_B
from .workerinfo import queue_of, worker_id

#: The worker's logger: the demo's log lines read as the worker's own.
log = logging.getLogger("pytest_celery_dispatch.worker")


def demo_work(task: Task, message: str, duration: float | None) -> dict[str, Any]:
    """Simulate some work, like the original demo, and say who did it, where and when."""
    seconds = random.uniform(1.0, 2.0) if duration is None else max(0.0, float(duration))
    started_at = time.time()
    begin = time.perf_counter()
    time.sleep(seconds)
    execution_time = time.perf_counter() - begin
    finished_at = time.time()
    result = {
        "message": message,
        "worker": worker_id(task),
        "hostname": task.request.hostname,
        "queue": queue_of(task),
        "task_id": task.request.id,
        "execution_time": round(execution_time, 4),
        "timestamp": datetime.fromtimestamp(finished_at, timezone.utc).isoformat(),
        "started_at": started_at,
        "finished_at": finished_at,
    }
    log.info("%s done", task.name, extra={k: v for k, v in result.items() if k != "message"})
    return result


def task_a(self: Task, duration: float | None = None) -> dict[str, Any]:
    return demo_work(self, "Hello from Task A", duration)


def task_b(self: Task, duration: float | None = None) -> dict[str, Any]:
    return demo_work(self, "Hello from Task B", duration)


def register_demo_tasks(app: Celery) -> tuple[Task, Task]:
    """Register ``task_a`` and ``task_b`` on ``app`` under their names; the two tasks."""
    return (
        app.task(name=TASK_A, bind=True)(task_a),
        app.task(name=TASK_B, bind=True)(task_b),
    )
