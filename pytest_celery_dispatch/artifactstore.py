"""Test artifacts on the controller: files received from workers, and local tests' folders.

A worker sends each file of a finished test as ``artifact_chunk`` events (base64, at most
:data:`.CHUNK_BYTES` each, with their offset) and then one ``artifacts`` summary, before the
test's results. :class:`ArtifactStore` writes the chunks of each attempt (slot) under
``DIR/.incoming/``; when the test's final outcome is replayed, the files of the attempt that
produced it move to ``DIR/<nodeid as a path>/<file>`` and are checked against the worker's
sha256. The files of an attempt that never finished (its worker was killed) are dropped with
that attempt: the retry's files are the ones that come home. The run's limit
(``--celery-artifacts-run-limit``) is held here too: what is over it is cut, and said.

A local test's ``dispatch_artifacts`` is ``DIR/<nodeid as a path>`` itself (:meth:`local_folder`).
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import os
import shutil
from pathlib import Path
from typing import Any

from .artifactpaths import (
    INCOMING,
    Limits,
    UnsafeArtifactName,
    check_name,
    confined,
    files_under,
    nodeid_folder,
    sha256_of,
)
from .serialization import Event

#: One file as reported: name (relative to the test's folder), path (absolute), size on the
#: worker, bytes kept, sha256 of the kept bytes, cut (and why), error (and what).
Entry = dict[str, Any]


class ArtifactStore:
    """The run's artifact folder (created when a first file or fixture needs it)."""

    def __init__(self, root: str, limits: Limits) -> None:
        self.root = os.path.abspath(root)
        self.limits = limits
        self.received = 0  # bytes accepted in this run
        self.staged: dict[tuple[str, str], dict[str, dict[str, Any]]] = {}
        self.summaries: dict[tuple[str, str], list[dict[str, Any]]] = {}
        self.entries: dict[str, list[Entry]] = {}  # nodeid -> its files, once final
        self.local_tests: set[str] = set()
        self.refused: list[str] = []  # names a worker sent that would leave the folder

    # ------------------------------------------------------------------ folders

    def folder_of(self, nodeid: str) -> str:
        return os.path.join(self.root, nodeid_folder(nodeid))

    def local_folder(self, nodeid: str) -> Path:
        """A local test's ``dispatch_artifacts``: its folder under DIR, emptied."""
        folder = self.folder_of(nodeid)
        shutil.rmtree(folder, ignore_errors=True)
        os.makedirs(folder, exist_ok=True)
        self.local_tests.add(nodeid)
        return Path(folder)

    def scan_local(self, nodeid: str) -> list[Entry]:
        """What a local test left in its folder so far (nothing is cut: it is already here)."""
        if nodeid not in self.local_tests:
            return self.entries.get(nodeid, [])
        folder = self.folder_of(nodeid)
        found = []
        for name, full in files_under(folder):
            size = os.path.getsize(full)
            found.append(
                {
                    "name": name,
                    "path": full,
                    "size": size,
                    "bytes": size,
                    "sha256": sha256_of(full),
                    "cut": False,
                }
            )
        self.entries[nodeid] = found
        return found

    # ------------------------------------------------------------------ what workers send

    def _staging(self, session: str, nodeid: str, name: str) -> str:
        base = os.path.join(self.root, INCOMING, nodeid_folder(session), nodeid_folder(nodeid))
        os.makedirs(base, exist_ok=True)
        return confined(base, name)

    def chunk(self, event: Event | dict[str, Any]) -> None:
        """Write one chunk at its offset, within the run's limit."""
        session, nodeid = str(event.get("session_id", "")), str(event.get("nodeid", ""))
        try:
            name = check_name(str(event.get("name", "")))
            data = base64.b64decode(str(event.get("data", "")), validate=True)
            offset = max(0, int(event.get("offset") or 0))
        except (UnsafeArtifactName, binascii.Error, ValueError, TypeError) as exc:
            self.refused.append(f"{nodeid}: {exc}")
            return
        files = self.staged.setdefault((session, nodeid), {})
        state = files.get(name)
        if state is None:
            path = self._staging(session, nodeid, name)
            os.makedirs(os.path.dirname(path), exist_ok=True)
            state = files[name] = {"path": path, "written": 0, "run_cut": False}
            open(path, "wb").close()
        room = self.limits.per_run - self.received
        if len(data) > room:
            data, state["run_cut"] = data[: max(0, room)], True
        if data:
            with open(state["path"], "r+b") as fh:
                fh.seek(offset)
                fh.write(data)
            state["written"] += len(data)
            self.received += len(data)

    def summary(self, event: Event | dict[str, Any]) -> None:
        key = (str(event.get("session_id", "")), str(event.get("nodeid", "")))
        self.summaries[key] = [f for f in event.get("files") or [] if isinstance(f, dict)]

    # ------------------------------------------------------------------ final outcome

    def finalize(self, nodeid: str, session: str | None) -> list[Entry]:
        """The files of the attempt that gave ``nodeid`` its outcome, moved into place."""
        if nodeid in self.entries:
            return self.entries[nodeid]
        others = [k for k in self.staged if k[1] == nodeid and k[0] != session]
        others += [k for k in self.summaries if k[1] == nodeid and k[0] != session]
        for key in others:  # attempts that did not finish: their files go with them
            for state in self.staged.pop(key, {}).values():
                _remove(state["path"])
            self.summaries.pop(key, None)
        key = (str(session or ""), nodeid)
        files = self.summaries.pop(key, None)
        staged = self.staged.pop(key, {})
        if files is None:
            return []
        folder = self.folder_of(nodeid)
        shutil.rmtree(folder, ignore_errors=True)
        entries = [self._place(folder, f, staged) for f in files]
        self.entries[nodeid] = entries
        return entries

    def _place(self, folder: str, info: dict[str, Any], staged: dict[str, Any]) -> Entry:
        raw = str(info.get("name", ""))
        entry: Entry = {
            "name": raw,
            "size": int(info.get("size") or 0),
            "bytes": int(info.get("bytes") or 0),
            "sha256": str(info.get("sha256") or ""),
            "cut": bool(info.get("cut")),
        }
        if info.get("cut_reason"):
            entry["cut_reason"] = str(info["cut_reason"])
        if info.get("error"):
            entry["error"] = str(info["error"])
        try:
            name = check_name(raw)
            dest = confined(folder, name)
        except UnsafeArtifactName as exc:
            entry["error"] = f"refused: {exc}"
            return entry
        entry["name"] = name
        os.makedirs(os.path.dirname(dest), exist_ok=True)
        state = staged.get(name)
        if state is not None:
            os.replace(state["path"], dest)
        else:
            open(dest, "wb").close()  # an empty file: no chunk
        entry["path"] = dest
        actual = sha256_of(dest)
        kept = os.path.getsize(dest)
        if state is not None and state["run_cut"]:
            entry.update(bytes=kept, sha256=actual, cut=True, cut_reason="per-run limit")
        elif actual != entry["sha256"] or kept != entry["bytes"]:
            entry["error"] = (
                f"sha256 mismatch: the worker sent {entry['bytes']} bytes with sha256 "
                f"{entry['sha256'][:16]}, {kept} bytes with sha256 {actual[:16]} arrived"
            )
            entry.update(bytes=kept, sha256=actual)
        return entry

    def close(self) -> None:
        """Drop what never reached a final outcome (the incoming folder), and the run's folder
        when nothing came home."""
        shutil.rmtree(os.path.join(self.root, INCOMING), ignore_errors=True)
        self.staged.clear()
        self.summaries.clear()
        with contextlib.suppress(OSError):
            os.rmdir(self.root)  # only when empty

    def totals(self) -> dict[str, Any]:
        """The run's figures for the JSON report's ``dispatch.artifacts``."""
        files = [e for entries in self.entries.values() for e in entries]
        return {
            "files": len(files),
            "bytes": sum(int(e.get("bytes") or 0) for e in files),
            "cut": sum(1 for e in files if e.get("cut")),
            "errors": sum(1 for e in files if e.get("error")) + len(self.refused),
            "limits": self.limits.as_dict(),
        }


def _remove(path: str) -> None:
    with contextlib.suppress(OSError):
        os.unlink(path)


class ArtifactEvents:
    """Mixed into :class:`~.session.DispatchSession`: the artifact events of a worker."""

    artifacts: ArtifactStore

    def on_artifact_chunk(self, event: Event, chunk: Any) -> None:
        self.artifacts.chunk(event)

    def on_artifacts(self, event: Event, chunk: Any) -> None:
        self.artifacts.summary(event)
