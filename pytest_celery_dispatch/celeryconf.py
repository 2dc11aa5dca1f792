"""Celery settings shared by the controller's app and the worker app (no controller imports).

PYTEST_DONT_REWRITE: spare runners import it before pytest configures (see spare_boot.py).
"""

from __future__ import annotations

import os
import ssl
from collections.abc import Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from .names import (
    DEFAULT_BACKEND,
    DEFAULT_BROKER,
    EMBEDDED,
    ENV_BROKER_URL,
    ENV_BROKER_URL_FALLBACK,
    ENV_RESULT_BACKEND,
    ENV_SSL_CA,
    ENV_SSL_CERT,
    ENV_SSL_KEY,
    ENV_WORKSPACE,
    TASK_A,
    TASK_B,
    is_embedded,
)

#: The AMQP heartbeat (seconds) of the workers' connections and of the controller's reply
#: connection: a connection that hears nothing for two beats is dead (py-amqp's rule), so a
#: silent network (a partition, a dead NAT entry: no reset, no error) is noticed within about
#: ``SILENT_LIMIT`` seconds instead of TCP keepalive's ~150 s.
BROKER_HEARTBEAT = 5.0
SILENT_LIMIT = 2 * BROKER_HEARTBEAT
#: No single socket read or write of a broker call waits longer than this (a call that would
#: wait for a silent broker forever fails instead, and the caller decides what next).
BROKER_IO_TIMEOUT = 5.0

#: The example tasks of the original demo, each pinned to its queue.
TASK_ROUTES = {
    TASK_A: {"queue": "queue_a"},
    TASK_B: {"queue": "queue_b"},
}


def broker_from_env(environ: Mapping[str, str] | None = None) -> str:
    env = os.environ if environ is None else environ
    broker = env.get(ENV_BROKER_URL) or env.get(ENV_BROKER_URL_FALLBACK) or DEFAULT_BROKER
    return EMBEDDED if is_embedded(broker) else broker


def backend_from_env(environ: Mapping[str, str] | None = None) -> str:
    env = os.environ if environ is None else environ
    return env.get(ENV_RESULT_BACKEND) or DEFAULT_BACKEND


def broker_ssl_options(
    broker: str, environ: Mapping[str, str] | None = None
) -> dict[str, Any] | None:
    """``broker_use_ssl`` for an ``amqps://`` URL: the server certificate and host name are
    always checked (py-amqp checks the host name only when told the server's name).

    ``DISPATCH_SSL_CA`` names a CA bundle (default: the system's); ``DISPATCH_SSL_CERT`` and
    ``DISPATCH_SSL_KEY`` a client certificate for brokers that require one.
    """
    if urlsplit(broker).scheme not in ("amqps", "pyamqps"):
        return None
    env = os.environ if environ is None else environ
    host = urlsplit(broker).hostname or "localhost"
    ca = env.get(ENV_SSL_CA) or None
    cert = env.get(ENV_SSL_CERT) or None
    if cert:
        return {
            "server_hostname": host,
            "cert_reqs": ssl.CERT_REQUIRED,
            "ca_certs": ca,
            "certfile": cert,
            "keyfile": env.get(ENV_SSL_KEY) or None,
        }
    return {"server_hostname": host, "context": {"cafile": ca, "check_hostname": True}}


def celery_config(
    broker: str, backend: str, embedded_root: str | os.PathLike[str] | None = None
) -> dict[str, Any]:
    """JSON only (pickle is refused), late acks, one message prefetched per process.

    ``broker="embedded"`` selects the embedded broker (:mod:`.embedded`) in ``embedded_root``
    (default: ``DISPATCH_EMBEDDED_DIR``, else ``.pytest_cache/celery-dispatch/broker`` under
    ``DISPATCH_WORKSPACE`` or the current directory); its results go to a ``file://`` folder.
    """
    config = {
        "broker_use_ssl": broker_ssl_options(broker),
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
        "broker_heartbeat": BROKER_HEARTBEAT,  # the worker's own connection (Celery checks it)
        "task_create_missing_queues": True,
        "task_routes": TASK_ROUTES,
        "result_expires": 3600,
        "enable_utc": True,
        "worker_hijack_root_logger": False,
        "worker_send_task_events": True,
        "task_send_sent_event": True,
        # A task's STARTED state (worker host name and pid) reaches the sender, so the
        # dispatcher fixture can say live where each task started.
        "task_track_started": True,
    }
    if not is_embedded(broker):
        config["broker_transport_options"] = {
            "read_timeout": BROKER_IO_TIMEOUT,
            "write_timeout": BROKER_IO_TIMEOUT,
        }
    if is_embedded(broker):
        from . import embedded

        root = Path(embedded_root) if embedded_root else embedded_root_from_env()
        config.update(embedded.celery_settings(root, backend))
    # Celery lets the environment's CELERY_BROKER_URL beat broker_url; the read and write URLs
    # beat that, so the URL resolved here (e.g. from --celery-broker) is the one used.
    config["broker_read_url"] = config["broker_write_url"] = config["broker_url"]
    return config


def embedded_root_from_env(environ: Mapping[str, str] | None = None) -> Path:
    from .embedded import root_dir

    env = os.environ if environ is None else environ
    return root_dir(env.get(ENV_WORKSPACE) or None, env)
