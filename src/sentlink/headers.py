"""Read a message file's header section only, with a size cap, and parse it once.

The linker needs a handful of fields; parsing a whole MIME tree (or even handing 100 KB header
lines to the stdlib ``email`` package) for that would cost far more than the rest of linking.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from functools import cached_property
from itertools import chain

log = logging.getLogger("sentlink.headers")

DEFAULT_MAX_HEADER_BYTES = 1 << 20
# A file's path as a string or a path object: a reconcile's worker process gets strings (a
# Path costs more to send and to rebuild there than reading the file's header does).
StrPath = str | os.PathLike[str]
_CHUNK = 16384
# End of the header section: the first empty line (RFC 5322 section 2.1), LF or CRLF endings.
_END_OF_HEADER = re.compile(rb"\r?\n\r?\n")
# A field name is printable US-ASCII except ":" (RFC 5322 section 3.6.8); obsolete syntax allows
# whitespace before the colon (section 4.5). The value runs on over continuation lines (those
# starting with whitespace). Anchored at a line start: a search (findall) then tries each
# position past a line that is not a field in constant time, where an unanchored one rescans
# the rest of a long run of name characters from every position (quadratic: a 40 KB line of
# them took 9 s).
_FIELD_WITH_CONTINUATIONS = re.compile(
    r"^([!-9;-~]+)[ \t]*:([^\n]*(?:\n[ \t][^\n]*)*+)\n?", re.MULTILINE
)


# A line break not followed by a field's first line nor by a continuation: where a line-by-line
# reading would stop (or skip a leading "From " line). The "\n" in front lets the search skip
# from one line break to the next instead of trying every position.
_NOT_A_FIELD = re.compile(r"\n(?![!-9;-~]+[ \t]*:|[ \t])")


class FieldSelection:
    """The header fields a reader keeps, by name (case-insensitively).

    A reconcile reads about a dozen fields of each message (addresses, ids, Subject, Date, those
    the rules name) out of all it has (Received chains, DKIM and ARC signatures, list and vendor
    fields): finding just those with one search, and building no value for the others, cost
    6-12 us per message against 18 for splitting every field (bench/watch.py's messages, 9-15
    fields each).
    """

    def __init__(self, names: Iterable[str]) -> None:
        self.names = frozenset(name.lower() for name in names)
        # Longest first: a name that is a prefix of another must not end the alternative early.
        choices = "|".join(re.escape(n) for n in sorted(self.names, key=len, reverse=True))
        # As _FIELD_WITH_CONTINUATIONS, for these names only, each after a line break.
        self.pattern = re.compile(
            rf"\n({choices or '(?!)'})[ \t]*:([^\n]*(?:\n[ \t][^\n]*)*+)",
            re.IGNORECASE | re.ASCII,
        )

    def __repr__(self) -> str:
        return f"FieldSelection({sorted(self.names)!r})"


@dataclass(frozen=True)
class HeaderBlock:
    """Unfolded header fields in file order. Values are UTF-8 (RFC 6532) where they decode as
    such, with any other byte kept as a lone surrogate (``surrogateescape``)."""

    fields: tuple[tuple[str, str], ...]
    truncated: bool = False  # the cap was reached before the end of the header section

    @cached_property
    def by_name(self) -> dict[str, list[str]]:
        """Values by lowercased field name, built on the first lookup (a dozen per message);
        ``parse_header_bytes`` builds it as it splits the fields. Read-only: callers that look
        up many fields of a message use it directly rather than through ``values``."""
        index: dict[str, list[str]] = {}
        for field, value in self.fields:
            index.setdefault(field.lower(), []).append(value)
        return index

    def __getstate__(self) -> dict[str, object]:
        # Sent to the reconcile's main process from a worker (watch/prepare.py): the index is
        # rebuilt there on first use rather than shipped twice the data.
        return {"fields": self.fields, "truncated": self.truncated}

    def get_all(self, name: str) -> list[str]:
        return list(self.by_name.get(name.lower(), ()))

    def values(self, name: str) -> Sequence[str]:
        """``get_all`` without the copy, for callers that only read the values."""
        return self.by_name.get(name.lower(), ())

    def get(self, name: str, default: str = "") -> str:
        """The first field of that name (case-insensitive), or ``default``."""
        values = self.by_name.get(name.lower())
        return values[0] if values else default


def read_header_bytes(
    path: StrPath, max_bytes: int = DEFAULT_MAX_HEADER_BYTES
) -> tuple[bytes, bool]:
    """The raw header section (without the empty line) and whether ``max_bytes`` cut it short."""
    buf = bytearray()
    searched = 0
    # A bare descriptor and os.read: no buffered file object per message (this runs once for
    # every file of a reconcile, and one read usually holds the whole header section).
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        first = os.read(fd, min(_CHUNK, max_bytes))
        if not first or first.startswith((b"\n", b"\r\n")):
            return b"", False  # empty, or an empty line first: no header fields at all
        end = _end_of_header(first)
        if end >= 0:
            return first[:end], False  # the usual case: one read, one copy
        buf += first
        searched = len(buf)
        while len(buf) < max_bytes:
            chunk = os.read(fd, min(_CHUNK, max_bytes - len(buf)))
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
    finally:
        os.close(fd)
    return bytes(buf), False


def _end_of_header(buf: bytes) -> int:
    """Where ``_END_OF_HEADER`` would first match, or -1; bytes.find is several times faster
    than the regex, which has no literal to skip ahead with."""
    lf = buf.find(b"\n\n")
    # Only before the first "\n\n": a file with LF line endings has no "\n\r\n" at all, and a
    # search of the whole buffer read (16 KB) for it cost more than finding the fields.
    crlf = buf.find(b"\n\r\n", 0, len(buf) if lf < 0 else lf + 1)
    newline = lf if crlf < 0 else crlf
    if newline < 0:
        return -1
    return newline - 1 if newline > 0 and buf[newline - 1] == 13 else newline  # 13: "\r"


def parse_header_bytes(
    raw: bytes, truncated: bool = False, only: FieldSelection | None = None
) -> HeaderBlock:
    """Unfold (RFC 5322 section 2.2.3) and split into ``(name, value)`` pairs; with ``only``,
    the fields of those names alone (the same pairs as without it, less the others).

    A line that is neither a field nor a continuation ends the header section, as it does for
    the stdlib parser. When the block was truncated its last field may be cut mid-address, so
    that field is dropped rather than read as a shorter, different address.
    """
    # Decoding the whole block at once gives what decoding each name and value would: they
    # are split at ASCII bytes, which are never part of a multi-byte UTF-8 sequence.
    text = raw.decode("utf-8", "surrogateescape")
    if only is not None and not truncated:
        lines = "\n" + text
        # Usually every line is a field or a continuation: the fields are then exactly where a
        # line break is followed by a name and a colon. Otherwise, the reading below decides.
        if _NOT_A_FIELD.search(lines) is None:
            return _block(only.pattern.findall(lines), truncated)
    cut_field = False
    if truncated:
        text, _newline, partial = text.rpartition("\n")
        cut_field = partial[:1] in (" ", "\t")  # the cap fell inside a folded field
    # Usually every line is a field or a continuation: one findall then splits the block, with
    # no match object and no call per field (9.8 -> 8.3 us per message of bench/watch.py).
    pairs = _FIELD_WITH_CONTINUATIONS.findall(text)
    if not _tiles(pairs, text):
        pairs = _fields_line_by_line(text)
    if cut_field and pairs:
        pairs.pop()
    if only is not None:
        pairs = [pair for pair in pairs if pair[0].lower() in only.names]
    return _block(pairs, truncated)


def _block(pairs: list[tuple[str, str]], truncated: bool) -> HeaderBlock:
    """The block of these ``(name, folded value)`` pairs, and its lookup index."""
    fields: list[tuple[str, str]] = []
    index: dict[str, list[str]] = {}
    for name, value in pairs:
        if "\n" in value:  # unfolding: drop each line break, keep the whitespace after it
            value = value.replace("\r\n", "").replace("\n", "")
        value = value.strip()
        fields.append((name, value))
        key = name.lower()
        if key in index:
            index[key].append(value)
        else:
            index[key] = [value]
    block = HeaderBlock(fields=tuple(fields), truncated=truncated)
    # The lookup index, built in the same pass: cached_property then finds it in the instance
    # dictionary and never runs (nor takes the lock it holds on a first access in 3.11).
    block.__dict__["by_name"] = index
    return block


def _tiles(pairs: list[tuple[str, str]], text: str) -> bool:
    """Whether the fields that findall found follow one another from the start to the end of
    ``text``, so that they are the fields a line-by-line reading finds.

    The matches do not overlap, so they cover all of ``text`` exactly when their lengths add up
    to its length. Each is a name, ":", a value and a line break, except that the last one has
    none at the very end of the text. Whitespace before a colon is not counted: a block with
    such a field (obsolete syntax) takes the line-by-line way.
    """
    size = len("".join(chain.from_iterable(pairs))) + 2 * len(pairs)
    return size - (not text.endswith("\n")) == len(text)


def _fields_line_by_line(text: str) -> list[tuple[str, str]]:
    """The ``(name, folded value)`` pairs of a block with lines that are not fields: those
    before the first line that is neither a field nor a continuation."""
    pairs: list[tuple[str, str]] = []
    pos, end = 0, len(text)
    while pos < end:
        match = _FIELD_WITH_CONTINUATIONS.match(text, pos)
        if match is not None:
            name, value = match.groups()
            pairs.append((name, value))
            pos = match.end()
            continue
        line_end = text.find("\n", pos)
        line = text[pos:] if line_end < 0 else text[pos:line_end]
        # A continuation with no field before it, or the mbox "From " separator some fetchers
        # leave in the file, is skipped; any other line ends the header section.
        if line[:1] not in (" ", "\t") and not (pos == 0 and line.startswith("From ")):
            break
        pos = end if line_end < 0 else line_end + 1
    return pairs


def read_headers(
    path: StrPath, max_bytes: int = DEFAULT_MAX_HEADER_BYTES, only: FieldSelection | None = None
) -> HeaderBlock:
    """Read and parse the header section of the message file at ``path`` (with ``only``, the
    fields of those names alone)."""
    raw, truncated = read_header_bytes(path, max_bytes)
    if truncated:
        log.warning(
            "file=%s header section exceeds %d bytes: using the fields before the cap",
            os.path.basename(path),
            max_bytes,
        )
    return parse_header_bytes(raw, truncated, only)
