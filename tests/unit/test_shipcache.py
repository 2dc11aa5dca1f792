"""A worker's cache: blobs by sha256, a read-only tree per manifest, in-place matching, LRU."""

from __future__ import annotations

import os
from pathlib import Path

from pytest_celery_dispatch.manifest import build_manifest, walk_files
from pytest_celery_dispatch.shipcache import ShipCache, cache_limit, cache_root


def project(root: Path, body: str = "def test(): pass\n") -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / "test_a.py").write_text(body)
    (root / "data").mkdir(exist_ok=True)
    (root / "data" / "x.txt").write_text("data")
    (root / "tool.sh").write_text("#!/bin/sh\n")
    (root / "tool.sh").chmod(0o755)
    if not (root / "alias.py").is_symlink():
        (root / "alias.py").symlink_to("test_a.py")
    return root


def fill(cache: ShipCache, root: Path):
    manifest = build_manifest(str(root), walk_files(str(root)))
    tmp = cache.tmp_dir()
    for sha in cache.missing(manifest):
        src = next(e["path"] for e in manifest.entries if e.get("sha256") == sha)
        dst = os.path.join(tmp, sha)
        Path(dst).write_bytes((root / src).read_bytes())
        cache.add_blob(sha, dst)
    return manifest


def test_a_tree_is_built_once_read_only_and_reused(tmp_path: Path) -> None:
    cache = ShipCache(str(tmp_path / "cache"))
    manifest = fill(cache, project(tmp_path / "p"))
    assert cache.missing(manifest) == {}
    assert not cache.built(manifest)
    tree = Path(cache.materialize(manifest))
    assert (tree / "test_a.py").read_text() == "def test(): pass\n"
    assert (tree / "data" / "x.txt").read_text() == "data"
    assert os.readlink(tree / "alias.py") == "test_a.py"
    assert os.access(tree / "tool.sh", os.X_OK)
    assert (tree / "test_a.py").stat().st_mode & 0o222 == 0  # read-only, even for root's view
    assert tree.stat().st_mode & 0o222 == 0
    assert (tree / "test_a.py").stat().st_nlink == 2  # a hard link to its blob
    with cache.hold(manifest):
        assert cache.built(manifest)
    assert cache.materialize(manifest) == str(tree)


def test_two_versions_of_a_file_make_two_trees(tmp_path: Path) -> None:
    cache = ShipCache(str(tmp_path / "cache"))
    one = fill(cache, project(tmp_path / "p"))
    two = fill(cache, project(tmp_path / "p", "def test(): assert 0\n"))
    assert cache.missing(two) == {}
    assert one.digest != two.digest
    t1, t2 = Path(cache.materialize(one)), Path(cache.materialize(two))
    assert (t1 / "test_a.py").read_text() != (t2 / "test_a.py").read_text()
    # the files both share are one blob: building the second tree leaves the first as built
    assert cache.changed(one) == []
    assert cache.changed(two) == []


def test_a_workspace_matches_when_the_manifests_files_are_there(tmp_path: Path) -> None:
    cache = ShipCache(str(tmp_path / "cache"))
    root = project(tmp_path / "p")
    manifest = build_manifest(str(root), walk_files(str(root)))
    (root / "extra.txt").write_text("not in the manifest: does not count")
    assert cache.matches(str(root), manifest) == []
    (root / "data" / "x.txt").write_text("DATA")
    assert cache.matches(str(root), manifest) == ["data/x.txt"]
    assert len(cache.matches(str(tmp_path / "empty"), manifest)) == len(manifest.entries)


def test_over_the_limit_unused_trees_go_then_blobs_no_tree_holds(tmp_path: Path) -> None:
    cache = ShipCache(str(tmp_path / "cache"), limit=1)
    old = fill(cache, project(tmp_path / "p"))
    cache.materialize(old)
    new = fill(cache, project(tmp_path / "p", "def test(): assert 1\n"))
    cache.materialize(new)
    os.utime(cache.tree_path(old) + ".lock", (1, 1))  # least recently used
    with cache.hold(new):
        gone = cache.evict()
    assert old.digest in gone
    assert new.digest not in gone  # in use
    assert os.path.isdir(cache.tree_path(new))
    assert not os.path.exists(cache.tree_path(old))
    assert not [s for s, e in new.blobs().items() if not e.get("exec") and s in cache.missing(new)]
    assert cache.missing(old)  # the old file's blob went with its tree


