"""Files' sha256 remembered by their stat: only files that changed are hashed again."""

from __future__ import annotations

import hashlib
import json
import os
import types
from pathlib import Path

import pytest

from pytest_celery_dispatch.hashcache import RACY_SECONDS, HashCache, stat_key
from pytest_celery_dispatch.manifest import build_manifest, walk_files
from pytest_celery_dispatch.shipcache import ShipCache

LATER = int(RACY_SECONDS * 1e9) * 5  # the fake clock: this far after the newest file written


class Clock:
    """Wall time as the hash cache reads it: well after every file written so far."""

    def __init__(self) -> None:
        self.newest = 0

    def __call__(self) -> int:
        return self.newest + LATER

    def write(self, path: Path, data: bytes) -> Path:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        st = os.lstat(path)
        self.newest = max(self.newest, st.st_mtime_ns, st.st_ctime_ns)
        return path


@pytest.fixture
def clock() -> Clock:
    return Clock()


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def test_a_file_is_hashed_once_then_known_by_its_stat(tmp_path: Path, clock: Clock) -> None:
    f = clock.write(tmp_path / "a.py", b"one")
    store = str(tmp_path / "hashes.json")
    first = HashCache(store, clock)
    assert first.sha256(str(f), os.lstat(f)) == sha(b"one")
    assert first.hashed == 1
    first.save()
    again = HashCache(store, clock)  # another run, another process
    assert again.sha256(str(f), os.lstat(f)) == sha(b"one")
    assert again.hashed == 0


def test_a_changed_file_is_hashed_again(tmp_path: Path, clock: Clock) -> None:
    f = clock.write(tmp_path / "a.py", b"one")
    cache = HashCache(None, clock)
    cache.sha256(str(f), os.lstat(f))
    clock.write(f, b"three")  # another size
    assert cache.sha256(str(f), os.lstat(f)) == sha(b"three")
    new = clock.write(tmp_path / "new.py", b"tri")  # the same size, moved over it: another inode
    os.utime(new, ns=(os.lstat(f).st_atime_ns, os.lstat(f).st_mtime_ns))
    os.replace(new, f)
    assert cache.sha256(str(f), os.lstat(f)) == sha(b"tri")
    assert cache.hashed == 3


def test_a_touched_file_with_the_same_content_is_hashed_again_and_the_same(
    tmp_path: Path, clock: Clock
) -> None:
    f = clock.write(tmp_path / "a.py", b"same")
    cache = HashCache(None, clock)
    cache.sha256(str(f), os.lstat(f))
    st = os.lstat(f)
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    assert cache.sha256(str(f), os.lstat(f)) == sha(b"same")
    assert cache.hashed == 2


def fake_stat(**changes: int) -> types.SimpleNamespace:
    values = {"st_size": 3, "st_mtime_ns": 10**18, "st_ino": 7, "st_ctime_ns": 10**18}
    return types.SimpleNamespace(**{**values, **changes})


def test_size_mtime_inode_and_ctime_each_make_a_file_unknown() -> None:
    cache = HashCache(None, lambda: 2 * 10**18)
    st = fake_stat()
    cache.remember("/t/a.py", st, sha(b"abc"), 2 * 10**18)  # type: ignore[arg-type]
    assert cache.lookup("/t/a.py", st) == sha(b"abc")  # type: ignore[arg-type]
    assert cache.lookup("/t/b.py", st) is None  # type: ignore[arg-type]
    for field in ("st_size", "st_mtime_ns", "st_ino", "st_ctime_ns"):
        changed = fake_stat(**{field: getattr(st, field) + 1})
        # a rewrite that restores size and mtime still moves the ctime, which touch cannot set
        assert cache.lookup("/t/a.py", changed) is None, field  # type: ignore[arg-type]


def test_a_file_changed_close_to_its_hashing_is_not_remembered() -> None:
    st = fake_stat()
    now = st.st_ctime_ns + int(RACY_SECONDS * 1e9) - 1  # a second write could keep its stat
    cache = HashCache(None, lambda: now)
    cache.remember("/t/a.py", st, sha(b"abc"), now)  # type: ignore[arg-type]
    assert cache.lookup("/t/a.py", st) is None  # type: ignore[arg-type]
    cache.remember("/t/a.py", st, sha(b"abc"), now + 2)  # type: ignore[arg-type]
    assert cache.lookup("/t/a.py", st) == sha(b"abc")  # type: ignore[arg-type]


