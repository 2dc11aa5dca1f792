"""JSON lines: the one framing between a slot's driver, its runner, the zygote and a spare.

One JSON object per line, UTF-8. Events (runner -> driver) carry text people wrote: a lone
surrogate from odd output is replaced so the line always decodes. Commands and the zygote's
messages are ASCII JSON, so every string (nodeids included) arrives exactly as it was sent.

PYTEST_DONT_REWRITE: spare runners import it before pytest configures (see spare_boot.py).
"""

from __future__ import annotations

import json
import os
import socket
from collections.abc import Callable, Iterator
from typing import Any

from .serialization import dumps, encode_text

#: Bytes read from a pipe at a time.
READ_SIZE = 1 << 16
#: Between a line's header and its part relayed as it is (:func:`encode_split`): JSON text
#: never holds a raw tab (``json.dumps`` escapes every control character).
SPLIT = b"\t"


def encode(message: Any, *, exact: bool = False) -> bytes:
    """One line. ``exact``: ASCII JSON that round-trips every string; else compact UTF-8 where
    a value JSON rejects becomes its ``str()`` and a lone surrogate becomes ``?``."""
    if exact:
        return (json.dumps(message) + "\n").encode()
    return (dumps(message) + "\n").encode("utf-8", "replace")


def encode_split(header: dict[str, Any], fields: dict[str, Any]) -> bytes:
    """One line its reader decodes only in part: ``header``, a tab, then the members of
    ``fields`` (its JSON object without the braces), which :func:`decode` leaves as bytes in
    the header's ``raw`` for the slot to relay (:class:`.serialization.RawTest`)."""
    if not fields:
        raise ValueError("encode_split: no fields")
    return encode_text(header) + SPLIT + encode_text(fields)[1:-1] + b"\n"


def decode(line: bytes) -> Any:
    head, split, raw = line.partition(SPLIT)
    message = json.loads(head.decode("utf-8", "replace"))
    if split:
        message["raw"] = raw
    return message


def write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


class LineWriter:
    """Writes messages to a pipe, one line each (see :func:`encode` for ``exact``).

    A line can be held back (:meth:`hold`) until the next write or :meth:`flush`: a runner
    sends a finished test with the next test's ``logstart``, one write (and one wake-up of the
    slot's driver) per test instead of two."""

    def __init__(self, fd: int, *, exact: bool = False) -> None:
        self.fd = fd
        self.exact = exact
        self.held = b""

    def write(self, message: Any) -> None:
        data = encode(message, exact=self.exact)
        if self.held:
            data, self.held = self.held + data, b""
        write_all(self.fd, data)

    def hold(self, line: bytes) -> None:
        self.held += line

    def flush(self) -> None:
        if self.held:
            data, self.held = self.held, b""
            write_all(self.fd, data)


class LineBuffer:
    """Cuts a byte stream into lines; a partial line waits for the rest."""

    def __init__(self) -> None:
        self._buffer = bytearray()

    def feed(self, data: bytes) -> Iterator[bytes]:
        """The complete, non-blank lines that ``data`` finishes."""
        self._buffer.extend(data)
        while (end := self._buffer.find(b"\n")) >= 0:
            line = bytes(self._buffer[:end])
            del self._buffer[: end + 1]
            if line.strip():
                yield line

    def read(self, fd: int) -> Iterator[Any]:
        """The messages of one read from ``fd``; EOFError when the writer has closed it."""
        data = os.read(fd, READ_SIZE)
        if not data:
            raise EOFError
        for line in self.feed(data):
            yield decode(line)


def read_until_closed(fd: int, before_read: Callable[[], None] = lambda: None) -> Iterator[Any]:
    """Every message on ``fd`` until its writer closes it (the fd is closed at the end);
    ``before_read()`` is called before each read (which may wait)."""
    with os.fdopen(fd, "rb", buffering=0) as pipe:
        lines = LineBuffer()
        while True:
            before_read()
            data = pipe.read(READ_SIZE)
            if not data:
                return
            for line in lines.feed(data):
                yield decode(line)


def send(sock: socket.socket, message: Any) -> None:
    sock.sendall(encode(message, exact=True))