def test_the_cache_folder_and_limit_come_from_the_environment(tmp_path: Path) -> None:
    env = {"DISPATCH_CACHE_DIR": str(tmp_path / "c"), "DISPATCH_CACHE_LIMIT": "10M"}
    assert cache_root(env) == str(tmp_path / "c")
    assert cache_limit(env) == 10 * 1024 * 1024
    assert cache_root({"XDG_CACHE_HOME": "/x"}) == "/x/pytest-celery-dispatch"
    ShipCache.from_env(env)
    assert (tmp_path / "c").stat().st_mode & 0o777 == 0o700


def test_a_tree_a_test_wrote_into_is_noticed_and_its_blob_dropped(tmp_path: Path) -> None:
    cache = ShipCache(str(tmp_path / "cache"))
    manifest = fill(cache, project(tmp_path / "p"))
    tree = Path(cache.materialize(manifest))
    assert cache.changed(manifest) == []
    target = tree / "test_a.py"
    target.chmod(0o644)  # what root may do anyway
    target.write_text("def test(): pass  # changed by a test\n")
    assert cache.changed(manifest) == ["test_a.py"]
    assert cache.drop(manifest, ["test_a.py"])
    assert not cache.built(manifest)
    assert list(cache.missing(manifest)) == [
        e["sha256"] for e in manifest.entries if e["path"] == "test_a.py"
    ]


def test_a_tree_is_moved_into_place_while_its_user_may_still_move_it(
    tmp_path: Path, monkeypatch
) -> None:
    # Renaming a folder into another parent needs write access to the folder itself for a
    # non-root user (the worker image's uid 10001): read-only only once in place.
    cache = ShipCache(str(tmp_path / "cache"))
    manifest = fill(cache, project(tmp_path / "p"))
    modes = []
    rename = os.rename

    def checked_rename(src: str, dst: str) -> None:
        modes.append(os.stat(src).st_mode)
        rename(src, dst)

    monkeypatch.setattr(os, "rename", checked_rename)
    tree = Path(cache.materialize(manifest))
    assert modes
    assert all(mode & 0o200 for mode in modes), [oct(m) for m in modes]
    assert tree.stat().st_mode & 0o222 == 0  # and read-only once in place
    assert (tree / "data").stat().st_mode & 0o222 == 0


def test_a_tree_a_slot_runs_in_is_had_at_once_by_the_slots_beside_it(tmp_path: Path) -> None:
    """A slot holds its tree (a shared lock) for its whole session; a slot of the same run
    that starts then must get the tree at once, not wait for that session to end."""
    import threading

    cache = ShipCache(str(tmp_path / "cache"))
    manifest = fill(cache, project(tmp_path / "p"))
    tree = cache.materialize(manifest)
    got: list[str] = []
    beside = threading.Thread(target=lambda: got.append(cache.materialize(manifest)), daemon=True)
    with cache.hold(manifest):  # the first slot's session
        beside.start()
        beside.join(timeout=30)  # a guard against the hang: the tree is there, nothing to wait for
        assert got == [tree]


def test_a_tree_another_slot_builds_is_waited_for(tmp_path: Path) -> None:
    import fcntl
    import threading

    cache = ShipCache(str(tmp_path / "cache"))
    manifest = fill(cache, project(tmp_path / "p"))
    got: list[str] = []
    second = threading.Thread(target=lambda: got.append(cache.materialize(manifest)), daemon=True)
    with open(cache.tree_path(manifest) + ".lock", "a+b") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another slot builds the tree
        second.start()
        second.join(timeout=0.2)
        assert second.is_alive()  # it waits while the tree is being built
        assert not got
    second.join(timeout=30)
    assert got == [cache.tree_path(manifest)]
    assert cache.built(manifest)
