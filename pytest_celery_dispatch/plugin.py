"""pytest11 entry point ``celery_dispatch``: options, the ``queue`` marker, wiring, reporting.

Without ``--celery-dispatch`` the plugin only registers the marker, the options and the
fixtures (:mod:`.fixtures`); the run is untouched.

PYTEST_DONT_REWRITE: spare runners import it before pytest configures (runner.SPARE_BOOT).
"""

from __future__ import annotations

import os
from typing import Any

import pytest

from . import gcpace, shipcontrol
from . import settings as S
from .identity import identity_line
from .names import ENV_RUNNER
from .routing import FANOUT_PARAM
from .stashkeys import ARTIFACTS_KEY, JSON_KEY, SESSION_KEY, SETTINGS_ERROR_KEY, SETTINGS_KEY

#: The fixtures live in their own module, registered with (and disabled with) this plugin.
pytest_plugins = ["pytest_celery_dispatch.fixtures"]

MARKER_HELP = (
    "queue(name, ...): run this test on a Celery worker that consumes queue NAME "
    "(with --celery-dispatch); the closest marker (function, class, module) wins; several "
    "names run the test once on each queue"
)

#: pytest-xdist's group marker, registered here when xdist is not installed (--strict-markers).
XDIST_GROUP_HELP = (
    "xdist_group(name): with --celery-dist loadgroup, tests of the same group run on one "
    "worker slot, in order (pytest-xdist's marker, honoured by celery-dispatch)"
)


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("celery-dispatch", "distributed runs on Celery workers")
    group.addoption(
        "--celery-dispatch", action="store_true", dest="celery_dispatch", help=S.HELP_DISPATCH
    )
    group.addoption("--celery-broker", dest="celery_broker", metavar="URL", help=S.HELP_BROKER)
    group.addoption("--celery-backend", dest="celery_backend", metavar="URL", help=S.HELP_BACKEND)
    group.addoption(
        "--celery-default-queue",
        dest="celery_default_queue",
        metavar="NAME",
        help=S.HELP_DEFAULT_QUEUE,
    )
    group.addoption(
        "--celery-json-report", dest="celery_json_report", metavar="PATH", help=S.HELP_JSON_REPORT
    )
    group.addoption(
        "--celery-timeout", dest="celery_timeout", metavar="SECONDS", help=S.HELP_TIMEOUT
    )
    group.addoption(
        "--celery-wait-workers",
        dest="celery_wait_workers",
        metavar="SECONDS",
        help=S.HELP_WAIT_WORKERS,
    )
    group.addoption("--celery-retries", dest="celery_retries", metavar="N", help=S.HELP_RETRIES)
    group.addoption(
        "--celery-broker-timeout",
        dest="celery_broker_timeout",
        metavar="SECONDS",
        help=S.HELP_BROKER_TIMEOUT,
    )
    group.addoption("--celery-priority", dest="celery_priority", metavar="N", help=S.HELP_PRIORITY)
    group.addoption(
        "--celery-local-workers",
        dest="celery_local_workers",
        metavar="QUEUES",
        help=S.HELP_LOCAL_WORKERS,
    )
    group.addoption(
        "--celery-timeline", dest="celery_timeline", metavar="PATH", help=S.HELP_TIMELINE
    )
    group.addoption(
        "--celery-event-log", dest="celery_event_log", metavar="PATH", help=S.HELP_EVENT_LOG
    )
    # Checked by settings.parse_dist (not argparse choices), which names where a bad value
    # came from, the ini key included.
    group.addoption("--celery-dist", dest="celery_dist", metavar="MODE", help=S.HELP_DIST)
    group.addoption(
        "--celery-artifacts", dest="celery_artifacts", metavar="DIR", help=S.HELP_ARTIFACTS
    )
    group.addoption(
        "--celery-artifacts-tmp-path",
        dest="celery_artifacts_tmp_path",
        metavar="WHICH",
        help=S.HELP_ARTIFACTS_TMP_PATH,
    )
    group.addoption(
        "--celery-artifacts-limit",
        dest="celery_artifacts_limit",
        metavar="SIZE",
        help=S.HELP_ARTIFACTS_LIMIT,
    )
    group.addoption(
        "--celery-artifacts-run-limit",
        dest="celery_artifacts_run_limit",
        metavar="SIZE",
        help=S.HELP_ARTIFACTS_RUN_LIMIT,
    )
    for name, help_text in (
        ("broker", S.HELP_BROKER),
        ("backend", S.HELP_BACKEND),
        ("default_queue", S.HELP_DEFAULT_QUEUE),
        ("json_report", S.HELP_JSON_REPORT),
        ("timeout", S.HELP_TIMEOUT),
        ("wait_workers", S.HELP_WAIT_WORKERS),
        ("retries", S.HELP_RETRIES),
        ("broker_timeout", S.HELP_BROKER_TIMEOUT),
        ("priority", S.HELP_PRIORITY),
        ("local_workers", S.HELP_LOCAL_WORKERS),
        ("timeline", S.HELP_TIMELINE),
        ("event_log", S.HELP_EVENT_LOG),
        ("dist", S.HELP_DIST),
        ("artifacts", S.HELP_ARTIFACTS),
        ("artifacts_tmp_path", S.HELP_ARTIFACTS_TMP_PATH),
        ("artifacts_limit", S.HELP_ARTIFACTS_LIMIT),
        ("artifacts_run_limit", S.HELP_ARTIFACTS_RUN_LIMIT),
    ):
        parser.addini(f"celery_dispatch_{name}", help_text, default=None)
    parser.addini("celery_dispatch_queues", S.HELP_QUEUES, type="linelist", default=[])
    shipcontrol.add_options(group, parser)
    parser.addini("celery_dispatch_routes", S.HELP_ROUTES, type="linelist", default=[])
    parser.addini("celery_dispatch_health", S.HELP_HEALTH, default=None)
    parser.addini("celery_dispatch_health_every", S.HELP_HEALTH_EVERY, default=None)


