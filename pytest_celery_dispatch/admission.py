"""What a worker accepts of a session before anything of it runs: nodeids inside its tree, in
test files with the controller's bytes; the others are refused by name (a ``refused`` event).

Worker side only. PYTEST_DONT_REWRITE: imported by the worker app.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from .serialization import UnsafeNodeId, check_nodeid, confine, file_digest, nodeid_path
from .workerinfo import worker_id

log = logging.getLogger("pytest_celery_dispatch.worker")


def checked_nodeids(
    emit: Callable[[dict[str, Any]], None], payload: dict[str, Any], ws: str, extra: dict[str, Any]
) -> list[str]:
    """The session's nodeids this worker may run: inside its workspace, in files with the
    controller's bytes; the others are refused by name."""
    nodeids: list[str] = []
    inside: set[str] = set()  # files found inside the workspace (symlinks resolved once each)
    for nodeid in (str(n) for n in payload.get("nodeids", [])):
        try:
            if (path := check_nodeid(nodeid)) not in inside:
                confine(ws, nodeid)
                inside.add(path)
            nodeids.append(nodeid)
        except UnsafeNodeId as exc:
            emit({"type": "refused", "nodeids": [nodeid], "reason": str(exc)})
            log.warning("refused: %s", exc, extra=extra)
    differing = different_files(ws, payload.get("files") or {}, nodeids)
    if differing:
        bad = [n for n in nodeids if nodeid_path(n) in differing]
        for path, reason in differing.items():
            ids = [n for n in bad if nodeid_path(n) == path]
            emit({"type": "refused", "nodeids": ids, "reason": reason})
            log.warning("refused: %s", reason, extra=extra)
        nodeids = [n for n in nodeids if n not in set(bad)]
    return nodeids


def different_files(
    workspace_root: str, files: dict[str, str], nodeids: list[str]
) -> dict[str, str]:
    """Test files whose bytes here differ from the controller's (path -> message)."""
    found: dict[str, str] = {}
    worker = worker_id()
    for path in dict.fromkeys(nodeid_path(n) for n in nodeids):
        expected = files.get(path)
        if not expected:
            continue
        full = confine(workspace_root, path)
        try:
            actual = file_digest(full)
        except OSError:
            continue  # a missing file is reported by the runner as "not found"
        if actual != expected:
            found[path] = (
                f"{worker} has a different {path} (sha256 {actual[:12]}, the controller's is "
                f"{expected[:12]}): update the worker's checkout at {workspace_root}"
            )
    return found
