"""The pytest11 entry point: light to load, its fixtures registered and disabled with it."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

#: Every pytest process loads the plugin: none of these may come with it.
HEAVY = ("celery", "kombu", "pytest_celery_dispatch.runner")


def test_loading_the_plugin_imports_neither_celery_nor_the_worker_side() -> None:
    code = (
        "import json, sys\n"
        "import pytest_celery_dispatch.plugin\n"
        f"print(json.dumps([name for name in {HEAVY!r} if name in sys.modules]))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    )
    assert json.loads(result.stdout) == []


def test_the_fixtures_come_with_the_plugin_and_go_with_it(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        """
        def test_local(dispatch_context, dispatcher, dispatch_app):
            assert dispatch_context.dispatched is False
            assert dispatch_context.worker == "local"
            assert dispatcher.app is dispatch_app
        """
    )
    pytester.runpytest_subprocess("-p", "no:cacheprovider").assert_outcomes(passed=1)
    disabled = pytester.runpytest_subprocess("-p", "no:cacheprovider", "-p", "no:celery_dispatch")
    disabled.assert_outcomes(errors=1)
    disabled.stdout.fnmatch_lines(["*fixture 'dispatch_context' not found*"])
