"""pytest-celery-dispatch: run pytest tests on Celery workers pinned to queues.

Mark a test ``@pytest.mark.queue("queue_a")`` and run ``pytest --celery-dispatch``: the test
runs on a ``celery -A pytest_celery_dispatch.worker worker -Q queue_a`` process and its report
comes back into the local session. The plugin itself lives in :mod:`.plugin` (entry point
``celery_dispatch``); this package exports only what users name in their code.

PYTEST_DONT_REWRITE: spare runners import it before pytest configures (see spare_boot.py).
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

# Light on purpose: every pytest process imports this package (the plugin is an entry point).
from .serialization import DispatchError

try:
    __version__ = version("pytest-celery-dispatch")
except PackageNotFoundError:  # pragma: no cover - running from a source tree
    __version__ = "0+unknown"

__all__ = ["DispatchError", "__version__"]
