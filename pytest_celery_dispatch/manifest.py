"""The run's tree: which files a run ships to its workers, and the manifest that names them.

Pure (the standard library and ``git`` only). The controller lists the files under the rootdir
(:func:`list_files`: what git tracks plus what it would add, else a walk without the usual
junk), applies the ini globs, and builds a :class:`Manifest`: each file's root-relative path,
sha256, size and executable bit; symlinks that stay inside the tree are kept as links, any that
escape it are refused by name. Workers check every entry again (:func:`check_entries`) before
anything of the run is written.

PYTEST_DONT_REWRITE: the worker side imports it.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import functools
import hashlib
import json
import os
import posixpath
import re
import stat
import subprocess
import sys
from collections.abc import Callable, Iterable, Iterator
from typing import Any, TypedDict

from .hashcache import HashCache
from .serialization import file_digest

#: Folders never shipped by the walk outside git (git's own ignore rules decide inside it).
JUNK_DIRS = frozenset(
    {
        ".git",
        ".hg",
        ".svn",
        ".venv",
        "venv",
        ".tox",
        ".nox",
        "__pycache__",
        ".pytest_cache",
        ".mypy_cache",
        ".ruff_cache",
        ".hypothesis",
        "node_modules",
        "build",
        "dist",
        ".eggs",
        "htmlcov",
    }
)
JUNK_SUFFIXES = (".pyc", ".pyo", ".egg-info")
#: Never shipped, in git or not: earlier runs' JSON reports and artifacts under default names.
ALWAYS_EXCLUDED = ("dispatch_results_*.json", "dispatch_results_*_artifacts", "dispatch_artifacts")

MB = 1024 * 1024
DEFAULT_MAX_FILE = 100 * MB
DEFAULT_MAX_TOTAL = 1024 * MB
#: Files up to this size are kept in memory as hashed, up to ``SNAPSHOT_TOTAL`` in all.
SNAPSHOT_FILE = 1 * MB
SNAPSHOT_TOTAL = 64 * MB
SETTING_MAX_FILE = "celery_dispatch_ship_max_file"
SETTING_MAX_TOTAL = "celery_dispatch_ship_max_total"
#: The largest manifest a worker fetches (its JSON: about 100 bytes a file).
MAX_MANIFEST_BYTES = 256 * MB

_SHA256 = re.compile(r"[0-9a-f]{64}")


class ShipError(Exception):
    """The run's tree cannot be shipped (an escaping symlink, a file over a limit...)."""


class Entry(TypedDict, total=False):
    path: str  # root-relative, POSIX separators
    sha256: str  # of the bytes (absent for a symlink)
    size: int
    exec: bool
    link: str  # a symlink's relative target, inside the tree


@dataclasses.dataclass(frozen=True)
class Manifest:
    entries: tuple[Entry, ...]
    #: The bytes of small files as they were read (sha256 -> bytes), so that a file written
    #: during the run (a log in the rootdir) is still sent as the manifest names it. Controller
    #: side only: not part of the digest.
    snapshot: dict[str, bytes] = dataclasses.field(default_factory=dict, compare=False, repr=False)

    @functools.cached_property
    def canonical(self) -> bytes:
        """The entries as canonical JSON: what the digest hashes, and what a worker fetches."""
        return json.dumps(list(self.entries), sort_keys=True, separators=(",", ":")).encode()

    @functools.cached_property
    def digest(self) -> str:
        """sha256 of the canonical JSON of the entries: the tree's name on every worker."""
        return hashlib.sha256(self.canonical).hexdigest()

    @property
    def total_size(self) -> int:
        return sum(int(e.get("size", 0)) for e in self.entries)

    def blobs(self) -> dict[str, Entry]:
        """Each distinct content once: sha256 -> an entry holding it."""
        return {e["sha256"]: e for e in self.entries if "sha256" in e}


def run_git(root: str, *args: str) -> subprocess.CompletedProcess[bytes] | None:
    """``git -C root ARGS``, its output captured; None without git (or when it hangs)."""
    try:
        return subprocess.run(
            ["git", "-C", root, *args], capture_output=True, timeout=60, check=False
        )
    except (OSError, subprocess.TimeoutExpired):
        return None


def _git_files(root: str) -> list[str] | None:
    """Tracked files and untracked files git would not ignore, under ``root``; None outside
    a git work tree (or without git)."""
    out = run_git(root, "ls-files", "-z", "--cached", "--others", "--exclude-standard")
    if out is None or out.returncode != 0:
        return None
    names = out.stdout.decode("utf-8", "surrogateescape").split("\0")
    return sorted({n for n in names if n})


