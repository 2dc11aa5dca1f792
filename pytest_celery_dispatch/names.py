"""Names shared by the controller and the worker side: URLs, queues, tasks, environment.

Only the standard library: every pytest process (controller, runner, spare) imports it, so it
must stay light. Each name means one thing; the docs use the same words:

* a *chunk* is a list of nodeids taken from a run's work queue (``batch_id`` on the wire and in
  the JSON report, kept for compatibility);
* a *slot* is one ``run_session`` Celery task: one worker process pulling chunks and running
  them in its runner (``session`` / ``session_id`` on the wire and in the reports).

PYTEST_DONT_REWRITE: spare runners import it before pytest configures.
"""

from __future__ import annotations

import re
from typing import Any

# ----------------------------------------------------------------------------- brokers

DEFAULT_BROKER = "amqp://guest@localhost//"
DEFAULT_BACKEND = "rpc://"
#: ``--celery-broker embedded``: the serverless broker of :mod:`.embedded`.
EMBEDDED = "embedded"


def is_embedded(url: str | None) -> bool:
    return bool(url) and (url == EMBEDDED or str(url).startswith(EMBEDDED + "://"))


def _mask(url: str) -> str:
    """Mask the password of a URL (kombu's own helper, with a fallback for unparsable text)."""
    try:
        from kombu.utils.url import maybe_sanitize_url

        return str(maybe_sanitize_url(url))
    except Exception:
        return re.sub(r"(//[^:/@]*:)[^@/]*@", r"\1**@", url)


def mask_url(url: str) -> str:
    """``amqp://user:secret@host//`` -> ``amqp://user:**@host//``; other text unchanged."""
    if url == EMBEDDED or "@" not in url:
        return url
    return _mask(url)


# ----------------------------------------------------------------------------- tasks and queues

SLOT_TASK = "pytest_celery_dispatch.run_session"
PING_TASK = "pytest_celery_dispatch.ping"
PREWARM_TASK = "pytest_celery_dispatch.prewarm"
TASK_A = "pytest_celery_dispatch.task_a"
TASK_B = "pytest_celery_dispatch.task_b"


def reply_queue_name(run_id: str) -> str:
    return f"celery-dispatch.reply.{run_id}"


def work_queue_name(run_id: str, queue: str) -> str:
    return f"celery-dispatch.work.{run_id}.{queue}"


def blob_queue_name(run_id: str, session_id: str) -> str:
    """Where the controller sends the blobs one slot asked for."""
    return f"celery-dispatch.blobs.{run_id}.{session_id}"


def run_queue(name: str, expires_ms: int) -> Any:
    """A kombu queue of one run (reply, work, blobs): durable, on the default exchange, and
    deleted by RabbitMQ once unused for ``expires_ms`` (kombu imported when called)."""
    from kombu import Exchange, Queue

    return Queue(
        name,
        exchange=Exchange("", type="direct"),
        routing_key=name,
        durable=True,
        auto_delete=False,
        queue_arguments={"x-expires": expires_ms},
    )


def stop_queue_name(run_id: str) -> str:
    """Exists while the controller asks its workers to stop after their running test."""
    return f"celery-dispatch.stop.{run_id}"


