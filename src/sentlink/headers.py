"""Read a message file's header section only, with a size cap, and parse it once.

The linker needs a handful of fields; parsing a whole MIME tree (or even handing 100 KB header
lines to the stdlib ``email`` package) for that would cost far more than the rest of linking.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger("sentlink.headers")

DEFAULT_MAX_HEADER_BYTES = 1 << 20
_CHUNK = 16384
# End of the header section: the first empty line (RFC 5322 section 2.1), LF or CRLF endings.
_END_OF_HEADER = re.compile(rb"\r?\n\r?\n")
# A field name is printable US-ASCII except ":" (RFC 5322 section 3.6.8); obsolete syntax allows
# whitespace before the colon (section 4.5).
_FIELD = re.compile(rb"([!-9;-~]+)[ \t]*:")


@dataclass(frozen=True)
class HeaderBlock:
    """Unfolded header fields in file order. Values are UTF-8 (RFC 6532) where they decode as
    such, with any other byte kept as a lone surrogate (``surrogateescape``)."""

    fields: tuple[tuple[str, str], ...]
    truncated: bool = False  # the cap was reached before the end of the header section

    def get_all(self, name: str) -> list[str]:
        key = name.lower()
        return [value for field, value in self.fields if field.lower() == key]

    def get(self, name: str, default: str = "") -> str:
        """The first field of that name (case-insensitive), or ``default``."""
        key = name.lower()
        for field, value in self.fields:
            if field.lower() == key:
                return value
        return default


def read_header_bytes(path: Path, max_bytes: int = DEFAULT_MAX_HEADER_BYTES) -> tuple[bytes, bool]:
    """The raw header section (without the empty line) and whether ``max_bytes`` cut it short."""
    buf = bytearray()
    searched = 0
    with path.open("rb") as fh:
        while len(buf) < max_bytes:
            chunk = fh.read(min(_CHUNK, max_bytes - len(buf)))
            if not chunk:
                break  # the header section runs to the end of the file
            buf += chunk
            if buf.startswith((b"\n", b"\r\n")):
                return b"", False  # an empty line first: no header fields at all
            # Restart the search a few bytes back: the separator may straddle two chunks.
            match = _END_OF_HEADER.search(buf, max(0, searched - 3))
            if match:
                return bytes(buf[: match.start()]), False
            searched = len(buf)
        else:
            return bytes(buf), True
    return bytes(buf), False


def parse_header_bytes(raw: bytes, truncated: bool = False) -> HeaderBlock:
    """Unfold (RFC 5322 section 2.2.3) and split into ``(name, value)`` pairs.

    A line that is neither a field nor a continuation ends the header section, as it does for
    the stdlib parser. When the block was truncated its last field may be cut mid-address, so
    that field is dropped rather than read as a shorter, different address.
    """
    lines = raw.split(b"\n")
    cut_field = False
    if truncated and lines:
        partial = lines.pop()
        cut_field = partial[:1] in (b" ", b"\t")  # the cap fell inside a folded field
    fields: list[tuple[bytes, bytearray]] = []
    for number, line in enumerate(lines):
        line = line.removesuffix(b"\r")
        if line[:1] in (b" ", b"\t"):
            if fields:
                fields[-1][1].extend(line)  # unfolding: drop the CRLF, keep the whitespace
            continue
        match = _FIELD.match(line)
        if match is None:
            if number == 0 and line.startswith(b"From "):
                continue  # mbox "From " separator left in the file by some fetchers
            break
        fields.append((match.group(1), bytearray(line[match.end() :])))
    if cut_field and fields:
        fields.pop()
    return HeaderBlock(
        fields=tuple((_text(name), _text(bytes(value)).strip()) for name, value in fields),
        truncated=truncated,
    )


def read_headers(path: Path, max_bytes: int = DEFAULT_MAX_HEADER_BYTES) -> HeaderBlock:
    """Read and parse the header section of the message file at ``path``."""
    raw, truncated = read_header_bytes(path, max_bytes)
    if truncated:
        log.warning(
            "file=%s header section exceeds %d bytes: using the fields before the cap",
            path.name,
            max_bytes,
        )
    return parse_header_bytes(raw, truncated)


def _text(raw: bytes) -> str:
    return raw.decode("utf-8", "surrogateescape")
