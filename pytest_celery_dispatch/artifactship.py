"""Test artifacts on the worker: each test's private folder, and the files sent home.

In the runner process the ``dispatch_artifacts`` fixture makes a fresh, empty folder for the
test under the slot's artifact folder (``ENV_ARTIFACTS``, one per ``run_session``, so one per
attempt) and notes it on the item; after the test's whole protocol, the runner plugin sends an
``artifacts`` event naming the folders to bring home (the fixture's, and ``tmp_path`` when
``--celery-artifacts-tmp-path`` asks for it). A test that takes its runner down sends nothing:
the slot finds its folder by name (:func:`folder_for`) when it reports the crash.

In the slot (the pool process), :class:`ArtifactShipper` sits in front of the reply queue: it
turns that event into ``artifact_chunk`` messages of at most :data:`.CHUNK_BYTES` each and one
``artifacts`` summary (each file's name, size, bytes sent, sha256 of what was sent, and whether
it was cut), then deletes the test's folder. Both go out before the test's results, so the
controller has the files when it reports the test. Never imports the controller side.

PYTEST_DONT_REWRITE: spare runners import it before pytest configures (see spare_boot.py).
"""

from __future__ import annotations

import base64
import hashlib
import os
import shutil
from collections.abc import Callable, Mapping
from typing import Any

import pytest

from .artifactpaths import CHUNK_BYTES, TMP_PATH_PREFIX, Limits, files_under
from .names import ENV_ARTIFACTS, ENV_ARTIFACTS_TMP_PATH

#: The test's artifact folder on the worker, noted by the fixture for the runner plugin.
FOLDER_KEY = pytest.StashKey[str]()
#: The test's ``tmp_path``, noted before its fixtures are torn down.
TMP_PATH_KEY = pytest.StashKey[str]()

Emit = Callable[[dict[str, Any]], None]


def folder_for(root: str, nodeid: str) -> str:
    """The test's folder in the slot's artifact folder: known to the slot without a word from
    the runner, so the files of a test that took its runner down come home too."""
    return os.path.join(root, "test-" + hashlib.sha256(nodeid.encode()).hexdigest()[:24])


def worker_folder(item: pytest.Item, env: Mapping[str, str]) -> str | None:
    """A fresh, empty folder for this test in the slot's artifact folder (a slot runs a test
    once: one folder per test and attempt), or None off a worker."""
    root = env.get(ENV_ARTIFACTS)
    if not root:
        return None
    folder = folder_for(root, item.nodeid)
    shutil.rmtree(folder, ignore_errors=True)
    os.makedirs(folder)
    item.stash[FOLDER_KEY] = folder
    return folder


def note_tmp_path(item: pytest.Item) -> None:
    """Keep the test's ``tmp_path`` (before teardown clears ``item.funcargs``)."""
    funcargs = getattr(item, "funcargs", None) or {}
    path = funcargs.get("tmp_path")
    if path is not None:
        item.stash[TMP_PATH_KEY] = str(path)


def runner_event(item: pytest.Item, failed: bool, env: Mapping[str, str]) -> dict[str, Any] | None:
    """The runner's ``artifacts`` event for a finished test: the folders to bring home."""
    folders: list[dict[str, str]] = []
    own = item.stash.get(FOLDER_KEY, None)
    if own:
        folders.append({"path": own, "prefix": "", "remove": "1"})
    mode = env.get(ENV_ARTIFACTS_TMP_PATH, "none")
    tmp = item.stash.get(TMP_PATH_KEY, None)
    if tmp and (mode == "all" or (mode == "failed" and failed)):
        folders.append({"path": tmp, "prefix": TMP_PATH_PREFIX, "remove": ""})
    if not folders:
        return None
    return {"type": "artifacts", "nodeid": item.nodeid, "folders": folders}


class ArtifactShipper:
    """In front of a slot's ``emit``: sends each finished test's files home in chunks.

    ``limits.per_test`` bounds what one test sends and ``limits.per_run`` what this slot sends
    in the run (the controller holds the whole run to it too); a file over a limit is sent cut
    to what is left and marked ``cut``: never dropped without a word.
    """

    def __init__(
        self,
        emit: Emit,
        limits: Limits,
        root: str | None = None,
        chunk_bytes: int = CHUNK_BYTES,
    ) -> None:
        self.emit = emit
        self.limits = limits
        self.root = root  # the slot's artifact folder: a crashed test's files are found there
        self.chunk_bytes = chunk_bytes
        self.sent_in_run = 0

    def __call__(self, event: dict[str, Any]) -> None:
        if event.get("type") == "crashed" and self.root:
            # The runner died in the test: what it left in its folder still comes home.
            folder = folder_for(self.root, str(event.get("nodeid", "")))
            if os.path.isdir(folder):
                folders = [{"path": folder, "prefix": "", "remove": "1"}]
                self({**event, "type": "artifacts", "folders": folders})
        if event.get("type") != "artifacts" or "folders" not in event:
            self.emit(event)
            return
        nodeid = str(event.get("nodeid", ""))
        batch_id = str(event.get("batch_id", ""))
        files: list[dict[str, Any]] = []
        left = self.limits.per_test
        for folder in event.get("folders") or []:
            path = str(folder.get("path", ""))
            prefix = str(folder.get("prefix") or "")
            if not os.path.isdir(path):
                continue
            for name, full in files_under(path):
                shown = f"{prefix}/{name}" if prefix else name
                entry = self._send(nodeid, batch_id, shown, full, left)
                left -= int(entry["bytes"])
                files.append(entry)
            if folder.get("remove"):
                shutil.rmtree(path, ignore_errors=True)
        self.emit({"type": "artifacts", "nodeid": nodeid, "batch_id": batch_id, "files": files})

    def _send(
        self, nodeid: str, batch_id: str, name: str, full: str, test_left: int
    ) -> dict[str, Any]:
        """Send one file (or its head, when a limit cuts it); its summary entry."""
        try:
            size = os.path.getsize(full)
        except OSError as exc:
            return {"name": name, "size": 0, "bytes": 0, "sha256": "", "cut": False,
                    "error": f"could not read it on the worker: {exc}"}  # fmt: skip
        run_left = self.limits.per_run - self.sent_in_run
        allowed = max(0, min(size, test_left, run_left))
        reason = ""
        if allowed < size:
            reason = "per-test limit" if test_left <= run_left else "per-run limit"
        digest = hashlib.sha256()
        offset = 0
        try:
            with open(full, "rb") as fh:
                while offset < allowed:
                    block = fh.read(min(self.chunk_bytes, allowed - offset))
                    if not block:
                        break
                    digest.update(block)
                    self.emit(
                        {
                            "type": "artifact_chunk",
                            "nodeid": nodeid,
                            "batch_id": batch_id,
                            "name": name,
                            "offset": offset,
                            "data": base64.b64encode(block).decode("ascii"),
                        }
                    )
                    offset += len(block)
        except OSError as exc:
            reason = f"read error on the worker: {exc}"
        self.sent_in_run += offset
        entry: dict[str, Any] = {
            "name": name,
            "size": size,
            "bytes": offset,
            "sha256": digest.hexdigest(),
            "cut": offset < size,
        }
        if offset < size:
            entry["cut_reason"] = reason or "the file changed while it was read"
        return entry
