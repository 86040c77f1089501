"""The message of one DATA command, received in chunks and never held whole in memory.

``DataReceiver`` checks and dot-unstuffs the client's data as it arrives (RFC 5321 4.5.2) and
writes it to a ``Spool``: memory for small messages, an unnamed temporary file beyond that.
Nothing relays or files a message before its final dot arrived and every check passed, so a
message refused for a bare CR or LF (RFC 5321 2.3.8; the SMTP smuggling class) never reaches
the next hop, however large it is.
"""

from __future__ import annotations

import asyncio
import os
import tempfile
from collections.abc import Iterator
from typing import IO

# Small messages (the usual case) stay in memory; larger ones go to disk as they stream in.
MEMORY_LIMIT = 512 * 1024
CHUNK = 256 * 1024


class Spool:
    """The unstuffed message (CRLF line ends); readable by position from any one thread."""

    def __init__(self, memory_limit: int = MEMORY_LIMIT) -> None:
        self._memory: bytearray | None = bytearray()
        self._file: IO[bytes] | None = None
        self._memory_limit = memory_limit
        self.size = 0

    def write(self, data: bytes) -> None:
        if self._memory is not None:
            if len(self._memory) + len(data) <= self._memory_limit:
                self._memory += data
                self.size += len(data)
                return
            # O_TMPFILE where available: the file has no name, so nothing is left behind even
            # when the process is killed.
            self._file = tempfile.TemporaryFile(prefix="sentlink-proxy-")  # noqa: SIM115
            self._file.write(self._memory)
            self._memory = None
        assert self._file is not None
        self._file.write(data)
        self.size += len(data)

    def finish(self) -> None:
        """All data written: flush it so positional reads see it."""
        if self._file is not None:
            self._file.flush()

    def read_at(self, offset: int, size: int) -> bytes:
        if self._memory is not None:
            return bytes(self._memory[offset : offset + size])
        assert self._file is not None
        return os.pread(self._file.fileno(), size, offset)

    def chunks(self, start: int = 0, size: int = CHUNK) -> Iterator[bytes]:
        for offset in range(start, self.size, size):
            yield self.read_at(offset, size)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
        self._memory = None
        self._file = None


class DataReceiver:
    """Checks the client's DATA bytes chunk by chunk and writes them, unstuffed, to a spool.

    The caller finds the end of data (CRLF.CRLF) and feeds everything before the final
    ``.CRLF``; chunks may split lines and CRLF pairs anywhere. After the first problem nothing
    more is written and ``problem`` says what was wrong: ``bare_line_ending``, ``too_big``
    (over ``max_bytes`` as sent, like aiosmtpd and Postfix count) or ``line_too_long``.
    """

    def __init__(self, spool: Spool, max_bytes: int, max_line: int) -> None:
        self._spool = spool
        self._max_bytes = max_bytes
        self._max_line = max_line
        self.received = 0
        self.problem: str | None = None
        self._held_cr = False
        self._line_start = True
        self._line_len = 0  # bytes of the current, unfinished line

    def feed(self, chunk: bytes) -> None:
        self.received += len(chunk)
        if self.problem is not None:
            return  # drain to the end of data, then refuse (RFC 5321 4.2.5)
        if self._max_bytes and self.received > self._max_bytes:
            self._fail("too_big")
            return
        if self._held_cr:
            chunk = b"\r" + chunk
            self._held_cr = False
        if chunk.endswith(b"\r"):  # it may pair with an LF that starts the next chunk
            chunk = chunk[:-1]
            self._held_cr = True
        if not chunk:
            return
        pairs = chunk.count(b"\r\n")
        if chunk.count(b"\r") != pairs or chunk.count(b"\n") != pairs:
            self._fail("bare_line_ending")
            return
        if not self._line_length_ok(chunk):
            self._fail("line_too_long")
            return
        # Every line starting with a dot was stuffed by the client (a lone dot ended DATA).
        unstuffed = chunk.replace(b"\r\n.", b"\r\n")
        if self._line_start and unstuffed.startswith(b"."):
            unstuffed = unstuffed[1:]
        self._line_start = chunk.endswith(b"\r\n")
        self._spool.write(unstuffed)

    def finish(self) -> None:
        """The final dot arrived."""
        if self._held_cr and self.problem is None:
            self._fail("bare_line_ending")
        self._spool.finish()

    def _line_length_ok(self, chunk: bytes) -> bool:
        # RFC 5321 4.5.3.1.6: 1000 octets per line with the CRLF (aiosmtpd's rule too).
        limit = self._max_line
        last = chunk.rfind(b"\r\n")
        if last < 0:
            self._line_len += len(chunk)
            return self._line_len + 2 <= limit
        first = chunk.find(b"\r\n")
        if self._line_len + first + 2 > limit:
            return False
        if last > first and len(chunk) > limit:
            longest = max(map(len, chunk[first + 2 : last].split(b"\r\n")))
            if longest + 2 > limit:
                return False
        self._line_len = len(chunk) - last - 2
        return self._line_len + 2 <= limit

    def _fail(self, problem: str) -> None:
        self.problem = problem
        self._spool.close()


async def read_data(reader: asyncio.StreamReader, receiver: DataReceiver) -> None:
    """Feed ``receiver`` the client's data up to the end-of-data line, which is consumed too
    (RFC 5321 4.1.1.4: CRLF.CRLF, the first CRLF being DATA's own for an empty message), in
    pieces of at most the reader's limit; then ``receiver.finish()``.

    StreamReader.readuntil() finds each ``.CRLF`` in C, many lines at a time; one preceded by
    CRLF ends the data, a line that merely ends with a dot costs one more read. The separator
    leaves out that CRLF because the read before may have consumed it.
    """
    tail = b"\r\n"  # the last two bytes consumed: DATA's CRLF to begin with
    while True:
        try:
            part = await reader.readuntil(b".\r\n")
        except asyncio.LimitOverrunError as exc:
            part = await reader.readexactly(exc.consumed)
        else:
            dot = len(part) - 3
            before = part[dot - 2 : dot] if dot >= 2 else (tail + part[:dot])[-2:]
            if before == b"\r\n":
                receiver.feed(part[:dot])
                break
        receiver.feed(part)
        tail = part[-2:] if len(part) >= 2 else (tail + part)[-2:]
    receiver.finish()


def dot_stuffed(prefix: bytes, spool: Spool) -> Iterator[bytes]:
    """``prefix`` then the spooled message, dot-stuffed, ending CRLF.CRLF (RFC 5321 4.5.2)."""
    line_start = True
    after_cr = False  # the previous chunk ended with the CR of a CRLF
    for chunk in _with_prefix(prefix, spool):
        if not chunk:
            continue
        stuffed = chunk.replace(b"\r\n.", b"\r\n..")
        if line_start and chunk.startswith(b"."):
            stuffed = b"." + stuffed
        elif after_cr and chunk.startswith(b"\n."):
            stuffed = b"\n." + stuffed[1:]
        line_start = chunk.endswith(b"\r\n") or (after_cr and chunk == b"\n")
        after_cr = chunk.endswith(b"\r")
        yield stuffed
    yield b".\r\n" if line_start else b"\r\n.\r\n"


def _with_prefix(prefix: bytes, spool: Spool) -> Iterator[bytes]:
    if prefix:
        yield prefix
    yield from spool.chunks()
