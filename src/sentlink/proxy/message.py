"""The few things the proxy reads from a message: its header fields and Message-ID.

Only called on a spool that spool.DataReceiver accepted: CRLF line ends only.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from sentlink.errors import CaptureError
from sentlink.proxy.spool import Spool

MAX_HEADER_BYTES = 1 << 20


def header_end(data: bytes) -> tuple[int, int]:
    """(end of the header block, start of the body): the block excludes the empty line."""
    if data.startswith(b"\r\n"):
        return 0, 2
    index = data.find(b"\r\n\r\n")
    if index < 0:
        return len(data), len(data)  # headers only, no body
    return index + 2, index + 4


@dataclass(frozen=True)
class Head:
    """The header section of a spooled message."""

    fields: list[tuple[str, str]]
    body_start: int
    problem: str = ""
    """A CaptureError reason when the header section could not be read (fields then [])."""


def read_head(spool: Spool) -> Head:
    """The header fields of the message in ``spool`` and where its body starts."""
    prefix = spool.read_at(0, MAX_HEADER_BYTES + 4)
    head_end, body_start = header_end(prefix)
    if head_end == len(prefix) and len(prefix) < spool.size:
        return Head([], spool.size, "header_size")  # no end of the header within the limit
    try:
        return Head(header_fields(prefix[:head_end]), body_start)
    except CaptureError as exc:
        return Head([], body_start, exc.reason)


def header_fields(block: bytes) -> list[tuple[str, str]]:
    """``(name, value)`` pairs as a milter sees them: value without the blank after the colon,
    folding kept (``\\r\\n`` + continuation). Lines that are not fields are dropped."""
    if len(block) > MAX_HEADER_BYTES:
        raise CaptureError("header_size", f"header section over {MAX_HEADER_BYTES} bytes")
    fields: list[tuple[str, str]] = []
    for raw in block.split(b"\r\n"):
        line = raw.decode("utf-8", "surrogateescape")
        if not line:
            continue
        if line[0] in " \t":
            if fields:
                name, value = fields[-1]
                fields[-1] = (name, f"{value}\r\n{line}")
            continue
        name, colon, value = line.partition(":")
        if colon and name and name == name.strip():
            fields.append((name, value.lstrip(" \t")))
    return fields


def message_id_of(fields: Sequence[tuple[str, str]]) -> str | None:
    for name, value in fields:
        if name.lower() == "message-id" and value.strip():
            return value.strip()
    return None


def stable_message_id(
    mail_from: str, rcpts: Sequence[str], data: Iterable[bytes], host: str
) -> str:
    """A Message-ID derived from the transaction itself.

    In content_filter mode Postfix retries a message it could not hand over; the same message
    must then get the same id, so the retry finds the copy filed the first time.
    """
    digest = hashlib.sha256()
    digest.update(mail_from.encode("utf-8", "surrogateescape") + b"\0")
    for rcpt in rcpts:
        digest.update(rcpt.encode("utf-8", "surrogateescape") + b"\0")
    for chunk in data:
        digest.update(chunk)
    return f"<{digest.hexdigest()[:32]}.sentlink@{host}>"


def message_id_field(message_id: str) -> bytes:
    """A ``Message-ID:`` field to put first in a message that has none."""
    return b"Message-ID: " + message_id.encode("ascii") + b"\r\n"
