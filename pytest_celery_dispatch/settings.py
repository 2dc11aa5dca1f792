"""One frozen :class:`Settings`, resolved once per run: command line > environment > ini > default.

Every bad value becomes a :class:`pytest.UsageError` that names the option, where the value came
from, and the accepted form (the pytest-timeout habit).

PYTEST_DONT_REWRITE: spare runners import it before pytest configures (see spare_boot.py).
"""

from __future__ import annotations

import dataclasses
import os
import re
import time
from collections.abc import Callable, Mapping
from typing import Any
from urllib.parse import urlsplit

import pytest

from .artifactpaths import DEFAULT_RUN_LIMIT, DEFAULT_TEST_LIMIT, TMP_PATH_MODES, Limits
from .healthrules import parse_minutes, parse_tests
from .names import DEFAULT_BACKEND as DEFAULT_BACKEND
from .names import DEFAULT_BROKER as DEFAULT_BROKER
from .names import EMBEDDED as EMBEDDED
from .names import ENV_BROKER_URL, ENV_BROKER_URL_FALLBACK, ENV_RESULT_BACKEND
from .names import mask_url as mask_url
from .planning import DIST_MODES, LOAD
from .retry import DEFAULT_BROKER_TIMEOUT as DEFAULT_BROKER_TIMEOUT
from .routing import QUEUE_NAME_RE as QUEUE_NAME_RE
from .routing import RouteRule, check_queue_name, parse_routes

DEFAULT_TIMEOUT = 300.0
DEFAULT_WAIT_WORKERS = 10.0
DEFAULT_RETRIES = 2
#: A run's priority for a shared bench (``--celery-priority``): 0-9, higher first.
DEFAULT_PRIORITY = 5
MAX_PRIORITY = 9

BROKER_SCHEMES = frozenset({"amqp", "amqps", "pyamqp", "redis", "rediss", "memory"})
BACKEND_SCHEMES = frozenset({"rpc", "redis", "rediss", "amqp", "disabled", "file"})

HELP_DISPATCH = "send tests marked @pytest.mark.queue(NAME) to Celery workers consuming NAME"
HELP_BROKER = (
    "broker URL (env CELERY_BROKER_URL, then BROKER_URL); "
    f"default {DEFAULT_BROKER}; 'embedded' = a serverless broker in a folder, for one machine"
)
HELP_BACKEND = (
    f"Celery result backend used by the dispatcher fixture; default {DEFAULT_BACKEND} "
    "(with the embedded broker: a folder beside it)"
)
HELP_DEFAULT_QUEUE = "queue for tests without a queue marker; unset = run them locally"
HELP_JSON_REPORT = "JSON report path; default dispatch_results_<YYYYmmdd_HHMMSS>.json"
HELP_TIMEOUT = (
    "per-test deadline in seconds on a worker (hard kill after it); "
    f"also drives lost-result detection; default {DEFAULT_TIMEOUT:g}"
)
HELP_WAIT_WORKERS = (
    "seconds to wait for a consumer on each needed queue before failing its tests; "
    f"default {DEFAULT_WAIT_WORKERS:g}"
)
HELP_PRIORITY = (
    f"this run's place in the line for a busy queue: 0-{MAX_PRIORITY}, higher first, equal "
    f"first come first served; a running test is never pre-empted; default {DEFAULT_PRIORITY}"
)
HELP_BROKER_TIMEOUT = (
    "seconds to wait for a broker the controller is cut off from (a silent network is noticed "
    "by AMQP heartbeats) before failing every unfinished test; "
    f"default {DEFAULT_BROKER_TIMEOUT:g}"
)
HELP_RETRIES = (
    "re-dispatches after an infrastructure failure (worker or result lost), "
    f"with exponential backoff; default {DEFAULT_RETRIES}"
)
HELP_LOCAL_WORKERS = (
    "start one local worker per queue for this run and stop it after: 'queue_a,queue_b' or 'auto'"
)
HELP_TIMELINE = "write a self-contained HTML timeline of the run to PATH"
HELP_EVENT_LOG = "write JSON lines (sent / started / finished per test) to PATH"
HELP_DIST = (
    "how each queue's tests are shared among worker slots, as pytest-xdist's --dist: "
    "load (default: any test on any slot), loadfile (a file's tests on one slot, in order), "
    "loadscope (a class's tests, or a module's functions, on one slot), loadgroup (tests with "
    "the same @pytest.mark.xdist_group(name) on one slot, the others as load)"
)
HELP_ARTIFACTS = (
    "folder the dispatch_artifacts files of every test come home to, as "
    "DIR/<nodeid as a path>/<file>; default <JSON report without .json>_artifacts beside the "
    "JSON report (dispatch_artifacts without --celery-dispatch)"
)
HELP_ARTIFACTS_TMP_PATH = (
    "also bring home pytest's tmp_path of dispatched tests: none (default), failed, or all"
)
HELP_ARTIFACTS_LIMIT = (
    f"most bytes one test brings home (e.g. 100M, 2G); default {DEFAULT_TEST_LIMIT >> 20}M; "
    "over it files are cut and the report says so"
)
HELP_ARTIFACTS_RUN_LIMIT = (
    f"most bytes the whole run brings home; default {DEFAULT_RUN_LIMIT >> 20}M; over it files "
    "are cut and the report says so"
)
HELP_QUEUES = "allowed queue names (one per line or comma separated); unset = any name"
HELP_ROUTES = (
    "routing without markers, one '<glob or nodeid prefix> = <queue>' per line; the first match "
    "wins, a queue marker still overrides it"
)

