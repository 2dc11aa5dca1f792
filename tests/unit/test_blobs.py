"""Blobs on the wire: bounded messages, any order, verified before use."""

from __future__ import annotations

import hashlib
import json
import os
import random
from pathlib import Path

import pytest

from pytest_celery_dispatch.blobs import PIECE, Assembler, BlobError, messages


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def send(files: dict[Path, bytes], tmp: Path, shuffle: bool = False) -> dict[str, bytes]:
    for path, data in files.items():
        path.write_bytes(data)
    sent = list(messages(iter((str(p), sha(d), p.name) for p, d in files.items())))
    for message in sent:
        assert len(json.dumps(message)) < PIECE * 4 // 3 + 4096  # bounded, even for tiny files
    items = [item for message in sent for item in message]
    if shuffle:
        random.Random(1).shuffle(items)
    out = tmp / "in"
    out.mkdir()
    assembler = Assembler({sha(d): len(d) for d in files.values()}, str(out))
    got = {}
    for item in items:
        done = assembler.add(json.loads(json.dumps(item)))
        if done:
            got[done[0]] = Path(done[1]).read_bytes()
    assert assembler.done
    return got


def test_small_files_share_a_message_and_come_back_whole(tmp_path: Path) -> None:
    files = {tmp_path / f"f{i}": f"content {i}\n".encode() for i in range(8000)}
    got = send(files, tmp_path)
    assert got == {sha(d): d for d in files.values()}


def test_a_big_incompressible_file_travels_in_bounded_pieces_in_any_order(tmp_path: Path) -> None:
    data = os.urandom(3 * PIECE + 123)
    got = send({tmp_path / "big": data}, tmp_path, shuffle=True)
    assert got == {sha(data): data}


def test_an_empty_file(tmp_path: Path) -> None:
    assert send({tmp_path / "e": b""}, tmp_path) == {sha(b""): b""}


def test_a_blob_whose_bytes_do_not_match_is_refused(tmp_path: Path) -> None:
    (tmp_path / "f").write_bytes(b"real")
    fake = sha(b"other")
    items = [i for m in messages(iter([(str(tmp_path / "f"), fake, "data/f")])) for i in m]
    assert items[-1]["error"]  # the sender noticed: the file is not what the manifest says
    assembler = Assembler({fake: 4}, str(tmp_path))
    with pytest.raises(BlobError, match="data/f changed on the controller"):
        assembler.add(items[-1])
    del items[-1]["error"]
    assembler = Assembler({fake: 4}, str(tmp_path))
    with pytest.raises(BlobError, match="do not match its sha256"):
        assembler.add(items[-1])


def test_a_blob_bigger_than_its_entry_is_cut_off(tmp_path: Path) -> None:
    data = b"a" * 100_000  # compresses to a few hundred bytes: a bomb in small
    (tmp_path / "f").write_bytes(data)
    items = [i for m in messages(iter([(str(tmp_path / "f"), sha(data), "f")])) for i in m]
    assembler = Assembler({sha(data): 10}, str(tmp_path))
    with pytest.raises(BlobError, match="bigger than its manifest entry"):
        assembler.add(items[-1])


def test_pieces_not_asked_for_are_ignored(tmp_path: Path) -> None:
    assembler = Assembler({"a" * 64: 1}, str(tmp_path))
    assert assembler.add({"sha256": "b" * 64, "part": 0, "data": "", "last": True}) is None
    assert not assembler.done


def test_a_file_written_during_the_run_is_sent_as_it_was_hashed(tmp_path: Path) -> None:
    from pytest_celery_dispatch.manifest import build_manifest

    root = tmp_path / "root"
    root.mkdir()
    (root / "run.log").write_text("as hashed\n")
    manifest = build_manifest(str(root), ["run.log"])
    (root / "run.log").write_text("written later by a test\n")
    (entry,) = manifest.entries
    source = manifest.snapshot[entry["sha256"]]
    items = [i for m in messages(iter([(source, entry["sha256"], "run.log")])) for i in m]
    out = tmp_path / "out"
    out.mkdir()
    done = Assembler({entry["sha256"]: entry["size"]}, str(out)).add(items[-1])
    assert done is not None
    assert Path(done[1]).read_text() == "as hashed\n"


def test_big_files_are_not_kept_in_memory(tmp_path: Path, monkeypatch) -> None:
    from pytest_celery_dispatch import manifest as m

    monkeypatch.setattr(m, "SNAPSHOT_FILE", 10)
    (tmp_path / "small").write_bytes(b"x" * 10)
    (tmp_path / "big").write_bytes(b"x" * 11)
    built = m.build_manifest(str(tmp_path), ["big", "small"])
    assert list(built.snapshot.values()) == [b"x" * 10]
    assert [e["size"] for e in built.entries] == [11, 10]