def _is_junk_dir(path: str, name: str) -> bool:
    if name in JUNK_DIRS or name.endswith(JUNK_SUFFIXES):
        return True
    return os.path.isfile(os.path.join(path, name, "pyvenv.cfg"))  # a virtualenv by any name


def walk_files(root: str) -> list[str]:
    """Every file and symlink under ``root`` except the usual junk (root-relative)."""
    found: list[str] = []
    for here, dirs, files in os.walk(root):
        rel_here = os.path.relpath(here, root)
        kept = []
        for name in dirs:
            full = os.path.join(here, name)
            if os.path.islink(full):
                found.append(_rel(rel_here, name))  # a link to a folder ships as a link
            elif not _is_junk_dir(here, name):
                kept.append(name)
        dirs[:] = kept
        found.extend(_rel(rel_here, n) for n in files if not n.endswith(JUNK_SUFFIXES))
    return sorted(found)


def _rel(rel_here: str, name: str) -> str:
    path = name if rel_here == "." else os.path.join(rel_here, name)
    return path.replace(os.sep, "/")


def matches(path: str, pattern: str) -> bool:
    """``pattern`` (fnmatch, ``*`` crosses ``/``) matches the path or one of its folders."""
    return matcher([pattern])(path)


def matcher(patterns: Iterable[str]) -> Callable[[str], bool]:
    """One test for several :func:`matches` patterns (compiled once, for thousands of paths)."""
    cleaned = [p.strip().strip("/") for p in patterns]
    regexes = [fnmatch.translate(p) for p in cleaned if p]
    if not regexes:
        return lambda path: False
    match = re.compile("|".join(f"(?:{r})" for r in regexes)).match

    def test(path: str) -> bool:
        end = path.find("/")
        while end != -1:  # each folder of the path, then the path itself
            if match(path[:end]):
                return True
            end = path.find("/", end + 1)
        return match(path) is not None

    return test


def list_files(
    root: str,
    include: Iterable[str] = (),
    exclude: Iterable[str] = (),
    skip: Iterable[str] = (),
) -> list[str]:
    """The run's files under ``root``: git's view (tracked + untracked-not-ignored), else a
    walk without junk; plus files matching ``include`` globs, minus ``exclude`` globs and the
    files and folders in ``skip`` (the run's own outputs: reports, logs, artifacts)."""
    included = matcher(include)
    excluded = matcher([*exclude, *ALWAYS_EXCLUDED])
    listed = _git_files(root)
    # Git lists nothing: no git, or a rootdir it ignores whole (a generated project).
    names = set(listed or walk_files(root))
    if any(p.strip().strip("/") for p in include):
        names |= {p for p in walk_files(root) if included(p)}
    real_root = os.path.realpath(root)
    skipped = {os.path.relpath(os.path.realpath(p), real_root).replace(os.sep, "/") for p in skip}
    return sorted(
        n
        for n in names
        if n not in skipped
        and not any(n.startswith(folder + "/") for folder in skipped)
        and not excluded(n)
        and os.path.lexists(os.path.join(root, n))
    )


def link_target_inside(path: str, target: str) -> bool:
    """A relative symlink at ``path`` pointing at ``target`` stays inside the tree.

    Only leading ``..`` are allowed, no more than the link's depth: a ``..`` after another
    component could climb out through a link (``b -> .`` then ``a -> b/../x``). Each link the
    target goes down through is confined by the same rule, so the whole chain stays inside.
    """
    if not target or target.startswith("/") or "\0" in target or "\\" in target:
        return False
    parts = target.split("/")
    ups = 0
    while ups < len(parts) and parts[ups] == "..":
        ups += 1
    return ".." not in parts[ups:] and ups <= path.count("/")


