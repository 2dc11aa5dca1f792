"""The ``config.stash`` keys shared by the plugin's wiring (:mod:`.plugin`) and its fixtures.

PYTEST_DONT_REWRITE: spare runners import the plugin before pytest configures (runner.SPARE_BOOT).
"""

from __future__ import annotations

from typing import Any

import pytest

from .settings import Settings

#: This run's resolved settings (set whenever they resolve, dispatching or not).
SETTINGS_KEY = pytest.StashKey[Settings]()
#: Why the settings did not resolve in a run that does not dispatch (a fixture raises it).
SETTINGS_ERROR_KEY = pytest.StashKey[str]()
#: The controller's ``DispatchSession``; present only in a ``--celery-dispatch`` run.
SESSION_KEY = pytest.StashKey[Any]()
#: The ``JsonReportPlugin`` of a ``--celery-dispatch`` run.
JSON_KEY = pytest.StashKey[Any]()
#: The run's ``ArtifactStore`` (test artifacts), on the controller of every run.
ARTIFACTS_KEY = pytest.StashKey[Any]()
