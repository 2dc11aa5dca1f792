"""The embedded broker's ``file://`` result backend, with whole-file writes.

Celery's ``FilesystemBackend.set`` truncates a task's state file and writes it in place, so a
reader polling it (the ``dispatcher`` fixture, every 10 ms) can read it empty between the two
and fail with ``DecodeError: Expecting value`` (seen in ``make demo`` on the embedded broker
once workers report ``STARTED`` too: a second write per task). Here each state is written to a
temporary file beside it and renamed over it, so a reader sees the old state or the new one,
as :mod:`.embedded` does for its messages (kombu #1551).

Selected by URL: ``pytest_celery_dispatch.filebackend:AtomicFilesystemBackend+file:///path``.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from typing import Any

from celery.backends.filesystem import FilesystemBackend
from kombu.utils.encoding import ensure_bytes

#: The ``result_backend`` prefix that selects this class for a ``file://`` URL.
URL_PREFIX = f"{__name__}:AtomicFilesystemBackend+"


class AtomicFilesystemBackend(FilesystemBackend):  # type: ignore[misc]
    """``file://`` results written whole: a temporary file, then a rename over the old one."""

    def set(self, key: Any, value: Any) -> None:
        target = os.fsdecode(self._filename(key))
        fd, tmp = tempfile.mkstemp(dir=os.path.dirname(target), prefix=".tmp-")
        try:
            with os.fdopen(fd, "wb") as out:
                out.write(ensure_bytes(value))
            os.replace(tmp, target)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
