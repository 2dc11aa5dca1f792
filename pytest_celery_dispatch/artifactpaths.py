"""Test artifacts, the rules both sides share: where a test's files go, which file names are
accepted, the size limits, and how a file is cut and hashed.

Light (no third-party import): the worker's shipper (:mod:`.artifactship`), the controller's
store (:mod:`.artifactstore`) and the ``dispatch_artifacts`` fixture use it.

PYTEST_DONT_REWRITE: spare runners import it before pytest configures (see spare_boot.py).
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import posixpath
import re
from collections.abc import Iterator
from typing import Any

#: Raw bytes per ``artifact_chunk`` message (about 1.4 MB once base64-encoded in JSON): a
#: 50 MB capture is 50 messages, each far below any broker's message limit.
CHUNK_BYTES = 1 << 20
#: Default limits: what one test, and the whole run, may bring home.
DEFAULT_TEST_LIMIT = 100 << 20
DEFAULT_RUN_LIMIT = 1 << 30
#: ``--celery-artifacts-tmp-path``: bring pytest's ``tmp_path`` of no, failed, or every test.
TMP_PATH_MODES = ("none", "failed", "all")
#: Where a dispatched test's ``tmp_path`` lands inside its artifact folder.
TMP_PATH_PREFIX = "tmp_path"
#: The folder under the artifact root where files wait until their test's outcome is in.
INCOMING = ".incoming"

_UNSAFE = re.compile(r"[^A-Za-z0-9._\-\[\]=+,@]")


class UnsafeArtifactName(ValueError):
    """A file name from a worker that would land outside its test's folder."""


@dataclasses.dataclass(frozen=True)
class Limits:
    """What a test and a run may bring home (bytes), and whose ``tmp_path`` comes too."""

    per_test: int = DEFAULT_TEST_LIMIT
    per_run: int = DEFAULT_RUN_LIMIT
    tmp_path: str = "none"

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Any) -> Limits:
        """The limits a slot was sent; anything malformed falls back to the defaults."""
        data = data if isinstance(data, dict) else {}
        mode = str(data.get("tmp_path") or "none")

        def size(key: str, default: int) -> int:
            value = data.get(key, default)
            ok = isinstance(value, int) and not isinstance(value, bool) and value >= 0
            return int(value) if ok else default

        return cls(
            per_test=size("per_test", DEFAULT_TEST_LIMIT),
            per_run=size("per_run", DEFAULT_RUN_LIMIT),
            tmp_path=mode if mode in TMP_PATH_MODES else "none",
        )


def _segment(text: str) -> str:
    safe = _UNSAFE.sub("_", text)[:120]
    return "_" if safe in ("", ".", "..") else safe


def nodeid_folder(nodeid: str) -> str:
    """A nodeid made safe as a relative path: the file's folders, then one folder per ``::``
    part (``a/test_x.py::T::t[1/2]`` -> ``a/test_x.py/T/t[1_2]``); no part is ``..``."""
    path, _, rest = nodeid.partition("::")
    parts = [p for p in path.split("/") if p]
    parts += rest.split("::") if rest else []
    return "/".join(_segment(p) for p in parts) or "_"


def check_name(name: str) -> str:
    """A worker-given file name, relative to its test's folder, normalised; or raise."""
    if not isinstance(name, str) or not name or "\x00" in name or "\\" in name:
        raise UnsafeArtifactName(f"invalid artifact file name {name!r}")
    if name.startswith("/") or (len(name) > 1 and name[1] == ":"):
        raise UnsafeArtifactName(f"artifact file name {name!r} is absolute")
    normal = posixpath.normpath(name)
    if normal in (".", "..") or normal.startswith("../"):
        raise UnsafeArtifactName(f"artifact file name {name!r} points outside its test's folder")
    return normal


def confined(root: str, relative: str) -> str:
    """``root/relative`` with symlinks resolved, refused unless it stays inside ``root``."""
    base = os.path.realpath(root)
    full = os.path.realpath(os.path.join(base, relative))
    if not full.startswith(base + os.sep):
        raise UnsafeArtifactName(f"{relative!r} resolves outside {base}")
    return full


def files_under(folder: str) -> Iterator[tuple[str, str]]:
    """(relative name, full path) of each regular file under ``folder``, sorted; symbolic
    links are not followed (a link could point anywhere on the bench)."""
    found: list[tuple[str, str]] = []
    for top, dirs, files in os.walk(folder, followlinks=False):
        dirs.sort()
        for name in files:
            full = os.path.join(top, name)
            if os.path.isfile(full) and not os.path.islink(full):
                found.append((os.path.relpath(full, folder).replace(os.sep, "/"), full))
    yield from sorted(found)


def sha256_of(path: str, limit: int | None = None) -> str:
    """sha256 of a file's first ``limit`` bytes (all of them when None)."""
    digest = hashlib.sha256()
    left = limit
    with open(path, "rb") as fh:
        while left is None or left > 0:
            block = fh.read(CHUNK_BYTES if left is None else min(CHUNK_BYTES, left))
            if not block:
                break
            digest.update(block)
            if left is not None:
                left -= len(block)
    return digest.hexdigest()


def folder_problem(path: str) -> str | None:
    """Why the artifact folder ``path`` could not be created or written, or None."""
    target = os.path.abspath(path)
    if os.path.exists(target) and not os.path.isdir(target):
        return f"{path} exists and is not a folder"
    existing = target
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.access(existing, os.W_OK | os.X_OK):
        return f"{existing} is not writable"
    return None


def describe_cut(entry: dict[str, Any]) -> str:
    """``cut: 1234 of 5678 bytes kept (per-test limit)`` or empty."""
    if not entry.get("cut"):
        return ""
    why = entry.get("cut_reason") or "size limit"
    return f"cut: {entry.get('bytes', 0)} of {entry.get('size', 0)} bytes kept ({why})"
