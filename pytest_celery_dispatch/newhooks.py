"""Hook specifications of pytest-celery-dispatch (registered by the plugin)."""

from __future__ import annotations

import pytest


@pytest.hookspec(firstresult=True)
def pytest_celery_dispatch_route(item: pytest.Item) -> str | None:
    """Return the queue ``item`` should run on, or ``None`` to leave the decision to the ini
    ``celery_dispatch_routes``, then ``--celery-default-queue``, then the controller.

    A ``queue`` marker on the test still wins over this hook. Called once per collected item on
    the controller, with ``--celery-dispatch`` only.
    """
