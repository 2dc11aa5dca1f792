"""Test artifacts in the reports: the terminal's failure section, JUnit, the JSON report.

:class:`ArtifactReporter` is a plugin of the controller (dispatching or not). When a test's
reports are replayed (or a local test reports), it looks up the test's files in the
:class:`~.artifactstore.ArtifactStore` and

* adds a ``dispatch artifacts`` section to a failed report (the terminal prints it under the
  failure, with each file's size and sha256, and what was cut);
* adds one ``artifact`` user property per file to the teardown report (JUnit ``<property>``,
  the JSON report's ``user_properties``) and a ``<system-out>`` of ``[[ATTACHMENT|path]]``
  lines to the test case (the convention the Jenkins and GitLab JUnit viewers read); JUnit paths
  are relative to the current directory when inside it (GitLab reads them relative to the
  project folder), absolute otherwise (Jenkins).

:func:`report_entries` gives the JSON report's ``tests[].artifacts`` (paths relative to the
report's folder).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import pytest

from .artifactpaths import describe_cut
from .artifactstore import ArtifactStore, Entry

#: The section a failed report gets (the terminal prints it under the failure).
SECTION = "dispatch artifacts"
#: The captured-output section that carries the ATTACHMENT lines when pytest writes system-out.
OUTPUT_SECTION = "Captured stdout dispatch artifacts"
#: The JUnit / user property name of each file.
PROPERTY = "artifact"


def junit_path(path: str, cwd: str | None = None) -> str:
    """Relative to the current directory when inside it, else absolute."""
    here = os.path.abspath(cwd or os.getcwd())
    full = os.path.abspath(path)
    return os.path.relpath(full, here) if full.startswith(here + os.sep) else full


def describe(entry: Entry, path: str) -> str:
    """One line per file: path, bytes, sha256, and what was cut or went wrong."""
    text = f"{path} ({entry.get('bytes', 0)} bytes, sha256 {str(entry.get('sha256'))[:16]})"
    cut = describe_cut(entry)
    if cut:
        text += f" {cut}"
    if entry.get("error"):
        text += f" ERROR: {entry['error']}"
    return text


def report_entries(entries: list[Entry], base: str) -> list[dict[str, Any]]:
    """The JSON report's ``artifacts`` of a test: paths relative to ``base`` (its folder)."""
    found = []
    for entry in entries:
        item: dict[str, Any] = {
            "path": os.path.relpath(entry["path"], base) if entry.get("path") else None,
            "name": entry.get("name"),
            "bytes": int(entry.get("bytes") or 0),
            "size": int(entry.get("size") or 0),
            "sha256": entry.get("sha256") or "",
            "cut": bool(entry.get("cut")),
        }
        for key in ("cut_reason", "error"):
            if entry.get(key):
                item[key] = entry[key]
        found.append(item)
    return found


class ArtifactReporter:
    """Names each test's files in its reports (see the module's docstring)."""

    def __init__(
        self,
        config: pytest.Config,
        store: ArtifactStore,
        session_of: Callable[[str], str | None] = lambda nodeid: None,
    ) -> None:
        self.config = config
        self.store = store
        self.session_of = session_of

    @pytest.hookimpl(tryfirst=True)
    def pytest_runtest_logstart(self, nodeid: str, location: Any) -> None:
        """A dispatched test is replayed: its attempt's files move into place first."""
        session = self.session_of(nodeid)
        if session is not None:
            self.store.finalize(nodeid, session)

    @pytest.hookimpl(tryfirst=True)
    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        entries = self.store.scan_local(report.nodeid)
        if not entries:
            return
        if report.failed:
            lines = [describe(e, junit_path(e["path"]) if e.get("path") else e["name"])
                     for e in entries]  # fmt: skip
            report.sections.append((SECTION, "\n".join(lines)))
        if report.when == "teardown":
            paths = [junit_path(e["path"]) for e in entries if e.get("path")]
            report.user_properties = [
                *list(report.user_properties or []),
                *((PROPERTY, path) for path in paths),
            ]
            self._attach(report, paths)

    @pytest.hookimpl(trylast=True)  # under the dispatch summary, beside the report's path
    def pytest_terminal_summary(self, terminalreporter: Any) -> None:
        """One line: where the run's files came home, how many, and what was cut."""
        tests = [entries for entries in self.store.entries.values() if entries]
        files = [e for entries in tests for e in entries]
        if not files:
            return
        cut = sum(1 for e in files if e.get("cut"))
        errors = sum(1 for e in files if e.get("error"))
        text = (
            f"artifacts: {len(files)} file{'s' if len(files) != 1 else ''} of "
            f"{len(tests)} test{'s' if len(tests) != 1 else ''} "
            f"in {junit_path(self.store.root)}"
        )
        if cut or errors:
            text += f" ({cut} cut, {errors} with errors)"
        terminalreporter.write_line(text, yellow=bool(cut or errors))

    @pytest.hookimpl(trylast=True)
    def pytest_sessionfinish(self, session: pytest.Session) -> None:
        self.store.close()  # after the JSON report (tryfirst) has listed the files

    def _attach(self, report: pytest.TestReport, paths: list[str]) -> None:
        """``[[ATTACHMENT|path]]`` lines in the JUnit test case's ``<system-out>``: added to the
        one pytest writes (``junit_logging``), else in one of their own; never a second one."""
        if not paths:
            return
        try:
            from xml.etree import ElementTree as ET

            from _pytest.junitxml import bin_xml_escape, xml_key
        except ImportError:  # pragma: no cover - a pytest without them: properties only
            return
        xml = self.config.stash.get(xml_key, None)
        if xml is None:
            return
        lines = "".join(f"[[ATTACHMENT|{p}]]\n" for p in paths)
        reporter = xml.node_reporter(report)
        written = [n for n in getattr(reporter, "nodes", []) if n.tag == "system-out"]
        if written:  # pytest wrote the failed call's output already
            written[-1].text = (written[-1].text or "") + "\n" + bin_xml_escape(lines)
        elif xml.logging in ("system-out", "out-err", "all") and xml.log_passing_tests:
            report.sections.append((OUTPUT_SECTION, lines))  # pytest writes it with the rest
        else:
            tag = ET.Element("system-out")
            tag.text = bin_xml_escape(lines)
            reporter.append(tag)
