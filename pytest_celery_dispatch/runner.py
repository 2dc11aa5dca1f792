"""The runner plugin: loaded with ``-p pytest_celery_dispatch.runner`` into a slot's runner.

The Celery task (``worker.run_session``) never runs tests in its own process. Its driver
(:mod:`.driver`) starts one ``python -m pytest -p pytest_celery_dispatch.runner`` in the
workspace, in a new process group, that collects the run's test files once and then runs chunk
after chunk of nodeids as the driver feeds them (JSON lines on a command pipe), like an xdist
worker. It writes one JSON event per line on an event pipe: per test a ``logstart``, then the
finished test in one line (``test``: its reports serialized and encoded once, here; the slot
reads the line's header and relays the rest home undecoded). A test that kills its process,
segfaults or hangs past the deadline only takes that runner down: the driver names the test as
crashed and starts a new runner for the rest.

In a zygote (see :mod:`.zygote`) the same plugin collects and then forks the slots' runners.

Like xdist's ``WorkerInteractor``, the plugin is one object (:class:`RunnerPlugin`) with its
state on ``self``; this module only registers it, in runner processes alone. It never imports
the controller side.

PYTEST_DONT_REWRITE: spare runners import it before pytest configures (see spare_boot.py).
"""

from __future__ import annotations

import faulthandler
import gc
import json
import os
import signal
import socket
import sys
import time
from collections.abc import Generator, Mapping
from typing import IO, Any

import pytest

from . import gcpace
from .artifactship import note_tmp_path, runner_event
from .jsonlines import LineWriter, encode_split, read_until_closed
from .names import (
    ENV_COMMAND_FD,
    ENV_EVENT_FD,
    ENV_NODEIDS,
    ENV_OPTIONS,
    ENV_PARENT,
    ENV_RUNNER,
    ENV_STACKS,
    ENV_ZYGOTE,
)
from .outcome import outcome_of_reports
from .procutil import CRASH_OUTPUT_TAIL, DUMP_SIGNAL, STOP_SIGNAL, die_with_parent
from .runnerspec import REPORT_OPTIONS
from .serialization import nodeid_path
from .zygote import ZygoteServer, listen

#: Captured output kept per report section (stdout, stderr, log of one phase); the middle of a
#: longer section is cut out and replaced by a line that says how much was dropped.
MAX_SECTION_CHARS = 1_000_000
#: The name the plugin object is registered under.
PLUGIN_NAME = "celery-dispatch-runner"
#: ... and the folder listings' (:class:`FolderListings`).
LISTINGS_NAME = "celery-dispatch-listings"


def truncate_section(text: str, limit: int = MAX_SECTION_CHARS) -> str:
    """Keep the head and tail of an over-long captured section, and say what was cut."""
    if len(text) <= limit:
        return text
    head = limit // 2
    tail = limit - head
    dropped = len(text) - limit
    return (
        f"{text[:head]}\n[... celery-dispatch: {dropped} characters of this section were cut; "
        f"each captured section keeps at most {limit} characters ...]\n{text[-tail:]}"
    )


def give_terminal_writer(config: pytest.Config) -> None:
    """A runner has no terminal reporter (``-p no:terminal``: what it prints is nobody's, and
    under ``-s`` only the tests' own output may reach its stdout, streamed home), and pytest's
    ``config.get_terminal_writer()`` then fails an assertion: pytest-timeout's timeout, which
    dumps the stacks through it, failed its test with a bare ``AssertionError``. What writes
    through it writes to stdout instead: under ``-s`` it is streamed home with the tests'
    output, as it shows in a local ``-s`` run; else it lands in the runner's log."""
    from _pytest._io import TerminalWriter  # --color is the terminal plugin's option, gone

    writer = TerminalWriter(sys.stdout)
    config.get_terminal_writer = lambda: writer  # type: ignore[method-assign]


def pytest_addoption(parser: pytest.Parser, pluginmanager: pytest.PytestPluginManager) -> None:
    """No options: in a runner process, register the plugin object right after this module
    (``-p`` loads it before the conftest files and the entry-point plugins).

    A zygote listens from here: loading the entry-point plugins (celery's, docker's...) takes
    seconds on a busy machine, longer than a driver waits for the socket to appear
    (``ZYGOTE_START_WAIT``); its wait for the fork (``driver.fork_wait_limit``) covers that time.
    """
    plugin = RunnerPlugin.from_env(os.environ)
    if plugin is not None and pluginmanager.get_plugin(PLUGIN_NAME) is None:
        pluginmanager.register(plugin, PLUGIN_NAME)
        pluginmanager.register(FolderListings(), LISTINGS_NAME)
        plugin._listen()


