"""Blobs on the wire: file contents compressed, cut into bounded JSON messages, put back
together and verified on the worker.

A file's bytes are zlib-compressed as a stream and cut into pieces of exactly :data:`PIECE`
compressed bytes (the last one shorter), base64 in JSON: no message is bigger than about
``PIECE * 4 / 3`` plus a little, whatever the file's size. Small files share a message. The
worker writes each piece at its offset (pieces may come in any order), and once the last one is
in, decompresses into a temporary file, never past the size the manifest gave, and keeps it only
when its sha256 is the one asked for. Nothing received is ever unpickled or run.

PYTEST_DONT_REWRITE: the worker side imports it.
"""

from __future__ import annotations

import base64
import hashlib
import io
import os
import zlib
from collections.abc import Iterable, Iterator
from typing import Any, BinaryIO

#: Compressed bytes per piece; a message carries pieces up to about this much in all.
PIECE = 512 * 1024
#: What the JSON around one piece costs (its sha256, number, flags), counted against a message.
ITEM_OVERHEAD = 128


def pieces(source: str | bytes, sha256: str, name: str = "") -> Iterator[dict[str, Any]]:
    """The pieces of one file: ``{"sha256", "part", "data"}``, the last with ``"last": True``
    and ``"parts"``; a file that changed since its manifest entry ends with an ``"error"``."""
    digest = hashlib.sha256()
    packer = zlib.compressobj(6)
    pending = b""
    part = 0
    with _opened(source) as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
            pending += packer.compress(block)
            while len(pending) >= PIECE:
                yield _piece(sha256, part, pending[:PIECE])
                pending = pending[PIECE:]
                part += 1
    pending += packer.flush()
    while len(pending) > PIECE:
        yield _piece(sha256, part, pending[:PIECE])
        pending = pending[PIECE:]
        part += 1
    last = _piece(sha256, part, pending)
    last.update({"last": True, "parts": part + 1})
    if digest.hexdigest() != sha256:
        what = name or (source if isinstance(source, str) else "a file")
        last["error"] = f"{what} changed on the controller since the run started"
    yield last


def _opened(source: str | bytes) -> BinaryIO:
    """A file's bytes as they were read for the manifest (kept in memory), else the file itself."""
    return io.BytesIO(source) if isinstance(source, bytes) else open(source, "rb")


def _piece(sha256: str, part: int, data: bytes) -> dict[str, Any]:
    return {"sha256": sha256, "part": part, "data": base64.b64encode(data).decode("ascii")}


def messages(
    files: Iterator[tuple[str | bytes, str, str]],
) -> Iterator[list[dict[str, Any]]]:
    """The pieces of ``(path or bytes, sha256, name)`` files, packed into messages of about
    :data:`PIECE` (``name`` is what an error calls the file)."""
    batch: list[dict[str, Any]] = []
    size = 0
    for path, sha256, name in files:
        for item in pieces(path, sha256, name):
            cost = len(item["data"]) + ITEM_OVERHEAD
            if batch and size + cost > PIECE:
                yield batch
                batch, size = [], 0
            batch.append(item)
            size += cost
    if batch:
        yield batch


class BlobError(ValueError):
    """A blob that cannot be used: corrupt, too big, not asked for, or refused by its sender."""


class Assembler:
    """Puts the pieces of the wanted blobs together in ``tmp``; :meth:`add` answers the path
    of each blob it completed and verified (``sha256 -> path``)."""

    def __init__(self, wanted: dict[str, int], tmp: str) -> None:
        self.wanted = dict(wanted)  # sha256 -> size from the manifest
        self.tmp = tmp
        self.received: dict[str, set[int]] = {}
        self.parts: dict[str, int] = {}
        self.bytes_received = 0

    @property
    def done(self) -> bool:
        return not self.wanted

    def add(self, item: Any) -> tuple[str, str] | None:
        if not isinstance(item, dict):
            raise BlobError("a blob piece is not an object")
        sha, part = item.get("sha256"), item.get("part")
        if sha not in self.wanted:
            return None  # a blob asked for by another slot, or sent twice: not ours
        if item.get("error"):
            raise BlobError(str(item["error"]))
        if not isinstance(part, int) or isinstance(part, bool) or part < 0:
            raise BlobError(f"blob {sha[:12]}: bad piece number {part!r}")
        try:
            data = base64.b64decode(str(item.get("data", "")), validate=True)
        except ValueError:
            raise BlobError(f"blob {sha[:12]}: a piece is not base64") from None
        if len(data) > PIECE or (not item.get("last") and len(data) != PIECE):
            raise BlobError(f"blob {sha[:12]}: a piece of the wrong size")
        self.bytes_received += len(data)
        if part == 0 and item.get("last"):  # a whole blob in one piece: no file for it
            return sha, self._finish(sha, [data])
        path = os.path.join(self.tmp, sha + ".z")
        fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
        try:
            os.pwrite(fd, data, part * PIECE)
        finally:
            os.close(fd)
        self.received.setdefault(sha, set()).add(part)
        if item.get("last"):
            self.parts[sha] = int(item.get("parts") or part + 1)
        if sha in self.parts and len(self.received[sha]) >= self.parts[sha]:
            try:
                with open(path, "rb") as src:
                    return sha, self._finish(sha, iter(lambda: src.read(1 << 20), b""))
            finally:
                os.unlink(path)
        return None

    def _finish(self, sha: str, blocks: Iterable[bytes]) -> str:
        """Decompress, never past the manifest's size, and check the sha256."""
        size = self.wanted.pop(sha)
        out = os.path.join(self.tmp, sha)
        digest = hashlib.sha256()
        unpacker = zlib.decompressobj()
        written = 0
        try:
            with open(out, "wb") as dst:
                for block in blocks:
                    data = unpacker.decompress(block, size + 1 - written)
                    while data:
                        written += len(data)
                        if written > size:
                            raise BlobError(f"blob {sha[:12]}: bigger than its manifest entry")
                        digest.update(data)
                        dst.write(data)
                        data = unpacker.decompress(unpacker.unconsumed_tail, size + 1 - written)
        except zlib.error as exc:
            os.unlink(out)
            raise BlobError(f"blob {sha[:12]}: corrupt ({exc})") from None
        except BlobError:
            os.unlink(out)
            raise
        if digest.hexdigest() != sha or written != size:
            os.unlink(out)
            raise BlobError(f"blob {sha[:12]}: its bytes do not match its sha256")
        return out
