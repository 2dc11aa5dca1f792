"""A worker's cache of shipped trees: blobs by sha256, and one read-only tree per manifest.

Layout under the cache folder (``DISPATCH_CACHE_DIR``, else ``$XDG_CACHE_HOME`` or ``~/.cache``
``/pytest-celery-dispatch``, this user's only)::

    blobs/ab/abcdef...      a file's bytes, read-only, named by their sha256
    manifests/<digest>.json a run's manifest as fetched (JSON, checked against its digest)
    trees/<digest>/         a run's tree, hard links to the blobs (copies for executables)
    trees/<digest>.lock     held shared while a run uses the tree, exclusively while it is built
    trees/<digest>.fetch    held while a slot fetches the tree's missing blobs (one at a time)
    tmp/                    blobs being received, trees being built
    hashes/<key>.json       a worker's workspace's files, hashed (see hashcache)

A tree is built once per manifest and reused by every later run with the same manifest (its
path is the same, so the bytecode cache, warm runners and the zygote keep working). Above
``DISPATCH_CACHE_LIMIT`` (default 2 GB) the least recently used trees not in use go first,
then blobs no tree holds and manifests (oldest received first). The worker writes only inside
this folder.

PYTEST_DONT_REWRITE: imported by the worker side.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import stat
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping
from typing import IO

from .hashcache import HashCache, workspace_key
from .manifest import Entry, Manifest, parse_size
from .names import ENV_CACHE_DIR, ENV_CACHE_LIMIT

DEFAULT_CACHE_LIMIT = 2 * 1024**3
BUILD_POLL = 0.01  # seconds between looks while another slot builds a tree


def cache_root(env: Mapping[str, str]) -> str:
    explicit = env.get(ENV_CACHE_DIR, "").strip()
    if explicit:
        return os.path.abspath(os.path.expanduser(explicit))
    base = env.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "pytest-celery-dispatch")


def cache_limit(env: Mapping[str, str]) -> int:
    raw = env.get(ENV_CACHE_LIMIT, "").strip()
    return parse_size(raw, f"env {ENV_CACHE_LIMIT}") if raw else DEFAULT_CACHE_LIMIT


class ShipCache:
    def __init__(
        self, root: str, limit: int = DEFAULT_CACHE_LIMIT, clock: Callable[[], int] = time.time_ns
    ) -> None:
        self.root = root
        self.limit = limit
        self.clock = clock  # wall time (ns), for the hash cache's racy files
        for sub in ("", "blobs", "manifests", "trees", "tmp"):
            os.makedirs(os.path.join(root, sub), mode=0o700, exist_ok=True)
        os.chmod(root, 0o700)
        #: (worker, workspace) -> its files hashed, kept on disk (see hashcache)
        self._hashes: dict[tuple[str, str], HashCache] = {}

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> ShipCache:
        return cls(cache_root(env), cache_limit(env))

    # ------------------------------------------------------------------ blobs

    def blob_path(self, sha: str) -> str:
        return os.path.join(self.root, "blobs", sha[:2], sha)

    def missing(self, manifest: Manifest) -> dict[str, int]:
        """The blobs of ``manifest`` this cache lacks: sha256 -> size."""
        return {
            sha: int(entry.get("size", 0))
            for sha, entry in manifest.blobs().items()
            if not os.path.exists(self.blob_path(sha))
        }

    def add_blob(self, sha: str, received: str) -> None:
        """Keep a verified blob (the :class:`~.blobs.Assembler` checked its sha256)."""
        target = self.blob_path(sha)
        os.makedirs(os.path.dirname(target), mode=0o700, exist_ok=True)
        os.chmod(received, 0o444)
        os.replace(received, target)

    def manifest_path(self, digest: str) -> str:
        return os.path.join(self.root, "manifests", digest + ".json")

    def add_manifest(self, digest: str, received: str) -> None:
        """Keep a fetched manifest (its bytes matched ``digest``; parsed when used)."""
        os.chmod(received, 0o444)
        os.replace(received, self.manifest_path(digest))

    def read_manifest(self, digest: str) -> bytes | None:
        try:
            with open(self.manifest_path(digest), "rb") as fh:
                return fh.read()
        except OSError:
            return None

    def drop_manifest(self, digest: str) -> None:
        with contextlib.suppress(OSError):
            os.unlink(self.manifest_path(digest))

    def tmp_dir(self) -> str:
        return tempfile.mkdtemp(dir=os.path.join(self.root, "tmp"))

    # ------------------------------------------------------------------ trees

    def tree_path(self, manifest: Manifest) -> str:
        return os.path.join(self.root, "trees", manifest.digest)

    def built(self, manifest: Manifest) -> bool:
        return os.path.isdir(self.tree_path(manifest))

    @contextlib.contextmanager
    def hold(self, manifest: Manifest) -> Iterator[None]:
        """Hold the manifest's tree (a shared lock) while a run uses it: the eviction leaves
        it alone. Never held while the tree is built (:meth:`materialize` locks it alone)."""
        path = self.tree_path(manifest)
        with open(path + ".lock", "a+b") as lock:
            fcntl.flock(lock, fcntl.LOCK_SH)
            try:
                os.utime(lock.fileno())  # when it was last used, for the eviction
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def materialize(self, manifest: Manifest) -> str:
        """Build the manifest's tree from the blobs (all present) unless another slot did.

        The lock is taken without blocking: a slot that runs in the tree holds it shared for
        its whole session, and the slots that start beside it must not wait for that session
        to end (the tree is there: they hold it too). Only a slot that builds it is waited for.
        """
        path = self.tree_path(manifest)
        with open(path + ".lock", "a+b") as lock:
            while not _locked(lock, fcntl.LOCK_EX):
                if os.path.isdir(path):
                    return path  # built: the caller holds it, then checks it is still there
                time.sleep(BUILD_POLL)
            if os.path.isdir(path):
                return path
            build = tempfile.mkdtemp(dir=os.path.join(self.root, "tmp"), prefix="tree-")
            try:
                self._fill(build, manifest)
                self._stamp(build, manifest, path + ".stamp")
                # Moving a folder to another parent needs write access to it (its ``..``) for
                # anyone but root: the tree's top is made read-only once in place.
                os.rename(build, path)
                os.chmod(path, 0o555)
            except BaseException:
                remove_tree(build)
                raise
        return path

    def _fill(self, build: str, manifest: Manifest) -> None:
        folders = {build}
        for entry in manifest.entries:
            target = os.path.join(build, *entry["path"].split("/"))
            parent = os.path.dirname(target)
            if parent not in folders:
                os.makedirs(parent, exist_ok=True)
                folders.add(parent)
            if "link" in entry:
                os.symlink(entry["link"], target)
                continue
            blob = self.blob_path(entry["sha256"])
            if entry.get("exec"):
                shutil.copyfile(blob, target)  # its own mode: not the shared blob's
                os.chmod(target, 0o555)
                continue
            try:
                os.link(blob, target)
            except OSError:  # another file system, or no hard links
                shutil.copyfile(blob, target)
                os.chmod(target, 0o444)
        for folder in sorted(folders - {build}, key=len, reverse=True):
            os.chmod(folder, 0o555)  # read-only: a run cannot change the next one's files

    def _stamp(self, tree: str, manifest: Manifest, stamp: str) -> None:
        """Size and mtime of each file as built: a test that wrote into its tree anyway (as
        root, read-only modes do not stop it) is noticed by :meth:`changed`."""
        json_text = json.dumps(self._stats(tree, manifest))
        with open(stamp, "w", encoding="utf-8") as fh:
            fh.write(json_text)

    def _stats(self, tree: str, manifest: Manifest) -> dict[str, list[int]]:
        found: dict[str, list[int]] = {}
        for entry in manifest.entries:
            if "sha256" in entry:
                with contextlib.suppress(OSError):
                    st = os.lstat(os.path.join(tree, *entry["path"].split("/")))
                    found[entry["path"]] = [st.st_size, st.st_mtime_ns, st.st_ino]
        return found

    def changed(self, manifest: Manifest) -> list[str]:
        """Files of a built tree that are no longer as built (all of them without a stamp)."""
        path = self.tree_path(manifest)
        try:
            with open(path + ".stamp", encoding="utf-8") as fh:
                stamp = json.load(fh)
        except (OSError, ValueError):
            stamp = {}
        now = self._stats(path, manifest)
        return sorted(p for p in now.keys() | stamp.keys() if now.get(p) != stamp.get(p))

    def drop(self, manifest: Manifest, paths: list[str]) -> bool:
        """Remove a changed tree and the blobs of its changed files (hard links: the same
        bytes); False when a run uses it now."""
        blobs = {e["path"]: e["sha256"] for e in manifest.entries if "sha256" in e}
        if not self._drop_tree(self.tree_path(manifest)):
            return False
        for path in paths:
            if path in blobs:
                with contextlib.suppress(OSError):
                    os.unlink(self.blob_path(blobs[path]))
        return True

    # ------------------------------------------------------------------ a workspace in place

    def workspace_hashes(self, workspace: str, worker: str = "") -> HashCache:
        """What ``worker`` hashed of ``workspace`` (loaded once per process)."""
        key = (worker, workspace)
        if key not in self._hashes:
            path = os.path.join(self.root, "hashes", workspace_key(worker, workspace) + ".json")
            self._hashes[key] = HashCache(path, self.clock)
        return self._hashes[key]

    def matches(self, workspace: str, manifest: Manifest, worker: str = "") -> list[str]:
        """The manifest's paths that ``workspace`` lacks or holds different (empty: it
        matches, and can be used in place). Extra files in the workspace do not count. Sizes
        first; a file is hashed only when its stat is not the one this worker hashed it at."""
        hashes = self.workspace_hashes(workspace, worker)
        differ: list[str] = []
        for entry in manifest.entries:
            full = os.path.join(workspace, entry["path"])  # POSIX paths, checked
            try:
                st = os.lstat(full)
                same = self._same(full, st, entry, hashes)
            except OSError:
                same = False
            if not same:
                differ.append(entry["path"])
        hashes.keep_only({os.path.join(workspace, e["path"]) for e in manifest.entries})
        hashes.save()
        return differ

    @staticmethod
    def _same(full: str, st: os.stat_result, entry: Entry, hashes: HashCache) -> bool:
        if "link" in entry:
            return stat.S_ISLNK(st.st_mode) and os.readlink(full) == entry["link"]
        if not stat.S_ISREG(st.st_mode) or st.st_size != entry["size"]:
            return False
        return hashes.sha256(full, st) == entry["sha256"]

    # ------------------------------------------------------------------ eviction

    def size(self) -> int:
        total = 0
        for path in self._stored():
            with contextlib.suppress(OSError):
                total += os.lstat(path).st_size
        return total

    def evict(self) -> list[str]:
        """Above the limit: trees not in use, least recently used first, then blobs no tree
        holds (one link) and manifests, oldest first. Returns what went (tree digests, blob
        shas, manifest files)."""
        gone: list[str] = []
        total = self.size()
        if total <= self.limit:
            return gone
        trees_dir = os.path.join(self.root, "trees")
        locks = [n for n in os.listdir(trees_dir) if n.endswith(".lock")]
        locks.sort(key=lambda n: _mtime(os.path.join(trees_dir, n)))
        for name in locks:
            digest = name[: -len(".lock")]
            if self._drop_tree(os.path.join(trees_dir, digest)):
                gone.append(digest)
        for blob in sorted(self._stored(), key=_mtime):
            if total <= self.limit:
                break
            st = os.lstat(blob)
            if st.st_nlink == 1:
                os.unlink(blob)
                total -= st.st_size
                gone.append(os.path.basename(blob))
        return gone

    def _drop_tree(self, path: str) -> bool:
        with open(path + ".lock", "a+b") as lock:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                return False  # a run uses it now
            remove_tree(path)
            for suffix in (".stamp", ".fetch", ".lock"):
                with contextlib.suppress(OSError):
                    os.unlink(path + suffix)
            return True

    def _stored(self) -> Iterator[str]:
        """Every blob and manifest file."""
        for sub in ("blobs", "manifests"):
            for here, _, files in os.walk(os.path.join(self.root, sub)):
                for name in files:
                    yield os.path.join(here, name)


def _mtime(path: str) -> float:
    try:
        return os.lstat(path).st_mtime
    except OSError:
        return 0.0


def remove_tree(path: str) -> None:
    """Remove a (read-only) tree."""
    if not os.path.lexists(path):
        return
    for here, dirs, _ in os.walk(path):
        for name in dirs:
            with contextlib.suppress(OSError):
                os.chmod(os.path.join(here, name), 0o700)
    with contextlib.suppress(OSError):
        os.chmod(path, 0o700)
    shutil.rmtree(path, ignore_errors=True)


def _locked(lock: IO[bytes], how: int) -> bool:
    """Whether ``lock`` could be had at once (``flock`` without blocking)."""
    try:
        fcntl.flock(lock, how | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True
