"""Does the run's manifest hold what its dispatched tests need? Checked before anything is sent.

A worker without a checkout runs in the tree the manifest describes and nothing else: a test
file, a ``conftest.py`` pytest loaded for it, or the ini file left out of the manifest (git
ignores it, an exclude glob drops it, it lies outside the rootdir) would make every one of its
tests end as ``file or directory not found`` on the worker. :func:`needed_files` says which
files the tests need, :func:`missing_files` which of them the manifest lacks (links inside the
tree followed), :func:`why_missing` why, and :func:`missing_message` what to do about it.

Pure (the standard library and ``git`` only); controller side.
"""

from __future__ import annotations

import dataclasses
import os
import posixpath
from collections.abc import Iterable, Mapping

from .manifest import ALWAYS_EXCLUDED, JUNK_DIRS, JUNK_SUFFIXES, Entry, matcher, run_git
from .serialization import nodeid_path

SETTING_INCLUDE = "celery_dispatch_ship_include"
SETTING_EXCLUDE = "celery_dispatch_ship_exclude"
#: Missing files named in the message; the others are counted.
NAMED = 5
#: Links followed from one path before it counts as missing (a loop of links inside the tree).
MAX_LINKS = 40

OUTSIDE = "outside"
EXCLUDED = "excluded"
IGNORED = "ignored"
JUNK = "junk"
ABSENT = "absent"
OTHER = "other"


@dataclasses.dataclass(frozen=True)
class Missing:
    path: str  # root-relative (POSIX), or as the test named it when outside the rootdir
    needed_as: str  # "test file", "conftest.py", "ini file"
    kind: str  # OUTSIDE, EXCLUDED, IGNORED, ABSENT or OTHER
    why: str


def _relative(root: str, path: str) -> str:
    """``path`` (absolute or root-relative) relative to ``root``, POSIX; ``../`` when outside
    (also once symlinks are resolved)."""
    full = path if os.path.isabs(path) else os.path.join(root, path)
    rel = os.path.relpath(os.path.normpath(full), os.path.normpath(root)).replace(os.sep, "/")
    if _is_outside(rel):
        real = os.path.relpath(os.path.realpath(full), os.path.realpath(root))
        if not _is_outside(real.replace(os.sep, "/")):
            return real.replace(os.sep, "/")
    return rel


def _is_outside(rel: str) -> bool:
    return rel == ".." or rel.startswith("../") or os.path.isabs(rel)


def needed_files(
    root: str, nodeids: Iterable[str], conftests: Iterable[str] = (), inifile: str | None = None
) -> dict[str, str]:
    """The files the dispatched tests need in the run's tree (root-relative path -> what for):
    each test's file, each loaded ``conftest.py`` under the rootdir in one of their folders or
    above, and the ini file when it is under the rootdir. A test file outside the rootdir is
    kept as its ``../`` path (it can never be in the tree)."""
    needed: dict[str, str] = {}
    folders: set[str] = set()
    for path in dict.fromkeys(nodeid_path(n) for n in nodeids):  # each file once
        rel = _relative(root, path)
        needed.setdefault(rel, "test file")
        if not _is_outside(rel):
            folder = posixpath.dirname(rel)
            while folder not in folders:
                folders.add(folder)
                if not folder:
                    break
                folder = posixpath.dirname(folder)
    for conftest in conftests:
        rel = _relative(root, conftest)
        if not _is_outside(rel) and posixpath.dirname(rel) in folders:
            needed.setdefault(rel, "conftest.py")
    if inifile:
        rel = _relative(root, inifile)
        if not _is_outside(rel):
            needed.setdefault(rel, "ini file")
    return needed


def missing_files(needed: Mapping[str, str], entries: Iterable[Entry]) -> dict[str, str]:
    """The needed files the manifest lacks (path -> what for). A path beneath a link of the
    manifest is looked up where the link leads (the worker's tree has the same links)."""
    entries = list(entries)
    files = {e["path"] for e in entries if "link" not in e}
    dirs = {posixpath.dirname(p) for p in files}
    dirs |= {d[:i] for d in dirs for i, c in enumerate(d) if c == "/"}
    links = {e["path"]: e["link"] for e in entries if "link" in e}
    present = files | dirs
    return {
        path: what
        for path, what in needed.items()
        if _is_outside(path) or _resolve(path, links) not in present
    }


def _resolve(path: str, links: Mapping[str, str]) -> str | None:
    """``path`` with the manifest's links along it followed; None when it leaves the tree or
    loops."""
    for _ in range(MAX_LINKS):
        parts = path.split("/")
        for n in range(1, len(parts) + 1):
            head = "/".join(parts[:n])
            if head in links:
                target = posixpath.join(posixpath.dirname(head), links[head], *parts[n:])
                path = posixpath.normpath(target)
                break
        else:
            return path
        if _is_outside(path):
            return None
    return None


