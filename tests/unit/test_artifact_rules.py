"""Test artifacts, the pure parts: names, limits, chunks, attempts (no broker)."""

from __future__ import annotations

import base64
import hashlib
from pathlib import Path
from typing import Any

import pytest

from pytest_celery_dispatch.artifactpaths import (
    Limits,
    UnsafeArtifactName,
    check_name,
    nodeid_folder,
)
from pytest_celery_dispatch.artifactship import ArtifactShipper
from pytest_celery_dispatch.artifactstore import ArtifactStore
from pytest_celery_dispatch.settings import parse_size, parse_tmp_path_mode


def test_a_nodeid_becomes_a_relative_path_that_never_climbs() -> None:
    assert nodeid_folder("a/test_x.py::T::t[1/2]") == "a/test_x.py/T/t[1_2]"
    assert nodeid_folder("../x.py::t[..]") == "_/x.py/t[..]"
    assert ".." not in nodeid_folder("x.py::..").split("/")


@pytest.mark.parametrize("name", ["../escape.txt", "/etc/passwd", "a/../../b", "a\\b", "", "."])
def test_a_file_name_that_would_leave_its_folder_is_refused(name: str) -> None:
    with pytest.raises(UnsafeArtifactName):
        check_name(name)


def test_sizes_and_modes_parse_or_name_the_option() -> None:
    assert parse_size("100M", "x") == 100 << 20
    assert parse_size("2g", "x") == 2 << 30
    assert parse_size("512", "x") == 512
    with pytest.raises(pytest.UsageError, match="--celery-artifacts-limit"):
        parse_size("lots", "--celery-artifacts-limit")
    with pytest.raises(pytest.UsageError, match="none, failed, all"):
        parse_tmp_path_mode("some", "--celery-artifacts-tmp-path")


def ship(tmp_path: Path, files: dict[str, bytes], limits: Limits, chunk: int = 4) -> list[Any]:
    folder = tmp_path / "test-1"
    folder.mkdir()
    for name, data in files.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(data)
    sent: list[dict[str, Any]] = []
    shipper = ArtifactShipper(sent.append, limits, chunk_bytes=chunk)
    event = {"type": "artifacts", "nodeid": "t.py::t", "batch_id": "b1"}
    shipper({**event, "folders": [{"path": str(folder), "prefix": "", "remove": "1"}]})
    assert not folder.exists()  # the test's folder goes once sent
    return sent


def test_files_travel_in_bounded_chunks_then_a_summary(tmp_path: Path) -> None:
    sent = ship(tmp_path, {"a.log": b"0123456789", "sub/b.bin": b""}, Limits())
    chunks = [e for e in sent if e["type"] == "artifact_chunk"]
    assert [(c["name"], c["offset"]) for c in chunks] == [("a.log", 0), ("a.log", 4), ("a.log", 8)]
    assert all(len(base64.b64decode(c["data"])) <= 4 for c in chunks)
    summary = sent[-1]
    assert summary["type"] == "artifacts"
    assert [f["name"] for f in summary["files"]] == ["a.log", "sub/b.bin"]
    assert summary["files"][0]["sha256"] == hashlib.sha256(b"0123456789").hexdigest()


def test_over_the_test_limit_a_file_is_cut_and_said(tmp_path: Path) -> None:
    sent = ship(tmp_path, {"a.log": b"x" * 6, "b.log": b"y" * 6}, Limits(per_test=8))
    a, b = sent[-1]["files"]
    assert (a["bytes"], a["cut"]) == (6, False)
    assert (b["bytes"], b["size"], b["cut"], b["cut_reason"]) == (2, 6, True, "per-test limit")


def chunk(session: str, name: str, data: bytes, offset: int = 0) -> dict[str, Any]:
    encoded = base64.b64encode(data).decode()
    return {"session_id": session, "nodeid": "t.py::t", "name": name, "offset": offset,
            "data": encoded}  # fmt: skip


def summary(session: str, files: dict[str, bytes]) -> dict[str, Any]:
    return {
        "session_id": session,
        "nodeid": "t.py::t",
        "files": [
            {"name": n, "size": len(d), "bytes": len(d), "sha256": hashlib.sha256(d).hexdigest()}
            for n, d in files.items()
        ],
    }