def _entry(
    root: str,
    real_root: str,
    rel: str,
    st: os.stat_result,
    snapshot: dict[str, bytes] | None = None,
    hashes: HashCache | None = None,
) -> Entry | str | None:
    """The entry of one file; a str is a refusal; None: not a file (a folder git lists).
    A small file's bytes go to ``snapshot`` (when given) as they are read; its sha256 comes
    from ``hashes`` when the file's stat is the one it was hashed at."""
    full = os.path.join(root, rel)
    if stat.S_ISLNK(st.st_mode):
        return _link_entry(real_root, rel, full)
    if not stat.S_ISREG(st.st_mode):
        return None
    entry: Entry = {"path": rel, "size": st.st_size, "exec": bool(st.st_mode & 0o111)}
    known = hashes.lookup(full, st) if hashes is not None else None
    since = hashes.clock() if hashes is not None else 0
    if snapshot is not None and st.st_size <= SNAPSHOT_FILE:
        with open(full, "rb") as fh:
            data = fh.read()
        # bytes read after a hit are not hashed: were they changed meanwhile, the blob sender
        # notices (see blobs.pieces) and the worker checks every blob's sha256 anyway
        entry["sha256"] = known or hashlib.sha256(data).hexdigest()
        entry["size"] = len(data) if known is None else st.st_size
        snapshot[entry["sha256"]] = data
    else:
        entry["sha256"] = known or file_digest(full)
    if hashes is not None and known is None:
        hashes.hashed += 1
        hashes.remember(full, st, entry["sha256"], since)
    return entry


def _link_entry(real_root: str, rel: str, full: str) -> Entry | str:
    target = os.readlink(full)
    real = os.path.realpath(full)
    if real != real_root and not real.startswith(real_root + os.sep):
        return f"{rel} -> {target} (resolves to {real}, outside {real_root})"
    if os.path.isabs(target):  # inside the tree: keep it, relative
        target = os.path.relpath(real, os.path.dirname(os.path.join(real_root, rel)))
    target = target.replace(os.sep, "/")
    if not link_target_inside(rel, target):
        return f"{rel} -> {target} (climbs out of the tree)"
    return {"path": rel, "link": target}


def _biggest(sizes: dict[str, int], count: int = 5) -> str:
    top = sorted(sizes.items(), key=lambda kv: (-kv[1], kv[0]))[:count]
    return ", ".join(f"{path} ({human_bytes(size)})" for path, size in top)


def check_limits(sizes: dict[str, int], max_file: int, max_total: int) -> None:
    """Raise :class:`ShipError` naming the biggest files and the setting to change."""
    over = {p: s for p, s in sizes.items() if s > max_file}
    if over:
        raise ShipError(
            f"{len(over)} file(s) over the per-file limit of {human_bytes(max_file)}: "
            f"{_biggest(over)}; exclude them (ini celery_dispatch_ship_exclude), raise ini "
            f"{SETTING_MAX_FILE}, or run in place (--celery-ship off)"
        )
    total = sum(sizes.values())
    if total > max_total:
        raise ShipError(
            f"the run's tree is {human_bytes(total)} ({len(sizes)} files), over the limit of "
            f"{human_bytes(max_total)}; biggest: {_biggest(sizes)}; exclude some (ini "
            f"celery_dispatch_ship_exclude), raise ini {SETTING_MAX_TOTAL}, or run in place "
            "(--celery-ship off)"
        )


def build_manifest(
    root: str,
    paths: Iterable[str],
    max_file: int = DEFAULT_MAX_FILE,
    max_total: int = DEFAULT_MAX_TOTAL,
    hashes: HashCache | None = None,
) -> Manifest:
    """Hash ``paths`` (root-relative) into a manifest; :class:`ShipError` names every escaping
    symlink, else the files over a limit (checked from their sizes before hashing). With
    ``hashes``, a file whose stat is the one it was hashed at is not hashed again; the cache
    then forgets the files gone from the tree and is saved."""
    real_root = os.path.realpath(root)
    paths = list(paths)
    stats = {rel: os.lstat(os.path.join(root, rel)) for rel in paths}
    sizes = {rel: st.st_size for rel, st in stats.items() if stat.S_ISREG(st.st_mode)}
    escaping: list[str] = []
    entries: list[Entry] = []
    check_limits(sizes, max_file, max_total)
    snapshot: dict[str, bytes] = {}
    kept = 0
    for rel in paths:
        room = snapshot if kept < SNAPSHOT_TOTAL else None
        found = _entry(root, real_root, rel, stats[rel], room, hashes)
        if isinstance(found, str):
            escaping.append(found)
        elif found is not None:
            entries.append(found)
            kept += found.get("size", 0) if found.get("sha256") in snapshot else 0
    if escaping:
        raise ShipError(
            f"symlink(s) escaping the tree cannot be shipped: {'; '.join(escaping)}; remove "
            "them, exclude them (ini celery_dispatch_ship_exclude) or run in place "
            "(--celery-ship off)"
        )
    if hashes is not None:
        hashes.keep_only({os.path.join(root, e["path"]) for e in entries})
        hashes.save()
    return Manifest(tuple(entries), snapshot)


