"""Where a worker task runs: the worker's id, the queue a task came from, the workspace, and
what a runner started for it reads of that (its context environment).

Shared by the worker app (:mod:`.worker`) and the demo tasks (:mod:`.demo_tasks`).
"""

from __future__ import annotations

import os
import socket
from collections.abc import Mapping
from typing import Any

from celery import Task

from .names import (
    ENV_CTX_HOSTNAME,
    ENV_CTX_QUEUE,
    ENV_CTX_RUN_ID,
    ENV_CTX_TASK_ID,
    ENV_CTX_WORKER_ID,
    ENV_WORKER_ID,
    ENV_WORKSPACE,
)


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


def task_place(task: Task, payload: Mapping[str, Any]) -> dict[str, str]:
    """Where a run's task runs: its run, queue, worker, host and task id (KeyError: no run)."""
    return {
        "run_id": str(payload["run_id"]),
        "queue": str(payload.get("queue") or queue_of(task)),
        "worker": worker_id(task),
        "hostname": str(task.request.hostname or socket.gethostname()),
        "task_id": str(task.request.id),
    }


def context_env(place: Mapping[str, Any], ws: str) -> dict[str, str]:
    """What a runner started for the task at ``place`` (see :func:`task_place`) may read of
    where it runs: the worker, queue, host, task, run and workspace."""
    return {
        ENV_WORKER_ID: str(place["worker"]),
        ENV_CTX_WORKER_ID: str(place["worker"]),
        ENV_CTX_QUEUE: str(place["queue"]),
        ENV_CTX_HOSTNAME: str(place["hostname"]),
        ENV_CTX_TASK_ID: str(place["task_id"]),
        ENV_CTX_RUN_ID: str(place["run_id"]),
        ENV_WORKSPACE: ws,
    }