HELP_HEALTH = (
    "health tests (nodeids or folders, comma or space separated) a worker runs before it takes "
    "this run's work; a failure quarantines it (a worker's DISPATCH_HEALTH wins)"
)
HELP_HEALTH_EVERY = (
    "minutes between two runs of a worker's health tests (default 10; at once after a crashed "
    "or timed-out test; a worker's DISPATCH_HEALTH_EVERY wins)"
)


@dataclasses.dataclass(frozen=True)
class Settings:
    dispatch: bool = False
    broker: str = DEFAULT_BROKER
    backend: str = DEFAULT_BACKEND
    default_queue: str | None = None
    json_report: str = ""
    timeout: float = DEFAULT_TIMEOUT
    wait_workers: float = DEFAULT_WAIT_WORKERS
    retries: int = DEFAULT_RETRIES
    broker_timeout: float = DEFAULT_BROKER_TIMEOUT
    priority: int = DEFAULT_PRIORITY
    local_workers: tuple[str, ...] = ()
    local_workers_auto: bool = False
    timeline: str | None = None
    event_log: str | None = None
    allowed_queues: frozenset[str] | None = None
    routes: tuple[RouteRule, ...] = ()
    dist: str = LOAD
    health: tuple[str, ...] = ()
    health_every: float | None = None
    artifacts: str = "dispatch_artifacts"
    artifacts_limits: Limits = dataclasses.field(default_factory=Limits)

    @property
    def broker_masked(self) -> str:
        return mask_url(self.broker)

    @property
    def backend_masked(self) -> str:
        return mask_url(self.backend)


# ----------------------------------------------------------------------------- validators
# Each takes the raw text and the name of its source ("--celery-timeout", "env BROKER_URL",
# "ini celery_dispatch_timeout") and returns the parsed value or raises UsageError.


def _bad(source: str, value: object, form: str) -> pytest.UsageError:
    return pytest.UsageError(f"celery-dispatch: invalid value {value!r} for {source}: {form}")


def parse_positive_float(raw: str, source: str) -> float:
    try:
        value = float(raw)
    except (TypeError, ValueError):
        raise _bad(source, raw, "expected a number of seconds greater than 0, e.g. 300") from None
    if not value > 0 or value != value or value == float("inf"):
        raise _bad(source, raw, "expected a number of seconds greater than 0, e.g. 300")
    return value


def parse_non_negative_float(raw: str, source: str) -> float:
    try:
        value = float(raw)
    except (TypeError, ValueError):
        raise _bad(source, raw, "expected a number of seconds, 0 or more, e.g. 10") from None
    if not value >= 0 or value == float("inf"):
        raise _bad(source, raw, "expected a number of seconds, 0 or more, e.g. 10")
    return value


def parse_retries(raw: str, source: str) -> int:
    try:
        value = int(str(raw).strip())
    except (TypeError, ValueError):
        raise _bad(source, raw, "expected a whole number, 0 or more, e.g. 2") from None
    if value < 0:
        raise _bad(source, raw, "expected a whole number, 0 or more, e.g. 2")
    return value


def parse_priority(raw: str, source: str) -> int:
    form = f"expected a whole number from 0 to {MAX_PRIORITY} (higher goes first), e.g. 9"
    try:
        value = int(str(raw).strip())
    except (TypeError, ValueError):
        raise _bad(source, raw, form) from None
    if not 0 <= value <= MAX_PRIORITY:
        raise _bad(source, raw, form)
    return value


def parse_dist(raw: str, source: str) -> str:
    mode = str(raw).strip()
    if mode not in DIST_MODES:
        raise _bad(source, raw, f"expected one of {', '.join(DIST_MODES)}")
    return mode


_SIZE_RE = re.compile(r"(\d+)\s*([kmgt]?)(?:i?b)?", re.IGNORECASE)


def parse_size(raw: str, source: str) -> int:
    """``1048576``, ``512K``, ``100M``, ``2G`` (powers of 1024) -> bytes."""
    found = _SIZE_RE.fullmatch(str(raw).strip())
    if not found:
        raise _bad(source, raw, "expected a size in bytes, or with K, M or G, e.g. 100M")
    return int(found.group(1)) << (10 * "_KMGT".index(found.group(2).upper() or "_"))