class FolderListings:
    """Each folder is listed once while a runner collects the test files it is given.

    pytest collects a file argument's folder again for each file argument in it (a file given
    twice on the command line is collected twice) and makes a node of every file in the folder
    each time: quadratic in the files a runner is given from one folder. A queue's 150 files out
    of a folder of 300 took 9.1 s to collect instead of 3.6 s. A runner is never given a file
    twice (``runnerspec.runner_command``), so a folder's first listing serves every argument in
    it: its children, the same nodes, each time.
    """

    @pytest.hookimpl(wrapper=True)
    def pytest_make_collect_report(
        self, collector: pytest.Collector
    ) -> Generator[None, pytest.CollectReport, pytest.CollectReport]:
        report = yield
        if isinstance(collector, pytest.Directory) and report.passed:
            children = list(report.result)
            collector.collect = lambda: iter(children)  # type: ignore[method-assign]
        return report


class RunnerPlugin:
    """The runner process's side of a slot: runs what the driver sends, reports every phase.

    A runner has an event pipe (``ENV_EVENT_FD``) and, once it has collected, reads commands;
    a zygote (``ENV_ZYGOTE``) listens on its socket and forks runners instead of running tests.
    """

    def __init__(self, event_fd: str | None, zygote: str | None) -> None:
        self.event_fd = event_fd
        self.zygote = zygote
        self.writer: LineWriter | None = None  # set in pytest_configure
        self.listener: socket.socket | None = None  # a zygote's socket
        self.stop_requested = False  # STOP_SIGNAL: stop after the running test
        self.config: pytest.Config | None = None
        self.collected: dict[str, Any] = {}  # this process's "collected" event, for its forks
        self.collect_errors: dict[str, str] = {}  # collector nodeid -> its error (tail)
        self.started: dict[str, float] = {}  # tests whose logstart was sent: when
        self.reports: dict[str, list[dict[str, Any]]] = {}  # a running test's reports, encoded
        self.failed: set[str] = set()  # tests with a failed phase (their tmp_path may go home)
        self.stacks: IO[str] | None = None  # the file DUMP_SIGNAL writes the stacks to (open)

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> RunnerPlugin | None:
        """The plugin of a runner or zygote process; None in any other pytest process."""
        event_fd = env.get(ENV_EVENT_FD)
        zygote = env.get(ENV_ZYGOTE)
        if (event_fd is None and not zygote) or env.get(ENV_RUNNER) != "1":
            return None
        return cls(event_fd, zygote)

    def emit(self, event: dict[str, Any]) -> None:
        if self.writer is not None:
            self.writer.write(event)

    def _request_stop(self, signum: int, frame: Any) -> None:
        self.stop_requested = True

    def _listen(self) -> None:
        if self.listener is None and self.zygote:
            self.listener = listen(self.zygote)

    # ------------------------------------------------------------------------ start-up

    @pytest.hookimpl(tryfirst=True)
    def pytest_load_initial_conftests(self, early_config: pytest.Config) -> None:
        self._listen()  # before the conftest files, which may take long to import
        self._dump_stacks_on_signal()  # ... or hang

    def _dump_stacks_on_signal(self) -> None:
        """On DUMP_SIGNAL, every thread's stack goes to the file its driver named (a runner
        forked from a zygote names its own): the driver asks before it kills a hung runner."""
        path = os.environ.get(ENV_STACKS)
        if not path:
            return
        old, self.stacks = self.stacks, open(path, "w", encoding="utf-8")  # noqa: SIM115
        faulthandler.register(DUMP_SIGNAL, file=self.stacks, all_threads=True, chain=False)
        if old is not None:
            old.close()

    @pytest.hookimpl(tryfirst=True)
    def pytest_configure(self, config: pytest.Config) -> None:
        # The controller's values of pytest's report options and of other plugins' options,
        # for the plugins installed here.
        for name, value in json.loads(os.environ.get(ENV_OPTIONS) or "{}").items():
            if hasattr(config.option, name) or name in REPORT_OPTIONS:
                setattr(config.option, name, value)
        die_with_parent(os.environ.get(ENV_PARENT))
        gcpace.relax()  # a zygote's collected items stay (see gcpace); its forks inherit it
        if self.zygote:
            self._listen()
            self.writer = LineWriter(os.open(os.devnull, os.O_WRONLY))  # it runs no test
        else:
            self.writer = LineWriter(int(str(self.event_fd)))
        signal.signal(STOP_SIGNAL, self._request_stop)
        # A dropped run is interrupted as Ctrl-C would (KeyboardInterrupt, fixtures torn down):
        # the worker's pool process may have left SIGINT ignored, and children inherit that.
        signal.signal(signal.SIGINT, signal.default_int_handler)

    @pytest.hookimpl(tryfirst=True)
    def pytest_sessionstart(self, session: pytest.Session) -> None:
        self.config = session.config
        if session.config.pluginmanager.get_plugin("terminalreporter") is None:
            give_terminal_writer(session.config)

    # ------------------------------------------------------------------------ collection

    @pytest.hookimpl(trylast=True)
    def pytest_collection_modifyitems(
        self, session: pytest.Session, config: pytest.Config, items: list[pytest.Item]
    ) -> None:
        """Keep exactly the requested nodeids, in the requested order; name the missing ones."""
        path = os.environ.get(ENV_NODEIDS)
        if self.writer is None or not path:
            return
        with open(path, encoding="utf-8") as fh:
            wanted: list[str] = json.load(fh)
        by_id = {item.nodeid: item for item in items}
        selected = [by_id[n] for n in wanted if n in by_id]
        chosen = {item.nodeid for item in selected}
        deselected = [item for item in items if item.nodeid not in chosen]
        missing = [n for n in wanted if n not in by_id]
        items[:] = selected
        if deselected:
            config.hook.pytest_deselected(items=deselected)
        # The imported modules and the collected items live as long as this process: keep them
        # out of the collector's way (its full passes, pytest's gc.collect() at the end). What
        # the tests themselves leave behind is collected as usual.
        gc.freeze()
        self.collected.update(
            {
                "type": "collected",
                "count": len(selected),
                "missing": missing,
                "reason": self._collect_errors_for(missing) if missing else "",
            }
        )
        self.emit(dict(self.collected))

    def pytest_collectreport(self, report: pytest.CollectReport) -> None:
        if self.writer is not None and report.failed:
            self.collect_errors[report.nodeid] = str(report.longreprtext)[-CRASH_OUTPUT_TAIL:]

    def _collect_errors_for(self, missing: list[str]) -> str:
        reasons = []
        for nodeid in missing:
            for prefix, text in self.collect_errors.items():
                if nodeid == prefix or nodeid.startswith(prefix + "::") or prefix in ("", "."):
                    reasons.append(f"collection error in {prefix or 'rootdir'}:\n{text}")
                    break
                if nodeid_path(nodeid) == prefix:
                    reasons.append(f"collection error in {prefix}:\n{text}")
                    break
        return "\n".join(dict.fromkeys(reasons))

    # ------------------------------------------------------------------------ the run loop

    @pytest.hookimpl(tryfirst=True)
    def pytest_runtestloop(self, session: pytest.Session) -> bool | None:
        """Run what the driver sends, chunk after chunk, on the items collected once.

        The last item received is held back until the next chunk (or the end) is known, so
        that ``nextitem`` is right and module / class fixtures are not torn down between chunks.
        A zygote serves forks here instead; each forked runner goes on to run its driver's
        commands.
        """
        fd = os.environ.get(ENV_COMMAND_FD)
        if self.writer is None or (fd is None and self.listener is None):
            return None
        if session.config.option.collectonly:
            return True
        if self.listener is not None:
            pipes = ZygoteServer(session, self.listener, str(self.zygote)).serve()
            if pipes is None:
                return True  # the zygote ends here
            # A freshly forked runner: the driver's pipes, then what was collected.
            event_fd, command_fd = pipes
            self.listener = None
            self._dump_stacks_on_signal()
            self.writer = LineWriter(event_fd)
            self.emit(dict(self.collected))
            return self._run_commands(session, command_fd)
        if fd is None:
            return True
        return self._run_commands(session, int(fd))

    def _run_commands(self, session: pytest.Session, fd: int) -> bool:
        try:
            return self._run_each_command(session, fd)
        finally:
            self._flush()

    def _flush(self) -> None:
        """Send the finished test held back for the next write (see :meth:`_send_test`)."""
        if self.writer is not None:
            self.writer.flush()

    def _run_each_command(self, session: pytest.Session, fd: int) -> bool:
        index = {item.nodeid: item for item in session.items}
        pending: list[pytest.Item] = []

        def run(item: pytest.Item, nextitem: pytest.Item | None) -> bool:
            item.config.hook.pytest_runtest_protocol(item=item, nextitem=nextitem)
            return not (session.shouldfail or session.shouldstop or self.stop_requested)

        for command in read_until_closed(fd, before_read=self._flush):
            if command.get("type") == "run":
                pending.extend(index[n] for n in command.get("nodeids", []) if n in index)
                while len(pending) > 1:
                    if not run(pending.pop(0), pending[0]):
                        return True
            else:  # "shutdown": run what is left, the last one with nextitem=None
                while pending:
                    item = pending.pop(0)
                    if not run(item, pending[0] if pending else None):
                        return True
                return True
        return True

    # ------------------------------------------------------------------------ reports

    def pytest_warning_recorded(
        self,
        warning_message: Any,
        when: str,
        nodeid: str,
        location: tuple[str, int, str] | None,
    ) -> None:
        """Warnings raised on the worker travel home for the controller's warnings summary."""
        if self.writer is None:
            return
        self.emit(
            {
                "type": "warning",
                "nodeid": nodeid,
                "when": when,
                "category": getattr(warning_message.category, "__name__", "UserWarning"),
                "message": str(warning_message.message),
                "filename": str(warning_message.filename),
                "lineno": warning_message.lineno,
            }
        )

    def pytest_runtest_logstart(self, nodeid: str, location: tuple[str, int | None, str]) -> None:
        # Once per test: a plugin that reruns a test (pytest-rerunfailures) logs each attempt.
        if nodeid not in self.started:
            self.started[nodeid] = now = time.time()
            self.emit({"type": "logstart", "nodeid": nodeid, "ts": now})

    @pytest.hookimpl(wrapper=True)
    def pytest_runtest_protocol(
        self, item: pytest.Item, nextitem: pytest.Item | None
    ) -> Generator[None, object, object]:
        """A test ends when its whole protocol has, reruns included, not at its first
        logfinish."""
        try:
            return (yield)
        finally:
            if item.nodeid in self.started:
                artifacts = runner_event(item, item.nodeid in self.failed, os.environ)
                if artifacts is not None:  # before the test: its files reach home first
                    self.emit(artifacts)
                self._send_test(item)

    @pytest.hookimpl(tryfirst=True)
    def pytest_runtest_teardown(self, item: pytest.Item) -> None:
        note_tmp_path(item)  # item.funcargs is gone once the fixtures are torn down

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        if self.writer is None:
            return
        if report.failed:
            self.failed.add(report.nodeid)
        report.sections = [(name, truncate_section(text)) for name, text in report.sections]
        config = self.config
        data = (
            config.hook.pytest_report_to_serializable(config=config, report=report)
            if config is not None
            else {}
        )
        self.reports.setdefault(report.nodeid, []).append(data)

    def _send_test(self, item: pytest.Item) -> None:
        """The finished test in one line, encoded once: the slot reads its header (nodeid,
        outcome) and relays the rest home as it is (an entry of a ``results`` event)."""
        if self.writer is None:
            return
        nodeid = item.nodeid
        reports = self.reports.pop(nodeid, [])
        finished = time.time()
        header = {
            "type": "test",
            "nodeid": nodeid,
            "outcome": outcome_of_reports(reports),
            "ts": finished,
        }
        fields = {
            "nodeid": nodeid,
            "location": list(item.location),
            "started": self.started.get(nodeid),
            "finished": finished,
            "reports": reports,
        }
        # Held back until the next line (the next test's logstart) or the next wait for a
        # command: one write per test. A runner that dies after this test and before that
        # write dies in the next test, the one its driver names as crashed.
        self.writer.hold(encode_split(header, fields))

    def pytest_sessionfinish(self, session: pytest.Session) -> None:
        if session.shouldfail:  # the forwarded -x / --maxfail tripped in this runner
            self.emit({"type": "stopping", "reason": str(session.shouldfail)})
        self._flush()