def _git_ignore_rule(root: str, rel: str) -> str | None:
    """The rule git ignores ``rel`` by (``.gitignore:3:*.gen.py``), else None (not ignored,
    not in git, or no git)."""
    out = run_git(root, "check-ignore", "-v", "--", rel)
    if out is None or out.returncode != 0:
        return None
    source = out.stdout.decode("utf-8", "replace").split("\t", 1)[0].strip()
    return source or "a git ignore rule"


def _in_git(root: str) -> bool:
    out = run_git(root, "rev-parse", "--is-inside-work-tree")
    return out is not None and out.returncode == 0 and out.stdout.strip() == b"true"


def why_missing(
    root: str,
    path: str,
    exclude: Iterable[str] = (),
    skip: Iterable[str] = (),
) -> tuple[str, str]:
    """Why the listing of :func:`.manifest.list_files` left ``path`` out: (kind, reason)."""
    if _is_outside(path):
        return OUTSIDE, f"outside the rootdir {root}"
    if not os.path.lexists(os.path.join(root, path)):
        return ABSENT, "not found under the rootdir"
    for pattern in exclude:
        if pattern.strip().strip("/") and matcher([pattern])(path):
            return EXCLUDED, f"excluded by ini {SETTING_EXCLUDE} ({pattern.strip()})"
    real_root = os.path.realpath(root)
    for output in skip:
        rel = os.path.relpath(os.path.realpath(output), real_root).replace(os.sep, "/")
        if path == rel or path.startswith(rel + "/"):
            return EXCLUDED, f"an output of this run ({rel})"
    if matcher(ALWAYS_EXCLUDED)(path):
        names = ", ".join(ALWAYS_EXCLUDED)
        return EXCLUDED, f"named like a run's report or artifacts ({names}), never shipped"
    rule = _git_ignore_rule(root, path)
    junk = [f for f in path.split("/")[:-1] if f in JUNK_DIRS or f.endswith(JUNK_SUFFIXES)]
    if junk:  # the include globs' walk does not enter these folders either
        why = f"git ignores it ({rule}) and " if rule else ""
        return JUNK, f"{why}{junk[0]}/ is a folder never walked for the tree"
    if rule is not None:
        return IGNORED, f"git ignores it ({rule})"
    if _in_git(root):
        return OTHER, "git does not list it (in a submodule or another repository?)"
    return OTHER, "not listed in the run's tree"


def find_missing(
    root: str,
    needed: Mapping[str, str],
    entries: Iterable[Entry],
    exclude: Iterable[str] = (),
    skip: Iterable[str] = (),
    named: int = NAMED,
) -> tuple[list[Missing], int]:
    """The first ``named`` needed files the manifest lacks, each with why (test files first;
    only those are asked of git), and how many it lacks in all."""
    order = {"test file": 0, "conftest.py": 1, "ini file": 2}
    lacking = missing_files(needed, entries)
    first = sorted(lacking.items(), key=lambda kv: (order.get(kv[1], 3), kv[0]))[:named]
    found = [Missing(path, what, *why_missing(root, path, exclude, skip)) for path, what in first]
    return found, len(lacking)


FIXES = {
    IGNORED: f"ship them with ini {SETTING_INCLUDE} (globs, one per line)",
    OTHER: f"ship them with ini {SETTING_INCLUDE} (globs, one per line)",
    EXCLUDED: f"narrow ini {SETTING_EXCLUDE} (or the run's output options) so they stay in",
    OUTSIDE: "choose a rootdir that holds them (--rootdir, or where the ini file lives)",
    JUNK: "move them out of that folder (include globs do not reach into build/, .tox/, "
    "node_modules/, virtualenvs and the like)",
    ABSENT: "make sure they exist when the run starts",
}


def missing_message(missing: list[Missing], total: int) -> str:
    """What is missing (the files explained, then a count of the others out of ``total``),
    why, and how to fix it."""
    shown = "; ".join(f"{m.path} ({m.needed_as}: {m.why})" for m in missing)
    more = f"; and {total - len(missing)} more" if total > len(missing) else ""
    fixes = list(dict.fromkeys(FIXES[m.kind] for m in missing))
    return (
        f"{total} file(s) the dispatched tests need are not in it: {shown}{more}; a "
        "worker without a checkout would not find them. To fix: "
        + "; ".join(fixes)
        + "; or run in the workers' own workspaces (--celery-ship off)"
    )
