"""Import CRM records (contacts and leads) from CSV or vCard into the store, upserting.

CSV: the header is exactly ``kind,id,name,email``; one row per address; rows with the same kind
and id are one record. vCard (``.vcf``, RFC 6350, also 3.0/2.1 files as address books export
them): FN (else N) is the name, every EMAIL an address, UID the id (else a hash of name and
addresses, so re-importing the same card updates it), ``CATEGORIES`` containing ``lead`` makes a
lead. An imported record's address set replaces the stored one.

Bad rows are reported as ``FILE:LINE: message`` and skipped; everything else is imported.
"""

from __future__ import annotations

import csv
import hashlib
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO, cast

from sentlink.addresses import AmbiguousAddressError, normalize_address, parse_mailboxes
from sentlink.model import Record, RecordKind
from sentlink.store import Store

CSV_HEADER = ["kind", "id", "name", "email"]
VCARD_SUFFIXES = (".vcf", ".vcard")
_PROGRESS_STEP = 65536
_SURROGATES = re.compile("[\udc80-\udcff]")

Progress = Callable[[int], None]


@dataclass(frozen=True)
class ImportSummary:
    records: int
    addresses: int
    errors: tuple[str, ...] = ()

    def as_dict(self) -> dict[str, object]:
        return {"records": self.records, "addresses": self.addresses, "errors": list(self.errors)}


@dataclass
class _Draft:
    """A record being assembled from one or more rows or cards."""

    kind: RecordKind
    id: str
    name: str = ""
    emails: dict[str, None] = field(default_factory=dict)  # ordered set

    def record(self) -> Record:
        return Record(self.kind, self.id, self.name, tuple(self.emails))


class _Drafts:
    def __init__(self) -> None:
        self.by_key: dict[tuple[str, str], _Draft] = {}

    def add(self, kind: RecordKind, rid: str, name: str, emails: list[str]) -> None:
        draft = self.by_key.setdefault((kind, rid), _Draft(kind, rid))
        if name and not draft.name:
            draft.name = name
        draft.emails.update(dict.fromkeys(emails))


def import_units(path: Path) -> int:
    """Length of the progress bar ``import_records`` advances: the file size in bytes."""
    return path.stat().st_size


def import_records(path: Path, store: Store, progress: Progress | None = None) -> ImportSummary:
    """Read ``path`` (vCard when it ends in .vcf/.vcard, else CSV) and upsert its records.

    ``progress`` is called with the number of bytes read since its last call.
    """
    errors: list[str] = []
    drafts = _Drafts()
    with path.open("rb") as fh:
        lines = _lines(fh, progress)
        if path.suffix.lower() in VCARD_SUFFIXES:
            _read_vcards(lines, drafts, _Errors(path, errors))
        else:
            _read_csv(lines, drafts, _Errors(path, errors))
    records = [d.record() for d in drafts.by_key.values()]
    store.upsert_records(records)
    return ImportSummary(
        records=len(records),
        addresses=sum(len(r.emails) for r in records),
        errors=tuple(errors),
    )


class _Errors:
    def __init__(self, path: Path, sink: list[str]) -> None:
        self._path = path
        self._sink = sink

    def __call__(self, line: int, message: str) -> None:
        self._sink.append(f"{self._path}:{line}: {message}")


def _lines(fh: BinaryIO, progress: Progress | None) -> Iterator[str]:
    """Decoded lines, endings kept (the csv module needs them); bytes that are not UTF-8 stay
    as lone surrogates so the row holding them can be reported instead of failing the file."""
    pending = 0
    first = True
    for raw in fh:
        pending += len(raw)
        if first:
            raw = raw.removeprefix(b"\xef\xbb\xbf")  # spreadsheet programs write a UTF-8 BOM
            first = False
        yield raw.decode("utf-8", "surrogateescape")
        if progress is not None and pending >= _PROGRESS_STEP:
            progress(pending)
            pending = 0
    if progress is not None and pending:
        progress(pending)


def _address(value: str) -> str:
    """One normalized address from a field, or AmbiguousAddressError saying why not."""
    mailboxes = parse_mailboxes(value)
    if len(mailboxes) != 1:
        raise AmbiguousAddressError(
            f"expected one address, found {len(mailboxes)}" if mailboxes else "no address"
        )
    return normalize_address(mailboxes[0][1])


# CSV


def _read_csv(lines: Iterator[str], drafts: _Drafts, error: _Errors) -> None:
    reader = csv.reader(lines, strict=True)
    line = 0
    while True:
        start = line + 1
        try:
            row = next(reader)
        except StopIteration:
            return
        except csv.Error as exc:
            line = reader.line_num
            error(start, f"bad CSV: {exc}")
            continue
        line = reader.line_num
        if start == 1:
            if row != CSV_HEADER:
                error(1, "expected the header kind,id,name,email")
                return
            continue
        if not row or all(not f.strip() for f in row):
            continue
        if len(row) != len(CSV_HEADER):
            error(start, f"expected 4 fields (kind,id,name,email), found {len(row)}")
            continue
        if any(_SURROGATES.search(f) for f in row):
            error(start, "not valid UTF-8")
            continue
        kind, rid, name, email = (f.strip() for f in row)
        if kind not in ("contact", "lead"):
            error(start, f"kind must be contact or lead, not {kind!r}")
            continue
        if not rid:
            error(start, "empty id")
            continue
        try:
            addr = _address(email)
        except AmbiguousAddressError as exc:
            error(start, f"bad email {email!r}: {exc}")
            continue
        drafts.add(cast(RecordKind, kind), rid, name, [addr])


