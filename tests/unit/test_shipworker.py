"""A slot's tree: in place, refused, shipped, up to date (a fake fetcher instead of a broker)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from pytest_celery_dispatch.manifest import build_manifest, walk_files
from pytest_celery_dispatch.shipcache import ShipCache
from pytest_celery_dispatch.shipworker import ShipState, prepare


def project(root: Path, version: int = 1) -> Path:
    (root / "pkg").mkdir(parents=True, exist_ok=True)
    (root / "pkg" / "__init__.py").write_text("")
    (root / "test_a.py").write_text(f"VERSION = {version}\n")
    return root


def payload(root: Path, mode: str = "auto") -> dict:
    manifest = build_manifest(str(root), walk_files(str(root)))
    ship = {"mode": mode, "digest": manifest.digest, "manifest": manifest.as_list()}
    return {"run_id": "r", "queue": "q", "nodeids": ["test_a.py::t"], "ship": ship}


class FakeFetcher:
    """Copies the wanted blobs from the controller's folder, as the broker would bring them."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.asked: list[set[str]] = []

    def __call__(self, missing: dict[str, int], cache: ShipCache) -> dict:
        self.asked.append(set(missing))
        manifest = build_manifest(str(self.root), walk_files(str(self.root)))
        tmp = cache.tmp_dir()
        for sha, entry in manifest.blobs().items():
            if sha in missing:
                shutil.copyfile(self.root / entry["path"], Path(tmp) / sha)
                cache.add_blob(sha, str(Path(tmp) / sha))
        return {"blobs_received": len(missing), "bytes_received": 0}


@pytest.fixture
def state(tmp_path: Path) -> ShipState:
    return ShipState({"DISPATCH_CACHE_DIR": str(tmp_path / "cache")})


def test_without_ship_or_with_off_the_workspace_is_used(tmp_path: Path, state) -> None:
    fetch = FakeFetcher(tmp_path)
    for data in ({}, {"ship": {"mode": "off"}}):
        found = prepare(data, str(tmp_path), state, fetch, "w", "amqp://x//")
        assert (found.workspace, found.info["state"], found.refused) == (
            str(tmp_path),
            "in place",
            None,
        )


def test_auto_with_a_matching_workspace_runs_in_place_unsigned(tmp_path: Path, state) -> None:
    root = project(tmp_path / "ctl")
    found = prepare(payload(root), str(root), state, FakeFetcher(root), "w", "amqp://x//")
    assert (found.workspace, found.info["state"], found.refused) == (str(root), "in place", None)


def test_unsigned_runs_are_not_shipped_unless_the_worker_allows_them(tmp_path: Path, state) -> None:
    root, empty = project(tmp_path / "ctl"), tmp_path / "empty"
    empty.mkdir()
    fetch = FakeFetcher(root)
    auto = prepare(payload(root), str(empty), state, fetch, "w", "amqp://x//")
    assert auto.info["state"] == "in place, differs"
    assert auto.refused is None
    always = prepare(payload(root, "always"), str(empty), state, fetch, "w", "amqp://x//")
    assert "DISPATCH_SHIP_UNSIGNED=allow" in str(always.refused)
    assert fetch.asked == []
    assert not list((tmp_path / "cache" / "blobs").rglob("*"))


def test_an_allowed_run_is_shipped_then_up_to_date_then_one_blob(tmp_path: Path) -> None:
    state = ShipState(
        {"DISPATCH_CACHE_DIR": str(tmp_path / "c"), "DISPATCH_SHIP_UNSIGNED": "allow"}
    )
    root, empty = project(tmp_path / "ctl"), tmp_path / "empty"
    empty.mkdir()
    fetch = FakeFetcher(root)
    first = prepare(payload(root), str(empty), state, fetch, "w", "amqp://x//")
    first.hold.close()
    assert first.info["state"] == "shipped"
    assert (Path(first.workspace) / "test_a.py").read_text() == "VERSION = 1\n"
    again = prepare(payload(root), str(empty), state, fetch, "w", "amqp://x//")
    again.hold.close()
    assert (again.info["state"], again.workspace) == ("up to date", first.workspace)
    project(root, version=2)
    edited = prepare(payload(root), str(empty), state, fetch, "w", "amqp://x//")
    edited.hold.close()
    assert [len(asked) for asked in fetch.asked] == [2, 1]  # two blobs, then the edited one
    assert (Path(edited.workspace) / "test_a.py").read_text() == "VERSION = 2\n"
    assert (Path(first.workspace) / "test_a.py").read_text() == "VERSION = 1\n"
    assert edited.info["shadowed"] == []


def test_the_embedded_broker_allows_unsigned_runs_by_default(tmp_path: Path, state) -> None:
    root, empty = project(tmp_path / "ctl"), tmp_path / "empty"
    empty.mkdir()
    found = prepare(payload(root, "always"), str(empty), state, FakeFetcher(root), "w", "embedded")
    found.hold.close()
    assert found.info["state"] == "shipped"


def test_a_manifest_that_does_not_match_its_digest_or_the_cache_is_refused(tmp_path: Path) -> None:
    env = {"DISPATCH_CACHE_DIR": str(tmp_path / "c"), "DISPATCH_SHIP_UNSIGNED": "allow"}
    root, empty = project(tmp_path / "ctl"), tmp_path / "empty"
    empty.mkdir()
    data = payload(root)
    data["ship"]["manifest"][0]["sha256"] = "0" * 64
    found = prepare(data, str(empty), ShipState(env), FakeFetcher(root), "w", "amqp://x//")
    assert "does not match its digest" in str(found.refused)
    small = ShipState({**env, "DISPATCH_CACHE_LIMIT": "5"})
    found = prepare(payload(root), str(empty), small, FakeFetcher(root), "w", "amqp://x//")
    assert "raise its DISPATCH_CACHE_LIMIT" in str(found.refused)