def pytest_addhooks(pluginmanager: pytest.PytestPluginManager) -> None:
    from . import newhooks

    pluginmanager.add_hookspecs(newhooks)


@pytest.hookimpl(trylast=True)
def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """``@pytest.mark.queue("queue_a", "queue_b")``: one item per queue, ids ``[queue_a]``.

    Done with or without --celery-dispatch, on the controller and on the worker alike, so the
    nodeids match on both sides.
    """
    marker = metafunc.definition.get_closest_marker("queue")
    if marker is None or len(marker.args) < 2 or marker.kwargs:
        return
    queues = list(marker.args)
    if not all(isinstance(q, str) for q in queues) or len(set(queues)) != len(queues):
        return  # routing reports the invalid marker on the test
    metafunc.fixturenames.append(FANOUT_PARAM)
    metafunc.parametrize(FANOUT_PARAM, queues, ids=queues)


def is_runner() -> bool:
    """True inside a worker's runner process: dispatching is forced off there."""
    return os.environ.get(ENV_RUNNER) == "1"


def _ini(config: pytest.Config) -> Any:
    def get(name: str) -> Any:
        try:
            return config.getini(name)
        except ValueError:
            return None

    return get


def resolve_settings(config: pytest.Config) -> S.Settings:
    return S.resolve(lambda name: config.getoption(name, None), _ini(config))


@pytest.hookimpl(trylast=True)
def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", MARKER_HELP)
    if not config.pluginmanager.hasplugin("xdist"):
        config.addinivalue_line("markers", XDIST_GROUP_HELP)
    recorder = _register_recorder(config)
    if not config.getoption("celery_dispatch", False) or is_runner():
        _stash_settings_for_fixtures(config)
        if not is_runner() and SETTINGS_KEY in config.stash:
            _register_artifacts(config, config.stash[SETTINGS_KEY])
        return
    settings = resolve_settings(config)
    config.stash[SETTINGS_KEY] = settings
    config.add_cleanup(gcpace.relax())  # a controller's heap only grows (see gcpace)
    gcpace.freeze_at_exit()
    _register_artifacts(config, settings)
    _check_compatible(config)
    _check_writable_outputs(settings)
    _register_session(config, settings, recorder)


def _register_recorder(config: pytest.Config) -> Any:
    """Test durations are recorded on the controller of every run (not in a worker's runner,
    nor in an xdist worker: their reports reach the controller)."""
    if is_runner() or hasattr(config, "workerinput"):
        return None
    from .durations import DurationRecorder

    recorder = DurationRecorder(config)
    config.pluginmanager.register(recorder, "celery_dispatch_durations")
    return recorder


def _register_artifacts(config: pytest.Config, settings: S.Settings) -> None:
    """The run's artifact folder (created when first needed) and the plugin that names each
    test's files in its reports."""
    from .artifactreport import ArtifactReporter
    from .artifactstore import ArtifactStore

    store = ArtifactStore(settings.artifacts, settings.artifacts_limits)
    config.stash[ARTIFACTS_KEY] = store
    config.pluginmanager.register(ArtifactReporter(config, store), "celery_dispatch_artifacts")


def _stash_settings_for_fixtures(config: pytest.Config) -> None:
    """Not dispatching: a bad value only matters to a fixture that uses it."""
    try:
        config.stash[SETTINGS_KEY] = resolve_settings(config)
    except pytest.UsageError as exc:
        config.stash[SETTINGS_ERROR_KEY] = str(exc)