# vCard


@dataclass
class _Card:
    line: int
    name: str = ""
    structured_name: str = ""
    uid: str = ""
    lead: bool = False
    emails: list[str] = field(default_factory=list)


def _logical_lines(lines: Iterator[str]) -> Iterator[tuple[int, str]]:
    """Unfolded content lines with the number of their first physical line (RFC 6350 3.2:
    a line break followed by one space or tab continues the line)."""
    start, buf = 0, ""
    for number, text in enumerate(lines, 1):
        text = text.rstrip("\r\n")
        if text[:1] in (" ", "\t") and start:
            buf += text[1:]
            continue
        if start:
            yield start, buf
        start, buf = number, text
    if start:
        yield start, buf


def _read_vcards(lines: Iterator[str], drafts: _Drafts, error: _Errors) -> None:
    card: _Card | None = None
    for number, text in _logical_lines(lines):
        if not text.strip():
            continue
        prop, value = _split_property(text)
        if prop == "BEGIN" and value.strip().upper() == "VCARD":
            if card is not None:
                error(card.line, "missing END:VCARD")
            card = _Card(number)
            continue
        if card is None:
            error(number, f"{prop or text[:20]!r} outside BEGIN:VCARD ... END:VCARD")
            continue
        if prop == "END" and value.strip().upper() == "VCARD":
            _finish_card(card, drafts, error)
            card = None
            continue
        if _SURROGATES.search(text):
            error(number, f"{prop}: not valid UTF-8")
            continue
        _card_property(card, number, prop, value, error)
    if card is not None:
        error(card.line, "missing END:VCARD")


def _card_property(card: _Card, number: int, prop: str, value: str, error: _Errors) -> None:
    if prop == "FN":
        card.name = _unescape(value).strip()
    elif prop == "N":
        parts = [_unescape(p).strip() for p in _split_unescaped(value, ";")]
        # N is family;given;additional;prefix;suffix: "Given Family" when FN is missing.
        card.structured_name = " ".join(p for p in (parts[1:2] + parts[:1]) if p)
    elif prop == "UID":
        card.uid = _unescape(value).strip()
    elif prop == "CATEGORIES":
        categories = [_unescape(c).strip().lower() for c in _split_unescaped(value, ",")]
        card.lead = card.lead or "lead" in categories
    elif prop == "EMAIL":
        email = _unescape(value).strip()
        if email.lower().startswith("mailto:"):
            email = email[len("mailto:") :]
        try:
            card.emails.append(_address(email))
        except AmbiguousAddressError as exc:
            error(number, f"bad EMAIL {email!r}: {exc}")


def _finish_card(card: _Card, drafts: _Drafts, error: _Errors) -> None:
    if not card.emails:
        error(card.line, "vCard without a usable EMAIL")
        return
    name = card.name or card.structured_name
    rid = card.uid
    if not rid:
        # Stable across re-imports of the same card: same name and addresses, same id.
        digest = hashlib.sha256("\n".join([name, *sorted(set(card.emails))]).encode())
        rid = "vcf-" + digest.hexdigest()[:16]
    drafts.add("lead" if card.lead else "contact", rid, name, card.emails)


def _split_property(text: str) -> tuple[str, str]:
    """``[group.]NAME[;param...]:value`` -> (NAME uppercased, value). Parameters (TYPE=...)
    do not matter here, but a colon may appear inside their double-quoted values (RFC 6350
    section 3.3), so the value starts at the first colon outside quotes."""
    quoted = False
    for i, char in enumerate(text):
        if char == '"':
            quoted = not quoted
        elif char == ":" and not quoted:
            head, value = text[:i], text[i + 1 :]
            break
    else:
        head, value = text, ""
    name = head.split(";", 1)[0]
    return name.rpartition(".")[2].strip().upper(), value


def _split_unescaped(value: str, sep: str) -> list[str]:
    """Split on ``sep`` except where backslash-escaped."""
    parts, buf, escaped = [], [], False
    for char in value:
        if escaped:
            buf.append("\\" + char)
            escaped = False
        elif char == "\\":
            escaped = True
        elif char == sep:
            parts.append("".join(buf))
            buf = []
        else:
            buf.append(char)
    parts.append("".join(buf))
    return parts


_ESCAPES = {"n": "\n", "N": "\n", ",": ",", ";": ";", "\\": "\\"}


def _unescape(value: str) -> str:
    return re.sub(r"\\(.)", lambda m: _ESCAPES.get(m.group(1), m.group(1)), value)
