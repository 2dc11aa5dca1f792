"""sha256 of files remembered by their stat, so that only files that changed are hashed again.

Both sides hash whole trees: the controller its run's tree for the manifest, a worker under
``--celery-ship auto`` its workspace to compare with it. A :class:`HashCache` keeps, per file,
its sha256 with the stat it had when it was hashed (size, mtime_ns, inode, ctime_ns), in a JSON
file: a file whose stat is the same is taken as unchanged. The ctime cannot be set back by
``touch`` or ``os.utime``, so a rewrite that restores the size and mtime is still seen.

A file changed within :data:`RACY_SECONDS` of its hashing is not remembered: file systems
stamp times with a coarse clock, and a second write in the same tick would leave its stat as
it was ("racily clean", as git calls it). It is hashed again next time, until it is older.

The controller keeps its file in pytest's cache folder (none with ``-p no:cacheprovider``),
each worker one per workspace in its ship cache (see :mod:`.shipcache`). A file that cannot be
read or parsed is an empty cache, never an error; it is written whole to a temporary file
then renamed, so two processes saving at once leave one of their versions, both true.

PYTEST_DONT_REWRITE: the worker side imports it.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import tempfile
import time
from collections.abc import Callable
from typing import Any

from .serialization import file_digest

#: A file whose mtime or ctime is this close to its hashing is hashed again next time.
RACY_SECONDS = 2.0
VERSION = 1

_SHA256 = re.compile(r"[0-9a-f]{64}")


def stat_key(st: os.stat_result) -> list[int]:
    return [st.st_size, st.st_mtime_ns, st.st_ino, st.st_ctime_ns]


class HashCache:
    """sha256 by path and stat, loaded from ``path`` (None: in memory only)."""

    def __init__(self, path: str | None, clock: Callable[[], int] = time.time_ns) -> None:
        self.path = path
        self.clock = clock
        #: path -> [size, mtime_ns, inode, ctime_ns, sha256], as loaded (checked when used)
        self.rows: dict[str, list[Any]] = {}
        self.hashed = 0  # files hashed since loaded (not found, or changed)
        self._dirty = False
        if path:
            self._load(path)

    def _load(self, path: str) -> None:
        try:
            with open(path, encoding="utf-8") as fh:
                data = json.load(fh)
        except (OSError, ValueError):
            return
        if not isinstance(data, dict) or data.get("version") != VERSION:
            return
        files = data.get("files")
        if isinstance(files, dict):
            self.rows = files

    def lookup(self, full: str, st: os.stat_result) -> str | None:
        """The remembered sha256 of ``full`` when its stat is the same as when hashed."""
        row = self.rows.get(full)
        if type(row) is not list or len(row) != 5 or row[:4] != stat_key(st):
            return None
        sha = row[4]
        return sha if isinstance(sha, str) and _SHA256.fullmatch(sha) else None

    def remember(self, full: str, st: os.stat_result, sha: str, since: int) -> None:
        """Keep ``sha`` for ``full`` as it was at ``st``, read after ``since`` (time_ns), unless
        it changed too close to then to be told apart from a later write."""
        newest = max(st.st_mtime_ns, st.st_ctime_ns)
        if since - newest <= RACY_SECONDS * 1e9:
            self.forget(full)
            return
        row = [*stat_key(st), sha]
        if self.rows.get(full) != row:
            self.rows[full] = row
            self._dirty = True

    def forget(self, full: str) -> None:
        if self.rows.pop(full, None) is not None:
            self._dirty = True

    def sha256(self, full: str, st: os.stat_result) -> str:
        """The file's sha256: remembered, else hashed (and remembered)."""
        found = self.lookup(full, st)
        if found is None:
            since = self.clock()
            found = file_digest(full)
            self.hashed += 1
            self.remember(full, st, found, since)
        return found

    def keep_only(self, paths: set[str]) -> None:
        """Forget every file not in ``paths`` (gone from the tree)."""
        for name in set(self.rows) - paths:
            self.forget(name)

    def save(self) -> None:
        """Write the cache when it changed (best effort: a cache that cannot be written is
        only slower next time)."""
        if not self.path or not self._dirty:
            return
        folder = os.path.dirname(self.path)
        with contextlib.suppress(OSError):
            os.makedirs(folder, mode=0o700, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=folder, prefix=".hashes-")
            try:
                with os.fdopen(fd, "w", encoding="utf-8") as fh:
                    json.dump({"version": VERSION, "files": self.rows}, fh, separators=(",", ":"))
                os.replace(tmp, self.path)
                self._dirty = False
            except BaseException:
                with contextlib.suppress(OSError):
                    os.unlink(tmp)
                raise


def workspace_key(worker: str, workspace: str) -> str:
    """The name of a worker's hash cache of one workspace."""
    text = f"{worker}\0{os.path.realpath(workspace)}"
    return hashlib.sha256(text.encode("utf-8", "surrogateescape")).hexdigest()[:32]