def _register_session(config: pytest.Config, settings: S.Settings, recorder: Any) -> None:
    """The controller's session and its JSON report, as plugins of this run."""
    from .durations import LOCAL
    from .jsonreport import JsonReportPlugin, run_section
    from .session import DispatchSession

    dsession = DispatchSession(config, settings)

    def where(nodeid: str) -> str | None:
        """A test's queue for its recorded duration; None after an infrastructure failure."""
        record = dsession.records.get(nodeid)
        if record is not None and record.infrastructure_error:
            return None
        route = dsession.routes.get(nodeid)
        return (route.queue if route is not None and route.error is None else None) or LOCAL

    if recorder is not None:
        recorder.where = where
    reporter: Any = config.pluginmanager.get_plugin("celery_dispatch_artifacts")
    reporter.session_of = lambda n: dsession.records[n].session if n in dsession.records else None
    config.stash[SESSION_KEY] = dsession
    config.pluginmanager.register(dsession, "celery_dispatch_session")
    json_plugin = JsonReportPlugin(
        config,
        settings.json_report,
        dispatch_info=lambda nodeid: (
            dsession.records[nodeid].as_dict() if nodeid in dsession.records else None
        ),
        session_info=lambda: run_section(dsession),
        timeline=settings.timeline,
        path_asked=_json_report_asked(config),
        artifacts=dsession.artifacts,
    )
    config.stash[JSON_KEY] = json_plugin
    config.pluginmanager.register(json_plugin, "celery_dispatch_json")


def _json_report_asked(config: pytest.Config) -> bool:
    """A JSON report path was given (option or ini), not the default one with a timestamp."""
    given = config.getoption("celery_json_report", None) or _ini(config)(
        "celery_dispatch_json_report"
    )
    return bool(str(given or "").strip())


def _check_compatible(config: pytest.Config) -> None:
    """Options of other plugins that cannot work with tests running on remote workers."""
    if config.getoption("usepdb", False):
        raise pytest.UsageError(
            "celery-dispatch: --pdb cannot debug a test that runs on a remote worker; run the "
            "test locally without --celery-dispatch to debug it"
        )
    if config.getoption("numprocesses", None) and config.getoption("dist", "no") != "no":
        raise pytest.UsageError(
            "celery-dispatch: pytest-xdist's -n/--dist cannot be combined with "
            "--celery-dispatch; a worker's parallel slots are its Celery concurrency "
            "(celery worker -c N)"
        )


def _check_writable_outputs(settings: S.Settings) -> None:
    """Fail before the run, not after it, when an output file cannot be written."""
    from .jsonreport import check_writable

    for what, path, option in (
        ("the JSON report", settings.json_report, "--celery-json-report"),
        ("the timeline", settings.timeline, "--celery-timeline"),
        ("the event log", settings.event_log, "--celery-event-log"),
    ):
        why = check_writable(path) if path else None
        if why:
            raise pytest.UsageError(
                f"celery-dispatch: cannot write {what} {path!r}: {why}; "
                f"pass {option} PATH in a writable directory"
            )
    from .artifactpaths import folder_problem

    why = folder_problem(settings.artifacts)
    if why:
        raise pytest.UsageError(
            f"celery-dispatch: cannot write test artifacts into {settings.artifacts!r}: {why}; "
            "pass --celery-artifacts DIR in a writable directory"
        )


def pytest_report_header(config: pytest.Config) -> list[str] | None:
    dsession = config.stash.get(SESSION_KEY, None)
    if dsession is None:
        return None
    st = dsession.settings
    lines = [
        f"celery-dispatch: broker {st.broker_masked}, backend {st.backend_masked}, "
        f"timeout {st.timeout:g}s, retries {st.retries}, run {dsession.run_id}",
        f"celery-dispatch: this run is {identity_line(dsession.identity)}",
    ]
    if dsession.embedded_root is not None:
        lines.append(
            f"celery-dispatch: embedded broker in {dsession.embedded_root}: this machine only; "
            f"for workers on other machines use RabbitMQ (--celery-broker {S.DEFAULT_BROKER})"
        )
    return lines


def pytest_terminal_summary(terminalreporter: Any, config: pytest.Config) -> None:
    json_plugin = config.stash.get(JSON_KEY, None)
    if json_plugin is None or json_plugin.data is None:
        return
    from .terminal import summary_lines

    terminalreporter.write_sep("=", "celery dispatch", cyan=True)
    for text, markup in summary_lines(json_plugin.data, config.get_verbosity()):
        terminalreporter.write_line(text, **markup)
    if json_plugin.written:
        terminalreporter.write_line(f"JSON report: {os.path.abspath(json_plugin.written)}")
    if json_plugin.timeline_written:
        path = os.path.abspath(json_plugin.timeline_written)
        terminalreporter.write_line(f"timeline: {path}")