def parse_tmp_path_mode(raw: str, source: str) -> str:
    mode = str(raw).strip()
    if mode not in TMP_PATH_MODES:
        raise _bad(source, raw, f"expected one of {', '.join(TMP_PATH_MODES)}")
    return mode


def default_artifacts_dir(json_report: str, dispatch: bool) -> str:
    """Beside the JSON report (``run.json`` -> ``run_artifacts``); without a JSON report
    (no ``--celery-dispatch``), ``dispatch_artifacts`` in the current directory."""
    if not dispatch:
        return "dispatch_artifacts"
    base = json_report[: -len(".json")] if json_report.endswith(".json") else json_report
    return f"{base}_artifacts"


def parse_queue_name(raw: str, source: str) -> str:
    name = str(raw).strip()
    if not QUEUE_NAME_RE.fullmatch(name):
        raise _bad(
            source, raw, "expected a queue name of letters, digits and _ . : - (e.g. queue_a)"
        )
    return name


def parse_queue_list(raw: str, source: str) -> tuple[str, ...]:
    names = [part.strip() for part in re.split(r"[,\s]+", str(raw)) if part.strip()]
    if not names:
        raise _bad(source, raw, "expected queue names separated by commas, e.g. queue_a,queue_b")
    return tuple(dict.fromkeys(parse_queue_name(name, source) for name in names))


def parse_url(raw: str, source: str, schemes: frozenset[str], what: str) -> str:
    url = str(raw).strip()
    if what == "broker" and url in (EMBEDDED, EMBEDDED + "://"):
        return EMBEDDED
    form = (
        f"expected a {what} URL like {DEFAULT_BROKER if what == 'broker' else DEFAULT_BACKEND}"
        f" (schemes: {', '.join(sorted(schemes))})"
    )
    try:
        parts = urlsplit(url)
        scheme = parts.scheme.split("+")[-1]
        _ = parts.port  # raises ValueError for a non-numeric port
    except ValueError:
        raise _bad(source, mask_url(url), form) from None
    if scheme not in schemes or "://" not in url:
        raise _bad(source, mask_url(url), form)
    # "amqp:///" means localhost to kombu; accept it, but reject "amqp://:5672" junk.
    networked = scheme in {"amqp", "amqps", "pyamqp", "redis", "rediss"}
    if networked and not parts.hostname and parts.netloc and not parts.netloc.startswith("@"):
        raise _bad(source, mask_url(url), form)
    return url


def default_json_report_path(now: float | None = None) -> str:
    stamp = time.strftime("%Y%m%d_%H%M%S", time.localtime(now))
    return f"dispatch_results_{stamp}.json"


# ----------------------------------------------------------------------------- resolution


Getter = Callable[[str], Any]


def _first(*candidates: tuple[str, Any]) -> tuple[str, Any] | None:
    """The first (source, value) whose value is set (not None and not empty text)."""
    for source, value in candidates:
        if value is None:
            continue
        if isinstance(value, str) and not value.strip():
            continue
        if isinstance(value, list) and not value:
            continue
        return source, value
    return None