# ----------------------------------------------------------------------------- worker side


def check_path(path: Any) -> str:
    """A manifest path is relative, normalised, POSIX, and stays in the tree; else ValueError."""
    if not isinstance(path, str) or not path or "\0" in path or "\\" in path:
        raise ValueError(f"invalid path {path!r} in the manifest")
    if path.startswith("/") or posixpath.normpath(path) != path:
        raise ValueError(f"path {path!r} in the manifest is not a plain relative path")
    if path == ".." or path.startswith("../") or ".." in path.split("/"):
        raise ValueError(f"path {path!r} in the manifest points outside the tree")
    return path


def check_entries(raw: Any, max_file: int, max_total: int) -> Manifest:
    """A manifest as received by a worker, checked entry by entry: paths confined, digests
    well-formed, links inside the tree, nothing beneath a link, sizes within the worker's
    limits. Raises ValueError naming the first bad entry."""
    if not isinstance(raw, list):
        raise ValueError("the manifest is not a list")
    entries: list[Entry] = []
    seen: set[str] = set()
    links: set[str] = set()
    total = 0
    for item in raw:
        if not isinstance(item, dict):
            raise ValueError(f"manifest entry {item!r} is not an object")
        path = check_path(item.get("path"))
        if path in seen:
            raise ValueError(f"path {path!r} appears twice in the manifest")
        seen.add(path)
        if "link" in item:
            target = item["link"]
            if not isinstance(target, str) or not link_target_inside(path, target):
                raise ValueError(f"symlink {path!r} -> {target!r} points outside the tree")
            entries.append({"path": path, "link": target})
            links.add(path)
            continue
        sha, size = item.get("sha256"), item.get("size")
        if not isinstance(sha, str) or not _SHA256.fullmatch(sha):
            raise ValueError(f"entry {path!r} has no valid sha256")
        if not isinstance(size, int) or isinstance(size, bool) or size < 0 or size > max_file:
            raise ValueError(
                f"entry {path!r} has a size {size!r} over this worker's limit "
                "(DISPATCH_CACHE_LIMIT)"
            )
        total += size
        entries.append({"path": path, "sha256": sha, "size": size, "exec": bool(item.get("exec"))})
    if total > max_total:
        raise ValueError(
            f"the run's tree ({human_bytes(total)}) is over this worker's limit "
            "(DISPATCH_CACHE_LIMIT)"
        )
    for path in seen:
        parents = _parents(path)
        if links.intersection(parents) or seen.intersection(parents):
            raise ValueError(f"entry {path!r} lies beneath another entry (a link or a file)")
    return Manifest(tuple(entries))


def parse_manifest(data: bytes, digest: str) -> Manifest:
    """A manifest a worker fetched by the digest its session names: the bytes are checked
    against the digest before they are parsed (JSON only), then every entry
    (:func:`check_entries`). Raises ValueError."""
    if hashlib.sha256(data).hexdigest() != digest:
        raise ValueError("the manifest does not match its digest")
    try:
        raw = json.loads(data)
    except ValueError:
        raise ValueError("the manifest is not JSON") from None
    manifest = check_entries(raw, sys.maxsize, sys.maxsize)
    if manifest.digest != digest:  # entries with other fields than a controller writes
        raise ValueError("the manifest is not in its canonical form")
    return manifest


def _parents(path: str) -> Iterator[str]:
    parts = path.split("/")
    for n in range(1, len(parts)):
        yield "/".join(parts[:n])


def human_bytes(size: float) -> str:
    for unit in ("B", "kB", "MB", "GB"):
        if abs(size) < 1024 or unit == "GB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} GB"


def parse_size(raw: str, source: str) -> int:
    """``500M``, ``2G``, ``100k`` or a number of bytes; ValueError naming ``source``."""
    text = str(raw).strip().upper().removesuffix("B")
    factor = {"K": 1024, "M": MB, "G": 1024 * MB}.get(text[-1:], 1)
    number = text[:-1] if text[-1:] in ("K", "M", "G") else text
    try:
        value = int(float(number) * factor)
    except ValueError:
        raise ValueError(
            f"invalid size {raw!r} for {source}: expected bytes or a number with k, M or G "
            "(e.g. 500M)"
        ) from None
    if value <= 0:
        raise ValueError(f"invalid size {raw!r} for {source}: expected more than 0")
    return value
