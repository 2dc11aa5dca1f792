"""Pure routing: which queue a test goes to, or whether it runs locally.

No Celery, no terminal: the plugin hands in the closest ``queue`` marker's arguments.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from .settings import QUEUE_NAME_RE

LOCAL = None


@dataclasses.dataclass(frozen=True)
class Route:
    """Where one test goes: ``queue`` None means the controller runs it itself.

    ``error`` is set when the test's marker is invalid; such a test is not run anywhere and
    ends as an error naming the problem (the rest of the run goes on).
    """

    queue: str | None
    source: str  # "marker", "default" or "local"
    error: str | None = None


def validate_marker(
    args: Sequence[Any], kwargs: Mapping[str, Any], allowed: Iterable[str] | None
) -> tuple[str | None, str | None]:
    """Check ``@pytest.mark.queue(...)`` arguments: ``(queue, None)`` or ``(None, error)``."""
    if kwargs:
        return None, (
            f"@pytest.mark.queue takes the queue name as its only argument, got keyword "
            f"argument(s) {', '.join(sorted(kwargs))}; write @pytest.mark.queue('queue_a')"
        )
    if not args:
        return None, "@pytest.mark.queue needs a queue name; write @pytest.mark.queue('queue_a')"
    if len(args) > 1:
        return None, (
            f"@pytest.mark.queue takes one queue name, got {len(args)}: "
            f"{', '.join(repr(a) for a in args)}"
        )
    name = args[0]
    if not isinstance(name, str):
        return None, (
            f"@pytest.mark.queue needs a queue name as a string, got {type(name).__name__} "
            f"{name!r}; write @pytest.mark.queue('queue_a')"
        )
    if not QUEUE_NAME_RE.fullmatch(name):
        return None, (
            f"@pytest.mark.queue({name!r}): a queue name is 1-255 letters, digits and _ . : -"
        )
    if allowed is not None:
        allowed_set = set(allowed)
        if name not in allowed_set:
            return None, (
                f"@pytest.mark.queue({name!r}): unknown queue; ini celery_dispatch_queues "
                f"allows {', '.join(sorted(allowed_set))}. Fix the marker or add the queue there."
            )
    return name, None


def route(
    marker: tuple[Sequence[Any], Mapping[str, Any]] | None,
    default_queue: str | None,
    allowed: Iterable[str] | None = None,
) -> Route:
    """Route one test from its closest ``queue`` marker (``(args, kwargs)``) or the default."""
    if marker is not None:
        queue, error = validate_marker(marker[0], marker[1], allowed)
        if error is not None:
            return Route(queue=None, source="marker", error=error)
        return Route(queue=queue, source="marker")
    if default_queue is not None:
        return Route(queue=default_queue, source="default")
    return Route(queue=LOCAL, source="local")