def resolve(
    option: Getter, ini: Getter, environ: Mapping[str, str] | None = None, now: float | None = None
) -> Settings:
    """Resolve the run's settings. ``option(name)`` reads a parsed command-line value (``None``
    when not given), ``ini(name)`` an ini value (``None`` or ``""`` when unset)."""
    env = os.environ if environ is None else environ

    dispatch = bool(option("celery_dispatch"))

    picked = _first(
        ("--celery-broker", option("celery_broker")),
        (f"env {ENV_BROKER_URL}", env.get(ENV_BROKER_URL)),
        (f"env {ENV_BROKER_URL_FALLBACK}", env.get(ENV_BROKER_URL_FALLBACK)),
        ("ini celery_dispatch_broker", ini("celery_dispatch_broker")),
    )
    broker = parse_url(picked[1], picked[0], BROKER_SCHEMES, "broker") if picked else DEFAULT_BROKER

    picked = _first(
        ("--celery-backend", option("celery_backend")),
        (f"env {ENV_RESULT_BACKEND}", env.get(ENV_RESULT_BACKEND)),
        ("ini celery_dispatch_backend", ini("celery_dispatch_backend")),
    )
    if picked:
        backend = parse_url(picked[1], picked[0], BACKEND_SCHEMES, "backend")
    else:  # the embedded broker keeps results in its own folder (rpc:// needs AMQP)
        backend = EMBEDDED if broker == EMBEDDED else DEFAULT_BACKEND

    def pick(name: str) -> tuple[str, Any] | None:
        """``--celery-<name>``, else ini ``celery_dispatch_<name>``: (source, raw value)."""
        key = name.replace("-", "_")
        return _first(
            (f"--celery-{name}", option(f"celery_{key}")),
            (f"ini celery_dispatch_{key}", ini(f"celery_dispatch_{key}")),
        )

    def parsed(name: str, parse: Callable[[str, str], Any], default: Any) -> Any:
        picked = pick(name)
        return parse(picked[1], picked[0]) if picked else default

    default_queue = parsed("default-queue", parse_queue_name, None)
    json_report = parsed("json-report", lambda raw, _: str(raw), None)
    json_report = json_report or default_json_report_path(now)
    timeout = parsed("timeout", parse_positive_float, DEFAULT_TIMEOUT)
    wait_workers = parsed("wait-workers", parse_non_negative_float, DEFAULT_WAIT_WORKERS)
    retries = parsed("retries", parse_retries, DEFAULT_RETRIES)
    broker_timeout = parsed("broker-timeout", parse_positive_float, DEFAULT_BROKER_TIMEOUT)
    priority = parsed("priority", parse_priority, DEFAULT_PRIORITY)
    local_workers: tuple[str, ...] = ()
    local_auto = False
    if picked := pick("local-workers"):
        if str(picked[1]).strip() == "auto":
            local_auto = True
        else:
            local_workers = parse_queue_list(picked[1], picked[0])
    timeline = parsed("timeline", lambda raw, _: str(raw), None)
    event_log = parsed("event-log", lambda raw, _: str(raw), None)
    dist = parsed("dist", parse_dist, LOAD)
    artifacts = parsed("artifacts", lambda raw, _: str(raw), None)
    limits = Limits(
        per_test=parsed("artifacts-limit", parse_size, DEFAULT_TEST_LIMIT),
        per_run=parsed("artifacts-run-limit", parse_size, DEFAULT_RUN_LIMIT),
        tmp_path=parsed("artifacts-tmp-path", parse_tmp_path_mode, "none"),
    )
    picked_default = pick("default-queue")
    where = (picked_default[0], default_queue) if picked_default and default_queue else None
    allowed, rules = _queues_and_routes(ini, where)
    health = tuple(parse_tests(str(ini("celery_dispatch_health") or "")))
    every = ini("celery_dispatch_health_every")
    health_every = _minutes(str(every), "ini celery_dispatch_health_every") if every else None

    return Settings(
        dispatch=dispatch,
        broker=broker,
        backend=backend,
        default_queue=default_queue,
        json_report=json_report,
        timeout=timeout,
        wait_workers=wait_workers,
        retries=retries,
        broker_timeout=broker_timeout,
        priority=priority,
        local_workers=local_workers,
        local_workers_auto=local_auto,
        timeline=timeline,
        event_log=event_log,
        allowed_queues=allowed,
        routes=tuple(rules),
        dist=dist,
        health=health,
        health_every=health_every,
        artifacts=artifacts or default_artifacts_dir(json_report, dispatch),
        artifacts_limits=limits,
    )


def _minutes(raw: str, source: str) -> float:
    try:
        return parse_minutes(raw, source)
    except ValueError as exc:
        raise pytest.UsageError(f"celery-dispatch: {exc}") from None


def _queues_and_routes(
    ini: Getter, default_queue: tuple[str, str] | None
) -> tuple[frozenset[str] | None, list[RouteRule]]:
    """ini ``celery_dispatch_queues`` (the allowed names) and ``celery_dispatch_routes``;
    ``default_queue``: (where it was set, the name). A queue name the allowed names do not hold
    is an error in the words a marker's gets (:func:`.routing.check_queue_name`)."""
    raw_queues = ini("celery_dispatch_queues")
    allowed: frozenset[str] | None = None
    if raw_queues:
        text = "\n".join(raw_queues) if isinstance(raw_queues, list) else str(raw_queues)
        allowed = frozenset(parse_queue_list(text, "ini celery_dispatch_queues"))
        if default_queue is not None and (
            error := check_queue_name(default_queue[1], allowed, default_queue[0])
        ):
            raise pytest.UsageError(f"celery-dispatch: {error}")

    raw_routes = ini("celery_dispatch_routes") or []
    rules, errors = parse_routes(
        raw_routes if isinstance(raw_routes, list) else str(raw_routes).splitlines()
    )
    if errors:
        raise pytest.UsageError(
            "celery-dispatch: invalid ini celery_dispatch_routes: " + "; ".join(errors)
        )
    if allowed is not None:
        where = "ini celery_dispatch_routes: route"
        unknown = [check_queue_name(r.queue, allowed, f"{where} {r.pattern!r}") for r in rules]
        if errors := [e for e in unknown if e]:
            raise pytest.UsageError("celery-dispatch: " + " ".join(errors))

    return allowed, rules
