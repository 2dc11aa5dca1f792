#!/usr/bin/env python3
"""worker-healthcheck: does this container's Celery worker answer over the broker, on its queue?

The image's HEALTHCHECK and docker-compose.yml's ``healthcheck`` run it inside the container.
Healthy (exit 0) when the node ``$WORKER_ID@<hostname>`` -- the name ``-n $WORKER_ID@%h`` gives
the worker -- replies over the broker within ``--timeout`` seconds and consumes every queue of
``$QUEUE`` (comma-separated). Unhealthy (exit 1) otherwise: broker unreachable, no reply (worker
stopped, frozen, or connected to another broker or vhost), or the worker consumes other queues.
A running process alone is not healthy. One line says why; ``docker inspect`` shows it.

The broker is the worker's own: ``CELERY_BROKER_URL``, then ``BROKER_URL``.
"""

from __future__ import annotations

import argparse
import os
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="worker-healthcheck",
        description="Exit 0 when this container's worker answers over the broker on its queue.",
    )
    parser.add_argument(
        "--timeout", type=float, default=5.0, help="seconds to wait for the reply (default 5)"
    )
    args = parser.parse_args(argv)

    from celery.utils.nodenames import host_format
    from kombu.utils.url import maybe_sanitize_url

    from pytest_celery_dispatch.worker import app

    worker_id = os.environ.get("WORKER_ID", "")
    if not worker_id:
        print("unhealthy: WORKER_ID is not set, so the worker's node name is unknown")
        return 1
    node = host_format(f"{worker_id}@%h")  # %h exactly as the worker expands it
    wanted = [q for q in os.environ.get("QUEUE", "").split(",") if q]
    broker = maybe_sanitize_url(app.conf.broker_url)
    try:
        with app.connection_for_write() as conn:
            # Bounded: one retry, not the worker's patient reconnect loop.
            conn.ensure_connection(max_retries=1, interval_start=1, interval_step=1)
            inspect = app.control.inspect([node], timeout=args.timeout, connection=conn)
            replies = inspect.active_queues() or {}
    except Exception as exc:
        print(f"unhealthy: cannot reach the broker {broker}: {exc}")
        return 1
    if node not in replies:
        print(f"unhealthy: {node} did not answer on {broker} within {args.timeout:g}s")
        return 1
    consumed = [str(q.get("name")) for q in replies[node] or []]
    missing = [q for q in wanted if q not in consumed]
    if missing:
        print(
            f"unhealthy: {node} answers but does not consume {', '.join(missing)} "
            f"(it consumes {', '.join(consumed) or 'nothing'}); check -Q and QUEUE"
        )
        return 1
    print(f"healthy: {node} answers on {broker} and consumes {', '.join(consumed)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