def test_a_corrupt_foreign_or_tampered_cache_file_knows_nothing(
    tmp_path: Path, clock: Clock
) -> None:
    f = clock.write(tmp_path / "a.py", b"one")
    key = stat_key(os.lstat(f))
    store = tmp_path / "hashes.json"
    for text in (
        "not json",
        "[1, 2]",
        '{"version": 99, "files": {}}',
        '{"version": 1, "files": []}',
        json.dumps({"version": 1, "files": {str(f): [*key, "not a sha"]}}),
        json.dumps({"version": 1, "files": {str(f): key}}),
    ):
        store.write_text(text)
        cache = HashCache(str(store), clock)
        assert cache.lookup(str(f), os.lstat(f)) is None, text
        assert cache.sha256(str(f), os.lstat(f)) == sha(b"one")


def test_saved_only_when_changed_and_files_gone_are_forgotten(tmp_path: Path, clock: Clock) -> None:
    a, b = clock.write(tmp_path / "a.py", b"a"), clock.write(tmp_path / "b.py", b"b")
    store = tmp_path / "hashes.json"
    cache = HashCache(str(store), clock)
    cache.save()
    assert not store.exists()
    for f in (a, b):
        cache.sha256(str(f), os.lstat(f))
    cache.keep_only({str(a)})
    cache.save()
    assert set(HashCache(str(store), clock).rows) == {str(a)}


def test_the_controller_hashes_only_the_files_changed_since_the_last_run(
    tmp_path: Path, clock: Clock
) -> None:
    root = tmp_path / "p"
    for n in range(5):
        clock.write(root / f"test_{n}.py", f"def test(): assert {n}\n".encode())
    store = str(tmp_path / "hashes.json")
    plain = build_manifest(str(root), walk_files(str(root)))
    first = HashCache(store, clock)
    assert build_manifest(str(root), walk_files(str(root)), hashes=first) == plain
    assert first.hashed == 5
    second = HashCache(store, clock)
    assert build_manifest(str(root), walk_files(str(root)), hashes=second) == plain
    assert second.hashed == 0
    clock.write(root / "test_3.py", b"def test(): assert False\n")
    third = HashCache(store, clock)
    edited = build_manifest(str(root), walk_files(str(root)), hashes=third)
    assert third.hashed == 1
    assert edited == build_manifest(str(root), walk_files(str(root)))
    assert edited.digest != plain.digest


def test_a_workers_processes_share_what_they_hashed_of_its_workspace(
    tmp_path: Path, clock: Clock
) -> None:
    root = tmp_path / "ws"
    for n in range(5):
        clock.write(root / f"t{n}.py", str(n).encode())
    manifest = build_manifest(str(root), walk_files(str(root)))
    first = ShipCache(str(tmp_path / "cache"), clock=clock)
    assert first.matches(str(root), manifest, "worker-a") == []
    assert first.workspace_hashes(str(root), "worker-a").hashed == 5
    second = ShipCache(str(tmp_path / "cache"), clock=clock)  # another pool process
    assert second.matches(str(root), manifest, "worker-a") == []
    assert second.workspace_hashes(str(root), "worker-a").hashed == 0
    other = ShipCache(str(tmp_path / "cache"), clock=clock)
    assert other.matches(str(root), manifest, "worker-b") == []
    assert other.workspace_hashes(str(root), "worker-b").hashed == 5  # its own file
    new = clock.write(tmp_path / "new", b"X")  # the same size, another inode
    os.replace(new, root / "t2.py")
    third = ShipCache(str(tmp_path / "cache"), clock=clock)
    assert third.matches(str(root), manifest, "worker-a") == ["t2.py"]
    assert third.workspace_hashes(str(root), "worker-a").hashed == 1


def test_a_known_small_file_is_still_kept_as_read_for_the_workers(
    tmp_path: Path, clock: Clock
) -> None:
    root = tmp_path / "p"
    clock.write(root / "run.log", b"as listed\n")
    store = str(tmp_path / "hashes.json")
    build_manifest(str(root), ["run.log"], hashes=HashCache(store, clock))
    known = HashCache(store, clock)
    manifest = build_manifest(str(root), ["run.log"], hashes=known)
    assert known.hashed == 0
    clock.write(root / "run.log", b"written later by a test\n")  # during the run
    assert manifest.snapshot == {sha(b"as listed\n"): b"as listed\n"}