# ----------------------------------------------------------------------------- environment
# Read by users and their workers (documented in docs/workers.md):
ENV_BROKER_URL = "CELERY_BROKER_URL"
ENV_BROKER_URL_FALLBACK = "BROKER_URL"
ENV_RESULT_BACKEND = "CELERY_RESULT_BACKEND"
ENV_WORKER_ID = "WORKER_ID"
ENV_WORKSPACE = "DISPATCH_WORKSPACE"
ENV_EMBEDDED_DIR = "DISPATCH_EMBEDDED_DIR"
ENV_LOG_FORMAT = "DISPATCH_LOG_FORMAT"
ENV_SSL_CA = "DISPATCH_SSL_CA"
ENV_SSL_CERT = "DISPATCH_SSL_CERT"
ENV_SSL_KEY = "DISPATCH_SSL_KEY"
ENV_FORK = "DISPATCH_FORK_RUNNERS"
ENV_PYCACHE = "DISPATCH_RUNNER_PYCACHE"
ENV_SPARE = "DISPATCH_SPARE_RUNNER"
ENV_PREWARM = "DISPATCH_PREWARM"  # 0: no zygote started ahead of a run's slots
#: Shipped trees (docs/workers.md): the worker's cache folder, its size limit, and whether it
#: runs shipped trees of unsigned runs (``allow``; refused by default, but on the embedded broker).
ENV_CACHE_DIR = "DISPATCH_CACHE_DIR"
ENV_CACHE_LIMIT = "DISPATCH_CACHE_LIMIT"
ENV_SHIP_UNSIGNED = "DISPATCH_SHIP_UNSIGNED"
#: The public keys (or certificates) a worker takes signed shipped runs from (docs/security.md).
ENV_SHIP_TRUST = "DISPATCH_SHIP_TRUST"
#: How old a signed run a worker takes (docs/security.md): seconds, or with s/m/h/d; 24h.
ENV_SHIP_MAX_AGE = "DISPATCH_SHIP_MAX_AGE"
#: The controller's signing key: a PEM file's path, or the PEM text (a CI secret).
ENV_SHIP_KEY = "CELERY_DISPATCH_SHIP_KEY"
#: Bench health (:mod:`.health`): the worker's own health tests (they win over the run's ini
#: ``celery_dispatch_health``), how often at most they run (minutes), after how many sessions
#: in a row ended in an infrastructure failure the worker quarantines itself, and whether a
#: quarantined worker whose health tests pass again rejoins by itself (``1``).
ENV_HEALTH = "DISPATCH_HEALTH"
ENV_HEALTH_EVERY = "DISPATCH_HEALTH_EVERY"
ENV_QUARANTINE_AFTER = "DISPATCH_QUARANTINE_AFTER"
ENV_HEALTH_REJOIN = "DISPATCH_HEALTH_REJOIN"

# Set by the worker for the tests it runs (read by the ``dispatch_context`` fixture):
ENV_CTX_WORKER_ID = "DISPATCH_WORKER_ID"
ENV_CTX_QUEUE = "DISPATCH_QUEUE"
ENV_CTX_HOSTNAME = "DISPATCH_HOSTNAME"
ENV_CTX_TASK_ID = "DISPATCH_TASK_ID"
ENV_CTX_ATTEMPT = "DISPATCH_ATTEMPT"
ENV_CTX_RUN_ID = "DISPATCH_RUN_ID"
#: The worker's slots (its ``-c``), noted at start-up for its slots to report.
ENV_WORKER_CONCURRENCY = "DISPATCH_WORKER_CONCURRENCY"
#: The worker's main process, noted at start-up: what names the worker on its machine, from a
#: pool process (its parent) or from the worker itself (solo and threads pools) alike.
ENV_WORKER_PID = "DISPATCH_WORKER_PID"
#: ``0``: a worker's pool has no process beside its slots for plain tasks (:mod:`.workerpool`).
ENV_PLAIN_TASK_PROCESS = "DISPATCH_PLAIN_TASK_PROCESS"
#: Pool processes a worker keeps beside its slots for plain tasks (:mod:`.workerpool`).
PLAIN_TASK_PROCESSES = 1
#: The folder of a worker's slot locks (:mod:`.slotgate`), made at start-up (internal).
ENV_SLOT_GATE = "DISPATCH_SLOT_GATE"

# Between a slot and its runner process (internal):
ENV_RUNNER = "PYTEST_CELERY_DISPATCH_RUNNER"
ENV_EVENT_FD = "PYTEST_CELERY_DISPATCH_EVENT_FD"
ENV_NODEIDS = "PYTEST_CELERY_DISPATCH_NODEIDS"
ENV_COMMAND_FD = "PYTEST_CELERY_DISPATCH_COMMAND_FD"
ENV_STACKS = "PYTEST_CELERY_DISPATCH_STACKS"  # where the runner writes its stacks when asked
ENV_OPTIONS = "PYTEST_CELERY_DISPATCH_OPTIONS"
ENV_PARENT = "PYTEST_CELERY_DISPATCH_PARENT_PID"
ENV_ZYGOTE = "PYTEST_CELERY_DISPATCH_ZYGOTE"
ENV_ZYGOTE_HOME = "PYTEST_CELERY_DISPATCH_ZYGOTE_HOME"
ENV_ARTIFACTS = "PYTEST_CELERY_DISPATCH_ARTIFACTS"  # the slot's folder for test artifacts
ENV_ARTIFACTS_TMP_PATH = "PYTEST_CELERY_DISPATCH_ARTIFACTS_TMP_PATH"  # none / failed / all
