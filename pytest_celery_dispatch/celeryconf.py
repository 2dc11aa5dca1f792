"""Celery settings shared by the controller's app and the worker app (no controller imports)."""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

DEFAULT_BROKER = "amqp://guest@localhost//"
DEFAULT_BACKEND = "rpc://"

#: The example tasks of the original demo, each pinned to its queue.
TASK_ROUTES = {
    "pytest_celery_dispatch.task_a": {"queue": "queue_a"},
    "pytest_celery_dispatch.task_b": {"queue": "queue_b"},
}


def broker_from_env(environ: Mapping[str, str] | None = None) -> str:
    env = os.environ if environ is None else environ
    return env.get("CELERY_BROKER_URL") or env.get("BROKER_URL") or DEFAULT_BROKER


def backend_from_env(environ: Mapping[str, str] | None = None) -> str:
    env = os.environ if environ is None else environ
    return env.get("CELERY_RESULT_BACKEND") or DEFAULT_BACKEND


def celery_config(broker: str, backend: str) -> dict[str, Any]:
    """JSON only (pickle is refused), late acks, one message prefetched per process."""
    return {
        "broker_url": broker,
        "result_backend": backend,
        "task_serializer": "json",
        "result_serializer": "json",
        "accept_content": ["json"],
        "result_accept_content": ["json"],
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        "worker_prefetch_multiplier": 1,
        "worker_cancel_long_running_tasks_on_connection_loss": True,
        "broker_connection_retry_on_startup": True,
        "broker_connection_timeout": 4.0,
        "task_create_missing_queues": True,
        "task_routes": TASK_ROUTES,
        "result_expires": 3600,
        "enable_utc": True,
        "worker_hijack_root_logger": False,
        "worker_send_task_events": True,
        "task_send_sent_event": True,
    }
