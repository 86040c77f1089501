"""The ``links`` command's data: filtered link rows, as JSON-able dicts or a table for people."""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator, Sequence
from typing import TextIO

from sentlink.addresses import AmbiguousAddressError, normalize_address
from sentlink.store import LinkRow, Store, UnmatchedRow

_COLUMNS = ("date", "account", "dir", "record", "email", "role", "via", "subject", "message_id")
_WIDTHS = {"subject": 40, "record": 30, "message_id": 40}


def iter_links(
    store: Store,
    account: str | None = None,
    email: str | None = None,
    record: tuple[str, str] | None = None,
    message_id: str | None = None,
) -> Iterator[LinkRow]:
    """Links matching every given filter. ``email`` is compared normalized (case, IDNA);
    ``message_id`` with or without its angle brackets; ``record`` is ``(kind, id)``."""
    if email is not None:
        try:
            email = normalize_address(email)
        except AmbiguousAddressError:
            email = email.strip().lower()  # cannot match a stored address: an empty result
    if message_id is not None:
        message_id = message_id.strip().removeprefix("<").removesuffix(">").strip()
    return store.query_links(account=account, email=email, record=record, message_id=message_id)


def write_json_lines(rows: Iterable[LinkRow], out: TextIO) -> int:
    """One JSON object per line (members only ever added); returns the number of rows."""
    count = 0
    for row in rows:
        out.write(json.dumps(row, ensure_ascii=False) + "\n")
        count += 1
    return count


def format_table(rows: Sequence[LinkRow]) -> str:
    """A plain-text table with a header line, ending in a newline; a note when empty."""
    if not rows:
        return "no links\n"
    cells = [_cells(row) for row in rows]
    widths = {c: max(len(c), *(len(r[c]) for r in cells)) for c in _COLUMNS}
    lines = ["  ".join(c.upper().ljust(widths[c]) for c in _COLUMNS).rstrip()]
    lines += ["  ".join(r[c].ljust(widths[c]) for c in _COLUMNS).rstrip() for r in cells]
    return "\n".join(lines) + "\n"


def _cells(row: LinkRow) -> dict[str, str]:
    record = row["record"]
    name = f" ({record['name']})" if record["name"] else ""
    cells = {
        "date": row["date"][:19].replace("T", " "),
        "account": row["account"],
        "dir": row["direction"],
        "record": f"{record['kind']}:{record['id']}{name}",
        "email": record["email"],
        "role": row["role"],
        "via": row["via"],
        "subject": row["subject"],
        "message_id": row["message_id"],
    }
    return {k: _clip(" ".join(v.split()), _WIDTHS.get(k)) for k, v in cells.items()}


def _clip(text: str, width: int | None) -> str:
    if width is None or len(text) <= width:
        return text
    return text[: width - 1] + "…"


def format_unmatched_table(rows: Sequence[UnmatchedRow]) -> str:
    """Addresses kept for review (``crm.unmatched: review``) per account, with their counts."""
    if not rows:
        return "no unmatched addresses\n"
    header = ("ACCOUNT", "EMAIL", "MESSAGES", "FIRST", "LAST")
    cells = [
        (r["account"], r["email"], str(r["messages"]), _when(r["first"]), _when(r["last"]))
        for r in rows
    ]
    widths = [max(len(h), *(len(c[i]) for c in cells)) for i, h in enumerate(header)]
    lines = [header, *cells]
    return (
        "\n".join(
            "  ".join(c.ljust(w) for c, w in zip(line, widths, strict=True)).rstrip()
            for line in lines
        )
        + "\n"
    )


def _when(iso: str) -> str:
    return iso[:19].replace("T", " ")
