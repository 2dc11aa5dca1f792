"""One pool process more than a worker's slots: plain tasks never wait behind a run.

A slot (one ``run_session`` task) holds its pool process for as long as the run has work for it.
With ``celery worker -c N`` a run starts N slots, so every process of the worker is taken, and a
plain task sent to the same queue meanwhile (``task_a`` from the ``dispatcher`` fixture, a
``ping``) waits in the worker until a slot ends: 0.6-0.9 s in ``make demo``, the whole run on a
long suite. Celery's own advice for long and short tasks is not to make them compete for the same
processes; a bench has one worker, so the worker keeps one process apart instead: the prefork pool
gets N + 1 processes and the worker says it has N slots (``DISPATCH_WORKER_CONCURRENCY``, the
presence file on the embedded broker). The controller starts N slots on it, and the spare
process is free when a plain task arrives (Celery 5's default ``-O fair`` hands a task to an
idle process). A session that lands on that process while the N slots are busy does not run
there: :mod:`.slotgate` sends it back to its queue.

``DISPATCH_PLAIN_TASK_PROCESS=0`` turns it off; other pools (solo, threads, gevent) and
``--autoscale`` keep their size. Worker side only: never imports the controller.

PYTEST_DONT_REWRITE: imported by the worker app.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import MutableMapping
from typing import Any

from .names import ENV_PLAIN_TASK_PROCESS, ENV_WORKER_CONCURRENCY, PLAIN_TASK_PROCESSES


def _is_prefork(pool_cls: Any) -> bool:
    name = pool_cls if isinstance(pool_cls, str) else getattr(pool_cls, "__module__", "")
    return str(name).split(":")[0].rsplit(".", 1)[-1] in ("prefork", "processes")


def reserve_plain_task_process(
    worker: Any, environ: MutableMapping[str, str] | None = None
) -> int | None:
    """At ``worker_init`` (before the pool exists): note the worker's slots in the environment
    (pool processes inherit it) and grow its prefork pool by :data:`PLAIN_TASK_PROCESSES`.
    Returns the slots, or None when the concurrency is not known yet (``auto``)."""
    env = os.environ if environ is None else environ
    slots = getattr(worker, "concurrency", None)
    if not isinstance(slots, int) or isinstance(slots, bool):
        return None
    env[ENV_WORKER_CONCURRENCY] = str(slots)
    wanted = env.get(ENV_PLAIN_TASK_PROCESS, "1").strip().lower() not in ("0", "off", "no")
    if wanted and not getattr(worker, "autoscale", None) and _is_prefork(worker.pool_cls):
        worker.concurrency = slots + PLAIN_TASK_PROCESSES
    return slots


def slots_of(worker: Any, environ: MutableMapping[str, str] | None = None) -> int:
    """The slots a started worker offers runs (its pool minus the plain-task process)."""
    env = os.environ if environ is None else environ
    noted = env.get(ENV_WORKER_CONCURRENCY)
    if noted and noted.isdigit():
        return int(noted)
    concurrency = getattr(worker, "concurrency", None)
    return concurrency if isinstance(concurrency, int) and concurrency > 0 else 1


def warm_connection(app: Any) -> None:
    """In a new pool process: open the connection its task states and results go out on, so
    the first plain task it runs does not pay for it (20-40 ms measured on a busy 2-core
    machine, which the documented run's total showed)."""
    with contextlib.suppress(Exception), app.producer_or_acquire() as producer:
        producer.connection.ensure_connection(max_retries=1)