def test_the_files_of_the_attempt_that_gave_the_outcome_come_home_only(tmp_path: Path) -> None:
    store = ArtifactStore(str(tmp_path / "arts"), Limits())
    store.chunk(chunk("killed", "half.bin", b"abc"))  # its worker died mid-test
    store.chunk(chunk("retry", "log.txt", b"world", offset=5))  # chunks may come in any order
    store.chunk(chunk("retry", "log.txt", b"hello"))
    store.summary(summary("retry", {"log.txt": b"helloworld"}))
    (entry,) = store.finalize("t.py::t", "retry")
    assert Path(entry["path"]).read_bytes() == b"helloworld"
    assert "error" not in entry
    assert not entry["cut"]
    store.close()
    files = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*") if p.is_file())
    assert files == [Path("arts/t.py/t/log.txt")]


def test_a_damaged_file_is_reported_not_hidden(tmp_path: Path) -> None:
    store = ArtifactStore(str(tmp_path / "arts"), Limits())
    store.chunk(chunk("s", "log.txt", b"hellO"))
    store.summary(summary("s", {"log.txt": b"hello"}))
    (entry,) = store.finalize("t.py::t", "s")
    assert entry["error"].startswith("sha256 mismatch")


def test_over_the_run_limit_the_controller_cuts_and_says(tmp_path: Path) -> None:
    store = ArtifactStore(str(tmp_path / "arts"), Limits(per_run=3))
    store.chunk(chunk("s", "log.txt", b"hello"))
    store.summary(summary("s", {"log.txt": b"hello"}))
    (entry,) = store.finalize("t.py::t", "s")
    assert (entry["bytes"], entry["size"], entry["cut"]) == (3, 5, True)
    assert entry["cut_reason"] == "per-run limit"
    assert "error" not in entry


@pytest.mark.parametrize("name", ["../escape.txt", "/etc/passwd", "a/../../b"])
def test_a_name_from_a_worker_never_leaves_the_artifact_folder(tmp_path: Path, name: str) -> None:
    store = ArtifactStore(str(tmp_path / "arts"), Limits())
    store.chunk(chunk("s", name, b"x"))
    store.summary({"session_id": "s", "nodeid": "t.py::t", "files": [{"name": name}]})
    (entry,) = store.finalize("t.py::t", "s")
    assert entry["error"].startswith("refused")
    assert store.refused
    assert [p for p in tmp_path.rglob("*") if p.is_file()] == []


def test_a_crashed_tests_folder_is_sent_before_the_crash_is_reported(tmp_path: Path) -> None:
    from pytest_celery_dispatch.artifactship import folder_for

    folder = Path(folder_for(str(tmp_path), "t.py::t"))
    folder.mkdir()
    (folder / "last.log").write_text("reset")
    sent: list[dict[str, Any]] = []
    shipper = ArtifactShipper(sent.append, Limits(), root=str(tmp_path))
    shipper({"type": "crashed", "nodeid": "t.py::t", "batch_id": "b1"})
    assert [e["type"] for e in sent] == ["artifact_chunk", "artifacts", "crashed"]
    assert sent[1]["files"][0]["name"] == "last.log"
    shipper({"type": "crashed", "nodeid": "t.py::other", "batch_id": "b1"})
    assert sent[-1]["type"] == "crashed"  # no folder: nothing else said


def test_limits_from_a_malformed_payload_fall_back_to_the_defaults() -> None:
    assert Limits.from_dict({"per_test": "lots", "per_run": -1, "tmp_path": "x"}) == Limits()
    assert Limits.from_dict(None) == Limits()
    assert Limits.from_dict({"per_test": 5, "tmp_path": "failed"}).per_test == 5


def test_what_never_reached_an_outcome_is_dropped_at_the_end(tmp_path: Path) -> None:
    store = ArtifactStore(str(tmp_path / "arts"), Limits())
    store.chunk(chunk("lost", "half.bin", b"abc"))
    store.close()
    assert not (tmp_path / "arts").exists()


def test_an_artifact_folder_that_cannot_be_written_is_named(tmp_path: Path) -> None:
    from pytest_celery_dispatch.artifactpaths import folder_problem

    (tmp_path / "file").write_text("x")
    assert folder_problem(str(tmp_path / "new" / "deeper")) is None
    assert (
        folder_problem(str(tmp_path / "file")) == f"{tmp_path / 'file'} exists and is not a folder"
    )
