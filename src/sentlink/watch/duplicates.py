"""Copies of one sent message in Sent: which are the same, and which one stays visible.

Two copies are the same message when they share the Message-ID and the body hash. The body is
hashed with CRLF read as LF and whitespace at its very end dropped: the capture copy is stored
with LF line ends, an IMAP APPEND arrives with CRLF (RFC 3501 literals) and Dovecot stores LF,
and some POP fetchers and providers add or strip a final newline. Headers differ between copies
(Received:, Bcc:, our trace header) and are not hashed.

Only the hash of the body is ever held; it is read in chunks, so memory stays bounded.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

KeepPolicy = Literal["client", "capture"]

_CHUNK = 65536
_END_OF_HEADER = re.compile(rb"\r?\n\r?\n")


def body_hash(path: Path) -> str:
    """SHA-256 (hex) of the normalized body of the message file at ``path``."""
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        buf = b""
        first = True
        # Skip the header section: up to and including the first empty line.
        while True:
            chunk = fh.read(_CHUNK)
            if not chunk:
                return digest.hexdigest()  # no body at all
            buf += chunk
            if first and buf.startswith((b"\n", b"\r\n")):
                buf = buf[1:] if buf.startswith(b"\n") else buf[2:]
                break
            first = False
            match = _END_OF_HEADER.search(buf)
            if match:
                buf = buf[match.end() :]
                break
            buf = buf[-3:]  # the separator may straddle two chunks
        # Hold back trailing whitespace (it may be the end of the body) and any CR (it may be
        # the first half of a CRLF split across chunks).
        pending = b""
        while True:
            data = pending + buf
            cut = len(data.rstrip(b" \t\r\n"))
            digest.update(data[:cut].replace(b"\r\n", b"\n"))
            pending = data[cut:]
            buf = fh.read(_CHUNK)
            if not buf:
                return digest.hexdigest()


@dataclass(frozen=True)
class Copy:
    """One visible copy in Sent. ``ours``: it carries our valid trace header for the account."""

    path: Path
    ours: bool
    new: bool  # the copy that just arrived


@dataclass(frozen=True)
class Resolution:
    keep: Copy
    delete: tuple[Copy, ...]  # ours: safe to remove
    trash: tuple[Copy, ...]  # not ours: flagged T, never removed


def resolve(copies: Sequence[Copy], keep: KeepPolicy) -> Resolution:
    """Which of identical ``copies`` (oldest first) stays visible, and what happens to the rest.

    ``keep: client`` prefers a copy we did not write (what the user's client saved), ``capture``
    ours (it lists the Bcc recipients). Among equals the oldest stays, so nothing flips back and
    forth when more copies turn up.
    """
    want_ours = keep == "capture"
    preferred = [c for c in copies if c.ours == want_ours]
    keeper = (preferred or list(copies))[0]
    rest = [c for c in copies if c is not keeper]
    return Resolution(
        keep=keeper,
        delete=tuple(c for c in rest if c.ours),
        trash=tuple(c for c in rest if not c.ours),
    )
