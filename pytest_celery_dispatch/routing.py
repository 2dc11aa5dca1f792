"""Pure routing: which queue a test goes to, or whether it runs locally.

Precedence, first answer wins: the closest ``queue`` marker, then the
``pytest_celery_dispatch_route`` hook, then the ini ``celery_dispatch_routes`` lines, then
``--celery-default-queue``, then local. No Celery, no terminal: the plugin hands in the marker's
arguments, the hook's answer and the item's nodeid.

PYTEST_DONT_REWRITE: spare runners import it before pytest configures (see spare_boot.py).
"""

from __future__ import annotations

import dataclasses
import fnmatch
import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

LOCAL = None

#: What a queue name may be: RabbitMQ allows more, but these survive URLs, shells and logs.
QUEUE_NAME_RE = re.compile(r"^[A-Za-z0-9_.:\-]{1,255}$")

#: The parameter that fans a multi-queue test out into one item per queue.
FANOUT_PARAM = "celery_dispatch_queue"


@dataclasses.dataclass(frozen=True)
class Route:
    """Where one test goes: ``queue`` None means the controller runs it itself.

    ``source`` says which rule decided (``marker``, ``hook``, ``route <pattern>``, ``default``,
    ``local``). ``error`` is set when the test's routing is invalid; such a test is not run
    anywhere and ends as an error naming the problem (the rest of the run goes on).
    """

    queue: str | None
    source: str  # "marker", "hook", "route <pattern>", "default" or "local"
    error: str | None = None


@dataclasses.dataclass(frozen=True)
class RouteRule:
    """One ini line ``<glob or nodeid prefix> = <queue>``."""

    pattern: str
    queue: str

    def matches(self, nodeid: str) -> bool:
        """A glob (``*``, ``?``, ``[seq]``; ``*`` crosses ``/``) or a prefix ending at a path or
        ``::`` boundary (``tests/hw_a`` matches ``tests/hw_a/x.py::t``, not ``tests/hw_ab``)."""
        pattern = self.pattern
        if any(ch in pattern for ch in "*?["):
            return fnmatch.fnmatchcase(nodeid, pattern)
        if pattern.endswith(("/", "::")):
            return nodeid.startswith(pattern)
        return nodeid == pattern or nodeid.startswith((pattern + "/", pattern + "::"))


def one_edit_apart(a: str, b: str) -> bool:
    """``a`` and ``b`` differ by one inserted, deleted or replaced character, or by two
    neighbouring characters swapped (the typos of a queue name)."""
    if a == b or abs(len(a) - len(b)) > 1:
        return False
    if len(a) > len(b):
        a, b = b, a
    i = 0
    while i < len(a) and a[i] == b[i]:
        i += 1
    if len(a) < len(b):  # one insertion into a
        return a[i:] == b[i + 1 :]
    if a[i + 1 :] == b[i + 1 :]:  # one replacement
        return True
    return a[i : i + 2] == b[i : i + 2][::-1] and a[i + 2 :] == b[i + 2 :]


def did_you_mean(name: str, candidates: Iterable[str]) -> str | None:
    """``queue_a`` or ``queue_a or queue_b``: the known names one edit away from ``name``."""
    close = sorted({c for c in candidates if one_edit_apart(name, c)})
    if not close:
        return None
    return close[0] if len(close) == 1 else f"{', '.join(close[:-1])} or {close[-1]}"


def check_queue_name(name: object, allowed: Iterable[str] | None, what: str) -> str | None:
    """The error for one queue name, or None when it is fine."""
    if not isinstance(name, str):
        return (
            f"{what} needs a queue name as a string, got {type(name).__name__} {name!r}; "
            "write @pytest.mark.queue('queue_a')"
        )
    if not QUEUE_NAME_RE.fullmatch(name):
        return f"{what}: {name!r} is not a queue name (1-255 letters, digits and _ . : -)"
    if allowed is not None:
        allowed_set = set(allowed)
        if name not in allowed_set:
            guess = did_you_mean(name, allowed_set)
            return (
                f"{what}: {name!r} is an unknown queue"
                f"{f' (did you mean {guess}?)' if guess else ''}; ini celery_dispatch_queues "
                f"allows {', '.join(sorted(allowed_set))}. Fix the name or add the queue there."
            )
    return None


def validate_marker(
    args: Sequence[Any], kwargs: Mapping[str, Any], allowed: Iterable[str] | None
) -> tuple[tuple[str, ...], str | None]:
    """Check ``@pytest.mark.queue(...)`` arguments: ``(queues, None)`` or ``((), error)``.

    Several names fan the test out: it runs once on each queue.
    """
    if kwargs:
        return (), (
            f"@pytest.mark.queue takes queue names as arguments, got keyword "
            f"argument(s) {', '.join(sorted(kwargs))}; write @pytest.mark.queue('queue_a')"
        )
    if not args:
        return (), "@pytest.mark.queue needs a queue name; write @pytest.mark.queue('queue_a')"
    for name in args:
        what = f"@pytest.mark.queue({name!r})" if isinstance(name, str) else "@pytest.mark.queue"
        error = check_queue_name(name, allowed, what)
        if error is not None:
            return (), error
    if len(set(args)) != len(args):
        return (), f"@pytest.mark.queue names a queue twice: {', '.join(map(repr, args))}"
    return tuple(args), None


def parse_routes(lines: Iterable[str]) -> tuple[list[RouteRule], list[str]]:
    """The ini ``celery_dispatch_routes`` lines: rules, and errors for malformed lines."""
    rules: list[RouteRule] = []
    errors: list[str] = []
    for raw in lines:
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        pattern, sep, queue = line.rpartition("=")
        pattern, queue = pattern.strip(), queue.strip()
        if not sep or not pattern:
            errors.append(f"{line!r}: expected '<glob or nodeid prefix> = <queue>'")
            continue
        error = check_queue_name(queue, None, f"route {pattern!r}")
        if error is not None:
            errors.append(error)
            continue
        rules.append(RouteRule(pattern, queue))
    return rules, errors


def route(
    marker: tuple[Sequence[Any], Mapping[str, Any]] | None,
    default_queue: str | None,
    allowed: Iterable[str] | None = None,
    *,
    nodeid: str = "",
    fanout: str | None = None,
    hook: object = None,
    rules: Sequence[RouteRule] = (),
) -> Route:
    """Route one test; see the module docstring for the precedence.

    ``fanout`` is the queue of a fanned-out item (its ``[queue]`` parameter); ``hook`` is what
    ``pytest_celery_dispatch_route`` answered (None: no opinion).
    """
    allowed_list = list(allowed) if allowed is not None else None
    if marker is not None:
        queues, error = validate_marker(marker[0], marker[1], allowed_list)
        if error is not None:
            return Route(queue=None, source="marker", error=error)
        if fanout is not None and fanout in queues:
            return Route(queue=fanout, source="marker")
        return Route(queue=queues[0], source="marker")
    if hook is not None:
        error = check_queue_name(hook, allowed_list, "pytest_celery_dispatch_route")
        if error is not None:
            return Route(queue=None, source="hook", error=error)
        return Route(queue=str(hook), source="hook")
    for rule in rules:
        if rule.matches(nodeid):
            error = check_queue_name(rule.queue, allowed_list, f"route {rule.pattern!r}")
            if error is not None:
                return Route(queue=None, source=f"route {rule.pattern}", error=error)
            return Route(queue=rule.queue, source=f"route {rule.pattern}")
    if default_queue is not None:
        return Route(queue=default_queue, source="default")
    return Route(queue=LOCAL, source="local")
