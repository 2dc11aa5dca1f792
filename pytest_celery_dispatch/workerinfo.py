"""Where a worker task runs: the worker's id, the queue a task came from, the workspace.

Shared by the worker app (:mod:`.worker`) and the demo tasks (:mod:`.demo_tasks`).
"""

from __future__ import annotations

import os
import socket

from celery import Task

from .names import ENV_WORKER_ID, ENV_WORKSPACE


def workspace() -> str:
    """The root of the test code on this worker (``DISPATCH_WORKSPACE``, else the cwd)."""
    return os.path.realpath(os.environ.get(ENV_WORKSPACE) or os.getcwd())


def worker_id(task: Task | None = None) -> str:
    """``WORKER_ID``, else the node name of the worker running ``task``, else the host name."""
    explicit = os.environ.get(ENV_WORKER_ID)
    if explicit:
        return explicit
    hostname = getattr(getattr(task, "request", None), "hostname", None)
    return str(hostname or socket.gethostname())


def queue_of(task: Task) -> str:
    """The queue ``task``'s message came from."""
    info = getattr(task.request, "delivery_info", None) or {}
    return str(info.get("routing_key") or info.get("queue") or "")
